"""GLUE and SuperGLUE tasks, offline: folders in the official SuperGLUE layout (invented sentences), the hub reader with
`datasets.load_dataset` replaced by small DatasetDicts, the split rule, few-shot subsets, files with named fields."""
import json
import random

import datasets
import pytest

from ptp_core import cli
from ptp_core.tasks.benchmarks import BENCHMARKS, FOLDERS
from ptp_core.checkpoint import Checkpoint
from ptp_core.tasks.task import SPLIT_SEED, Split
from ptp_core.tasks.load import load_task

LABELS = {"RTE": ["entailment", "not_entailment"], "CB": ["entailment", "contradiction", "neutral"]}


def _record(task: str, i: int, rng: random.Random) -> dict:
    """One invented row of `task` in its official JSON-lines format."""
    if task in ("RTE", "CB"):
        return {"premise": f"The red kite {i} rose over the hill.", "hypothesis": f"Kite {i} flew.",
                "label": LABELS[task][i % len(LABELS[task])], "idx": i}
    if task == "BoolQ":
        return {"question": f"is kite {i} red", "passage": f"Kite {i} is painted red and blue.",
                "label": bool(i % 2), "idx": i}
    if task == "COPA":
        return {"premise": f"The boy {i} dropped the cup.", "choice1": f"The cup {i} broke.",
                "choice2": f"The cup {i} sang.", "question": ("cause", "effect")[i % 2], "label": i % 2, "idx": i}
    if task == "WiC":
        return {"word": "bank", "sentence1": f"The bank {i} was closed.", "sentence2": f"We sat on bank {i}.",
                "label": i % 3 == 0, "idx": i, "start1": 4, "end1": 8, "start2": 10, "end2": 14}
    if task == "WSC":
        return {"text": f"Mark {i} told Pete that he was late.", "label": i % 2 == 1, "idx": i,
                "target": {"span1_text": "Pete", "span1_index": 3, "span2_text": "he", "span2_index": 5}}
    questions = [{"question": f"What did kite {i}-{q} do", "idx": q,
                  "answers": [{"text": f"It flew {i}-{q}-{a}", "idx": a, "label": int(rng.random() < 0.5)}
                              for a in range(rng.randint(1, 3))]} for q in range(2)]
    return {"idx": i, "version": 1.1, "passage": {"text": f"Passage {i} about kites.", "questions": questions}}


def _expected(task: str, records: list[dict]) -> tuple[list, list[int], list | None]:
    """Examples, labels and question keys as the official format defines them, written out independently."""
    examples, labels, keys = [], [], []
    for r in records:
        if task in ("RTE", "CB"):
            examples.append({"premise": r["premise"], "hypothesis": r["hypothesis"]})
            labels.append(LABELS[task].index(r["label"]))
        elif task == "BoolQ":
            examples.append({"question": r["question"], "passage": r["passage"]})
            labels.append(int(r["label"]))
        elif task == "COPA":
            examples.append({"premise": r["premise"][:-1], "connector": {"cause": "because", "effect": "so"}[
                r["question"]], "choices": ["t" + r["choice1"][1:-1], "t" + r["choice2"][1:-1]]})  # PET: no final stop
            labels.append(r["label"])
        elif task == "WiC":
            examples.append({"word": r["word"], "sentence1": r["sentence1"], "sentence2": r["sentence2"]})
            labels.append(int(r["label"]))
        elif task == "WSC":
            examples.append({"text": r["text"], "span1_text": r["target"]["span1_text"],
                             "span2_text": r["target"]["span2_text"]})
            labels.append(int(r["label"]))
        else:
            for question in r["passage"]["questions"]:
                for answer in question["answers"]:
                    examples.append({"paragraph": r["passage"]["text"], "question": question["question"],
                                     "answer": answer["text"]})
                    labels.append(answer["label"])
                    keys.append((r["idx"], question["idx"]))
    return examples, labels, keys if task == "MultiRC" else None


