"""Curvature and sharpness estimators over a dict of trainable tensors.

Every estimator takes `loss_fn(params: dict[str, Tensor]) -> Tensor`, the mean loss over one
fixed evaluation batch, built by the caller from the one loss, e.g.
    loss_fn = lambda p: model.loss({**held, **p}, batch).mean(-1)
(`.mean(-1)` keeps it valid for stacked (G, ...) params too). The estimators differentiate and
perturb every tensor in `params`; hold a tensor fixed by closing over it in `loss_fn` instead.
Hessian-vector products use double backward (Pearlmutter 1994), so they run on CPU; the graph is
built with SDPA restricted to its math backend, the one attention kernel with a second derivative.
Every estimator takes a seed (int or torch.Generator) and reports the HVPs/forwards it used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]


def flatten_params(params: Params) -> Tensor:
    """Concatenate every tensor of the dict (in its key order) into one (N,) vector."""
    return torch.cat([t.reshape(-1) for t in params.values()])  # (N,)


def unflatten_params(vector: Tensor | np.ndarray, like: Params) -> Params:
    """Inverse of flatten_params: split an (N,) vector into tensors shaped and typed like `like`."""
    vector = torch.as_tensor(vector)
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype)
        offset += t.numel()
    return out


def as_generator(seed: int | torch.Generator) -> torch.Generator:
    """A CPU generator: seeds draw the same numbers on every device."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


class HessianOperator:
    """Hessian-vector products at fixed params, sharing one forward and first backward.

    The gradient graph is built once (create_graph=True) and kept; each product is then one
    second backward of <grad L, v>. `hvps` counts the products done.
    """

    def __init__(self, loss_fn: LossFn, params: Params):
        self.like = {k: v.detach() for k, v in params.items()}
        self.leaves = [v.detach().clone().requires_grad_(True) for v in params.values()]
        # SDPA's fused kernels (flash/efficient, CPU and CUDA) have no second derivative; its
        # math backend is plain differentiable ops, so the graph is built with that one only.
        with sdpa_kernel(SDPBackend.MATH):
            self.loss = loss_fn(dict(zip(params, self.leaves)))
            grads = torch.autograd.grad(self.loss, self.leaves, create_graph=True, allow_unused=True)
        # A tensor the loss ignores (e.g. a head next to a verbalizer) has zero gradient and curvature.
        self.grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, self.leaves)]
        self.size = sum(t.numel() for t in self.leaves)
        self.hvps = 0

    def __call__(self, vector: Tensor) -> Tensor:
        """H v for a flat (N,) vector; returns (N,) in the params' dtype and device."""
        self.hvps += 1
        pieces = unflatten_params(vector, self.like)
        dot = sum((g * v).sum() for g, v in zip(self.grads, pieces.values()))
        if not dot.requires_grad:  # the loss is linear in the params: H = 0
            return torch.zeros(self.size, dtype=self.leaves[0].dtype, device=self.leaves[0].device)
        hv = torch.autograd.grad(dot, self.leaves, retain_graph=True, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(t)).reshape(-1) for h, t in zip(hv, self.leaves)])

    def numpy_matvec(self, vector: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(np.ascontiguousarray(vector).reshape(-1))).detach().cpu().double().numpy()


def hvp(loss_fn: LossFn, params: Params, vector: Params) -> Params:
    """H v at params by double backward: grad of <grad L(params), v> (Pearlmutter 1994)."""
    operator = HessianOperator(loss_fn, params)
    return unflatten_params(operator(flatten_params(vector).detach()), operator.like)


@dataclass
class EigenResult:
    eigenvalues: list[float]           # top-k (algebraically largest), descending
    eigenvectors: list[Params]         # unit-norm (over all params), same order
    residuals: list[float]             # ||H v - lambda v|| / |lambda|, measured with fresh HVPs
    converged: bool                    # ARPACK reported convergence within the HVP budget
    hvps: int                          # HVPs used, residual checks included


def top_eigenvalues(
    loss_fn: LossFn, params: Params, k: int = 1, tol: float = 1e-4,
    seed: int | torch.Generator = 0, max_hvps: int = 500, ncv: int | None = None,
) -> EigenResult:
    """Top-k Hessian eigenpairs by implicitly restarted Lanczos (ARPACK eigsh, which='LA').

    The start vector is drawn from `seed`. ncv is the Lanczos basis size (default max(2k+1, 20)),
    so at least ncv HVPs are spent. `max_hvps` caps the products: ARPACK's restarts are limited
    accordingly (the cap can be overshot by < ncv) and whatever converged is returned, NaN for the rest.
    """
    operator = HessianOperator(loss_fn, params)
    n = operator.size
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and {n - 1} (the number of parameters minus one), got {k}")
    ncv = min(n, ncv or max(2 * k + 1, 20))
    linear_operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=operator.numpy_matvec, dtype=np.float64)
    start = torch.randn(n, generator=as_generator(seed), dtype=torch.float64).numpy()
    maxiter = max(1, (max_hvps - ncv) // max(1, ncv - k) + 1)
    try:
        values, vectors = scipy.sparse.linalg.eigsh(
            linear_operator, k=k, which="LA", tol=tol, v0=start, ncv=ncv, maxiter=maxiter)
        converged = True
    except scipy.sparse.linalg.ArpackNoConvergence as error:
        values, vectors, converged = error.eigenvalues, error.eigenvectors, False
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    residuals = []
    for value, vector in zip(values, vectors.T):
        hv = operator.numpy_matvec(vector)
        residuals.append(float(np.linalg.norm(hv - value * vector) / max(abs(value), 1e-30)))
    missing = k - len(values)
    return EigenResult(
        eigenvalues=[float(v) for v in values] + [float("nan")] * missing,
        eigenvectors=[unflatten_params(torch.from_numpy(v.copy()), operator.like) for v in vectors.T],
        residuals=residuals + [float("nan")] * missing,
        converged=converged and missing == 0,
        hvps=operator.hvps,
    )


@dataclass
class TraceResult:
    trace: float
    stderr: float                      # standard error of the stochastic part
    hvps: int


def _rademacher(n: int, count: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (count, n), generator=generator, dtype=torch.float64) * 2 - 1  # (count, N)


def hessian_trace_hutchinson(
    loss_fn: LossFn, params: Params, probes: int = 100, seed: int | torch.Generator = 0
) -> TraceResult:
    """tr H ~ mean_i z_i^T H z_i over Rademacher z_i (Hutchinson 1989); stderr = std / sqrt(m)."""
    if probes < 2:
        raise ValueError(f"probes must be at least 2 to estimate a standard error, got {probes}")
    operator = HessianOperator(loss_fn, params)
    probe_matrix = _rademacher(operator.size, probes, as_generator(seed))  # (m, N)
    samples = np.array([float(z @ operator.numpy_matvec(z.numpy())) for z in probe_matrix])  # (m,)
    return TraceResult(float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(probes)), operator.hvps)


