"""Curvature and sharpness estimators against dense Hessians and closed forms on tiny problems."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape.hessian import flatten_params, hessian_trace_hutchinson, hutchpp, hvp, top_eigenvalues, unflatten_params
from landscape.measures.sharpness import (
    average_sharpness,
    input_average_sharpness,
    input_space_closure,
    input_worst_case_sharpness,
    linear_path,
    loss_barrier,
    worst_case_sharpness,
)


def tiny_problem(prompt_length: int = 3, dim: int = 4, examples: int = 16, seed: int = 0):
    """A soft-prompt stand-in: prompt (P, D) and bias (P,) -> tanh scores -> 2-layer tanh MLP -> softmax CE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, dim, generator=g)  # (B, D)
    labels = torch.randint(0, 3, (examples,), generator=g)
    w1, w2 = torch.randn(prompt_length, 8, generator=g), torch.randn(8, 3, generator=g)
    params = {"prompt": torch.randn(prompt_length, dim, generator=g) * 0.5,
              "bias": torch.randn(prompt_length, generator=g) * 0.1}

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = p["prompt"].dtype  # the dense reference runs in float64
        scores = torch.tanh(x.to(dtype) @ p["prompt"].T + p["bias"])  # (B, P)
        logits = torch.tanh(scores @ w1.to(dtype)) @ w2.to(dtype)  # (B, 3)
        return torch.nn.functional.cross_entropy(logits, labels)

    return loss_fn, params


def dense_hessian(loss_fn, params) -> torch.Tensor:
    flat = flatten_params(params).double()
    like = {k: v.double() for k, v in params.items()}
    return torch.autograd.functional.hessian(lambda v: loss_fn(unflatten_params(v, like)), flat)  # (N, N)


