"""--head lm against PEFT on every lm cell of the matrix: the `labels` loss, the token mean across batches and
stacks, greedy generation, and adapters PEFT saved read back as lm.

Our side runs three generation examples (inputs of different lengths, the longest longer than any sliding window;
targets of 1, 2 and 9 words) as ONE right-padded batch through PromptModel.loss; the reference is PEFT's forward with
`labels` on the same examples, right-padded, tokenized here with the tokenizer's own call (our checkpoint loaded by
PeftModel.from_pretrained), which is HF's token mean over every target token of the batch. Both ways through the
files: the adapter PEFT then saves, read by load_checkpoint(head="lm"), gives the same loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from families import FAMILIES, labels_inputs, tokenizer
from test_matrix import REACH, filled, hf_model, our_model, peft_from_ours

TOLERANCE = 1e-5  # |our loss - PEFT's| in float32
TEMPLATE = "Review : {text} It was {mask}"
EXAMPLES = [{"text": "the movie was really good and the acting superb", "target": "good film"},
            {"text": "dull", "target": "the plot was boring and the story quite weak"},
            {"text": "a lovely film", "target": "fun"}]
MORE = [{"text": "it was a story", "target": "quite boring and weak"},
        {"text": "the plot and the acting", "target": "really moving"}]  # with EXAMPLES: uneven batches of 2, 2, 1
NEW_TOKENS = 6
# greedy generation, checked on every listed family shallow and on a few deep
GENERATION = [(name, "shallow") for name in ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "phi3",
                                              "gpt_neox", "opt", "t5", "bart")]
GENERATION += [(name, "deep") for name in ("llama", "gpt2", "mistral")]
# the greedy check runs where greedy tokens vary: at initializer_factor 1 the random T5 decoder copies its start token
# whatever the input and the prompt, so the check could not fail; at 2 it writes varied tokens (its summed
# log-probabilities then grow past what the matrix's 1e-4 float32 tolerance allows, so the matrix keeps 1)
GENERATION_SETTINGS = {"t5": dict(initializer_factor=2.0)}
LM_CELLS = [(name, prompt_type) for name, family in FAMILIES.items() for prompt_type, head in family.cells
            if head == "lm"]


@dataclass
class LmCell:
    name: str
    prompt_type: str
    pristine: object  # the untouched HF LM
    model: object  # our PromptModel
    params: dict
    peft_model: object  # PEFT reading our checkpoint
    tok: object
    checkpoint: Path  # our checkpoint's folder


def lm_cell(name: str, prompt_type: str, out: Path, settings: dict | None = None) -> LmCell:
    """Our lm model of one cell (its family's config, `settings` overriding it) with params at the scale of trained
    ones, and PEFT reading our checkpoint."""
    tok = tokenizer(FAMILIES[name].tokenizer)
    pristine = hf_model(name, "lm", prompt_type=prompt_type if FAMILIES[name].deep_settings else "shallow")
    if settings:
        config = copy.deepcopy(pristine.config)
        for key, value in settings.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        pristine = type(pristine)(config).eval()
    model, params = our_model(pristine, tok, name, "lm", prompt_type, TEMPLATE)
    peft_model = peft_from_ours(pristine, model, params, out / "ours")
    return LmCell(name, prompt_type, pristine, model, params, peft_model, tok, out / "ours")


def peft_loss(peft_model, cell: LmCell, examples: list) -> float:
    """PEFT's `labels` loss on the examples as one right-padded batch."""
    contexts = [filled(TEMPLATE, e, cell.model.kind, cell.tok) for e in examples]
    with torch.no_grad():
        return float(peft_model(**labels_inputs(cell.tok, cell.model.kind, contexts,
                                                [e["target"] for e in examples])).loss)


def measure_lm_cell(cell: LmCell, out: Path) -> tuple[float, float]:
    """|our batch loss - PEFT's labels loss|, the larger of our checkpoint read by PEFT and PEFT's saved adapter read
    by load_checkpoint(head="lm"); and the reach: how far the prompt moved by 0.1 per entry moves an example's loss
    (the batch mean alone can hide it: random moves cancel over target tokens, a softcapped model barely moves)."""
    from ptp_core.checkpoint import load_checkpoint

    expected = peft_loss(cell.peft_model, cell, EXAMPLES)
    batch = cell.model.encode(EXAMPLES)
    cell.peft_model.save_pretrained(out / "peft")
    theirs = load_checkpoint(out / "peft", head="lm")
    assert theirs.meta["head"] == "lm"
    moved = cell.params["prompt"] + 0.1 * torch.randn(cell.params["prompt"].shape,
                                                      generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours, read, shifted = (cell.model.loss({"prompt": prompt}, batch)  # (B,) each
                               for prompt in (cell.params["prompt"], theirs.params["prompt"], moved))
    gap = max(abs(float(ours.mean()) - expected), abs(float(read.mean()) - expected))
    return gap, float((shifted - ours).abs().max())


def measure_lm_family(name: str, out: Path) -> dict[tuple[str, str], tuple[float, float] | str]:
    """Every lm cell of a family: (prompt type, "lm") -> (|dloss|, reach) or its error (one line)."""
    from test_matrix import outcome

    def measure(prompt_type: str) -> tuple[float, float]:
        folder = out / f"{prompt_type}-lm"
        return measure_lm_cell(lm_cell(name, prompt_type, folder), folder)

    return {(prompt_type, head): outcome(measure, prompt_type) for prompt_type, head in FAMILIES[name].cells
            if head == "lm"}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """(family, prompt type[, for generation]) -> LmCell, each built once for the module (the loss and generation
    tests share them; for generation a family of GENERATION_SETTINGS gets its own)."""
    built: dict[tuple[str, str, bool], LmCell] = {}
    root = tmp_path_factory.mktemp("lm-cells")

    def get(name: str, prompt_type: str, generation: bool = False) -> LmCell:
        settings = GENERATION_SETTINGS.get(name) if generation else None
        key = name, prompt_type, settings is not None
        if key not in built:
            built[key] = lm_cell(name, prompt_type, root / "-".join(map(str, key)), settings)
        return built[key]

    return get


@pytest.mark.parametrize("name,prompt_type", LM_CELLS)
def test_every_lm_cell_equals_peft_labels_loss(name, prompt_type, cells, tmp_path):
    gap, reach = measure_lm_cell(cells(name, prompt_type), tmp_path)
    assert gap <= TOLERANCE and reach >= REACH, (gap, reach)


# ---- the token mean across batches and stacks ------------------------------------------------------------------

@torch.no_grad()
def float64_token_mean(cell: LmCell, prompt: torch.Tensor, examples: list, out: Path) -> float:
    """The mean target-token cross-entropy over all examples, from PEFT's forward in float64, one unpadded example
    at a time, summed token by token."""
    peft_model = peft_from_ours(cell.pristine, cell.model, {"prompt": prompt}, out).double()
    total, count = 0.0, 0
    for example in examples:
        inputs = labels_inputs(cell.tok, cell.model.kind, [filled(TEMPLATE, example, cell.model.kind, cell.tok)],
                               [example["target"]])
        labels = inputs.pop("labels")[0]
        if cell.model.kind == "seq2seq":  # teacher forcing: the decoder reads the start token, then the target
            start = cell.pristine.config.decoder_start_token_id
            decoder = torch.tensor([[start, *labels[:-1].tolist()]])
            scores = peft_model(**inputs, decoder_input_ids=decoder).logits[0].log_softmax(-1)  # (Tc, V)
            steps = [(t, int(labels[t])) for t in range(len(labels))]
        else:  # position t - 1 predicts the token at t
            scores = peft_model(**inputs).logits[0, -len(labels):].log_softmax(-1)  # (T, V)
            steps = [(t - 1, int(labels[t])) for t in range(1, len(labels)) if labels[t] != -100]
        for position, token in steps:
            total -= float(scores[position, token])
            count += 1
    return total / count


@pytest.mark.parametrize("name,prompt_type", [("llama", "shallow"), ("llama", "deep"), ("t5", "shallow")])
def test_the_token_mean_over_uneven_batches_and_stacked_prompts_is_a_float64_loop(name, prompt_type, cells,
                                                                                   tmp_path):
    from ptp_core.model.encoding import batch_split
    from ptp_core.tasks.task import Split

    cell = cells(name, prompt_type)
    split = Split(EXAMPLES + MORE, [-1] * len(EXAMPLES + MORE))
    batches, order = batch_split(cell.model, split, batch_size=2)
    assert [len(rows) for rows in order] == [2, 2, 1]
    base = cell.params["prompt"]
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(4))
    stacked = torch.stack([base, base + 0.2 * noise, base - 0.2 * noise])  # (G=3, P, W)
    with torch.no_grad():
        ours = torch.cat([cell.model.loss({"prompt": stacked}, b) for b in batches], 1).mean(1)  # (G,)
        alone = [float(torch.cat([cell.model.loss({"prompt": p}, b) for b in batches]).mean()) for p in stacked]
        # each batch's own token mean, averaged: what a shared token scale exists to avoid
        batch_means = float(torch.stack([cell.model.loss({"prompt": base}, replace(b, token_scale=None)).mean()
                                         for b in batches]).mean())
    expected = [float64_token_mean(cell, p, split.texts, tmp_path / str(g)) for g, p in enumerate(stacked)]
    assert max(abs(float(o) - e) for o, e in zip(ours, expected)) < TOLERANCE, (ours, expected)
    assert max(abs(float(o) - a) for o, a in zip(ours, alone)) < 1e-6, (ours, alone)
    assert abs(batch_means - expected[0]) > REACH  # the batches are uneven enough that a wrong scale would show
    assert min(abs(expected[0] - e) for e in expected[1:]) > REACH  # the stacked prompts differ


# ---- greedy generation -----------------------------------------------------------------------------------------

@torch.no_grad()
def peft_greedy(cell: LmCell, example: dict) -> list[int]:
    """PEFT's greedy tokens for one unpadded example, up to its first eos.

    Causal shallow: PEFT's generate without the key/value cache; deep: a greedy loop over PEFT's forward; seq2seq:
    PEFT's generate (the prompt is in the encoder, never in the decoder's cache). With transformers 5.25 and PEFT
    0.21, PEFT's cached generate of a causal prompt-tuned model feeds it P+1 tokens at each step after the first,
    and its prefix-tuned generate starts from an empty cache (uncached, it appends the text to the prefix cache at
    every step, llama), so both part from PEFT's own forward within the first tokens. No generation-config extras
    (BART's forced eos at the last step): ours is plain greedy decoding.
    """
    kind, eos = cell.model.kind, cell.tok.eos_token_id
    inputs = cell.tok(filled(TEMPLATE, example, kind, cell.tok), return_tensors="pt")
    if kind == "causal" and cell.prompt_type == "deep":
        ids = inputs["input_ids"][0].tolist()
        for _ in range(NEW_TOKENS):
            ids.append(int(cell.peft_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
        tokens = ids[inputs["input_ids"].shape[1]:]
    else:
        out = cell.peft_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                                       forced_eos_token_id=None, use_cache=kind == "seq2seq")[0].tolist()
        tokens = out[inputs["input_ids"].shape[1]:] if kind == "causal" else out[1:]  # seq2seq: after the start
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("name,prompt_type", GENERATION)
def test_greedy_generation_writes_peft_tokens(name, prompt_type, cells):
    from ptp_core.model import lm

    cell = cells(name, prompt_type, generation=True)
    inputs = [{"text": e["text"]} for e in EXAMPLES]
    ours = lm.generate(cell.model, cell.params, inputs, NEW_TOKENS)
    expected = [peft_greedy(cell, example) for example in inputs]
    assert ours == expected
    assert len({tuple(tokens) for tokens in ours}) > 1, ours  # the prompt and the inputs steer what is written


# ---- adapters PEFT saved, read as lm ---------------------------------------------------------------------------

def test_a_peft_saved_adapter_reads_as_lm_or_is_refused_in_one_line(cells, tmp_path):
    from ptp_core.checkpoint import load_checkpoint

    cell = cells("gpt2", "shallow")
    cell.peft_model.save_pretrained(tmp_path / "peft")
    assert load_checkpoint(tmp_path / "peft").meta["head"] == "verbalizer"  # the default reading stays
    with pytest.raises(ValueError) as error:
        load_checkpoint(tmp_path / "peft", head="classifier")
    assert "\n" not in str(error.value) and "verbalizer or lm" in str(error.value)
    with pytest.raises(ValueError) as error:
        load_checkpoint(cell.checkpoint, head="verbalizer")  # ptp.json knows its head
    assert "\n" not in str(error.value) and "trained with the lm head" in str(error.value)
