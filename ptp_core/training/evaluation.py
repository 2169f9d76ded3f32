"""Scoring a prompt on a split: mean cross-entropy, accuracy, n and the task's metric; and whether a finished run
collapsed to the constant predictor. Used by the training loop's validation and by `python -m ptp_core.evaluate`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ptp_core.model.encoding import Batch, batch_split
from ptp_core.model.prompt_model import PromptModel, cross_entropy
from ptp_core.tasks.metrics import task_metrics
from ptp_core.tasks.task import Split

EVAL_BATCH_SIZE = 64  # examples per forward when a split is scored (--batch-size)


@torch.inference_mode()
def evaluate(model: PromptModel, params: dict[str, Tensor], batches: list[Batch] | Split,
             batch_size: int = EVAL_BATCH_SIZE, metric: str = "accuracy", groups: list[int] | None = None,
             progress: bool = False) -> dict:
    """Mean cross-entropy, accuracy, n and the task's metric (ptp_core.tasks.metrics: f1, mcc, ...) over the batches,
    or over a split, tokenized here in stored order (its groups then serve the multirc metric); progress: a bar
    over the batches."""
    if isinstance(batches, Split):
        batches, groups = batch_split(model, batches, batch_size)[0], batches.groups
    total_loss, predictions, labels = 0.0, [], []
    for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        logits = model.logits(params, batch)  # (B, C) class logits, or (B, K) scores of the K choices
        total_loss += cross_entropy(logits, batch.labels).sum().item()
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch.labels.cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)  # (N,), (N,)
    result = task_metrics(metric, predictions.numpy(), labels.numpy(), groups)
    return {"loss": total_loss / len(labels), "accuracy": result.pop("accuracy"), "n": len(labels), **result}


COLLAPSE_TOLERANCE = 0.01  # nats: a validation loss this close to the label prior's entropy is a constant predictor


def label_prior_entropy(labels: list[int], num_labels: int) -> float:
    """Entropy (nats) of the training labels' distribution: the CE of the best input-independent predictor."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).double()
    prior = counts[counts > 0] / counts.sum()
    return float(-(prior * prior.log()).sum())


def collapsed(log: list[dict], prior_entropy: float, tolerance: float = COLLAPSE_TOLERANCE) -> bool:
    """True when the run's last validation loss lies within `tolerance` of the label prior's entropy: it ended as
    the constant predictor (every input the same prediction), which the adversarial term alone can prefer."""
    losses = [row["validation_loss"] for row in log if "validation_loss" in row]
    return bool(losses) and abs(losses[-1] - prior_entropy) <= tolerance


def collapse_warning(run: str) -> str:
    """One line for a run that ended as the constant predictor: what it means and what to try."""
    return (f"{run} learned nothing: it collapsed to the constant predictor (its last validation loss is the label "
            "prior's entropy, every input gets the same prediction); try another --seed, a lower --lr, more --steps "
            "or, for ptp-*, a longer --reg-warmup or a smaller --reg-weight")
