"""Splits and task readers that follow the cited protocols: hidden labels are no class, FewGLUE's few-shot splits (N
training examples and N others to validate on, MultiRC counted in passages), PET's no-dev selection, WSC's span fixes
and PET's COPA text, and one-line refusals for the files and folders that cannot be read."""
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from ptp_core.tasks.load import load_task
from ptp_core.train import TrainConfig, train


# ---- hidden labels: -1 (a ClassLabel's, or a whole split's), null or an empty cell --------------------------------

def _sst2_like(n_train: int = 20, n_validation: int = 6, n_test: int = 5) -> datasets.DatasetDict:
    """The shape of stanfordnlp/sst2: idx, sentence, a ClassLabel; every test label is -1."""
    features = datasets.Features({"idx": datasets.Value("int32"), "sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(name, n, hidden):
        rows = [{"idx": i, "sentence": f"{name} sentence {i}", "label": -1 if hidden else i % 2} for i in range(n)]
        return datasets.Dataset.from_list(rows, features=features)

    return datasets.DatasetDict({"train": split("train", n_train, False),
                                 "validation": split("validation", n_validation, False),
                                 "test": split("test", n_test, True)})


def test_hidden_test_labels_of_a_datasets_task_are_no_class(monkeypatch, tmp_path):
    saved = tmp_path / "sst2"
    _sst2_like().save_to_disk(str(saved))  # what the hub gives, read back as `datasets` stores it
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: datasets.load_from_disk(str(saved)))
    reference = datasets.load_from_disk(str(saved))
    task = load_task("someone/sst2")
    assert task.label_names == ["0", "1"]  # the hidden -1 is no third class
    assert task.split_info["hidden_labels"] == {"test": 5}
    # no test row has a label: the validation rows are the test split, validation is held out of train
    official = {name: reference[name].to_list() for name in ("train", "validation")}
    assert task.splits["test"].texts == [r["sentence"] for r in official["validation"]]
    assert task.splits["test"].labels == [r["label"] for r in official["validation"]]
    train, validation = task.splits["train"], task.splits["validation"]
    position = {r["sentence"]: i for i, r in enumerate(official["train"])}
    held, rest = [position[t] for t in validation.texts], [position[t] for t in train.texts]
    assert sorted(held + rest) == list(range(20)) and len(held) == 2 and held == sorted(held)
    assert train.labels == [official["train"][i]["label"] for i in rest]  # labels unshifted


def test_scattered_class_label_minus_one_is_dropped(monkeypatch):
    """SNLI marks pairs without a gold label -1 inside every split: they are dropped, not a class."""
    loaded = _sst2_like()
    train = loaded["train"].to_list()
    for i in (3, 7):
        train[i]["label"] = -1
    loaded["train"] = datasets.Dataset.from_list(train, features=loaded["train"].features)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: loaded)
    task = load_task("someone/snli")
    assert task.label_names == ["0", "1"] and task.split_info["hidden_labels"] == {"train": 2, "test": 5}
    assert task.sizes()["train"] + task.sizes()["validation"] == 18


def _write_csv(path, rows) -> str:
    path.write_text("text,label,split\n" + "".join(f"{t},{y},{s}\n" for t, y, s in rows))
    return str(path)


