"""The training loop: optimizer steps on the trainable tensors, validation, the best step kept.

One step backpropagates the method's loss (vanilla PT, or PTP's clean + perturbed loss, ptp_core.training.perturb) into the
tensors the model's loss takes. A reparameterization (ptp_core.model.projection: P-tuning v2's MLP over a deep prompt)
sits between the optimizer's tensors and those: `forward` gives the model's params, `backward` carries their
gradients back.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ptp_core.model.backbones import autocast
from ptp_core.model.encoding import Batch
from ptp_core.model.projection import PREFIX, Identity, Reparameterization
from ptp_core.model.prompt_model import PromptModel
from ptp_core.tasks.task import Task, batch_indices
from ptp_core.training.config import TrainConfig
from ptp_core.training.evaluation import EVAL_BATCH_SIZE, evaluate, evaluation_batches, selection_score
from ptp_core.training.perturb import ptp_gradients


def schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def step_gradients(model: PromptModel, params: dict[str, Tensor], batch: Batch, config: TrainConfig,
                   generator: torch.Generator, step: int = 1) -> dict[str, float]:
    """Backpropagate this method's training loss at `step` (1-based) into params; return the losses to log.

    While the regularizer's weight is 0 (--reg-warmup) a PTP step is a PT step: no perturbation is drawn."""
    weight = config.perturb.weight_at(step)
    if config.method != "pt" and weight > 0:
        return ptp_gradients(model, params, batch, config.method, config.perturb, generator, weight)
    clean = model.loss(params, batch).mean()
    clean.backward()
    return {"loss": clean.item(), "clean_loss": clean.item(), **({"reg_weight": 0.0} if config.method != "pt" else {})}


@dataclass
class FitResult:
    """What the training loop leaves: the selected step's tensors, the log, the prompt's trajectory."""
    params: dict[str, Tensor]  # the best step's tensors (the initial ones when training stopped before validating);
    # with selection "last", the last finite step's
    best_accuracy: float  # validation accuracy at best_step (NaN with selection "last": no validation); a
    # generation task's: its token accuracy
    best_step: int
    log: list[dict]  # a row per step, and a row per validation
    trajectory: dict[str, Tensor]  # "prompts" (S, P, D), "steps" (S,)
    status: str  # "complete", or why training stopped early


def make_optimizer(params: dict[str, Tensor], config: TrainConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the prompt and the head at their own learning rates; linear warmup, then linear decay."""
    prompt = [k for k in params if k == "prompt" or k.startswith(PREFIX)]  # a projected prefix: its tokens and MLP
    head_tensors = [v for k, v in params.items() if k not in prompt]
    groups = [{"params": [params[k] for k in prompt], "lr": config.lr}]
    if head_tensors:
        groups.append({"params": head_tensors, "lr": config.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_ratio * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, config.steps, warmup))
    return optimizer, scheduler


def _copy(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def fit_prompt(model: PromptModel, trainable: dict[str, Tensor], task: Task, config: TrainConfig,
               generator: torch.Generator, noise_generator: torch.Generator, compute_dtype: str,
               prior_entropy: float, report: Callable[[dict], None] = lambda row: None,
               reparam: Reparameterization = Identity()) -> FitResult:
    """The training loop: optimizer steps on `trainable` (updated in place), validation every eval_every steps,
    the best step on validation accuracy kept (config.selection "last": no validation at all, the last step kept);
    stops at the first non-finite loss. reparam.forward(trainable) are the model's params (without a
    reparameterization: trainable itself)."""
    optimizer, scheduler = make_optimizer(trainable, config)
    params = reparam.forward(trainable)
    train_split = task.splits["train"]
    validate = config.selection == "validation"
    valid_batches = []
    if validate:
        valid_batches = evaluation_batches(model, task.splits["validation"].head(config.eval_examples), EVAL_BATCH_SIZE)
    log, snapshots, snapshot_steps = [], [params["prompt"].detach().cpu().clone()], [0]
    best_params, best_accuracy, best_step, status = _copy(params), -1.0, 0, "complete"
    pending = []  # this epoch's batches of example indices not trained on yet
    bar = tqdm(range(1, config.steps + 1), desc=f"{config.method} seed {config.seed}", disable=not config.progress)
    last_step = 0  # the last step whose update was applied
    for step in bar:
        if not pending:
            pending = batch_indices(len(train_split), config.batch_size, generator)
        indices = pending.pop(0)
        batch = model.encode([train_split.texts[i] for i in indices], [train_split.labels[i] for i in indices])
        optimizer.zero_grad(set_to_none=True)
        with autocast(model.device, compute_dtype):
            losses = step_gradients(model, params, batch, config, noise_generator, step)
        if not all(math.isfinite(v) for v in losses.values()):
            kept = "best" if validate else "last"
            status = f"stopped: non-finite loss at step {step}; kept the {kept} step before it"
            break
        reparam.backward(params, trainable)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        params = reparam.forward(trainable)
        last_step = step
        # best: the best validation accuracy so far, shown from the first validation on (-1 before it means none)
        shown = {"best": f"{best_accuracy:.3f}"} if best_accuracy >= 0 else {}
        bar.set_postfix(loss=f"{losses['loss']:.3f}", **shown)
        log.append({"step": step, "lr": scheduler.get_last_lr()[0], **losses})
        report(log[-1])
        if step % config.snapshot_every == 0:
            snapshots.append(params["prompt"].detach().cpu().clone())
            snapshot_steps.append(step)
        if validate and (step % config.eval_every == 0 or step == config.steps):
            with autocast(model.device, compute_dtype):
                result = evaluate(model, params, valid_batches)
            recent = [row["clean_loss"] for row in log[-config.eval_every:] if "clean_loss" in row]
            log.append({"step": step, "validation_loss": result["loss"], "validation_accuracy": selection_score(result),
                        "clean_loss_mean": sum(recent) / max(1, len(recent)), "label_prior_entropy": prior_entropy})
            report(log[-1])
            if selection_score(result) > best_accuracy:
                best_params, best_accuracy, best_step = _copy(params), selection_score(result), step
            bar.set_postfix(loss=f"{losses['loss']:.3f}", best=f"{best_accuracy:.3f}")
    bar.close()
    if not validate:  # PET's no-dev protocol: the last step is the checkpoint, nothing is measured on validation
        best_params, best_accuracy, best_step = _copy(params), math.nan, last_step
    elif best_accuracy < 0:  # stopped before the first validation: measure the initial prompt
        with autocast(model.device, compute_dtype):
            best_accuracy = selection_score(evaluate(model, best_params, valid_batches))
    trajectory = {"prompts": torch.stack(snapshots), "steps": torch.tensor(snapshot_steps)}  # (S, P, D), (S,)
    return FitResult(best_params, best_accuracy, best_step, log, trajectory, status)


