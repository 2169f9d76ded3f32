"""GLUE and SuperGLUE: each task's fields, labels, metric and default verbalizer template, and two readers of its
official train and validation splits, one from the Hugging Face hub and one from a folder in the official SuperGLUE
layout (train.jsonl, val.jsonl). Only the formats live here; ptp_core.tasks.task builds the Task and its splits.

Templates and label words are after PET's patterns (Schick & Schuetze 2021, pet/pvp.py) and, for GLUE, LM-BFF's
(Gao et al. 2021); docs/tasks.md says where each differs from its source. A task whose template places a field after
{mask} also has a causal form, which a causal LM reads. Label names keep the order of the hub's ClassLabel, so both
readers give the same indices.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SUPER_GLUE_HUB = "aps/super_glue"  # the canonical `super_glue` moved here; parquet, no loading script
GLUE_HUB = "nyu-mll/glue"  # the canonical `glue` moved here; parquet
FOLDER_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}  # test.jsonl: hidden labels, not read
COPA_CONNECTORS = {"cause": "because", "effect": "so"}  # PET's COPA pattern: premise because/so choice


@dataclass(frozen=True)
class Benchmark:
    name: str  # what --task says: super_glue/rte, glue/mrpc, ...
    hub_id: str
    config: str  # the hub's configuration name
    fields: tuple[str, ...]  # the named text fields, in order (the classifier's segment A, then segment B)
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]  # one per label, read by the verbalizer head
    template: str
    metric: str = "accuracy"  # ptp_core.tasks.metrics.METRICS
    choices: int = 0  # K candidates of a multiple-choice task (COPA), 0 for classification
    columns: tuple[str, ...] = ()  # the hub's column for each field, when it is named differently
    test_split: str = "validation"  # the official split with public labels that becomes our test split
    folder: str = ""  # the official SuperGLUE folder name; "" for GLUE, which has no folder reader
    # a causal LM reads the label word as the token after the text: where `template` places a field after {mask},
    # this form places every field before it and ends at {mask}; "" when `template` already does
    causal_template: str = ""

    def column(self, field: str) -> str:
        return self.columns[self.fields.index(field)] if self.columns else field


NO_YES, YES_NO = ("No", "Yes"), ("Yes", "No")
ENTAILMENT = ("entailment", "not_entailment")
QUESTION_ANSWER = '"{premise}" Question: "{hypothesis}" ? Answer: {mask}'  # RTE and CB for a causal LM
FALSE_TRUE = ("false", "true")
BENCHMARKS = {b.name: b for b in (
    Benchmark("super_glue/rte", SUPER_GLUE_HUB, "rte", ("premise", "hypothesis"), ENTAILMENT, YES_NO,
              '"{hypothesis}" ? {mask}, "{premise}"', folder="RTE", causal_template=QUESTION_ANSWER),
    Benchmark("super_glue/cb", SUPER_GLUE_HUB, "cb", ("premise", "hypothesis"),
              ("entailment", "contradiction", "neutral"), ("Yes", "No", "Maybe"),
              '"{hypothesis}" ? {mask}, "{premise}"', metric="macro_f1", folder="CB",
              causal_template=QUESTION_ANSWER),
    Benchmark("super_glue/boolq", SUPER_GLUE_HUB, "boolq", ("question", "passage"), FALSE_TRUE, NO_YES,
              "{passage}. Question: {question}? Answer: {mask}.", folder="BoolQ"),
    Benchmark("super_glue/copa", SUPER_GLUE_HUB, "copa", ("premise", "connector"), ("choice1", "choice2"),
              ("choice1", "choice2"), "{premise} {connector} {choice}", choices=2, folder="COPA"),
    Benchmark("super_glue/wic", SUPER_GLUE_HUB, "wic", ("word", "sentence1", "sentence2"), FALSE_TRUE, NO_YES,
              '"{sentence1}" / "{sentence2}" Similar sense of "{word}"? {mask}.', folder="WiC"),
    Benchmark("super_glue/wsc", SUPER_GLUE_HUB, "wsc.fixed", ("text", "span1_text", "span2_text"), FALSE_TRUE,
              NO_YES, '{text} In the previous sentence, does the pronoun "{span2_text}" refer to {span1_text}? {mask}.',
              folder="WSC"),
    Benchmark("super_glue/multirc", SUPER_GLUE_HUB, "multirc", ("paragraph", "question", "answer"), FALSE_TRUE,
              NO_YES, "{paragraph}. Question: {question}? Is it {answer}? {mask}.", metric="multirc", folder="MultiRC"),
    Benchmark("glue/sst2", GLUE_HUB, "sst2", ("text",), ("negative", "positive"), ("terrible", "great"),
              "{text} It was {mask}.", columns=("sentence",)),
    Benchmark("glue/cola", GLUE_HUB, "cola", ("text",), ("unacceptable", "acceptable"), ("incorrect", "correct"),
              "{text} This is {mask}.", metric="mcc", columns=("sentence",)),
    Benchmark("glue/mrpc", GLUE_HUB, "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), NO_YES,
              "{sentence1} ? {mask}, {sentence2}", metric="f1",
              causal_template="{sentence1} Question: {sentence2} ? Answer: {mask}"),
    Benchmark("glue/qqp", GLUE_HUB, "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), NO_YES,
              "{question1} ? {mask}, {question2}", metric="f1",
              causal_template="{question1} Question: {question2} Answer: {mask}"),
    Benchmark("glue/qnli", GLUE_HUB, "qnli", ("question", "sentence"), ENTAILMENT, YES_NO,
              "{question} ? {mask}, {sentence}", causal_template="{sentence} Question: {question} Answer: {mask}"),
    Benchmark("glue/mnli", GLUE_HUB, "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              ("Yes", "Maybe", "No"), "{premise} ? {mask}, {hypothesis}", test_split="validation_matched",
              causal_template="{premise} Question: {hypothesis} ? Answer: {mask}"),
    Benchmark("glue/rte", GLUE_HUB, "rte", ("sentence1", "sentence2"), ENTAILMENT, YES_NO,
              '"{sentence2}" ? {mask}, "{sentence1}"',
              causal_template='"{sentence1}" Question: "{sentence2}" ? Answer: {mask}'),
)}
FOLDERS = {b.folder.lower(): b for b in BENCHMARKS.values() if b.folder}
# SuperGLUE's other folders and hub configurations, refused by name with what to use instead
_RECORD = ("ReCoRD is not supported: its answers are entity spans of the passage, not labels or candidates; use "
           "RTE, CB, BoolQ, COPA, WiC, WSC or MultiRC")
_DIAGNOSTIC = ("is SuperGLUE's diagnostic set (one file to score an RTE model on, no train split) and is not supported "
               "as a task; train and evaluate on RTE (--task super_glue/rte or path/to/RTE)")
UNSUPPORTED = {"record": _RECORD, "ax-b": f"AX-b {_DIAGNOSTIC}", "axb": f"AX-b {_DIAGNOSTIC}",
               "ax-g": f"AX-g {_DIAGNOSTIC}", "axg": f"AX-g {_DIAGNOSTIC}"}


class OfficialSplit(NamedTuple):
    examples: list  # str (single field `text`) or dict[str, object] of named fields [+ "choices": list[str]]
    labels: list[int]  # indices into Benchmark.label_names
    groups: list[int] | None  # MultiRC: a running question id per answer option; None elsewhere
    passages: list[int] | None = None  # MultiRC: a running passage id per answer option (FewGLUE counts passages)


def is_benchmark_name(name: str) -> bool:
    """True for names under glue/ and super_glue/, which only benchmarks may use."""
    return name.lower().startswith(("glue/", "super_glue/"))


def benchmark_by_name(name: str) -> Benchmark:
    config = name.lower().partition("/")[2]
    if name.lower().startswith("super_glue/") and config in UNSUPPORTED:
        raise ValueError(f"benchmark {name!r}: {UNSUPPORTED[config]}")
    if name.lower() not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}, or a folder in the "
                         "official SuperGLUE layout")
    return BENCHMARKS[name.lower()]


def folder_benchmark(path: Path) -> Benchmark | None:
    """The SuperGLUE task a folder's name says (RTE, CB, BoolQ, COPA, WiC, WSC, MultiRC; any case), else None."""
    return FOLDERS.get(path.name.lower())


