"""Sharpness as cited: adaptive worst case (Andriushchenko et al. 2023) against brute force, antithetic average
sharpness against 1/2 sigma^2 tr H, one radius convention in prompt and input space, both in every row."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape.hessian import flatten_params
from landscape.measures import sharpness
from landscape.measures.row import MetricsConfig, measure
from ptp_core.tasks.task import Split

HESSIAN = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)  # positive definite
LINEAR = torch.tensor([0.3, -0.8], dtype=torch.float64)


def quadratic(hessian: torch.Tensor, linear: torch.Tensor):
    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        w = p["w"]
        return 0.5 * w @ hessian @ w + linear @ w
    return loss_fn


def test_adaptive_worst_case_equals_brute_force_over_the_scaled_ball():
    theta = torch.tensor([0.2, 1.0], dtype=torch.float64)  # the adaptive ball is 5x shorter along w1 than w2
    loss_fn, rho = quadratic(HESSIAN, LINEAR), 0.3
    gradient, scale = HESSIAN @ theta + LINEAR, theta.abs()
    # max over ||u|| <= rho of L(theta + |theta| u) - L(theta): convex in u, so on the circle ||u|| = rho
    angles = np.linspace(0, 2 * np.pi, 200001)
    u = rho * torch.tensor(np.stack([np.cos(angles), np.sin(angles)], axis=1))  # (K, 2)
    delta = u * scale  # (K, 2)
    gains = delta @ gradient + 0.5 * ((delta @ HESSIAN) * delta).sum(dim=1)
    expected = float(gains.max())
    adaptive = sharpness.worst_case_sharpness(loss_fn, {"w": theta}, rho, steps=60, adaptive=True, seed=0)
    assert adaptive.sharpness == pytest.approx(expected, rel=1e-4)
    assert float((flatten_params(adaptive.delta) / scale).norm()) <= rho * (1 + 1e-9)
    # the plain ball of the same radius is another quantity: the test tells the two apart
    plain = sharpness.worst_case_sharpness(loss_fn, {"w": theta}, rho, steps=60, seed=0)
    assert abs(plain.sharpness - expected) > 0.2 * expected


def _draws(seed: int, pairs: int, shape, sigma: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [sigma * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(pairs)]


def test_antithetic_average_is_half_sigma_squared_trace_and_cancels_the_gradient():
    n, sigma, pairs = 6, 0.05, 200
    generator = torch.Generator().manual_seed(3)
    root = torch.randn(n, n, generator=generator, dtype=torch.float64)
    hessian = root @ root.T / n  # (n, n)
    linear = 5.0 * torch.randn(n, generator=generator, dtype=torch.float64)  # a steep first-order term
    theta = torch.randn(n, generator=generator, dtype=torch.float64)
    loss_fn = quadratic(hessian, linear)
    result = sharpness.average_sharpness(loss_fn, {"w": theta}, sigma, samples=2 * pairs, seed=11)
    assert result.forwards == 2 * pairs + 1
    # each pair is exactly 1/2 delta^T H delta: the gradient term cancels (float64, the same draws)
    draws = _draws(11, pairs, (n,), sigma)
    exact_pairs = np.array([float(0.5 * d @ hessian @ d) for d in draws])
    assert result.sharpness == pytest.approx(exact_pairs.mean(), rel=1e-9)
    expectation = 0.5 * sigma**2 * float(torch.trace(hessian))
    assert result.ci_low < expectation < result.ci_high
    # plain Monte Carlo on the same draws: dominated by g.delta, its CI is orders of magnitude wider
    center = float(loss_fn({"w": theta}))
    plain = np.array([float(loss_fn({"w": theta + d})) - center for d in draws])
    assert np.std(exact_pairs, ddof=1) < 0.02 * np.std(plain, ddof=1)
    assert result.ci_high - result.ci_low < 0.02 * (2 * 1.97 * np.std(plain, ddof=1) / math.sqrt(pairs))


def test_one_radius_convention_in_prompt_and_input_space():
    """E||delta||^2 = sigma^2 ||reference||^2 in both spaces: a loss ||delta||^2 reads it off exactly per pair."""
    sigma = 0.1
    theta = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prompt = sharpness.average_sharpness(lambda p: (p["w"] - theta).pow(2).sum(), {"w": theta},
                                         sigma * float(theta.pow(2).mean().sqrt()), samples=400, seed=0)
    assert prompt.ci_low < sigma**2 * float(theta.pow(2).sum()) < prompt.ci_high
    embeddings = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (B, T, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    text = embeddings * mask[..., None]
    per_example = sharpness.input_average_sharpness(lambda d: d.pow(2).sum(dim=(1, 2)), embeddings, mask, sigma,
                                                    samples=400, seed=0)
    expected = sigma**2 * float(text.flatten(1).pow(2).sum(dim=1).mean())  # mean_b sigma^2 ||E_b||^2
    assert per_example.ci_low < expected < per_example.ci_high


def test_every_row_reports_adaptive_worst_case_and_one_sigma_in_both_spaces(tiny_bert_model):
    model = tiny_bert_model
    split = Split(["a fine film", "dull and long", "bright", "no"], [1, 0, 1, 0])
    config = MetricsConfig(which=("sharpness", "input"), examples=4, ascent_steps=2, samples=4)
    row = measure(model, dict(model.params), split, None, config)
    batch = model.encode(split.texts, split.labels)
    trainable = {"prompt": model.params["prompt"].detach()}

    def loss_fn(p):
        return model.loss({**model.params, **p}, batch).mean()

    n = trainable["prompt"].numel()
    direct = sharpness.worst_case_sharpness(loss_fn, trainable, config.rho_of_norm * math.sqrt(n), 2,
                                            adaptive=True, seed=0)
    assert row["adaptive_worst_case_sharpness"] == pytest.approx(direct.sharpness, abs=1e-6)
    assert row["cost"]["adaptive_worst_case_forwards"] == direct.forwards
    loss_input, embeddings, mask = sharpness.input_space_closure(model, dict(model.params), batch)
    direct_input = sharpness.input_average_sharpness(loss_input, embeddings, mask, config.sigma_of_rms, 4, 0)
    assert row["input_average_sharpness"] == pytest.approx(direct_input.sharpness, abs=1e-6)


def test_fewer_than_two_pairs_are_refused():
    with pytest.raises(ValueError, match="two antithetic pairs"):
        sharpness.average_sharpness(quadratic(HESSIAN, LINEAR), {"w": LINEAR.clone()}, 0.1, samples=3)
    with pytest.raises(ValueError, match="two antithetic pairs"):
        MetricsConfig(samples=2)
