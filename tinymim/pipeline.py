"""The pipeline layer: how a run directory is laid out, and where each stage's inputs
come from.

Stages (`mae`, `pretrain`, `finetune`, `segmentation`, `robustness`) train or evaluate
from explicit inputs into a directory they are given. This module is the only one
that knows the notebooks' folders inside a run directory, and what to do when an input
is missing: on the built-in data (`smoke`, `tiny`), make it now (and cache what is
reusable); in `paper`, demand it with an error that says which parameter to set. Notebooks, the CLI, the runner, and
later the report and the explorer read run directories through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import atomic_write_json, load_teacher
from .config import REPO_ROOT, FinetuneConfig, cache_dir
from .data import DataError, classes_of, describe, has_masks, is_builtin, short_name
from .evaluation import EvalImages, eval_tensors, features, linear_probe
from .launch import train_stage
from .models import ModelSpec, build_model, model_spec
from .presets import get_config
from .stages import StageResult
from .stats import Summary, mean_std, paired_gain


class MissingInput(FileNotFoundError):
    """A stage's input (teacher, student, fine-tuned model) that the paper profile does not
    make on demand; the message names the parameter that provides it."""


# ---------------------------------------------------------------------------------
# run directories


def default_run_dir(profile: str, data: str | None = None) -> Path:
    """$TINYMIM_RUN_DIR if set, else reports/<profile> in the repository -- reports/<profile>-<data>
    on data other than the synthetic shapes (never over the committed smoke report)."""
    env = os.environ.get("TINYMIM_RUN_DIR")
    if env:
        return Path(env)
    suffix = "" if data in (None, "synthetic") else f"-{short_name(data)}"
    return REPO_ROOT / "reports" / f"{profile}{suffix}"


def resolve_run_dir(run_dir: str | os.PathLike | None, profile: str, data: str | None = None) -> Path:
    """What a notebook's `run_dir` parameter means; None = the default for the profile and data."""
    path = Path(run_dir) if run_dir else default_run_dir(profile, data)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


RUN_RECORD = "run.json"  # which data a run directory's notebooks train and evaluate on


@dataclass(frozen=True)
class RunLayout:
    """Where notebook NN's artefacts live inside one run directory, and the data they are on
    (every notebook's `data` parameter: a built-in dataset or a folder)."""

    root: Path
    data: str | None = None  # None: each stage's preset data (smoke: the synthetic shapes)

    def on(self, overrides: dict | None = None) -> dict:
        """A stage's config overrides on this run's data (an explicit `data` override wins)."""
        return ({"data": self.data} if self.data else {}) | dict(overrides or {})

    @property
    def models(self) -> Path:  # 01: the teacher, sanity checks
        return self.root / "01_models"

    @property
    def teacher(self) -> Path:
        return self.models / "teacher.pth"

    @property
    def pretrain(self) -> Path:  # 02: the distilled student
        return self.root / "02_distill_pretrain"

    @property
    def student(self) -> Path:
        return self.pretrain / "student.pth"

    @property
    def finetune(self) -> Path:  # 03: the comparison's runs, one folder per arm and seed
        return self.root / "03_finetune"

    @property
    def segmentation(self) -> Path:
        return self.root / "04_segmentation"

    @property
    def robustness(self) -> Path:
        return self.root / "05_robustness"

    @property
    def explore(self) -> Path:  # 06: the explorer's static maps and plots, the FiftyOne images
        return self.root / "06_explore"

    @property
    def baselines(self) -> Path:  # scratch runs shared by notebooks 01, 03 and 05
        return self.root / "baselines"

    def stage_dir(self, name: str) -> Path:
        """A notebook's own folder, created on first use."""
        path = getattr(self, name)
        path.mkdir(parents=True, exist_ok=True)
        return path