def test_hidden_labels_in_a_csv(tmp_path):
    rows = ([(f"good {i}", i % 2, "train") for i in range(12)] + [(f"fine {i}", i % 2, "validation") for i in range(4)]
            + [(f"secret {i}", -1, "test") for i in range(3)] + [("blank", "", "train")])
    task = load_task(_write_csv(tmp_path / "hidden.csv", rows))
    assert task.label_names == ["0", "1"] and task.split_info["hidden_labels"] == {"test": 3, "train": 1}
    assert task.splits["test"].texts == [f"fine {i}" for i in range(4)] and task.splits["test"].labels == [0, 1, 0, 1]
    kept = task.splits["train"].texts + task.splits["validation"].texts
    assert sorted(kept) == sorted(f"good {i}" for i in range(12))
    # -1 among other labels of a split is a class of its own (e.g. negative/neutral/positive)
    three = [(f"text {i}", (-1, 0, 1)[i % 3], ("train", "validation", "test")[i % 4 // 2 + i % 2]) for i in range(24)]
    task = load_task(_write_csv(tmp_path / "three.csv", three))
    assert task.label_names == ["-1", "0", "1"] and "hidden_labels" not in task.split_info
    # a train split without a single label cannot be made from the others
    with pytest.raises(ValueError, match="no train rows with a label \\(2 have hidden labels\\)"):
        load_task(_write_csv(tmp_path / "nolabels.csv", [("a", -1, "train"), ("b", -1, "train"), ("c", 0, "test")]))


# ---- MultiRC in the official layout: passages are the unit of FewGLUE's N and of the held-out split --------------

def _multirc_folder(root, n_train: int = 24, n_val: int = 4):
    """A MultiRC folder in the official layout: passage.text > questions[] > answers[] with labels."""
    folder = root / "MultiRC"
    folder.mkdir(parents=True)
    records = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 500)):
        records[split] = [{"idx": offset + p, "version": 1.1, "passage": {
            "text": f"Passage {offset + p}.", "questions": [
                {"idx": q, "question": f"Question {offset + p}-{q}?",
                 "answers": [{"idx": a, "text": f"Answer {offset + p}-{q}-{a}", "label": (p + q + a) % 2}
                             for a in range(1 + (p + q) % 3)]} for q in range(1 + p % 3)]}} for p in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[split]))
    return folder, records


def _answer_rows(records) -> dict[str, tuple[int, int]]:
    """Answer text -> (passage index, question index), straight from the official nesting."""
    return {a["text"]: (p, q["idx"]) for p, r in enumerate(records) for q in r["passage"]["questions"]
            for a in q["answers"]}


def test_multirc_few_shot_counts_passages_and_holds_out_passages(tmp_path):
    folder, records = _multirc_folder(tmp_path)
    where = _answer_rows(records["train"])
    answers_of = {p: sum(len(q["answers"]) for q in r["passage"]["questions"]) for p, r in enumerate(records["train"])}
    few = load_task(str(folder), train_examples=3)
    passages = {}
    for name in ("train", "validation"):
        split = few.splits[name]
        passages[name] = {where[t["answer"]][0] for t in split.texts}
        assert len(passages[name]) == 3 and len(split) == sum(answers_of[p] for p in passages[name])  # whole passages
        questions = {where[t["answer"]] for t in split.texts}
        assert len(set(split.passages)) == 3 and len(set(split.groups)) == len(questions)
    assert not passages["train"] & passages["validation"]
    assert few.split_info["train_examples_unit"] == "passages" and few.split_info["train_examples_of"] == 24
    full = load_task(str(folder))  # the held-out validation split: whole passages, none also in train
    held = {where[t["answer"]][0] for t in full.splits["validation"].texts}
    rest = {where[t["answer"]][0] for t in full.splits["train"].texts}
    assert held and not held & rest and held | rest == set(range(24))
    test = full.splits["test"]  # passage ids: the official record index, one running id per record
    val_where = _answer_rows(records["val"])
    assert test.passages == [val_where[t["answer"]][0] for t in test.texts]


def test_multirc_hub_and_folder_give_the_same_splits(tmp_path, monkeypatch):
    """The hub's multirc rows (one per answer, idx.paragraph / idx.question) made from the same official records."""
    folder, records = _multirc_folder(tmp_path)
    features = datasets.Features({**{k: datasets.Value("string") for k in ("paragraph", "question", "answer")},
                                  "idx": {k: datasets.Value("int32") for k in ("paragraph", "question", "answer")},
                                  "label": datasets.ClassLabel(names=["False", "True"])})

    def hub_split(split):
        rows = [{"paragraph": r["passage"]["text"], "question": q["question"], "answer": a["text"],
                 "idx": {"paragraph": r["idx"], "question": q["idx"], "answer": a["idx"]}, "label": a["label"]}
                for r in records[split] for q in r["passage"]["questions"] for a in q["answers"]]
        return datasets.Dataset.from_list(rows, features=features)

    hub = datasets.DatasetDict({"train": hub_split("train"), "validation": hub_split("val")})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **k: hub)
    for n in (None, 3):
        from_folder = load_task(str(folder), train_examples=n)
        from_hub = load_task("super_glue/multirc", train_examples=n)
        assert from_folder.splits == from_hub.splits and from_hub.splits["train"].passages is not None


