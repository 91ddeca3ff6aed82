"""What a stage's config is: one dataclass per stage (its `stage` names it), and `validate`,
the one place every value and combination is checked.

Where the values come from -- the dataclass's defaults, then the profile's preset, then
overrides, in one typed merge -- is `presets.py`. A config serialises as plain JSON into every
run directory, so a run can always be traced back to the values it used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

PROFILES = ("smoke", "paper", "tiny")  # resources/presets/<profile>.yaml; tiny: smoke at a few steps (tests)
AUGMENT_MODES = ("host", "device", "reference")  # where the training augmentation runs (data/augment.py)
TARGETS = ("relation", "feature", "cls")  # what a student distils (the paper's ablation)
RELATIONS = ("qk", "vv")
TEACHER_QUANT = ("none", "int8", "fp8")  # the frozen teacher's linears (distill.quantize_teacher)


class ConfigError(ValueError):
    """A config key, value or combination that cannot be used."""


# the model shapes (models.ARCHS builds them): what the checks below need to know of a model
ARCH_SHAPES: dict[str, dict[str, int]] = json.loads(resources.files("tinymim.resources").joinpath("archs.json").read_text())["archs"]


REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: notebooks/, reports/


def cache_dir(*parts: str) -> Path:
    """Where derived artefacts are cached (synthetic data, smoke teachers, corruptions):
    $TINYMIM_CACHE, default ~/.cache/tinymim."""
    return Path(os.environ.get("TINYMIM_CACHE", Path.home() / ".cache" / "tinymim")).joinpath(*parts)


def derive_seed(seed: int, *keys: int | str) -> int:
    """An independent 63-bit seed for one use of the config's `seed` (an epoch's order, a
    rank, a sample's augmentation): NumPy's SeedSequence, so streams never collide the way
    `seed * K + epoch` can."""
    ints = [int.from_bytes(k.encode(), "little") if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence([int(seed), *ints]).generate_state(1, np.uint64)[0]) >> 1


# (low, high, low open, high open) of every numeric field that has bounds; None is always allowed
_POS, _NONNEG, _UNIT, _OPEN = (1, None, False, False), (0, None, False, False), (0, 1, False, True), (0, None, True, False)
RANGES: dict[str, tuple] = {
    **dict.fromkeys(("data_limit", "input_size", "batch_size", "micro_batch_size", "steps", "log_every", "ckpt_every",
                     "decoder_dim", "decoder_depth", "decoder_heads", "teacher_block", "student_heads", "num_classes",
                     "pretrain_epochs", "heads", "channels", "aux_channels", "slide_stride", "num_images"), _POS),
    **dict.fromkeys(("seed", "data_seed", "lr", "blr", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay",
                     "num_workers", "color_jitter", "mixup", "cutmix", "extra_fc", "aux_weight"), _NONNEG),
    **dict.fromkeys(("drop_path", "mask_ratio", "label_smoothing"), _UNIT),
    **dict.fromkeys(("epochs", "eps", "clip_grad", "layer_scale"), _OPEN),
    "layer_decay": (0, 1, True, False), "reprob": (0, 1, False, False),
}


def _in_range(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    return ((low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    lo, hi = "-inf" if low is None else f"{low:g}", "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass
class BaseConfig:
    """Fields every training or evaluation stage shares (the engine reads these)."""

    stage: ClassVar[str] = ""
    profile: str = "smoke"
    model: str = "micro_tiny"
    seed: int = 0  # training randomness: init, data order, augmentation
    data: str = "synthetic"  # a built-in dataset (synthetic, digits) or a dataset root folder
    data_seed: int = 0  # the built-in datasets and every data_limit subset: fixed while `seed` varies the training
    data_limit: int | None = None  # train on a stratified subset of N images (seeded by data_seed; data.json says which)
    input_size: int = 32
    batch_size: int = 256  # effective batch (per step, all devices, after accumulation)
    micro_batch_size: int | None = None  # per device and forward pass; None = batch_size / world
    lr: float | None = None  # peak lr at `batch_size`; derived from blr when None
    blr: float | None = None  # base lr per 256 images: lr = blr * batch_size / 256
    min_lr: float = 1e-5
    schedule: str = "cosine"  # cosine | linear
    epochs: float = 1.0
    warmup_epochs: float = 0.0
    steps: int | None = None  # overrides epochs when set
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float | None = None
    drop_path: float = 0.1
    amp: str = "auto"  # auto | bf16 | fp16 | none
    num_workers: int | None = None  # data-loader processes per device; None = from the CPUs present
    augment: str = "host"  # host | device | reference: where the training augmentation runs (data/augment.py)
    log_every: int = 20
    ckpt_every: int = 500

    def validate(self) -> None:
        """Every check of a value or a combination, in one place (called after the merge)."""
        check_choice("profile", self.profile, PROFILES)
        for name, value in dataclasses.asdict(self).items():
            if name in RANGES and value is not None and not _in_range(value, *RANGES[name]):
                raise ConfigError(f"{name}: expected a value in {_range_text(*RANGES[name])}, got {value}")
        if self.lr is None and self.blr is None:
            raise ConfigError("lr: set either lr or blr")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {self.betas}")
        patch = ARCH_SHAPES[self.model].get("patch_size", 16) if self.model in ARCH_SHAPES else 1
        if self.input_size % patch:
            raise ConfigError(f"input_size: {self.input_size} is not a multiple of {self.model}'s patch size {patch} "
                              f"(the last {self.input_size % patch} pixels of each row and column would be dropped)")
        if self.steps is not None and self.warmup_steps and self.warmup_steps >= self.steps:
            raise ConfigError(f"warmup_steps: {self.warmup_steps} warm-up steps for {self.steps} steps of training; "
                              f"set warmup_steps below steps (e.g. --set warmup_steps={self.steps // 10})")
        crop = getattr(self, "crop_scale", (0.5, 1.0))
        if not 0 < crop[0] <= crop[1] <= 1:
            raise ConfigError(f"crop_scale: expected 0 < min <= max <= 1, got {crop}")
        check_choice("schedule", self.schedule, ("cosine", "linear"))
        check_choice("amp", self.amp, ("auto", "bf16", "fp16", "none"))
        check_choice("augment", self.augment, AUGMENT_MODES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"stage": self.stage}


@dataclass
class MAEConfig(BaseConfig):
    """MAE pre-training (He et al., 2022) -- makes teachers; not part of TinyMIM's tables."""

    stage: ClassVar[str] = "mae"
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)


