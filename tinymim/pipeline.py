"""The pipeline layer: how a run directory is laid out, and where each stage's inputs
come from.

Stages (`mae`, `pretrain`, `finetune`, `segmentation`, `robustness`) train or evaluate
from explicit inputs into a directory they are given. This module is the only one
that knows the notebooks' folders inside a run directory, and what to do when an input
is missing: in `smoke`, make it now (and cache what is reusable); in `paper`, demand it
with an error that says which parameter to set. Notebooks, the CLI, the runner, and
later the report and the explorer read run directories through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_teacher, open_checkpoint
from .config import FinetuneConfig, cache_dir, get_config
from .data import synthetic
from .evaluation import features, linear_probe
from .launch import train_stage
from .models import ModelSpec, build_model, model_spec

REPO_ROOT = Path(__file__).resolve().parent.parent


class MissingInput(FileNotFoundError):
    """A stage's input (teacher, student, fine-tuned model) that the paper profile does not
    make on demand; the message names the parameter that provides it."""


# ---------------------------------------------------------------------------------
# run directories


def default_run_dir(profile: str) -> Path:
    """$TINYMIM_RUN_DIR if set, else reports/<profile> in the repository."""
    env = os.environ.get("TINYMIM_RUN_DIR")
    return Path(env) if env else REPO_ROOT / "reports" / profile


def resolve_run_dir(run_dir: str | os.PathLike | None, profile: str) -> Path:
    """What a notebook's `run_dir` parameter means; None = the default for the profile."""
    path = Path(run_dir) if run_dir else default_run_dir(profile)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@dataclass(frozen=True)
class RunLayout:
    """Where notebook NN's artefacts live inside one run directory."""

    root: Path

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


def layout(run_dir: str | os.PathLike | None, profile: str) -> RunLayout:
    return RunLayout(resolve_run_dir(run_dir, profile))


