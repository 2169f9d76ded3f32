"""Prompt tuning on a frozen backbone: vanilla PT, or PT with a PTP regularizer (perturb.py) in `step_gradients`.

    python -m ptp_core.train --model minilm --task rotten_tomatoes --method pt --seed 0 --out runs/x
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ptp_core import cli
from ptp_core.backbones import autocast, default_head, load_backbone, resolve_device, resolve_dtype
from ptp_core.checkpoint import META, save_checkpoint
from ptp_core.data import Task, batch_indices, load_task
from ptp_core.encoding import Batch, batch_split
from ptp_core.evaluate import EVAL_BATCH_SIZE, evaluate
from ptp_core.io import check_output_folder
from ptp_core.model import PROMPT_INITS, PromptModel
from ptp_core.perturb import NOISES, BALL_NORMS, REPLACEMENTS, TARGETS, PerturbConfig, ptp_gradients

METHODS = ("pt", "ptp-rn", "ptp-adv")  # vanilla; PTP with random or adversarial perturbations (perturb.py)
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # float16 would need loss scaling inside every PTP ascent step


# Default prompt learning rates, from small searches on the embedded task (docs/results.md, Training):
# minilm + classifier: 3e-2; smollm2 + verbalizer, test accuracy after 60 steps: 1e-3 -> 0.67, 3e-3 -> 0.75,
# 3e-2 -> 0.59 (batch 8; no learning), 0.1 -> 0.48 (150 steps). Why the larger steps fail is not established.
PROMPT_LR = {"classifier": 3e-2, "verbalizer": 3e-3}


@dataclass
class TrainConfig:
    model: str = "minilm"
    task: str = "rotten_tomatoes"
    method: str = "pt"
    seed: int = 0
    out: str = "runs/pt"
    head: str = "auto"  # auto: smollm2 and encoder-decoders (T5, BART) score label words; others train a classifier
    prompt_length: int = 20  # Lester et al. 2021: gains flatten beyond ~20 tokens
    prompt_init: str = "vocab"  # sampled vocabulary embeddings: a stable start (Lester et al. 2021)
    prompt_init_text: str = ""
    steps: int = 300
    batch_size: int = 32
    lr: float | None = None  # None: PROMPT_LR for the head (the prompt's AdamW step size)
    head_lr: float = 3e-2  # the freshly initialised classifier head (a small search: 3e-2 best of 4)
    weight_decay: float = 0.0  # decay pulls the prompt towards the origin, away from the vocabulary
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int = 100
    eval_examples: int | None = None  # validation subset for model selection (None: all of it)
    test_examples: int | None = None  # test subset for the final accuracy (None: all of it)
    snapshot_every: int = 20  # trajectory snapshots for PCA directions
    max_length: int = 128
    label_words: list[str] | None = None
    template: str | None = None
    text_fields: tuple[str, ...] = ("text",)  # the text columns of a CSV/JSONL task (--text-fields premise,hypothesis)
    train_examples: int | None = None  # a seeded subset of the train split (FewGLUE: 32); None: all of it
    device: str = "auto"  # cuda when a GPU is present
    dtype: str = "auto"  # bf16 autocast where the hardware multiplies bf16 natively (weights stay float32)
    cache_dir: str | None = None
    overwrite: bool = False
    progress: bool = True
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # ptp-rn / ptp-adv only; pt ignores it

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.prompt_length <= 0:
            raise ValueError(f"--prompt-len must be > 0, got {self.prompt_length}")
        for name in ("steps", "batch_size", "eval_every", "snapshot_every", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.train_examples is not None and self.train_examples <= 0:
            raise ValueError(f"--train-examples must be > 0, got {self.train_examples}")
        if self.head == "auto":
            self.head = default_head(self.model)
        if self.lr is None:
            self.lr = PROMPT_LR.get(self.head, PROMPT_LR["classifier"])
        for name in ("lr", "head_lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0 or not self.head_lr > 0:
            raise ValueError(f"--lr and --head-lr must be > 0, got {self.lr} and {self.head_lr}")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"unknown --prompt-init {self.prompt_init!r}; use one of {', '.join(PROMPT_INITS)}")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} cannot train; use one of {', '.join(TRAIN_DTYPES)} (float16 "
                             "needs loss scaling that the PTP ascent steps do not do)")
        if isinstance(self.perturb, dict):  # rebuilt from ptp.json
            self.perturb = PerturbConfig(**self.perturb)


def schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


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


def _versions() -> dict:
    return {"torch": torch.__version__, "transformers": version("transformers"), "python": platform.python_version()}


@dataclass
class FitResult:
    """What the training loop leaves: the best step's tensors on validation, the log, the prompt's trajectory."""
    params: dict[str, Tensor]  # the best step's tensors (the initial ones when training stopped before validating)
    best_accuracy: float  # validation accuracy at best_step
    best_step: int
    log: list[dict]  # a row per step, and a row per validation
    trajectory: dict[str, Tensor]  # "prompts" (S, P, D), "steps" (S,)
    status: str  # "complete", or why training stopped early


def build_prompt_model(config: TrainConfig, task: Task, device: str) -> PromptModel:
    """The frozen backbone with its head for `task`; the verbalizer reads the task's cloze template."""
    backbone = load_backbone(config.model, config.head, task.num_labels, device, torch.float32,
                             Path(config.cache_dir) if config.cache_dir else None, choices=task.choices)
    template = task.template if config.head == "verbalizer" else (config.template or "{text}")
    return PromptModel(backbone, config.head, task.num_labels, task.label_words, template, config.max_length,
                       choices=task.choices)


