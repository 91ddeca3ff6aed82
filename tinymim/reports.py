"""Metrics records of a run directory.

Every notebook ends by recording what it measured under its own name in
`<run_dir>/metrics.json`; report tables are built only from these records, so a report
can never show a number that no run produced.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write
from .config import REPO_ROOT
from .data import describe, short_name
from .stats import Summary, mean_std, verdict


def jsonable(value: Any, root: Path) -> Any:
    """`value` as JSON data; a path inside the run directory `root` relative to it, so a committed
    metrics.json names no machine's folders and a moved run directory still reads."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, root) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(value) and Path(value).is_relative_to(root):
        return str(Path(value).relative_to(root))
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # not measured (or undefined): JSON has no NaN, and a report shows a gap
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not JSON data")


def record_metrics(run_dir: str | os.PathLike, section: str, metrics: dict[str, Any]) -> Path:
    """Merge `metrics` under `section` into run_dir/metrics.json (atomic rewrite)."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_metrics(run_dir)
    data[section] = {**jsonable(metrics, Path(run_dir).resolve()), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode()))


def _shown(path: Path) -> Path:
    """A run directory as a report names it: relative to the repository (where `make run`
    writes) or else to where the command runs, when inside either, so a committed report
    holds no machine path."""
    path = path.resolve()
    for root in (REPO_ROOT, Path.cwd()):
        if path.is_relative_to(root):
            return path.relative_to(root)
    return path


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------
# report tables: a run directory (or several) -> REPORT.md + a self-contained report.html

NOT_RUN = "not run"


def _resource(name: str) -> Any:
    from importlib import resources

    return json.loads(resources.files("tinymim.resources").joinpath(name).read_text())


def _fmt(value: float | None) -> str:
    """A published number."""
    return "—" if value is None else f"{value:.1f}"


def _data_name(cfg: dict[str, Any] | None, short: bool = False) -> str:
    if not cfg or not cfg.get("data"):
        return "unrecorded data"
    return short_name(cfg["data"]) if short else describe(cfg["data"])


def _own_c(cfg: dict[str, Any] | None) -> str | None:
    """The name of the -C copy the kit synthesises from a run's own val images (robustness
    key `synthetic_c`), e.g. synthetic-C, digits-C; None on ImageNet-scale folders' runs."""
    if not cfg or not cfg.get("data") or cfg.get("profile") == "paper":
        return None
    return f"{short_name(str(cfg['data']))}-C"


