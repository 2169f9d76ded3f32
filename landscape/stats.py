"""Statistics across checkpoints: per group, between groups of one comparable set, against test accuracy.

A row is one checkpoint's dict: `checkpoint`, `method`, `seed`, metric values, `test_accuracy` (with a benchmark
also its own test metric, `test_f1`, `test_mcc`, ...) and `comparable`, the settings that make its numbers
comparable with another row's (task, model, head, prompt type and length, split, surface settings: see
landscape.surface.comparable_identity). Rows that agree on `comparable` form one comparable set; a group is one
method within one set. Numbers are never pooled, tested or correlated across sets.

List values (hessian_eigenvalues) become columns `name_1, name_2, ...` (name_1 is the top one) and dict values
(flat_radius) `name_key`. Missing, None and NaN values are skipped per statistic (n counts the values used). An
infinite value (a flat radius never crossed within the grid) is censored, not dropped: the rank-based statistics
(Mann-Whitney U, Spearman) rank it beyond every finite value; means, std and t-intervals are over the finite
values, and the summary counts the infinite ones beside them. A statistic that cannot be computed is None with a
`reason`. numpy/scipy only: no torch import here.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import PurePath

import numpy as np

ROW_KEYS = ("checkpoint", "method", "seed")
IDENTITY = "comparable"  # the row key holding what makes its numbers comparable (a dict, never a metric)
# Columns tabulated but not analysed: row["cost"], row["settings"], row["comparable"] and per-checkpoint uncertainties.
NOT_ANALYSED = re.compile(r"^(cost|settings|comparable)_|_stderr$|_ci_\d+$|_residuals_\d+$|_residual$")
TARGET = "test_accuracy"
# What a checkpoint scores on its task: test_accuracy and the benchmark's own metric (test_f1, test_mcc, test_em, ...).
# Each is a target the landscape metrics are rank-correlated with, never one of those metrics itself.
OUTCOME = re.compile(r"^test_")
CALIBRATION = "center_ece"  # sharpness metrics are also rank-correlated with it (calibration next to sharpness)
SHARPNESS = re.compile(r"sharpness|^(input_)?curvature_eigenvalues_1$|^hessian_(eigenvalues_1|trace|min_eigenvalue)$")
# Whole distributions, not numbers: kept in metrics.json, left out of the columns of the tables
BARRIERS = ("linear_barrier", "curve_barrier")  # landscape.connect: max_t L(t) - chord, along the line and the curve
DISTRIBUTIONS = ("hessian_spectrum_nodes", "hessian_spectrum_weights", "persistence", "input_persistence")
CONFIDENCE = 0.95
# Spearman's exact null distribution enumerates all n! orderings up to this n (9! = 362880 in one numpy product);
# beyond it, n_resamples seeded random orderings (a Monte-Carlo permutation test).
EXACT_SPEARMAN_MAX_N = 9


@dataclass
class GroupSummary:
    method: str
    metric: str
    n: int                             # finite values: mean, std and interval are over these
    mean: float | None
    std: float | None                  # ddof = 1
    ci_low: float | None               # Student t 95% interval of the mean (Student 1908)
    ci_high: float | None
    reason: str | None = None          # why std / interval are None
    group: str = ""                    # the method, plus what sets its comparable set apart ("pt · task B")
    n_infinite: int = 0                # +inf values (censored: beyond the grid), not in the mean
    n_negative_infinite: int = 0
    n_seeds: int | None = None         # barriers: the seeds the n pairs are drawn from

    def __post_init__(self):
        self.group = self.group or self.method


@dataclass
class PairwiseTest:
    metric: str
    method_a: str
    method_b: str
    n_a: int                           # values of each group used, infinite ones included
    n_b: int
    welch_t: float | None = None       # scipy.stats.ttest_ind(equal_var=False), finite values only
    welch_p: float | None = None
    mann_whitney_u: float | None = None  # U of sample a, two-sided; inf ranks beyond every finite value
    mann_whitney_p: float | None = None
    hedges_g: float | None = None      # (mean_a - mean_b) / pooled std, small-sample corrected
    rank_biserial: float | None = None  # 2 U_a / (n_a n_b) - 1, in [-1, 1]; > 0: a tends larger
    reason: str | None = None
    group_a: str = ""
    group_b: str = ""
    comparable_set: str = ""           # the set both groups belong to ("" when the comparison holds one set)
    welch_p_holm: float | None = None  # Holm 1979 over every Welch p of the same call (the family)
    mann_whitney_p_holm: float | None = None

    def __post_init__(self):
        self.group_a, self.group_b = self.group_a or self.method_a, self.group_b or self.method_b


@dataclass
class Correlation:
    metric: str
    target: str
    n: int
    spearman_rho: float | None = None
    p_value: float | None = None       # two-sided, from the permutation distribution of rho (see p_method)
    reason: str | None = None
    comparable_set: str = ""           # rows of this set only
    p_method: str | None = None        # "exact" (all n! orderings) or "permutation (K)" (K random orderings)
    p_holm: float | None = None        # Holm 1979 over every correlation p of the same call (the family)


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


# ---- comparable sets and groups ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """Where a row's numbers belong: its comparable set (key: the identity; label: what sets it apart), its method."""

    set_key: str
    set_label: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.method} · {self.set_label}" if self.set_label else self.method


