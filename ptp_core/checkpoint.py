"""PEFT-compatible checkpoint directories, written atomically.

    adapter_config.json        PEFT PROMPT_TUNING config (deep prompts: PREFIX_TUNING)
    adapter_model.safetensors  prompt_embeddings (P, D), deep (P, L*2*H*d) [+ base_model.<head>.* for SEQ_CLS]
    ptp.json                   method, hyperparameters, seed, task, template, label words, metrics, versions
    trajectory.safetensors     prompt snapshots (S, P, D) and their steps (S,)
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ptp_core.io import atomic_folder, file_mode, to_json, write_json, write_text
from ptp_core.model.backbones import load_backbone, resolve, resolve_device
from ptp_core.model.prefix import prefix_shape
from ptp_core.model.prompt_model import PromptModel
from ptp_core.tasks.load import load_task
from ptp_core.tasks.task import Task, default_template

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
META, TRAJECTORY, LOG = "ptp.json", "trajectory.safetensors", "metrics.jsonl"
PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."


# PEFT's task type for (head, kind); a masked-LM verbalizer has none of its own
PEFT_TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "masked": "FEATURE_EXTRACTION"}
# PEFT's task type -> the heads it can be read as (the first by default) and the model kind; PEFT trains CAUSAL_LM and
# SEQ_2_SEQ_LM prompts on `labels`, the target tokens' loss, which is --head lm; "verbalizer" keeps reading them as
# label words at the answer
READABLE_TASK_TYPES = {"SEQ_CLS": (("classifier",), None), "CAUSAL_LM": (("verbalizer", "lm"), "causal"),
                       "SEQ_2_SEQ_LM": (("verbalizer", "lm"), "seq2seq")}


def _peft_task_type(meta: dict) -> str:
    if meta.get("head") == "classifier":  # PEFT has no multiple-choice task type: its nearest is a bare backbone
        return "FEATURE_EXTRACTION" if meta.get("choices") else "SEQ_CLS"
    return PEFT_TASK_TYPES[meta.get("kind") or "masked"]


def adapter_config(meta: dict, params: dict[str, Tensor], backbone_config=None) -> dict:
    """PEFT's adapter_config.json: PROMPT_TUNING, or PREFIX_TUNING for a deep prompt (sized by the key/value
    heads, as PEFT sizes it: token_dim = H_kv * head_dim, num_attention_heads = H_kv)."""
    prompt = params["prompt"]
    head_modules = sorted({k.split(".")[0] for k in params if k != "prompt"})
    common = {
        "task_type": _peft_task_type(meta), "num_virtual_tokens": prompt.shape[0], "num_transformer_submodules": 1,
        "base_model_name_or_path": meta.get("model_path", meta.get("model")), "modules_to_save": head_modules or None,
        "inference_mode": True, "revision": None, "auto_mapping": None,
    }
    if meta.get("prompt_type") == "deep":
        shape = prefix_shape(backbone_config)
        return {"peft_type": "PREFIX_TUNING", **common, "token_dim": shape.token_dim, "num_layers": shape.layers,
                "num_attention_heads": shape.heads, "encoder_hidden_size": shape.token_dim,
                "prefix_projection": False}  # the projection, if trained with one, is folded into the prefix
    return {"peft_type": "PROMPT_TUNING", **common, "token_dim": prompt.shape[1],
            "num_attention_heads": getattr(backbone_config, "num_attention_heads", None),
            "num_layers": getattr(backbone_config, "num_hidden_layers", None), **_peft_init(meta),
            "tokenizer_kwargs": None}


def _peft_init(meta: dict) -> dict:
    """ptp.json's prompt_init as PEFT's PromptTuningInit (RANDOM, SAMPLE_VOCAB, TEXT): text and label_words inits
    are PEFT's TEXT, which needs the text and a tokenizer to be a valid config (PEFT reads neither to load)."""
    init = meta.get("prompt_init", "random")
    text = {"text": meta.get("prompt_init_text"), "label_words": " ".join(meta.get("label_words") or [])}.get(init)
    if text:
        return {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text,
                "tokenizer_name_or_path": meta.get("model_path", meta.get("model"))}
    return {"prompt_tuning_init": "SAMPLE_VOCAB" if init == "vocab" else "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None}


def save_checkpoint(out: str | Path, params: dict[str, Tensor], meta: dict, trajectory: dict[str, Tensor] | None = None,
                    backbone_config=None, overwrite: bool = True, log: list[dict] | None = None) -> Path:
    """Write the checkpoint folder as a whole (temp folder, then rename); `log` becomes metrics.jsonl."""
    with atomic_folder(out, overwrite) as tmp:
        tensors = {PROMPT_KEY: params["prompt"].detach().float().cpu().contiguous()}
        tensors.update({HEAD_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in params.items() if k != "prompt"})
        save_file(tensors, tmp / ADAPTER_WEIGHTS)
        write_json(tmp / ADAPTER_CONFIG, adapter_config(meta, params, backbone_config))
        write_json(tmp / META, meta)
        if trajectory is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trajectory.items()}, tmp / TRAJECTORY)
        if log is not None:
            write_text(tmp / LOG, "".join(json.dumps(to_json(row), sort_keys=True) + "\n" for row in log))
        for name in (ADAPTER_WEIGHTS, TRAJECTORY):
            if (tmp / name).exists():
                os.chmod(tmp / name, file_mode())
    return Path(out)


