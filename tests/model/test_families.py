"""Every family trains, stacks, differentiates and reads HF's own heads; the helpers that compare with PEFT's forward.

The agreement of every family, prompt type and head with PEFT's forward (both directions through the checkpoint
files) is tests/model/test_matrix.py; peft_saved_to_ours and ours_to_peft here are the same two checks on a model folder.
PEFT's forward is the reference, run one example at a time (it cannot tell padding from inputs_embeds);
ours runs the examples as one right-padded batch, so these checks also show that padding is invisible.
"""
import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import FAMILIES, family_head, toy_rows
from ptp_core.model.templates import render

TEXTS = [r["text"] for r in toy_rows(5, seed=11)] + ["good"]  # lengths differ: the batch is right-padded
LABEL_WORDS = ["negative", "positive"]


def build(directory: str, head: str, seed: int = 0, prompt_length: int = 3):
    from conftest import build_model

    return build_model(directory, head, seed, prompt_length)


def peft_base(directory: str, head: str):
    import transformers

    auto = transformers.AutoModelForSequenceClassification if head == "classifier" else \
        transformers.AutoModelForSeq2SeqLM
    return auto.from_pretrained(directory).eval()


def peft_logits(peft_model, model, texts: list[str]) -> torch.Tensor:
    """(N, C) class logits from PEFT's forward, one unpadded example at a time (a decoder verbalizer's: the label
    words' logits at the last position)."""
    rows = []
    for text in texts:
        inputs = model.tokenizer(render(model.tokenizer, text, model.template, model.head, model.kind)[0],
                                 return_tensors="pt")
        with torch.no_grad():
            if model.kind == "seq2seq":
                start = torch.tensor([[peft_model.config.decoder_start_token_id]])
                rows.append(peft_model(**inputs, decoder_input_ids=start).logits[0, -1, model.label_ids])
            elif model.head == "verbalizer":
                rows.append(peft_model(**inputs).logits[0, -1, model.label_ids])
            else:
                rows.append(peft_model(**inputs).logits[0])
    return torch.stack(rows)


def peft_saved_to_ours(directory: str, tmp_path) -> float:
    """max |logit difference|: a PEFT-saved adapter (trained-looking prompt and head) read by our evaluate path."""
    from peft import PromptTuningConfig, get_peft_model

    from ptp_core.checkpoint import load_checkpoint

    head = "classifier" if "ForSequenceClassification" in open(f"{directory}/config.json").read() else "verbalizer"
    task_type = "SEQ_CLS" if head == "classifier" else "SEQ_2_SEQ_LM"
    torch.manual_seed(5)
    base = peft_base(directory, head)
    # token_dim is the word-embedding width (ALBERT, ELECTRA: below the hidden size; DistilBERT's config says `dim`)
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=3, num_layers=2, num_attention_heads=2,
                                token_dim=base.get_input_embeddings().weight.shape[1])
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # move every trainable tensor (prompt and head copies) away from the base's values
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn_like(parameter))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_checkpoint(tmp_path / "peft").build_model(label_words=LABEL_WORDS, template="{text} It was {mask}.")
    reference = peft_logits(peft_model, model, TEXTS)
    return float((model.predict(TEXTS) - reference).abs().max())


def ours_to_peft(directory: str, head: str, tmp_path) -> float:
    """max |logit difference|: our checkpoint loaded by PeftModel.from_pretrained."""
    from peft import PeftModel

    from ptp_core.checkpoint import save_checkpoint

    model = build(directory, head, seed=3)
    meta = {"model": directory, "head": head, "kind": model.kind, "label_words": LABEL_WORDS,
            "template": model.template, "num_labels": 2, "method": "pt", "seed": 3}
    out = save_checkpoint(tmp_path / "ours", model.params, meta, None, model.backbone.config)
    peft_model = PeftModel.from_pretrained(peft_base(directory, head), out).eval()
    return float((model.predict(TEXTS) - peft_logits(peft_model, model, TEXTS)).abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stacked_params_equal_a_loop(family, family_dirs):
    """G prompt variants (and, for classifiers, G heads: --params all) in one call == G calls."""
    model = build(family_dirs[family], family_head(family))
    batch = model.encode(TEXTS, [0, 1, 0, 1, 1, 0])
    gen = torch.Generator().manual_seed(1)
    variants = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.params.items()} for _ in range(3)]
    prompts = {**model.params, "prompt": torch.stack([v["prompt"] for v in variants])}  # (G, P, D), shared head
    loop = torch.stack([model.loss({**model.params, "prompt": v["prompt"]}, batch) for v in variants])
    torch.testing.assert_close(model.loss(prompts, batch), loop, rtol=1e-5, atol=1e-6)
    if model.head == "classifier":
        everything = {k: torch.stack([v[k] for v in variants]) for k in model.params}
        loop = torch.stack([model.loss(v, batch) for v in variants])
        torch.testing.assert_close(model.loss(everything, batch), loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "qwen2", "t5"])
def test_gradients_and_double_backward_reach_prompt_and_head(family, family_dirs):
    """The Hessian needs a second derivative through HF's own head modules."""
    model = build(family_dirs[family], family_head(family))
    batch = model.encode(TEXTS[:3], [0, 1, 0])
    params = {k: v.clone().requires_grad_(True) for k, v in model.params.items()}
    with sdpa_kernel(SDPBackend.MATH):  # as landscape.hessian does: the fused CPU kernel has no double backward
        loss = model.loss(params, batch).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)
        (second,) = torch.autograd.grad(grads[0].sum(), params["prompt"])
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_head_reads_hf_modules_not_a_copy(family_dirs):
    """The head a classifier trains is what the HF model adds on top of its backbone, named as HF names it."""
    expected = {"bert": {"classifier"}, "roberta": {"classifier"}, "distilbert": {"pre_classifier", "classifier"},
                "deberta-v2": {"pooler", "classifier"}, "albert": {"classifier"}, "electra": {"classifier"},
                "gpt2": {"score"}, "llama": {"score"}, "qwen2": {"score"}}
    for family, names in expected.items():
        model = build(family_dirs[family], "classifier")
        assert {k.split(".")[0] for k in model.params if k != "prompt"} == names, family


