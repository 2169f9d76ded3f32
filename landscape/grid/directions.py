"""Directions for loss-landscape slices, in prompt space and in input space.

Prompt space: two directions d1, d2 over the trainable tensors ("prompt" (P, D) [+ head]); the
surface is L(θ* + α d1 + β d2). Input space: per-example directions on the text-token
embeddings; the surface is mean_i l_i(E_i + α d1_i + β d2_i) with the prompt fixed.

Normalization (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", §4):
  filter  each row (a prompt token, a head output row, a text token) is scaled to the norm of
          the same row of the reference (the trained tensor, or the token's embedding); a deep prompt's
          row is one virtual token's keys in one layer, or its values in one layer: the 2L blocks that
          training's perturbation unit scales on their own (ptp_core.training.perturb.prompt_unit). A 1-D tensor
          (a head's bias) gets a zero direction, as Li et al.'s code does for biases (ignore='biasbn');
  layer   each tensor (in input space: each example) is scaled to the reference's norm;
  none    unit norm over the whole direction (in input space: per example).

Row-wise scaling moves a plane spanned by two chosen vectors (PCA components, Hessian eigenvectors):
the drawn plane is span(d1, d2), not span(u1, u2). So `info` describes the plane drawn: for pca the
trajectory variance along d1 and d2 (`explained_variance`; the PCA plane's own in
`pca_explained_variance`), for hessian the Rayleigh quotients of d1 and d2 (`rayleigh_quotients`)
and the fraction of each inside the top-2 eigenvector plane (`eigenplane_fraction`).

Orthogonality vs. norms. Gram-Schmidt over the flattened direction followed by a re-normalization
per row would break orthogonality (rows get different scales), and stopping after Gram-Schmidt
would break the filter norms of d2. We instead orthogonalize *at the granularity of the
normalization*: every row of d2 is made orthogonal to the same row of d1, then rescaled to the
reference norm. Rescaling an orthogonal row keeps it orthogonal, and a sum of zero row inner
products is zero, so both hold exactly: <d1, d2> = 0 over the flattened direction and every row
of d2 has the reference norm. The price: d2 is orthogonal to d1 row by row, a stronger condition
than the global one (P constraints instead of 1), so d2 is a random direction from a slightly
smaller set. For `none` the group is the whole direction and this is plain Gram-Schmidt.
All arithmetic is float64; same seed -> bitwise same directions on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from landscape.hessian import Params, flatten_params, hvp, top_eigenvalues
from ptp_core.model.encoding import Batch, share_token_scale
from ptp_core.model.prompt_model import PromptModel

DIRECTION_KINDS = ("gradient", "random", "interp", "pca", "hessian")
NORMALIZATIONS = ("filter", "layer", "none")
EPS = 1e-12  # rows whose norm is below this stay zero instead of dividing by ~0


@dataclass
class Directions:
    """θ* and two directions over the trainable tensors named in d1 (others are held at θ*)."""

    kind: str
    norm: str
    seed: int
    center: Params  # every trained tensor at the centre of the grid, float32
    d1: Params  # same keys as d2: the perturbed tensors
    d2: Params  # zeros for a line between two checkpoints
    info: dict = field(default_factory=dict)  # explained_variance (pca), eigenvalues (hessian), ...

    def at(self, alphas: Tensor, betas: Tensor) -> Params:
        """Stacked params for G points: perturbed tensors (G, ...) and held tensors unstacked."""
        out = dict(self.center)
        for name in self.d1:
            shape = (-1,) + (1,) * self.d1[name].dim()
            a = alphas.to(self.d1[name]).reshape(shape)
            b = betas.to(self.d1[name]).reshape(shape)
            out[name] = self.center[name] + a * self.d1[name] + b * self.d2[name]  # (G, ...)
        return out


# ---- row-wise normalization and orthogonalization -----------------------------------------------

def _rows(tensor: Tensor, norm: str, blocks: int = 1) -> Tensor:
    """(R, K) view of a tensor: its filters (rows) for `filter` on matrices, each row split into `blocks` equal
    filters (a deep prompt's keys and values of each layer), else one row."""
    if norm == "filter" and tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0] * blocks, -1)
    return tensor.reshape(1, -1)


