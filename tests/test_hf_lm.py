"""PTPTrainer and from_peft on PEFT's guide setup: a CAUSAL_LM or SEQ_2_SEQ_LM prompt model trained on `labels`.

References: PEFT's own forward with `labels` (its loss and, by autograd, its gradients) on batches built here the
way PEFT's guides build them (causal: input then target in input_ids, labels -100 on the input; seq2seq: labels are
the decoder's targets), PEFT's forward on explicitly perturbed input embeddings, our loop's PromptModel on a copy of
the backbone (not through ptp_core.hf), and plain SGD arithmetic; under torchrun, one process on the same global
batch (this file is also the worker).
"""
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer
from ptp_core.training.perturb import PerturbConfig, pgd_input, ptp_gradients
from test_hf import SGD_STEP, TOLERANCE, step_noise, trainer_for

IGNORE = -100  # HF's ignore_index, written out: the reference does not read ptp_core's constant
EXAMPLES = [("the movie was really good and the acting superb", "good film"),
            ("dull", "the plot was boring and the story quite weak"),
            ("a lovely film", "fun"),
            ("it was quite a messy story", "bad")]
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": {},
              "t5": dict(dropout_rate=0.0)}
SETUPS = {  # name -> (family, PEFT task type, prompt type)
    "gpt2": ("gpt2", "CAUSAL_LM", "shallow"),
    "llama-prefix": ("llama", "CAUSAL_LM", "deep"),
    "t5": ("t5", "SEQ_2_SEQ_LM", "shallow"),
}


@pytest.fixture(scope="module")
def bases(tiny_dirs):
    """family -> (tiny LM with dropout off, its tokenizer), built once; each test wraps a deep copy."""
    import transformers

    from families import build_config

    out = {}
    for family in ("gpt2", "llama"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[family], **NO_DROPOUT[family])
        out[family] = model.eval(), make_tokenizer("causal")
    torch.manual_seed(0)
    config = build_config("t5")
    config.dropout_rate = 0.0
    out["t5"] = transformers.T5ForConditionalGeneration(config).eval(), make_tokenizer("seq2seq")
    return out


def peft_lm(bases, setup: str, seed: int = 0):
    """A PEFT prompt model (prompt or prefix tuning, 3 virtual tokens) on a copy of the tiny LM, its tensors moved
    off their init; the tokenizer; and a pristine copy of the LM for our loop."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    family, task_type, prompt_type = SETUPS[setup]
    base, tokenizer = bases[family]
    config = (PrefixTuningConfig if prompt_type == "deep" else PromptTuningConfig)(task_type=task_type,
                                                                                  num_virtual_tokens=3)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn_like(parameter))
    return model, tokenizer, copy.deepcopy(base)


def guide_rows(tokenizer, seq2seq: bool, examples=EXAMPLES) -> list[dict]:
    """One example per dict as PEFT's guides tokenize it; `input_tokens`: how many input tokens are text (not the
    tokenizer's end-of-sequence token after a seq2seq input)."""
    rows = []
    for text, target in examples:
        source = tokenizer(text).input_ids
        if seq2seq:
            rows.append({"input_ids": source, "labels": tokenizer(target).input_ids,
                         "input_tokens": len(source) - 1})
        else:
            written = tokenizer(" " + target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            rows.append({"input_ids": source + written, "labels": [IGNORE] * len(source) + written,
                         "input_tokens": len(source)})
    return rows


def collate(rows: list[dict], pad: int, side: str = "right", seq2seq: bool = False) -> tuple[dict, torch.Tensor]:
    """The padded batch (input_ids, attention_mask, labels) and the mask of the input's text tokens (B, T)."""
    width = max(len(r["input_ids"]) for r in rows)
    label_width = max(len(r["labels"]) for r in rows) if seq2seq else width

    def padded(values, fill, size):
        extra = [fill] * (size - len(values))
        return extra + values if side == "left" and size == width else values + extra

    ids = torch.tensor([padded(r["input_ids"], pad, width) for r in rows])
    attention = torch.tensor([padded([1] * len(r["input_ids"]), 0, width) for r in rows])
    labels = torch.tensor([padded(r["labels"], IGNORE, label_width) for r in rows])
    text = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        start = width - len(r["input_ids"]) if side == "left" else 0
        text[i, start:start + r.get("input_tokens", 0)] = True
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}, text


