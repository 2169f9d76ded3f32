"""Surface metrics: numbers read off a computed loss/accuracy grid around a trained prompt.

A surface is `alphas` (nx,), `betas` (ny,) and `loss`, `accuracy` of shape (nx, ny) with
`loss[i, j]` measured at (alphas[i], betas[j]); a 1D surface has ny == 1 and betas == [0].
NaN marks points not computed yet; they are ignored. Distances are measured in the grid's own
coordinates (the units of the directions, e.g. filter-normalized), so `radius` and the
reported radii are comparable only between surfaces with the same direction normalization.
numpy only: no torch import here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class SurfaceMetrics:
    center_loss: float                     # L0 = loss at (0, 0)
    center_acc: float                      # accuracy at (0, 0); NaN when no accuracy was given
    radius: float                          # r: the disc the local metrics look at
    tau: float                             # loss tolerance that defines the flat basin
    grid_sharpness: float                  # max (L - L0) over grid points with |x| <= r
    grid_sharpness_relative: float         # max (L - L0) / (1 + L0) over the same points
    mean_increase: float                   # mean (L - L0) over the same points (centre excluded)
    curvature_eigenvalues: list[float]     # eigenvalues of the fitted H, descending (2 in 2D, 1 in 1D)
    quadratic_r2: float                    # R^2 of the quadratic fit; NaN when under-determined
    flat_area_fraction: float              # fraction of disc points with L <= L0 + tau
    flat_radius: dict[str, float]          # "+x" "-x" "+y" "-y" "x" "y": first crossing of L0 + tau
    points_used: int                       # non-NaN grid points within the disc (centre included)

    def to_dict(self) -> dict:
        return asdict(self)


def surface_metrics(
    alphas: np.ndarray,
    betas: np.ndarray,
    loss: np.ndarray,
    accuracy: np.ndarray | None = None,
    radius: float = 0.5,
    tau: float = 0.1,
) -> SurfaceMetrics:
    """Local sharpness and flatness numbers of one surface.

    alphas (nx,), betas (ny,), loss and accuracy (nx, ny). Sharpness as the maximal loss
    increase in a neighbourhood follows Keskar et al. 2017 (there as a ratio, here absolute and
    relative to 1 + L0); the quadratic fit L ~ c + g.x + 1/2 x^T H x is least squares over the
    disc |x| <= radius, and its H is a 2x2 (or 1x1) curvature of the loss restricted to the plane.
    flat_radius[d] is where the loss along that half-axis first exceeds L0 + tau, linearly
    interpolated between the last grid point below and the first above; inf when it never does.
    """
    alphas, betas, loss, accuracy = _validate(alphas, betas, loss, accuracy, radius, tau)
    i0, j0 = _centre_index(alphas, "alphas"), _centre_index(betas, "betas")
    center_loss = float(loss[i0, j0])
    if math.isnan(center_loss):
        raise ValueError(
            "the loss at the centre (0, 0) is NaN (not computed yet): run the grid command again "
            "to resume it before computing metrics"
        )
    center_acc = float(accuracy[i0, j0]) if accuracy is not None else math.nan

    x, y = np.meshgrid(alphas, betas, indexing="ij")  # (nx, ny) each
    in_disc = (np.hypot(x, y) <= radius * (1 + 1e-9)) & ~np.isnan(loss)
    increase = loss[in_disc] - center_loss  # (M,)
    off_centre = ~((x[in_disc] == alphas[i0]) & (y[in_disc] == betas[j0]))
    eigenvalues, r2 = _quadratic_fit(x[in_disc], y[in_disc], loss[in_disc], two_d=len(betas) > 1)

    # Each half-axis walks outwards from the centre: [i0:] forwards, [i0::-1] backwards.
    threshold = center_loss + tau
    flat_radius = {"+x": _first_crossing(np.abs(alphas[i0:]), loss[i0:, j0], threshold),
                   "-x": _first_crossing(np.abs(alphas[i0::-1]), loss[i0::-1, j0], threshold)}
    if len(betas) > 1:
        flat_radius["+y"] = _first_crossing(np.abs(betas[j0:]), loss[i0, j0:], threshold)
        flat_radius["-y"] = _first_crossing(np.abs(betas[j0::-1]), loss[i0, j0::-1], threshold)
        flat_radius["y"] = min(flat_radius["+y"], flat_radius["-y"])
    flat_radius["x"] = min(flat_radius["+x"], flat_radius["-x"])

    return SurfaceMetrics(
        center_loss=center_loss,
        center_acc=center_acc,
        radius=float(radius),
        tau=float(tau),
        grid_sharpness=float(increase.max()),
        grid_sharpness_relative=float(increase.max() / (1.0 + center_loss)),
        mean_increase=float(increase[off_centre].mean()) if off_centre.any() else 0.0,
        curvature_eigenvalues=eigenvalues,
        quadratic_r2=r2,
        flat_area_fraction=float(np.mean(increase <= tau)),
        flat_radius=flat_radius,
        points_used=int(in_disc.sum()),
    )


def _validate(alphas, betas, loss, accuracy, radius, tau):
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    betas = np.asarray(betas, dtype=np.float64).reshape(-1)
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim == 1 and len(betas) == 1:
        loss = loss[:, None]  # (nx, 1): a 1D surface
    if loss.shape != (len(alphas), len(betas)):
        raise ValueError(
            f"loss has shape {loss.shape} but alphas/betas give ({len(alphas)}, {len(betas)}): "
            "pass loss[i, j] measured at (alphas[i], betas[j])"
        )
    if accuracy is not None:
        accuracy = np.asarray(accuracy, dtype=np.float64).reshape(loss.shape)
    if np.isnan(loss).all():
        raise ValueError("the loss surface is all NaN (no point computed): run the grid first")
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a positive finite number, got {radius}")
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a non-negative finite number, got {tau}")
    return alphas, betas, loss, accuracy


def _centre_index(coords: np.ndarray, name: str) -> int:
    # The grid stores coordinates as written by linspace; allow float round-off around 0.
    scale = float(np.max(np.abs(coords))) or 1.0
    hits = np.flatnonzero(np.abs(coords) <= 1e-9 * scale)
    if len(hits) != 1:
        raise ValueError(
            f"the surface has no point at the centre ({name} does not contain 0 exactly once: "
            f"{coords.min():.4g}..{coords.max():.4g}, {len(coords)} values): use an odd grid size "
            "symmetric around 0, e.g. --grid 21 --span 1.0"
        )
    return int(hits[0])


def _quadratic_fit(x: np.ndarray, y: np.ndarray, loss: np.ndarray, two_d: bool) -> tuple[list[float], float]:
    """Least squares L ~ c + g.x + 1/2 x^T H x; returns (eigenvalues of H descending, R^2)."""
    if two_d:
        design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)  # (M, 6)
    else:
        design = np.stack([np.ones_like(x), x, x * x], axis=1)  # (M, 3)
    n_features = design.shape[1]
    if len(loss) < n_features or np.linalg.matrix_rank(design) < n_features:
        return [math.nan] * (2 if two_d else 1), math.nan
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    if two_d:
        # x^2 carries H_xx / 2, xy carries H_xy, y^2 carries H_yy / 2.
        hessian = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
        eigenvalues = np.linalg.eigvalsh(hessian)[::-1]
    else:
        eigenvalues = np.array([2 * coef[2]])
    residual = loss - design @ coef
    total = float(np.sum((loss - loss.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else (1.0 if np.allclose(residual, 0) else math.nan)
    return [float(v) for v in eigenvalues], r2


def _first_crossing(distance: np.ndarray, loss: np.ndarray, threshold: float) -> float:
    """Distance (ascending from 0) at which loss first exceeds threshold; NaN points skipped."""
    keep = ~np.isnan(loss)
    distance, loss = distance[keep], loss[keep]
    above = np.flatnonzero(loss > threshold)
    if len(above) == 0:
        return math.inf
    k = int(above[0])
    if k == 0:
        return 0.0
    d0, d1, l0, l1 = distance[k - 1], distance[k], loss[k - 1], loss[k]
    return float(d0 + (threshold - l0) / (l1 - l0) * (d1 - d0))
