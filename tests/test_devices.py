"""One device rule for every stage: `auto` takes the GPU when there is one (this process's
under torchrun), an explicit device wins, a missing one is named; loaders keep a GPU fed."""

import pytest
import torch

from tinymim import devices
from tinymim.devices import DeviceError, autocast_dtype, gpu_count, loader_options, resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has `n` CUDA GPUs (nothing is run on them)."""
    def have(n: int, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
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
    gpus(1, bf16=True)
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    gpus(1, bf16=False)  # e.g. a V100: fp16 with the GradScaler the engine enables for it
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.float16
    monkeypatch.setattr(devices, "native_bf16_cpu", lambda: False)
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("none", torch.device("cuda", 0)) is None and autocast_dtype("fp16", torch.device("cpu")) is torch.float16


def test_loader_options_feed_a_gpu(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    opts = loader_options(None)
    assert opts == {"num_workers": 7, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    assert loader_options(0) == {"num_workers": 0, "pin_memory": True}
    assert loader_options(3, persistent=False)["persistent_workers"] is False
    gpus(0)
    assert loader_options(2)["pin_memory"] is False


def test_the_config_leaves_workers_to_the_host():
    from tinymim.config import get_config

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
