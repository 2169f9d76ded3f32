"""What surface to compute: SurfaceSpec, its grid axes, and the per-device defaults it resolves in one place."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from landscape.grid.directions import DIRECTION_KINDS, NORMALIZATIONS
from ptp_core.model.backbones import DTYPE_CHOICES
from ptp_core.tasks.task import SPLITS

SPACES = ("prompt", "input")
PARAM_SCOPES = ("prompt", "all")  # prompt: the soft prompt only, a trained head held at its value; all: the head too

# Grid and examples of a spec that leaves them out: paper-grade where it is cheap, minutes where it is not.
# CPU: the bf16 grid runs at ~190 example-points/s on 2 cores (bench/grid.py), so 441 points on 64 examples take
# ~2.5 min a checkpoint and a two-checkpoint comparison with every metric stays under ~10 min.
DEVICE_DEFAULTS = {"cuda": ("21x21", 256, "a GPU evaluates 441 points on 256 examples in seconds"),
                   "cpu": ("21x21", 64, "on a CPU 256 examples would take ~10 min a surface; 64 keep a two-checkpoint "
                                        "comparison under ~10 min on 2 cores")}
DEVICE_DEFAULT_FIELDS = ("grid", "examples")


def device_defaults(device: str) -> tuple[dict, str]:
    """{grid, examples} for a spec that does not give them, and the reason, by device type."""
    grid, examples, why = DEVICE_DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"]
    return {"grid": grid, "examples": examples}, why


@dataclass
class SurfaceSpec:
    """What surface to compute. grid: "21" (21 x 21), "21x31" (nx x ny) or "21x1" (a line along d1); every count
    is odd (or 1) so that the axes hold the centre, which the centre-based metrics measure from. examples=None takes the device's default (device_defaults) when the surface is computed,
    so a notebook's SurfaceSpec() and the command line's compute the same surface."""

    space: str = "prompt"  # prompt: perturb the trained tensors; input: perturb text-token embeddings
    directions: str = "gradient"  # the paper's figure: x = gradient, y = a random orthogonal direction
    norm: str = "filter"  # Li et al. 2018: scale per prompt token so the axes compare across checkpoints
    grid: str = "21x21"
    span: float = 1.0  # axes run over [-span, span] in units of the normalized directions
    examples: int | None = None  # the first N examples of `split`, in stored order: the same for every checkpoint
    split: str = "test"
    param_scope: str = "prompt"  # one of PARAM_SCOPES: which trained tensors the directions move
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
        if even := [n for n in self.shape if n % 2 == 0]:
            raise ValueError(f"grid {self.grid!r} has an even count {even[0]}, so no point at the centre the metrics "
                             f"measure from; use an odd count, e.g. --grid {even[0] + 1}")
        if not self.span > 0:
            raise ValueError(f"span must be > 0, got {self.span}; e.g. --span 1.0")
        if self.examples is not None and self.examples <= 0:
            raise ValueError(f"examples must be > 0, got {self.examples}; e.g. --examples 256")
        if self.batch_size <= 0 or (self.chunk is not None and self.chunk <= 0):
            raise ValueError(f"batch size and chunk must be > 0, got {self.batch_size} and {self.chunk}")
        for name, value, allowed in (("space", self.space, SPACES), ("directions", self.directions, DIRECTION_KINDS),
                                     ("norm", self.norm, NORMALIZATIONS), ("split", self.split, SPLITS),
                                     ("params", self.param_scope, PARAM_SCOPES), ("dtype", self.dtype, DTYPE_CHOICES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if self.space == "input" and self.directions != "gradient":
            raise ValueError(f"input space uses per-example gradient directions, not {self.directions!r}; "
                             "drop --directions or use --space prompt")

    def for_device(self, device: str) -> SurfaceSpec:
        """This spec with the fields it leaves out (examples) set to the device's default."""
        return self if self.examples is not None else replace(self, examples=device_defaults(device)[0]["examples"])

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        return grid_axis(self.shape[0], self.span), grid_axis(self.shape[1], self.span)


def grid_axis(count: int, span: float) -> np.ndarray:
    """count evenly spaced points over [-span, span], the middle one exactly 0.0; count is odd (1: the centre only)."""
    if count % 2 == 0:
        raise ValueError(f"a grid axis of {count} points has no centre point; use an odd count, e.g. {count + 1}")
    if count == 1:
        return np.zeros(1)
    half = (count - 1) // 2
    return span * (np.arange(count) - half) / half  # the middle point is 0 * span / half == 0.0