def unsupported_folder(path: Path) -> str | None:
    """Why a folder named after a SuperGLUE set that is no task here (ReCoRD, AX-b, AX-g) is refused, else None."""
    reason = UNSUPPORTED.get(path.name.lower())
    return None if reason is None else f"folder {path}: {reason}"


def _label(benchmark: Benchmark, value) -> int:
    """The index of an official label: a name ("entailment"), a JSON boolean, or an index (COPA, MultiRC, hub)."""
    names = benchmark.label_names
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if isinstance(value, str) and value.lower() in names:
        return names.index(value.lower())
    raise ValueError(f"{benchmark.name}: label {value!r} is not one of its labels {', '.join(names)} (or their "
                     "indices); the official validation and train splits carry labels, test.jsonl does not")


def _copa(row: dict) -> dict:
    """PET's COPA text (pet/pvp.py CopaPVP): the premise and each choice without their final punctuation
    (str.rstrip(string.punctuation)), each choice starting in lower case; the connector is because/so."""
    if row["question"] not in COPA_CONNECTORS:
        raise ValueError(f"COPA question {row['question']!r} is neither cause nor effect")
    choices = [(c[:1].lower() + c[1:]).rstrip(string.punctuation) for c in (row["choice1"], row["choice2"])]
    return {"premise": row["premise"].rstrip(string.punctuation), "connector": COPA_CONNECTORS[row["question"]],
            "choices": choices}


