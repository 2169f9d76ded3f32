"""Deep prompts (per-layer prefix keys and values): PEFT's prefix tuning on decoders (both directions), an
explicit float64 attention with the prefix concatenated on encoders, shallow == deep built from it on decoders,
stacking, double backward, grouped-query heads, checkpoints in PEFT's PREFIX_TUNING format."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import make_tokenizer, toy_rows
from families import reference_encoder_logits  # the explicit float64 prefix attention
from ptp_core.checkpoint import load_checkpoint, save_checkpoint
from test_families import peft_logits  # PEFT's forward, one example at a time

TEXTS = [r["text"] for r in toy_rows(4, seed=12)] + ["good"]  # different lengths: right padding in our batch
LABEL_WORDS = ["negative", "positive"]
TEMPLATE = "{text} It was {mask}."


def deep_model(directory: str, head: str, seed: int = 0, length: int = 3, dtype=torch.float32):
    """PromptModel with a random deep prompt (and head) at the scale of a trained one."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    backbone = load_backbone(directory, head, num_labels=2, dtype=dtype)
    model = PromptModel(backbone, head, 2, LABEL_WORDS, TEMPLATE if head == "verbalizer" else "{text}",
                        prompt_type="deep")
    params = model.init_params(length, "random", torch.Generator().manual_seed(seed))
    noise = torch.Generator().manual_seed(seed + 1)
    params["prompt"] = params["prompt"] + 0.3 * torch.randn(params["prompt"].shape, generator=noise)
    return model.with_params({k: v.to(dtype) for k, v in params.items()})


@pytest.fixture(scope="module")
def causal_dirs(tiny_dirs, tmp_path_factory):
    """Causal LMs for PEFT's CAUSAL_LM prefix tuning: GPT-2, Llama (grouped-query: 1 key/value head of 2), Qwen2."""
    import transformers

    root = tmp_path_factory.mktemp("causal")
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(make_tokenizer("bpe")), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=0, initializer_range=0.3))
    qwen.save_pretrained(root / "qwen2")
    make_tokenizer("bpe").save_pretrained(root / "qwen2")
    return {"gpt2": tiny_dirs["gpt2"], "llama": tiny_dirs["llama"], "qwen2": str(root / "qwen2")}


def deep_ours_to_peft(directory: str, out) -> float:
    """max |label logit difference|: our deep checkpoint read by PeftModel.from_pretrained (CAUSAL_LM)."""
    import transformers
    from peft import PeftModel

    model = deep_model(directory, "verbalizer", seed=3)
    meta = {"model": directory, "head": "verbalizer", "kind": "causal", "label_words": LABEL_WORDS,
            "template": TEMPLATE, "num_labels": 2, "prompt_type": "deep"}
    out = save_checkpoint(out, model.params, meta, None, model.backbone.config)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory), out).eval()
    return float((model.predict(TEXTS) - peft_logits(peft_model, model, TEXTS)).abs().max())


def deep_peft_to_ours(directory: str, out) -> float:
    """max |label logit difference|: a PEFT-saved CAUSAL_LM prefix-tuning adapter read here."""
    import transformers
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(7)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory)
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    peft_model.save_pretrained(out)
    checkpoint = load_checkpoint(out)
    assert checkpoint.prompt_type == "deep"
    ours = checkpoint.build_model(label_words=LABEL_WORDS, template=TEMPLATE)
    return float((ours.predict(TEXTS) - peft_logits(peft_model, ours, TEXTS)).abs().max())


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_decoder_deep_prompt_agrees_with_peft_prefix_tuning_both_ways(family, causal_dirs, tmp_path):
    assert deep_ours_to_peft(causal_dirs[family], tmp_path / "ours") < 1e-5
    assert deep_peft_to_ours(causal_dirs[family], tmp_path / "peft") < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_shallow_prompt_equals_the_deep_prompt_built_from_it_on_decoders(family, family_dirs):
    """Causal attention: virtual tokens never see the text, so their keys and values are a cache the text reads."""
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    backbone = load_backbone(family_dirs[family], "classifier", num_labels=2)
    shallow = PromptModel(backbone, "classifier", 2)
    params = shallow.init_params(3, "random", torch.Generator().manual_seed(2))
    deep = PromptModel(backbone, "classifier", 2, prompt_type="deep")  # the same backbone: shallow still runs
    deep_params = {**params, "prompt": deep.deep_from_shallow(params["prompt"])}
    assert deep_params["prompt"].shape == (3, deep.prompt_width)
    assert (shallow.predict(TEXTS, params) - deep.predict(TEXTS, deep_params)).abs().max() < 1e-5


