"""Encoding: a template around each text, tokenization, truncation of the text only, the text mask, batches.

Plain functions of the tokenizer and the settings they need (template, head, model kind, max length), so that
PromptModel holds no tokenization logic of its own. The template decides where the answer is read:
    masked LM verbalizer   at the mask token the template places ({mask})
    causal LM verbalizer   at the last token, the template cut before {mask} (the answer is the next token)
    classifier, seq2seq    at the last token, {mask} dropped (the decoder or the head writes the answer)
The text mask marks the tokens of the input text, the only ones a perturbation may touch (never the template's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ptp_core.data import Split, batch_indices

@dataclass
class Batch:
    input_ids: Tensor  # (B, T) right-padded
    attention_mask: Tensor  # (B, T)
    text_mask: Tensor  # (B, T) bool: tokens of the input text, the only ones a perturbation may touch
    answer_index: Tensor  # (B,) position, in the unprompted sequence, where the verbalizer reads
    labels: Tensor  # (B,)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.text_mask,
                                               self.answer_index, self.labels)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def render(tokenizer, text: str, template: str, head: str, kind: str) -> tuple[str, int]:
    """Apply the template; return the string and the character offset where the text starts."""
    if head == "classifier" or kind == "seq2seq":  # seq2seq: the decoder writes the answer
        template = template.replace("{mask}", "").rstrip()
    elif kind == "causal":
        template = template.split("{mask}")[0].rstrip()  # the answer is the next token
    else:
        template = template.replace("{mask}", tokenizer.mask_token)
    prefix = template.split("{text}")[0]
    return template.replace("{text}", text, 1), len(prefix)


def _tokenize(tokenizer, text: str, template: str, head: str, kind: str,
              max_length: int) -> tuple[list[int], list[bool], int]:
    """Token ids, text mask and answer position of one example, the text (never the template) cut to fit."""
    for _ in range(3):  # truncate the text (never the template) until the sequence fits
        rendered, start = render(tokenizer, text, template, head, kind)
        end = start + len(text)
        encoded = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        text_mask = [s >= start and e <= end and e > s for s, e in offsets]
        excess = len(ids) - max_length
        if excess <= 0:
            break
        text_positions = [i for i, m in enumerate(text_mask) if m]
        keep = max(1, len(text_positions) - excess)
        text = text[:offsets[text_positions[keep - 1]][1] - start]
    if head == "verbalizer" and kind == "masked":
        answer = max(i for i, t in enumerate(ids) if t == tokenizer.mask_token_id and not text_mask[i])
    else:
        answer = len(ids) - 1  # causal verbalizer and decoder classifiers read the last real token
    return ids, text_mask, answer


def encode(tokenizer, texts: list[str], labels: list[int] | None = None, *, template: str, head: str, kind: str,
           max_length: int) -> Batch:
    """Tokenize, apply the template and right-pad to the longest example; a Batch on the CPU."""
    encoded = [_tokenize(tokenizer, t, template, head, kind, max_length) for t in texts]
    width = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    text_mask = torch.zeros((len(encoded), width), dtype=torch.bool)  # (B, T)
    for i, (ids, mask, _) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        text_mask[i, :len(ids)] = torch.tensor(mask)
    answer = torch.tensor([a for _, _, a in encoded])  # (B,)
    label_tensor = torch.tensor(labels if labels is not None else [-100] * len(encoded))  # (B,)
    return Batch(input_ids, attention, text_mask, answer, label_tensor)


def label_word_ids(tokenizer, label_words: list[str], kind: str) -> Tensor:
    """(C,) the first token of each label word, as the model would generate or fill it in."""
    ids = []
    for word in label_words:
        text = word if kind == "masked" else " " + word  # generated words follow a space
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        if not tokens:
            raise ValueError(f"label word {word!r} tokenizes to nothing")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {label_words} share their first token; choose distinct words")
    return torch.tensor(ids)


def check_length(prompt_length: int, text_length: int, max_positions: int | None, model_name: str) -> None:
    """Refuse a prompt plus text longer than the model's positions (None: relative positions, no limit)."""
    if max_positions is not None and prompt_length + text_length > max_positions:
        raise ValueError(f"{prompt_length} virtual tokens plus {text_length} text tokens exceed the "
                         f"{max_positions} positions of {model_name}; lower --prompt-len or --max-length")


def batch_split(model, split: Split, batch_size: int, by_length: bool = False) -> tuple[list[Batch], list[list[int]]]:
    """Batches of `split` (model: anything with .encode) and, per batch, the stored index of each example.

    by_length=False keeps the stored order; True sorts by token count (ties by index), so a batch pads little.
    """
    if by_length:
        lengths = model.encode(split.texts).attention_mask.sum(1).tolist()  # (N,) tokens per example
        ranked = sorted(range(len(split)), key=lambda i: (lengths[i], i))
        order = [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
    else:
        order = batch_indices(len(split), batch_size)
    batches = [model.encode([split.texts[i] for i in rows], [split.labels[i] for i in rows]) for rows in order]
    return batches, order