def config_key(cfg_dict: dict[str, Any]) -> str:
    """A short stable name for a resolved config: what caches and run folders are keyed by."""
    return hashlib.sha1(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------
# teacher and student


def smoke_teacher(dest: str | os.PathLike | None = None, overrides: dict | None = None,
                  progress: bool = True, device: str | None = "auto", nproc: int | None = None) -> Path:
    """The smoke profile's MAE micro teacher: trained once, cached under a key of its
    resolved config (any changed MAE setting makes a new one), copied into `dest`."""
    cfg = get_config("mae", profile="smoke", overrides=overrides)
    cache = cache_dir("teachers", config_key(cfg.to_dict()))
    if not (cache / "teacher.pth").exists():
        train_stage("mae", cfg, cache, device, nproc, progress)
    if dest is None:
        return cache / "teacher.pth"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.pth", "mae_full.pth", "metrics.jsonl"):
        shutil.copy2(cache / name, dest / name)
    return dest / "teacher.pth"


def obtain_teacher(run: RunLayout, profile: str, name: str | None = None, path: str | os.PathLike | None = None,
                   overrides: dict | None = None, progress: bool = True, device: str | None = "auto",
                   nproc: int | None = None) -> Path:
    """Notebook 01's teacher: the given `path` (checked now by loading it), or in smoke
    the cached MAE micro teacher copied into the run directory."""
    if path is None:
        if profile != "smoke":
            raise MissingInput("teacher_path is required in the paper profile: an official MAE checkpoint "
                               "(mae_pretrain_vit_base.pth for ViT-T/S, mae_pretrain_vit_large.pth for ViT-B) ("
                               "tinymim run: --param teacher_path=FILE; papermill: -p teacher_path FILE)")
        return smoke_teacher(run.models, overrides, progress, device, nproc)
    load_teacher(name, path)  # validate now, before any expensive work downstream
    return Path(path)


def teacher_path_for(run: RunLayout | None, profile: str, path: str | os.PathLike | None = None,
                     progress: bool = True, device: str | None = "auto", nproc: int | None = None) -> Path:
    """The teacher a distillation run uses: the one given, else notebook 01's in the run
    directory (when there is one), else in smoke the cached MAE micro teacher."""
    if path:
        return Path(path)
    if run is not None and run.teacher.exists():
        return run.teacher
    if profile != "smoke":
        where = f" or run notebook 01 into {run.root} first" if run is not None else ""
        raise MissingInput(f"no teacher: pass teacher_path (tinymim run: --param teacher_path=FILE; papermill: "
                           f"-p teacher_path FILE; tinymim pretrain: --set teacher_path=FILE){where}")
    return smoke_teacher(progress=progress, device=device, nproc=nproc)


def obtain_student(run: RunLayout, profile: str, path: str | os.PathLike | None = None,
                   progress: bool = True, device: str | None = "auto", nproc: int | None = None) -> Path:
    """A notebook's distilled student: the one given, else notebook 02's in the run
    directory, else -- in smoke -- distilled now with the default smoke config."""
    if path:
        return Path(path)
    if run.student.exists():
        return run.student
    if profile != "smoke":
        raise MissingInput(f"no distilled student: pass `pretrained` (tinymim run: --param pretrained=FILE; "
                           f"papermill: -p pretrained FILE) or run notebook 02 into {run.root} first")
    teacher = teacher_path_for(run, profile, progress=progress, device=device, nproc=nproc)
    cfg = get_config("pretrain", profile="smoke", overrides={"teacher_path": str(teacher)})
    return train_stage("pretrain", cfg, run.pretrain, device, nproc, progress)


# ---------------------------------------------------------------------------------
# notebook 03's comparison: distilled vs scratch, over seeds


def comparison_configs(profile: str, student: str | os.PathLike | None, model: str | None = None,
                       overrides: dict | None = None, seeds: tuple[int, ...] = (0,)) -> dict[str, FinetuneConfig]:
    """The fair pair, per seed: the distilled student fine-tuned (`distilled-s<seed>`), and
    the same model from scratch (`scratch-s<seed>`) under the same recipe and budget, but
    without layer decay (there is no pre-trained hierarchy to preserve)."""
    overrides = dict(overrides or {})
    out: dict[str, FinetuneConfig] = {}
    for seed in seeds:
        out[f"scratch-s{seed}"] = get_config("finetune", model, profile, overrides | {
            "pretrained": None, "layer_decay": 1.0, "seed": seed})
        if student is not None:
            out[f"distilled-s{seed}"] = get_config("finetune", model, profile, {"pretrained": str(student)}
                                                   | overrides | {"seed": seed})
    return out


def scratch_dir(run: RunLayout, cfg: FinetuneConfig) -> Path:
    """Where a run directory keeps a from-scratch baseline, named by its config: notebooks
    01, 03 and 05 share one when their configs agree (the engine then just resumes a
    finished run) and never mix up two that differ."""
    return run.baselines / f"{cfg.model}-scratch-{config_key(cfg.to_dict())}"


def _finished(path: Path, cfg: FinetuneConfig) -> bool:
    model = path / "model.pth"
    return (path / "eval.json").exists() and model.exists() and open_checkpoint(model).meta.get("config") == cfg.to_dict()


def run_comparison(run: RunLayout, configs: dict[str, FinetuneConfig], progress: bool = True,
                   device: str | None = "auto", nproc: int | None = None) -> dict[str, Path]:
    """Train every config of `comparison_configs` that is not finished yet; returns each
    run's directory (model.pth, eval.json, metrics.jsonl). Scratch runs live in the
    shared baselines folder, distilled ones under notebook 03's."""
    dirs = {name: scratch_dir(run, cfg) if name.startswith("scratch") else run.finetune / name
            for name, cfg in configs.items()}
    for name, path in dirs.items():
        if not _finished(path, configs[name]):
            train_stage("finetune", configs[name], path, device, nproc, progress)  # resumes; refuses another config
    return dirs


def read_eval(path: Path) -> dict[str, Any]:
    return json.loads((path / "eval.json").read_text())


def summarize_comparison(dirs: dict[str, Path], key: str = "top1") -> dict[str, Any]:
    """Mean ± std of `key` per arm over seeds, and the paired margin distilled - scratch
    (mean ± std over seeds; std is the sample standard deviation, 0 for one seed)."""
    arms: dict[str, dict[str, float]] = {}
    for name, path in dirs.items():
        arm, _, seed = name.rpartition("-s")
        arms.setdefault(arm, {})[seed] = read_eval(path)[key]

    def stats(values: list[float]) -> dict[str, Any]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values), "values": values}

    out: dict[str, Any] = {arm: stats(list(v.values())) for arm, v in arms.items()}
    if "distilled" in arms and "scratch" in arms:
        common = sorted(set(arms["distilled"]) & set(arms["scratch"]), key=int)
        out["margin"] = stats([arms["distilled"][s] - arms["scratch"][s] for s in common])
    return out


