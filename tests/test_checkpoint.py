"""PEFT-compatible checkpoints: bitwise round trip, PEFT loads ours, we load PEFT's."""
import json

import pytest
import torch

from ptp_core.checkpoint import load_checkpoint, save_checkpoint
from ptp_core.model.templates import render


def _save(model, path, **meta):
    meta = {"model": model.model_path, "head": model.head, "kind": model.kind, "label_words": model.label_words,
            "template": model.template, "num_labels": 2, "method": "pt", "seed": 0, **meta}
    trajectory = {"prompts": torch.stack([model.params["prompt"]] * 3), "steps": torch.tensor([0, 1, 2])}
    return save_checkpoint(path, model.params, meta, trajectory, model.backbone.config)


def test_save_load_bitwise(tiny_bert_model, tmp_path):
    out = _save(tiny_bert_model, tmp_path / "ckpt")
    loaded = load_checkpoint(out)
    assert loaded.params.keys() == tiny_bert_model.params.keys()
    for k, v in tiny_bert_model.params.items():
        assert torch.equal(loaded.params[k], v)
    assert loaded.trajectory["prompts"].shape == (3, 4, 32)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp directory
    rebuilt = loaded.build_model()
    texts = ["good movie", "dull plot"]
    torch.testing.assert_close(rebuilt.predict(texts), tiny_bert_model.predict(texts))


def _peft_base(model, arch_dir):
    import transformers

    if model.head == "classifier":
        config = transformers.AutoConfig.from_pretrained(arch_dir)
        config.num_labels = 2
        return transformers.AutoModelForSequenceClassification.from_pretrained(arch_dir, config=config)
    return transformers.AutoModelForCausalLM.from_pretrained(arch_dir)


@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("gpt2", "verbalizer"), ("llama", "verbalizer")])
def test_peft_loads_our_checkpoint(arch, head, tiny_dirs, tmp_path, tiny_batch_texts):
    from peft import PeftModel

    from conftest import build_model

    model = build_model(tiny_dirs[arch], head, seed=3)
    out = _save(model, tmp_path / "ckpt")
    peft_model = PeftModel.from_pretrained(_peft_base(model, tiny_dirs[arch]), out).eval()
    texts = tiny_batch_texts[0]
    ours = model.predict(texts)
    for i, text in enumerate(texts):  # one at a time: PEFT pads differently
        rendered, _ = render(model.tokenizer, text, model.template, model.head, model.kind)
        inputs = model.tokenizer(rendered, return_tensors="pt")
        with torch.no_grad():
            logits = peft_model(**inputs).logits
        if head == "verbalizer":
            logits = logits[:, -1, model.label_ids]
        torch.testing.assert_close(logits[0], ours[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("gpt2", "verbalizer")])
def test_we_load_a_peft_saved_checkpoint(arch, head, tiny_dirs, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from conftest import build_model

    reference = build_model(tiny_dirs[arch], head)
    torch.manual_seed(5)
    task_type = TaskType.SEQ_CLS if head == "classifier" else TaskType.CAUSAL_LM
    peft_model = get_peft_model(_peft_base(reference, tiny_dirs[arch]),
                                PromptTuningConfig(task_type=task_type, num_virtual_tokens=3)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ckpt = load_checkpoint(tmp_path / "peft")
    assert ckpt.params["prompt"].shape == (3, 32)
    model = ckpt.build_model(label_words=["negative", "positive"], template="{text} It was {mask}.")
    text = "good movie"
    inputs = model.tokenizer(render(model.tokenizer, text, model.template, model.head, model.kind)[0],
                             return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    expected = expected[0] if head == "classifier" else expected[0, -1, model.label_ids]
    torch.testing.assert_close(model.predict([text])[0], expected, rtol=1e-4, atol=1e-5)


LM_EXAMPLES = [{"text": "the movie was really good and the acting superb", "target": "good film"},
               {"text": "dull", "target": "the plot was boring and the story quite weak"}]


@pytest.mark.parametrize("arch,task_type,peft_type", [("gpt2", "CAUSAL_LM", "PROMPT_TUNING"),
                                                      ("llama", "CAUSAL_LM", "PREFIX_TUNING"),
                                                      ("t5", "SEQ_2_SEQ_LM", "PROMPT_TUNING")])
def test_a_peft_saved_lm_adapter_loads_as_head_lm_with_peft_labels_loss(arch, task_type, peft_type, tiny_dirs,
                                                                        family_dirs, tmp_path):
    import transformers
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from families import labels_inputs

    folder = tiny_dirs.get(arch) or family_dirs[arch]
    kind = "seq2seq" if task_type == "SEQ_2_SEQ_LM" else "causal"
    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    config = (PrefixTuningConfig if peft_type == "PREFIX_TUNING" else PromptTuningConfig)(task_type=task_type,
                                                                                          num_virtual_tokens=3)
    torch.manual_seed(5)  # PEFT's own random init
    peft_model = get_peft_model(auto.from_pretrained(folder), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    template = "Review : {text} It was {mask}"
    model = load_checkpoint(tmp_path / "peft", head="lm").build_model("cpu", template=template)
    with torch.no_grad():
        ours = float(model.loss(dict(model.params), model.encode(LM_EXAMPLES)).mean())
        inputs = labels_inputs(model.tokenizer, kind, [f"Review : {e['text']} It was" for e in LM_EXAMPLES],
                               [e["target"] for e in LM_EXAMPLES])
        expected = float(peft_model(**inputs).loss)
    assert model.head == "lm" and model.prompt_type == ("deep" if peft_type == "PREFIX_TUNING" else "shallow")
    assert abs(ours - expected) < 1e-5, (ours, expected)


def test_bad_checkpoints(tiny_bert_model, tmp_path):
    out = _save(tiny_bert_model, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(out)
    weights.write_bytes(data)
    (out / "ptp.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(out)
    (out / "ptp.json").write_text(json.dumps({"model": "minilm", "head": "classifier", "num_labels": 2}))
    with pytest.raises(ValueError, match="shallow prompt of width 32 but model 'minilm' needs 384"):
        load_checkpoint(out).build_model()
    (out / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_checkpoint(out)


def test_params_hash_and_the_named_task(tiny_bert_model, toy_csv, tmp_path):
    from ptp_core.checkpoint import params_hash

    out = _save(tiny_bert_model, tmp_path / "ckpt", task=toy_csv, label_names=["negative", "positive"])
    ckpt = load_checkpoint(out)
    assert ckpt.content_hash() == params_hash(ckpt.params) == params_hash(dict(tiny_bert_model.params))
    shifted = {**ckpt.params, "prompt": ckpt.params["prompt"] + 1}
    assert params_hash(shifted) != ckpt.content_hash()
    task = ckpt.task()
    assert task.label_names == ["negative", "positive"] and task.label_words == ["negative", "positive"]
    unnamed = load_checkpoint(_save(tiny_bert_model, tmp_path / "unnamed"))
    with pytest.raises(ValueError, match="does not name its task"):
        unnamed.task()
    assert unnamed.task(toy_csv).sizes() == task.sizes()
