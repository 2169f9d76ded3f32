"""Examples with named fields and multiple choice: what PEFT and HF compute, against explicit references.

Pairs go through the tokenizer as HF encodes them (segment ids included) and agree with PEFT's SEQ_CLS forward;
multiple-choice scores agree with HF's own ForMultipleChoice forward and with a brute-force log-probability sum.
"""
import pytest
import torch

from conftest import toy_rows
from ptp_core.model.backbones import load_backbone
from ptp_core.model.prompt_model import PromptModel
from ptp_core.model.templates import template_row

TOLERANCE = 1e-5
PAIRS = [{"premise": r["text"], "hypothesis": s["text"]} for r, s in zip(toy_rows(4, 21), toy_rows(4, 22))]
PAIR_LABELS = [0, 1, 1, 0]
CHOICE_EXAMPLES = [{"premise": r["text"], "connector": "and", "choices": ["good fun", "dull"]} for r in toy_rows(3, 23)]
CHOICE_LABELS = [0, 1, 0]


def _model(directory: str, head: str, template: str = "{text}", choices: int = 0, prompt_length: int = 3,
           num_labels: int = 2, label_words=("negative", "positive")) -> PromptModel:
    backbone = load_backbone(directory, head, num_labels=num_labels, choices=choices)
    model = PromptModel(backbone, head, num_labels, list(label_words), template, choices=choices)
    return model.with_params(model.init_params(prompt_length, "random", torch.Generator().manual_seed(4)))


def test_pair_uses_the_tokenizers_pair_and_matches_peft_seq_cls(tiny_dirs, tmp_path):
    """BERT pair: [CLS] a [SEP] b [SEP] with segment ids 1 on b, virtual tokens segment 0, as PEFT's forward."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ptp_core.checkpoint import save_checkpoint

    model = _model(tiny_dirs["bert"], "classifier")
    batch = model.encode(PAIRS, PAIR_LABELS)
    reference = model.tokenizer([p["premise"] for p in PAIRS], [p["hypothesis"] for p in PAIRS], padding=True)
    assert batch.input_ids.tolist() == reference["input_ids"]
    assert batch.token_type_ids.tolist() == reference["token_type_ids"] and batch.token_type_ids.sum() > 0
    meta = {"model": tiny_dirs["bert"], "head": "classifier", "kind": model.kind, "label_words": ["negative", "positive"],
            "template": "{text}", "num_labels": 2, "method": "pt", "seed": 0}
    out = save_checkpoint(tmp_path / "ours", model.params, meta, None, model.backbone.config)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"], num_labels=2).eval()
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        for i, pair in enumerate(PAIRS):  # one unpadded example at a time: PEFT's own forward
            inputs = model.tokenizer(pair["premise"], pair["hypothesis"], return_tensors="pt")
            expected = peft_model(**inputs).logits[0]
            assert (model.logits(dict(model.params), model.encode([pair]))[0] - expected).abs().max() < TOLERANCE
        zeros = model.logits(dict(model.params), type(batch)(**{**batch.__dict__,
                                                                 "token_type_ids": torch.zeros_like(batch.token_type_ids)}))
        assert (zeros - model.logits(dict(model.params), batch)).abs().max() > 1e-4  # the segments are used


def test_template_with_fields_masks_fields_only_and_truncates_the_longest_first(tiny_dirs):
    model = _model(tiny_dirs["bert"], "verbalizer", template="{premise} . Review : {mask} , {hypothesis}")
    example = {"premise": "the movie was good", "hypothesis": "dull"}
    batch = model.encode([example], [1])
    words = model.tokenizer.convert_ids_to_tokens(batch.input_ids[0][batch.text_mask[0]].tolist())
    assert words == ["the", "movie", "was", "good", "dull"]  # every field's tokens, none of the template's
    assert batch.input_ids[0, batch.answer_index[0]] == model.tokenizer.mask_token_id
    long = {"premise": " ".join(["the movie"] * 20), "hypothesis": "dull and boring"}
    row, _, positions = template_row(model.tokenizer, long, "{premise} . Review : [MASK] , {hypothesis}",
                                     "verbalizer", "masked", max_length=16)
    kept = model.tokenizer.convert_ids_to_tokens(row.ids)
    assert len(row.ids) == 16 and kept[-4:] == ["dull", "and", "boring", "[SEP]"]  # the short field is whole
    assert kept[1:len(positions["premise"]) + 1] == (["the", "movie"] * 20)[:len(positions["premise"])]
    assert ["Review", ":", "[MASK]"] == kept[len(positions["premise"]) + 2:len(positions["premise"]) + 5]


def _choice_reference_mc(model: PromptModel, examples, params) -> torch.Tensor:
    """(B, K) from HF's own ForMultipleChoice forward on (B, K, P+T) inputs, prompts prepended by hand."""
    rows = [model.tokenizer(" ".join(v for k, v in e.items() if k != "choices"), c) for e in examples
            for c in e["choices"]]
    width = max(len(r["input_ids"]) for r in rows)
    prompt = params["prompt"]
    embeds, masks, types = [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        ids = torch.tensor(r["input_ids"] + [model.tokenizer.pad_token_id] * pad)
        embeds.append(torch.cat([prompt, model.backbone.get_input_embeddings()(ids)]))
        masks.append(torch.tensor([1] * (len(prompt) + len(r["input_ids"])) + [0] * pad))
        types.append(torch.tensor([0] * len(prompt) + r["token_type_ids"] + [0] * pad))
    k = len(examples[0]["choices"])
    shape = (len(examples), k)
    head = {n: v for n, v in params.items() if n != "prompt"}
    original = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if n in head}
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if n in head:
                p.copy_(head[n])
        out = model.backbone(inputs_embeds=torch.stack(embeds).reshape(*shape, width + len(prompt), -1),
                             attention_mask=torch.stack(masks).reshape(*shape, -1),
                             token_type_ids=torch.stack(types).reshape(*shape, -1)).logits
        for n, p in model.backbone.named_parameters():
            if n in original:
                p.copy_(original[n])
    return out


