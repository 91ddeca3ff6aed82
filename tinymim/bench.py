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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import stages
from .attention import relation_logits
from .devices import autocast_dtype, peak_memory, reset_peak_memory, resolve_device, sync
from .distill import Distiller, default_teacher_block, kl_from_logits, quantize_teacher
from .models import ModelSpec, build_model, choose_attention_kernel, count_flops, set_fused_attention
from .pretrain import build_student

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


def matmul_peak(dtype: torch.dtype | None, device: torch.device, reps: int = 5, max_n: int = 8192) -> float:
    """FLOP/s of the best of `reps` square matmuls in `dtype`: the ceiling a step can reach.
    The size grows from 256 until one matmul takes 50 ms (a CPU's emulated bf16 runs at
    ~1 GFLOP/s: a fixed large size would take minutes there)."""
    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        return time.perf_counter() - t0

    n = 256
    while True:
        a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
        once(a, b)  # warm-up at this size
        if once(a, b) > 0.05 or n >= max_n:
            break
        n *= 2
    return 2 * n**3 / min(once(a, b) for _ in range(reps))


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
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


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
    reset_peak_memory(dev)  # the peak of the timed steps, not of the FLOP-counting pass
    default_times = _timed(_train_step(forward, [p for p in s_model.parameters() if p.requires_grad], dtype, dev),
                           steps, dev)
    default_mem = peak_memory(dev)
    quant = _quantized_teacher_step(task, s_model, t_model, block, teacher_quant, sv, tv, dtype, dev, steps,
                                    batch / statistics.median(default_times)) if teacher_quant != "none" else None

    set_fused_attention(t_model, False)
    ref_params = list(ref_student.parameters())
    results = {}
    for name, ref_dtype in (("fp32", None), ("same", dtype)):
        if name == "same" and ref_dtype is None:
            results["same"] = results["fp32"]
            break
        reset_peak_memory(dev)
        step = _train_step(lambda: reference_loss(ref_student, t_model, block, sv, tv), ref_params, ref_dtype, dev)
        results[name] = (_timed(step, steps, dev), peak_memory(dev))
    ref_flops = count_flops(lambda: reference_loss(ref_student, t_model, block, sv, tv).backward(),
                            [ref_student, t_model]) / batch
    ref_student.zero_grad(set_to_none=True)
    peak, peak_fp32 = matmul_peak(dtype, dev), matmul_peak(None, dev)
    rate = batch / statistics.median(default_times)
    ref_rate = batch / statistics.median(results["fp32"][0])
    same_rate = batch / statistics.median(results["same"][0])
    name = PRECISION_NAMES[dtype]
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
    from .presets import get_config

    dev = resolve_device(device)
    dtype = PRECISIONS[precision] if precision else autocast_dtype("auto", dev)
    cfg = get_config("finetune", model, "paper" if model.startswith(("vit_", "tinymim_")) else "smoke")
    torch.manual_seed(0)
    task, net, _ = stages.get("finetune").build_task(cfg)
    net.to(dev)
    kernel = choose_attention_kernel([net], dev, dtype, batch)
    crops = {"image": torch.randint(0, 256, (batch, 3, cfg.input_size, cfg.input_size), dtype=torch.uint8),
             "label": torch.randint(0, cfg.num_classes, (batch,))}
    augment = stages.get("finetune").recipe(cfg, dev)  # the device half: normalisation, erasing, Mixup/CutMix

    def loss() -> torch.Tensor:
        return task(*augment.device(crops, dev))[0]
    flops = count_flops(lambda: loss().backward(), [net]) / batch
    net.zero_grad(set_to_none=True)
    reset_peak_memory(dev)
    times = _timed(_train_step(loss, list(net.parameters()), dtype, dev), steps, dev)
    name = PRECISION_NAMES[dtype]
    return {"bench": "finetune", "model": model, "batch": batch, "device": str(dev), "precision": name,
            "attention": kernel, "steps_timed": steps, "peak_mem_gib": peak_memory(dev),
            **_rates(flops, batch / statistics.median(times), matmul_peak(dtype, dev))}


def bench_eval(model: str = "vit_small", batch: int = 64, steps: int = 5, device: str | None = "auto") -> dict[str, Any]:
    """The evaluation / robustness inference path (`evaluation.predict`, its autocast)."""
    from .evaluation import predict
    from .presets import get_config

    dev = resolve_device(device)
    cfg = get_config("finetune", model, "paper" if model.startswith(("vit_", "tinymim_")) else "smoke")
    torch.manual_seed(0)
    net = stages.get("finetune").build_task(cfg)[1].eval()
    images = torch.randint(0, 256, (batch, 3, cfg.input_size, cfg.input_size), dtype=torch.uint8)
    with torch.no_grad():
        flops = count_flops(lambda: predict(net, images, "cpu", batch_size=batch), [net]) / batch
    reset_peak_memory(dev)
    times = _timed(lambda: predict(net, images, dev, batch_size=batch), steps, dev)
    dtype = autocast_dtype("auto", dev) if dev.type == "cuda" else None
    return {"bench": "eval", "model": model, "batch": batch, "device": str(dev),
            "precision": PRECISION_NAMES[dtype], "steps_timed": steps,
            "peak_mem_gib": peak_memory(dev), **_rates(flops, batch / statistics.median(times), matmul_peak(dtype, dev))}


# ---------------------------------------------------------------------------------
# the input pipeline


