"""The verification matrix: every family x prompt type x head of tests/families.py against its independent reference
(the lm cells, a loss over target tokens rather than logits: tests/model/test_lm_matrix.py).

Our side runs a pair task (premise, hypothesis of different lengths, longer than any sliding window) as ONE
right-padded batch through PromptModel.logits; the reference runs one example at a time, unpadded, tokenized
here with the tokenizer's own call: PEFT's forward (our checkpoint loaded by PeftModel.from_pretrained, so the
files are checked too), HF's own forward with the prompt concatenated, or an explicit float64 attention.
ptp_core.model.verified.VERIFIED is asserted equal to the registry, and docs/backbones.md's table to the cells.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from families import (FAMILIES, FLOAT64, FLOAT64_MODERNBERT, HF_CHOICE, HF_MASKED, PEFT_CAUSAL, PEFT_PREFIX,
                      PEFT_PREFIX_CACHE, PEFT_SEQ2SEQ, PEFT_SEQ_CLS, build_config, cells, reference_encoder_logits,
                      tokenizer)

TOLERANCE = 1e-4  # max |logit difference| in float32
REACH = 1e-3  # a prompt moved by 0.1 per entry must move our logits at least this much from the reference's
LABEL_WORDS = ["negative", "positive"]
PROMPT_LENGTH = 3
PAIRS = [{"premise": "the movie was really good and the acting superb", "hypothesis": "fun"},
         {"premise": "dull", "hypothesis": "the plot was boring and the story quite weak , it was messy"},
         {"premise": "a lovely film", "hypothesis": "moving story"}]
# task kind -> (examples, the template a verbalizer reads them with); a classifier reads fields as a tokenizer pair
TASKS = {
    "one text": (["the movie was really good and the acting superb", "dull", "a lovely film and a moving story"],
                 "Review : {text} It was {mask} ."),
    "pair": (PAIRS, "Review : {premise} , {hypothesis} It was {mask} ."),
    "three fields": ([dict(p, extra=e) for p, e in zip(PAIRS, ["quite fun", "awful", "it was a story"])],
                     "Review : {premise} , {hypothesis} , {extra} It was {mask} ."),
    "multiple choice": (PAIRS, "Review : {premise} , {hypothesis} It was {choice}"),
}
LABELS = [1, 0, 1]



def token_at(tok, text: str, at: int, word: str) -> int:
    """The token the tokenizer itself gives `word` written into `text` at character `at` (where the mask was)."""
    written = text[:at] + word + text[at + len(tok.mask_token):]
    encoded = tok(written, add_special_tokens=False, return_offsets_mapping=True)
    return next(t for t, (s, e) in zip(encoded.input_ids, encoded.offset_mapping) if s <= at < e)

def candidates(kind: str) -> list[str]:
    """Several tokens each (every token's log-probability counts); one token for a masked LM (read at the mask)."""
    return ["good", "awful"] if kind == "masked" else ["good film", "the plot was awful"]


# ---- the tiny models, built once per family --------------------------------------------------------------

def hf_model(name: str, head: str, tokenizer_kind: str | None = None, prompt_type: str = "shallow"):
    """A tiny random HF task model for the head: SequenceClassification, MultipleChoice, or the family's LM."""
    import transformers

    config = build_config(name, tokenizer_kind, prompt_type)
    if head == "classifier":
        auto = transformers.AutoModelForSequenceClassification
    elif head == "multiple-choice classifier":
        auto = transformers.AutoModelForMultipleChoice
    else:
        auto = {"masked": transformers.AutoModelForMaskedLM, "causal": transformers.AutoModelForCausalLM,
                "seq2seq": transformers.AutoModelForSeq2SeqLM}[FAMILIES[name].kind]
    torch.manual_seed(0)
    return auto.from_config(config).eval()


def our_model(pristine, tok, name: str, head: str, prompt_type: str, template: str, seed: int = 0):
    """Our PromptModel on a copy of `pristine`, and params: a prompt (and head) at the scale of trained ones."""
    from ptp_core.model.backbones import Backbone, model_kind
    from ptp_core.model.prompt_model import PromptModel

    kind = model_kind(pristine.config)  # as load_backbone tells it (a config built here names no architectures)
    assert kind == FAMILIES[name].kind, f"{name} is read as a {kind} model"
    task_model = copy.deepcopy(pristine).requires_grad_(False)
    choices = len(candidates(kind)) if head.startswith("multiple-choice") else 0
    model = PromptModel(Backbone(task_model, tok, kind, name, name), head.split()[-1], 2,
                        None if choices else LABEL_WORDS, template, choices=choices, prompt_type=prompt_type)
    generator = torch.Generator().manual_seed(seed)
    params = model.init_params(PROMPT_LENGTH, "random", generator)
    # away from the init: a head at N(0, 0.02) would hide a wrong head
    return model, {k: v + (0.3 if k == "prompt" else 0.5) * torch.randn(v.shape, generator=generator)
                   for k, v in params.items()}


# ---- the references, one unpadded example at a time -------------------------------------------------------

def fields(example) -> dict[str, str]:
    return {"text": example} if isinstance(example, str) else {k: v for k, v in example.items() if k != "choices"}


def filled(template: str, example, kind: str, tok) -> str:
    """The template filled in as the head reads it: the mask token for a masked LM, cut before it for a causal
    LM (the answer is the next token), dropped for seq2seq (the decoder writes it) and the classifier."""
    text = template
    for key, value in fields(example).items():
        text = text.replace("{" + key + "}", value)
    if kind == "masked":
        return text.replace("{mask}", tok.mask_token)
    return text.split("{mask}")[0].rstrip() if kind == "causal" else text.replace("{mask}", "").rstrip()


def pair(tok, example, template: str = "{text}") -> dict:
    """The classifier's input: the tokenizer's pair (first field, the others joined by the model's separator), the
    separator also between the two segments where the tokenizer's pair puts nothing there; one text: the template."""
    if isinstance(example, str):
        return tok(filled(template, example, "classifier", tok), return_tensors="pt")
    first, *rest = fields(example).values()
    join = tok.sep_token or tok.eos_token or "\n"
    second = join.join(rest)
    first_ids, join_ids, second_ids = (tok(t, add_special_tokens=False).input_ids for t in (first, join, second))
    if tok(first, second).input_ids != first_ids + second_ids:  # the tokenizer's pair keeps them apart
        return tok(first, second, return_tensors="pt")
    return {"input_ids": torch.tensor([first_ids + join_ids + second_ids])}


def label_ids(tok, kind: str) -> list[int]:
    return [tok(word if kind == "masked" else " " + word, add_special_tokens=False).input_ids[0]
            for word in LABEL_WORDS]


def peft_from_ours(pristine, model, params: dict, out: Path):
    """Our checkpoint loaded by PeftModel.from_pretrained on a copy of the untouched HF model."""
    from peft import PeftModel

    from ptp_core.checkpoint import save_checkpoint

    meta = {"model": model.model_name, "head": model.head, "kind": model.kind, "num_labels": 2,
            "choices": model.choices, "prompt_type": model.prompt_type, "label_words": model.label_words,
            "template": model.template}
    save_checkpoint(out, params, meta, None, model.backbone.config)
    return PeftModel.from_pretrained(copy.deepcopy(pristine), out).eval()


def with_head(pristine, params: dict):
    """A copy of the HF task model holding our head tensors."""
    reference = copy.deepcopy(pristine)
    result = reference.load_state_dict({k: v for k, v in params.items() if k != "prompt"}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return reference


def prompted(reference, prompt: torch.Tensor, inputs: dict) -> dict:
    """HF keyword arguments with the virtual tokens before the text: embeddings, mask, segment 0 (PEFT's way)."""
    embeds = torch.cat([prompt[None], reference.get_input_embeddings()(inputs["input_ids"])], 1)  # (1, P+T, D)
    out = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long)}
    if "token_type_ids" in inputs:
        out["token_type_ids"] = torch.cat([torch.zeros(1, prompt.shape[0], dtype=torch.long),
                                           inputs["token_type_ids"]], 1)  # (1, P+T)
    return out