def test_multiple_choice_classifier_is_hfs_own_multiple_choice_head(tiny_dirs):
    model = _model(tiny_dirs["bert"], "classifier", choices=2)
    assert type(model.backbone).__name__ == "BertForMultipleChoice"
    batch = model.encode(CHOICE_EXAMPLES, CHOICE_LABELS)
    assert batch.rows == 6 and len(batch) == 3 and batch.choices == 2
    params = {k: v + 0.1 for k, v in model.params.items()}  # a trained-looking head, not the loaded one
    ours = model.logits(params, batch)
    assert ours.shape == (3, 2)
    assert (ours - _choice_reference_mc(model, CHOICE_EXAMPLES, params)).abs().max() < TOLERANCE
    torch.testing.assert_close(model.loss(params, batch),
                               torch.nn.functional.cross_entropy(ours, batch.labels, reduction="none"))


def _brute_force_causal(model: PromptModel, examples, template: str) -> torch.Tensor:
    """(B, K): full-vocabulary logits at every position of prompt + context + candidate, summed by hand."""
    out = []
    for example in examples:
        scores = []
        for candidate in example["choices"]:
            context = template.split("{choice}")[0].format(**{k: v for k, v in example.items() if k != "choices"})
            text = context + candidate
            ids = model.tokenizer(text).input_ids
            start = len(model.tokenizer(context.rstrip()).input_ids)
            embeds = torch.cat([model.params["prompt"], model.backbone.get_input_embeddings()(torch.tensor(ids))])
            with torch.no_grad():
                logits = model.backbone(inputs_embeds=embeds.unsqueeze(0)).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
            p = len(model.params["prompt"])
            scores.append(sum(log_probs[p + t - 1, ids[t]] for t in range(start, len(ids))))
        out.append(torch.stack(scores))
    return torch.stack(out).float()