def params_hash(params: dict[str, Tensor]) -> str:
    """sha256 over trained tensors (names and float32 values): names surfaces computed for exactly these params."""
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Checkpoint:
    path: Path
    params: dict[str, Tensor]  # "prompt" (P, D) [+ head tensors named as in the HF model]
    meta: dict  # ptp.json (or what a PEFT-saved directory implies)
    trajectory: dict[str, Tensor] | None = None  # "prompts" (S, P, D), "steps" (S,)
    adapter: dict = field(default_factory=dict)

    def content_hash(self) -> str:
        """params_hash of the trained tensors: names surfaces computed for exactly this checkpoint."""
        return params_hash(self.params)

    @property
    def method_label(self) -> str:
        """The method as figures, tables and statistics group it: a deep prompt's is "<method> (deep)", so that a
        comparison of shallow and deep prompts keeps them apart."""
        method = self.meta.get("method", "checkpoint")
        return f"{method} (deep)" if self.prompt_type == "deep" else method

    @property
    def generation(self) -> bool:
        """True for a --head lm prompt: its loss is the token-level cross-entropy of target texts."""
        return self.meta.get("head") == "lm"

    @property
    def prompt_type(self) -> str:
        """shallow (input-level virtual tokens) or deep (per-layer prefix keys and values)."""
        return self.meta.get("prompt_type") or ("deep" if self.adapter.get("peft_type") == "PREFIX_TUNING"
                                                else "shallow")

    def with_task(self, name: str | None) -> "Checkpoint":
        """This checkpoint naming `name` as its task when ptp.json names none (an adapter PEFT or PTPTrainer saved)."""
        if not name or self.meta.get("task"):
            return self
        return replace(self, meta={**self.meta, "task": name})

    def task(self, name: str | None = None) -> Task:
        """The task named in ptp.json (or `name`), with the label words and label names the prompt was trained with."""
        own = name in (None, self.meta.get("task"))  # the file columns and few-shot subset it was trained with
        name = name or self.meta.get("task")
        if not name:
            raise ValueError(f"{self.path} does not name its task; name one (--task on the command line, "
                             "checkpoint.task(name) in Python)")
        target_field = self.meta.get("target_field") if own else None  # a generation task's target column
        return load_task(name, label_words=None if target_field else self.meta.get("label_words"),
                         label_names=self.meta.get("label_names"),
                         text_fields=tuple(self.meta.get("text_fields") or ("text",)) if own else ("text",),
                         train_examples=self.meta.get("train_examples") if own else None, target_field=target_field)

    def build_model(self, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32,
                    cache_dir: Path | None = None, label_words: list[str] | None = None,
                    template: str | None = None, attn_implementation: str | None = None,
                    num_labels: int | None = None) -> PromptModel:
        """The PromptModel with its frozen backbone and tokenizer, holding these params.

        The label count comes from ptp.json, the label words, `num_labels` (the task's) or, for a classifier,
        the model's config; the head tensors must then fit the model's head exactly.
        """
        device, meta = resolve_device(device), self.meta
        words = label_words or meta.get("label_words")
        count = meta.get("num_labels") or (len(words) if words else None) or num_labels
        if not count and meta["head"] == "classifier":
            count = _config_num_labels(meta["model"], cache_dir)
        if meta["head"] == "lm":  # the targets are its label words (a classification task) or its texts: none
            count = len(words or ())
        elif not count:
            raise ValueError(f"{self.path} does not say its labels; pass --task (label_words=[...] in Python)")
        choices = meta.get("choices") or 0  # K candidates of a multiple-choice task
        backbone = load_backbone(meta["model"], meta["head"], count, device, dtype, cache_dir, attn_implementation,
                                 choices)
        fields = tuple(meta.get("fields") or ("text",))  # a checkpoint without its template: the task's default cloze
        default = (default_template(fields, meta.get("generation", False)) if meta["head"] in ("verbalizer", "lm")
                   else "{text}")
        model = PromptModel(backbone, meta["head"], count, words, template or meta.get("template") or default,
                            meta.get("max_length", 128), {k: v.to(device) for k, v in self.params.items()}, choices,
                            self.prompt_type)
        if model.prompt_width != self.params["prompt"].shape[1]:
            raise ValueError(f"checkpoint {self.path} has a {self.prompt_type} prompt of width "
                             f"{self.params['prompt'].shape[1]} but model {meta['model']!r} needs "
                             f"{model.prompt_width}; use the model it was trained on")
        _check_head(self, model.head_params(), count)
        model.check_length(self.params["prompt"].shape[0], 1)
        return model


