"""Batched, resumable, shardable evaluation of a loss surface on a grid.

Many grid points go through ONE forward: their prompts are stacked (G, P, D) and folded into the
batch by PromptModel (input space: their perturbations (G, B, T, D)). The grid is cut into fixed
chunks of `chunk` points; a chunk is the unit of work, of saving and of sharding, and its
composition never depends on what is already done, so a resumed or a sharded run repeats the same
floating-point operations as one uninterrupted process (bitwise equal on CPU).

    python -m landscape.grid CKPT [CKPT ...] --out surfaces/x [--space prompt|input] [--grid 21x21] ...
    torchrun --standalone --nproc_per_node 2 -m landscape.grid CKPT --out surfaces/x ...
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from landscape.directions import DIRECTION_KINDS, NORMALIZATIONS, Directions, input_directions, prompt_directions
from landscape.surface import SPEC_IDENTITY_KEYS, Surface, load_surface, save_surface, surface_paths
from ptp_core.checkpoint import Checkpoint
from ptp_core.data import SPLITS, Split
from ptp_core.io import to_json
from ptp_core.model import Batch, PromptModel
from ptp_core.backbones import DTYPE_CHOICES, DTYPES, resolve_dtype

DISTRIBUTED_TIMEOUT = __import__("datetime").timedelta(minutes=30)  # a rank may wait on a slow chunk of another
CPU_TOKENS_PER_FORWARD = 1 << 15  # CPU FLOP/s stops growing well below this (bench/grid.py); bounds a chunk's time
CPU_MEMORY_FRACTION = 0.25  # of available RAM for activations: other processes share the machine
CUDA_MEMORY_FRACTION = 0.6  # of free GPU memory; an out-of-memory error still halves and retries


@dataclass
class SurfaceSpec:
    """What surface to compute. grid: "21" (21 x 21), "21x31" (nx x ny) or "21x1" (a line along d1); an even
    count gets 0 added."""

    space: str = "prompt"  # prompt: perturb the trained tensors; input: perturb text-token embeddings
    directions: str = "gradient"  # the paper's figure: x = gradient, y = a random orthogonal direction
    norm: str = "filter"  # Li et al. 2018: scale per prompt token so the axes compare across checkpoints
    grid: str = "21x21"
    span: float = 1.0  # axes run over [-span, span] in units of the normalized directions
    examples: int = 256  # the first N examples of `split`, in stored order: the same for every checkpoint
    split: str = "test"
    params: str = "prompt"  # prompt: hold a trained head at its value; all: perturb the head too
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast where bf16 matmuls are native; the loss is always reduced in float32
    batch_size: int = 8  # examples per forward, sorted by length: small batches pad little; the chunk fills the forward
    chunk: int | None = None  # grid points per forward; None: chosen from free memory
    shape: tuple[int, int] = field(init=False)

    def __post_init__(self):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", str(self.grid))
        if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
            raise ValueError(f"grid {self.grid!r} is not a positive size; write e.g. --grid 21 (21x21), --grid 21x31 "
                             "or --grid 21x1 (a line)")
        self.shape = (int(match[1]), int(match[2] or match[1]))
        if not self.span > 0:
            raise ValueError(f"span must be > 0, got {self.span}; e.g. --span 1.0")
        if self.examples is None or self.examples <= 0:
            raise ValueError(f"examples must be > 0, got {self.examples}; e.g. --examples 256")
        if self.batch_size <= 0 or (self.chunk is not None and self.chunk <= 0):
            raise ValueError(f"batch size and chunk must be > 0, got {self.batch_size} and {self.chunk}")
        for name, value, allowed in (("space", self.space, ("prompt", "input")), ("directions", self.directions, DIRECTION_KINDS),
                                     ("norm", self.norm, NORMALIZATIONS), ("split", self.split, SPLITS),
                                     ("params", self.params, ("prompt", "all")), ("dtype", self.dtype, DTYPE_CHOICES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if self.space == "input" and self.directions != "gradient":
            raise ValueError(f"input space uses per-example gradient directions, not {self.directions!r}; "
                             "drop --directions or use --space prompt")

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        return grid_axis(self.shape[0], self.span), grid_axis(self.shape[1], self.span)


# Help and allowed values of each SurfaceSpec field on the command line (landscape.grid and landscape.plot).
SPEC_FLAGS = {
    "space": ("prompt: perturb the trained tensors; input: each example's text-token embeddings", ("prompt", "input")),
    "directions": ("x and y directions of the plane (input space: gradient only)", DIRECTION_KINDS),
    "norm": ("direction normalization (filter: Li et al. 2018, per prompt token)", NORMALIZATIONS),
    "grid": ("points per axis: 21 (21x21), 21x31, or 21x1 (a line)", None),
    "span": ("axes run over [-span, span] in units of the normalized directions", None),
    "examples": ("the first N examples of --split, the same for every checkpoint", None),
    "split": ("which split the examples come from", SPLITS),
    "params": ("prompt: the soft prompt only; all: the trained head too", ("prompt", "all")),
    "seed": ("seed of random directions (recorded)", None),
    "dtype": ("auto: bfloat16 autocast where the hardware multiplies bf16 natively, else float32; float32 for exact "
              "work (the loss is reduced in float32 either way)", DTYPE_CHOICES),
    "batch_size": ("examples per forward, sorted by length", None),
    "chunk": ("grid points per forward (default: from free memory)", None),
}


# Grid and examples of a command line that leaves them out: paper-grade where it is cheap, minutes where it is not.
# CPU: the bf16 grid runs at ~190 example-points/s on 2 cores (bench/grid.py), so 441 points on 64 examples take
# ~2.5 min a checkpoint and a two-checkpoint comparison with every metric stays under ~10 min.
DEVICE_DEFAULTS = {"cuda": ("21x21", 256, "a GPU evaluates 441 points on 256 examples in seconds"),
                   "cpu": ("21x21", 64, "on a CPU 256 examples would take ~10 min a surface; 64 keep a two-checkpoint "
                                        "comparison under ~10 min on 2 cores")}
DEVICE_DEFAULT_FIELDS = ("grid", "examples")


def device_defaults(device: str) -> tuple[dict, str]:
    """{grid, examples} for a command that does not give them, and the reason, by device type."""
    grid, examples, why = DEVICE_DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"]
    return {"grid": grid, "examples": examples}, why


def add_surface_arguments(parser, skip: tuple[str, ...] = ()) -> None:
    """One flag per SurfaceSpec field (--batch-size for batch_size), typed, with its default, help and choices.
    --grid and --examples default to None: spec_from_args fills them by device (DEVICE_DEFAULTS)."""
    defaults = SurfaceSpec()
    for name, (help_text, choices) in SPEC_FLAGS.items():
        if name in skip:
            continue
        default = None if name in DEVICE_DEFAULT_FIELDS else getattr(defaults, name)
        shown = "by device: " + "; ".join(f"{kind} {DEVICE_DEFAULTS[kind][DEVICE_DEFAULT_FIELDS.index(name)]}"
                                          for kind in DEVICE_DEFAULTS) if name in DEVICE_DEFAULT_FIELDS else default
        kind = {"span": float, "examples": int, "seed": int, "batch_size": int, "chunk": int}.get(name, str)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default, type=kind, choices=choices,
                            help=f"{help_text} (default: {shown})")


def spec_from_args(args, device: str = "cpu", **overrides) -> "SurfaceSpec":
    """The SurfaceSpec of parsed add_surface_arguments flags; --grid/--examples left out come from device_defaults."""
    given = {name: getattr(args, name) for name in SPEC_FLAGS if getattr(args, name, None) is not None}
    return SurfaceSpec(**{**device_defaults(device)[0], **given, **overrides})


def grid_axis(count: int, span: float) -> np.ndarray:
    """count points over [-span, span] holding exactly 0.0 (inserted for even counts: count + 1 points)."""
    if count == 1:
        return np.zeros(1)
    if count % 2:
        half = (count - 1) // 2
        return span * (np.arange(count) - half) / half  # the middle point is 0 * span / half == 0.0
    return np.sort(np.append(np.linspace(-span, span, count), 0.0))


# ---- evaluation subset -----------------------------------------------------------------------------

def encode_examples(model: PromptModel, examples: Split, batch_size: int) -> tuple[list[Batch], list[list[int]]]:
    """Batches sorted by length (less padding) and, per batch, the stored index of each example."""
    lengths = model.encode(examples.texts).attention_mask.sum(1).tolist()  # (N,) tokens per example
    ranked = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    order = [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
    batches = [model.encode([examples.texts[i] for i in rows], [examples.labels[i] for i in rows]) for rows in order]
    return batches, order


def subset_hash(examples: Split) -> str:
    digest = hashlib.sha256(json.dumps([examples.texts, examples.labels]).encode())
    return digest.hexdigest()[:16]


# ---- one chunk of grid points ------------------------------------------------------------------------

@torch.inference_mode()
def evaluate_points(model: PromptModel, batches: Sequence[Batch], order: Sequence[Sequence[int]],
                    alphas: Tensor, betas: Tensor, directions: Directions | None = None,
                    params: dict[str, Tensor] | None = None, input_pairs: Sequence[tuple[Tensor, Tensor]] | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy (G,) at G points (alphas, betas (G,)) in one forward per batch.

    Prompt space: pass `directions`. Input space: pass `params` (fixed) and `input_pairs`,
    the per-batch (d1, d2) (B, T, D) of input_directions.
    """
    count = sum(len(rows) for rows in order)
    losses = np.zeros((len(alphas), count))  # (G, N) in stored order, so the mean is batching-independent
    correct = np.zeros((len(alphas), count))
    stacked = directions.at(alphas, betas) if directions is not None else params
    for k, (batch, rows) in enumerate(zip(batches, order)):
        delta = None
        if input_pairs is not None:
            d1, d2 = input_pairs[k]
            shape = (-1, 1, 1, 1)
            delta = alphas.to(d1).reshape(shape) * d1 + betas.to(d1).reshape(shape) * d2  # (G, B, T, D)
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, hit = model.scores(stacked, batch, input_perturbation=delta)  # (G, B) each, CE in float32
        losses[:, rows] = loss.double().cpu().numpy()
        correct[:, rows] = hit.double().cpu().numpy()
    return losses.mean(axis=1), correct.mean(axis=1)