def _rescale_rows(direction: Tensor, target_norms: Tensor) -> Tensor:
    """direction (R, K) with every row scaled to target_norms (R, 1); zero rows stay zero."""
    norms = direction.norm(dim=1, keepdim=True)  # (R, 1)
    return torch.where(norms > EPS, direction * (target_norms / norms.clamp_min(EPS)), torch.zeros_like(direction))


def _orthogonalize_rows(direction: Tensor, against: Tensor) -> Tensor:
    """Remove from every row of direction (R, K) its component along the same row of against."""
    squared = (against * against).sum(dim=1, keepdim=True)  # (R, 1)
    coefficient = (direction * against).sum(dim=1, keepdim=True) / squared.clamp_min(EPS * EPS)
    return direction - torch.where(squared > EPS * EPS, coefficient, torch.zeros_like(coefficient)) * against


def _check_norm(norm: str) -> None:
    if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {norm!r}; use one of {', '.join(NORMALIZATIONS)}")


def normalize_direction(direction: Params, reference: Params, norm: str = "filter",
                        orthogonal_to: Params | None = None, prompt_blocks: int = 1) -> Params:
    """Scale a direction as `norm` says (filter/layer to the reference's row/tensor norms, none to 1).

    With orthogonal_to, each row (filter), tensor (layer) or the whole direction (none) is first made
    orthogonal to the same part of orthogonal_to, so the result is orthogonal to it and keeps its norms.
    prompt_blocks: the equal blocks of each row of a deep prompt (PromptModel.prompt_blocks: every layer's
    keys and its values), each a filter of its own. Under filter a 1-D tensor (a bias) gets a zero direction.
    """
    _check_norm(norm)
    names = list(direction)
    work = {k: direction[k].detach().double() for k in names}
    if norm == "none":
        flat = torch.cat([work[k].reshape(-1) for k in names]).unsqueeze(0)  # (1, N)
        if orthogonal_to is not None:
            flat = _orthogonalize_rows(flat, torch.cat([orthogonal_to[k].double().reshape(-1) for k in names])[None])
        flat = _rescale_rows(flat, torch.ones(1, 1, dtype=flat.dtype, device=flat.device))[0]  # (N,)
        pieces = flat.split([work[k].numel() for k in names])
        return {k: p.reshape(work[k].shape).to(direction[k].dtype) for k, p in zip(names, pieces)}
    out = {}
    for name in names:
        if norm == "filter" and work[name].dim() < 2:  # Li et al.: biases do not move (ignore='biasbn')
            out[name] = torch.zeros_like(direction[name])
            continue
        blocks = prompt_blocks if name == "prompt" else 1
        rows = _rows(work[name], norm, blocks)  # (R, K)
        if orthogonal_to is not None:
            rows = _orthogonalize_rows(rows, _rows(orthogonal_to[name].double(), norm, blocks))
        target = _rows(reference[name].detach().double(), norm, blocks).norm(dim=1, keepdim=True)  # (R, 1)
        out[name] = _rescale_rows(rows, target).reshape(work[name].shape).to(direction[name].dtype)
    return out


def random_like(like: Params, generator: torch.Generator) -> Params:
    """Seeded standard Gaussian tensors shaped like `like` (drawn on the CPU, in key order)."""
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.device, torch.float32)
            for k, v in like.items()}


def orthonormal_pair(first: Params, second: Params, reference: Params, norm: str,
                     prompt_blocks: int = 1) -> tuple[Params, Params]:
    """(d1, d2): first normalized; second made orthogonal to d1 (row by row) and normalized."""
    d1 = normalize_direction(first, reference, norm, prompt_blocks=prompt_blocks)
    return d1, normalize_direction(second, reference, norm, orthogonal_to=d1, prompt_blocks=prompt_blocks)


