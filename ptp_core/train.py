"""Prompt tuning on a frozen backbone: vanilla PT, or PT with a PTP regularizer (perturb.py); the loop is loop.py.

    python -m ptp_core.train --model minilm --task rotten_tomatoes --method pt --seed 0 --out runs/x
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

from ptp_core import cli
from ptp_core.checkpoint import META, save_checkpoint
from ptp_core.io import check_output_folder
from ptp_core.model.backbones import autocast, load_backbone, resolve_device, resolve_dtype
from ptp_core.model.prefix import PROMPT_TYPES
from ptp_core.model.projection import Identity, PrefixProjection, Reparameterization
from ptp_core.model.prompt_model import PROMPT_INITS, PromptModel
from ptp_core.tasks.load import load_task
from ptp_core.tasks.task import Split, Task, check_causal_template
from ptp_core.training.config import (METHODS, PROMPT_LR, SELECTIONS, TRAIN_DTYPES, TrainConfig, schedule_note,
                                      selection_note)
from ptp_core.training.evaluation import (check_targets, collapse_warning, collapsed, evaluate, label_prior_entropy,
                                          selection_metric)
from ptp_core.training.loop import FitResult, fit_prompt
from ptp_core.training.perturb import BALL_NORMS, NOISES, REPLACEMENTS, TARGETS, PerturbConfig
from ptp_core.training.reporting import REPORT_TO, TrainingReport


def _versions() -> dict:
    return {"torch": torch.__version__, "transformers": version("transformers"), "python": platform.python_version()}


def build_prompt_model(config: TrainConfig, task: Task, device: str) -> PromptModel:
    """The frozen backbone with its head for `task`; the verbalizer reads the task's cloze template (a causal LM,
    without --template, the task's causal form, which ends at {mask})."""
    backbone = load_backbone(config.model, config.head, task.num_labels, device, torch.float32,
                             Path(config.cache_dir) if config.cache_dir else None, choices=task.choices)
    template = config.template or "{text}"
    if config.head in ("verbalizer", "lm"):
        causal = backbone.kind == "causal" and config.template is None and task.causal_template
        template = task.causal_template if causal else task.template
        if backbone.kind == "causal":
            check_causal_template(template)
    return PromptModel(backbone, config.head, task.num_labels, lm_targets(config, task) if config.head == "lm"
                       else task.label_words, template, config.max_length, choices=task.choices,
                       prompt_type=config.prompt_type)


def lm_targets(config: TrainConfig, task: Task) -> list[str]:
    """--head lm: a classification task's targets, its label names (Lester et al. 2021) or --label-words; a
    generation task has its own target texts (none here)."""
    if task.generation:
        return []
    if task.choices:
        raise ValueError(f"task {task.name!r} is multiple choice; --head lm learns one target per label, use "
                         "--head verbalizer (the LM scores each candidate)")
    return list(config.label_words or task.label_names)


def run_meta(config: TrainConfig, model: PromptModel, task: Task, result: FitResult, test: dict, prior_entropy: float,
             device: str, compute_dtype: str, seconds: float) -> dict:
    """ptp.json: every setting, what the run was trained on, its metrics and log, library versions."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "progress", "overwrite", "cache_dir")}
    if config.method == "pt":  # what applied only: pt draws no perturbation (older files hold a block anyway)
        del settings["perturb"]
    if config.reg_schedule_requested is None:
        del settings["reg_schedule_requested"]
    del settings["label_words"]  # as asked (None: the task's); the ones used follow
    # a classifier's loss reads no label words; only a prompt initialised from them used them
    words = {"label_words": model.label_words} if config.head != "classifier" or config.prompt_init == "label_words" \
        else {}
    if task.generation:  # the targets are the examples' own texts, from the target_field column
        words = {"generation": True}
    else:
        settings.pop("target_field")
    return {
        **settings, "head": config.head, "kind": model.kind, "model_path": model.model_path,
        "compute_dtype": compute_dtype, "device": device,
        "task": config.task, "label_names": task.label_names, **words,
        "template": model.template, "num_labels": task.num_labels, "choices": task.choices,
        "split_sizes": task.sizes(), "split_info": task.split_info, "metric": task.metric, "fields": list(task.fields),
        "status": result.status,
        "metrics": {**{f"test_{key}": value for key, value in test.items()},  # loss, accuracy, n, the task's metric
                    "best_validation_accuracy": result.best_accuracy, "best_step": result.best_step,
                    "selection_metric": selection_metric(test),
                    "label_prior_entropy": prior_entropy, "collapsed": collapsed(result.log, prior_entropy),
                    "seconds": round(seconds, 1)},
        "log": result.log, "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def used_splits(config: TrainConfig, task: Task) -> dict[str, Split]:
    """What a run reads of each split: all of train, the validation subset it selects on (none with selection
    "last"), the test subset it reports."""
    used = {"train": task.splits["train"], "test": task.splits["test"].head(config.test_examples, whole_groups=True)}
    if config.selection == "validation":
        used["validation"] = task.splits["validation"].head(config.eval_examples)
    return used


def initial_params(config: TrainConfig, model: PromptModel, generator: torch.Generator
                   ) -> tuple[dict[str, Tensor], Reparameterization]:
    """The seeded tensors the optimizer starts from and the reparameterization that makes the model's params."""
    params = model.init_params(config.prompt_length, config.prompt_init, generator, config.prompt_init_text)
    reparam = Identity()
    if config.prefix_projection:  # the prefix comes from an MLP: its tokens and weights are trained instead
        reparam = PrefixProjection(config.prefix_hidden)
        shape = model.prefix_shape
        params = {**{k: v for k, v in params.items() if k != "prompt"},
                  **reparam.init(config.prompt_length, shape.token_dim, shape.width, generator)}
    return {k: v.to(model.device).clone().requires_grad_(True) for k, v in params.items()}, reparam


