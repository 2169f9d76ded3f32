"""One example -> token rows: the template filled in, the text cut to fit, the text mask, where the answer is read.

An example is a string (the single field `text`) or a dict of named fields; a multiple-choice example also holds
"choices", its K candidate texts, and gives one row per candidate. Truncation cuts the fields (never the template,
the question word or a candidate): the longest field first, one token at a time, as HF's `longest_first`.
The classifier head encodes fields as a tokenizer pair, tokenizer(first field, the other fields joined): the
model's own separator, and segment ids 1 on the second segment for the BERT family.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptp_core.data import CHOICES, SLOT

IGNORE = -100  # a target position that is not scored
TRUNCATION_ROUNDS = 4  # re-tokenizing in context can shift a token boundary: cut again until the row fits


@dataclass
class Row:
    ids: list[int]
    text_mask: list[bool]  # tokens of the fields and candidates
    answer: int  # where a verbalizer (or a decoder classifier) reads
    segments: list[int] | None = None  # token_type_ids of a tokenizer pair
    targets: list[int] | None = None  # multiple choice with an LM: the candidate token each position predicts


def field_values(example: dict) -> dict[str, str]:
    """The named text fields of an example, in their stored order (candidates excluded)."""
    return {k: str(v) for k, v in example.items() if k != CHOICES}


def template_slots(template: str) -> list[str]:
    return SLOT.findall(template)


def _answer(tokenizer, ids: list[int], text_mask: list[bool], head: str, kind: str) -> int:
    if head == "verbalizer" and kind == "masked":
        return max(i for i, t in enumerate(ids) if t == tokenizer.mask_token_id and not text_mask[i])
    return len(ids) - 1  # causal verbalizer and decoder classifiers read the last real token


# ---- named fields: a tokenizer pair for the classifier --------------------------------------------------

def pair_row(tokenizer, first: str, second: str | None, max_length: int) -> Row:
    """tokenizer(first, second) as HF encodes a pair (longest_first truncation); the text mask spares the
    special tokens; segment ids when the tokenizer makes them (BERT family)."""
    encoded = tokenizer(first, second, truncation="longest_first" if second is not None else True,
                        max_length=max_length, return_special_tokens_mask=True)
    ids = encoded["input_ids"]
    text_mask = [not special for special in encoded["special_tokens_mask"]]
    return Row(ids, text_mask, len(ids) - 1, encoded.get("token_type_ids"))


# ---- named fields: a template that names them ------------------------------------------------------------

def fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """The template with every {name} replaced by values[name]; the character span of each value."""
    unknown = [name for name in template_slots(template) if name not in values]
    if unknown:
        raise ValueError(f"template {template!r} names {{{unknown[0]}}}, which the example does not have; "
                         f"its fields are {', '.join(sorted(values))}")
    parts, spans, at, position = [], {}, 0, 0
    for match in SLOT.finditer(template):
        parts.append(template[at:match.start()])
        position += match.start() - at
        value = values[match[1]]
        spans[match[1]] = (position, position + len(value))
        parts.append(value)
        position += len(value)
        at = match.end()
    parts.append(template[at:])
    return "".join(parts), spans


def adapt_template(template: str, head: str, kind: str, multiple_choice: bool) -> str:
    """Where the answer goes for this head and model kind (see the module docstring); with candidates, {choice}
    is what the LM scores: kept (appended when missing) for causal LMs, the mask for masked LMs, gone for
    seq2seq (its decoder writes the candidate)."""
    if multiple_choice:
        template = template.replace("{mask}", "").rstrip()
        if "{choice}" not in template and kind != "seq2seq":
            template += " {choice}"
        return template.replace("{choice}", "").rstrip() if kind == "seq2seq" else template
    if head == "classifier" or kind == "seq2seq":
        return template.replace("{mask}", "").rstrip()
    if kind == "causal":
        return template.split("{mask}")[0].rstrip()
    return template


def _token_spans(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    start, end = span
    return [i for i, (s, e) in enumerate(offsets) if s >= start and e <= end and e > s]


def _longest_first(counts: dict[str, int], excess: int) -> dict[str, int]:
    """Tokens to keep per field after removing `excess`, one at a time from the currently longest field."""
    keep = dict(counts)
    for _ in range(excess):
        longest = max(keep, key=lambda name: (keep[name], -list(keep).index(name)))
        if keep[longest] <= 1:
            break
        keep[longest] -= 1
    return keep


def template_row(tokenizer, values: dict[str, str], template: str, head: str, kind: str, max_length: int,
                 fixed: dict[str, str] | None = None) -> tuple[Row, list, dict]:
    """The filled template tokenized, the fields in `values` cut longest first until it fits; `fixed` slots
    (mask, choice) are never cut. Returns the row, the offsets and the token positions of each slot."""
    values, fixed = dict(values), dict(fixed or {})
    for _ in range(TRUNCATION_ROUNDS):
        text, spans = fill(template, {**values, **fixed})
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        positions = {name: _token_spans(offsets, span) for name, span in spans.items()}
        excess = len(ids) - max_length
        if excess <= 0:
            break
        keep = _longest_first({name: len(positions[name]) for name in values if positions.get(name)}, excess)
        for name, count in keep.items():
            if count < len(positions[name]):
                start = spans[name][0]
                values[name] = values[name][:offsets[positions[name][count - 1]][1] - start]
    text_slots = [*values, *(name for name, value in fixed.items() if value != tokenizer.mask_token)]
    text_positions = {i for name in text_slots for i in positions.get(name, ())}
    text_mask = [i in text_positions for i in range(len(ids))]
    return Row(ids, text_mask, len(ids) - 1), offsets, positions


# ---- a single text: the field `text` ----------------------------------------------------------------

def render(tokenizer, text: str, template: str, head: str, kind: str) -> tuple[str, int]:
    """The template filled with one text, as this head reads it; the string and where the text starts."""
    filled, spans = fill(adapt_template(template, head, kind, multiple_choice=False),
                         {"text": text, "mask": tokenizer.mask_token or ""})
    return filled, spans["text"][0]


# ---- one example -> its rows ------------------------------------------------------------------------------

def example_rows(tokenizer, example, template: str, head: str, kind: str, max_length: int) -> list[Row]:
    """One row, or K rows for an example with K candidates (label = the index of the right one)."""
    values = {"text": example} if isinstance(example, str) else field_values(example)
    if not values:
        raise ValueError(f"example {example!r} has no text field")
    pair = head == "classifier" and kind != "seq2seq" and not isinstance(example, str)
    if isinstance(example, str) or CHOICES not in example:
        if pair:
            first, *rest = values.values()
            return [pair_row(tokenizer, first, " ".join(rest) if rest else None, max_length)]
        filled = adapt_template(template, head, kind, multiple_choice=False)
        fixed = {"mask": tokenizer.mask_token} if "{mask}" in filled else {}
        row, _, _ = template_row(tokenizer, values, filled, head, kind, max_length, fixed)
        row.answer = _answer(tokenizer, row.ids, row.text_mask, head, kind)
        return [row]
    candidates = [str(c) for c in example[CHOICES]]
    if pair:
        context = " ".join(values.values())
        return [pair_row(tokenizer, context, candidate, max_length) for candidate in candidates]
    return [candidate_row(tokenizer, values, candidate, template, kind, max_length) for candidate in candidates]


def candidate_row(tokenizer, values: dict[str, str], candidate: str, template: str, kind: str,
                  max_length: int) -> Row:
    """A row an LM scores a candidate with: the sum of its tokens' log-probabilities (causal: each token given
    the ones before it; seq2seq: the decoder writing it; masked: the single token at the mask)."""
    filled = adapt_template(template, "verbalizer", kind, multiple_choice=True)
    if kind == "masked":
        tokens = tokenizer(candidate, add_special_tokens=False).input_ids
        if len(tokens) != 1:
            raise ValueError(f"a masked-LM verbalizer scores one token at the mask, but candidate {candidate!r} is "
                             f"{len(tokens)} tokens; use a causal or seq2seq LM, or --head classifier")
        row, _, positions = template_row(tokenizer, values, filled, "verbalizer", kind, max_length,
                                         {"choice": tokenizer.mask_token})
        row.answer = positions["choice"][0] if positions.get("choice") else row.answer
        row.targets = [IGNORE] * len(row.ids)
        row.targets[row.answer] = tokens[0]
        return row
    if kind == "seq2seq":
        row, _, _ = template_row(tokenizer, values, filled, "verbalizer", kind, max_length)
        row.targets = tokenizer(candidate, add_special_tokens=False).input_ids
        return row
    row, _, positions = template_row(tokenizer, values, filled, "verbalizer", kind, max_length,
                                     {"choice": candidate})
    scored = positions.get("choice") or []
    if not scored or scored[0] == 0:
        raise ValueError(f"candidate {candidate!r} left no token to score after the template {template!r}; "
                         "give the template text before {choice}")
    row.targets = [IGNORE] * len(row.ids)
    for position in scored:
        row.targets[position - 1] = row.ids[position]  # position - 1 predicts the candidate's token at position
    return row