# what fixes the loss a prompt is measured on: two checkpoints that agree on these share one landscape
COMPARABLE_META = ("model", "head", "task", "label_words", "template", "max_length")


def check_comparable(first: Checkpoint, second: Checkpoint, verb: str,
                     keys: tuple[str, ...] = COMPARABLE_META) -> None:
    """ValueError unless two checkpoints agree on `keys` of ptp.json and on their tensors' names and shapes.

    verb: what the caller does with the pair ("connect", "interpolate"), named in the message.
    """
    classifiers = first.meta.get("head") == "classifier" == second.meta.get("head")
    for key in keys:
        if key == "label_words" and classifiers:  # a classifier's loss reads none (older ptp.json files list them)
            continue
        if first.meta.get(key) != second.meta.get(key):
            raise ValueError(f"cannot {verb} {first.path} and {second.path}: different models or prompt shapes (their "
                             f"{key} differs: {first.meta.get(key)!r} vs {second.meta.get(key)!r}); {verb} "
                             "checkpoints of one model, head, task, template and prompt length")
    shapes = [{k: tuple(v.shape) for k, v in c.params.items()} for c in (first, second)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"cannot {verb} {first.path} and {second.path}: different models or prompt shapes (their "
                         f"tensors differ: {shapes[0]} vs {shapes[1]}); {verb} checkpoints of one prompt length "
                         "and head")


def _config_num_labels(model_name: str, cache_dir: Path | None) -> int | None:
    """The label count a model folder's config declares (id2label), None when it declares none."""
    import transformers  # ~1.5 s to import: only a checkpoint without its label count needs the config

    try:
        return transformers.AutoConfig.from_pretrained(resolve(model_name, cache_dir)).num_labels
    except (OSError, ValueError):
        return None  # load_backbone reports the unloadable model in one line