def _first_config(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The config of the first notebook that recorded one (what data the run is on)."""
    for section in ("03_finetune", "02_distill_pretrain", "05_robustness", "04_segmentation", "01_models"):
        cfg = (metrics.get(section) or {}).get("config") or (metrics.get(section) or {}).get("mae_config")
        if cfg:
            return cfg
    return None


def run_results(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model a run produced (the distilled student and the scratch baseline,
    fine-tuned), with the numbers it measured and, for each gap, why it is a gap. Keys:
    model, source, top1, mIoU, imagenet_a, imagenet_r, imagenet_c_mCE, c_mean_error
    (each a `stats.Summary` or a reason string)."""
    ft, seg, rob = metrics.get("03_finetune"), metrics.get("04_segmentation"), metrics.get("05_robustness")
    pre = metrics.get("02_distill_pretrain") or {}
    cfg = (ft or {}).get("config") or (seg or {}).get("config") or pre.get("config")
    own = _own_c(cfg)  # the kit's -C copy of the run's val images
    model = (ft or seg or {}).get("model") or pre.get("student") or "student"
    source = f"{cfg['profile']} · {_data_name(cfg, short=True)} · {model}" if cfg else "this run"
    rows = []
    summary = (ft or {}).get("summary", {})
    for arm in ("distilled", "scratch"):
        if ft is not None and arm not in summary:
            continue
        row: dict[str, Any] = {"model": f"{arm} {model}" + (" (TinyMIM)" if arm == "distilled" else ""),
                               "source": source}
        row["top1"] = Summary.from_dict(summary[arm]) if ft else "03 not run"
        if arm == "distilled":
            row["mIoU"] = ("no masks in this data (04 skipped)" if seg and "skipped" in seg
                           else mean_std([seg["mIoU"]]) if seg else "04 not run")
        else:
            row["mIoU"] = "not segmented (04 segments the distilled student)"
        robust = {r["model"]: r for r in (rob or {}).get("summary", [])}.get(arm)
        for key, name in (("imagenet_a", "imagenet_a top-1"), ("imagenet_r", "imagenet_r top-1")):
            if robust is None:
                row[key] = "05 not run" if rob is None else "model not evaluated"
            elif name in robust:
                row[key] = mean_std([robust[name]])
            else:
                row[key] = f"ImageNet classes only; {own} instead" if own else "dataset not given"
        if robust is not None and "imagenet_c mCE" in robust:
            row["imagenet_c_mCE"] = mean_std([robust["imagenet_c mCE"]])
            row["c_mean_error"] = mean_std([robust["imagenet_c mean_error"]])
        elif robust is not None and "synthetic_c mean_error" in robust:
            row["imagenet_c_mCE"] = f"{own or 'synthetic-C'} has no AlexNet reference; relative CE in 05"
            row["c_mean_error"] = mean_std([robust["synthetic_c mean_error"]])
        else:
            row["imagenet_c_mCE"] = row["c_mean_error"] = "05 not run" if rob is None else "dataset not given"
        rows.append(row)
    return rows


RESULT_COLUMNS = [("top1", "top-1 (%)"), ("mIoU", "seg. mIoU (%)"), ("imagenet_a", "IN-A top-1"),
                  ("imagenet_r", "IN-R top-1"), ("imagenet_c_mCE", "IN-C mCE"), ("c_mean_error", "-C mean err. (%)")]


def _cell(value: Any) -> str:
    if isinstance(value, Summary):
        return str(value)
    return f"— ({value})" if value else "—"


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: the paper's rows (marked `paper`), then the run's (marked with profile,
    data and model). A paper cell only ever holds a published number, a run cell only a
    measured one."""
    paper = _resource("paper_results.json")
    head = ["model", "source", *[name for _, name in RESULT_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in paper["rows"]:
        cells = [_fmt(r["top1"]), _fmt(r["mIoU"]), _fmt(r["imagenet_a"]), _fmt(r["imagenet_r"]),
                 _fmt(r["imagenet_c"]) + (" (as published)" if r["imagenet_c"] is not None else ""), "—"]
        lines.append(f"| {r['model']} | paper · ImageNet-1K / ADE20K | " + " | ".join(cells) + " |")
    for r in rows:
        lines.append(f"| **{r['model']}** | {r['source']} | " + " | ".join(_cell(r.get(k)) for k, _ in RESULT_COLUMNS) + " |")
    return lines


def paper_tables() -> list[dict[str, Any]]:
    """Supplementary Tables 1-3 in their order, each with the stage and notebook it describes
    and the config field of each row (resources/paper_tables.json)."""
    data = _resource("paper_tables.json")
    return [data[key] for key in data if key.startswith("table")]


_SCHEDULED = {"epochs": "steps", "warmup_epochs": "warmup_steps"}  # a step count set instead of epochs


def _used(cfg: dict[str, Any], field: str) -> Any:
    if field in _SCHEDULED and cfg.get(_SCHEDULED[field]) is not None:
        return f"{cfg[_SCHEDULED[field]]} steps"
    if field == "rand_augment":
        import re

        m = re.search(r"m(\d+)-mstd([\d.]+)", cfg.get(field) or "")
        return f"{m[1]}/{m[2]}" if m else "none"
    value = cfg.get(field)
    return list(value) if isinstance(value, tuple) else value


def _same(paper: Any, used: Any) -> bool:
    if isinstance(paper, list) and paper and not isinstance(paper[0], list) and not isinstance(used, list):
        return any(_same(p, used) for p in paper)  # one of the paper's choices
    if isinstance(paper, float) or isinstance(used, float):
        return isinstance(used, (int, float)) and isinstance(paper, (int, float)) and math.isclose(paper, used, rel_tol=1e-6)
    return paper == used


_ABSENT = object()  # the table has no such row for the model (a null row means "none", e.g. no clipping)


def _paper_value(table: dict[str, Any], model: str, key: str) -> Any:
    for part in (table.get(model, {}), table.get("all", {})):
        if key in part:
            return part[key]
    return _ABSENT


def paper_counterpart(model: str) -> str:
    """The paper model a run's model is compared with: itself, or for a smoke micro ViT the
    paper's default student, ViT-S."""
    return model if model.startswith(("vit_", "tinymim_")) else "vit_small"


def hyperparameter_rows(stage: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The hyper-parameters a stage used, in its supplementary table's order, each with the
    paper's value and, where they differ, why."""
    from .presets import get_config

    table = next(t for t in paper_tables() if t["stage"] == stage)
    fields = table["fields"]
    model = paper_counterpart(cfg.get("model", ""))
    preset = None
    try:
        preset = get_config(stage, cfg.get("model"), cfg.get("profile", "smoke")).to_dict()
    except Exception:  # noqa: BLE001 -- a model without a preset of that profile: nothing to compare with
        preset = None
    rows = []
    for paper_key, field in fields:
        paper = _paper_value(table, model, paper_key)
        used = _used(cfg, field)
        same = paper is not _ABSENT and _same(paper, used)
        if same:
            why = f"one of the paper's {paper}" if isinstance(paper, list) and not isinstance(used, list) else ""
        elif paper is _ABSENT:
            why = f"the paper gives no value for {model}" if model else "the paper gives no value"
        elif preset is not None and _used(preset, field) != used:
            why = f"override (the {cfg.get('profile')} preset has {_used(preset, field)})"
        elif cfg.get("profile") != "paper":
            why = f"{cfg.get('profile')} profile: micro ViT, built-in data, CPU minutes"
        else:
            why = "kit default (docs/deviations-from-the-release.md)"
        rows.append({"hyper-parameter": paper_key, "paper": "—" if paper in (_ABSENT, None) else paper, "used": used,
                     "differs": not same, "why": why})
    return rows


def hyperparameter_tables(metrics: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for table in paper_tables():
        section = table["notebook"]
        cfg = metrics.get(section, {}).get("config")
        lines += ["", f"### {table['title']}", ""]
        if cfg is None:
            skipped = metrics.get(section, {}).get("skipped")
            lines.append(f"— ({section} skipped: {skipped})" if skipped else
                         f"— ({section} {'recorded no config' if section in metrics else 'not run'})")
            continue
        lines += [f"`{cfg.get('model')}`, profile `{cfg.get('profile')}`, data `{cfg.get('data')}`; paper column: "
                  f"`{paper_counterpart(cfg.get('model', ''))}`. Rows in **bold** differ from the paper.", "",
                  "| hyper-parameter | paper | used | why it differs |", "|---|---|---|---|"]
        for r in hyperparameter_rows(table["stage"], cfg):
            name = f"**{r['hyper-parameter']}**" if r["differs"] else r["hyper-parameter"]
            used = f"**{r['used']}**" if r["differs"] else r["used"]
            lines.append(f"| {name} | {r['paper']} | {used} | {r['why']} |")
    return lines


def findings(metrics: dict[str, Any]) -> list[str]:
    """Plain sentences, each computed from numbers in the tables above (nothing else)."""
    out = []
    ft = metrics.get("03_finetune")
    if ft and "margin" in ft.get("summary", {}):
        margin = Summary.from_dict(ft["summary"]["margin"])
        d, sc = (Summary.from_dict(ft["summary"][arm]).mean for arm in ("distilled", "scratch"))
        data, n = _data_name(ft.get("config")), margin.n
        judged = verdict(margin)
        if judged.startswith("inconclusive"):
            text = f"differs from the from-scratch one by {margin.signed()} points top-1 ({judged})"
        else:
            spread = "" if margin.std is None else f" ± {margin.std:.1f}"
            text = f"{'beats' if margin.mean > 0 else 'trails'} the from-scratch one by {abs(margin.mean):.1f}{spread} points top-1"
        out.append(f"The distilled {ft.get('model')} {text} ({d:.1f} vs {sc:.1f} %, on {data}, "
                   f"{n} seed{'s' if n > 1 else ''}, {ft.get('labelled_images') or 'all'} labelled images).")
    mod = metrics.get("01_models", {})
    if "teacher_probe_top1" in mod:
        t, r = mod["teacher_probe_top1"], mod["random_init_probe_top1"]
        out.append(f"The MAE teacher's linear probe reaches {t:.1f} % against {r:.1f} % for a randomly initialised "
                   f"ViT of its size ({t - r:+.1f} points): {'pre-training learned features' if t > r else 'no gain from pre-training'}.")
    seg = metrics.get("04_segmentation")
    if seg and "skipped" in seg:
        out.append(f"{seg['skipped']}.")
    elif seg:
        out.append(f"UperNet on the distilled {seg.get('model')} reaches {seg['mIoU']:.1f} mIoU against "
                   f"{seg['majority_class_mIoU']:.1f} for labelling every pixel with the majority class.")
    rob = {r["model"]: r for r in metrics.get("05_robustness", {}).get("summary", [])}
    key = next((k for k in ("imagenet_c mean_error", "synthetic_c mean_error") if k in rob.get("distilled", {})), None)
    if key and key in rob.get("scratch", {}):
        d, s = rob["distilled"][key], rob["scratch"][key]
        name = "ImageNet-C" if key.startswith("imagenet") else _own_c(ft.get("config") if ft else None) or "synthetic-C"
        out.append(f"Under {name} corruptions the distilled model's mean top-1 error is "
                   f"{d:.1f} % against {s:.1f} % from scratch ({d - s:+.1f} points).")
    pre = metrics.get("02_distill_pretrain")
    if pre:
        out.append(f"Distillation ({pre['student']} from {pre['teacher']} block {pre['teacher_block']}) lowered the "
                   f"relation loss from {pre['loss_first']:.3f} to {pre['loss_last']:.3f} in {pre['steps']} steps "
                   f"({pre['imgs_per_s']:.0f} images/s).")
    return out


def _environment(run_dir: Path) -> tuple[list[str], list[str]]:
    """(environment lines, cost table lines) from runner.json, which the runner writes."""
    state_path = run_dir / "runner.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    env = state.get("environment")
    lines = []
    if env:
        dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
        gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or f"CPU only ({env.get('cpus')} cores)"
        lines = [f"- commit `{env.get('git_commit') or 'unknown'}`{dirty}",
                 f"- torch {env.get('torch')}, timm {env.get('timm')}, CUDA {env.get('cuda') or '—'}, "
                 f"Python {env.get('python')}",
                 f"- devices: {gpus}; bf16 on the CPU: {'native' if env.get('cpu_native_bf16') else 'emulated (fp32 used)'}"]
    else:
        lines = ["- — (no environment record: the run was not made by `tinymim run`)"]
    cost = ["| notebook | wall time (s) | status |", "|---|---|---|"]
    for name, s in sorted((k, v) for k, v in state.items() if isinstance(v, dict) and "status" in v):
        cost.append(f"| {name} | {s.get('seconds', '—')} | {s['status']} |")
    return lines, cost


def _curves(run_dir: Path, out: Path) -> Path | None:
    """Every training log of the run (metrics.jsonl), one loss curve per run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .engine import read_metrics

    logs = sorted(p.parent for p in run_dir.rglob("metrics.jsonl"))
    if not logs:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for folder in logs:
        records = read_metrics(folder)
        if records:
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=str(folder.relative_to(run_dir)))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / "figures" / "loss_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _figures(run_dir: Path, out: Path) -> list[Path]:
    """The notebooks' figures (each stage folder's PNGs), copied next to the report."""
    import shutil

    copied = []
    for png in sorted(run_dir.glob("0[0-9]_*/*.png")):
        dest = out / "figures" / f"{png.parent.name}-{png.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != png.resolve():
            shutil.copy2(png, dest)
        copied.append(dest)
    return copied


def _group_key(metrics: dict[str, Any]) -> str:
    """Runs that differ only in their seeds belong together."""
    configs = {s: {k: v for k, v in (metrics.get(s, {}).get("config") or {}).items() if k not in ("seed", "pretrained",
               "teacher_path")} for s in ("02_distill_pretrain", "03_finetune", "04_segmentation")}
    return json.dumps(configs, sort_keys=True, default=str)


def _summary_mean(arm: str):
    return lambda m: (m.get("03_finetune", {}).get("summary", {}).get(arm) or {}).get("mean")


COMPARED = [("03_finetune", _summary_mean("distilled"), "distilled top-1 (%)"),
            ("03_finetune", _summary_mean("scratch"), "scratch top-1 (%)"),
            ("03_finetune", _summary_mean("margin"), "distilled − scratch (points)"),
            ("04_segmentation", lambda m: m.get("04_segmentation", {}).get("mIoU"), "segmentation mIoU (%)"),
            ("01_models", lambda m: m.get("01_models", {}).get("teacher_probe_top1"), "teacher linear probe (%)")]


def comparison_table(runs: list[Path]) -> list[str]:
    """Several runs side by side: runs that differ only in seeds are one column (mean ±
    std over them), runs with different configs are different columns."""
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for run in runs:
        m = load_metrics(run)
        groups.setdefault(_group_key(m), []).append((run, m))
    names = [" + ".join(p.name for p, _ in members) for members in groups.values()]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for section, read, label in COMPARED:
        cells = []
        for members in groups.values():
            values = [v for _, m in members if (v := read(m)) is not None]
            cells.append(str(mean_std(values)) + (f" (n={len(values)})" if len(values) > 1 else "") if values
                         else f"— ({section} not run)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render_report(runs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> dict[str, Path]:
    """REPORT.md and a self-contained report.html (figures embedded, no external reference)
    for one run directory, or several side by side; written to `out` (default: the single
    run directory, else ./report)."""
    run_dirs = [Path(r) for r in runs]
    missing = [str(r) for r in run_dirs if not (r / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"no metrics.json in {missing}: run the notebooks into it first (tinymim run --out DIR)")
    out = Path(out) if out else (run_dirs[0] if len(run_dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    first = run_dirs[0]
    metrics = load_metrics(first)
    paper = _resource("paper_results.json")
    md = ["# TinyMIM reproduction report", "",
          f"Run{'s' if len(run_dirs) > 1 else ''}: " + ", ".join(f"`{_shown(r)}`" for r in run_dirs) + ". "
          "Every run number below was measured by this run and recorded in its `metrics.json`; a gap says why.", "",
          f"Data: {_data_name(_first_config(metrics))}.", ""]
    if len(run_dirs) > 1:
        md += ["## Runs side by side", "", *comparison_table(run_dirs), ""]
    md += ["## Results next to the paper", "",
           "Columns: classification top-1 on the run's validation data (ImageNet-1K for the paper), UperNet mIoU "
           "(ADE20K), ImageNet-A/R top-1 on their 200 classes, ImageNet-C mCE (AlexNet-normalised corruption error, "
           "averaged over 15 corruptions) and the plain mean top-1 error under corruption. "
           f"Paper rows: {paper['source']}", "", *results_table(run_results(metrics)), "",
           "## Findings", "", *([f"- {f}" for f in findings(metrics)] or ["- — (no finished stage yet)"]), "",
           "## Hyper-parameters used, in the layout of supplementary Tables 1-3", *hyperparameter_tables(metrics), ""]
    env, cost = _environment(first)
    md += ["## Environment and cost", "", *env, "", *cost, ""]
    throughput = metrics.get("02_distill_pretrain", {}).get("imgs_per_s")
    if throughput:
        md.append(f"Distillation throughput: {throughput:.0f} images/s. Peak memory: not measured on a CPU run "
                  "(`tinymim doctor` measures it on GPUs).")
    figures = [p for p in (_curves(first, out), *_figures(first, out)) if p is not None]
    md += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
    text = "\n".join(md) + "\n"
    report_md = out / "REPORT.md"
    atomic_write(report_md, lambda f: f.write(text.encode()))
    report_html = out / "report.html"
    html = markdown_to_html(text, out)
    atomic_write(report_html, lambda f: f.write(html.encode()))
    return {"markdown": report_md, "html": report_html}


def markdown_to_html(markdown_text: str, out: Path, title: str = "TinyMIM report") -> str:
    """The Markdown as one HTML file: figures inlined as data URIs, the style inline."""
    import base64
    import re

    import mistune

    body = mistune.create_markdown(plugins=["table"])(markdown_text)

    def inline(match: re.Match) -> str:
        data = base64.b64encode((out / match[1]).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f5f5f5;padding:0 3px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
