"""A new user's bad inputs against the CLI, table-driven: every one exits non-zero with
one `error:` line that names the input, before any training, writing nothing."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tinymim.__main__ import main
from tinymim.checkpoints import save_model
from tinymim.models import ModelSpec, build_model

TINY = ["--set", "steps=2", "--set", "warmup_steps=1", "--set", "batch_size=4", "--set", "data_limit=8"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _images(root, classes, n=2):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_model(build_model(ModelSpec.create("micro_base")), d / "teacher.pth")
    save_model(build_model(ModelSpec.create("micro_tiny", num_classes=10)), d / "cls.pth")
    with open(d / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    (d / "junk.pth").write_bytes(b"not a checkpoint at all")
    good = (d / "cls.pth").read_bytes()
    (d / "truncated.pth").write_bytes(good[: len(good) // 2])
    _images(d / "no_val" / "train", ["a", "b"])
    _images(d / "three" / "train", ["a", "b", "c"])
    _images(d / "three" / "val", ["a", "b", "c"])
    _images(d / "empty_class" / "train", ["a", "b"])
    (d / "empty_class" / "train" / "c").mkdir()
    _images(d / "empty_class" / "val", ["a", "b"])
    _images(d / "bad_val" / "train", ["a", "b"])
    _images(d / "bad_val" / "val", ["a", "zzz"])
    (d / "ade" / "images" / "training").mkdir(parents=True)
    (d / "ade" / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "ade" / "images" / "training" / "x.jpg")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(d / "ade" / "annotations" / "training" / "x.png")
    (d / "imagenet_c" / "fog" / "1").mkdir(parents=True)
    from tinymim.robustness import subset_indices

    _images(d / "imagenet_a", subset_indices("imagenet_a")[0][:2])
    (d / "a_file").write_text("not a folder")
    return d


# (id, argv with {d} = the inputs folder and {out} = a fresh run directory, exit code, text the error must name)
CASES = [
    ("steps-zero", ["finetune", "--out", "{out}", "--set", "steps=0"], 2, "steps"),
    ("steps-negative", ["pretrain", "--out", "{out}", "--set", "steps=-5"], 2, "steps"),
    ("lr-negative", ["finetune", "--out", "{out}", "--set", "lr=-1"], 2, "lr"),
    ("lr-not-a-number", ["finetune", "--out", "{out}", "--set", "lr=abc"], 2, "lr"),
    ("micro-batch-negative", ["finetune", "--out", "{out}", "--set", "micro_batch_size=-1"], 2, "micro_batch_size"),
    ("ckpt-every-zero", ["mae", "--out", "{out}", "--set", "ckpt_every=0"], 2, "ckpt_every"),
    ("data-limit-negative", ["finetune", "--out", "{out}", "--set", "data_limit=-1"], 2, "data_limit"),
    ("slide-stride-zero", ["segmentation", "--out", "{out}", "--set", "slide_stride=0"], 2, "slide_stride"),
    ("slide-stride-past-window", ["segmentation", "--out", "{out}", "--set", "slide_stride=64"], 2, "slide_stride"),
    ("teacher-block-zero", ["pretrain", "--out", "{out}", "--set", "teacher_block=0"], 2, "teacher_block"),
    ("teacher-block-too-deep", ["pretrain", "--out", "{out}", "--set", "teacher_block=99"], 2, "teacher_block"),
    ("unknown-model", ["finetune", "--out", "{out}", "--model", "vit_giant"], 2, "vit_giant"),
    ("unknown-teacher", ["pretrain", "--out", "{out}", "--set", "teacher=vit_giant"], 2, "vit_giant"),
    ("no-paper-recipe", ["finetune", "--out", "{out}", "--profile", "paper", "--model", "micro_tiny"], 2, "micro_tiny"),
    ("unknown-key", ["finetune", "--out", "{out}", "--set", "learning_rate=1"], 2, "learning_rate"),
    ("input-not-patch-multiple", ["finetune", "--out", "{out}", "--set", "input_size=30"], 2, "input_size"),
    ("drop-path-above-one", ["finetune", "--out", "{out}", "--set", "drop_path=1.5"], 2, "drop_path"),
    ("betas-out-of-range", ["finetune", "--out", "{out}", "--set", "betas=1.2,0.9"], 2, "betas"),
    ("layer-decay-zero", ["finetune", "--out", "{out}", "--set", "layer_decay=0"], 2, "layer_decay"),
    ("num-classes-zero", ["finetune", "--out", "{out}", "--set", "num_classes=0"], 2, "num_classes"),
    ("amp-unknown", ["finetune", "--out", "{out}", "--set", "amp=fp8"], 2, "amp"),
    ("warmup-past-steps", ["finetune", "--out", "{out}", "--set", "steps=10", "--set", "warmup_steps=10"], 2,
     "warmup_steps"),
    ("severity-seven", ["robustness", "{d}/cls.pth", "--profile", "smoke", "--set", "severities=7"], 2, "severities"),
    ("corruption-unknown", ["robustness", "{d}/cls.pth", "--profile", "smoke", "--set", "corruptions=rain"], 2, "rain"),
    ("checkpoint-missing", ["evaluate", "{d}/nope.pth", "--data", "synthetic"], 1, "nope.pth"),
    ("checkpoint-junk", ["evaluate", "{d}/junk.pth", "--data", "synthetic"], 1, "junk.pth"),
    ("checkpoint-truncated", ["evaluate", "{d}/truncated.pth", "--data", "synthetic"], 1, "truncated.pth"),
    ("checkpoint-with-code", ["evaluate", "{d}/evil.pth", "--data", "synthetic"], 1, "evil.pth"),
    ("wrong-class-count", ["evaluate", "{d}/cls.pth", "--data", "synthetic", "--num-classes", "1000"], 1, "cls.pth"),
    ("teacher-missing", ["pretrain", "--out", "{out}", *TINY, "--set", "teacher_path={d}/nope.pth"], 1, "nope.pth"),
    ("teacher-arch-mismatch", ["pretrain", "--out", "{out}", *TINY, "--set", "teacher_path={d}/teacher.pth",
                               "--set", "teacher=micro_small"], 1, "teacher=micro_base"),
    ("paper-without-teacher", ["pretrain", "--out", "{out}", "--profile", "paper", "--set", "data={d}/three"], 1,
     "teacher_path"),
    ("data-root-missing", ["finetune", "--out", "{out}", *TINY, "--set", "data={d}/nowhere"], 1, "nowhere"),
    ("no-val-split", ["finetune", "--out", "{out}", *TINY, "--set", "data={d}/no_val", "--set", "num_classes=2"], 1,
     "val"),
    ("more-classes-than-head", ["finetune", "--out", "{out}", *TINY, "--set", "data={d}/three",
                                "--set", "num_classes=2"], 1, "num_classes=3"),
    ("val-class-not-trained", ["finetune", "--out", "{out}", *TINY, "--set", "data={d}/bad_val",
                               "--set", "num_classes=2"], 1, "zzz"),
    ("ade-without-validation", ["segmentation", "--out", "{out}", *TINY, "--set", "data={d}/ade"], 1, "validation"),
    ("imagenet-c-incomplete", ["robustness", "{d}/cls.pth", "--imagenet-c", "{d}/imagenet_c"], 1, "fog/2"),
    ("robustness-nothing-given", ["robustness", "{d}/cls.pth"], 1, "--imagenet-a"),
    ("out-is-a-file", ["finetune", "--out", "{d}/a_file", *TINY], 1, "a_file"),
    ("check-data-missing", ["check-data", "{d}/nowhere"], 1, "nowhere"),
    # the last five that ended in a deep traceback or an error not naming the input (issue 24)
    ("num-classes-below-the-data", ["finetune", "--out", "{out}", *TINY, "--set", "num_classes=5"], 1,
     "synthetic has 10 classes"),
    ("evaluate-at-another-size", ["evaluate", "{d}/cls.pth", "--data", "synthetic", "--input-size", "224",
                                  "--num-classes", "10"], 1,
     "trained at 32 px"),
    ("imagenet-a-on-a-10-way-model", ["robustness", "{d}/cls.pth", "--imagenet-a", "{d}/imagenet_a"], 1,
     "--imagenet-a: ImageNet-A/R/C are scored by a 1000-way"),
    ("empty-class-folder", ["finetune", "--out", "{out}", *TINY, "--set", "data={d}/empty_class"], 1,
     "empty_class/train/c: empty class folder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clean_error_before_any_work(case, files, tmp_path, capsys):
    _, argv, code, named = case
    out = tmp_path / "run"
    argv = [a.format(d=files, out=out) for a in argv]
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert named in err, err
    assert not out.exists()  # nothing written: the error came before the run directory
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before


def test_debug_shows_the_traceback(files):
    with pytest.raises(Exception, match="nope.pth"):
        main(["--debug", "evaluate", str(files / "nope.pth"), "--data", "synthetic"])


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_a_corrupt_image_found_in_a_worker_stops_with_its_path(tmp_path, capsys):
    _images(tmp_path / "data" / "train", ["a", "b"], n=4)
    _images(tmp_path / "data" / "val", ["a", "b"], n=1)
    (tmp_path / "data" / "train" / "a" / "9.png").write_bytes(b"\x89PNG broken")
    argv = ["finetune", "--out", str(tmp_path / "run"), "--set", f"data={tmp_path / 'data'}", "--set", "num_classes=2",
            "--set", "steps=4", "--set", "warmup_steps=1", "--set", "batch_size=9", "--set", "num_workers=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().split("\r")[-1]  # after the progress bar it ended
    assert err.startswith("error: ") and "\n" not in err and "9.png" in err and "Traceback" not in err, err


def test_an_ade20k_mask_value_above_150_names_the_file(tmp_path):
    from tinymim.data import ADE20K, DataError

    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "training" / "x.jpg")
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(tmp_path / "annotations" / "training" / "x.png")
    with pytest.raises(DataError, match=r"x\.png: mask value 200"):
        ADE20K(tmp_path)[0]


def test_a_checkpoint_write_past_the_file_size_limit_names_the_cause_and_the_run_resumes(tmp_path):
    """EFBIG surfaced from torch's zip writer as "unexpected pos": the error now says the disk,
    quota or file-size limit, names the file, and a run without the limit then finishes."""
    import resource
    import subprocess
    import sys

    from tinymim.data import builtin
    from tinymim.presets import get_config

    cfg = get_config("finetune", profile="tiny")
    builtin("train", cfg), builtin("val", cfg)  # the data cache is written here, not under the limit
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tinymim", "finetune", "--profile", "tiny", "--out", str(out), "--set", "ckpt_every=2"]

    def two_megabytes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    limited = subprocess.run(argv, preexec_fn=two_megabytes, capture_output=True, text=True, timeout=300)
    last = limited.stderr.strip().splitlines()[-1]
    assert limited.returncode == 1, limited.stderr
    assert last.startswith("error: ") and "checkpoint.pth: cannot write it" in last and "file-size limit" in last, last
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.pth").exists()  # nothing torn left behind
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "eval.json").read_text())["steps"] == 4
