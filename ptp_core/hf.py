"""PTP inside a user's own Hugging Face setup: a PEFT prompt model seen as our PromptModel, and a Trainer with PTP.

    model, params = from_peft(peft_model, tokenizer)        # in memory: landscapes right after trainer.train()
    trainer = PTPTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=...,
                         processing_class=tokenizer, method="ptp-adv", perturb=PerturbConfig(target="input"))

Both run the PEFT model's own frozen base model (nothing is copied) through PromptModel's one loss, with the
virtual tokens PEFT's prompt encoder produces and the head copy PEFT trains (modules_to_save) substituted.
A CAUSAL_LM or SEQ_2_SEQ_LM model trained on `labels`, as in PEFT's prompt-tuning guides, is our --head lm
(ptp_core.hf_inputs maps the guides' batches onto ours); with label_words it is the verbalizer.
PTPTrainer's loss is ptp_core.training.perturb.ptp_loss: the clean pass and the one perturbed_loss our own loop
differentiates (ptp_gradients), so Trainer's backward, gradient accumulation and loss scaling act on exactly our
objective.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer

from ptp_core.model.backbones import Backbone, model_kind
from ptp_core.hf_inputs import batch_from_inputs, lm_batch_from_inputs  # noqa: F401 (public here too)
from ptp_core.model.encoding import Batch
from ptp_core.model.prompt_model import PromptModel, cross_entropy
from ptp_core.tasks.task import DEFAULT_TEMPLATE
from ptp_core.training.config import METHODS
from ptp_core.training.noise import ExampleNoise, example_noise, keyed_generator
from ptp_core.training.perturb import PerturbConfig, ptp_loss

LM_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")  # trained on labels (--head lm), or with label words (verbalizer)
HEADS = ("classifier", "verbalizer", "lm")
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")  # PREFIX_TUNING: our deep prompt
EXAMPLE_ID = "example_id"  # an optional dataset column that keys each example's noise (example_keys)


def _peft_type(config) -> str:
    """PROMPT_TUNING, P_TUNING, PREFIX_TUNING, ... (PEFT's enum or its string)."""
    return str(getattr(config.peft_type, "value", config.peft_type))


def default_head(task_type: str, label_words: list[str] | None) -> str | None:
    """SEQ_CLS: classifier; CAUSAL_LM and SEQ_2_SEQ_LM: verbalizer with label words, else lm (PEFT's labels loss,
    what its guides train); None for another task type."""
    if task_type == "SEQ_CLS":
        return "classifier"
    if task_type in LM_TASK_TYPES:
        return "verbalizer" if label_words else "lm"
    return None


def peft_prompt(peft_model: nn.Module) -> Tensor:
    """(P, D) the virtual tokens PEFT prepends, in the autograd graph of PEFT's own parameters.

    PROMPT_TUNING: the embedding table itself (a SEQ_2_SEQ_LM table keeps a second block that prompt tuning never
    feeds to the encoder). P_TUNING (PromptEncoderConfig): the encoder's output, as PEFT's get_prompt computes it.
    PREFIX_TUNING: the (P, L*2*H*d) prefix, our deep prompt's layout (with prefix_projection: the MLP's output).
    """
    config = peft_model.active_peft_config
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    peft_type = _peft_type(config)
    if peft_type not in PROMPT_TYPES:
        raise ValueError(f"a {peft_type} adapter has no prompt; use PromptTuningConfig, PromptEncoderConfig "
                         f"(P-tuning) or PrefixTuningConfig")
    count = config.num_virtual_tokens
    projected = peft_type != "PROMPT_TUNING" and (peft_type == "P_TUNING" or config.prefix_projection)
    if not projected or config.inference_mode:  # a loaded P-tuning adapter stores its output
        return encoder.embedding.weight[:count]  # (P, D)
    tokens = peft_model.prompt_tokens[peft_model.active_adapter].unsqueeze(0).to(encoder.embedding.weight.device)
    return encoder(tokens)[0, :count]  # (P, D): the whole sequence goes in, as a bidirectional LSTM needs


def _trained_task_model(peft_model: nn.Module) -> nn.Module:
    """A shallow view of PEFT's base model whose head is the copy PEFT trains (modules_to_save); no weight copied."""
    from peft.utils.other import ModulesToSaveWrapper  # an optional extra: only PEFT models reach this module

    base = peft_model.get_base_model()
    view = copy.copy(base)
    view._modules = dict(base._modules)  # a new dict: PEFT's model keeps its wrappers
    for name, child in base.named_children():
        if isinstance(child, ModulesToSaveWrapper):
            view._modules[name] = child.modules_to_save[child.active_adapters[0]]
    nested = [name for name, module in view.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    if nested:
        raise ValueError(f"modules_to_save below the task model's top level ({', '.join(nested)}) are not "
                         f"supported; save whole heads (PEFT's SEQ_CLS default: classifier, score)")
    return view


def prompt_model(peft_model: nn.Module, tokenizer, head: str | None = None, label_words: list[str] | None = None,
                 template: str | None = None, max_length: int = 128) -> PromptModel:
    """Our PromptModel around a PeftModel's frozen base model (the head: PEFT's trained copy), holding no params."""
    config = peft_model.active_peft_config
    task_type = str(getattr(config.task_type, "value", config.task_type))
    head = head or default_head(task_type, label_words)
    if head not in HEADS:
        raise ValueError(f"cannot tell the head of a PEFT {task_type} model; pass head='classifier', 'verbalizer' "
                         "or 'lm'")
    if head == "verbalizer" and not label_words:
        raise ValueError("a verbalizer head needs label_words=[...], one word per class")
    task_model = _trained_task_model(peft_model)
    name = getattr(task_model.config, "_name_or_path", "") or str(config.base_model_name_or_path)
    backbone = Backbone(task_model, tokenizer, model_kind(task_model.config), name, name)
    num_labels = task_model.config.num_labels if head == "classifier" else len(label_words or ())
    default_template = DEFAULT_TEMPLATE if head == "verbalizer" else "{text}"  # lm: the target follows the text
    prompt_type = "deep" if _peft_type(config) == "PREFIX_TUNING" else "shallow"
    return PromptModel(backbone, head, num_labels, label_words, template or default_template, max_length,
                       prompt_type=prompt_type)


def peft_params(peft_model: nn.Module, model: PromptModel) -> dict[str, Tensor]:
    """PromptModel params that ARE PEFT's tensors: gradients of our loss land on PEFT's parameters."""
    heads = {f"{name}.{key}": value for name in model.head_names
             for key, value in getattr(model.backbone, name).named_parameters()}
    return {"prompt": peft_prompt(peft_model), **heads}


def from_peft(peft_model: nn.Module, tokenizer, *, head: str | None = None, label_words: list[str] | None = None,
              template: str | None = None, max_length: int = 128) -> tuple[PromptModel, dict[str, Tensor]]:
    """Our PromptModel and its params from an in-memory PeftModel: PEFT's logits, our loss, landscapes, metrics.

    head: default from PEFT's task_type (default_head: SEQ_CLS: classifier; CAUSAL_LM, SEQ_2_SEQ_LM: verbalizer when
    label_words are given, else lm, PEFT's labels loss over target tokens; template then puts the input text
    before the target, "{text}" by default). params: "prompt" (P, D) and, for a classifier, the trained head under
    HF's names, detached copies (the returned model holds them as its defaults). For P-tuning (PromptEncoderConfig)
    the prompt is the encoder's output computed once: landscapes then move that output, not the encoder's MLP or
    LSTM weights.

    Puts peft_model in eval mode (Trainer leaves it in train mode): with dropout on, two evaluations of the same
    params differ, and surfaces, Lanczos and every metric need one loss function. Trainer's next train() turns
    training mode back on.
    """
    peft_model.eval()
    model = prompt_model(peft_model, tokenizer, head, label_words, template, max_length)
    with torch.no_grad():
        params = {key: value.detach().clone() for key, value in peft_params(peft_model, model).items()}
    return model.with_params(params), params


def example_keys(inputs: dict[str, Tensor], micro_step: int, process: int, processes: int,
                 batch_size: int) -> list[int]:
    """Each example's noise key (B,): its `example_id` when the dataset has that column; else its place in the
    optimizer step's global batch, (micro-batch * processes + process) * batch_size + row, which is the same for
    2 x 4 accumulated, 2 processes x 4 and one batch of 8 (accelerate hands each process whole, consecutive
    batches: micro-batch m of process r is batch m * processes + r of the step)."""
    if EXAMPLE_ID in inputs:
        return [int(key) for key in inputs[EXAMPLE_ID].tolist()]
    first = (micro_step * processes + process) * batch_size
    return list(range(first, first + inputs["input_ids"].shape[0]))


def accuracy(prediction) -> dict[str, float]:
    """compute_metrics for PTPTrainer: the fraction of examples whose largest class logit is their label."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def average_gradients(parameters: list[Tensor], processes: int) -> None:
    """Replace each parameter's .grad by its mean over the processes (one all-reduce of the flattened gradients)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])  # (N,)
    dist.all_reduce(flat)
    for parameter, gradient in zip(parameters, flat.div_(processes).split([g.numel() for g in grads])):
        parameter.grad = gradient.view_as(parameter)


class PTPTrainer(Trainer):
    """transformers.Trainer on a PEFT prompt model with L = CE(clean) + lam CE(perturbed) (PTP, Chen et al. 2023).

    method: pt | ptp-rn | ptp-adv; perturb: the perturbation and lam's warm-up and ramp, counted in optimizer steps
    (the step being taken, 1-based, as in our loop). Noise is drawn per example (example_keys): gradient
    accumulation and processes split a batch without changing its perturbations; a prompt perturbation, shared by
    the batch, is drawn once per optimizer step. clean_loss, perturbed_loss and reg_weight (lam), averaged over
    the steps and processes since the last log, join Trainer's logs, so report_to receives them. Evaluation scores
    the clean loss and returns the class logits (compute_metrics=accuracy adds eval_accuracy). Mixed precision
    follows TrainingArguments (bf16; fp16 on CUDA, the adversarial ascents at the loss scaler's scale). One
    process or DDP (torchrun, accelerate launch); the loss is the mean over a micro-batch's examples and Trainer
    divides it by the accumulation steps (exact for equal micro-batches).

    head: default_head (a CAUSAL_LM or SEQ_2_SEQ_LM model without label_words: lm). --head lm trains on token
    labels as in PEFT's guides (lm_batch_from_inputs) with HF's labels loss as Trainer computes it: the token mean
    over the optimizer step's target tokens (Trainer's num_items_in_batch, over the accumulated micro-batches and,
    with average_tokens_across_devices, the processes), so accumulation and processes change nothing; evaluation
    scores each batch's token mean and returns no logits.
    """

    def __init__(self, *args, method: str = "pt", perturb: PerturbConfig | None = None,
                 label_words: list[str] | None = None, head: str | None = None, tokenizer=None, **kwargs):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if tokenizer is not None:  # transformers 5 names it processing_class
            kwargs.setdefault("processing_class", tokenizer)
        super().__init__(*args, **kwargs)
        if self.processing_class is None:
            raise ValueError("PTPTrainer needs the tokenizer (processing_class=tokenizer): perturbations spare its "
                             "special tokens")
        self.method, self.perturb = method, perturb or PerturbConfig()
        self._check_setup()
        self.prompt_model = prompt_model(self.model, self.processing_class, head, label_words)
        # True: Trainer counts the step's target tokens (num_items_in_batch, token_scale) and, the loss being a part
        # of their mean, divides by no accumulation steps. False: an example mean per micro-batch, divided by them
        self.model_accepts_loss_kwargs = self.prompt_model.head == "lm"
        self._noise_step, self._micro_step = -1, 0
        self._sums: dict[str, list] = {}  # name -> [sum of detached values, count] since the last log

    def _check_setup(self) -> None:
        kind = str(getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type))
        if kind != "NO" and not kind.startswith("MULTI_"):
            raise ValueError(f"PTPTrainer runs in one process or under DDP (torchrun, accelerate launch); {kind} "
                             "shards or wraps the parameters its loss reads directly")
        if self.compute_loss_func is not None or self.args.label_smoothing_factor != 0:
            given = "compute_loss_func" if self.compute_loss_func is not None else "label_smoothing_factor"
            raise ValueError(f"PTPTrainer's loss is PTP's cross-entropy (clean + lam * perturbed); it does not apply "
                             f"{given}: drop it from the Trainer's arguments")
        if self.args.fp16 and self.accelerator.scaler is None:
            raise ValueError("fp16 needs a CUDA device for its loss scaler (without one accelerate trains in float32 "
                             "and says nothing); on a CPU pass bf16=True")

    def train(self, *args, **kwargs):
        """Trainer.train, refusing a PTP run whose regularizer would never switch on within max_steps."""
        steps = self.args.max_steps
        if self.method != "pt" and 0 < steps <= self.perturb.reg_warmup:
            raise ValueError(f"reg_warmup {self.perturb.reg_warmup} >= max_steps {steps}: the regularizer never "
                             f"switches on and {self.method} would train plain pt; lower PerturbConfig(reg_warmup=...) "
                             "or raise max_steps")
        return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if EXAMPLE_ID not in self._signature_columns:
            self._signature_columns.append(EXAMPLE_ID)  # Trainer would drop it: PEFT's forward does not take it

    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None):
        """PTP's training loss on Trainer's inputs (a scalar); with return_outputs (evaluation) the clean loss and
        {"logits": (B, C)} ({} for --head lm). `model` may be wrapped (DDP, compile); PEFT's parameters are reached
        through self.model.

        accelerate puts its autocast (bf16, fp16) around model.forward, which this loss never calls: it is
        entered here."""
        scale = None if return_outputs else self.token_scale(inputs, num_items_in_batch)
        batch = batch_from_inputs(self.prompt_model, inputs, scale)
        # the logged parts: a micro-batch's share of the step's token mean, times the micro-batches averaged over
        share = 1.0 if scale is None else float(getattr(self, "current_gradient_accumulation_steps",
                                                        self.args.gradient_accumulation_steps))
        with self.accelerator.autocast():
            params = peft_params(self.model, self.prompt_model)
            if return_outputs and self.prompt_model.head == "lm":
                return self.prompt_model.loss(params, batch).mean(), {}
            if return_outputs:
                logits = self.prompt_model.logits(params, batch).float()  # (B, C)
                return cross_entropy(logits, batch.labels).mean(), {"logits": logits}
            step = self.state.global_step + 1
            weight = self.perturb.weight_at(step) if self.method != "pt" else 0.0
            if weight == 0:  # PT, or PTP in its warm-up: no perturbation is drawn, as in our loop
                loss = self.prompt_model.loss(params, batch).mean()
                self._record({"clean_loss": loss.detach()}, weight, share)
                return loss
            loss, parts = ptp_loss(self.prompt_model, params, batch, self.method, self.perturb,
                                   self.noise(inputs, batch), weight, self.ascent_scale())
        self._record(parts, weight, share)
        return loss

    def token_scale(self, inputs: dict[str, Tensor], num_items_in_batch: Tensor | int | None) -> float | None:
        """--head lm: the target tokens per example that make this micro-batch's mean loss its part of the token mean
        over the optimizer step, sum of its token CE / num_items_in_batch, times the processes whose mean DDP takes
        when num_items_in_batch counts all of theirs (HF's labels loss with num_items_in_batch, as Trainer scales
        it). None (another head, or no count): the batch's own token mean."""
        if self.prompt_model.head != "lm" or num_items_in_batch is None:
            return None
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return float(num_items_in_batch) / (inputs["input_ids"].shape[0] * processes)

    def noise(self, inputs: dict[str, Tensor], batch: Batch) -> torch.Generator | ExampleNoise:
        """The randomness of the micro-batch computed now: per example (example_keys) for the input and text
        targets; for the prompt, one stream per optimizer step, shared by its micro-batches and processes."""
        step = self.state.global_step + 1
        if self._noise_step != step:
            self._noise_step, self._micro_step = step, 0
        micro_step, self._micro_step = self._micro_step, self._micro_step + 1
        if self.perturb.target == "prompt":
            return keyed_generator(self.args.seed, step)
        keys = example_keys(inputs, micro_step, self.args.process_index, self.args.world_size,
                            self._train_batch_size)
        return example_noise(self.args.seed, step, keys, batch.attention_mask)

    def ascent_scale(self) -> float:
        """The factor Trainer's backward puts on the clean loss: the fp16 loss scaler's scale over the accumulation
        steps (1 without a scaler). The ascents' own backwards are taken at it, so they underflow no more than it."""
        scaler = self.accelerator.scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return scaler.get_scale() / getattr(self, "current_gradient_accumulation_steps",
                                            self.args.gradient_accumulation_steps)

    def training_step(self, model: nn.Module, inputs: dict[str, Tensor],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Trainer's step; with several processes, the trainable gradients averaged over them after the optimizer
        step's last micro-batch.

        The loss reads PEFT's parameters directly, not through the DDP wrapper's forward (which is PEFT's own
        forward; making it this loss would hand Trainer another model to save, load and inspect), and DDP arms its
        all-reduce only inside that forward (Reducer.prepare_for_backward): its gradient hooks stay idle. So the
        gradients are averaged here, where DDP would have synchronized (after the last micro-batch, outside
        no_sync) and before Trainer unscales, clips and steps: the mean over processes of per-process mean losses,
        DDP's own semantics. Were DDP to synchronize as well, averaging equal gradients changes nothing."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            average_gradients([p for p in self.model.parameters() if p.requires_grad], self.accelerator.num_processes)
        return loss

    def _record(self, parts: dict[str, Tensor], weight: float, share: float = 1.0) -> None:
        parts = {k: v * share for k, v in parts.items() if self.method != "pt" or k == "clean_loss"}
        if self.method != "pt":
            parts["reg_weight"] = torch.tensor(weight, device=parts["clean_loss"].device)
        for name, value in parts.items():
            total, count = self._sums.get(name, (0.0, 0))
            self._sums[name] = [total + value.float(), count + 1]  # summed on the device: no sync per micro-batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, with the means of clean_loss, perturbed_loss and reg_weight since the last training log
        (averaged over the processes, as Trainer averages its loss)."""
        if "loss" in logs and self._sums:
            means = torch.stack([total / count for total, count in self._sums.values()])  # (N,)
            means = self.accelerator.gather(means[None]).mean(0)  # (N,): every process logs, so all gather
            logs = {**logs, **dict(zip(self._sums, means.tolist()))}
            self._sums = {}
        super().log(logs, start_time)
