"""The SurfaceSpec flags shared by `landscape.grid` and `landscape.plot`: one flag per field, typed, with its help."""
from __future__ import annotations

import argparse

from landscape.grid.directions import DIRECTION_KINDS, NORMALIZATIONS
from landscape.grid.spec import (
    DEVICE_DEFAULT_FIELDS,
    DEVICE_DEFAULTS,
    PARAM_SCOPES,
    SPACES,
    SurfaceSpec,
    device_defaults,
)
from ptp_core.model.backbones import DTYPE_CHOICES
from ptp_core.tasks.task import SPLITS

# flag -> (SurfaceSpec field, help, choices); --grid and --examples left out take the device's default
SPEC_FLAGS = {
    "space": ("space", "prompt: perturb the trained tensors; input: each example's text-token embeddings", SPACES),
    "directions": ("directions", "x and y directions of the plane (input space: gradient only)", DIRECTION_KINDS),
    "norm": ("norm", "direction normalization (filter: Li et al. 2018, per prompt token)", NORMALIZATIONS),
    "grid": ("grid", "odd points per axis (the centre is one): 21 (21x21), 21x31, or 21x1 (a line)", None),
    "span": ("span", "axes run over [-span, span] in units of the normalized directions", None),
    "examples": ("examples", "the first N examples of --split, the same for every checkpoint", None),
    "split": ("split", "which split the examples come from", SPLITS),
    "params": ("param_scope", "prompt: the soft prompt only; all: the trained head too", PARAM_SCOPES),
    "seed": ("seed", "seed of random directions (recorded)", None),
    "dtype": ("dtype", "auto: bfloat16 autocast where the hardware multiplies bf16 natively, else float32; float32 "
                       "for exact work (the loss is reduced in float32 either way)", DTYPE_CHOICES),
    "batch-size": ("batch_size", "examples per forward, sorted by length", None),
    "chunk": ("chunk", "grid points per forward (default: from free memory)", None),
}
TYPES = {"span": float, "examples": int, "seed": int, "batch_size": int, "chunk": int}


def add_surface_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per SurfaceSpec field, with its default, help and choices (device defaults shown by device)."""
    defaults = SurfaceSpec()
    for flag, (name, help_text, choices) in SPEC_FLAGS.items():
        if flag in skip:
            continue
        if name in DEVICE_DEFAULT_FIELDS:
            default, shown = None, "by device: " + "; ".join(
                f"{kind} {DEVICE_DEFAULTS[kind][DEVICE_DEFAULT_FIELDS.index(name)]}" for kind in DEVICE_DEFAULTS)
        else:
            default = shown = getattr(defaults, name)
        parser.add_argument(f"--{flag}", dest=name, default=default, type=TYPES.get(name, str), choices=choices,
                            help=help_text if "(default:" in help_text else f"{help_text} (default: {shown})")


def spec_from_args(args: argparse.Namespace, device: str = "cpu", **overrides) -> SurfaceSpec:
    """The SurfaceSpec of parsed add_surface_arguments flags; --grid/--examples left out come from device_defaults."""
    given = {name: getattr(args, name) for name, _, _ in SPEC_FLAGS.values() if getattr(args, name, None) is not None}
    return SurfaceSpec(**{**device_defaults(device)[0], **given, **overrides})
