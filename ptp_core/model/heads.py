"""The task model's own head run on hidden states computed once for all stacked prompts.

A head view is a shallow copy of the HF task model whose backbone is replaced by `Replay`, which returns the
hidden states it was handed: the model's own pooler, pre_classifier, ClassificationHead, ContextPooler, score or LM
head then runs unchanged, with the trained head tensors substituted by functional_call.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ptp_core.model.templates import IGNORE


class Replay(nn.Module):
    """Stands in for the backbone inside a head view: returns the backbone output it was handed.

    The task model's own forward (pooler, pre_classifier, ClassificationHead, ContextPooler, score, LM head)
    then runs on hidden states computed once for all G stacked prompts; no head is re-implemented here. A forward
    that calls a part of its backbone (OPT's `self.model.decoder(...)`) reaches this replay too: every sub-module
    name of the replaced backbone (`stands_for`) answers with the replay itself.
    """

    def __init__(self, stands_for: frozenset[str] = frozenset()):
        super().__init__()
        self.output = None
        self.stands_for = stands_for

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.__dict__.get("stands_for", ()):
                return self
            raise

    def forward(self, *args, **kwargs):
        return self.output


def head_module_names(model: nn.Module) -> list[str]:
    """What the task model adds on top of its backbone and a classifier trains: classifier, score, pre_classifier..."""
    return [name for name, module in model.named_children()
            if name != model.base_model_prefix and any(True for _ in module.parameters())]


def head_view(model: nn.Module, replay: Replay) -> nn.Module:
    """A shallow copy of the task model whose backbone is `replay` (parameters shared, nothing copied)."""
    view = copy.copy(model)
    view._modules = dict(model._modules)  # a new dict: the original keeps its backbone
    backbone = model._modules.get(model.base_model_prefix)  # None where the body is not one child (T5)
    names = backbone.named_modules() if backbone is not None else ()
    replay.stands_for = frozenset(part for name, _ in names for part in name.split(".") if part)
    view._modules[model.base_model_prefix] = replay
    return view


def slice_output(output, start: int, stop: int):
    """The rows start:stop of every tensor in an HF model output."""
    return type(output)(**{k: v[start:stop] if isinstance(v, Tensor) else v for k, v in output.items()})


def target_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """(N,) the sum over positions of log p(target) from logits (N, T, V), IGNORE targets left out."""
    scored = targets != IGNORE  # (N, T)
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (log_probs * scored).sum(-1)
