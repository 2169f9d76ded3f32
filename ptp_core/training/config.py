"""What a training run is: the method, the prompt, the optimizer and the data, as one validated dataclass that
ptp_core.train builds from the command line and notebooks build directly (rebuilt from ptp.json to resume).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace

from ptp_core.model.backbones import default_head
from ptp_core.model.prefix import PROMPT_TYPES
from ptp_core.model.prompt_model import PROMPT_INITS
from ptp_core.training.perturb import PerturbConfig

METHODS = ("pt", "ptp-rn", "ptp-adv")  # vanilla; PTP with random or adversarial perturbations (perturb.py)
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # float16 would need loss scaling inside every PTP ascent step
# which step is saved: the best on validation accuracy, or the last (PET's few-shot protocol uses no dev set)
SELECTIONS = ("validation", "last")
SELECTION_NOTES = {"validation": "the step with the best validation {accuracy} is saved",
                   "last": "no validation split is used; the last step is saved (PET's no-dev protocol)"}


# Default prompt learning rates, from small searches on the embedded task (docs/results.md, Training):
# minilm + classifier: 3e-2; smollm2 + verbalizer, test accuracy after 60 steps: 1e-3 -> 0.67, 3e-3 -> 0.75,
# 3e-2 -> 0.59 (batch 8; no learning), 0.1 -> 0.48 (150 steps). Why the larger steps fail is not established.
PROMPT_LR = {"classifier": 3e-2, "verbalizer": 3e-3, "lm": 3e-3}


@dataclass
class TrainConfig:
    model: str = "minilm"
    task: str = "rotten_tomatoes"
    method: str = "pt"
    seed: int = 0
    out: str = "runs/pt"
    head: str = "auto"  # auto: smollm2 and encoder-decoders (T5, BART) score label words; others train a classifier
    prompt_length: int = 20  # Lester et al. 2021: gains flatten beyond ~20 tokens
    prompt_init: str = "vocab"  # sampled vocabulary embeddings: a stable start (Lester et al. 2021)
    prompt_init_text: str = ""
    prompt_type: str = "shallow"  # deep: P-tuning v2's per-layer prefix keys and values (ptp_core/model/prefix.py)
    prefix_projection: bool = False  # deep: train P-tuning v2's MLP over P token vectors (ptp_core/model/projection.py)
    prefix_hidden: int = 512  # the MLP's hidden size (P-tuning v2's default)
    steps: int = 300
    batch_size: int = 32
    lr: float | None = None  # None: PROMPT_LR for the head (the prompt's AdamW step size)
    head_lr: float = 3e-2  # the freshly initialised classifier head (a small search: 3e-2 best of 4)
    weight_decay: float = 0.0  # decay pulls the prompt towards the origin, away from the vocabulary
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int = 100
    eval_examples: int | None = None  # validation subset for model selection (None: all of it)
    test_examples: int | None = None  # test subset for the final accuracy (None: all of it)
    snapshot_every: int = 20  # trajectory snapshots for PCA directions
    max_length: int = 128
    label_words: list[str] | None = None
    template: str | None = None
    text_fields: tuple[str, ...] = ("text",)  # the text columns of a CSV/JSONL task (--text-fields premise,hypothesis)
    target_field: str | None = None  # the target text's column of a generation task (--head lm)
    train_examples: int | None = None  # a seeded subset of the train split (FewGLUE: 32); None: all of it
    selection: str = "validation"  # last: no validation split is used, the last step is saved (PET's no-dev)
    device: str = "auto"  # cuda when a GPU is present
    dtype: str = "auto"  # bf16 autocast where the hardware multiplies bf16 natively (weights stay float32)
    cache_dir: str | None = None
    overwrite: bool = False
    progress: bool = True
    report_to: str = "none"  # tensorboard: the log's scalars also go to <out>/tensorboard (reporting.py)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)  # ptp-rn / ptp-adv only; pt ignores it
    # [reg_warmup, reg_ramp] as asked, when the regularizer would never have switched on within --steps and the
    # schedule was scaled to the run (scaled_schedule); None otherwise
    reg_schedule_requested: list[int] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, METHODS, n=1)
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        if self.prompt_length <= 0:
            raise ValueError(f"--prompt-len must be > 0, got {self.prompt_length}")
        for name in ("steps", "batch_size", "eval_every", "snapshot_every", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.train_examples is not None and self.train_examples <= 0:
            raise ValueError(f"--train-examples must be > 0, got {self.train_examples}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown --selection {self.selection!r}; use one of {', '.join(SELECTIONS)}")
        if self.head == "auto":
            self.head = default_head(self.model)
        if self.target_field is not None and self.head != "lm":
            raise ValueError(f"--target-field makes a generation task, which only --head lm learns; add --head lm "
                             f"(got --head {self.head})")
        if self.lr is None:
            self.lr = PROMPT_LR.get(self.head, PROMPT_LR["classifier"])
        for name in ("lr", "head_lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0 or not self.head_lr > 0:
            raise ValueError(f"--lr and --head-lr must be > 0, got {self.lr} and {self.head_lr}")
        if self.prompt_type not in PROMPT_TYPES:
            raise ValueError(f"unknown --prompt-type {self.prompt_type!r}; use one of {', '.join(PROMPT_TYPES)}")
        if self.prefix_projection and self.prompt_type != "deep":
            raise ValueError("--prefix-projection reparameterizes a deep prompt; add --prompt-type deep")
        if self.prefix_hidden <= 0:
            raise ValueError(f"--prefix-hidden must be > 0, got {self.prefix_hidden}")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"unknown --prompt-init {self.prompt_init!r}; use one of {', '.join(PROMPT_INITS)}")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} cannot train; use one of {', '.join(TRAIN_DTYPES)} (float16 "
                             "needs loss scaling that the PTP ascent steps do not do)")
        if isinstance(self.perturb, dict):  # rebuilt from ptp.json
            self.perturb = PerturbConfig(**self.perturb)
        if self.method != "pt" and self.perturb.reg_warmup >= self.steps:
            self.reg_schedule_requested = [self.perturb.reg_warmup, self.perturb.reg_ramp]
            self.perturb = scaled_schedule(self.perturb, self.steps)


def selection_note(selection: str, head: str, generation: bool) -> str:
    """split_info's line on which step is saved, naming the accuracy selected on: --head lm's rank classification
    (a classification task) or token accuracy (a generation task)."""
    accuracy = "token accuracy" if generation else "rank-classification accuracy" if head == "lm" else "accuracy"
    return SELECTION_NOTES[selection].format(accuracy=accuracy)


def scaled_schedule(perturb: PerturbConfig, steps: int) -> PerturbConfig:
    """The warm-up and ramp of lam shrunk in proportion to fit `steps`, keeping their ratio, with at least the last
    step regularized: a --reg-warmup as long as the run would leave lam at 0 throughout, i.e. train plain PT."""
    total = perturb.reg_warmup + perturb.reg_ramp  # > 0: warm-up >= steps >= 1
    warmup = min(steps - 1, perturb.reg_warmup * steps // total)
    ramp = min(steps - warmup, math.ceil(perturb.reg_ramp * steps / total))
    return replace(perturb, reg_warmup=warmup, reg_ramp=ramp)


def schedule_note(config: TrainConfig) -> str | None:
    """One line saying how the regularizer's schedule was scaled to the run, or None when it was not."""
    if config.reg_schedule_requested is None:
        return None
    warmup, ramp = config.reg_schedule_requested
    return (f"--reg-warmup {warmup} >= --steps {config.steps}: the regularizer would never switch on, so its schedule "
            f"is scaled to the run: --reg-warmup {config.perturb.reg_warmup} --reg-ramp {config.perturb.reg_ramp} "
            f"instead of {warmup} and {ramp} (ptp.json: reg_schedule_requested); to choose it, lower --reg-warmup "
            "or raise --steps")