# ---- prompt-space kinds --------------------------------------------------------------------------

def loss_gradient(model: PromptModel, params: Params, batches: Sequence[Batch], names: Sequence[str],
                  dtype: torch.dtype | None = None) -> Params:
    """Gradient of the mean loss over all examples of `batches` w.r.t. params[names] (--head lm: over all their
    target tokens, one token scale for every batch)."""
    batches = share_token_scale(list(batches))
    leaves = {k: params[k].detach().clone().requires_grad_(True) for k in names}
    total = sum(len(b) for b in batches)
    grads = {k: torch.zeros_like(v) for k, v in leaves.items()}
    for batch in batches:
        with torch.autocast(model.device.type, dtype=dtype or torch.float32, enabled=dtype not in (None, torch.float32)):
            loss = model.loss({**params, **leaves}, batch).sum() / total
        for name, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            grads[name] += g.float()
    return grads


def _centred_snapshots(trajectory: dict, center: Tensor) -> Tensor:
    """The prompt snapshots (S, P, D) as rows (S, P*D) around their mean, float64."""
    if trajectory is None or "prompts" not in trajectory:
        raise ValueError("pca directions need the checkpoint's trajectory.safetensors (prompt snapshots); "
                         "retrain with --snapshot-every N or use --directions gradient")
    snapshots = trajectory["prompts"].double().to(center.device)  # (S, P, D)
    if snapshots.shape[1:] != center.shape or snapshots.shape[0] < 3:
        raise ValueError(f"trajectory has snapshots {tuple(snapshots.shape)}; pca needs at least 3 of shape "
                         f"{tuple(center.shape)}; retrain with a smaller --snapshot-every")
    matrix = snapshots.reshape(snapshots.shape[0], -1)  # (S, P*D)
    return matrix - matrix.mean(dim=0, keepdim=True)


def trajectory_pca(trajectory: dict, center: Tensor) -> tuple[Tensor, Tensor, list[float]]:
    """Top-2 principal directions (P, D) of the prompt snapshots (S, P, D) around their mean.

    Returns (u1, u2, explained variance ratio of each); u1, u2 are orthonormal (Li et al. 2018, §7).
    """
    matrix = _centred_snapshots(trajectory, center)  # (S, P*D)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)  # vh: (S, P*D)
    variance = singular ** 2
    ratio = (variance / variance.sum().clamp_min(EPS)).tolist()
    # the sign of a singular vector is arbitrary: fix it so the largest entry is positive
    vectors = [v * torch.sign(v[v.abs().argmax()]) for v in vh[:2]]
    return vectors[0].reshape(center.shape), vectors[1].reshape(center.shape), ratio[:2]


def variance_along(trajectory: dict, center: Tensor, d1: Tensor, d2: Tensor) -> list[float]:
    """Fraction of the trajectory's variance along d1 and along d2 (P, D), orthogonal: what the drawn plane shows."""
    matrix = _centred_snapshots(trajectory, center)  # (S, P*D)
    total = matrix.pow(2).sum().clamp_min(EPS)
    return [float((matrix @ (d.double().reshape(-1) / d.double().norm().clamp_min(EPS))).pow(2).sum() / total)
            for d in (d1, d2)]


