"""A Trainer's tokenized inputs as our Batch: class-index batches (classifier, verbalizer) and the token-label batches
of PEFT's prompt-tuning guides (--head lm), with the text mask that PTP's perturbations may touch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptp_core.model.encoding import Batch
from ptp_core.model.prompt_model import PromptModel
from ptp_core.model.templates import IGNORE
from ptp_core.tasks.task import NO_LABEL


def batch_from_inputs(model: PromptModel, inputs: dict[str, Tensor], token_scale: float | None = None) -> Batch:
    """Our Batch from a Trainer's tokenized inputs (input_ids, attention_mask, token_type_ids, labels (B,); --head lm:
    labels (B, T) or (B, Tc), lm_batch_from_inputs, whose token_scale this passes on).

    The text mask (what input and text perturbations touch) is every attended non-special token: a template
    baked into the user's tokenization is text here. The verbalizer reads at the mask token (masked LM) or at the
    last attended token (causal LM), as PromptModel.encode places it.
    """
    if model.head == "lm":
        return lm_batch_from_inputs(model, inputs, token_scale)
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    if labels.dim() != 1:
        raise ValueError(f"the {model.head} head needs one class index per example (labels of shape (B,)), got "
                         f"labels of shape {tuple(labels.shape)}; drop label_words to train on token labels "
                         "(--head lm, PEFT's labels loss)")
    attention, text_mask, positions = _attended_text(model, inputs)
    if model.head == "verbalizer" and model.kind == "masked":
        is_mask = input_ids == model.tokenizer.mask_token_id  # (B, T)
        if not is_mask.any(1).all():
            raise ValueError("a masked-LM verbalizer reads the mask token, but some inputs have none; put "
                             f"{model.tokenizer.mask_token} in every input")
        answer = is_mask.int().argmax(1)  # (B,) the first mask
    else:
        answer = (attention * positions).amax(1)  # (B,) the last attended token
    return Batch(input_ids, attention, text_mask, answer, labels, inputs.get("token_type_ids"))


def lm_batch_from_inputs(model: PromptModel, inputs: dict[str, Tensor], token_scale: float | None = None) -> Batch:
    """Our --head lm Batch from the inputs of PEFT's prompt-tuning guides, whose loss is HF's `labels` loss.

    Causal LM: input_ids hold the input and then the target, labels (B, T) the target's tokens and -100 elsewhere;
    HF scores labels[:, t + 1] at position t, so target_ids (the token each position predicts) are labels shifted by
    one. Seq2seq: input_ids are the encoder's input and labels (B, Tc) the decoder's targets, which HF's forward
    shifts right into the decoder's input (-100 as pad), as PromptModel's lm loss does. Padding: a shallow prompt
    sees the rows exactly as PEFT's forward does, virtual tokens first, positions 0..P+T-1 (left padding moves a
    row's positions, there as here); a deep prompt reads each row as alone (positions from its first real token,
    as PEFT's generate), which is PEFT's padded forward on right padding and PEFT's loss of each example alone on
    left padding.
    The text mask: attended, non-special tokens that are not scored, so that perturbations touch the input and
    never a target token (nor a virtual token, which is not in input_ids). token_scale: target tokens per example
    (None: this batch's own, which makes the mean loss PEFT's loss on the batch).
    """
    input_ids, labels = inputs["input_ids"], inputs.get("labels")
    if labels is None or labels.dim() != 2 or labels.shape[0] != input_ids.shape[0]:
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(f"--head lm reads token labels (B, T) with -100 on unscored tokens, as PEFT's guides build "
                         f"them, got labels of shape {shape}; for class indices pass label_words (verbalizer)")
    attention, text_mask, positions = _attended_text(model, inputs)
    if model.kind == "seq2seq":
        given = [key for key in ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds")
                 if inputs.get(key) is not None]
        if given:
            raise ValueError(f"PTPTrainer builds the decoder's input from labels, as HF's forward does; drop "
                             f"{', '.join(given)} from the batch")
        targets = labels  # (B, Tc)
        answer = (attention * positions).amax(1)  # (B,) the last attended input token
    else:
        if labels.shape != input_ids.shape:
            raise ValueError(f"a causal LM's labels must align with input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape)}; give the input and target in input_ids, labels -100 on the input")
        if (labels[:, 0] != IGNORE).any():
            raise ValueError("labels score the first token of a row, which no input token predicts (PEFT's shallow "
                             "prompt has its last virtual token predict it); start every row with input tokens, "
                             "labels -100 there")
        scored = labels != IGNORE  # (B, T)
        text_mask &= ~scored
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # (B, T): HF's shift
        first = torch.where(scored, positions, input_ids.shape[1]).amin(1)  # (B,) the first target token
        answer = torch.where(first < input_ids.shape[1], first - 1, (attention * positions).amax(1))  # (B,)
    if not (targets != IGNORE).any():
        raise ValueError("labels score no token in this batch (all -100); give every example its target tokens")
    examples = torch.full((input_ids.shape[0],), NO_LABEL, dtype=torch.long, device=input_ids.device)  # (B,)
    return Batch(input_ids, attention, text_mask, answer, examples, inputs.get("token_type_ids"), 0, targets,
                 token_scale=token_scale)


def _attended_text(model: PromptModel, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The attention mask (all ones when the batch has none), the attended non-special tokens (B, T) and the
    positions (T,)."""
    input_ids = inputs["input_ids"]
    attention = inputs.get("attention_mask")
    attention = torch.ones_like(input_ids) if attention is None else attention
    special = torch.tensor(sorted(model.tokenizer.all_special_ids), device=input_ids.device)
    text_mask = attention.bool() & ~torch.isin(input_ids, special)  # (B, T)
    return attention, text_mask, torch.arange(input_ids.shape[1], device=input_ids.device)
