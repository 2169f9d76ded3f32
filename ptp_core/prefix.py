"""Deep prompts (P-tuning v2, Liu et al. 2022): P trainable keys and values inside every self-attention layer.

One mechanism for every family whose attention goes through transformers' attention interface
(`ALL_ATTENTION_FUNCTIONS`): the backbone runs under a registered implementation, `ptp_prefix_sdpa` or
`ptp_prefix_eager`, that puts the current layer's prefix keys and values before the text's, gives the mask P
always-visible columns and then calls the implementation the model was loaded with. Outside a `prefix(...)`
context it is that implementation unchanged, so the same backbone still runs shallow prompts and plain forwards.

Semantics, as P-tuning v2 had them on transformers 4.x and PEFT's CAUSAL_LM prefix tuning has them now:
every text position sees all P prefix slots (a decoder attends to them as to a cache), and text positions start
after the prefix (BERT's position ids shift by P; RoBERTa's by P after its padding offset; a decoder continues
after its cache).

Layout (PEFT's PREFIX_TUNING `prompt_embeddings`): the prompt is (P, L*2*H*d), per virtual token the layers in
order, in each layer the keys then the values, each (H, d) with H the key/value heads (fewer than the query heads
in grouped-query models). Keys are stored as the attention sees them (after RoPE, where a model rotates).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PROMPT_TYPES = ("shallow", "deep")
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("ptp_prefix", default=None)


@dataclass(frozen=True)
class PrefixShape:
    """Sizes of a deep prompt: L layers, H key/value heads of d dimensions each."""

    layers: int
    heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """H*d: PEFT's token_dim for prefix tuning (one key or one value of one layer)."""
        return self.heads * self.head_dim

    @property
    def width(self) -> int:
        """L*2*H*d: the columns of the (P, width) prompt."""
        return self.layers * 2 * self.token_dim


def prefix_shape(config) -> PrefixShape:
    """The prefix sizes of a model config (its text config for multimodal ones), as PEFT derives them."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise ValueError(f"cannot read layers, heads and hidden size from the {config.model_type} config")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return PrefixShape(layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def check_supported(model: nn.Module, kind: str) -> None:
    """Raise one ValueError line when deep prompts cannot run on this task model."""
    family = model.config.model_type
    if kind == "seq2seq":
        raise ValueError(f"deep prompts are not supported on encoder-decoders ({family}): PEFT's prefix there also "
                         "rewrites the cross-attention cache; use --prompt-type shallow")
    module = sys.modules[type(model.base_model).__module__]
    if not (hasattr(module, "ALL_ATTENTION_FUNCTIONS") and hasattr(module, "eager_attention_forward")):
        raise ValueError(f"deep prompts need transformers' attention interface, which {family}'s attention does not "
                         "use; use --prompt-type shallow or a BERT/RoBERTa/ELECTRA/GPT-2/Llama/Qwen-like model")
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        raise ValueError(f"deep prompts shift the text's positions after the prefix, and {family} takes no "
                         "position ids; use --prompt-type shallow")
    implementation = base_implementation(model.config)
    if implementation not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"deep prompts run on sdpa or eager attention, not {implementation}; load the model with "
                         "attn_implementation='sdpa'")


def base_implementation(config) -> str:
    """The attention implementation under the prefix wrapper (the model's own when none is installed)."""
    name = getattr(config, "_attn_implementation", None) or "eager"
    return name.removeprefix("ptp_prefix_")


def _register(base: str) -> str:
    """Register `ptp_prefix_<base>` (attention and mask function) once; return its name."""
    from transformers import AttentionInterface  # a backbone is loaded, so transformers already is
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"ptp_prefix_{base}"
    if name not in AttentionMaskInterface._global_mapping:
        # the base's function once, here: eager is each model file's own, found from the calling module
        function = AttentionInterface._global_mapping[base] if base != "eager" else None
        AttentionInterface.register(name, functools.partial(_prefixed_attention, base, function))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # the same masks as the base
    return name


def install(model: nn.Module, kind: str) -> None:
    """Run `model`'s attention through the prefix wrapper (idempotent; a no-op for forwards without a prefix)."""
    check_supported(model, kind)
    name = _register(base_implementation(model.config))
    for module in model.modules():  # every (sub)config the model's layers read
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) != name:
            config._attn_implementation = name


