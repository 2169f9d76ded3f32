"""The versions of transformers and PEFT the test suite passed with, and one warning line outside them.

Deep prompts register an attention implementation through transformers' attention interface and read its mask
functions; PEFT's checkpoint layout is what ours must equal. Both are internals that move between minor releases,
so a version the suite has not run on may compute something else. It is a warning, not an error: a user may know
better. `make lock` + `make test` is how a new version becomes tested (docs/install.md).
"""
from __future__ import annotations

import warnings
from importlib import metadata

# package -> (oldest, newest) minor versions the suite passed on, inclusive; the lock holds the exact ones
TESTED = {"transformers": ((5, 24), (5, 25)), "peft": ((0, 21), (0, 21))}


def minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '5.25.0' or '0.21.2.dev0'."""
    parts = version.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def untested(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per installed package outside its tested range (installed: name -> version, default: this env)."""
    lines = []
    for name, (oldest, newest) in TESTED.items():
        version = installed.get(name) if installed is not None else _installed(name)
        if version is not None and not oldest <= minor(version) <= newest:
            tested = " to ".join(dict.fromkeys(".".join(map(str, v)) + ".x" for v in (oldest, newest)))
            lines.append(f"ptp-landscape was tested with {name} {tested}, not {version}: results may differ; "
                         f"`make lock` and `make test` check a new version")
    return lines


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None  # PEFT is optional: only PEFT models need it


def warn_untested() -> None:
    for line in untested():
        warnings.warn(line, stacklevel=3)