def hutchpp(loss_fn: LossFn, params: Params, hvps: int = 99, seed: int | torch.Generator = 0) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021, Alg. 1) with `hvps` products split in thirds.

    Q = orth(H S); tr H ~ tr(Q^T H Q) + (3/m) tr(G^T P H P G), P = I - Q Q^T, S and G Rademacher.
    The standard error is that of the Hutchinson part over its m/3 probes (Q's part is exact).
    """
    third = hvps // 3
    if third < 2:
        raise ValueError(f"hutchpp needs at least 6 HVPs (2 Hutchinson probes after the sketch), got {hvps}")
    operator = HessianOperator(loss_fn, params)
    generator = as_generator(seed)
    sketch = _rademacher(operator.size, third, generator).numpy().T  # (N, m/3)
    probes = _rademacher(operator.size, third, generator).numpy().T  # (N, m/3)
    sketched = np.stack([operator.numpy_matvec(s) for s in sketch.T], axis=1)  # (N, m/3): H S
    basis, _ = scipy.linalg.qr(sketched, mode="economic")  # (N, m/3): Q
    exact = sum(float(q @ operator.numpy_matvec(q)) for q in basis.T)
    projected = probes - basis @ (basis.T @ probes)  # (N, m/3): P G
    samples = np.array([float(p @ operator.numpy_matvec(p)) for p in projected.T])  # (m/3,)
    return TraceResult(exact + float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(third)), operator.hvps)


# ---- sharpness: worst case in a ball, average under Gaussian noise, linear-path barrier ----


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
    sharpness: float                   # E[L(x + delta)] - L(x), Monte Carlo mean
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

    Adaptive (ASAM, Kwon et al. 2021; Andriushchenko et al. 2023): delta = |theta| * u with
    ||u|| <= rho, so the ball is scaled elementwise by the parameters. step_size is a fraction
    of rho per step. The returned value is a lower bound of the true maximum.
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
    to the text-token embeddings.
    """
    def loss_fn_input(delta: Tensor) -> Tensor:
        return model.loss(params, batch, input_perturbation=delta)  # (B,)

    return loss_fn_input, model.embed(batch).detach(), batch.text_mask


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


@torch.no_grad()
def average_sharpness(
    loss_fn: LossFn, params: Params, sigma: float, samples: int = 100,
    seed: int | torch.Generator = 0, adaptive: bool = False,
) -> AverageResult:
    """E_{delta ~ N(0, sigma^2 I)} L(theta + delta) - L(theta) (Andriushchenko et al. 2023), with a 95% CI.

    adaptive scales the noise elementwise by |theta|.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2 for a confidence interval, got {samples}")
    like = {k: v.detach() for k, v in params.items()}
    theta = flatten_params(like)  # (N,)
    scale = sigma * (theta.abs() if adaptive else torch.ones_like(theta))
    generator, center = as_generator(seed), float(loss_fn(like))
    gains = np.empty(samples)
    for i in range(samples):
        noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)
        gains[i] = float(loss_fn(unflatten_params(theta + scale * noise, like))) - center
    return _mean_with_ci(gains, center, samples + 1)


@torch.no_grad()
def input_average_sharpness(
    loss_fn_input: Callable[[Tensor], Tensor], text_embeddings: Tensor, text_mask: Tensor,
    sigma: float, samples: int = 20, seed: int | torch.Generator = 0,
) -> AverageResult:
    """E_delta mean_b l_b(E_b + delta_b) - l_b(E_b), Gaussian delta_b on b's text tokens only.

    sigma is relative like eps of input_worst_case_sharpness: E||delta_b||^2 = sigma^2 ||E_b||^2.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2 for a confidence interval, got {samples}")
    norms, mask = _text_norms(text_embeddings, text_mask)
    per_coordinate = sigma * norms / (mask.flatten(1).sum(dim=1) * text_embeddings.shape[-1]).sqrt()  # (B,)
    generator = as_generator(seed)
    center = float(loss_fn_input(torch.zeros_like(text_embeddings)).mean())
    gains = np.empty(samples)
    for i in range(samples):
        noise = torch.randn(text_embeddings.shape, generator=generator, dtype=text_embeddings.dtype)  # (B, T, D)
        noise = noise.to(text_embeddings.device)
        gains[i] = float(loss_fn_input(noise * mask * per_coordinate[:, None, None]).mean()) - center
    return _mean_with_ci(gains, center, samples + 1)


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
