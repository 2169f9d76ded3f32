"""Sharpness estimators: worst case in a ball, average under Gaussian noise, linear-path barrier.

Same conventions as landscape.hessian: `loss_fn(params) -> Tensor` is the mean loss over one
fixed evaluation batch; every estimator takes a seed and reports the forwards it used. The
input-space variants perturb the text-token embeddings instead (the quantity PTP-ADV targets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from landscape.hessian import LossFn, Params, as_generator, flatten_params, unflatten_params


@dataclass
class WorstCaseResult:
    sharpness: float                   # max over visited deltas of L(x + delta) - L(x), >= 0 (delta = 0 counts)
    center_loss: float                 # L(x)
    delta_norm: float                  # L2 norm of the maximizing delta (all params / all examples)
    ball_norm: float                   # its largest norm in the ball's own metric (<= radius)
    delta: Tensor | Params             # the maximizing delta, params-shaped (or (B, T, D) in input space)
    forwards: int                      # loss evaluations (steps of them also did a backward)


@dataclass
class AverageResult:
    sharpness: float                   # E[L(x + delta)] - L(x), mean over antithetic pairs (delta, -delta)
    ci_low: float                      # 95% t-interval of the mean
    ci_high: float
    center_loss: float
    forwards: int


def _projected_ascent(group_loss, shape, radius: Tensor, steps: int, step_size: float,
                      generator: torch.Generator, mask: Tensor | None = None):
    """Normalized gradient ascent on u (G, ...) with one L2 ball per row g: ||u_g|| <= radius_g.

    group_loss(u) -> (G,) losses, row g depending on u_g only (true for examples of one batch),
    so the best iterate is tracked per row and the rows' bests together are feasible.
    """
    def rows(t: Tensor) -> Tensor:
        return t.reshape(len(radius), *([1] * (len(shape) - 1)))  # (G, 1, ...)

    u = torch.zeros(shape, dtype=radius.dtype, device=radius.device)
    with torch.no_grad():
        base = group_loss(u)  # (G,)
    if base.shape != radius.shape:
        raise ValueError(f"the loss closure returned shape {tuple(base.shape)}, expected {tuple(radius.shape)}: "
                         "input-space closures must return per-example losses (B,), not their mean")
    best, best_u, forwards = torch.zeros_like(base), u.clone(), 1
    for step in range(steps + 1):
        u.requires_grad_(step < steps)
        with torch.set_grad_enabled(step < steps):
            losses = group_loss(u)  # (G,)
        forwards += 1
        improved = losses.detach() - base > best
        best = torch.where(improved, losses.detach() - base, best)
        best_u[improved] = u.detach()[improved]
        if step == steps:
            break
        (grad,) = torch.autograd.grad(losses.sum(), u)
        grad = grad if mask is None else grad * mask
        norm = grad.flatten(1).norm(dim=1)  # (G,)
        if (norm == 0).any():  # a stationary row (e.g. exactly at a minimum): leave along a random direction
            noise = torch.randn(shape, generator=generator, dtype=grad.dtype).to(grad.device)
            noise = noise if mask is None else noise * mask
            grad = torch.where(rows(norm == 0), noise, grad)
            norm = grad.flatten(1).norm(dim=1)
        u = u.detach() + step_size * rows(radius / norm.clamp_min(1e-30)) * grad
        u = u * rows((radius / u.flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0))  # project onto the balls
    return base.detach(), best, best_u, forwards


def worst_case_sharpness(
    loss_fn: LossFn, params: Params, rho: float, steps: int = 20, step_size: float = 0.25,
    adaptive: bool = False, seed: int | torch.Generator = 0,
) -> WorstCaseResult:
    """max_{||delta|| <= rho} L(theta + delta) - L(theta) by projected normalized gradient ascent.

    Adaptive (ASAM, Kwon et al. 2021; Andriushchenko et al. 2023, c = |theta|): the ball
    ||delta / |theta| ||_2 <= rho, i.e. delta = |theta| * u with ||u|| <= rho, scaled elementwise by the
    parameters (a zero parameter is not perturbed); the ascent runs on u. step_size is a fraction of rho
    per step. The returned value is a lower bound of the true maximum.
    """
    theta = flatten_params({k: v.detach() for k, v in params.items()})  # (N,)
    scale = theta.abs() if adaptive else torch.ones_like(theta)
    like = {k: v.detach() for k, v in params.items()}

    def group_loss(u: Tensor) -> Tensor:  # u (1, N)
        return loss_fn(unflatten_params(theta + scale * u[0], like)).reshape(1)

    radius = torch.tensor([float(rho)], dtype=theta.dtype, device=theta.device)
    base, best, best_u, forwards = _projected_ascent(
        group_loss, (1, theta.numel()), radius, steps, step_size, as_generator(seed))
    delta = scale * best_u[0]  # (N,)
    return WorstCaseResult(float(best[0]), float(base[0]), float(delta.norm()), float(best_u[0].norm()),
                           unflatten_params(delta, like), forwards)


def input_space_closure(model, params: Params, batch) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """(loss_fn_input, text_embeddings (B, T, D), text_mask (B, T)) for the input-space estimators.

    loss_fn_input(delta (B, T, D)) -> (B,) per-example losses of PromptModel.loss with delta added
    to the text-token embeddings. A multiple-choice example's K candidate rows form one input (B, K*T, D):
    one ball per example, as its loss is one cross-entropy over the K candidates.
    """
    embeddings = model.embed(batch).detach()  # (R, T, D), R = B*K rows
    width = embeddings.shape[-1]

    def loss_fn_input(delta: Tensor) -> Tensor:
        return model.loss(params, batch, input_perturbation=delta.reshape(batch.rows, -1, width))  # (B,)

    return loss_fn_input, embeddings.reshape(len(batch), -1, width), batch.text_mask.reshape(len(batch), -1)


def _text_norms(text_embeddings: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    mask = text_mask[..., None].to(text_embeddings.dtype)  # (B, T, 1)
    return (text_embeddings * mask).flatten(1).norm(dim=1), mask  # (B,), (B, T, 1)


def input_worst_case_sharpness(
    loss_fn_input: Callable[[Tensor], Tensor], text_embeddings: Tensor, text_mask: Tensor,
    eps: float, steps: int = 10, step_size: float = 0.25, seed: int | torch.Generator = 0,
) -> WorstCaseResult:
    """mean_b max_{||delta_b|| <= eps ||E_b||} l_b(E_b + delta_b) - l_b(E_b), delta on text tokens.

    E_b (T, D) are example b's word embeddings restricted to its text tokens, so eps is relative
    to each example's own embedding norm (FreeLB/SMART use a similar per-example L2 ball).
    loss_fn_input(delta (B, T, D)) returns the (B,) per-example losses (input_space_closure).
    """
    norms, mask = _text_norms(text_embeddings.detach(), text_mask)
    base, best, best_u, forwards = _projected_ascent(
        loss_fn_input, tuple(text_embeddings.shape), eps * norms, steps, step_size, as_generator(seed), mask)
    ratio = best_u.flatten(1).norm(dim=1) / norms.clamp_min(1e-30)  # (B,)
    return WorstCaseResult(float(best.mean()), float(base.mean()), float(best_u.norm()), float(ratio.max()),
                           best_u, forwards)


def _mean_with_ci(gains: np.ndarray, center: float, forwards: int) -> AverageResult:
    import scipy.stats  # only here: scipy.stats import is slow

    mean = float(gains.mean())
    half = float(scipy.stats.t.ppf(0.975, len(gains) - 1) * gains.std(ddof=1) / np.sqrt(len(gains)))
    return AverageResult(mean, mean - half, mean + half, center, forwards)


def _antithetic_pairs(samples: int) -> int:
    if samples < 4:
        raise ValueError(f"samples must be at least 4 (two antithetic pairs for a confidence interval), got {samples}")
    return samples // 2


def _antithetic_gains(gain_at: Callable[[Tensor], float], draw: Callable[[], Tensor], pairs: int) -> np.ndarray:
    """(pairs,) of (gain(delta) + gain(-delta)) / 2: antithetic pairs (Hammersley & Morton 1956).

    For a Gaussian delta the first-order term g.delta cancels exactly within a pair, so each pair is
    1/2 delta^T H delta + O(|delta|^4) and the mean needs far fewer samples than plain sampling.
    """
    gains = np.empty(pairs)
    for i in range(pairs):
        delta = draw()
        gains[i] = 0.5 * (gain_at(delta) + gain_at(-delta))
    return gains


@torch.no_grad()
def average_sharpness(
    loss_fn: LossFn, params: Params, sigma: float, samples: int = 100,
    seed: int | torch.Generator = 0, adaptive: bool = False,
) -> AverageResult:
    """E_{delta ~ N(0, sigma^2 I)} L(theta + delta) - L(theta) (Andriushchenko et al. 2023), with a 95% CI.

    sigma is the per-coordinate std (the row passes sigma_of_rms * RMS(theta): E||delta||^2 = sigma_of_rms^2
    ||theta||^2). samples: perturbed forwards, drawn as samples // 2 antithetic pairs (delta, -delta); the
    CI is the t-interval over the pairs. adaptive scales the noise elementwise by |theta|.
    """
    pairs = _antithetic_pairs(samples)
    like = {k: v.detach() for k, v in params.items()}
    theta = flatten_params(like)  # (N,)
    scale = sigma * (theta.abs() if adaptive else torch.ones_like(theta))
    generator, center = as_generator(seed), float(loss_fn(like))

    def draw() -> Tensor:
        return scale * torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)  # (N,)

    gains = _antithetic_gains(lambda d: float(loss_fn(unflatten_params(theta + d, like))) - center, draw, pairs)
    return _mean_with_ci(gains, center, 2 * pairs + 1)


@torch.no_grad()
def input_average_sharpness(
    loss_fn_input: Callable[[Tensor], Tensor], text_embeddings: Tensor, text_mask: Tensor,
    sigma: float, samples: int = 20, seed: int | torch.Generator = 0,
) -> AverageResult:
    """E_delta mean_b l_b(E_b + delta_b) - l_b(E_b), Gaussian delta_b on b's text tokens only.

    The same radius convention as in prompt space: per-coordinate std sigma * RMS(E_b) over b's text
    tokens, so E||delta_b||^2 = sigma^2 ||E_b||^2; samples // 2 antithetic pairs as in average_sharpness.
    """
    pairs = _antithetic_pairs(samples)
    norms, mask = _text_norms(text_embeddings, text_mask)
    per_coordinate = sigma * norms / (mask.flatten(1).sum(dim=1) * text_embeddings.shape[-1]).sqrt()  # (B,)
    generator = as_generator(seed)
    center = float(loss_fn_input(torch.zeros_like(text_embeddings)).mean())

    def draw() -> Tensor:
        noise = torch.randn(text_embeddings.shape, generator=generator, dtype=text_embeddings.dtype)  # (B, T, D)
        return noise.to(text_embeddings.device) * mask * per_coordinate[:, None, None]

    gains = _antithetic_gains(lambda d: float(loss_fn_input(d).mean()) - center, draw, pairs)
    return _mean_with_ci(gains, center, 2 * pairs + 1)


@dataclass
class BarrierResult:
    barrier: float                     # max_t L(t) - ((1 - t) L(0) + t L(1))
    t_at_max: float
    ts: list[float]
    losses: list[float]
    forwards: int


def linear_path(loss_fn: LossFn, params_a: Params, params_b: Params) -> Callable[[float], float]:
    """t -> L((1 - t) a + t b) without gradients, for loss_barrier."""
    @torch.no_grad()
    def loss_along(t: float) -> float:
        return float(loss_fn({k: (1 - t) * params_a[k] + t * params_b[k] for k in params_a}))

    return loss_along


def loss_barrier(loss_along: Callable[[float], float], points: int = 21) -> BarrierResult:
    """Loss barrier on a path at `points` evenly spaced t in [0, 1] (Frankle et al. 2020, linear mode connectivity)."""
    if points < 3:
        raise ValueError(f"points must be at least 3 (both ends and one interior point), got {points}")
    ts = np.linspace(0.0, 1.0, points)
    losses = np.array([loss_along(float(t)) for t in ts])
    excess = losses - ((1 - ts) * losses[0] + ts * losses[-1])
    i = int(np.argmax(excess))
    return BarrierResult(float(excess[i]), float(ts[i]), ts.tolist(), losses.tolist(), points)
