"""`tinymim bench`: throughput of the expensive steps, against a reference measured in the same run.

`bench_distill` times the distillation step (forward, backward, AdamW) of the kit's default
path -- teacher only up to its target q/k/v in inference mode, student stopping after its
last attention, the attention kernel measured fastest for the device and dtype -- and of
the reference: the released formulation (explicit attention matrices in every block, the
teacher's full target block under no_grad, the student's full forward, fp32, no compile), at
identical weights and inputs. It counts FLOPs per image, measures the device's matmul peak
in the same run, and checks that both paths compute the same loss. Ratios, never absolute
thresholds, are what a benchmark here asserts.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .attention import relation_logits
from .devices import autocast_dtype, resolve_device
from .distill import Distiller, default_teacher_block, kl_from_logits, quantize_teacher
from .models import ModelSpec, build_model, choose_attention_kernel, set_fused_attention
from .pretrain import build_student

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype | None, device: torch.device, reps: int = 5, max_n: int = 8192) -> float:
    """FLOP/s of the best of `reps` square matmuls in `dtype`: the ceiling a step can reach.
    The size grows from 256 until one matmul takes 50 ms (a CPU's emulated bf16 runs at
    ~1 GFLOP/s: a fixed large size would take minutes there)."""
    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        return time.perf_counter() - t0

    n = 256
    while True:
        a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
        once(a, b)  # warm-up at this size
        if once(a, b) > 0.05 or n >= max_n:
            break
        n *= 2
    return 2 * n**3 / min(once(a, b) for _ in range(reps))


def count_flops(fn: Callable[[], Any], models: list[nn.Module]) -> int:
    """FLOPs of one call of `fn`, counted by torch with explicit attention (the same
    arithmetic whichever kernel runs it, and every matmul visible to the counter)."""
    saved = [[blk.attn.fused_attn for blk in m.blocks] for m in models]
    for m in models:
        set_fused_attention(m, False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for m, flags in zip(models, saved):
            for blk, flag in zip(m.blocks, flags):
                blk.attn.fused_attn = flag
    return counter.get_total_flops()


def reference_loss(student: nn.Module, teacher: nn.Module, block: int, sv: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """The released code's formulation: the teacher's full target block under no_grad and
    the student's full forward, q/k/v caught by hooks on the qkv projections."""
    caught: dict[str, torch.Tensor] = {}

    def catch(name: str):
        return lambda module, args, out: caught.__setitem__(name, out)

    with torch.no_grad():
        handle = teacher.blocks[block - 1].attn.qkv.register_forward_hook(catch("t"))
        x = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(tv)))
        for blk in teacher.blocks[:block]:
            x = blk(x)
        handle.remove()
    handle = student.blocks[-1].attn.qkv.register_forward_hook(catch("s"))
    student.forward_features(sv)
    handle.remove()

    def split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    tq, tk, tv_ = split(caught["t"], teacher.blocks[block - 1].attn.num_heads)
    q, k, v = split(caught["s"], student.blocks[-1].attn.num_heads)
    return (kl_from_logits(relation_logits(tq, tk), relation_logits(q, k))
            + kl_from_logits(relation_logits(tv_, tv_), relation_logits(v, v)))


