"""Every training stage and variant, a few steps each, in one 2-rank torchrun job (gloo).

Run by tests/test_ranks.py as `torchrun --standalone --nproc_per_node 2 tests/ranks_job.py OUT`.
Each stage runs through its own function, as `tinymim <stage>` calls it, in one process group:
DDP's unused-parameter check, the barrier after rank 0's writes (the chain's next teacher),
SyncBatchNorm only on CUDA, sharded evaluation and a resume on more ranks than the checkpoint
had are all exercised here. Rank 0 writes OUT/summary.json: each run's last logged losses and
its evaluation, as the 2 ranks computed them.
"""

import json
import sys
from pathlib import Path

import torch

from tinymim import distributed, engine
from tinymim.finetune import train_classifier
from tinymim.mae import pretrain_mae
from tinymim.presets import get_config
from tinymim.pretrain import pretrain, pretrain_sequential
from tinymim.segmentation import train_segmentation

TINY = {"steps": 3, "warmup_steps": 1, "batch_size": 16, "data_limit": 64, "log_every": 1, "ckpt_every": 3,
        "amp": "none", "drop_path": 0.0}


def configs(out: Path) -> dict[str, tuple[str, dict]]:
    """name -> (stage, overrides): what this job trains (tests/test_ranks.py reads it too)."""
    teacher = str(out / "teacher.pth")
    pre = TINY | {"teacher_path": teacher}
    return {
        "mae": ("mae", TINY | {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}),
        "relation": ("pretrain", pre),
        "feature": ("pretrain", pre | {"target": "feature"}),
        "cls": ("pretrain", pre | {"target": "cls"}),
        "masked": ("pretrain", pre | {"mask_ratio": 0.5}),
        "resumed": ("pretrain", pre | {"steps": 4}),  # its first 2 steps were taken by 1 process
        "finetune": ("finetune", TINY | {"rand_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8,
                                         "cutmix": 1.0}),
        "star": ("finetune", TINY | {"dist_token": True, "extra_fc": 64, "heads": 6, "mixup": 0.0, "cutmix": 0.0,
                                     "teacher_classifier": str(out / "classifier.pth")}),
        "segmentation": ("segmentation", TINY | {"batch_size": 8, "channels": 16, "aux_channels": 8}),
    }


def main(out: Path) -> None:
    device = distributed.setup("cpu")
    rank, world_size = distributed.world()
    assert world_size == 2, "run under torchrun --nproc_per_node 2"
    summary: dict[str, dict] = {}
    for name, (stage, overrides) in configs(out).items():
        cfg = get_config(stage, "micro_base" if stage == "mae" else None, "smoke", overrides)
        run_dir = out / name
        if stage == "mae":
            pretrain_mae(cfg, run_dir, progress=False, device=device)
        elif stage == "pretrain":
            pretrain(cfg, run_dir, progress=False, device=device)
        elif stage == "finetune":
            summary[name] = {"eval": train_classifier(cfg, run_dir, progress=False, device=device)[1]}
        else:
            summary[name] = {"eval": train_segmentation(cfg, run_dir, progress=False, device=device)[1]}
        summary.setdefault(name, {})["losses"] = [r["loss"] for r in engine.read_metrics(run_dir)]
    # sequential distillation: the second student's teacher is the first's, written by rank 0
    chain = get_config("pretrain", None, "smoke", configs(out)["relation"][1])
    pretrain_sequential(chain, ["micro_small", "micro_tiny"], out / "chain", progress=False, device=device)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary))
    distributed.teardown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
