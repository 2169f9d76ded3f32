"""Loss and accuracy at many grid points in one forward: stacked prompts folded into the batch, cut into chunks
that fit memory, halved and retried on a CUDA out-of-memory error."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from landscape.grid.directions import Directions
from ptp_core.model.encoding import Batch, share_token_scale, target_counts
from ptp_core.model.prompt_model import PromptModel
from ptp_core.tasks.task import Split

CPU_TOKENS_PER_FORWARD = 1 << 15  # CPU FLOP/s stops growing well below this (bench/grid.py); bounds a chunk's time
CPU_MEMORY_FRACTION = 0.25  # of available RAM for activations: other processes share the machine
CUDA_MEMORY_FRACTION = 0.6  # of free GPU memory; an out-of-memory error still halves and retries


def subset_hash(subset: Split) -> str:
    """16 hex digits naming the evaluation examples (texts and labels), recorded with every surface."""
    digest = hashlib.sha256(json.dumps([subset.texts, subset.labels]).encode())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def evaluate_points(model: PromptModel, batches: Sequence[Batch], order: Sequence[Sequence[int]],
                    alphas: Tensor, betas: Tensor, plane: Directions | None = None,
                    params: dict[str, Tensor] | None = None, input_pairs: Sequence[tuple[Tensor, Tensor]] | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy (G,) at G points (alphas, betas (G,)) in one forward per batch.

    Prompt space: pass the `plane` of directions. Input space: pass `params` (fixed) and `input_pairs`,
    the per-batch (d1, d2) (B, T, D) of input_directions. --head lm: the batches share one token scale (as
    batch_split's do), so the mean over examples is the mean over every target token of them.
    """
    batches = share_token_scale(list(batches))
    count = sum(len(rows) for rows in order)
    losses = np.zeros((len(alphas), count))  # (G, N) in stored order, so the mean is batching-independent
    correct = np.zeros((len(alphas), count))
    stacked = plane.at(alphas, betas) if plane is not None else params
    for k, (batch, rows) in enumerate(zip(batches, order)):
        delta = None
        if input_pairs is not None:
            d1, d2 = input_pairs[k]
            shape = (-1, 1, 1, 1)
            delta = alphas.to(d1).reshape(shape) * d1 + betas.to(d1).reshape(shape) * d2  # (G, B, T, D)
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, hit = model.scores(stacked, batch, input_perturbation=delta)  # (G, B) each, CE in float32
        losses[:, rows] = loss.double().cpu().numpy()
        correct[:, rows] = hit.double().cpu().numpy()
    return losses.mean(axis=1), correct.mean(axis=1)


def auto_chunk(model: PromptModel, batches: Sequence[Batch], points: int, prompt_length: int) -> int:
    """Grid points per forward that fit memory (CUDA: free memory; CPU: available RAM, token cap)."""
    config = model.backbone.config
    hidden = model.embedding_dim
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    rows = max(b.rows for b in batches)
    tokens = max(b.input_ids.shape[1] for b in batches) + prompt_length  # the prompt being evaluated
    # live activations of one layer, x3 for temporaries: (B, L, inner + 4 H) and the (B, heads, L, L) scores
    per_point = 3 * 4 * rows * tokens * (inner + 4 * hidden + heads * tokens)
    if model.head == "lm":  # and the full-vocabulary logits (with their softmax) at every target token
        per_point += 3 * 4 * max(int(target_counts(b).sum()) for b in batches) * config.vocab_size
    if model.device.type == "cuda":  # free memory, plus what PyTorch's allocator holds cached but unused
        cached = torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
        budget = CUDA_MEMORY_FRACTION * (torch.cuda.mem_get_info(model.device)[0] + cached)
        limit = points
    else:
        budget = CPU_MEMORY_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit = max(1, CPU_TOKENS_PER_FORWARD // (rows * tokens))
    return int(max(1, min(points, limit, budget // per_point)))


@dataclass
class MemoryCap:
    """Grid points per forward that fit: halved on each CUDA out-of-memory error and kept for the rest of the
    surface, so later chunks do not fail at full size first. It splits a chunk, never moves chunk boundaries."""

    points: int


def evaluate_chunk(evaluate, alphas: Tensor, betas: Tensor, cap: MemoryCap | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """evaluate(alphas, betas) in pieces of at most cap.points; on CUDA out-of-memory, free, halve, retry."""
    cap = cap or MemoryCap(len(alphas))
    while True:
        try:
            parts = [evaluate(alphas[s:s + cap.points], betas[s:s + cap.points])
                     for s in range(0, len(alphas), cap.points)]
            return tuple(np.concatenate(pair) for pair in zip(*parts))
        except torch.cuda.OutOfMemoryError as error:
            if cap.points == 1:
                raise ValueError("one grid point does not fit in GPU memory; lower --examples or --batch-size") \
                    from error
        # outside the except block: the failed forward's tensors (held by the traceback) are gone now
        torch.cuda.empty_cache()
        cap.points = max(1, cap.points // 2)