def our_loop(pristine, tokenizer, setup: str, prompt: torch.Tensor):
    """Our loop's --head lm PromptModel on the pristine copy (template "{text}": the target follows the input after a
    space) and leaf params holding PEFT's prompt."""
    from ptp_core.model.backbones import Backbone
    from ptp_core.model.prompt_model import PromptModel

    _, task_type, prompt_type = SETUPS[setup]
    kind = "seq2seq" if task_type == "SEQ_2_SEQ_LM" else "causal"
    backbone = Backbone(pristine.requires_grad_(False), tokenizer, kind, setup, setup)
    model = PromptModel(backbone, "lm", 0, None, "{text}", prompt_type=prompt_type)
    return model, {"prompt": prompt.detach().clone().requires_grad_(True)}


def peft_prompt_weight(peft):
    """PEFT's trained table: (P, D), or (2P, D) for SEQ_2_SEQ_LM prompt tuning, whose second block is never used."""
    return peft.prompt_encoder["default"].embedding.weight


def peft_alone(peft, rows: list[dict], pad: int) -> torch.Tensor:
    """PEFT's labels loss over the examples' target tokens, each example run alone (no padding)."""
    losses, counts = [], []
    for row in rows:
        inputs = collate([row], pad)[0]
        losses.append(peft(**inputs).loss)
        counts.append((inputs["labels"][:, 1:] != IGNORE).sum())
    return sum(loss * count for loss, count in zip(losses, counts)) / sum(counts)


@pytest.mark.parametrize("setup,side", [("gpt2", "right"), ("gpt2", "left"), ("llama-prefix", "right"),
                                        ("llama-prefix", "left"), ("t5", "right")])
def test_trainer_loss_and_gradient_are_peft_labels_loss(bases, tmp_path, setup, side):
    """PTPTrainer's pt loss on the guide's batch == peft_model(**batch).loss (a deep prompt on left padding: PEFT's
    loss of each example alone, which PEFT's padded forward is not), its prompt gradient == autograd of that;
    from_peft gives head lm whose loss on our loop's encoding of the same examples is PEFT's too, and with right
    padding the Trainer's batch is exactly our loop's (tokens, targets, text mask)."""
    from ptp_core import from_peft
    from ptp_core.hf import batch_from_inputs

    peft, tokenizer, _ = peft_lm(bases, setup)
    seq2seq = SETUPS[setup][1] == "SEQ_2_SEQ_LM"
    rows = guide_rows(tokenizer, seq2seq)
    inputs, text = collate(rows, tokenizer.pad_token_id, side, seq2seq)
    weight = peft_prompt_weight(peft)
    alone = SETUPS[setup][2] == "deep" and side == "left"
    reference = peft_alone(peft, rows, tokenizer.pad_token_id) if alone else peft(**inputs).loss
    if alone:  # PEFT's forward counts a left-padded row's positions from the padding
        assert abs(peft(**inputs).loss.item() - reference.item()) > 1e-3
    (expected,) = torch.autograd.grad(reference, [weight])
    trainer = trainer_for(peft, tokenizer, tmp_path)
    assert trainer.prompt_model.head == "lm"
    batch = batch_from_inputs(trainer.prompt_model, inputs)
    assert torch.equal(batch.text_mask, text)
    loss = trainer.compute_loss(peft, inputs)
    loss.backward()
    assert abs(loss.item() - reference.item()) < TOLERANCE, (loss.item(), reference.item())
    assert (weight.grad - expected).abs().max().item() < TOLERANCE

    model, params = from_peft(peft, tokenizer)
    assert model.head == "lm" and model.prompt_type == SETUPS[setup][2]
    encoded = model.encode([{"text": t, "target": y} for t, y in EXAMPLES])
    if side == "right":
        for field in ("input_ids", "attention_mask", "target_ids", "text_mask"):
            assert torch.equal(getattr(encoded, field), getattr(batch, field)), field
        with torch.no_grad():
            ours = model.loss(params, encoded).mean().item()
        assert abs(ours - reference.item()) < TOLERANCE
    with pytest.raises(ValueError, match="no class logits"):
        model.logits(params, encoded)


