"""Calibration: does a classifier's confidence match how often it is right?

The confidence of an example is its largest class probability and its prediction that class.
Confidences are put into `bins` equal-width bins over [0, 1]; a calibrated model is right in a
fraction of each bin's examples equal to their mean confidence. The expected calibration error
weighs each bin's gap by its share of examples:

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|

Naeini, Cooper & Hauskrecht 2015, "Obtaining Well Calibrated Probabilities Using Bayesian
Binning" (AAAI); Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks"
(ICML), eq. 3 and their reference code (gpleiss/temperature_scaling), whose binning this follows.
numpy only: no torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows of `probabilities` may come out of a float32 softmax; anything further off is not a distribution.
SUM_TOLERANCE = 1e-4


@dataclass
class ReliabilityBins:
    """Per-bin table of a reliability diagram (Guo et al. 2017, fig. 1), B = number of bins.

    Bin b holds confidences in (lower[b], upper[b]]; accuracy and confidence are NaN where count is 0.
    """

    lower: np.ndarray       # (B,) left bin edges, lower[0] = 0
    upper: np.ndarray       # (B,) right bin edges, upper[-1] = 1
    count: np.ndarray       # (B,) int: examples in the bin
    accuracy: np.ndarray    # (B,) fraction of the bin's predictions that equal the label
    confidence: np.ndarray  # (B,) mean max-probability of the bin's examples

    @property
    def expected_calibration_error(self) -> float:
        """sum_b count_b / N * |accuracy_b - confidence_b| over non-empty bins (Guo et al. 2017, eq. 3)."""
        filled = self.count > 0
        weights = self.count[filled] / self.count.sum()
        return float(np.sum(weights * np.abs(self.accuracy[filled] - self.confidence[filled])))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> ReliabilityBins:
    """Bin N predictions by confidence: probabilities (N, C) rows on the simplex, labels (N,) ints in [0, C).

    Bins are equal-width and right-closed, (lo, hi], as in Guo et al.'s reference code
    (`confidences.gt(lower) * confidences.le(upper)`): a confidence exactly on an inner edge such
    as 0.2 with 5 bins goes into the lower bin (0.0, 0.2], and 1.0 into the last one. A confidence
    of exactly 0 would fall in no bin, but it cannot occur: the max of C probabilities summing to 1
    is at least 1/C. The prediction is np.argmax, i.e. the first of tied classes.
    """
    probabilities, labels = _validate(probabilities, labels, bins)
    confidence = probabilities.max(axis=1)  # (N,)
    correct = probabilities.argmax(axis=1) == labels  # (N,)

    edges = np.linspace(0.0, 1.0, bins + 1)  # (B+1,)
    # side="left" puts c == edges[k] at k, hence into bin k-1 = (edges[k-1], edges[k]]: right-closed.
    index = np.searchsorted(edges, confidence, side="left") - 1  # (N,) in [0, B-1] since 0 < c <= 1
    count = np.bincount(index, minlength=bins)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: 0/0 -> NaN, on purpose
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
    return ReliabilityBins(lower=edges[:-1], upper=edges[1:], count=count, accuracy=accuracy,
                           confidence=mean_confidence)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of probabilities (N, C) against labels (N,) with `bins` equal-width confidence bins, in [0, 1].

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| (Guo et al. 2017, eq. 3; Naeini et al. 2015).
    15 bins is Guo et al.'s default. Binning convention: see `reliability_bins`.
    """
    return reliability_bins(probabilities, labels, bins).expected_calibration_error


def _validate(probabilities, labels, bins) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer (Guo et al. use 15), got {bins!r}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0 or probabilities.shape[1] == 0:
        raise ValueError(
            f"probabilities must be a non-empty (N, C) array, got shape {probabilities.shape}: "
            "for binary scores p of the positive class pass np.stack([1 - p, p], axis=1)"
        )
    if labels.shape != (probabilities.shape[0],):
        raise ValueError(f"labels must have shape (N,) = ({probabilities.shape[0]},) to match probabilities, "
                         f"got {labels.shape}")
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("probabilities must be finite and in [0, 1]: pass softmax(logits), not the logits")
    row_sums = probabilities.sum(axis=1)  # (N,)
    if np.any(np.abs(row_sums - 1.0) > SUM_TOLERANCE):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(f"each row of probabilities must sum to 1 (row {worst} sums to {row_sums[worst]:.6g}): "
                         "apply softmax over the class axis")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)  # e.g. labels read back from a float array
        else:
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(f"labels must lie in [0, C) = [0, {probabilities.shape[1]}), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    return probabilities, labels
