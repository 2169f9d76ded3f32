"""Surface metrics against closed forms on synthetic surfaces."""
from __future__ import annotations

import math

import numpy as np
import pytest

from landscape.measures.surface_metrics import surface_metrics

AXIS = np.linspace(-1.0, 1.0, 21)  # contains 0 and 0.5 exactly


def quadratic_surface(hessian: np.ndarray, gradient=(0.0, 0.0), center: float = 1.0):
    x, y = np.meshgrid(AXIS, AXIS, indexing="ij")  # (21, 21)
    points = np.stack([x, y], axis=-1)  # (21, 21, 2)
    quadratic = 0.5 * np.einsum("...i,ij,...j->...", points, hessian, points)
    return center + gradient[0] * x + gradient[1] * y + quadratic


def test_quadratic_fit_recovers_curvature():
    hessian = np.array([[3.0, 1.0], [1.0, -0.5]])
    loss = quadratic_surface(hessian, gradient=(0.2, -0.1))
    metrics = surface_metrics(AXIS, AXIS, loss, np.full(loss.shape, 0.75), radius=0.6, tau=0.1)
    np.testing.assert_allclose(metrics.curvature_eigenvalues, np.linalg.eigvalsh(hessian)[::-1], rtol=1e-9)
    assert metrics.quadratic_r2 == pytest.approx(1.0)
    assert metrics.center_loss == 1.0 and metrics.center_acc == 0.75


def test_grid_sharpness_mean_and_flat_area_by_brute_force():
    rng = np.random.default_rng(0)
    loss = quadratic_surface(np.diag([2.0, 0.5])) + 0.01 * rng.standard_normal((21, 21))
    loss[10, 10] = 1.0
    metrics = surface_metrics(AXIS, AXIS, loss, radius=0.55, tau=0.05)
    x, y = np.meshgrid(AXIS, AXIS, indexing="ij")
    disc = np.hypot(x, y) <= 0.55
    increase = loss[disc] - 1.0
    assert metrics.grid_sharpness == pytest.approx(increase.max())
    assert metrics.grid_sharpness_relative == pytest.approx(increase.max() / 2.0)
    assert metrics.mean_increase == pytest.approx(increase.sum() / (disc.sum() - 1))  # centre excluded
    assert metrics.flat_area_fraction == pytest.approx(np.mean(increase <= 0.05))
    assert metrics.points_used == disc.sum()
    assert math.isnan(metrics.center_acc)


def test_flat_surface_has_zero_sharpness():
    metrics = surface_metrics(AXIS, AXIS, np.full((21, 21), 0.3), radius=0.5, tau=0.01)
    assert metrics.grid_sharpness == 0 and metrics.grid_sharpness_relative == 0 and metrics.mean_increase == 0
    assert metrics.flat_area_fraction == 1.0
    np.testing.assert_allclose(metrics.curvature_eigenvalues, [0.0, 0.0], atol=1e-12)
    assert all(r == math.inf for r in metrics.flat_radius.values())


def test_flat_radius_per_half_axis():
    # L = x^2 along +x and 4 x^2 along -x, 0 along y: L0 + tau = 0.25 is crossed at 0.5 (a grid
    # point, where L == 0.25 does not exceed it) and, interpolating 0.16 at 0.2 and 0.36 at 0.3, at 0.245.
    x, _ = np.meshgrid(AXIS, AXIS, indexing="ij")
    loss = np.where(x > 0, x**2, 4 * x**2)
    radii = surface_metrics(AXIS, AXIS, loss, radius=1.0, tau=0.25).flat_radius
    assert radii["+x"] == pytest.approx(0.5) and radii["-x"] == pytest.approx(0.245)
    assert radii["x"] == pytest.approx(0.245)
    assert radii["+y"] == radii["-y"] == radii["y"] == math.inf


def test_one_dimensional_surface():
    loss = 2.0 + 1.5 * AXIS**2  # (21,)
    metrics = surface_metrics(AXIS, np.array([0.0]), loss[:, None], radius=1.0, tau=0.1)
    assert metrics.curvature_eigenvalues == pytest.approx([3.0])
    assert metrics.grid_sharpness == pytest.approx(1.5)
    assert set(metrics.flat_radius) == {"+x", "-x", "x"}
    assert metrics.flat_radius["x"] == pytest.approx(math.sqrt(0.1 / 1.5), abs=0.02)  # linear interpolation


def test_nan_points_are_ignored():
    loss = quadratic_surface(np.diag([1.0, 1.0]))
    full = surface_metrics(AXIS, AXIS, loss, radius=0.5)
    loss = loss.copy()
    loss[15, 10] = np.nan  # (0.5, 0): a disc point and an axis point
    partial = surface_metrics(AXIS, AXIS, loss, radius=0.5)
    assert partial.points_used == full.points_used - 1
    assert partial.grid_sharpness == pytest.approx(full.grid_sharpness)
    np.testing.assert_allclose(partial.curvature_eigenvalues, [1.0, 1.0])
    assert np.isfinite(partial.flat_radius["+x"])


@pytest.mark.parametrize(
    "alphas, loss, message",
    [
        (np.linspace(-1, 1, 20), np.zeros((20, 21)), "no point at the centre"),
        (AXIS, np.full((21, 21), np.nan), "all NaN"),
        (AXIS, np.where(np.eye(21, dtype=bool), np.nan, 0.0), "centre .* is NaN"),
        (AXIS, np.zeros((21, 20)), "shape"),
    ],
)
def test_bad_surfaces_raise_clear_errors(alphas, loss, message):
    with pytest.raises(ValueError, match=message):
        surface_metrics(alphas, AXIS, loss)