def imagenet_like_jpegs(root: Path, n: int, classes: int = 2, seed: int = 0) -> float:
    """`n` JPEGs like ImageNet's photographs in `classes` folders under `root`: 500 x 375,
    colour noise with the 1/f amplitude spectrum of natural images, quality 90 -> about 110 KB
    each (smooth synthetic JPEGs decode twice as fast and would flatter any ratio). Returns
    their mean size in KB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 375, 500
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None] ** 2)
    f[0, 0] = 1.0
    sizes = []
    for i in range(n):
        common = rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)
        channels = [np.fft.irfft2((0.7 * common + 0.3 * (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)))
                                  / f ** 1.05, s=(h, w)) for _ in range(3)]
        x = np.stack(channels, -1)
        x = (x - x.mean()) / x.std() * 50 + 120 + rng.uniform(-30, 30, 3)
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def _worker_loader(dataset: Any, collate_fn: Callable, n: int, batch: int):
    """`dataset`'s first `n` samples in batches from one DataLoader worker process (one core,
    its torch threads at 1 as DataLoader sets them), kept alive between epochs."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch, sampler=list(range(n)), collate_fn=collate_fn, num_workers=1,
                      persistent_workers=True, prefetch_factor=4)


def _best_ms(loaders: dict[str, Any], n: int, rounds: int = 3) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Milliseconds per image of each loader's epoch, best of `rounds`, the loaders taking turns
    so that a busy moment of the host does not fall on one of them (the first round also brings
    the files into the page cache); and each loader's batches."""
    best = dict.fromkeys(loaders, float("inf"))
    batches: dict[str, list[Any]] = {}
    for _ in range(rounds):
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            batches[name] = list(loader)
            best[name] = min(best[name], 1000 * (time.perf_counter() - t0) / n)
    return best, batches


def _bytes(sample: Any) -> int:
    if isinstance(sample, torch.Tensor):
        return sample.numel() * sample.element_size()
    if isinstance(sample, dict):
        return sum(_bytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(_bytes(v) for v in sample)
    return 0


class _Keyed:
    """`Augmented` indexed by sample alone (epoch 0), for a plain DataLoader."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[(0, i)]


def _pipeline_rows(reference: Any, recipes: dict[str, Any], root: Path, n: int, batch: int,
                   dev: torch.device) -> dict[str, Any]:
    """The reference (torchvision's ImageFolder with the release's transform, default collate)
    and each mode: worker-side ms per image (decode + host half + collate) in a real worker
    process, its rate per core, the ratio to the reference, bytes per sample handed over, and
    the device half's ms per image on `dev`."""
    from torch.utils.data import default_collate
    from torchvision.datasets import ImageFolder

    from .data import Augmented, ImageNetFolder
    from .data.augment import collate

    ref_ds = ImageFolder(str(root), transform=reference)
    datasets = {mode: Augmented(ImageNetFolder(root), recipe, seed=0) for mode, recipe in recipes.items()}
    loaders = {"reference": _worker_loader(ref_ds, default_collate, n, batch),
               **{mode: _worker_loader(_Keyed(ds), collate, n, batch) for mode, ds in datasets.items()}}
    ms, batches_ = _best_ms(loaders, n)
    rows: dict[str, Any] = {"reference": {"worker_ms_per_image": round(ms["reference"], 3),
                                          "worker_images_per_s_per_core": round(1000 / ms["reference"], 1),
                                          "bytes_per_sample": _bytes(ref_ds[0])}}
    for mode, recipe in recipes.items():
        recipe.device(batches_[mode][0], dev)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        for b in batches_[mode]:
            recipe.device(b, dev)
        sync(dev)
        rows[mode] = {"worker_ms_per_image": round(ms[mode], 3),
                      "worker_images_per_s_per_core": round(1000 / ms[mode], 1),
                      "speedup_vs_reference": round(ms["reference"] / ms[mode], 2),
                      "bytes_per_sample": _bytes(datasets[mode][(0, 0)]),
                      "device_ms_per_image": round(1000 * (time.perf_counter() - t0) / n, 3)}
    return rows


def bench_data(images: int = 96, batch: int = 32, device: str | torch.device | None = "auto",
               input_size: int = 224) -> dict[str, Any]:
    """Images/s per worker core of the two-view distillation pipeline and of fine-tuning's
    RandAugment pipeline, in each augmentation mode, against torchvision's ImageFolder with the
    release's transforms for the same recipe, measured in the same run on ImageNet-like JPEGs
    (`imagenet_like_jpegs`). Worker-side work is what stays on the host CPU when the device is
    a GPU; the device half is timed separately, on `device`."""
    import tempfile

    from .presets import get_config

    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        kb = imagenet_like_jpegs(root, images)
        pre = get_config("pretrain", "vit_small", "paper", {"input_size": input_size})
        ft = get_config("finetune", "vit_small", "paper", {"input_size": input_size})
        views = stages.get("pretrain").recipe
        finetune_recipe = stages.get("finetune").recipe
        pre_modes = {m: views(replace(pre, augment=m), torch.device("cpu")) for m in ("host", "device")}
        pre_modes["device+decode"] = replace(pre_modes["device"], device_decode=True)
        pipelines = {
            "pretrain": _pipeline_rows(views(replace(pre, augment="reference"), dev)._reference,
                                       pre_modes, root, images, batch, dev),
            "finetune": _pipeline_rows(finetune_recipe(replace(ft, augment="reference"))._part("reference"),
                                       {"host": finetune_recipe(ft, dev)}, root, images, batch, dev),
        }
    return {"bench": "data", "images": images, "jpeg_kb": round(kb, 1), "image_size": "500x375",
            "input_size": input_size, "device": str(dev), "pipelines": pipelines,
            "note": "worker side: one DataLoader worker process (one core); device side: on the device, per image"}