def encoder_reference_gaps(directory: str) -> tuple[float, float, float]:
    """max |logit difference| from the explicit float64 attention: ours in float64, ours in float32, and the
    logits without the prefix (so that the check can fail)."""
    gaps = []
    for dtype in (torch.float64, torch.float32):
        model = deep_model(directory, "classifier", seed=4, dtype=dtype)
        params = {"prompt": model.params["prompt"], **{k: v.to(dtype) for k, v in model.head_params().items()}}
        with torch.no_grad():
            ours = model.logits(params, model.encode(TEXTS)).double()  # not predict: it rounds to float32
            if dtype == torch.float64:
                expected = reference_encoder_logits(model, params["prompt"], TEXTS)
                without = model.logits({**params, "prompt": params["prompt"] * 0}, model.encode(TEXTS))
        gaps.append(float((ours - expected).abs().max()))
    return gaps[0], gaps[1], float((without - expected).abs().max())


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_encoder_deep_prompt_equals_an_explicit_float64_attention(family, family_dirs):
    float64, float32, without_prefix = encoder_reference_gaps(family_dirs[family])
    assert float64 < 1e-10 and float32 < 1e-5
    assert without_prefix > 1e-3  # the prefix matters: the check can fail


@pytest.mark.parametrize("family", ["deberta-v2", "t5"])
def test_families_without_a_prefix_path_are_refused_in_one_line(family, family_dirs):
    from conftest import family_head
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    head = family_head(family)
    backbone = load_backbone(family_dirs[family], head, num_labels=2)
    with pytest.raises(ValueError) as error:
        PromptModel(backbone, head, 2, LABEL_WORDS, prompt_type="deep")
    assert "\n" not in str(error.value) and "--prompt-type shallow" in str(error.value)


def test_stacked_deep_prompts_equal_a_loop_and_reach_second_derivatives(family_dirs):
    """Llama: one key/value head for two query heads."""
    model = deep_model(family_dirs["llama"], "classifier", seed=5)
    batch = model.encode(TEXTS, [0, 1, 1, 0, 1])
    params = dict(model.params)
    variants = torch.stack([params["prompt"] * s for s in (1.0, 0.5, -0.7)])  # (G, P, W)
    stacked = model.loss({**params, "prompt": variants}, batch)  # (G, B)
    loop = torch.stack([model.loss({**params, "prompt": v}, batch) for v in variants])
    assert stacked.shape == (3, 5) and (stacked - loop).abs().max() < 1e-5
    deltas = 0.1 * torch.randn(2, *batch.input_ids.shape, model.embedding_dim)  # G input perturbations, one prompt
    stacked = model.loss(params, batch, input_perturbation=deltas)
    loop = torch.stack([model.loss(params, batch, input_perturbation=d) for d in deltas])
    assert stacked.shape == (2, 5) and (stacked - loop).abs().max() < 1e-5
    prompt = params["prompt"].clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # as landscape.hessian does: the fused CPU kernel has no double backward
        (gradient,) = torch.autograd.grad(model.loss({**params, "prompt": prompt}, batch).mean(), prompt,
                                          create_graph=True)
        (hvp,) = torch.autograd.grad((gradient * torch.randn_like(prompt)).sum(), prompt)
    assert gradient.abs().sum() > 0 and hvp.abs().sum() > 0
    # every layer's block takes gradient
    blocks = gradient.detach().reshape(3, model.prefix_shape.layers, -1).abs().sum((0, 2))
    assert (blocks > 0).all()


