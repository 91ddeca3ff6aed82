import copy

import pytest
import torch

from tinymim.config import ConfigError
from tinymim.distill import Distiller, _gather_square, check_pairing, default_teacher_block, quantize_teacher
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config
from tinymim.pretrain import build_student


def _pair(teacher_arch="micro_base", student_arch="micro_tiny"):
    torch.manual_seed(0)
    teacher = build_model(ModelSpec.create(teacher_arch))
    student = build_student(get_config("pretrain", student_arch, "smoke", {"drop_path": "0"}),
                            teacher.blocks[-1].attn.num_heads)
    return student, teacher


def _explicit_relations(model, x, block):
    """Straight from the definition, with explicit matrices: no timm forward, no sdpa."""
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], 1) + model.pos_embed
    for blk in model.blocks[: block - 1]:
        h = blk.norm1(tokens)
        b, n, d = h.shape
        heads = blk.attn.num_heads
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1)
        tokens = tokens + blk.attn.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        tokens = tokens + blk.mlp(blk.norm2(tokens))
    blk = model.blocks[block - 1]
    h = blk.norm1(tokens)
    b, n, d = h.shape
    heads = blk.attn.num_heads
    q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    dh = d // heads
    return torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5, -1), torch.softmax(v @ v.transpose(-1, -2) / dh ** 0.5, -1)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.mark.parametrize("teacher_block", [6, 4])
def test_loss_equals_explicit_computation(teacher_block):
    student, teacher = _pair()  # every teacher block has 6 heads: the last and an intermediate one
    d = Distiller(student, teacher, teacher_block)
    d.eval()
    xs, xt = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    loss, parts = d(xs, xt)
    t_qk, t_vv = _explicit_relations(teacher, xt, teacher_block)
    s_qk, s_vv = _explicit_relations(student, xs, len(student.blocks))
    assert parts["loss_qk"].item() == pytest.approx(_kl(t_qk, s_qk).item(), abs=1e-5)
    assert parts["loss_vv"].item() == pytest.approx(_kl(t_vv, s_vv).item(), abs=1e-5)
    assert loss.item() == pytest.approx((_kl(t_qk, s_qk) + _kl(t_vv, s_vv)).item(), abs=1e-5)


def test_one_relation_alone_is_that_part_of_the_full_loss():
    """The Q-K / V-V ablation: each alone is exactly its term of the paper's loss."""
    student, teacher = _pair()
    xs, xt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    full, parts = Distiller(student, teacher).eval()(xs, xt)
    for name in ("qk", "vv"):
        loss, alone = Distiller(student, teacher, relations=(name,)).eval()(xs, xt)
        assert set(alone) == {f"loss_{name}"} and loss.item() == pytest.approx(parts[f"loss_{name}"].item(), abs=1e-6)
    with pytest.raises(ConfigError, match="relations"):  # checked once, in the config
        get_config("pretrain", overrides={"relations": "qk,kq"})
    assert get_config("pretrain", overrides={"relations": "vv"}).relations == ("vv",)