@dataclass
class PretrainConfig(BaseConfig):
    """TinyMIM distillation pre-training (Table 1)."""

    stage: ClassVar[str] = "pretrain"
    teacher: str = "micro_base"
    teacher_path: str | None = None  # None in smoke = make (and cache) the MAE micro teacher
    teacher_block: int | None = None  # 1-indexed; None = docs/method.md's default for the teacher
    target: str = "relation"  # relation | feature | cls
    relations: tuple[str, ...] = RELATIONS  # which relation KLs a relation target sums (ablation: one alone)
    mask_ratio: float = 0.0  # masking of the student input (ablation); 0 = none, as the paper
    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_jitter: float = 0.4  # student view only
    student_heads: int | None = None  # heads of all but the last block; None = the model's
    teacher_quant: str = "none"  # none | int8 | fp8: the frozen teacher's linears quantised (opt-in; BENCHMARKS.md)

    def validate(self) -> None:
        super().validate()
        check_choice("target", self.target, TARGETS)
        if not self.relations or len(set(self.relations)) != len(self.relations) or not set(self.relations) <= set(RELATIONS):
            raise ConfigError(f"relations: expected qk, vv or qk,vv, got {','.join(self.relations) or 'nothing'}")
        check_choice("teacher_quant", self.teacher_quant, TEACHER_QUANT)
        check_choice("teacher", self.teacher, tuple(ARCH_SHAPES))
        depth = ARCH_SHAPES[self.teacher]["depth"]
        if self.teacher_block is not None and self.teacher_block > depth:
            raise ConfigError(f"teacher_block: {self.teacher} has blocks 1..{depth}, got {self.teacher_block}")


