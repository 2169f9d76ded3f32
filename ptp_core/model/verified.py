"""What is verified: family -> prompt type -> head -> the independent reference the tests check it against.

tests/model/test_matrix.py builds a tiny model of every family (tests/families.py) and checks each cell below on a
padded pair task against its reference; it asserts that this table equals its registry, so nothing is accepted
without a test. Whatever is not here is refused in one line: an unknown family by load_backbone, an unverified
prompt type or head by PromptModel. The measured numbers are in docs/backbones.md.
"""
from __future__ import annotations

CELL_HEADS = ("classifier", "verbalizer", "multiple-choice classifier", "multiple-choice verbalizer", "lm")

_SEQ_CLS = "PEFT SEQ_CLS prompt tuning"
_CAUSAL = "PEFT CAUSAL_LM prompt tuning"
_SEQ2SEQ = "PEFT SEQ_2_SEQ_LM prompt tuning"
_PREFIX = "PEFT CAUSAL_LM prefix tuning"
_PREFIX_CACHE = "PEFT's prefix cache in HF's SequenceClassification"
_MASKED = "HF MaskedLM forward, prompt concatenated"
_CHOICE = "HF MultipleChoice forward, prompt concatenated"
_FLOAT64 = "explicit float64 prefix attention"
_LM_CAUSAL = "PEFT CAUSAL_LM prompt tuning, labels loss"
_LM_PREFIX = "PEFT CAUSAL_LM prefix tuning, labels loss"
_LM_SEQ2SEQ = "PEFT SEQ_2_SEQ_LM prompt tuning, labels loss"
_FLOAT64_MODERNBERT = "explicit float64 ModernBERT, windowed prefix"

_ENCODER = {"shallow": {"classifier": _SEQ_CLS, "verbalizer": _MASKED, "multiple-choice classifier": _CHOICE,
                        "multiple-choice verbalizer": _MASKED}}
_BERT_LIKE = {**_ENCODER, "deep": {"classifier": _FLOAT64}}
_DECODER_SHALLOW = {"classifier": _SEQ_CLS, "verbalizer": _CAUSAL, "multiple-choice verbalizer": _CAUSAL,
                    "lm": _LM_CAUSAL}
_DECODER = {"shallow": _DECODER_SHALLOW,
            "deep": {"classifier": _PREFIX_CACHE, "verbalizer": _PREFIX, "multiple-choice verbalizer": _PREFIX,
                     "lm": _LM_PREFIX}}
_ALIBI = {"shallow": _DECODER_SHALLOW}
_SEQ2SEQ_CELLS = {"shallow": {"verbalizer": _SEQ2SEQ, "multiple-choice verbalizer": _SEQ2SEQ, "lm": _LM_SEQ2SEQ}}

VERIFIED: dict[str, dict[str, dict[str, str]]] = {
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE, "electra": _BERT_LIKE,
    "distilbert": _ENCODER, "albert": _ENCODER, "deberta-v2": _ENCODER, "mpnet": _ENCODER,
    "modernbert": {**_ENCODER, "deep": {"classifier": _FLOAT64_MODERNBERT}},
    "gpt2": _DECODER, "llama": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER, "mistral": _DECODER,
    "gemma": _DECODER, "gemma2": _DECODER, "gemma3_text": _DECODER, "phi": _DECODER, "phi3": _DECODER,
    "gpt_neox": _DECODER, "gptj": _DECODER, "opt": _DECODER, "olmo": _DECODER, "olmo2": _DECODER,
    "starcoder2": _DECODER, "gpt_bigcode": _DECODER, "smollm3": _DECODER, "bloom": _ALIBI,
    "falcon": _DECODER,  # checked on rotary Falcon: ptp_core.model.prefix refuses deep prompts on ALiBi Falcon
    "t5": _SEQ2SEQ_CELLS, "bart": _SEQ2SEQ_CELLS,
}

# why a cell of a verified family is missing, for the refusal to say: keyed by (prompt type, family), then
# (head, model kind), then (prompt type, model kind); the first that matches
_NO_REFERENCE = "PEFT cannot run SEQ_CLS prefix tuning and the explicit float64 reference covers BERT-like layers only"
_NO_INTERFACE = "its attention does not use transformers' attention interface, through which a prefix enters"
WHY_NOT = {
    ("deep", "seq2seq"): "PEFT's prefix on encoder-decoders also rewrites the cross-attention cache",
    ("deep", "bloom"): "ALiBi gives a prefix no position bias",
    ("deep", "deberta-v2"): _NO_INTERFACE, ("deep", "mpnet"): _NO_INTERFACE,
    ("deep", "masked"): _NO_REFERENCE,
    ("multiple-choice classifier", "causal"): "transformers has no multiple-choice head for decoders",
    ("multiple-choice classifier", "seq2seq"): "transformers has no multiple-choice head for encoder-decoders",
    ("classifier", "seq2seq"): "its classification head finds EOS in the token ids, which a soft prompt replaces",
    ("lm", "masked"): "a masked LM writes no text",
}


def cell_head(head: str, choices: int) -> str:
    """The matrix's head name: classifier or verbalizer, prefixed with multiple-choice for a task with candidates."""
    return f"multiple-choice {head}" if choices else head


def check_family(family: str) -> None:
    """Refuse a model type that no test checks against a reference."""
    if family not in VERIFIED:
        raise ValueError(f"model type {family!r} is not verified against a reference here; use a model of a "
                         f"verified family: {', '.join(sorted(VERIFIED))}")


def check_cell(family: str, kind: str, prompt_type: str, head: str) -> None:
    """Refuse a prompt type and head (CELL_HEADS) that no test checks on this family."""
    check_family(family)
    cells = VERIFIED[family]
    if head in cells.get(prompt_type, {}):
        return
    reason = next((WHY_NOT[key] for key in ((prompt_type, family), (head, kind), (prompt_type, kind))
                   if key in WHY_NOT), "no test checks it")
    verified = "; ".join(f"{p}: {', '.join(heads)}" for p, heads in cells.items())
    mend = "use --prompt-type shallow" if head in cells.get("shallow", {}) else f"verified for {family}: {verified}"
    raise ValueError(f"{prompt_type} prompts with the {head} head are not verified on {family} ({reason}); {mend}")
