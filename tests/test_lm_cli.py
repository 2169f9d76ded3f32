"""--head lm on the command line: train, evaluate (--generate, another file) and sweep on a tiny JSONL generation task,
what ptp.json records, and bad input answered in one line with exit code 2, no traceback and nothing written.

One tiny PTP run per model kind (GPT-2 and T5, 4 steps) is shared by the module; the test loss it records is checked
against HF's own `labels` loss over the test examples, computed here from the tokenizer's encoding in one padded
batch.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BAD, FILLER, GOOD
from ptp_core import cli
from ptp_core.checkpoint import load_checkpoint
from ptp_core.evaluate import main as evaluate_main
from ptp_core.sweep import main as sweep_main, summarize_runs, summary_markdown
from ptp_core.train import main as train_main
from ptp_core.training.evaluation import evaluate

SPLITS = {"train": 24, "validation": 8, "test": 8}
EXAMPLES = 6  # --eval-examples and --test-examples
FLAGS = ["--head", "lm", "--target-field", "output", "--text-fields", "input", "--steps", "4", "--batch-size", "8",
         "--prompt-len", "3", "--eval-every", "2", "--eval-examples", str(EXAMPLES), "--test-examples", str(EXAMPLES),
         "--dtype", "float32", "--device", "cpu", "--no-progress", "--reg-warmup", "1", "--reg-ramp", "1"]


def _rows() -> list[dict]:
    """Input words from the toy vocabulary; the target says the sentiment in 1 to 4 words (uneven token counts)."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in SPLITS.items():
        for i in range(n):
            good = bool(i % 2)
            words = [*rng.choice(FILLER, 3), rng.choice(GOOD if good else BAD)]
            target = ["great fun", "good", "a lovely film", "quite moving and fun"][i % 4] if good else \
                ["dull and boring", "bad", "awful", "a messy and weak story"][i % 4]
            rows.append({"input": " ".join(words), "output": target, "split": split})
    return rows


