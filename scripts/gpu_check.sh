#!/usr/bin/env bash
# The one-shot acceptance run for a lent GPU (docs/gpu-hosts.md), about 5 minutes on one GPU.
#
#   scripts/gpu_check.sh [--dry] [OUT]
#
# One JSON line per check on stdout and appended to OUT/gpu_check.jsonl as it finishes, so a run
# cut off still reports what it did: the environment; `torchrun --nproc_per_node 1` (NCCL at
# world size 1: real collectives on CUDA tensors, the DDP wrapper) for a few steps of every
# stage; `tinymim doctor --steps 3`; `tinymim bench distill` (ViT-S <- ViT-B, batch 64, bf16);
# `tinymim bench data`; and, where papermill is installed, notebook 02 on cuda. The core checks
# need only torch, timm and the kit (the GPU machine may have another Python). --dry runs the
# same checks at smoke sizes on the CPU (gloo), as the test suite does.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TINYMIM_CACHE="${TINYMIM_CACHE:-$OUT/cache}"
LOG="$OUT/gpu_check.jsonl"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu PROFILE=smoke LIMIT=60
  STEPS=(--set steps=2 --set warmup_steps=1 --set batch_size=8 --set data_limit=32 --set log_every=1)
  DOCTOR=(doctor --profile smoke --steps 1 --batch 2 --device cpu --only pretrain,data)
  BENCH=(bench distill --student micro_tiny --teacher micro_base --batch 8 --steps 1 --precision fp32 --device cpu)
  DATA=(bench data --images 8 --device cpu)
else
  DEVICE=cuda PROFILE=smoke LIMIT=120
  STEPS=(--set steps=3 --set warmup_steps=1 --set log_every=1)
  DOCTOR=(doctor --steps 3)
  BENCH=(bench distill --student vit_small --teacher vit_base --batch 64 --precision bf16)
  DATA=(bench data)
fi

# check NAME SECONDS COMMAND...: run it, then emit one JSON line with its exit code, seconds,
# the JSON lines it printed, and the tail of the rest of its output
check() {
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  "$PY" - "$name" "$rc" "$start" "$OUT/$name.log" <<'PY' | tee -a "$LOG"
import json, sys, time
name, rc, start, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
records, other = [], []
for line in open(log, errors="replace").read().splitlines():
    try:
        value = json.loads(line)
        records.append(value) if isinstance(value, dict) else other.append(line)
    except json.JSONDecodeError:
        other.append(line)
print(json.dumps({"check": name, "rc": rc, "timed_out": rc in (124, 137), "seconds": round(time.time() - start, 1),
                  "records": records, "tail": other[-8:] if rc else []}), flush=True)
PY
}

check environment 60 "$PY" -c "import json, torch; from tinymim.devices import environment; \
print(json.dumps(environment(free_memory=torch.cuda.is_available())))"

TEACHER="$OUT/teacher.pth"
"$PY" -c "import torch; from tinymim.checkpoints import save_model; from tinymim.models import ModelSpec, build_model; \
torch.manual_seed(0); save_model(build_model(ModelSpec.create('micro_base')), '$TEACHER')"
CLASSIFIER="$OUT/classifier.pth"
"$PY" -c "import torch; from tinymim.checkpoints import save_model; from tinymim.models import ModelSpec, build_model; \
torch.manual_seed(0); save_model(build_model(ModelSpec.create('micro_small', num_classes=10)), '$CLASSIFIER')"
run1() {  # one rank under torchrun: the process group, NCCL on a GPU, DDP
  local name=$1; shift
  check "torchrun-$name" "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m tinymim "$@" \
    --out "$OUT/runs/$name" --device "$DEVICE" --profile "$PROFILE" "${STEPS[@]}"
}
run1 mae mae
run1 relation pretrain --set "teacher_path=$TEACHER"
run1 feature pretrain --set "teacher_path=$TEACHER" --set target=feature
run1 chain pretrain --set "teacher_path=$TEACHER" --chain micro_small,micro_tiny
run1 finetune finetune
run1 star finetune --set dist_token=true --set extra_fc=64 --set heads=6 --set mixup=0 --set cutmix=0 \
  --set "teacher_classifier=$CLASSIFIER"
run1 segmentation segmentation
run1 augment-device pretrain --set "teacher_path=$TEACHER" --set augment=device

check doctor 240 "$PY" -m tinymim "${DOCTOR[@]}"
check bench-distill 120 "$PY" -m tinymim "${BENCH[@]}"
check bench-data 120 "$PY" -m tinymim "${DATA[@]}"
if "$PY" -c "import papermill" 2>/dev/null && [ "$DRY" = 0 ]; then
  check notebook-02 300 "$PY" -m tinymim run --only 02 --out "$OUT/run" --device cuda
fi
"$PY" -c "import json; print(json.dumps({'check': 'done', 'log': '$LOG'}))" | tee -a "$LOG"
