"""Statistics across checkpoints: per method, between methods, and against test accuracy (tables: landscape.draw.tables).

A row is one checkpoint's dict: `checkpoint`, `method`, `seed`, metric values and
`test_accuracy` (with a benchmark also its own test metric, `test_f1`, `test_mcc`, ...). List values (hessian_eigenvalues) become columns `name_1, name_2, ...`
(name_1 is the top one) and dict values (flat_radius) `name_key`. Missing, None and NaN values
and inf values are dropped per statistic (an inf flat radius, "never crossed within the grid",
is therefore left out, not ranked last). A statistic that cannot be computed is None with a
`reason`.
numpy/scipy only: no torch import here.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import numpy as np


ROW_KEYS = ("checkpoint", "method", "seed")
# Columns tabulated but not analysed: row["cost"], row["settings"] and per-checkpoint uncertainties.
NOT_ANALYSED = re.compile(r"^(cost|settings)_|_stderr$|_ci_\d+$|_residuals_\d+$|_residual$")
TARGET = "test_accuracy"
# What a checkpoint scores on its task: test_accuracy and the benchmark's own metric (test_f1, test_mcc, test_em, ...).
# Each is a target the landscape metrics are rank-correlated with, never one of those metrics itself.
OUTCOME = re.compile(r"^test_")
CALIBRATION = "center_ece"  # sharpness metrics are also rank-correlated with it (calibration next to sharpness)
SHARPNESS = re.compile(r"sharpness|^(input_)?curvature_eigenvalues_1$|^hessian_(eigenvalues_1|trace|min_eigenvalue)$")
# Whole distributions, not numbers: kept in metrics.json, left out of the columns of the tables
BARRIERS = ("linear_barrier", "curve_barrier")  # landscape.connect: max_t L(t) - chord, along the line and the curve
DISTRIBUTIONS = ("hessian_spectrum_nodes", "hessian_spectrum_weights", "persistence", "input_persistence")


@dataclass
class GroupSummary:
    method: str
    metric: str
    n: int
    mean: float | None
    std: float | None                  # ddof = 1
    ci_low: float | None               # percentile bootstrap CI of the mean
    ci_high: float | None
    reason: str | None = None          # why std / CI are None


@dataclass
class PairwiseTest:
    metric: str
    method_a: str
    method_b: str
    n_a: int
    n_b: int
    welch_t: float | None = None       # scipy.stats.ttest_ind(equal_var=False)
    welch_p: float | None = None
    mann_whitney_u: float | None = None  # U of sample a, two-sided
    mann_whitney_p: float | None = None
    hedges_g: float | None = None      # (mean_a - mean_b) / pooled std, small-sample corrected
    rank_biserial: float | None = None  # 2 U_a / (n_a n_b) - 1, in [-1, 1]; > 0: a tends larger
    reason: str | None = None


@dataclass
class Correlation:
    metric: str
    target: str
    n: int
    spearman_rho: float | None = None
    p_value: float | None = None
    reason: str | None = None


def flatten_row(row: dict) -> dict:
    """Lists -> name_1..k, dicts -> name_key, numpy scalars -> python; other values unchanged."""
    flat = {}
    for key, value in row.items():
        if key in DISTRIBUTIONS:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}_{sub}": _plain(v) for sub, v in value.items()})
        elif isinstance(value, (list, tuple, np.ndarray)):
            flat.update({f"{key}_{i + 1}": _plain(v) for i, v in enumerate(value)})
        else:
            flat[key] = _plain(value)
    return flat


def metric_names(rows: list[dict]) -> list[str]:
    """Numeric columns of the flattened rows to analyse (see NOT_ANALYSED), in first-seen order."""
    names: dict[str, None] = {}
    for row in map(flatten_row, rows):
        names.update({k: None for k, v in row.items()
                      if k not in ROW_KEYS and not NOT_ANALYSED.search(k) and is_number(v, finite=False)})
    return list(names)


def bootstrap_ci(values, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (Efron & Tibshirani 1993), seeded."""
    values = np.asarray(values, dtype=np.float64)  # (n,)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(n_resamples, len(values)))
    means = values[picks].mean(axis=1)  # (n_resamples,)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarize(rows: list[dict], metrics: list[str] | None = None, n_resamples: int = 10000,
              seed: int = 0) -> list[GroupSummary]:
    """Per method and metric: n, mean, std (ddof=1) and 95% bootstrap CI."""
    out = []
    for metric in metric_names(rows) if metrics is None else metrics:
        for method, values in _groups(rows, metric).items():
            mean = float(np.mean(values)) if values else None
            if len(values) < 2:
                reason = f"{method} has {len(values)} checkpoint(s) with {metric}; std and CI need at least 2"
                out.append(GroupSummary(method, metric, len(values), mean, None, None, None, reason))
                continue
            low, high = bootstrap_ci(values, n_resamples, seed=seed)
            out.append(GroupSummary(method, metric, len(values), mean, float(np.std(values, ddof=1)), low, high))
    return out