def auto_chunk(model: PromptModel, batches: Sequence[Batch], points: int, prompt_length: int) -> int:
    """Grid points per forward that fit memory (CUDA: free memory; CPU: available RAM, token cap)."""
    config = model.backbone.config
    hidden = model.embedding_dim
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    rows = max(len(b) for b in batches)
    tokens = max(b.input_ids.shape[1] for b in batches) + prompt_length  # the prompt being evaluated
    # live activations of one layer, x3 for temporaries: (B, L, inner + 4 H) and the (B, heads, L, L) scores
    per_point = 3 * 4 * rows * tokens * (inner + 4 * hidden + heads * tokens)
    if model.device.type == "cuda":  # free memory, plus what PyTorch's allocator holds cached but unused
        cached = torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
        budget = CUDA_MEMORY_FRACTION * (torch.cuda.mem_get_info(model.device)[0] + cached)
        limit = points
    else:
        budget = CPU_MEMORY_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit = max(1, CPU_TOKENS_PER_FORWARD // (rows * tokens))
    return int(max(1, min(points, limit, budget // per_point)))


@dataclass
class MemoryCap:
    """Grid points per forward that fit: halved on each CUDA out-of-memory error and kept for the rest of the
    surface, so later chunks do not fail at full size first. It splits a chunk, never moves chunk boundaries."""

    points: int


def _evaluate_chunk(evaluate, alphas: Tensor, betas: Tensor, cap: MemoryCap | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """evaluate(alphas, betas) in pieces of at most cap.points; on CUDA out-of-memory, free, halve, retry."""
    cap = cap or MemoryCap(len(alphas))
    while True:
        try:
            parts = [evaluate(alphas[s:s + cap.points], betas[s:s + cap.points])
                     for s in range(0, len(alphas), cap.points)]
            return tuple(np.concatenate(pair) for pair in zip(*parts))
        except torch.cuda.OutOfMemoryError as error:
            if cap.points == 1:
                raise ValueError("one grid point does not fit in GPU memory; lower --examples or --batch-size") \
                    from error
        # outside the except block: the failed forward's tensors (held by the traceback) are gone now
        torch.cuda.empty_cache()
        cap.points = max(1, cap.points // 2)


# ---- the surface --------------------------------------------------------------------------------------

def params_hash(params: dict[str, Tensor]) -> str:
    return Checkpoint(Path("."), params, {}).content_hash()


@dataclass(frozen=True)
class Shard:
    """This process's share of a sharded grid: chunks rank, rank + world, ...; `gather` all-gathers one Python
    object from every rank (torch.distributed.all_gather_object), None in a single process."""

    rank: int = 0
    world: int = 1
    gather: Callable[[object], list] | None = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world or (self.world > 1 and self.gather is None):
            raise ValueError(f"shard rank {self.rank} of {self.world} needs 0 <= rank < world and a gather function")


def surface_for_params(model: PromptModel, params: dict[str, Tensor], examples: Split, spec: SurfaceSpec,
                       path: str | Path | None = None, *, others: Sequence[dict[str, Tensor]] = (),
                       trajectory: dict | None = None, metadata: dict | None = None, overwrite: bool = False,
                       progress: bool = True, save_every: float = 5.0, shard: Shard = Shard(),
                       on_chunk: Callable[[int, float], None] | None = None) -> Surface:
    """The surface of `spec` around params on `examples`; saved to (and resumed from) `path` if given.

    With a Shard of world > 1 the chunks are dealt to ranks round-robin and gathered after every round;
    every rank returns the full surface, rank 0 writes the file. on_chunk(points, seconds) is called after every
    round with the points it evaluated and the seconds it took (e.g. to estimate the time left).
    """
    examples = examples.head(spec.examples)
    spec = replace(spec, dtype=resolve_dtype(spec.dtype, model.device))  # the dtype actually used is recorded
    identity = {"checkpoint_hash": params_hash(params), "space": spec.space, "directions": spec.directions,
                "normalization": "none" if spec.directions == "interp" else spec.norm, "seed": spec.seed,
                "split": spec.split, "subset_hash": subset_hash(examples), "model": model.model_name,
                "dtype": spec.dtype}
    setting = {"grid": list(spec.shape), "span": spec.span, "examples": len(examples), "params": spec.params,
               "others": [params_hash(p) for p in others]}
    surface = _resume(path, {**identity, **setting}, overwrite)
    if surface is not None and surface.is_complete:
        return surface
    batches, order = encode_examples(model, examples, spec.batch_size)
    params = {k: v.to(model.device) for k, v in params.items()}
    evaluate, stored, info = _evaluator(model, params, batches, order, spec, surface, others, trajectory, shard)
    if surface is None:
        alphas, betas = spec.axes()
        head_directions = stored.pop("head_directions", {})
        surface = Surface.empty(alphas, betas, {**identity, **setting, **(metadata or {}),
                                                "spec_hash": _spec_hash({**identity, **setting}),
                                                "direction_info": info, "batch_size": spec.batch_size}, **stored)
        surface.head_directions = head_directions
    elif not surface.head_directions:
        surface.head_directions = stored.get("head_directions", {})
    chunk = spec.chunk or auto_chunk(model, batches, surface.loss.size, params["prompt"].shape[-2])
    if shard.world > 1:  # every rank must cut the grid the same way
        chunk = min(c for (c,) in shard.gather((chunk,)))
    _fill(surface, evaluate, chunk, shard, path, progress, save_every, spec.space, on_chunk)
    return surface


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _resume(path: str | Path | None, spec: dict, overwrite: bool) -> Surface | None:
    """The saved surface at path if it was computed with this spec; None to start afresh."""
    if path is None or not all(p.exists() for p in surface_paths(path)):
        return None
    surface = load_surface(path)
    if surface.spec.get("spec_hash") == _spec_hash(spec):
        return surface
    if not overwrite:
        changed = [k for k in dict.fromkeys(SPEC_IDENTITY_KEYS + tuple(spec)) if surface.spec.get(k) != spec.get(k)]
        raise ValueError(f"{surface_paths(path)[0]} holds another surface (differs in {', '.join(changed) or 'spec'}); "
                         "pass --overwrite to replace it or choose another --surface path")
    return None


def _evaluator(model, params, batches, order, spec: SurfaceSpec, surface: Surface | None, others, trajectory,
               shard: Shard = Shard()):
    """evaluate(alphas, betas) -> (loss, accuracy) at those points; the direction arrays to store; their info."""
    dtype = DTYPES[spec.dtype]
    directions, input_pairs, stored, info = None, None, {}, {}
    if spec.space == "prompt":
        names = list(params) if spec.params == "all" else ["prompt"]
        directions = _saved_directions(surface, params, names, spec) or _shared_directions(
            model, params, batches, spec, names, others, trajectory, shard)
        stored = {"direction_1": directions.d1["prompt"].cpu().numpy(), "direction_2": directions.d2["prompt"].cpu().numpy(),
                  "head_directions": {f"{d}.{k}": getattr(directions, f"d{d[-1]}")[k].cpu().numpy()
                                      for d in ("direction_1", "direction_2") for k in names if k != "prompt"}}
        info = to_json(directions.info)
    else:
        input_pairs = input_directions(model, params, batches, spec.norm, spec.seed, order)

    def evaluate(alphas: Tensor, betas: Tensor) -> tuple[np.ndarray, np.ndarray]:
        return evaluate_points(model, batches, order, alphas.to(model.device), betas.to(model.device), directions,
                               params, input_pairs, dtype)
    return evaluate, stored, info


def _saved_directions(surface: Surface | None, params, names: list[str], spec: SurfaceSpec) -> Directions | None:
    """A resumed surface's own directions (prompt and, with --params all, the head's): the very same plane."""
    if surface is None or surface.direction_1 is None:
        return None
    arrays = {"direction_1.prompt": surface.direction_1, "direction_2.prompt": surface.direction_2,
              **surface.head_directions}
    if any(f"{d}.{k}" not in arrays for d in ("direction_1", "direction_2") for k in names):
        return None  # written before head directions were stored: recompute them (deterministic on CPU)
    device = params["prompt"].device
    d1, d2 = ({k: torch.as_tensor(arrays[f"{d}.{k}"]).to(device, torch.float32) for k in names}
              for d in ("direction_1", "direction_2"))
    return Directions(spec.directions, surface.spec.get("normalization") or spec.norm, spec.seed,
                      {k: v.detach().float() for k, v in params.items()}, d1, d2,
                      dict(surface.spec.get("direction_info") or {}))


def _shared_directions(model, params, batches, spec: SurfaceSpec, names, others, trajectory, shard: Shard) -> Directions:
    """Directions computed once, on rank 0, and sent to every rank: all ranks evaluate the very same plane (a CUDA
    backward is not bit-reproducible across processes) and the eigen-solve of hessian directions is not repeated."""
    directions = None
    if shard.rank == 0:
        # float32 whatever the grid's dtype: the directions fix the plane, so a bf16 surface lies on the very plane
        # of the float32 one and differs only by its evaluation (one gradient pass: cheap)
        directions = prompt_directions(model, params, batches, spec.directions, spec.norm, spec.seed, names,
                                       [{k: v.to(model.device) for k, v in o.items()} for o in others], trajectory)
    if shard.world == 1:
        return directions
    on_cpu = None if directions is None else replace(
        directions, center={}, d1={k: v.cpu() for k, v in directions.d1.items()},
        d2={k: v.cpu() for k, v in directions.d2.items()})
    sent = shard.gather(on_cpu)[0]
    device = params["prompt"].device
    return replace(sent, center={k: v.detach().float() for k, v in params.items()},
                   d1={k: v.to(device) for k, v in sent.d1.items()}, d2={k: v.to(device) for k, v in sent.d2.items()})


def _fill(surface: Surface, evaluate, chunk: int, shard: Shard, path, progress: bool, save_every: float,
          label: str, on_chunk: Callable[[int, float], None] | None = None) -> None:
    """Evaluate the missing points chunk by chunk (this shard's chunks), saving every save_every seconds."""
    from tqdm.auto import tqdm

    alphas, betas = surface.alphas, surface.betas
    total, done = surface.loss.size, surface.done.reshape(-1)
    # a chunk's composition never depends on what is done: resumed and sharded runs repeat the same arithmetic
    chunks = [np.arange(s, min(s + chunk, total)) for s in range(0, total, chunk)]
    chunks = [c[~done[c]] for c in chunks if not done[c].all()]
    grid_a = torch.as_tensor(np.repeat(alphas, betas.size), dtype=torch.float32)  # (nx*ny,) row-major
    grid_b = torch.as_tensor(np.tile(betas, alphas.size), dtype=torch.float32)
    writer, cap = path is not None and shard.rank == 0, MemoryCap(chunk)
    bar = tqdm(total=int(sum(len(c) for c in chunks)), unit="pt", desc=f"{label} surface",
               disable=not progress or shard.rank != 0)
    started, last_save, seconds = time.time(), time.time(), float(surface.spec.get("seconds") or 0.0)
    try:
        for start in range(0, len(chunks), shard.world):
            mine = chunks[start + shard.rank] if start + shard.rank < len(chunks) else np.arange(0)
            round_started = time.time()
            result = _evaluate_chunk(evaluate, grid_a[mine], grid_b[mine], cap) if len(mine) else (np.zeros(0),
                                                                                                  np.zeros(0))
            gathered = shard.gather((mine, *result)) if shard.world > 1 else [(mine, *result)]
            for index, loss, accuracy in gathered:
                surface.loss.reshape(-1)[index] = loss
                surface.accuracy.reshape(-1)[index] = accuracy
                bar.update(len(index))
            if on_chunk is not None:
                on_chunk(sum(len(index) for index, *_ in gathered), time.time() - round_started)
            if writer and time.time() - last_save >= save_every:
                surface.spec["seconds"] = round(seconds + time.time() - started, 3)
                save_surface(surface, path)
                last_save = time.time()
    finally:
        bar.close()
        surface.spec["seconds"] = round(seconds + time.time() - started, 3)
        if writer:
            save_surface(surface, path)  # also on interruption: finished chunks are kept


def _all_gather(item) -> list:
    """torch.distributed's all_gather_object: the Shard gather of a torchrun process."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def compute_surface(checkpoints: Checkpoint | Sequence[Checkpoint], spec: SurfaceSpec, path: str | Path | None = None,
                    *, model: PromptModel | None = None, examples: Split | None = None, device: str = "auto",
                    cache_dir: Path | None = None, overwrite: bool = False, progress: bool = True,
                    save_every: float = 5.0, shard: Shard = Shard(),
                    on_chunk: Callable[[int, float], None] | None = None) -> Surface:
    """The surface of `spec` around the first checkpoint (interp: through all of them), saved to `path`."""
    checkpoints = [checkpoints] if isinstance(checkpoints, Checkpoint) else list(checkpoints)
    first = checkpoints[0]
    if spec.directions == "interp":
        if len(checkpoints) not in (2, 3):
            raise ValueError(f"interp needs 2 checkpoints (a line) or 3 (a plane), got {len(checkpoints)}")
        if len(checkpoints) == 2 and spec.shape[1] > 1:
            raise ValueError(f"two checkpoints give a line, not a {spec.grid} grid; use --grid {spec.shape[0]}x1 "
                             "or pass a third checkpoint for a plane")
        for other in checkpoints[1:]:
            if other.meta.get("model") != first.meta.get("model") or \
                    {k: tuple(v.shape) for k, v in other.params.items()} != {k: tuple(v.shape) for k, v in first.params.items()}:
                raise ValueError(f"cannot interpolate {first.path} and {other.path}: different models or prompt "
                                 "shapes; interpolate checkpoints of one model and prompt length")
    elif len(checkpoints) != 1:
        raise ValueError(f"{spec.directions} directions take one checkpoint, got {len(checkpoints)}; "
                         "compute one surface per checkpoint (or use --directions interp)")
    if spec.directions == "pca" and (first.trajectory is None or "prompts" not in first.trajectory):
        raise ValueError(f"{first.path} has no trajectory.safetensors for pca directions; retrain with "
                         "--snapshot-every N or use --directions gradient")
    if model is None:
        model = first.build_model(device, cache_dir=cache_dir)
    if examples is None:
        from ptp_core.data import load_task

        if not first.meta.get("task"):
            raise ValueError(f"{first.path} does not name its task; pass examples=")
        task = load_task(first.meta["task"], label_words=first.meta.get("label_words"),
                         label_names=first.meta.get("label_names"))
        examples = task.splits[spec.split]
    metadata = {"method": first.meta.get("method"), "checkpoint": str(first.path), "task": first.meta.get("task"),
                "checkpoint_seed": first.meta.get("seed")}
    return surface_for_params(model, first.params, examples, spec, path, others=[c.params for c in checkpoints[1:]],
                              trajectory=first.trajectory, metadata=metadata, overwrite=overwrite,
                              progress=progress, save_every=save_every, shard=shard, on_chunk=on_chunk)


def main(argv: list[str] | None = None) -> Surface:
    """CLI: compute one surface file (also under torchrun: NCCL on GPUs, gloo on CPU)."""
    import argparse

    from ptp_core import cli
    from ptp_core.checkpoint import load_checkpoint

    p = cli.parser("python -m landscape.grid", "Compute (or resume) a loss surface file NAME.npz + NAME.json.")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True, help="surface path NAME (NAME.npz and NAME.json are written)")
    add_surface_arguments(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a surface file computed with another spec")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    args = p.parse_args(argv)
    cli.quiet_transformers()
    device, shard = cli.auto_device(args.device), Shard()
    spec = spec_from_args(args, device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: this rank's share, gathered after every round
        import torch.distributed as dist

        if device.startswith("cuda"):  # cuda or cuda:N: each rank takes the GPU of its local rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DISTRIBUTED_TIMEOUT)
        shard = Shard(dist.get_rank(), dist.get_world_size(), _all_gather)
    try:
        checkpoints = [load_checkpoint(c) for c in args.checkpoints]
        return compute_surface(checkpoints, spec, args.out, device=device, cache_dir=cli.cache_dir(),
                               overwrite=args.overwrite, progress=args.progress, shard=shard)
    finally:
        cli.end_distributed()


if __name__ == "__main__":
    from ptp_core.cli import run

    run(main)
