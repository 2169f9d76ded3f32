"""PTPTrainer inside Trainer's machinery: mixed precision, evaluation with early stopping, torchrun (DDP).

References: an explicit autocast of ptp_loss, our loop's PromptModel built from the model folder, Trainer's own
logged history, and one process training on the same global batches as two.
"""
import pytest
import torch

from conftest import toy_rows
from ptp_core.training.perturb import PerturbConfig
from test_hf import (LABELS, TEXTS, TOLERANCE, our_loop_model, peft_model, step_noise, toy_dataset, train_on,
                     trainer_for)


def test_bf16_trains_under_autocast_and_its_loss_is_autocast_bf16(tiny_dirs, tmp_path):
    """bf16=True: Trainer's first step logs the clean and perturbed CE of an explicit bf16 autocast of ptp_loss,
    not the float32 ones (accelerate's autocast wraps PEFT's forward, which this loss does not call)."""
    from ptp_core.training.perturb import ptp_loss

    perturb = PerturbConfig(target="input", reg_warmup=0, reg_ramp=0)
    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    model, params = our_loop_model(tiny_dirs["bert"], peft)
    trainer = trainer_for(peft, tokenizer, tmp_path, "ptp-rn", perturb, bf16=True, max_steps=3, logging_steps=1,
                          per_device_train_batch_size=4, train_sampling_strategy="sequential", learning_rate=0.1)
    logged = [row for row in train_on(trainer, toy_dataset(tokenizer), tokenizer).state.log_history if "loss" in row]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    batch = model.encode(TEXTS[:4], LABELS[:4])  # step 1's micro-batch
    references = {}
    for dtype in ("bfloat16", "float32"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            noise = step_noise(perturb, 1, range(4), batch.attention_mask)
            references[dtype] = ptp_loss(model, params, batch, "ptp-rn", perturb, noise)[1]
    for part in ("clean_loss", "perturbed_loss"):
        bf16, float32 = references["bfloat16"][part].item(), references["float32"][part].item()
        assert abs(logged[0][part] - bf16) < 1e-6 < 1e-4 < abs(bf16 - float32), (part, logged[0][part], bf16)


def test_fp16_on_a_cpu_is_refused(tiny_dirs, tmp_path):
    """accelerate would train in float32 without a word: PTPTrainer says so and how to mend it."""
    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        trainer_for(peft, tokenizer, tmp_path, "ptp-adv", fp16=True)


def test_evaluation_early_stopping_and_the_best_model_at_end(tiny_dirs, tmp_path):
    """eval_loss (our clean CE) and eval_accuracy every step; EarlyStoppingCallback(patience 1) stops at the first
    evaluation that does not improve; load_best_model_at_end restores the best checkpoint's tensors."""
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback

    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.hf import accuracy

    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    rows = toy_rows(16, seed=12)
    texts, labels = [r["text"] for r in rows], [int(r["label"] == "positive") for r in rows]
    extra = dict(train_dataset=toy_dataset(tokenizer), eval_dataset=toy_dataset(tokenizer, texts, labels),
                 data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                 callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    trainer = trainer_for(peft, tokenizer, tmp_path, "ptp-rn", PerturbConfig(reg_warmup=0, reg_ramp=0), extra,
                          max_steps=10, learning_rate=5.0, optim="sgd", per_device_train_batch_size=4,
                          per_device_eval_batch_size=16, eval_strategy="steps", eval_steps=1, save_steps=1,
                          load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.train()
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    losses = [row["eval_loss"] for row in evaluations]
    stop = next(i for i in range(1, len(losses)) if losses[i] >= min(losses[:i]))  # patience 1
    assert trainer.state.global_step == stop + 1 < 10 and len(losses) == stop + 1
    best = losses.index(min(losses))
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best + 1}")
    saved = load_checkpoint(trainer.state.best_model_checkpoint).params["prompt"]
    assert torch.equal(peft.prompt_encoder["default"].embedding.weight.detach(), saved)
    model, params = our_loop_model(tiny_dirs["bert"], peft)
    batch = model.encode(texts, labels)
    with torch.no_grad():
        logits = model.logits(params, batch)
    metrics = trainer.evaluate()
    assert abs(metrics["eval_loss"] - losses[best]) < TOLERANCE
    assert abs(metrics["eval_loss"] - model.loss(params, batch).mean().item()) < TOLERANCE
    assert metrics["eval_accuracy"] == (logits.argmax(-1) == batch.labels).float().mean().item()


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_with_the_same_global_batch(tiny_dirs, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), 4 examples per process: both ranks end with the same trained
    tensors, equal to one process's with batches of 8, and log the same clean and perturbed CE (pt and ptp-rn)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from conftest import run_torchrun
    from ddp_ptp_trainer import METHODS, train

    run_torchrun(Path(__file__).parent / "ddp_ptp_trainer.py", tiny_dirs["bert"], str(tmp_path))
    for method in METHODS:
        ranks = [load_file(tmp_path / f"{method}-rank{rank}.safetensors") for rank in (0, 1)]
        single, single_logs = train(tiny_dirs["bert"], method, tmp_path / "single" / method)
        assert sorted(ranks[0]) == sorted(single) and len(single) >= 2  # the prompt and the head
        for name, value in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), (method, name)
            assert (ranks[0][name] - value).abs().max().item() < TOLERANCE, (method, name)
        for row, expected in zip(json.loads((tmp_path / f"{method}-rank0.json").read_text()), single_logs):
            for key in ("clean_loss", "perturbed_loss"):
                assert abs(row.get(key, 0.0) - expected.get(key, 0.0)) < TOLERANCE, (method, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs CUDA")
def test_fp16_adversarial_ascent_under_the_loss_scaler(tiny_dirs, tmp_path):
    """fp16 on CUDA: PTP-ADV (two PGD steps) trains with finite losses under Trainer's gradient scaler, and the
    ascent's input gradient, taken at the scaler's scale (ascent_scale), points where the float32 one does."""
    from transformers import DataCollatorWithPadding

    from ptp_core.hf import batch_from_inputs, peft_params
    from ptp_core.training.perturb import ascent_gradient

    perturb = PerturbConfig(target="input", adv_steps=2, epsilon=0.3, reg_warmup=0, reg_ramp=0)
    peft, tokenizer = peft_model(tiny_dirs["bert"], "bert", "SEQ_CLS")
    trainer = trainer_for(peft, tokenizer, tmp_path, "ptp-adv", perturb, use_cpu=False, fp16=True, max_steps=3,
                          logging_steps=1, per_device_train_batch_size=4, learning_rate=0.1)
    logged = [row for row in train_on(trainer, toy_dataset(tokenizer), tokenizer).state.log_history if "loss" in row]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(row["perturbed_loss"])) for row in logged)
    assert trainer.accelerator.scaler is not None and trainer.ascent_scale() > 1
    inputs = {k: v.cuda() for k, v in DataCollatorWithPadding(tokenizer)(toy_dataset(tokenizer)).items()}
    model = trainer.prompt_model
    batch, params = batch_from_inputs(model, inputs), peft_params(peft, model)
    gradients = []
    for scale, autocast in ((trainer.ascent_scale(), True), (1.0, False)):
        zero = torch.zeros((*batch.input_ids.shape, model.embedding_dim), device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            clean = model.loss(params, batch, input_perturbation=zero).mean()
        gradients.append(ascent_gradient(clean, [zero], scale)[0].flatten())
    assert torch.nn.functional.cosine_similarity(*gradients, dim=0).item() > 0.99
