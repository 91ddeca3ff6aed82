"""Stage configs and the two profiles, `smoke` and `paper`.

Every stage (mae, pretrain, finetune, segmentation, robustness) has one dataclass. A
config is resolved from (stage, model, profile) plus `key=value` overrides, validated
against the dataclass field types, and serialised as plain JSON into every run
directory, so a run can always be traced back to the exact values it used.

`paper` values are the supplementary Tables 1-3 (TinyMIM, CVPR 2023); the same figures
are kept as data in `resources/paper_tables.json` and the tests compare the two.
`smoke` keeps every code path but shrinks model, data and schedule to CPU minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

PROFILES = ("smoke", "paper")
# where the training augmentation's crop runs (data/augment.py): data workers, the device, or
# the release's PIL transforms verbatim
AUGMENT_MODES = ("host", "device", "reference")
# (is the MAE stage, profile) -> default model: students distil, teachers are MAE-trained
DEFAULT_MODELS = {(False, "smoke"): "micro_tiny", (False, "paper"): "vit_small",
                  (True, "smoke"): "micro_base", (True, "paper"): "vit_base"}


class ConfigError(ValueError):
    """A config key, value or combination that cannot be used."""


@dataclass(frozen=True)
class Arch:
    """The shape of a plain ViT (supplementary Table 1 for T/S/B). Give one directly to
    `models.ModelSpec.create` to build a ViT of any size."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224

    @property
    def ffn_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


ARCHS: dict[str, Arch] = {
    # paper sizes (ViT-L: the MAE teacher of ViT-B)
    "vit_tiny": Arch(192, 12, 3),
    "vit_small": Arch(384, 12, 6),
    "vit_base": Arch(768, 12, 12),
    "vit_large": Arch(1024, 24, 16),
    # TinyMIM*-T's backbone: ViT-T with 12 heads instead of 3 (same weights' shapes)
    "tinymim_star_tiny": Arch(192, 12, 12),
    # smoke sizes: 32 px images, patch 8 (a 4x4 grid: measured to learn several times
    # faster per CPU-minute than patch 4), the paper's T < S < B ordering; widths divisible by the teacher's 6 heads
    "micro_tiny": Arch(96, 4, 3, patch_size=8, img_size=32),
    "micro_small": Arch(144, 4, 4, patch_size=8, img_size=32),
    "micro_base": Arch(192, 6, 6, patch_size=8, img_size=32),
}

# the models each stage has a published recipe for (paper profile); smoke takes any ARCHS name
PAPER_MODELS = {
    "mae": ("vit_base", "vit_large"),
    "pretrain": ("vit_tiny", "vit_small", "vit_base"),
    "finetune": ("vit_tiny", "vit_small", "vit_base", "tinymim_star_tiny"),
    "segmentation": ("vit_tiny", "vit_small", "vit_base", "tinymim_star_tiny"),
    "robustness": tuple(ARCHS),
}


def cache_dir(*parts: str) -> Path:
    """Where derived artefacts are cached (synthetic data, smoke teachers, corruptions):
    $TINYMIM_CACHE, default ~/.cache/tinymim."""
    root = Path(os.environ.get("TINYMIM_CACHE", Path.home() / ".cache" / "tinymim"))
    return root.joinpath(*parts)


