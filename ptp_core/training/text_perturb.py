"""Text-space perturbations: masking a fraction of the text tokens (PTP-RN) and HotFlip substitutions (PTP-ADV).

Both return a new Batch whose ids differ only on the text tokens (Batch.text_mask): never the template's, a special
token or padding.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ptp_core.model.encoding import Batch
from ptp_core.model.prompt_model import PromptModel
from ptp_core.training.noise import draw

REPLACEMENTS = ("mask", "unk", "pad")  # the token a masked text token becomes (falls back when the model lacks it)


def replacement_id(tokenizer, preferred: str) -> int:
    """The id that masks a token: the preferred special token, else mask, unk, pad in that order."""
    for name in (preferred, *REPLACEMENTS):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has no mask, unk or pad token to mask text with; use --target input")


def perturbable(model: PromptModel, batch: Batch) -> Tensor:
    """(B, T) bool: text tokens that are not special tokens; template and label words are never in the text."""
    special = torch.tensor(sorted(model.tokenizer.all_special_ids), device=batch.input_ids.device)
    return batch.text_mask & ~torch.isin(batch.input_ids, special)


def with_ids(batch: Batch, input_ids: Tensor) -> Batch:
    return replace(batch, input_ids=input_ids)


def mask_text(model: PromptModel, batch: Batch, rate: float, replacement: str, generator: torch.Generator) -> Batch:
    """A new Batch with each perturbable token replaced by the mask token with probability `rate`."""
    uniform = draw(torch.rand, tuple(batch.input_ids.shape), generator, torch.empty(0))  # (B, T) on the CPU
    chosen = (uniform < rate).to(batch.input_ids.device)
    chosen &= perturbable(model, batch)
    return with_ids(batch, batch.input_ids.masked_fill(chosen, replacement_id(model.tokenizer, replacement)))


def hotflip(model: PromptModel, batch: Batch, gradient: Tensor, swaps: int, chunk: int = 256) -> Batch:
    """A new Batch with up to `swaps` substitutions per input maximizing the first-order loss increase.

    gradient: (B, T, D) dCE/d(input embeddings). Gain of putting token v at position t is
    grad_t . (E_v - E_{x_t}) (Ebrahimi et al. 2018); only positive gains are taken, one per position.
    """
    table = model.backbone.get_input_embeddings().weight.detach()  # (V, D)
    table = table[:min(table.shape[0], len(model.tokenizer))]
    allowed = perturbable(model, batch)  # (B, T)
    rows, cols = allowed.nonzero(as_tuple=True)
    best_gain = torch.full(batch.input_ids.shape, -math.inf, device=gradient.device)  # (B, T)
    best_token = batch.input_ids.clone()
    special = torch.tensor(sorted(model.tokenizer.all_special_ids), device=gradient.device)
    special = special[special < table.shape[0]]
    for start in range(0, len(rows), chunk):  # (N, V) gains, a chunk of positions at a time
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        g = gradient[r, c].to(table.dtype)  # (N, D)
        gain = (g @ table.T).float() - (g * table[batch.input_ids[r, c]]).sum(-1, keepdim=True).float()  # (N, V)
        gain[:, special] = -math.inf
        gain[torch.arange(len(r), device=gain.device), batch.input_ids[r, c]] = -math.inf
        value, token = gain.max(-1)
        best_gain[r, c], best_token[r, c] = value, token
    k = min(swaps, batch.input_ids.shape[1])
    top_gain, top_pos = best_gain.topk(k, dim=1)  # (B, k)
    take = top_gain > 0
    ids = batch.input_ids.clone()
    b = torch.arange(batch.rows, device=ids.device).unsqueeze(1).expand_as(top_pos)  # (B, k)
    ids[b[take], top_pos[take]] = best_token[b[take], top_pos[take]]
    return with_ids(batch, ids)