def test_deep_checkpoint_round_trip_and_peft_seq_cls_format(family_dirs, tmp_path):
    """Bitwise round trip; PEFT reads our SEQ_CLS prefix file into its prefix encoder (its SEQ_CLS forward
    refuses prefix tuning on transformers 5, so the format is what can be checked), and we read PEFT's."""
    import transformers
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    directory = family_dirs["bert"]
    model = deep_model(directory, "classifier", seed=6)
    meta = {"model": directory, "head": "classifier", "kind": model.kind, "num_labels": 2, "prompt_type": "deep",
            "template": "{text}"}
    out = save_checkpoint(tmp_path / "ours", model.params, meta, None, model.backbone.config)
    loaded = load_checkpoint(out)
    assert all(torch.equal(loaded.params[k], v) for k, v in model.params.items())
    assert torch.equal(loaded.build_model().predict(TEXTS), model.predict(TEXTS))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(directory)
    peft_model = PeftModel.from_pretrained(base, out)
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight.detach(), model.params["prompt"])
    fresh = get_peft_model(transformers.AutoModelForSequenceClassification.from_pretrained(directory),
                           PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    fresh.save_pretrained(tmp_path / "peft")
    theirs = load_checkpoint(tmp_path / "peft")
    assert theirs.prompt_type == "deep" and theirs.params["prompt"].shape == model.params["prompt"].shape
    assert torch.isfinite(theirs.build_model().predict(TEXTS)).all()


def test_prompt_perturbations_of_a_deep_prompt_are_relative_to_each_layers_scale(family_dirs):
    from ptp_core.training import perturb

    model = deep_model(family_dirs["gpt2"], "classifier", seed=8, length=6)
    params = dict(model.params)
    blocks = model.prompt_blocks  # keys and values of every layer
    scaled = params["prompt"].reshape(6, blocks, -1) * torch.linspace(0.1, 10, blocks)[None, :, None]
    params["prompt"] = scaled.reshape(6, -1)  # layers at scales 100x apart
    unit = perturb.prompt_unit(model, params["prompt"]).reshape(blocks, -1)
    expected = scaled.pow(2).mean(dim=(0, 2)).sqrt()  # (2L,)
    assert torch.allclose(unit[:, 0], expected) and (unit == unit[:, :1]).all()
    config = perturb.PerturbConfig(target="prompt", sigma=0.5, rho=0.2)
    noise = perturb.random_noise(tuple(params["prompt"].shape), config.sigma * perturb.prompt_unit(model, params["prompt"]),
                                 "gaussian", torch.Generator().manual_seed(0), params["prompt"])
    ratio = noise.reshape(6, blocks, -1).pow(2).mean(dim=(0, 2)).sqrt() / expected  # about sigma in every block
    assert ((ratio - 0.5).abs() < 0.1).all()
    batch = model.encode(TEXTS, [0, 1, 1, 0, 1])
    prompt = params["prompt"].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model.loss({**params, "prompt": prompt}, batch).mean(), prompt)
    offset = perturb.sam_prompt(model, params, batch, config, gradient)
    # one ascent step to the ball's surface in layer units: |offset / unit| = rho * sqrt(P * W)
    size = (offset / perturb.prompt_unit(model, params["prompt"])).norm()
    assert abs(size / (config.rho * offset.numel() ** 0.5) - 1) < 1e-5
    clean = model.loss(params, batch).mean()
    assert model.loss({**params, "prompt": params["prompt"] + offset}, batch).mean() > clean  # an ascent


def test_per_layer_curvature_equals_the_blocks_of_a_dense_hessian(family_dirs):
    from landscape.measures.layer_curvature import layer_curvature

    model = deep_model(family_dirs["gpt2"], "classifier", seed=9, length=2, dtype=torch.float64)
    batch = model.encode(TEXTS, [0, 1, 1, 0, 1])
    head = {k: v for k, v in model.params.items() if k != "prompt"}
    prompt = model.params["prompt"]  # (2, L*2*H*d)

    def loss_fn(p):
        return model.loss({**head, **p}, batch).mean()

    with sdpa_kernel(SDPBackend.MATH):
        dense = torch.autograd.functional.hessian(lambda x: loss_fn({"prompt": x.reshape(prompt.shape)}),
                                                  prompt.reshape(-1))  # (N, N) float64
    layers = model.prefix_shape.layers
    index = torch.arange(prompt.numel()).reshape(prompt.shape[0], layers, -1)  # which entries are layer l's
    result = layer_curvature(loss_fn, {"prompt": prompt}, layers, trace=True, tol=1e-10, trace_hvps=3 * index[:, 0].numel())
    for layer in range(layers):
        block = index[:, layer].reshape(-1)
        expected = dense[block][:, block]
        top = torch.linalg.eigvalsh(expected)[-1].item()
        assert abs(result["layer_hessian_top_eigenvalue"][layer] - top) < 1e-6 * max(1.0, abs(top))
        # Hutch++ with as many sketch vectors as the block has coordinates is exact
        assert abs(result["layer_hessian_trace"][layer] - expected.trace().item()) < 1e-6 * max(1.0, abs(top))
    assert abs(sum(result["layer_hessian_trace"]) - dense.trace().item()) < 1e-6 * dense.abs().max().item()


