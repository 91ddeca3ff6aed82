import numpy as np
import pytest
import torch
from PIL import Image

from tinymim.checkpoints import save_model
from tinymim.data import MemoryImages, Segment
from tinymim.evaluation import confusion_matrix
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config
from tinymim.segmentation import (
    ViTUperNet,
    build_segmenter,
    infer_slide,
    infer_whole,
    segmentation_metrics,
    train_segmentation,
)


@pytest.mark.parametrize("arch, dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_adapter_strides_and_channels(arch, dim):
    torch.manual_seed(0)
    model = ViTUperNet(build_model(ModelSpec.create(arch, img_size=64), dynamic_img_size=True), (3, 5, 7, 11), num_classes=5, channels=32)
    x = torch.randn(1, 3, 64, 96)
    feats = []
    model.adapter.register_forward_hook(lambda m, i, o: feats.extend(o))
    logits, aux = model.eval()(x)
    assert [f.shape[1] for f in feats] == [dim] * 4
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert logits.shape == (1, 5, 16, 24) and aux.shape == (1, 5, 4, 6)


def test_miou_from_a_hand_made_confusion_matrix():
    pred = torch.tensor([[0, 0, 1, 1], [1, 1, 3, 3]])
    gt = torch.tensor([[0, 1, 1, 255], [1, 1, 255, 3]])  # 255 ignored; class 2 absent from both
    conf = confusion_matrix(pred, gt, num_classes=4)
    assert conf.tolist() == [[1, 0, 0, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    # IoU: a = 1/(1+1) = .5, b = 3/(3+1) = .75, c absent -> excluded, d = 1/1
    assert m["per_class_IoU"] == {"a": 50.0, "b": 75.0, "c": None, "d": 100.0}
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0.75 + 1.0) / 3)
    assert m["aAcc"] == pytest.approx(100 * 5 / 6)


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    torch.manual_seed(0)
    model = ViTUperNet(build_model(ModelSpec.create("micro_tiny"), dynamic_img_size=True), (0, 1, 2, 3), 4, channels=16).eval()
    x = torch.randn(1, 3, 32, 48)
    assert torch.allclose(infer_slide(model, x, window=48, stride=32), infer_whole(model, x), atol=1e-6)
    # overlapping windows still cover every pixel once or more, and keep the shape
    assert infer_slide(model, torch.randn(1, 3, 40, 56), window=32, stride=21).shape == (1, 4, 40, 56)


def test_pretrained_backbone_loads_with_interpolated_pos_embed(tmp_path):
    torch.manual_seed(0)
    enc = build_model(ModelSpec.create("micro_tiny", last_heads=6))
    path = save_model(enc, tmp_path / "student.pth")
    cfg = get_config("segmentation", "micro_tiny", "smoke", {"pretrained": str(path), "input_size": "64"})
    model = build_segmenter(cfg)
    assert model.backbone.pos_embed.shape == (1, 1 + 64, 96)
    assert torch.equal(model.backbone.blocks[1].attn.qkv.weight, enc.blocks[1].attn.qkv.weight)
    assert model.backbone.blocks[-1].attn.num_heads == 6


def _one(image: np.ndarray, mask: torch.Tensor) -> MemoryImages:
    return MemoryImages(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(), masks=mask[None])


def test_ade20k_recipe_pads_a_small_image(monkeypatch):
    img = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    mask = torch.randint(0, 5, (60, 80))
    monkeypatch.setattr("random.random", lambda: 0.9)  # no flip
    # ratio 0.5 of scale (80, 60): the image becomes 30 x 40, smaller than the 64 crop
    recipe = Segment(crop=64, scale=(80, 60), ratio=(0.5, 0.5))
    sample = recipe.host(_one(img, mask), 0)
    x, m = recipe.device({k: v[None] for k, v in sample.items()}, torch.device("cpu"))
    x, m = x[0], m[0]
    assert x.shape == (3, 64, 64) and m.shape == (64, 64)
    assert (x[:, 30:] == 0).all() and (x[:, :, 40:] == 0).all()  # image padded with zeros after normalising
    assert (m[30:] == 255).all() and (m[:, 40:] == 255).all()  # mask padded with the ignore label
    assert torch.equal(m[:30, :40], mask[::2, ::2])  # nearest resize of the mask, no crop offset
    assert set(m.unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_ade20k_recipe_retries_a_crop_that_one_class_dominates(monkeypatch):
    mask = torch.ones(200, 200, dtype=torch.long)
    mask[:60, :60] = 2  # only crops near the top-left corner hold two classes in a fair share
    positions = iter([150, 150, 100, 100, 0, 0])  # randint draws (y, x): two crops of pure class 1, then (0, 0)
    draws = []
    monkeypatch.setattr("random.randint", lambda a, b: draws.append((a, b)) or next(positions))
    monkeypatch.setattr("random.random", lambda: 0.9)
    m = Segment(crop=100, scale=(200, 200), ratio=(1.0, 1.0)).host(_one(np.zeros((200, 200, 3), np.uint8), mask), 0)["mask"]
    assert len(draws) == 6  # the first two crops were refused
    assert torch.equal(m, mask[:100, :100]) and (m == 2).float().mean() == 0.36


@pytest.mark.slow  # whole notebooks or studies: `make test`, not `make unit`
def test_segmentation_trains_end_to_end_on_synthetic(tmp_path):
    cfg = get_config("segmentation", "micro_tiny", "smoke",
                     {"steps": "3", "warmup_steps": "1", "batch_size": "8", "data_limit": "32", "log_every": "1"})
    model, metrics = train_segmentation(cfg, tmp_path, progress=False)
    assert len(metrics["per_class_IoU"]) == 11 and (tmp_path / "model.pth").exists()
    # the same number by hand: sliding inference on the val split, IoU per class, nan-mean
    from tinymim.data import synthetic
    from tinymim.data.transforms import normalize

    val = synthetic("val", cfg)
    pred = infer_slide(model.eval(), normalize(val.images), cfg.input_size, cfg.slide_stride).argmax(1)
    ious = []
    for c in range(11):
        inter = ((pred == c) & (val.masks == c)).sum().item()
        union = ((pred == c) | (val.masks == c)).sum().item()
        if union:
            ious.append(inter / union)
    assert metrics["mIoU"] == pytest.approx(100 * sum(ious) / len(ious), abs=1e-6)


def test_layer_decay_reaches_backbone_only():
    from tinymim.engine import build_optimizer

    cfg = get_config("segmentation", "micro_tiny", "smoke", {"layer_decay": "0.5"})
    model = build_segmenter(cfg)
    opt = build_optimizer(model, cfg, layer_decay=cfg.layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["decode.classify.weight"] == scale["adapter.up2.weight"] == scale["aux.conv.0.weight"] == 1.0
    assert scale["backbone.blocks.3.mlp.fc1.weight"] == 0.5 and scale["backbone.blocks.0.mlp.fc1.weight"] == 0.5 ** 4
    assert scale["backbone.patch_embed.proj.weight"] == scale["backbone.pos_embed"] == 0.5 ** 5  # pos_embed trains
    assert "backbone.norm.weight" not in scale  # never reached by the loss: frozen (DDP needs every parameter used)


def test_majority_baseline_is_reported():
    from tinymim.segmentation import evaluate_segmentation

    cfg = get_config("segmentation", "micro_tiny", "smoke")
    model = build_segmenter(cfg)
    m = evaluate_segmentation(model, cfg, limit=50)
    assert 0 < m["majority_class_mIoU"] < 100 / cfg.num_classes * 1.5


def _write_ade_validation(root):
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    for n in ("a", "b"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "images" / "validation" / f"{n}.jpg")
        Image.fromarray(np.array([[0, 1, 2, 150] * 2] * 6, np.uint8)).save(root / "annotations" / "validation" / f"{n}.png")


class _AlwaysClassOne(torch.nn.Module):
    """Predicts class 1 everywhere, at a quarter of the input resolution (as UperNet)."""

    backbone = build_model(ModelSpec.create("micro_tiny"))

    def forward(self, x):
        logits = torch.zeros(len(x), 150, x.shape[2] // 4, x.shape[3] // 4)
        logits[:, 1] = 1
        return logits, logits


def test_ade20k_whole_image_evaluation_by_hand(tmp_path):
    from tinymim.segmentation import evaluate_segmentation

    _write_ade_validation(tmp_path)
    cfg = get_config("segmentation", "micro_tiny", "smoke", {"data": str(tmp_path), "num_classes": "150",
                                                              "reduce_zero_label": "true"})
    m = evaluate_segmentation(_AlwaysClassOne(), cfg, mode="whole")
    # raw 0,1,2,150 -> ignored, 0, 1, 149: per image 12 px each of classes 0, 1 and 149, all predicted 1
    assert m["per_class_IoU"]["wall"] == 0.0 and m["per_class_IoU"]["flag"] == 0.0
    assert m["per_class_IoU"]["building"] == pytest.approx(100 / 3)  # 24 / (72 + 24 - 24)
    assert m["mIoU"] == pytest.approx(100 / 9) and m["aAcc"] == pytest.approx(100 / 3)


# ---------------------------------------------------------------------------------
# the release's segmenter (OliverRensu/TinyMIM, Segmentation/): backbone, head, loss, init


def test_the_backbone_gets_the_releases_relative_position_bias_and_layer_scale(tmp_path):
    """From an MAE/TinyMIM encoder checkpoint: every block gets a zero-initialised, trainable
    relative position bias and layer scales of 1 (ViT-B: 36 tensors), and those are the only
    keys the checkpoint does not provide -- everything the release loads is loaded."""
    from tinymim.checkpoints import SEGMENTATION_ONLY, load_encoder, open_checkpoint

    torch.manual_seed(0)
    enc = build_model(ModelSpec.create("vit_base", img_size=64))
    path = save_model(enc, tmp_path / "mae.pth")
    cfg = get_config("segmentation", "vit_base", "smoke", {"pretrained": str(path), "input_size": 64,
                                                            "channels": 16, "aux_channels": 8,
                                                            "out_indices": [3, 5, 7, 11]})
    backbone = build_segmenter(cfg).backbone
    added = [n for n, p in backbone.named_parameters() if "relative_position_bias_table" in n or ".gamma" in n]
    assert len(added) == 36 and all(backbone.get_parameter(n).requires_grad for n in added)
    assert all((backbone.get_parameter(n) == (1.0 if n.endswith("gamma") else 0.0)).all() for n in added)
    table = backbone.blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 4 - 1) ** 2 + 3, 12)  # a 4 x 4 grid at 64 px, cls <-> token entries
    fresh = load_encoder(backbone, open_checkpoint(path), allow_missing=SEGMENTATION_ONLY)
    assert sorted(fresh) == sorted(added)
    assert torch.equal(backbone.blocks[5].attn.qkv.weight, enc.blocks[5].attn.qkv.weight)
    assert torch.equal(backbone.pos_embed, enc.pos_embed)  # the absolute embedding is kept, as the release
    # the bias acts: a nonzero table changes the features; off, the backbone is the plain ViT
    x = torch.randn(1, 3, 64, 64)
    plain = build_segmenter(replace_cfg(cfg, rel_pos_bias=False, layer_scale=None)).backbone.eval()
    assert torch.allclose(plain.forward_features(x), backbone.eval().forward_features(x), atol=1e-5)
    with torch.no_grad():
        table.normal_()
    assert not torch.allclose(plain.forward_features(x), backbone.forward_features(x), atol=1e-3)


def replace_cfg(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_the_relative_position_bias_follows_the_grid_in_whole_image_inference():
    torch.manual_seed(0)
    cfg = get_config("segmentation", "micro_tiny", "smoke")
    model = build_segmenter(cfg).eval()
    with torch.no_grad():
        for blk in model.backbone.blocks:
            blk.attn.relative_position_bias_table.normal_()
    logits, _ = model(torch.randn(1, 3, 32, 56))  # a 4 x 7 grid, not the 4 x 4 training window
    assert logits.shape == (1, 11, 16, 28) and torch.isfinite(logits).all()  # patch 8: logits at half the input
    assert model.backbone.blocks[0].attn.position_bias().shape == (3, 1 + 28, 1 + 28)


def test_the_loss_averages_over_all_pixels_as_mmseg():
    """mmseg 0.x: per-pixel CE summed over the labelled pixels, divided by all pixels."""
    from tinymim.segmentation import pixel_loss

    torch.manual_seed(0)
    logits, masks = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
    masks[:, :4] = 255  # half the pixels ignored
    per_pixel = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255, reduction="none")
    assert torch.isclose(pixel_loss(logits, masks), per_pixel[masks != 255].sum() / masks.numel())
    assert pixel_loss(logits, masks) < torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)


def test_heads_are_initialised_as_mmseg():
    torch.manual_seed(0)
    model = build_segmenter(get_config("segmentation", "vit_small", "paper", {"input_size": 64, "slide_stride": 32}))
    assert model.decode.classify.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert (model.decode.classify.bias == 0).all() and (model.aux.classify.bias == 0).all()
    fuse = model.decode.fuse[0].weight  # kaiming normal, fan_out, relu: std sqrt(2 / (out x 3 x 3))
    assert fuse.std().item() == pytest.approx((2 / (fuse.shape[0] * 9)) ** 0.5, rel=0.05)
    assert model.decode.fuse[1].weight.eq(1).all() and model.decode.fuse[1].bias.eq(0).all()


def test_the_releases_tinymim_star_t_segmenter(tmp_path):
    """Segmentation/TinyMIMstar-T: class + distillation tokens, 12 heads, LN + Linear(192 -> 1280)
    + GELU on the last block only, and its own pyramid into a 768-wide UPerHead (11.3 M
    adapter parameters, not the B adapter at 1280)."""
    torch.manual_seed(0)
    star = build_model(ModelSpec.create("tinymim_star_tiny", num_classes=10, extra_fc=1280, dist_token=True, img_size=64))
    path = save_model(star, tmp_path / "star.pth")
    cfg = get_config("segmentation", "tinymim_star_tiny", "paper", {"pretrained": str(path), "input_size": 64,
                                                                     "slide_stride": 32})
    assert cfg.channels == 768 and cfg.layer_decay == 0.8  # the release's *-T config
    seg = build_segmenter(cfg)
    b = seg.backbone
    assert b.num_prefix_tokens == 2 and torch.equal(b.dist_token, star.dist_token)
    assert torch.equal(b.pos_embed, star.pos_embed) and [blk.attn.num_heads for blk in b.blocks] == [12] * 12
    assert b.blocks[0].attn.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2 + 6, 12)
    shapes = {n: tuple(p.shape) for n, p in seg.adapter.named_parameters() if n.endswith("weight")}
    assert shapes == {"up4.0.weight": (192, 384, 2, 2), "up4.1.weight": (384,), "up4.3.weight": (384, 768, 2, 2),
                      "up2.weight": (192, 768, 2, 2), "keep.weight": (768, 192, 1, 1), "down2.weight": (768, 1280, 3, 3)}
    params = sum(p.numel() for m in (seg.adapter, seg.widen) for p in m.parameters())
    assert params / 1e6 == pytest.approx(11.3, abs=0.05)
    logits, aux = seg.eval()(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 150, 16, 16) and aux.shape == (1, 150, 4, 4)
