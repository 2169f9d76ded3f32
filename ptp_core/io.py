"""Atomic files and folders, strict JSON, and the check of an --out folder: the one writer of both packages.

Readers never see half a file: text and bytes go to a temp file beside the target, then are renamed
over it; a folder is filled under a temp name, then renamed into place. What is written gets the
mode the user's umask gives a new file (mkstemp's 0600 would hide results from a group). JSON is
strict: NaN and infinity become null, numpy scalars and arrays become numbers and lists, paths
become strings, and anything else is a TypeError rather than a silently wrong file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits of a new file under the current umask (e.g. 0644 under umask 022)."""
    return 0o666 & ~_umask()


def write_atomic(path: str | os.PathLike, write: Callable, binary: bool = True) -> Path:
    """Call write(stream) on a temp file beside `path`, then rename it over `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) \
                as stream:
            write(stream)
        os.chmod(temp, file_mode())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda stream: stream.write(text), binary=False)


def to_json(value) -> object:
    """A strict-JSON copy of value: non-finite floats -> None, numpy -> Python, Path -> str, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # numpy scalars and arrays
        return to_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{value!r} of type {type(value).__name__} cannot be written as JSON")


def dumps(value) -> str:
    """Strict JSON, indent=2, sorted keys, a final newline."""
    return json.dumps(to_json(value), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, value) -> Path:
    return write_text(path, dumps(value))


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `path`; when the block ends without error it replaces `path` as a whole.

    On error the temp folder goes and `path` is untouched, so a refused or failed run leaves nothing behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temp
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        temp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def check_output_folder(out: str | os.PathLike, overwrite: bool, marker: str | None = None) -> None:
    """Refuse an --out that is a file, or a folder that already holds a result, unless `overwrite`.

    marker: the file whose presence means the folder holds a result (connect.json); None: any content does (a run).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if overwrite or not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir()) if marker is None else []
    if held and "ptp.json" in held:
        raise ValueError(f"{out} already holds a run; pass --overwrite or choose another --out")
    if held:  # not a run: --overwrite would delete files that are not ours
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(f"{out} holds {shown}, not a run (no ptp.json); a run folder must be new, empty or a "
                         "previous run's: choose another --out, or pass --overwrite to replace what it holds")
    if marker is not None and (out / marker).exists():
        raise ValueError(f"{out} already holds {marker}; pass --overwrite or choose another --out")