def compare_methods(rows: list[dict], metrics: list[str] | None = None) -> list[PairwiseTest]:
    """Every pair of methods: Welch's t, Mann-Whitney U (two-sided), Hedges' g and rank-biserial r."""
    import scipy.stats  # ~1 s to import: loaded when statistics are computed, not by a command refused on its flags

    out = []
    for metric in metric_names(rows) if metrics is None else metrics:
        groups = _groups(rows, metric)
        for a, b in itertools.combinations(groups, 2):
            x, y = np.array(groups[a]), np.array(groups[b])
            test = PairwiseTest(metric, a, b, len(x), len(y))
            if min(len(x), len(y)) < 2:
                test.reason = f"{metric}: {a} has {len(x)}, {b} {len(y)} checkpoint(s); tests need at least 2 each"
            else:
                u = scipy.stats.mannwhitneyu(x, y, alternative="two-sided")
                test.mann_whitney_u, test.mann_whitney_p = float(u.statistic), float(u.pvalue)
                test.rank_biserial = float(2 * u.statistic / (len(x) * len(y)) - 1)
                dof = len(x) + len(y) - 2
                pooled = math.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / dof)
                if pooled == 0:
                    test.reason = f"{metric}: both {a} and {b} are constant; t-test and effect size undefined"
                else:
                    t = scipy.stats.ttest_ind(x, y, equal_var=False)
                    test.welch_t, test.welch_p = float(t.statistic), float(t.pvalue)
                    # Hedges 1981: Cohen's d times the small-sample correction 1 - 3 / (4 (n_a + n_b) - 9).
                    test.hedges_g = float((x.mean() - y.mean()) / pooled * (1 - 3 / (4 * dof - 1)))
            out.append(test)
    return out


def correlate(rows: list[dict], metrics: list[str] | None = None, target: str = TARGET) -> list[Correlation]:
    """Spearman's rho of each metric vs `target` over all checkpoints (all methods pooled)."""
    import scipy.stats  # ~1 s to import: loaded when statistics are computed, not by a command refused on its flags

    out = []
    default = [m for m in metric_names(rows) if m != target and not OUTCOME.search(m)]  # outcomes are no predictors
    for metric in default if metrics is None else metrics:
        pairs = [(r.get(metric), r.get(target)) for r in map(flatten_row, rows)]
        pairs = np.array([p for p in pairs if is_number(p[0]) and is_number(p[1])], dtype=np.float64).reshape(-1, 2)
        result = Correlation(metric, target, len(pairs))
        if len(pairs) < 3:
            result.reason = f"{metric} vs {target}: {len(pairs)} checkpoint(s) with both; Spearman needs at least 3"
        elif np.ptp(pairs[:, 0]) == 0 or np.ptp(pairs[:, 1]) == 0:
            result.reason = f"{metric} vs {target}: one of them is constant over the checkpoints"
        else:
            rho = scipy.stats.spearmanr(pairs[:, 0], pairs[:, 1])
            result.spearman_rho, result.p_value = float(rho.statistic), float(rho.pvalue)
        out.append(result)
    return out


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def is_number(value, finite: bool = True) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (math.isfinite(value) or not finite)


def _groups(rows: list[dict], metric: str) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for row in map(flatten_row, rows):
        groups.setdefault(str(row.get("method")), [])
        if is_number(row.get(metric)):
            groups[str(row["method"])].append(float(row[metric]))
    return groups


@dataclass
class Statistics:
    """Everything computed across checkpoints, once: per-method summaries, pairwise tests, correlations."""

    summaries: list[GroupSummary]
    tests: list[PairwiseTest]
    correlations: list[Correlation]
    barriers: list[GroupSummary] = field(default_factory=list)  # per method, over its pairs of seeds (connect.json)


def statistics(rows: list[dict], n_resamples: int = 10000, seed: int = 0, connections: list[dict] = ()) -> Statistics:
    """Per-method summaries, pairwise tests, and Spearman correlations of every landscape metric with test accuracy
    (and with the task's own test metric, test_f1, test_mcc, ..., when the rows carry it) and of every sharpness
    metric with the calibration error center_ece; with `connections` (connect.json of pairs of seeds of one
    method), the per-method statistics of their linear and Bezier-curve loss barriers."""
    metrics = metric_names(rows)
    landscape_metrics = [m for m in metrics if not OUTCOME.search(m)]
    targets = [TARGET, *(m for m in metrics if OUTCOME.search(m) and m != TARGET)]
    correlations = [c for target in targets for c in correlate(rows, landscape_metrics, target)]
    if CALIBRATION in metrics:
        correlations += correlate(rows, [m for m in metrics if SHARPNESS.search(m)], CALIBRATION)
    pairs = [{"method": c.get("method_a"), **{k: c.get(k) for k in BARRIERS}} for c in connections]
    return Statistics(summarize(rows, metrics, n_resamples, seed), compare_methods(rows, metrics), correlations,
                      summarize(pairs, list(BARRIERS), n_resamples, seed) if pairs else [])
