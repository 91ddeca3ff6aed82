import numpy as np
import pytest
import torch
from PIL import Image

from tinymim.data import ADE20K, DataError, ImageNetFolder, SyntheticShapes, SyntheticSpec, reduce_zero_label
from tinymim.data.synthetic import render

SPEC = SyntheticSpec(image_size=32)


def test_synthetic_is_deterministic_and_splits_differ():
    a = render(SPEC, 0, "train", 7)
    b = render(SPEC, 0, "train", 7)
    c = render(SPEC, 0, "val", 7)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_synthetic_labels_masks_and_clutter(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMIM_CACHE", str(tmp_path))
    ds = SyntheticShapes(SPEC, "train", 300)
    assert ds.images.shape == (300, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.masks.shape == (300, 32, 32)
    # every class occurs; the main object's class is the largest labelled region
    assert set(ds.labels.tolist()) == set(range(10))
    areas = torch.stack([(ds.masks == k + 1).flatten(1).sum(1) for k in range(10)], 1)
    assert (areas.argmax(1) == ds.labels).float().mean() > 0.9
    # clutter: most images hold more than one object class
    n_kinds = torch.stack([(areas[:, k] > 0) for k in range(10)], 1).sum(1)
    assert (n_kinds > 1).float().mean() > 0.5
    # background is not flat
    bg = ds.masks == 0
    assert ds.images.float().permute(1, 0, 2, 3)[:, bg].std() > 20
    # the cache is reused and identical
    again = SyntheticShapes(SPEC, "train", 300)
    assert torch.equal(again.images, ds.images) and len(list(tmp_path.rglob("*.npz"))) == 1


def _write_image_folder(root, classes, n=2, size=20):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), i * 40, np.uint8)).save(root / c / f"{c}_{i}.JPEG")


def test_imagenet_folder_order_and_corrupt_file(tmp_path):
    _write_image_folder(tmp_path, ["n02", "n01", "n03"])
    ds = ImageNetFolder(tmp_path)
    assert ds.classes == ["n01", "n02", "n03"] and ds[0][1] == 0
    bad = tmp_path / "n02" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = ImageNetFolder(tmp_path)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.JPEG")][0]
    with pytest.raises(DataError, match="broken.JPEG"):
        ds[idx]
    with pytest.raises(DataError, match="not found"):
        ImageNetFolder(tmp_path / "missing")


def _write_ade(root, names, with_ann=True):
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    for n in names:
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / "training" / f"{n}.jpg")
        if with_ann:
            ann = np.array([[0, 1, 2, 150] * 2] * 6, np.uint8)
            Image.fromarray(ann).save(root / "annotations" / "training" / f"{n}.png")


def test_ade20k_reduce_zero_label(tmp_path):
    _write_ade(tmp_path, ["ADE_train_00000001"])
    img, mask = ADE20K(tmp_path)[0]
    assert img.shape == (3, 6, 8) and mask.shape == (6, 8)
    assert mask[0, :4].tolist() == [255, 0, 1, 149]
    assert reduce_zero_label(torch.tensor([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]


def test_ade20k_image_without_annotation_fails_at_construction(tmp_path):
    _write_ade(tmp_path, ["a"])
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "images" / "training" / "b.jpg")
    with pytest.raises(DataError, match=r"b\.jpg: no annotation"):
        ADE20K(tmp_path)


def test_data_limit_on_a_sorted_folder_is_a_stratified_subset_that_names_missing_classes(tmp_path):
    """A folder lists its files class by class: the first N would be one or two classes (issue:
    both arms at one class's share of val, silently). data_limit draws per class instead."""
    from types import SimpleNamespace

    from tinymim.data import train_source

    _write_image_folder(tmp_path / "train", ["ant", "bee", "cat"], n=6)
    cfg = SimpleNamespace(data=str(tmp_path), data_limit=9, data_seed=0, input_size=16)
    subset = train_source(cfg)
    assert sorted(subset.target(i) for i in range(len(subset))) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert subset.record["per_class"] == {"ant": 3, "bee": 3, "cat": 3} and subset.record["of"] == 18
    again = train_source(cfg)
    assert [again.target(i) for i in range(9)] == [subset.target(i) for i in range(9)]  # seeded by data_seed
    other = train_source(SimpleNamespace(data=str(tmp_path), data_limit=9, data_seed=1, input_size=16))
    assert other.indices != subset.indices
    with pytest.raises(DataError, match=r"data_limit=2 of 18 images would leave out 1 class\(es\) \['cat'\]"):
        train_source(SimpleNamespace(data=str(tmp_path), data_limit=2, data_seed=0, input_size=16))
