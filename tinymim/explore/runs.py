"""The models a run directory holds, as typed entries: what the explorer and FiftyOne show."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoints import load_classifier, load_teacher, open_checkpoint
from ..pipeline import RunLayout


def load_model(source: str | os.PathLike | nn.Module) -> nn.Module:
    """A model to explore: a module as it is; `timm:<name>=<file>`; a tinymim classifier
    checkpoint (fine-tuned, TinyMIM*-T) or any encoder checkpoint (teacher, student, MAE)."""
    if isinstance(source, nn.Module):
        return source.eval()
    if str(source).startswith("timm:"):
        return load_classifier(source, num_classes=None)
    spec = open_checkpoint(source).spec
    if spec is not None and spec.num_classes > 0:
        return load_classifier(source, num_classes=None)
    return load_teacher(None, source).eval()


@dataclass(frozen=True)
class RunModel:
    """One model of a run: an encoder (the teacher, the distilled student) or a fine-tuned
    classifier of an arm and seed -- read from the checkpoint's recorded config, not its name."""

    arm: str  # teacher | student | distilled | scratch
    path: Path
    seed: int | None = None  # classifiers: their fine-tuning seed
    copy: int = 1  # a second run of the same arm and seed (another config) is copy 2

    @property
    def classifier(self) -> bool:
        return self.seed is not None

    @property
    def key(self) -> str:
        """A field name: `distilled_s0`, `scratch_s1`, `teacher`, `student`."""
        key = f"{self.arm}_s{self.seed}" if self.classifier else self.arm
        return key if self.copy == 1 else f"{key}_{self.copy}"

    @property
    def name(self) -> str:
        """What a person reads in a dropdown."""
        copy = "" if self.copy == 1 else f" #{self.copy}"
        return {"teacher": "teacher", "student": "student (distilled)"}.get(
            self.arm, f"{self.arm} seed {self.seed}{copy} (fine-tuned)")


def run_models(run: RunLayout) -> list[RunModel]:
    """Every model checkpoint a run directory holds: the teacher (notebook 01), the distilled
    student (02), the fine-tuned classifiers of notebook 03's arms (scratch baselines
    included), in that order."""
    found = [RunModel(arm, path) for arm, path in (("teacher", run.teacher), ("student", run.student)) if path.exists()]
    classifiers: list[RunModel] = []
    for path in [*sorted(run.finetune.glob("*/model.pth")), *sorted(run.baselines.glob("*/model.pth"))]:
        cfg = open_checkpoint(path).meta.get("config")
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: no recorded config (its arm and seed); not a checkpoint of notebook 03")
        arm, seed = "distilled" if cfg.get("pretrained") else "scratch", int(cfg["seed"])
        copy = 1 + sum(m.arm == arm and m.seed == seed for m in classifiers)
        classifiers.append(RunModel(arm, path, seed, copy))
    return found + sorted(classifiers, key=lambda m: (m.arm != "distilled", m.seed, m.copy))
