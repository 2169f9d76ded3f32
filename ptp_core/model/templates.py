"""One example -> token rows: the template filled in, the text cut to fit, the text mask, where the answer is read.

An example is a string (the single field `text`) or a dict of named fields; a multiple-choice example also holds
"choices", its K candidate texts, and gives one row per candidate. Truncation cuts the fields (never the template,
the question word or a candidate): the longest field first, one token at a time, as HF's `longest_first`, until the
row fits; a template that does not fit with one token per field is refused.
The classifier head encodes fields as a tokenizer pair, tokenizer(first field, the other fields joined by the
model's separator): the model's own separator between the segments, and segment ids 1 on the second segment for the
BERT family. A tokenizer whose pair adds nothing between the segments (GPT-2, Qwen2, SmolLM2) gets the separator
inserted there, so that the two texts never run together.
A causal LM reads the label word as the token after the text, so its template must end at {mask}: a field after
{mask} would be cut away, and is refused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ptp_core.tasks.task import CHOICES, SLOT, TARGET, check_causal_template

IGNORE = -100  # a target position that is not scored


@dataclass
class Row:
    ids: list[int]
    text_mask: list[bool]  # tokens of the fields and candidates
    answer: int  # where a verbalizer (or a decoder classifier) reads
    segments: list[int] | None = None  # token_type_ids of a tokenizer pair
    targets: list[int] | None = None  # multiple choice with an LM: the candidate token each position predicts


def field_values(example: dict) -> dict[str, str]:
    """The named text fields of an example, in their stored order (candidates and target excluded)."""
    return {k: str(v) for k, v in example.items() if k not in (CHOICES, TARGET)}


def template_slots(template: str) -> list[str]:
    return SLOT.findall(template)


def _answer(tokenizer, ids: list[int], text_mask: list[bool], head: str, kind: str) -> int:
    if head == "verbalizer" and kind == "masked":
        return max(i for i, t in enumerate(ids) if t == tokenizer.mask_token_id and not text_mask[i])
    return len(ids) - 1  # causal verbalizer and decoder classifiers read the last real token


def spaced_before(template: str, slot: str) -> bool:
    """True when the template puts a space before {slot} (or has no such slot: the word follows other text)."""
    marker = "{" + slot + "}"
    return marker not in template or template.split(marker)[0][-1:].isspace()


def word_tokens(tokenizer, word: str, spaced: bool) -> list[int]:
    """The tokens of `word` as they stand in a text: after a space ("Ġgreat" for RoBERTa and GPT-2, as PET and
    LM-BFF score it) when `spaced`, else bare. Read after a one-letter word, since a text that starts with a space
    may get a "▁" of its own (SentencePiece)."""
    if not spaced:
        return tokenizer(word, add_special_tokens=False).input_ids
    lead = tokenizer("a", add_special_tokens=False).input_ids
    in_context = tokenizer("a " + word, add_special_tokens=False).input_ids
    if in_context[:len(lead)] == lead:
        return in_context[len(lead):]
    return tokenizer(" " + word, add_special_tokens=False).input_ids


# ---- named fields: a tokenizer pair for the classifier --------------------------------------------------

def separator(tokenizer) -> str:
    """The model's own text between two segments: its separator token, else its end-of-sequence token, else a
    newline."""
    return tokenizer.sep_token or tokenizer.eos_token or "\n"


@functools.lru_cache(maxsize=16)  # one probe per tokenizer, not one per row
def glues_pairs(tokenizer) -> bool:
    """True when tokenizer(a, b) puts nothing between the two segments (GPT-2, Qwen2, SmolLM2: no pair template)."""
    sequence = tokenizer("a", "b").sequence_ids()
    return sequence.index(1) == len(sequence) - 1 - sequence[::-1].index(0) + 1


def pair_row(tokenizer, first: str, second: list[str], max_length: int) -> Row:
    """tokenizer(first, the parts of `second` joined by the model's separator) as HF encodes a pair (longest_first
    truncation), the separator inserted between the segments where the tokenizer puts nothing there; the text mask
    spares special tokens and separators; segment ids when the tokenizer makes them (BERT family)."""
    join = separator(tokenizer)
    second_text = join.join(second) if second else None
    inserted = tokenizer(join, add_special_tokens=False).input_ids if second and glues_pairs(tokenizer) else []
    encoded = tokenizer(first, second_text, truncation="longest_first" if second else True,
                        max_length=max_length - len(inserted), return_special_tokens_mask=True,
                        return_offsets_mapping=len(second) > 1)
    ids = list(encoded["input_ids"])
    text_mask = [not special for special in encoded["special_tokens_mask"]]
    sequence = encoded.sequence_ids() if inserted or len(second) > 1 else None
    if len(second) > 1:  # the separators joining the parts of the second segment are the model's, not text
        bounds, at = [], 0
        for part in second[:-1]:
            at += len(part)
            bounds.append((at, at + len(join)))
            at += len(join)
        for i, (s, e) in enumerate(encoded["offset_mapping"]):
            if sequence[i] == 1 and any(start <= s and e <= end for start, end in bounds):
                text_mask[i] = False
    segments = encoded.get("token_type_ids")
    if inserted:
        at = sequence.index(1) if 1 in sequence else len(sequence) - sequence[::-1].index(0)
        ids[at:at] = inserted  # (T + S,)
        text_mask[at:at] = [False] * len(inserted)
        if segments is not None:
            segments = segments[:at] + [segments[at - 1] if at else 0] * len(inserted) + segments[at:]
    return Row(ids, text_mask, len(ids) - 1, segments)


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
        check_causal_template(template)
        return template.split("{mask}")[0].rstrip()
    return template


def _token_spans(text: str, offsets: list[tuple[int, int]], special: list[int], span: tuple[int, int]) -> list[int]:
    """The tokens that carry the characters of text[span] (special: 1 for a special token, as HF's mask).

    Byte-level BPE (GPT-2, Qwen2) and SentencePiece put the space before a word inside its token's offsets ("Ġsun"
    starts at the space), WordPiece leaves it out: a token belongs when any of its non-space characters is the
    span's (so a token merged across the span's edge belongs too). A token of spaces alone belongs to the span it
    lies in, and a lone space token ("Ġ", "▁"; empty offsets where they are trimmed, as RoBERTa's) to the span it
    leads into.
    """
    start, end = span
    if end <= start:
        return []
    positions = []
    for i, (s, e) in enumerate(offsets):
        if special[i]:
            continue
        core = text[s:e]
        left, right = len(core) - len(core.lstrip()), len(core.rstrip())
        if right > left:
            if s + left < end and s + right > start:
                positions.append(i)
        elif start <= s < end and e <= end or e == start and core in ("", " "):  # inside, or the space leading in
            positions.append(i)
    return positions


def _longest_first(counts: dict[str, int], excess: int) -> dict[str, int]:
    """Tokens to keep per field after removing `excess`, one at a time from the currently longest field."""
    keep = dict(counts)
    for _ in range(excess if keep else 0):
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
    while True:  # re-tokenizing in context can shift a token boundary: cut again until the row fits
        text, spans = fill(template, {**values, **fixed})
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, return_special_tokens_mask=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        positions = {name: _token_spans(text, offsets, encoded["special_tokens_mask"], span)
                     for name, span in spans.items()}
        excess = len(ids) - max_length
        if excess <= 0:
            break
        # a space token that only leads into a field stays with its first word: it is not cut on its own
        cuttable = {name: [i for i in positions.get(name, ()) if offsets[i][1] > spans[name][0]] for name in values}
        cut = {}
        for name, count in _longest_first({name: len(p) for name, p in cuttable.items() if p}, excess).items():
            kept_end = offsets[cuttable[name][count - 1]][1] - spans[name][0]
            if count < len(cuttable[name]) and kept_end < len(values[name]):
                cut[name] = values[name][:kept_end]
        if not cut:  # every field is down to one token: only the template or a candidate is left to cut
            raise ValueError(f"template {template!r} needs {len(ids)} tokens with every field cut to one token, "
                             f"more than max_length {max_length}; raise --max-length or shorten the template "
                             "(or the candidates)")
        values.update(cut)
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
        if pair:  # segment A: the first field; B: the others, kept apart by the model's separator
            first, *rest = values.values()
            return [pair_row(tokenizer, first, rest, max_length)]
        filled = adapt_template(template, head, kind, multiple_choice=False)
        fixed = {"mask": tokenizer.mask_token} if "{mask}" in filled else {}
        row, _, _ = template_row(tokenizer, values, filled, head, kind, max_length, fixed)
        row.answer = _answer(tokenizer, row.ids, row.text_mask, head, kind)
        return [row]
    candidates = [str(c) for c in example[CHOICES]]
    if pair:
        context = " ".join(values.values())
        return [pair_row(tokenizer, context, [candidate], max_length) for candidate in candidates]
    return [candidate_row(tokenizer, values, candidate, template, kind, max_length) for candidate in candidates]


def candidate_row(tokenizer, values: dict[str, str], candidate: str, template: str, kind: str,
                  max_length: int) -> Row:
    """A row an LM scores a candidate with: the sum of its tokens' log-probabilities (causal: each token given
    the ones before it; seq2seq: the decoder writing it; masked: the single token at the mask)."""
    filled = adapt_template(template, "verbalizer", kind, multiple_choice=True)
    if kind == "masked":  # the candidate's token as the text would have it at the mask
        tokens = word_tokens(tokenizer, candidate, spaced_before(filled, "choice"))
        if len(tokens) != 1:
            raise ValueError(f"a masked-LM verbalizer scores one token at the mask, but candidate {candidate!r} is "
                             f"{len(tokens)} tokens; use a causal or seq2seq LM, or --head classifier")
        row, _, positions = template_row(tokenizer, values, filled, "verbalizer", kind, max_length,
                                         {"choice": tokenizer.mask_token})
        # the mask itself: a lone space token before it (SentencePiece's "▁") joins the slot's span too
        masks = [i for i in positions.get("choice", ()) if row.ids[i] == tokenizer.mask_token_id]
        row.answer = masks[0] if masks else row.answer
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


# ---- a target text: --head lm ------------------------------------------------------------------------------

def target_tokens(tokenizer, target: str, template: str, kind: str) -> list[int]:
    """The tokens a language model learns to write for `target`.

    Causal: the target as it stands after the template's text (after a space where the template puts one before
    {mask}, or has no {mask}), then the end-of-sequence token. Seq2seq: the tokenizer's own encoding of the target
    (T5: the target and </s>; BART: <s>, the target, </s>), what HF's `labels` hold in PEFT's seq2seq guide.
    """
    if kind == "seq2seq":
        return tokenizer(target).input_ids
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token, which ends every target of --head lm")
    return word_tokens(tokenizer, target, spaced_before(template, "mask")) + [tokenizer.eos_token_id]


def lm_row(tokenizer, example, target: str, template: str, kind: str, max_length: int) -> Row:
    """A row an LM learns a target text from (--head lm). Causal: the template's text cut at {mask}, then the target
    and eos in one sequence, `targets` holding at each position the token it predicts (IGNORE before the target);
    seq2seq: the template's text ({mask} dropped) for the encoder and the target's tokens for the decoder.
    Truncation cuts the input fields, never the template or the target; a target that alone does not fit
    max_length is refused. `answer`: the last input token, from which generation writes."""
    values = {"text": example} if isinstance(example, str) else field_values(example)
    filled = adapt_template(template, "lm", kind, multiple_choice=False)
    tokens = target_tokens(tokenizer, target, template, kind)
    room = max_length if kind == "seq2seq" else max_length - len(tokens)
    if len(tokens) > max_length or room < 1:
        raise ValueError(f"the target {target[:60]!r} is {len(tokens)} tokens, which leaves no room for its input "
                         f"in --max-length {max_length}; raise --max-length or shorten the target")
    try:
        row, _, _ = template_row(tokenizer, values, filled, "lm", kind, room)
    except ValueError as error:
        if room == max_length or "more than max_length" not in str(error):
            raise
        raise ValueError(f"the target {target[:60]!r} is {len(tokens)} tokens, which leaves {room} of --max-length "
                         f"{max_length} for the input, fewer than the template {template!r} needs with every field "
                         "cut to one token; raise --max-length or shorten the target") from None
    if kind == "seq2seq":
        row.targets = tokens
        return row
    start = len(row.ids)
    row.ids = row.ids + tokens
    row.text_mask = row.text_mask + [False] * len(tokens)
    row.targets = [IGNORE] * len(row.ids)
    for position in range(start, len(row.ids)):
        row.targets[position - 1] = row.ids[position]  # position - 1 predicts the target's token at position
    row.answer = start - 1
    return row