def test_evaluate_examples_cut_whole_questions(tiny_dirs, tmp_path, capsys):
    """`evaluate --examples N` ends at the end of the question the N-th answer option belongs to; its EM is the
    fraction of those questions with every option right, computed here from the model's own logits."""
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.evaluate import main as evaluate_main

    folder, records = _multirc_folder(tmp_path, n_train=8)
    out = train(TrainConfig(model=tiny_dirs["bert"], task=str(folder), head="classifier", out=str(tmp_path / "run"),
                            steps=1, batch_size=4, prompt_length=2, eval_every=1, snapshot_every=1, progress=False,
                            dtype="float32", max_length=32))
    sizes = [len(q["answers"]) for r in records["val"] for q in r["passage"]["questions"]]  # options per question
    n, bounds = 4, np.cumsum(sizes)  # the row after which each question ends
    assert n not in bounds  # the 4th option lies inside a question: the cut must go on to its end
    expected_rows = int(bounds[np.searchsorted(bounds, n)])
    capsys.readouterr()
    result = evaluate_main([str(out), "--examples", str(n), "--device", "cpu", "--dtype", "float32"])
    assert result["n"] == expected_rows
    checkpoint = load_checkpoint(out)
    test = checkpoint.task().splits["test"]
    model = checkpoint.build_model("cpu")
    with torch.inference_mode():
        logits = model.logits(dict(model.params), model.encode(test.texts[:expected_rows], test.labels[:expected_rows]))
    right = (logits.argmax(-1).numpy() == np.array(test.labels[:expected_rows]))
    per_question = np.split(right, bounds[:int(np.searchsorted(bounds, expected_rows))])
    em = float(np.mean([chunk.all() for chunk in per_question]))
    assert result["em"] == pytest.approx(em) and result["accuracy"] == pytest.approx(right.mean())


# ---- PET's no-dev protocol: no validation split is used, the last step is saved ---------------------------------

def test_selection_last_saves_the_last_step_without_validation(tiny_dirs, toy_csv, tmp_path):
    base = dict(model=tiny_dirs["bert"], task=toy_csv, head="classifier", steps=6, batch_size=16, prompt_length=2,
                lr=0.05, head_lr=0.05, snapshot_every=3, progress=False, dtype="float32", seed=5)
    last = train(TrainConfig(**base, out=str(tmp_path / "last"), selection="last", eval_every=2))
    # reference: the same run validated only at its last step, which is then necessarily the best step
    final = train(TrainConfig(**base, out=str(tmp_path / "final"), eval_every=6))
    from ptp_core.checkpoint import load_checkpoint

    a, b = load_checkpoint(last), load_checkpoint(final)
    assert all(torch.equal(a.params[k], b.params[k]) for k in b.params)
    meta = a.meta
    assert meta["selection"] == "last" and meta["metrics"]["best_step"] == 6
    assert meta["metrics"]["best_validation_accuracy"] is None
    assert not any("validation_loss" in row for row in meta["log"])  # validation is never touched
    assert "no validation split is used" in meta["split_info"]["selection"]
    assert b.meta["metrics"]["best_step"] == 6 and "best validation accuracy" in b.meta["split_info"]["selection"]
    with pytest.raises(ValueError, match="unknown --selection 'best'"):
        TrainConfig(selection="best")


# ---- WSC (the hub's wsc.fixed) and COPA (PET's text) from the official folders -----------------------------------

WSC_TEXT = "Then the trophy would not fit in the brown suitcase because it was too big."
WSC_ROWS = [  # (span1 as the official file has it, its word index, span2, its index) -> as wsc.fixed has them
    (("The trophy", 1, "it.", 11), ("the trophy", "it")),  # case from the text's word; final period dropped
    (("The brown\nsuitcase", 7, "it", 11), ("the brown suitcase", "it")),  # a newline inside the span
    (("Kamenev and Zinoviev", 0, "it", 11), ("Kamenev and Zinoviev", "it")),  # wsc.fixed leaves this one
    (("the trophy", 1, "it", 11), ("the trophy", "it")),  # already a substring: unchanged
]