def _write(path, rows) -> str:
    if str(path).endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["input", "output", "split"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _run(main, argv, capsys) -> str:
    """main as the command line runs it (cli.run); its stdout."""
    capsys.readouterr()
    cli.run(main, argv)
    return capsys.readouterr().out


def _refused(main, argv, capsys) -> str:
    """main must exit 2 with one stderr line (no traceback), which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_data")
    return {"root": root, "rows": _rows(), "jsonl": _write(root / "gen.jsonl", _rows()),
            "csv": _write(root / "gen.csv", _rows())}


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def run(request, tiny_dirs, family_dirs, data):
    """A ptp-rn --head lm run on the generation JSONL (text masking: a PTP path end to end) of a causal LM or an
    encoder-decoder, and its printed line."""
    model = tiny_dirs["gpt2"] if request.param == "gpt2" else family_dirs["t5"]
    out, printed = data["root"] / f"run-{request.param}", io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.run(train_main, ["--model", model, "--task", data["jsonl"], "--method", "ptp-rn", "--target", "text",
                             "--mask-rate", "0.3", *FLAGS, "--out", str(out)])
    return out, json.loads(printed.getvalue().splitlines()[-1])


def _hf_labels_loss(model, params, rows) -> float:
    """HF's own `labels` loss (the token mean over the set) of its full forward, the virtual tokens before one padded
    batch tokenized here, the template being the input field alone: a causal LM's rows are input + target + eos, an
    encoder-decoder's labels the tokenizer's own encoding of the target (PEFT's seq2seq guide)."""
    tok, prompt = model.tokenizer, params["prompt"]
    ids, labels = [], []
    for row in rows:
        text = tok(row["input"]).input_ids
        if model.kind == "seq2seq":
            ids.append(text)
            labels.append(tok(row["output"]).input_ids)
            continue
        target = tok(" " + row["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids.append(text + target)
        labels.append([-100] * prompt.shape[0] + [-100] * len(text) + target)  # the virtual tokens are not scored

    def pad(sequences, fill):
        width = max(map(len, sequences))
        return torch.tensor([seq + [fill] * (width - len(seq)) for seq in sequences])

    words = model.backbone.get_input_embeddings()(pad(ids, tok.pad_token_id))
    embeds = torch.cat([prompt.expand(len(rows), -1, -1), words], dim=1)  # (N, P+T, D)
    real = pad([[1] * len(i) for i in ids], 0)  # (N, T)
    attention = torch.cat([torch.ones(len(rows), prompt.shape[0], dtype=torch.long), real], dim=1)  # (N, P+T)
    label_ids = pad(labels, -100)  # (N, P+T) causal, (N, Tc) seq2seq
    with torch.no_grad():
        return model.backbone(inputs_embeds=embeds, attention_mask=attention, labels=label_ids).loss.item()


def test_ptp_json_records_the_generation_run(run):
    out, printed = run
    meta = json.loads((out / "ptp.json").read_text())
    assert meta["head"] == "lm" and meta["generation"] is True and meta["target_field"] == "output"
    assert meta["text_fields"] == ["input"] and meta["fields"] == ["input"] and "label_words" not in meta
    assert meta["method"] == "ptp-rn" and meta["perturb"]["target"] == "text" and meta["status"] == "complete"
    metrics = meta["metrics"]
    assert {"test_loss", "test_perplexity", "test_token_accuracy", "test_target_tokens", "test_n"} <= set(metrics)
    assert "test_accuracy" not in metrics and metrics["test_n"] == EXAMPLES
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-5)
    assert metrics["selection_metric"] == "token_accuracy" and metrics["label_prior_entropy"] is None
    assert "best validation token accuracy" in meta["split_info"]["selection"]
    assert printed["test_loss"] == metrics["test_loss"]
    steps = [row for row in meta["log"] if "loss" in row]
    assert [row["reg_weight"] for row in steps] == [0.0, 1.0, 1.0, 1.0] and "perturbed_loss" in steps[-1]


def test_the_checkpoint_reloads_to_its_recorded_losses_and_hfs_labels_loss(run, data):
    """load_checkpoint -> task() -> build_model: the test loss as recorded, equal to HF's labels loss over the same
    examples (batched here in uneven batches of 4 and 2, whose token counts differ); the best validation score is
    the token accuracy of the saved prompt on the validation subset."""
    out, _ = run
    checkpoint = load_checkpoint(out)
    task = checkpoint.task()
    model = checkpoint.build_model("cpu")
    params = dict(model.params)
    metrics = checkpoint.meta["metrics"]
    test = evaluate(model, params, task.splits["test"].head(EXAMPLES), batch_size=4)
    assert test["loss"] == pytest.approx(metrics["test_loss"], abs=1e-6)
    assert test["token_accuracy"] == pytest.approx(metrics["test_token_accuracy"], abs=1e-6)
    rows = [r for r in data["rows"] if r["split"] == "test"][:EXAMPLES]
    assert [t["target"] for t in task.splits["test"].texts[:EXAMPLES]] == [r["output"] for r in rows]
    assert metrics["test_loss"] == pytest.approx(_hf_labels_loss(model, params, rows), abs=1e-5)
    validation = evaluate(model, params, task.splits["validation"].head(EXAMPLES))
    assert metrics["best_validation_accuracy"] == pytest.approx(validation["token_accuracy"], abs=1e-6)


def test_evaluate_prints_the_recorded_loss_generates_and_reads_another_file(run, data, capsys):
    out, _ = run
    recorded = json.loads((out / "ptp.json").read_text())["metrics"]["test_loss"]
    base = [str(out), "--examples", str(EXAMPLES), "--device", "cpu", "--dtype", "float32", "--no-progress"]
    result = json.loads(_run(evaluate_main, [*base, "--generate", "--max-new-tokens", "3"], capsys))
    assert result["loss"] == pytest.approx(recorded, abs=1e-6) and result["n"] == EXAMPLES
    assert 0 <= result["exact_match"] <= 1 and 0 <= result["f1"] <= 1 and len(result["examples_written"]) == 3
    assert all(len(text.split()) <= 3 for text in result["examples_written"])  # at most 3 new tokens, one word each
    # the same rows in a CSV with the same columns: the prompt's own template reads them
    other = json.loads(_run(evaluate_main, [*base, "--task", data["csv"]], capsys))
    assert other["loss"] == pytest.approx(recorded, abs=1e-6)


def test_a_classification_task_as_text_records_its_targets_and_rank_accuracy(tiny_dirs, toy_csv, tmp_path, capsys):
    """--head lm on a classification file: ptp.json lists the targets (--label-words) and selects on rank accuracy,
    which the reloaded checkpoint reproduces."""
    out = tmp_path / "rank"
    flags = [f for f in FLAGS if f not in ("--target-field", "output", "--text-fields", "input")]
    _run(train_main, ["--model", tiny_dirs["gpt2"], "--task", toy_csv, "--label-words", "bad,great fun", *flags,
                      "--out", str(out)], capsys)
    checkpoint = load_checkpoint(out)
    meta, metrics = checkpoint.meta, checkpoint.meta["metrics"]
    assert meta["head"] == "lm" and meta["label_words"] == ["bad", "great fun"]
    assert "generation" not in meta and "target_field" not in meta
    assert metrics["selection_metric"] == "accuracy" and {"test_accuracy", "test_token_accuracy"} <= set(metrics)
    assert "best validation rank-classification accuracy" in meta["split_info"]["selection"]
    model = checkpoint.build_model("cpu")
    test = evaluate(model, dict(model.params), checkpoint.task().splits["test"].head(EXAMPLES), batch_size=4)
    assert test["accuracy"] == metrics["test_accuracy"]
    assert test["loss"] == pytest.approx(metrics["test_loss"], abs=1e-6)


def test_sweep_with_head_lm_summarizes_token_accuracy_and_loss(tiny_dirs, data, tmp_path, capsys):
    out = tmp_path / "sweep"
    printed = _run(sweep_main, ["--methods", "pt,ptp-rn", "--seeds", "0,1", "--model", tiny_dirs["gpt2"], "--task",
                                data["jsonl"], *FLAGS, "--out", str(out)], capsys)
    metas = {m: [json.loads((out / m / f"seed{s}" / "ptp.json").read_text()) for s in (0, 1)] for m in ("pt", "ptp-rn")}
    with open(out / "summary.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for method, runs in metas.items():
        row = rows[method]
        accuracy = np.array([m["metrics"]["test_token_accuracy"] for m in runs])
        loss = np.array([m["metrics"]["test_loss"] for m in runs])
        assert row["accuracy_kind"] == "token" and row["collapsed"] == ""  # not measured for a token loss
        assert float(row["test_accuracy_mean"]) == pytest.approx(accuracy.mean())
        assert float(row["test_loss_mean"]) == pytest.approx(loss.mean())
        assert float(row["test_loss_std"]) == pytest.approx(loss.std(ddof=1))
    markdown = (out / "summary.md").read_text()
    assert "test token acc mean" in markdown.splitlines()[0] and "test loss mean" in markdown.splitlines()[0]
    assert "acc is the token accuracy" in markdown and "not measured for --head lm" in markdown
    assert markdown in printed


def test_sweep_summary_of_rank_classification_runs_names_it(tmp_path):
    """--head lm on a classification task: test_accuracy is rank classification, the table says so."""
    from ptp_core.io import write_json
    from ptp_core.sweep import run_dir

    for seed, (accuracy, loss) in enumerate([(0.5, 1.5), (0.75, 1.25)]):
        path = run_dir(tmp_path, "pt", seed)
        path.mkdir(parents=True)
        write_json(path / "ptp.json", {"status": "complete", "head": "lm", "log": [], "metrics": {
            "test_accuracy": accuracy, "test_token_accuracy": 0.1, "test_loss": loss,
            "best_validation_accuracy": 0.5, "collapsed": False}})
    rows = summarize_runs(tmp_path, ["pt"], [0, 1])
    assert rows[0]["accuracy_kind"] == "rank" and rows[0]["test_accuracy_mean"] == pytest.approx(0.625)
    assert rows[0]["test_loss_mean"] == pytest.approx(1.375)
    text = summary_markdown(rows)
    assert "test rank acc mean" in text.splitlines()[0] and "| 1.3750 |" in text and "rank classification" in text


# ---- bad input: one line, exit code 2, nothing written ------------------------------------------------------------

def _copa(folder):
    folder.mkdir(exist_ok=True)
    row = {"premise": "the film was dull", "choice1": "it was bad", "choice2": "it was great", "question": "effect",
           "label": 0, "idx": 0}
    for name in ("train", "val"):
        (folder / f"{name}.jsonl").write_text((json.dumps(row) + "\n") * 8)
    return str(folder)


def test_bad_training_input_is_one_line_and_writes_nothing(tiny_dirs, data, tmp_path, capsys):
    rows = data["rows"]
    missing = [dict(r) for r in rows]
    del missing[30]["output"]  # the 31st row, the 7th of validation
    empty = [dict(r, output="" if i == 3 else r["output"]) for i, r in enumerate(rows)]
    long_target = " ".join(["fun"] * 40)
    long = [dict(r, output=long_target if i == 35 else r["output"]) for i, r in enumerate(rows)]  # test example 3
    files = {name: _write(tmp_path / f"{name}.jsonl", value) for name, value in
             (("missing", missing), ("empty", empty), ("long", long))}
    out = tmp_path / "out"
    gpt2 = ["--model", tiny_dirs["gpt2"], "--out", str(out)]
    generation = ["--target-field", "output", "--text-fields", "input", "--no-progress"]
    cases = {
        "missing target": ([*gpt2, "--head", "lm", "--task", files["missing"], *generation],
                           "row 31 of 40 (validation) has no output column"),
        "empty target": ([*gpt2, "--head", "lm", "--task", files["empty"], *generation],
                         "row 4 of 40 (train) has an empty 'output'"),
        "encoder": (["--model", tiny_dirs["bert"], "--out", str(out), "--head", "lm", "--task", data["jsonl"],
                     *generation], "which writes no text; --head lm needs a causal LM or an encoder-decoder"),
        "long target": ([*gpt2, "--head", "lm", "--task", files["long"], *generation, "--max-length", "32"],
                        "test example 3 (counted from 0): the target 'fun fun"),
        "builtin task": ([*gpt2, "--head", "lm", "--task", "rotten_tomatoes", "--target-field", "output"],
                         "task 'rotten_tomatoes' is a classification task"),
        "verbalizer": ([*gpt2, "--head", "verbalizer", "--task", data["jsonl"], *generation],
                       "only --head lm learns; add --head lm (got --head verbalizer)"),
        "classifier": ([*gpt2, "--head", "classifier", "--task", data["jsonl"], *generation],
                       "only --head lm learns; add --head lm (got --head classifier)"),
        "label words": ([*gpt2, "--head", "lm", "--task", data["jsonl"], *generation, "--label-words", "no,yes"],
                        "a generation task's targets are its --target-field texts"),
        "multiple choice": ([*gpt2, "--head", "lm", "--task", _copa(tmp_path / "COPA"), "--no-progress"],
                            "is multiple choice; --head lm learns one target per label"),
        "target is input": ([*gpt2, "--head", "lm", "--task", data["jsonl"], "--target-field", "input",
                             "--text-fields", "input"], "--target-field input is also one of --text-fields input"),
    }
    for name, (argv, message) in cases.items():
        assert message in _refused(train_main, argv, capsys), name
        assert not out.exists(), name
    sweep = tmp_path / "sweep"
    assert "only --head lm learns" in _refused(sweep_main, ["--out", str(sweep), "--methods", "pt", *cases[
        "verbalizer"][0][:2], "--head", "verbalizer", "--task", data["jsonl"], *generation], capsys)
    assert not sweep.exists()
    # as a user runs it: the interpreter's own exit, no traceback
    result = subprocess.run([sys.executable, "-m", "ptp_core.train", *cases["long target"][0]], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert cases["long target"][1] in result.stderr and not out.exists()


def test_bad_evaluation_input_is_one_line(run, data, tmp_path, capsys):
    out, _ = run
    classifier = tmp_path / "classifier"
    shutil.copytree(out, classifier)
    meta = json.loads((classifier / "ptp.json").read_text())
    (classifier / "ptp.json").write_text(json.dumps({**meta, "head": "classifier"}))
    base = ["--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert "--generate needs a --head lm checkpoint" in _refused(evaluate_main, [str(classifier), *base, "--generate"],
                                                                  capsys)
    assert "but task 'rotten_tomatoes' has labels" in _refused(
        evaluate_main, [str(out), *base, "--task", "rotten_tomatoes"], capsys)
    long = [dict(r, output=" ".join(["fun"] * 200) if i == 33 else r["output"]) for i, r in enumerate(data["rows"])]
    assert "test example 1 (counted from 0)" in _refused(
        evaluate_main, [str(out), *base, "--task", _write(tmp_path / "long.jsonl", long)], capsys)
