"""Real images (issue 24): scikit-learn's digits built in, subsets that cannot lie, a small folder
decoded once, and the whole pipeline on a folder of real-format files and on the digits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tinymim.data import DataError, Digits, ImageNetFolder, builtin, cached_folder, limit, train_source
from tinymim.data.digits import LABELLED_PER_CLASS
from tinymim.presets import get_config

MODES = ("RGB", "RGBA", "L", "LA", "P", "JPEG")


def real_format_folder(root, classes=("cat", "dog", "owl"), n_train=8, n_val=4, seed=0):
    """train/ + val/ class folders of PNGs in every PIL mode a user's folder holds (RGBA, LA,
    palette, grey, RGB) and JPEGs, at odd sizes from 12 px to ~3:1 panoramas; each class a hue."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(classes):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(12, 80)), int(rng.integers(12, 240))
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                pixels[..., ci % 3] += 180
                img, mode = Image.fromarray(pixels), MODES[i % len(MODES)]
                if mode == "JPEG":
                    img.save(folder / f"{i}.jpg", quality=85)
                elif mode == "P":
                    img.quantize(16).save(folder / f"{i}.png")
                else:
                    img.convert(mode).save(folder / f"{i}.png")
    return root


def test_digits_splits_follow_the_built_in_conventions():
    cfg = get_config("finetune", profile="smoke", overrides={"data": "digits"})
    pool, train, val = (Digits(s, 32, seed=0) for s in ("pool", "train", "val"))
    assert cfg.num_classes == 10  # from the data
    assert len(pool) + len(val) == 1797 and abs(len(val) - 0.2 * 1797) < 1  # stratified 80/20
    assert np.bincount(val.labels.numpy()).min() >= 34  # every class ~20 % of its images
    assert (np.bincount(train.labels.numpy()) == LABELLED_PER_CLASS).all()
    assert pool.images.shape[1:] == (3, 32, 32) and pool.images.dtype == torch.uint8
    assert not set(map(bytes, pool.images.numpy())) & set(map(bytes, val.images.numpy()))  # val held out
    assert torch.equal(builtin("val", cfg).images, val.images)  # one split per data_seed ...
    assert not torch.equal(Digits("val", 32, seed=1).labels, val.labels)  # ... another seed, another split
    assert val.images.max() == 255 and val.images.min() == 0  # ink 0..16 spans the uint8 range


def test_the_synthetic_subset_is_stratified_and_recorded():
    cfg = get_config("finetune", profile="smoke", overrides={"data_limit": 200})
    source = train_source(cfg)
    assert source.record["images"] == 200 and source.record["of"] == 5000
    assert source.record["subset"] == "stratified by class"
    counts = list(source.record["per_class"].values())
    assert len(counts) == 10 and max(counts) - min(counts) <= 6  # in proportion to the class sizes
    assert source.indices == train_source(cfg).indices  # seeded by data_seed, not by the run seed


def test_num_classes_comes_from_the_folder(tmp_path):
    root = real_format_folder(tmp_path / "data")
    assert get_config("finetune", profile="smoke", overrides={"data": str(root)}).num_classes == 3
    assert get_config("finetune", profile="smoke", overrides={"data": str(root), "num_classes": 5}).num_classes == 5


def test_a_small_folder_is_decoded_once_at_twice_the_input_size(tmp_path, monkeypatch):
    import tinymim.data.cache as cache

    root = real_format_folder(tmp_path / "data")
    cfg = get_config("finetune", profile="smoke", overrides={"data": str(root)})
    first = train_source(cfg)
    assert isinstance(first, cache.CachedImages) and first.record["decoded_once"]["shorter_side_at_most"] == 64
    folder = ImageNetFolder(root / "train")
    for i in range(len(first)):
        h, w = first.size(i)
        oh, ow = folder.size(first.indices[i])
        assert min(h, w) == min(64, oh, ow) and abs(h / w - oh / ow) < 0.1  # shrunk, never grown; aspect kept
        assert first.target(i) == folder.target(first.indices[i])

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(cache, "decode_file", no_decoding)
    again = train_source(cfg)  # from the disk cache
    assert all(torch.equal(again.image(i), first.image(i)) for i in range(len(first)))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "train" / "cat" / "new.png")
    with pytest.raises(AssertionError, match="decoded"):  # a changed listing is a new cache
        train_source(cfg)


