"""The doctor's GPU-side arithmetic, on the CPU: the micro-batch search and the plan that
turns it into the paper's effective batch."""

import pytest
import torch

from tinymim import doctor


def test_largest_fit_doubles_until_out_of_memory(monkeypatch):
    tried = []

    def fake_steps(stage, cfg, micro, steps, device):
        tried.append(micro)
        if micro > 96:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"images_per_s": 1.0, "peak_mem_gib": 1.0}

    monkeypatch.setattr(doctor, "_time_steps", fake_steps)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert doctor._largest_fit("pretrain", None, 1024, torch.device("cuda", 0)) == 64
    assert tried == [8, 16, 32, 64, 128]
    tried.clear()
    assert doctor._largest_fit("pretrain", None, 32, torch.device("cuda", 0)) == 32  # capped by the per-GPU batch
    monkeypatch.setattr(doctor, "_time_steps", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError, match="not even a micro-batch of 8"):
        doctor._largest_fit("pretrain", type("C", (), {"model": "vit_base"})(), 1024, torch.device("cuda", 0))


@pytest.mark.parametrize("paper_batch, fits, devices, plan", [
    (4096, 64, 8, (64, 8)),     # Table 1 on 8 GPUs: 512 per GPU = 64 x 8
    (4096, 96, 8, (64, 8)),     # 96 fits, but 512 is not a multiple of it
    (2048, 1024, 8, (256, 1)),  # fits whole
    (16, 2, 1, (2, 8)),         # Table 3 on one small GPU
    (1024, 3, 1, (2, 512)),
])
def test_plan_gives_the_paper_batch(paper_batch, fits, devices, plan):
    micro, accum = doctor._plan(paper_batch, fits, devices)
    assert (micro, accum) == plan and micro * accum * devices == paper_batch


def test_largest_fit_stops_at_cublas_and_cudnn_allocation_failures(monkeypatch):
    """cuBLAS/cuDNN report running out of memory as a RuntimeError, not OutOfMemoryError."""
    def fake_steps(stage, cfg, micro, steps, device):
        if micro > 16:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return {}

    monkeypatch.setattr(doctor, "_time_steps", fake_steps)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert doctor._largest_fit("pretrain", None, 1024, torch.device("cuda", 0)) == 16
    monkeypatch.setattr(doctor, "_time_steps", lambda *a: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # anything else is not swallowed
        doctor._largest_fit("pretrain", None, 1024, torch.device("cuda", 0))


def test_the_data_check_scales_one_workers_rate_and_states_the_memory_in_flight(monkeypatch):
    """keeps_up compares per-core throughput x workers with the fastest stage: timing a few
    batches that many workers decoded in parallel beforehand overstated it."""
    from tinymim import bench

    rows = {"host": {"worker_images_per_s_per_core": 300.0, "device_ms_per_image": 1.0, "bytes_per_sample": 150_000},
            "device": {"worker_images_per_s_per_core": 400.0, "device_ms_per_image": 2.0, "bytes_per_sample": 560_000}}
    monkeypatch.setattr(bench, "bench_data", lambda **kw: {"pipelines": {"pretrain": rows}})
    monkeypatch.setattr(doctor, "default_workers", lambda devices: 6)
    training = [{"stage": "pretrain", "images_per_s": 2000.0}, {"stage": "pretrain", "images_per_s": 1500.0}]
    (record,) = doctor.check_data("paper", 8, training, torch.device("cpu"), micro=64)
    assert record["images_per_s"] == 1800.0 and record["keeps_up"] is False and "augment=device" in record["note"]
    assert record["in_flight_mib"] == round(6 * 2 * 64 * 150_000 / 2**20, 1)
    training = [{"stage": "pretrain", "images_per_s": 1000.0}]
    assert doctor.check_data("paper", 8, training, torch.device("cpu"))[0]["keeps_up"] is True