@pytest.mark.parametrize("setup", ["gpt2", "t5"])
def test_input_perturbations_touch_the_input_tokens_only(bases, setup):
    """A perturbation of the input embeddings changes our loss exactly as PEFT's loss on the perturbed embeddings
    of the input's text tokens (left padding, so pads lead); put on target, padding and special tokens only, it
    changes nothing (PEFT's loss would move: the test can fail). PGD's delta is zero off the input's text."""
    from ptp_core import from_peft
    from ptp_core.hf import batch_from_inputs

    peft, tokenizer, _ = peft_lm(bases, setup)
    seq2seq = setup == "t5"
    inputs, text = collate(guide_rows(tokenizer, seq2seq), tokenizer.pad_token_id, "left", seq2seq)
    model, params = from_peft(peft, tokenizer)
    batch = batch_from_inputs(model, inputs)
    generator = torch.Generator().manual_seed(5)
    delta = torch.randn((*inputs["input_ids"].shape, model.embedding_dim), generator=generator)  # (B, T, D)
    embeds = peft.get_input_embeddings()(inputs["input_ids"])
    labels = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        clean = model.loss(params, batch).mean().item()
        for where, changes in ((text, True), (~text, False)):
            ours = model.loss(params, batch, input_perturbation=delta * where.unsqueeze(-1)).mean().item()
            theirs = peft(inputs_embeds=embeds + delta * where.unsqueeze(-1), **labels).loss.item()
            if changes:
                assert abs(ours - theirs) < TOLERANCE and abs(ours - clean) > 1e-3, (ours, theirs, clean)
            else:
                assert ours == clean and abs(theirs - clean) > 1e-3, (ours, theirs, clean)
    perturb = PerturbConfig(target="input", adv_steps=2, epsilon=0.3)
    zero = torch.zeros_like(delta, requires_grad=True)
    (gradient,) = torch.autograd.grad(model.loss(params, batch, input_perturbation=zero).mean(), [zero])
    adversarial = pgd_input(model, params, batch, perturb, torch.Generator().manual_seed(0), gradient)
    assert adversarial[text].abs().sum() > 0 and adversarial[~text].abs().max().item() == 0


@pytest.mark.parametrize("method,target", [("ptp-rn", "input"), ("ptp-adv", "input"), ("ptp-adv", "text"),
                                           ("ptp-adv", "prompt")])
def test_ptp_through_the_trainer_is_our_loop(bases, tmp_path, method, target):
    """PTP in input space (and HotFlip, SAM): the Trainer's loss and prompt gradient on the guide's batch are our
    loop's on its own encoding of the examples, with each example's noise (GPT-2, prompt tuning)."""
    peft, tokenizer, pristine = peft_lm(bases, "gpt2")
    perturb = PerturbConfig(target=target, adv_steps=2, epsilon=0.3, rho=0.3, reg_weight=0.7, reg_warmup=0,
                            reg_ramp=0)
    inputs, _ = collate(guide_rows(tokenizer, False), tokenizer.pad_token_id)
    trainer = trainer_for(peft, tokenizer, tmp_path, method, perturb)
    loss = trainer.compute_loss(peft, inputs)
    loss.backward()
    weight = peft_prompt_weight(peft)
    model, params = our_loop(pristine, tokenizer, "gpt2", weight)
    batch = model.encode([{"text": t, "target": y} for t, y in EXAMPLES])
    noise = step_noise(perturb, 1, range(len(EXAMPLES)), batch.attention_mask)
    reference = ptp_gradients(model, params, batch, method, perturb, noise, 0.7)
    assert abs(loss.item() - reference["loss"]) < TOLERANCE
    assert abs(reference["perturbed_loss"] - reference["clean_loss"]) > 1e-4  # the perturbation moved the loss
    assert (weight.grad - params["prompt"].grad).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("method", ["pt", "ptp-rn"])