def test_a_folder_too_large_to_cache_is_read_from_its_files(tmp_path, monkeypatch):
    import tinymim.data.cache as cache

    root = real_format_folder(tmp_path / "data")
    monkeypatch.setattr(cache, "MAX_BYTES", 1000)
    subset = limit(ImageNetFolder(root / "train"), None)
    assert cached_folder(subset, 32) is None


def test_a_stratified_subset_refuses_to_drop_a_class(tmp_path):
    root = real_format_folder(tmp_path / "data")
    cfg = get_config("finetune", profile="smoke", overrides={"data": str(root), "data_limit": 2})
    with pytest.raises(DataError, match=r"data_limit=2 of 24 images would leave out 1 class\(es\)"):
        train_source(cfg)


def test_the_kit_s_c_copy_and_probe_run_on_a_folder(tmp_path):
    from tinymim.evaluation import eval_tensors
    from tinymim.models import ModelSpec, build_model
    from tinymim.robustness import evaluate_robustness

    root = real_format_folder(tmp_path / "data")
    val = eval_tensors(get_config("finetune", profile="smoke", overrides={"data": str(root)}), "val")
    assert val.images.shape == (12, 3, 32, 32) and val.classes == ["cat", "dog", "owl"] and len(val.paths) == 12
    model = build_model(ModelSpec.create("micro_tiny", num_classes=3))
    cfg = get_config("robustness", profile="smoke", overrides={"data": str(root), "corruptions": ["fog"],
                                                               "severities": [1, 2]})
    res = evaluate_robustness(model, cfg, device="cpu")["synthetic_c"]
    assert res["images"] == 12 and set(res["errors"]["fog"]) == {1, 2} and "folders" in res["data"]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["folder", "digits"])
def test_tinymim_run_on_real_images_runs_01_to_07_and_says_which_data(data, tmp_path, monkeypatch):
    """`tinymim run --data ROOT|digits` at the tiny profile: every notebook, 04 skipped with its
    reason, the explorer and FiftyOne on the data's own images, the report naming the data."""
    from tinymim.__main__ import main

    monkeypatch.delenv("TINYMIM_RUN_DIR", raising=False)
    root = str(real_format_folder(tmp_path / "data", n_train=12)) if data == "folder" else "digits"
    out = tmp_path / "run"
    assert main(["run", "--profile", "tiny", "--data", root, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"01_models", "02_distill_pretrain", "03_finetune", "04_segmentation", "05_robustness",
                            "06_explore"}
    assert "has no masks" in metrics["04_segmentation"]["skipped"]
    assert metrics["03_finetune"]["data"]["data"] == (root if data == "digits" else str(tmp_path / "data"))
    assert metrics["03_finetune"]["labelled_images"] == (36 if data == "folder" else 128)  # tiny data_limit 128
    assert metrics["06_explore"]["fiftyone"]["samples"] > 0
    report = (out / "REPORT.md").read_text()
    named = "the image folders at" if data == "folder" else "scikit-learn's handwritten digits"
    assert f"Data: {named}" in report and "no masks in this data (04 skipped)" in report
    assert json.loads((out / "run.json").read_text())["data"] == (root if data == "digits" else str(tmp_path / "data"))
    with pytest.raises(DataError, match="holds a run on"):  # one run directory, one dataset
        from tinymim.pipeline import layout

        layout(out, "tiny", "synthetic")


def test_a_run_directory_holds_one_dataset(tmp_path):
    from tinymim.pipeline import layout

    run = layout(tmp_path / "run", "smoke")
    assert run.data == "synthetic" and json.loads((run.root / "run.json").read_text()) == {"data": "synthetic"}
    assert run.on({"steps": 3}) == {"data": "synthetic", "steps": 3}
    assert layout(tmp_path / "run", "smoke").data == "synthetic"  # a later notebook without `data`
    with pytest.raises(DataError, match="holds a run on synthetic, not digits"):
        layout(tmp_path / "run", "smoke", "digits")
    root = real_format_folder(tmp_path / "data")
    mine = layout(tmp_path / "mine", "smoke", str(root))
    assert layout(tmp_path / "mine", "smoke").data == str(root.resolve()) == mine.data
    assert layout(tmp_path / "paper", "paper").data is None  # paper: each stage's preset folder
