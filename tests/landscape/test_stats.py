"""Statistics equal scipy's on fixed data; writers are atomic, JSON-safe and complete."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import scipy.stats

from landscape.draw.tables import write_metrics_json, write_tables
from landscape.stats import (
    compare_methods,
    correlate,
    flatten_row,
    statistics,
    summarize,
    t_interval,
)

PT = [0.91, 1.30, 0.75, 1.12, 1.05]
PTP = [0.42, 0.61, 0.55, 0.38, 0.70]
ACC_PT = [0.80, 0.76, 0.82, 0.78, 0.79]
ACC_PTP = [0.84, 0.83, 0.85, 0.86, 0.81]


def make_rows() -> list[dict]:
    rows = []
    for method, sharp, acc in (("pt", PT, ACC_PT), ("ptp-adv", PTP, ACC_PTP)):
        for seed, (s, a) in enumerate(zip(sharp, acc)):
            rows.append({"checkpoint": f"runs/{method}-{seed}", "method": method, "seed": seed,
                         "worst_case_sharpness": s,
                         "hessian_eigenvalues": [10 * s, s], "hessian_trace": float("nan") if seed == 0 else 3 * s,
                         "test_accuracy": a, "flat_radius": {"x": math.inf, "y": s}})
    return rows


def test_pairwise_tests_equal_scipy():
    tests = {t.metric: t for t in compare_methods(make_rows())}
    t = tests["worst_case_sharpness"]
    assert (t.method_a, t.method_b, t.n_a, t.n_b) == ("pt", "ptp-adv", 5, 5)
    welch = scipy.stats.ttest_ind(PT, PTP, equal_var=False)
    mwu = scipy.stats.mannwhitneyu(PT, PTP, alternative="two-sided")
    assert t.welch_t == pytest.approx(welch.statistic) and t.welch_p == pytest.approx(welch.pvalue)
    assert t.mann_whitney_u == pytest.approx(mwu.statistic) and t.mann_whitney_p == pytest.approx(mwu.pvalue)
    assert t.rank_biserial == pytest.approx(1.0)  # every pt value exceeds every ptp value
    pooled = math.sqrt((np.var(PT, ddof=1) + np.var(PTP, ddof=1)) / 2)  # equal group sizes
    assert t.hedges_g == pytest.approx((np.mean(PT) - np.mean(PTP)) / pooled * (1 - 3 / 31))
    assert tests["hessian_trace"].n_a == 4  # the NaN row is dropped
    assert "hessian_eigenvalues_1" in tests and "flat_radius_y" in tests


def test_spearman_equals_scipy():
    correlations = {c.metric: c for c in correlate(make_rows(), n_resamples=20000)}
    reference = scipy.stats.spearmanr(PT + PTP, ACC_PT + ACC_PTP)
    c = correlations["worst_case_sharpness"]
    assert c.n == 10 and c.p_method == "permutation (20000)"  # beyond 9 checkpoints: Monte-Carlo permutations
    assert c.spearman_rho == pytest.approx(reference.statistic)
    assert c.p_value == pytest.approx(reference.pvalue, abs=0.01)
    assert "test_accuracy" not in correlations
    never_crossed = correlations["flat_radius_x"]  # all inf: censored, kept, and constant
    assert never_crossed.n == 10 and "constant" in never_crossed.reason


def test_summary_and_t_interval():
    summaries = {(s.method, s.metric): s for s in summarize(make_rows())}
    s = summaries["pt", "worst_case_sharpness"]
    assert s.n == 5 and s.mean == pytest.approx(np.mean(PT)) and s.std == pytest.approx(np.std(PT, ddof=1))
    low, high = scipy.stats.t.interval(0.95, 4, loc=np.mean(PT), scale=scipy.stats.sem(PT))
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high)) == t_interval(PT)


def test_groups_smaller_than_two_give_reasons_not_crashes():
    rows = make_rows()[:6]  # five pt, one ptp-adv
    summaries = {(s.method, s.metric): s for s in summarize(rows)}
    lone = summaries["ptp-adv", "worst_case_sharpness"]
    assert lone.n == 1 and lone.mean == PTP[0] and lone.std is None and lone.ci_low is None
    assert "at least 2" in lone.reason
    test = {t.metric: t for t in compare_methods(rows)}["worst_case_sharpness"]
    assert test.welch_p is None and test.mann_whitney_p is None and "at least 2" in test.reason
    assert "at least 3" in correlate(rows[:2], ["worst_case_sharpness"])[0].reason


def test_constant_groups_have_no_t_test():
    rows = [{"method": m, "seed": s, "x": 1.0 if m == "a" else 2.0} for m in "ab" for s in range(3)]
    test = compare_methods(rows)[0]
    assert test.welch_t is None and test.hedges_g is None and "constant" in test.reason
    assert test.rank_biserial == -1.0
    rows = [dict(r, y=5.0) for r in rows]
    assert "constant" in correlate(rows, ["y"], target="x")[0].reason


def test_writers(tmp_path):
    rows = make_rows()
    paths = write_tables(rows, tmp_path / "out", statistics(rows, n_resamples=200))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["metrics.csv", "metrics.json", "metrics.md", "metrics.tex"]  # and no temp files
    text = paths["json"].read_text()
    loaded = json.loads(text)  # strict JSON: NaN and inf became null
    assert "NaN" not in text and "Infinity" not in text and text == json.dumps(loaded, indent=2, sort_keys=True) + "\n"
    assert loaded[0]["hessian_trace"] is None and loaded[0]["flat_radius"]["x"] is None
    assert loaded[1]["hessian_eigenvalues"] == rows[1]["hessian_eigenvalues"]
    table = list(csv.DictReader(paths["csv"].open()))
    assert len(table) == 10 and list(table[0])[:3] == ["checkpoint", "method", "seed"]
    assert float(table[2]["hessian_eigenvalues_1"]) == rows[2]["hessian_eigenvalues"][0]
    assert table[0]["hessian_trace"] == ""
    markdown = paths["md"].read_text()
    assert "± " in markdown and "Welch" in markdown and "Spearman" in markdown
    assert "| pt-0 |" in markdown  # relative to runs/, the common folder
    tex = paths["tex"].read_text()
    assert tex.count("\\toprule") == 5 and "$\\pm$" in tex and "worst\\_case\\_sharpness" in tex
    # five tables: headline, per checkpoint, per group, tests, correlations
    assert flatten_row(rows[0])["hessian_eigenvalues_2"] == rows[0]["hessian_eigenvalues"][1]


def test_json_writer_is_atomic(tmp_path):
    write_metrics_json([{"a": 1}], tmp_path)
    with pytest.raises(TypeError):
        write_metrics_json([{"a": object()}], tmp_path)  # not serializable: the old file stays, no temp left
    assert json.loads((tmp_path / "metrics.json").read_text()) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
