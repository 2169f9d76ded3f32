"""Deep prompts and heads on the families whose attention, positions or head take a path of their own: sliding
windows (Mistral, Gemma2/3, Phi-3, Qwen2, ModernBERT's local layers), ALiBi and rotary Falcon, OPT (a task model
that calls into its backbone, positions counted from the mask), ModernBERT's mean pooling; gradient checkpointing;
a multiple-choice head on a folder that holds a sequence classifier.

References: PEFT's CAUSAL_LM prefix and prompt tuning and its SEQ_CLS forward (one unpadded example at a time), an
explicit float64 ModernBERT with the prefix written out, HF's own weights in the folder.
"""
import json
import warnings

import pytest
import torch

from conftest import WORDS, make_tokenizer, toy_rows
from families import prefix_reference_inputs
from test_deep import LABEL_WORDS, TEMPLATE, deep_model, deep_peft_to_ours
from test_families import peft_logits

# each longer than the windows below (4 tokens) once templated; "good" pads the batch
TEXTS = [r["text"] for r in toy_rows(4, seed=12)] + ["good"]
WINDOW = 4
TOLERANCE = 1e-4
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
               initializer_range=0.3)


def _save(model, folder, tokenizer: str = "causal") -> str:
    model.save_pretrained(folder)
    make_tokenizer(tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random task models, built once for this module."""
    import transformers as hf

    root = tmp_path_factory.mktemp("paths")
    vocab, bpe = len(WORDS), len(make_tokenizer("bpe"))
    torch.manual_seed(0)
    falcon = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3, initializer_range=0.3)
    modernbert = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=0, cls_token_id=2,
                      sep_token_id=3, bos_token_id=2, eos_token_id=3, initializer_range=0.3, num_labels=2,
                      local_attention=WINDOW, global_attn_every_n_layers=3)  # layers: global, local, local
    models = {
        "mistral": (hf.MistralForCausalLM(hf.MistralConfig(vocab_size=vocab, sliding_window=WINDOW, **DECODER)),
                    "causal"),
        # eager (its default): logit softcapping, the additive mask; a sliding layer, then a global one
        "gemma2": (hf.Gemma2ForCausalLM(hf.Gemma2Config(
            vocab_size=vocab, head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=5.0, **DECODER)), "causal"),
        "phi3": (hf.Phi3ForCausalLM(hf.Phi3Config(vocab_size=vocab, sliding_window=WINDOW, **DECODER)), "causal"),
        "gemma3": (hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(
            vocab_size=vocab, head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            **DECODER)), "causal"),
        "qwen2": (hf.Qwen2ForCausalLM(hf.Qwen2Config(vocab_size=bpe, use_sliding_window=True, sliding_window=WINDOW,
                                                     max_window_layers=1, **dict(DECODER, bos_token_id=0,
                                                                                 eos_token_id=0))), "bpe"),
        "falcon-alibi": (hf.FalconForCausalLM(hf.FalconConfig(alibi=True, **falcon)), "causal"),
        "falcon": (hf.FalconForCausalLM(hf.FalconConfig(alibi=False, **falcon)), "causal"),
        "opt": (hf.OPTForCausalLM(hf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                               max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
                                               eos_token_id=3, init_std=0.3)), "causal"),
        "modernbert-mean": (hf.ModernBertForSequenceClassification(hf.ModernBertConfig(
            classifier_pooling="mean", **modernbert)), "masked"),
        "modernbert-cls": (hf.ModernBertForSequenceClassification(hf.ModernBertConfig(
            classifier_pooling="cls", **modernbert)), "masked"),
        "bert-2": (hf.BertForSequenceClassification(hf.BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            num_labels=2)), "segments"),
    }
    return {name: _save(model, root / name, tokenizer) for name, (model, tokenizer) in models.items()}


@pytest.fixture
def open_cell(monkeypatch):
    """Let PromptModel build a (family, prompt type, head) cell that ptp_core.model.verified does not list yet, for the
    test that verifies it here."""
    from ptp_core.model import verified

    def open_one(family: str, prompt_type: str, head: str) -> None:
        table = {kind: dict(heads) for kind, heads in verified.VERIFIED[family].items()}
        table.setdefault(prompt_type, {})[head] = "tests/model/test_backbone_paths.py"
        monkeypatch.setitem(verified.VERIFIED, family, table)

    return open_one


def peft_prefix_gap(directory: str, out, seed: int = 3) -> float:
    """max |label logit difference|: our deep verbalizer (a right-padded batch) against PEFT's CAUSAL_LM prefix
    tuning reading our checkpoint, one unpadded example at a time."""
    import transformers
    from peft import PeftModel

    from ptp_core.checkpoint import save_checkpoint

    model = deep_model(directory, "verbalizer", seed=seed)
    meta = {"model": directory, "head": "verbalizer", "kind": "causal", "label_words": LABEL_WORDS,
            "template": TEMPLATE, "num_labels": 2, "prompt_type": "deep"}
    out = save_checkpoint(out, model.params, meta, None, model.backbone.config)
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory), out).eval()
    return float((model.predict(TEXTS) - peft_logits(peft_model, model, TEXTS)).abs().max())


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2", "phi3", "gemma3"])
def test_sliding_window_deep_prompt_equals_peft_prefix_tuning(family, dirs, tmp_path):
    """The prefix falls out of a query's window where PEFT's cache of length P puts it (before the fix it was
    visible to every query: 3.5 to 4.9 apart on Mistral)."""
    assert peft_prefix_gap(dirs[family], tmp_path / "ours") < TOLERANCE
    assert deep_peft_to_ours(dirs[family], tmp_path / "peft") < TOLERANCE


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2"])
def test_sliding_window_shallow_prompt_equals_the_deep_prompt_built_from_it(family, dirs):
    """A shallow prompt's virtual tokens leave the window as the deep prompt's slots do."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    backbone = load_backbone(dirs[family], "verbalizer", num_labels=2)
    shallow = PromptModel(backbone, "verbalizer", 2, LABEL_WORDS, TEMPLATE)
    params = shallow.init_params(3, "random", torch.Generator().manual_seed(2))
    deep = PromptModel(backbone, "verbalizer", 2, LABEL_WORDS, TEMPLATE, prompt_type="deep")
    deep_params = {"prompt": deep.deep_from_shallow(params["prompt"])}
    assert (shallow.predict(TEXTS, params) - deep.predict(TEXTS, deep_params)).abs().max() < TOLERANCE


def test_alibi_falcon_deep_prompt_is_refused_and_rotary_falcon_equals_peft(dirs, tmp_path, open_cell):
    """ALiBi: the model biases only the text's keys (3.7e-2 from PEFT before the refusal). Rotary Falcon: PEFT's."""
    open_cell("falcon", "deep", "verbalizer")
    with pytest.raises(ValueError) as error:
        deep_model(dirs["falcon-alibi"], "verbalizer")
    assert "\n" not in str(error.value) and "ALiBi" in str(error.value) and "--prompt-type shallow" in str(error.value)
    assert peft_prefix_gap(dirs["falcon"], tmp_path / "ours") < TOLERANCE


def test_opt_verbalizer_equals_peft_prompt_and_prefix_tuning(dirs, tmp_path):
    """OPTForCausalLM's forward calls self.model.decoder: the head view's stand-in answers for it."""
    import transformers
    from peft import PeftModel

    from conftest import build_model
    from ptp_core.checkpoint import save_checkpoint

    model = build_model(dirs["opt"], "verbalizer", seed=3, prompt_length=3)
    meta = {"model": dirs["opt"], "head": "verbalizer", "kind": "causal", "label_words": LABEL_WORDS,
            "template": TEMPLATE, "num_labels": 2}
    out = save_checkpoint(tmp_path / "shallow", model.params, meta, None, model.backbone.config)
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(dirs["opt"]), out).eval()
    assert (model.predict(TEXTS) - peft_logits(peft_model, model, TEXTS)).abs().max() < TOLERANCE
    assert peft_prefix_gap(dirs["opt"], tmp_path / "deep") < TOLERANCE


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "mistral"])
def test_left_padded_deep_batch_equals_one_example_at_a_time_and_peft(family, dirs, tiny_dirs, tmp_path):
    """A left-padded batch (as a Trainer's collator pads for a decoder): each row's text gets the positions it has
    alone, P + cumsum(mask) - 1, and a sliding window does not count its padding (OPT before: 0.21 apart)."""
    import transformers
    from peft import PeftModel

    from ptp_core.checkpoint import save_checkpoint
    from ptp_core.hf import batch_from_inputs
    from ptp_core.model.templates import render

    directory = dirs[family] if family in dirs else tiny_dirs[family]
    model = deep_model(directory, "verbalizer", seed=4)
    prompted = [render(model.tokenizer, text, model.template, model.head, model.kind)[0] for text in TEXTS]
    model.tokenizer.padding_side = "left"
    try:
        inputs = dict(model.tokenizer(prompted, padding=True, return_tensors="pt"), labels=torch.zeros(len(TEXTS)))
    finally:
        model.tokenizer.padding_side = "right"
    assert (inputs["attention_mask"][:, 0] == 0).any()  # some rows are left-padded
    with torch.no_grad():
        batched = model.logits(dict(model.params), batch_from_inputs(model, inputs))
    alone = torch.cat([model.predict([text]) for text in TEXTS])
    meta = {"model": directory, "head": "verbalizer", "kind": "causal", "label_words": LABEL_WORDS,
            "template": TEMPLATE, "num_labels": 2, "prompt_type": "deep"}
    out = save_checkpoint(tmp_path / "ours", model.params, meta, None, model.backbone.config)
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory), out).eval()
    assert (batched - alone).abs().max() < TOLERANCE
    assert (batched - peft_logits(peft_model, model, TEXTS)).abs().max() < TOLERANCE


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_modernbert_classifier_pools_over_real_tokens_as_peft_does(pooling, dirs, tmp_path):
    """The head gets the attention mask, prompt columns included (mean pooling averaged over padding before: 0.04
    in loss between a batch of 16 and one example at a time)."""
    from test_families import ours_to_peft, peft_saved_to_ours

    from conftest import build_model

    directory = dirs[f"modernbert-{pooling}"]
    model = build_model(directory, "classifier", seed=1, prompt_length=3)
    with torch.no_grad():
        batched = model.logits(dict(model.params), model.encode(TEXTS))
    alone = torch.cat([model.predict([text]) for text in TEXTS])
    assert (batched - alone).abs().max() < 1e-5
    assert ours_to_peft(directory, "classifier", tmp_path) < 1e-5
    assert peft_saved_to_ours(directory, tmp_path) < 1e-5


