"""Surface files: a 2D loss landscape on a grid, stored as NAME.npz (arrays) + NAME.json (spec).

`loss[i, j]` is measured at (alphas[i], betas[j]); NaN marks a point not computed yet, so a
half-written surface is a valid surface and a grid run can resume from it. Numpy only: this
file is read by plotting code that must not pay for importing torch.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ptp_core.io import dumps, write_atomic, write_text

FORMAT = "ptp-landscape-surface/2"  # 2: biases take no filter direction; a deep prompt's keys and values are filtered apart

# Keys every spec carries (DESIGN.md "Surface files"). Values the grid code does not know
# (e.g. `directions` for a surface built by hand) may be None, but the key must be there.
SPEC_KEYS = (
    "format",          # FORMAT; bumped when the file layout changes
    "checkpoint_hash",  # Checkpoint.content_hash() of the centre
    "space",           # "prompt" | "input"
    "directions",      # direction kind: gradient | random | interp | pca | hessian
    "normalization",   # e.g. "filter", "layer", "none"
    "seed",            # seed of the random directions
    "split",           # evaluation split, e.g. "test"
    "subset_hash",     # hash of the evaluation subset (first --examples of --split)
    "model",           # backbone id
    "dtype",           # evaluation dtype, e.g. "float32"
    "points",          # grid points computed (finite loss); kept up to date by save_surface
    "seconds",         # wall time spent computing the grid
)
# Keys that define *which* surface this is: a resumed run must agree on all of them.
SPEC_IDENTITY_KEYS = tuple(k for k in SPEC_KEYS if k not in ("points", "seconds"))
# What makes the numbers of two surfaces comparable, beside the method and seed they measure: the landscape (task,
# model, head, template, prompt) and how it was sampled (space, plane, grid, examples, dtype). The grid writes
# the sampling keys; landscape.compare adds the checkpoint's (head, template, prompt_length, ...). A surface
# written elsewhere may lack some: they read None, and only surfaces that agree on every key pool.
CHECKPOINT_KEYS = ("task", "model", "head", "template", "label_words", "max_length", "prompt_type", "prompt_length")
SAMPLING_KEYS = ("space", "directions", "normalization", "grid", "span", "split", "examples", "subset_hash", "params",
                 "dtype", "partial")
ARRAY_KEYS = ("alphas", "betas", "loss", "accuracy")
DIRECTION_KEYS = ("direction_1", "direction_2")
# What a --head lm surface's numbers are: the mean cross-entropy over all target tokens of the examples (PEFT's
# `labels` loss) and the fraction of target tokens the greedy choice gets right (teacher-forced)
TOKEN_LOSS, TOKEN_ACCURACY = "token-level cross-entropy", "token accuracy"


def is_generation(head: str | None) -> bool:
    """True for --head lm, whose loss is over target tokens; every other head's is over classes (or candidates)."""
    return head == "lm"


def loss_name(head: str | None) -> str:
    """How figures and tables name the loss of a checkpoint with this head."""
    return TOKEN_LOSS if is_generation(head) else "loss"


def accuracy_name(head: str | None) -> str:
    """How figures and tables name the accuracy of a checkpoint with this head."""
    return TOKEN_ACCURACY if is_generation(head) else "accuracy"


def check_one_loss(heads: Sequence[tuple[str, str | None]], verb: str = "compare") -> None:
    """ValueError unless every (name, head) measures one kind of loss: --head lm's token-level cross-entropy or a
    classification's cross-entropy over classes; the two differ in scale and meaning, so no figure, table or
    statistic may hold both."""
    kinds = {is_generation(head) for _, head in heads}
    if len(kinds) > 1:
        lm = next(name for name, head in heads if is_generation(head))
        other, head = next((name, head) for name, head in heads if not is_generation(head))
        raise ValueError(f"cannot {verb} {lm} (--head lm: {TOKEN_LOSS} of target texts) with {other} "
                         f"({f'--head {head}' if head else 'a classification'}: cross-entropy over classes); give "
                         "checkpoints of one task kind, each kind in its own run")


