"""PTP in a user's Hugging Face setup: from_peft gives PEFT's logits, PTPTrainer's loss is our loop's loss.

References are independent of ptp_core.hf: PEFT's own forward (one unpadded example at a time), our loop's
PromptModel built by load_backbone from the model folder, and plain SGD arithmetic.
"""
import json

import pytest
import torch

from conftest import toy_rows
from ptp_core.training.perturb import PerturbConfig, ptp_gradients
from ptp_core.model.templates import render

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
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    model = PromptModel(load_backbone(directory, "classifier", 2, "cpu"), "classifier", 2)
    head = peft.base_model.classifier.modules_to_save["default"]
    params = {"prompt": peft.prompt_encoder["default"].embedding.weight, "classifier.weight": head.weight,
              "classifier.bias": head.bias}
    return model, {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def trainer_for(peft, tokenizer, tmp_path, method: str = "pt", perturb: PerturbConfig | None = None,
                trainer: dict | None = None, **settings):
    """A PTPTrainer on the CPU, seed 3; `trainer`: more PTPTrainer arguments; settings: TrainingArguments."""
    from transformers import TrainingArguments

    from ptp_core.hf import PTPTrainer

    args = TrainingArguments(**{"output_dir": str(tmp_path / "trainer"), "report_to": "none", "use_cpu": True,
                                "seed": 3, **settings})
    return PTPTrainer(model=peft, args=args, processing_class=tokenizer, method=method, perturb=perturb,
                      **(trainer or {}))


def step_noise(perturb: PerturbConfig, step: int, keys, attention_mask: torch.Tensor):
    """The randomness PTPTrainer draws at optimizer step `step` (seed 3) for examples keyed `keys`."""
    from ptp_core.training.noise import example_noise, keyed_generator

    if perturb.target == "prompt":
        return keyed_generator(3, step)
    return example_noise(3, step, list(keys), attention_mask)


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
    from ptp_core.hf import batch_from_inputs

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
        noise = step_noise(perturb, 1, range(len(TEXTS)), batch.attention_mask)
        reference = ptp_gradients(model, params, batch, method, perturb, noise, 0.7)["loss"]
    head = peft.base_model.classifier.modules_to_save["default"]
    theirs = {"prompt": peft.prompt_encoder["default"].embedding.weight.grad, "classifier.weight": head.weight.grad,
              "classifier.bias": head.bias.grad}
    assert abs(loss.item() - reference) < TOLERANCE
    clean = model.loss({k: v.detach() for k, v in params.items()}, batch).mean().item()
    assert method == "pt" or abs(loss.item() - 1.7 * clean) > 1e-4  # the perturbation changed the loss
    for name, gradient in theirs.items():
        assert (gradient - params[name].grad).abs().max().item() < TOLERANCE, name


def toy_dataset(tokenizer, texts: list[str] = TEXTS, labels: list[int] = LABELS, ids: bool = False) -> list[dict]:
    """Tokenized examples with labels; ids: each with its index as `example_id`, which keys its noise."""
    return [{**tokenizer(text), "labels": label, **({"example_id": i} if ids else {})}
            for i, (text, label) in enumerate(zip(texts, labels))]


def train_on(trainer, dataset: list[dict], tokenizer):
    """trainer.train() on the dataset, padded per batch; returns the trainer."""
    from transformers import DataCollatorWithPadding

    trainer.train_dataset, trainer.data_collator = dataset, DataCollatorWithPadding(tokenizer)
    trainer.train()
    return trainer


SGD_STEP = dict(max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                weight_decay=0.0)


@pytest.mark.parametrize("variant", ["pt", "rn-input", "rn-text", "rn-input-example-id", "adv-input"])
def test_accumulating_two_by_four_is_one_batch_of_eight(tiny_dirs, tmp_path, variant):
    """One SGD step: 2 x 4 accumulated == one batch of 8 == our loop's step on the 8 with each example's noise.
    Examples are keyed by their place in the step's batch (sequential order), or by example_id (random order)."""
    method = {"pt": "pt", "adv-input": "ptp-adv"}.get(variant, "ptp-rn")
    perturb = PerturbConfig(target="text" if variant == "rn-text" else "input", mask_rate=0.3, reg_weight=0.7,
                            adv_steps=2, epsilon=0.3, reg_warmup=0, reg_ramp=0)
    ids = variant.endswith("example-id")
    prompts = []
    for micro, accumulation in ((8, 1), (4, 2)):
        peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
        start = peft.prompt_encoder["default"].embedding.weight.detach().clone()
        trainer = trainer_for(peft, tokenizer, tmp_path / str(micro), method, perturb, **SGD_STEP,
                              per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                              train_sampling_strategy="random" if ids else "sequential")
        train_on(trainer, toy_dataset(tokenizer, ids=ids), tokenizer)
        prompts.append(peft.prompt_encoder["default"].embedding.weight.detach().clone())
    model, params = our_loop_model(tiny_dirs["bert"], peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")[0])
    batch = model.encode(TEXTS, LABELS)
    if method == "pt":
        model.loss(params, batch).mean().backward()
    else:
        ptp_gradients(model, params, batch, method, perturb, step_noise(perturb, 1, range(8), batch.attention_mask))
    sgd = start - 0.5 * params["prompt"].grad  # one plain SGD step on the batch of 8
    assert not torch.equal(prompts[0], start)
    assert (prompts[0] - prompts[1]).abs().max().item() < TOLERANCE
    assert (prompts[0] - sgd).abs().max().item() < TOLERANCE


def test_trainer_logs_ptp_scalars_and_saves_an_adapter_we_load(tiny_dirs, tmp_path, toy_csv):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ptp_core.checkpoint import load_checkpoint

    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    trainer = trainer_for(peft, tokenizer, tmp_path, "ptp-rn", PerturbConfig(reg_warmup=1, reg_ramp=2), max_steps=3,
                          logging_steps=1, per_device_train_batch_size=4, learning_rate=0.1, report_to="tensorboard")
    train_on(trainer, toy_dataset(tokenizer), tokenizer)
    logged = [row for row in trainer.state.log_history if "clean_loss" in row]
    assert [row["reg_weight"] for row in logged] == [0.0, 0.5, 1.0]  # warm-up step 1, then the ramp
    assert "perturbed_loss" not in logged[0] and all("perturbed_loss" in row for row in logged[1:])
    for row in logged:  # Trainer's own loss is the objective the logged parts make up
        objective = row["clean_loss"] + row["reg_weight"] * row.get("perturbed_loss", 0.0)
        assert abs(row["loss"] - objective) < 1e-6, row
    (folder,) = (tmp_path / "trainer" / "runs").iterdir()
    events = EventAccumulator(str(folder)).Reload()  # what report_to="tensorboard" wrote, read by TensorBoard
    for name in ("clean_loss", "perturbed_loss", "reg_weight"):
        points = [(row["step"], row[name]) for row in logged if name in row]
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == [step for step, _ in points]
        assert all(abs(e.value - value) <= 1e-6 * abs(value) for e, (_, value) in zip(scalars, points))  # float32
    trainer.save_model(str(tmp_path / "adapter"))
    model = load_checkpoint(tmp_path / "adapter").build_model(device="cpu")
    difference = (model.predict(TEXTS) - peft_class_logits(peft.eval(), tokenizer, TEXTS)).abs().max().item()
    assert difference < TOLERANCE, difference
    from landscape.cli.plot import main as plot  # the adapter names no task: landscape.plot is given one

    plot([str(tmp_path / "adapter"), "--task", toy_csv, "--out", str(tmp_path / "fig"), "--grid", "3", "--examples",
          "8", "--metrics", "surface,hessian", "--metric-examples", "4", "--no-progress", "--device", "cpu"])
    row = json.loads((tmp_path / "fig" / "metrics.json").read_text())[0]
    assert row["hessian_eigenvalues"][0] == row["hessian_eigenvalues"][0] and row["center_loss"] > 0


@pytest.mark.parametrize("method", ["pt", "ptp-rn", "ptp-adv"])
def test_causal_lm_verbalizer_through_the_trainer_is_our_loop(tiny_dirs, tmp_path, method):
    """A CAUSAL_LM PEFT model with label words: the Trainer's loss and prompt gradient are our loop's on a tiny
    GPT-2 (inputs: the cloze-rendered texts, tokenized by the user; our loop encodes them as the text itself)."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.hf import batch_from_inputs
    from ptp_core.model.prompt_model import PromptModel

    perturb = PerturbConfig(target="input", adv_steps=2, epsilon=0.3, reg_weight=0.7, reg_warmup=0, reg_ramp=0)
    peft, tokenizer = peft_model(tiny_dirs["gpt2"], "gpt2", "CAUSAL_LM")
    trainer = trainer_for(peft, tokenizer, tmp_path, method, perturb, dict(label_words=LABEL_WORDS))
    model = PromptModel(load_backbone(tiny_dirs["gpt2"], "verbalizer", 2, "cpu"), "verbalizer", 2, LABEL_WORDS)
    prompted = [render(tokenizer, text, "{text} It was {mask}.", "verbalizer", "causal")[0] for text in TEXTS]
    batch = model.encode(prompted, LABELS)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    ours = batch_from_inputs(trainer.prompt_model, inputs)
    assert torch.equal(ours.text_mask, batch.text_mask) and torch.equal(ours.answer_index, batch.answer_index)
    loss = trainer.compute_loss(peft, inputs)
    loss.backward()
    prompt = peft.prompt_encoder["default"].embedding.weight
    params = {"prompt": prompt.detach().clone().requires_grad_(True)}
    noise = step_noise(perturb, 1, range(len(TEXTS)), batch.attention_mask)
    reference = ptp_gradients(model, params, batch, method, perturb, noise, 0.0 if method == "pt" else 0.7)
    assert abs(loss.item() - reference["loss"]) < TOLERANCE
    assert (prompt.grad - params["prompt"].grad).abs().max().item() < TOLERANCE


def test_p_tuning_encoder_gradients_are_the_chain_rule_of_our_loops(tiny_dirs, tmp_path):
    """P-tuning (the prompt is an MLP's output) under PTP-ADV: the encoder's gradients from the Trainer's loss are
    J^T g, with g our loop's gradient of the prompt the encoder outputs (the clean term enters the loss as
    sum(prompt * g), so this checks that it reaches the encoder's weights)."""
    perturb = PerturbConfig(target="input", adv_steps=2, epsilon=0.3, reg_weight=0.7, reg_warmup=0, reg_ramp=0)
    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS", p_tuning=True)
    trainer = trainer_for(peft, tokenizer, tmp_path, "ptp-adv", perturb)
    model = our_loop_model(tiny_dirs["bert"], peft)[0]
    batch = model.encode(TEXTS, LABELS)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "token_type_ids": batch.token_type_ids, "labels": batch.labels}
    trainer.compute_loss(peft, inputs).backward()
    encoder = peft.prompt_encoder["default"]
    prompt = encoder(peft.prompt_tokens["default"].unsqueeze(0))[0]  # (P, D)
    head = peft.base_model.classifier.modules_to_save["default"]
    params = {"prompt": prompt, "classifier.weight": head.weight, "classifier.bias": head.bias}
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ptp_gradients(model, params, batch, "ptp-adv", perturb, step_noise(perturb, 1, range(8), batch.attention_mask))
    weights = [p for p in encoder.parameters() if p.requires_grad]
    reference = torch.autograd.grad(prompt, weights, params["prompt"].grad)  # J^T g
    assert len(weights) > 1
    for weight, expected in zip(weights, reference):
        assert (weight.grad - expected).abs().max().item() < TOLERANCE


def prefix_peft_model(directory: str, seed: int = 0):
    """A PEFT CAUSAL_LM prefix-tuning model (PEFT runs prefix tuning there), its prefix moved off its init."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(directory, **NO_DROPOUT["gpt2"])
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(0.5)
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("method", ["pt", "ptp-adv"])
def test_prefix_tuning_from_peft_and_through_the_trainer_is_our_deep_prompt(tiny_dirs, tmp_path, method):
    """PREFIX_TUNING: from_peft gives PEFT's label-word logits; the Trainer's loss and prefix gradient are our
    loop's on a deep prompt (PTP-ADV on the prompt: SAM in each layer's units, no randomness)."""
    from ptp_core import from_peft
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    peft, tokenizer = prefix_peft_model(tiny_dirs["gpt2"])
    model, params = from_peft(peft, tokenizer, label_words=LABEL_WORDS)
    assert model.prompt_type == "deep" and params["prompt"].shape == (3, model.prompt_width)
    label_ids = [tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in LABEL_WORDS]
    prompted = [render(tokenizer, text, model.template, model.head, model.kind)[0] for text in TEXTS]
    difference = (model.logits(params, model.encode(TEXTS)) - peft_class_logits(peft, tokenizer, prompted, label_ids))
    assert difference.abs().max().item() < TOLERANCE
    perturb = PerturbConfig(target="prompt", rho=0.3, adv_steps=2, reg_weight=0.7, reg_warmup=0, reg_ramp=0)
    trainer = trainer_for(peft, tokenizer, tmp_path, method, perturb, dict(label_words=LABEL_WORDS))
    ours = PromptModel(load_backbone(tiny_dirs["gpt2"], "verbalizer", 2, "cpu"), "verbalizer", 2, LABEL_WORDS,
                       prompt_type="deep")
    batch = ours.encode(prompted, LABELS)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    loss = trainer.compute_loss(peft, inputs)
    loss.backward()
    prefix = peft.prompt_encoder["default"].embedding.weight
    leaves = {"prompt": prefix.detach().clone().requires_grad_(True)}
    reference = ptp_gradients(ours, leaves, batch, method, perturb, torch.Generator(), 0.0 if method == "pt" else 0.7)
    assert abs(loss.item() - reference["loss"]) < TOLERANCE
    assert (prefix.grad - leaves["prompt"].grad).abs().max().item() < TOLERANCE


def test_seq_cls_prefix_tuning_trains_through_our_loss(tiny_dirs, tmp_path):
    """PEFT's own SEQ_CLS forward refuses prefix tuning on transformers 5; the Trainer's loss (ours) equals our
    loop's deep-prompt loss, and a step moves PEFT's prefix."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"], num_labels=2, **NO_DROPOUT["bert"])
    peft = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["bert"])
    trainer = trainer_for(peft, tokenizer, tmp_path, "pt")
    ours = PromptModel(load_backbone(tiny_dirs["bert"], "classifier", 2, "cpu"), "classifier", 2, prompt_type="deep")
    batch = ours.encode(TEXTS, LABELS)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "token_type_ids": batch.token_type_ids, "labels": batch.labels}
    head = peft.base_model.classifier.modules_to_save["default"]
    params = {"prompt": peft.prompt_encoder["default"].embedding.weight, "classifier.weight": head.weight,
              "classifier.bias": head.bias}
    expected = ours.loss({k: v.detach() for k, v in params.items()}, batch).mean().item()
    loss = trainer.compute_loss(peft, inputs)
    assert abs(loss.item() - expected) < TOLERANCE
    loss.backward()
    assert params["prompt"].grad is not None and params["prompt"].grad.abs().sum() > 0


