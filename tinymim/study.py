"""A small-scale reproduction study: do the paper's findings hold on the built-in data (the
synthetic shapes, the real handwritten digits) or a folder of your own?

Each *arm* is one way of getting a micro ViT-T student (from scratch, MAE, or one
distillation recipe); every arm is then fine-tuned and corruption-tested (and segmented, in
a budget with segmentation on data with masks) under one identical budget, over several
seeds (a seed varies the student's init and data order in every stage; the MAE micro
teacher, trained on the study's own data, is shared). Each *finding* compares two arms the
way the paper's ablation tables do, and gets a verdict computed from the numbers.

Runs live under `<out>/runs/<arm>-s<seed>/` and every stage resumes (a finished stage with
the same config is read back, a killed one continues from its checkpoint), so a killed
study picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write, atomic_write_json
from .config import REPO_ROOT, cache_dir
from .data import describe, has_masks, is_builtin, short_name
from .devices import environment
from .launch import train_stage
from .pipeline import config_key, copy_teacher, smoke_teacher, smoke_teacher_run
from .presets import get_config
from .reports import jsonable, markdown_to_html
from .robustness import evaluate_robustness
from .stats import Summary, mean_std, paired_gain
from .stats import verdict as stats_verdict

STUDENT, MID = "micro_tiny", "micro_small"  # the T and S of the paper's chain, at smoke size
TEACHER = "micro_base"


@dataclass(frozen=True)
class Budget:
    """Steps of every stage of one arm; identical for all arms (only the pre-training
    recipe differs). MAE pre-training gets the distillation's steps and batch."""

    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    corruption_images: int
    segmentation_steps: int | None = None  # None: no segmentation stage in this budget
    segmentation_batch: int | None = None
    segmentation_channels: int | None = None  # UperNet width (auxiliary head: half)
    corruptions: tuple[str, ...] | None = None  # None = all 15
    teacher: dict[str, Any] | None = None  # the MAE teacher's overrides of the smoke preset (None: as it is)
    # every stage's precision, the teacher's too, on any device: "auto" is bf16 on a CPU with
    # AVX512-BF16 and fp32 on one without, and the two give different verdicts (docs/environment.md)
    amp: str = "none"

    def pretrain(self) -> dict[str, Any]:
        return {"steps": self.pretrain_steps, "warmup_steps": self.pretrain_steps // 10,
                "batch_size": self.pretrain_batch}

    def teacher_overrides(self, data: str) -> dict[str, Any]:
        """The MAE teacher's overrides of the smoke preset on `data` (its cache key)."""
        return (self.teacher or {}) | {"data": data, "amp": self.amp}


BUDGETS = {
    # what reports/study and reports/study-digits were made with (their REPORT.md state the time,
    # teacher included: 40-52 min on the 2-core CPUs they ran on, all arms and 3 seeds). No segmentation:
    # a UperNet on the release's BEiT-style backbone (mmseg's initialisation) needs more steps
    # than a study arm can afford to leave the majority-class floor; notebook 04 segments at
    # the smoke budget
    "study": Budget(pretrain_steps=150, pretrain_batch=128, finetune_steps=250, corruption_images=200),
    # seconds per arm: checks the machinery (the tests, a first look); its numbers mean nothing
    "tiny": Budget(pretrain_steps=4, pretrain_batch=16, finetune_steps=4, segmentation_steps=2, segmentation_batch=8,
                   segmentation_channels=16, corruption_images=20, corruptions=("gaussian_noise", "fog"),
                   teacher={"steps": 6, "warmup_steps": 1, "batch_size": 32}),
}


@dataclass(frozen=True)
class Arm:
    """One way to pre-train the student: `chain` is the distillation stages (pretrain
    overrides, teacher first), `mae` an MAE run of the student itself, neither = scratch."""

    name: str
    row: str
    label: str
    chain: tuple[dict[str, Any], ...] = ()
    mae: bool = False
    model: str = STUDENT


