"""Robustness: ImageNet-A / ImageNet-R (200-class top-1) and ImageNet-C (CE, mCE).

Published ImageNet-C figures for the same model disagree (TinyMIM's README vs MAE's)
because "mCE" is used for different things, so every number here carries its
definition:
- `mCE` (AlexNet-normalised, Hendrycks & Dietterich 2019): CE_c = Σ_s E_{s,c} / Σ_s
  E^AlexNet_{s,c}, mean over the 15 corruptions, x100;
- `relative_mCE`: CE_c = Σ_s (E_{s,c} - E_clean) / Σ_s (E^AlexNet_{s,c} - E^AlexNet_clean);
- `mean_error`: the plain mean top-1 error over corruptions and severities (%);
- `baseline_mCE`: CE normalised by another run (e.g. the scratch model) instead of
  AlexNet, for datasets that have no AlexNet reference (the synthetic data).
Missing corruptions or severities are errors naming them -- a mean over fewer is
never reported.

Corrupted copies of any image set are made with `imagecorruptions` (the 15 standard
functions), deterministically under a seed, and cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .config import cache_dir, derive_seed
from .data import DataError, ImageNetFolder, describe, folder_classes, is_builtin, resource_lines
from .devices import loader_options
from .evaluation import argmax, check_input_size, eval_tensors, eval_transform, predict

ALEXNET = json.loads(resources.files("tinymim.resources").joinpath("imagenet_c_alexnet_err.json").read_text())
CORRUPTIONS = tuple(ALEXNET["corruptions_15"])
SEVERITIES = (1, 2, 3, 4, 5)
# torchvision's AlexNet (IMAGENET1K_V1) acc@1 56.522 -> clean error, for relative mCE
ALEXNET_CLEAN_ERR = 1 - 0.56522

SUBSETS = {
    "imagenet_a": ("imagenet_a_wnids.txt", "imagenet_a_indices_in_1k.txt"),
    "imagenet_r": ("imagenet_r_wnids.txt", "imagenet_r_indices_in_1k.txt"),
}


# ---------------------------------------------------------------------------------
# ImageNet-A / ImageNet-R


def subset_indices(name: str) -> tuple[list[str], list[int]]:
    """(wnids, their 1K class indices) of ImageNet-A or -R, in evaluation (sorted) order."""
    if name not in SUBSETS:
        raise ValueError(f"unknown subset {name!r}; expected one of {sorted(SUBSETS)}")
    wnids_file, idx_file = SUBSETS[name]
    return resource_lines(wnids_file), [int(i) for i in resource_lines(idx_file)]


class SubsetLogits(nn.Module):
    """A 1000-way classifier scored on the logits of a 200-class subset only."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.indices]


def _loader(ds, batch_size: int, workers: int | None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, **loader_options(workers, persistent=False))


def _top1_error(model: nn.Module, loader, device) -> float:
    pred, labels = predict(model, loader, device, reduce=argmax)
    return float((pred != labels).float().mean())


def evaluate_subset(model: nn.Module, root: str | os.PathLike, name: str, input_size: int = 224,
                    resize: int | None = 256, batch_size: int = 100, workers: int = 4,
                    device: str | torch.device | None = "auto") -> dict[str, Any]:
    """Top-1 (%) of a 1000-way model on ImageNet-A or -R (200 wnid folders), using the
    logits of those 200 classes; the transform is Resize(256) + CenterCrop(224)."""
    wnids, indices = subset_indices(name)
    # labels are positions in the 200-wnid list, whatever folders are present: a missing
    # folder shifts nothing, a folder outside the 200 is an error naming it
    ds = ImageNetFolder(root, transform=eval_transform(input_size, resize), classes=wnids)
    err = _top1_error(SubsetLogits(model, indices), _loader(ds, batch_size, workers), device)
    out = {"top1": 100 * (1 - err), "n": len(ds), "definition": f"top-1 on the 200 {name} logits of a 1K model"}
    if len(ds.folders) < len(wnids):
        out["classes_present"] = len(ds.folders)
    return out


# ---------------------------------------------------------------------------------
# ImageNet-C: folders, generation, metrics