def train(config: TrainConfig) -> Path:
    """Train one prompt; select the best step on validation; save the checkpoint; return its path."""
    out = Path(config.out)
    check_output_folder(out, config.overwrite)
    started = time.time()
    generator = torch.Generator().manual_seed(config.seed)  # init and batch order: the same for every method
    noise_generator = torch.Generator().manual_seed(config.seed + 1_000_003)  # perturbations: their own stream
    task = load_task(config.task, config.label_words, config.template, None, config.text_fields, config.train_examples,
                     config.target_field)
    if task.generation and config.head != "lm":
        raise ValueError(f"task {config.task!r} is a generation task (target texts), which only --head lm learns; "
                         f"add --head lm (got --head {config.head})")
    note = selection_note(config.selection, config.head, task.generation)
    task = replace(task, split_info={**task.split_info, "selection": note})
    device = resolve_device(config.device)
    compute_dtype = resolve_dtype(config.dtype, device)  # the matmul dtype under autocast; weights stay float32
    model = build_prompt_model(config, task, device)
    for name, split in used_splits(config, task).items():  # a target too long is refused now, not after training
        check_targets(model, split, name)
    trainable, reparam = initial_params(config, model, generator)
    prior_entropy = (None if config.head == "lm"  # a token loss: no class prior is the constant predictor's
                     else label_prior_entropy(task.splits["train"].labels, task.num_labels))
    with TrainingReport(config.report_to, out) as report:  # on an error its staging folder goes
        result = fit_prompt(model, trainable, task, config, generator, noise_generator, compute_dtype, prior_entropy,
                            report.log, reparam)
        with autocast(device, compute_dtype):
            test = evaluate(model, result.params, used_splits(config, task)["test"], metric=task.metric)
        meta = run_meta(config, model, task, result, test, prior_entropy, device, compute_dtype, time.time() - started)
        with report.saving(out) as folder:  # the checkpoint folder, event files inside, published as a whole
            save_checkpoint(folder, result.params, meta, result.trajectory, model.backbone.config, log=result.log)
    if result.status != "complete":
        raise ValueError(f"{result.status} ({out})")
    return out