def test_prompt_longer_than_positions_is_refused(family_dirs):
    with pytest.raises(ValueError, match="exceed the 256 positions"):
        build(family_dirs["gpt2"], "classifier", prompt_length=200)
    with pytest.raises(ValueError, match=r"exceed the 256 positions"):  # RoBERTa: 257 rows, ids from pad + 1
        build(family_dirs["roberta"], "classifier", prompt_length=129)


def test_bart_classifier_is_refused_in_one_line(family_dirs):
    from ptp_core.model.backbones import load_backbone

    with pytest.raises(ValueError, match="use --head verbalizer"):
        load_backbone(family_dirs["bart"], "classifier", 2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_evaluates_draws_a_surface_and_measures_curvature(family, family_dirs, toy_csv, tmp_path):
    from landscape.grid.driver import surface_for_params
    from landscape.grid.spec import SurfaceSpec
    from landscape.measures.row import MetricsConfig, measure
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.tasks.load import load_task
    from ptp_core.evaluate import main as evaluate_main
    from ptp_core.train import TrainConfig, train

    out = train(TrainConfig(model=family_dirs[family], task=toy_csv, out=str(tmp_path / "run"), steps=3, batch_size=16,
                            prompt_length=3, eval_every=3, eval_examples=8, test_examples=8, progress=False,
                            dtype="float32"))
    checkpoint = load_checkpoint(out)
    assert checkpoint.meta["head"] == family_head(family)
    result = evaluate_main([str(out), "--examples", "8", "--dtype", "float32"])
    model = checkpoint.build_model()
    examples = load_task(toy_csv).splits["test"].head(8)
    surface = surface_for_params(model, checkpoint.params, examples, SurfaceSpec(grid="3x3", examples=8, span=0.5, dtype="float32"),
                                 progress=False)
    assert surface.is_complete and abs(surface.center_loss - result["loss"]) < 1e-5
    row = measure(model, checkpoint.params, examples, surface,
                  MetricsConfig(which=("surface", "hessian"), examples=8, eigenvalues=1, max_hvps=60))
    assert np.isfinite(row["hessian_eigenvalues"][0]) and np.isfinite(row["grid_sharpness"])


def test_cli_refusals_are_one_line_and_write_nothing(family_dirs, toy_csv, tmp_path):
    import json
    import subprocess
    import sys

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        return result.stderr

    out = tmp_path / "x"
    assert "use --head verbalizer" in cli("ptp_core.train", "--model", family_dirs["bart"], "--head", "classifier",
                                          "--task", toy_csv, "--out", str(out), "--steps", "1")
    assert not out.exists()
    three = tmp_path / "three.csv"  # a task with three labels against a two-label checkpoint
    three.write_text("text,label\n" + "".join(f"good film,{label}\n" for label in ("a", "b", "c") * 4))
    run = tmp_path / "run"
    from ptp_core.train import TrainConfig, train

    train(TrainConfig(model=family_dirs["roberta"], task=toy_csv, out=str(run), steps=1, prompt_length=2,
                      eval_examples=4, test_examples=4, progress=False))
    meta = json.loads((run / "ptp.json").read_text())
    meta.pop("label_names")  # names or words would already refuse the task (tested elsewhere); test the counts
    meta.pop("label_words", None)  # a classifier run records none
    (run / "ptp.json").write_text(json.dumps(meta))
    assert "trained on 2 labels" in cli("ptp_core.evaluate", str(run), "--task", str(three))
    meta.pop("num_labels")
    (run / "ptp.json").write_text(json.dumps(meta))
    assert "has shape (2,) but the model's has (3,) for 3 labels" in cli("ptp_core.evaluate", str(run), "--task", str(three))


@pytest.mark.parametrize("family", ["roberta", "distilbert", "deberta-v2", "albert", "electra", "gpt2", "llama", "qwen2"])
def test_verbalizer_reads_the_models_own_lm_head(family, family_dirs):
    """Masked and causal LMs of each family: label-word logits == HF's full forward at the answer position."""
    model = build(family_dirs[family], "verbalizer")
    batch = model.encode(TEXTS, [0, 1, 0, 1, 1, 0])
    prompt = model.params["prompt"].expand(len(batch), -1, -1)  # (B, P, D)
    embeds = torch.cat([prompt, model.embed(batch)], 1)  # (B, P+T, D)
    mask = torch.cat([torch.ones(len(batch), prompt.shape[1], dtype=torch.long), batch.attention_mask], 1)
    with torch.no_grad():
        full = model.backbone(inputs_embeds=embeds, attention_mask=mask).logits  # (B, P+T, V)
    rows = torch.arange(len(batch))
    expected = full[rows, prompt.shape[1] + batch.answer_index][:, model.label_ids]  # (B, C)
    torch.testing.assert_close(model.logits(model.params, batch), expected, rtol=1e-5, atol=1e-5)
    if model.kind == "masked":
        assert (batch.input_ids[rows, batch.answer_index] == model.tokenizer.mask_token_id).all()
