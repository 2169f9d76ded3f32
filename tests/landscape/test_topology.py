"""Sublevel-set persistence of loss grids: gudhi == an independent union-find, and basin counts."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import gudhi
import numpy as np
import pytest

from landscape.measures.topology import Topology, count_basins, loss_topology, sublevel_persistence
from ptp_core.io import dumps


def union_find_persistence(values: np.ndarray) -> np.ndarray:
    """(K, 2) H0 pairs of a 4-connected vertex grid by hand: add vertices low to high, elder rule at merges."""
    nx, ny = values.shape
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    birth: dict[tuple[int, int], float] = {}  # keyed by root

    def find(v):
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    pairs = []
    for flat in np.argsort(values, axis=None, kind="stable"):
        v = (int(flat // ny), int(flat % ny))
        level = float(values[v])
        i, j = v
        roots = {find(n) for n in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if n in parent}
        parent[v] = v
        if not roots:
            birth[v] = level  # a local minimum: a new component is born
            continue
        elder = min(roots, key=lambda r: birth[r])
        parent[v] = elder
        for root in roots - {elder}:  # the younger components die here
            pairs.append((birth.pop(root), level))
            parent[root] = elder
    pairs += [(b, math.inf) for b in birth.values()]
    return np.array([p for p in pairs if p[1] > p[0]], dtype=np.float64).reshape(-1, 2)


def gudhi_persistence(values: np.ndarray) -> np.ndarray:
    complex_ = gudhi.CubicalComplex(vertices=values)
    complex_.compute_persistence()
    return np.asarray(complex_.persistence_intervals_in_dimension(0), dtype=np.float64).reshape(-1, 2)


def as_multiset(pairs: np.ndarray) -> np.ndarray:
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


@pytest.mark.parametrize("shape", [(5, 7), (1, 9), (9, 1), (6, 6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_persistence_equals_union_find_and_gudhi(shape, seed):
    loss = np.random.default_rng(seed).random(shape)
    pairs = sublevel_persistence(loss)
    brute = union_find_persistence(loss)
    np.testing.assert_array_equal(as_multiset(pairs), as_multiset(brute))
    np.testing.assert_array_equal(as_multiset(pairs), as_multiset(gudhi_persistence(loss)))
    assert np.isinf(pairs[:, 1]).sum() == 1 and pairs[0, 0] == loss.min() and pairs[0, 1] == math.inf
    assert np.all(np.diff(pairs[:, 1] - pairs[:, 0]) <= 0)  # persistence descending


def test_one_dimensional_loss_is_a_line():
    loss = np.random.default_rng(3).random(9)
    np.testing.assert_array_equal(sublevel_persistence(loss), sublevel_persistence(loss[:, None]))


def test_diagonal_neighbours_are_not_connected():
    # 4-connectivity: the two zeros only meet when a 1 enters, so the younger zero dies at 1.
    pairs = sublevel_persistence(np.array([[0.0, 1.0], [1.0, 0.0]]))
    np.testing.assert_array_equal(pairs, [[0.0, math.inf], [0.0, 1.0]])


def three_wells(noise: float = 0.0) -> np.ndarray:
    """(41, 41) bowl 0.5 |x|^2 minus three Gaussian wells of depth ~1 on [-1, 1]^2."""
    axis = np.linspace(-1.0, 1.0, 41)
    x, y = np.meshgrid(axis, axis, indexing="ij")  # (41, 41) each
    loss = 0.5 * (x**2 + y**2)
    for (cx, cy), depth in (((-0.5, -0.4), 1.0), ((0.5, -0.3), 0.8), ((0.0, 0.55), 0.9)):
        loss -= depth * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.15**2))
    return loss + noise * np.random.default_rng(0).standard_normal(loss.shape)


def test_three_wells_have_three_basins():
    pairs = sublevel_persistence(three_wells())
    assert count_basins(pairs, tau=0.1) == 3
    assert pairs[2, 1] - pairs[2, 0] > 0.3  # the third well is deep, not a borderline count
    # Grid noise adds many shallow minima; tau is what filters them out.
    noisy = sublevel_persistence(three_wells(noise=1e-3))
    assert count_basins(noisy, tau=0.0) > 3 and count_basins(noisy, tau=0.1) == 3


BOWL = np.add.outer(np.linspace(-1, 1, 9) ** 2, np.linspace(-1, 1, 7) ** 2)  # (9, 7)


@pytest.mark.parametrize("loss", [np.full((7, 5), 2.5), BOWL])
def test_flat_or_single_bowl_has_one_basin(loss):
    pairs = sublevel_persistence(loss)
    np.testing.assert_array_equal(pairs, [[loss.min(), math.inf]])
    assert count_basins(pairs, tau=0.0) == 1 and loss_topology(loss, tau=0.1).basins == 1


def test_topology_json_writes_inf_as_null_and_reads_back():
    topology = loss_topology(three_wells(), tau=0.1)
    assert topology.basins == 3 and topology.persistence[0][1] == math.inf
    data = topology.to_dict()
    assert data["persistence"][0][1] is None
    assert dumps(data) == dumps(asdict(topology))  # the same file ptp_core.io writes from the raw fields
    assert Topology.from_dict(json.loads(json.dumps(data, allow_nan=False))) == topology


@pytest.mark.parametrize("loss, match", [
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN.*resume"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), "infinite"),
    (np.zeros((2, 2, 2)), "shape"),
    (np.zeros((0, 3)), "shape"),
])
def test_bad_grids_raise(loss, match):
    with pytest.raises(ValueError, match=match):
        sublevel_persistence(loss)


@pytest.mark.parametrize("tau", [-0.1, math.inf, math.nan])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        count_basins(np.array([[0.0, math.inf]]), tau)