def imagenet_c_folders(root: str | os.PathLike, corruptions: Sequence[str] = CORRUPTIONS,
                       severities: Sequence[int] = SEVERITIES) -> dict[tuple[str, int], Path]:
    """`<root>/<corruption>/<severity>/` for every requested pair, or an error listing
    each missing one."""
    root = Path(root)
    found, missing = {}, []
    for c in corruptions:
        for s in severities:
            path = root / c / str(s)
            if path.is_dir():
                found[(c, s)] = path
            else:
                missing.append(f"{c}/{s}")
    if missing:
        raise DataError(f"{root}: ImageNet-C folders missing: {', '.join(missing)}")
    return found


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Make imagecorruptions deterministic: it draws from NumPy's global RNG and from
    scikit-image's `random_noise` (impulse noise), which makes its own generator. Both
    are put back as they were on exit, so the caller's random streams are untouched."""
    import skimage.util

    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    original = skimage.util.random_noise

    def random_noise(image, mode="gaussian", rng=None, *args, **kwargs):
        return original(image, mode, seed if rng is None else rng, *args, **kwargs)

    skimage.util.random_noise = random_noise
    try:
        yield
    finally:
        skimage.util.random_noise = original
        np.random.set_state(state)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """N x H x W x 3 uint8 -> the same images corrupted, image i seeded with (seed, i)."""
    from imagecorruptions import corrupt
    from imagecorruptions import corruptions as functions

    out = np.empty_like(images)
    for i, img in enumerate(images):
        sample_seed = derive_seed(seed, i) % 2**32
        with _seeded(sample_seed):
            if corruption == "glass_blur":  # seeds itself from an unseeded generator unless given one
                res = functions.glass_blur(img, severity, seed=sample_seed)
            else:
                res = corrupt(img, corruption_name=corruption, severity=severity)
        out[i] = np.asarray(res, dtype=np.float64).clip(0, 255).astype(np.uint8)[: img.shape[0], : img.shape[1]]
    return out