def peft_candidate(peft_model, tok, kind: str, template: str, example: dict, candidate: str) -> torch.Tensor:
    """A candidate's summed token log-probability from PEFT's full forward (float64 log-softmax)."""
    if kind == "seq2seq":  # the decoder writes the candidate after the start token
        inputs = tok(filled(template.replace("{choice}", ""), example, kind, tok), return_tensors="pt")
        targets = tok(candidate, add_special_tokens=False).input_ids
        start = peft_model.base_model.config.decoder_start_token_id
        logits = peft_model(**inputs, decoder_input_ids=torch.tensor([[start, *targets[:-1]]])).logits[0]
        return logits.double().log_softmax(-1)[torch.arange(len(targets)), targets].sum()
    context = filled(template.split("{choice}")[0].rstrip(), example, kind, tok)
    ids, before = tok(f"{context} {candidate}").input_ids, tok(context).input_ids
    assert ids[:len(before)] == before  # the candidate's tokens follow the context's
    logits = peft_model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].double().log_softmax(-1)  # (T, V)
    return sum(logits[t - 1, ids[t]] for t in range(len(before), len(ids)))


@torch.no_grad()
def reference_logits(reference_kind: str, pristine, model, params: dict, tok, examples: list, out: Path):
    """(B, C) or (B, K) what the independent reference computes for our params, and the PEFT model that computed
    it (None for the other references)."""
    kind, template, prompt = model.kind, model.template, params["prompt"]
    rows, peft_model = [], None
    if reference_kind in (PEFT_SEQ_CLS, PEFT_CAUSAL, PEFT_SEQ2SEQ, PEFT_PREFIX):
        peft_model = peft_from_ours(pristine, model, params, out)
        for example in examples:
            if model.choices:
                rows.append(torch.stack([peft_candidate(peft_model, tok, kind, template, example, c)
                                         for c in example["choices"]]))
            elif model.head == "classifier":
                rows.append(peft_model(**pair(tok, example, template)).logits[0])
            else:
                inputs = tok(filled(template, example, kind, tok), return_tensors="pt")
                if kind == "seq2seq":
                    inputs["decoder_input_ids"] = torch.tensor([[pristine.config.decoder_start_token_id]])
                rows.append(peft_model(**inputs).logits[0, -1, label_ids(tok, kind)])
    elif reference_kind == HF_MASKED:  # the label words' logits (candidates: log-probabilities) at the mask
        reference = with_head(pristine, params)
        for example in examples:
            text = filled(template.replace("{choice}", "{mask}"), example, kind, tok)
            inputs = tok(text, return_tensors="pt")
            answer = prompt.shape[0] + inputs["input_ids"][0].tolist().index(tok.mask_token_id)
            logits = reference(**prompted(reference, prompt, inputs)).logits[0, answer]  # (V,)
            if model.choices:
                words = [token_at(tok, text, text.index(tok.mask_token), c) for c in example["choices"]]
                rows.append(logits.double().log_softmax(-1)[words])
            else:
                rows.append(logits[label_ids(tok, kind)])
    elif reference_kind == HF_CHOICE:  # one (context, candidate) row at a time, K = 1
        reference = with_head(pristine, params)
        for example in examples:
            context = " ".join(fields(example).values())
            scores = [reference(**{k: v.unsqueeze(1) for k, v in prompted(
                reference, prompt, pair(tok, {"context": context, "candidate": candidate})).items()}).logits[0, 0]
                for candidate in example["choices"]]
            rows.append(torch.stack(scores))
    elif reference_kind == PEFT_PREFIX_CACHE:
        # PEFT turns the prefix into a key/value cache (its prefix encoder only: any body will do); HF's own
        # classifier reads the text after that cache
        import transformers

        causal = copy.copy(model)
        causal.head = "verbalizer"
        peft_model = peft_from_ours(transformers.AutoModelForCausalLM.from_config(pristine.config), causal,
                                    {"prompt": prompt}, out)
        reference = with_head(pristine, params)
        for example in examples:
            inputs = pair(tok, example, template)
            mask = torch.ones(1, prompt.shape[0] + inputs["input_ids"].shape[1], dtype=torch.long)
            rows.append(reference(input_ids=inputs["input_ids"], attention_mask=mask,
                                  past_key_values=peft_model.get_prompt(batch_size=1)).logits[0])
    elif reference_kind in (FLOAT64, FLOAT64_MODERNBERT):
        from ptp_core.model.backbones import Backbone
        from ptp_core.model.prompt_model import PromptModel
        from test_backbone_paths import reference_modernbert_logits

        explicit = reference_encoder_logits if reference_kind == FLOAT64 else reference_modernbert_logits
        reference = with_head(pristine, params).double()
        wide = PromptModel(Backbone(reference, tok, kind, model.model_name, ""), "classifier", 2)
        rows = [explicit(wide, prompt.double(), [example])[0] for example in examples]
    else:
        raise AssertionError(f"no reference called {reference_kind!r}")
    return torch.stack(rows).double(), peft_model