@dataclass
class Surface:
    """A loss landscape L(θ* + α d1 + β d2) sampled on the grid alphas × betas.

    alphas: (nx,), betas: (ny,) strictly increasing, both containing exactly 0.0.
    loss, accuracy: (nx, ny), NaN where not computed. direction_1/2: (P, D) or None (input space).
    head_directions: with --params all, the other perturbed tensors' directions, keyed
    "direction_1.<name>" / "direction_2.<name>" as in the npz (a resume evaluates the very same plane).
    spec: the JSON side (SPEC_KEYS plus free metadata: method, task, examples, created, ...).
    """

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    spec: dict = field(default_factory=dict)
    direction_1: np.ndarray | None = None
    direction_2: np.ndarray | None = None
    head_directions: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _shape_problem(self)
        if problem:
            raise ValueError(f"bad surface: {problem}")

    @classmethod
    def empty(cls, alphas: np.ndarray, betas: np.ndarray, spec: dict | None = None,
              direction_1: np.ndarray | None = None,
              direction_2: np.ndarray | None = None) -> "Surface":
        """A surface with every point still to compute (loss and accuracy all NaN)."""
        alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
        nan = np.full((alphas.size, betas.size), np.nan)  # (nx, ny)
        full_spec = {key: None for key in SPEC_KEYS} | {"format": FORMAT, "points": 0, "seconds": 0.0}
        return cls(alphas, betas, nan, nan.copy(), full_spec | (spec or {}), direction_1, direction_2)

    @property
    def shape(self) -> tuple[int, int]:
        return self.loss.shape

    @property
    def done(self) -> np.ndarray:
        """(nx, ny) bool: points whose loss has been computed."""
        return np.isfinite(self.loss)

    @property
    def points_done(self) -> int:
        return int(self.done.sum())

    @property
    def is_complete(self) -> bool:
        return bool(self.done.all())

    @property
    def center_index(self) -> tuple[int, int]:
        """(i, j) with alphas[i] == betas[j] == 0: the trained prompt itself."""
        return int(np.flatnonzero(self.alphas == 0.0)[0]), int(np.flatnonzero(self.betas == 0.0)[0])

    @property
    def center_loss(self) -> float:
        return float(self.loss[self.center_index])

    @property
    def center_accuracy(self) -> float:
        return float(self.accuracy[self.center_index])

    @property
    def method(self) -> str:
        """Method name from the free metadata ("?" when absent), used for labels."""
        return str(self.spec.get("method") or "?")


def _shape_problem(surface: Surface) -> str | None:
    """Coerce arrays in place to numpy and return a description of the first inconsistency."""
    for key in ARRAY_KEYS + DIRECTION_KEYS:
        value = getattr(surface, key)
        if value is not None:
            setattr(surface, key, np.asarray(value))
    a, b = surface.alphas, surface.betas
    if a.ndim != 1 or b.ndim != 1 or a.size == 0 or b.size == 0:
        return f"alphas and betas must be non-empty 1-D arrays, got shapes {a.shape} and {b.shape}"
    for name, axis in (("alphas", a), ("betas", b)):
        if not np.all(np.diff(axis) > 0):
            return f"{name} must be strictly increasing"
        if not np.any(axis == 0.0):
            return f"{name} must contain exactly 0.0 (the trained prompt); use an odd grid size"
    for name in ("loss", "accuracy"):
        if getattr(surface, name).shape != (a.size, b.size):
            return f"{name} has shape {getattr(surface, name).shape}, expected (nx, ny) = {(a.size, b.size)}"
    d1, d2 = surface.direction_1, surface.direction_2
    if (d1 is None) != (d2 is None):
        return "direction_1 and direction_2 must both be given or both be absent"
    if d1 is not None and (d1.ndim != 2 or d1.shape != d2.shape):
        return f"direction_1 {d1.shape} and direction_2 {d2.shape} must be (P, D) arrays of one shape"
    if not isinstance(surface.spec, dict):
        return f"spec must be a dict, got {type(surface.spec).__name__}"
    return None


def comparable_identity(surface: Surface) -> dict:
    """CHECKPOINT_KEYS and SAMPLING_KEYS of a surface: two surfaces whose numbers may be pooled or tested agree on
    all of them. grid is "nx x ny" as computed, partial says some points are still NaN."""
    spec = surface.spec
    identity = {key: spec.get(key) for key in CHECKPOINT_KEYS + SAMPLING_KEYS}
    identity.update(grid="x".join(map(str, surface.shape)), partial=not surface.is_complete,
                    span=spec["span"] if spec.get("span") is not None else float(np.abs(surface.alphas).max()),
                    prompt_type=spec.get("prompt_type") or "shallow", space=spec.get("space") or "prompt")
    if identity["prompt_length"] is None and surface.direction_1 is not None:
        identity["prompt_length"] = int(surface.direction_1.shape[0])  # (P, D): P virtual tokens
    return identity


def same_directions(a: Surface, b: Surface) -> bool:
    """True when both surfaces were computed on the very same direction arrays (e.g. random, --norm none)."""
    return a.direction_1 is not None and b.direction_1 is not None and a.direction_1.shape == b.direction_1.shape \
        and np.array_equal(a.direction_1, b.direction_1) and np.array_equal(a.direction_2, b.direction_2)


