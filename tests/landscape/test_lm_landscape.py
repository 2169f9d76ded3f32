"""--head lm (generation) checkpoints through landscape: grid points equal PEFT's labels loss in prompt and input space,
the stacked and chunked grid equals a per-point loop, Hessian metrics against a dense Hessian of PEFT's loss, connect,
the refusal to mix task kinds, and figures and tables that name the token-level cross-entropy."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.compare import compare, from_surfaces
from landscape.connect.run import ConnectConfig, check_pair, connect_pair
from landscape.draw import analysis
from landscape.draw.comparison import PlotConfig, figures
from landscape.draw.report import comparison_html
from landscape.draw.tables import LM_NOTE, write_metrics_md
from landscape.grid.directions import input_directions
from landscape.grid.driver import compute_surface
from landscape.grid.spec import SurfaceSpec
from landscape.measures.calibration import expected_calibration_error
from landscape.measures.row import MetricsConfig, measure
from landscape.surface import TOKEN_ACCURACY, TOKEN_LOSS, Surface, load_surface, save_surface
from ptp_core.checkpoint import load_checkpoint
from ptp_core.model.encoding import batch_split
from ptp_core.train import TrainConfig, train
from ptp_core.training.evaluation import evaluate

# inputs and targets of different lengths, so that a mean of batch means would miss the mean over target tokens
INPUTS = ["the movie", "a plot and the acting", "it was really", "the story", "quite a film", "the acting was",
          "and it", "the movie and the story was"]
TARGETS = ["good", "awful boring", "fun", "a dull and messy plot", "superb", "lovely moving", "bad", "great"]
PROMPT_KEY = "prompt_encoder.default.embedding.weight"  # PEFT's virtual-token table
SPEC = dict(grid="3x3", span=0.5, examples=8, batch_size=3, dtype="float32")  # batches of 3, 3, 2 examples


@pytest.fixture(scope="module")
def runs(tiny_dirs, toy_csv, tmp_path_factory) -> dict[str, Path]:
    """Two shallow --head lm prompts (seeds 0, 1) and a deep one on a JSONL generation task; on the toy
    classification task a verbalizer prompt and a --head lm prompt (its label names as targets)."""
    root = tmp_path_factory.mktemp("lm")
    task = root / "gen.jsonl"
    task.write_text("".join(json.dumps({"input": i, "target": t, "split": s}) + "\n"
                            for s in ("train", "validation", "test") for i, t in zip(INPUTS, TARGETS)))
    common = dict(model=tiny_dirs["gpt2"], steps=4, batch_size=4, prompt_length=3, eval_every=2, progress=False,
                  dtype="float32")
    lm = dict(common, task=str(task), head="lm", target_field="target", text_fields=("input",))
    out = {f"seed{seed}": train(TrainConfig(**lm, seed=seed, out=str(root / f"pt/seed{seed}"))) for seed in (0, 1)}
    out["deep"] = train(TrainConfig(**lm, prompt_type="deep", out=str(root / "deep")))
    out["verbalizer"] = train(TrainConfig(**common, task=toy_csv, head="verbalizer", out=str(root / "verbalizer")))
    out["lm_classes"] = train(TrainConfig(**common, task=toy_csv, head="lm", out=str(root / "lm_classes")))
    return out


@pytest.fixture(scope="module")
def model(runs):
    return load_checkpoint(runs["seed0"]).build_model("cpu")


@pytest.fixture(scope="module")
def split(runs):
    return load_checkpoint(runs["seed0"]).task().splits["test"]


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])


@pytest.fixture(scope="module")
def peft_model(tiny_dirs, runs):
    """PEFT's CAUSAL_LM prompt-tuning model, loaded from our checkpoint on an untouched copy of the backbone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]), runs["seed0"]).eval()


def peft_inputs(peft_model, tok, examples: list[dict], deltas: list[torch.Tensor] | None = None) -> dict:
    """PEFT's causal-LM batch, tokenized here: input, then the target after a space and eos; labels -100 on the
    input; right-padded. deltas: per example (T_i, D) added to its token embeddings (input space)."""
    ids, labels = [], []
    for example in examples:
        source = tok(example["input"]).input_ids
        target = tok(" " + example["target"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids.append(source + target)
        labels.append([-100] * len(source) + target)
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids])  # (B, T)
    embeds = peft_model.base_model.get_input_embeddings()(input_ids).detach()  # (B, T, D)
    for i, delta in enumerate(deltas or []):
        embeds[i, :len(ids[i])] += delta[:len(ids[i])]
    return {"inputs_embeds": embeds, "ids": ids,
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels])}


