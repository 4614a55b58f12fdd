"""Method against method over categories: paired differences, the Friedman test, Nemenyi's CD.

Paired difference of a method against a reference, for one protocol and metric: over the
categories where both have a value, the mean of (method - reference), with

- a 95 % interval over **test images**: the paired bootstrap of :mod:`bench.uncertainty` (both
  methods' replicates come from the same resamples of each category's test set), averaged over
  categories replicate by replicate. "Inside the noise" means this interval holds 0: another
  draw of test images could reverse the sign;
- a 95 % interval over **categories** (Student t with n - 1 degrees of freedom on the
  per-category differences): how much the mean would move with other categories of the same
  kind. It is the wider question and needs several categories;
- wins / ties / losses over categories at the printed precision.

Friedman test (Demšar 2006, JMLR 7:1-30): the methods ranked within each category (1 = best,
ties share their average rank), chi-square with the usual tie correction (as
``scipy.stats.friedmanchisquare``, which refuses fewer than three methods; the statistic is
defined for two and is computed here by the formula), Iman and Davenport's F refinement, and
the Nemenyi critical difference CD = q_alpha sqrt(k (k + 1) / (6 N)) with q_alpha the
studentized range quantile over sqrt(2): two methods whose average ranks differ by more than CD
differ at level alpha. Categories where any method lacks a value are left out (a block must be
complete).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bench.stats import Interval
from bench.uncertainty import LEVEL, interval, mean_deviations

ALPHA = 0.05


@dataclass(frozen=True)
class PairedDifference:
    """Mean over categories of (method - reference) for one protocol and metric."""

    method: str
    reference: str
    categories: tuple[str, ...]
    mean: float
    test_interval: Interval | None  # paired bootstrap over test images
    category_interval: tuple[float, float] | None  # Student t over categories (n >= 2)
    wins: int
    ties: int
    losses: int

    @property
    def inside_noise(self) -> bool | None:
        """Whether the test-image interval holds 0 (None without an interval)."""
        if self.test_interval is None:
            return None
        return self.test_interval.contains(0.0)


def paired_difference(method: str, reference: str, values: Mapping[str, float],
                      reference_values: Mapping[str, float],
                      deviations: Mapping[str, np.ndarray | None],
                      reference_deviations: Mapping[str, np.ndarray | None],
                      level: float = LEVEL, decimals: int = 3) -> PairedDifference | None:
    """The paired difference over the categories both have; None without a common one.

    ``values`` map a category to the method's value (mean over seeds); ``deviations`` map it to
    the bootstrap deviations of that value (None where not available)."""
    from scipy import stats

    categories = tuple(c for c in values if c in reference_values)
    if not categories:
        return None
    diffs = np.array([values[c] - reference_values[c] for c in categories])
    mean = float(diffs.mean())
    parts = []
    for c in categories:
        a, b = deviations.get(c), reference_deviations.get(c)
        parts.append(None if a is None or b is None else a - b)
    combined = mean_deviations(parts)
    test_interval = (None if combined is None
                     else interval(mean, combined, level, bounds=(-1.0, 1.0)))
    category_interval = None
    if len(categories) >= 2:
        half = float(stats.t.ppf(0.5 + level / 2, len(categories) - 1)
                     * diffs.std(ddof=1) / math.sqrt(len(categories)))
        category_interval = (mean - half, mean + half)
    rounded = np.round(np.array([values[c] for c in categories]), decimals) - np.round(
        np.array([reference_values[c] for c in categories]), decimals)
    wins = int(np.sum(rounded > 1e-12))
    losses = int(np.sum(rounded < -1e-12))
    return PairedDifference(method, reference, categories, mean, test_interval,
                            category_interval, wins, len(categories) - wins - losses, losses)


@dataclass(frozen=True)
class Friedman:
    """The Friedman test of k methods over N complete categories, with Nemenyi's CD."""

    methods: tuple[str, ...]
    categories: tuple[str, ...]
    average_ranks: tuple[float, ...]  # 1 = best, in the order of ``methods``
    statistic: float  # chi-square, tie-corrected; NaN when every category ties everywhere
    p_value: float
    iman_davenport: float
    iman_davenport_p: float
    critical_difference: float
    alpha: float

    def nemenyi_p(self) -> np.ndarray:
        """(k, k) Nemenyi p-values from the average ranks (1 on the diagonal)."""
        from scipy.stats import studentized_range

        k, n = len(self.methods), len(self.categories)
        ranks = np.asarray(self.average_ranks)
        q = np.abs(ranks[:, None] - ranks[None, :]) / math.sqrt(k * (k + 1) / (6.0 * n))
        return np.clip(studentized_range.sf(q * math.sqrt(2.0), k, np.inf), 0.0, 1.0)

    def differ(self, i: int, j: int) -> bool:
        return abs(self.average_ranks[i] - self.average_ranks[j]) > self.critical_difference


def friedman(values: np.ndarray, methods: Sequence[str], categories: Sequence[str],
             alpha: float = ALPHA, higher_is_better: bool = True) -> Friedman | None:
    """The test on ``values`` (N categories, k methods); None with fewer than 2 of either."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n, k = values.shape
    if n < 2 or k < 2 or not np.isfinite(values).all():
        return None
    ranks = stats.rankdata(-values if higher_is_better else values, axis=1)  # ties: average
    sums = ranks.sum(axis=0)
    chi2 = 12.0 / (n * k * (k + 1)) * float(np.sum(sums ** 2)) - 3.0 * n * (k + 1)
    ties = 0.0
    for row in ranks:
        _, counts = np.unique(row, return_counts=True)
        ties += float(np.sum(counts ** 3 - counts))
    correction = 1.0 - ties / (n * k * (k * k - 1))
    if correction <= 0:
        statistic = p_value = f_stat = f_p = float("nan")
    else:
        statistic = chi2 / correction
        p_value = float(stats.chi2.sf(statistic, k - 1))
        denominator = n * (k - 1) - statistic
        f_stat = (n - 1) * statistic / denominator if denominator > 0 else float("inf")
        f_p = float(stats.f.sf(f_stat, k - 1, (k - 1) * (n - 1)))
    q_alpha = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2.0)
    cd = q_alpha * math.sqrt(k * (k + 1) / (6.0 * n))
    return Friedman(tuple(methods), tuple(categories), tuple(float(r) for r in ranks.mean(0)),
                    float(statistic), float(p_value), float(f_stat), float(f_p), cd, alpha)
