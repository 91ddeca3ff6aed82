import os
import pickle

import pytest
import torch

from tinymim.checkpoints import (
    CheckpointError,
    atomic_save,
    atomic_save_safetensors,
    load_teacher,
    save_model,
)
from tinymim.models import ARCHS, Arch, ModelSpec, build_model, model_spec, paper_model_specs, summary_row


def test_published_model_sizes():
    rows = {name: summary_row(name, spec) for name, spec in paper_model_specs().items() if name != "ViT-L"}
    assert rows["ViT-T"]["params_M"] == pytest.approx(5.7, abs=0.05)
    assert rows["ViT-S"]["params_M"] == pytest.approx(22.0, abs=0.1)
    assert rows["ViT-B"]["params_M"] == pytest.approx(86.6, abs=0.1)
    assert rows["ViT-T"]["GFLOPs"] == pytest.approx(1.26, abs=0.03)
    assert rows["ViT-S"]["GFLOPs"] == pytest.approx(4.6, abs=0.05)
    assert rows["ViT-B"]["GFLOPs"] == pytest.approx(17.6, abs=0.1)
    # TinyMIM*-T: same compute as ViT-T; 5.8M counts the 192->1280 FC but not the classifier
    assert rows["TinyMIM*-T"]["params_no_classifier_M"] == pytest.approx(5.8, abs=0.05)
    assert rows["TinyMIM*-T"]["GFLOPs"] == pytest.approx(1.26, abs=0.03)
    assert rows["TinyMIM*-T"]["heads"] == "12"


def test_student_last_block_takes_teacher_heads():
    spec = ModelSpec.create("vit_tiny", last_heads=12)
    m = build_model(spec)
    assert [b.attn.num_heads for b in m.blocks] == [3] * 11 + [12]
    assert m.blocks[-1].attn.head_dim == 16 and m.blocks[0].attn.head_dim == 64
    with pytest.raises(ValueError, match="does not divide"):
        ModelSpec.create("vit_tiny", last_heads=7)


def test_mae_init_sincos_pos_embed_fixed_only_when_asked():
    m = build_model(ModelSpec.create("micro_tiny"), fixed_pos_embed=True)  # MAE / the distillation student
    assert not m.pos_embed.requires_grad
    assert torch.all(m.pos_embed[0, 0] == 0)  # class-token slot is zero
    assert m.pos_embed[0, 1:].abs().max() <= 1.0
    trained = build_model(ModelSpec.create("micro_tiny"))  # fine-tuning, segmentation: trained
    assert trained.pos_embed.requires_grad and torch.equal(trained.pos_embed, m.pos_embed)


def test_a_vit_of_any_size_from_an_arch(tmp_path):
    shape = Arch(64, 2, 4, patch_size=8, img_size=32)
    spec = ModelSpec.create(shape, num_classes=7, name="my_vit")
    model = build_model(spec)
    assert model.embed_dim == 64 and len(model.blocks) == 2 and model.head.out_features == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    path = save_model(model, tmp_path / "mine.pth")  # the shape travels in the checkpoint
    from tinymim.checkpoints import load_classifier

    again = load_classifier(path, num_classes=7)
    assert model_spec(again).dims == shape and model_spec(again).arch == "my_vit"
    assert ModelSpec.from_dict(ModelSpec.create("micro_tiny").to_dict()).shape is None  # named archs stay named


def mae_state_dict(arch: str, full: bool) -> dict[str, torch.Tensor]:
    """A state dict with the official MAE key layout (models_mae.MaskedAutoencoderViT),
    written out by name rather than taken from our own model."""
    a = ARCHS[arch]
    d, f, p, n = a.embed_dim, a.ffn_dim, a.patch_size, (a.img_size // a.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, n + 1, d),
          "patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d),
          "norm.weight": torch.ones(d), "norm.bias": torch.zeros(d)}
    for i in range(a.depth):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": torch.ones(d), b + "norm1.bias": torch.zeros(d),
               b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d),
               b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
               b + "norm2.weight": torch.ones(d), b + "norm2.bias": torch.zeros(d),
               b + "mlp.fc1.weight": r(f, d), b + "mlp.fc1.bias": r(f),
               b + "mlp.fc2.weight": r(d, f), b + "mlp.fc2.bias": r(d)}
    if full:
        dd = 64
        sd |= {"mask_token": r(1, 1, dd), "decoder_pos_embed": r(1, n + 1, dd),
               "decoder_embed.weight": r(dd, d), "decoder_embed.bias": r(dd),
               "decoder_blocks.0.attn.qkv.weight": r(3 * dd, dd), "decoder_norm.weight": torch.ones(dd),
               "decoder_pred.weight": r(p * p * 3, dd), "decoder_pred.bias": r(p * p * 3)}
    return sd