def surface_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """NAME, NAME.npz or NAME.json -> (NAME.npz, NAME.json)."""
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".npz"), path.with_name(path.name + ".json")


def save_surface(surface: Surface, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write NAME.npz and NAME.json atomically; spec["points"] is set from the data. Returns both paths."""
    npz_path, json_path = surface_paths(path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    surface.spec = {**surface.spec, "format": FORMAT, "points": surface.points_done}
    arrays = {key: getattr(surface, key) for key in ARRAY_KEYS + DIRECTION_KEYS
              if getattr(surface, key) is not None} | surface.head_directions
    text = dumps(surface.spec)
    # Arrays first: a crash between the two writes leaves a spec that under-reports points,
    # never one that claims data the npz lacks.
    write_atomic(npz_path, lambda stream: np.savez(stream, **arrays))
    write_text(json_path, text)
    return npz_path, json_path


def load_surface(path: str | os.PathLike) -> Surface:
    """Read NAME.npz + NAME.json (NAME may carry either suffix) and check that they are consistent."""
    npz_path, json_path = surface_paths(path)
    mend = f"delete {npz_path.name} and {json_path.name} and compute the surface again"
    for file in (npz_path, json_path):
        if not file.is_file():
            raise FileNotFoundError(f"surface file {file} not found; compute it with "
                                    f"`python -m landscape.plot CKPT --surface {npz_path}`")
    try:
        spec = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"surface spec {json_path} is unreadable ({error}); {mend}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"surface spec {json_path} must hold a JSON object; {mend}")
    if spec.get("format") != FORMAT:
        raise ValueError(f"surface {json_path} has format {spec.get('format')!r} but this version reads "
                         f"{FORMAT!r}; recompute it with this version (or use the version that wrote it)")
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError(f"surface spec {json_path} lacks keys {missing}; {mend}")
    try:
        with np.load(npz_path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"surface file {npz_path} is truncated or corrupt ({type(error).__name__}: "
                         f"{error}); {mend}") from None
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"surface file {npz_path} lacks arrays {missing}; {mend}")
    surface = Surface.__new__(Surface)
    surface.spec = spec
    for key in ARRAY_KEYS + DIRECTION_KEYS:
        setattr(surface, key, arrays.get(key))
    surface.head_directions = {k: v for k, v in arrays.items() if k.startswith(tuple(f"{d}." for d in DIRECTION_KEYS))}
    problem = _shape_problem(surface)
    if problem:
        raise ValueError(f"surface file {npz_path} is inconsistent: {problem}; {mend}")
    return surface


def mismatched_keys(spec: dict, other: dict, keys: Sequence[str] = SPEC_IDENTITY_KEYS) -> list[str]:
    """Identity keys on which two specs disagree (empty: same landscape, safe to resume or average)."""
    return [key for key in keys if spec.get(key) != other.get(key)]


def mean_surface(surfaces: Sequence[Surface]) -> Surface:
    """Pointwise mean of surfaces on the same grid and the same directions (e.g. seeds of one method).

    A point is NaN in the mean if it is NaN in any input. Spec keys on which the inputs agree
    are kept; keys that differ (seed, checkpoint_hash, ...) become lists, one value per input.
    """
    if not surfaces:
        raise ValueError("mean_surface needs at least one surface")
    first = surfaces[0]
    for index, surface in enumerate(surfaces[1:], start=1):
        if not (np.array_equal(surface.alphas, first.alphas) and np.array_equal(surface.betas, first.betas)):
            raise ValueError(f"surface {index} is on another grid than surface 0; compute all on one --grid/--span")
        same_directions = (
            (surface.direction_1 is None and first.direction_1 is None)
            or (surface.direction_1 is not None and first.direction_1 is not None
                and np.array_equal(surface.direction_1, first.direction_1)
                and np.array_equal(surface.direction_2, first.direction_2)))
        if not same_directions:
            raise ValueError(f"surface {index} uses other directions than surface 0; a mean needs shared "
                             f"directions (compute the surfaces together, with one direction set)")
    spec: dict = {}
    for key in dict.fromkeys(k for s in surfaces for k in s.spec):
        values = [s.spec.get(key) for s in surfaces]
        spec[key] = values[0] if all(v == values[0] for v in values) else values
    loss = np.mean(np.stack([s.loss for s in surfaces]), axis=0)  # (nx, ny)
    accuracy = np.mean(np.stack([s.accuracy for s in surfaces]), axis=0)  # (nx, ny)
    spec.update(format=FORMAT, mean_of=len(surfaces), points=int(np.isfinite(loss).sum()))
    return Surface(first.alphas.copy(), first.betas.copy(), loss, accuracy, spec,
                   first.direction_1, first.direction_2)
