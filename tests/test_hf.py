"""PTP in a user's Hugging Face setup: from_peft gives PEFT's logits, PTPTrainer's loss is our loop's loss.

References are independent of ptp_core.hf: PEFT's own forward (one unpadded example at a time), our loop's
PromptModel built by load_backbone from the model folder, and plain SGD arithmetic.
"""
import pytest
import torch

from conftest import toy_rows
from ptp_core.perturb import PerturbConfig, ptp_gradients
from ptp_core.templates import render

TEXTS = [r["text"] for r in toy_rows(8, seed=11)]
LABELS = [int(r["label"] == "positive") for r in toy_rows(8, seed=11)]
LABEL_WORDS = ["negative", "positive"]
TOLERANCE = 1e-5
NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def peft_model(directory: str, family: str, task_type: str, p_tuning: bool = False, seed: int = 0):
    """A PEFT prompt model on a tiny folder, its trainable tensors moved away from their init; and its tokenizer."""
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    base = auto.from_pretrained(directory, **NO_DROPOUT[family], **({"num_labels": 2} if task_type == "SEQ_CLS" else {}))
    settings = dict(task_type=task_type, num_virtual_tokens=3, token_dim=32, num_layers=2, num_attention_heads=2)
    config = PromptEncoderConfig(**settings, encoder_hidden_size=16) if p_tuning else PromptTuningConfig(**settings)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn_like(parameter))
    return model, AutoTokenizer.from_pretrained(directory)


def peft_class_logits(model, tokenizer, texts: list[str], label_ids: list[int] | None = None) -> torch.Tensor:
    """(N, C) PEFT's forward one unpadded example at a time: SEQ_CLS logits, or label-word logits at the end."""
    rows = []
    with torch.no_grad():
        for text in texts:
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
            rows.append(logits if label_ids is None else logits[-1, label_ids])
    return torch.stack(rows)


@pytest.mark.parametrize("p_tuning", [False, True])
def test_from_peft_classifier_gives_peft_logits(tiny_dirs, p_tuning):
    from ptp_core import from_peft

    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS", p_tuning)
    model, params = from_peft(peft, tokenizer)
    assert model.head == "classifier" and sorted(params) == ["classifier.bias", "classifier.weight", "prompt"]
    ours = model.logits(params, model.encode(TEXTS)).detach()
    difference = (ours - peft_class_logits(peft, tokenizer, TEXTS)).abs().max().item()
    assert difference < TOLERANCE, difference
    assert torch.equal(model.predict(TEXTS), ours)  # the returned model holds the params


def test_from_peft_verbalizer_gives_peft_label_word_logits(tiny_dirs):
    from ptp_core import from_peft

    peft, tokenizer = peft_model(tiny_dirs["gpt2"], "gpt2", "CAUSAL_LM")
    model, params = from_peft(peft, tokenizer, label_words=LABEL_WORDS)
    assert model.head == "verbalizer" and list(params) == ["prompt"]
    label_ids = [tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in LABEL_WORDS]
    prompted = [render(tokenizer, text, model.template, model.head, model.kind)[0] for text in TEXTS]
    reference = peft_class_logits(peft, tokenizer, prompted, label_ids)
    difference = (model.logits(params, model.encode(TEXTS)).detach() - reference).abs().max().item()
    assert difference < TOLERANCE, difference


def our_loop_model(directory: str, peft):
    """Our loop's PromptModel built from the folder (not from PEFT), holding leaf copies of PEFT's trained tensors."""
    from ptp_core.backbones import load_backbone
    from ptp_core.model import PromptModel

    model = PromptModel(load_backbone(directory, "classifier", 2, "cpu"), "classifier", 2)
    head = peft.base_model.classifier.modules_to_save["default"]
    params = {"prompt": peft.prompt_encoder["default"].embedding.weight, "classifier.weight": head.weight,
              "classifier.bias": head.bias}
    return model, {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def trainer_for(peft, tokenizer, tmp_path, method: str = "pt", perturb: PerturbConfig | None = None, **settings):
    from transformers import TrainingArguments

    from ptp_core.hf import PTPTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True, seed=3,
                             **settings)
    return PTPTrainer(model=peft, args=args, processing_class=tokenizer, method=method, perturb=perturb)