def _check_head(checkpoint: "Checkpoint", expected: dict[str, Tensor], num_labels: int) -> None:
    """Every saved head tensor must be one of the model's head tensors, with its shape."""
    for name, value in checkpoint.params.items():
        if name == "prompt":
            continue
        if name not in expected:
            raise ValueError(f"{checkpoint.path} holds head tensor {name!r} that {checkpoint.meta['model']!r} "
                             f"does not have (its head: {', '.join(sorted(expected)) or 'none'}); use the model "
                             f"and --head it was trained with")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{checkpoint.path}: head tensor {name} has shape {tuple(value.shape)} but the model's "
                             f"has {tuple(expected[name].shape)} for {num_labels} labels; evaluate it on a task "
                             f"with the labels it was trained on")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error}); re-save the checkpoint") from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is truncated or corrupt ({str(error).splitlines()[0]}); re-save it") from None


def load_checkpoint(path: str | Path, head: str | None = None) -> Checkpoint:
    """Read our checkpoint directory, or a prompt-tuning directory PEFT saved (SEQ_CLS, CAUSAL_LM, SEQ_2_SEQ_LM).

    head: how to read a PEFT-saved CAUSAL_LM or SEQ_2_SEQ_LM adapter, "verbalizer" (the default) or "lm" (the loss
    PEFT trains them with: cross-entropy over target tokens); a directory with ptp.json knows its own head.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} has no {name}; it is not a prompt-tuning checkpoint")
    adapter = _read_json(path / ADAPTER_CONFIG)
    if adapter.get("peft_type") not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise ValueError(f"{path} holds a {adapter.get('peft_type')} adapter; PROMPT_TUNING and PREFIX_TUNING "
                         "can be read")
    tensors = _read_tensors(path / ADAPTER_WEIGHTS)
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} has no {PROMPT_KEY}; re-save the checkpoint")
    # PEFT keeps num_virtual_tokens rows per transformer submodule (two for SEQ_2_SEQ_LM); prompt tuning feeds
    # only the first block to the encoder, so that block is the prompt
    prompt = tensors.pop(PROMPT_KEY).float()
    params = {"prompt": prompt[:adapter.get("num_virtual_tokens") or prompt.shape[0]]}
    for key, value in tensors.items():  # PEFT names the SEQ_CLS head base_model.classifier.* (or .score)
        name = key[len(HEAD_PREFIX):] if key.startswith(HEAD_PREFIX) else key
        params[name.replace("modules_to_save.default.", "").replace("modules_to_save.", "")] = value.float()
    if (path / META).exists():
        meta = _read_json(path / META)
    else:  # a directory PEFT saved: infer what PEFT's config says
        task_type = adapter.get("task_type")
        if task_type not in READABLE_TASK_TYPES:
            raise ValueError(f"{path} is a PEFT {task_type} checkpoint; {', '.join(READABLE_TASK_TYPES)} can be read")
        heads, kind = READABLE_TASK_TYPES[task_type]
        if head not in (None, *heads):
            raise ValueError(f"{path} is a PEFT {task_type} adapter, which reads as head {' or '.join(heads)}, not "
                             f"{head!r}; pass one of those (or none)")
        meta = {"model": adapter["base_model_name_or_path"], "method": "peft", "seed": None, "head": head or heads[0],
                "kind": kind, "prompt_type": "deep" if adapter["peft_type"] == "PREFIX_TUNING" else "shallow"}
    for key in ("model", "head"):
        if key not in meta:
            raise ValueError(f"{path / META} lacks {key!r}; re-save the checkpoint")
    if head not in (None, meta["head"]):
        raise ValueError(f"{path} was trained with the {meta['head']} head, not {head!r}; load it without head=")
    trajectory = _read_tensors(path / TRAJECTORY) if (path / TRAJECTORY).exists() else None
    return Checkpoint(path, params, meta, trajectory, adapter)