def row_groups(rows: list[dict]) -> list[Group]:
    """One Group per row. Labels name only the settings that differ between the rows' comparable sets."""
    identities = [dict(row.get(IDENTITY) or {}) for row in rows]
    keys = list(dict.fromkeys(k for identity in identities for k in identity))
    encoded = [{k: json.dumps(identity.get(k), sort_keys=True, default=str) for k in keys} for identity in identities]
    differing = _label_keys([k for k in keys if len({e[k] for e in encoded}) > 1], encoded)
    short = {k: _short_names([identity.get(k) for identity in identities]) for k in differing}
    groups = []
    for row, identity, codes in zip(rows, identities, encoded):
        method = str(row.get("method"))
        parts = [_describe(k, short[k][_plain_key(identity.get(k))], method) for k in differing]
        groups.append(Group(json.dumps(codes, sort_keys=True), " · ".join(p for p in parts if p), method))
    labels: dict[str, set] = {}
    for group in groups:
        labels.setdefault(group.label, set()).add(group.set_key)
    if clash := next((label for label, sets in labels.items() if len(sets) > 1), None):
        raise ValueError(f"two comparable sets are both labelled {clash!r}; give their runs distinct settings or "
                         "compare them separately")
    return groups


# The order in which labels name settings; a setting that the ones before it already tell apart (the evaluation
# subset of another task) is left out of the labels, never out of the sets.
LABEL_ORDER = ("task", "model", "head", "prompt_type", "prompt_length", "template", "label_words", "max_length",
               "params", "split", "examples", "directions", "normalization", "grid", "span", "dtype", "partial")


def _label_keys(differing: list[str], encoded: list[dict]) -> list[str]:
    """The differing settings a label needs, in LABEL_ORDER: each one kept splits rows the earlier ones do not."""
    rank = {k: i for i, k in enumerate(LABEL_ORDER)}
    ordered = sorted(differing, key=lambda k: (rank.get(k.removeprefix("input_"), len(rank)), k.startswith("input_")))
    kept: list[str] = []
    for key in ordered:
        seen: dict[tuple, str] = {}
        if any(seen.setdefault(tuple(e[k] for k in kept), e[key]) != e[key] for e in encoded):
            kept.append(key)
    return kept


def _plain_key(value):
    """A setting's value as a dict key: lists (label words) as their JSON."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else json.dumps(value, sort_keys=True)


def _short_names(values: list) -> dict:
    """_plain_key(value) -> how a label shows it: a path's last part when that still tells the values apart."""
    keys = {_plain_key(v): v for v in values}
    short = {k: PurePath(v).name if isinstance(v, str) and "/" in v else k for k, v in keys.items()}
    return short if len(set(map(str, short.values()))) == len(short) else {k: k for k in keys}