def test_from_peft_right_after_training_evaluates_without_dropout(tiny_dirs):
    """Trainer leaves the model in train mode; from_peft's loss is then still one deterministic function, PEFT's
    eval-mode logits."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ptp_core import from_peft

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"], num_labels=2,
                                                              hidden_dropout_prob=0.3)
    peft = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, token_dim=32))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["bert"])
    peft.train()  # as trainer.train() leaves it
    model, params = from_peft(peft, tokenizer)
    batch = model.encode(TEXTS)
    with torch.no_grad():
        first, second = model.logits(params, batch), model.logits(params, batch)
    assert torch.equal(first, second)
    difference = (first - peft_class_logits(peft.eval(), tokenizer, TEXTS)).abs().max().item()
    assert difference < TOLERANCE, difference


@pytest.mark.parametrize("setting", ["compute_loss_func", "label_smoothing_factor"])
def test_trainer_losses_ptp_does_not_compute_are_refused(tiny_dirs, tmp_path, setting):
    """Trainer stops dividing by the accumulation steps once compute_loss_func is set, and label smoothing changes
    the objective: PTPTrainer computes neither, so it refuses both in one line instead of training another loss."""
    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    trainer = {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.loss} \
        if setting == "compute_loss_func" else {}
    settings = {"label_smoothing_factor": 0.1} if setting == "label_smoothing_factor" else {}
    with pytest.raises(ValueError, match=f"does not apply {setting}"):
        trainer_for(peft, tokenizer, tmp_path, "ptp-rn", trainer=trainer, **settings)