def reference_modernbert_logits(model, prompt: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(N, C) ModernBERT's classifier with the prefix written out in float64: slot j at position j, the text from
    P on (rotary), keys after RoPE as stored; a local layer keeps a key within config.sliding_window positions of
    the query (the prefix slots included), a global one every real key; pooling over the real text tokens."""
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    task_model, base, config, batch, layers = prefix_reference_inputs(model, prompt, texts)
    (rows, width), length = batch.input_ids.shape, prompt.shape[0]
    heads, dim = layers.shape[3], layers.shape[4]
    real = torch.cat([torch.ones(rows, length, dtype=torch.bool), batch.attention_mask.bool()], 1)  # (N, P+T)
    spots = torch.arange(length + width)  # (P+T,) the prefix slots, then the text
    distance = (spots[length:, None] - spots[None, :]).abs()  # (T, P+T)
    positions = torch.arange(length, length + width)[None]  # (1, T)
    hidden = base.embeddings(inputs_embeds=base.embeddings.tok_embeddings(batch.input_ids))
    for index, layer in enumerate(base.layers):
        local = layer.attention_type == "sliding_attention"
        keep = real[:, None, None, :] & ((distance <= config.sliding_window) if local else True)  # (N, 1, T, P+T)
        qkv = layer.attn.Wqkv(layer.attn_norm(hidden)).view(rows, width, 3, heads, dim)
        query, key, value = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (N, H, T, d) each
        cos, sin = base.rotary_emb(hidden, positions, layer.attention_type)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys = torch.cat([layers[:, index, 0].permute(1, 0, 2).expand(rows, -1, -1, -1), key], 2)  # (N, H, P+T, d)
        values = torch.cat([layers[:, index, 1].permute(1, 0, 2).expand(rows, -1, -1, -1), value], 2)
        scores = (query @ keys.transpose(-1, -2) / dim ** 0.5).masked_fill(~keep, float("-inf"))
        weights = scores.softmax(-1).nan_to_num(0.0)  # a padding query far past the text sees no key at all
        context = (weights @ values).transpose(1, 2).reshape(rows, width, -1)  # (N, T, H*d)
        hidden = hidden + layer.attn.Wo(context)
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
    hidden = base.final_norm(hidden)
    if config.classifier_pooling == "mean":
        mask = batch.attention_mask.to(hidden.dtype).unsqueeze(-1)  # (N, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    else:
        pooled = hidden[:, 0]
    return task_model.classifier(task_model.head(pooled))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_modernbert_deep_prompt_equals_an_explicit_float64_attention(pooling, dirs, open_cell):
    """Local layers keep a prefix slot within their window, as they would the token at its position."""
    open_cell("modernbert", "deep", "classifier")
    directory = dirs[f"modernbert-{pooling}"]
    gaps = {}
    for dtype in (torch.float64, torch.float32):
        model = deep_model(directory, "classifier", seed=4, dtype=dtype)
        params = {"prompt": model.params["prompt"], **{k: v.to(dtype) for k, v in model.head_params().items()}}
        with torch.no_grad():
            ours = model.logits(params, model.encode(TEXTS)).double()
            if dtype == torch.float64:
                expected = reference_modernbert_logits(model, params["prompt"], TEXTS)
                # the same reference with every slot visible to every query must differ: the window matters
                config = model.backbone.config
                saved, config.sliding_window = config.sliding_window, 10 ** 6
                unwindowed = reference_modernbert_logits(model, params["prompt"], TEXTS)
                config.sliding_window = saved
        gaps[dtype] = float((ours - expected).abs().max())
    assert gaps[torch.float64] < 1e-10 and gaps[torch.float32] < 1e-5
    assert float((unwindowed - expected).abs().max()) > 1e-3


def test_gradient_checkpointing_with_a_deep_prompt_is_refused_in_one_line(tiny_dirs, tmp_path):
    """Recomputation in backward runs outside the forward that hands the layers their prefix, so it would attend
    without it (CheckpointError, or a prefix without gradient): refused while grad is on, also inside Trainer."""
    from test_hf import LABELS, prefix_peft_model, toy_dataset, trainer_for, train_on

    model = deep_model(tiny_dirs["llama"], "classifier", seed=5)
    batch = model.encode(TEXTS, [0, 1, 1, 0, 1])
    model.backbone.gradient_checkpointing_enable()
    try:
        with torch.no_grad():
            model.loss(dict(model.params), batch)  # evaluation recomputes nothing: allowed
        prompt = model.params["prompt"].clone().requires_grad_(True)
        with pytest.raises(ValueError) as error:
            model.loss({**model.params, "prompt": prompt}, batch)
        assert "\n" not in str(error.value) and "gradient checkpointing" in str(error.value)
    finally:
        model.backbone.gradient_checkpointing_disable()
    peft, tokenizer = prefix_peft_model(tiny_dirs["gpt2"])
    trainer = trainer_for(peft, tokenizer, tmp_path, "pt", trainer=dict(label_words=LABEL_WORDS), max_steps=1,
                          gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        train_on(trainer, toy_dataset(tokenizer, TEXTS, LABELS[:len(TEXTS)]), tokenizer)


def test_multiple_choice_on_a_sequence_classifier_folder_gets_a_fresh_head_and_says_so(dirs):
    """COPA on a folder holding a 2-output classifier: HF's ForMultipleChoice needs one score per candidate; the
    body is the folder's, the head is fresh, and one warning line says so."""
    import transformers
    from safetensors.torch import load_file

    from ptp_core.model.backbones import load_backbone

    directory = dirs["bert-2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = load_backbone(directory, "classifier", num_labels=2, choices=2)
    assert isinstance(backbone.model, transformers.BertForMultipleChoice)
    assert backbone.model.classifier.weight.shape == (1, 32)
    saved = load_file(f"{directory}/model.safetensors")
    assert all(torch.equal(value, saved[f"bert.{name}"]) for name, value in backbone.model.bert.state_dict().items()
               if f"bert.{name}" in saved)
    assert len(backbone.notes) == 1 and "multiple-choice head" in backbone.notes[0] and "\n" not in backbone.notes[0]
    assert [str(w.message) for w in caught if "multiple-choice" in str(w.message)] == list(backbone.notes)
    assert json.loads(open(f"{directory}/config.json").read())["architectures"] == ["BertForSequenceClassification"]


def test_a_commands_warning_is_one_line(capsys):
    """What loading changed (a head replaced) reaches the command line as one line, not Python's two."""
    from ptp_core import cli

    def main(argv):
        warnings.warn("a fresh multiple-choice head replaces the folder's classifier\n(second line)", stacklevel=2)

    cli.run(main, [])
    assert capsys.readouterr().err.splitlines() == [
        "warning: a fresh multiple-choice head replaces the folder's classifier"]