def _write_folder(root, task: str, name: str | None = None, n_train: int = 40, n_val: int = 7):
    folder = root / (name or task)
    folder.mkdir(parents=True)
    rng = random.Random(task)
    official = {"train": [_record(task, i, rng) for i in range(n_train)],
                "val": [_record(task, 1000 + i, rng) for i in range(n_val)]}
    for split, records in official.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "test.jsonl").write_text(json.dumps({**official["val"][0], "label": None}) + "\n")  # hidden labels
    return folder, official


@pytest.mark.parametrize("task", [b.folder for b in FOLDERS.values()])
def test_folder_in_the_official_layout(task, tmp_path):
    folder, official = _write_folder(tmp_path, task, task.lower() if task == "BoolQ" else task)  # names: any case
    loaded = load_task(str(folder))
    benchmark = FOLDERS[task.lower()]
    assert (loaded.name, loaded.fields, loaded.metric, loaded.choices) == (
        benchmark.name, benchmark.fields, benchmark.metric, benchmark.choices)
    assert loaded.label_names == list(benchmark.label_names) and loaded.template == benchmark.template
    test_examples, test_labels, test_keys = _expected(task, official["val"])
    test = loaded.splits["test"]
    assert test.texts == test_examples and test.labels == test_labels  # test == the official validation rows
    assert all(list(e) == list(benchmark.fields) + (["choices"] if benchmark.choices else []) for e in test.texts)
    # validation + train partition the official train rows, each in the stored order
    examples, labels, keys = _expected(task, official["train"])
    position = {json.dumps(e): i for i, e in enumerate(examples)}
    held = [position[json.dumps(e)] for e in loaded.splits["validation"].texts]
    rest = [position[json.dumps(e)] for e in loaded.splits["train"].texts]
    assert held == sorted(held) and rest == sorted(rest) and sorted(held + rest) == list(range(len(examples)))
    assert loaded.splits["validation"].labels == [labels[i] for i in held]
    if keys is None:
        assert len(held) == round(0.1 * len(examples)) and test.groups is None
    else:  # MultiRC: whole questions held out; groups are running question ids
        held_questions, rest_questions = {keys[i] for i in held}, {keys[i] for i in rest}
        assert held_questions and not held_questions & rest_questions
        assert [test.groups.index(g) for g in test.groups] == [test_keys.index(k) for k in test_keys]
    again = load_task(str(folder))
    assert again.splits["validation"].texts == loaded.splits["validation"].texts  # seeded, stable
    assert loaded.split_info["seed"] == SPLIT_SEED and "official validation" in loaded.split_info["test"]
    assert loaded.split_info["official_sizes"] == {"train": len(examples), "validation": len(test_examples)}


def test_few_shot_subset_is_seeded_and_recorded(tmp_path):
    """FewGLUE (P-tuning, ADAPET): N training examples of the official train split and N others to validate on."""
    folder, official = _write_folder(tmp_path, "RTE", n_train=60)
    full = load_task(str(folder))
    few = load_task(str(folder), train_examples=8)
    examples = _expected("RTE", official["train"])[0]
    picked = [examples.index(e) for e in few.splits["train"].texts]
    dev = [examples.index(e) for e in few.splits["validation"].texts]
    assert len(picked) == len(dev) == 8 and picked == sorted(picked) and dev == sorted(dev)
    assert not set(picked) & set(dev)
    again = load_task(str(folder), train_examples=8)
    assert again.splits["train"] == few.splits["train"] and again.splits["validation"] == few.splits["validation"]
    assert few.splits["test"] == full.splits["test"]
    assert few.split_info["train_examples"] == 8 and few.split_info["train_examples_of"] == 60
    with pytest.raises(ValueError, match="--train-examples 500.*ask for 1 to 30"):
        load_task(str(folder), train_examples=500)


def test_split_head_and_select_carry_groups():
    split = Split(["a", "b", "c"], [0, 1, 0], [4, 4, 9])
    assert split.head(2) == Split(["a", "b"], [0, 1], [4, 4]) and split.select([2, 0]).groups == [9, 4]
    with pytest.raises(ValueError, match="groups"):
        Split(["a"], [0], [1, 2])


# ---- by name: `datasets.load_dataset` replaced by small DatasetDicts with the hub's columns ---------------------

