import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinymim import engine
from tinymim.checkpoints import load_teacher, save_model
from tinymim.data import TensorBatches
from tinymim.distill import Distiller
from tinymim.models import ModelSpec, build_model, model_spec
from tinymim.presets import get_config
from tinymim.pretrain import build_student, pretrain, pretrain_sequential

FAST = {"steps": "6", "warmup_steps": "2", "batch_size": "16", "data_limit": "64", "log_every": "1",
        "ckpt_every": "3", "amp": "none", "drop_path": "0"}


@pytest.fixture
def teacher_path(tmp_path):
    torch.manual_seed(0)
    return save_model(build_model(ModelSpec.create("micro_base")), tmp_path / "teacher.pth")


def _cfg(teacher_path, **kw):
    return get_config("pretrain", "micro_tiny", "smoke", FAST | {"teacher_path": str(teacher_path)} | kw)


def test_pretrain_resumes_exactly_and_loads_back_as_teacher(tmp_path, teacher_path):
    cfg = _cfg(teacher_path)
    full = pretrain(cfg, tmp_path / "full", progress=False)
    assert not (tmp_path / "part" / "student.pth").exists()
    pretrain(cfg, tmp_path / "part", progress=False, stop_after=4)  # "killed" after step 4 (checkpoint at 3 and 4)
    assert not (tmp_path / "part" / "student.pth").exists()
    resumed = pretrain(cfg, tmp_path / "part", progress=False)
    losses = [[(r["loss_qk"], r["loss_vv"]) for r in engine.read_metrics(d)] for d in (tmp_path / "full", tmp_path / "part")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a, b = torch.load(full, weights_only=True)["model"], torch.load(resumed, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    student = load_teacher(None, resumed)
    assert [blk.attn.num_heads for blk in student.blocks] == [3, 3, 3, 6]
    assert json.loads((tmp_path / "full" / "config.json").read_text())["teacher_block_resolved"] == 6


def test_an_int8_teacher_distils_close_to_the_fp32_one(tmp_path, teacher_path):
    """teacher_quant=int8 (opt-in) trains end to end; its losses track the fp32 teacher's."""
    cfg = _cfg(teacher_path, steps="3", ckpt_every="3")
    pretrain(cfg, tmp_path / "fp32", progress=False, device="cpu")
    pretrain(_cfg(teacher_path, steps="3", ckpt_every="3", teacher_quant="int8"), tmp_path / "int8", progress=False,
             device="cpu")
    fp32, int8 = ([r["loss"] for r in engine.read_metrics(tmp_path / d)] for d in ("fp32", "int8"))
    assert fp32 != int8 and all(abs(a - b) / a < 0.05 for a, b in zip(fp32, int8))
    assert (tmp_path / "int8" / "student.pth").exists()


def test_teacher_arch_must_match_config(tmp_path, teacher_path):
    with pytest.raises(ValueError, match="holds a micro_base"):
        pretrain(_cfg(teacher_path, teacher="micro_small"), tmp_path, progress=False)


def test_sequential_b_s_t(tmp_path, teacher_path):
    cfg = _cfg(teacher_path, steps="2", warmup_steps="1")
    small, tiny = pretrain_sequential(cfg, ["micro_small", "micro_tiny"], tmp_path, progress=False)
    s, t = load_teacher(None, small), load_teacher(None, tiny)
    assert model_spec(s).heads == (4, 4, 4, 6) and model_spec(t).heads == (3, 3, 3, 6)
    second = json.loads((tmp_path / "2_micro_tiny" / "config.json").read_text())
    assert second["teacher"] == "micro_small" and second["teacher_resolved"] == str(small)


def _views(n=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)


def _distiller():
    torch.manual_seed(0)
    teacher = build_model(ModelSpec.create("micro_base"))
    cfg = get_config("pretrain", "micro_tiny", "smoke", {"drop_path": "0"})
    return Distiller(build_student(cfg, 6), teacher)


def _ddp_worker(rank, world_size, run_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = get_config("pretrain", "micro_tiny", "smoke", FAST)
        task = _distiller()
        engine.train(task, TensorBatches(*_views(), batch_size=16, seed=0, rank=rank, world_size=world_size),
                     cfg, run_dir, progress=False)
        if rank == 0:
            torch.save(task.student.state_dict(), os.path.join(run_dir, "student_state.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    cfg = get_config("pretrain", "micro_tiny", "smoke", FAST)
    single = _distiller()
    engine.train(single, TensorBatches(*_views(), batch_size=16, seed=0), cfg, tmp_path / "one", progress=False)
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "two"), port), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "two" / "student_state.pt", weights_only=True)
    for k, v in single.student.state_dict().items():
        w = ddp[k]
        if k.endswith("qkv.bias"):
            # the key bias has an analytically zero gradient (softmax is shift-invariant), so
            # AdamW turns float noise into steps of up to lr each; compare only q and v tightly
            d = v.shape[0] // 3
            assert (v[d:2 * d] - w[d:2 * d]).abs().max() <= 6 * cfg.lr * 1.01, k
            v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([w[:d], w[2 * d:]])
        assert torch.allclose(v, w, atol=1e-6), k
    one = [r["loss"] for r in engine.read_metrics(tmp_path / "one")]
    two = [r["loss"] for r in engine.read_metrics(tmp_path / "two")]
    assert one == pytest.approx(two, abs=1e-5)


def test_pretrain_from_an_image_folder(tmp_path, teacher_path):
    import numpy as np
    from PIL import Image

    for c in ("n01", "n02"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(8):
            rgb = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "train" / c / f"{i}.JPEG")
    cfg = _cfg(teacher_path, data=str(tmp_path / "train"), data_limit="null", steps="3", batch_size="8",
               num_workers="1")
    student = pretrain(cfg, tmp_path / "run", progress=False)
    assert [r["step"] for r in engine.read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert load_teacher(None, student).blocks[-1].attn.num_heads == 6


def test_a_folder_run_resumes_exactly_with_workers(tmp_path, teacher_path):
    """Every host-side draw is seeded by (seed, epoch, sample), so after a kill the resumed run's
    workers crop and jitter exactly as the uninterrupted run's did (before, only the order was
    restored and the augmentation drawn anew)."""
    import numpy as np
    from PIL import Image

    for c in ("n01", "n02"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(12):
            rgb = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "train" / c / f"{i}.JPEG")
    cfg = _cfg(teacher_path, data=str(tmp_path / "train"), data_limit="null", steps="5", batch_size="8",
               num_workers="2", ckpt_every="2")
    full = pretrain(cfg, tmp_path / "full", progress=False)
    pretrain(cfg, tmp_path / "part", progress=False, stop_after=3)  # killed after step 3, mid-epoch
    resumed = pretrain(cfg, tmp_path / "part", progress=False)
    assert [r["loss"] for r in engine.read_metrics(tmp_path / "full")] == \
           [r["loss"] for r in engine.read_metrics(tmp_path / "part")]
    a, b = torch.load(full, weights_only=True)["model"], torch.load(resumed, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_drop_path_is_the_releases_constant_rate_and_its_class_token_is_decayed():
    """models_tinymim.py: drop_path 0.1 in blocks 1-11, none in block 12 (not timm's 0 -> 0.1
    ramp); main_pretrain.py's add_weight_decay decays the class token."""
    cfg = get_config("pretrain", "vit_tiny", "paper")
    student = build_student(cfg, 12)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in student.blocks]
    assert rates == [0.1] * 11 + [0.0] and all(getattr(b.drop_path2, "drop_prob", 0.0) == r
                                                for b, r in zip(student.blocks, rates))
    task = Distiller(student, build_model(ModelSpec.create("vit_base")))
    opt = engine.build_optimizer(task, cfg)
    names = {id(p): n for n, p in task.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "student.cls_token" in decayed