def test_accumulation_trains_on_the_token_mean_of_the_step(bases, tmp_path, method):
    """One SGD step, 2 x 2 accumulated == one batch of 4 == PEFT's labels loss on the 4 (the token mean over the
    step, not the mean of the two micro-batches' token means, which differs here); the logged loss is that token
    mean; evaluation gives PEFT's loss on the evaluated batch."""
    from transformers import DataCollatorForSeq2Seq

    perturb = PerturbConfig(target="input", reg_weight=0.7, reg_warmup=0, reg_ramp=0)
    dataset = [{k: v for k, v in row.items() if k != "input_tokens"} for row in guide_rows(bases["gpt2"][1], False)]
    prompts, logs = [], []
    for micro, accumulation in ((4, 1), (2, 2)):
        peft, tokenizer, _ = peft_lm(bases, "gpt2")
        start = peft_prompt_weight(peft).detach().clone()
        trainer = trainer_for(peft, tokenizer, tmp_path / str(micro), method, perturb, **SGD_STEP, logging_steps=1,
                              per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                              per_device_eval_batch_size=4, train_sampling_strategy="sequential")
        trainer.train_dataset, trainer.data_collator = dataset, DataCollatorForSeq2Seq(tokenizer)
        trainer.train()
        prompts.append(peft_prompt_weight(peft).detach().clone())
        logs.append(next(row for row in trainer.state.log_history if "loss" in row))
    evaluated = trainer.evaluate(dataset)["eval_loss"]
    peft, tokenizer, _ = peft_lm(bases, "gpt2")
    inputs, _ = collate(dataset, tokenizer.pad_token_id)
    loss = peft(**inputs).loss
    with torch.no_grad():
        halves = [peft(**collate(dataset[i:i + 2], tokenizer.pad_token_id)[0]).loss.item() for i in (0, 2)]
    assert abs(sum(halves) / 2 - loss.item()) > 1e-2  # the two micro-batches hold different target counts
    assert not torch.equal(prompts[0], start)
    assert (prompts[0] - prompts[1]).abs().max().item() < TOLERANCE
    if method == "pt":
        loss.backward()
        sgd = start - 0.5 * peft_prompt_weight(peft).grad  # one plain SGD step on PEFT's loss of the 4
        assert (prompts[0] - sgd).abs().max().item() < TOLERANCE
        assert all(abs(row["loss"] - loss.item()) < 1e-6 for row in logs), (logs, loss.item())
    for row in logs:  # Trainer's loss is the objective the logged parts make up, at either accumulation
        assert abs(row["loss"] - row["clean_loss"] - row.get("reg_weight", 0) * row.get("perturbed_loss", 0)) < 1e-5
    assert abs(logs[0]["clean_loss"] - logs[1]["clean_loss"]) < 1e-6
    trained = peft_lm(bases, "gpt2")[0]
    with torch.no_grad():
        peft_prompt_weight(trained).copy_(prompts[1])
        expected = trained(**inputs).loss.item()
    assert abs(evaluated - expected) < TOLERANCE and abs(evaluated - loss.item()) > 1e-4  # the trained prompt's


def test_what_is_not_exact_is_refused(bases, tmp_path):
    """Class labels without label words, a scored first token, labels that do not align or score nothing, a seq2seq
    batch with its own decoder inputs: one line each."""
    from ptp_core import from_peft
    from ptp_core.hf import batch_from_inputs

    cases = []
    peft, tokenizer, _ = peft_lm(bases, "gpt2")
    model = from_peft(peft, tokenizer)[0]
    inputs, _ = collate(guide_rows(tokenizer, False), tokenizer.pad_token_id)
    first = inputs["labels"].clone()
    first[0, 0] = inputs["input_ids"][0, 0]
    cases += [(model, {**inputs, "labels": torch.zeros(4, dtype=torch.long)}, "reads token labels"),
              (model, {**inputs, "labels": first}, "first token of a row"),
              (model, {**inputs, "labels": inputs["labels"][:, :-1]}, "must align with input_ids"),
              (model, {**inputs, "labels": torch.full_like(first, IGNORE)}, "score no token")]
    peft, tokenizer, _ = peft_lm(bases, "t5")
    seq2seq, _ = collate(guide_rows(tokenizer, True), tokenizer.pad_token_id, seq2seq=True)
    cases.append((from_peft(peft, tokenizer)[0], {**seq2seq, "decoder_input_ids": seq2seq["labels"]},
                  "drop decoder_input_ids"))
    for model, batch, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            batch_from_inputs(model, batch)
        assert "\n" not in str(error.value)