# ---- cells -----------------------------------------------------------------------------------------------------

def measure_cell(name: str, prompt_type: str, head: str, reference_kind: str, out: Path, pristine=None,
                 tokenizer_kind: str | None = None, task_kind: str = "pair") -> tuple[float, float]:
    """max |our batched logits - the reference's| for one cell, on one task kind (default: the pair task). Where
    PEFT is the reference, both ways through the files: our checkpoint read by PEFT, and the adapter PEFT then
    saves read by ptp_core.checkpoint.load_checkpoint. Returns the gap and the reach: the gap our logits would have
    with the prompt moved (so that the check can fail: a window that hides the prompt from the answer would not)."""
    tok = tokenizer(tokenizer_kind or FAMILIES[name].tokenizer)
    pristine = pristine if pristine is not None else hf_model(name, head, tokenizer_kind, prompt_type)
    examples, template = TASKS["multiple choice" if head.startswith("multiple-choice") else task_kind]
    model, params = our_model(pristine, tok, name, head, prompt_type, template)
    labels = LABELS
    if model.choices:
        examples, labels = [{**fields(e), "choices": candidates(model.kind)} for e in examples], [0, 1, 0]
    batch = model.encode(examples, labels)
    with torch.no_grad():
        ours = model.logits(params, batch).double()
    expected, peft_model = reference_logits(reference_kind, pristine, model, params, tok, examples, out / "ours")
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    gap = float((ours - expected).abs().max())
    if peft_model is not None and reference_kind != PEFT_PREFIX_CACHE:
        from ptp_core.checkpoint import load_checkpoint

        peft_model.save_pretrained(out / "peft")
        with torch.no_grad():
            theirs = model.logits(load_checkpoint(out / "peft").params, batch).double()
        gap = max(gap, float((theirs - expected).abs().max()))
    moved = {**params, "prompt": params["prompt"] + 0.1 * torch.randn(params["prompt"].shape,
                                                                      generator=torch.Generator().manual_seed(9))}
    with torch.no_grad():
        reach = float((model.logits(moved, batch).double() - expected).abs().max())
    return gap, reach