ARMS = [
    Arm("scratch", "a", "scratch (no pre-training)"),
    Arm("mae", "b", "MAE pre-training of the student itself", mae=True),
    Arm("relation", "c", "TinyMIM: Q-K + V-V relations, last teacher block", ({},)),
    Arm("cls", "d", "class-token distillation", ({"target": "cls"},)),
    Arm("feature", "e", "feature distillation", ({"target": "feature"},)),
    Arm("block4", "f", "relations from teacher block 4 of 6", ({"teacher_block": 4},)),
    Arm("sequential", "g", f"sequential: teacher → {MID} → {STUDENT}", ({"model": MID}, {})),
    Arm("masked", "h", "relations, 50 % of the student's patches masked", ({"mask_ratio": 0.5},)),
    Arm("qk", "i", "Q-K relation only", ({"relations": ["qk"]},)),
    Arm("vv", "i", "V-V relation only", ({"relations": ["vv"]},)),
    Arm("teacher", "ref", f"the MAE teacher ({TEACHER}) itself, fine-tuned", model=TEACHER),
]
ARM = {a.name: a for a in ARMS}


@dataclass(frozen=True)
class Finding:
    """A claim of the paper, as "arm `better` beats arm `worse`"."""

    claim: str
    better: str
    worse: str

    @property
    def rows(self) -> str:
        return f"({ARM[self.better].row}) vs ({ARM[self.worse].row})"


FINDINGS = [
    Finding("distillation pre-training beats training from scratch", "relation", "scratch"),
    Finding("TinyMIM distillation beats MAE pre-training of the small model itself "
                 "(paper: ViT-T 75.8 vs 71.6, ViT-S 83.0 vs 80.6 top-1)", "relation", "mae"),
    Finding("relation targets beat class-token targets", "relation", "cls"),
    Finding("relation targets beat feature targets", "relation", "feature"),
    Finding("an intermediate teacher block can beat the last one (paper: for ViT-L → ViT-B; "
                 "the last block for ViT-B → ViT-S/T)", "block4", "relation"),
    Finding("sequential distillation beats direct distillation", "sequential", "relation"),
    Finding("the student sees the full image: masking its input hurts", "relation", "masked"),
    Finding("Q-K + V-V beats Q-K alone", "relation", "qk"),
    Finding("Q-K + V-V beats V-V alone", "relation", "vv"),
]
# metric -> (label, higher is better)
PREMISE = Finding("the MAE teacher beats a scratch student (the study's premise)", "teacher", "scratch")
METRICS = {"top1": ("top-1 (%)", True), "mIoU": ("mIoU (%)", True), "c_error": ("-C mean error (%)", False)}
ROWS = "abcdefghi"


def select_arms(only: Sequence[str] | None) -> list[Arm]:
    """The arms rows `only` (letters a-i) need: each row's own arms plus what its
    findings compare against; scratch and the teacher are always there (the margin the
    study states)."""
    if not only:
        return list(ARMS)
    rows = {r.strip().lower() for r in only if r.strip()}
    unknown = sorted(rows - set(ROWS))
    if unknown:
        raise ValueError(f"--only: unknown row(s) {unknown}; expected letters among {', '.join(ROWS)}")
    names = {"scratch", "teacher"} | {a.name for a in ARMS if a.row in rows}
    names |= {n for f in FINDINGS if {ARM[f.better].row, ARM[f.worse].row} & rows for n in (f.better, f.worse)}
    return [a for a in ARMS if a.name in names]


@dataclass
class StudyRun:
    """One arm at one seed: its folder and the configs of each of its stages."""

    arm: Arm
    seed: int
    root: Path
    configs: dict[str, Any] = field(default_factory=dict)  # stage name -> config