WSC_UNFIXABLE = ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin")  # words between them: wsc.fixed keeps them


def _fix_wsc_span(text: str, span: str, word_index: int) -> str:
    """A WSC span as the hub's `wsc.fixed` has it (the `datasets` super_glue script, _fix_wst): a span that is not a
    substring of the text takes the case of the text's word at its index for its first letter and loses its final
    periods and newlines. (The script's one other branch, for "theyscold", changes neither text nor span.)"""
    if span in text or span in WSC_UNFIXABLE:
        return span
    word = text.split()[word_index]
    span = (span[0].lower() if word[0].islower() else span[0].upper()) + span[1:]
    return span.rstrip(".").replace("\n", " ")


def _wsc_row(record: dict) -> dict:
    """An official WSC record (spans nested under "target") as the hub's wsc.fixed row."""
    row = {**record, **record["target"]}
    for span in ("span1", "span2"):
        row[f"{span}_text"] = _fix_wsc_span(row["text"], row[f"{span}_text"], row[f"{span}_index"])
    return row


def _example(benchmark: Benchmark, row: dict):
    if benchmark.choices:
        return _copa(row)
    if benchmark.fields == ("text",):
        return str(row[benchmark.column("text")])
    return {field: str(row[benchmark.column(field)]) for field in benchmark.fields}


def _running_ids(keys: list | None) -> list[int] | None:
    """One hashable per row -> ids 0, 1, ... in order of first appearance."""
    if keys is None:
        return None
    ids: dict = {}
    return [ids.setdefault(key, len(ids)) for key in keys]


def _official_split(benchmark: Benchmark, rows: list[dict], group_keys: list | None, source: str,
                    passage_keys: list | None = None) -> OfficialSplit:
    """Examples and label indices of flat rows; group_keys (MultiRC: a question per row) and passage_keys (its
    passage) become running ids 0, 1, ..."""
    if not rows:
        raise ValueError(f"{source} has no rows; give the official file of {benchmark.name}, one JSON object a line")
    try:
        examples = [_example(benchmark, row) for row in rows]
        labels = [_label(benchmark, row["label"]) for row in rows]
    except KeyError as missing:
        raise ValueError(f"{source} has a row without {missing}; {benchmark.name} needs "
                         f"{', '.join(benchmark.columns or benchmark.fields)} and label") from None
    return OfficialSplit(examples, labels, _running_ids(group_keys), _running_ids(passage_keys))


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot parse {path}: {error}; give the official JSON-lines file") from None


