"""--head lm: the language-model loss over target tokens, rank classification and greedy generation.

The loss is HF's `labels` loss, which PEFT's CAUSAL_LM and SEQ_2_SEQ_LM prompt models return: cross-entropy over the
target tokens only (virtual tokens and input tokens are not scored), averaged over every target token of the batch.
Here each row's token cross-entropies are summed and divided by one token_scale (target tokens per example over the
whole evaluated set, ptp_core.model.encoding.share_token_scale), so that the mean of the per-example values is that
token mean however the set is batched, chunked or stacked; nothing averages batch means. The LM head runs only at the
positions that predict a target token (a causal LM), or at the decoder's target positions (seq2seq).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ptp_core.model.encoding import Batch, target_counts
from ptp_core.model.templates import IGNORE, adapt_template, field_values, template_row


def row_terms(model, params: dict[str, Tensor], batch: Batch, input_perturbation: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """Per row: the summed cross-entropy of its target tokens and how many of them the greedy choice gets right,
    each (R,), or (G, R) for stacked params or input perturbations; reduced in float32 whatever the forward's dtype."""
    prompt = params["prompt"]
    stacked = prompt.dim() == 3 or (input_perturbation is not None and input_perturbation.dim() == 4)
    full, attention, groups, length = model._inputs(prompt, batch, input_perturbation)
    targets = batch.target_ids.repeat(groups, 1)  # (G*R, T) causal, (G*R, Tc) seq2seq
    rows, positions = (targets != IGNORE).nonzero(as_tuple=True)  # (N,) each: the scored positions
    if model.kind == "seq2seq":
        start = torch.full((full.shape[0], 1), model.backbone.config.decoder_start_token_id, device=full.device)
        shifted = targets[:, :-1].masked_fill(targets[:, :-1] == IGNORE, model.backbone.config.pad_token_id or 0)
        out = model.backbone(inputs_embeds=full, attention_mask=attention,
                             decoder_input_ids=torch.cat([start, shifted], dim=1))  # teacher forcing, as HF's labels
        picked = out.logits[rows, positions]  # (N, V)
    else:
        hidden = model._encode(prompt, full, attention, **model._segments(batch, length, groups))
        states = hidden.last_hidden_state[rows, length + positions].unsqueeze(1)  # (N, 1, H)
        picked = model._head_logits({}, type(hidden)(last_hidden_state=states), every_word=True)  # (N, V)
    picked, tokens = picked.float(), targets[rows, positions]
    losses = F.cross_entropy(picked, tokens, reduction="none")  # (N,)
    hits = (picked.argmax(-1) == tokens).float()  # (N,)
    sums = [losses.new_zeros(targets.shape[0]).index_add(0, rows, v).reshape(groups, batch.rows)
            for v in (losses, hits)]  # (G, R) each
    return tuple(v if stacked else v.squeeze(0) for v in sums)


def per_example(model, values: Tensor, batch: Batch) -> Tensor:
    """Row sums (..., R) -> each example's own row (..., B) over the batch's token_scale (default: this batch's
    target tokens per example), so that the mean over examples is the mean over target tokens."""
    if batch.ranked:  # C rows per example: its own label's row
        index = batch.labels.reshape(*([1] * (values.dim() - 1)), -1, 1).expand(*values.shape[:-1], -1, 1)
        values = values.reshape(*values.shape[:-1], len(batch), batch.ranked).gather(-1, index).squeeze(-1)
    scale = batch.token_scale if batch.token_scale is not None else target_counts(batch).float().mean()
    return values / scale


def rank_scores(model, params: dict[str, Tensor], batch: Batch) -> Tensor:
    """(B, C) the summed log-likelihood of each label's target (rank classification predicts the largest): a batch
    encoded with rank=True."""
    if not batch.ranked:
        raise ValueError("rank classification needs a batch encoded with rank=True (a row per label word)")
    return -row_terms(model, params, batch)[0].reshape(len(batch), batch.ranked)


def _input_ids(model, example) -> list[int]:
    """The tokens of an example's input as --head lm reads it (the template cut at {mask}, truncated to fit)."""
    values = {"text": example} if isinstance(example, str) else field_values(example)
    filled = adapt_template(model.template, "lm", model.kind, multiple_choice=False)
    row, _, _ = template_row(model.tokenizer, values, filled, "lm", model.kind, model.max_length)
    return row.ids


def _padded(sequences: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)  # (B, T) right-padded
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _input_batch(sequences: list[list[int]], pad: int, device) -> Batch:
    """Token sequences right-padded into a Batch read at each row's last real token (nothing to score or perturb)."""
    ids, mask = _padded(sequences, pad, device)
    return Batch(ids, mask, torch.zeros_like(mask, dtype=torch.bool), mask.sum(1) - 1,
                 torch.zeros(len(sequences), dtype=torch.long, device=device))


@torch.inference_mode()
def generate(model, params: dict[str, Tensor], texts: list, max_new_tokens: int, batch_size: int = 16
             ) -> list[list[int]]:
    """Greedy decoding from the prompt model: each example's new tokens, the end-of-sequence token excluded.

    Every step reruns the whole forward (no key-value cache), so a shallow or deep prompt enters exactly as in the
    loss: the next token is the argmax of the LM head at the last real position. Stops at eos or max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    eos = model.tokenizer.eos_token_id
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (eos or 0)
    prompt = params["prompt"]
    out: list[list[int]] = []
    for begin in range(0, len(texts), batch_size):
        inputs = [_input_ids(model, t) for t in texts[begin:begin + batch_size]]
        new: list[list[int]] = [[] for _ in inputs]
        done = [False] * len(inputs)
        if model.kind == "seq2seq":  # the encoder reads the prompt and the input once
            full, attention, _, _ = model._inputs(prompt, _input_batch(inputs, pad, model.device), None)
            encoder = model.backbone.get_encoder()(inputs_embeds=full, attention_mask=attention)
        for _ in range(max_new_tokens):
            if model.kind == "seq2seq":
                start = model.backbone.config.decoder_start_token_id
                decoder, decoder_mask = _padded([[start] + n for n in new], pad, model.device)
                logits = model.backbone(encoder_outputs=encoder, attention_mask=attention,
                                        decoder_input_ids=decoder).logits  # (B, Td, V)
                step = logits[torch.arange(len(inputs)), decoder_mask.sum(1) - 1].argmax(-1)
            else:
                batch = _input_batch([i + n for i, n in zip(inputs, new)], pad, model.device)
                full, attention, _, length = model._inputs(prompt, batch, None)
                hidden = model._encode(prompt, full, attention)
                states = hidden.last_hidden_state[torch.arange(len(inputs)), length + batch.answer_index]
                logits = model._head_logits({}, type(hidden)(last_hidden_state=states.unsqueeze(1)), every_word=True)
                step = logits.argmax(-1)  # (B,)
            for i, token in enumerate(step.tolist()):
                if not done[i]:
                    done[i] = token == eos
                    if not done[i]:
                        new[i].append(token)
            if all(done):
                break
        out.extend(new)
    return out