def test_filter_normalization_of_a_deep_prompt_is_per_token_and_layer(family_dirs):
    from landscape.grid.directions import prompt_directions

    model = deep_model(family_dirs["llama"], "classifier", seed=10)
    batch = model.encode(TEXTS, [0, 1, 1, 0, 1])
    plane = prompt_directions(model, dict(model.params), [batch], kind="gradient", norm="filter", seed=0)
    layers = model.prefix_shape.layers
    for direction in (plane.d1["prompt"], plane.d2["prompt"]):
        rows = direction.double().reshape(3 * layers, -1).norm(dim=1)
        reference = model.params["prompt"].double().reshape(3 * layers, -1).norm(dim=1)
        assert torch.allclose(rows, reference, rtol=1e-5)
    assert abs(float((plane.d1["prompt"].double() * plane.d2["prompt"].double()).sum())) < 1e-6 * float(
        plane.d1["prompt"].double().norm() ** 2)


def test_prefix_projection_trains_the_mlp_and_saves_its_prefix(family_dirs, toy_csv, tmp_path):
    """The MLP's gradient is the chain rule through the prefix's; the checkpoint holds the MLP's output."""
    from ptp_core.model import projection
    from ptp_core.train import TrainConfig, initial_params, train
    from ptp_core.training.perturb import PerturbConfig

    config = TrainConfig(model=family_dirs["bert"], task=toy_csv, out=str(tmp_path / "run"), steps=4, batch_size=8,
                         prompt_length=2, eval_every=2, eval_examples=8, test_examples=8, progress=False,
                         dtype="float32", prompt_type="deep", prefix_projection=True, prefix_hidden=8,
                         method="ptp-rn", perturb=PerturbConfig(target="prompt", reg_warmup=0, reg_ramp=0))
    model = deep_model(family_dirs["bert"], "classifier")
    trainable, reparam = initial_params(config, model, torch.Generator().manual_seed(0))
    assert trainable[projection.OUT_W].shape == (model.prompt_width, 8)
    batch = model.encode(TEXTS, [0, 1, 1, 0, 1])
    params = reparam.forward(trainable)
    model.loss(params, batch).mean().backward()
    reparam.backward(params, trainable)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in trainable.items()}
    direct = model.loss({**{k: v for k, v in leaves.items() if not k.startswith(projection.PREFIX)},
                         "prompt": projection.prefix(leaves)}, batch).mean()
    for name, gradient in zip(leaves, torch.autograd.grad(direct, list(leaves.values()))):
        assert torch.allclose(trainable[name].grad, gradient, atol=1e-6), name
    out = train(config)
    saved = load_checkpoint(out)
    assert saved.params["prompt"].shape == (2, model.prompt_width) and saved.meta["prefix_projection"]
    assert json.loads((out / "adapter_config.json").read_text())["prefix_projection"] is False


