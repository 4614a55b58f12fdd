"""Paired differences over categories, the Friedman test and Nemenyi's critical difference."""

import math

import numpy as np
import pytest
from scipy import stats

from bench.comparisons import friedman, paired_difference


def test_friedman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    values = np.round(rng.random((9, 4)), 1)  # one decimal: ties inside categories
    result = friedman(values, ["a", "b", "c", "d"], [f"c{i}" for i in range(9)])
    expected = stats.friedmanchisquare(*values.T)
    assert result.statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-12)
    # Ranks: 1 = best (highest value), ties averaged.
    ranks = stats.rankdata(-values, axis=1).mean(axis=0)
    assert result.average_ranks == pytest.approx(tuple(ranks))
    n, k = values.shape
    f = (n - 1) * result.statistic / (n * (k - 1) - result.statistic)
    assert result.iman_davenport == pytest.approx(f)


def test_critical_difference_is_demsars():
    # Demšar (2006), section 3.2.2: k = 4 classifiers, N = 14 data sets, CD = 1.25 at 0.05.
    result = friedman(np.random.default_rng(1).random((14, 4)), list("abcd"),
                      [str(i) for i in range(14)])
    assert result.critical_difference == pytest.approx(1.25, abs=0.005)
    # Nemenyi's p-values and the CD say the same thing about every pair.
    p = result.nemenyi_p()
    for i in range(4):
        for j in range(4):
            if i != j:
                assert (p[i, j] < result.alpha) == result.differ(i, j)
    assert np.allclose(np.diag(p), 1.0)


def test_friedman_with_two_methods_and_degenerate_input():
    values = np.array([[0.9, 0.8], [0.95, 0.7], [0.91, 0.9], [0.8, 0.7]])
    result = friedman(values, ["a", "b"], list("wxyz"))
    assert result.average_ranks == (1.0, 2.0)
    # Two methods, a always better: chi2 = N (k = 2).
    assert result.statistic == pytest.approx(4.0)
    assert friedman(values[:1], ["a", "b"], ["w"]) is None  # one category
    assert friedman(values[:, :1], ["a"], list("wxyz")) is None  # one method
    tied = friedman(np.ones((3, 3)), list("abc"), list("xyz"))
    assert math.isnan(tied.statistic) and tied.average_ranks == (2.0, 2.0, 2.0)


def test_paired_difference_intervals_and_counts():
    values = {"a": 0.90, "b": 0.80, "c": 0.70}
    ref = {"a": 0.85, "b": 0.80, "c": 0.72, "d": 0.5}  # d: the method has no value there
    dev = {c: np.linspace(-0.01, 0.01, 201) for c in values}
    ref_dev = {c: np.zeros(201) for c in ref}
    result = paired_difference("m", "r", values, ref, dev, ref_dev)
    assert result.categories == ("a", "b", "c")
    assert result.mean == pytest.approx((0.05 + 0.0 - 0.02) / 3)
    assert (result.wins, result.ties, result.losses) == (1, 1, 1)
    # Averaged deviations over categories: the same linspace, so [mean - 0.0095, mean + 0.0095].
    assert result.test_interval.low == pytest.approx(result.mean - 0.0095)
    assert result.inside_noise is False  # 0.01 > 0.0095
    diffs = np.array([0.05, 0.0, -0.02])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert result.category_interval == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    # A category without deviations: no test-image interval, the rest stands.
    partial = paired_difference("m", "r", values, ref, {**dev, "b": None}, ref_dev)
    assert partial.test_interval is None and partial.inside_noise is None
    assert paired_difference("m", "r", {"x": 1.0}, ref, {}, {}) is None


def test_nemenyi_p_values_match_scikit_posthocs():
    import scikit_posthocs as sp

    values = np.random.default_rng(3).random((12, 4))
    result = friedman(values, list("abcd"), [str(i) for i in range(12)])
    # scikit-posthocs ranks within blocks itself; its p-values depend on rank differences only.
    expected = sp.posthoc_nemenyi_friedman(values).to_numpy()
    assert np.allclose(result.nemenyi_p(), expected, atol=1e-6)