VARIANTS = {
    "pt": ("pt", {}),
    "rn-input": ("ptp-rn", dict(target="input")),
    "adv-input": ("ptp-adv", dict(target="input", adv_steps=2, epsilon=0.3)),
    "adv-input-free": ("ptp-adv", dict(target="input", adv_steps=2, adv_free=True, epsilon=0.3)),
    "rn-prompt": ("ptp-rn", dict(target="prompt")),
    "adv-prompt": ("ptp-adv", dict(target="prompt", adv_steps=2, rho=0.3)),
    "rn-text": ("ptp-rn", dict(target="text", mask_rate=0.3)),
    "adv-text": ("ptp-adv", dict(target="text", swaps=2)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trainer_loss_and_gradients_are_our_loops(tiny_dirs, tmp_path, variant):
    from ptp_core.hf import batch_from_inputs, step_generator

    method, settings = VARIANTS[variant]
    perturb = PerturbConfig(**settings, reg_weight=0.7, reg_warmup=0, reg_ramp=0)
    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    trainer = trainer_for(peft, tokenizer, tmp_path, method, perturb)
    model, params = our_loop_model(tiny_dirs["bert"], peft)
    batch = model.encode(TEXTS, LABELS)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "token_type_ids": batch.token_type_ids, "labels": batch.labels}
    assert torch.equal(batch_from_inputs(trainer.prompt_model, inputs).text_mask, batch.text_mask)

    loss = trainer.compute_loss(peft, inputs)  # optimizer step 1, first micro-batch
    loss.backward()
    if method == "pt":
        reference = model.loss(params, batch).mean()
        reference.backward()
        reference = reference.item()
    else:
        reference = ptp_gradients(model, params, batch, method, perturb, step_generator(3, 1, 0), 0.7)["loss"]
    head = peft.base_model.classifier.modules_to_save["default"]
    theirs = {"prompt": peft.prompt_encoder["default"].embedding.weight.grad, "classifier.weight": head.weight.grad,
              "classifier.bias": head.bias.grad}
    assert abs(loss.item() - reference) < TOLERANCE
    clean = model.loss({k: v.detach() for k, v in params.items()}, batch).mean().item()
    assert method == "pt" or abs(loss.item() - 1.7 * clean) > 1e-4  # the perturbation changed the loss
    for name, gradient in theirs.items():
        assert (gradient - params[name].grad).abs().max().item() < TOLERANCE, name


def toy_dataset(tokenizer) -> list[dict]:
    return [{**tokenizer(text), "labels": label} for text, label in zip(TEXTS, LABELS)]


def test_accumulating_two_by_four_is_one_batch_of_eight(tiny_dirs, tmp_path):
    from transformers import DataCollatorWithPadding

    prompts = []
    for micro, accumulation in ((8, 1), (4, 2)):
        peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
        start = peft.prompt_encoder["default"].embedding.weight.detach().clone()
        trainer = trainer_for(peft, tokenizer, tmp_path / str(micro), max_steps=1, learning_rate=0.5, optim="sgd",
                              lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                              per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
        trainer.train_dataset, trainer.data_collator = toy_dataset(tokenizer), DataCollatorWithPadding(tokenizer)
        trainer.train()
        prompts.append(peft.prompt_encoder["default"].embedding.weight.detach().clone())
    model, params = our_loop_model(tiny_dirs["bert"], peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")[0])
    model.loss(params, model.encode(TEXTS, LABELS)).mean().backward()
    sgd = start - 0.5 * params["prompt"].grad  # one plain SGD step on the batch of 8
    assert not torch.equal(prompts[0], start)
    assert (prompts[0] - prompts[1]).abs().max().item() < TOLERANCE
    assert (prompts[0] - sgd).abs().max().item() < TOLERANCE


def test_trainer_logs_ptp_scalars_and_saves_an_adapter_we_load(tiny_dirs, tmp_path):
    from transformers import DataCollatorWithPadding

    from ptp_core.checkpoint import load_checkpoint

    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    trainer = trainer_for(peft, tokenizer, tmp_path, "ptp-rn", PerturbConfig(reg_warmup=1, reg_ramp=2), max_steps=3,
                          logging_steps=1, per_device_train_batch_size=4, learning_rate=0.1)
    trainer.train_dataset, trainer.data_collator = toy_dataset(tokenizer), DataCollatorWithPadding(tokenizer)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "clean_loss" in row]
    assert [row["reg_weight"] for row in logged] == [0.0, 0.5, 1.0]  # warm-up step 1, then the ramp
    assert "perturbed_loss" not in logged[0] and all("perturbed_loss" in row for row in logged[1:])
    trainer.save_model(str(tmp_path / "adapter"))
    model = load_checkpoint(tmp_path / "adapter").build_model(device="cpu")
    difference = (model.predict(TEXTS) - peft_class_logits(peft.eval(), tokenizer, TEXTS)).abs().max().item()
    assert difference < TOLERANCE, difference
