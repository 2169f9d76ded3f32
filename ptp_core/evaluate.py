"""Loss and accuracy of a prompt on a split; `python -m ptp_core.evaluate CKPT` prints one JSON line."""
from __future__ import annotations

import json

import torch
from torch import Tensor

from ptp_core.data import Split
from ptp_core.model import Batch, PromptModel


def encode_split(model: PromptModel, split: Split, batch_size: int = 64) -> list[Batch]:
    """Tokenize a split once into batches, in stored order."""
    return [model.encode(split.texts[i:i + batch_size], split.labels[i:i + batch_size])
            for i in range(0, len(split), batch_size)]


@torch.inference_mode()
def evaluate(model: PromptModel, params: dict[str, Tensor], batches: list[Batch] | Split,
             batch_size: int = 64) -> dict:
    """Mean cross-entropy, accuracy and n over the batches (or a split, tokenized here)."""
    if isinstance(batches, Split):
        batches = encode_split(model, batches, batch_size)
    total_loss, correct, n = 0.0, 0, 0
    for batch in batches:
        loss, hit = model.scores(params, batch)  # (B,), (B,)
        total_loss += loss.sum().item()
        correct += int(hit.sum().item())
        n += len(batch)
    return {"loss": total_loss / n, "accuracy": correct / n, "n": n}


def main(argv: list[str] | None = None) -> dict:
    from ptp_core import cli
    from ptp_core.backbones import DTYPE_CHOICES, autocast, resolve_dtype
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.data import SPLITS, load_task

    p = cli.parser("python -m ptp_core.evaluate", "Evaluate a checkpoint; print one JSON line: loss, accuracy, n.")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--task", default=None, help="task to evaluate on (default: the one in ptp.json)")
    p.add_argument("--examples", type=cli.positive(int), default=None, help="first N examples of the split")
    p.add_argument("--batch-size", type=cli.positive(int), default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bfloat16 autocast where the hardware multiplies bf16 natively, else float32")
    args = p.parse_args(argv)
    cli.quiet_transformers()
    checkpoint = load_checkpoint(args.checkpoint)
    task_name = args.task or checkpoint.meta.get("task")
    if not task_name:
        raise ValueError(f"{args.checkpoint} does not name its task; pass --task")
    task = load_task(task_name, label_words=checkpoint.meta.get("label_words"),
                     label_names=checkpoint.meta.get("label_names"))
    trained_on = checkpoint.meta.get("num_labels")
    if trained_on and trained_on != task.num_labels:
        raise ValueError(f"{args.checkpoint} was trained on {trained_on} labels but task {task_name!r} has "
                         f"{task.num_labels}; evaluate on a task with the same labels")
    model = checkpoint.build_model(cli.auto_device(args.device), cache_dir=cli.cache_dir(),
                                   num_labels=task.num_labels)
    dtype = resolve_dtype(args.dtype, model.device)
    with autocast(model.device, dtype):
        result = evaluate(model, dict(model.params), task.splits[args.split].head(args.examples), args.batch_size)
    result["dtype"] = dtype
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from ptp_core.cli import run

    run(main)