def plan(out: Path, arms: Sequence[Arm], seeds: Sequence[int], budget: Budget, teacher: Path,
         data: str = "synthetic") -> list[StudyRun]:
    """Every (arm, seed) run with its stage configs on `data`, seed-major so that a partial
    study already has every row; no segmentation on data without masks or in a budget
    without it."""
    runs = []
    on = {"data": data, "amp": budget.amp}
    for seed in seeds:
        for arm in arms:
            run = StudyRun(arm, seed, out / "runs" / f"{arm.name}-s{seed}")
            previous = str(teacher)
            if arm.mae:
                run.configs["mae"] = get_config("mae", arm.model, "smoke", budget.pretrain() | on | {"seed": seed})
            for i, stage in enumerate(arm.chain):
                model = stage.get("model", arm.model)
                teacher_name = TEACHER if i == 0 else arm.chain[i - 1].get("model", arm.model)
                run.configs[f"pretrain{i}"] = get_config("pretrain", model, "smoke", budget.pretrain() | {
                    k: v for k, v in stage.items() if k != "model"} | {
                    "teacher": teacher_name, "teacher_path": previous, "seed": seed} | on)
                previous = str(run.root / f"pretrain{i}" / "student.pth")
            if arm.mae:
                previous = str(run.root / "mae" / "teacher.pth")
            if arm.name == "teacher":
                previous = str(teacher)
            pretrained = previous if (arm.chain or arm.mae or arm.name == "teacher") else None
            ft = {"pretrained": pretrained, "steps": budget.finetune_steps, "seed": seed,
                  "warmup_steps": budget.finetune_steps // 8}
            if pretrained is None:
                ft["layer_decay"] = 1.0  # no pre-trained hierarchy to preserve (notebook 03's convention)
            run.configs["finetune"] = get_config("finetune", arm.model, "smoke", ft | on)
            # the teacher is the premise's reference: top-1 and C only
            if arm.name != "teacher" and budget.segmentation_steps and has_masks(data):
                seg = {"pretrained": pretrained, "steps": budget.segmentation_steps, "seed": seed,
                       "warmup_steps": budget.segmentation_steps // 12, "batch_size": budget.segmentation_batch,
                       "channels": budget.segmentation_channels,
                       "aux_channels": budget.segmentation_channels // 2}
                if pretrained is None:
                    seg["layer_decay"] = 1.0
                run.configs["segmentation"] = get_config("segmentation", arm.model, "smoke", seg | on)
            rob = {"num_images": budget.corruption_images, "seed": 0}  # one corrupted set for every run
            if budget.corruptions:
                rob["corruptions"] = list(budget.corruptions)
            run.configs["robustness"] = get_config("robustness", arm.model, "smoke", rob | on)
            runs.append(run)
    return runs


def _key(run: StudyRun) -> str:
    return config_key({name: cfg.to_dict() for name, cfg in run.configs.items()})


def execute(run: StudyRun, device: str | None = "auto", progress: bool = True,
            nproc: int | None = None, cluster: dict | None = None) -> dict[str, Any]:
    """Train and evaluate one run (each stage resumes; `nproc` > 1 runs it under torchrun,
    `cluster` as SLURM jobs); its result.json is the record."""
    result_path = run.root / "result.json"
    key = _key(run)
    if result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("key") == key:
            return done
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    results = {}
    for name, cfg in run.configs.items():  # in order: pre-training chain, fine-tuning, segmentation
        if name == "robustness":
            continue
        t = time.perf_counter()
        results[name] = train_stage(cfg.stage, cfg, run.root / name, device, nproc, progress, log=lambda line: None,
                                    cluster=cluster)
        seconds[name] = time.perf_counter() - t
    ft = results["finetune"].metrics
    seg = results["segmentation"].metrics if "segmentation" in results else {"mIoU": None}
    t = time.perf_counter()
    rob = evaluate_robustness(results["finetune"].model(), run.configs["robustness"], device=device)["synthetic_c"]
    seconds["robustness"] = time.perf_counter() - t
    labelled = json.loads((run.root / "finetune" / "data.json").read_text())["images"]
    result = {"arm": run.arm.name, "row": run.arm.row, "seed": run.seed, "key": key,
              "labelled_images": labelled, "top1": ft["top1"], "mIoU": seg["mIoU"], "c_error": rob["mean_error"],
              "clean_error": rob["clean_error"], "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "total_seconds": round(time.perf_counter() - start, 1),
              "configs": {name: cfg.to_dict() for name, cfg in run.configs.items()}}
    atomic_write_json(result, result_path)
    return json.loads(result_path.read_text())  # as a resumed study reads it back (tuples as lists)


def default_out(budget: str, data: str = "synthetic") -> Path:
    """reports/study (synthetic) or reports/study-digits for the study budget
    ($TINYMIM_RUN_DIR/... when set); a smaller budget's numbers mean little, and a folder of
    your own is yours: those go to the cache, never beside the committed reports."""
    env = os.environ.get("TINYMIM_RUN_DIR")
    name = "study" + ("" if data == "synthetic" else f"-{short_name(data)}")
    name += "" if budget == "study" else f"-{budget}"
    if env:
        return Path(env) / name
    return REPO_ROOT / "reports" / name if budget == "study" and is_builtin(data) else cache_dir(name)


def run_study(out: str | os.PathLike | None = None, seeds: Sequence[int] = (0, 1, 2), only: Sequence[str] | None = None,
              budget: str = "study", device: str | None = "auto", progress: bool = True,
              log: Callable[[str], None] = print, nproc: int | None = None,
              cluster: dict | None = None, data: str = "synthetic") -> list[dict[str, Any]]:
    """Run (or resume) the study on `data` into `out` (None: `default_out(budget, data)`);
    returns every run's result. The teacher is the smoke profile's MAE micro teacher trained on
    that data (cached), copied into `out/teacher`."""
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {sorted(BUDGETS)}, got {budget!r}")
    if not seeds:
        raise ValueError("seeds: at least one seed")
    out = Path(out) if out else default_out(budget, data)
    out.mkdir(parents=True, exist_ok=True)
    teacher_overrides = BUDGETS[budget].teacher_overrides(data)
    teacher = smoke_teacher(out / "teacher", teacher_overrides, progress=progress, device=device, nproc=nproc,
                            cluster=cluster)
    teacher_cfg = get_config("mae", TEACHER, "smoke", teacher_overrides)
    runs = plan(out, select_arms(only), seeds, BUDGETS[budget], teacher, data)
    start = time.perf_counter()
    results = []
    for i, run in enumerate(runs, start=1):
        res = execute(run, device, progress, nproc, cluster)
        results.append(res)
        miou = "—" if res["mIoU"] is None else f"{res['mIoU']:.1f}"
        log(f"[{i}/{len(runs)}] {run.arm.name}-s{run.seed}: top-1 {res['top1']:.1f}, mIoU {miou}, "
            f"C error {res['c_error']:.1f} ({res['total_seconds']:.0f} s)")
    state = {"budget": budget, "budget_steps": asdict(BUDGETS[budget]), "seeds": list(seeds),
             "data": data, "data_description": describe(data),
             "arms": [r.arm.name for r in runs[:len(runs) // len(seeds)]],
             "teacher": str(teacher),
             "teacher_config": teacher_cfg.to_dict(),
             "teacher_seconds": teacher_seconds(out / "teacher" / "metrics.jsonl", teacher_cfg.batch_size),
             "environment": environment(),
             "wall_seconds_this_call": round(time.perf_counter() - start, 1),
             "train_seconds": round(sum(r["total_seconds"] for r in results), 1)}
    atomic_write_json(state, out / "study.json")
    return results


def _budget_shown(name: str, value: Any, segmented: bool) -> bool:
    """The budget's steps and sizes in a report's header (its precision is said in words)."""
    return value is not None and name != "amp" and (segmented or "segment" not in name)


def precision(state: dict[str, Any]) -> str:
    """The precision a recorded study trained in: its budget's `amp`, or for a budget that
    left it to the device (older studies: `auto`), what `autocast_dtype` chose on its host."""
    amp = (state.get("budget_steps") or {}).get("amp", "auto")
    if amp != "auto":
        return {"none": "fp32"}.get(amp, amp)
    env = state.get("environment") or {}
    if env.get("gpus"):
        return "auto (bf16 or fp16 per GPU)"
    return "bf16" if env.get("cpu_native_bf16") else "fp32"


def teacher_seconds(metrics: Path, batch_size: int) -> float:
    """The MAE teacher's training time from its logged throughput (each log interval's images
    over its images/s): the teacher is cached across studies, so its time is not this call's."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "imgs_per_s" in r and "step" in r]
    seconds, last = 0.0, 0
    for r in rows:
        seconds += (r["step"] - last) * batch_size / r["imgs_per_s"]
        last = r["step"]
    return round(seconds, 1)


class StudyRunJob:
    """One (arm, seed) run of a detached study: one task of its SLURM job array, after the
    teacher's job; its stages run in the task's own process."""

    def __init__(self, run: StudyRun, teacher_cache: Path, device: str):
        self.run, self.teacher_cache, self.device = run, teacher_cache, device

    def __call__(self) -> dict[str, Any]:
        copy_teacher(self.teacher_cache, self.run.root.parent.parent / "teacher")
        return execute(self.run, self.device, progress=False)


def submit_detached(out: str | os.PathLike | None, seeds: Sequence[int], only: Sequence[str] | None, budget: str,
                    cluster: dict[str, Any], device: str = "auto", log: Callable[[str], None] = print,
                    data: str = "synthetic") -> dict[str, Any]:
    """The study as SLURM jobs, returning at once: the teacher's MAE job (unless cached), then
    every (arm, seed) run as one task of a job array after it. `run_study` later reads every
    finished run's result.json and writes the report."""
    from . import cluster as slurm

    spec = slurm.Cluster.from_dict(cluster)
    out = Path(out) if out else default_out(budget, data)
    cfg, cache = smoke_teacher_run(BUDGETS[budget].teacher_overrides(data))
    after = []
    if not (cache / "teacher.pth").exists():
        after = [slurm.submit("mae", cfg, cache, spec, device).job_id]
        log(f"[sbatch] the study's MAE teacher: SLURM job {after[0]}")
    runs = plan(out, select_arms(only), seeds, BUDGETS[budget], out / "teacher" / "teacher.pth", data)
    executor = spec.executor(out / "slurm", "tinymim-study", after, array=len(runs))
    with executor.batch():
        jobs = [executor.submit(StudyRunJob(r, cache, device)) for r in runs]
    ids = {r.root.name: j.job_id for r, j in zip(runs, jobs)}
    atomic_write_json({"teacher_job": after[0] if after else None, "runs": ids}, out / "slurm" / "study-jobs.json")
    log(f"[sbatch] {len(runs)} runs as SLURM job array {jobs[0].job_id.split('_')[0]}")
    return {"out": str(out), "teacher_job": after[0] if after else None, "runs": ids}


# ---------------------------------------------------------------------------------
# from results to tables and verdicts


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Summary]]:
    """arm -> metric -> its `stats.Summary` over seeds."""
    by: dict[str, dict[str, dict[int, float]]] = {}
    for res in results:
        for metric in METRICS:
            if res.get(metric) is not None:
                by.setdefault(res["arm"], {}).setdefault(metric, {})[res["seed"]] = res[metric]
    return {arm: {m: mean_std(v.values()) for m, v in metrics.items()} for arm, metrics in by.items()}


def verdict(results: Sequence[dict[str, Any]], finding: Finding, metric: str) -> dict[str, Any]:
    """The seed-paired gain of `better` over `worse` in the metric's good direction (a
    `stats.Summary`, None when not run) and its verdict (`stats.verdict`)."""
    by = {arm: {r["seed"]: r[metric] for r in results if r["arm"] == arm and r.get(metric) is not None}
          for arm in (finding.better, finding.worse)}
    gain = paired_gain(by[finding.better], by[finding.worse], higher_is_better=METRICS[metric][1])
    return {"gain": gain, "verdict": stats_verdict(gain)}


def findings_table(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every finding whose two arms were run, with its verdict per metric."""
    arms = {r["arm"] for r in results}
    return [{"rows": f.rows, "claim": f.claim, "better": f.better, "worse": f.worse,
             **{m: verdict(results, f, m) for m in METRICS}}
            for f in (PREMISE, *FINDINGS) if f.better in arms and f.worse in arms]


def _plain(value: Any) -> Any:
    """Summaries as plain data, for metrics.json."""
    if isinstance(value, Summary):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _host(env: dict[str, Any] | None) -> str:
    if not env:
        return "an unrecorded host"
    gpus = ", ".join(g["name"] for g in env.get("gpus", []))
    return f"{env['cpu']} with {env['cpus']} CPUs" + (f" and {gpus}" if gpus else " (no GPU)")


def _ms(summary: Summary | None) -> str:
    return "—" if summary is None else str(summary)


def _pm(gain: Summary | None) -> str:
    return "—" if gain is None else gain.signed()


def plot_study(results: Sequence[dict[str, Any]]):
    """One panel per metric: each arm's mean ± std over seeds, the seeds as dots."""
    import matplotlib.pyplot as plt

    summary = summarize(results)
    metrics = {m: v for m, v in METRICS.items() if any(r.get(m) is not None for r in results)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, (metric, (label, higher)) in zip(axes[0], metrics.items()):
        arms = [a.name for a in ARMS if metric in summary.get(a.name, {})]
        means = [summary[a][metric].mean for a in arms]
        stds = [summary[a][metric].std or 0.0 for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=3, color="#9ecae1")
        for i, a in enumerate(arms):
            values = summary[a][metric].values
            ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(arms)), [f"({ARM[a].row}) {a}" for a in arms], rotation=60, ha="right")
        ax.set_title(f"{label}, {'higher' if higher else 'lower'} is better")
        low = min(min(summary[a][metric].values) for a in arms)
        ax.set_ylim(max(0.0, low - 5), None)
    fig.tight_layout()
    return fig


def _same_budget(here: dict[str, Any], there: dict[str, Any], name: str) -> str:
    """Whether two studies' top-1 verdicts are comparable: the same seeds, precision and steps
    of every stage before fine-tuning's top-1 (segmentation does not feed it); what differs, if not."""
    ours, theirs = ({k: v for k, v in (state.get("budget_steps") or {}).items() if not k.startswith("segmentation")}
                    | {"amp": precision(state)} for state in (here, there))
    differ = [f"{k} {ours.get(k)} here, {theirs.get(k)} there"
              for k in sorted(ours | theirs) if ours.get(k) != theirs.get(k)]
    if here.get("seeds") != there.get("seeds"):
        differ.append(f"seeds {here.get('seeds')} here, {there.get('seeds')} there")
    if not differ:
        return f"The same arms, budget and seeds on {name}"
    return f"The same arms on {name}, but not the same budget or seeds ({'; '.join(differ)})"


def beside_table(results: Sequence[dict[str, Any]], other: Path, here_state: dict[str, Any]) -> list[str]:
    """Each finding's top-1 verdict in this study (its state `here_state`) and in the study at
    `other` (another dataset, or the same one in another precision), and whether they agree.
    Says whether the two ran the same budget and seeds."""
    recorded = json.loads((other / "metrics.json").read_text())
    theirs = {f["rows"] + f["claim"]: f for f in recorded["findings"]}
    state = recorded["state"]
    name = state.get("data", "synthetic")
    shown = other.resolve().relative_to(REPO_ROOT) if other.resolve().is_relative_to(REPO_ROOT) else other
    lines = [f"## Beside the study on {name} (`{shown}`)", "",
             f"{_same_budget(here_state, state, name)}; top-1 verdicts side by side (gains in points).", "",
             f"| row | claim | here | on {name} | |", "|---|---|---|---|---|"]
    agree = compared = 0
    for f in findings_table(results):
        other_f = theirs.get(f["rows"] + f["claim"])
        if other_f is None:
            continue
        g = other_f["top1"]["gain"]
        other_gain = Summary.from_dict(g) if g else None
        same = f["top1"]["verdict"] == other_f["top1"]["verdict"]
        agree, compared = agree + same, compared + 1
        lines.append(f"| {f['rows']} | {f['claim']} | {f['top1']['verdict']} ({_pm(f['top1']['gain'])}) | "
                     f"{other_f['top1']['verdict']} ({_pm(other_gain)}) | {'agree' if same else 'differ'} |")
    both = "studies" if name == here_state.get("data", "synthetic") else "datasets"
    lines += ["", f"{agree} of {compared} findings get the same top-1 verdict in both {both}."]
    return lines


def _no_segmentation(budget: dict[str, Any], data: str) -> str:
    """Why a study has no mIoU column, from its recorded budget and data."""
    if budget.get("segmentation_steps") is None and not (is_builtin(data) and not has_masks(data)):
        return ("its budget has none, since a UperNet on the release's BEiT-style backbone stays at the "
                "majority-class floor at the steps a study arm can afford; notebook 04 segments at the smoke budget")
    return "this data has no masks"


def render_study(out: str | os.PathLike, beside: str | os.PathLike | None = None) -> dict[str, Path]:
    """REPORT.md, report.html, figures/study.png and metrics.json (every run's numbers,
    the summary and the verdicts) of the study in `out`, from its runs' result.json; with
    `beside`, another study's folder, a table of where their verdicts agree."""
    out, beside = Path(out), (Path(beside) if beside else None)
    results = sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")),
                     key=lambda r: ([a.name for a in ARMS].index(r["arm"]), r["seed"]))
    if not results:
        raise FileNotFoundError(f"{out / 'runs'}: no finished study run (tinymim study --out {out})")
    state = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else {}
    summary, verdicts = summarize(results), findings_table(results)
    seeds = sorted({r["seed"] for r in results})
    budget = state.get("budget_steps") or {}
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    fig = plot_study(results)
    fig.savefig(figures / "study.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    train_min = sum(r["total_seconds"] for r in results) / 60
    per_seed = ", ".join(f"{sum(r['total_seconds'] for r in results if r['seed'] == s) / 60:.1f}" for s in seeds)
    where = out.resolve()
    where = where.relative_to(REPO_ROOT) if where.is_relative_to(REPO_ROOT) else where
    scratch, teacher = summary.get("scratch", {}).get("top1"), summary.get("teacher", {}).get("top1")
    data = state.get("data", "synthetic")
    c_name = f"{short_name(data)}-C"
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in results)]  # no mIoU without masks
    labelled = sorted({r["labelled_images"] for r in results if "labelled_images" in r})
    teacher_min = (state.get("teacher_seconds") or 0) / 60
    segmented = "mIoU" in metrics
    rob = results[0].get("configs", {}).get("robustness")  # one corrupted set for every run
    corrupted = (f": {rob['num_images']} of its val images (a stratified subset) under {len(rob['corruptions'])} "
                 f"corruptions at {len(rob['severities'])} severities, which the kit synthesises" if rob else "")
    title = {"synthetic": "the built-in synthetic data", "digits": "real handwritten digits"}.get(data, "your images")
    md = [f"# Does TinyMIM hold at micro scale? A reproduction study on {title}",
          "",
          f"Every number below was measured by `tinymim study` in `{where}` and is in `metrics.json`: "
          f"{len(results)} runs, seeds {seeds}, budget `{state.get('budget', '?')}` "
          f"({', '.join(f'{k} {v}' for k, v in budget.items() if _budget_shown(k, v, segmented))}). "
          f"Training and evaluation (in {precision(state)}) took {train_min:.1f} min on "
          f"{_host(state.get('environment'))} "
          f"(per seed: {per_seed} min); the MAE teacher took {teacher_min:.1f} min more (from its logged "
          f"throughput; it is trained once per data and cached): {train_min + teacher_min:.1f} min in all.", "",
          *([f"> **Budget `{state['budget']}`: a check of the machinery; its numbers mean nothing.** "
              "The study is `tinymim study` (budget `study`).", ""] if state.get("budget") != "study" else []),
          f"**Data.** {state.get('data_description', describe(data))}.", "",
          f"**Setup.** Student {STUDENT} (the paper's ViT-T at smoke size); teacher: the smoke profile's MAE "
          f"{TEACHER} pre-trained on the unlabelled training images, shared by every run. A seed varies the "
          "student's initialisation and data order in every stage. Every arm is fine-tuned on the same "
          f"{' / '.join(f'{n:,}'.replace(',', ' ') for n in labelled) or '?'} labelled images for the same number "
          "of steps"
          + (", trained as a UperNet segmenter for the same number of steps" if segmented else
             f" (no segmentation: {_no_segmentation(budget, data)})")
          + f" and tested on {c_name}{corrupted}. "
          "Verdicts compare two arms seed by seed: the gain is mean ± std over seeds of the paired "
          "difference (in the metric's good direction); a gain within 2 std is inconclusive.", ""]
    if scratch and teacher:
        margin = verdict(results, PREMISE, "top1")
        md += [f"**Is the study informative?** The MAE teacher fine-tuned reaches {_ms(teacher)} % top-1 against "
               f"{_ms(scratch)} % for a scratch student: a margin of {_pm(margin['gain'])} points "
               f"({margin['verdict']}).", ""]
    heads = {"top1": "top-1 (%)", "mIoU": "mIoU (%)", "c_error": f"{c_name} error (%)"}
    md += ["## Every arm", "", "| row | arm | " + " | ".join(heads[m] for m in metrics) + " | seeds |",
           "|---|---|" + "---|" * len(metrics) + "---|"]
    for arm in ARMS:
        if arm.name in summary:
            s = summary[arm.name]
            md.append(f"| ({arm.row}) | {arm.label} | " + " | ".join(_ms(s.get(m)) for m in metrics)
                      + f" | {s['top1'].n} |")
    gain_heads = {"top1": "top-1 gain", "mIoU": "mIoU gain", "c_error": "C-error gain"}
    md += ["", "## The paper's findings, one verdict per metric", "",
           "Gain = the first arm minus the second (for the corruption error: the second minus the first), "
           "mean ± std over seeds, in points.", "",
           "| row | claim | arms | " + " | ".join(f"{gain_heads[m]} | verdict" for m in metrics) + " |",
           "|---|---|---|" + "---|---|" * len(metrics)]
    for v in verdicts:
        cells = " | ".join(f"{_pm(v[m]['gain'])} | {v[m]['verdict']}" for m in metrics)
        md.append(f"| {v['rows']} | {v['claim']} | {v['better']} vs {v['worse']} | {cells} |")
    md += ["", "## Headline (top-1)", ""]
    md += [f"- {v['rows']} {v['claim']}: **{v['top1']['verdict']}** "
           f"({_pm(v['top1']['gain'])} points over {v['top1']['gain'].n if v['top1']['gain'] else 0} seeds)."
           for v in verdicts]
    if beside is not None:
        md += ["", *beside_table(results, beside, state)]
    md += ["", "## Figures", "", "![study](figures/study.png)", ""]
    text = "\n".join(md) + "\n"
    record = _plain({"state": state, "runs": results, "summary": summary, "findings": verdicts})
    atomic_write_json(jsonable(record, out.resolve()), out / "metrics.json")  # paths inside `out` relative
    html = markdown_to_html(text, out, title="TinyMIM study")
    atomic_write(out / "REPORT.md", lambda f: f.write(text.encode()))
    atomic_write(out / "report.html", lambda f: f.write(html.encode()))
    return {"markdown": out / "REPORT.md", "html": out / "report.html"}
