"""Benchmark metrics against brute-force counts and textbook formulas; evaluate, the sweep and the landscape
statistics report them beside accuracy."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptp_core.tasks.metrics import METRIC_KEYS, METRICS, task_metrics


def _counts(predictions, labels, positive):
    pairs = list(zip(predictions, labels))
    return (sum(p == positive and y == positive for p, y in pairs),
            sum(p == positive and y != positive for p, y in pairs),
            sum(p != positive and y == positive for p, y in pairs))


def _f1_brute(predictions, labels, positive=1):
    tp, fp, fn = _counts(predictions, labels, positive)
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _mcc_covariance(predictions, labels, classes):
    """Gorodkin's R_K as cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) of one-hot matrices, in float64."""
    x, y = np.eye(classes)[predictions], np.eye(classes)[labels]  # (N, K)

    def cov(a, b):
        return float(np.sum((a - a.mean(0)) * (b - b.mean(0))))

    denominator = math.sqrt(cov(x, x) * cov(y, y))
    return 0.0 if denominator == 0 else cov(x, y) / denominator


@pytest.mark.parametrize("trial", range(20))
def test_metrics_match_brute_force_on_random_predictions(trial):
    rng = np.random.default_rng(trial)
    n, classes = int(rng.integers(1, 60)), int(rng.integers(2, 5))
    labels, predictions = rng.integers(0, classes, n), rng.integers(0, classes, n)
    if trial % 4 == 0:  # mostly right, as a trained model would be
        predictions = np.where(rng.random(n) < 0.8, labels, predictions)
    p, y = predictions.tolist(), labels.tolist()
    accuracy = sum(a == b for a, b in zip(p, y)) / n
    present = sorted(set(p) | set(y))
    assert task_metrics("accuracy", p, y) == {"accuracy": pytest.approx(accuracy)}
    macro = task_metrics("macro_f1", p, y)
    assert macro["macro_f1"] == pytest.approx(sum(_f1_brute(p, y, c) for c in present) / len(present), abs=1e-12)
    assert task_metrics("f1", p, y)["f1"] == pytest.approx(_f1_brute(p, y), abs=1e-12)
    assert task_metrics("mcc", p, y)["mcc"] == pytest.approx(_mcc_covariance(predictions, labels, classes), abs=1e-12)
    binary_p, binary_y = (predictions > 0).astype(int), (labels > 0).astype(int)
    if binary_p.std() > 0 and binary_y.std() > 0:  # binary MCC is Pearson's r of the two 0/1 vectors
        assert task_metrics("mcc", binary_p, binary_y)["mcc"] == pytest.approx(np.corrcoef(binary_p, binary_y)[0, 1])


@pytest.mark.parametrize("trial", range(10))
def test_multirc_f1a_and_exact_match_per_question(trial):
    rng = np.random.default_rng(100 + trial)
    groups = np.repeat(np.arange(12), rng.integers(1, 5, 12))  # 12 questions with 1..4 answer options each
    rng.shuffle(groups)
    groups = (groups * 7 + 3).tolist()  # ids need not be 0..Q-1
    labels = rng.integers(0, 2, len(groups)).tolist()
    predictions = [y if rng.random() < 0.85 else 1 - y for y in labels]
    questions = {}
    for g, p, y in zip(groups, predictions, labels):
        questions.setdefault(g, []).append(p == y)
    result = task_metrics("multirc", predictions, labels, groups)
    assert set(result) == {"accuracy", *METRIC_KEYS["multirc"]}
    assert result["f1a"] == pytest.approx(_f1_brute(predictions, labels))
    assert result["em"] == pytest.approx(sum(all(v) for v in questions.values()) / len(questions))


def test_known_values_and_degenerate_cases():
    # sklearn's documented example: y_true [+1, +1, +1, -1], y_pred [+1, -1, +1, +1] -> MCC -1/3
    assert task_metrics("mcc", [1, 0, 1, 1], [1, 1, 1, 0])["mcc"] == pytest.approx(-1 / 3)
    assert task_metrics("mcc", [1, 1, 1], [0, 1, 0])["mcc"] == 0.0  # a constant predictor
    assert task_metrics("f1", [0, 0], [0, 0])["f1"] == 0.0  # no positive anywhere
    assert task_metrics("macro_f1", [0, 1, 2], [0, 1, 2])["macro_f1"] == 1.0
    assert task_metrics("multirc", [1, 1, 0], [1, 1, 1], [0, 0, 1]) == pytest.approx(
        {"accuracy": 2 / 3, "f1a": 0.8, "em": 0.5})
    assert set(METRIC_KEYS) == set(METRICS)
    with pytest.raises(ValueError, match="unknown metric"):
        task_metrics("bleu", [0], [0])
    with pytest.raises(ValueError, match="question id"):
        task_metrics("multirc", [0], [0])


def test_evaluate_reports_the_task_metric_from_the_model_logits():
    from ptp_core.training.evaluation import evaluate

    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 2, generator=generator), torch.randn(3, 2, generator=generator)]
    batches = [SimpleNamespace(labels=torch.randint(0, 2, (len(x),), generator=generator)) for x in logits]
    by_batch = {id(b): x for b, x in zip(batches, logits)}
    model = SimpleNamespace(logits=lambda params, batch: by_batch[id(batch)])
    result = evaluate(model, {}, batches, metric="f1")
    every, labels = torch.cat(logits), torch.cat([b.labels for b in batches])
    assert result["n"] == 8 and result["loss"] == pytest.approx(F.cross_entropy(every, labels).item())
    expected = task_metrics("f1", every.argmax(-1).numpy(), labels.numpy())
    assert result["accuracy"] == pytest.approx(expected["accuracy"]) and result["f1"] == pytest.approx(expected["f1"])


def test_sweep_summary_and_landscape_statistics_carry_the_metric(tmp_path):
    from landscape.measures.row import metrics_row
    from landscape.stats import statistics
    from ptp_core.io import write_json
    from ptp_core.sweep import run_dir, summarize_runs, summary_markdown, write_summary

    f1 = [0.5, 0.7, 0.6]
    for seed, value in enumerate(f1):
        path = run_dir(tmp_path, "pt", seed)
        path.mkdir(parents=True)
        write_json(path / "ptp.json", {"status": "complete", "metric": "f1", "log": [], "metrics": {
            "test_accuracy": 0.6, "test_f1": value, "best_validation_accuracy": 0.5}})
    rows = summarize_runs(tmp_path, ["pt", "ptp-rn"], [0, 1, 2])
    assert rows[0]["test_f1_mean"] == pytest.approx(np.mean(f1))
    assert rows[0]["test_f1_std"] == pytest.approx(np.std(f1, ddof=1))
    csv_path, md_path = write_summary(tmp_path, rows)
    assert "test_f1_mean" in csv_path.read_text().splitlines()[0] and "test f1 mean" in summary_markdown(rows)

    rows = [metrics_row(f"c{i}", "pt", i, 0.5 + 0.1 * i, test_metrics={"test_f1": value}, grid_sharpness=float(i))
            for i, value in enumerate([0.2, 0.9, 0.4, 0.6])]
    assert list(rows[0])[:5] == ["checkpoint", "method", "seed", "test_accuracy", "test_f1"]
    stats = statistics(rows, n_resamples=200)
    pairs = {(c.metric, c.target) for c in stats.correlations}
    assert pairs == {("grid_sharpness", "test_accuracy"), ("grid_sharpness", "test_f1")}
    assert {s.metric for s in stats.summaries} >= {"test_accuracy", "test_f1"}
    json.dumps([vars(c) for c in stats.correlations])