def _hub_split(benchmark, n: int, offset: int, names: list[str]) -> datasets.Dataset:
    rows, features = [], {}
    for i in range(offset, offset + n):
        if benchmark.config == "copa":
            row = {"premise": f"The boy {i} fell.", "choice1": f"He {i} tripped.", "choice2": f"He {i} flew.",
                   "question": "cause"}
        elif benchmark.config == "multirc":
            row = {"paragraph": f"Passage {i // 6}.", "question": f"Question {i // 3}?", "answer": f"Answer {i}",
                   "idx": {"paragraph": i // 6, "question": (i // 3) % 2, "answer": i % 3}}
            features["idx"] = {k: datasets.Value("int32") for k in ("paragraph", "question", "answer")}
        else:
            row = {column: f"{column} {i}" for column in (benchmark.columns or benchmark.fields)}
        rows.append({**row, "label": i % len(names)})
    features.update({k: datasets.Value("string") for k in rows[0] if k not in ("label", "idx")},
                    label=datasets.ClassLabel(names=names))
    return datasets.Dataset.from_list(rows, features=datasets.Features(features))


def _fake_hub(monkeypatch, calls: list, names: dict | None = None):
    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        benchmark = next(b for b in BENCHMARKS.values() if (b.hub_id, b.config) == (path, name))
        labels = (names or {}).get(benchmark.name) or [n.title() if n in ("false", "true") else n
                                                        for n in benchmark.label_names]
        return datasets.DatasetDict({"train": _hub_split(benchmark, 30, 0, labels),
                                     benchmark.test_split: _hub_split(benchmark, 12, 600, labels)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_every_benchmark_by_name(monkeypatch):
    calls = []
    _fake_hub(monkeypatch, calls)
    for name, benchmark in BENCHMARKS.items():
        loaded = load_task(name)
        test = loaded.splits["test"]
        assert calls[-1] == (benchmark.hub_id, benchmark.config)
        assert loaded.fields == benchmark.fields and loaded.metric == benchmark.metric and len(test) == 12
        assert test.labels == [i % loaded.num_labels for i in range(600, 612)]
        held = 6 if benchmark.config == "multirc" else 3  # MultiRC: one whole passage of 6 answer options
        assert loaded.sizes()["train"] + loaded.sizes()["validation"] == 30 and loaded.sizes()["validation"] == held
        assert loaded.source == f"hf:{benchmark.hub_id}/{benchmark.config}"
        if benchmark.fields == ("text",):  # single text stays a plain string
            assert test.texts[0] == "sentence 600"
        elif not benchmark.choices and benchmark.config != "multirc":
            assert test.texts[0] == {f: f"{f} 600" for f in benchmark.fields}
    assert ("aps/super_glue", "wsc.fixed") in calls and ("nyu-mll/glue", "mnli") in calls
    copa = load_task("super_glue/copa").splits["test"].texts[0]
    assert copa == {"premise": "The boy 600 fell", "connector": "because",
                    "choices": ["he 600 tripped", "he 600 flew"]}
    multirc = load_task("super_glue/multirc").splits["test"]
    assert multirc.groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and multirc.texts[0]["answer"] == "Answer 600"


def test_hub_errors_are_one_clear_line(monkeypatch):
    _fake_hub(monkeypatch, [], names={"super_glue/rte": ["yes", "no"]})
    with pytest.raises(ValueError, match="now labels"):
        load_task("super_glue/rte")
    with pytest.raises(ValueError, match="'super_glue/record': ReCoRD is not supported"):
        load_task("super_glue/record")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"run once online .* path/to/RTE"):
        load_task("super_glue/rte")
    with pytest.raises(ValueError, match="run once online so that `datasets` caches it$"):
        load_task("glue/mrpc")


# ---- files with named text fields -----------------------------------------------------------------------------

def _pairs_file(tmp_path, suffix: str) -> str:
    rows = [{"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": ("yes", "no")[i % 2],
             "split": ("train", "train", "validation", "test")[i % 4]} for i in range(16)]
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("premise,hypothesis,label,split\n" + "".join(",".join(r.values()) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_file_with_text_fields(suffix, tmp_path):
    path = _pairs_file(tmp_path, suffix)
    loaded = load_task(path, text_fields=("premise", "hypothesis"))
    assert loaded.fields == ("premise", "hypothesis") and loaded.split_info == {"method": "the file's split column"}
    assert loaded.splits["test"].texts[0] == {"premise": "premise 3", "hypothesis": "hypothesis 3"}
    assert loaded.template == "{premise} {hypothesis} Answer: {mask}."
    custom = load_task(path, template="{premise} Question: {hypothesis}? Answer: {mask}.",
                       text_fields=("premise", "hypothesis"))
    assert custom.template.startswith("{premise} Question")
    with pytest.raises(ValueError, match=r"no claim column; it has \['hypothesis', 'label', 'premise', 'split'\]"):
        load_task(path, text_fields=("premise", "claim"))
    with pytest.raises(ValueError, match=r"names \{claim\}, which the task lacks"):
        load_task(path, template="{premise} {claim} {mask}", text_fields=("premise", "hypothesis"))
    with pytest.raises(ValueError, match="does not place the field"):
        load_task(path, template="{premise} {mask}", text_fields=("premise", "hypothesis"))


def test_checkpoint_reloads_its_fields_and_subset(tmp_path):
    path = _pairs_file(tmp_path, "csv")
    meta = {"task": path, "text_fields": ["premise", "hypothesis"], "train_examples": 3, "label_names": ["no", "yes"]}
    task = Checkpoint(tmp_path, {}, meta).task()
    assert task.fields == ("premise", "hypothesis") and len(task.splits["train"]) == 3
    assert task.split_info["train_examples"] == 3


def _cli_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.run(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_train_cli_bad_task_input(tmp_path, capsys):
    from ptp_core.train import main

    folder, _ = _write_folder(tmp_path, "RTE")
    empty = tmp_path / "empty" / "CB"
    empty.mkdir(parents=True)
    base = ["--model", "minilm", "--head", "classifier", "--out", str(tmp_path / "run"), "--no-progress"]
    cases = {("--task", "super_glue/nope"): "unknown benchmark 'super_glue/nope'",
             ("--task", str(empty)): "has no train.jsonl",
             ("--task", str(tmp_path / "missing" / "RTE")): "does not exist",
             ("--task", str(folder), "--text-fields", "a,b"): "drop --text-fields",
             ("--task", str(folder), "--template", "{premise} {claim} {mask}"): "names {claim}",
             ("--task", str(folder), "--train-examples", "0"): "--train-examples"}
    for args, message in cases.items():
        assert message in _cli_error(capsys, main, [*base, *args]), args
    assert not (tmp_path / "run").exists()


def test_train_and_evaluate_record_the_split_info_and_the_metric(tiny_dirs, tmp_path, monkeypatch, capsys):
    """glue/cola (a single text, so no pair encoding is involved): ptp.json and evaluate carry the MCC."""
    from ptp_core.evaluate import main as evaluate_main
    from ptp_core.train import TrainConfig, train

    _fake_hub(monkeypatch, [])
    out = train(TrainConfig(model=tiny_dirs["bert"], task="glue/cola", head="classifier", out=str(tmp_path / "run"),
                            steps=2, batch_size=4, prompt_length=2, eval_every=2, snapshot_every=2,
                            train_examples=12, progress=False, dtype="float32"))
    meta = json.loads((out / "ptp.json").read_text())
    assert meta["metric"] == "mcc" and meta["fields"] == ["text"] and meta["train_examples"] == 12
    assert meta["split_info"]["train_examples"] == 12 and "official validation" in meta["split_info"]["test"]
    assert meta["split_sizes"] == {"train": 12, "validation": 12, "test": 12}  # FewGLUE's dev: 12 other examples
    assert {"test_accuracy", "test_loss", "test_n", "test_mcc"} <= set(meta["metrics"])
    capsys.readouterr()
    result = evaluate_main([str(out), "--device", "cpu", "--dtype", "float32"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["mcc"] == pytest.approx(meta["metrics"]["test_mcc"]) and result["n"] == 12
