"""What a task is: its examples and integer labels per split, plus what a verbalizer head needs (label words and a
template that names the fields), and the checks that keep them consistent.

An example is a str (the single field `text`) or a dict of named text fields; a multiple-choice example also holds
"choices", its K candidate texts, and its label is the index of the right one; a generation example is a dict that
also holds "target", the text the model learns to write (--head lm), and its label is NO_LABEL. Where tasks come from is
ptp_core.tasks.load; how splits are cut is ptp_core.tasks.splits; tokenization is ptp_core.model.encoding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ptp_core.tasks.metrics import METRICS

SPLITS = ("train", "validation", "test")
SPLIT_SEED = 20230505  # fixed: every run and every machine sees the same split
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_TEMPLATE = "{text} It was {mask}."  # cloze for the verbalizer; {mask} is the answer slot
SLOT = re.compile(r"\{(\w+)\}")  # a {name} in a template: a field, {mask} or (multiple choice) {choice}
CHOICES = "choices"  # the key of a multiple-choice example's candidate texts
TARGET = "target"  # the key of a generation example's target text (what --head lm teaches the model to write)
NO_LABEL = -1  # the label of a generation example: it has a target text instead of a class


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


def default_template(fields: tuple[str, ...], generation: bool = False) -> str:
    """The verbalizer's cloze when none is given: DEFAULT_TEMPLATE for `text`, else the fields in order, then {mask};
    a generation task's: the fields in order (the target follows them)."""
    if generation:
        return " ".join("{" + name + "}" for name in fields)
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
    metric: str = "accuracy"  # reported beside accuracy: ptp_core.tasks.metrics.METRICS
    split_info: dict = field(default_factory=dict)  # how the splits were made (recorded in ptp.json)
    # the verbalizer's template for a causal LM, every field before {mask} ("": `template` already ends at {mask})
    causal_template: str = ""
    generation: bool = False  # examples hold a target text (TARGET) instead of a class: --head lm only


    def __post_init__(self):
        self.fields = tuple(self.fields)
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"task {self.name!r} has {len(self.label_names)} labels ({', '.join(self.label_names)}) "
                f"but {len(self.label_words)} label words ({', '.join(self.label_words)}); give one word per label")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        reserved = {"mask", "choice", CHOICES, TARGET} & set(self.fields)
        if not self.fields or reserved or len(set(self.fields)) < len(self.fields):
            raise ValueError(f"task {self.name!r} has fields {list(self.fields)}; name each text field once (not "
                             "mask, choice, choices or target)")
        if self.generation and (self.choices or self.label_names):
            raise ValueError(f"generation task {self.name!r} has target texts, not labels or choices")
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
    """A causal LM reads the label word (--head lm: the target) after the text, so no field may follow {mask}."""
    late = SLOT.findall(template.partition("{mask}")[2])
    if "{mask}" in template and late:
        raise ValueError(f"template {template!r} places {{{late[0]}}} after {{mask}}, which a causal LM never reads "
                         "(it writes the label word or --head lm's target after the text); put {mask} last, every "
                         "field before it")


def _fits(example, fields: tuple[str, ...], choices: int, generation: bool = False) -> bool:
    """A single `text` field: a string; otherwise a dict holding every field (and K choices for multiple choice, a
    non-empty target for generation)."""
    if generation:
        return isinstance(example, dict) and all(f in example for f in fields) and bool(str(example.get(TARGET) or ""))
    if fields == ("text",) and not choices:
        return isinstance(example, str)
    return isinstance(example, dict) and all(f in example for f in fields) and (
        not choices or len(example.get(CHOICES) or ()) == choices)


def _check_examples(task: Task, name: str, split: Split) -> None:
    for i, example in enumerate(split.texts):
        if not _fits(example, task.fields, task.choices, task.generation):
            shape = "a string" if task.fields == ("text",) and not task.choices and not task.generation else (
                f"a dict with {', '.join(task.fields)}" + (f" and {task.choices} {CHOICES}" if task.choices else "")
                + (f" and a non-empty {TARGET}" if task.generation else ""))
            raise ValueError(f"task {task.name!r}: {name} example {i} is not {shape}: {str(example)[:80]!r}")
    if task.generation:
        return
    if split.labels and not 0 <= min(split.labels) <= max(split.labels) < task.num_labels:
        raise ValueError(f"task {task.name!r}: a {name} label lies outside 0..{task.num_labels - 1}")


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Split range(n) into batches; shuffled by a torch.Generator when one is given, else in order."""
    if generator is None:
        order = list(range(n))
    else:
        order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
