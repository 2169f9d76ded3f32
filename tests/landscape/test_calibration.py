"""Expected calibration error: a hand-computed example, Guo et al.'s reference loop, and input checks."""
from __future__ import annotations

import numpy as np
import pytest

from landscape.measures.calibration import expected_calibration_error, reliability_bins


def reference_ece(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Guo et al.'s _ECELoss (gpleiss/temperature_scaling) transcribed to numpy: bins (lower, upper]."""
    confidences, predictions = probabilities.max(axis=1), probabilities.argmax(axis=1)
    accuracies = predictions == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.mean() > 0:
            ece += abs(confidences[in_bin].mean() - accuracies[in_bin].mean()) * in_bin.mean()
    return ece


def random_predictions(seed: int, n: int = 500, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n, classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # (N, C)
    return probabilities, rng.integers(0, classes, n)


def test_hand_computed_example():
    probabilities = np.array([[0.9, 0.05, 0.05],   # conf 0.9, predicts 0, label 0: right
                              [0.6, 0.3, 0.1],     # conf 0.6, predicts 0, label 1: wrong
                              [0.4, 0.35, 0.25],   # conf 0.4, predicts 0, label 0: right
                              [0.5, 0.3, 0.2]])    # conf 0.5, predicts 0, label 2: wrong; on the edge
    labels = np.array([0, 1, 0, 2])
    # 2 bins (0, 0.5] and (0.5, 1]; 0.5 sits on the edge and goes into the lower bin.
    # lower {0.4 right, 0.5 wrong}: acc 1/2, conf 0.45, gap 0.05, weight 2/4 -> 0.025
    # upper {0.9 right, 0.6 wrong}: acc 1/2, conf 0.75, gap 0.25, weight 2/4 -> 0.125
    # ECE = 0.15 (0.5 in the upper bin would give 1/4 * 0.6 + 3/4 * |1/3 - 2/3| = 0.4)
    assert expected_calibration_error(probabilities, labels, bins=2) == pytest.approx(0.15)
    table = reliability_bins(probabilities, labels, bins=2)
    np.testing.assert_array_equal(table.count, [2, 2])
    np.testing.assert_allclose(table.confidence, [0.45, 0.75])
    np.testing.assert_allclose(table.accuracy, [0.5, 0.5])


def test_perfectly_calibrated_is_zero_and_confidently_wrong_is_one():
    # Confidence 0.55 right 11 of 20 times, 0.75 right 3 of 4, 0.95 right 19 of 20.
    confidence = np.repeat([0.55, 0.75, 0.95], [20, 4, 20])
    labels = np.concatenate([np.arange(20) >= 11, np.arange(4) >= 3, np.arange(20) >= 19]).astype(int)
    probabilities = np.stack([confidence, 1 - confidence], axis=1)  # (44, 2): class 0 is predicted
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(np.eye(3), np.array([1, 2, 0])) == pytest.approx(1.0)


@pytest.mark.parametrize("bins", [1, 4, 15, 37])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_reference_loop(bins, seed):
    probabilities, labels = random_predictions(seed)
    expected = reference_ece(probabilities, labels, bins)
    assert expected_calibration_error(probabilities, labels, bins) == pytest.approx(expected)


def test_bin_count_behaviour():
    probabilities, labels = random_predictions(2)
    correct = probabilities.argmax(axis=1) == labels
    # One bin: the gap between overall accuracy and mean confidence.
    assert expected_calibration_error(probabilities, labels, bins=1) == pytest.approx(
        abs(correct.mean() - probabilities.max(axis=1).mean()))
    # Halving every bin refines the partition, so by the triangle inequality ECE cannot drop.
    eces = [expected_calibration_error(probabilities, labels, bins) for bins in (1, 2, 4, 8, 16)]
    assert all(a <= b + 1e-12 for a, b in zip(eces, eces[1:]))
    table = reliability_bins(probabilities, labels, bins=16)
    assert table.count.shape == (16,) and table.count.sum() == len(labels)
    assert table.lower[0] == 0.0 and table.upper[-1] == 1.0
    # With 4 classes no confidence is below 1/4: those bins are empty and say so with NaN.
    assert np.all(table.count[:4] == 0) and np.all(np.isnan(table.accuracy[:4]))


@pytest.mark.parametrize("probabilities, labels, bins, match", [
    (np.array([0.2, 0.8]), np.array([1]), 15, r"\(N, C\)"),
    (np.zeros((0, 2)), np.zeros(0, int), 15, r"\(N, C\)"),
    (np.array([[0.2, 0.8]]), np.array([1, 0]), 15, r"labels must have shape"),
    (np.array([[-1.0, 2.0]]), np.array([1]), 15, "softmax"),
    (np.array([[0.2, 0.7]]), np.array([1]), 15, "sum to 1"),
    (np.array([[0.2, np.nan]]), np.array([1]), 15, "finite"),
    (np.array([[0.2, 0.8]]), np.array([2]), 15, r"\[0, C\)"),
    (np.array([[0.2, 0.8]]), np.array([0.5]), 15, "integer"),
    (np.array([[0.2, 0.8]]), np.array([1]), 0, "bins"),
    (np.array([[0.2, 0.8]]), np.array([1]), 2.5, "bins"),
])
def test_bad_input_raises(probabilities, labels, bins, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probabilities, labels, bins)
