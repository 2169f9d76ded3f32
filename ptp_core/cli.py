"""Command-line plumbing shared by every entry point: one-line errors with exit code 2, device choice.

Only this layer reads the environment (PTP_CACHE) and auto-detects the device.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

import torch.distributed as dist

from ptp_core.model.backbones import resolve_device


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows every default and whose errors are one line and exit code 2."""
    result = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsFormatter)
    result.error = lambda message: fail(f"{message}{_suggestion(result, message)} (see {prog} --help)")
    return result


class DefaultsFormatter(argparse.HelpFormatter):
    """argparse's help with "(default: X)" after every option that has a default to show: not for a default of None
    (the help says what happens then), nor where the help already names its default."""

    def _format_action(self, action: argparse.Action) -> str:
        shown = action.default not in (None, "", argparse.SUPPRESS) and action.help is not argparse.SUPPRESS and (
            action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        if shown and "default" not in (action.help or "").lower():
            action = copy.copy(action)  # only this rendering changes; parsing keeps the real default
            value = action.default
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)  # as the flag is written: --seeds 0,1,2
            action.default = value
            action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"
        return super()._format_action(action)


def did_you_mean(word: str, candidates) -> str:
    """"; did you mean 'X'?" for the candidate closest to a mistyped word (difflib), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _suggestion(p: argparse.ArgumentParser, message: str) -> str:
    """The nearest choice for argparse's "invalid choice" and the nearest flag for "unrecognized arguments"."""
    choice = re.search(r"invalid choice: '?([^' ]*)'? \(choose from (.*)\)", message)
    if choice:
        return did_you_mean(choice.group(1), [c.strip(" '") for c in choice.group(2).split(",")])
    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    if unknown and unknown.group(1).startswith("-"):
        return did_you_mean(unknown.group(1).split("=")[0], [o for a in p._actions for o in a.option_strings])
    return ""


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call main; turn bad input (ValueError, FileNotFoundError) into one line and exit code 2.

    A rank under torchrun leaves with os._exit once its work is saved and its streams are flushed: the C++ side of
    torch.distributed can abort at interpreter exit ("terminate called without an active exception", seen with gloo
    in 5 of 35 runs, 1 of 10 even after a barrier and destroy_process_group), which would fail a finished run.
    """
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            main(argv)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    except KeyboardInterrupt:
        fail("interrupted; what was finished is saved, run the same command again to resume")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (a head replaced, an untested version) as one line, without the source line."""
    print(f"warning: {str(message).splitlines()[0]}", file=sys.stderr)


def auto_device(requested: str = "auto") -> str:
    return resolve_device(requested)


def end_distributed() -> None:
    """Destroy torch.distributed's process group, if one is up (run() then leaves the rank with os._exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def cache_dir() -> Path | None:
    """Where converted models live: $PTP_CACHE, else the library's default (~/.cache/ptp-landscape)."""
    value = os.environ.get("PTP_CACHE")
    return Path(value) if value else None


def quiet_transformers() -> None:
    """No weight-loading progress bars or load reports on the command line."""
    from transformers.utils import logging  # ~1.5 s to import: the command loads a model right after this anyway

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def positive(number_type: type) -> Callable[[str], object]:
    """argparse type: a number > 0, with a one-line message otherwise."""
    def convert(text: str):
        try:
            value = number_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = number_type.__name__
    return convert