def outcome(function, *args, **kwargs) -> tuple[float, float] | str:
    """The measured (gap, reach), or the error a cell ends in (one line): reported beside the other cells."""
    try:
        return function(*args, **kwargs)
    except Exception as error:
        return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def measure_family(name: str, out: Path) -> dict[tuple[str, str], tuple[float, float] | str]:
    """Every cell of a family but the lm cells: (prompt type, head) -> (max |dlogit|, reach) or its error; HF models
    built once per head."""
    family, pristine, gaps = FAMILIES[name], {}, {}
    for (prompt_type, head), reference_kind in family.cells.items():
        if head == "lm":  # no logits: a loss over target tokens, measured by test_lm_matrix.measure_lm_family
            continue
        key = head, prompt_type if family.deep_settings else "shallow"
        if key not in pristine:
            pristine[key] = hf_model(name, head, None, key[1])
        folder = out / f"{prompt_type}-{head}".replace(" ", "-")
        gaps[prompt_type, head] = outcome(measure_cell, name, prompt_type, head, reference_kind, folder,
                                          pristine[key])
    return gaps


# one encoder, one decoder, one encoder-decoder: each task kind with each tokenizer kind (WordPiece-like word
# level, byte-level BPE, SentencePiece Unigram), on the head that reads that task kind there
TOKENIZER_MODELS = {"bert": ("classifier", ["segments", "bpe", "unigram"]),
                    "llama": ("verbalizer", ["causal", "bpe", "unigram-causal"]),
                    "t5": ("verbalizer", ["seq2seq", "bpe", "unigram-seq2seq"])}


