"""Connect two checkpoints: train the Bezier control point on the train split, measure both paths, write the result.

    result = connect_checkpoints("runs/pt/seed0", "runs/pt/seed1", ConnectConfig())   # no files written
    write_result(result, "figures/connect-pt")   # connect.json + curve.safetensors (the figure: landscape.draw)
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor

from landscape.connect.curve import ScoreFn, path_barrier, path_losses, train_control_point
from landscape.grid.evaluate import auto_chunk, subset_hash
from landscape.grid.spec import PARAM_SCOPES
from landscape.hessian import Params
from landscape.measures.sharpness import BarrierResult
from landscape.surface import check_one_loss
from ptp_core.checkpoint import Checkpoint, check_comparable, load_checkpoint, params_hash
from ptp_core.io import atomic_folder, write_atomic, write_json
from ptp_core.model.backbones import autocast, resolve_device, resolve_dtype
from ptp_core.model.encoding import batch_split, share_token_scale
from ptp_core.tasks.task import SPLITS, Split, batch_indices
from ptp_core.training.config import TRAIN_DTYPES

CURVE_FILE, RESULT_FILE, FIGURE_STEM = "curve.safetensors", "connect.json", "connect"


@dataclass
class ConnectConfig:
    steps: int = 60  # Adam steps on C, one t ~ U(0, 1) and one train batch each (minilm, 2 busy cores: ~2.5 s each)
    lr: float = 1e-2  # Adam on C; dθ/dC = 2t(1 − t) <= 1/2, so θ moves by at most half of this per step
    batch_size: int = 16  # train examples per step; also evaluation examples per forward
    points: int = 21  # evenly spaced t in [0, 1]; odd, so t = 0.5 (the curve's furthest point from the line) is on it
    examples: int = 128  # the first N examples of `split` in stored order, as for the surfaces
    split: str = "test"
    param_scope: str = "prompt"  # prompt: bend the prompt only (a head follows the line); all: bend the head too
    seed: int = 0  # t samples draw from seed, the train batch order from seed + 1
    dtype: str = "auto"  # training autocast (auto: bf16 where native); the t grid is evaluated in float32 unless set
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "examples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}; e.g. --lr 1e-2")
        if self.points < 3:
            raise ValueError(f"--points must be at least 3 (both ends and one interior t), got {self.points}")
        for name, value, allowed in (("split", self.split, SPLITS), ("params", self.param_scope, PARAM_SCOPES),
                                     ("dtype", self.dtype, TRAIN_DTYPES)):
            if value not in allowed:
                raise ValueError(f"unknown --{name} {value!r}; use one of {', '.join(allowed)}")

    def dtypes(self, device: str) -> tuple[str, str]:
        """(training dtype, evaluation dtype): auto trains in bf16 where native and evaluates in float32, since a
        barrier is a difference of losses; an explicit dtype is used for both."""
        return resolve_dtype(self.dtype, device), "float32" if self.dtype == "auto" else self.dtype


# ---- the model's loss on the two splits ------------------------------------------------------------------

def model_scorer(model, batches: Sequence, dtype: str = "float32") -> ScoreFn:
    """score(stacked params (G, ...)) -> mean loss and accuracy (G,) over every example of `batches` (--head lm: one
    token scale for all of them, so that the means are over every target token)."""
    batches = share_token_scale(list(batches))
    count = sum(len(batch) for batch in batches)

    @torch.inference_mode()
    def score(stacked: Params) -> tuple[Tensor, Tensor]:
        loss_sum, hit_sum = 0.0, 0.0
        for batch in batches:
            with autocast(model.device, dtype):
                loss, hit = model.scores(stacked, batch)  # (G, B) each, CE reduced in float32
            loss_sum, hit_sum = loss_sum + loss.double().sum(1), hit_sum + hit.double().sum(1)  # (G,)
        return loss_sum / count, hit_sum / count

    return score


def train_loss(model, split: Split, batch_size: int, steps: int, generator: torch.Generator,
               dtype: str = "float32") -> Callable[[Params, int], Tensor]:
    """loss_fn(stacked, step) -> (G, B) losses on the step-th batch of a seeded shuffle of `split` (epochs repeat)."""
    plan: list[list[int]] = []
    while len(plan) < steps:
        plan += batch_indices(len(split), batch_size, generator)

    def loss_fn(stacked: Params, step: int) -> Tensor:
        rows = plan[step]
        batch = model.encode([split.texts[i] for i in rows], [split.labels[i] for i in rows])
        with autocast(model.device, dtype):
            return model.loss(stacked, batch)  # (G, B)

    return loss_fn


# ---- two checkpoints in, one result out ------------------------------------------------------------------

@dataclass
class ConnectResult:
    ts: list[float]  # (T,) evenly spaced in [0, 1]
    linear: BarrierResult  # losses along (1 − t) A + t B and their barrier
    curve: BarrierResult  # the same along the trained Bezier curve
    linear_accuracy: list[float]  # (T,)
    curve_accuracy: list[float]  # (T,)
    control: dict[str, Tensor]  # C, named like the checkpoint params
    train_loss: list[float]  # per step: the batch loss at that step's sampled t
    info: dict  # checkpoints, hashes, subset, config, dtypes, seconds: the rest of connect.json

    def to_dict(self) -> dict:
        """The content of connect.json."""
        return {"t": self.ts, "linear_loss": self.linear.losses, "curve_loss": self.curve.losses,
                "linear_accuracy": self.linear_accuracy, "curve_accuracy": self.curve_accuracy,
                "linear_barrier": self.linear.barrier, "curve_barrier": self.curve.barrier,
                "linear_barrier_t": self.linear.t_at_max, "curve_barrier_t": self.curve.t_at_max,
                "train_loss": self.train_loss, "curve": "quadratic_bezier", "curve_file": CURVE_FILE, **self.info}


def connect_params(model, a: Params, b: Params, train_split: Split, eval_split: Split, config: ConnectConfig,
                   progress: bool = True) -> ConnectResult:
    """Train C on train_split, then measure both paths on the first config.examples of `eval_split`."""
    started = time.time()
    train_dtype, eval_dtype = config.dtypes(model.device)
    a, b = ({k: v.detach().to(model.device) for k, v in p.items()} for p in (a, b))
    loss_fn = train_loss(model, train_split, config.batch_size, config.steps,
                         torch.Generator().manual_seed(config.seed + 1), train_dtype)  # batch order: its own stream
    names = list(a) if config.param_scope == "all" else ["prompt"]
    control, history = train_control_point(loss_fn, a, b, steps=config.steps, lr=config.lr, names=names,
                                           seed=config.seed, progress=progress)
    trained = time.time()
    subset = eval_split.head(config.examples)
    batches, _ = batch_split(model, subset, config.batch_size, by_length=True)
    ts = np.linspace(0.0, 1.0, config.points)  # the very t of loss_barrier
    chunk = auto_chunk(model, batches, 2 * config.points, a["prompt"].shape[-2])
    paths = path_losses(model_scorer(model, batches, eval_dtype), a, b, control, torch.from_numpy(ts), chunk,
                        progress)
    info = {"subset_hash": subset_hash(subset), "examples": len(subset), "split": config.split,
            "hash_a": params_hash(a), "hash_b": params_hash(b), "config": asdict(config),
            "train_dtype": train_dtype, "eval_dtype": eval_dtype, "device": str(model.device),
            "model": model.model_name, "head": model.head, "train_seconds": round(trained - started, 3),
            "seconds": round(time.time() - started, 3)}
    return ConnectResult(ts.tolist(), path_barrier(ts, paths["linear_loss"]), path_barrier(ts, paths["curve_loss"]),
                         paths["linear_accuracy"].tolist(), paths["curve_accuracy"].tolist(),
                         {k: v.cpu() for k, v in control.items()}, history, info)


def write_result(result: ConnectResult, out_dir: str | Path,
                 extra: Callable[[Path], Sequence[Path]] | None = None) -> list[Path]:
    """DIR/connect.json and DIR/curve.safetensors, plus whatever extra(folder) writes into the folder (the figure),
    written into a temporary folder that replaces DIR only when all of them are there."""
    out = Path(out_dir)
    with atomic_folder(out) as folder:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in result.control.items()}
        header = {"curve": "quadratic_bezier", "hash_a": result.info["hash_a"], "hash_b": result.info["hash_b"]}
        write_atomic(folder / CURVE_FILE, lambda stream: stream.write(save(tensors, metadata=header)))
        names = [CURVE_FILE, *(p.name for p in (extra(folder) if extra else ())), RESULT_FILE]
        write_json(folder / RESULT_FILE, result.to_dict())
    return [out / name for name in names]


def check_pair(first: Checkpoint, second: Checkpoint) -> None:
    """ValueError unless the two checkpoints share one landscape, name their task and hold different prompts."""
    check_one_loss([(str(c.path), c.meta.get("head")) for c in (first, second)], "connect")
    check_comparable(first, second, "connect")
    if not first.meta.get("task"):
        raise ValueError(f"{first.path} does not name its task in ptp.json; it cannot be trained on here")
    if first.content_hash() == second.content_hash():
        raise ValueError(f"{first.path} and {second.path} hold the same prompt; connect two different checkpoints")


def connect_pair(first: Checkpoint, second: Checkpoint, model, config: ConnectConfig, task=None,
                 progress: bool = True) -> ConnectResult:
    """connect_params on two loaded checkpoints (their task's train split, then config.split), labelled with them."""
    task = task or first.task()
    result = connect_params(model, first.params, second.params, task.splits["train"], task.splits[config.split],
                            config, progress)
    meta = first.meta
    result.info.update(checkpoint_a=str(first.path), checkpoint_b=str(second.path), task=meta["task"],
                       head=meta["head"], method_a=meta.get("method"), seed_a=meta.get("seed"),
                       method_b=second.meta.get("method"), seed_b=second.meta.get("seed"))
    return result


def connect_checkpoints(checkpoint_a: str | Path, checkpoint_b: str | Path, config: ConnectConfig, *,
                        cache_dir: Path | None = None, progress: bool = True) -> ConnectResult:
    """Load two checkpoints, check they share one landscape, and connect them (nothing is written)."""
    first, second = load_checkpoint(checkpoint_a), load_checkpoint(checkpoint_b)
    check_pair(first, second)
    task = first.task()
    model = first.build_model(resolve_device(config.device), cache_dir=cache_dir, num_labels=task.num_labels)
    return connect_pair(first, second, model, config, task, progress)
