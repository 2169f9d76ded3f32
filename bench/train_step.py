"""Training-step time of pt, ptp-rn, ptp-adv as ratios to pt; our pt against PEFT's; PTPTrainer against our loop;
a deep prompt's step against the shallow one and against PEFT's prefix tuning.

    python bench/train_step.py [--models minilm,smollm2] [--repeats 5] [--steps 2]
    python bench/train_step.py --models smollm2 --head lm --variants pt,peft,trainer-pt   # the LM row

Same backbone weights and the same batch for every variant; one step is zero_grad, the method's
gradients, gradient clipping and an AdamW step, as in the trainer. PEFT is prompt tuning with
peft.get_peft_model(PromptTuningConfig) on its own copy of the backbone and the same loop: SEQ_CLS for
the minilm classifier; CAUSAL_LM for the smollm2 verbalizer, where PEFT computes full-vocabulary
logits at every position and we read the label words at the answer position only. Variants are
interleaved and each time is the median over repeats, so load from other processes hits all alike.
PTPTrainer (ptp_core.hf) runs on a PEFT prompt model of its own copy of the backbone (SEQ_CLS or CAUSAL_LM
with the label words), dropout off as in our loop; its step is Trainer's training_step (the loss and its
backward), gradient clipping and an AdamW step, as Trainer's loop takes them (no data loader or callbacks).
The deep prompt (prompt_type="deep", the same length) trains pt in our loop on the same backbone; PEFT's prefix
tuning runs only where PEFT runs it, CAUSAL_LM (smollm2), in the same loop as PEFT's prompt tuning.
--head lm (smollm2): rotten_tomatoes as text-to-text, the label names as targets after the cloze; our step is the
--head lm loss (the LM head run only at the positions that predict a target token), PEFT's is CAUSAL_LM prompt
tuning on `labels` (input + target in input_ids, -100 on the input), as its guide trains it: its forward computes
full-vocabulary logits at every position and HF's labels loss. PTPTrainer gets the same labels.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import date

import torch
import torch.nn.functional as F

from ptp_core.model.backbones import load_backbone
from ptp_core.model.prompt_model import PromptModel
from ptp_core.tasks.load import load_task
from ptp_core.training.perturb import PerturbConfig, ptp_gradients

HEADS = {"minilm": "classifier", "smollm2": "verbalizer"}  # each model's default; --head lm for smollm2
IGNORE = -100  # HF's ignore_index: a label that is not scored
VARIANTS = {"pt": "pt", "rn": "ptp-rn (input)", "adv1": "ptp-adv K=1 (input)", "adv3": "ptp-adv K=3 (input)",
            "free3": "ptp-adv K=3 FreeLB", "peft": "PEFT prompt tuning", "trainer-pt": "PTPTrainer pt",
            "trainer-rn": "PTPTrainer ptp-rn (input)", "trainer-adv1": "PTPTrainer ptp-adv K=1 (input)",
            "deep": "deep prompt pt", "peft-prefix": "PEFT prefix tuning (CAUSAL_LM)"}
DEEP_GOAL = 1.2  # our deep step at most this many times our shallow pt step; and no slower than PEFT's prefix step
TRAINER_GOAL = 1.1  # a PTPTrainer step at most this many times our loop's step of the same method
OURS_OF = {"trainer-pt": "pt", "trainer-rn": "rn", "trainer-adv1": "adv1"}  # the loop each Trainer step is held to
STEP_GOALS = {"ptp-adv K=1 (input)": 2.3, "ptp-adv K=3 (input)": 4.3, "ptp-adv K=3 FreeLB": 4.3}  # x our pt


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ours(model: PromptModel, batch, method: str, config: PerturbConfig, prompt_length: int):
    """A step function for our trainer's loop (same as train.py: gradients, clip, AdamW)."""
    generator = torch.Generator().manual_seed(0)
    params = {k: v.clone().requires_grad_(True) for k, v in
              model.init_params(prompt_length, "vocab", generator).items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if method == "pt":
            model.loss(params, batch).mean().backward()
        else:
            ptp_gradients(model, params, batch, method, config, generator)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
    return step


def hf_labels(batch) -> torch.Tensor:
    """(B, T) labels as PEFT's causal guide builds them, aligned with input_ids (HF shifts them by one): our
    target_ids hold at position t the token that t predicts, i.e. the label of position t + 1."""
    return torch.cat([torch.full_like(batch.target_ids[:, :1], IGNORE), batch.target_ids[:, :-1]], dim=1)


def peft_step(name: str, head: str, batch, label_ids: torch.Tensor, prompt_length: int):
    """A step function for PEFT prompt tuning on a fresh copy of the backbone, same loop."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    backbone = load_backbone(name, head, 2)
    task = TaskType.SEQ_CLS if head == "classifier" else TaskType.CAUSAL_LM
    model = get_peft_model(backbone.model, PromptTuningConfig(task_type=task, num_virtual_tokens=prompt_length))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    rows = torch.arange(len(batch))
    labels = hf_labels(batch) if head == "lm" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        if head == "classifier":
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        elif head == "lm":  # full-vocabulary logits at every position and HF's labels loss, as PEFT computes it
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, P+T, V)
            picked = logits[rows, prompt_length + batch.answer_index][:, label_ids]  # (B, C)
            loss = F.cross_entropy(picked.float(), batch.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    return step


def peft_prefix_step(name: str, head: str, batch, label_ids: torch.Tensor, prompt_length: int):
    """A step function for PEFT's CAUSAL_LM prefix tuning on a fresh copy of the backbone, same loop: the prefix is
    a cache before the text, so the label words are read at the answer position itself (--head lm: labels)."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(load_backbone(name, head, 2).model,
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt_length))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    rows = torch.arange(len(batch))
    labels = hf_labels(batch) if head == "lm" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        if head == "lm":
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
            loss = F.cross_entropy(logits[rows, batch.answer_index][:, label_ids].float(), batch.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    return step


def trainer_step(name: str, head: str, batch, method: str, config: PerturbConfig, prompt_length: int,
                 label_words: list[str]):
    """A step function of PTPTrainer on a PEFT prompt model of a fresh copy of the backbone, dropout off."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import TrainingArguments

    from ptp_core.hf import PTPTrainer

    backbone = load_backbone(name, head, 2)
    for module in backbone.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # our loop's backbone runs in eval mode; Trainer's training_step sets train mode
    task = TaskType.SEQ_CLS if head == "classifier" else TaskType.CAUSAL_LM
    model = get_peft_model(backbone.model, PromptTuningConfig(task_type=task, num_virtual_tokens=prompt_length))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, learning_rate=1e-3)
    trainer = PTPTrainer(model=model, args=args, processing_class=backbone.tokenizer, method=method,
                         perturb=replace(config, reg_warmup=0, reg_ramp=0),  # lam > 0 at step 1, as ours
                         label_words=label_words if head == "verbalizer" else None)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    labels = hf_labels(batch) if head == "lm" else batch.labels
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}
    if batch.token_type_ids is not None:
        inputs["token_type_ids"] = batch.token_type_ids

    def step():
        trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(trainable, 1.0)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
    return step


def measure(steps: dict, repeats: int, per_repeat: int) -> dict[str, float]:
    """Median seconds per step of each step function, interleaved over repeats (one warm-up step each)."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_repeat):
                step()
            times[name].append((time.perf_counter() - start) / per_repeat)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(name: str, batch_size: int, max_length: int, prompt_length: int, repeats: int, per_repeat: int,
                variants: list[str], head: str | None = None):
    """Median seconds per step of each chosen variant on one model, the same batch for all (head: the model's
    default from HEADS, or lm: the label names as target texts)."""
    head = head or HEADS[name]
    task = load_task("rotten_tomatoes")
    backbone = load_backbone(name, head, task.num_labels)
    template = task.template if head in ("verbalizer", "lm") else "{text}"
    words = task.label_names if head == "lm" else task.label_words  # lm: the label names, as train.py's targets
    model = PromptModel(backbone, head, task.num_labels, words, template, max_length)
    train = task.splits["train"]
    batch = model.encode(train.texts[:batch_size], train.labels[:batch_size])
    base = PerturbConfig(target="input")
    deep = PromptModel(backbone, head, task.num_labels, words, template, max_length, prompt_type="deep")
    makers = {
        "deep": lambda: ours(deep, batch, "pt", base, prompt_length),
        "peft-prefix": lambda: peft_prefix_step(name, head, batch, model.label_ids, prompt_length),
        "pt": lambda: ours(model, batch, "pt", base, prompt_length),
        "rn": lambda: ours(model, batch, "ptp-rn", base, prompt_length),
        "adv1": lambda: ours(model, batch, "ptp-adv", replace(base, adv_steps=1), prompt_length),
        "adv3": lambda: ours(model, batch, "ptp-adv", replace(base, adv_steps=3), prompt_length),
        "free3": lambda: ours(model, batch, "ptp-adv", replace(base, adv_steps=3, adv_free=True), prompt_length),
        "peft": lambda: peft_step(name, head, batch, model.label_ids, prompt_length),
        "trainer-pt": lambda: trainer_step(name, head, batch, "pt", base, prompt_length, task.label_words),
        "trainer-rn": lambda: trainer_step(name, head, batch, "ptp-rn", base, prompt_length, task.label_words),
        "trainer-adv1": lambda: trainer_step(name, head, batch, "ptp-adv", replace(base, adv_steps=1), prompt_length,
                                             task.label_words),
    }
    if head == "classifier":  # PEFT's SEQ_CLS prefix tuning does not run on transformers 5
        variants = [v for v in variants if v != "peft-prefix"]
    chosen = dict.fromkeys(["pt", *variants, *[OURS_OF[v] for v in variants if v in OURS_OF]])  # ordered, unique
    steps = {VARIANTS[k]: makers[k]() for k in chosen}
    seconds = measure(steps, repeats, per_repeat)
    return head, tuple(batch.input_ids.shape), seconds


def goal(variant: str, seconds: dict[str, float], head: str) -> str:
    """The goal column: met or MISSED, for the variants that have a goal."""
    ratio = seconds[variant] / seconds["pt"]
    if variant in STEP_GOALS:
        return f"<= {STEP_GOALS[variant]}: {'met' if ratio <= STEP_GOALS[variant] else 'MISSED'}"
    if variant.startswith("PEFT prompt") and head == "lm":
        to_ours = seconds["pt"] / seconds[variant]
        return f"our pt {to_ours:.2f}x this, <= 1.0: {'met' if to_ours <= 1.0 else 'MISSED'}"
    if variant.startswith("PEFT prompt"):
        wanted = "> 1 (verbalizer)" if head == "verbalizer" else ">= 1"
        met = ratio > 1 if head == "verbalizer" else ratio >= 0.97  # 3%: timing noise
        return f"{wanted}: {'met' if met else 'MISSED'}"
    key = next((k for k, v in VARIANTS.items() if v == variant), "")
    if key == "deep":
        return f"<= {DEEP_GOAL}: {'met' if ratio <= DEEP_GOAL else 'MISSED'}"
    if key == "peft-prefix" and VARIANTS["deep"] in seconds:
        to_ours = seconds[VARIANTS["deep"]] / seconds[variant]
        return f"our deep step {to_ours:.2f}x this, <= 1: {'met' if to_ours <= 1 else 'MISSED'}"
    if key in OURS_OF:
        ours_name = VARIANTS[OURS_OF[key]]
        to_ours = seconds[variant] / seconds[ours_name]
        return (f"{to_ours:.2f}x our {ours_name}, <= {TRAINER_GOAL}: "
                f"{'met' if to_ours <= TRAINER_GOAL else 'MISSED'}")
    return ""


def main() -> None:
    """Parse the flags, measure every model and print one Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"from {','.join(VARIANTS)}; pt always runs, and each trainer-* with our step of its method")
    p.add_argument("--head", default=None, choices=("classifier", "verbalizer", "lm"),
                   help="default: classifier for minilm, verbalizer for smollm2; lm: the LM row (smollm2)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 for minilm, 8 for smollm2")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="steps per repeat")
    args = p.parse_args()
    from ptp_core.cli import quiet_transformers

    quiet_transformers()
    torch.manual_seed(0)
    print(f"# Training-step benchmark, {date.today().isoformat()}\n")
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved repeats x {args.steps} step(s), float32, prompt length "
          f"{args.prompt_len}; default PTP settings ({PerturbConfig()}).\n")
    print("| model (head) | batch (B, T) | variant | ms / step | ratio to our pt | goal |")
    print("|---|---|---|---:|---:|---|")
    for name in args.models.split(","):
        batch_size = args.batch_size or (32 if name == "minilm" else 8)
        head, shape, seconds = bench_model(name, batch_size, args.max_length, args.prompt_len, args.repeats,
                                           args.steps, args.variants.split(","), args.head)
        for variant, value in seconds.items():
            print(f"| {name} ({head}) | {shape} | {variant} | {1000 * value:.0f} | {value / seconds['pt']:.2f} | "
                  f"{goal(variant, seconds, head)} |", flush=True)


if __name__ == "__main__":
    main()
