"""TinyMIM's distillation targets and losses: the Q-K / V-V relation KL of the paper,
plus the feature and class-token targets and student-input masking of its ablations.

The q/k/v capture these targets are computed from lives in `attention.py`.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .attention import block_qkv, relation_logits, tokens_before

# ---------------------------------------------------------------------------------
# TinyMIM targets and losses


def kl_from_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the last (key) axis, averaged over every other axis
    (batch, heads, queries); from log-softmax, in fp32, for numerical safety."""
    t = teacher_logits.float().log_softmax(dim=-1)
    s = student_logits.float().log_softmax(dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean()


def default_teacher_block(teacher: VisionTransformer) -> int:
    """docs/method.md: block 18 of a 24-block ViT-L teacher, otherwise the last block."""
    depth = len(teacher.blocks)
    return 18 if depth == 24 else depth


def check_pairing(student: VisionTransformer, teacher: VisionTransformer, teacher_block: int, target: str) -> None:
    """Fail before any compute on combinations that cannot be distilled."""
    depth = len(teacher.blocks)
    if not 1 <= teacher_block <= depth:
        raise ValueError(f"teacher_block {teacher_block} is out of range: the teacher has blocks 1..{depth}")
    t_tokens = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
    s_tokens = student.patch_embed.num_patches + student.num_prefix_tokens
    if t_tokens != s_tokens:
        raise ValueError(f"relation maps differ in size: teacher has {t_tokens} tokens "
                         f"({teacher.patch_embed.grid_size} grid), student {s_tokens} "
                         f"({student.patch_embed.grid_size}); use the same input and patch size")
    if target == "relation":
        t_heads = teacher.blocks[teacher_block - 1].attn.num_heads
        s_heads = student.blocks[-1].attn.num_heads
        if t_heads != s_heads:
            raise ValueError(f"head alignment: the student's last block has {s_heads} heads, the teacher's "
                             f"block {teacher_block} has {t_heads}; build the student with last_heads={t_heads}")


class Distiller(nn.Module):
    """TinyMIM distillation task: forward(student_view, teacher_view) -> (loss, parts).

    target='relation' (the paper): Q-K and V-V relations of the teacher's block
    `teacher_block` and the student's last block, KL per head, loss = QK + VV
    (`relations` picks one alone: the paper's Q-K / V-V ablation).
    target='feature': smooth-L1 to the teacher block's output tokens (linear projection
    when widths differ); target='cls': the same on the class token alone -- the paper's
    ablations. `mask_ratio` > 0 drops that share of the student's patch tokens (the
    masking ablation); the teacher's targets are restricted to the kept tokens.
    The teacher runs only up to its target block, in inference mode; the student stops
    after the target attention (relations) or its last block (feature, class token), so what
    lies beyond never trains here -- and is frozen, because DDP requires every parameter it
    sees to take part in the loss.
    """

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer, teacher_block: int | None = None,
                 target: str = "relation", mask_ratio: float = 0.0, relations: tuple[str, ...] = ("qk", "vv")):
        super().__init__()  # target, relations: one of config.TARGETS, a subset of config.RELATIONS (checked there)
        self.relations = tuple(sorted(set(relations)))
        self.teacher_block = teacher_block or default_teacher_block(teacher)
        check_pairing(student, teacher, self.teacher_block, target)
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.target, self.mask_ratio = target, mask_ratio
        self.proj: nn.Module | None = None
        if target != "relation":  # feature targets use the full last block output
            widths_differ = student.embed_dim != teacher.embed_dim
            self.proj = nn.Linear(student.embed_dim, teacher.embed_dim) if widths_differ else nn.Identity()
            student.norm.requires_grad_(False)  # the targets are the block's output, before any final norm
        else:
            # stops after the target attention: these never receive gradient
            for m in (student.blocks[-1].attn.proj, student.blocks[-1].ls1, student.blocks[-1].norm2,
                      student.blocks[-1].mlp, student.blocks[-1].ls2, student.norm):
                m.requires_grad_(False)

    frozen_modules = ("teacher",)  # the engine neither optimises nor checkpoints it

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # frozen teacher: no dropout / drop path, ever
        return self

    def no_weight_decay(self) -> set[str]:
        """The fixed position embedding only: the release decays the class token (MAE's
        `add_weight_decay` spares 1-D tensors and biases, and nothing else)."""
        return {"student.pos_embed"}

    def _keep_index(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.mask_ratio <= 0:
            return None
        n = self.student.patch_embed.num_patches
        keep = max(1, int(n * (1 - self.mask_ratio)))
        idx = torch.rand(batch, n, device=device).argsort(dim=1)[:, :keep].sort(dim=1).values
        prefix = torch.arange(self.student.num_prefix_tokens, device=device).expand(batch, -1)
        return torch.cat([prefix, idx + self.student.num_prefix_tokens], dim=1)

    def _teacher_targets(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            x = tokens_before(self.teacher, images, self.teacher_block)
            blk = self.teacher.blocks[self.teacher_block - 1]
            if self.target == "relation":
                q, k, v = block_qkv(blk, x)
                pairs = {"qk": (q, k), "vv": (v, v)}
                out = {name: relation_logits(*pairs[name]) for name in self.relations}
            else:
                out = {"tokens": blk(x)}
        return {k: v.clone() for k, v in out.items()}  # leave inference mode: usable in autograd

    def forward(self, student_view: torch.Tensor, teacher_view: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Normalised views (`data.augment.Views`): the student's jittered, the teacher's not."""
        targets = self._teacher_targets(teacher_view)
        keep = self._keep_index(student_view.shape[0], student_view.device)
        s = self.student
        x = s._pos_embed(s.patch_embed(student_view))
        if keep is not None:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = s.norm_pre(x)
        for blk in s.blocks[:-1]:
            x = blk(x)
        if self.target == "relation":
            q, k, v = block_qkv(s.blocks[-1], x)
            pairs = {"qk": (q, k), "vv": (v, v)}
            parts = {}
            for name in self.relations:
                t = targets[name] if keep is None else _gather_square(targets[name], keep)
                parts[name] = kl_from_logits(t, relation_logits(*pairs[name]))
            return sum(parts.values()), {f"loss_{name}": loss.detach() for name, loss in parts.items()}
        feats = self.proj(s.blocks[-1](x))
        t = targets["tokens"]
        if keep is not None:
            t = t.gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        if self.target == "cls":
            feats, t = feats[:, 0], t[:, 0]
        loss = nn.functional.smooth_l1_loss(feats.float(), t.float())
        return loss, {f"loss_{self.target}": loss.detach()}


def _gather_square(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows and columns `keep` of B x H x N x N relation logits."""
    b, h, _, _ = t.shape
    idx = keep[:, None, :, None].expand(b, h, -1, t.shape[-1])
    t = t.gather(2, idx)
    idx = keep[:, None, None, :].expand(b, h, t.shape[2], -1)
    return t.gather(3, idx)


# ---------------------------------------------------------------------------------
# an opt-in lower-precision teacher

def quantize_teacher(teacher: VisionTransformer, mode: str, device: torch.device) -> VisionTransformer:
    """The frozen teacher's linear layers in lower precision: `int8` = dynamic int8
    activations x int8 weights (on a CPU PyTorch's own fbgemm kernels, on a GPU torchao's;
    speed and deviation in BENCHMARKS.md), `fp8` = torchao's dynamic float8
    (GPUs of compute capability 8.9+). Opt-in only: the teacher's rounding reaches the
    targets, so the loss deviates from the fp32 teacher's -- `tinymim bench distill
    --teacher-quant MODE` measures by how much, and the speed of the step."""
    if mode == "none":  # modes: config.TEACHER_QUANT (checked there)
        return teacher
    if mode == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            raise ValueError(f"teacher_quant=fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"this run's device is {device}"
                             + (f" (capability {capability[0]}.{capability[1]})" if capability else "")
                             + "; use teacher_quant=int8 or none")
    teacher = teacher.to(device).eval().requires_grad_(False)
    if mode == "int8" and device.type == "cpu":
        import warnings

        with warnings.catch_warnings():  # torch.ao's deprecation notice: torchao has no fast CPU int8 path yet
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(teacher, {nn.Linear}, dtype=torch.qint8, inplace=True)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        quantize_,
    )

    quantize_(teacher, Float8DynamicActivationFloat8WeightConfig() if mode == "fp8"
              else Int8DynamicActivationInt8WeightConfig())
    return teacher
