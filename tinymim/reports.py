"""Metrics records of a run directory.

Every notebook ends by recording what it measured under its own name in
`<run_dir>/metrics.json`; report tables are built only from these records, so a report
can never show a number that no run produced.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # not measured (or undefined): JSON has no NaN, and a report shows a gap
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not JSON data")


def record_metrics(run_dir: str | os.PathLike, section: str, metrics: dict[str, Any]) -> Path:
    """Merge `metrics` under `section` into run_dir/metrics.json (atomic rewrite)."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_metrics(run_dir)
    data[section] = {**_jsonable(metrics), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode()))


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