def add_arguments(p) -> None:
    """The training flags (shared with the sweep, which passes them on to every run)."""
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="minilm, smollm2, an HF model id or a local folder")
    p.add_argument("--task", default=d.task, help="rotten_tomatoes, super_glue/rte, glue/mrpc, a folder, a file")
    p.add_argument("--text-fields", type=lambda s: tuple(s.split(",")), default=d.text_fields, help="file columns")
    p.add_argument("--train-examples", type=cli.positive(int), default=None,
                   help="seeded subset (FewGLUE: 32; a benchmark then validates on N other train examples)")
    p.add_argument("--selection", default=d.selection, choices=SELECTIONS,
                   help="validation: save the step with the best validation accuracy; last: use no validation split "
                        "and save the last step (PET's no-dev protocol)")
    p.add_argument("--head", default=d.head, choices=("auto", "classifier", "verbalizer", "lm"),
                   help="lm: learn target text with the LM head (a --target-field task, or a classification task "
                        "written as text: the label names, or --label-words, are the targets)")
    p.add_argument("--target-field", default=None,
                   help="the target text's column of a CSV/JSONL file or dataset: a generation task (--head lm)")
    p.add_argument("--prompt-len", dest="prompt_length", type=int, default=d.prompt_length)
    p.add_argument("--prompt-init", default=d.prompt_init, choices=PROMPT_INITS)
    p.add_argument("--prompt-init-text", default=d.prompt_init_text)
    p.add_argument("--prompt-type", default=d.prompt_type, choices=PROMPT_TYPES,
                   help="shallow: virtual tokens at the input; deep: keys and values in every attention layer")
    p.add_argument("--prefix-projection", action="store_true",
                   help="deep: train the prefix as an MLP of P token vectors (P-tuning v2); saved as its output")
    p.add_argument("--prefix-hidden", type=int, default=d.prefix_hidden, help="the MLP's hidden size")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None,
                   help=f"prompt learning rate (default: {PROMPT_LR['classifier']} for the classifier head, "
                        f"{PROMPT_LR['verbalizer']} for the verbalizer)")
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-examples", type=cli.positive(int), default=None, help="validation subset (default all)")
    p.add_argument("--test-examples", type=cli.positive(int), default=None, help="test subset (default all)")
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--label-words", type=lambda s: s.split(","), default=None, help="comma-separated, one per label")
    p.add_argument("--template", default=None, help="e.g. '{text} It was {mask}.'")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=d.dtype, choices=TRAIN_DTYPES,
                   help="auto: bfloat16 autocast where the hardware multiplies bf16 natively, else float32")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--report-to", default=d.report_to, choices=REPORT_TO, help="also log to <out>/tensorboard")
    q = PerturbConfig()
    g = p.add_argument_group("PTP regularizers", "L = CE(clean) + reg_weight * CE(perturbed); scales are relative "
                             "to the RMS of the embedding table")
    g.add_argument("--target", default=q.target, choices=TARGETS, help="what ptp-rn / ptp-adv perturb")
    g.add_argument("--reg-weight", type=float, default=q.reg_weight, help="lam, the weight of CE(perturbed)")
    g.add_argument("--noise", default=q.noise, choices=NOISES, help="ptp-rn input/prompt noise distribution")
    g.add_argument("--sigma", type=float, default=q.sigma, help="ptp-rn: noise RMS relative to the embedding RMS")
    g.add_argument("--mask-rate", type=float, default=q.mask_rate, help="ptp-rn text: fraction of tokens masked")
    g.add_argument("--replacement", default=q.replacement, choices=REPLACEMENTS, help="ptp-rn text: masking token")
    g.add_argument("--adv-steps", type=int, default=q.adv_steps, help="ptp-adv: K ascent steps")
    g.add_argument("--epsilon", type=float, default=q.epsilon, help="ptp-adv input: relative radius of the ball")
    g.add_argument("--adv-step-size", type=float, default=q.adv_step_size, help="ascent step, fraction of the radius")
    g.add_argument("--adv-init", type=float, default=q.adv_init, help="random start, fraction of the radius")
    g.add_argument("--adv-norm", default=q.adv_norm, choices=BALL_NORMS)
    g.add_argument("--adv-free", default=q.adv_free, action=argparse.BooleanOptionalAction,
                   help="ptp-adv input: FreeLB, average the prompt's gradients over the K steps")
    g.add_argument("--rho", type=float, default=q.rho, help="ptp-adv prompt: relative radius of the prompt ball")
    g.add_argument("--swaps", type=int, default=q.swaps, help="ptp-adv text: HotFlip substitutions per input")
    g.add_argument("--reg-warmup", type=int, default=q.reg_warmup,
                   help="train clean (lam = 0) for this many steps before the regularizer starts")
    g.add_argument("--reg-ramp", type=int, default=q.reg_ramp,
                   help="then raise lam linearly from 0 to --reg-weight over this many steps")


def config_from_args(args, **overrides) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values["perturb"] = PerturbConfig(**{k: v for k, v in vars(args).items() if k in PerturbConfig.__dataclass_fields__})
    values.update(cache_dir=str(cli.cache_dir() or "") or None, **overrides)
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> Path:
    p = cli.parser("python -m ptp_core.train", "Train a soft prompt on a frozen backbone.")
    add_arguments(p)
    p.add_argument("--method", default="pt", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args = p.parse_args(argv)
    cli.quiet_transformers()
    config = config_from_args(args)
    if note := schedule_note(config):
        print(f"note: {note}", file=sys.stderr)
    out = train(config)
    metrics = json.loads((out / META).read_text())["metrics"]
    print(json.dumps({"checkpoint": str(out), **metrics}))
    if metrics.get("collapsed"):
        print(f"warning: {collapse_warning(str(out))}", file=sys.stderr)
    return out


if __name__ == "__main__":
    cli.run(main)
