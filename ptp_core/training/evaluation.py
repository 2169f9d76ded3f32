"""Scoring a prompt on a split: mean cross-entropy, accuracy, n and the task's metric; and whether a finished run
collapsed to the constant predictor. Used by the training loop's validation and by `python -m ptp_core.evaluate`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ptp_core.model import lm
from ptp_core.model.encoding import Batch, batch_split, target_counts
from ptp_core.model.prompt_model import PromptModel, cross_entropy
from ptp_core.model.templates import lm_row
from ptp_core.tasks.metrics import generation_metrics, normalize_answer, task_metrics
from ptp_core.tasks.task import TARGET, Split

EVAL_BATCH_SIZE = 64  # examples per forward when a split is scored (--batch-size)


@torch.inference_mode()
def evaluate(model: PromptModel, params: dict[str, Tensor], batches: list[Batch] | Split,
             batch_size: int = EVAL_BATCH_SIZE, metric: str = "accuracy", groups: list[int] | None = None,
             progress: bool = False) -> dict:
    """Mean cross-entropy, accuracy, n and the task's metric (ptp_core.tasks.metrics: f1, mcc, ...) over the batches,
    or over a split, tokenized here in stored order (its groups then serve the multirc metric); progress: a bar
    over the batches."""
    if getattr(model, "head", None) == "lm":  # any object with .logits and .encode scores a classification
        return evaluate_lm(model, params, batches, batch_size, metric, progress)
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


def evaluation_batches(model: PromptModel, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> list[Batch]:
    """The batches evaluate scores a split with: --head lm on a classification task adds a row per label word (rank
    classification); every --head lm batch carries the split's token scale (batch_split)."""
    return batch_split(model, split, batch_size, rank=model.head == "lm" and bool(model.label_words))[0]


def evaluate_lm(model: PromptModel, params: dict[str, Tensor], batches: list[Batch] | Split,
                batch_size: int = EVAL_BATCH_SIZE, metric: str = "accuracy", progress: bool = False) -> dict:
    """--head lm: the mean cross-entropy over all target tokens (PEFT's `labels` loss over the split), its
    perplexity, the token accuracy (greedy next token right, teacher-forced), n and the target tokens; on a
    classification task also rank classification (the label whose target is most likely): accuracy and the task's
    metric."""
    if isinstance(batches, Split):
        batches = evaluation_batches(model, batches, batch_size)
    total_loss = total_hits = tokens = 0.0
    predictions, labels = [], []
    for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        loss, hits = model.scores(params, batch)  # (B,) each: token sums over the split's token scale
        scale = batch.token_scale if batch.token_scale is not None else float(target_counts(batch).float().mean())
        total_loss += loss.sum().item() * scale  # back to token sums: the split's mean is taken once, below
        total_hits += hits.sum().item() * scale
        tokens += int(target_counts(batch).sum())
        if batch.ranked:
            predictions.append(lm.rank_scores(model, params, batch).argmax(-1).cpu())
            labels.append(batch.labels.cpu())
    n = sum(len(b) for b in batches)
    result = {"loss": total_loss / tokens, "perplexity": float(torch.exp(torch.tensor(total_loss / tokens))),
              "token_accuracy": total_hits / tokens, "n": n, "target_tokens": int(tokens)}
    if predictions:
        ranked = task_metrics(metric, torch.cat(predictions).numpy(), torch.cat(labels).numpy())
        result = {**result, "accuracy": ranked.pop("accuracy"), **ranked}
    return result


def generation_scores(model: PromptModel, params: dict[str, Tensor], split: Split, max_new_tokens: int,
                      batch_size: int = EVAL_BATCH_SIZE, progress: bool = False) -> dict:
    """Greedy generation from the prompt model on every example of `split`: SQuAD's exact_match and f1 against the
    targets (a generation task), or on a classification task the accuracy of the generated label (the label word
    it writes, normalized as SQuAD does); and a few examples of what it wrote."""
    texts = split.texts
    written: list[str] = []
    for begin in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress, leave=False):
        tokens = lm.generate(model, params, texts[begin:begin + batch_size], max_new_tokens, batch_size)
        written.extend(model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens)
    if texts and isinstance(texts[0], dict) and TARGET in texts[0]:
        scores = generation_metrics(written, [str(t[TARGET]) for t in texts])
    else:
        words = [normalize_answer(w) for w in model.label_words]
        hits = [normalize_answer(w) == words[y] for w, y in zip(written, split.labels)]
        scores = {"generation_accuracy": sum(hits) / len(hits)}
    return {**scores, "max_new_tokens": max_new_tokens, "examples_written": written[:3]}


def selection_metric(result: dict) -> str:
    """The key of an evaluation result that model selection maximizes: accuracy (--head lm on a classification
    task: by rank), a generation task's token_accuracy."""
    return "accuracy" if "accuracy" in result else "token_accuracy"


def selection_score(result: dict) -> float:
    """What model selection maximizes (selection_metric)."""
    return result[selection_metric(result)]


def check_targets(model: PromptModel, split: Split, name: str) -> None:
    """--head lm: refuse, before anything is trained or scored, a target that leaves its input no room within the
    model's max_length. A generation task's examples are each encoded once, as their batch will encode them, and a
    refusal names the example (`name` example i, i counted from 0 in the split's stored order, as --examples counts);
    a classification task's targets are its label words, each encoded once with the first example. Other heads
    pass."""
    if model.head != "lm" or not len(split):
        return
    if model.label_words:  # the same targets for every example
        for word in model.label_words:
            try:
                lm_row(model.tokenizer, split.texts[0], word, model.template, model.kind, model.max_length)
            except ValueError as error:
                raise ValueError(f"target {word!r} (a label word) after {name} example 0: {error}") from None
        return
    for i, example in enumerate(split.texts):
        try:
            lm_row(model.tokenizer, example, str(example[TARGET]), model.template, model.kind, model.max_length)
        except ValueError as error:
            raise ValueError(f"{name} example {i} (counted from 0): {error}") from None


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
    if prior_entropy is None:  # --head lm: a token loss, no class prior to match
        return False
    return bool(losses) and abs(losses[-1] - prior_entropy) <= tolerance


def collapse_warning(run: str) -> str:
    """One line for a run that ended as the constant predictor: what it means and what to try."""
    return (f"{run} learned nothing: it collapsed to the constant predictor (its last validation loss is the label "
            "prior's entropy, every input gets the same prediction); try another --seed, a lower --lr, more --steps "
            "or, for ptp-*, a longer --reg-warmup or a smaller --reg-weight")
