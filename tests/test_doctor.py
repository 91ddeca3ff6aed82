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