@pytest.mark.parametrize("full", [False, True])
def test_official_mae_checkpoint_loads_as_teacher(tmp_path, full):
    sd = mae_state_dict("micro_base", full)
    path = tmp_path / ("mae_full.pth" if full else "mae.pth")
    torch.save({"model": sd}, path)
    t = load_teacher("micro_base", path)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert torch.equal(t.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert torch.equal(t.pos_embed, sd["pos_embed"])
    # the arch is also inferred from the weights
    assert model_spec(load_teacher(None, path)).arch == "micro_base"


def test_prefixes_and_safetensors(tmp_path):
    sd = mae_state_dict("micro_tiny", full=False)
    torch.save({"state_dict": {"module.encoder." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    assert torch.equal(load_teacher("micro_tiny", tmp_path / "ddp.pth").norm.weight, sd["norm.weight"])
    atomic_save_safetensors(sd, tmp_path / "w.safetensors")
    assert torch.equal(load_teacher("micro_tiny", tmp_path / "w.safetensors").cls_token, sd["cls_token"])


def test_pos_embed_interpolated_to_new_grid(tmp_path):
    sd = mae_state_dict("micro_tiny", full=False)  # 32 px / patch 8: 4x4 grid
    torch.save({"model": sd}, tmp_path / "m.pth")
    t = load_teacher("micro_tiny", tmp_path / "m.pth", img_size=64)  # 8x8 grid
    assert t.pos_embed.shape == (1, 65, 96)
    assert torch.equal(t.pos_embed[0, 0], sd["pos_embed"][0, 0])  # class slot kept


def test_own_checkpoint_keeps_head_layout(tmp_path):
    student = build_model(ModelSpec.create("micro_tiny", last_heads=6))
    save_model(student, tmp_path / "student.pth")
    t = load_teacher(None, tmp_path / "student.pth")
    assert [b.attn.num_heads for b in t.blocks] == [3, 3, 3, 6]
    x = torch.randn(2, 3, 32, 32)
    student.eval()
    assert torch.allclose(t.forward_features(x), student.forward_features(x))


def test_mismatch_names_keys_and_shapes(tmp_path):
    sd = mae_state_dict("micro_tiny", full=False)
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(10, 96)
    del sd["norm.bias"]
    sd["extra.thing"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_teacher("micro_tiny", tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and "norm.bias" in msg and "extra.thing" in msg
    assert "blocks.1.mlp.fc1.weight: checkpoint (10, 96) vs model (384, 96)" in msg


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TINYMIM_EVIL_MARKER']}",))


def test_pickle_with_code_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TINYMIM_EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_teacher("micro_tiny", path)
    assert not marker.exists()


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher("micro_tiny", tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_teacher("micro_tiny", tmp_path / "junk.pth")


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"a": torch.ones(2)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left


def test_timm_source_from_local_file(tmp_path):
    # timm's key layout is MAE's: save a timm model of a registered name, reload it offline
    import timm
    m = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    torch.save(m.state_dict(), tmp_path / "timm.pth")
    t = load_teacher("timm:vit_tiny_patch16_224", tmp_path / "timm.pth")
    assert torch.equal(t.cls_token, m.cls_token) and model_spec(t).arch == "vit_tiny"
    assert not any(p.requires_grad for p in t.parameters())


def test_sincos_matches_mae_reference_formula():
    import numpy as np

    from tinymim.models import sincos_pos_embed  # noqa: I001

    # MAE util/pos_embed.py, written out: meshgrid(w, h), first half from grid[0] (columns)
    dim, g = 16, 3
    grid = np.stack(np.meshgrid(np.arange(g, dtype=float), np.arange(g, dtype=float)), 0).reshape(2, 1, g, g)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    ours = sincos_pos_embed(dim, g)[0]
    assert torch.allclose(ours[0], torch.zeros(dim)) and torch.allclose(ours[1:], torch.tensor(ref).float(), atol=1e-6)
