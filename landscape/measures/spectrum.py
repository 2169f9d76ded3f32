"""Hessian spectral density by stochastic Lanczos quadrature, and the smallest Hessian eigenvalue.

Same conventions as landscape.hessian: `loss_fn(params) -> Tensor` is the mean loss over one fixed
evaluation batch, products are exact HVPs by double backward, every estimator takes a seed and
reports the HVPs it used.

Stochastic Lanczos quadrature (SLQ; Golub & Meurant 1994, Ubaru, Chen, Saad 2017; applied to
network Hessians by Ghorbani, Krishnan, Xiao 2019 and PyHessian, Yao et al. 2020): for a unit
probe v, m Lanczos steps from v give a tridiagonal T_m = S diag(theta) S^T, and the Gauss rule
with nodes theta_k and weights tau_k^2 = S_1k^2 integrates any polynomial f of degree <= 2m - 1
exactly against v's spectral measure: v^T f(H) v = sum_k tau_k^2 f(theta_k). Averaged over
Rademacher probes this estimates the eigenvalue density (1/N) sum_i delta(t - lambda_i).

Why the Lanczos loop is written here rather than imported. curvlinops-for-pytorch 3.0.1
(`papyan2020traces.spectrum`) returns a Gaussian-smoothed density on a grid; its `fast_lanczos`
does expose T's eigenpairs, but without reorthogonalization, from an unseeded Gaussian start, and
behind its own PyTorchLinearOperator, with backpack-for-pytorch, linear_operator, einconv and
opt-einsum as required dependencies. hessian-eigenthings (only pre-releases exist, 1.0.0a1-a5) has
an SLQ (`spectral_density`, raw nodes and weights included) and a public reorthogonalized
`lanczos_tridiagonal` that would accept our HVP through its `LambdaOperator`, with light
dependencies; what it would save is the ~25-line loop below, against pinning an alpha API, an
absolute breakdown threshold (1e-12, whatever the Hessian's scale), a ValueError when the steps
exceed N, and integer-only seeds. We keep the loop (textbook, Golub & Van Loan sec. 10.1, checked
against dense Hessians in tests/landscape/test_spectrum.py) and scipy for everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

from landscape.hessian import HessianOperator, LossFn, Params, _rademacher, as_generator, unflatten_params


@dataclass
class SpectrumResult:
    nodes: list[float]                 # Ritz values theta_k of every probe, concatenated (Hessian eigenvalue units)
    weights: list[float]               # tau_k^2 / probes: non-negative, sum to 1
    probes: int                        # Rademacher probes (each normalized to unit length)
    steps: int                         # Lanczos steps per probe, min(requested, N); fewer after a breakdown
    hvps: int                          # one per Lanczos step


def lanczos_tridiagonal(
    matvec: Callable[[np.ndarray], np.ndarray], start: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos with full reorthogonalization from `start` (N,): T's diagonal (m,) and off-diagonal (m-1,).

    Paige (1976): in floating point the basis loses orthogonality as Ritz values converge, and
    plain Lanczos then repeats converged eigenvalues ("ghosts") and corrupts the quadrature weights.
    Reorthogonalizing against the whole basis (twice, "twice is enough", Giraud et al. 2005) costs
    O(m^2 N) flops, nothing next to m HVPs through a transformer. m <= N by construction.
    """
    basis = np.zeros((steps, start.size))  # (m, N)
    basis[0] = start / np.linalg.norm(start)
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[j])  # (N,)
        alphas.append(float(basis[j] @ w))
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(np.linalg.norm(w))
        # Breakdown: the Krylov space is invariant (H = 0, repeated eigenvalues, a probe in an
        # eigenspace), so T's eigenpairs are exact and another step would divide rounding noise.
        # The threshold is relative to the spectrum's scale seen so far, so units do not matter.
        # float32 HVPs leave a residual ~1e-7 of the scale there; continuing from it is harmless (a
        # new orthonormal direction coupled by ~1e-7, whose nodes get weights ~1e-14).
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0))
        if j + 1 == steps or beta <= 1e-10 * scale:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return np.array(alphas), np.array(betas)