@dataclass
class FinetuneConfig(BaseConfig):
    """ImageNet-1K fine-tuning following MAE (Table 2)."""

    stage: ClassVar[str] = "finetune"
    num_classes: int | None = None  # None = the data's classes (resolved by presets.get_config)
    pretrained: str | None = None  # checkpoint path; None = from scratch
    pretrain_epochs: int = 300  # selects ViT-B's drop path (Table 2 footnote)
    heads: int | None = None  # uniform head count; None = the checkpoint's recorded layout (or the model's)
    layer_decay: float = 0.65
    global_pool: str = "avg"
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    reprob: float = 0.25
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (timm/MAE default)
    extra_fc: int = 0  # TinyMIM*-T: 1280-wide FC before the classifier
    dist_token: bool = False  # TinyMIM*-T: DeiT distillation token + head
    teacher_classifier: str | None = None  # hard-label teacher: tinymim checkpoint, or timm:<name>=<path>

    def validate(self) -> None:
        super().validate()
        if self.dist_token and not self.teacher_classifier:
            raise ConfigError("teacher_classifier: a distillation token needs a teacher classifier "
                              "(a fine-tuned tinymim checkpoint, or timm:<model name>=<weights file>)")
        check_choice("global_pool", self.global_pool, ("avg", "token"))
        if self.dist_token and self.global_pool != "token":
            raise ConfigError("global_pool: DeiT's distillation token pools the tokens (global_pool=token)")
        if self.augment == "device" and self.rand_augment:
            raise ConfigError("augment=device: RandAugment exists only as PIL operations, which run in the data "
                              "workers; use augment=host, or rand_augment='' to crop on the device")


@dataclass
class SegmentationConfig(BaseConfig):
    """ADE20K UperNet fine-tuning (Table 3)."""

    stage: ClassVar[str] = "segmentation"
    num_classes: int = 150
    pretrained: str | None = None
    layer_decay: float = 0.75
    out_indices: tuple[int, ...] = (3, 5, 7, 11)  # blocks 4, 6, 8, 12
    channels: int = 768  # UperNet width: the release's configs (upernet_mae_*_512_slide_160k_ade20k)
    aux_channels: int = 256
    aux_weight: float = 0.4
    slide_stride: int = 341
    reduce_zero_label: bool = True
    rel_pos_bias: bool = True  # the release's backbone: a trainable relative position bias per block
    layer_scale: float | None = 1.0  # ... and layer scale initialised to 1 (None: a plain timm ViT)

    def validate(self) -> None:
        super().validate()
        if self.augment != "host":
            raise ConfigError(f"augment: segmentation's ADE20K pipeline runs in the data workers (host); "
                              f"got {self.augment!r}")
        if self.slide_stride > self.input_size:
            raise ConfigError(f"slide_stride: {self.slide_stride} is larger than the window (input_size "
                              f"{self.input_size}): pixels between windows would never be predicted")
        depth = ARCH_SHAPES[self.model]["depth"]
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ConfigError(f"out_indices: expected 4 block indices in 0..{depth - 1} for {self.model}, "
                              f"got {self.out_indices}")


CORRUPTIONS = json.loads(resources.files("tinymim.resources").joinpath("imagenet_c_alexnet_err.json").read_text())


@dataclass
class RobustnessConfig(BaseConfig):
    """ImageNet-A/R/C evaluation; only evaluation fields matter."""

    stage: ClassVar[str] = "robustness"
    checkpoint: str | None = None
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS["corruptions_15"])
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    resize: int | None = None  # None = centre crop only, as hendrycks' ImageNet-C script
    num_images: int | None = None  # synthetic data: how many val images get a "-C" version

    def validate(self) -> None:
        super().validate()
        if not self.severities or not set(self.severities) <= {1, 2, 3, 4, 5}:
            raise ConfigError(f"severities: expected values among 1..5, got {self.severities}")
        known = CORRUPTIONS["corruptions_15"] + CORRUPTIONS["extra_4"]  # what imagecorruptions can generate
        unknown = [c for c in self.corruptions if c not in known]
        if unknown or not self.corruptions:
            raise ConfigError(f"corruptions: unknown {unknown}; expected names among {known}")


CONFIGS: dict[str, type[BaseConfig]] = {c.stage: c for c in (MAEConfig, PretrainConfig, FinetuneConfig,
                                                              SegmentationConfig, RobustnessConfig)}
