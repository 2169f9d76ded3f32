"""How a task's splits are cut: a seeded 80/10/10 shuffle, a held-out validation part (whole groups: MultiRC's
passages stay together), FewGLUE's N training examples with N others as the dev set, and a file's missing splits.
Every cut is seeded (SPLIT_SEED), so every run and every machine sees the same split.
"""
from __future__ import annotations

import random
from dataclasses import replace

from ptp_core.tasks.task import SPLIT_FRACTIONS, SPLIT_SEED, SPLITS, Split, Task

VALIDATION_FRACTION, VALIDATION_MAX = 0.1, 1000  # benchmarks: the part of the official train split held out


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