def derive_seed(seed: int, *keys: int | str) -> int:
    """An independent 63-bit seed for one use of the config's `seed` (an epoch's order, a
    rank, an image of a corruption set): NumPy's SeedSequence, so streams never collide
    the way `seed * K + epoch` can."""
    ints = [int.from_bytes(k.encode(), "little") if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence([int(seed), *ints]).generate_state(1, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take; None = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def contains(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or (v < self.high if self.high_open else v <= self.high)))

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


POSITIVE, NON_NEGATIVE, UNIT = Range(1), Range(0), Range(0, 1, high_open=True)
# every numeric field of every stage, checked in one place (`BaseConfig.finalize`); a field
# set to None (optional) is not checked
RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE, "data_seed": NON_NEGATIVE, "data_limit": POSITIVE, "input_size": POSITIVE,
    "batch_size": POSITIVE, "micro_batch_size": POSITIVE, "lr": NON_NEGATIVE, "blr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE, "epochs": Range(0, low_open=True), "warmup_epochs": NON_NEGATIVE, "steps": POSITIVE,
    "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "eps": Range(0, low_open=True),
    "clip_grad": Range(0, low_open=True), "drop_path": UNIT, "num_workers": NON_NEGATIVE, "log_every": POSITIVE,
    "ckpt_every": POSITIVE, "mask_ratio": UNIT, "decoder_dim": POSITIVE, "decoder_depth": POSITIVE,
    "decoder_heads": POSITIVE, "teacher_block": POSITIVE, "student_heads": POSITIVE, "color_jitter": NON_NEGATIVE,
    "num_classes": POSITIVE, "pretrain_epochs": POSITIVE, "heads": POSITIVE, "layer_decay": Range(0, 1, low_open=True),
    "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "label_smoothing": UNIT, "reprob": Range(0, 1),
    "extra_fc": NON_NEGATIVE, "channels": POSITIVE, "aux_channels": POSITIVE, "aux_weight": NON_NEGATIVE,
    "slide_stride": POSITIVE, "num_images": POSITIVE, "layer_scale": Range(0, low_open=True),
}


