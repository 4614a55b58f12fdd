"""Summary statistics of metric values: :class:`Stat` over seeds (reports and regress) and
:class:`Interval`, a bootstrap interval over test images (:mod:`bench.uncertainty`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


def finite_values(values: Iterable[Any]) -> list[float]:
    """The finite numbers among ``values`` (None, NaN, inf and booleans dropped)."""
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof 1) and count of the finite values of a metric."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[Any], single_std: float | None = None) -> Stat:
        """The statistics of ``values``; with one value the std is ``single_std`` (a report
        shows none, a regression baseline stores 0); with none, ``Stat(None, None, 0)``."""
        finite = finite_values(values)
        if not finite:
            return cls(None, None, 0)
        std = statistics.stdev(finite) if len(finite) > 1 else single_std
        return cls(statistics.fmean(finite), std, len(finite))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval: ``[low, high]`` at ``level`` from ``replicates``."""

    low: float
    high: float
    level: float
    replicates: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "level": self.level,
                "replicates": self.replicates}
