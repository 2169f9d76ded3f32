"""Basins of a loss surface: 0-dimensional sublevel-set persistence of the loss grid.

Sweep a level t upwards and watch the sublevel set {x : L(x) <= t}. Each local minimum starts a
connected component at t = L(min) (its birth); when two components touch at a saddle, the younger
one (higher minimum) dies there (the elder rule). A minimum's persistence, death - birth, is the
height of the lowest loss barrier between it and a deeper basin, so "how many basins at least
tau deep" is a number to compare between methods instead of reading contour plots by eye (on
the grid's resolution: a basin narrower than one grid step is not seen). The global minimum
never dies.

Edelsbrunner & Harer, "Computational Topology: An Introduction" (2010), ch. VII (persistence of
sublevel-set filtrations, the elder rule). Basins and merge trees of loss landscapes as in
the Landscaper tool (merge trees and persistence of loss landscapes) and Xie, Geniesse et al. 2024
("Evaluating Loss Landscapes from a Topology Perspective", arXiv 2411.09807).
numpy + gudhi only: no torch import here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ptp_core.io import to_json


@dataclass
class Topology:
    """Persistence pairs of a surface's minima and the number of basins at least `tau` deep.

    persistence: [[birth, death], ...] in loss units, persistence descending; the first pair is
    the global minimum with death = inf (written as null in JSON, see `to_dict`).
    """

    persistence: list[list[float]]
    basins: int   # minima with death - birth >= tau, the global minimum included
    tau: float    # barrier height (loss units) a minimum needs to count as a basin

    def to_dict(self) -> dict:
        """Strict-JSON dict: the infinite death becomes None, exactly as ptp_core.io.to_json writes it."""
        return to_json(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        """Inverse of `to_dict`: a None death is the global minimum's infinite one."""
        pairs = [[float(birth), math.inf if death is None else float(death)] for birth, death in data["persistence"]]
        return cls(persistence=pairs, basins=int(data["basins"]), tau=float(data["tau"]))


def sublevel_persistence(loss: np.ndarray) -> np.ndarray:
    """(birth, death) pairs of the 0-dimensional sublevel-set persistence of a loss grid.

    loss: (nx, ny) with loss[i, j] at (alphas[i], betas[j]) (landscape/surface.py), or (nx,) /
    (nx, 1) for a 1D surface. Returns (K, 2) float64 sorted by persistence death - birth
    descending (ties: lower birth first); row 0 is the global minimum with death = +inf.

    Connectivity: the grid points are the samples, so they are the VERTICES of gudhi's cubical
    complex (`CubicalComplex(vertices=...)`, gudhi >= 3.8). An edge joins 4-neighbours and enters at
    the max of its two endpoints; squares enter at the max of their four corners and only fill
    1-cycles, so they do not change H0. Diagonal neighbours are therefore not adjacent: two minima
    touching at a corner stay separate until the level reaches a 4-path joining them. (Treating the
    values as top-dimensional cells instead would give 8-connectivity and shift every cell.)

    Zero-persistence pairs (a plateau entered in several places at the same level) are dropped.
    NaN (a point not computed yet) is refused rather than guessed: treating it as +inf would let a
    hole in a half-run grid split a basin into spurious immortal components, and treating it as
    missing changes the connectivity, so either way the basin count would depend on how far the
    grid run got. +-inf is refused too (gudhi's answer for a vertex that never enters is another
    infinite pair, not a basin).
    """
    import gudhi  # an optional-weight compiled package (~0.2 s): loaded by the first surface's topology

    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim == 1:
        loss = loss[:, None]  # (nx, 1): a 1D surface is a line of vertices
    if loss.ndim != 2 or loss.size == 0:
        raise ValueError(f"loss must be a non-empty (nx, ny) grid (or (nx,) for a 1D surface), got shape {loss.shape}")
    if np.isnan(loss).any():
        raise ValueError(
            f"the loss grid has {int(np.isnan(loss).sum())} NaN points (not computed yet): run the grid "
            "command again to resume it before computing its topology"
        )
    if not np.isfinite(loss).all():
        raise ValueError("the loss grid has infinite values: re-evaluate those points (e.g. in float32) first")

    complex_ = gudhi.CubicalComplex(vertices=loss)
    complex_.compute_persistence(min_persistence=0.0)  # strictly > 0: drops plateau pairs
    pairs = np.asarray(complex_.persistence_intervals_in_dimension(0), dtype=np.float64).reshape(-1, 2)  # (K, 2)
    persistence = pairs[:, 1] - pairs[:, 0]  # (K,), inf for the global minimum
    order = np.lexsort((pairs[:, 0], -persistence))  # last key is primary: persistence descending
    return pairs[order]


def count_basins(pairs: np.ndarray, tau: float) -> int:
    """Number of minima whose persistence death - birth is >= tau (the global minimum's inf counts).

    pairs: (K, 2) from `sublevel_persistence`; tau >= 0 in loss units.
    """
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a non-negative finite loss difference, got {tau}")
    pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)  # (K, 2)
    return int(np.sum(pairs[:, 1] - pairs[:, 0] >= tau))


def loss_topology(loss: np.ndarray, tau: float) -> Topology:
    """Persistence pairs and basin count of one loss grid: loss (nx, ny) or (nx,), tau in loss units."""
    pairs = sublevel_persistence(loss)  # (K, 2)
    return Topology(persistence=pairs.tolist(), basins=count_basins(pairs, tau), tau=float(tau))