def peft_loss(peft_model, prompt: torch.Tensor, inputs: dict) -> torch.Tensor:
    """PEFT's labels loss (the mean over every target token of the batch) with `prompt` (P, D) as virtual tokens."""
    kwargs = {k: v for k, v in inputs.items() if k != "ids"}
    return functional_call(peft_model, {PROMPT_KEY: prompt}, (), kwargs, strict=False).loss


def _point(surface, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) of grid point (i, j) as the grid evaluates them (float32)."""
    return (torch.tensor(surface.alphas[i], dtype=torch.float32), torch.tensor(surface.betas[j], dtype=torch.float32))


def test_grid_points_equal_peft_labels_loss_in_prompt_and_input_space(runs, model, split, peft_model, tokenizer):
    checkpoint = load_checkpoint(runs["seed0"])
    prompt = checkpoint.params["prompt"]
    examples = split.head(8).texts
    surface = compute_surface(checkpoint, SurfaceSpec(**SPEC), model=model, split=split, progress=False)
    d1, d2 = (torch.from_numpy(d) for d in (surface.direction_1, surface.direction_2))
    reference = peft_inputs(peft_model, tokenizer, examples)
    for i, j in ((1, 1), (0, 2), (2, 0)):  # the centre and two corners
        a, b = _point(surface, i, j)
        assert surface.loss[i, j] == pytest.approx(peft_loss(peft_model, prompt + a * d1 + b * d2, reference).item(),
                                                   abs=2e-5)
    assert surface.spec["head"] == "lm"

    inputs = compute_surface(checkpoint, SurfaceSpec(**SPEC, space="input"), model=model, split=split,
                             progress=False)
    batches, order = batch_split(model, split.head(8), SPEC["batch_size"], by_length=True)  # as the grid's
    pairs = input_directions(model, checkpoint.params, batches, "filter", 0, order)
    where = {index: (k, r) for k, rows in enumerate(order) for r, index in enumerate(rows)}
    for i, j in ((0, 2), (2, 1)):
        a, b = _point(inputs, i, j)
        deltas = [a * pairs[where[n][0]][0][where[n][1]] + b * pairs[where[n][0]][1][where[n][1]]
                  for n in range(len(examples))]  # (T_k, D) each, zero off the input tokens
        perturbed = peft_inputs(peft_model, tokenizer, examples, deltas)
        for n, ids in enumerate(perturbed["ids"]):  # PEFT's tokens are ours: the deltas land on the same tokens
            k, r = where[n]
            assert batches[k].input_ids[r, :len(ids)].tolist() == ids
        assert inputs.loss[i, j] == pytest.approx(peft_loss(peft_model, prompt, perturbed).item(), abs=2e-5)
    assert inputs.center_loss == pytest.approx(surface.center_loss, abs=1e-6)


def test_stacked_and_chunked_grid_equals_a_per_point_loop(runs, model, split):
    checkpoint = load_checkpoint(runs["seed1"])
    params = checkpoint.params
    subset = split.head(8)
    stacked = compute_surface(checkpoint, SurfaceSpec(**SPEC), model=model, split=split, progress=False)
    chunked = compute_surface(checkpoint, SurfaceSpec(**SPEC, chunk=2), model=model, split=split,
                              progress=False)
    d1, d2 = (torch.from_numpy(d) for d in (stacked.direction_1, stacked.direction_2))
    for i in range(3):
        for j in range(3):
            a, b = _point(stacked, i, j)
            # the loop: one prompt at a time, stored order, batches of 5 and 3 (ptp_core's evaluation)
            result = evaluate(model, {**params, "prompt": params["prompt"] + a * d1 + b * d2}, subset, batch_size=5)
            assert stacked.loss[i, j] == pytest.approx(result["loss"], abs=1e-5)
            assert stacked.accuracy[i, j] == pytest.approx(result["token_accuracy"], abs=1e-6)
    np.testing.assert_allclose(chunked.loss, stacked.loss, atol=1e-6)
    # the check can fail: the mean of the three batches' own token means is another number
    own = [model.loss(params, model.encode([subset.texts[i] for i in rows], [subset.labels[i] for i in rows])).mean()
           for rows in ([0, 1, 2], [3, 4, 5], [6, 7])]
    assert abs(float(torch.stack(own).mean()) - stacked.center_loss) > 1e-3

    one = compute_surface(checkpoint, SurfaceSpec(**SPEC, space="input", chunk=1), model=model, split=split,
                          progress=False)
    every = compute_surface(checkpoint, SurfaceSpec(**SPEC, space="input"), model=model, split=split,
                            progress=False)
    np.testing.assert_allclose(every.loss, one.loss, atol=1e-6)
    np.testing.assert_allclose(every.accuracy, one.accuracy, atol=1e-6)


def test_hessian_metrics_of_the_token_loss_match_a_dense_hessian_of_peft_loss(runs, model, split, peft_model,
                                                                              tokenizer):
    checkpoint = load_checkpoint(runs["seed0"])
    config = MetricsConfig(which=("hessian", "trace", "sharpness", "input", "calibration"), examples=4, eigenvalues=2,
                           samples=4, ascent_steps=2, trace_hvps=12)
    row = measure(model, checkpoint.params, split, None, config)
    reference = peft_inputs(peft_model, tokenizer, split.head(4).texts)
    prompt = checkpoint.params["prompt"]
    with sdpa_kernel(SDPBackend.MATH):  # the attention kernel with a second derivative
        dense = torch.autograd.functional.hessian(
            lambda p: peft_loss(peft_model, p.reshape(prompt.shape), reference), prompt.flatten())  # (P*D, P*D)
    top = torch.linalg.eigvalsh(((dense + dense.T) / 2).double()).flip(0)
    assert row["hessian_eigenvalues"] == pytest.approx(top[:2].tolist(), rel=1e-3)
    assert row["worst_case_sharpness"] >= 0
    for key in ("hessian_trace", "average_sharpness", "input_worst_case_sharpness", "input_average_sharpness"):
        assert np.isfinite(row[key]), key
    assert row["center_ece"] is None and "generation task" in row["center_ece_reason"]

    deep = load_checkpoint(runs["deep"])
    deep_row = measure(deep.build_model("cpu"), deep.params, split, None,
                       MetricsConfig(which=("hessian",), examples=4, eigenvalues=1))
    layers = deep_row["layer_hessian_top_eigenvalue"]  # the top eigenvalue of a diagonal block is at most H's
    assert len(layers) == 2 and max(layers) <= deep_row["hessian_eigenvalues"][0] * (1 + 1e-3)


def test_lm_on_a_classification_task_grid_and_rank_calibration(runs, tiny_dirs, tokenizer):
    """The label names written as text: the length-sorted grid encodes each example's label as its target, and
    center_ece is the calibration of rank classification: softmax over each label target's log-likelihood."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(runs["lm_classes"])
    model, split = checkpoint.build_model("cpu"), checkpoint.task().splits["test"]
    surface = compute_surface(checkpoint, SurfaceSpec(**{**SPEC, "grid": "1x1"}), model=model, split=split,
                              progress=False)
    assert surface.center_loss == pytest.approx(evaluate(model, checkpoint.params, split.head(8))["loss"], abs=1e-5)

    row = measure(model, checkpoint.params, split, None, MetricsConfig(which=("calibration",),
                                                                       calibration_examples=6))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]),
                                           runs["lm_classes"]).eval()
    subset = split.head(6)
    likelihood = torch.zeros(len(subset), len(model.label_words), dtype=torch.float64)  # (N, C)
    with torch.no_grad():
        for n, text in enumerate(subset.texts):
            source = tokenizer(model.template.split("{mask}")[0].replace("{text}", text).rstrip()).input_ids
            for c, word in enumerate(model.label_words):
                target = tokenizer(" " + word, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                loss = peft_model(input_ids=torch.tensor([source + target]),
                                  labels=torch.tensor([[-100] * len(source) + target])).loss  # mean over target
                likelihood[n, c] = -loss.double() * len(target)
    probabilities = torch.softmax(likelihood, dim=-1).numpy()
    assert row["center_ece"] == pytest.approx(expected_calibration_error(probabilities, subset.labels), abs=1e-5)


def test_connect_measures_token_means_and_says_so(runs, model, split):
    first, second = load_checkpoint(runs["seed0"]), load_checkpoint(runs["seed1"])
    config = ConnectConfig(steps=2, points=3, examples=8, batch_size=3, dtype="float32", device="cpu")
    result = connect_pair(first, second, model, config, progress=False)
    for end, checkpoint in ((0, first), (-1, second)):
        assert result.linear.losses[end] == pytest.approx(
            evaluate(model, checkpoint.params, split.head(8), batch_size=5)["loss"], abs=1e-5)
    assert result.to_dict()["head"] == "lm"
    assert analysis.connectivity(result).axes[0].get_ylabel() == TOKEN_LOSS


def test_mixing_generation_and_classification_is_refused_before_anything_is_written(runs, model, split,
                                                                                    tmp_path):
    lm, verbalizer = load_checkpoint(runs["seed0"]), load_checkpoint(runs["verbalizer"])
    with pytest.raises(ValueError, match="one task kind") as refused:
        check_pair(lm, verbalizer)
    assert "\n" not in str(refused.value) and TOKEN_LOSS in str(refused.value)
    with pytest.raises(ValueError, match="one task kind"):
        compare([runs["seed0"], runs["verbalizer"]], SurfaceSpec(**SPEC), MetricsConfig(which=("surface",)),
                tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(ValueError, match="one task kind"):
        compute_surface([lm, verbalizer], SurfaceSpec(**{**SPEC, "grid": "3x1"}, directions="interp"))
    surface = compute_surface(lm, SurfaceSpec(**SPEC), tmp_path / "lm", model=model, split=split,
                              progress=False)
    save_surface(Surface(surface.alphas, surface.betas, surface.loss, surface.accuracy,
                         {**surface.spec, "head": "verbalizer", "checkpoint": "other"}), tmp_path / "other")
    with pytest.raises(ValueError, match="one task kind"):
        from_surfaces([tmp_path / "lm", tmp_path / "other"])

    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, "-m", "landscape.plot", str(runs["seed0"]), str(runs["verbalizer"]),
                             "--out", str(out), "--grid", "3", "--examples", "4", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "one task kind" in result.stderr
    assert "plan:" not in result.stdout  # refused before anything is planned
    assert not out.exists()


def test_figures_tables_and_report_name_the_token_level_cross_entropy(runs, tmp_path):
    comparison = compare([runs["seed0"], runs["seed1"]], SurfaceSpec(**SPEC), MetricsConfig(which=("surface",)),
                         tmp_path, ("prompt", "input"), device="cpu", progress=False)
    meta = json.loads((runs["seed0"] / "ptp.json").read_text())["metrics"]
    row = comparison.row(str(runs["seed0"]))
    assert row["center_loss"] == pytest.approx(meta["test_loss"], abs=1e-5)  # 8 = the whole test split
    assert row["test_token_accuracy"] == meta["test_token_accuracy"] and row["test_accuracy"] is None
    assert "test_token_accuracy" in row["test_accuracy_reason"]
    assert TOKEN_LOSS in comparison.metadata["loss"]

    drawn = figures(comparison, PlotConfig(tmp_path / "out"))

    def labels(name: str) -> set[str]:
        return {text for ax in drawn[name].axes for text in (ax.get_xlabel(), ax.get_ylabel()) if text}

    for suffix in ("", "_input"):
        assert TOKEN_LOSS in labels(f"landscape_3d{suffix}")  # the colour bar
        assert f"{TOKEN_LOSS} (log-spaced levels)" in labels(f"contour{suffix}")
        assert TOKEN_LOSS in labels(f"profiles{suffix}") and "loss" not in labels(f"profiles{suffix}")
        assert f"birth ({TOKEN_LOSS} at the minimum)" in labels(f"persistence{suffix}")
    markdown = write_metrics_md(comparison.rows, tmp_path, comparison.stats).read_text()
    assert LM_NOTE in markdown and f"centre {TOKEN_LOSS}" in markdown
    assert f"center_acc ({TOKEN_ACCURACY}, on the surface's 8 examples)" in markdown
    page = comparison_html(comparison, {"pt": comparison.surfaces[(str(runs["seed0"]), "prompt")]})
    assert f"{TOKEN_LOSS}=" in page and f"{TOKEN_ACCURACY}=" in page  # hover text of the 3D surface
    assert load_surface(next((tmp_path / "surfaces").glob("*-prompt.npz"))).spec["head"] == "lm"