def obtain_classifiers(run: RunLayout, profile: str, progress: bool = True, device: str | None = "auto",
                       nproc: int | None = None) -> dict[str, Path]:
    """Notebook 03's fine-tuned models (seed 0 of each arm) for notebooks 04-05: made
    now in smoke if missing; in paper an error naming the parameter to pass."""
    if profile != "smoke":
        cfgs = comparison_configs(profile, run.student)
        dirs = {name: scratch_dir(run, c) if name.startswith("scratch") else run.finetune / name
                for name, c in cfgs.items()}
        missing = [str(p / "model.pth") for p in dirs.values() if not (p / "model.pth").exists()]
        if missing:
            raise MissingInput(f"no fine-tuned models at {missing}: run notebook 03 first, or pass "
                               f"checkpoints (tinymim run: --param 'checkpoints={{\"name\": \"FILE\"}}')")
    else:
        student = obtain_student(run, profile, progress=progress, device=device, nproc=nproc)
        dirs = run_comparison(run, comparison_configs(profile, student), progress, device, nproc)
    return {name.rpartition("-s")[0]: path / "model.pth" for name, path in dirs.items()}


# ---------------------------------------------------------------------------------
# notebook 01's sanity checks of the built-in data


def probe_model(model: torch.nn.Module, cfg: Any, device: str | None = "auto") -> dict[str, float]:
    """Linear probe of `model`'s frozen features on the synthetic labelled split (the
    config's `data_limit` images, as fine-tuning sees them), scored on val."""
    train, val = synthetic("train", cfg, size=cfg.data_limit), synthetic("val", cfg)
    return linear_probe(features(model, train.images, device=device), train.labels,
                        features(model, val.images, device=device), val.labels)


def smoke_learnability(teacher: torch.nn.Module, run: RunLayout, overrides: dict | None = None,
                       progress: bool = True, device: str | None = "auto", nproc: int | None = None) -> dict[str, Any]:
    """The smoke profile's two sanity checks on the synthetic data.

    (a) a micro ViT trained from scratch on the labelled split must beat chance by far
    (it is seed 0 of notebook 03's scratch baseline, shared through baselines/);
    (b) the MAE teacher's linear probe must beat the linear probe of a randomly
    initialised ViT of the same size -- i.e. pre-training on the pool learned something.
    """
    configs = comparison_configs("smoke", None, overrides=overrides)
    cfg = configs["scratch-s0"]
    scratch = read_eval(run_comparison(run, {"scratch-s0": cfg}, progress, device, nproc)["scratch-s0"])
    spec = model_spec(teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        random_init = build_model(ModelSpec.create(spec.arch, heads=spec.heads[0], img_size=spec.img_size))
    return {
        "chance_top1": 100.0 / cfg.num_classes,
        "labelled_images": cfg.data_limit,
        "scratch_model": cfg.model,
        "scratch_steps": scratch["steps"],
        "scratch_seconds": scratch["train_seconds"],
        "scratch_top1": scratch["top1"],
        "scratch_top5": scratch["top5"],
        "teacher_probe_top1": probe_model(teacher, cfg, device)["top1"],
        "random_init_probe_top1": probe_model(random_init, cfg, device)["top1"],
    }