def prompt_directions(model: PromptModel, params: Params, batches: Sequence[Batch], kind: str = "gradient",
                      norm: str = "filter", seed: int = 0, names: Sequence[str] = ("prompt",),
                      others: Sequence[Params] = (), trajectory: dict | None = None,
                      dtype: torch.dtype | None = None) -> Directions:
    """Two directions over params[names] at θ* = params.

    kind: gradient (d1 = normalized gradient of the mean loss on `batches`, d2 = seeded Gaussian
    orthogonal to it), random (two seeded Gaussians), interp (others = 1 or 2 more checkpoints:
    d1 = b - a [, d2 = c - a], no normalization: axes in checkpoint units), pca (trajectory
    snapshots), hessian (top-2 eigenvectors from landscape.hessian).
    """
    _check_norm(norm)
    center = {k: v.detach().float() for k, v in params.items()}
    names = list(names)
    missing = [k for k in names if k not in center]
    if missing:
        raise ValueError(f"params has no {missing}; use --params prompt")
    reference = {k: center[k] for k in names}
    generator = torch.Generator().manual_seed(seed)
    info: dict = {}
    blocks = model.prompt_blocks  # a deep prompt: every layer's keys and values are filters of their own
    if kind == "gradient":
        gradient = loss_gradient(model, center, batches, names, dtype)
        d1, d2 = orthonormal_pair(gradient, random_like(reference, generator), reference, norm, blocks)
        info["gradient_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gradient.values())))
    elif kind == "random":
        d1, d2 = orthonormal_pair(random_like(reference, generator), random_like(reference, generator), reference,
                                  norm, blocks)
    elif kind == "interp":
        if len(others) not in (1, 2):
            raise ValueError(f"interp needs 2 or 3 checkpoints (a line or a plane), got {len(others) + 1}")
        d1 = {k: others[0][k].float().to(center[k].device) - center[k] for k in names}
        d2 = ({k: others[1][k].float().to(center[k].device) - center[k] for k in names} if len(others) == 2
              else {k: torch.zeros_like(center[k]) for k in names})
        norm = "none"  # checkpoint units: (1, 0) is the second checkpoint, (0, 1) the third
        info["checkpoints"] = len(others) + 1
    elif kind == "pca":
        if names != ["prompt"]:
            raise ValueError("pca directions cover the prompt only (the trajectory holds prompts); use --params prompt")
        u1, u2, ratio = trajectory_pca(trajectory, center["prompt"])
        d1, d2 = orthonormal_pair({"prompt": u1.float()}, {"prompt": u2.float()}, reference, norm, blocks)
        info["explained_variance"] = variance_along(trajectory, center["prompt"], d1["prompt"], d2["prompt"])
        info["pca_explained_variance"] = ratio
    elif kind == "hessian":
        model.check_double_backward()
        d1, d2, info = _hessian_pair(model, center, batches, names, norm, seed, blocks)
    else:
        raise ValueError(f"unknown direction kind {kind!r}; use one of {', '.join(DIRECTION_KINDS)}")
    return Directions(kind, norm, seed, center, d1, d2, info)


def _hessian_pair(model: PromptModel, center: Params, batches: Sequence[Batch], names: list[str], norm: str,
                  seed: int, blocks: int = 1) -> tuple[Params, Params, dict]:
    if len(batches) != 1:
        raise ValueError(f"hessian directions use one batch of examples, got {len(batches)}; "
                         "lower --examples to at most --batch-size")
    held = {k: v for k, v in center.items() if k not in names}
    batch = batches[0]
    trainable = {k: center[k] for k in names}

    def loss_fn(p: Params) -> Tensor:
        return model.loss({**held, **p}, batch).mean(-1)

    result = top_eigenvalues(loss_fn, trainable, k=2, seed=seed)
    v1, v2 = ({k: v.float() for k, v in vector.items()} for vector in result.eigenvectors[:2])
    d1, d2 = orthonormal_pair(v1, v2, trainable, norm, blocks)
    # the plane drawn is span(d1, d2): its curvature is d^T H d / |d|^2, not the eigenvalues of span(v1, v2)
    basis = torch.stack([flatten_params(v).double() for v in result.eigenvectors[:2]])  # (2, N)
    quotients, inside = [], []
    for d in (d1, d2):
        flat = flatten_params(d).double()  # (N,)
        squared = float(flat @ flat) or 1.0
        quotients.append(float(flatten_params(hvp(loss_fn, trainable, d)).double() @ flat) / squared)
        inside.append(float((basis @ flat).pow(2).sum()) / squared)
    return d1, d2, {"eigenvalues": result.eigenvalues, "converged": result.converged,
                    "rayleigh_quotients": quotients, "eigenplane_fraction": inside}


# ---- input space ------------------------------------------------------------------------------------

def input_directions(model: PromptModel, params: Params, batches: Sequence[Batch], norm: str = "filter",
                     seed: int = 0, order: Sequence[Sequence[int]] | None = None,
                     dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per-example directions on text-token embeddings: [(d1 (B, T, D), d2 (B, T, D)) per batch].

    d1_i is the gradient of example i's loss w.r.t. its text-token embeddings, d2_i a Gaussian
    made orthogonal to d1_i; both normalized per example as `norm` says (filter: each text token's
    row to that token's embedding norm). Non-text rows are zero. `order[k]` gives the stored index
    of each example of batch k: the Gaussian of example i is drawn in stored order (so it does not
    depend on how examples are batched).
    """
    _check_norm(norm)
    if any(batch.choices for batch in batches):
        raise ValueError("input-space surfaces draw one direction per example text, and a multiple-choice example "
                         "has one text per candidate; use --space prompt")
    order = order if order is not None else _consecutive(batches)
    generator = torch.Generator().manual_seed(seed)
    lengths = {index: int(batch.text_mask[r].sum()) for batch, rows in zip(batches, order)
               for r, index in enumerate(rows)}
    dim = model.embedding_dim
    noise = {index: torch.randn(lengths[index], dim, generator=generator, dtype=torch.float64)  # (L_i, D)
             for index in sorted(lengths)}
    out = []
    for batch, rows in zip(batches, order):
        delta = torch.zeros(*batch.input_ids.shape, dim, device=model.device, requires_grad=True)  # (B, T, D)
        with torch.autocast(model.device.type, dtype=dtype or torch.float32, enabled=dtype not in (None, torch.float32)):
            loss = model.loss(params, batch, input_perturbation=delta).sum()  # l_i depends on delta_i only
        gradient = torch.autograd.grad(loss, delta)[0].detach().double()  # (B, T, D)
        embeddings = model.embed(batch).detach().double()  # (B, T, D)
        mask = batch.text_mask.unsqueeze(-1)  # (B, T, 1)
        gaussian = torch.zeros_like(gradient)
        for r, index in enumerate(rows):
            gaussian[r][batch.text_mask[r]] = noise[index].to(gaussian.device)
        d1, d2 = [], []
        for r in range(len(batch)):
            keep = batch.text_mask[r]
            first, second = _normalize_example(gradient[r][keep], gaussian[r][keep], embeddings[r][keep], norm)
            for target, value in ((d1, first), (d2, second)):
                row = torch.zeros_like(gradient[r])  # (T, D)
                row[keep] = value
                target.append(row)
        out.append(tuple((torch.stack(d) * mask).float() for d in (d1, d2)))  # (B, T, D) each
    return out


def _normalize_example(gradient: Tensor, gaussian: Tensor, embeddings: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """One example's text rows (L, D): (d1, d2) normalized and orthogonal, as in normalize_direction."""
    if norm == "filter":
        shape, target = gradient.shape, embeddings.norm(dim=1, keepdim=True)  # rows: tokens
    else:
        shape = gradient.shape
        gradient, gaussian = gradient.reshape(1, -1), gaussian.reshape(1, -1)  # (1, L*D)
        target = (embeddings.norm() if norm == "layer" else torch.ones((), dtype=gradient.dtype, device=gradient.device)).reshape(1, 1)
    d1 = _rescale_rows(gradient, target)
    d2 = _rescale_rows(_orthogonalize_rows(gaussian, d1), target)
    return d1.reshape(shape), d2.reshape(shape)


def _consecutive(batches: Sequence[Batch]) -> list[list[int]]:
    out, start = [], 0
    for batch in batches:
        out.append(list(range(start, start + len(batch))))
        start += len(batch)
    return out
