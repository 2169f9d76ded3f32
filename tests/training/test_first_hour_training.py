"""The first hour on the training side: no silent no-op PTP run, metadata that records what applied, help that shows
defaults, typos answered with the nearest name, errors that name the problem and its mend."""
import json
import re

import pytest
import torch

from ptp_core import cli
from ptp_core.train import TrainConfig, main as train_main, train
from ptp_core.training.perturb import PerturbConfig

FLAGS = ["--head", "classifier", "--steps", "4", "--batch-size", "16", "--prompt-len", "3", "--eval-every", "2",
         "--eval-examples", "8", "--test-examples", "8", "--dtype", "float32", "--device", "cpu"]


def _refused(main, argv, capsys) -> str:
    """Run main as the command line does; it must exit 2 with one stderr line, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def runs(tiny_dirs, toy_csv, tmp_path_factory):
    """A pt run through train() with its progress bar, and a 4-step ptp-rn run through the command line (its default
    40-step warm-up is longer than the run), whose final JSON is made to say collapsed; their stderr."""
    import io
    import sys

    root = tmp_path_factory.mktemp("first_hour")
    patch = pytest.MonkeyPatch()
    stderr, sys.stderr = sys.stderr, io.StringIO()  # the bar and the command's lines, as a user's terminal gets them
    try:
        pt = train(TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", out=str(root / "pt"),
                               steps=4, batch_size=16, prompt_length=3, eval_every=2, eval_examples=8,
                               test_examples=8, dtype="float32", device="cpu", progress=True))
        bar = sys.stderr.getvalue()
        sys.stderr = io.StringIO()
        patch.setattr("ptp_core.train.collapsed", lambda log, prior: True)  # a run that learned nothing
        cli.run(train_main, ["--model", tiny_dirs["bert"], "--task", toy_csv, "--method", "ptp-rn", *FLAGS,
                             "--out", str(root / "ptp"), "--no-progress"])
        ptp_err = sys.stderr.getvalue()
    finally:
        sys.stderr = stderr
        patch.undo()
    return {"pt": pt, "ptp": root / "ptp", "bar": bar, "ptp_err": ptp_err}


def _log(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_ptp_run_shorter_than_its_warmup_is_regularized(runs):
    """The schedule is scaled to the run (weight_at, computed here by hand), printed, recorded; the trained prompt
    differs from pt's with the same seed (same init and batches), which a no-op regularizer would equal."""
    meta = json.loads((runs["ptp"] / "ptp.json").read_text())
    assert meta["reg_schedule_requested"] == [40, 40]
    assert (meta["perturb"]["reg_warmup"], meta["perturb"]["reg_ramp"]) == (2, 2)
    weights = [row["reg_weight"] for row in _log(runs["ptp"]) if "reg_weight" in row]
    assert weights == [0.0, 0.0, 0.5, 1.0]  # 0 through step 2, then (step - 2) / 2
    assert all("perturbed_loss" in row for row in _log(runs["ptp"])[-2:] if "loss" in row)
    from safetensors.torch import load_file
    ours, pt = (load_file(p / "adapter_model.safetensors") for p in (runs["ptp"], runs["pt"]))
    assert not torch.equal(ours["prompt_embeddings"], pt["prompt_embeddings"])
    notes = [line for line in runs["ptp_err"].splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--reg-warmup 40 >= --steps 4" in notes[0] and "--reg-warmup 2 --reg-ramp 2" in notes[0]
    assert TrainConfig(method="ptp-adv", steps=41).reg_schedule_requested is None  # it switches on at step 41
    assert TrainConfig(method="pt", steps=4).perturb == PerturbConfig()  # pt is never touched


def test_ptp_trainer_refuses_a_warmup_as_long_as_max_steps(tiny_dirs, tmp_path):
    import peft
    import transformers

    from ptp_core.hf import PTPTrainer

    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"], num_labels=2)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dirs["bert"])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=3)
    trainer = PTPTrainer(model=model, args=args, processing_class=tokenizer, method="ptp-rn")
    with pytest.raises(ValueError, match=r"reg_warmup 40 >= max_steps 3: the regularizer never switches on"):
        trainer.train()


def test_a_collapsed_run_says_so_in_one_line(runs):
    warnings = [line for line in runs["ptp_err"].splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "collapsed to the constant predictor" in warnings[0] and "try" in warnings[0]


def test_sweep_summary_counts_collapsed_runs():
    from ptp_core.sweep import summary_markdown

    rows = [{"method": "pt", "runs": 3, "collapsed": 0}, {"method": "ptp-adv", "runs": 2, "collapsed": 1}]
    rows = [{**{k: float("nan") for k in ("test_accuracy_mean", "test_accuracy_std", "test_accuracy_min",
                                         "test_accuracy_max", "best_validation_accuracy_mean",
                                         "best_validation_accuracy_std", "validation_curve_seed_std_mean",
                                         "validation_curve_seed_std_final")}, **r} for r in rows]
    text = summary_markdown(rows, ["ptp-adv seed 1"])
    assert "| ptp-adv | 2 |" in text and "collapsed to the constant predictor |" in text.splitlines()[0]
    assert "1 of 5 runs: ptp-adv seed 1." in text
    assert "0 of 5 runs." in summary_markdown([{**rows[0]}, {**rows[1], "collapsed": 0}])


def test_the_progress_bar_shows_best_only_after_a_validation(runs):
    assert "best=-1" not in runs["bar"] and "best=" in runs["bar"]


def test_ptp_json_and_adapter_config_record_what_applied(runs, tiny_dirs, tiny_batch_texts):
    """No perturb block or label words for a pt classifier run; adapter_config's init is ptp.json's in PEFT's
    enum, and PEFT loads the checkpoint with the same logits as ours."""
    import transformers
    from peft import PeftModel, PromptTuningInit

    from ptp_core.checkpoint import load_checkpoint

    meta = json.loads((runs["pt"] / "ptp.json").read_text())
    assert "perturb" not in meta and "label_words" not in meta and "reg_schedule_requested" not in meta
    assert meta["prompt_init"] == "vocab"
    config = json.loads((runs["pt"] / "adapter_config.json").read_text())
    assert PromptTuningInit(config["prompt_tuning_init"]) is PromptTuningInit.SAMPLE_VOCAB
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, runs["pt"]).eval()
    assert peft_model.peft_config["default"].prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB
    ours = load_checkpoint(runs["pt"]).build_model("cpu")
    text = tiny_batch_texts[0][0]
    with torch.no_grad():
        theirs = peft_model(**ours.tokenizer(text, return_tensors="pt")).logits[0]
    torch.testing.assert_close(theirs, ours.predict([text])[0], rtol=1e-4, atol=1e-5)
    from ptp_core.checkpoint import adapter_config

    text_init = adapter_config({"prompt_init": "label_words", "label_words": ["bad", "good"], "model": "m"},
                               {"prompt": torch.zeros(2, 4)})
    assert (text_init["prompt_tuning_init"], text_init["prompt_tuning_init_text"]) == ("TEXT", "bad good")
    assert ours.predict([text]).shape == (1, 2)


@pytest.mark.parametrize("module", ["ptp_core.train", "ptp_core.evaluate", "ptp_core.sweep", "landscape.cli.plot",
                                    "landscape.cli.grid", "landscape.cli.connect", "landscape.cli.demo"])
def test_help_shows_each_default_once(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "--help" in text  # the shared formatter renders every command's help
    if module.startswith("ptp_core"):  # landscape's flags write their own defaults into their help strings
        assert "(default: None)" not in text and "--progress, --no-progress" in text
        assert not re.search(r"default[^()]*\) \(default:", text), text  # one default per flag
        assert "--device DEVICE (default: auto)" in text
    if module == "ptp_core.train":
        assert "--steps STEPS (default: 300)" in text and "--reg-warmup REG_WARMUP" in text


def test_evaluate_takes_the_shared_progress_flag(runs, capsys):
    from ptp_core.evaluate import main as evaluate_main

    result = evaluate_main([str(runs["pt"]), "--no-progress", "--device", "cpu", "--dtype", "float32",
                            "--examples", "8"])
    meta = json.loads((runs["pt"] / "ptp.json").read_text())["metrics"]
    assert result["loss"] == pytest.approx(meta["test_loss"], rel=1e-5)  # the same 8 test examples


def test_typos_get_the_nearest_name(tiny_dirs, toy_csv, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert "did you mean 'ptp-adv'?" in _refused(train_main, [*out, "--method", "ptp_adv"], capsys)
    assert "did you mean 'classifier'?" in _refused(train_main, [*out, "--head", "clasifier"], capsys)
    assert "did you mean 'minilm'" in _refused(train_main, [*out, "--model", "minlm", "--task", toy_csv], capsys)
    assert "did you mean 'rotten_tomatoes'?" in _refused(train_main, [*out, "--task", "rotten_tomato"], capsys)
    assert "did you mean 'super_glue/rte'?" in _refused(train_main, [*out, "--task", "super_glue/rtee"], capsys)
    from ptp_core.sweep import main as sweep_main
    assert "did you mean 'ptp-rn'?" in _refused(sweep_main, [*out, "--methods", "pt,ptp_rn"], capsys)
    assert not (tmp_path / "x").exists()


def test_errors_name_the_problem_and_the_mend(tiny_dirs, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    err = _refused(train_main, ["--out", str(notes), "--model", tiny_dirs["bert"]], capsys)
    assert "holds notes.txt, not a run" in err and "previous run's" in err
    small = tmp_path / "four.csv"
    small.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(4)))
    err = _refused(train_main, ["--out", str(tmp_path / "y"), "--model", tiny_dirs["bert"], "--task", str(small)],
                   capsys)
    assert str(small) in err and "80/10/10" in err and "split column" in err and "no validation examples" in err
    assert not (tmp_path / "y").exists() and [p.name for p in notes.iterdir()] == ["notes.txt"]


def test_formats_md_names_every_key_train_writes(runs):
    """Each key of metrics.jsonl rows and of ptp.json's log rows is documented in docs/formats.md."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()
    keys = {k for run in ("pt", "ptp") for row in _log(runs[run]) for k in row}
    keys |= {k for row in json.loads((runs["ptp"] / "ptp.json").read_text())["log"] for k in row}
    assert {"perturbed_loss", "reg_weight", "validation_loss", "clean_loss_mean"} <= keys
    assert not [k for k in sorted(keys) if f"`{k}`" not in doc]


def test_chunk_help_names_its_default_once(capsys):
    from landscape.cli.plot import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: from free memory)" in text and "(default: None)" not in text
