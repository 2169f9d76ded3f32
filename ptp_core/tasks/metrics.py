"""The metrics GLUE and SuperGLUE report beside accuracy, from predicted and true class indices (numpy only).

    accuracy   every task
    macro_f1   CB: the unweighted mean of the per-class F1 (Wang et al. 2019, SuperGLUE)
    f1         MRPC, QQP: F1 of the positive class, label 1 (Wang et al. 2018, GLUE)
    mcc        CoLA: Matthews correlation, multiclass form R_K (Gorodkin 2004), = the binary MCC for two classes
    multirc    MultiRC: F1a, the F1 over all answer options (label 1 = a correct answer), and EM, the fraction of
               questions whose answer options are all labelled right (Khashabi et al. 2018)
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("accuracy", "macro_f1", "f1", "mcc", "multirc")
# the keys task_metrics returns besides accuracy; ptp.json stores them as test_<key>, the sweep as test_<key>_mean
METRIC_KEYS = {"accuracy": (), "macro_f1": ("macro_f1",), "f1": ("f1",), "mcc": ("mcc",), "multirc": ("f1a", "em")}


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: [i, j] = examples of true class i predicted as j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def _f1(true_positive: float, false_positive: float, false_negative: float) -> float:
    """2TP / (2TP + FP + FN); 0 when the class is never true and never predicted (sklearn's zero_division=0)."""
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if denominator else 0.0


def f1_score(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the class `positive`."""
    predicted, true = predictions == positive, labels == positive
    return _f1(float(np.sum(predicted & true)), float(np.sum(predicted & ~true)), float(np.sum(~predicted & true)))


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean F1 over the classes that occur among the labels or the predictions (sklearn's average='macro')."""
    classes = np.union1d(labels, predictions)
    return float(np.mean([f1_score(predictions, labels, int(c)) for c in classes]))


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """R_K = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)) from the confusion matrix
    (c correct, s examples, p_k predicted and t_k true counts of class k); 0 when a side is constant."""
    counts = confusion_matrix(predictions, labels, int(max(predictions.max(), labels.max())) + 1).astype(np.float64)
    correct, total = np.trace(counts), counts.sum()
    true, predicted = counts.sum(axis=1), counts.sum(axis=0)  # (C,), (C,)
    denominator = math.sqrt((total ** 2 - predicted @ predicted) * (total ** 2 - true @ true))
    return float((correct * total - predicted @ true) / denominator) if denominator else 0.0


def exact_match(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Fraction of groups (MultiRC questions) whose every example is predicted right."""
    wrong = np.zeros(int(groups.max()) + 1, dtype=bool)
    np.logical_or.at(wrong, groups, predictions != labels)
    return float(1.0 - wrong[np.unique(groups)].mean())


def task_metrics(metric: str, predictions, labels, groups=None) -> dict[str, float]:
    """{"accuracy": ...} plus the keys METRIC_KEYS[metric] names.

    predictions, labels: (N,) class indices (lists, arrays or tensors); groups: (N,) non-negative ids, one per
    MultiRC question, needed by `multirc` only.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    predictions, labels = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise ValueError(f"need as many predictions as labels (at least one), got {predictions.shape}, {labels.shape}")
    result = {"accuracy": float(np.mean(predictions == labels))}
    if metric == "macro_f1":
        result["macro_f1"] = macro_f1(predictions, labels)
    elif metric == "f1":
        result["f1"] = f1_score(predictions, labels)
    elif metric == "mcc":
        result["mcc"] = matthews_correlation(predictions, labels)
    elif metric == "multirc":
        if groups is None or len(groups) != len(labels):
            raise ValueError("the multirc metric needs one question id (group) per answer option")
        result["f1a"] = f1_score(predictions, labels)
        result["em"] = exact_match(predictions, labels, np.asarray(groups, dtype=np.int64))
    return result


# ---- generated text (--head lm --generate) ---------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's normalization (Rajpurkar et al. 2016, its official evaluation script): lower case, punctuation and
    the articles a/an/the removed, whitespace collapsed."""
    import re
    import string

    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, target: str) -> float:
    """SQuAD's token F1 between the normalized prediction and target (1.0 when both are empty)."""
    from collections import Counter

    predicted, true = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not predicted or not true:
        return float(predicted == true)
    common = sum((Counter(predicted) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: list[str], targets: list[str]) -> dict:
    """exact_match and f1 (SQuAD's, means over examples) of generated texts against their targets."""
    exact = [float(normalize_answer(p) == normalize_answer(t)) for p, t in zip(predictions, targets)]
    f1 = [token_f1(p, t) for p, t in zip(predictions, targets)]
    return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}
