"""Curvature estimators (HVPs, top Hessian eigenvalues, trace) over a dict of trainable tensors.

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
    if not np.any(operator.numpy_matvec(start)):  # H v = 0 for a random v: H = 0 (a constant loss), as ARPACK
        zero = unflatten_params(torch.zeros(n, dtype=torch.float64), operator.like)  # cannot start from H v0 = 0
        return EigenResult([0.0] * k, [zero] * k, [0.0] * k, True, operator.hvps)
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
