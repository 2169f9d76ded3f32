"""Sweep: resumes after an interruption, summary statistics match numpy, runs spread over torchrun ranks."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ptp_core.sweep import run_dir, run_sweep, summarize_runs, write_summary
from ptp_core.train import TrainConfig

FLAGS = dict(head="classifier", steps=4, batch_size=16, prompt_length=3, eval_every=2, eval_examples=8,
             snapshot_every=2, progress=False)


def test_interrupted_sweep_resumes_and_summary_matches_numpy(tiny_dirs, toy_csv, tmp_path):
    base = TrainConfig(model=tiny_dirs["bert"], task=toy_csv, **FLAGS)
    methods, seeds = ["pt", "ptp-rn"], [0, 1, 2]
    first = run_sweep(base, methods, seeds, tmp_path)
    assert [d["status"] for d in first] == ["trained"] * 6
    mtimes = {(m, s): (run_dir(tmp_path, m, s) / "ptp.json").stat().st_mtime_ns for m in methods for s in seeds}
    # interrupt: one run deleted, one cut off before its ptp.json was written
    for path in (run_dir(tmp_path, "ptp-rn", 1), run_dir(tmp_path, "pt", 2)):
        for f in path.iterdir():
            f.unlink()
    (run_dir(tmp_path, "pt", 2) / "adapter_model.safetensors").write_bytes(b"partial")
    second = run_sweep(base, methods, seeds, tmp_path)
    trained = {(d["method"], d["seed"]) for d in second if d["status"] == "trained"}
    assert trained == {("ptp-rn", 1), ("pt", 2)}
    for key, mtime in mtimes.items():
        if key not in trained:
            assert (run_dir(tmp_path, *key) / "ptp.json").stat().st_mtime_ns == mtime

    rows = summarize_runs(tmp_path, methods, seeds)
    write_summary(tmp_path, rows)
    for row in rows:
        metas = [json.loads((run_dir(tmp_path, row["method"], s) / "ptp.json").read_text()) for s in seeds]
        test = np.array([m["metrics"]["test_accuracy"] for m in metas])
        assert row["runs"] == 3 and row["test_accuracy_mean"] == pytest.approx(test.mean())
        assert row["test_accuracy_std"] == pytest.approx(test.std(ddof=1))
        assert (row["test_accuracy_min"], row["test_accuracy_max"]) == (test.min(), test.max())
        curves = np.array([[r["validation_accuracy"] for r in m["log"] if "validation_accuracy" in r] for m in metas])
        assert curves.shape == (3, 2)  # steps 2 and 4
        assert row["validation_curve_seed_std_mean"] == pytest.approx(curves.std(axis=0, ddof=1).mean())
        assert row["validation_curve_seed_std_final"] == pytest.approx(curves[:, -1].std(ddof=1))
    with open(tmp_path / "summary.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == methods
    assert "| ptp-rn | 3 |" in (tmp_path / "summary.md").read_text()


def test_torchrun_spreads_runs_over_two_ranks(tiny_dirs, toy_csv, tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ptp_core.sweep", "--methods", "pt,ptp-adv", "--seeds", "0,1", "--out", str(out),
               "--model", tiny_dirs["bert"], "--task", toy_csv, "--head", "classifier", "--steps", "2",
               "--eval-every", "2", "--eval-examples", "8", "--prompt-len", "3", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the two ranks share one pipe, so their lines can interleave: find the records, not the lines
    lines = re.findall(r"rank \d: [\w-]+ seed \d: trained \([^)]*\)", result.stdout)
    assert sorted(lines) == sorted([f"rank 0: pt seed 0: trained ({out}/pt/seed0)",
                                    f"rank 0: pt seed 1: trained ({out}/pt/seed1)",
                                    f"rank 1: ptp-adv seed 0: trained ({out}/ptp-adv/seed0)",
                                    f"rank 1: ptp-adv seed 1: trained ({out}/ptp-adv/seed1)"])
    assert (out / "summary.csv").exists() and "| ptp-adv | 2 |" in (out / "summary.md").read_text()


def test_sweep_bad_methods_get_one_line(tiny_dirs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ptp_core.sweep", "--methods", "pt,sgd", "--out", str(tmp_path),
                             "--model", tiny_dirs["bert"]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--methods" in result.stderr


def test_collapse_flag_on_synthetic_logs(tmp_path):
    from ptp_core.io import write_json
    from ptp_core.sweep import collapsed_runs, summary_markdown
    from ptp_core.training.evaluation import collapsed, label_prior_entropy

    prior = label_prior_entropy([0] * 60 + [1] * 40, 2)
    assert prior == pytest.approx(-(0.6 * np.log(0.6) + 0.4 * np.log(0.4)))
    stuck = [{"step": 50, "validation_loss": 0.69}, {"step": 100, "validation_loss": prior + 0.004}]
    learned = [{"step": 50, "validation_loss": prior}, {"step": 100, "validation_loss": prior - 0.2}]
    assert collapsed(stuck, prior) and not collapsed(learned, prior) and not collapsed([], prior)
    for seed, log in enumerate((stuck, learned, stuck)):
        path = run_dir(tmp_path, "ptp-adv", seed)
        path.mkdir(parents=True)
        write_json(path / "ptp.json", {"status": "complete", "log": log, "metrics": {
            "test_accuracy": 0.5, "best_validation_accuracy": 0.5, "collapsed": collapsed(log, prior)}})
    rows = summarize_runs(tmp_path, ["ptp-adv"], [0, 1, 2])
    assert rows[0]["collapsed"] == 2
    names = collapsed_runs(tmp_path, ["ptp-adv"], [0, 1, 2])
    assert names == ["ptp-adv seed 0", "ptp-adv seed 2"]
    assert "collapsed to the constant predictor" in summary_markdown(rows, names)