@pytest.mark.slow
@pytest.mark.parametrize("family,head", [("bert", "classifier"), ("gpt2", "verbalizer")])
def test_deep_prompt_end_to_end_train_then_plot_both_spaces_with_curvature(family, head, tiny_dirs, toy_csv,
                                                                          tmp_path):
    import subprocess
    import sys

    run = tmp_path / "runs" / "deep"
    command = [sys.executable, "-m", "ptp_core.train", "--model", tiny_dirs[family], "--head", head, "--task", toy_csv,
               "--prompt-type", "deep", "--method", "ptp-adv", "--target", "prompt", "--reg-warmup", "0",
               "--steps", "4", "--batch-size", "8", "--prompt-len", "2", "--eval-every", "2", "--snapshot-every", "1",
               "--eval-examples", "8", "--test-examples", "8", "--out", str(run), "--no-progress"]
    if head == "verbalizer":
        command += ["--label-words", "negative,positive", "--template", TEMPLATE]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    figures = tmp_path / "fig"
    result = subprocess.run([sys.executable, "-m", "landscape.plot", str(run), "--out", str(figures), "--grid", "3",
                             "--examples", "8", "--space", "both", "--metrics", "surface,hessian,trace,sharpness",
                             "--metric-examples", "8", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((figures / "metrics.json").read_text())[0]
    assert row["prompt_type"] == "deep" and len(row["layer_hessian_top_eigenvalue"]) == 2
    assert all(v == v for v in row["layer_hessian_trace"]) and row["hessian_eigenvalues"][0] == row["hessian_eigenvalues"][0]
    assert (figures / "layer_curvature.pdf").is_file() or (figures / "layer_curvature.png").is_file()
    assert "per layer" in (figures / "metrics.md").read_text()
    spec = json.loads(next((figures / "surfaces").glob("*-prompt.json")).read_text())
    assert spec["prompt_type"] == "deep"


def test_cli_refuses_deep_prompts_where_they_cannot_run_in_one_line(family_dirs, toy_csv, tmp_path):
    import subprocess
    import sys

    for model, extra, message in ((family_dirs["deberta-v2"], ["--prompt-type", "deep"], "attention interface"),
                                  (family_dirs["bert"], ["--prefix-projection"], "add --prompt-type deep")):
        out = tmp_path / "run"
        result = subprocess.run([sys.executable, "-m", "ptp_core.train", "--model", model, "--task", toy_csv,
                                 "--steps", "1", "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr and not out.exists()


def test_connectivity_and_spectrum_run_on_deep_prompts(family_dirs, toy_csv):
    """Two deep prompts: both paths between them end at each (t = 0 and 1 are the checkpoints); the spectrum's
    weights sum to one; sharpness runs."""
    from landscape.connect.run import ConnectConfig, connect_params
    from landscape.measures.row import MetricsConfig, measure
    from ptp_core.tasks.load import load_task

    task = load_task(toy_csv)
    model = deep_model(family_dirs["roberta"], "classifier", seed=11, length=2)
    other = {**model.params, "prompt": deep_model(family_dirs["roberta"], "classifier", seed=12, length=2).params["prompt"]}
    result = connect_params(model, dict(model.params), other, task.splits["train"], task.splits["test"],
                            ConnectConfig(steps=2, batch_size=8, points=3, examples=8, dtype="float32"), progress=False)
    ends = [model.loss(p, model.encode(task.splits["test"].texts[:8], task.splits["test"].labels[:8])).mean().item()
            for p in (model.params, other)]
    assert abs(result.linear.losses[0] - ends[0]) < 1e-5 and abs(result.curve.losses[-1] - ends[1]) < 1e-5
    row = measure(model, dict(model.params), task.splits["test"], None,
                  MetricsConfig(which=("spectrum", "sharpness"), examples=8, spectrum_probes=2, spectrum_steps=5))
    assert abs(sum(row["hessian_spectrum_weights"]) - 1) < 1e-6 and row["worst_case_sharpness"] >= 0
    assert row["prompt_type"] == "deep"


def test_one_comparison_of_a_shallow_and_a_deep_prompt_builds_a_model_for_each(tiny_dirs, toy_csv, tmp_path):
    """Same backbone, head and task: each checkpoint is still measured on a model of its own prompt type, and
    the two are two groups ("pt", "pt (deep)")."""
    from landscape.compare import compare
    from landscape.grid.spec import SurfaceSpec
    from landscape.measures.row import MetricsConfig
    from ptp_core.train import TrainConfig, train

    runs = [train(TrainConfig(model=tiny_dirs["bert"], head="classifier", task=toy_csv, prompt_type=kind, steps=2,
                              batch_size=8, prompt_length=2, eval_every=2, eval_examples=8, test_examples=8,
                              progress=False, dtype="float32", out=str(tmp_path / kind)))
            for kind in ("shallow", "deep")]
    comparison = compare(runs, SurfaceSpec(grid="3", examples=8, dtype="float32"), MetricsConfig(which=("surface",)),
                         tmp_path / "fig", device="cpu", progress=False)
    rows = {row["checkpoint"]: row for row in comparison.rows}
    for run in runs:
        expected = json.loads((run / "ptp.json").read_text())["metrics"]["test_loss"]
        assert abs(rows[str(run)]["center_loss"] - expected) < 1e-5  # the centre is the checkpoint's own loss
    assert [rows[str(run)]["prompt_type"] for run in runs] == ["shallow", "deep"]
    assert [rows[str(run)]["method"] for run in runs] == ["pt", "pt (deep)"]  # two groups in figures and statistics
    assert sorted(comparison.by_method("prompt")) == ["pt", "pt (deep)"]