def test_causal_lm_scores_each_candidate_by_its_log_probability(tiny_dirs):
    template = "{premise} {connector} {choice}"
    model = _model(tiny_dirs["gpt2"], "verbalizer", template=template, choices=2)
    batch = model.encode(CHOICE_EXAMPLES, CHOICE_LABELS)
    ours = model.logits(dict(model.params), batch)
    torch.testing.assert_close(ours, _brute_force_causal(model, CHOICE_EXAMPLES, template), rtol=1e-5, atol=1e-5)
    stacked = {"prompt": torch.stack([model.params["prompt"], model.params["prompt"] * 0.5])}  # (G, P, D)
    loop = torch.stack([model.loss({"prompt": p}, batch) for p in stacked["prompt"]])
    torch.testing.assert_close(model.loss(stacked, batch), loop, rtol=1e-5, atol=1e-6)


def test_seq2seq_scores_a_candidate_as_the_decoder_writes_it(family_dirs):
    model = _model(family_dirs["t5"], "verbalizer", template="{premise} {connector} {choice}", choices=2)
    batch = model.encode(CHOICE_EXAMPLES, CHOICE_LABELS)
    ours = model.logits(dict(model.params), batch)
    expected = []
    for example in CHOICE_EXAMPLES:
        ids = model.tokenizer(f"{example['premise']} {example['connector']}").input_ids
        embeds = torch.cat([model.params["prompt"], model.backbone.get_input_embeddings()(torch.tensor(ids))])
        for candidate in example["choices"]:
            labels = torch.tensor([model.tokenizer(candidate, add_special_tokens=False).input_ids])
            with torch.no_grad():
                loss = model.backbone(inputs_embeds=embeds.unsqueeze(0), labels=labels).loss  # mean CE over tokens
            expected.append(-loss * labels.shape[1])
    torch.testing.assert_close(ours.reshape(-1), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_masked_lm_scores_one_token_candidates_and_refuses_longer_ones(tiny_dirs):
    model = _model(tiny_dirs["bert"], "verbalizer", template="{premise} {connector} {choice} .", choices=2)
    examples = [{"premise": "the plot", "connector": "was", "choices": ["good", "dull"]}]
    batch = model.encode(examples, [0])
    scores = model.logits(dict(model.params), batch)
    ids = model.tokenizer("the plot was [MASK] .").input_ids
    embeds = torch.cat([model.params["prompt"], model.backbone.get_input_embeddings()(torch.tensor(ids))])
    with torch.no_grad():
        logits = model.backbone(inputs_embeds=embeds.unsqueeze(0)).logits[0, len(model.params["prompt"]) + 4]
    words = model.tokenizer.convert_tokens_to_ids(["good", "dull"])
    torch.testing.assert_close(scores[0], torch.log_softmax(logits.float(), -1)[words], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="candidate 'good fun' is 2 tokens"):
        model.encode([{"premise": "the plot", "connector": "was", "choices": ["good fun", "dull"]}], [0])


def test_surface_hessian_and_ptp_run_unchanged_on_multiple_choice(tiny_dirs):
    """The K candidates fold into the batch: a surface's centre is the plain loss, the top Hessian eigenvalue of the
    choice loss matches a dense Hessian, and PTP-ADV's input ascent perturbs every candidate row."""
    import numpy as np

    from conftest import one_token_hessian
    from landscape.grid.driver import surface_for_params
    from landscape.grid.spec import SurfaceSpec
    from landscape.hessian import top_eigenvalues
    from ptp_core.tasks.task import Split
    from ptp_core.training.perturb import PerturbConfig, ptp_gradients

    model = _model(tiny_dirs["bert"], "classifier", choices=2)
    split = Split(CHOICE_EXAMPLES, CHOICE_LABELS)
    surface = surface_for_params(model, dict(model.params), split, SurfaceSpec(grid="3", examples=3, span=0.5,
                                                                               dtype="float32"), progress=False)
    batch = model.encode(CHOICE_EXAMPLES, CHOICE_LABELS)
    assert surface.center_loss == pytest.approx(float(model.loss(dict(model.params), batch).mean()), rel=1e-5)
    loss_fn, params, dense = one_token_hessian(model, batch)
    top = top_eigenvalues(loss_fn, params, k=1, seed=0).eigenvalues[0]
    assert top == pytest.approx(float(np.linalg.eigvalsh(dense.numpy())[-1]), rel=1e-3, abs=1e-6)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.params.items()}
    config = PerturbConfig(target="input", reg_warmup=0, reg_ramp=0)
    logged = ptp_gradients(model, params, batch, "ptp-adv", config, torch.Generator().manual_seed(0), 1.0)
    assert np.isfinite(logged["perturbed_loss"]) and all(p.grad is not None for p in params.values())


