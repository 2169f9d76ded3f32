"""Execute every notebook in place, outputs stored, so that they read on a repository browser (`make notebooks`).

Fast mode (PTP_FAST=1: the embedded minilm and rotten_tomatoes at tiny settings), the same run as the test
suite's, in a scratch folder so that no run folder is left in notebooks/. Names run only those notebooks:

    python notebooks/execute.py 04_ptp_in_your_trainer
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = sorted(Path(__file__).parent.glob("*.ipynb"))


def execute(path: Path, workdir: Path) -> None:
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    _, book = nbformat.validator.normalize(book)  # cell ids: what nbformat will require
    nbformat.write(nbformat.from_dict(book), path)


def main(names: list[str]) -> None:
    os.environ.setdefault("PTP_FAST", "1")
    unknown = sorted(set(names) - {path.stem for path in NOTEBOOKS})
    if unknown:
        print(f"error: no notebook named {', '.join(unknown)}; choose from "
              f"{', '.join(path.stem for path in NOTEBOOKS)}", file=sys.stderr)
        raise SystemExit(2)
    for path in NOTEBOOKS:
        if names and path.stem not in names:
            continue
        with tempfile.TemporaryDirectory() as workdir:
            print(f"executing {path.name}", flush=True)
            execute(path, Path(workdir))


if __name__ == "__main__":
    main(sys.argv[1:])
