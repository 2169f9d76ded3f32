"""Loss, accuracy and the task's metric (f1, mcc, ...) of a prompt on a split; `python -m ptp_core.evaluate CKPT`
prints one JSON line. A --head lm checkpoint: the token-mean loss, perplexity and token accuracy (and rank
classification on a classification task); --generate adds greedy generation with exact match and F1."""
from __future__ import annotations

import argparse
import json

from ptp_core import cli
from ptp_core.checkpoint import Checkpoint, load_checkpoint
from ptp_core.model.backbones import DTYPE_CHOICES, autocast, resolve_dtype
from ptp_core.tasks.load import is_classification_source, load_task
from ptp_core.tasks.task import SPLITS, Task
from ptp_core.training.evaluation import EVAL_BATCH_SIZE, check_targets, evaluate, generation_scores

MAX_NEW_TOKENS = 32


def checkpoint_task(checkpoint: Checkpoint, name: str | None) -> Task:
    """The task to evaluate on: the checkpoint's own, or `name`; a generation prompt reads another file or dataset
    with the columns it was trained on (its text fields and target field), so that its template still fits."""
    if name and checkpoint.meta.get("generation") and name != checkpoint.meta.get("task"):
        fields, target = tuple(checkpoint.meta.get("text_fields") or ("text",)), checkpoint.meta.get("target_field")
        if is_classification_source(name):
            raise ValueError(f"{checkpoint.path} writes the target texts of column {target!r} from column(s) "
                             f"{','.join(fields)}, but task {name!r} has labels; evaluate it on a CSV/JSONL file or "
                             "dataset with those columns")
        return load_task(name, text_fields=fields, target_field=target)
    return checkpoint.task(name)


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
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction, help="a bar over the batches")
    p.add_argument("--generate", action="store_true",
                   help="--head lm checkpoints: also generate greedily and score exact match and F1 (SQuAD's), or "
                        "the generated label's accuracy on a classification task")
    p.add_argument("--max-new-tokens", type=cli.positive(int), default=MAX_NEW_TOKENS,
                   help="--generate: stop after this many new tokens (or at the end-of-sequence token)")
    args = p.parse_args(argv)
    cli.quiet_transformers()
    checkpoint = load_checkpoint(args.checkpoint)
    if args.generate and not checkpoint.generation:
        raise ValueError(f"--generate needs a --head lm checkpoint; {args.checkpoint} has the "
                         f"{checkpoint.meta.get('head')} head, which writes no text")
    task = checkpoint_task(checkpoint, args.task)
    trained_on = checkpoint.meta.get("num_labels")
    if trained_on and trained_on != task.num_labels:
        raise ValueError(f"{args.checkpoint} was trained on {trained_on} labels but task "
                         f"{args.task or checkpoint.meta['task']!r} has {task.num_labels}; evaluate on a task with "
                         "the same labels")
    model = checkpoint.build_model(cli.auto_device(args.device), cache_dir=cli.cache_dir(),
                                   num_labels=task.num_labels)
    dtype = resolve_dtype(args.dtype, model.device)
    subset = task.splits[args.split].head(args.examples, whole_groups=True)  # EM: never cut through a question
    check_targets(model, subset, args.split)
    with autocast(model.device, dtype):
        result = evaluate(model, dict(model.params), subset, args.batch_size, task.metric, progress=args.progress)
        if args.generate:
            result.update(generation_scores(model, dict(model.params), subset, args.max_new_tokens, args.batch_size,
                                            args.progress))
    result["dtype"] = dtype
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli.run(main)
