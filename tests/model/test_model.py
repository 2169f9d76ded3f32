"""The one loss: prompt prepending, stacking, heads against HF's own forward, predict."""
import copy

import pytest
import torch


def _batch(model, texts_labels):
    texts, labels = texts_labels
    return model.encode(texts, labels)


def test_encode_marks_only_text_tokens(tiny_bert_model, tiny_batch_texts):
    batch = _batch(tiny_bert_model, tiny_batch_texts)
    tokenizer = tiny_bert_model.tokenizer
    for row, text in zip(range(len(batch)), tiny_batch_texts[0]):
        ids = batch.input_ids[row][batch.text_mask[row]].tolist()
        assert tokenizer.decode(ids) == text  # exactly the text's tokens, no [CLS]/[SEP]/padding
        assert batch.attention_mask[row].sum() == len(text.split()) + 2


def test_prompt_is_prepended_with_extended_mask(tiny_bert_model, tiny_batch_texts):
    """Padding must be invisible: each example alone gives the same loss as inside a padded batch."""
    model = tiny_bert_model
    batch = _batch(model, tiny_batch_texts)
    assert batch.input_ids.shape[1] == batch.attention_mask.sum(1).max()
    together = model.loss(model.params, batch)
    alone = torch.stack([model.loss(model.params, model.encode([t], [y]))[0] for t, y in zip(*tiny_batch_texts)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert model.logits(model.params, batch).shape == (len(batch), 2)


@pytest.mark.parametrize("name", ["tiny_bert_model", "tiny_gpt2_model"])
def test_stacked_params_equal_a_loop(name, request, tiny_batch_texts):
    model = request.getfixturevalue(name)
    batch = _batch(model, tiny_batch_texts)
    gen = torch.Generator().manual_seed(1)
    variants = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.params.items()} for _ in range(3)]
    stacked = {"prompt": torch.stack([v["prompt"] for v in variants])}  # (G, P, D), head shared
    stacked.update({k: v for k, v in model.params.items() if k != "prompt"})
    loop = torch.stack([model.loss({**model.params, "prompt": v["prompt"]}, batch) for v in variants])
    torch.testing.assert_close(model.loss(stacked, batch), loop, rtol=1e-5, atol=1e-6)
    if name == "tiny_bert_model":  # stacked heads too (--params all)
        full = {k: torch.stack([v[k] for v in variants]) for k in model.params}
        loop = torch.stack([model.loss(v, batch) for v in variants])
        torch.testing.assert_close(model.loss(full, batch), loop, rtol=1e-5, atol=1e-6)


def test_classifier_head_equals_hf_forward(tiny_bert_model, tiny_batch_texts):
    model = tiny_bert_model
    batch = _batch(model, tiny_batch_texts)
    hf = copy.deepcopy(model.backbone)
    hf.classifier.weight.data.copy_(model.params["classifier.weight"])
    hf.classifier.bias.data.copy_(model.params["classifier.bias"])
    prompt = model.params["prompt"].expand(len(batch), -1, -1)
    embeds = torch.cat([prompt, model.embed(batch)], 1)
    mask = torch.cat([torch.ones(len(batch), prompt.shape[1], dtype=torch.long), batch.attention_mask], 1)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(model.logits(model.params, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,head_class", [("gpt2", "AutoModelForCausalLM"), ("llama", "AutoModelForCausalLM"),
                                             ("bert", "AutoModelForMaskedLM")])
def test_trimmed_verbalizer_equals_full_logits(arch, head_class, tiny_dirs, tiny_batch_texts):
    import transformers
    from conftest import build_model

    model = build_model(tiny_dirs[arch], "verbalizer")
    batch = _batch(model, tiny_batch_texts)
    full_model = getattr(transformers, head_class).from_pretrained(tiny_dirs[arch]).eval()
    prompt = model.params["prompt"].expand(len(batch), -1, -1)
    embeds = torch.cat([prompt, model.embed(batch)], 1)
    mask = torch.cat([torch.ones(len(batch), prompt.shape[1], dtype=torch.long), batch.attention_mask], 1)
    with torch.no_grad():
        full = full_model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, P+T, V)
    rows = torch.arange(len(batch))
    expected = full[rows, prompt.shape[1] + batch.answer_index][:, model.label_ids]
    torch.testing.assert_close(model.logits(model.params, batch), expected, rtol=1e-4, atol=1e-5)
    if arch == "bert":
        assert (batch.input_ids[rows, batch.answer_index] == model.tokenizer.mask_token_id).all()