class _Prefix:
    """The keys and values (L, 2, G, H, P, d) of one forward over G*R rows, and how many layers have run."""

    def __init__(self, layers: Tensor, rows: int):
        self.layers, self.rows, self.calls = layers, rows, 0

    def next(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """This layer's keys and values, each (G*R, H, P, d)."""
        if self.calls >= self.layers.shape[0]:
            raise RuntimeError(f"attention ran more than the {self.layers.shape[0]} layers the prefix has")
        layer = self.layers[self.calls].to(dtype)  # (2, G, H, P, d)
        self.calls += 1
        groups, heads, length, dim = layer.shape[1:]
        # G prefixes, each repeated over its R rows, only for this layer (freed after it)
        expanded = layer.unsqueeze(2).expand(2, groups, self.rows, heads, length, dim)
        expanded = expanded.reshape(2, groups * self.rows, heads, length, dim)
        return expanded[0], expanded[1]


def split_layers(prompt: Tensor, shape: PrefixShape) -> Tensor:
    """(L, 2, G, H, P, d) per-layer keys (index 0) and values (1) of a prompt (P, width) or (G, P, width)."""
    stacked = prompt if prompt.dim() == 3 else prompt.unsqueeze(0)
    groups, length, width = stacked.shape
    if width != shape.width:
        raise ValueError(f"a deep prompt for this model has {shape.width} columns (layers x 2 x heads x head dim), "
                         f"got {width}")
    view = stacked.reshape(groups, length, shape.layers, 2, shape.heads, shape.head_dim)
    return view.permute(2, 3, 0, 4, 1, 5)  # (L, 2, G, H, P, d)


def join_layers(layers: Tensor) -> Tensor:
    """The inverse of split_layers for one prompt: (L, 2, H, P, d) -> (P, L*2*H*d)."""
    return layers.permute(3, 0, 1, 2, 4).reshape(layers.shape[3], -1)


@contextmanager
def prefix(prompt: Tensor, shape: PrefixShape, rows: int):
    """Within this block, every attention layer of an installed model sees the deep prompt (P, width) or
    (G, P, width); the forward's batch is G*R rows, group g's rows g*R..(g+1)*R-1 see prefix g."""
    state = _Prefix(split_layers(prompt, shape), rows)
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)
    if state.calls != shape.layers:
        raise RuntimeError(f"the prefix has {shape.layers} layers but attention ran {state.calls} times; "
                           "was the model installed with ptp_core.prefix.install?")


@contextmanager
def record():
    """Within this block, an installed model's attention layers append their (keys, values), each (N, H, T, d),
    to the yielded list, in layer order (nothing else changes)."""
    layers: list[tuple[Tensor, Tensor]] = []
    token = _CURRENT.set(layers)
    try:
        yield layers
    finally:
        _CURRENT.reset(token)


def _extend_mask(mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor, length: int,
                 base: str) -> Tensor | None:
    """The attention mask with `length` visible prefix columns before the text's keys."""
    if mask is None:
        if not (getattr(module, "is_causal", False) and query.shape[2] > 1):
            return None  # everything visible, the prefix included
        # the base would have used is_causal; with the prefix the causal pattern is an explicit mask
        text = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        mask = text[None, None]  # (1, 1, Q, K)
        if base == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    if mask.dtype == torch.bool:
        visible = mask.new_ones(*mask.shape[:-1], length)
    else:
        visible = mask.new_zeros(*mask.shape[:-1], length)  # additive: 0 lets attention through
    return torch.cat([visible, mask], dim=-1)  # (B, 1, Q, P+K)


def _prefixed_attention(base: str, function, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, **kwargs):
    """The registered attention (base and function bound by _register): the base implementation over
    [prefix; text] keys and values."""
    function = function or sys.modules[type(module).__module__].eager_attention_forward
    state = _CURRENT.get()
    if isinstance(state, list):  # record(): keep what this layer attends to
        state.append((key, value))
    if not isinstance(state, _Prefix):
        return function(module, query, key, value, attention_mask, **kwargs)
    prefix_keys, prefix_values = state.next(key.dtype)  # (N, H, P, d) each
    attention_mask = _extend_mask(attention_mask, module, query, key, prefix_keys.shape[2], base)
    key = torch.cat([prefix_keys, key], dim=2)  # (N, H, P+T, d)
    value = torch.cat([prefix_values, value], dim=2)
    return function(module, query, key, value, attention_mask, **kwargs)


def text_positions(model: nn.Module, length: int, width: int, device: torch.device) -> Tensor:
    """(1, T) position ids of text tokens that start after a prefix of `length`: where a shallow prompt's text
    would sit (RoBERTa-like embeddings count from padding_idx + 1)."""
    start = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    start = start + 1 if isinstance(start, int) else 0
    return torch.arange(start + length, start + length + width, device=device).unsqueeze(0)
