"""--report-to tensorboard: the event file, read back by TensorBoard's own reader, holds metrics.jsonl's numbers."""
import json

import numpy as np
import pytest

from ptp_core.checkpoint import load_checkpoint
from ptp_core.training.perturb import PerturbConfig
from ptp_core.training.reporting import TrainingReport
from ptp_core.train import TrainConfig, main, train


def _config(tiny_dirs, toy_csv, out, **kw):
    return TrainConfig(**{**dict(model=tiny_dirs["bert"], task=toy_csv, head="classifier", method="ptp-adv",
                                 out=str(out), steps=6, batch_size=16, prompt_length=4, eval_every=3, progress=False,
                                 dtype="float32", report_to="tensorboard"), **kw})


def test_event_file_holds_the_metrics_log_step_by_step(tiny_dirs, toy_csv, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # two clean steps first: rows with and without the PTP term
    out = train(_config(tiny_dirs, toy_csv, tmp_path / "run", perturb=PerturbConfig(reg_warmup=2, reg_ramp=2)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {}  # tag -> [(step, value)] in logging order
    for row in rows:
        for key, value in row.items():
            if key != "step":
                expected.setdefault(key, []).append((row["step"], float(np.float32(value))))  # TensorBoard: float32
    assert {"loss", "clean_loss", "perturbed_loss", "reg_weight", "lr", "validation_accuracy"} <= set(expected)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == points, tag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the staging folder went into the run
    probe = tmp_path / "probe"
    probe.mkdir()  # the mode the umask gives a new folder
    assert (out / "tensorboard").stat().st_mode == probe.stat().st_mode
    assert {f.stat().st_mode for f in (out / "tensorboard").iterdir()} == {(out / "metrics.jsonl").stat().st_mode}
    assert load_checkpoint(out).meta["report_to"] == "tensorboard"


def test_a_failed_run_leaves_no_folder(tiny_dirs, toy_csv, tmp_path, monkeypatch):
    import ptp_core.training.loop as loop

    real = loop.step_gradients

    def failing(model, params, batch, config, generator, step):
        if step == 4:  # after rows have reached the event file
            raise RuntimeError("out of memory")
        return real(model, params, batch, config, generator, step)

    monkeypatch.setattr(loop, "step_gradients", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(_config(tiny_dirs, toy_csv, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []


def test_unknown_report_to_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "x"), "--report-to", "wandb"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--report-to" in error and "tensorboard" in error
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="use one of none, tensorboard"):
        TrainingReport("wandb", tmp_path / "x")
