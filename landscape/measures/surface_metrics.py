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
from dataclasses import asdict, dataclass, field

import numpy as np

# The quadratic fit needs residual degrees of freedom beyond its coefficients: with none, R^2 is 1 and the
# curvature fits noise exactly; three leave an R^2 that can tell a bowl from noise.
MIN_FIT_RESIDUAL_DOF = 3
# A flat radius is reported when its bracket (the grid points either side of the crossing) is at most half as wide
# as the radius found: coarser, and linear interpolation between the bracket's ends is mostly guess.
MAX_BRACKET_OF_RADIUS = 0.5


@dataclass
class SurfaceMetrics:
    """A metric the grid cannot resolve is None and `reasons[name]` says why (to_dict: `<name>_reason`)."""

    center_loss: float                     # L0 = loss at (0, 0)
    center_acc: float                      # accuracy at (0, 0); NaN when no accuracy was given
    radius: float                          # r: the disc the local metrics look at
    tau: float                             # loss tolerance that defines the flat basin
    grid_sharpness: float | None           # max (L - L0) over grid points with |x| <= r
    grid_sharpness_relative: float | None  # max (L - L0) / (1 + L0) over the same points
    mean_increase: float | None            # mean (L - L0) over the disc's points other than the centre
    curvature_eigenvalues: list            # eigenvalues of the fitted H, descending (2 in 2D, 1 in 1D), or Nones
    quadratic_r2: float | None             # R^2 of the quadratic fit
    flat_area_fraction: float | None       # fraction of disc points (centre included) with L <= L0 + tau
    flat_radius: dict[str, float | None]   # "+x" "-x" "+y" "-y" "x" "y": first crossing of L0 + tau; inf: none
    flat_radius_bracket: dict[str, list | None]  # the same keys: [last grid distance below, first above]
    points_used: int                       # support of the disc metrics: computed grid points within r (centre included)
    fit_residual_dof: int                  # support of the fit: points used minus the fit's coefficients
    reasons: dict[str, str] = field(default_factory=dict)  # metric name (flat_radius_+x, ...) -> why None / inf

    def to_dict(self) -> dict:
        """The row's keys: every metric, its `<name>_reason` where it has one, radius/tau/points_used (settings)."""
        values = asdict(self)
        values.pop("fit_residual_dof")
        reasons = values.pop("reasons")
        return {**values, **{f"{name}_reason": reason for name, reason in reasons.items()}}


