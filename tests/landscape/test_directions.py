"""Directions: orthogonality, filter norms, parallel to the autograd gradient, seeded and bitwise repeatable."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape.grid.directions import input_directions, normalize_direction, orthonormal_pair, prompt_directions
from ptp_core.model.encoding import batch_split
from ptp_core.tasks.task import Split
from conftest import toy_rows


def _examples(n: int = 12, seed: int = 5) -> Split:
    rows = toy_rows(n, seed)
    return Split([r["text"] for r in rows], [int(r["label"] == "positive") for r in rows])


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([v.double().reshape(-1) for v in params.values()])


def _cos(a: dict, b: dict) -> float:
    x, y = _flat(a), _flat(b)
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("norm", ["filter", "layer", "none"])
@pytest.mark.parametrize("params", ["prompt", "all"])
def test_gradient_directions_orthogonal_normalized_and_parallel(tiny_bert_model, norm, params):
    model = tiny_bert_model
    batches, order = batch_split(model, _examples(), batch_size=5, by_length=True)
    names = list(model.params) if params == "all" else ["prompt"]
    directions = prompt_directions(model, model.params, batches, "gradient", norm, seed=3, names=names)
    d1, d2 = directions.d1, directions.d2
    assert abs(_cos(d1, d2)) < 1e-6
    # the gradient, computed independently on all examples in one batch
    examples = _examples()
    leaves = {k: model.params[k].detach().clone().requires_grad_(True) for k in names}
    loss = model.loss({**model.params, **leaves}, model.encode(examples.texts, examples.labels)).mean()
    gradient = dict(zip(names, torch.autograd.grad(loss, list(leaves.values()))))
    for name in names:
        reference, g, a, b = model.params[name].double(), gradient[name].double(), d1[name].double(), d2[name].double()
        if norm == "filter":
            rows = lambda t: t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)  # noqa: E731
            torch.testing.assert_close(rows(a).norm(dim=1), rows(reference).norm(dim=1), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(rows(b).norm(dim=1), rows(reference).norm(dim=1), rtol=1e-5, atol=1e-7)
            moving = rows(reference).norm(dim=1) > 0  # a zero row (e.g. a fresh bias) has a zero direction
            cos = torch.nn.functional.cosine_similarity(rows(a), rows(g), dim=1)[moving]  # parallel to the gradient's row
            torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)
        elif norm == "layer":
            torch.testing.assert_close(a.norm(), reference.norm(), rtol=1e-5, atol=0)
            torch.testing.assert_close(b.norm(), reference.norm(), rtol=1e-5, atol=0)
    if norm == "none":
        assert abs(_flat(d1).norm() - 1) < 1e-6 and abs(_flat(d2).norm() - 1) < 1e-6
        assert _cos(d1, gradient) > 1 - 1e-5
    elif norm == "layer":
        assert all(_cos({k: d1[k]}, {k: gradient[k]}) > 1 - 1e-5 for k in names if model.params[k].norm() > 0)


@pytest.mark.parametrize("kind", ["random", "gradient"])
def test_same_seed_same_directions_bitwise(tiny_gpt2_model, kind):
    model = tiny_gpt2_model
    batches, _ = batch_split(model, _examples(), batch_size=4, by_length=True)
    first = prompt_directions(model, model.params, batches, kind, seed=7)
    second = prompt_directions(model, model.params, batches, kind, seed=7)
    other = prompt_directions(model, model.params, batches, kind, seed=8)
    assert torch.equal(first.d1["prompt"], second.d1["prompt"]) and torch.equal(first.d2["prompt"], second.d2["prompt"])
    assert not torch.equal(first.d2["prompt"], other.d2["prompt"])
    assert abs(_cos(first.d1, first.d2)) < 1e-6
    assert (first.kind, first.norm, first.seed) == (kind, "filter", 7)


def test_normalize_filter_keeps_zero_rows_zero_and_matches_row_norms():
    generator = torch.Generator().manual_seed(0)
    reference = {"prompt": torch.randn(3, 4, generator=generator)}
    direction = {"prompt": torch.randn(3, 4, generator=generator)}
    direction["prompt"][1] = 0
    out = normalize_direction(direction, reference, "filter")["prompt"]
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    for row in (0, 2):  # Li et al. 2018: each filter (prompt token) gets the norm of the reference's
        torch.testing.assert_close(out[row].norm(), reference["prompt"][row].norm())


def test_interp_and_pca_directions(tiny_bert_model):
    model = tiny_bert_model
    batches, _ = batch_split(model, _examples(6), batch_size=6, by_length=True)
    b = {k: v + 1.0 for k, v in model.params.items()}
    c = {k: v - 0.5 for k, v in model.params.items()}
    line = prompt_directions(model, model.params, batches, "interp", others=[b])
    torch.testing.assert_close(line.at(torch.tensor([1.0]), torch.tensor([0.0]))["prompt"][0], b["prompt"])
    assert torch.all(line.d2["prompt"] == 0)
    plane = prompt_directions(model, model.params, batches, "interp", others=[b, c])
    torch.testing.assert_close(plane.at(torch.tensor([0.0]), torch.tensor([1.0]))["prompt"][0], c["prompt"])
    generator = torch.Generator().manual_seed(0)
    prompts = model.params["prompt"] + torch.randn(9, *model.params["prompt"].shape, generator=generator)  # (S, P, D)
    pca = prompt_directions(model, model.params, batches, "pca", norm="none", trajectory={"prompts": prompts})
    assert abs(_cos(pca.d1, pca.d2)) < 1e-6 and len(pca.info["explained_variance"]) == 2
    assert pca.info["explained_variance"][0] >= pca.info["explained_variance"][1]
    with pytest.raises(ValueError, match="trajectory"):
        prompt_directions(model, model.params, batches, "pca", trajectory=None)


def test_input_directions_per_example(tiny_bert_model):
    model = tiny_bert_model
    batches, order = batch_split(model, _examples(7), batch_size=3, by_length=True)
    pairs = input_directions(model, model.params, batches, "filter", seed=1, order=order)
    again = input_directions(model, model.params, batches, "filter", seed=1, order=order)
    for (d1, d2), (e1, e2), batch in zip(pairs, again, batches):
        assert torch.equal(d1, e1) and torch.equal(d2, e2)
        embeddings = model.embed(batch).detach()
        mask = batch.text_mask
        assert torch.all(d1[~mask] == 0) and torch.all(d2[~mask] == 0)  # only text tokens move
        torch.testing.assert_close(d1[mask].norm(dim=-1), embeddings[mask].norm(dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d2[mask].norm(dim=-1), embeddings[mask].norm(dim=-1), rtol=1e-5, atol=1e-6)
        dots = (d1.double() * d2.double()).sum(dim=(1, 2)) / (d1.double().flatten(1).norm(dim=1) * d2.double().flatten(1).norm(dim=1))
        assert dots.abs().max() < 1e-6
        delta = torch.zeros_like(embeddings, requires_grad=True)  # each token row parallel to its gradient row
        gradient = torch.autograd.grad(model.loss(model.params, batch, input_perturbation=delta).sum(), delta)[0]
        cos = torch.nn.functional.cosine_similarity(d1[mask], gradient[mask], dim=-1)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)


def test_input_directions_do_not_depend_on_batching(tiny_bert_model):
    model = tiny_bert_model
    examples = _examples(7)
    small, small_order = batch_split(model, examples, batch_size=2, by_length=True)
    large, large_order = batch_split(model, examples, batch_size=7, by_length=True)
    per_example = {}
    for batches, order in ((small, small_order), (large, large_order)):
        for (d1, d2), batch, rows in zip(input_directions(model, model.params, batches, "layer", 4, order), batches, order):
            for r, index in enumerate(rows):
                value = d2[r][batch.text_mask[r]]
                if index in per_example:
                    torch.testing.assert_close(value, per_example[index], rtol=1e-5, atol=1e-6)
                per_example[index] = value


def test_filter_normalization_gives_biases_a_zero_direction():
    generator = torch.Generator().manual_seed(1)
    reference = {"weight": torch.randn(3, 4, generator=generator), "bias": torch.randn(3, generator=generator)}
    direction = {k: torch.randn(v.shape, generator=generator) for k, v in reference.items()}
    d1, d2 = orthonormal_pair(direction, {k: v.flip(0) for k, v in direction.items()}, reference, "filter")
    # Li et al.'s code (net_plotter.normalize_directions_for_weights, ignore='biasbn') zeroes 1-D directions
    assert torch.all(d1["bias"] == 0) and torch.all(d2["bias"] == 0)
    torch.testing.assert_close(d1["weight"].norm(dim=1), reference["weight"].norm(dim=1))
    layer = normalize_direction(direction, reference, "layer")  # layer: a bias is a tensor like any other
    torch.testing.assert_close(layer["bias"].norm(), reference["bias"].norm())


def test_filter_normalization_of_a_deep_prompt_scales_keys_and_values_apart(tiny_dirs):
    """The filters are training's perturbation units (ptp_core.training.perturb.prompt_unit): each layer's keys, its values."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel
    from ptp_core.model.prefix import split_layers

    model = PromptModel(load_backbone(tiny_dirs["gpt2"], "verbalizer", num_labels=2), "verbalizer", 2,
                        label_words=["negative", "positive"], template="{text} It was {mask}.", prompt_type="deep")
    params = model.init_params(3, "random", torch.Generator().manual_seed(0))
    width = params["prompt"].shape[1]
    values_scale = torch.ones(width)  # values 10x the keys: one filter over both would scale them as one
    for layer in range(model.prefix_shape.layers):
        start = (2 * layer + 1) * width // (2 * model.prefix_shape.layers)
        values_scale[start:start + width // (2 * model.prefix_shape.layers)] = 10.0
    params["prompt"] = params["prompt"] * values_scale
    batches, _ = batch_split(model, _examples(4), batch_size=4, by_length=True)
    plane = prompt_directions(model, params, batches, "random", "filter", seed=0)
    reference = split_layers(params["prompt"].double(), model.prefix_shape)  # (L, 2, 1, H, P, d)
    for direction in (plane.d1, plane.d2):
        blocks = split_layers(direction["prompt"].double(), model.prefix_shape)
        norms = blocks.pow(2).sum(dim=(3, 5)).sqrt()  # (L, 2, 1, P): per layer, keys/values, virtual token
        torch.testing.assert_close(norms, reference.pow(2).sum(dim=(3, 5)).sqrt(), rtol=1e-5, atol=1e-7)


def _variance_along(snapshots: torch.Tensor, direction: torch.Tensor) -> float:
    """Independent reference: numpy, float64, the trajectory projected on the unit direction."""
    matrix = snapshots.double().reshape(len(snapshots), -1).numpy()
    matrix = matrix - matrix.mean(axis=0)
    unit = direction.double().reshape(-1).numpy()
    return float(np.sum((matrix @ (unit / np.linalg.norm(unit))) ** 2) / np.sum(matrix**2))


def test_pca_reports_the_variance_of_the_plane_drawn(tiny_bert_model):
    model = tiny_bert_model
    batches, _ = batch_split(model, _examples(4), batch_size=4, by_length=True)
    generator = torch.Generator().manual_seed(0)
    # rows of very different norms: the filter normalization moves the plane away from the PCA plane
    params = dict(model.params, prompt=model.params["prompt"] * torch.tensor([[0.1], [1.0], [3.0], [0.5]]))
    steps = torch.randn(12, *params["prompt"].shape, generator=generator) * torch.linspace(2, 0.1, 12)[:, None, None]
    prompts = params["prompt"] + steps.cumsum(0)  # (S, P, D): a drifting trajectory
    plane = prompt_directions(model, params, batches, "pca", "filter", trajectory={"prompts": prompts})
    expected = [_variance_along(prompts, plane.d1["prompt"]), _variance_along(prompts, plane.d2["prompt"])]
    np.testing.assert_allclose(plane.info["explained_variance"], expected, rtol=1e-9)
    assert sum(expected) < sum(plane.info["pca_explained_variance"]) - 0.05  # the drawn plane holds less
    plain = prompt_directions(model, params, batches, "pca", "none", trajectory={"prompts": prompts})
    np.testing.assert_allclose(plain.info["explained_variance"], plain.info["pca_explained_variance"], rtol=1e-6)


def test_hessian_directions_report_the_curvature_of_the_plane_drawn(tiny_bert_model):
    model = tiny_bert_model
    examples = _examples(4)
    batch = model.encode(examples.texts, examples.labels)
    plane = prompt_directions(model, model.params, [batch], "hessian", "filter", seed=0)
    prompt = model.params["prompt"].detach().double()

    def loss(p):  # float64 autograd's own HVP, not landscape.hessian's operator
        return model.loss({**model.params, "prompt": p.float()}, batch).mean().double()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the one attention kernel with a second derivative
        dense = torch.autograd.functional.hessian(loss, prompt, vectorize=True).reshape(prompt.numel(), -1)  # (N, N)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (dense + dense.T))
    top = eigenvectors[:, -2:]  # (N, 2)
    for i, d in enumerate((plane.d1["prompt"], plane.d2["prompt"])):
        flat = d.double().reshape(-1)
        assert plane.info["rayleigh_quotients"][i] == pytest.approx(float(flat @ dense @ flat / (flat @ flat)),
                                                                    rel=1e-3, abs=1e-5)
        assert plane.info["eigenplane_fraction"][i] == pytest.approx(float((top.T @ flat).pow(2).sum() / (flat @ flat)),
                                                                     abs=1e-3)
    assert plane.info["rayleigh_quotients"][0] <= float(eigenvalues[-1]) + 1e-5