def _superglue_folder(root, task: str, n_train: int, n_val: int):
    """RTE or COPA in the official layout, in the tiny models' vocabulary (so that candidates differ)."""
    import json

    folder = root / task
    folder.mkdir()
    for split, n, seed in (("train", n_train, 31), ("val", n_val, 32)):
        rows = toy_rows(2 * n, seed)
        if task == "RTE":
            records = [{"premise": a["text"], "hypothesis": b["text"], "idx": i,
                        "label": "entailment" if a["label"] == b["label"] else "not_entailment"}
                       for i, (a, b) in enumerate(zip(rows[::2], rows[1::2]))]
        else:
            records = [{"premise": a["text"] + " .", "choice1": "Good fun .", "choice2": "Dull .", "idx": i,
                        "question": ("cause", "effect")[i % 2], "label": int(a["label"] == "negative")}
                       for i, a in enumerate(rows[:n])]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("task,family,head,method", [("RTE", "bert", "classifier", "ptp-adv"),
                                                     ("COPA", "bert", "classifier", "ptp-rn"),
                                                     ("COPA", "gpt2", "verbalizer", "ptp-adv")])
def test_a_superglue_folder_trains_evaluates_and_draws(task, family, head, method, tiny_dirs, tmp_path, capsys):
    """Pairs and multiple choice end to end: train with PTP, evaluate (same numbers as ptp.json), landscape.plot."""
    import json

    from landscape.cli import plot
    from ptp_core.evaluate import main as evaluate_main
    from ptp_core.train import TrainConfig, train
    folder = _superglue_folder(tmp_path, task, n_train=24, n_val=6)
    out = train(TrainConfig(model=tiny_dirs[family], task=str(folder), head=head, method=method, steps=2,
                            batch_size=4, prompt_length=2, eval_every=2, progress=False, dtype="float32",
                            out=str(tmp_path / "run" / "seed0")))
    meta = json.loads((out / "ptp.json").read_text())
    assert meta["choices"] == (2 if task == "COPA" else 0) and meta["split_sizes"]["test"] == 6
    capsys.readouterr()
    result = evaluate_main([str(out), "--device", "cpu", "--dtype", "float32"])
    assert result["loss"] == pytest.approx(meta["metrics"]["test_loss"], rel=1e-5) and result["n"] == 6
    figures = tmp_path / "figures"
    plot.main([str(out), "--out", str(figures), "--grid", "3", "--examples", "4", "--metric-examples", "4",
               "--metrics", "surface,hessian,sharpness,input,calibration", "--dtype", "float32", "--no-progress"])
    rows = json.loads((figures / "metrics.json").read_text())
    assert rows[0]["center_loss"] == pytest.approx(evaluate_main([str(out), "--examples", "4", "--dtype", "float32",
                                                                  "--device", "cpu"])["loss"], rel=1e-5)
    assert rows[0]["hessian_eigenvalues"][0] > 0 and (figures / "landscape_3d.png").is_file()
