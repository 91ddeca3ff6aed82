import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tinymim.data import DataError
from tinymim.robustness import (
    ALEXNET,
    CORRUPTIONS,
    corrupt_images,
    corrupted_copy,
    corruption_metrics,
    errors_on_tensors,
    evaluate_subset,
    imagenet_c_folders,
    subset_indices,
)


def _table(fn):
    return {c: {s: fn(c, s) for s in range(1, 6)} for c in CORRUPTIONS}


def test_mce_equals_the_formula():
    rng = np.random.default_rng(0)
    errors = _table(lambda c, s: float(rng.uniform(0.2, 0.9)))
    m = corruption_metrics(errors, clean_error=0.15)
    alex = ALEXNET["alexnet_err"]
    ce = [sum(errors[c][s] for s in range(1, 6)) / (5 * alex[c]) for c in CORRUPTIONS]
    assert m["mCE"] == pytest.approx(100 * np.mean(ce))
    rel = [sum(errors[c][s] - 0.15 for s in range(1, 6)) / (5 * (alex[c] - 0.43478)) for c in CORRUPTIONS]
    assert m["relative_mCE"] == pytest.approx(100 * np.mean(rel))
    assert m["mean_error"] == pytest.approx(100 * np.mean([errors[c][s] for c in CORRUPTIONS for s in range(1, 6)]))
    half = corruption_metrics(_table(lambda c, s: alex[c] / 2))
    assert half["mCE"] == pytest.approx(50.0) and set(half["definitions"]) == {"mean_error", "mCE"}


def test_baseline_normalised_ce_and_missing_entries():
    base = _table(lambda c, s: 0.4)
    m = corruption_metrics(_table(lambda c, s: 0.2), baseline=base)
    assert m["baseline_mCE"] == pytest.approx(50.0)
    holes = _table(lambda c, s: 0.3)
    del holes["fog"][3]
    with pytest.raises(ValueError, match="fog/3"):
        corruption_metrics(holes)


class _Decoder(nn.Module):
    """Reads the class k from the image's red level and puts the top logit at 1K index
    `targets[k]`, with an even larger logit at a class outside the subset."""

    def __init__(self, targets, outside):
        super().__init__()
        self.targets, self.outside = torch.tensor(targets), outside

    def forward(self, x):
        red = (x[:, 0].mean(dim=(1, 2)) * 0.229 + 0.485) * 255
        k = red.round().long()
        logits = torch.zeros(len(x), 1000)
        logits[torch.arange(len(x)), self.targets[k]] = 5.0
        logits[:, self.outside] = 10.0
        return logits


def test_200_class_logit_selection(tmp_path):
    wnids, idx = subset_indices("imagenet_r")
    assert len(wnids) == len(idx) == 200
    for k, w in enumerate(wnids):
        (tmp_path / w).mkdir()
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / w / "a.png")
    outside = next(i for i in range(1000) if i not in idx)
    res = evaluate_subset(_Decoder(idx, outside), tmp_path, "imagenet_r", input_size=8, resize=None, workers=0)
    assert res["top1"] == 100.0 and res["n"] == 200
    with pytest.raises(DataError, match="not among the 200 classes"):
        evaluate_subset(_Decoder(idx, outside), tmp_path, "imagenet_a", input_size=8, resize=None, workers=0)
    # a missing class folder shifts no label: every remaining image is still right
    import shutil

    shutil.rmtree(tmp_path / wnids[3])
    res = evaluate_subset(_Decoder(idx, outside), tmp_path, "imagenet_r", input_size=8, resize=None, workers=0)
    assert res["top1"] == 100.0 and res["n"] == 199 and res["classes_present"] == 199


def test_imagenet_c_walker(tmp_path):
    for c in CORRUPTIONS:
        for s in range(1, 6):
            if (c, s) not in {("snow", 2), ("contrast", 5)}:
                (tmp_path / c / str(s)).mkdir(parents=True)
    with pytest.raises(DataError, match="snow/2, contrast/5"):
        imagenet_c_folders(tmp_path)
    assert len(imagenet_c_folders(tmp_path, CORRUPTIONS[:3])) == 15


def test_corruptions_are_deterministic_and_cached(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    for c in ("impulse_noise", "glass_blur", "gaussian_noise", "frost"):
        a, b = corrupt_images(imgs, c, 3, seed=1), corrupt_images(imgs, c, 3, seed=1)
        assert a.shape == imgs.shape and a.dtype == np.uint8 and np.array_equal(a, b), c
    assert not np.array_equal(corrupt_images(imgs, "gaussian_noise", 3, seed=2), corrupt_images(imgs, "gaussian_noise", 3, seed=1))
    first = corrupted_copy(imgs, "shot_noise", 2, cache=tmp_path)
    assert len(list((tmp_path / "corruptions").glob("*.npy"))) == 1
    assert np.array_equal(first, corrupted_copy(imgs, "shot_noise", 2, cache=tmp_path))


def test_errors_on_tensors_cover_every_pair(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMIM_CACHE", str(tmp_path))
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2)

    res = errors_on_tensors(Constant(), images, torch.tensor([0, 0, 1, 1]), corruptions=("contrast", "fog"),
                            severities=(1, 5))
    assert res["clean"] == 0.5 and res["errors"] == {"contrast": {1: 0.5, 5: 0.5}, "fog": {1: 0.5, 5: 0.5}}


def test_synthetic_robustness_report_end_to_end(tmp_path, monkeypatch):
    from tinymim.models import ModelSpec, build_model
    from tinymim.presets import get_config
    from tinymim.robustness import evaluate_robustness, summary

    monkeypatch.setenv("TINYMIM_CACHE", str(tmp_path))
    cfg = get_config("robustness", profile="smoke", overrides={"num_images": "10", "corruptions": "contrast,fog",
                                                                "severities": "1,3"})
    torch.manual_seed(0)
    model = build_model(ModelSpec.create("micro_tiny", num_classes=10))
    base = evaluate_robustness(model, cfg)
    other = evaluate_robustness(model, cfg, baseline_errors=base["synthetic_c"]["errors"])
    row = summary(other)
    assert row["synthetic_c baseline_mCE"] == pytest.approx(100.0)  # the same model against itself
    assert "synthetic_c mCE" not in row  # no AlexNet reference for a non-standard table
    assert set(other["synthetic_c"]["definitions"]) == {"mean_error", "baseline_mCE"}
    assert other["synthetic_c"]["images"] == 10  # a stratified subset: one per class
    with pytest.raises(DataError, match=r"num_images=8 of 2000 images would leave out 2 class\(es\)"):
        evaluate_robustness(model, get_config("robustness", profile="smoke", overrides={"num_images": 8}))


def test_any_folder_gets_a_c_version_the_walker_reads(tmp_path):
    from tinymim.robustness import errors_on_imagenet_c, write_corrupted_folder

    for c in ("n01", "n02"):
        (tmp_path / "src" / c).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(len(c)).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / "src" / c / "x.png")
    kinds, sevs = ("fog", "pixelate"), (1, 4)
    dst = write_corrupted_folder(tmp_path / "src", tmp_path / "c", kinds, sevs, size=32)
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert len(files) == 8 and files[0] == "fog/1/n01/x.png"
    assert Image.open(dst / "fog" / "4" / "n02" / "x.png").size == (32, 32)

    class Always0(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2)

    res = errors_on_imagenet_c(Always0(), dst, kinds, sevs, input_size=32, workers=0)
    assert res["errors"] == {"fog": {1: 0.5, 4: 0.5}, "pixelate": {1: 0.5, 4: 0.5}}
