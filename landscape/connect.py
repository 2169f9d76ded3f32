"""Mode connectivity of two soft prompts: the straight line between them and a trained quadratic Bezier curve.

Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs") connect two minima A and B
by θ(t) = (1 − t)² A + 2t(1 − t) C + t² B and train the control point C to minimise E_{t ~ U(0, 1)} L(θ(t));
Qin et al. 2022 do the same for delta-tuning solutions. Both paths are then measured on one t grid and
compared by their barrier max_t L(θ(t)) − ((1 − t) L(A) + t L(B)) (landscape.sharpness.loss_barrier).
With C at the midpoint (A + B) / 2 the curve IS the line, so training starts from the line.

    python -m landscape.connect runs/pt/seed0 runs/pt/seed1 --out figures/connect-pt
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from landscape.hessian import Params, as_generator
from landscape.sharpness import BarrierResult, loss_barrier
from ptp_core.data import SPLITS, Split, batch_indices

CURVE_FILE, RESULT_FILE, FIGURE_STEM = "curve.safetensors", "connect.json", "connect"
ScoreFn = Callable[[Params], tuple[Tensor, Tensor]]  # stacked params (G, ...) -> mean loss (G,), accuracy (G,)


@dataclass
class ConnectConfig:
    steps: int = 60  # Adam steps on C, one t ~ U(0, 1) and one train batch each (minilm, 2 busy cores: ~2.5 s each)
    lr: float = 1e-2  # Adam on C; dθ/dC = 2t(1 − t) <= 1/2, so θ moves by at most half of this per step
    batch_size: int = 16  # train examples per step; also evaluation examples per forward
    points: int = 21  # evenly spaced t in [0, 1]; odd, so t = 0.5 (the curve's furthest point from the line) is on it
    examples: int = 128  # the first N examples of `split` in stored order, as for the surfaces
    split: str = "test"
    params: str = "prompt"  # prompt: bend the prompt only (a head follows the line); all: bend the head too
    seed: int = 0  # t samples draw from seed, the train batch order from seed + 1
    dtype: str = "auto"  # training autocast (auto: bf16 where native); the t grid is evaluated in float32 unless set
    device: str = "auto"

    def __post_init__(self):
        from ptp_core.train import TRAIN_DTYPES

        for name in ("steps", "batch_size", "examples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}; e.g. --lr 1e-2")
        if self.points < 3:
            raise ValueError(f"--points must be at least 3 (both ends and one interior t), got {self.points}")
        for name, value, allowed in (("split", self.split, SPLITS), ("params", self.params, ("prompt", "all")),
                                     ("dtype", self.dtype, TRAIN_DTYPES)):
            if value not in allowed:
                raise ValueError(f"unknown --{name} {value!r}; use one of {', '.join(allowed)}")

    def dtypes(self, device: str) -> tuple[str, str]:
        """(training dtype, evaluation dtype): auto trains in bf16 where native and evaluates in float32, since a
        barrier is a difference of losses; an explicit dtype is used for both."""
        from ptp_core.backbones import resolve_dtype

        return resolve_dtype(self.dtype, device), "float32" if self.dtype == "auto" else self.dtype


# ---- the two paths ---------------------------------------------------------------------------------------

def _column(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like).reshape(-1, *([1] * like.dim()))  # (G, 1, ..., 1): broadcasts over one tensor


def line(t: Tensor, a: Params, b: Params) -> Params:
    """θ(t) = (1 − t) A + t B at G values t (G,); every tensor (...) becomes (G, ...)."""
    return {k: (1 - _column(t, a[k])) * a[k] + _column(t, a[k]) * b[k] for k in a}


def bezier(t: Tensor, a: Params, c: Params, b: Params) -> Params:
    """θ(t) = (1 − t)² A + 2t(1 − t) C + t² B (Garipov et al. 2018, eq. 3) at G values t (G,): tensors (G, ...)."""
    out = {}
    for k in a:
        s = _column(t, a[k])  # (G, 1, ..., 1)
        out[k] = (1 - s) ** 2 * a[k] + 2 * s * (1 - s) * c[k] + s ** 2 * b[k]
    return out


def midpoint(a: Params, b: Params) -> Params:
    """(A + B) / 2: the control point whose Bezier curve is the straight line."""
    return {k: (a[k] + b[k]) / 2 for k in a}


def train_control_point(loss_fn: Callable[[Params, int], Tensor], a: Params, b: Params, *, steps: int, lr: float,
                        names: Sequence[str] | None = None, seed: int | torch.Generator = 0,
                        progress: bool = True) -> tuple[Params, list[float]]:
    """C minimising E_{t ~ U(0, 1)} L(θ(t)) by Adam, from C = (A + B) / 2 (Garipov et al. 2018, eq. 4).

    loss_fn(stacked params (1, ...), step) -> per-sample losses, e.g. (1, B): step picks the batch. Only the
    tensors in `names` (default all) get a trained control; the others stay at the midpoint, i.e. on the line.
    Returns C (detached) and the loss of each step.
    """
    from tqdm.auto import tqdm

    names = list(a) if names is None else list(names)
    generator = as_generator(seed)
    control = midpoint({k: v.detach() for k, v in a.items()}, {k: v.detach() for k, v in b.items()})
    trained = {k: control[k].clone().requires_grad_(True) for k in names}
    optimizer = torch.optim.Adam(list(trained.values()), lr=lr)
    history = []
    bar = tqdm(range(steps), desc="bezier curve", disable=not progress)
    for step in bar:
        t = torch.rand(1, generator=generator)  # (1,): one t per step, as Garipov et al.
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(bezier(t, a, {**control, **trained}, b), step).float().mean()
        if not torch.isfinite(loss):
            raise ValueError(f"the curve's loss became {loss.item()} at step {step}; lower --lr")
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    return {**control, **{k: v.detach() for k, v in trained.items()}}, history


def path_losses(score: ScoreFn, a: Params, b: Params, c: Params, ts: Tensor, chunk: int | None = None,
                progress: bool = False) -> dict[str, np.ndarray]:
    """Mean loss and accuracy (T,) along the line and the curve at ts (T,), many t per forward.

    score(stacked (G, ...)) -> (loss (G,), accuracy (G,)). Both paths are stacked, `chunk` points per call
    (default all). The curve's ends are the line's (θ(0) = A, θ(1) = B exactly), so they are measured once.
    """
    from tqdm.auto import tqdm

    count = len(ts)
    ends = (ts == 0) | (ts == 1)
    inner = ts[~ends]
    stacked = {k: torch.cat([v, w]) for (k, v), w in zip(line(ts, a, b).items(), bezier(inner, a, c, b).values())}
    total = count + len(inner)  # (T + T_inner, ...) line first
    chunk = chunk or total
    parts = [score({k: v[s:s + chunk] for k, v in stacked.items()})
             for s in tqdm(range(0, total, chunk), desc="paths", unit="chunk", disable=not progress)]
    loss = torch.cat([p[0] for p in parts]).double().cpu().numpy()  # (T + T_inner,)
    accuracy = torch.cat([p[1] for p in parts]).double().cpu().numpy()
    curve_loss, curve_accuracy = loss[:count].copy(), accuracy[:count].copy()
    curve_loss[~ends.numpy()], curve_accuracy[~ends.numpy()] = loss[count:], accuracy[count:]
    return {"linear_loss": loss[:count], "linear_accuracy": accuracy[:count],
            "curve_loss": curve_loss, "curve_accuracy": curve_accuracy}


def path_barrier(ts: Sequence[float], losses: Sequence[float]) -> BarrierResult:
    """loss_barrier of losses measured at ts = linspace(0, 1, T) (all at once, so looked up rather than computed)."""
    losses = np.asarray(losses, dtype=float)
    expected = np.linspace(0.0, 1.0, len(losses))
    if not np.allclose(ts, expected):
        raise ValueError("a barrier needs losses at evenly spaced t from 0 to 1")
    return loss_barrier(lambda t: float(losses[round(t * (len(losses) - 1))]), len(losses))


# ---- the model's loss on the two splits ------------------------------------------------------------------

def model_scorer(model, batches: Sequence, dtype: str = "float32") -> ScoreFn:
    """score(stacked params (G, ...)) -> mean loss and accuracy (G,) over every example of `batches`."""
    from ptp_core.backbones import autocast

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
    from ptp_core.backbones import autocast

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


# what two checkpoints must share to lie in one loss landscape
SHARED_META = ("model", "head", "task", "label_words", "template", "max_length")


def check_pair(first, second) -> None:
    """ValueError saying what differs when two checkpoints do not share model, head, task, labels and shapes."""
    for key in SHARED_META:
        if first.meta.get(key) != second.meta.get(key):
            raise ValueError(f"cannot connect {first.path} and {second.path}: their {key} differs "
                             f"({first.meta.get(key)!r} vs {second.meta.get(key)!r}); connect two checkpoints of "
                             "one model, head, task and template")
    shapes = [{k: tuple(v.shape) for k, v in c.params.items()} for c in (first, second)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"cannot connect {first.path} and {second.path}: their tensors differ ({shapes[0]} vs "
                         f"{shapes[1]}); connect checkpoints of one prompt length and head")
    if not first.meta.get("task"):
        raise ValueError(f"{first.path} does not name its task in ptp.json; it cannot be trained on here")
    if first.content_hash() == second.content_hash():
        raise ValueError(f"{first.path} and {second.path} hold the same prompt; connect two different checkpoints")


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if (out / RESULT_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds {RESULT_FILE}; pass --overwrite or choose another --out")


def connect_params(model, a: Params, b: Params, train_split: Split, examples: Split, config: ConnectConfig,
                   progress: bool = True) -> ConnectResult:
    """Train C on train_split, then measure both paths on the first config.examples of `examples`."""
    from landscape.grid import auto_chunk, encode_examples, params_hash, subset_hash

    started = time.time()
    train_dtype, eval_dtype = config.dtypes(model.device)
    a, b = ({k: v.detach().to(model.device) for k, v in p.items()} for p in (a, b))
    loss_fn = train_loss(model, train_split, config.batch_size, config.steps,
                         torch.Generator().manual_seed(config.seed + 1), train_dtype)  # batch order: its own stream
    names = list(a) if config.params == "all" else ["prompt"]
    control, history = train_control_point(loss_fn, a, b, steps=config.steps, lr=config.lr, names=names,
                                           seed=config.seed, progress=progress)
    trained = time.time()
    subset = examples.head(config.examples)
    batches, _ = encode_examples(model, subset, config.batch_size)
    ts = np.linspace(0.0, 1.0, config.points)  # the very t of loss_barrier
    chunk = auto_chunk(model, batches, 2 * config.points, a["prompt"].shape[-2])
    paths = path_losses(model_scorer(model, batches, eval_dtype), a, b, control, torch.from_numpy(ts), chunk,
                        progress)
    info = {"subset_hash": subset_hash(subset), "examples": len(subset), "split": config.split,
            "hash_a": params_hash(a), "hash_b": params_hash(b), "config": asdict(config),
            "train_dtype": train_dtype, "eval_dtype": eval_dtype, "device": str(model.device),
            "model": model.model_name, "train_seconds": round(trained - started, 3),
            "seconds": round(time.time() - started, 3)}
    return ConnectResult(ts.tolist(), path_barrier(ts, paths["linear_loss"]), path_barrier(ts, paths["curve_loss"]),
                         paths["linear_accuracy"].tolist(), paths["curve_accuracy"].tolist(),
                         {k: v.cpu() for k, v in control.items()}, history, info)


def write_result(result: ConnectResult, out_dir: str | Path) -> list[Path]:
    """DIR/connect.json, DIR/curve.safetensors, DIR/connect.pdf + .png: drawn first, staged beside DIR, then
    moved in (connect.json last), so DIR gets either all of them or nothing."""
    from safetensors.torch import save

    from landscape import render
    from ptp_core.io import write_atomic, write_json

    figure = render.connectivity(result)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in result.control.items()}
        header = {"curve": "quadratic_bezier", "hash_a": result.info["hash_a"], "hash_b": result.info["hash_b"]}
        write_atomic(staging / CURVE_FILE, lambda stream: stream.write(save(tensors, metadata=header)))
        names = [CURVE_FILE, *(p.name for p in render.save_figure(figure, staging / FIGURE_STEM))]
        write_json(staging / RESULT_FILE, result.to_dict())
        out.mkdir(exist_ok=True)
        for name in [*names, RESULT_FILE]:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in [*names, RESULT_FILE]]


def connect(checkpoint_a: str | Path, checkpoint_b: str | Path, config: ConnectConfig, out_dir: str | Path, *,
            cache_dir: Path | None = None, overwrite: bool = False, progress: bool = True) -> ConnectResult:
    """Load two checkpoints, check they share one landscape, connect them, write DIR (see write_result)."""
    from ptp_core.backbones import resolve_device
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.data import load_task

    check_output(Path(out_dir), overwrite)
    first, second = load_checkpoint(checkpoint_a), load_checkpoint(checkpoint_b)
    check_pair(first, second)
    meta = first.meta
    task = load_task(meta["task"], label_words=meta.get("label_words"), label_names=meta.get("label_names"))
    model = first.build_model(resolve_device(config.device), cache_dir=cache_dir, num_labels=task.num_labels)
    result = connect_params(model, first.params, second.params, task.splits["train"], task.splits[config.split],
                            config, progress)
    result.info.update(checkpoint_a=str(first.path), checkpoint_b=str(second.path), task=meta["task"],
                       head=meta["head"], method_a=meta.get("method"), seed_a=meta.get("seed"),
                       method_b=second.meta.get("method"), seed_b=second.meta.get("seed"))
    write_result(result, out_dir)
    return result


def main(argv: list[str] | None = None) -> ConnectResult:
    import argparse

    from ptp_core import cli
    from ptp_core.train import TRAIN_DTYPES

    d = ConnectConfig()
    p = cli.parser("python -m landscape.connect", "Train a Bezier curve between two checkpoints; compare its loss "
                   "barrier with the straight line's.")
    p.add_argument("checkpoint_a")
    p.add_argument("checkpoint_b")
    p.add_argument("--out", required=True, help="directory for connect.json, curve.safetensors, connect.pdf/.png")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Adam steps on the control point (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam step size (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="train examples per step (default 16)")
    p.add_argument("--points", type=int, default=d.points, help=f"t values in [0, 1] evaluated (default {d.points})")
    p.add_argument("--examples", type=int, default=d.examples, help=f"the first N of --split (default {d.examples})")
    p.add_argument("--split", default=d.split, choices=SPLITS)
    p.add_argument("--params", default=d.params, choices=("prompt", "all"),
                   help="prompt: bend the prompt, a trained head follows the line; all: bend the head too")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=TRAIN_DTYPES,
                   help="auto: train in bf16 where native, evaluate in float32; otherwise this dtype for both")
    p.add_argument("--device", default=d.device)
    p.add_argument("--overwrite", action="store_true", help="replace connect.json and its files in --out")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    args = p.parse_args(argv)
    config = ConnectConfig(**{k: v for k, v in vars(args).items() if k in ConnectConfig.__dataclass_fields__})
    cli.quiet_transformers()
    result = connect(args.checkpoint_a, args.checkpoint_b, config, args.out, cache_dir=cli.cache_dir(),
                     overwrite=args.overwrite, progress=args.progress)
    print(f"linear barrier {result.linear.barrier:.4f} at t={result.linear.t_at_max:.2f}, curve barrier "
          f"{result.curve.barrier:.4f} at t={result.curve.t_at_max:.2f}; wrote {args.out} in "
          f"{result.info['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    from ptp_core.cli import run

    run(main)
