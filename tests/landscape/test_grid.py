"""Grid evaluation: batched == per-point references, exact centre, resume, torchrun sharding, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import landscape.grid.driver as grid
from conftest import toy_rows
from landscape.grid.directions import input_directions, prompt_directions
from landscape.grid.driver import compute_surface, surface_for_params
from landscape.grid.spec import SurfaceSpec, grid_axis
from ptp_core.model.encoding import batch_split
from landscape.surface import load_surface
from ptp_core.checkpoint import load_checkpoint, save_checkpoint
from ptp_core.tasks.task import Split
from ptp_core.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[2]


def _examples(n: int = 10, seed: int = 3) -> Split:
    rows = toy_rows(n, seed)
    return Split([r["text"] for r in rows], [int(r["label"] == "positive") for r in rows])


def _spec(**kw) -> SurfaceSpec:
    return SurfaceSpec(**{"grid": "5x7", "span": 0.5, "examples": 10, "batch_size": 4, "dtype": "float32", **kw})


def _checkpoint(tmp_path: Path, model_dir: str, task: str, name: str = "ckpt", prompt_length: int = 4, seed: int = 0,
                trajectory: bool = True) -> Path:
    from conftest import build_model

    model = build_model(model_dir, "classifier", seed=seed, prompt_length=prompt_length)
    meta = {"model": model_dir, "head": "classifier", "label_words": ["negative", "positive"], "num_labels": 2,
            "label_names": ["negative", "positive"], "task": task, "template": "{text}", "method": "pt", "seed": seed}
    prompts = model.params["prompt"] + 0.1 * torch.randn(5, *model.params["prompt"].shape)  # (S, P, D)
    return save_checkpoint(tmp_path / name, model.params, meta,
                           {"prompts": prompts, "steps": torch.arange(5)} if trajectory else None)


def test_grid_axis_contains_exact_zero():
    for count in (1, 5, 21, 51):
        axis = grid_axis(count, 0.7)
        assert np.any(axis == 0.0) and np.all(np.diff(axis) > 0)
        assert count == 1 or (axis.min() == -0.7 and axis.max() == 0.7)
    assert SurfaceSpec(grid="21").shape == (21, 21) and SurfaceSpec(grid="21x31").shape == (21, 31)
    assert SurfaceSpec(grid="21x1").shape == (21, 1)


@pytest.mark.parametrize("fixture,params", [("tiny_gpt2_model", "prompt"), ("tiny_bert_model", "all"),
                                            ("tiny_roberta_model", "all"), ("tiny_t5_model", "prompt")])
def test_every_point_equals_a_direct_evaluation(request, fixture, params):
    """5x7 grid: each value == evaluate() of the prompt at (alphas[i], betas[j]); centre == plain loss."""
    model = request.getfixturevalue(fixture)
    examples = _examples()
    spec = _spec(param_scope=params, chunk=6)
    surface = surface_for_params(model, model.params, examples, spec, progress=False)
    assert surface.is_complete and surface.loss.shape == (5, 7)
    batches, _ = batch_split(model, examples, spec.batch_size, by_length=True)
    names = list(model.params) if params == "all" else ["prompt"]
    directions = prompt_directions(model, model.params, batches, "gradient", "filter", 0, names)
    np.testing.assert_array_equal(surface.direction_1, directions.d1["prompt"].numpy())
    plain = model.encode(examples.texts, examples.labels)
    for i, a in enumerate(surface.alphas):
        for j, b in enumerate(surface.betas):
            point = {k: v[0] for k, v in directions.at(torch.tensor([a]), torch.tensor([b])).items() if k in names}
            result = evaluate(model, {**model.params, **point}, [plain])
            assert abs(surface.loss[i, j] - result["loss"]) < 1e-5
            assert surface.accuracy[i, j] == pytest.approx(result["accuracy"])
    center = evaluate(model, model.params, [plain])
    assert abs(surface.center_loss - center["loss"]) < 1e-6 and surface.center_accuracy == center["accuracy"]


@pytest.mark.parametrize("fixture", ["tiny_bert_model", "tiny_gpt2_model", "tiny_t5_model"])
@pytest.mark.parametrize("space", ["prompt", "input"])
def test_batched_equals_per_point_loop(fixture, space, request):
    model = request.getfixturevalue(fixture)
    batched = surface_for_params(model, model.params, _examples(), _spec(space=space), progress=False)
    loop = surface_for_params(model, model.params, _examples(), _spec(space=space, chunk=1), progress=False)
    np.testing.assert_allclose(batched.loss, loop.loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.accuracy, loop.accuracy, rtol=0, atol=1e-12)


def test_input_space_points_equal_direct_perturbation(tiny_gpt2_model):
    model = tiny_gpt2_model
    examples = _examples(6)
    spec = _spec(space="input", grid="3x3", batch_size=6, seed=2)
    surface = surface_for_params(model, model.params, examples, spec, progress=False)
    assert surface.direction_1 is None and surface.spec["space"] == "input"
    batches, order = batch_split(model, examples, 6, by_length=True)
    (d1, d2), = input_directions(model, model.params, batches, "filter", 2, order)
    with torch.no_grad():
        clean = model.loss(model.params, model.encode(examples.texts, examples.labels)).mean()
        assert abs(surface.center_loss - float(clean)) < 1e-6
        a, b = surface.alphas[0], surface.betas[2]
        moved = model.loss(model.params, batches[0], input_perturbation=float(a) * d1 + float(b) * d2).mean()
    assert abs(surface.loss[0, 2] - float(moved)) < 1e-5


@pytest.mark.parametrize("fixture", ["tiny_bert_model", "tiny_gpt2_model", "tiny_t5_model"])
def test_interrupted_run_resumes_bitwise_and_skips_finished_points(fixture, request, tmp_path, monkeypatch):
    model = request.getfixturevalue(fixture)
    spec = _spec(chunk=4)
    reference = surface_for_params(model, model.params, _examples(), spec, tmp_path / "full", progress=False)
    real, calls = grid.evaluate_chunk, []

    def interrupted(evaluate, alphas, betas, cap=None):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(alphas))
        return real(evaluate, alphas, betas, cap)

    monkeypatch.setattr(grid, "evaluate_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        surface_for_params(model, model.params, _examples(), spec, tmp_path / "part", progress=False, save_every=0)
    partial = load_surface(tmp_path / "part")
    assert partial.points_done == sum(calls) == 12 and not partial.is_complete

    def counting(evaluate, alphas, betas, cap=None):
        calls.append(len(alphas))
        return real(evaluate, alphas, betas, cap)

    calls.clear()
    monkeypatch.setattr(grid, "evaluate_chunk", counting)
    resumed = surface_for_params(model, model.params, _examples(), spec, tmp_path / "part", progress=False)
    assert sum(calls) == 35 - 12  # no finished point is recomputed
    for key in ("loss", "accuracy", "direction_1", "direction_2", "alphas", "betas"):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(reference, key))
        np.testing.assert_array_equal(getattr(load_surface(tmp_path / "part"), key), getattr(reference, key))
    calls.clear()
    again = surface_for_params(model, model.params, _examples(), spec, tmp_path / "part", progress=False)
    assert calls == [] and again.points_done == 35


def test_changed_spec_is_refused_unless_overwrite(tiny_bert_model, tmp_path):
    model = tiny_bert_model
    surface_for_params(model, model.params, _examples(), _spec(grid="3x3"), tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        surface_for_params(model, model.params, _examples(), _spec(grid="3x3", seed=1), tmp_path / "s", progress=False)
    surface = surface_for_params(model, model.params, _examples(), _spec(grid="3x3", seed=1), tmp_path / "s",
                                 progress=False, overwrite=True)
    assert load_surface(tmp_path / "s").spec["seed"] == 1 and surface.is_complete


@pytest.mark.parametrize("bad,message", [
    (dict(grid="0"), "grid '0' is not a positive size; write e.g. --grid 21"),
    (dict(grid="21x"), "grid '21x' is not a positive size"), (dict(grid="abc"), "grid 'abc' is not a positive size"),
    (dict(grid="3x0"), "grid '3x0' is not a positive size"), (dict(span=0), "span must be > 0, got 0"),
    (dict(span=-1.0), "span must be > 0, got -1.0"), (dict(examples=0), "examples must be > 0, got 0"),
    (dict(norm="l2"), "unknown norm 'l2'; use one of filter, layer, none"),
    (dict(space="input", directions="pca"), "input space uses per-example gradient directions, not 'pca'")])
def test_bad_spec_raises_one_clear_line(bad, message):
    with pytest.raises(ValueError) as error:
        SurfaceSpec(**bad)
    assert "\n" not in str(error.value) and str(error.value).startswith(message)


def test_bad_checkpoint_combinations(tiny_dirs, toy_csv, tmp_path):
    a = load_checkpoint(_checkpoint(tmp_path, tiny_dirs["bert"], toy_csv, "a", trajectory=False))
    short = load_checkpoint(_checkpoint(tmp_path, tiny_dirs["bert"], toy_csv, "short", prompt_length=3))
    other = load_checkpoint(_checkpoint(tmp_path, tiny_dirs["llama"], toy_csv, "llama"))
    for pair in ([a, short], [a, other]):
        with pytest.raises(ValueError, match="different models or prompt shapes"):
            compute_surface(pair, SurfaceSpec(directions="interp", grid="5x1", examples=4), progress=False)
    with pytest.raises(ValueError, match="trajectory"):
        compute_surface(a, SurfaceSpec(directions="pca", examples=4), progress=False)
    with pytest.raises(ValueError, match="use --grid 5x1"):
        compute_surface([a, short], SurfaceSpec(directions="interp", grid="5", examples=4), progress=False)


def test_cli_bad_input_one_line_exit_2(tiny_dirs, toy_csv, tmp_path):
    checkpoint = _checkpoint(tmp_path, tiny_dirs["bert"], toy_csv)
    result = subprocess.run([sys.executable, "-m", "landscape.grid", str(checkpoint), "--out", str(tmp_path / "s"),
                             "--grid", "0"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s.npz").exists()


def _env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT)}


def test_torchrun_two_processes_equal_one(tiny_dirs, toy_csv, tmp_path):
    checkpoint = _checkpoint(tmp_path, tiny_dirs["bert"], toy_csv)
    flags = ["--grid", "5x5", "--span", "0.5", "--examples", "8", "--batch-size", "4", "--chunk", "3", "--no-progress",
             "--device", "cpu", "--dtype", "float32"]
    torchrun = Path(sys.executable).with_name("torchrun")
    runs = {"one": [sys.executable, "-m", "landscape.grid"],
            "two": [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "landscape.grid"]}
    for name, command in runs.items():
        result = subprocess.run(command + [str(checkpoint), "--out", str(tmp_path / name)] + flags,
                                capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=240)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = load_surface(tmp_path / "one"), load_surface(tmp_path / "two")
    assert one.is_complete and two.is_complete
    for key in ("loss", "accuracy", "direction_1", "direction_2"):
        np.testing.assert_array_equal(getattr(one, key), getattr(two, key))
    from ptp_core.tasks.load import load_task

    ckpt = load_checkpoint(checkpoint)
    center = evaluate(ckpt.build_model(), ckpt.params, load_task(toy_csv).splits["test"].head(8))
    assert abs(one.center_loss - center["loss"]) < 1e-6


def test_auto_dtype_resolves_by_hardware_and_is_recorded(tiny_bert_model):
    from ptp_core.model.backbones import native_bf16, resolve_dtype

    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
    assert resolve_dtype("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    model = tiny_bert_model
    surface = surface_for_params(model, model.params, _examples(), _spec(grid="3", dtype="auto"), progress=False)
    assert surface.spec["dtype"] == resolve_dtype("auto", "cpu")  # the dtype actually used, never "auto"


def test_bfloat16_surface_stays_close_to_float32(tiny_bert_model):
    model = tiny_bert_model
    exact = surface_for_params(model, model.params, _examples(), _spec(grid="3"), progress=False)
    fast = surface_for_params(model, model.params, _examples(), _spec(grid="3", dtype="bfloat16"), progress=False)
    assert fast.spec["dtype"] == "bfloat16" and exact.spec["dtype"] == "float32"
    deviation = np.abs(fast.loss - exact.loss).max()
    assert 0 < deviation < 0.02 * np.abs(exact.loss).max()  # bf16 keeps 8 bits of mantissa; the CE is float32


def test_out_of_memory_halves_once_and_keeps_the_cap(monkeypatch):
    """CUDA OOM back-off, simulated on CPU: a forward of more than 2 points fails; the cap stays at 2 afterwards."""
    sizes = []

    def evaluate(alphas, betas):
        sizes.append(len(alphas))
        if len(alphas) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return (alphas + betas).numpy(), (alphas - betas).numpy()

    cap = grid.MemoryCap(8)
    alphas, betas = torch.arange(8.0), torch.arange(8.0) / 10
    loss, accuracy = grid.evaluate_chunk(evaluate, alphas, betas, cap)
    np.testing.assert_allclose(loss, (alphas + betas).numpy()) and np.testing.assert_allclose(accuracy, 0.9 * alphas)
    assert cap.points == 2 and sizes == [8, 4, 2, 2, 2, 2]
    sizes.clear()
    grid.evaluate_chunk(evaluate, alphas[:5], betas[:5], cap)  # the next chunk starts at the kept cap
    assert sizes == [2, 2, 1]
    with pytest.raises(ValueError, match="one grid point does not fit"):
        grid.evaluate_chunk(lambda a, b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")), alphas[:2],
                             betas[:2], grid.MemoryCap(2))


def test_hessian_work_refuses_attention_without_second_derivative(tiny_dirs):
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    model = PromptModel(load_backbone(tiny_dirs["bert"], "classifier", 2, "cpu"), "classifier", 2)
    model.check_double_backward()  # sdpa: fine
    model.backbone.config._attn_implementation = "flash_attention_2"  # as a flash-attention load would record
    with pytest.raises(ValueError, match="no second derivative"):
        model.check_double_backward()


def test_resume_with_params_all_reuses_the_saved_head_directions(tiny_bert_model, tmp_path, monkeypatch):
    model, spec = tiny_bert_model, _spec(param_scope="all", chunk=5, directions="random")
    reference = surface_for_params(model, model.params, _examples(), spec, tmp_path / "s", progress=False)
    assert set(reference.head_directions) == {f"direction_{d}.{k}" for d in (1, 2) for k in model.params if k != "prompt"}
    saved = load_surface(tmp_path / "s")
    for key, value in reference.head_directions.items():
        np.testing.assert_array_equal(saved.head_directions[key], value)
    saved.loss[2:, :] = np.nan  # an interrupted run: resume must evaluate on the stored plane, not recompute it
    from landscape.surface import save_surface

    save_surface(saved, tmp_path / "s")
    monkeypatch.setattr(grid, "prompt_directions", lambda *a, **k: pytest.fail("directions recomputed on resume"))
    resumed = surface_for_params(model, model.params, _examples(), spec, tmp_path / "s", progress=False)
    np.testing.assert_array_equal(resumed.loss, reference.loss)


def test_other_ranks_take_rank_zeros_directions(tiny_bert_model, monkeypatch):
    """Rank 1 computes no directions; it evaluates on exactly what rank 0 sent."""
    model = tiny_bert_model
    batches, _ = batch_split(model, _examples(), 4, by_length=True)
    sent = prompt_directions(model, model.params, batches, "random", "filter", seed=7)
    shard = grid.Shard(rank=1, world=2, gather=lambda item: [grid.replace(sent, center={}), item])
    monkeypatch.setattr(grid, "prompt_directions", lambda *a, **k: pytest.fail("rank 1 computed directions"))
    got = grid._shared_plane(model, model.params, batches, _spec(), ["prompt"], (), None, shard)
    torch.testing.assert_close(got.d1["prompt"], sent.d1["prompt"], rtol=0, atol=0)
    torch.testing.assert_close(got.center["prompt"], model.params["prompt"].float(), rtol=0, atol=0)