# ---- torchrun: this file is also the worker --------------------------------------------------------------

def ddp_train(model_dir: str, out: str, processes: int = 1) -> tuple[torch.Tensor, list[dict]]:
    """One SGD pt step of PTPTrainer on a PEFT CAUSAL_LM prompt model of the tiny GPT-2, the 4 examples as one global
    batch (with 2 processes, 2 each: 13 and 4 target tokens); the trained prompt and the logs."""
    import transformers
    from peft import PromptTuningConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from ptp_core.hf import PTPTrainer

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **NO_DROPOUT["gpt2"])
    peft = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    tokenizer = make_tokenizer("causal")
    dataset = [{k: v for k, v in row.items() if k != "input_tokens"} for row in guide_rows(tokenizer, False)]
    args = TrainingArguments(output_dir=out, report_to="none", use_cpu=True, seed=3, logging_steps=1,
                             per_device_train_batch_size=len(dataset) // processes, save_strategy="no",
                             train_sampling_strategy="sequential", ddp_backend="gloo" if processes > 1 else None,
                             **SGD_STEP)
    trainer = PTPTrainer(model=peft, args=args, processing_class=tokenizer, train_dataset=dataset,
                         data_collator=DataCollatorForSeq2Seq(tokenizer))
    trainer.train()
    return peft_prompt_weight(peft).detach().clone(), [row for row in trainer.state.log_history if "loss" in row]


@pytest.mark.slow
def test_torchrun_two_processes_train_on_the_token_mean_of_the_global_batch(tiny_dirs, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), micro-batches of 13 and 4 target tokens: both ranks take the SGD step
    of PEFT's labels loss on all 4 examples (the token mean over both processes), as one process does."""
    import transformers
    from peft import PromptTuningConfig, get_peft_model
    from safetensors.torch import load_file

    from conftest import run_torchrun

    run_torchrun(Path(__file__), tiny_dirs["gpt2"], str(tmp_path), pythonpath=(Path(__file__).parent,))
    single, logs = ddp_train(tiny_dirs["gpt2"], str(tmp_path / "single"))
    torch.manual_seed(0)  # the worker's PEFT model, untrained: the reference step
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], **NO_DROPOUT["gpt2"])
    peft = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    start = peft_prompt_weight(peft).detach().clone()
    loss = peft(**collate(guide_rows(make_tokenizer("causal"), False), 0)[0]).loss
    loss.backward()
    sgd = start - 0.5 * peft_prompt_weight(peft).grad
    assert (single - sgd).abs().max().item() < TOLERANCE and abs(logs[0]["loss"] - loss.item()) < 1e-6
    for rank in (0, 1):
        prompt = load_file(tmp_path / f"rank{rank}.safetensors")["prompt"]
        assert (prompt - sgd).abs().max().item() < TOLERANCE, rank
        assert abs(json.loads((tmp_path / f"rank{rank}.json").read_text())[0]["loss"] - loss.item()) < 1e-6


if __name__ == "__main__":  # a torchrun rank: MODEL_DIR OUT
    from safetensors.torch import save_file

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    prompt, logged = ddp_train(sys.argv[1], str(Path(sys.argv[2]) / f"trainer{rank}"), world)
    save_file({"prompt": prompt.contiguous()}, str(Path(sys.argv[2]) / f"rank{rank}.safetensors"))
    (Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(logged, indent=2, sort_keys=True))
    # leave as ptp_core.cli.run leaves a rank: torch.distributed's C++ side can abort at interpreter exit with gloo
    # ("terminate called without an active exception") after the work is saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
