"""Command line: `python -m tinymim config|run|mae ...` (see README.md)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import PROFILES, STAGES, ConfigError, get_config, parse_overrides


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default="smoke", help="smoke (CPU minutes) or paper (Tables 1-3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set lr=1e-3 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinymim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config of a stage as JSON")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--model", default=None, help="e.g. vit_tiny, vit_small, vit_base, micro_tiny")
    _add_common(p)

    p = sub.add_parser("run", help="execute the notebooks in order into a run directory")
    p.add_argument("--profile", choices=PROFILES, default="smoke")
    p.add_argument("--out", default=None, help="run directory (default: reports/<profile>)")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,02")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="extra papermill parameter (JSON value or string), repeatable")

    p = sub.add_parser("mae", help="MAE pre-training of a teacher encoder (torchrun-ready)")
    p.add_argument("--model", default=None)
    p.add_argument("--out", required=True, help="run directory; teacher.pth is written there")
    _add_common(p)

    p = sub.add_parser("pretrain", help="TinyMIM distillation pre-training (torchrun-ready)")
    p.add_argument("--model", default=None, help="the student, e.g. vit_small (paper) or micro_tiny (smoke)")
    p.add_argument("--out", required=True, help="run directory (resumes if it holds a checkpoint)")
    p.add_argument("--chain", default=None,
                   help="sequential distillation: comma-separated students, each the next one's teacher, "
                        "e.g. vit_small,vit_tiny")
    _add_common(p)

    p = sub.add_parser("finetune", help="ImageNet fine-tuning / TinyMIM*-T distillation fine-tuning (torchrun-ready)")
    p.add_argument("--model", default=None, help="e.g. vit_tiny, vit_small, vit_base, tinymim_star_tiny")
    p.add_argument("--out", required=True, help="run directory (resumes if it holds a checkpoint)")
    _add_common(p)

    p = sub.add_parser("evaluate", help="top-1/top-5 of a fine-tuned checkpoint")
    p.add_argument("checkpoint", help="a tinymim classifier checkpoint, or timm:<model name>=<weights file>")
    p.add_argument("--data", required=True, help="'synthetic' or an ImageNet root (uses <data>/val)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=8)

    p = sub.add_parser("segment", help="ADE20K UperNet fine-tuning + mIoU (torchrun-ready)")
    p.add_argument("--model", default=None)
    p.add_argument("--out", required=True, help="run directory (resumes if it holds a checkpoint)")
    _add_common(p)

    p = sub.add_parser("robustness", help="ImageNet-A/R top-1 and ImageNet-C CE/mCE of a classifier")
    p.add_argument("checkpoint", help="a tinymim classifier checkpoint, or timm:<model name>=<weights file>")
    p.add_argument("--imagenet-a", default=None, help="folder of the 200 ImageNet-A wnids")
    p.add_argument("--imagenet-r", default=None, help="folder of the 200 ImageNet-R wnids")
    p.add_argument("--imagenet-c", default=None, help="ImageNet-C root: <corruption>/<severity>/<wnid>/")
    p.add_argument("--profile", choices=PROFILES, default="paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            cfg = get_config(args.stage, args.model, args.profile, parse_overrides(args.overrides))
            print(json.dumps(cfg.to_dict(), indent=2))
        elif args.command == "run":
            from .runner import NotebookFailed, run

            params = {}
            for k, v in parse_overrides(args.params).items():
                try:
                    params[k] = json.loads(v)
                except json.JSONDecodeError:
                    params[k] = v
            try:
                result = run(args.profile, args.out, args.only.split(",") if args.only else None, parameters=params)
            except NotebookFailed as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"run directory: {result.run_dir}")
        elif args.command == "mae":
            from .engine import setup_distributed
            from .mae import pretrain_mae

            cfg = get_config("mae", args.model, args.profile, parse_overrides(args.overrides))
            print(f"teacher: {pretrain_mae(cfg, args.out, device=setup_distributed())}")
        elif args.command == "pretrain":
            from .engine import setup_distributed
            from .pretrain import pretrain, pretrain_sequential

            cfg = get_config("pretrain", args.model, args.profile, parse_overrides(args.overrides))
            device = setup_distributed()
            if args.chain:
                paths = pretrain_sequential(cfg, args.chain.split(","), args.out, device=device)
            else:
                paths = [pretrain(cfg, args.out, device=device)]
            print("students: " + ", ".join(map(str, paths)))
        elif args.command == "finetune":
            from .engine import setup_distributed
            from .finetune import train_classifier

            cfg = get_config("finetune", args.model, args.profile, parse_overrides(args.overrides))
            _, metrics = train_classifier(cfg, args.out, device=setup_distributed())
            print(json.dumps(metrics, indent=2))
        elif args.command == "evaluate":
            from types import SimpleNamespace

            from .finetune import evaluate
            from .models import load_classifier

            model = load_classifier(args.checkpoint, args.num_classes)
            where = SimpleNamespace(data=args.data, input_size=args.input_size, num_workers=args.workers)
            print(json.dumps(evaluate(model, where), indent=2))
        elif args.command == "segment":
            from .engine import setup_distributed
            from .segmentation import train_segmentation

            cfg = get_config("segmentation", args.model, args.profile, parse_overrides(args.overrides))
            _, metrics = train_segmentation(cfg, args.out, device=setup_distributed())
            print(json.dumps({k: v for k, v in metrics.items() if k != "per_class_IoU"}, indent=2))
        elif args.command == "robustness":
            from .models import load_classifier
            from .robustness import evaluate_robustness

            cfg = get_config("robustness", profile=args.profile, overrides=parse_overrides(args.overrides))
            model = load_classifier(args.checkpoint, num_classes=None)
            print(json.dumps(evaluate_robustness(model, cfg, args.imagenet_a, args.imagenet_r, args.imagenet_c),
                             indent=2))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
