"""scripts/gpu_check.sh, the acceptance run for a lent GPU, in its dry mode (CPU, gloo, smoke
sizes): every check runs and reports one JSON line as it finishes."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a dozen short processes, about two minutes

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def test_the_dry_run_passes_every_check_and_logs_each_as_it_goes(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["check"] for r in records][0] == "environment" and records[-1]["check"] == "done"
    stages = {r["check"] for r in records if r["check"].startswith("torchrun-")}
    assert stages == {f"torchrun-{s}" for s in ("mae", "relation", "feature", "chain", "finetune", "star", "segmentation",
                                                 "augment-device")}
    failed = {r["check"]: r["tail"] for r in records[:-1] if r["rc"] != 0}
    assert not failed, failed
    by_name = {r["check"]: r for r in records}
    assert {"torch", "gpus"} <= set(by_name["environment"]["records"][0])
    assert by_name["bench-distill"]["records"][0]["bench"] == "distill"
    assert set(by_name["bench-data"]["records"][0]["pipelines"]) == {"pretrain", "finetune"}
    assert any(r["check"] == "data" for r in by_name["doctor"]["records"])
    assert proc.stdout.count("\n") == len(records)  # the same lines on stdout, as they come
