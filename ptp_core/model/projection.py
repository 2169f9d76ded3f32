"""P-tuning v2's reparameterization of a deep prompt: the prefix is an MLP of P trainable token vectors.

    prefix = W2 tanh(W1 tokens + b1) + b2        tokens (P, H*d), W1 (h, H*d), W2 (L*2*H*d, h)

as PEFT's PrefixEncoder computes it with prefix_projection=True (Li & Liang 2021; Liu et al. 2022). The optimizer
moves the tokens and the MLP; the model's loss, PTP's perturbations, the trajectory, the checkpoint and every
landscape see the prefix the MLP produces (PEFT saves that same output as a projected adapter's prompt_embeddings).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

PREFIX = "projection."
TOKENS, HIDDEN_W, HIDDEN_B, OUT_W, OUT_B = (PREFIX + name for name in ("tokens", "0.weight", "0.bias", "2.weight",
                                                                       "2.bias"))


class Reparameterization(Protocol):
    """Between the optimizer's tensors and the model's params: forward makes the params, backward carries their
    gradients (on the params) back to the trainable tensors."""

    def forward(self, trainable: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def backward(self, params: dict[str, Tensor], trainable: dict[str, Tensor]) -> None: ...


class Identity:
    """No reparameterization: the optimizer's tensors are the model's params."""

    def forward(self, trainable: dict[str, Tensor]) -> dict[str, Tensor]:
        return trainable

    def backward(self, params: dict[str, Tensor], trainable: dict[str, Tensor]) -> None:
        """Nothing to carry: the gradients are already on the trainable tensors."""


def prefix(trainable: dict[str, Tensor]) -> Tensor:
    """(P, L*2*H*d) the MLP's prefix from the trainable tensors."""
    hidden = torch.tanh(trainable[TOKENS] @ trainable[HIDDEN_W].T + trainable[HIDDEN_B])  # (P, h)
    return hidden @ trainable[OUT_W].T + trainable[OUT_B]


class PrefixProjection:
    """forward: params with "prompt" the MLP's output, as a leaf whose gradient backward() pushes through the MLP
    (the chain rule, so every PTP regularizer differentiates the prefix exactly as without the MLP)."""

    def __init__(self, hidden: int):
        if hidden <= 0:
            raise ValueError(f"--prefix-hidden must be > 0, got {hidden}")
        self.hidden = hidden

    def init(self, length: int, token_dim: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Seeded tensors as PEFT's PrefixEncoder draws them: tokens N(0, 1) (nn.Embedding), each linear layer
        uniform in +-1/sqrt(fan_in) (nn.Linear)."""
        def uniform(shape, fan_in):
            return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)

        return {TOKENS: torch.randn(length, token_dim, generator=generator),
                HIDDEN_W: uniform((self.hidden, token_dim), token_dim), HIDDEN_B: uniform((self.hidden,), token_dim),
                OUT_W: uniform((width, self.hidden), self.hidden), OUT_B: uniform((width,), self.hidden)}

    def forward(self, trainable: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {k: v for k, v in trainable.items() if not k.startswith(PREFIX)}  # the head's tensors themselves
        with torch.no_grad():
            params["prompt"] = prefix(trainable).requires_grad_(True)
        return params

    def backward(self, params: dict[str, Tensor], trainable: dict[str, Tensor]) -> None:
        gradient = params["prompt"].grad
        if gradient is not None:
            prefix(trainable).backward(gradient)  # d loss / d MLP = J^T d loss / d prefix
