"""Stochastic Lanczos quadrature and the smallest eigenvalue against dense Hessians and closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape.hessian import _rademacher, as_generator, flatten_params, hessian_trace_hutchinson, unflatten_params
from landscape.measures.spectral_density import spectral_density
from landscape.measures.spectrum import hessian_min_eigenvalue, hessian_spectrum


def nonconvex_problem(seed: int = 0):
    """A 2-layer tanh network (48 float64 parameters) with softmax CE: an indefinite Hessian at random weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)  # (B, D)
    labels = torch.randint(0, 3, (32,), generator=g)
    params = {"w1": torch.randn(6, 5, generator=g, dtype=torch.float64),
              "w2": torch.randn(3, 6, generator=g, dtype=torch.float64)}

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(torch.tanh(x @ p["w1"].T) @ p["w2"].T, labels)

    return loss_fn, params


def quadratic(eigenvalues: list[float], seed: int = 0):
    """L(w) = 1/2 w^T A w with A = Q diag(eigenvalues) Q^T, Q a random rotation (so probes are not aligned)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return (lambda p: 0.5 * p["w"] @ a @ p["w"]), {"w": torch.zeros(len(eigenvalues), dtype=torch.float64)}


def dense_eigenvalues(loss_fn, params) -> np.ndarray:
    """Ascending eigenvalues of the dense float64 Hessian: an autograd path independent of the HVP operator."""
    flat = flatten_params(params).double()
    hessian = torch.autograd.functional.hessian(lambda v: loss_fn(unflatten_params(v, params)), flat)  # (N, N)
    return torch.linalg.eigvalsh(hessian).numpy()


def test_first_moment_is_hutchinson_with_the_same_probes_and_near_the_dense_trace():
    """Gauss quadrature is exact for degree 1: N sum w theta = mean z^T H z over the very same Rademacher z."""
    loss_fn, params = nonconvex_problem()
    n, exact = 48, float(dense_eigenvalues(loss_fn, params).sum())
    spectrum = hessian_spectrum(loss_fn, params, probes=30, steps=3, seed=5)
    hutchinson = hessian_trace_hutchinson(loss_fn, params, probes=30, seed=5)
    first_moment = n * float(np.dot(spectrum.nodes, spectrum.weights))
    assert first_moment == pytest.approx(hutchinson.trace, rel=1e-10)
    assert abs(first_moment - exact) < 3 * hutchinson.stderr  # stochastic error only, seeded


def test_extreme_nodes_converge_to_the_dense_extreme_eigenvalues():
    loss_fn, params = nonconvex_problem()
    eigenvalues = dense_eigenvalues(loss_fn, params)
    assert eigenvalues[0] < -0.1  # a saddle: the density has mass on both sides of zero
    spectrum = hessian_spectrum(loss_fn, params, probes=2, steps=24, seed=0)  # half the dimension
    assert min(spectrum.nodes) == pytest.approx(eigenvalues[0], rel=1e-6)
    assert max(spectrum.nodes) == pytest.approx(eigenvalues[-1], rel=1e-6)
    # Ritz values lie inside the spectrum (Cauchy interlacing).
    assert eigenvalues[0] - 1e-9 <= min(spectrum.nodes) and max(spectrum.nodes) <= eigenvalues[-1] + 1e-9
    assert spectrum.hvps == 2 * 24 and len(spectrum.nodes) == 2 * 24


def test_weights_are_a_probability_vector_and_seeded_runs_repeat():
    loss_fn, params = nonconvex_problem()
    spectrum = hessian_spectrum(loss_fn, params, probes=3, steps=8, seed=1)
    assert len(spectrum.weights) == len(spectrum.nodes) == 24 and (spectrum.probes, spectrum.steps) == (3, 8)
    assert min(spectrum.weights) >= 0 and sum(spectrum.weights) == pytest.approx(1, abs=1e-12)
    assert hessian_spectrum(loss_fn, params, probes=3, steps=8, seed=torch.Generator().manual_seed(1)) == spectrum
    assert hessian_spectrum(loss_fn, params, probes=3, steps=8, seed=2).nodes != spectrum.nodes
    with pytest.raises(ValueError, match="at least 1"):
        hessian_spectrum(loss_fn, params, probes=0)


def test_steps_beyond_the_dimension_and_lanczos_breakdown():
    """steps > N stops at N with every eigenvalue as a node; a repeated eigenvalue ends each probe early."""
    distinct = [-1.0, 0.5, 2.0, 3.0, 7.0]
    loss_fn, params = quadratic(distinct)
    spectrum = hessian_spectrum(loss_fn, params, probes=2, steps=50, seed=0)
    assert spectrum.steps == 5 and spectrum.hvps == 10
    np.testing.assert_allclose(np.sort(spectrum.nodes), np.repeat(distinct, 2), atol=1e-10)

    # Three distinct eigenvalues: the Krylov space of any probe has dimension 3, then beta = 0.
    loss_fn, params = quadratic([0.5, 0.5, 0.5, 2.0, 2.0, 3.0])
    spectrum = hessian_spectrum(loss_fn, params, probes=2, steps=6, seed=0)
    assert spectrum.hvps == 6 and len(spectrum.nodes) == 6
    np.testing.assert_allclose(np.sort(spectrum.nodes), [0.5, 0.5, 2, 2, 3, 3], atol=1e-10)
    assert sum(spectrum.weights) == pytest.approx(1, abs=1e-12)

    # A loss linear in its params: H = 0, one node at 0 per probe, no division by zero.
    spectrum = hessian_spectrum(lambda p: p["w"].sum(), {"w": torch.ones(4, dtype=torch.float64)}, probes=2, steps=4)
    assert spectrum.nodes == [0.0, 0.0] and spectrum.weights == [0.5, 0.5] and spectrum.hvps == 2


def test_min_eigenvalue_matches_the_dense_one_at_a_saddle_and_at_a_minimum():
    loss_fn, params = nonconvex_problem()
    eigenvalues = dense_eigenvalues(loss_fn, params)
    result = hessian_min_eigenvalue(loss_fn, params, tol=1e-8, seed=0)
    assert result.converged and result.eigenvalue == pytest.approx(eigenvalues[0], rel=1e-8)
    assert result.residual_norm < 1e-6 and result.eigenvalue + result.residual_norm < 0  # a proven saddle
    assert abs(float(flatten_params(result.eigenvector).norm()) - 1) < 1e-10
    assert set(result.eigenvector) == {"w1", "w2"} and result.hvps > 1
    assert hessian_min_eigenvalue(loss_fn, params, tol=1e-8, seed=0).eigenvalue == result.eigenvalue  # seeded

    loss_fn, params = quadratic(list(np.linspace(1e-3, 4.0, 30)))
    result = hessian_min_eigenvalue(loss_fn, params, seed=0)
    assert result.converged and result.eigenvalue == pytest.approx(1e-3, rel=1e-4)


def test_min_eigenvalue_budget_is_reported_honestly():
    loss_fn, params = quadratic(list(np.geomspace(1e-6, 10.0, 200)))  # clustered near 0: slow for Lanczos
    result = hessian_min_eigenvalue(loss_fn, params, tol=1e-12, seed=0, max_hvps=60, ncv=20)
    assert result.hvps <= 60 + 20 + 1  # one restart of slack plus the residual check
    assert not result.converged and np.isnan(result.eigenvalue)


def test_spectral_density_integrates_to_one_and_keeps_the_first_moment():
    loss_fn, params = nonconvex_problem()
    spectrum = hessian_spectrum(loss_fn, params, probes=2, steps=10, seed=0)
    sigma = 0.02
    grid = np.linspace(min(spectrum.nodes) - 8 * sigma, max(spectrum.nodes) + 8 * sigma, 4001)
    density = spectral_density(spectrum.nodes, spectrum.weights, grid, sigma)
    assert density.shape == grid.shape and density.min() >= 0
    assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-6)
    assert np.trapezoid(grid * density, grid) == pytest.approx(np.dot(spectrum.nodes, spectrum.weights), abs=1e-6)
    with pytest.raises(ValueError, match="sigma must be positive"):
        spectral_density(spectrum.nodes, spectrum.weights, grid, 0.0)


def test_spectrum_of_a_real_prompt_model_matches_its_dense_hessian(tiny_bert_model, tiny_batch_texts):
    """One virtual token of a tiny BERT (D = 32): N Lanczos steps recover every eigenvalue of the dense Hessian."""
    from conftest import one_token_hessian

    model = tiny_bert_model
    batch = model.encode(*(items[:1] for items in tiny_batch_texts))  # one text: each HVP is cheap
    loss_fn, params, dense = one_token_hessian(model, batch)
    eigenvalues, scale = torch.linalg.eigvalsh(dense).numpy(), float(dense.abs().max())
    spectrum = hessian_spectrum(loss_fn, params, probes=1, steps=32, seed=0)
    # float32 HVPs: agreement to float32 rounding of the spectrum's scale.
    np.testing.assert_allclose(np.sort(spectrum.nodes), eigenvalues, atol=1e-4 * scale)
    probe = _rademacher(32, 1, as_generator(0))[0]  # (D,): the probe hessian_spectrum drew
    first_moment = 32 * float(np.dot(spectrum.nodes, spectrum.weights))
    assert first_moment == pytest.approx(float(probe @ dense @ probe), abs=1e-3 * scale)
    result = hessian_min_eigenvalue(loss_fn, params, seed=0, ncv=12)
    assert result.converged and result.eigenvalue == pytest.approx(eigenvalues[0], abs=1e-4 * scale)
    assert eigenvalues[0] < 0 and result.eigenvalue + result.residual_norm < 0  # a random prompt sits at a saddle
