"""PTP regularizers: zero perturbation == vanilla, balls hold, protected tokens stay, FreeLB averages, runs repeat."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ptp_core.training import perturb, text_perturb
from ptp_core.checkpoint import load_checkpoint
from ptp_core.training.perturb import PerturbConfig, ptp_gradients
from ptp_core.train import TrainConfig, train

# (method, perturbation settings): every method x target, including FreeLB
VARIANTS = {
    "rn-input": ("ptp-rn", dict(target="input")),
    "rn-input-uniform": ("ptp-rn", dict(target="input", noise="uniform")),
    "rn-prompt": ("ptp-rn", dict(target="prompt")),
    "rn-text": ("ptp-rn", dict(target="text", mask_rate=0.3)),
    "adv-input": ("ptp-adv", dict(target="input", adv_steps=2)),
    "adv-input-linf": ("ptp-adv", dict(target="input", adv_steps=2, adv_norm="linf")),
    "adv-input-free": ("ptp-adv", dict(target="input", adv_steps=2, adv_free=True)),
    "adv-prompt": ("ptp-adv", dict(target="prompt", adv_steps=2)),
    "adv-text": ("ptp-adv", dict(target="text", swaps=2)),
}
ZERO = {"rn-input": dict(sigma=0), "rn-input-uniform": dict(sigma=0), "rn-prompt": dict(sigma=0),
        "rn-text": dict(mask_rate=0), "adv-input": dict(epsilon=0), "adv-input-linf": dict(epsilon=0),
        "adv-input-free": dict(epsilon=0), "adv-prompt": dict(rho=0), "adv-text": dict(swaps=0)}


@pytest.fixture(params=["tiny_bert_model", "tiny_gpt2_model"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def batch(model, tiny_batch_texts):
    texts, labels = tiny_batch_texts
    return model.encode(texts, labels)


def _params(model):
    return {k: v.detach().clone().requires_grad_(True) for k, v in model.params.items()}


def _generator():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_perturbation_is_vanilla(model, batch, variant):
    method, settings = VARIANTS[variant]
    config = PerturbConfig(**{**settings, **ZERO[variant]}, reg_weight=0.7)
    params = _params(model)
    losses = ptp_gradients(model, params, batch, method, config, _generator())
    vanilla = _params(model)
    clean = model.loss(vanilla, batch).mean()
    clean.backward()
    assert losses["clean_loss"] == clean.item() and losses["perturbed_loss"] == clean.item()
    for name in params:
        torch.testing.assert_close(params[name].grad, 1.7 * vanilla[name].grad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backbone_gets_no_grads_and_params_do(model, batch, variant):
    method, settings = VARIANTS[variant]
    params = _params(model)
    losses = ptp_gradients(model, params, batch, method, PerturbConfig(**settings), _generator())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert losses["loss"] == pytest.approx(losses["clean_loss"] + losses["perturbed_loss"])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_its_ball_and_raises_the_loss(model, batch, norm):
    config = PerturbConfig(target="input", epsilon=1.0, adv_steps=3, adv_step_size=0.5, adv_norm=norm)
    params = {k: v.detach() for k, v in model.params.items()}
    zero = torch.zeros((*batch.input_ids.shape, model.embedding_dim), requires_grad=True)
    clean = model.loss(params, batch, input_perturbation=zero)
    (gradient,) = torch.autograd.grad(clean.mean(), [zero])
    delta = perturb.pgd_input(model, params, batch, config, _generator(), gradient)
    radius = perturb.ball_radius(batch, 1.0, perturb.embedding_rms(model), model.embedding_dim, norm)
    size = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(dim=1)
    assert (size <= radius.flatten() * (1 + 1e-5)).all() and (size > 0.5 * radius.flatten()).all()
    assert (delta[~batch.text_mask] == 0).all()
    perturbed = model.loss(params, batch, input_perturbation=delta)
    assert perturbed.mean() > clean.mean()
    noise = perturb.random_start(batch, delta.shape, radius, PerturbConfig(adv_init=1.0, adv_norm=norm),
                                 _generator(), delta)  # a random point at the same radius does less
    assert model.loss(params, batch, input_perturbation=noise).mean() < perturbed.mean()


def test_masking_touches_only_text_tokens(model, batch):
    for rate in (0.5, 1.0):
        masked = text_perturb.mask_text(model, batch, rate, "mask", _generator())
        protected = text_perturb.perturbable(model, batch).logical_not()
        assert torch.equal(masked.input_ids[protected], batch.input_ids[protected])
        changed = masked.input_ids != batch.input_ids
        assert changed.any() and (changed <= batch.text_mask).all()
    replacement = text_perturb.replacement_id(model.tokenizer, "mask")
    assert (masked.input_ids[text_perturb.perturbable(model, batch)] == replacement).all()  # rate 1 masks every word
    assert torch.equal(masked.attention_mask, batch.attention_mask) and torch.equal(masked.labels, batch.labels)


def test_hotflip_swaps_are_the_best_first_order_gains_on_text_tokens(model, batch):
    params = {k: v.detach() for k, v in model.params.items()}
    zero = torch.zeros((*batch.input_ids.shape, model.embedding_dim), requires_grad=True)
    (gradient,) = torch.autograd.grad(model.loss(params, batch, input_perturbation=zero).mean(), [zero])
    flipped = text_perturb.hotflip(model, batch, gradient, swaps=2)
    changed = flipped.input_ids != batch.input_ids
    assert changed.any() and (changed <= text_perturb.perturbable(model, batch)).all()
    assert (changed.sum(1) <= 2).all()
    table = model.backbone.get_input_embeddings().weight.detach()
    special = set(model.tokenizer.all_special_ids)
    for b, t in changed.nonzero().tolist():  # an independent loop over the vocabulary
        old = batch.input_ids[b, t].item()
        gains = {v: (gradient[b, t] @ (table[v] - table[old])).item() for v in range(len(model.tokenizer))
                 if v not in special and v != old}
        new = flipped.input_ids[b, t].item()
        assert gains[new] > 0 and gains[new] == pytest.approx(max(gains.values()), rel=1e-5)
    estimate = (gradient * (model.embed(flipped) - model.embed(batch))).sum()  # first-order loss change
    assert estimate > 0


def test_freelb_gradient_is_the_average_of_the_k_gradients(model, batch):
    config = PerturbConfig(target="input", adv_steps=3, adv_free=True, epsilon=1.0)
    params = _params(model)
    loss, average, deltas = perturb.freelb_input(model, params, batch, config, _generator())
    assert len(deltas) == 3 and not torch.equal(deltas[0], deltas[1])
    explicit = {k: torch.zeros_like(v) for k, v in params.items()}
    losses = []
    for delta in deltas:
        step = model.loss(params, batch, input_perturbation=delta).mean()
        losses.append(step.item())
        for name, g in zip(params, torch.autograd.grad(step, list(params.values()))):
            explicit[name] += g
    for name, g in zip(params, average):
        torch.testing.assert_close(g, explicit[name] / 3)
    assert loss.item() == pytest.approx(sum(losses) / 3)


def test_bad_values_raise():
    for bad in (dict(epsilon=-1), dict(adv_steps=0), dict(target="weights"), dict(mask_rate=1.5),
                dict(sigma=float("nan")), dict(swaps=-1)):
        with pytest.raises(ValueError, match="--"):
            PerturbConfig(**bad)


def test_same_seed_is_bitwise_equal_for_every_method(tiny_dirs, toy_csv, tmp_path):
    for name, (method, settings) in {"pt": ("pt", {}), **VARIANTS}.items():
        runs = []
        for copy in ("a", "b"):
            config = TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", method=method, seed=1,
                                 out=str(tmp_path / name / copy), steps=4, batch_size=16, prompt_length=3,
                                 eval_every=4, eval_examples=8, snapshot_every=2, progress=False,
                                 perturb=PerturbConfig(**settings))
            runs.append(load_checkpoint(train(config)))
        a, b = runs
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params), name
        assert a.meta.get("perturb") == b.meta.get("perturb") and a.meta["method"] == method  # pt records none


def _cli(*args, expect=0):
    result = subprocess.run([sys.executable, "-m", "ptp_core.train", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == expect, result.stderr[-2000:]
    return result


def test_cli_trains_ptp_adv_and_records_every_knob(tiny_dirs, toy_csv, tmp_path):
    out = tmp_path / "adv"
    _cli("--model", tiny_dirs["bert"], "--task", toy_csv, "--method", "ptp-adv", "--target", "input",
         "--adv-steps", "2", "--epsilon", "0.3", "--adv-norm", "linf", "--steps", "3", "--eval-every", "3",
         "--prompt-len", "3", "--reg-warmup", "1", "--reg-ramp", "2", "--out", str(out), "--no-progress")
    meta = json.loads((out / "ptp.json").read_text())
    assert meta["method"] == "ptp-adv"
    assert meta["perturb"] == {**vars(PerturbConfig()), "target": "input", "adv_steps": 2, "epsilon": 0.3,
                               "adv_norm": "linf", "reg_warmup": 1, "reg_ramp": 2}
    steps = [row for row in meta["log"] if "loss" in row]
    assert [row["reg_weight"] for row in steps] == [0.0, 0.5, 1.0]  # warm-up step 1, then the ramp
    assert "perturbed_loss" not in steps[0] and all("perturbed_loss" in row for row in steps[1:])


def test_cli_bad_values_get_one_line_and_exit_code_2(tiny_dirs, toy_csv, tmp_path):
    base = ["--model", tiny_dirs["bert"], "--task", toy_csv, "--method", "ptp-adv", "--out", str(tmp_path / "x")]
    cases = {"--epsilon": ["--epsilon", "-1"], "--adv-steps": ["--adv-steps", "0"], "--target": ["--target", "weights"],
             "--mask-rate": ["--method", "ptp-rn", "--target", "text", "--mask-rate", "1.5"],
             "unknown method": ["--method", "ptp-foo"]}
    for message, args in cases.items():
        error = _cli(*base, *args, expect=2).stderr
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error and message in error, error
    assert not (tmp_path / "x").exists()


def test_adversarial_input_steps_run_on_a_bfloat16_backbone(tiny_dirs, tiny_batch_texts):
    """The ball radius is float32; the perturbation must follow the embeddings' dtype (no m1/m2 dtype clash)."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel
    from ptp_core.training.perturb import PerturbConfig, ptp_gradients

    backbone = load_backbone(tiny_dirs["bert"], "classifier", 2, "cpu", torch.bfloat16)
    model = PromptModel(backbone, "classifier", 2)
    params = {k: v.to(torch.bfloat16).requires_grad_(True) for k, v in
              model.init_params(3, "random", torch.Generator().manual_seed(0)).items()}
    batch = model.encode(*tiny_batch_texts)
    for free in (False, True):
        config = PerturbConfig(target="input", adv_steps=2, adv_free=free)
        losses = ptp_gradients(model, params, batch, "ptp-adv", config, torch.Generator().manual_seed(1))
        assert all(np.isfinite(v) for v in losses.values()) and params["prompt"].grad is not None


