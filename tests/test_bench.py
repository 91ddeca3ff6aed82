"""The benchmark's machinery on micro models: both paths compute the same loss, FLOPs are
counted, the reference does the extra work the default path skips, kernels agree."""

import pytest
import torch

from tinymim import bench
from tinymim.models import ModelSpec, build_model, choose_attention_kernel, set_fused_attention


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distill_bench_paths_agree_and_ratios_are_reported(precision):
    r = bench.bench_distill("micro_tiny", "micro_base", batch=8, steps=2, precision=precision, device="cpu")
    assert r["loss_parity"], (r["loss"], r["reference_loss"])
    if precision == "fp32":
        assert r["loss"] == pytest.approx(r["reference_loss"], abs=1e-5)
    # the reference runs the teacher's whole target block and the student's last MLP: more work
    assert r["reference"]["gflops_per_image"] > r["gflops_per_image"] > 0
    assert r["speedup"] == pytest.approx(r["images_per_s"] / r["reference"]["images_per_s_fp32"], rel=0.01)
    assert r["speedup_same_precision"] == pytest.approx(
        r["images_per_s"] / r["reference"]["images_per_s_same_precision"], rel=0.01)
    assert 0 < r["pct_of_peak"] and r["attention"] in ("sdpa", "math") and r["precision"] == precision


def test_flops_are_counted_not_assumed():
    model = build_model(ModelSpec.create("vit_tiny"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        flops = bench.count_flops(lambda: model(x), [model])
    assert flops / 1e9 == pytest.approx(2.5, rel=0.05)  # ViT-T/16: 1.26 GMACs at 224 px


def test_both_attention_kernels_compute_the_same_and_the_choice_is_applied():
    torch.manual_seed(0)
    model = build_model(ModelSpec.create("micro_tiny")).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for fused in (True, False):
        set_fused_attention(model, fused)
        outs.append(model.forward_features(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    name = choose_attention_kernel([model], torch.device("cpu"), None, batch=2)
    assert {blk.attn.fused_attn for blk in model.blocks} == {name == "sdpa"}


def test_quantized_teacher_is_timed_with_its_loss_deviation():
    r = bench.bench_distill("micro_tiny", "micro_base", batch=8, steps=1, precision="fp32", device="cpu",
                            teacher_quant="int8")
    q = r["teacher_quant"]
    assert q["mode"] == "int8" and q["images_per_s"] > 0
    assert q["speedup_vs_default"] == pytest.approx(q["images_per_s"] / r["images_per_s"], rel=0.01)
    assert 0 < q["loss_rel_deviation"] < 0.05  # rounding reaches the targets, a little


def test_data_bench_compares_every_mode_with_the_release_pipeline_in_the_same_run():
    r = bench.bench_data(images=8, batch=4, device="cpu", input_size=64)
    assert 80 < r["jpeg_kb"] < 140  # ImageNet-like files, not smooth ones that decode fast
    pre, ft = r["pipelines"]["pretrain"], r["pipelines"]["finetune"]
    assert set(pre) == {"reference", "host", "device", "device+decode"} and set(ft) == {"reference", "host"}
    for rows in (pre, ft):
        for mode, row in rows.items():
            assert row["worker_ms_per_image"] > 0
            if mode != "reference":
                assert row["speedup_vs_reference"] == pytest.approx(
                    rows["reference"]["worker_ms_per_image"] / row["worker_ms_per_image"], rel=0.01)
                assert row["device_ms_per_image"] > 0
    # uint8 at the crop size (one crop for both views) instead of two float32 views
    assert pre["host"]["bytes_per_sample"] < pre["reference"]["bytes_per_sample"] / 7
    assert pre["device+decode"]["bytes_per_sample"] < pre["device"]["bytes_per_sample"]  # the file, not pixels


def test_bench_reads_peak_memory_of_the_timed_steps_only(monkeypatch):
    """The FLOP-counting pass allocates more than a step; the peak must not include it."""
    calls = []
    monkeypatch.setattr(bench, "reset_peak_memory", lambda device: calls.append("reset"))
    monkeypatch.setattr(bench, "count_flops", lambda fn, models: calls.append("flops") or 1)
    monkeypatch.setattr(bench, "_timed", lambda step, steps, device: calls.append("timed") or [1.0])
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device: 1.0)
    bench.bench_finetune("micro_tiny", batch=2, steps=1, device="cpu")
    assert calls == ["flops", "reset", "timed"]


def test_benchmarks_page_is_written_from_the_records(tmp_path):
    """`bench ... --write`: each record kept under its own name (measuring again replaces it),
    and BENCHMARKS.md regenerated from all of them -- every figure on the page is a record's."""
    from tinymim import bench_report

    distill = bench.bench_distill("micro_tiny", "micro_base", batch=4, steps=1, precision="fp32", device="cpu")
    ft = bench.bench_eval("micro_tiny", batch=4, steps=1, device="cpu")
    for record in (distill, ft, ft):
        bench_report.save(record, tmp_path)
    kept = sorted(p.name for p in (tmp_path / "reports" / "bench").iterdir())
    assert kept == ["distill-micro_tiny-micro_base-fp32-cpu.json", "eval-micro_tiny-fp32-cpu.json"]
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"**{distill['speedup_same_precision']}**" in page and str(ft["images_per_s"]) in page
    assert "micro_tiny <- micro_base" in page and "measured on" in page