def _describe(key: str, value, method: str) -> str:
    """One setting as a label shows it ("task B", "P=6", "partial")."""
    if key.startswith("input_"):
        inner = _describe(key.removeprefix("input_"), value, method)
        return f"input {inner}" if inner else ""
    if key == "prompt_type":  # a deep prompt's method label already says "(deep)"
        return "" if value in (None, "shallow") or method.endswith("(deep)") else f"{value} prompt"
    if key == "partial":
        return "partial" if value else "complete"
    formats = {"task": "task {}", "model": "model {}", "head": "{} head", "prompt_length": "P={}",
               "split": "{} split", "examples": "{} examples", "grid": "grid {}", "span": "span {}",
               "directions": "{} directions", "normalization": "norm {}", "params": "params {}",
               "subset_hash": "subset {}", "max_length": "max length {}"}
    if key == "subset_hash" and isinstance(value, str):
        value = value[:8]
    return formats.get(key, key.replace("_", " ") + " {}").format("–" if value is None else value)


def _by_group(rows: list[dict], metric: str) -> dict[Group, list[float]]:
    """Group -> the metric's numeric values (inf kept, None/NaN skipped), every group present even when empty."""
    out: dict[Group, list[float]] = {}
    for row, group in zip(map(flatten_row, rows), row_groups(rows)):
        values = out.setdefault(group, [])
        if is_number(row.get(metric), finite=False):
            values.append(float(row[metric]))
    return out


# ---- per group ---------------------------------------------------------------------------------------------------

def t_interval(values, confidence: float = CONFIDENCE) -> tuple:
    """Student t interval of the mean over the last axis, (..., n) -> (low, high) each (...) (Student 1908):
    mean ± t_{1-a/2, n-1} s / sqrt(n); nominal coverage for normal data at every n >= 2."""
    import scipy.stats  # ~1 s to import: loaded when statistics are computed, not by a command refused on its flags

    values = np.asarray(values, dtype=np.float64)  # (..., n)
    n = values.shape[-1]
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    half = scipy.stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * values.std(axis=-1, ddof=1) / math.sqrt(n)
    mean = values.mean(axis=-1)
    low, high = mean - half, mean + half
    return (float(low), float(high)) if values.ndim == 1 else (low, high)


def _summary(label: Group | str, method: str, metric: str, values: list[float],
             n_seeds: int | None = None, independent: bool = True) -> GroupSummary:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    summary = GroupSummary(method, metric, len(finite), float(finite.mean()) if len(finite) else None, None, None,
                           None, group=label if isinstance(label, str) else label.label,
                           n_infinite=int(np.sum(values == np.inf)), n_negative_infinite=int(np.sum(values == -np.inf)),
                           n_seeds=n_seeds)
    what = "pair(s)" if n_seeds is not None else "checkpoint(s)"
    if len(finite) < 2:
        summary.reason = f"{summary.group} has {len(finite)} {what} with a finite {metric}; std and CI need at least 2"
        return summary
    summary.std = float(finite.std(ddof=1))
    if not independent:
        summary.reason = (f"{summary.group}: its {len(finite)} pairs share end points ({n_seeds} seeds), so they are "
                          "not independent; no interval (the mean and std are over pairs)")
        return summary
    summary.ci_low, summary.ci_high = t_interval(finite)
    return summary


def summarize(rows: list[dict], metrics: list[str] | None = None) -> list[GroupSummary]:
    """Per group and metric: n, mean, std (ddof=1) and Student t 95% interval of the finite values, +-inf counted."""
    out = []
    for metric in metric_names(rows) if metrics is None else metrics:
        for group, values in _by_group(rows, metric).items():
            out.append(_summary(group, group.method, metric, values))
    return out


def barrier_summaries(connections: list[dict]) -> list[GroupSummary]:
    """Per group and barrier over its pairs of seeds (connect.json). Pairs of one set of seeds share end points
    ((0,1), (0,2), (1,2)) and are not independent: an interval only when no seed is in two pairs."""
    out = []
    by_group: dict[str, list[dict]] = {}
    for connection in connections:
        by_group.setdefault(str(connection.get("group") or connection.get("method_a")), []).append(connection)
    for metric in BARRIERS:
        for label, pairs in by_group.items():
            seeds = [s for c in pairs for s in (c.get("seed_a"), c.get("seed_b"))]
            values = [float(c[metric]) for c in pairs if is_number(c.get(metric), finite=False)]
            out.append(_summary(label, str(pairs[0].get("method_a")), metric, values, len(set(seeds)),
                                independent=len(set(seeds)) == len(seeds)))
    return out