def layout(run_dir: str | os.PathLike | None, profile: str, data: str | None = None) -> RunLayout:
    """The run directory on `data` (None: what the directory records, else the smoke presets'
    synthetic data, or in `paper` each stage's preset folder). The first notebook records it; a
    later one on other data is refused -- a teacher made on one dataset must not be read back as
    another's."""
    root = resolve_run_dir(run_dir, profile, data)
    record = root / RUN_RECORD
    recorded = json.loads(record.read_text())["data"] if record.exists() else None
    if data is None:
        data = recorded or (None if profile == "paper" else "synthetic")
    elif not is_builtin(data):
        data = str(Path(data).resolve())
        classes_of(data)  # a folder with train/ class folders, checked before any work
    if recorded is not None and data != recorded:
        raise DataError(f"{root}: holds a run on {recorded}, not {data}; use another run directory "
                        f"(--out / run_dir) for other data")
    if recorded is None and data is not None:
        atomic_write_json({"data": data}, record)
    return RunLayout(root, data)


def config_key(cfg_dict: dict[str, Any]) -> str:
    """A short stable name for a resolved config: what caches and run folders are keyed by."""
    return hashlib.sha1(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------
# teacher and student


def smoke_teacher(dest: str | os.PathLike | None = None, overrides: dict | None = None,
                  progress: bool = True, device: str | None = "auto", nproc: int | None = None,
                  profile: str = "smoke", cluster: dict | None = None) -> Path:
    """The built-in profiles' MAE micro teacher: trained once, cached under a key of its
    resolved config (any changed MAE setting makes a new one), copied into `dest`."""
    cfg, cache = smoke_teacher_run(overrides, profile)
    train_stage("mae", cfg, cache, device, nproc, progress, log=lambda line: None, cluster=cluster)  # read if there
    return cache / "teacher.pth" if dest is None else copy_teacher(cache, Path(dest))


def smoke_teacher_run(overrides: dict | None = None, profile: str = "smoke") -> tuple[Any, Path]:
    """The smoke teacher's MAE config and the cache folder it is trained into."""
    cfg = get_config("mae", profile=profile, overrides=overrides)
    return cfg, cache_dir("teachers", config_key(cfg.to_dict()))


def copy_teacher(cache: Path, dest: Path) -> Path:
    """A trained teacher's files copied from its cache folder into `dest` (each file replaced
    atomically: jobs of a study array may copy it at the same time)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.pth", "mae_full.pth", "metrics.jsonl"):
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        shutil.copy2(cache / name, tmp)
        os.replace(tmp, dest / name)
    return dest / "teacher.pth"


def obtain_teacher(run: RunLayout, profile: str, name: str | None = None, path: str | os.PathLike | None = None,
                   overrides: dict | None = None, progress: bool = True, device: str | None = "auto",
                   nproc: int | None = None, cluster: dict | None = None) -> Path:
    """Notebook 01's teacher: the given `path` (checked now by loading it), or on the built-in
    data the cached MAE micro teacher copied into the run directory."""
    if path is None:
        if profile == "paper":
            raise MissingInput("teacher_path is required in the paper profile: an official MAE checkpoint "
                               "(mae_pretrain_vit_base.pth for ViT-T/S, mae_pretrain_vit_large.pth for ViT-B) ("
                               "tinymim run: --param teacher_path=FILE; papermill: -p teacher_path FILE)")
        return smoke_teacher(run.models, run.on(overrides), progress, device, nproc, profile, cluster)
    load_teacher(name, path)  # validate now, before any expensive work downstream
    return Path(path)


def teacher_path_for(run: RunLayout | None, profile: str, path: str | os.PathLike | None = None,
                     progress: bool = True, device: str | None = "auto", nproc: int | None = None,
                     cluster: dict | None = None) -> Path:
    """The teacher a distillation run uses: the one given, else notebook 01's in the run
    directory (when there is one), else on the built-in data the cached MAE micro teacher."""
    if path:
        return Path(path)
    if run is not None and run.teacher.exists():
        return run.teacher
    if profile == "paper":
        where = f" or run notebook 01 into {run.root} first" if run is not None else ""
        raise MissingInput(f"no teacher: pass teacher_path (tinymim run: --param teacher_path=FILE; papermill: "
                           f"-p teacher_path FILE; tinymim pretrain: --set teacher_path=FILE){where}")
    return smoke_teacher(overrides=run.on() if run is not None else None, progress=progress, device=device,
                         nproc=nproc, profile=profile, cluster=cluster)


def obtain_student(run: RunLayout, profile: str, path: str | os.PathLike | None = None,
                   progress: bool = True, device: str | None = "auto", nproc: int | None = None,
                   cluster: dict | None = None) -> Path:
    """A notebook's distilled student: the one given, else notebook 02's in the run
    directory, else -- on the built-in data -- distilled now with the profile's config."""
    if path:
        return Path(path)
    if run.student.exists():
        return run.student
    if profile == "paper":
        raise MissingInput(f"no distilled student: pass `pretrained` (tinymim run: --param pretrained=FILE; "
                           f"papermill: -p pretrained FILE) or run notebook 02 into {run.root} first")
    teacher = teacher_path_for(run, profile, progress=progress, device=device, nproc=nproc, cluster=cluster)
    cfg = get_config("pretrain", profile=profile, overrides=run.on({"teacher_path": str(teacher)}))
    return train_stage("pretrain", cfg, run.pretrain, device, nproc, progress, cluster=cluster).path


# ---------------------------------------------------------------------------------
# notebook 03's comparison: distilled vs scratch, over seeds -- the study's rows (c) vs (a)


@dataclass(frozen=True, eq=False)
class ArmRun:
    """One fine-tuning run of the comparison: which arm, which seed, its config and folder."""

    arm: str  # "distilled" | "scratch"
    seed: int
    cfg: FinetuneConfig
    path: Path


def comparison(run: RunLayout, profile: str, student: str | os.PathLike | None, model: str | None = None,
               overrides: dict | None = None, seeds: tuple[int, ...] = (0,)) -> list[ArmRun]:
    """The fair pair, per seed: the distilled student fine-tuned, and the same model from
    scratch under the same recipe and budget, but without layer decay (there is no
    pre-trained hierarchy to preserve). Scratch runs live in the run's shared baselines
    folder, named by their config, so notebooks 01, 03 and 05 share one when their configs
    agree; distilled ones under notebook 03's."""
    overrides = run.on(overrides)
    out = []
    for seed in seeds:
        cfg = get_config("finetune", model, profile, overrides | {"pretrained": None, "layer_decay": 1.0, "seed": seed})
        out.append(ArmRun("scratch", seed, cfg, run.baselines / f"{cfg.model}-scratch-{config_key(cfg.to_dict())}"))
        if student is not None:
            cfg = get_config("finetune", model, profile, {"pretrained": str(student)} | overrides | {"seed": seed})
            out.append(ArmRun("distilled", seed, cfg, run.finetune / f"distilled-s{seed}"))
    return out


def run_comparison(runs: list[ArmRun], progress: bool = True, device: str | None = "auto",
                   nproc: int | None = None, cluster: dict | None = None) -> dict[ArmRun, StageResult]:
    """Every run of `comparison` trained (or read, when finished with its config)."""
    return {r: train_stage("finetune", r.cfg, r.path, device, nproc, progress, log=lambda line: None, cluster=cluster)
            for r in runs}


def summarize_comparison(results: dict[ArmRun, StageResult], key: str = "top1") -> dict[str, Summary]:
    """Mean ± std of `key` per arm over seeds, and `margin`: the seed-paired gain distilled -
    scratch (`stats`: the study's rule)."""
    by_arm: dict[str, dict[int, float]] = {}
    for r, result in results.items():
        by_arm.setdefault(r.arm, {})[r.seed] = result.metrics[key]
    out = {arm: mean_std(values.values()) for arm, values in by_arm.items()}
    if {"distilled", "scratch"} <= set(by_arm):
        out["margin"] = paired_gain(by_arm["distilled"], by_arm["scratch"])
    return out


def obtain_classifiers(run: RunLayout, profile: str, progress: bool = True, device: str | None = "auto",
                       nproc: int | None = None, cluster: dict | None = None) -> dict[str, Path]:
    """Notebook 03's fine-tuned models (seed 0 of each arm) for notebooks 04-05, by arm: made
    now on the built-in data if missing; in paper an error naming the parameter to pass."""
    if profile == "paper":
        runs = comparison(run, profile, run.student)
        missing = [str(r.path / "model.pth") for r in runs if not (r.path / "model.pth").exists()]
        if missing:
            raise MissingInput(f"no fine-tuned models at {missing}: run notebook 03 first, or pass "
                               f"checkpoints (tinymim run: --param 'checkpoints={{\"name\": \"FILE\"}}')")
    else:
        student = obtain_student(run, profile, progress=progress, device=device, nproc=nproc, cluster=cluster)
        runs = list(run_comparison(comparison(run, profile, student), progress, device, nproc, cluster))
    return {r.arm: r.path / "model.pth" for r in runs}


# ---------------------------------------------------------------------------------
# notebook 01's sanity checks of the built-in data


def probe_model(model: torch.nn.Module, cfg: Any, device: str | None = "auto") -> dict[str, float]:
    """Linear probe of `model`'s frozen features on the labelled training images (the config's
    `data_limit` of them, the stratified subset fine-tuning sees), scored on val."""
    train, val = eval_tensors(cfg, "train", n=cfg.data_limit, what="data_limit"), eval_tensors(cfg, "val")
    probe = linear_probe(features(model, train.images, device=device), train.labels,
                         features(model, val.images, device=device), val.labels)
    return probe | {"train_images": len(train.labels), "val_images": len(val.labels)}


def val_images(run: RunLayout, profile: str, n: int = 64) -> EvalImages:
    """`n` val images of the run's data for the notebooks' pictures (a stratified subset; at
    least one per class, so a many-class folder gives more, which the caller slices)."""
    cfg = get_config("finetune", profile=profile, overrides=run.on())
    return eval_tensors(cfg, "val", n=max(n, cfg.num_classes))


def data_record(stage_dir: Path) -> dict[str, Any]:
    """Which images a trained stage drew from (the engine's data.json in its folder)."""
    return json.loads((stage_dir / "data.json").read_text())


def segmentation_skip(cfg: Any) -> str | None:
    """Why notebook 04 does not run on this config's data (None: it does)."""
    if has_masks(cfg.data):
        return None
    return (f"Segmentation skipped: {describe(cfg.data)} has no masks (segmentation runs on the built-in "
            "synthetic data or an ADE20K folder: images/ + annotations/)")


def smoke_learnability(teacher: torch.nn.Module, run: RunLayout, overrides: dict | None = None,
                       progress: bool = True, device: str | None = "auto", nproc: int | None = None,
                       profile: str = "smoke", cluster: dict | None = None) -> dict[str, Any]:
    """The built-in data's two sanity checks.

    (a) a micro ViT trained from scratch on the labelled split must beat chance by far
    (it is seed 0 of notebook 03's scratch baseline, shared through baselines/);
    (b) the MAE teacher's linear probe must beat the linear probe of a randomly
    initialised ViT of the same size -- i.e. pre-training on the pool learned something.
    """
    (scratch_run,) = comparison(run, profile, None, overrides=overrides)
    cfg = scratch_run.cfg
    scratch = run_comparison([scratch_run], progress, device, nproc, cluster)[scratch_run].metrics
    spec = model_spec(teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        random_init = build_model(ModelSpec.create(spec.arch, heads=spec.heads[0], img_size=spec.img_size))
    teacher_probe = probe_model(teacher, cfg, device)
    return {
        "data": describe(cfg.data),
        "chance_top1": 100.0 / cfg.num_classes,
        "labelled_images": teacher_probe["train_images"],
        "val_images": teacher_probe["val_images"],
        "scratch_model": cfg.model,
        "scratch_steps": scratch["steps"],
        "scratch_seconds": scratch["train_seconds"],
        "scratch_top1": scratch["top1"],
        "scratch_top5": scratch.get("top5"),  # None with fewer than 5 classes
        "teacher_probe_top1": teacher_probe["top1"],
        "random_init_probe_top1": probe_model(random_init, cfg, device)["top1"],
    }