def _flatten_multirc(records: list[dict]) -> tuple[list[dict], list[tuple[int, int]]]:
    """Official MultiRC nests passage.text > questions[].question > answers[].text/label: one row per answer, and
    its (record index, question index) key: the record index names the passage."""
    rows, keys = [], []
    for p, record in enumerate(records):
        passage = record["passage"]
        for q, question in enumerate(passage["questions"]):
            for answer in question["answers"]:
                rows.append({"paragraph": passage["text"], "question": question["question"],
                             "answer": answer["text"], "label": answer["label"]})
                keys.append((p, q))
    return rows, keys


def read_folder(benchmark: Benchmark, folder: Path) -> dict[str, OfficialSplit]:
    """{"train", "validation"}: the official splits of a folder in the SuperGLUE layout."""
    out = {}
    for split, filename in FOLDER_FILES.items():
        path = Path(folder) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {filename}; a folder in the official SuperGLUE layout holds "
                                    "train.jsonl and val.jsonl (test.jsonl is optional and not read: its labels are "
                                    "hidden)")
        records, keys = _read_jsonl(path), None
        try:
            if benchmark.folder == "MultiRC":
                records, keys = _flatten_multirc(records)
            elif benchmark.folder == "WSC":
                records = [_wsc_row(r) for r in records]
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path} is not in the official {benchmark.folder} format (missing {error})") from None
        out[split] = _official_split(benchmark, records, keys, str(path),
                                     None if keys is None else [passage for passage, _ in keys])
    return out


def _check_label_names(benchmark: Benchmark, loaded) -> None:
    """The hub's ClassLabel names must be ours, in our order: the label indices are then the same."""
    feature = loaded["train"].features.get("label")
    names = getattr(feature, "names", None)
    if names is not None and tuple(n.lower() for n in names) != benchmark.label_names:
        raise ValueError(f"{benchmark.hub_id} ({benchmark.config}) now labels {names}, not "
                         f"{list(benchmark.label_names)}; update ptp_core/tasks/benchmarks.py")


def read_hub(benchmark: Benchmark) -> dict[str, OfficialSplit]:
    """{"train", "validation"}: the official splits through `datasets` (its cache when offline)."""
    import datasets  # heavy (pyarrow, pandas): only a benchmark loaded by name needs it

    try:
        loaded = datasets.load_dataset(benchmark.hub_id, benchmark.config)
    except Exception as error:  # offline without a cache, a network or hub failure: many error types
        folder = f", or give a folder in the official SuperGLUE layout (--task path/to/{benchmark.folder})"
        raise ValueError(f"cannot load {benchmark.name} ({benchmark.hub_id}, config {benchmark.config}): "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; run once online so "
                         f"that `datasets` caches it{folder if benchmark.folder else ''}") from None
    missing = {"train", benchmark.test_split} - set(loaded)
    if missing:
        raise ValueError(f"{benchmark.hub_id} ({benchmark.config}) has no {', '.join(sorted(missing))} split; "
                         f"it has {', '.join(loaded)}")
    _check_label_names(benchmark, loaded)
    out = {}
    for split, hub_split in (("train", "train"), ("validation", benchmark.test_split)):
        rows, keys = loaded[hub_split].to_list(), None
        if benchmark.metric == "multirc":  # one row per answer; idx names its paragraph and question
            try:
                keys = [(r["idx"]["paragraph"], r["idx"]["question"]) for r in rows]
            except (KeyError, TypeError):
                raise ValueError(f"{benchmark.hub_id} (multirc) rows lack idx.paragraph/idx.question") from None
        out[split] = _official_split(benchmark, rows, keys, f"{benchmark.hub_id} ({benchmark.config}, {hub_split})",
                                     None if keys is None else [paragraph for paragraph, _ in keys])
    return out
