"""Numbers over seeds, written once: mean ± std, seed-paired gains, and the verdict rule.

Notebook 03's comparison (distilled vs scratch), the report's findings and the study's
verdicts all summarise with these, so a single seed, a sample standard deviation and a
"holds" mean the same thing everywhere.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of `values` (std None for a single value: one seed
    says nothing about the spread)."""

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.mean:.1f}" if self.std is None else f"{self.mean:.1f} ± {self.std:.1f}"

    def signed(self) -> str:
        """A gain: its sign always shown."""
        return f"{self.mean:+.1f}" if self.std is None else f"{self.mean:+.1f} ± {self.std:.1f}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Summary:
        """A summary as `to_dict` recorded it (a run's metrics.json)."""
        return cls(d["mean"], d["std"], d["n"], tuple(d["values"]))


def mean_std(values: Iterable[float]) -> Summary:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("mean_std: no values")
    std = statistics.stdev(values) if len(values) > 1 else None
    return Summary(statistics.fmean(values), std, len(values), values)


def paired_gain(better: Mapping[Any, float], worse: Mapping[Any, float], higher_is_better: bool = True) -> Summary | None:
    """The per-seed difference better - worse over the seeds both have (for an error metric,
    worse - better, so a positive gain always means `better` did better); None without a
    common seed."""
    seeds = sorted(set(better) & set(worse), key=str)
    if not seeds:
        return None
    sign = 1 if higher_is_better else -1
    return mean_std(sign * (better[s] - worse[s]) for s in seeds)


def verdict(gain: Summary | None) -> str:
    """Inconclusive when |mean| <= 2 std (or with one seed); else the claim holds or, by the
    sign, does not hold at this scale."""
    if gain is None:
        return "not run"
    if gain.std is None:
        return "inconclusive (one seed)"
    if abs(gain.mean) <= 2 * gain.std:
        return "inconclusive given the std"
    return "holds" if gain.mean > 0 else "does not hold at this scale"
