"""Deep prompts (per-layer prefix keys and values): PEFT's prefix tuning on decoders (both directions), an
explicit float64 attention with the prefix concatenated on encoders, shallow == deep built from it on decoders,
stacking, double backward, grouped-query heads, checkpoints in PEFT's PREFIX_TUNING format."""
import json

import pytest
import torch

from conftest import WORDS, make_tokenizer, toy_rows
from ptp_core.checkpoint import load_checkpoint, save_checkpoint
from ptp_core.templates import render

TEXTS = [r["text"] for r in toy_rows(4, seed=12)] + ["good"]  # different lengths: right padding in our batch
LABEL_WORDS = ["negative", "positive"]
TEMPLATE = "{text} It was {mask}."


def deep_model(directory: str, head: str, seed: int = 0, length: int = 3, dtype=torch.float32):
    """PromptModel with a random deep prompt (and head) at the scale of a trained one."""
    from ptp_core.backbones import load_backbone
    from ptp_core.model import PromptModel

    backbone = load_backbone(directory, head, num_labels=2, dtype=dtype)
    model = PromptModel(backbone, head, 2, LABEL_WORDS, TEMPLATE if head == "verbalizer" else "{text}",
                        prompt_type="deep")
    params = model.init_params(length, "random", torch.Generator().manual_seed(seed))
    noise = torch.Generator().manual_seed(seed + 1)
    params["prompt"] = params["prompt"] + 0.3 * torch.randn(params["prompt"].shape, generator=noise)
    return model.with_params({k: v.to(dtype) for k, v in params.items()})


@pytest.fixture(scope="module")
def causal_dirs(tiny_dirs, tmp_path_factory):
    """Causal LMs for PEFT's CAUSAL_LM prefix tuning: GPT-2, Llama (grouped-query: 1 key/value head of 2), Qwen2."""
    import transformers

    root = tmp_path_factory.mktemp("causal")
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(make_tokenizer("bpe")), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=0, initializer_range=0.3))
    qwen.save_pretrained(root / "qwen2")
    make_tokenizer("bpe").save_pretrained(root / "qwen2")
    return {"gpt2": tiny_dirs["gpt2"], "llama": tiny_dirs["llama"], "qwen2": str(root / "qwen2")}


def peft_label_logits(peft_model, model, texts: list[str]) -> torch.Tensor:
    """(N, C) label-word logits at the answer position from PEFT's forward, one unpadded example at a time."""
    rows = []
    for text in texts:
        inputs = model.tokenizer(render(model.tokenizer, text, model.template, model.head, model.kind)[0],
                                 return_tensors="pt")
        with torch.no_grad():
            rows.append(peft_model(**inputs).logits[0, -1, model.label_ids])
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_decoder_deep_prompt_agrees_with_peft_prefix_tuning_both_ways(family, causal_dirs, tmp_path):
    import transformers
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    directory = causal_dirs[family]
    # ours -> PEFT
    model = deep_model(directory, "verbalizer", seed=3)
    meta = {"model": directory, "head": "verbalizer", "kind": "causal", "label_words": LABEL_WORDS,
            "template": TEMPLATE, "num_labels": 2, "prompt_type": "deep"}
    out = save_checkpoint(tmp_path / "ours", model.params, meta, None, model.backbone.config)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory), out).eval()
    assert (model.predict(TEXTS) - peft_label_logits(peft_model, model, TEXTS)).abs().max() < 1e-5
    # PEFT -> ours
    torch.manual_seed(7)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory)
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ckpt = load_checkpoint(tmp_path / "peft")
    assert ckpt.prompt_type == "deep"
    ours = ckpt.build_model(label_words=LABEL_WORDS, template=TEMPLATE)
    assert (ours.predict(TEXTS) - peft_label_logits(peft_model, ours, TEXTS)).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_shallow_prompt_equals_the_deep_prompt_built_from_it_on_decoders(family, family_dirs):
    """Causal attention: virtual tokens never see the text, so their keys and values are a cache the text reads."""
    from ptp_core.backbones import load_backbone
    from ptp_core.model import PromptModel

    backbone = load_backbone(family_dirs[family], "classifier", num_labels=2)
    shallow = PromptModel(backbone, "classifier", 2)
    params = shallow.init_params(3, "random", torch.Generator().manual_seed(2))
    deep = PromptModel(backbone, "classifier", 2, prompt_type="deep")  # the same backbone: shallow still runs
    deep_params = {**params, "prompt": deep.deep_from_shallow(params["prompt"])}
    assert deep_params["prompt"].shape == (3, deep.prompt_width)
    assert (shallow.predict(TEXTS, params) - deep.predict(TEXTS, deep_params)).abs().max() < 1e-5
