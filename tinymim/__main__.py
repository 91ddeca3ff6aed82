"""Command line: `tinymim <command>` or `python -m tinymim <command>` (see README.md).

One small function per subcommand, listed in COMMANDS with its arguments; the training
commands are the stage registry's (`stages.py`: mae, pretrain, finetune, segmentation --
`segment` also works) and run unchanged under `torchrun`. Errors that our code recognises
(config, checkpoint, data, missing input, divergence) print one `error:` line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from types import SimpleNamespace

from .config import CONFIGS, PROFILES, TEACHER_QUANT, ConfigError
from .presets import get_config


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["lr=1e-3", "betas=0.9,0.99"]` -> {"lr": "1e-3", "betas": "0.9,0.99"}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _profile_and_overrides(p: argparse.ArgumentParser, default_profile: str = "smoke") -> None:
    p.add_argument("--profile", choices=PROFILES, default=default_profile,
                   help="smoke (CPU minutes) or paper (Tables 1-3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set lr=1e-3 (repeatable)")


def _check_out(out: str) -> None:
    """A run directory we can write, checked before any work and without creating it."""
    import os
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot create or write it ({parent} is not writable)")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when there is one; under torchrun this process's), cpu, cuda or cuda:N")


def _training(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--out", required=True, help="run directory (resumes if it holds a checkpoint)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a config JSON (from `tinymim config STAGE` or a run's config.json); --set applies on top")
    _device(p)
    _profile_and_overrides(p)


def _config(args: argparse.Namespace, stage: str):
    overrides = parse_overrides(args.overrides)
    if getattr(args, "config", None):
        from pathlib import Path

        from .presets import config_from_dict

        try:
            saved = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {args.config}: not JSON ({e})") from None
        if not isinstance(saved, dict) or saved.get("stage", stage) != stage:
            raise ConfigError(f"--config {args.config}: expected a {stage!r} config, "
                              f"got {saved.get('stage') if isinstance(saved, dict) else type(saved).__name__!r}")
        return config_from_dict({"stage": stage} | saved, overrides | ({"model": args.model} if args.model else {}))
    return get_config(stage, getattr(args, "model", None), args.profile, overrides)


# ---------------------------------------------------------------------------------
# subcommands


def cmd_config(args: argparse.Namespace) -> None:
    print(json.dumps(_config(args, args.stage).to_dict(), indent=2))


def cmd_run(args: argparse.Namespace) -> None:
    from .runner import NOTEBOOKS_DIR, run

    params = {}
    for k, v in parse_overrides(args.params).items():
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    if args.device is not None:
        params["device"] = args.device
    if args.nproc is not None:
        params["nproc"] = args.nproc
    if args.data is not None:
        params["data"] = _data_arg(args.data)
    only = args.only.split(",") if args.only else None
    if args.detach:
        from .runner import submit_detached

        if not args.cluster:
            raise ValueError("--detach: needs --cluster slurm (the jobs run the notebooks while nothing here waits)")
        result = submit_detached(args.profile, args.out, only, _cluster_from(args).to_dict(),
                                 args.notebooks or NOTEBOOKS_DIR, params)
        print(json.dumps({"run_dir": str(result.run_dir), "jobs": result.jobs, "completed": result.skipped}))
        return
    if args.cluster:
        params["cluster"] = _cluster_from(args).to_dict()
    result = run(args.profile, args.out, only, notebooks_dir=args.notebooks or NOTEBOOKS_DIR, parameters=params)
    print(f"run directory: {result.run_dir}" + (f" (waiting for SLURM: {', '.join(result.waiting)})"
                                                 if result.waiting else ""))


def _data_arg(data: str) -> str:
    """--data: a built-in dataset's name, or a folder (checked now, made absolute: notebooks run
    in their own working directory)."""
    from pathlib import Path

    from .data import BUILTIN, DataError, classes_of

    if data in BUILTIN:
        return data
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"--data {data}: neither a built-in dataset ({', '.join(BUILTIN)}) nor a folder")
    classes_of(str(root))  # train/ class folders exist (an empty class folder is named by the loader)
    return str(root)


def cmd_study(args: argparse.Namespace) -> None:
    from .runner import run
    from .study import BUDGETS, default_out, select_arms

    if args.seeds < 1:
        raise ValueError(f"--seeds: expected at least 1, got {args.seeds}")
    only = args.only.split(",") if args.only else None
    select_arms(only)  # an unknown row fails here, before the notebook starts
    if args.budget not in BUDGETS:
        raise ValueError(f"--budget: expected one of {sorted(BUDGETS)}, got {args.budget!r}")
    data = _data_arg(args.data)
    out = args.out or default_out(args.budget, data)
    if args.detach:
        from .study import submit_detached

        if not args.cluster:
            raise ValueError("--detach: needs --cluster slurm")
        print(json.dumps(submit_detached(out, range(args.seeds), only, args.budget, _cluster_from(args).to_dict(),
                                         args.device or "auto", data=data)))
        return
    params = {"seeds": list(range(args.seeds)), "only": only, "budget": args.budget, "device": args.device or "auto",
              "data": data,
              "nproc": args.nproc, "cluster": _cluster_from(args).to_dict() if args.cluster else None}
    result = run("smoke", out, ["08"], parameters=params)
    print(f"study: {result.run_dir / 'REPORT.md'} (executed notebook: {result.run_dir / 'notebooks'})")


def _teacher_for(cfg, device) -> None:
    """Distillation's teacher: the one given, else the built-in profiles' smoke teacher (made now)."""
    from . import pipeline

    cfg.teacher_path = str(pipeline.teacher_path_for(None, cfg.profile, cfg.teacher_path, device=device, nproc=1))


def cmd_submit(args: argparse.Namespace) -> None:
    """A training stage as one SLURM job (`cluster.py`): prints the job id, the log and how to follow
    or cancel it; `--wait` follows it here and prints the result line."""
    from . import cluster, launch, stages

    stage = stages.get(args.stage)
    cfg = _config(args, stage.name)
    spec = _cluster_from(args)
    _check_out(args.out)
    if stage.name == "pretrain":
        _teacher_for(cfg, "cpu")
    if stage.finished_config(args.out) == cfg.to_dict():
        print(json.dumps(_result_line(stage.result(args.out)) | {"note": "already finished; nothing submitted"}))
        return
    job = cluster.submit(stage.name, cfg, args.out, spec, args.device)
    log = cluster.rank0_log(job)
    print(f"submitted {stage.name} as SLURM job {job.job_id} ({spec.nodes} node(s) x {spec.tasks()} task(s))\n"
          f"  rank 0 log: {log}\n  follow: tail -f {log}   state: squeue -j {job.job_id}   cancel: scancel {job.job_id}",
          flush=True)
    if args.wait:
        print(json.dumps(_result_line(launch.follow(job, stage.name, args.out))))


def _result_line(result) -> dict:
    return {"stage": result.stage, "path": str(result.path),
            "metrics": {k: v for k, v in result.metrics.items() if k != "per_class_IoU"}}


def cmd_stage(args: argparse.Namespace) -> None:
    """Any registered training stage: its config, then `Stage.run`, then one JSON line of the
    result. Pre-training also takes the smoke teacher when none is given, and `--chain`."""
    from . import stages
    from .distributed import setup as setup_distributed
    from .distributed import world
    from .pretrain import pretrain_sequential

    stage = stages.get(args.command)
    cfg = _config(args, stage.name)
    _check_out(args.out)
    device = setup_distributed(args.device)  # a missing device is named before any work
    rank0 = world()[0] == 0  # under torchrun every rank returns the result: one line says it
    if stage.name == "pretrain":
        _teacher_for(cfg, device)
        if args.chain:
            paths = pretrain_sequential(cfg, args.chain.split(","), args.out, device=device)
            if rank0:
                print(json.dumps({"stage": "pretrain", "chain": [str(p) for p in paths]}))
            return
    result = stage.run(cfg, args.out, device=device)
    if rank0:
        print(json.dumps(_result_line(result)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .checkpoints import load_classifier, open_checkpoint
    from .devices import resolve_device
    from .finetune import evaluate

    device = resolve_device(args.device)
    model = load_classifier(args.checkpoint, args.num_classes)
    classes = None if args.checkpoint.startswith("timm:") else open_checkpoint(args.checkpoint).meta.get("classes")
    where = SimpleNamespace(data=args.data, input_size=args.input_size, num_workers=args.workers, data_seed=0)
    print(json.dumps(evaluate(model, where, device=device, classes=classes), indent=2))


def cmd_robustness(args: argparse.Namespace) -> None:
    from .checkpoints import load_classifier
    from .devices import resolve_device
    from .robustness import evaluate_robustness

    device = resolve_device(args.device)
    cfg = get_config("robustness", profile=args.profile, overrides=parse_overrides(args.overrides))
    model = load_classifier(args.checkpoint, num_classes=None)
    print(json.dumps(evaluate_robustness(model, cfg, args.imagenet_a, args.imagenet_r, args.imagenet_c,
                                         device=device), indent=2))


def cmd_bench(args: argparse.Namespace) -> None:
    from . import bench

    if args.what == "data":
        record = bench.bench_data(args.images, device=args.device)
    elif args.what == "distill":
        record = bench.bench_distill(args.student, args.teacher, args.batch, args.steps, args.precision, args.compile,
                                     args.device, teacher_quant=args.teacher_quant)
    elif args.what == "finetune":
        record = bench.bench_finetune(args.student, args.batch, args.steps, args.precision, args.device)
    else:
        record = bench.bench_eval(args.student, args.batch, args.steps, args.device)
    print(json.dumps(record))
    if args.write:
        from .bench_report import PAGE, save

        print(f"kept in {save(record)}; {PAGE} rewritten")


def cmd_report(args: argparse.Namespace) -> None:
    from .reports import render_report

    paths = render_report(args.runs, args.out)
    print(f"report: {paths['markdown']} and {paths['html']}")


def cmd_doctor(args: argparse.Namespace) -> None:
    from .doctor import run_doctor

    run_doctor(args.profile, args.steps, args.device, args.batch, args.only.split(",") if args.only else None)


def cmd_check_data(args: argparse.Namespace) -> None:
    from .data import DataError, check_images

    n, bad = check_images(args.root, args.workers)
    for line in bad:
        print(line)
    print(f"{n} images checked, {len(bad)} unreadable")
    if bad:
        raise DataError(f"{args.root}: {len(bad)} of {n} images cannot be read (listed above)")


def _args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["distill", "finetune", "eval", "data"])
    p.add_argument("--images", type=int, default=96, help="data: how many ImageNet-like JPEGs to generate and read")
    p.add_argument("--student", default="vit_tiny", help="the student (distill) or the model (finetune, eval)")
    p.add_argument("--teacher", default="vit_base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: what amp=auto picks on this device")
    p.add_argument("--compile", action="store_true", help="torch.compile the default path's forward")
    p.add_argument("--teacher-quant", choices=TEACHER_QUANT, default="none",
                   help="distill: also time the step with a quantised teacher and report its loss deviation")
    p.add_argument("--write", action="store_true",
                   help="keep the record in reports/bench/ and regenerate BENCHMARKS.md (run from the repository root)")
    _device(p)


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (seeds of one config are averaged; other configs side by side)")
    p.add_argument("--out", default=None, help="where REPORT.md, report.html and figures/ go "
                                               "(default: the run directory; ./report for several)")


def _args_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default="paper", help="paper sizes (default) or the smoke ones")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per stage (after one warm-up step)")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch per device, even (default: the largest that fits on a GPU; 2 on a CPU)")
    p.add_argument("--only", default=None, help="comma-separated: mae,pretrain,finetune,segmentation,evaluate,data")
    _device(p)


def _args_check_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="a folder of images (searched recursively), e.g. /data/imagenet")
    p.add_argument("--workers", type=int, default=8, help="parallel readers")


def _args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=sorted(CONFIGS))
    p.add_argument("--model", default=None, help="e.g. vit_tiny, vit_small, vit_base, micro_tiny")
    _profile_and_overrides(p)


def _args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default="smoke")
    p.add_argument("--out", default=None, help="run directory (default: reports/<profile>, or reports/<profile>-<data> "
                                              "with --data)")
    p.add_argument("--data", default=None, help="every notebook's data: synthetic (default) | digits | a folder with "
                                               "train/ and val/ class folders (notebook 04 then says it skips)")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,02")
    p.add_argument("--notebooks", default=None, help="folder of NN_*.ipynb notebooks (default: the kit's own)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="extra papermill parameter (JSON value or string), repeatable")
    p.add_argument("--device", default=None, help="every notebook's `device` parameter (default: auto)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per training stage (default: one per visible GPU; >1 launches torchrun)")
    p.add_argument("--cluster", choices=["slurm"], default=None,
                   help="every training stage as a SLURM job of the shape below (the notebooks' `cluster`)")
    p.add_argument("--detach", action="store_true",
                   help="with --cluster: submit the notebooks as chained SLURM jobs and return at once; "
                        "a later `tinymim run` renders what has finished")
    _cluster_args(p)


def _args_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default 3)")
    p.add_argument("--only", default=None, help="comma-separated rows a-i (default: all; scratch and the "
                                               "teacher always run, and what each row is compared with)")
    p.add_argument("--out", default=None, help="study directory (default: reports/study, reports/study-digits; "
                                              "a folder's study: the cache)")
    p.add_argument("--data", default="synthetic", help="synthetic (default) | digits | a folder with train/ and val/ "
                                                       "class folders")
    p.add_argument("--budget", default="study",
                   help="study (about 15 min per seed on 2 CPU cores) | tiny (a machinery check)")
    p.add_argument("--device", default=None, help="default: auto (a GPU when there is one)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per training stage (default: one per visible GPU; >1 launches torchrun)")
    p.add_argument("--cluster", choices=["slurm"], default=None, help="every training stage as a SLURM job")
    p.add_argument("--detach", action="store_true",
                   help="with --cluster: the teacher's job and the runs as a job array, returning at once; "
                        "a later `tinymim study` reads the finished runs and writes the report")
    _cluster_args(p)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    """The SLURM job's shape (`cluster.Cluster`), shared by `submit` and `run --cluster slurm`."""
    g = p.add_argument_group("SLURM job (submitit)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (default 0: a CPU partition)")
    g.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node, or 1 without GPUs")
    for name in ("partition", "account", "qos", "constraint"):
        g.add_argument(f"--{name}", default=None)
    g.add_argument("--mem", default=None, help="memory per node, SLURM's syntax (e.g. 480G)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="data-loader workers + 1, per GPU task")
    g.add_argument("--time", default="4:00", help="time limit per attempt, [D-]H:MM (requeued on the limit)")


def _cluster_from(args: argparse.Namespace):
    from .cluster import Cluster

    return Cluster.from_dict({k: getattr(args, k) for k in (
        "nodes", "gpus_per_node", "tasks_per_node", "partition", "account", "qos", "constraint", "mem",
        "cpus_per_task", "time")})


def _args_submit(p: argparse.ArgumentParser) -> None:
    from . import stages

    p.add_argument("stage", choices=[n for s in stages.names() for n in (s, *stages.get(s).aliases)])
    _training(p, "e.g. vit_small (paper) or micro_tiny (smoke)")
    _cluster_args(p)
    p.add_argument("--wait", action="store_true", help="follow rank 0's progress and print the result when it ends")


def _args_pretrain(p: argparse.ArgumentParser) -> None:
    _training(p, "the student, e.g. vit_small (paper) or micro_tiny (smoke)")
    p.add_argument("--chain", default=None,
                   help="sequential distillation: comma-separated students, each the next one's teacher, "
                        "e.g. vit_small,vit_tiny")


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a tinymim classifier checkpoint, or timm:<model name>=<weights file>")
    p.add_argument("--data", required=True, help="'synthetic' or an ImageNet root (uses <data>/val)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None, help="data-loader processes (default: from the CPUs)")
    _device(p)


def _args_robustness(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a tinymim classifier checkpoint, or timm:<model name>=<weights file>")
    p.add_argument("--imagenet-a", default=None, help="folder of the 200 ImageNet-A wnids")
    p.add_argument("--imagenet-r", default=None, help="folder of the 200 ImageNet-R wnids")
    p.add_argument("--imagenet-c", default=None, help="ImageNet-C root: <corruption>/<severity>/<wnid>/")
    _device(p)
    _profile_and_overrides(p, default_profile="paper")


def _stage_commands() -> dict[str, tuple[str, Callable, Callable]]:
    """One command per registered training stage (and one per alias), torchrun-ready."""
    from . import stages

    out = {}
    for name in stages.names():
        stage = stages.get(name)
        arguments = _args_pretrain if name == "pretrain" else (lambda p: _training(p, "e.g. vit_small (paper) or "
                                                                                       "micro_tiny (smoke)"))
        for command in (name, *stage.aliases):
            out[command] = (f"{stage.help} (torchrun-ready)" + ("" if command == name else f"; = {name}"),
                            arguments, cmd_stage)
    return out


# name -> (help, arguments, action)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "config": ("print the resolved config of a stage as JSON", _args_config, cmd_config),
    "run": ("execute the notebooks in order into a run directory", _args_run, cmd_run),
    **_stage_commands(),
    "submit": ("a training stage as one SLURM job (submitit): one task per GPU, requeued on preemption",
               _args_submit, cmd_submit),
    "evaluate": ("top-1/top-5 of a fine-tuned checkpoint", _args_evaluate, cmd_evaluate),
    "robustness": ("ImageNet-A/R top-1 and ImageNet-C CE/mCE of a classifier", _args_robustness, cmd_robustness),
    "bench": ("images/s, FLOPs and %% of the measured matmul peak of a step, against the released formulation",
              _args_bench, cmd_bench),
    "study": ("the paper's ablations (a)-(i) on the built-in data over seeds, with a verdict per finding "
              "(runs notebook 08)", _args_study, cmd_study),
    "report": ("REPORT.md + self-contained report.html of run directories, next to the paper's numbers",
               _args_report, cmd_report),
    "doctor": ("environment, then images/s, memory and paper-schedule estimates of every stage on this host",
               _args_doctor, cmd_doctor),
    "check-data": ("open every image under a folder and list the unreadable ones", _args_check_data, cmd_check_data),
}


def _known_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .data import DataError
    from .engine import TrainingDiverged
    from .launch import LaunchFailed
    from .pipeline import MissingInput
    from .runner import NotebookFailed

    # ValueError: what our checks raise on combinations (teacher vs config, pairings, plans) and
    # on a device that is not there (devices.DeviceError)
    return CheckpointError, DataError, LaunchFailed, MissingInput, NotebookFailed, TrainingDiverged, ValueError


def _message(e: BaseException) -> str:
    """One line naming the input and, where we know it, what to do."""
    import errno

    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return ("out of memory on the device; lower the per-device micro-batch (e.g. --set micro_batch_size=32): "
                "gradient accumulation keeps the effective batch_size, and the run resumes from its checkpoint")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full while writing {e.filename or 'a file'}; free space and run the same command again (it resumes)"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {e.filename or 'the output'}; choose another --out"
    if isinstance(e, OSError) and e.errno == errno.ENOENT:
        return f"{e.filename}: not found"
    text = str(e)
    if "Original Traceback" in text:  # raised in a DataLoader worker: keep the original error's own line
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    parser = argparse.ArgumentParser(prog="tinymim", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", default=os.environ.get("TINYMIM_DEBUG") == "1",
                        help="show the full traceback of an error (also TINYMIM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # under torchrun every rank prints its own error line, tagged (launch.torchrun reads it)
    error = f"error (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "error"
    try:
        COMMANDS[args.command][2](args)
    except ConfigError as e:
        if args.debug:
            raise
        sys.stderr.write(f"{error}: {_message(e)}\n")  # one write: ranks share the launcher's pipe
        return 2
    except (*_known_errors(), OSError, torch.OutOfMemoryError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"{error}: {_message(e)}\n")  # one write: ranks share the launcher's pipe
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        from .distributed import teardown

        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
