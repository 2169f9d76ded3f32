"""Surface metrics report only what the grid resolves: None with a reason otherwise, checked by brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest

from landscape.grid.spec import grid_axis
from landscape.measures.row import metrics_row
from landscape.measures.surface_metrics import surface_metrics

DISC_METRICS = ("grid_sharpness", "grid_sharpness_relative", "mean_increase", "flat_area_fraction")


def bowl(axis: np.ndarray, betas: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """1 + x^2 + 2 y^2 plus a little noise, so that a fit through too few points would still 'fit' it."""
    betas = axis if betas is None else betas
    x, y = np.meshgrid(axis, betas, indexing="ij")
    noise = 0.01 * np.random.default_rng(seed).standard_normal(x.shape)
    noise[np.hypot(x, y) == 0] = 0.0
    return 1.0 + x**2 + 2 * y**2 + noise


def brute_force_disc(axis: np.ndarray, loss: np.ndarray, radius: float, tau: float) -> dict:
    x, y = np.meshgrid(axis, axis, indexing="ij")
    centre = np.hypot(x, y) == 0
    disc = np.hypot(x, y) <= radius + 1e-12
    increase = loss - loss[centre][0]
    return {"grid_sharpness": increase[disc].max(), "mean_increase": increase[disc & ~centre].mean(),
            "flat_area_fraction": np.mean(increase[disc] <= tau), "points": int(disc.sum())}


@pytest.mark.parametrize("count, span", [(3, 1.0), (7, 3.0)])
def test_a_disc_holding_only_the_centre_is_not_reported(count, span):
    axis = grid_axis(count, span)  # steps of 1: the disc r = 0.5 holds the centre alone
    metrics = surface_metrics(axis, axis, bowl(axis), radius=0.5, tau=0.1)
    for name in DISC_METRICS + ("quadratic_r2",):
        assert getattr(metrics, name) is None and "half-axis" in metrics.reasons[name]
    assert metrics.curvature_eigenvalues == [None, None]
    assert metrics.points_used == 1
    row = metrics.to_dict()
    assert row["grid_sharpness"] is None and "finer --grid" in row["grid_sharpness_reason"]


def test_one_ring_is_enough_and_equals_brute_force():
    axis = grid_axis(5, 1.0)  # step 0.5: the disc r = 0.5 holds the centre and its 4 axis neighbours
    loss = bowl(axis)
    metrics = surface_metrics(axis, axis, loss, radius=0.5, tau=0.3)
    expected = brute_force_disc(axis, loss, 0.5, 0.3)
    assert metrics.grid_sharpness == pytest.approx(expected["grid_sharpness"])
    assert metrics.mean_increase == pytest.approx(expected["mean_increase"])  # over the disc, centre excluded
    assert metrics.flat_area_fraction == pytest.approx(expected["flat_area_fraction"])
    assert metrics.points_used == expected["points"] == 5
    # 5 points for a 6-coefficient quadratic: the fit is refused, the disc metrics are not
    assert metrics.quadratic_r2 is None and "needs 9" in metrics.reasons["quadratic_r2"]
    assert not any(name in metrics.reasons for name in DISC_METRICS)


def test_a_disc_leaving_the_grid_is_not_reported():
    axis = grid_axis(21, 0.2)  # every point lies within r = 0.5: the disc is cut to the 0.2 square
    loss = bowl(axis)
    metrics = surface_metrics(axis, axis, loss, radius=0.5)
    for name in DISC_METRICS:
        assert getattr(metrics, name) is None and "leaves the grid" in metrics.reasons[name]
    inside = surface_metrics(axis, axis, loss, radius=0.2, tau=0.01)
    expected = brute_force_disc(axis, loss, 0.2, 0.01)
    assert inside.grid_sharpness == pytest.approx(expected["grid_sharpness"])
    assert inside.flat_area_fraction == pytest.approx(expected["flat_area_fraction"])


def test_quadratic_fit_without_residual_dof_is_not_reported():
    axis = grid_axis(5, 1.0)  # a 5x1 line: 3 points in the disc r = 0.5 for 3 coefficients
    noise = np.array([0.0, 0.031, 0.0, -0.022, 0.017])
    loss = (1.0 + noise)[:, None]
    metrics = surface_metrics(axis, np.zeros(1), loss, radius=0.5)
    assert metrics.curvature_eigenvalues == [None] and metrics.quadratic_r2 is None
    assert "3 points" in metrics.reasons["curvature_eigenvalues"]
    # with residual degrees of freedom the fit is reported and equals numpy's polyfit
    fine = grid_axis(11, 0.5)
    line = 1.0 + 1.5 * fine**2 + 0.3 * fine + 0.01 * np.random.default_rng(1).standard_normal(11)
    line[5] = 1.0
    fitted = surface_metrics(fine, np.zeros(1), line[:, None], radius=0.5)
    coefficients = np.polyfit(fine, line, 2)
    assert fitted.curvature_eigenvalues[0] == pytest.approx(2 * coefficients[0], rel=1e-9)
    residual = line - np.polyval(coefficients, fine)
    assert fitted.quadratic_r2 == pytest.approx(1 - residual @ residual / np.sum((line - line.mean()) ** 2))


@pytest.mark.parametrize("count", [3, 5, 11, 21, 41])
def test_flat_radius_is_reported_only_when_its_bracket_is_fine(count):
    axis = grid_axis(count, 1.0)
    tau = 0.05  # L = x^2 crosses L0 + tau at sqrt(0.05) = 0.2236
    loss = (axis**2)[:, None]
    metrics = surface_metrics(axis, np.zeros(1), loss, radius=1.0, tau=tau)
    low, high = metrics.flat_radius_bracket["+x"]
    assert low <= math.sqrt(tau) <= high and high - low == pytest.approx(2 / (count - 1))
    value = metrics.flat_radius["+x"]
    if high - low > 0.5 * math.sqrt(tau):  # 0.05 at --grid 3 and 0.10 at --grid 5 before: now refused
        assert value is None and "coarser" in metrics.reasons["flat_radius_+x"]
        assert metrics.flat_radius["x"] is None
    else:
        assert low <= value <= high and abs(value - math.sqrt(tau)) < high - low
        assert metrics.flat_radius["x"] == value and "flat_radius_x" not in metrics.reasons


def test_flat_radius_without_crossing_stays_inf_with_a_reason():
    axis = grid_axis(11, 1.0)
    loss = np.where(axis[:, None] > 0, 0.0, 4 * axis[:, None] ** 2) * np.ones((11, 11))
    metrics = surface_metrics(axis, axis, 1.0 + loss, radius=0.5, tau=1.0)
    assert metrics.flat_radius["+x"] == math.inf and "no crossing within the span" in metrics.reasons["flat_radius_+x"]
    interpolated = 0.4 + (1.0 - 0.64) / (1.44 - 0.64) * 0.2  # 4 x^2 at the grid points 0.4 and 0.6
    assert metrics.flat_radius["-x"] == pytest.approx(interpolated) == metrics.flat_radius["x"]
    assert metrics.flat_radius["y"] == math.inf and "no crossing" in metrics.reasons["flat_radius_y"]


def test_an_unresolved_half_axis_that_may_be_nearer_leaves_the_axis_unresolved():
    axis = grid_axis(11, 1.0)  # +x crosses at 0.15 (bracket [0.1, 0.2]: too coarse), -x at 0.55 (resolved)
    loss = np.where(axis > 0, (axis / 0.15) ** 2, (axis / 0.55) ** 2)[:, None]
    metrics = surface_metrics(axis, np.zeros(1), loss, radius=1.0, tau=1.0)
    assert metrics.flat_radius["+x"] is None and metrics.flat_radius["-x"] is not None
    assert metrics.flat_radius["x"] is None and "+x" in metrics.reasons["flat_radius_x"]


def test_row_holds_none_beside_a_reason_and_records_the_support():
    axis = grid_axis(3, 1.0)
    row = metrics_row("runs/a", "pt", 0, surface=surface_metrics(axis, axis, bowl(axis)))
    for name in DISC_METRICS + ("curvature_eigenvalues", "quadratic_r2"):
        assert isinstance(row[f"{name}_reason"], str)
    assert row["grid_sharpness"] is None and row["curvature_eigenvalues"] == [None, None]
    assert row["cost"]["surface_points"] == 1 and row["cost"]["surface_fit_residual_dof"] == 0
    assert "reasons" not in row and "fit_residual_dof" not in row
