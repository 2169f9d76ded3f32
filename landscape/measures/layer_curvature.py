"""Curvature of a deep prompt layer by layer: the Hessian restricted to one layer's block of the prefix.

A deep prompt (P, L*2*H*d) holds, per virtual token, every layer's keys and values. H_ll, the block of the Hessian
for layer l's keys and values of all P virtual tokens, is the Hessian of the loss as a function of that block
alone with the other layers held at their values; its top eigenvalue and trace say in which layers the trained
prefix sits in a sharp valley (PyHessian reports the same per layer for network weights). The Hessian of the
whole prefix has the per-layer traces summed as its trace, and a top eigenvalue at least the largest per-layer
one; with `--params all` the full Hessian also holds the head's block, so its trace is that sum plus the head's.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from landscape import hessian

Params = dict[str, Tensor]


def layer_block_loss(loss_fn: Callable[[Params], Tensor], params: Params, layers: int, layer: int
                     ) -> tuple[Callable[[Params], Tensor], Params]:
    """(loss as a function of {"prompt": layer `layer`'s block (P, W/L)}, that block at its value)."""
    prompt = params["prompt"].detach()
    blocks = prompt.reshape(prompt.shape[0], layers, -1)  # (P, L, 2*H*d): keys then values of each layer
    before, after = blocks[:, :layer], blocks[:, layer + 1:]
    held = {k: v for k, v in params.items() if k != "prompt"}

    def block_loss(block: Params) -> Tensor:
        full = torch.cat([before, block["prompt"].unsqueeze(1), after], dim=1)  # (P, L, 2*H*d)
        return loss_fn({**held, "prompt": full.reshape(prompt.shape)})

    return block_loss, {"prompt": blocks[:, layer].clone()}


def layer_curvature(loss_fn: Callable[[Params], Tensor], params: Params, layers: int, trace: bool = True,
                    tol: float = 1e-4, seed: int = 0, max_hvps: int = 500, trace_hvps: int = 99) -> dict:
    """Per layer: the top eigenvalue of H_ll (Lanczos) and, with trace, its Hutch++ trace and standard error.

    Returns lists of L values under the metrics-row keys layer_hessian_top_eigenvalue, layer_hessian_trace,
    layer_hessian_trace_stderr, and the HVPs spent (layer_hessian_hvps)."""
    out: dict = {"layer_hessian_top_eigenvalue": [], "layer_hessian_hvps": 0}
    if trace:
        out.update(layer_hessian_trace=[], layer_hessian_trace_stderr=[])
    for layer in range(layers):
        block_loss, block = layer_block_loss(loss_fn, params, layers, layer)
        eigen = hessian.top_eigenvalues(block_loss, block, 1, tol, seed, max_hvps)
        out["layer_hessian_top_eigenvalue"].append(float(eigen.eigenvalues[0]))
        out["layer_hessian_hvps"] += eigen.hvps
        if trace:
            result = hessian.hutchpp(block_loss, block, trace_hvps, seed)
            out["layer_hessian_trace"].append(float(result.trace))
            out["layer_hessian_trace_stderr"].append(float(result.stderr))
            out["layer_hessian_hvps"] += result.hvps
    return out
