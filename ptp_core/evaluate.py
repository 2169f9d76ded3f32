"""Loss, accuracy and the task's metric (f1, mcc, ...) of a prompt on a split; `python -m ptp_core.evaluate CKPT`
prints one JSON line."""
from __future__ import annotations

import json

import torch
from torch import Tensor

from ptp_core import cli
from ptp_core.backbones import DTYPE_CHOICES, autocast, resolve_dtype
from ptp_core.checkpoint import load_checkpoint
from ptp_core.data import SPLITS, Split
from ptp_core.encoding import Batch, batch_split
from ptp_core.model import PromptModel, cross_entropy
from ptp_core.task_metrics import task_metrics

EVAL_BATCH_SIZE = 64  # examples per forward when a split is scored (--batch-size)


@torch.inference_mode()
def evaluate(model: PromptModel, params: dict[str, Tensor], batches: list[Batch] | Split,
             batch_size: int = EVAL_BATCH_SIZE, metric: str = "accuracy", groups: list[int] | None = None) -> dict:
    """Mean cross-entropy, accuracy, n and the task's metric (ptp_core.task_metrics: f1, mcc, ...) over the batches,
    or over a split, tokenized here in stored order (its groups then serve the multirc metric)."""
    if isinstance(batches, Split):
        batches, groups = batch_split(model, batches, batch_size)[0], batches.groups
    total_loss, predictions, labels = 0.0, [], []
    for batch in batches:
        logits = model.logits(params, batch)  # (B, C) class logits, or (B, K) scores of the K choices
        total_loss += cross_entropy(logits, batch.labels).sum().item()
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch.labels.cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)  # (N,), (N,)
    result = task_metrics(metric, predictions.numpy(), labels.numpy(), groups)
    return {"loss": total_loss / len(labels), "accuracy": result.pop("accuracy"), "n": len(labels), **result}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser("python -m ptp_core.evaluate", "Evaluate a checkpoint; print one JSON line: loss, accuracy, n "
                   "and the task's metric (f1, mcc, ...).")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--task", default=None, help="task to evaluate on (default: the one in ptp.json)")
    p.add_argument("--examples", type=cli.positive(int), default=None,
                   help="first N examples of the split (MultiRC: up to the end of the question the N-th is in)")
    p.add_argument("--batch-size", type=cli.positive(int), default=EVAL_BATCH_SIZE)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bfloat16 autocast where the hardware multiplies bf16 natively, else float32")
    args = p.parse_args(argv)
    cli.quiet_transformers()
    checkpoint = load_checkpoint(args.checkpoint)
    task = checkpoint.task(args.task)
    trained_on = checkpoint.meta.get("num_labels")
    if trained_on and trained_on != task.num_labels:
        raise ValueError(f"{args.checkpoint} was trained on {trained_on} labels but task "
                         f"{args.task or checkpoint.meta['task']!r} has {task.num_labels}; evaluate on a task with "
                         "the same labels")
    model = checkpoint.build_model(cli.auto_device(args.device), cache_dir=cli.cache_dir(),
                                   num_labels=task.num_labels)
    dtype = resolve_dtype(args.dtype, model.device)
    with autocast(model.device, dtype):
        subset = task.splits[args.split].head(args.examples, whole_groups=True)  # EM: never cut through a question
        result = evaluate(model, dict(model.params), subset, args.batch_size, task.metric)
    result["dtype"] = dtype
    print(json.dumps(result))
    return result


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


if __name__ == "__main__":
    cli.run(main)