def measure_tokenizers(name: str, out: Path) -> dict[tuple[str, str], tuple[float, float] | str]:
    """(tokenizer kind, task kind) -> (max |dlogit|, reach) of the family's shallow prompt against its reference."""
    head, kinds = TOKENIZER_MODELS[name]
    gaps = {}
    for tokenizer_kind in kinds:
        for task_kind in TASKS:
            cell_head = f"multiple-choice {head}" if task_kind == "multiple choice" else head
            reference_kind = FAMILIES[name].cells["shallow", cell_head]
            folder = out / f"{tokenizer_kind}-{task_kind}".replace(" ", "-")
            gaps[tokenizer_kind, task_kind] = outcome(measure_cell, name, "shallow", cell_head, reference_kind,
                                                      folder, None, tokenizer_kind, task_kind)
    return gaps


def failures(gaps: dict) -> dict:
    """The cells that failed: an error, a gap above TOLERANCE, or a reach below REACH."""
    return {cell: gap for cell, gap in gaps.items() if isinstance(gap, str) or gap[0] > TOLERANCE or gap[1] < REACH}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_cell_of_the_family_equals_its_reference(name, tmp_path):
    failed = failures(measure_family(name, tmp_path))
    assert not failed, failed


@pytest.mark.parametrize("name", list(TOKENIZER_MODELS))
def test_every_task_kind_with_every_tokenizer_kind_equals_the_reference(name, tmp_path):
    failed = failures(measure_tokenizers(name, tmp_path))
    assert not failed, failed


# ---- the allowlist, the refusals, the docs ----------------------------------------------------------------------

def test_the_allowlist_is_exactly_the_matrix():
    from ptp_core.model.verified import CELL_HEADS, VERIFIED

    assert VERIFIED == cells()
    assert {head for family in VERIFIED.values() for heads in family.values() for head in heads} <= set(CELL_HEADS)


def test_an_unverified_family_is_refused_in_one_line_by_load_backbone(tmp_path):
    import transformers

    from ptp_core.model.backbones import load_backbone

    transformers.XGLMConfig(vocab_size=40, d_model=32, num_layers=1, attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        load_backbone(str(tmp_path), "verbalizer", 2)
    message = str(error.value)
    assert "\n" not in message and "'xglm' is not verified" in message and "llama" in message


@pytest.mark.parametrize("name,prompt_type,head,reason", [
    ("distilbert", "deep", "classifier", "float64 reference covers BERT-like layers only"),
    ("bert", "deep", "verbalizer", "float64 reference covers BERT-like layers only"),
    ("bloom", "deep", "verbalizer", "ALiBi"),
    ("mpnet", "deep", "classifier", "attention interface"),
])
def test_an_unverified_prompt_type_or_head_is_refused_in_one_line(name, prompt_type, head, reason):
    from ptp_core.model.backbones import Backbone
    from ptp_core.model.prompt_model import PromptModel

    backbone = Backbone(hf_model(name, head), tokenizer(FAMILIES[name].tokenizer), FAMILIES[name].kind, name, name)
    with pytest.raises(ValueError) as error:
        PromptModel(backbone, head, 2, LABEL_WORDS, TASKS["pair"][1], prompt_type=prompt_type)
    message = str(error.value)
    assert "\n" not in message and reason in message and "--prompt-type shallow" in message


def docs_cells(text: str) -> set[tuple[str, str, str]]:
    """(family, prompt type, head) of every row of the generated table in docs/backbones.md."""
    from matrix_table import BEGIN, END

    block = text.split(BEGIN)[1].split(END)[0]
    return {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]) for line in block.splitlines()
            if line.startswith("| ") and not line.startswith("| family")}


def test_the_docs_table_lists_exactly_the_matrix_cells():
    text = (Path(__file__).parents[2] / "docs" / "backbones.md").read_text()
    expected = {(name, prompt_type, head) for name, family in FAMILIES.items() for prompt_type, head in family.cells}
    assert docs_cells(text) == expected
