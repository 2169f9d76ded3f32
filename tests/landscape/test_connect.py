"""landscape.connect: both paths end at the checkpoints, the midpoint curve is the line, a trained curve goes around
a ridge that the line crosses, and the command writes its files or refuses bad input in one line."""
import json
import shutil

import numpy as np
import pytest
import torch

from landscape.cli.connect import main
from landscape.connect.curve import bezier, line, midpoint, path_barrier, path_losses, train_control_point
from landscape.connect.run import ConnectConfig, connect_params, model_scorer
from landscape.draw import analysis
from ptp_core.checkpoint import load_checkpoint
from ptp_core.cli import run
from ptp_core.train import TrainConfig, train

from conftest import toy_rows


@pytest.fixture(scope="module")
def two_checkpoints(tiny_dirs, toy_csv, tmp_path_factory):
    """Two tiny BERT prompts (with their own classifier heads) trained from different seeds."""
    root = tmp_path_factory.mktemp("connect")
    for seed in (0, 1):
        train(TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", out=str(root / f"pt{seed}"),
                          steps=4, batch_size=16, prompt_length=3, eval_every=4, dtype="float32", progress=False,
                          seed=seed))
    return str(root / "pt0"), str(root / "pt1")


@pytest.fixture(scope="module")
def loaded(two_checkpoints):
    a, b = (load_checkpoint(p) for p in two_checkpoints)
    model = a.build_model("cpu")
    rows = toy_rows(8, seed=11)
    batch = model.encode([r["text"] for r in rows], [int(r["label"] == "positive") for r in rows])
    return model, a.params, b.params, batch


def test_both_paths_end_at_each_checkpoints_own_loss(loaded):
    model, a, b, batch = loaded
    c = {k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in midpoint(a, b).items()}
    score = model_scorer(model, [batch])
    own = [model.loss(p, batch).mean().item() for p in (a, b)]  # the plain loss, unstacked
    ends = score(bezier(torch.tensor([0.0, 1.0]), a, c, b))[0]  # the curve's own ends, not the line's copy
    np.testing.assert_allclose(ends.numpy(), own, rtol=1e-6)
    paths = path_losses(score, a, b, c, torch.linspace(0, 1, 5), chunk=3)
    for key in ("linear_loss", "curve_loss"):
        np.testing.assert_allclose(paths[key][[0, -1]], own, rtol=1e-6)
    assert abs(paths["curve_loss"][2] - paths["linear_loss"][2]) > 1e-4  # a control point off the line bends it


def test_midpoint_control_makes_the_curve_the_line(loaded):
    model, a, b, batch = loaded
    ts = torch.linspace(0, 1, 11)
    curve, straight = bezier(ts, a, midpoint(a, b), b), line(ts, a, b)
    for name in a:
        assert curve[name].shape == (11, *a[name].shape)
        torch.testing.assert_close(curve[name], straight[name], rtol=1e-6, atol=1e-6)
    paths = path_losses(model_scorer(model, [batch]), a, b, midpoint(a, b), ts)
    np.testing.assert_allclose(paths["curve_loss"], paths["linear_loss"], rtol=1e-5)
    np.testing.assert_allclose(paths["curve_accuracy"], paths["linear_accuracy"])


def ring(stacked, step=0):
    """A circular valley x² + y² = 1 tilted towards y > 0: minima near (±1, 0), a ridge of height 1 at the origin."""
    x, y = stacked["w"][..., 0], stacked["w"][..., 1]  # (G,)
    return ((x ** 2 + y ** 2 - 1) ** 2 - 0.1 * y).unsqueeze(-1)  # (G, 1): one "example"