def test_input_perturbation_touches_text_tokens_only(tiny_bert_model, tiny_batch_texts):
    model = tiny_bert_model
    batch = _batch(model, tiny_batch_texts)
    zero = torch.zeros(*batch.input_ids.shape, model.embedding_dim)
    torch.testing.assert_close(model.loss(model.params, batch, zero), model.loss(model.params, batch))
    noise = torch.randn(zero.shape, generator=torch.Generator().manual_seed(0))
    outside = noise * (~batch.text_mask).unsqueeze(-1)
    torch.testing.assert_close(model.loss(model.params, batch, outside), model.loss(model.params, batch))
    assert not torch.allclose(model.loss(model.params, batch, noise), model.loss(model.params, batch))
    stacked = torch.stack([zero, noise])  # (G, B, T, D)
    assert model.loss(model.params, batch, stacked).shape == (2, len(batch))


def test_predict_matches_logits(tiny_gpt2_model, tiny_batch_texts):
    model = tiny_gpt2_model
    texts, _ = tiny_batch_texts
    out = model.predict(texts, batch_size=4)
    assert out.shape == (len(texts), 2)
    torch.testing.assert_close(out, model.logits(model.params, model.encode(texts)).detach())


@pytest.mark.parametrize("init", ["random", "vocab", "text", "label_words"])
def test_prompt_inits(init, tiny_bert_model):
    gen = torch.Generator().manual_seed(0)
    prompt = tiny_bert_model.init_prompt(5, init, gen, text="good movie")
    assert prompt.shape == (5, tiny_bert_model.embedding_dim) and torch.isfinite(prompt).all()
    if init != "random":  # rows are real vocabulary embeddings
        table = tiny_bert_model.backbone.get_input_embeddings().weight
        assert all((table == row).all(1).any() for row in prompt)


def test_backbone_is_frozen(tiny_bert_model, tiny_batch_texts):
    model = tiny_bert_model
    params = {k: v.clone().requires_grad_(True) for k, v in model.params.items()}
    model.loss(params, _batch(model, tiny_batch_texts)).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(v.grad is not None for v in params.values())
    assert not model.backbone.training


def test_params_are_read_only_and_with_params_copies_nothing(tiny_bert_model):
    model = tiny_bert_model
    with pytest.raises(TypeError):
        model.params["prompt"] = torch.zeros(1)
    with pytest.raises(AttributeError):
        model.params = {}
    other = model.with_params({k: v + 1 for k, v in model.params.items()})
    assert other.backbone is model.backbone and not torch.equal(other.params["prompt"], model.params["prompt"])
    texts = ["good movie", "dull plot"]
    torch.testing.assert_close(other.predict(texts), model.predict(texts, params=dict(other.params)))


@pytest.mark.parametrize("by_length", [False, True])
def test_batch_split_covers_every_example_once_with_its_stored_index(tiny_bert_model, by_length):
    from ptp_core.tasks.task import Split
    from ptp_core.model.encoding import batch_split

    model = tiny_bert_model
    split = Split(["a fine film", "dull", "a long and winding but good movie", "bad", "good"], [1, 0, 1, 0, 1])
    batches, order = batch_split(model, split, 2, by_length=by_length)
    assert sorted(i for rows in order for i in rows) == list(range(len(split)))
    for batch, rows in zip(batches, order):
        expected = model.encode([split.texts[i] for i in rows], [split.labels[i] for i in rows])
        assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.labels, expected.labels)
    lengths = [int(n) for batch in batches for n in batch.attention_mask.sum(1)]
    if by_length:  # sorted by token count, ties in stored order
        assert lengths == sorted(lengths) and order[1] == [4, 0]
    else:
        assert order == [[0, 1], [2, 3], [4]]