def test_wsc_folder_equals_the_hubs_wsc_fixed(tmp_path, monkeypatch):
    folder = tmp_path / "WSC"
    folder.mkdir()
    records = [{"text": WSC_TEXT, "label": i % 2 == 0, "idx": i,
                "target": {"span1_text": s1, "span1_index": i1, "span2_text": s2, "span2_index": i2}}
               for i, ((s1, i1, s2, i2), _) in enumerate(WSC_ROWS)]
    for name in ("train", "val"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    # the hub's wsc.fixed rows: the same records with the spans as the `datasets` super_glue script fixed them
    hub_rows = [{"text": WSC_TEXT, "span1_index": i1, "span2_index": i2, "span1_text": f1, "span2_text": f2,
                 "idx": i, "label": int(i % 2 == 0)} for i, ((_, i1, _, i2), (f1, f2)) in enumerate(WSC_ROWS)] * 3
    features = datasets.Features({**{k: datasets.Value("string") for k in ("text", "span1_text", "span2_text")},
                                  **{k: datasets.Value("int32") for k in ("span1_index", "span2_index", "idx")},
                                  "label": datasets.ClassLabel(names=["False", "True"])})
    hub = datasets.Dataset.from_list(hub_rows, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **k: datasets.DatasetDict(
        {"train": hub, "validation": hub}) if (path, name) == ("aps/super_glue", "wsc.fixed") else None)
    from_folder, from_hub = load_task(str(folder)), load_task("super_glue/wsc")
    assert from_folder.splits["test"] == from_hub.splits["test"]
    assert from_folder.splits["train"] == from_hub.splits["train"]
    assert [(t["span1_text"], t["span2_text"]) for t in from_folder.splits["test"].texts[:4]] == [
        fixed for _, fixed in WSC_ROWS]


def test_copa_text_follows_pet(tmp_path):
    """pet/pvp.py CopaPVP: premise and choices rstrip(string.punctuation), choices lower-cased at the first letter."""
    folder = tmp_path / "COPA"
    folder.mkdir()
    row = {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
           "choice2": 'He shouted "stop!"', "question": "cause", "label": 0, "idx": 0}
    for name in ("train", "val"):
        (folder / f"{name}.jsonl").write_text((json.dumps(row) + "\n") * 4)
    example = load_task(str(folder)).splits["test"].texts[0]
    assert example == {"premise": "My body cast a shadow over the grass", "connector": "because",
                       "choices": ["the sun was rising", 'he shouted "stop']}


# ---- refusals: one line, exit code 2, no traceback, no output folder ----------------------------------------------

def test_cli_refuses_unreadable_folders_in_one_line(tmp_path, capsys):
    from ptp_core import cli
    from ptp_core.train import main

    rte = tmp_path / "RTE"
    rte.mkdir()
    (rte / "train.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "entailment"}) + "\n")
    (rte / "val.jsonl").write_text("\n")  # empty
    cb = tmp_path / "CB"
    cb.mkdir()
    (cb / "train.jsonl").write_text("")
    reasons = {rte: "val.jsonl has no rows", cb: "train.jsonl has no rows",
               tmp_path / "ReCoRD": "ReCoRD is not supported",
               **{tmp_path / name: f"{name} is SuperGLUE's diagnostic set" for name in ("AX-b", "AX-g")}}
    for folder in reasons:
        folder.mkdir(exist_ok=True)
        if folder not in (rte, cb):
            (folder / f"{folder.name}.jsonl").write_text("{}\n")
    out = tmp_path / "run"
    argv = {folder: ["--task", str(folder), "--out", str(out), "--no-progress"] for folder in reasons}
    # one through the interpreter, as a user runs it; the others through the same cli.run, in-process (faster)
    result = subprocess.run([sys.executable, "-m", "ptp_core.train", *argv[rte]], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    messages = {rte: result.stderr.strip().splitlines()}
    for folder in reasons:
        if folder != rte:
            with pytest.raises(SystemExit) as stopped:
                cli.run(main, argv[folder])
            assert stopped.value.code == 2
            messages[folder] = capsys.readouterr().err.strip().splitlines()
    for folder, reason in reasons.items():
        assert len(messages[folder]) == 1 and reason in messages[folder][0], messages[folder]
        assert "not named after" not in messages[folder][0]
    assert not out.exists()
