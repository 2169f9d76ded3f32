"""Mode connectivity of two soft prompts: the straight line between them and a trained quadratic Bezier curve.

Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs") connect two minima A and B
by θ(t) = (1 − t)² A + 2t(1 − t) C + t² B and train the control point C to minimise E_{t ~ U(0, 1)} L(θ(t));
Qin et al. 2022 do the same for delta-tuning solutions. Both paths are then measured on one t grid and
compared by their barrier max_t L(θ(t)) − ((1 − t) L(A) + t L(B)) (landscape.measures.sharpness.loss_barrier).
With C at the midpoint (A + B) / 2 the curve IS the line, so training starts from the line.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from landscape.hessian import Params, as_generator
from landscape.measures.sharpness import BarrierResult, loss_barrier

ScoreFn = Callable[[Params], tuple[Tensor, Tensor]]  # stacked params (G, ...) -> mean loss (G,), accuracy (G,)


def _column(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like).reshape(-1, *([1] * like.dim()))  # (G, 1, ..., 1): broadcasts over one tensor


def line(t: Tensor, a: Params, b: Params) -> Params:
    """θ(t) = (1 − t) A + t B at G values t (G,); every tensor (...) becomes (G, ...)."""
    return {k: (1 - _column(t, a[k])) * a[k] + _column(t, a[k]) * b[k] for k in a}


def bezier(t: Tensor, a: Params, c: Params, b: Params) -> Params:
    """θ(t) = (1 − t)² A + 2t(1 − t) C + t² B (Garipov et al. 2018, eq. 3) at G values t (G,): tensors (G, ...)."""
    out = {}
    for k in a:
        s = _column(t, a[k])  # (G, 1, ..., 1)
        out[k] = (1 - s) ** 2 * a[k] + 2 * s * (1 - s) * c[k] + s ** 2 * b[k]
    return out


def midpoint(a: Params, b: Params) -> Params:
    """(A + B) / 2: the control point whose Bezier curve is the straight line."""
    return {k: (a[k] + b[k]) / 2 for k in a}


def train_control_point(loss_fn: Callable[[Params, int], Tensor], a: Params, b: Params, *, steps: int, lr: float,
                        names: Sequence[str] | None = None, seed: int | torch.Generator = 0,
                        progress: bool = True) -> tuple[Params, list[float]]:
    """C minimising E_{t ~ U(0, 1)} L(θ(t)) by Adam, from C = (A + B) / 2 (Garipov et al. 2018, eq. 4).

    loss_fn(stacked params (1, ...), step) -> per-sample losses, e.g. (1, B): step picks the batch. Only the
    tensors in `names` (default all) get a trained control; the others stay at the midpoint, i.e. on the line.
    Returns C (detached) and the loss of each step.
    """
    names = list(a) if names is None else list(names)
    generator = as_generator(seed)
    control = midpoint({k: v.detach() for k, v in a.items()}, {k: v.detach() for k, v in b.items()})
    trained = {k: control[k].clone().requires_grad_(True) for k in names}
    optimizer = torch.optim.Adam(list(trained.values()), lr=lr)
    history = []
    bar = tqdm(range(steps), desc="bezier curve", disable=not progress)
    for step in bar:
        t = torch.rand(1, generator=generator)  # (1,): one t per step, as Garipov et al.
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(bezier(t, a, {**control, **trained}, b), step).float().mean()
        if not torch.isfinite(loss):
            raise ValueError(f"the curve's loss became {loss.item()} at step {step}; lower --lr")
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    return {**control, **{k: v.detach() for k, v in trained.items()}}, history


def path_losses(score: ScoreFn, a: Params, b: Params, c: Params, ts: Tensor, chunk: int | None = None,
                progress: bool = False) -> dict[str, np.ndarray]:
    """Mean loss and accuracy (T,) along the line and the curve at ts (T,), many t per forward.

    score(stacked (G, ...)) -> (loss (G,), accuracy (G,)). Both paths are stacked, `chunk` points per call
    (default all). The curve's ends are the line's (θ(0) = A, θ(1) = B exactly), so they are measured once.
    """
    count = len(ts)
    ends = (ts == 0) | (ts == 1)
    inner = ts[~ends]
    stacked = {k: torch.cat([v, w]) for (k, v), w in zip(line(ts, a, b).items(), bezier(inner, a, c, b).values())}
    total = count + len(inner)  # (T + T_inner, ...) line first
    chunk = chunk or total
    parts = [score({k: v[s:s + chunk] for k, v in stacked.items()})
             for s in tqdm(range(0, total, chunk), desc="paths", unit="chunk", disable=not progress)]
    loss = torch.cat([p[0] for p in parts]).double().cpu().numpy()  # (T + T_inner,)
    accuracy = torch.cat([p[1] for p in parts]).double().cpu().numpy()
    curve_loss, curve_accuracy = loss[:count].copy(), accuracy[:count].copy()
    curve_loss[~ends.numpy()], curve_accuracy[~ends.numpy()] = loss[count:], accuracy[count:]
    return {"linear_loss": loss[:count], "linear_accuracy": accuracy[:count],
            "curve_loss": curve_loss, "curve_accuracy": curve_accuracy}


def path_barrier(ts: Sequence[float], losses: Sequence[float]) -> BarrierResult:
    """loss_barrier of losses measured at ts = linspace(0, 1, T) (all at once, so looked up rather than computed)."""
    losses = np.asarray(losses, dtype=float)
    expected = np.linspace(0.0, 1.0, len(losses))
    if not np.allclose(ts, expected):
        raise ValueError("a barrier needs losses at evenly spaced t from 0 to 1")
    return loss_barrier(lambda t: float(losses[round(t * (len(losses) - 1))]), len(losses))
