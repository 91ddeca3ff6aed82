"""The stage registry: what a training stage is, defined once.

timm's `register_model` / `create_model` is the pattern: each stage module keeps its own
function and task builder, and this registry names them -- the config class (whose `stage`
is the name), the file the stage finishes with, how its result loads back. The CLI makes its
commands from it, `launch` runs a stage in process, under torchrun or on SLURM through it,
`doctor` and `bench` build tasks through it, and the pipeline and the study take results from
it; nothing else names a stage's module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import finetune, mae, pretrain, segmentation
from .checkpoints import load_classifier, load_teacher, open_checkpoint
from .config import BaseConfig, FinetuneConfig, MAEConfig, PretrainConfig, SegmentationConfig
from .engine import read_metrics

# (task, the module whose parameters the optimiser groups or None for the task, layer decay)
Task = tuple[nn.Module, nn.Module | None, float | None]


@dataclass(frozen=True)
class StageResult:
    """What a stage left in its run directory, however it was launched: the file it finished
    with and its metrics (the evaluation, or the last logged training step)."""

    stage: str
    run_dir: Path
    path: Path
    metrics: dict[str, Any]

    def model(self) -> nn.Module:
        """The trained model, loaded from `path` (a classifier, segmenter or encoder)."""
        return get(self.stage).load(self.path)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[BaseConfig]
    final: str  # the file the stage finishes with
    train: Callable[..., Any]  # train(cfg, run_dir, progress=, device=): the stage's own function
    build_task: Callable[[Any], Task]  # the task with random weights (doctor, bench)
    recipe: Callable[[Any, Any], Any]  # recipe(cfg, device): the augmentation (data/augment.py)
    load: Callable[[Path], nn.Module]
    evaluates: bool  # writes eval.json
    help: str
    aliases: tuple[str, ...] = ()

    def run(self, cfg: BaseConfig, run_dir: str | os.PathLike, device: Any = "auto", progress: bool = True) -> StageResult:
        self.train(cfg, Path(run_dir), progress=progress, device=device)
        return self.result(run_dir)

    def finished_config(self, run_dir: str | os.PathLike) -> dict[str, Any] | None:
        """The config the stage's final file in `run_dir` was trained with, if it is there."""
        path = Path(run_dir) / self.final
        return open_checkpoint(path).meta.get("config") if path.exists() else None

    def result(self, run_dir: str | os.PathLike) -> StageResult:
        run_dir = Path(run_dir)
        if self.evaluates:
            metrics = json.loads((run_dir / "eval.json").read_text())
        else:
            logged = read_metrics(run_dir)
            metrics = logged[-1] if logged else {}
        return StageResult(self.name, run_dir, run_dir / self.final, metrics)


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.config.stage != stage.name:
        raise ValueError(f"stage {stage.name!r}: its config class is for {stage.config.stage!r}")
    for name in (stage.name, *stage.aliases):
        _REGISTRY[name] = stage
    return stage


def get(name: str) -> Stage:
    """The stage named `name` (or one of its aliases: `segment` for `segmentation`)."""
    if name not in _REGISTRY:
        raise ValueError(f"stage: expected one of {names()}, got {name!r}")
    return _REGISTRY[name]


def names() -> list[str]:
    """The stages' own names, in pipeline order (aliases left out)."""
    return list(dict.fromkeys(s.name for s in _REGISTRY.values()))


register(Stage("mae", MAEConfig, "teacher.pth", mae.pretrain_mae, mae.build_task, mae.recipe, lambda p: load_teacher(None, p),
               evaluates=False, help="MAE pre-training of a teacher encoder"))
register(Stage("pretrain", PretrainConfig, "student.pth", pretrain.pretrain, pretrain.build_task, pretrain.recipe,
               lambda p: load_teacher(None, p), evaluates=False, help="TinyMIM distillation pre-training"))
register(Stage("finetune", FinetuneConfig, "model.pth", finetune.train_classifier, finetune.build_task, finetune.recipe,
               lambda p: load_classifier(p, num_classes=None), evaluates=True,
               help="ImageNet fine-tuning / TinyMIM*-T distillation fine-tuning, then top-1/top-5"))
register(Stage("segmentation", SegmentationConfig, "model.pth", segmentation.train_segmentation,
               segmentation.build_task, segmentation.recipe, lambda p: segmentation.load_segmenter(p)[0], evaluates=True,
               help="ADE20K UperNet fine-tuning, then mIoU", aliases=("segment",)))
