"""Statistics that hold at 3 to 5 seeds: censored values kept, t-intervals of nominal coverage, exact Spearman
p-values, Holm-adjusted families, barrier intervals that know their pairs share seeds."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from landscape.draw.tables import write_tables
from landscape.stats import correlate, holm, statistics, summarize, t_interval

INF = math.inf


def _rows(values: dict[str, list[float]], metric: str = "flat_radius_x", **extra) -> list[dict]:
    return [{"checkpoint": f"{m}-{i}", "method": m, "seed": i, metric: v, **{k: e[m][i] for k, e in extra.items()}}
            for m, vs in values.items() for i, v in enumerate(vs)]


def test_infinite_values_are_censored_not_dropped(tmp_path):
    flat, sharp = [0.20, 0.22, INF], [0.10, 0.11, 0.12]  # the flattest seed never crosses tau within the grid
    rows = _rows({"flat": flat, "sharp": sharp})
    summary = {s.method: s for s in summarize(rows)}["flat"]
    assert (summary.n, summary.n_infinite) == (2, 1) and summary.mean == pytest.approx(0.21)
    test = statistics(rows).tests[0]
    reference = scipy.stats.mannwhitneyu(flat, sharp, alternative="two-sided")  # inf is the largest rank
    assert (test.n_a, test.n_b) == (3, 3) and test.mann_whitney_u == reference.statistic == 9.0
    assert test.mann_whitney_p == pytest.approx(reference.pvalue) and test.rank_biserial == 1.0
    assert test.welch_p is None and "infinite" in test.reason  # no mean of a censored sample
    markdown = write_tables(rows, tmp_path, statistics(rows))["md"].read_text()
    assert "0.21 ± 0.01414 [" in markdown and "(n=2) + 1 ∞" in markdown and "(n=3)" in markdown


def test_t_interval_has_nominal_coverage_at_small_n():
    """Coverage of the 95% interval of the mean over 40000 simulated samples (binomial s.e. 0.1 points)."""
    rng = np.random.default_rng(0)
    for n in (3, 5, 10):
        normal = rng.normal(1.0, 2.0, size=(40000, n))
        low, high = t_interval(normal)
        assert abs(np.mean((low <= 1.0) & (1.0 <= high)) - 0.95) < 0.02, n
        skewed = rng.lognormal(0.0, 1.0, size=(40000, n))  # mean e^0.5: the coverage docs/metrics.md states
        low, high = t_interval(skewed)
        assert 0.80 < np.mean((low <= math.exp(0.5)) & (math.exp(0.5) <= high)) < 0.92, n
    lone = summarize(_rows({"a": [0.3]}))[0]
    assert lone.ci_low is None and "at least 2" in lone.reason


def _brute_force_p(x, y) -> float:
    """Two-sided p of Spearman's rho by scipy's rho over every ordering of y, written without the library's code."""
    observed = abs(scipy.stats.spearmanr(x, y).statistic)
    null = [abs(scipy.stats.spearmanr(x, list(p)).statistic) for p in itertools.permutations(y)]
    return float(np.mean(np.array(null) >= observed - 1e-12))


def test_spearman_p_is_exact_at_small_n():
    for n, expected in ((3, 1 / 3), (4, 1 / 12)):  # perfect ranks: 2 of the n! orderings are as extreme
        rows = _rows({"pt": list(range(n))}, "grid_sharpness", test_accuracy={"pt": list(range(n))})
        c = correlate(rows, ["grid_sharpness"])[0]
        assert c.spearman_rho == pytest.approx(1.0) and c.p_value == pytest.approx(expected) and c.p_method == "exact"
    x, y = [0.3, 0.1, 0.4, 0.4, 0.9, 0.2], [0.81, 0.80, 0.86, 0.79, 0.84, 0.84]  # ties in both
    rows = _rows({"pt": x[:3], "ptp": x[3:]}, "grid_sharpness", test_accuracy={"pt": y[:3], "ptp": y[3:]})
    c = correlate(rows, ["grid_sharpness"])[0]
    assert c.n == 6 and c.spearman_rho == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert c.p_value == pytest.approx(_brute_force_p(x, y))


