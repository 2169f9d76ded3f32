"""The eigenvalue density of an SLQ quadrature (landscape.measures.spectrum), broadened for figures.

numpy only: no torch import here, so the drawing modules can use it.
"""
from __future__ import annotations

import numpy as np


def spectral_density(nodes: list[float] | np.ndarray, weights: list[float] | np.ndarray,
                     grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-broadened density sum_k w_k N(t; theta_k, sigma^2) on grid (G,) -> (G,).

    Ghorbani et al. (2019, eq. 4). Integrates to sum_k w_k = 1 when the grid reaches a few sigma
    beyond the extreme nodes. sigma is in eigenvalue units; about the grid spacing times a few,
    and below the gaps one wants to resolve.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (a width in eigenvalue units), got {sigma}")
    nodes, weights = np.asarray(nodes, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    z = (np.asarray(grid, dtype=np.float64)[:, None] - nodes[None, :]) / sigma  # (G, K)
    return np.exp(-0.5 * z**2) @ weights / (sigma * np.sqrt(2 * np.pi))  # (G,)


def density_curves(quadratures: dict, sigma: float | None = None, points: int = 1000
                   ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Broadened densities of several SLQ quadratures on one shared grid, for figures.

    quadratures: label -> (nodes, weights). sigma defaults to 1% of the range of all nodes (Ghorbani et al.
    2019 broaden the same way); the grid reaches 5 sigma beyond the extreme nodes. Returns (grid (points,),
    label -> density (points,), sigma).
    """
    every = np.concatenate([np.asarray(nodes, dtype=float) for nodes, _ in quadratures.values()])
    span = float(every.max() - every.min()) or max(abs(float(every.max())), 1.0)
    sigma = sigma or 0.01 * span
    grid = np.linspace(every.min() - 5 * sigma, every.max() + 5 * sigma, points)  # (points,)
    return grid, {label: spectral_density(n, w, grid, sigma) for label, (n, w) in quadratures.items()}, sigma