def quadratic(n: int = 10, seed: int = 0):
    """L(theta) = 1/2 theta^T A theta with a known PSD A; theta = 0 (a minimum)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(0.1, 4.0, n, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    return (lambda p: 0.5 * p["w"] @ a @ p["w"]), {"w": torch.zeros(n, dtype=torch.float64)}, a


def test_hvp_equals_dense_hessian_times_vector():
    loss_fn, params = tiny_problem()
    h = dense_hessian(loss_fn, params)
    vector = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in params.items()}
    got = flatten_params(hvp(loss_fn, params, vector)).double()
    torch.testing.assert_close(got, h @ flatten_params(vector).double(), rtol=1e-4, atol=1e-5)


def test_top_eigenvalues_match_dense_hessian():
    loss_fn, params = tiny_problem()
    reference = torch.linalg.eigvalsh(dense_hessian(loss_fn, params)).flip(0)[:3].numpy()
    result = top_eigenvalues(loss_fn, params, k=3, tol=1e-6, seed=0)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, reference, rtol=1e-3)
    assert max(result.residuals) < 1e-3
    assert result.eigenvalues == sorted(result.eigenvalues, reverse=True)
    assert set(result.eigenvectors[0]) == {"prompt", "bias"}
    assert abs(float(flatten_params(result.eigenvectors[0]).norm()) - 1) < 1e-5
    assert result.hvps > 0
    again = top_eigenvalues(loss_fn, params, k=3, tol=1e-6, seed=0)
    assert again.eigenvalues == result.eigenvalues and again.hvps == result.hvps  # seeded


def test_tensor_the_loss_ignores_has_zero_curvature():
    loss_fn, params = tiny_problem()
    params = dict(params, unused=torch.ones(2))
    product = hvp(loss_fn, params, {k: torch.ones_like(v) for k, v in params.items()})
    assert torch.equal(product["unused"], torch.zeros(2)) and product["prompt"].abs().sum() > 0


def test_top_eigenvalues_budget_and_bad_k():
    loss_fn, params = tiny_problem(prompt_length=6, dim=8)
    capped = top_eigenvalues(loss_fn, params, k=2, tol=1e-12, seed=0, max_hvps=25)
    assert capped.hvps <= 25 + 2 + 20  # one ARPACK restart of slack plus the residual checks
    assert len(capped.eigenvalues) == 2
    with pytest.raises(ValueError, match="k must be between"):
        top_eigenvalues(loss_fn, params, k=0)


def test_hutchinson_within_three_standard_errors():
    loss_fn, params = tiny_problem()
    exact = float(torch.trace(dense_hessian(loss_fn, params)))
    result = hessian_trace_hutchinson(loss_fn, params, probes=200, seed=0)
    assert result.hvps == 200 and result.stderr > 0
    assert abs(result.trace - exact) < 3 * result.stderr


def test_hutchpp_beats_hutchinson_at_equal_hvps():
    loss_fn, params = tiny_problem(prompt_length=6, dim=8, examples=4)
    exact = float(torch.trace(dense_hessian(loss_fn, params)))
    plain = [abs(hessian_trace_hutchinson(loss_fn, params, probes=24, seed=s).trace - exact) for s in range(10)]
    plus = [hutchpp(loss_fn, params, hvps=24, seed=s) for s in range(10)]
    assert all(r.hvps == 24 for r in plus)
    assert np.mean([abs(r.trace - exact) for r in plus]) < np.mean(plain)


def test_worst_case_stays_in_ball_and_beats_average():
    loss_fn, params = tiny_problem()
    rho, n = 0.5, flatten_params(params).numel()
    worst = worst_case_sharpness(loss_fn, params, rho=rho, steps=10, seed=0)
    assert worst.delta_norm <= rho * (1 + 1e-5) and worst.ball_norm <= rho * (1 + 1e-5)
    assert worst.forwards == 12
    with torch.no_grad():  # the reported delta reproduces the reported sharpness
        moved = {k: params[k] + worst.delta[k] for k in params}
        assert abs(float(loss_fn(moved) - loss_fn(params)) - worst.sharpness) < 1e-5
    # Gaussian noise of expected norm rho / 2 stays inside the ball: its mean gain cannot beat the max.
    average = average_sharpness(loss_fn, params, sigma=rho / (2 * math.sqrt(n)), samples=50, seed=0)
    assert worst.sharpness >= average.ci_high > average.ci_low
    assert average.forwards == 51


def test_adaptive_worst_case_stays_in_scaled_ball():
    loss_fn, params = tiny_problem()
    worst = worst_case_sharpness(loss_fn, params, rho=0.3, steps=10, adaptive=True, seed=0)
    theta, delta = flatten_params(params), flatten_params(worst.delta)
    assert float((delta / theta.abs()).norm()) <= 0.3 * (1 + 1e-5)
    assert worst.sharpness > 0


def test_worst_and_average_on_quadratic_match_closed_forms():
    loss_fn, params, a = quadratic()
    # At a minimum the gradient is zero: the ascent starts along a seeded random direction and then
    # behaves as power iteration, reaching max_{|d| <= rho} 1/2 d^T A d = 1/2 lambda_max rho^2.
    worst = worst_case_sharpness(loss_fn, params, rho=0.1, steps=100, seed=0)
    assert worst.sharpness == pytest.approx(0.5 * 4.0 * 0.1**2, rel=1e-2)
    # E[1/2 d^T A d] = 1/2 sigma^2 tr A
    average = average_sharpness(loss_fn, params, sigma=0.1, samples=400, seed=0)
    assert average.ci_low < 0.5 * 0.01 * float(torch.trace(a)) < average.ci_high


def test_input_space_balls_are_per_example_and_text_only():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, 5, 4, generator=g)  # (B, T, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    weights = torch.randn(4, generator=g)

    def loss_fn_input(delta):  # (B, T, D) -> (B,): each example sees its own text tokens only
        moved = (embeddings + delta * mask[..., None]) * mask[..., None]
        return torch.tanh(moved @ weights).pow(2).sum(dim=1)

    eps = 0.2
    worst = input_worst_case_sharpness(loss_fn_input, embeddings, mask, eps=eps, steps=8, seed=0)
    norms = (embeddings * mask[..., None]).flatten(1).norm(dim=1)
    assert torch.all(worst.delta.flatten(1).norm(dim=1) <= eps * norms * (1 + 1e-5))
    assert float(worst.delta[~mask].abs().max()) == 0.0
    assert worst.ball_norm <= eps * (1 + 1e-5) and worst.sharpness > 0
    average = input_average_sharpness(loss_fn_input, embeddings, mask, sigma=eps / 2, samples=30, seed=0)
    assert worst.sharpness >= average.ci_high
    with pytest.raises(ValueError, match="per-example losses"):
        input_worst_case_sharpness(lambda d: loss_fn_input(d).mean(), embeddings, mask, eps=eps)


def test_loss_barrier():
    bump = loss_barrier(lambda t: 1.0 + t + math.sin(math.pi * t), points=21)
    assert bump.barrier == pytest.approx(1.0) and bump.t_at_max == pytest.approx(0.5) and bump.forwards == 21
    loss_fn, params, _ = quadratic()
    a, b = {"w": params["w"] - 1.0}, {"w": params["w"] + 1.0}  # a convex path: no barrier
    assert loss_barrier(linear_path(loss_fn, a, b), points=11).barrier <= 1e-12
    with pytest.raises(ValueError, match="at least 3"):
        loss_barrier(lambda t: t, points=2)


@pytest.mark.parametrize("fixture", ["tiny_bert_model", "tiny_gpt2_model", "tiny_t5_model"])
def test_hvp_on_tiny_prompt_model(fixture, tiny_batch_texts, request):
    """Double backward through a real (tiny, SDPA-attention) transformer: HVP == central difference of gradients."""
    model = request.getfixturevalue(fixture)
    batch = model.encode(*tiny_batch_texts)
    params = {"prompt": model.params["prompt"].detach()}
    held = {k: v.detach() for k, v in model.params.items() if k != "prompt"}

    def loss_fn(p):
        return model.loss({**held, **p}, batch).mean(-1)

    v = {"prompt": torch.randn(params["prompt"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    got = hvp(loss_fn, params, {"prompt": v["prompt"].float()})["prompt"].double()

    def grad_at(p):
        leaf = p.clone().requires_grad_(True)
        return torch.autograd.grad(loss_fn({"prompt": leaf}), leaf)[0].double()

    step = 1e-3 * v["prompt"].float()
    finite = (grad_at(params["prompt"] + step) - grad_at(params["prompt"] - step)) / 2e-3
    assert float((got - finite).norm() / finite.norm()) < 2e-2


@pytest.mark.parametrize("fixture", ["tiny_roberta_model", "tiny_gpt2_model", "tiny_t5_model"])
def test_top_eigenvalue_of_a_real_prompt_model_matches_its_dense_hessian(fixture, tiny_batch_texts, request):
    """Encoder, decoder and encoder-decoder: one virtual token (D = 32), dense 32 x 32 Hessian in float64."""
    from conftest import one_token_hessian

    model = request.getfixturevalue(fixture)
    loss_fn, params, dense = one_token_hessian(model, model.encode(*tiny_batch_texts))
    expected = torch.linalg.eigvalsh(dense).flip(0)
    got = top_eigenvalues(loss_fn, params, k=2, tol=1e-6, seed=0)
    np.testing.assert_allclose(got.eigenvalues, expected[:2].numpy(), rtol=2e-3, atol=1e-5)


def test_estimator_results_make_a_design_metrics_row(tmp_path):
    """metrics_row + write_tables: DESIGN.md's keys, JSON-clean, costs and settings not analysed."""
    import json

    from landscape.measures.row import metrics_row
    from landscape.measures.surface_metrics import surface_metrics
    from landscape.draw.tables import write_tables
    from landscape.stats import metric_names, statistics

    loss_fn, params = tiny_problem()
    axis = np.linspace(-1, 1, 5)
    surface = surface_metrics(axis, axis, 1.0 + np.add.outer(axis**2, axis**2), radius=1.0, tau=1.0)  # never exceeds 2
    row = metrics_row(
        "runs/pt-0", "pt", 0, test_accuracy=0.8, surface=surface,
        eigen=top_eigenvalues(loss_fn, params, k=2), trace=hessian_trace_hutchinson(loss_fn, params, probes=10),
        worst_case=worst_case_sharpness(loss_fn, params, rho=0.1, steps=2),
        average=average_sharpness(loss_fn, params, sigma=0.01, samples=4), settings={"rho": 0.1},
    )
    design_keys = {"checkpoint", "method", "seed", "center_loss", "center_acc", "grid_sharpness", "hessian_eigenvalues",
                   "hessian_trace", "hessian_trace_stderr", "worst_case_sharpness", "average_sharpness"}
    assert design_keys <= set(row)
    assert row["cost"]["hessian_trace_hvps"] == 10
    assert row["settings"] == {"rho": 0.1, "surface_radius": 1.0, "surface_tau": 1.0}
    names = metric_names([row])
    assert "hessian_eigenvalues_1" in names and "grid_sharpness" in names
    assert not any(n.startswith(("cost_", "settings_")) or n.endswith(("_stderr", "_ci_1")) for n in names)
    written = json.loads(write_tables([row, dict(row, seed=1)], tmp_path, statistics([row, dict(row, seed=1)], n_resamples=50))["json"].read_text())
    assert written[0]["center_acc"] is None and written[0]["flat_radius"]["+x"] is None  # NaN / inf -> null


def test_input_space_estimators_on_tiny_prompt_model(tiny_bert_model, tiny_batch_texts):
    """input_space_closure over PromptModel.loss: zero delta == plain loss; balls per example, text tokens only."""
    model = tiny_bert_model
    batch = model.encode(*tiny_batch_texts)
    loss_fn_input, embeddings, text_mask = input_space_closure(model, model.params, batch)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn_input(torch.zeros_like(embeddings)), model.loss(model.params, batch))
    worst = input_worst_case_sharpness(loss_fn_input, embeddings, text_mask, eps=0.1, steps=3, seed=0)
    norms = (embeddings * text_mask[..., None]).flatten(1).norm(dim=1)  # (B,)
    assert torch.all(worst.delta.flatten(1).norm(dim=1) <= 0.1 * norms * (1 + 1e-5))
    assert float(worst.delta[~text_mask].abs().max()) == 0.0 and worst.forwards == 5
    average = input_average_sharpness(loss_fn_input, embeddings, text_mask, sigma=0.05, samples=8, seed=0)
    assert worst.sharpness >= average.ci_low and average.forwards == 9
