"""Generation tasks from files (--target-field): examples read as the file has them, and one-line refusals that name
the row a person finds in the file (counted from 1, after a CSV's header) or the flag to change."""
import csv
import json

import pytest

from ptp_core.tasks.load import load_task
from ptp_core.tasks.task import NO_LABEL, TARGET

ROWS = [{"input": f"review number {i}", "output": f"answer {i}", "split": split}
        for i, split in enumerate(["train"] * 10 + ["validation"] * 3 + ["test"] * 3)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _csv(path, rows, columns=("input", "output", "split")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.mark.parametrize("write", [_jsonl, _csv])
def test_a_generation_file_reads_as_the_file_has_it(tmp_path, write):
    """Each row is an example of its input fields plus the target, in its split, in the file's order; no label."""
    path = write(tmp_path / ("task.jsonl" if write is _jsonl else "task.csv"), ROWS)
    task = load_task(path, text_fields=("input",), target_field="output")
    assert task.generation and task.label_names == [] and task.template == "{input}"
    for name in ("train", "validation", "test"):
        expected = [{"input": r["input"], TARGET: r["output"]} for r in ROWS if r["split"] == name]
        assert task.splits[name].texts == expected and set(task.splits[name].labels) == {NO_LABEL}
    assert task.split_info["target_field"] == "output"


@pytest.mark.parametrize("write", [_jsonl, _csv])
@pytest.mark.parametrize("fault", ["missing", "empty", "blank", "null"])
def test_a_row_without_a_target_is_refused_naming_its_row(tmp_path, write, fault):
    """Row 12 of the file (the 12th data row, the 2nd validation row) lacks its target: the message says row 12."""
    rows = [dict(r) for r in ROWS]
    bad = rows[11]
    if fault == "missing":
        del bad["output"]
    else:
        bad["output"] = {"empty": "", "blank": "  ", "null": None}[fault]
    if write is _csv and fault == "missing":
        bad["output"] = ""  # a CSV row has every header column: a missing cell reads as empty
    path = write(tmp_path / ("task.jsonl" if write is _jsonl else "task.csv"), rows)
    with pytest.raises(ValueError) as error:
        load_task(path, text_fields=("input",), target_field="output")
    message = str(error.value)
    assert "row 12 of 16 (validation)" in message and "output" in message and len(message.splitlines()) == 1
    if write is _csv:  # the row is on line 13, after the header: what the row number counts from
        assert open(path).read().splitlines()[12].startswith(ROWS[11]["input"])


def test_a_target_column_that_is_also_an_input_is_refused(tmp_path):
    """The model would read the very text it learns to write: no learning signal, a perfect score."""
    path = _jsonl(tmp_path / "task.jsonl", ROWS)
    with pytest.raises(ValueError, match="--target-field output is also one of --text-fields input,output"):
        load_task(path, text_fields=("input", "output"), target_field="output")


def test_flags_that_do_not_fit_a_generation_task_are_refused(tmp_path):
    path = _jsonl(tmp_path / "task.jsonl", ROWS)
    with pytest.raises(ValueError, match="a generation task's targets are its --target-field texts"):
        load_task(path, label_words=["no", "yes"], text_fields=("input",), target_field="output")
    with pytest.raises(ValueError, match="task 'rotten_tomatoes' is a classification task.*drop --target-field"):
        load_task("rotten_tomatoes", target_field="output")
    with pytest.raises(ValueError, match="row 1 of 16 .* has no nope column"):
        load_task(path, text_fields=("input",), target_field="nope")


def test_a_file_of_targets_read_as_classification_points_to_target_field(tmp_path):
    path = _jsonl(tmp_path / "task.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no label column.*--head lm --target-field COLUMN"):
        load_task(path, text_fields=("input",))


def test_a_generation_dataset_by_name_reads_its_own_splits(monkeypatch):
    """An HF dataset by name takes the same flags as a file: its train/validation/test splits, the named input and
    target columns (datasets.load_dataset replaced by an in-memory DatasetDict, as the hub would return it)."""
    import datasets

    def split(name, n):
        return datasets.Dataset.from_list([{"question": f"{name} question {i}", "answer": f"{name} answer {i}"}
                                           for i in range(n)])

    hub = datasets.DatasetDict({"train": split("train", 6), "validation": split("validation", 2),
                                "test": split("test", 3)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: hub)
    task = load_task("someone/qa", text_fields=("question",), target_field="answer")
    assert task.generation and task.sizes() == {"train": 6, "validation": 2, "test": 3}
    assert task.splits["test"].texts[2] == {"question": "test question 2", TARGET: "test answer 2"}
    assert set(task.splits["train"].labels) == {NO_LABEL} and task.source == "hf:someone/qa"


def test_a_target_that_crowds_out_the_template_names_the_target_and_max_length():
    """The target fits --max-length but leaves the template too little room: the refusal says so in terms of the
    target and --max-length, not of the room left over."""
    from conftest import make_tokenizer

    from ptp_core.model.templates import lm_row

    tok = make_tokenizer("causal")
    with pytest.raises(ValueError, match=r"'fun fun fun' is 4 tokens, which leaves 2 of --max-length 6"):
        lm_row(tok, {"text": "the movie was good"}, "fun fun fun", "Review : {text} It was {mask} .", "causal", 6)
    row = lm_row(tok, {"text": "the movie was good"}, "fun", "Review : {text} It was {mask} .", "causal", 8)
    assert len(row.ids) == 8 and tok.decode(row.ids).endswith("It was fun [SEP]")  # the field was cut, not the target