def _timed(step: Callable[[], Any], steps: int, device: torch.device) -> list[float]:
    step()  # warm-up: kernel choice, allocation
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _train_step(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], dtype: torch.dtype | None,
                device: torch.device) -> Callable[[], float]:
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_distill(student: str = "vit_tiny", teacher: str = "vit_base", batch: int = 8, steps: int = 5,
                  precision: str | None = None, compile: bool = False, device: str | None = "auto",
                  input_size: int | None = None, teacher_quant: str = "none") -> dict[str, Any]:
    """One JSON-able record: the default path at `precision` (default: what `amp=auto`
    picks here) against the reference in fp32 and at the same precision; with
    `teacher_quant`, also the default path with that quantised teacher, and its loss
    deviation from the full-precision teacher's at the same student weights."""
    dev = resolve_device(device)
    dtype = PRECISIONS[precision] if precision else autocast_dtype("auto", dev)
    torch.manual_seed(0)
    t_model = build_model(ModelSpec.create(teacher, img_size=input_size)).to(dev).eval().requires_grad_(False)
    input_size = t_model.patch_embed.img_size[0]  # the architecture's own (224 for the paper's ViTs)
    block = default_teacher_block(t_model)
    cfg = type("Cfg", (), {"model": student, "student_heads": None, "input_size": input_size, "drop_path": 0.0})
    s_model = build_student(cfg, t_model.blocks[block - 1].attn.num_heads).to(dev)
    g = torch.Generator().manual_seed(1)
    sv, tv = (torch.randn(batch, 3, input_size, input_size, generator=g).to(dev) for _ in range(2))

    ref_student = copy.deepcopy(s_model)
    set_fused_attention(ref_student, False)
    set_fused_attention(t_model, False)
    with torch.no_grad():
        ref_value = reference_loss(ref_student, t_model, block, sv, tv).item()
    kernel = choose_attention_kernel([s_model, t_model], dev, dtype, batch)
    task = Distiller(s_model, t_model, block)
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        value = task(sv, tv)[0].float().item()
    tolerance = 1e-5 if dtype is None else 1e-2 * abs(ref_value)
    run_task = torch.compile(task) if compile else task

    def forward() -> torch.Tensor:
        return run_task(sv, tv)[0]
    flops = count_flops(lambda: task(sv, tv)[0].backward(), [s_model, t_model]) / batch
    s_model.zero_grad(set_to_none=True)
    default_times = _timed(_train_step(forward, [p for p in s_model.parameters() if p.requires_grad], dtype, dev),
                           steps, dev)
    default_mem = _peak_memory(dev)
    quant = _quantized_teacher_step(task, s_model, t_model, block, teacher_quant, sv, tv, dtype, dev, steps,
                                    batch / statistics.median(default_times)) if teacher_quant != "none" else None

    set_fused_attention(t_model, False)
    ref_params = list(ref_student.parameters())
    results = {}
    for name, ref_dtype in (("fp32", None), ("same", dtype)):
        if name == "same" and ref_dtype is None:
            results["same"] = results["fp32"]
            break
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        step = _train_step(lambda: reference_loss(ref_student, t_model, block, sv, tv), ref_params, ref_dtype, dev)
        results[name] = (_timed(step, steps, dev), _peak_memory(dev))
    ref_flops = count_flops(lambda: reference_loss(ref_student, t_model, block, sv, tv).backward(),
                            [ref_student, t_model]) / batch
    ref_student.zero_grad(set_to_none=True)
    peak, peak_fp32 = matmul_peak(dtype, dev), matmul_peak(None, dev)
    rate = batch / statistics.median(default_times)
    ref_rate = batch / statistics.median(results["fp32"][0])
    same_rate = batch / statistics.median(results["same"][0])
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return {
        "bench": "distill", "student": student, "teacher": teacher, "teacher_block": block, "batch": batch,
        "input_size": input_size, "device": str(dev), "precision": name, "compile": compile, "attention": kernel,
        "steps_timed": steps, "images_per_s": round(rate, 2), "peak_mem_gib": default_mem,
        "gflops_per_image": round(flops / 1e9, 2), "achieved_gflops": round(flops * rate / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1), "pct_of_peak": round(100 * flops * rate / peak, 1),
        "reference": {"images_per_s_fp32": round(ref_rate, 2), "images_per_s_same_precision": round(same_rate, 2),
                      "gflops_per_image": round(ref_flops / 1e9, 2), "peak_mem_gib": results["fp32"][1],
                      "pct_of_fp32_peak": round(100 * ref_flops * ref_rate / peak_fp32, 1)},
        "speedup": round(rate / ref_rate, 3), "speedup_same_precision": round(rate / same_rate, 3),
        "loss": value, "reference_loss": ref_value, "loss_parity": abs(value - ref_value) <= tolerance,
        **({"teacher_quant": quant} if quant else {}),
    }