@dataclass
class BaseConfig:
    """Fields every training or evaluation stage shares (the engine reads these)."""

    profile: str = "smoke"
    model: str = "micro_tiny"
    seed: int = 0  # training randomness: init, data order, augmentation
    data: str = "synthetic"  # "synthetic" or a dataset root folder
    data_seed: int = 0  # the synthetic dataset itself: fixed while `seed` varies the training
    data_limit: int | None = None  # use only the first N training images (quick trials)
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

    def finalize(self) -> None:
        """Derive dependent values and check combinations; called after overrides."""
        if self.profile not in PROFILES:
            raise ConfigError(f"profile: expected one of {PROFILES}, got {self.profile!r}")
        for name, value in dataclasses.asdict(self).items():
            if name in RANGES and value is not None and not RANGES[name].contains(value):
                raise ConfigError(f"{name}: expected a value in {RANGES[name]}, got {value}")
        if self.lr is None:
            if self.blr is None:
                raise ConfigError("lr: set either lr or blr")
            self.lr = self.blr * self.batch_size / 256
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {self.betas}")
        patch = ARCHS[self.model].patch_size if self.model in ARCHS else 1
        if self.input_size % patch:
            raise ConfigError(f"input_size: {self.input_size} is not a multiple of {self.model}'s patch size {patch} "
                              f"(the last {self.input_size % patch} pixels of each row and column would be dropped)")
        if self.steps is not None and self.warmup_steps and self.warmup_steps >= self.steps:
            raise ConfigError(f"warmup_steps: {self.warmup_steps} warm-up steps for {self.steps} steps of training; "
                              f"set warmup_steps below steps (e.g. --set warmup_steps={self.steps // 10})")
        crop = getattr(self, "crop_scale", (0.5, 1.0))
        if not 0 < crop[0] <= crop[1] <= 1:
            raise ConfigError(f"crop_scale: expected 0 < min <= max <= 1, got {crop}")
        if self.schedule not in ("cosine", "linear"):
            raise ConfigError(f"schedule: expected 'cosine' or 'linear', got {self.schedule!r}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ConfigError(f"amp: expected auto|bf16|fp16|none, got {self.amp!r}")
        if self.augment not in AUGMENT_MODES:
            raise ConfigError(f"augment: expected one of {', '.join(AUGMENT_MODES)}, got {self.augment!r}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path: expected a value in [0, 1), got {self.drop_path}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stage"] = STAGE_OF[type(self)]
        return d


@dataclass
class MAEConfig(BaseConfig):
    """MAE pre-training (He et al., 2022) -- makes teachers; not part of TinyMIM's tables."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)


@dataclass
class PretrainConfig(BaseConfig):
    """TinyMIM distillation pre-training (Table 1)."""

    teacher: str = "micro_base"
    teacher_path: str | None = None  # None in smoke = make (and cache) the MAE micro teacher
    teacher_block: int | None = None  # 1-indexed; None = METHOD.md default for the teacher
    target: str = "relation"  # relation | feature | cls
    relations: tuple[str, ...] = ("qk", "vv")  # which relation KLs a relation target sums (ablation: one alone)
    mask_ratio: float = 0.0  # masking of the student input (ablation); 0 = none, as the paper
    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_jitter: float = 0.4  # student view only
    student_heads: int | None = None  # heads of all but the last block; None = the model's
    teacher_quant: str = "none"  # none | int8 | fp8: the frozen teacher's linears quantised (opt-in; see BENCHMARKS.md)

    def finalize(self) -> None:
        super().finalize()
        if self.target not in ("relation", "feature", "cls"):
            raise ConfigError(f"target: expected relation|feature|cls, got {self.target!r}")
        if not self.relations or len(set(self.relations)) != len(self.relations) \
                or not set(self.relations) <= {"qk", "vv"}:
            raise ConfigError(f"relations: expected qk, vv or qk,vv, got {','.join(self.relations) or 'nothing'}")
        if self.teacher_quant not in ("none", "int8", "fp8"):
            raise ConfigError(f"teacher_quant: expected none, int8 or fp8, got {self.teacher_quant!r}")
        if self.teacher not in ARCHS:
            raise ConfigError(f"teacher: unknown model {self.teacher!r}; expected one of {sorted(ARCHS)}")
        depth = ARCHS[self.teacher].depth
        if self.teacher_block is not None and self.teacher_block > depth:
            raise ConfigError(f"teacher_block: {self.teacher} has blocks 1..{depth}, got {self.teacher_block}")


@dataclass
class FinetuneConfig(BaseConfig):
    """ImageNet-1K fine-tuning following MAE (Table 2)."""

    num_classes: int = 10
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
    color_jitter: float | None = None  # MAE fine-tuning uses RandAugment instead
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (timm/MAE default)
    extra_fc: int = 0  # TinyMIM*-T: 1280-wide FC before the classifier
    dist_token: bool = False  # TinyMIM*-T: DeiT distillation token + head
    teacher_classifier: str | None = None  # hard-label teacher: tinymim checkpoint, or timm:<name>=<path>

    def finalize(self) -> None:
        super().finalize()
        if self.dist_token and not self.teacher_classifier:
            raise ConfigError("teacher_classifier: a distillation token needs a teacher classifier "
                              "(a fine-tuned tinymim checkpoint, or timm:<model name>=<weights file>)")
        if self.global_pool not in ("avg", "token"):
            raise ConfigError(f"global_pool: expected avg|token, got {self.global_pool!r}")
        if self.dist_token:
            self.global_pool = "token"  # DeiT pools the class and distillation tokens: record what runs
        if self.augment == "device" and self.rand_augment:
            raise ConfigError("augment=device: RandAugment exists only as PIL operations, which run in the data "
                              "workers; use augment=host, or rand_augment='' to crop on the device")


@dataclass
class SegmentationConfig(BaseConfig):
    """ADE20K UperNet fine-tuning (Table 3)."""

    num_classes: int = 150
    pretrained: str | None = None
    layer_decay: float = 0.75
    out_indices: tuple[int, ...] = (3, 5, 7, 11)  # blocks 4, 6, 8, 12
    channels: int = 768  # UperNet width: the release's configs (upernet_mae_*_512_slide_160k_ade20k)
    rel_pos_bias: bool = True  # the release's backbone: a trainable relative position bias per block
    layer_scale: float | None = 1.0  # ... and layer scale initialised to 1 (None: a plain timm ViT)
    aux_channels: int = 256
    aux_weight: float = 0.4
    slide_stride: int = 341
    reduce_zero_label: bool = True

    def finalize(self) -> None:
        super().finalize()
        if self.augment != "host":
            raise ConfigError(f"augment: segmentation's ADE20K pipeline runs in the data workers (host); "
                              f"got {self.augment!r}")
        if self.slide_stride > self.input_size:
            raise ConfigError(f"slide_stride: {self.slide_stride} is larger than the window (input_size "
                              f"{self.input_size}): pixels between windows would never be predicted")
        depth = ARCHS[self.model].depth
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ConfigError(f"out_indices: expected 4 block indices in 0..{depth - 1} for {self.model}, "
                              f"got {self.out_indices}")


@dataclass
class RobustnessConfig(BaseConfig):
    """ImageNet-A/R/C evaluation; only evaluation fields matter."""

    checkpoint: str | None = None
    corruptions: tuple[str, ...] = (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    )
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    resize: int | None = None  # None = centre crop only, as hendrycks' ImageNet-C script
    num_images: int | None = None  # synthetic data: how many val images get a "-C" version

    def finalize(self) -> None:
        super().finalize()
        bad = [s for s in self.severities if s not in (1, 2, 3, 4, 5)]
        if bad or not self.severities:
            raise ConfigError(f"severities: expected values among 1..5, got {self.severities}")
        from importlib import resources

        table = json.loads(resources.files("tinymim.resources").joinpath("imagenet_c_alexnet_err.json").read_text())
        known = table["corruptions_15"] + table["extra_4"]  # what imagecorruptions can generate
        unknown = [c for c in self.corruptions if c not in known]
        if unknown or not self.corruptions:
            raise ConfigError(f"corruptions: unknown {unknown}; expected names among {known}")


STAGES: dict[str, type[BaseConfig]] = {
    "mae": MAEConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "segmentation": SegmentationConfig,
    "robustness": RobustnessConfig,
}
STAGE_OF = {cls: name for name, cls in STAGES.items()}

# ---------------------------------------------------------------------------------
# paper presets: supplementary Tables 1-3 (and the MAE paper for `mae`)


def _paper(stage: str, model: str) -> dict[str, Any]:
    common = dict(input_size=224, eps=1e-8, weight_decay=0.05, log_every=50, ckpt_every=2000)
    if stage == "mae":  # MAE paper, Table 8 (pre-training setting)
        return common | dict(batch_size=4096, blr=1.5e-4, min_lr=0.0, epochs=800, warmup_epochs=40,
                             betas=(0.9, 0.95), drop_path=0.0, decoder_dim=512, decoder_depth=8)
    if stage == "pretrain":  # Table 1, 300-epoch schedule (main text); 100/5 also listed
        teacher = "vit_large" if model == "vit_base" else "vit_base"
        return common | dict(batch_size=4096, blr=1.5e-4, min_lr=1e-5, schedule="cosine", epochs=300,
                             warmup_epochs=15, betas=(0.9, 0.95), drop_path=0.1, color_jitter=0.4,
                             crop_scale=(0.2, 1.0), teacher=teacher, target="relation", mask_ratio=0.0)
    if stage == "finetune":  # Table 2
        per_model = {"vit_tiny": (5e-3, 200, 2048), "vit_small": (5e-3, 200, 2048), "vit_base": (2e-3, 100, 1024),
                     "tinymim_star_tiny": (5e-3, 1000, 2048)}
        lr, epochs, batch = per_model[model]
        star = dict(extra_fc=1280, dist_token=True) if model == "tinymim_star_tiny" else {}
        return common | star | dict(lr=lr, epochs=epochs, batch_size=batch, warmup_epochs=5, layer_decay=0.65,
                             betas=(0.9, 0.95), schedule="cosine", min_lr=1e-6, drop_path=0.1, label_smoothing=0.1,
                             reprob=0.25, rand_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
                             num_classes=1000, clip_grad=None)
    if stage == "segmentation":  # Table 3 (ViT-S/B; ViT-T reuses it); layer decay: the release's configs
        return common | dict(input_size=512, lr=1e-4, steps=160000, warmup_steps=1500, batch_size=16,
                             betas=(0.9, 0.999), layer_decay=0.8 if model == "tinymim_star_tiny" else 0.75,
                             min_lr=0.0, schedule="linear", drop_path=0.1, num_classes=150, ckpt_every=16000)
    if stage == "robustness":  # the ImageNet-A/R/C folders are given per run
        return common | dict(batch_size=256, lr=0.0, drop_path=0.0, data="imagenet")
    raise ConfigError(f"unknown stage {stage!r}")


def _smoke(stage: str, model: str) -> dict[str, Any]:
    common = dict(input_size=32, num_workers=0, log_every=20, ckpt_every=200, weight_decay=0.05)
    if stage == "mae":
        return common | dict(batch_size=256, lr=1.5e-3, min_lr=1e-5, steps=800, amp="auto",
                             warmup_steps=100, betas=(0.9, 0.95), drop_path=0.0, decoder_dim=96,
                             decoder_depth=2, decoder_heads=3, crop_scale=(0.35, 1.0))
    if stage == "pretrain":
        return common | dict(batch_size=256, lr=1.5e-3, steps=300, warmup_steps=30, betas=(0.9, 0.95),
                             drop_path=0.1, teacher="micro_base", color_jitter=0.4, crop_scale=(0.35, 1.0))
    if stage == "finetune":
        # scarce labels, where pre-training can matter (measured over 3 seeds): 2 000 labels of the
        # 20 000-image pool, 400 steps (300-step distillation): scratch 18.8 +- 0.9 %, distilled
        # 27.4 +- 0.2 %; 800 steps (600-step distillation): 24.1 +- 1.5 vs 30.4 +- 0.3 (scratch has
        # converged: 23.6 at 1 600 steps, seed 0); 1 000 labels, 600 steps: 15.7 vs 26.1; all
        # 5 000, 1 500 steps (one seed): scratch 40.8 vs distilled 40.3
        return common | dict(batch_size=128, lr=1e-3, steps=400, warmup_steps=50, data_limit=2000, layer_decay=0.75,
                             crop_scale=(0.35, 1.0),
                             betas=(0.9, 0.95), drop_path=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
                             reprob=0.0, rand_augment="", num_classes=10, min_lr=1e-5)
    if stage == "segmentation":
        return common | dict(lr=1e-3, steps=600, warmup_steps=50, batch_size=32, betas=(0.9, 0.999),
                             layer_decay=0.9, min_lr=0.0, schedule="linear", drop_path=0.0,
                             num_classes=11, out_indices=(0, 1, 2, 3), slide_stride=21, reduce_zero_label=False,
                             channels=64, aux_channels=32)
    if stage == "robustness":
        return common | dict(batch_size=500, lr=0.0, drop_path=0.0, num_images=200)
    raise ConfigError(f"unknown stage {stage!r}")


# ---------------------------------------------------------------------------------
# resolution and validation


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (a string from the command line, or a Python value) to type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if isinstance(value, str) and origin is tuple and typing.get_args(tp)[0] is str and not value.startswith("["):
        value = [v.strip() for v in value.split(",") if v.strip()]  # "contrast,fog"
    if isinstance(value, str) and (tp in (int, float, bool) or origin is tuple):
        text = f"[{value}]" if origin is tuple and not value.startswith("[") else value  # "0.9,0.95"
        text = text.lower() if tp is bool else text  # True / true
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        item = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(key, v, item) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["lr=1e-3", "betas=0.9,0.99"]` -> {"lr": "1e-3", "betas": "0.9,0.99"}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def get_config(
    stage: str,
    model: str | None = None,
    profile: str = "smoke",
    overrides: dict[str, Any] | None = None,
) -> BaseConfig:
    """Resolve the config of `stage` for `model` under `profile`, then apply overrides.

    `model` defaults to the profile's student (smoke: micro_tiny; paper: vit_small), or
    for `mae` to its teacher (micro_base; vit_base).
    Overrides are validated: an unknown key or a value of the wrong type raises
    ConfigError naming the key and what was expected.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage: expected one of {sorted(STAGES)}, got {stage!r}")
    if profile not in PROFILES:
        raise ConfigError(f"profile: expected one of {PROFILES}, got {profile!r}")
    cls = STAGES[stage]
    types_ = _field_types(cls)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for stage {stage!r}; valid keys: {sorted(types_)}")
    model = model or DEFAULT_MODELS[(stage == "mae", profile)]
    if not isinstance(model, str):
        raise ConfigError(f"model: expected a model name, got {model!r}")
    known = PAPER_MODELS[stage] if profile == "paper" else tuple(ARCHS)
    if model not in known:
        raise ConfigError(f"model: {model!r} has no {profile} recipe for stage {stage!r}; expected one of {list(known)}")
    preset = (_paper if profile == "paper" else _smoke)(stage, model)
    values = {"profile": profile, "model": model} | preset | overrides
    if "steps" in overrides and "warmup_steps" not in overrides and preset.get("warmup_steps"):
        steps = _coerce("steps", overrides["steps"], int)
        if steps is not None and 0 < steps <= preset["warmup_steps"]:  # keep the preset's warm-up share
            values["warmup_steps"] = preset["warmup_steps"] * steps // preset["steps"]
            warnings.warn(f"steps={steps}: warm-up scaled from {preset['warmup_steps']} to {values['warmup_steps']} "
                          f"steps (the preset's share); set warmup_steps to choose", stacklevel=2)
    if "lr" in overrides:  # an explicit lr wins over the batch-scaled base lr
        values["blr"] = None
    cfg = cls(**{k: _coerce(k, v, types_[k]) for k, v in values.items()})
    if cfg.blr is not None:
        cfg.lr = None  # finalize derives it from blr and the (possibly overridden) batch size
    if isinstance(cfg, FinetuneConfig) and profile == "paper" and model == "vit_base" and "drop_path" not in overrides:
        cfg.drop_path = 0.2 if cfg.pretrain_epochs >= 300 else 0.1  # Table 2 footnote
    cfg.finalize()
    return cfg


def config_from_dict(saved: dict[str, Any], overrides: dict[str, Any] | None = None) -> BaseConfig:
    """A config written by `to_dict` (a run's config.json, `tinymim config STAGE`) resolved
    again -- its stage, model and profile with every other field as an override, so it is
    validated like any override -- then `overrides` on top (e.g. the CLI's --set)."""
    values = dict(saved)
    missing = [k for k in ("stage", "profile", "model") if k not in values]
    if missing:
        raise ConfigError(f"config: no {missing} field(s); expected a tinymim config as written by "
                          f"`tinymim config STAGE` or a run's config.json")
    stage, profile, model = values.pop("stage"), values.pop("profile"), values.pop("model")
    if values.get("blr") is not None:
        values.pop("lr", None)  # derived from blr and batch_size: an overridden batch rescales it
    for key in ("teacher_resolved", "teacher_block_resolved"):  # what pretrain adds to its config.json
        values.pop(key, None)
    overrides = dict(overrides or {})
    model = overrides.pop("model", None) or model
    with warnings.catch_warnings():  # every field is explicit: nothing is scaled behind the user's back
        warnings.simplefilter("ignore")
        return get_config(stage, model, profile, values | overrides)


__all__ = [
    "BaseConfig", "MAEConfig", "PretrainConfig", "FinetuneConfig", "SegmentationConfig",
    "RobustnessConfig", "ConfigError", "STAGES", "PROFILES", "ARCHS", "Arch", "get_config", "config_from_dict", "cache_dir", "derive_seed",
    "parse_overrides",
]