def hessian_spectrum(
    loss_fn: LossFn, params: Params, probes: int = 4, steps: int = 30, seed: int | torch.Generator = 0
) -> SpectrumResult:
    """Eigenvalue density of the Hessian as probe-averaged Gauss quadrature nodes and weights (SLQ).

    Nodes and weights of probe v: T_m = S diag(theta) S^T from m Lanczos steps from v / ||v||,
    weights S_1k^2 (Ubaru, Chen, Saad 2017, eq. 2.5; Ghorbani et al. 2019, sec. 3). The first
    moment is exact per probe: N sum_k tau_k^2 theta_k = z^T H z, Hutchinson's estimate with the
    same probes z (the ones `hessian_trace_hutchinson` draws from the same seed).
    """
    # Defaults: 4 x 30 = 120 HVPs, the cost of a 100-probe Hutchinson trace. 30 steps integrate
    # polynomials of degree 59 exactly, enough for the few outliers of a prompt Hessian to converge
    # as extreme nodes; with N in the thousands each probe's measure is already close to the
    # spectral measure (its weights concentrate, Ubaru et al. sec. 4), and 4 probes show the spread
    # between probes. Ghorbani et al. use 10 x 90 for networks with millions of parameters.
    if probes < 1 or steps < 1:
        raise ValueError(f"probes and steps must be at least 1, got probes={probes}, steps={steps}")
    operator = HessianOperator(loss_fn, params)
    steps = min(steps, operator.size)  # a Krylov space cannot outgrow the dimension
    nodes, weights = [], []
    for z in _rademacher(operator.size, probes, as_generator(seed)).numpy():  # (probes, N)
        alphas, betas = lanczos_tridiagonal(operator.numpy_matvec, z, steps)
        theta, vectors = scipy.linalg.eigh_tridiagonal(alphas, betas)  # (m,), (m, m)
        nodes.extend(theta.tolist())
        weights.extend((vectors[0] ** 2 / probes).tolist())
    return SpectrumResult(nodes=nodes, weights=weights, probes=probes, steps=steps, hvps=operator.hvps)


@dataclass
class MinEigenResult:
    eigenvalue: float                  # smallest algebraic Hessian eigenvalue (< 0: a saddle, not a minimum)
    eigenvector: Params                # unit-norm over all params
    residual_norm: float               # ||H v - lambda v||, absolute: some eigenvalue lies within it of `eigenvalue`
    converged: bool                    # ARPACK reported convergence within the HVP budget
    hvps: int                          # HVPs used, the residual check included


def hessian_min_eigenvalue(
    loss_fn: LossFn, params: Params, tol: float = 1e-4, seed: int | torch.Generator = 0,
    max_hvps: int = 500, ncv: int | None = None,
) -> MinEigenResult:
    """Smallest algebraic Hessian eigenpair by implicitly restarted Lanczos (ARPACK eigsh, which='SA').

    Tells a saddle from a minimum: eigenvalue + residual_norm < 0 proves a negative eigenvalue.
    Same budget rules as `top_eigenvalues` (the cap can be overshot by < ncv); without convergence
    ARPACK returns no Ritz pair and the result holds NaN (and an empty eigenvector).

    Why not 'LA' on (c I - H) with c ~ lambda_max, the usual shift trick: Krylov spaces are shift
    invariant, so it builds the same subspaces; it only moves ARPACK's stopping test from
    tol * |lambda_min| to tol * (c - lambda_min). Measured (N = 400, outliers up to 20, bulk near 0,
    tol 1e-4, 3 seeds): at a saddle (lambda_min = -0.2) SA took 31-41 HVPs to error < 1e-11, the
    shift 21-31 plus ~22 for c to error up to 6e-6; at a minimum (lambda_min = 1e-5) SA took 550-880
    HVPs to 1e-15, the shift 53 HVPs to an error of 6e-4, which cannot tell the sign. ncv = 40
    (default here, 20 in `top_eigenvalues`): SA took 41 HVPs at the saddle and 245-280 at the minimum.
    """
    operator = HessianOperator(loss_fn, params)
    n = operator.size
    if n < 2:
        raise ValueError(f"ARPACK needs at least 2 parameters, got {n}")
    ncv = min(n, ncv or 40)
    linear_operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=operator.numpy_matvec, dtype=np.float64)
    start = torch.randn(n, generator=as_generator(seed), dtype=torch.float64).numpy()
    maxiter = max(1, (max_hvps - ncv) // max(1, ncv - 1) + 1)  # a restart keeps 1 Ritz vector, redoes ncv - 1 HVPs
    try:
        values, vectors = scipy.sparse.linalg.eigsh(
            linear_operator, k=1, which="SA", tol=tol, v0=start, ncv=ncv, maxiter=maxiter)
        converged = True
    except scipy.sparse.linalg.ArpackNoConvergence as error:
        values, vectors, converged = error.eigenvalues, error.eigenvectors, False
    if len(values) == 0:
        return MinEigenResult(float("nan"), {}, float("nan"), False, operator.hvps)
    value, vector = float(values[0]), vectors[:, 0]
    residual = float(np.linalg.norm(operator.numpy_matvec(vector) - value * vector))
    return MinEigenResult(
        eigenvalue=value,
        eigenvector=unflatten_params(torch.from_numpy(vector.copy()), operator.like),
        residual_norm=residual,
        converged=converged,
        hvps=operator.hvps,
    )