def make_optimizer(params: dict[str, Tensor], config: TrainConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the prompt and the head at their own learning rates; linear warmup, then linear decay."""
    head_tensors = [v for k, v in params.items() if k != "prompt"]
    groups = [{"params": [params["prompt"]], "lr": config.lr}]
    if head_tensors:
        groups.append({"params": head_tensors, "lr": config.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_ratio * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, config.steps, warmup))
    return optimizer, scheduler


def _copy(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def fit_prompt(model: PromptModel, params: dict[str, Tensor], task: Task, config: TrainConfig,
               generator: torch.Generator, noise_generator: torch.Generator, compute_dtype: str,
               prior_entropy: float) -> FitResult:
    """The training loop: optimizer steps on `params` (updated in place), validation every eval_every steps, the
    best step on validation accuracy kept; stops at the first non-finite loss."""
    optimizer, scheduler = make_optimizer(params, config)
    train_split = task.splits["train"]
    valid_batches, _ = batch_split(model, task.splits["validation"].head(config.eval_examples), EVAL_BATCH_SIZE)
    log, snapshots, snapshot_steps = [], [params["prompt"].detach().cpu().clone()], [0]
    best_params, best_accuracy, best_step, status = _copy(params), -1.0, 0, "complete"
    pending = []  # this epoch's batches of example indices not trained on yet
    bar = tqdm(range(1, config.steps + 1), desc=f"{config.method} seed {config.seed}", disable=not config.progress)
    for step in bar:
        if not pending:
            pending = batch_indices(len(train_split), config.batch_size, generator)
        indices = pending.pop(0)
        batch = model.encode([train_split.texts[i] for i in indices], [train_split.labels[i] for i in indices])
        optimizer.zero_grad(set_to_none=True)
        with autocast(model.device, compute_dtype):
            losses = step_gradients(model, params, batch, config, noise_generator, step)
        if not all(math.isfinite(v) for v in losses.values()):
            status = f"stopped: non-finite loss at step {step}; kept the best checkpoint before it"
            break
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{losses['loss']:.3f}", best=f"{best_accuracy:.3f}")
        log.append({"step": step, "lr": scheduler.get_last_lr()[0], **losses})
        if step % config.snapshot_every == 0:
            snapshots.append(params["prompt"].detach().cpu().clone())
            snapshot_steps.append(step)
        if step % config.eval_every == 0 or step == config.steps:
            with autocast(model.device, compute_dtype):
                result = evaluate(model, params, valid_batches)
            recent = [row["clean_loss"] for row in log[-config.eval_every:] if "clean_loss" in row]
            log.append({"step": step, "validation_loss": result["loss"], "validation_accuracy": result["accuracy"],
                        "clean_loss_mean": sum(recent) / max(1, len(recent)), "label_prior_entropy": prior_entropy})
            if result["accuracy"] > best_accuracy:
                best_params, best_accuracy, best_step = _copy(params), result["accuracy"], step
    bar.close()
    if best_accuracy < 0:  # stopped before the first validation: measure the initial prompt
        with autocast(model.device, compute_dtype):
            best_accuracy = evaluate(model, best_params, valid_batches)["accuracy"]
    trajectory = {"prompts": torch.stack(snapshots), "steps": torch.tensor(snapshot_steps)}  # (S, P, D), (S,)
    return FitResult(best_params, best_accuracy, best_step, log, trajectory, status)


def run_meta(config: TrainConfig, model: PromptModel, task: Task, result: FitResult, test: dict, prior_entropy: float,
             device: str, compute_dtype: str, seconds: float) -> dict:
    """ptp.json: every setting, what the run was trained on, its metrics and log, library versions."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "progress", "overwrite", "cache_dir")}
    return {
        **settings, "head": config.head, "kind": model.kind, "model_path": model.model_path,
        "compute_dtype": compute_dtype, "device": device,
        "task": config.task, "label_names": task.label_names, "label_words": task.label_words,
        "template": model.template, "num_labels": task.num_labels, "choices": task.choices,
        "split_sizes": task.sizes(), "split_info": task.split_info, "metric": task.metric, "fields": list(task.fields),
        "status": result.status,
        "metrics": {**{f"test_{key}": value for key, value in test.items()},  # loss, accuracy, n, the task's metric
                    "best_validation_accuracy": result.best_accuracy, "best_step": result.best_step,
                    "label_prior_entropy": prior_entropy, "collapsed": collapsed(result.log, prior_entropy),
                    "seconds": round(seconds, 1)},
        "log": result.log, "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def train(config: TrainConfig) -> Path:
    """Train one prompt; select the best step on validation; save the checkpoint; return its path."""
    out = Path(config.out)
    check_output_folder(out, config.overwrite)
    started = time.time()
    generator = torch.Generator().manual_seed(config.seed)  # init and batch order: the same for every method
    noise_generator = torch.Generator().manual_seed(config.seed + 1_000_003)  # perturbations: their own stream
    task = load_task(config.task, config.label_words, config.template, None, config.text_fields, config.train_examples)
    device = resolve_device(config.device)
    compute_dtype = resolve_dtype(config.dtype, device)  # the matmul dtype under autocast; weights stay float32
    model = build_prompt_model(config, task, device)
    params = {k: v.clone().requires_grad_(True) for k, v in
              model.init_params(config.prompt_length, config.prompt_init, generator, config.prompt_init_text).items()}
    prior_entropy = label_prior_entropy(task.splits["train"].labels, task.num_labels)
    result = fit_prompt(model, params, task, config, generator, noise_generator, compute_dtype, prior_entropy)
    with autocast(device, compute_dtype):
        test = evaluate(model, result.params, task.splits["test"].head(config.test_examples), metric=task.metric)
    meta = run_meta(config, model, task, result, test, prior_entropy, device, compute_dtype, time.time() - started)
    save_checkpoint(out, result.params, meta, result.trajectory, model.backbone.config, overwrite=True, log=result.log)
    if result.status != "complete":
        raise ValueError(f"{result.status} ({out})")
    return out


def add_arguments(p) -> None:
    """The training flags (shared with the sweep, which passes them on to every run)."""
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="minilm, smollm2, an HF model id or a local folder")
    p.add_argument("--task", default=d.task, help="rotten_tomatoes, super_glue/rte, glue/mrpc, a folder, a file")
    p.add_argument("--text-fields", type=lambda s: tuple(s.split(",")), default=d.text_fields, help="file columns")
    p.add_argument("--train-examples", type=cli.positive(int), default=None, help="seeded subset (FewGLUE: 32)")
    p.add_argument("--head", default=d.head, choices=("auto", "classifier", "verbalizer"))
    p.add_argument("--prompt-len", dest="prompt_length", type=int, default=d.prompt_length)
    p.add_argument("--prompt-init", default=d.prompt_init, choices=PROMPT_INITS)
    p.add_argument("--prompt-init-text", default=d.prompt_init_text)
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
    out = train(config)
    metrics = json.loads((out / META).read_text())["metrics"]
    print(json.dumps({"checkpoint": str(out), **metrics}))
    return out


if __name__ == "__main__":
    cli.run(main)
