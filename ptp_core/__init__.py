"""ptp_core: soft prompts on frozen backbones: tasks/ (where examples come from), model/ (backbones, encoding, heads,
prefixes, PromptModel), training/ (PTP, the loop), then the commands, PEFT/Trainer glue and checkpoints.

`from ptp_core import load_checkpoint` resolves on first use (PEP 562): importing a light submodule such as
ptp_core.io (the drawing modules do) must not load torch and transformers through this package's __init__.
"""
from __future__ import annotations

import importlib

from ptp_core.versions import warn_untested

warn_untested()  # one line per transformers/PEFT version outside the tested range (reads metadata, imports nothing)

LAZY = {"load_checkpoint": "ptp_core.checkpoint", "Checkpoint": "ptp_core.checkpoint", "from_peft": "ptp_core.hf",
        "load_task": "ptp_core.tasks.load", "PerturbConfig": "ptp_core.training.perturb"}
__all__ = list(LAZY)


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'ptp_core' has no attribute {name!r}")
