"""Encoding: examples -> padded batches (rows from ptp_core.model.templates), label-word ids, length checks, batching.

Plain functions of the tokenizer and the settings they need (template, head, model kind, max length), so that
PromptModel holds no tokenization logic of its own. An example is a string (the single field `text`) or a dict
of named fields; a multiple-choice example also holds "choices", K candidate texts, folded into the rows.
The template decides where the answer is read:
    masked LM verbalizer   at the mask token the template places ({mask})
    causal LM verbalizer   at the last token, the template cut before {mask} (the answer is the next token;
                           a template with a field after {mask} is refused: put {mask} last)
    classifier, seq2seq    at the last token, {mask} dropped (the decoder or the head writes the answer)
The classifier head encodes named fields as the tokenizer encodes a pair, tokenizer(first field, the others joined
by the model's separator): the model's own separators and, for the BERT family, segment ids. The text mask marks the
tokens of the fields (and candidates), the only ones a perturbation may touch, never the template's or the special
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields

import torch
from torch import Tensor

from ptp_core.model.templates import IGNORE, Row, example_rows, lm_row, spaced_before, word_tokens
from ptp_core.tasks.task import CHOICES, TARGET, Split, batch_indices


@dataclass
class Batch:
    input_ids: Tensor  # (R, T) right-padded; R = B rows, or B*K for K candidates per example
    attention_mask: Tensor  # (R, T)
    text_mask: Tensor  # (R, T) bool: tokens of the input text, the only ones a perturbation may touch
    answer_index: Tensor  # (R,) position, in the unprompted sequence, where the verbalizer reads
    labels: Tensor  # (B,) one per example: the class, or the index of the right candidate
    token_type_ids: Tensor | None = None  # (R, T) segment ids of a tokenizer pair (BERT family); None otherwise
    choices: int = 0  # K candidates per example folded into the rows; 0: classification
    target_ids: Tensor | None = None  # multiple choice with an LM: (R, T) the candidate token each position
    #                                   predicts, IGNORE elsewhere; seq2seq: (R, Tc) the candidate's tokens;
    #                                   --head lm: the target's tokens, the same two layouts
    ranked: int = 0  # --head lm on a classification task: C rows per example, one per label's target (rank
    #                  classification); the example's own is row b*C + label. 0: one row per example
    token_scale: float | None = None  # --head lm: target tokens per example over the whole evaluated set, so that
    #                                   the mean of per-example losses is the token mean; None: this batch's own

    def to(self, device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclass_fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def __len__(self) -> int:
        return self.labels.shape[0]  # examples, not rows

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def encode(tokenizer, texts: list, labels: list[int] | None = None, *, template: str, head: str, kind: str,
           max_length: int) -> Batch:
    """Tokenize, apply the template and right-pad to the longest row; a Batch on the CPU.

    texts: examples (strings or dicts of named fields); with "choices", every example must have the same K.
    """
    per_example = [example_rows(tokenizer, t, template, head, kind, max_length) for t in texts]
    counts = {len(rows) for rows, t in zip(per_example, texts) if isinstance(t, dict) and CHOICES in t}
    if len(counts) > 1:
        raise ValueError(f"multiple-choice examples of one batch need the same number of candidates, got {sorted(counts)}")
    return _batch(tokenizer, [row for example in per_example for row in example], labels, len(texts), kind,
                  counts.pop() if counts else 0)


def encode_targets(tokenizer, texts: list, labels: list[int] | None = None, *, template: str, kind: str,
                   max_length: int, label_words: list[str] = (), rank: bool = False) -> Batch:
    """A --head lm batch. A generation example's target is its TARGET text; a classification example's is the label
    word (the label name unless --label-words) of its label, or with rank=True one row per label word (rank
    classification: the label whose target has the lowest loss)."""
    rows, ranked = [], len(label_words) if rank else 0
    for i, example in enumerate(texts):
        if isinstance(example, dict) and TARGET in example:
            targets = [str(example[TARGET])]
            ranked = 0
        elif rank:
            targets = list(label_words)
        elif labels is None or not 0 <= labels[i] < len(label_words):
            raise ValueError(f"example {i} has no target text and no label to write as one")
        else:
            targets = [label_words[labels[i]]]
        rows.extend(lm_row(tokenizer, example, target, template, kind, max_length) for target in targets)
    batch = _batch(tokenizer, rows, labels, len(texts), kind, 0)
    return replace(batch, ranked=ranked)


def _batch(tokenizer, rows: list[Row], labels: list[int] | None, examples: int, kind: str, choices: int) -> Batch:
    """Rows right-padded to the longest into a Batch on the CPU."""
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (R, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    text_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (R, T)
    for i, row in enumerate(rows):
        input_ids[i, :len(row.ids)] = torch.tensor(row.ids)
        attention[i, :len(row.ids)] = 1
        text_mask[i, :len(row.ids)] = torch.tensor(row.text_mask)
    answer = torch.tensor([row.answer for row in rows])  # (R,)
    label_tensor = torch.tensor(labels if labels is not None else [IGNORE] * examples)  # (B,)
    segments = _padded([row.segments for row in rows], width, 0) if rows[0].segments is not None else None
    targets = None
    if rows[0].targets is not None:
        target_width = width if kind != "seq2seq" else max(len(row.targets) for row in rows)
        targets = _padded([row.targets for row in rows], target_width, IGNORE)  # (R, T) or (R, Tc)
    return Batch(input_ids, attention, text_mask, answer, label_tensor, segments, choices, targets)


def _padded(sequences: list[list[int]], width: int, fill: int) -> Tensor:
    out = torch.full((len(sequences), width), fill, dtype=torch.long)  # (R, width)
    for i, values in enumerate(sequences):
        out[i, :len(values)] = torch.tensor(values, dtype=torch.long)
    return out


def label_word_ids(tokenizer, label_words: list[str], kind: str, template: str = "{text} {mask}") -> Tensor:
    """(C,) the token of each label word as it stands in the text at the answer.

    After a space where the template puts one before {mask} ("ĠYes" for RoBERTa and GPT-2, as PET and LM-BFF
    score it), the bare word where it does not; seq2seq decoders write it as a word after a space. A word of several
    tokens is refused: the verbalizer scores one token.
    """
    spaced = spaced_before(template, "mask")
    ids = []
    for word in label_words:
        tokens = (tokenizer(" " + word, add_special_tokens=False).input_ids if kind == "seq2seq"
                  else word_tokens(tokenizer, word, spaced))
        if not tokens:
            raise ValueError(f"label word {word!r} tokenizes to nothing")
        if len(tokens) > 1:
            raise ValueError(f"label word {word!r} is {len(tokens)} tokens {tokenizer.convert_ids_to_tokens(tokens)} "
                             "for this tokenizer, but the verbalizer scores one token; choose a one-token word "
                             "(--label-words) or score whole words as multiple choice")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {label_words} share their token; choose distinct words")
    return torch.tensor(ids)


def check_length(prompt_length: int, text_length: int, max_positions: int | None, model_name: str) -> None:
    """Refuse a prompt plus text longer than the model's positions (None: relative positions, no limit)."""
    if max_positions is not None and prompt_length + text_length > max_positions:
        raise ValueError(f"{prompt_length} virtual tokens plus {text_length} text tokens exceed the "
                         f"{max_positions} positions of {model_name}; lower --prompt-len or --max-length")


