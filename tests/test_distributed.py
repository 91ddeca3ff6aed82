"""The distributed rules of docs/gpu-hosts.md, checked in one process: every collective is built on the
run's device (NCCL refuses CPU tensors), one module owns them, every parameter DDP sees takes
part in the loss, a frozen teacher stays out of DDP's broadcasts, and the precision choices
that only matter on GPUs (teacher weights in bf16, relation logits in fp32)."""

import ast
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tinymim import distributed, engine
from tinymim.data import TensorBatches
from tinymim.distill import Distiller
from tinymim.finetune import Classifier, build_classifier, recipe
from tinymim.mae import MAE
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config
from tinymim.pretrain import build_student
from tinymim.segmentation import SegmentationTask, build_segmenter

PACKAGE = Path(__file__).resolve().parent.parent / "tinymim"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather", "scatter", "all_to_all", "reduce_scatter", "init_process_group"}


@pytest.fixture
def two_ranks(monkeypatch):
    """A pretend world of 2 whose collectives record the device of what they are given."""
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    monkeypatch.setattr(dist, "broadcast", lambda t, *a, **k: seen.append(t.device))
    return seen


def test_every_reduction_is_built_on_the_runs_device(two_ranks, monkeypatch):
    meta = torch.device("meta")
    distributed.all_reduce_sum([1.0, 2.0], meta)
    distributed.all_reduce_sum(torch.zeros(3, 3, dtype=torch.long), meta)  # a confusion matrix
    distributed.broadcast_buffers(torch.nn.BatchNorm1d(2, device=meta), meta)  # 3 buffers
    assert two_ranks == [meta] * 5  # on the GPU a run trains on, never a CPU tensor for NCCL
    asked = []
    reduce = distributed.all_reduce_sum
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda v, device: asked.append(device) or reduce(v, "cpu"))
    assert distributed.mean_across_ranks({"loss": 0.5, "step": 3}, meta, keep=("step",)) == {"loss": 0.25, "step": 3}
    assert asked == [meta]


def test_the_training_log_reduces_on_the_runs_device(two_ranks, monkeypatch, tmp_path):
    reduced = []
    monkeypatch.setattr(distributed, "mean_across_ranks", lambda metrics, device, keep=(): reduced.append(device) or metrics)
    run = type("Run", (), {"step": 1, "plan": engine.Plan(1, 0, 1, 2, 1, 4), "device": torch.device("meta"),
                           "cfg": get_config("mae"), "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)})()
    log = engine._Logger(run, tmp_path, progress=False)
    log.sums, log.steps = {"loss": torch.tensor(1.0)}, 1
    log.write()
    log.close()
    assert reduced == [torch.device("meta")]


def test_no_other_module_calls_a_collective():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) \
                    and node.value.id == "dist":
                offenders.append(f"{path.relative_to(PACKAGE)}: dist.{node.attr}")
    assert not offenders, offenders


def _tasks():
    """Each stage's task, as the stage builds it (random weights), with inputs of its recipe's shape."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    teacher = build_model(ModelSpec.create("micro_base"))
    pre = get_config("pretrain", overrides={"drop_path": 0.0})
    yield "mae", MAE(build_model(ModelSpec.create("micro_base"), fixed_pos_embed=True), get_config("mae")), (x,)
    for target in ("relation", "feature", "cls"):
        student = build_student(pre, 6 if target == "relation" else 3)
        yield target, Distiller(student, teacher, target=target), (x, x)
    yield "masked", Distiller(build_student(pre, 6), teacher, mask_ratio=0.5), (x, x)
    ft = get_config("finetune")
    crops = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "label": torch.arange(4)}
    yield "finetune", Classifier(build_classifier(ft), ft), recipe(ft).device(crops, torch.device("cpu"))
    star = get_config("finetune", overrides={"dist_token": True, "extra_fc": 64, "heads": 6, "teacher_classifier": "x"})
    yield "star", Classifier(build_classifier(star), star, teacher=build_model(ModelSpec.create("micro_tiny", num_classes=10))), \
        recipe(star).device(crops, torch.device("cpu"))
    for model in ("micro_tiny", "micro_base"):  # levels from blocks 1-4: micro_base's blocks 5-6 are never reached
        seg = get_config("segmentation", model, overrides={"out_indices": [0, 1, 2, 3]})
        yield f"segmentation-{model}", SegmentationTask(build_segmenter(seg), seg), (x, torch.randint(0, 11, (4, 32, 32)))


@pytest.mark.parametrize("name, task, inputs", list(_tasks()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_trained_parameter_takes_part_in_the_loss(name, task, inputs):
    """DDP (without find_unused_parameters, which costs a graph traversal per step) fails at
    step 2 on any trainable parameter the loss does not reach: those must be frozen."""
    task.train()
    loss, _ = task(*inputs)
    loss.backward()
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_ddp_leaves_the_frozen_teacher_out(tmp_path):
    name, task, _ = next(t for t in _tasks() if t[0] == "relation")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = engine._wrap(task, torch.device("cpu"))
        ignored = wrapped.parameters_to_ignore
        teacher = {f"teacher.{n}" for n, _ in task.teacher.named_parameters()} | \
                  {f"teacher.{n}" for n, _ in task.teacher.named_buffers()}
        assert teacher <= set(ignored) and not any(n.startswith("student.") for n in ignored)
    finally:
        dist.destroy_process_group()


def test_a_bf16_run_keeps_the_frozen_teacher_in_bf16(tmp_path):
    name, task, inputs = next(t for t in _tasks() if t[0] == "relation")
    cfg = get_config("pretrain", overrides={"amp": "bf16", "steps": 2, "warmup_steps": 0, "batch_size": 4})
    run = engine.start_run(task, TensorBatches(*inputs, batch_size=4), cfg, tmp_path, torch.device("cpu"))
    assert {p.dtype for p in task.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in task.student.parameters()} == {torch.float32}  # the trained weights stay fp32
    parts = engine.train_step(run, [inputs])
    assert torch.isfinite(parts["loss"])


def test_relation_logits_are_fp32_under_autocast():
    from tinymim.attention import relation_logits

    q, k = torch.randn(2, 3, 17, 32), torch.randn(2, 3, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = relation_logits(q.bfloat16(), k.bfloat16())
    assert logits.dtype == torch.float32
    assert torch.equal(logits, relation_logits(q.bfloat16().float(), k.bfloat16().float()))


def test_resuming_on_another_number_of_ranks_says_so(tmp_path):
    states = [engine._rng_state()]
    with pytest.warns(UserWarning, match="written by 1 rank"):
        engine._restore_rng(states, rank=0, world_size=2, seed=0, step=5, path=tmp_path / "checkpoint.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine._restore_rng(states, rank=0, world_size=1, seed=0, step=5, path=tmp_path / "checkpoint.pth")


def test_a_rank_evaluates_its_shard_without_padding(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        shards.append(list(distributed.shard(10)))
    assert sorted(sum(shards, [])) == list(range(10))  # every image once, none twice
