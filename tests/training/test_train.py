"""Trainer, evaluate and data: learning, bitwise reproducibility, CLI smoke tests, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from ptp_core.checkpoint import load_checkpoint
from ptp_core.train import TrainConfig, train


def _config(tiny_dirs, toy_csv, out, **kw):
    values = dict(model=tiny_dirs["bert"], task=toy_csv, head="classifier", out=str(out), steps=30, batch_size=16,
                  prompt_length=4, lr=0.05, head_lr=0.05, eval_every=10, snapshot_every=5, progress=False,
                  dtype="float32")
    values.update(kw)
    return TrainConfig(**values)


def test_training_lowers_the_loss_and_records_everything(tiny_dirs, toy_csv, tmp_path):
    out = train(_config(tiny_dirs, toy_csv, tmp_path / "run", steps=60))
    ckpt = load_checkpoint(out)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1
    meta = ckpt.meta
    assert meta["method"] == "pt" and meta["seed"] == 0 and meta["status"] == "complete"
    assert meta["metrics"]["best_validation_accuracy"] >= 0.6  # chance is 0.5 on the toy task
    assert meta["split_sizes"] == {"train": 96, "validation": 32, "test": 32}
    assert ckpt.trajectory["prompts"].shape == (13, 4, 32) and ckpt.trajectory["steps"][-1] == 60


def test_same_seed_is_bitwise_equal(tiny_dirs, toy_csv, tmp_path):
    a = load_checkpoint(train(_config(tiny_dirs, toy_csv, tmp_path / "a", seed=3)))
    b = load_checkpoint(train(_config(tiny_dirs, toy_csv, tmp_path / "b", seed=3)))
    c = load_checkpoint(train(_config(tiny_dirs, toy_csv, tmp_path / "c", seed=4)))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["prompt"], c.params["prompt"])


def test_verbalizer_training_on_causal_lm(tiny_dirs, toy_csv, tmp_path):
    out = train(_config(tiny_dirs, toy_csv, tmp_path / "run", model=tiny_dirs["llama"], head="verbalizer", steps=10))
    assert load_checkpoint(out).meta["head"] == "verbalizer"


def test_auto_head_follows_the_model_and_the_lr_follows_the_head(family_dirs):
    from ptp_core.training.config import PROMPT_LR

    for model, head in (("smollm2", "verbalizer"), ("minilm", "classifier"), (family_dirs["t5"], "verbalizer"),
                        (family_dirs["bart"], "verbalizer"), (family_dirs["roberta"], "classifier"),
                        (family_dirs["qwen2"], "classifier")):
        config = TrainConfig(model=model)
        assert (config.head, config.lr) == (head, PROMPT_LR[head]), model
    assert TrainConfig(model="minilm", head="verbalizer").lr == PROMPT_LR["verbalizer"]  # an explicit head
    assert TrainConfig(model="smollm2", lr=0.1).lr == 0.1  # an explicit value wins


def _cli(*args, expect=0):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-2000:]
    if expect == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return result


def test_cli_train_then_evaluate(tiny_dirs, toy_csv, tmp_path):
    out = tmp_path / "cli"
    _cli("-m", "ptp_core.train", "--model", tiny_dirs["bert"], "--task", toy_csv, "--head", "classifier",
         "--steps", "5", "--eval-every", "5", "--prompt-len", "3", "--out", str(out), "--no-progress")
    result = json.loads(_cli("-m", "ptp_core.evaluate", str(out), "--split", "validation").stdout)
    assert result["n"] == 32 and 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    meta = json.loads((out / "ptp.json").read_text())
    assert meta["metrics"]["best_validation_accuracy"] == pytest.approx(result["accuracy"])
    error = _cli("-m", "ptp_core.train", "--model", tiny_dirs["bert"], "--task", toy_csv, "--steps", "5",
                 "--out", str(out), expect=2)
    assert "--overwrite" in error.stderr


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_cli_bad_input(tiny_dirs, toy_csv, tmp_path):
    base = ["-m", "ptp_core.train", "--task", toy_csv, "--out", str(tmp_path / "x"), "--steps", "1"]
    cases = {
        "legacy hub id, offline": (["--model", "roberta-base"], "'roberta-base' is neither a local folder nor in the "
                                                                "Hugging Face cache, so it cannot be fetched offline"),
        "prompt too long": (["--model", tiny_dirs["bert"], "--prompt-len", "100000"], "exceed the 256 positions"),
        "unknown task": (["--model", tiny_dirs["bert"], "--task", "nosuchtask"], "task"),
        "prompt len": (["--model", tiny_dirs["bert"], "--prompt-len", "0"], "--prompt-len"),
        "steps": (["--model", tiny_dirs["bert"], "--steps", "0"], "--steps"),
        "lr": (["--model", tiny_dirs["bert"], "--lr", "-1"], "--lr"),
        "lr inf": (["--model", tiny_dirs["bert"], "--lr", "inf"], "--lr must be a finite number"),
        "empty file": (["--model", tiny_dirs["bert"], "--task", _write(tmp_path / "e.csv", "")], "empty"),
        "no label column": (["--model", tiny_dirs["bert"], "--task", _write(tmp_path / "n.csv", "text\nhi\n")],
                            "no label column"),
        "label words": (["--model", tiny_dirs["bert"], "--label-words", "a,b,c"], "label words"),
    }
    for name, (args, message) in cases.items():
        error = _cli(*base, *args, expect=2)
        assert message in error.stderr, (name, error.stderr)
    assert not (tmp_path / "x").exists()  # nothing half-written
    ckpt = tmp_path / "broken"
    ckpt.mkdir()
    _write(ckpt / "adapter_config.json", "{}")
    assert "adapter_model" in _cli("-m", "ptp_core.evaluate", str(ckpt), expect=2).stderr


def test_csv_labels_must_match_given_names(tmp_path):
    from ptp_core.tasks.load import load_task

    path = _write(tmp_path / "t.csv", "text,label\na,pos\nb,neg\nc,meh\n")
    with pytest.raises(ValueError, match="not among the task's labels"):
        load_task(path, label_names=["neg", "pos"])


def test_embedded_task_is_deterministic():
    from ptp_core.tasks.load import load_task

    a, b = load_task("rotten_tomatoes"), load_task("rotten_tomatoes")
    assert 12_500 < sum(a.sizes().values()) < 12_900
    assert a.splits["test"].texts[:50] == b.splits["test"].texts[:50]
    assert not set(a.splits["test"].texts) & set(a.splits["train"].texts)
    assert a.label_names == ["negative", "positive"]


@pytest.mark.slow
def test_minilm_learns_rotten_tomatoes(tmp_path):
    out = train(TrainConfig(model="minilm", task="rotten_tomatoes", out=str(tmp_path / "m"), steps=100,
                            eval_every=50, eval_examples=256, test_examples=512, max_length=64, progress=False))
    assert load_checkpoint(out).meta["metrics"]["test_accuracy"] > 0.65  # majority class is 0.59


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dirs, toy_csv, tmp_path, monkeypatch):
    import ptp_core.training.loop as loop

    real = loop.step_gradients
    calls = {"n": 0}

    def diverging(model, params, batch, config, generator, step):
        calls["n"] += 1
        return real(model, params, batch, config, generator, step) if calls["n"] < 12 else {"loss": float("nan")}

    monkeypatch.setattr(loop, "step_gradients", diverging)
    with pytest.raises(ValueError, match="non-finite loss at step 12"):
        train(_config(tiny_dirs, toy_csv, tmp_path / "nan"))
    ckpt = load_checkpoint(tmp_path / "nan")
    assert ckpt.meta["status"].startswith("stopped") and ckpt.meta["metrics"]["best_step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt.params.values())
