"""Deep prompts (P-tuning v2, Liu et al. 2022): P trainable keys and values inside every self-attention layer.

One mechanism for every family whose attention goes through transformers' attention interface
(`ALL_ATTENTION_FUNCTIONS`): the backbone runs under a registered implementation, `ptp_prefix_sdpa` or
`ptp_prefix_eager`, that puts the current layer's prefix keys and values before the text's, gives the mask P
columns (visible, or windowed in a sliding-window layer) and then calls the implementation the model was loaded
with. Outside a `prefix(...)` context it is that implementation unchanged, so the same backbone still runs shallow
prompts and plain forwards.

Semantics, as P-tuning v2 had them on transformers 4.x and PEFT's CAUSAL_LM prefix tuning has them now:
prefix slot j sits at position j and the text after the prefix (BERT's position ids shift by P; RoBERTa's by P
after its padding offset; a decoder continues after its cache, counting only its real tokens). Every text
position sees all P prefix slots, except in a sliding-window layer (Mistral, Gemma2, Qwen2, Phi-3, ModernBERT's
local layers), where a slot is seen by the queries whose window reaches its position, as PEFT's cache is.
ALiBi models are refused: their bias is built inside the model from the text's mask.

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
ALIBI_FAMILIES = ("bloom", "mpt")  # always ALiBi; Falcon says so in its config (alibi=True)
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
    if getattr(model.config, "alibi", False) or family in ALIBI_FAMILIES:
        # the model builds its ALiBi bias from the text's mask alone (rounded to bfloat16): the prefix columns get
        # none, and the text's is not the one PEFT's longer mask gives (3.7e-2 logits apart on a tiny Falcon)
        raise ValueError(f"deep prompts are not supported on ALiBi models ({family}): the prefix would get no "
                         "position bias; use --prompt-type shallow or a rotary model (Falcon with alibi=False)")
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
    """The keys and values (L, 2, G, H, P, d) of one forward over G*R rows, how many layers have run, and the left
    padding (G*R,) before each row's text where positions count real tokens (None: positions are indices)."""

    def __init__(self, layers: Tensor, rows: int, padding: Tensor | None = None):
        self.layers, self.rows, self.calls, self.padding = layers, rows, 0, padding

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
def prefix(prompt: Tensor, shape: PrefixShape, rows: int, padding: Tensor | None = None):
    """Within this block, every attention layer of an installed model sees the deep prompt (P, width) or
    (G, P, width); the forward's batch is G*R rows, group g's rows g*R..(g+1)*R-1 see prefix g. padding (G*R,):
    the left padding of each row, which a sliding window does not count between the prefix and the text (the
    text's positions count real tokens: text_positions with its mask)."""
    state = _Prefix(split_layers(prompt, shape), rows, padding)
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)
    if state.calls != shape.layers:
        raise RuntimeError(f"the prefix has {shape.layers} layers but attention ran {state.calls} times; "
                           "was the model installed with ptp_core.model.prefix.install?")


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


def _prefix_window(query: Tensor, key: Tensor, length: int, window: int | None,
                   padding: Tensor | None = None) -> Tensor | None:
    """(N or 1, 1, Q, P) bool: which prefix columns each query sees under a sliding window of `window` (None: all).

    Prefix slot j sits at position j and the text at P onwards, as PEFT's cache of length P places them; the
    queries are the last Q of the K text positions, less each row's left `padding` (N,) where given. transformers'
    sliding windows keep key k for query q iff q - k < window (causal: kv_idx > q_idx - window; ModernBERT's
    bidirectional layers pass window = half + 1 and keep |q - k| <= half), and a prefix key is always before the
    query, so one inequality covers both.
    """
    if window is None:
        return None
    queries = torch.arange(key.shape[2] - query.shape[2], key.shape[2], device=query.device) + length  # (Q,)
    queries = queries[None] if padding is None else queries[None] - padding[:, None]  # (N or 1, Q)
    slots = torch.arange(length, device=query.device)  # (P,)
    return ((queries[:, :, None] - slots) < window).unsqueeze(1)  # (N or 1, 1, Q, P)


def _extend_mask(mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor, length: int,
                 base: str, window: int | None = None, padding: Tensor | None = None) -> Tensor | None:
    """The attention mask with `length` prefix columns before the text's keys: visible to every query, or, in
    a sliding-window layer, to the queries whose window reaches them (_prefix_window)."""
    reach = _prefix_window(query, key, length, window, padding)  # (N or 1, 1, Q, P) or None
    if mask is None:
        causal = getattr(module, "is_causal", False) and query.shape[2] > 1
        if not causal and reach is None:
            return None  # everything visible, the prefix included
        # the base would have used is_causal (or no mask); with the prefix the pattern is an explicit mask
        text = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        mask = (text.tril(key.shape[2] - query.shape[2]) if causal else text)[None, None]  # (1, 1, Q, K)
        if base == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    if reach is None:  # a mask may hold one row for all queries: (B, 1, 1, K)
        reach = torch.ones(mask.shape[-2], length, dtype=torch.bool, device=query.device)
    else:
        rows = max(mask.shape[0], reach.shape[0])
        mask = mask.expand(rows, mask.shape[1], query.shape[2], -1)  # (B, 1, Q, K)
    reach = reach.expand(*mask.shape[:-2], -1, -1)  # (B, 1, Q, P)
    if mask.dtype == torch.bool:
        visible = reach
    else:  # additive: 0 lets attention through
        visible = torch.zeros(reach.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~reach, torch.finfo(mask.dtype).min)
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
    attention_mask = _extend_mask(attention_mask, module, query, key, prefix_keys.shape[2], base,
                                  kwargs.get("sliding_window"), state.padding)
    key = torch.cat([prefix_keys, key], dim=2)  # (N, H, P+T, d)
    value = torch.cat([prefix_values, value], dim=2)
    return function(module, query, key, value, attention_mask, **kwargs)


def text_positions(model: nn.Module, length: int, width: int, device: torch.device,
                   attention: Tensor | None = None) -> Tensor:
    """(1, T) position ids of text tokens that start after a prefix of `length`: where a shallow prompt's text
    would sit (RoBERTa-like embeddings count from padding_idx + 1).

    attention (N, T): count only the real tokens, (N, T) ids P + cumsum(mask) - 1, which is what a decoder gives a
    row alone and what OPT (and HF's generate) give a left-padded batch under PEFT's extended mask.
    """
    start = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    start = start + 1 if isinstance(start, int) else 0
    if attention is not None:
        return start + length + (attention.long().cumsum(1) - 1).clamp(min=0)  # (N, T); padding: a real neighbour's
    return torch.arange(start + length, start + length + width, device=device).unsqueeze(0)