def batch_split(model, split: Split, batch_size: int, by_length: bool = False, rank: bool = False
                ) -> tuple[list[Batch], list[list[int]]]:
    """Batches of `split` (model: anything with .encode) and, per batch, the stored index of each example.

    by_length=False keeps the stored order; True sorts by token count (ties by index), so a batch pads little.
    --head lm: every batch carries the split's target tokens per example (token_scale), so that the mean of the
    per-example losses over the split is the mean over all its target tokens, however it is batched; rank=True
    adds a row per label word for rank classification (a classification task).
    """
    if by_length:
        encoded = model.encode(split.texts, split.labels)  # --head lm writes a classification label as text
        lengths = encoded.attention_mask.sum(1).reshape(len(split), -1).amax(1).tolist()  # (N,) longest row each
        ranked = sorted(range(len(split)), key=lambda i: (lengths[i], i))
        order = [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
    else:
        order = batch_indices(len(split), batch_size)
    encode = (lambda texts, labels: model.encode(texts, labels, rank=True)) if rank else model.encode
    batches = [encode([split.texts[i] for i in rows], [split.labels[i] for i in rows]) for rows in order]
    return share_token_scale(batches), order


def target_counts(batch: Batch) -> Tensor:
    """(B,) the target tokens of each example's own row (--head lm)."""
    counts = (batch.target_ids != IGNORE).sum(-1)  # (R,)
    if batch.ranked:
        counts = counts.reshape(len(batch), batch.ranked).gather(1, batch.labels.unsqueeze(1)).squeeze(1)
    return counts


def share_token_scale(batches: list[Batch]) -> list[Batch]:
    """--head lm batches that together are one evaluated set: each gets that set's target tokens per example as its
    token_scale (per-example token sums / scale then average to the token mean over the set). Others: unchanged."""
    if not batches or batches[0].target_ids is None or batches[0].choices:
        return batches
    tokens = sum(int(target_counts(b).sum()) for b in batches)
    examples = sum(len(b) for b in batches)
    return [replace(b, token_scale=tokens / examples) for b in batches]
