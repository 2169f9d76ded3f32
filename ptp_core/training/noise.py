"""Random draws of the perturbations: from one torch.Generator, or example by example.

Drawn from one generator, an example's noise depends on the batch it lands in (its row, the padded length).
ExampleNoise gives every example its own stream over its own attended tokens, so its noise is the same in any
micro-batch, padding or process: gradient accumulation of 2 x 4 examples, 2 processes x 4 and one batch of 8 then
train on the same perturbations.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a key, e.g. (seed, step, example): one independent stream per distinct key."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class ExampleNoise:
    """One generator per example and each example's attended positions: draws (B, T, ...) example by example."""

    def __init__(self, generators: list[torch.Generator], attention_mask: Tensor):
        if len(generators) != attention_mask.shape[0]:
            raise ValueError(f"{len(generators)} generators for {attention_mask.shape[0]} examples")
        self.generators = generators
        self.attended = attention_mask.bool().cpu()  # (B, T)

    def draw(self, sample: Callable[..., Tensor], shape: tuple[int, ...]) -> Tensor:
        """sample(shape) with example i's values, row k of its own draw, at its k-th attended position; 0 elsewhere."""
        if tuple(shape[:2]) != tuple(self.attended.shape):
            raise ValueError(f"per-example noise draws (B, T, ...) = {tuple(self.attended.shape)} + ..., not "
                             f"{tuple(shape)}; draw a prompt perturbation from one torch.Generator")
        out = torch.zeros(shape)
        for row, (generator, attended) in enumerate(zip(self.generators, self.attended)):
            out[row, attended] = sample((int(attended.sum()), *shape[2:]), generator=generator)  # (L_i, ...)
        return out


def example_noise(seed: int, step: int, keys: list, attention_mask: Tensor) -> ExampleNoise:
    """ExampleNoise for optimizer step `step` (1-based): example i's stream seeded from (seed, step, keys[i])."""
    return ExampleNoise([keyed_generator(seed, step, key) for key in keys], attention_mask)


def draw(sample: Callable[..., Tensor], shape: tuple[int, ...], generator: torch.Generator | ExampleNoise,
         like: Tensor) -> Tensor:
    """sample(shape) (torch.randn or torch.rand) from a generator or per example, on like's device and dtype."""
    if isinstance(generator, ExampleNoise):
        return generator.draw(sample, shape).to(like.device, like.dtype)
    return sample(shape, generator=generator).to(like.device, like.dtype)