# ---- between groups ---------------------------------------------------------------------------------------------

def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm 1979 step-down adjusted p-values (family-wise error) over the non-None entries, in the given order."""
    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(present, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (len(present) - rank) * p_values[i]))  # monotone in the sorted order
        adjusted[i] = running
    return adjusted


def compare_methods(rows: list[dict], metrics: list[str] | None = None) -> list[PairwiseTest]:
    """Every pair of groups within one comparable set: Welch's t, Mann-Whitney U (two-sided), Hedges' g and
    rank-biserial r; Holm-adjusted p-values over all tests returned (one family per test kind)."""
    import scipy.stats  # ~1 s to import: loaded when statistics are computed, not by a command refused on its flags

    out = []
    for metric in metric_names(rows) if metrics is None else metrics:
        groups = _by_group(rows, metric)
        for a, b in itertools.combinations(groups, 2):
            if a.set_key != b.set_key:
                continue  # unlike settings: the numbers do not compare
            x, y = np.array(groups[a]), np.array(groups[b])
            test = PairwiseTest(metric, a.method, b.method, len(x), len(y), group_a=a.label, group_b=b.label,
                                comparable_set=a.set_label)
            out.append(test)
            if min(len(x), len(y)) < 2:
                test.reason = (f"{metric}: {a.label} has {len(x)}, {b.label} {len(y)} checkpoint(s); tests need at "
                               "least 2 each")
                continue
            u = scipy.stats.mannwhitneyu(x, y, alternative="two-sided")  # ranks: inf is the largest, not dropped
            test.mann_whitney_u, test.mann_whitney_p = float(u.statistic), float(u.pvalue)
            test.rank_biserial = float(2 * u.statistic / (len(x) * len(y)) - 1)
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                test.reason = f"{metric}: infinite values (censored) have no mean; only the rank test applies"
                continue
            dof = len(x) + len(y) - 2
            pooled = math.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / dof)
            if pooled == 0:
                test.reason = f"{metric}: both {a.label} and {b.label} are constant; t-test and effect size undefined"
            else:
                t = scipy.stats.ttest_ind(x, y, equal_var=False)
                test.welch_t, test.welch_p = float(t.statistic), float(t.pvalue)
                # Hedges 1981: Cohen's d times the small-sample correction 1 - 3 / (4 (n_a + n_b) - 9).
                test.hedges_g = float((x.mean() - y.mean()) / pooled * (1 - 3 / (4 * dof - 1)))
    for test, welch, rank in zip(out, holm([t.welch_p for t in out]), holm([t.mann_whitney_p for t in out])):
        test.welch_p_holm, test.mann_whitney_p_holm = welch, rank
    return out


# ---- against an outcome -----------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _orderings(n: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n))), dtype=np.int8)  # (n!, n)


def spearman(x, y, n_resamples: int = 10000, seed: int = 0) -> tuple[float, float, str]:
    """Spearman's rho of (n,) x and y (midranks for ties; inf ranks beyond every finite value) and its two-sided
    p-value from the permutation distribution of rho: exact over all n! orderings for n <= EXACT_SPEARMAN_MAX_N,
    else (1 + #{|rho*| >= |rho|}) / (1 + n_resamples) over seeded random orderings. Returns (rho, p, method)."""
    import scipy.stats

    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)  # (n,) each
    n = len(rx)
    cx, cy = rx - rx.mean(), ry - ry.mean()
    scale = math.sqrt((cx @ cx) * (cy @ cy))
    rho = float(cx @ cy / scale)
    if n <= EXACT_SPEARMAN_MAX_N:
        orderings, method = _orderings(n), "exact"
    else:
        rng = np.random.default_rng(seed)
        orderings = rng.permuted(np.tile(np.arange(n), (n_resamples, 1)), axis=1)  # (K, n)
        method = f"permutation ({n_resamples})"
    null = cy[orderings] @ cx / scale  # (K,) rho under every (or K random) pairing of y with x
    extreme = int(np.sum(np.abs(null) >= abs(rho) - 1e-12))  # ties in |rho| count as extreme: two-sided, exact
    p = extreme / len(null) if method == "exact" else (1 + extreme) / (1 + n_resamples)
    return rho, float(min(1.0, p)), method


