"""The resumable, shardable driver of a surface: which points are missing, in which chunks, saved when.

Many grid points go through ONE forward: their prompts are stacked (G, P, D) and folded into the
batch by PromptModel (input space: their perturbations (G, B, T, D)). The grid is cut into fixed
chunks of `chunk` points; a chunk is the unit of work, of saving and of sharding, and its
composition never depends on what is already done, so a resumed or a sharded run repeats the same
floating-point operations as one uninterrupted process (bitwise equal on CPU).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from landscape.grid.directions import Directions, input_directions, prompt_directions
from landscape.grid.evaluate import MemoryCap, auto_chunk, evaluate_chunk, evaluate_points, subset_hash
from landscape.grid.spec import SurfaceSpec
from landscape.surface import (SPEC_IDENTITY_KEYS, Surface, check_one_loss, load_surface, save_surface,
                               surface_paths)
from ptp_core.checkpoint import Checkpoint, check_comparable, params_hash
from ptp_core.io import to_json
from ptp_core.model.backbones import DTYPES, resolve_dtype
from ptp_core.model.encoding import batch_split
from ptp_core.model.prompt_model import PromptModel
from ptp_core.tasks.task import Split


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


def surface_for_params(model: PromptModel, params: dict[str, Tensor], split: Split, spec: SurfaceSpec,
                       path: str | Path | None = None, *, others: Sequence[dict[str, Tensor]] = (),
                       trajectory: dict | None = None, metadata: dict | None = None, overwrite: bool = False,
                       progress: bool = True, save_every: float = 5.0, shard: Shard = Shard(),
                       on_chunk: Callable[[int, float], None] | None = None) -> Surface:
    """The surface of `spec` around params on the first spec.examples of `split`; saved to (and resumed from) `path` if given.

    With a Shard of world > 1 the chunks are dealt to ranks round-robin and gathered after every round;
    every rank returns the full surface, rank 0 writes the file. on_chunk(points, seconds) is called after every
    round with the points it evaluated and the seconds it took (e.g. to estimate the time left).
    """
    spec = spec.for_device(str(model.device))
    subset = split.head(spec.examples)
    spec = replace(spec, dtype=resolve_dtype(spec.dtype, model.device))  # the dtype actually used is recorded
    identity = {"checkpoint_hash": params_hash(params), "space": spec.space, "directions": spec.directions,
                "normalization": "none" if spec.directions == "interp" else spec.norm, "seed": spec.seed,
                "split": spec.split, "subset_hash": subset_hash(subset), "model": model.model_name,
                "dtype": spec.dtype}
    setting = {"grid": list(spec.shape), "span": spec.span, "examples": len(subset), "params": spec.param_scope,
               "others": [params_hash(p) for p in others]}
    if model.prefix_shape is not None:  # shallow surfaces keep the spec (and spec hash) they always had
        setting.update(prompt_type="deep", prompt_layers=model.prefix_shape.layers)
    surface = _resume(path, {**identity, **setting}, overwrite)
    if surface is not None and surface.is_complete:
        return surface
    batches, order = batch_split(model, subset, spec.batch_size, by_length=True)
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
    surface.spec["head"] = model.head  # what the loss is (--head lm: token-level): figures name it; no identity key
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
        changed = [k for k in dict.fromkeys(SPEC_IDENTITY_KEYS + tuple(spec))  # format: the file's, not a setting
                   if k != "format" and surface.spec.get(k) != spec.get(k)]
        raise ValueError(f"{surface_paths(path)[0]} holds a surface computed with another "
                         f"{', '.join(changed) or 'spec'}; give another --out for this one, or --overwrite to replace it")
    return None


def _evaluator(model, params, batches, order, spec: SurfaceSpec, surface: Surface | None, others, trajectory,
               shard: Shard = Shard()):
    """evaluate(alphas, betas) -> (loss, accuracy) at those points; the direction arrays to store; their info."""
    dtype = DTYPES[spec.dtype]
    plane, input_pairs, stored, info = None, None, {}, {}
    if spec.space == "prompt":
        names = list(params) if spec.param_scope == "all" else ["prompt"]
        plane = _saved_plane(surface, params, names, spec) or _shared_plane(
            model, params, batches, spec, names, others, trajectory, shard)
        stored = {"direction_1": plane.d1["prompt"].cpu().numpy(), "direction_2": plane.d2["prompt"].cpu().numpy(),
                  "head_directions": {f"{d}.{k}": getattr(plane, f"d{d[-1]}")[k].cpu().numpy()
                                      for d in ("direction_1", "direction_2") for k in names if k != "prompt"}}
        info = to_json(plane.info)
    else:
        input_pairs = input_directions(model, params, batches, spec.norm, spec.seed, order)

    def evaluate(alphas: Tensor, betas: Tensor) -> tuple[np.ndarray, np.ndarray]:
        return evaluate_points(model, batches, order, alphas.to(model.device), betas.to(model.device), plane,
                               params, input_pairs, dtype)
    return evaluate, stored, info


def _saved_plane(surface: Surface | None, params, names: list[str], spec: SurfaceSpec) -> Directions | None:
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


def _shared_plane(model, params, batches, spec: SurfaceSpec, names, others, trajectory, shard: Shard) -> Directions:
    """Directions computed once, on rank 0, and sent to every rank: all ranks evaluate the very same plane (a CUDA
    backward is not bit-reproducible across processes) and the eigen-solve of hessian directions is not repeated."""
    plane = None
    if shard.rank == 0:
        # float32 whatever the grid's dtype: the directions fix the plane, so a bf16 surface lies on the very plane
        # of the float32 one and differs only by its evaluation (one gradient pass: cheap)
        plane = prompt_directions(model, params, batches, spec.directions, spec.norm, spec.seed, names,
                                       [{k: v.to(model.device) for k, v in o.items()} for o in others], trajectory)
    if shard.world == 1:
        return plane
    on_cpu = None if plane is None else replace(
        plane, center={}, d1={k: v.cpu() for k, v in plane.d1.items()}, d2={k: v.cpu() for k, v in plane.d2.items()})
    sent = shard.gather(on_cpu)[0]
    device = params["prompt"].device
    return replace(sent, center={k: v.detach().float() for k, v in params.items()},
                   d1={k: v.to(device) for k, v in sent.d1.items()}, d2={k: v.to(device) for k, v in sent.d2.items()})


def _fill(surface: Surface, evaluate, chunk: int, shard: Shard, path, progress: bool, save_every: float,
          label: str, on_chunk: Callable[[int, float], None] | None = None) -> None:
    """Evaluate the missing points chunk by chunk (this shard's chunks), saving every save_every seconds."""
    alphas, betas = surface.alphas, surface.betas
    total, done = surface.loss.size, surface.done.reshape(-1)
    # a chunk's composition never depends on what is done: resumed and sharded runs repeat the same arithmetic
    chunks = [np.arange(s, min(s + chunk, total)) for s in range(0, total, chunk)]
    chunks = [c[~done[c]] for c in chunks if not done[c].all()]
    grid_a = torch.as_tensor(np.repeat(alphas, betas.size), dtype=torch.float32)  # (nx*ny,) row-major
    grid_b = torch.as_tensor(np.tile(betas, alphas.size), dtype=torch.float32)
    writer, cap = path is not None and shard.rank == 0, MemoryCap(chunk)
    # a log (stderr not a terminal) gets one line per finished surface: a redrawn bar there reads as every state
    # it passed through, glued together on one line
    shown, redrawn = progress and shard.rank == 0, progress and shard.rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=int(sum(len(c) for c in chunks)), unit="pt", desc=f"{label} surface", disable=not redrawn)
    started, last_save, seconds = time.time(), time.time(), float(surface.spec.get("seconds") or 0.0)
    try:
        for start in range(0, len(chunks), shard.world):
            mine = chunks[start + shard.rank] if start + shard.rank < len(chunks) else np.arange(0)
            round_started = time.time()
            result = evaluate_chunk(evaluate, grid_a[mine], grid_b[mine], cap) if len(mine) else (np.zeros(0),
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
        if shown and not redrawn:
            tqdm.write(f"{label} surface: {surface.points_done}/{total} points, {time.time() - started:.1f} s",
                       file=sys.stderr)
        if writer:
            save_surface(surface, path)  # also on interruption: finished chunks are kept


def compute_surface(checkpoints: Checkpoint | Sequence[Checkpoint], spec: SurfaceSpec, path: str | Path | None = None,
                    *, model: PromptModel | None = None, split: Split | None = None, device: str = "auto",
                    cache_dir: Path | None = None, overwrite: bool = False, progress: bool = True,
                    save_every: float = 5.0, shard: Shard = Shard(),
                    on_chunk: Callable[[int, float], None] | None = None) -> Surface:
    """The surface of `spec` around the first checkpoint (interp: through all of them), saved to `path`.

    model and split default to the first checkpoint's own (its backbone; the split `spec.split` of its task)."""
    checkpoints = [checkpoints] if isinstance(checkpoints, Checkpoint) else list(checkpoints)
    first = checkpoints[0]
    if spec.directions == "interp":
        if len(checkpoints) not in (2, 3):
            raise ValueError(f"interp needs 2 checkpoints (a line) or 3 (a plane), got {len(checkpoints)}")
        if len(checkpoints) == 2 and spec.shape[1] > 1:
            raise ValueError(f"two checkpoints give a line, not a {spec.grid} grid; use --grid {spec.shape[0]}x1 "
                             "or pass a third checkpoint for a plane")
        check_one_loss([(str(c.path), c.meta.get("head")) for c in checkpoints], "interpolate")
        for other in checkpoints[1:]:
            check_comparable(first, other, "interpolate")
    elif len(checkpoints) != 1:
        raise ValueError(f"{spec.directions} directions take one checkpoint, got {len(checkpoints)}; "
                         "compute one surface per checkpoint (or use --directions interp)")
    if spec.directions == "pca" and (first.trajectory is None or "prompts" not in first.trajectory):
        raise ValueError(f"{first.path} has no trajectory.safetensors for pca directions; retrain with "
                         "--snapshot-every N or use --directions gradient")
    if model is None:
        model = first.build_model(device, cache_dir=cache_dir)
    if split is None:
        split = first.task().splits[spec.split]
    metadata = {"method": first.method_label, "checkpoint": str(first.path), "task": first.meta.get("task"),
                "checkpoint_seed": first.meta.get("seed")}
    return surface_for_params(model, first.params, split, spec, path, others=[c.params for c in checkpoints[1:]],
                              trajectory=first.trajectory, metadata=metadata, overwrite=overwrite,
                              progress=progress, save_every=save_every, shard=shard, on_chunk=on_chunk)