def corrupted_copy(images: np.ndarray, corruption: str, severity: int, seed: int = 0,
                   cache: str | os.PathLike | None = None) -> np.ndarray:
    """`corrupt_images`, cached on disk under a key of the images' bytes and the arguments."""
    cache = (Path(cache) if cache else cache_dir()) / "corruptions"
    key = hashlib.sha1(images.tobytes()).hexdigest()[:16]
    path = cache / f"{key}-{corruption}-{severity}-s{seed}-v2.npy"  # v2: per-image seeds from derive_seed
    if path.exists():
        return np.load(path)
    out = corrupt_images(images, corruption, severity, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def write_corrupted_folder(src: str | os.PathLike, dst: str | os.PathLike, corruptions: Sequence[str] = CORRUPTIONS,
                           severities: Sequence[int] = SEVERITIES, size: int | None = 224, seed: int = 0) -> Path:
    """A "-C" copy of any class-folder dataset in ImageNet-C's layout
    (`<dst>/<corruption>/<severity>/<class>/<name>.png`), so `errors_on_imagenet_c` reads
    it. As ImageNet-C was made, images are first resized (short side size/0.875) and
    centre-cropped to `size` (None keeps them; imagecorruptions needs 32 px or more). Files already written are
    kept, so an interrupted run continues; image i of the dataset is seeded (seed, i)."""
    from torchvision import transforms as T

    ds = ImageNetFolder(src)
    prep = T.Compose([T.Resize(round(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size)]) if size else (lambda im: im)
    dst = Path(dst)
    for i, (path, label) in enumerate(ds.samples):
        targets = {(c, s): dst / c / str(s) / ds.classes[label] / (Path(path).stem + ".png")
                   for c in corruptions for s in severities}
        todo = {k: v for k, v in targets.items() if not v.exists()}
        if not todo:
            continue
        img = np.asarray(prep(ds.loader(path)))[None]
        for (c, s), out in todo.items():
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(corrupt_images(img, c, s, derive_seed(seed, "folder", i))[0]).save(out)
    return dst


def errors_on_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                      seed: int = 0, device: str | torch.device | None = "auto") -> dict[str, Any]:
    """Top-1 errors (fractions) of `model` on an in-memory uint8 N x 3 x H x W set: clean
    and every corruption x severity (generated and cached)."""
    def err(x: torch.Tensor) -> float:
        return float((predict(model, x, device, reduce=argmax)[0] != labels).float().mean())

    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    table = {c: {s: err(torch.from_numpy(corrupted_copy(hwc, c, s, seed)).permute(0, 3, 1, 2))
                 for s in severities} for c in corruptions}
    return {"clean": err(images), "errors": table}


def errors_on_imagenet_c(model: nn.Module, root: str | os.PathLike, corruptions: Sequence[str] = CORRUPTIONS,
                         severities: Sequence[int] = SEVERITIES, input_size: int = 224, resize: int | None = None,
                         batch_size: int = 100, workers: int = 4,
                         device: str | torch.device | None = "auto") -> dict[str, Any]:
    """Top-1 errors on the standard ImageNet-C folders (CenterCrop(224) only, as
    hendrycks' test script; `resize=256` reproduces AugMix's zoomed protocol)."""
    folders = imagenet_c_folders(root, corruptions, severities)  # fails before any compute
    tf = eval_transform(input_size, resize)
    table: dict[str, dict[int, float]] = {}
    for (c, s), path in folders.items():
        table.setdefault(c, {})[s] = _top1_error(model, _loader(ImageNetFolder(path, transform=tf), batch_size,
                                                                 workers), device)
    return {"errors": table}


def _complete(errors: dict[str, dict[int, float]], corruptions: Sequence[str], severities: Sequence[int]) -> None:
    missing = [f"{c}/{s}" for c in corruptions for s in severities if s not in errors.get(c, {})]
    if missing:
        raise ValueError(f"error table incomplete, missing: {', '.join(missing)} (a mean over fewer is not reported)")


def corruption_metrics(errors: dict[str, dict[int, float]], clean_error: float | None = None,
                       baseline: dict[str, dict[int, float]] | None = None,
                       corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                       alexnet: bool = True) -> dict[str, Any]:
    """CE/mCE under each definition (module docstring) from errors[c][s] in [0, 1].

    AlexNet-normalised values (`alexnet`, for ImageNet-C itself) need the 15 standard
    corruptions at all 5 severities (its reference errors are means over severities
    1-5); with a `baseline` table, CE is normalised by that run instead.
    """
    _complete(errors, corruptions, severities)
    out: dict[str, Any] = {"per_corruption_error": {c: 100 * float(np.mean([errors[c][s] for s in severities]))
                                                    for c in corruptions}}
    out["mean_error"] = float(np.mean(list(out["per_corruption_error"].values())))
    definitions = {"mean_error": "mean top-1 error over corruptions and severities (%)"}
    standard = set(corruptions) == set(CORRUPTIONS) and tuple(severities) == SEVERITIES
    if alexnet and standard:
        alex = ALEXNET["alexnet_err"]
        ce = {c: 100 * float(np.mean([errors[c][s] for s in severities])) / alex[c] for c in corruptions}
        out["CE"], out["mCE"] = ce, float(np.mean(list(ce.values())))
        definitions["mCE"] = "AlexNet-normalised: mean_c [sum_s E(s,c) / sum_s E_AlexNet(s,c)] x 100"
        if clean_error is not None:  # sum_s E_AlexNet(s,c) = 5 x its mean over severities
            rel = {c: 100 * sum(errors[c][s] - clean_error for s in severities)
                   / (len(severities) * (alex[c] - ALEXNET_CLEAN_ERR)) for c in corruptions}
            out["relative_CE"], out["relative_mCE"] = rel, float(np.mean(list(rel.values())))
            definitions["relative_mCE"] = ("mean_c [sum_s (E(s,c) - E_clean) / sum_s (E_AlexNet(s,c) - "
                                           f"E_AlexNet_clean={ALEXNET_CLEAN_ERR:.5f})] x 100")
    if baseline is not None:
        _complete(baseline, corruptions, severities)
        ce = {c: 100 * sum(errors[c][s] for s in severities) / max(1e-12, sum(baseline[c][s] for s in severities))
              for c in corruptions}
        out["baseline_CE"], out["baseline_mCE"] = ce, float(np.mean(list(ce.values())))
        definitions["baseline_mCE"] = "mean_c [sum_s E(s,c) / sum_s E_baseline(s,c)] x 100"
    if clean_error is not None:
        out["clean_error"] = 100 * clean_error
    out["definitions"] = definitions
    return out


# ---------------------------------------------------------------------------------
# one call per model


def evaluate_robustness(model: nn.Module, cfg: Any, imagenet_a: str | None = None, imagenet_r: str | None = None,
                        imagenet_c: str | None = None, baseline_errors: dict | None = None,
                        device: str | torch.device | None = "auto",
                        classes: list[str] | None = None) -> dict[str, Any]:
    """Everything that applies to `model` under `cfg`: ImageNet-A/R/C when their folders
    are given (a 1000-way ImageNet model only); else the "-C" version the kit synthesises
    from the first `cfg.num_images` val images of the config's own data -- the built-in
    data or a folder's val/, labelled by `classes` -- under key `synthetic_c` (CE relative
    to `baseline_errors`, e.g. the scratch model's, when given)."""
    given = [n for n, root in (("--imagenet-a", imagenet_a), ("--imagenet-r", imagenet_r), ("--imagenet-c", imagenet_c))
             if root]
    if not given and not is_builtin(cfg.data) and not (Path(cfg.data) / "val").is_dir():
        raise DataError(f"nothing to evaluate: {cfg.data} has no val/ folder to make a -C copy of; give the ImageNet-A, "
                        f"-R and/or -C folders (--imagenet-a/--imagenet-r/--imagenet-c; notebooks: imagenet_a=..., ...)")
    # every input checked before any compute: folders present, class folders known
    wnids = set(resource_lines("imagenet_1k_wnids.txt"))
    roots = {name: root for name, root in (("imagenet_a", imagenet_a), ("imagenet_r", imagenet_r)) if root}
    checks = [(Path(root), set(subset_indices(name)[0]), name) for name, root in roots.items()]
    if imagenet_c:
        checks += [(p, wnids, "ImageNet-1K") for p in imagenet_c_folders(imagenet_c, cfg.corruptions,
                                                                          cfg.severities).values()]
    for path, known, what in checks:
        unknown = sorted(set(folder_classes(path)) - known)
        if unknown:
            raise DataError(f"{path}: class folder(s) {unknown[:5]} are not {what} wnids")
    width = getattr(model, "num_classes", None)  # timm's classifier width
    if given and width not in (None, 1000):
        raise DataError(f"{', '.join(given)}: ImageNet-A/R/C are scored by a 1000-way ImageNet-1K classifier; this "
                        f"model has a {width}-way head (evaluate it on its own data's -C: drop {given[0]})")
    check_input_size(model, cfg.input_size)
    out: dict[str, Any] = {}
    if not given:
        val = eval_tensors(cfg, "val", classes, cfg.num_images)
        images, labels = val.images, val.labels
        res = errors_on_tensors(model, images, labels, cfg.corruptions, cfg.severities, cfg.seed, device)
        out["synthetic_c"] = {**res, **corruption_metrics(res["errors"], res["clean"], baseline_errors,
                                                          cfg.corruptions, cfg.severities, alexnet=False),
                              "data": describe(cfg.data), "images": len(labels)}
    for name, root in (("imagenet_a", imagenet_a), ("imagenet_r", imagenet_r)):
        if root:
            out[name] = evaluate_subset(model, root, name, cfg.input_size, 256, cfg.batch_size, cfg.num_workers, device)
    if imagenet_c:
        res = errors_on_imagenet_c(model, imagenet_c, cfg.corruptions, cfg.severities, cfg.input_size, cfg.resize,
                                   cfg.batch_size, cfg.num_workers, device)
        out["imagenet_c"] = {**res, **corruption_metrics(res["errors"], corruptions=cfg.corruptions,
                                                         severities=cfg.severities),
                             "protocol": f"CenterCrop({cfg.input_size})" + (f" after Resize({cfg.resize})" if cfg.resize else "")}
    return out


def summary(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of `evaluate_robustness`, one flat row per model."""
    row: dict[str, float] = {}
    for name in ("imagenet_a", "imagenet_r"):
        if name in result:
            row[f"{name} top-1"] = result[name]["top1"]
    for name in ("synthetic_c", "imagenet_c"):
        res = result.get(name)
        if res is None:
            continue
        if "clean_error" in res:
            row[f"{name} clean top-1"] = 100 - res["clean_error"]
        for key in ("mean_error", "mCE", "relative_mCE", "baseline_mCE"):
            if key in res:
                row[f"{name} {key}"] = res[key]
    return row
