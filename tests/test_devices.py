"""One device rule for every stage: `auto` takes the GPU when there is one (this process's
under torchrun), an explicit device wins, a missing one is named; loaders keep a GPU fed."""

import pytest
import torch

from tinymim import devices
from tinymim.devices import DeviceError, autocast_dtype, gpu_count, loader_options, resolve_device

V100, A100, H100 = (7, 0), (8, 0), (9, 0)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has `n` CUDA GPUs of the given compute capability (one for all, or one
    per GPU); nothing is run on them. torch's `is_bf16_supported` says True even for a V100
    (emulation counts by default): the kit must not ask it."""
    def have(n: int, capability=A100) -> None:
        caps = capability if isinstance(capability, list) else [capability] * n
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[0 if i is None else i])
    return have


def test_auto_is_the_cpu_without_a_gpu(gpus):
    gpus(0)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert gpu_count("auto") == 0


def test_auto_is_this_processs_gpu(gpus, monkeypatch):
    gpus(4)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    assert gpu_count("auto") == gpu_count("cuda") == 4 and gpu_count("cuda:1") == 1 and gpu_count("cpu") == 0


def test_an_explicit_device_wins(gpus):
    gpus(2)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


@pytest.mark.parametrize("have, asked, message", [
    (0, "cuda", "no CUDA GPU"), (2, "cuda:2", r"2 GPU\(s\): cuda:0\.\.cuda:1"), (1, "gpu", "expected auto, cpu, cuda"),
    (1, "mps", "not supported"),
])
def test_a_device_that_is_not_there_is_named(gpus, have, asked, message):
    gpus(have)
    with pytest.raises(DeviceError, match=message) as e:
        resolve_device(asked)
    assert repr(asked) in str(e.value)


def test_precision_follows_the_device(gpus, monkeypatch):
    gpus(1, H100)
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    gpus(1, A100)
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    gpus(1, V100)  # bf16 only emulated there: fp16, with the GradScaler the engine enables for it
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.float16
    gpus(2, [V100, A100])  # per GPU, not the current one's answer for all
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.float16
    assert autocast_dtype("auto", torch.device("cuda", 1)) is torch.bfloat16
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: False)
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("none", torch.device("cuda", 0)) is None and autocast_dtype("fp16", torch.device("cpu")) is torch.float16


def test_fp16_runs_with_a_grad_scaler_and_bf16_without(tmp_path, monkeypatch):
    from tinymim import engine
    from tinymim.data import TensorBatches
    from tinymim.presets import get_config

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 1)

        def forward(self, x):
            return self.lin(x.flatten(1)).mean(), {}
    loss = Task()
    cfg = get_config("mae", overrides={"steps": 2, "warmup_steps": 0, "batch_size": 4})
    for dtype, scaled in ((torch.float16, True), (torch.bfloat16, False)):
        monkeypatch.setattr(engine, "autocast_dtype", lambda amp, device, d=dtype: d)
        run = engine.start_run(loss, TensorBatches(torch.zeros(8, 3, 2, 2), batch_size=4), cfg, tmp_path / str(dtype),
                               torch.device("cpu"))
        assert run.dtype is dtype and run.scaler.is_enabled() is scaled


def test_the_environment_record_states_bf16_per_gpu_without_touching_their_memory(gpus, monkeypatch):
    gpus(2, [V100, H100])
    props = [type("P", (), {"name": name, "major": c[0], "minor": c[1], "total_memory": 16 * 2**30})()
             for name, c in (("V100", V100), ("H100", H100))]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 20, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90000)

    def no_context(i):
        raise AssertionError("mem_get_info creates a CUDA context on that GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_context)
    env = devices.environment()
    assert [g["bf16"] for g in env["gpus"]] == [False, True] and "free_gib" not in env["gpus"][0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (8 * 2**30, 16 * 2**30))
    assert devices.environment(free_memory=True)["gpus"][1]["free_gib"] == 8.0  # the doctor asks


def test_pinned_gpus_become_the_ranks_visible_devices(gpus, monkeypatch):
    from tinymim.launch import child_devices

    gpus(4)
    assert gpu_count("cuda:1,2") == 2 and child_devices("cuda:1,2", 2) == ({"CUDA_VISIBLE_DEVICES": "1,2"}, "cuda")
    assert child_devices("auto", 4) == ({}, "auto")
    with pytest.raises(DeviceError, match="NCCL needs one GPU per process"):
        child_devices("cuda:1", 2)
    with pytest.raises(DeviceError, match="several GPUs"):
        resolve_device("cuda:0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # indices are into what this process sees
    assert child_devices("cuda:0,3", 2)[0] == {"CUDA_VISIBLE_DEVICES": "4,7"}
    with pytest.raises(DeviceError, match="cuda:5"):
        gpu_count("cuda:1,5")


def test_out_of_memory_includes_cublas_and_cudnn_allocation_failures():
    assert devices.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert devices.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert devices.is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))
    assert not devices.is_oom(RuntimeError("shape mismatch"))


def test_loader_options_feed_a_gpu(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    opts = loader_options(None)
    assert opts == {"num_workers": 7, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 2}
    assert loader_options(0) == {"num_workers": 0, "pin_memory": True}
    assert loader_options(3, persistent=False)["persistent_workers"] is False
    gpus(0)
    assert loader_options(2)["pin_memory"] is False


def test_the_config_leaves_workers_to_the_host():
    from tinymim.presets import get_config

    assert get_config("pretrain", "vit_small", "paper").num_workers is None  # default_workers() at run time
    assert get_config("pretrain", profile="smoke").num_workers == 0  # in-memory tensors


def test_stage_functions_default_to_auto():
    """grep-level: nothing that trains or evaluates is hard-wired to the CPU."""
    import inspect

    from tinymim import engine, evaluation, finetune, mae, pretrain, robustness, segmentation

    functions = [engine.train, evaluation.predict, evaluation.features, finetune.train_classifier, finetune.evaluate,
                 mae.pretrain_mae, pretrain.pretrain, pretrain.pretrain_sequential, robustness.evaluate_robustness,
                 robustness.errors_on_tensors, robustness.errors_on_imagenet_c, robustness.evaluate_subset,
                 segmentation.train_segmentation, segmentation.evaluate_segmentation]
    for f in functions:
        assert inspect.signature(f).parameters["device"].default == "auto", f.__qualname__


def test_every_notebook_takes_device_and_nproc():
    import nbformat

    from tinymim.runner import NOTEBOOKS_DIR, list_notebooks

    for path in list_notebooks(NOTEBOOKS_DIR):
        nb = nbformat.read(path, as_version=4)
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        names = {line.split("=")[0].strip() for line in params.source.splitlines() if "=" in line}
        assert {"device", "nproc"} <= names, path.name
        body = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert 'device="cpu"' not in body and "device='cpu'" not in body, path.name