def test_schedule_is_zero_in_the_warmup_then_linear():
    config = PerturbConfig(reg_weight=0.8, reg_warmup=10, reg_ramp=4)
    assert [config.weight_at(s) for s in range(1, 11)] == [0.0] * 10
    assert [config.weight_at(s) for s in (11, 12, 13, 14, 15, 300)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert PerturbConfig(reg_weight=0.5, reg_warmup=0, reg_ramp=0).weight_at(1) == 0.5  # no schedule: lam at once
    assert [PerturbConfig().weight_at(s) for s in (40, 41, 60, 80, 81)] == [0.0, 0.025, 0.5, 1.0, 1.0]  # defaults
    with pytest.raises(ValueError, match="--reg-warmup"):
        PerturbConfig(reg_warmup=-1)


@pytest.mark.parametrize("method", ["ptp-rn", "ptp-adv"])
def test_warmup_steps_equal_pt_bitwise(tiny_dirs, toy_csv, tmp_path, method):
    """The 4 warm-up steps of a 6-step run are PT's steps bitwise (trajectory snapshots at steps 0, 2, 4)."""
    runs = {}
    for name, perturbation in (("pt", PerturbConfig()), (method, PerturbConfig(reg_warmup=4, reg_ramp=0, adv_steps=2))):
        config = TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", method=name, seed=2,
                             out=str(tmp_path / name), steps=6, batch_size=16, prompt_length=3, eval_every=2,
                             eval_examples=8, snapshot_every=2, progress=False, dtype="float32", perturb=perturbation)
        runs[name] = load_checkpoint(train(config))
    pt, ptp = runs["pt"], runs[method]
    assert torch.equal(pt.trajectory["prompts"][:3], ptp.trajectory["prompts"][:3])
    assert not torch.equal(pt.trajectory["prompts"][3], ptp.trajectory["prompts"][3])  # regularized from step 5
    assert ptp.meta["perturb"]["reg_warmup"] == 4 and ptp.meta["perturb"]["reg_ramp"] == 0
    assert [r["reg_weight"] for r in ptp.meta["log"] if "reg_weight" in r] == [0.0] * 4 + [1.0] * 2


def test_linf_sam_ball_bounds_each_prompt_coordinate(model, batch):
    config = PerturbConfig(target="prompt", adv_norm="linf", rho=0.05, adv_steps=3)
    params = _params(model)
    clean = model.loss(params, batch).mean()
    (gradient,) = torch.autograd.grad(clean, [params["prompt"]])
    offset = perturb.sam_prompt(model, params, batch, config, gradient)
    bound = config.rho * perturb.embedding_rms(model)
    assert offset.abs().max().item() == pytest.approx(bound, rel=1e-5)  # sign steps of the full radius hit the bound
    assert (offset.abs() <= bound * (1 + 1e-6)).all()


def test_freelb_with_one_step_is_refused():
    with pytest.raises(ValueError, match="--adv-steps >= 2"):
        PerturbConfig(target="input", adv_free=True, adv_steps=1)
