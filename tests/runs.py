"""Run directories for tests that read one (explorer, FiftyOne, the browser test)."""

import torch

from tinymim import pipeline
from tinymim.checkpoints import atomic_save, save_model
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config
from tinymim.segmentation import build_segmenter


def make_tiny_run(root) -> pipeline.RunLayout:
    """A run directory as notebooks 01-04 leave it, with untrained micro models."""
    run = pipeline.layout(root, "smoke")
    torch.manual_seed(0)
    run.models.mkdir(parents=True, exist_ok=True)
    save_model(build_model(ModelSpec.create("micro_base")), run.teacher)
    run.pretrain.mkdir(parents=True, exist_ok=True)
    save_model(build_model(ModelSpec.create("micro_tiny", last_heads=6)), run.student)
    for folder, pretrained in ((run.finetune / "distilled-s0", str(run.student)),
                               (run.baselines / "micro_tiny-scratch-abc123", None)):
        folder.mkdir(parents=True, exist_ok=True)
        cfg = get_config("finetune", profile="smoke", overrides={"pretrained": pretrained, "seed": 0})
        save_model(build_model(ModelSpec.create("micro_tiny", num_classes=10)), folder / "model.pth",
                   extra={"config": cfg.to_dict()})  # what notebook 03 records: its arm and seed
    cfg = get_config("segmentation", profile="smoke")
    run.segmentation.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": build_segmenter(cfg).state_dict(), "config": cfg.to_dict()}, run.segmentation / "model.pth")
    return run


def micro_teacher(path):
    """An untrained micro_base saved as a teacher (seed 0), for the launch and cluster tests."""
    torch.manual_seed(0)
    return save_model(build_model(ModelSpec.create("micro_base")), path)


def same_weights(a, b) -> bool:
    """Two checkpoints hold the same tensors, bit for bit."""
    x, y = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