def _holm_reference(p: list[float]) -> list[float]:
    """Holm 1979 written as its definition: p_(i) -> max over k <= i of min(1, (m - k + 1) p_(k)), distinct p."""
    m, ordered = len(p), sorted(p)
    return [max(min(1.0, (m - k) * ordered[k]) for k in range(ordered.index(value) + 1)) for value in p]


def test_holm_adjusted_p_values_beside_the_raw_ones():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # by hand
    assert holm([0.2, None, 0.5]) == [0.4, None, 0.5]
    rng = np.random.default_rng(1)
    methods = {m: list(rng.normal(shift, 1.0, 3)) for m, shift in (("pt", 0.0), ("ptp-rn", 1.0), ("ptp-adv", 3.0))}
    accuracy = {m: list(rng.uniform(0.7, 0.9, 3)) for m in methods}
    rows = _rows(methods, "worst_case_sharpness", test_accuracy=accuracy, grid_sharpness=methods,
                 hessian_trace={m: [v * 2 + 0.1 * i for i, v in enumerate(vs)] for m, vs in methods.items()})
    stats = statistics(rows)
    assert len(stats.tests) == 3 * 4  # 3 pairs x 4 metrics (test_accuracy too)
    welch = [t.welch_p for t in stats.tests]
    assert [t.welch_p_holm for t in stats.tests] == pytest.approx(_holm_reference(welch))
    assert [t.mann_whitney_p_holm for t in stats.tests] == pytest.approx(
        holm([t.mann_whitney_p for t in stats.tests]))
    correlation_p = [c.p_value for c in stats.correlations]
    assert [c.p_holm for c in stats.correlations] == pytest.approx(_holm_reference(correlation_p))
    assert all(t.welch_p_holm >= t.welch_p for t in stats.tests)
    assert stats.families["welch_p_holm"] == "Holm over the 12 Welch tests of the pairwise table"
    assert stats.families["p_holm"] == f"Holm over the {len(stats.correlations)} correlations of the table"


def _pair(method: str, a: int, b: int, barrier: float) -> dict:
    return {"method_a": method, "seed_a": a, "seed_b": b, "linear_barrier": barrier, "curve_barrier": barrier / 10}


def test_barrier_interval_knows_its_pairs_share_seeds(tmp_path):
    shared = [_pair("pt", 0, 1, 0.30), _pair("pt", 0, 2, 0.50), _pair("pt", 1, 2, 0.35)]  # every seed in two pairs
    disjoint = [_pair("ptp", 0, 1, 0.10), _pair("ptp", 2, 3, 0.14)]
    rows = _rows({"pt": [1.0, 2.0], "ptp": [1.5, 2.5]}, "grid_sharpness")
    stats = statistics(rows, connections=shared + disjoint)
    barriers = {(s.method, s.metric): s for s in stats.barriers}
    dependent = barriers["pt", "linear_barrier"]
    assert (dependent.n, dependent.n_seeds) == (3, 3) and dependent.mean == pytest.approx(np.mean([0.30, 0.50, 0.35]))
    assert dependent.ci_low is None and "share end points" in dependent.reason
    independent = barriers["ptp", "linear_barrier"]
    assert (independent.n, independent.n_seeds) == (2, 4)
    assert (independent.ci_low, independent.ci_high) == pytest.approx(
        scipy.stats.t.interval(0.95, 1, loc=0.12, scale=scipy.stats.sem([0.10, 0.14])))
    markdown = write_tables(rows, tmp_path, stats)["md"].read_text()
    assert "(n=3 pairs of 3 seeds)" in markdown and "(n=2 pairs of 4 seeds)" in markdown


def test_null_values_are_skipped_counted_and_explained(tmp_path):
    rows = _rows({"pt": [0.5, None, 0.7], "ptp": [0.2, 0.3, 0.4]}, "grid_sharpness")
    rows[1]["grid_sharpness_reason"] = "no grid point within r of the centre"
    stats = statistics(rows)
    summary = {s.method: s for s in stats.summaries}["pt"]
    assert summary.n == 2 and summary.mean == pytest.approx(0.6) and stats.tests[0].n_a == 2
    markdown = write_tables(rows, tmp_path, stats)["md"].read_text()
    assert "| –[1] |" in markdown and "(n=2)" in markdown
    assert "\n[1] grid_sharpness: no grid point within r of the centre" in markdown  # the dash's note