def test_int8_teacher_stays_close_and_fp8_needs_a_recent_gpu():
    student, teacher = _pair()
    xs, xt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    full = Distiller(student, teacher).eval()(xs, xt)[0].item()
    low_teacher = quantize_teacher(copy.deepcopy(teacher), "int8", torch.device("cpu"))
    low = Distiller(student, low_teacher).eval()(xs, xt)[0].item()
    assert low != full and abs(low - full) / full < 0.05
    assert quantize_teacher(teacher, "none", torch.device("cpu")) is teacher
    with pytest.raises(ValueError, match="compute capability 8.9"):
        quantize_teacher(copy.deepcopy(teacher), "fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="teacher_quant"):
        get_config("pretrain", overrides={"teacher_quant": "int4"})


def test_loss_is_zero_for_a_copy_of_the_teacher():
    torch.manual_seed(0)
    teacher = build_model(ModelSpec.create("micro_tiny"))
    student = build_model(ModelSpec.create("micro_tiny"))
    student.load_state_dict(teacher.state_dict())
    d = Distiller(student, teacher).eval()
    x = torch.randn(2, 3, 32, 32)
    loss, _ = d(x, x)
    assert abs(loss.item()) < 1e-6


def test_gradients_reach_only_what_trains():
    student, teacher = _pair()
    d = Distiller(student, teacher)
    loss, _ = d(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    last = student.blocks[-1]
    for m in (last.attn.proj, last.mlp, last.norm2, student.norm):
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    for p in (last.attn.qkv.weight, last.norm1.weight, student.blocks[0].mlp.fc1.weight,
              student.patch_embed.proj.weight, student.cls_token):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert student.pos_embed.grad is None  # fixed sin-cos


def test_head_alignment_and_truncated_teacher():
    student, teacher = _pair()
    assert student.blocks[-1].attn.num_heads == teacher.blocks[-1].attn.num_heads == 6
    assert [b.attn.num_heads for b in student.blocks[:-1]] == [3, 3, 3]
    calls = [0] * len(teacher.blocks)
    for i, blk in enumerate(teacher.blocks):
        blk.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    teacher.norm.register_forward_hook(lambda *_: pytest.fail("teacher norm ran"))
    d = Distiller(student, teacher, teacher_block=3)
    d(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert calls == [1, 1, 0, 0, 0, 0]  # blocks 1-2 run; block 3 only its norm1 + qkv
    assert default_teacher_block(build_model(ModelSpec.create("vit_large"))) == 18


def test_impossible_pairings_fail_before_compute():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="out of range"):
        check_pairing(student, teacher, 7, "relation")
    misaligned = build_model(ModelSpec.create("micro_tiny"))  # 3-head last block vs 6
    with pytest.raises(ValueError, match="head alignment"):
        Distiller(misaligned, teacher)
    other_grid = build_model(ModelSpec.create("micro_base", img_size=64))
    with pytest.raises(ValueError, match="relation maps differ"):
        Distiller(student, other_grid)
    with pytest.raises(ValueError, match="does not divide"):
        ModelSpec.create("micro_tiny", last_heads=5)


@pytest.mark.parametrize("target", ["feature", "cls"])
def test_ablation_targets_train(target):
    student, teacher = _pair()
    d = Distiller(student, teacher, target=target)
    loss, parts = d(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    loss.backward()
    assert f"loss_{target}" in parts and d.proj.weight.grad is not None
    assert student.blocks[-1].mlp.fc1.weight.grad is not None


def test_student_masking_keeps_ratio_and_aligns_targets():
    student, teacher = _pair()
    d = Distiller(student, teacher, mask_ratio=0.5)
    keep = d._keep_index(2, torch.device("cpu"))
    assert keep.shape == (2, 1 + 8) and (keep[:, 0] == 0).all()
    assert all(len(set(k.tolist())) == 9 and k.tolist() == sorted(k.tolist()) for k in keep)
    t = torch.randn(2, 6, 17, 17)
    explicit = torch.stack([t[b][:, keep[b]][:, :, keep[b]] for b in range(2)])
    assert torch.equal(_gather_square(t, keep), explicit)  # rows and columns of the kept tokens
    # the masked loss equals the unmasked loss computed on the kept tokens only
    xs, xt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    _, parts = d(xs, xt)
    torch.manual_seed(5)
    keep = d._keep_index(2, torch.device("cpu"))
    t_qk, _ = _explicit_relations(teacher, xt, 6)
    s = student
    x = s._pos_embed(s.patch_embed(xs)).gather(1, keep[..., None].expand(-1, -1, 96))
    for blk in s.blocks[:-1]:
        x = blk(x)
    from tinymim.attention import block_qkv, relation_logits

    q, k, _ = block_qkv(s.blocks[-1], x)
    s_qk = relation_logits(q, k).softmax(-1)
    t_kept = torch.stack([t_qk[b][:, keep[b]][:, :, keep[b]] for b in range(2)])
    t_kept = t_kept / t_kept.sum(-1, keepdim=True)  # the teacher's logits restricted, renormalised
    assert parts["loss_qk"].item() == pytest.approx(_kl(t_kept, s_qk).item(), abs=1e-5)