def test_trained_curve_goes_around_the_ridge_the_line_crosses():
    a, b = {"w": torch.tensor([-1.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}
    control, history = train_control_point(ring, a, b, steps=150, lr=0.05, seed=0, progress=False)
    again, _ = train_control_point(ring, a, b, steps=150, lr=0.05, seed=0, progress=False)
    assert torch.equal(control["w"], again["w"])  # the seed fixes every t drawn
    assert len(history) == 150 and np.mean(history[-20:]) < np.mean(history[:20]) - 0.3
    ts = np.linspace(0, 1, 21)
    paths = path_losses(lambda p: (ring(p)[:, 0], torch.zeros(len(p["w"]))), a, b, control, torch.from_numpy(ts))
    straight, curved = path_barrier(ts, paths["linear_loss"]), path_barrier(ts, paths["curve_loss"])
    assert straight.barrier == pytest.approx(1.0) and straight.t_at_max == 0.5  # the line crosses the origin
    assert curved.barrier < 0.1 and control["w"][1] > 1.0  # the curve bends up into the valley


def test_cli_writes_result_curve_and_figure(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "connect"
    argv = [*two_checkpoints, "--out", str(out), "--steps", "3", "--points", "5", "--examples", "8",
            "--batch-size", "4", "--device", "cpu", "--no-progress"]
    run(main, argv)
    assert "curve barrier" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["connect.json", "connect.pdf", "connect.png", "curve.safetensors"]
    data = json.loads((out / "connect.json").read_text())
    a, b = (load_checkpoint(p) for p in two_checkpoints)
    assert data["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(data["curve_loss"]) == len(data["linear_accuracy"]) == 5
    assert data["linear_loss"][0] == data["curve_loss"][0] and data["linear_loss"][-1] == data["curve_loss"][-1]
    assert (data["hash_a"], data["hash_b"]) == (a.content_hash(), b.content_hash())
    assert data["config"]["seed"] == 0 and data["eval_dtype"] == "float32" and data["examples"] == 8
    assert data["linear_barrier"] >= 0 and 0 <= data["curve_barrier_t"] <= 1 and len(data["train_loss"]) == 3
    from safetensors.torch import load_file

    control = load_file(out / "curve.safetensors")
    assert {k: v.shape for k, v in control.items()} == {k: v.shape for k, v in a.params.items()}
    for name in a.params:  # --params prompt: only the prompt bends, the heads follow the line
        if name != "prompt":
            torch.testing.assert_close(control[name], (a.params[name] + b.params[name]) / 2)
    assert not torch.equal(control["prompt"], (a.params["prompt"] + b.params["prompt"]) / 2)
    texts = [t.get_text() for t in analysis.connectivity(data).legends[0].get_texts()]
    assert f"Bezier curve, barrier {data['curve_barrier']:.3g}" in texts and "pt seed 1" in texts
    run(main, argv + ["--overwrite"])  # replaces the files in place
    with pytest.raises(SystemExit):
        run(main, argv)
    assert "--overwrite" in capsys.readouterr().err


def test_cli_refuses_bad_input_in_one_line_and_leaves_no_folder(two_checkpoints, tiny_dirs, tmp_path, capsys):
    other = tmp_path / "gpt2-run"
    shutil.copytree(two_checkpoints[1], other)
    meta = json.loads((other / "ptp.json").read_text())
    (other / "ptp.json").write_text(json.dumps({**meta, "model": tiny_dirs["gpt2"]}))
    first, second = two_checkpoints
    cases = {
        "missing": ([first, str(tmp_path / "nope")], "does not exist"),
        "other model": ([first, str(other)], "their model differs"),
        "same prompt": ([first, first], "same prompt"),
        "points": ([first, second, "--points", "2"], "--points must be at least 3"),
        "params": ([first, second, "--params", "head"], "invalid choice"),
        "lr": ([first, second, "--lr", "nan"], "--lr must be a finite number"),
        "steps": ([first, second, "--steps", "0"], "--steps must be > 0"),
    }
    for name, (args, message) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run(main, [*args, "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-run"]  # no folder, no staging left behind


def test_params_all_bends_the_head_too(loaded):
    from ptp_core.tasks.task import Split

    model, a, b, _ = loaded
    rows = toy_rows(16, seed=12)
    split = Split([r["text"] for r in rows], [int(r["label"] == "positive") for r in rows])
    config = ConnectConfig(steps=2, points=3, examples=8, batch_size=8, param_scope="all", dtype="float32", lr=0.1)
    result = connect_params(model, a, b, split, split, config, progress=False)
    middle = midpoint(a, b)
    assert all(not torch.equal(result.control[k], middle[k]) for k in a)  # every tensor got its own control
    assert result.info["examples"] == 8 and len(result.train_loss) == 2 and result.ts == [0.0, 0.5, 1.0]


def test_config_validates_and_auto_evaluates_in_float32():
    assert ConnectConfig().dtypes("cpu")[1] == "float32"
    assert ConnectConfig(dtype="bfloat16").dtypes("cpu") == ("bfloat16", "bfloat16")
    with pytest.raises(ValueError, match="--split"):
        ConnectConfig(split="dev")