def surface_metrics(
    alphas: np.ndarray,
    betas: np.ndarray,
    loss: np.ndarray,
    accuracy: np.ndarray | None = None,
    radius: float = 0.5,
    tau: float = 0.1,
) -> SurfaceMetrics:
    """Local sharpness and flatness numbers of one surface, each only where the grid resolves it.

    alphas (nx,), betas (ny,), loss and accuracy (nx, ny). Sharpness as the maximal loss
    increase in a neighbourhood follows Keskar et al. 2017 (there as a ratio, here absolute and
    relative to 1 + L0); the quadratic fit L ~ c + g.x + 1/2 x^T H x is least squares over the
    disc |x| <= radius, and its H is a 2x2 (or 1x1) curvature of the loss restricted to the plane.
    Support the disc metrics need: the disc inside the grid (radius <= the smallest half-axis extent,
    else the grid cuts the disc to a square) and at least one computed point within r on every
    half-axis (+x, -x, and +y, -y in 2D); the fit also needs MIN_FIT_RESIDUAL_DOF points beyond its
    coefficients. flat_radius[d] is where the loss along that half-axis first exceeds L0 + tau,
    linearly interpolated between the last grid point below and the first above (its bracket);
    None when the bracket is wider than MAX_BRACKET_OF_RADIUS times that radius, inf when it never does.
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
    two_d = len(betas) > 1
    reasons: dict[str, str] = {}

    x, y = np.meshgrid(alphas, betas, indexing="ij")  # (nx, ny) each
    in_disc = (np.hypot(x, y) <= radius * (1 + 1e-9)) & ~np.isnan(loss)
    increase = loss[in_disc] - center_loss  # (M,)
    off_centre = ~((x[in_disc] == alphas[i0]) & (y[in_disc] == betas[j0]))
    disc_reason = _disc_support(alphas, betas, loss, i0, j0, radius)
    disc_names = ("grid_sharpness", "grid_sharpness_relative", "mean_increase", "flat_area_fraction")
    if disc_reason:
        reasons.update({name: disc_reason for name in disc_names})
    n_features = 6 if two_d else 3
    dof = int(in_disc.sum()) - n_features
    eigenvalues, r2, fit_reason = [None] * (2 if two_d else 1), None, disc_reason
    if not fit_reason:
        eigenvalues, r2, fit_reason = _quadratic_fit(x[in_disc], y[in_disc], loss[in_disc], two_d)
    if fit_reason:
        reasons.update(curvature_eigenvalues=fit_reason, quadratic_r2=fit_reason)

    # Each half-axis walks outwards from the centre: [i0:] forwards, [i0::-1] backwards.
    threshold = center_loss + tau
    walks = {"+x": (alphas[i0:], loss[i0:, j0]), "-x": (alphas[i0::-1], loss[i0::-1, j0])}
    if two_d:
        walks.update({"+y": (betas[j0:], loss[i0, j0:]), "-y": (betas[j0::-1], loss[i0, j0::-1])})
    flat_radius, bracket = {}, {}
    for name, (coords, values) in walks.items():
        flat_radius[name], bracket[name], why = _first_crossing(np.abs(coords), values, threshold)
        if why:
            reasons[f"flat_radius_{name}"] = why
    for axis in ("x", "y") if two_d else ("x",):
        flat_radius[axis], bracket[axis], why = _nearer_crossing(flat_radius, bracket, reasons, axis)
        if why:
            reasons[f"flat_radius_{axis}"] = why

    resolved = not disc_reason
    return SurfaceMetrics(
        center_loss=center_loss,
        center_acc=center_acc,
        radius=float(radius),
        tau=float(tau),
        grid_sharpness=float(increase.max()) if resolved else None,
        grid_sharpness_relative=float(increase.max() / (1.0 + center_loss)) if resolved else None,
        mean_increase=float(increase[off_centre].mean()) if resolved else None,
        curvature_eigenvalues=eigenvalues,
        quadratic_r2=r2,
        flat_area_fraction=float(np.mean(increase <= tau)) if resolved else None,
        flat_radius=flat_radius,
        flat_radius_bracket=bracket,
        points_used=int(in_disc.sum()),
        fit_residual_dof=max(dof, 0),
        reasons=reasons,
    )


def _disc_support(alphas, betas, loss, i0: int, j0: int, radius: float) -> str | None:
    """Why the disc metrics are not resolved on this grid (None: they are)."""
    axes = {"x": (alphas, loss[:, j0], i0), "y": (betas, loss[i0, :], j0)} if len(betas) > 1 else \
        {"x": (alphas, loss[:, j0], i0)}
    for name, (coords, _, _) in axes.items():
        extent = min(float(coords.max()), float(-coords.min()))
        if radius > extent * (1 + 1e-9):
            return (f"the disc r={radius:g} leaves the grid ({name} spans +-{extent:g}): "
                    f"raise --span to at least {radius:g}")
    for name, (coords, values, centre) in axes.items():
        for sign, side in (("+", slice(centre + 1, None)), ("-", slice(None, centre))):
            near = (np.abs(coords[side]) <= radius * (1 + 1e-9)) & ~np.isnan(values[side])
            if not near.any():
                step = float(np.diff(coords).min()) if len(coords) > 1 else math.inf
                mend = (f"use a finer --grid (step <= {radius:g})" if step > radius * (1 + 1e-9)
                        else "run the grid command again to compute the missing points")
                return f"the disc r={radius:g} holds no computed point on the {sign}{name} half-axis " \
                       f"(grid step {step:g}): {mend}"
    return None


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


def _quadratic_fit(x: np.ndarray, y: np.ndarray, loss: np.ndarray,
                   two_d: bool) -> tuple[list, float | None, str | None]:
    """Least squares L ~ c + g.x + 1/2 x^T H x; (eigenvalues of H descending, R^2, None) or (Nones, None, reason)."""
    if two_d:
        design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)  # (M, 6)
    else:
        design = np.stack([np.ones_like(x), x, x * x], axis=1)  # (M, 3)
    n_features = design.shape[1]
    unresolved = [None] * (2 if two_d else 1)
    if len(loss) < n_features + MIN_FIT_RESIDUAL_DOF:
        return unresolved, None, (f"the quadratic fit has {len(loss)} points in the disc for {n_features} "
                                  f"coefficients; it needs {n_features + MIN_FIT_RESIDUAL_DOF}: use a finer --grid")
    if np.linalg.matrix_rank(design) < n_features:
        return unresolved, None, "the disc's points do not determine a quadratic (rank-deficient): use a finer --grid"
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
    return [float(v) for v in eigenvalues], r2, None


def _first_crossing(distance: np.ndarray, loss: np.ndarray,
                    threshold: float) -> tuple[float | None, list | None, str | None]:
    """(radius, bracket, reason) where loss (ascending distance from 0) first exceeds threshold; NaN points skipped.

    radius: linear interpolation inside the bracket [last distance below, first above]; None when the bracket is
    wider than MAX_BRACKET_OF_RADIUS * radius; inf (censored, with a reason) when the loss never exceeds it.
    """
    keep = ~np.isnan(loss)
    distance, loss = distance[keep], loss[keep]
    above = np.flatnonzero(loss > threshold)
    if len(above) == 0:
        return math.inf, None, f"no crossing within the span (L <= L0 + tau up to {distance.max():g})"
    k = int(above[0])  # >= 1: the walk starts at the centre, where L = L0 <= L0 + tau
    d0, d1, l0, l1 = float(distance[k - 1]), float(distance[k]), loss[k - 1], loss[k]
    radius = float(d0 + (threshold - l0) / (l1 - l0) * (d1 - d0))
    if d1 - d0 > MAX_BRACKET_OF_RADIUS * radius:
        return None, [d0, d1], (f"crossing between {d0:g} and {d1:g}: the grid step {d1 - d0:g} is coarser than "
                                f"{MAX_BRACKET_OF_RADIUS:g} x the radius {radius:.3g}; use a finer --grid")
    return radius, [d0, d1], None


def _nearer_crossing(radius: dict, bracket: dict, reasons: dict, axis: str) -> tuple:
    """The axis's flat radius: the nearer of its two half-axes' crossings (radius, bracket, reason).

    An unresolved half counts when its bracket starts below the other's radius (it could be the nearer one).
    """
    halves = [f"+{axis}", f"-{axis}"]
    resolved = [h for h in halves if radius[h] is not None]
    nearest = min(resolved, key=lambda h: radius[h]) if resolved else None
    for h in halves:
        if radius[h] is None and (nearest is None or bracket[h][0] < radius[nearest]):
            return None, bracket[h], f"the {h} crossing is not resolved ({reasons[f'flat_radius_{h}']})"
    return radius[nearest], bracket[nearest], reasons.get(f"flat_radius_{nearest}")