def _quantized_teacher_step(task: Distiller, s_model: nn.Module, t_model: nn.Module, block: int, mode: str,
                            sv: torch.Tensor, tv: torch.Tensor, dtype: torch.dtype | None, dev: torch.device,
                            steps: int, default_rate: float) -> dict[str, Any]:
    """The default step with a quantised copy of the teacher: images/s against the
    default's, and the loss of both teachers at the same student weights and batch."""
    q_task = Distiller(s_model, quantize_teacher(copy.deepcopy(t_model), mode, dev), block)
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        full, low = task(sv, tv)[0].float().item(), q_task(sv, tv)[0].float().item()
    times = _timed(_train_step(lambda: q_task(sv, tv)[0], [p for p in s_model.parameters() if p.requires_grad],
                               dtype, dev), steps, dev)
    rate = len(sv) / statistics.median(times)
    return {"mode": mode, "images_per_s": round(rate, 2), "speedup_vs_default": round(rate / default_rate, 3),
            "loss_full_teacher": full, "loss_quantized_teacher": low,
            "loss_rel_deviation": abs(low - full) / max(abs(full), 1e-12)}


def _rates(flops: float, rate: float, peak: float) -> dict[str, Any]:
    return {"images_per_s": round(rate, 2), "gflops_per_image": round(flops / 1e9, 2),
            "achieved_gflops": round(flops * rate / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
            "pct_of_peak": round(100 * flops * rate / peak, 1)}


def bench_finetune(model: str = "vit_small", batch: int = 8, steps: int = 5, precision: str | None = None,
                   device: str | None = "auto") -> dict[str, Any]:
    """The fine-tuning step of the paper recipe (Mixup/CutMix, label smoothing, layer decay
    groups do not change the arithmetic) on random 224 px images."""
    from .config import get_config
    from .finetune import Classifier, build_classifier

    dev = resolve_device(device)
    dtype = PRECISIONS[precision] if precision else autocast_dtype("auto", dev)
    cfg = get_config("finetune", model, "paper" if model.startswith(("vit_", "tinymim_")) else "smoke")
    torch.manual_seed(0)
    net = build_classifier(cfg).to(dev)
    kernel = choose_attention_kernel([net], dev, dtype, batch)
    task = Classifier(net, cfg)
    images = torch.randint(0, 256, (batch, 3, cfg.input_size, cfg.input_size), dtype=torch.uint8).to(dev)
    labels = torch.randint(0, cfg.num_classes, (batch,)).to(dev)
    flops = count_flops(lambda: task(images, labels)[0].backward(), [net]) / batch
    net.zero_grad(set_to_none=True)
    times = _timed(_train_step(lambda: task(images, labels)[0], list(net.parameters()), dtype, dev), steps, dev)
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return {"bench": "finetune", "model": model, "batch": batch, "device": str(dev), "precision": name,
            "attention": kernel, "steps_timed": steps, "peak_mem_gib": _peak_memory(dev),
            **_rates(flops, batch / statistics.median(times), matmul_peak(dtype, dev))}


def bench_eval(model: str = "vit_small", batch: int = 64, steps: int = 5, device: str | None = "auto") -> dict[str, Any]:
    """The evaluation / robustness inference path (`evaluation.predict`, its autocast)."""
    from .config import get_config
    from .evaluation import predict
    from .finetune import build_classifier

    dev = resolve_device(device)
    cfg = get_config("finetune", model, "paper" if model.startswith(("vit_", "tinymim_")) else "smoke")
    torch.manual_seed(0)
    net = build_classifier(cfg).eval()
    images = torch.randint(0, 256, (batch, 3, cfg.input_size, cfg.input_size), dtype=torch.uint8)
    with torch.no_grad():
        flops = count_flops(lambda: predict(net, images, "cpu", batch_size=batch), [net]) / batch
    times = _timed(lambda: predict(net, images, dev, batch_size=batch), steps, dev)
    dtype = autocast_dtype("auto", dev) if dev.type == "cuda" else None
    return {"bench": "eval", "model": model, "batch": batch, "device": str(dev),
            "precision": "fp32" if dtype is None else str(dtype).split(".")[-1], "steps_timed": steps,
            "peak_mem_gib": _peak_memory(dev), **_rates(flops, batch / statistics.median(times), matmul_peak(dtype, dev))}