def correlate(rows: list[dict], metrics: list[str] | None = None, target: str = TARGET,
              n_resamples: int = 10000, seed: int = 0) -> list[Correlation]:
    """Spearman's rho of each metric vs `target` within each comparable set (all methods of the set pooled), with
    permutation p-values (exact at small n) and Holm-adjusted ones over all correlations returned."""
    out = []
    default = [m for m in metric_names(rows) if m != target and not OUTCOME.search(m)]  # outcomes are no predictors
    flat, groups = [flatten_row(r) for r in rows], row_groups(rows)
    sets = {g.set_key: g.set_label for g in groups}
    for metric in default if metrics is None else metrics:
        for key, label in sets.items():
            pairs = [(r.get(metric), r.get(target)) for r, g in zip(flat, groups) if g.set_key == key]
            pairs = np.array([p for p in pairs if is_number(p[0], finite=False) and is_number(p[1], finite=False)],
                             dtype=np.float64).reshape(-1, 2)
            result = Correlation(metric, target, len(pairs), comparable_set=label)
            out.append(result)
            where = f" ({label})" if label else ""
            if len(pairs) < 3:
                result.reason = (f"{metric} vs {target}{where}: {len(pairs)} checkpoint(s) with both; Spearman needs "
                                 "at least 3")
            elif len(set(pairs[:, 0])) == 1 or len(set(pairs[:, 1])) == 1:
                result.reason = f"{metric} vs {target}{where}: one of them is constant over the checkpoints"
            else:
                result.spearman_rho, result.p_value, result.p_method = spearman(pairs[:, 0], pairs[:, 1],
                                                                                n_resamples, seed)
    for result, adjusted in zip(out, holm([c.p_value for c in out])):
        result.p_holm = adjusted
    return out


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def is_number(value, finite: bool = True) -> bool:
    """int or float, not bool; not NaN; finite unless finite=False (then +-inf counts)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            and (math.isfinite(value) or not finite))


@dataclass
class Statistics:
    """Everything computed across checkpoints, once: per-group summaries, pairwise tests, correlations."""

    summaries: list[GroupSummary]
    tests: list[PairwiseTest]
    correlations: list[Correlation]
    barriers: list[GroupSummary] = field(default_factory=list)  # per group, over its pairs of seeds (connect.json)
    families: dict[str, str] = field(default_factory=dict)  # adjusted p-value -> the family it was adjusted over


def statistics(rows: list[dict], n_resamples: int = 10000, seed: int = 0, connections: list[dict] = ()) -> Statistics:
    """Per-group summaries, pairwise tests within each comparable set, and Spearman correlations (within each set)
    of every landscape metric with test accuracy (and with the task's own test metric, test_f1, test_mcc, ...,
    when the rows carry it) and of every sharpness metric with the calibration error center_ece; with
    `connections` (connect.json of pairs of seeds of one group), the per-group statistics of their barriers.
    n_resamples, seed: the Monte-Carlo permutations of a Spearman p-value beyond EXACT_SPEARMAN_MAX_N checkpoints."""
    metrics = metric_names(rows)
    landscape_metrics = [m for m in metrics if not OUTCOME.search(m)]
    targets = [TARGET, *(m for m in metrics if OUTCOME.search(m) and m != TARGET)]
    correlations = [c for target in targets for c in correlate(rows, landscape_metrics, target, n_resamples, seed)]
    if CALIBRATION in metrics:
        correlations += correlate(rows, [m for m in metrics if SHARPNESS.search(m)], CALIBRATION, n_resamples, seed)
    for result, adjusted in zip(correlations, holm([c.p_value for c in correlations])):
        result.p_holm = adjusted  # one family: every correlation of the table
    tests = compare_methods(rows, metrics)
    families = {
        "welch_p_holm": f"Holm over the {sum(t.welch_p is not None for t in tests)} Welch tests of the pairwise table",
        "mann_whitney_p_holm": f"Holm over the {sum(t.mann_whitney_p is not None for t in tests)} Mann-Whitney "
                               "tests of the pairwise table",
        "p_holm": f"Holm over the {sum(c.p_value is not None for c in correlations)} correlations of the table"}
    return Statistics(summarize(rows, metrics), tests, correlations,
                      barrier_summaries(list(connections)) if connections else [], families)
