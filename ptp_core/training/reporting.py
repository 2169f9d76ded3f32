"""Training scalars in TensorBoard: every number of a metrics.jsonl row, written as the row is logged.

While the run trains, the event file grows in a staging folder beside --out, so `tensorboard --logdir runs/`
shows the run live. `saving` then writes the checkpoint folder with the events inside as `tensorboard/`, in the
one rename that publishes the folder; a failed run leaves neither. TensorBoard stores scalars as float32.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ptp_core.io import atomic_folder

REPORT_TO = ("none", "tensorboard")
EVENTS_FOLDER = "tensorboard"  # inside the checkpoint folder


class TrainingReport:
    """Log rows -> TensorBoard scalars (tag: the row's key, step: its "step"); does nothing for report_to="none"."""

    def __init__(self, report_to: str, out: str | Path):
        if report_to not in REPORT_TO:
            raise ValueError(f"unknown --report-to {report_to!r}; use one of {', '.join(REPORT_TO)}")
        self.staging, self.writer = None, None
        if report_to == "tensorboard":
            # imported here: it loads tensorboard's protobuf stack (~180 modules), which only reporting runs need
            from torch.utils.tensorboard import SummaryWriter

            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{EVENTS_FOLDER}.", suffix=".tmp"))
            (self.staging / EVENTS_FOLDER).mkdir()  # mkdir, unlike mkdtemp's 0700, honours the umask
            self.writer = SummaryWriter(str(self.staging / EVENTS_FOLDER))

    def log(self, row: dict) -> None:
        """Write the row's numbers at its step."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])

    @contextmanager
    def saving(self, out: str | Path) -> Iterator[Path]:
        """Yield the folder to save the checkpoint in; it becomes `out` as a whole, with the event files inside."""
        if self.writer is None:
            yield Path(out)
            return
        self.writer.close()
        with atomic_folder(out) as folder:
            yield folder  # save_checkpoint(folder) swaps this empty temp folder for the checkpoint (atomic itself)
            shutil.move(self.staging / EVENTS_FOLDER, folder / EVENTS_FOLDER)

    def __enter__(self) -> "TrainingReport":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.writer is not None:
            self.writer.close()
            shutil.rmtree(self.staging, ignore_errors=True)
