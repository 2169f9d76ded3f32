"""PromptModel: a frozen backbone, a soft prompt, a head, and the ONE loss every consumer calls.

The model is functional in its trainable tensors: `loss(params, batch)` takes the prompt (and
head) as arguments and never stores them by mutation. A leading stack dimension G on the
params evaluates G prompt variants in one forward by folding G into the batch.
Virtual tokens go before every input token and the attention mask is extended for them
(PEFT's convention, so checkpoints are interchangeable with PEFT). Templates and tokenization are
ptp_core.model.encoding's; `encode` and `predict` here apply them with this model's tokenizer and settings.
"""
from __future__ import annotations

import copy
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ptp_core.model import encoding, lm, prefix
from ptp_core.model.backbones import Backbone, max_positions
from ptp_core.model.encoding import Batch
from ptp_core.model.heads import Replay, head_module_names, head_view, slice_output, target_log_probs
from ptp_core.model.prefix import PROMPT_TYPES
from ptp_core.model.templates import IGNORE
from ptp_core.model.verified import cell_head, check_cell

PROMPT_INITS = ("random", "vocab", "text", "label_words")
HEAD_INIT_STD = 0.02  # transformers' default initializer_range
VOCAB_INIT_TOP = 5000  # Lester et al. 2021 sample init tokens from the 5k most common ids


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE per example, reduced in float32 whatever the forward's dtype: (B, C) -> (B,), (G, B, C) -> (G, B)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (G*B, C)
    return F.cross_entropy(flat, labels.repeat(flat.shape[0] // labels.shape[0]), reduction="none").reshape(
        logits.shape[:-1])


class PromptModel(nn.Module):
    """Frozen backbone + soft prompt + classifier or verbalizer head."""

    def __init__(self, backbone: Backbone, head: str, num_labels: int, label_words: list[str] | None = None,
                 template: str = "{text}", max_length: int = 128, params: dict[str, Tensor] | None = None,
                 choices: int = 0, prompt_type: str = "shallow"):
        super().__init__()
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.kind, self.head, self.num_labels = backbone.kind, head, num_labels
        self.choices = choices  # K candidates per example (multiple choice: num_labels == K); 0: classification
        self.model_name, self.model_path = backbone.name, backbone.path
        self.template, self.max_length = template, max_length
        self.label_words = list(label_words or [])
        self.max_positions = max_positions(self.backbone)
        if prompt_type not in PROMPT_TYPES:
            raise ValueError(f"unknown prompt type {prompt_type!r}; use one of {', '.join(PROMPT_TYPES)}")
        self.prompt_type = prompt_type
        # only cells the verification matrix checks against a reference (ptp_core/model/verified.py)
        check_cell(self.backbone.config.model_type, self.kind, prompt_type, cell_head(head, choices))
        # deep: the prompt is PEFT's prefix (P, L*2*H*d), keys and values inside every attention layer
        self.prefix_shape = prefix.prefix_shape(self.backbone.config) if prompt_type == "deep" else None
        if self.prefix_shape is not None:
            prefix.install(self.backbone, self.kind)
        replay = Replay()
        # kept out of the module tree: its parameters are the backbone's own, moved and frozen with it
        self.__dict__["_head_view"] = head_view(self.backbone, replay)
        self.__dict__["_replay"] = replay
        if head == "lm":  # the LM head writes the target text: nothing of its own is trained
            if self.kind == "masked":
                raise ValueError(f"{self.model_name} is a masked LM, which writes no text; --head lm needs a causal "
                                 "LM or an encoder-decoder")
            if len(set(self.label_words)) != len(self.label_words):
                raise ValueError(f"label words {self.label_words} repeat a target; give one distinct target per label")
            self.head_names = []
            self.register_buffer("label_ids", torch.empty(0, dtype=torch.long), persistent=False)
        elif head == "classifier":
            self.head_names = head_module_names(self.backbone)
            if not choices and self.backbone.config.num_labels != num_labels:
                raise ValueError(f"classifier has {self.backbone.config.num_labels} outputs but the task has "
                                 f"{num_labels} labels")
            self.register_buffer("label_ids", torch.empty(0, dtype=torch.long), persistent=False)
        else:
            self.head_names = []
            if not choices and len(self.label_words) != num_labels:
                raise ValueError(f"verbalizer needs {num_labels} label words, got {self.label_words}")
            # on the backbone's device: PromptModel itself is never moved, and a CPU index would copy every forward
            label_ids = (torch.empty(0, dtype=torch.long) if choices  # candidates bring their own tokens
                         else encoding.label_word_ids(self.tokenizer, self.label_words, self.kind, template))  # (C,)
            self.register_buffer("label_ids", label_ids.to(self.device), persistent=False)
            if self.kind == "masked" and self.tokenizer.mask_token is None:
                raise ValueError(f"{self.model_name} has no mask token for a masked-LM verbalizer")
        self._params = MappingProxyType(dict(params or {}))  # read-only: trainable tensors are passed in

    # ---- shapes and names -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def embedding_dim(self) -> int:
        return self.backbone.get_input_embeddings().weight.shape[1]

    @property
    def prompt_width(self) -> int:
        """Columns of the prompt: D (shallow), or L*2*H*d (deep: every layer's key and value per virtual token)."""
        return self.embedding_dim if self.prefix_shape is None else self.prefix_shape.width

    @property
    def prompt_blocks(self) -> int:
        """Equal column blocks of a prompt row that are scaled on their own: 1 (shallow), or L*2 (deep: one key and
        one value block per layer)."""
        return 1 if self.prefix_shape is None else 2 * self.prefix_shape.layers

    @property
    def params(self) -> MappingProxyType:
        """The tensors this model was built with (a checkpoint's), used by predict when none are passed."""
        return self._params

    def with_params(self, params: dict[str, Tensor]) -> "PromptModel":
        """The same frozen backbone holding other default params (nothing is copied or mutated)."""
        other = copy.copy(self)
        other.__dict__["_params"] = MappingProxyType(dict(params))
        return other

    def head_params(self) -> dict[str, Tensor]:
        """The classifier head's tensors as loaded, named as in the HF model (classifier.dense.weight, score.weight)."""
        return {f"{name}.{k}": v.detach().clone() for name in self.head_names
                for k, v in getattr(self.backbone, name).named_parameters()}

    def check_double_backward(self) -> None:
        """Refuse curvature work on an attention kernel without a second derivative (flash, flex): HVPs need one.

        SDPA is fine: the Hessian code builds its graph under SDPA's math backend; eager attention is plain ops.
        """
        implementation = prefix.base_implementation(self.backbone.config)
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"{implementation} attention has no second derivative, which Hessian metrics and "
                             f"directions need; load the model with attn_implementation='sdpa' or 'eager'")

    def check_length(self, prompt_length: int, text_length: int | None = None) -> None:
        """Refuse a prompt plus text (default: --max-length tokens) longer than the model's positions."""
        encoding.check_length(prompt_length, self.max_length if text_length is None else text_length,
                              self.max_positions, self.model_name)

    # ---- tokenization (ptp_core.model.encoding) ---------------------------------------------------
    def encode(self, texts: list[str], labels: list[int] | None = None, rank: bool = False) -> Batch:
        """Tokenize, apply the template and right-pad to the longest example; on the model's device. --head lm: the
        input and its target (rank: one row per label word, a classification task's rank classification)."""
        if self.head == "lm":
            return encoding.encode_targets(self.tokenizer, texts, labels, template=self.template, kind=self.kind,
                                           max_length=self.max_length, label_words=self.label_words,
                                           rank=rank).to(self.device)
        return encoding.encode(self.tokenizer, texts, labels, template=self.template, head=self.head,
                               kind=self.kind, max_length=self.max_length).to(self.device)

    def embed(self, batch: Batch) -> Tensor:
        """(B, T, D) word embeddings of the batch's tokens."""
        return self.backbone.get_input_embeddings()(batch.input_ids)

    # ---- the one loss -----------------------------------------------------------------------
    def logits(self, params: dict[str, Tensor], batch: Batch, input_perturbation: Tensor | None = None) -> Tensor:
        """Class logits (B, C), or (G, B, C) when params["prompt"] is stacked (G, P, D); for multiple choice the
        scores of the K candidates, (B, K) or (G, B, K): the loss is the cross-entropy over them either way."""
        if self.head == "lm":
            raise ValueError("--head lm has no class logits: its loss is over target tokens (loss, scores, "
                             "ptp_core.model.lm)")
        prompt = params["prompt"]
        stacked = prompt.dim() == 3 or (input_perturbation is not None and input_perturbation.dim() == 4)
        full, attention, groups, length = self._inputs(prompt, batch, input_perturbation)
        head_params = {k: v for k, v in params.items() if k != "prompt"}
        if self.kind == "seq2seq":
            logits = self._seq2seq_logits(full, attention, batch, groups)  # (G, R, C) or (G, R)
        else:
            hidden = self._encode(prompt, full, attention, **self._segments(batch, length, groups))
            if batch.choices and self.head == "verbalizer":
                logits = self._candidate_scores(head_params, hidden, batch, length, groups)  # (G, R)
            else:
                if self.head == "verbalizer" or self.kind == "causal":
                    # only the answer position goes on: the label word is read there, and a decoder classifier
                    # reads its last *real* token (HF's own reads the last position, padding included, when
                    # given inputs_embeds)
                    states = hidden.last_hidden_state
                    answer = length + batch.answer_index.repeat(groups)  # (G*R,)
                    picked = states[torch.arange(states.shape[0], device=states.device), answer].unsqueeze(1)
                    hidden = type(hidden)(last_hidden_state=picked)  # (G*R, 1, H)
                    logits = self._run_head(head_params, hidden, groups)  # (G, R, C)
                else:  # every position goes on, so the head pools over the real ones (mean pooling reads the mask)
                    logits = self._run_head(head_params, hidden, groups, attention)  # (G, R, C)
        if batch.choices:
            logits = logits.reshape(groups, len(batch), batch.choices)  # (G, B, K): one score per candidate row
        return logits if stacked else logits.squeeze(0)

    def _encode(self, prompt: Tensor, full: Tensor, attention: Tensor, **segments):
        """The backbone's hidden states; a deep prompt enters every attention layer, text positions after it
        (a decoder's count its real tokens, so left padding moves no row's positions, as one example alone)."""
        if self.prefix_shape is None:
            return self.backbone.base_model(inputs_embeds=full, attention_mask=attention, **segments)
        if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True
                                           for m in self.backbone.modules()):
            # checkpointed layers recompute in backward, outside the forward that hands them the prefix
            raise ValueError("deep prompts cannot train with gradient checkpointing (its recomputation runs without "
                             "the prefix); turn gradient_checkpointing off or use --prompt-type shallow")
        counted = attention if self.kind == "causal" else None
        positions = prefix.text_positions(self.backbone, prompt.shape[-2], full.shape[1], full.device,
                                          counted)  # (1, T), or (G*R, T) counted from the mask
        padding = (attention.cumsum(1) == 0).sum(1) if counted is not None else None  # (G*R,) left padding
        prompts = prompt.shape[0] if prompt.dim() == 3 else 1  # 1 prompt for G input perturbations: all rows see it
        with prefix.prefix(prompt, self.prefix_shape, full.shape[0] // prompts, padding):
            return self.backbone.base_model(inputs_embeds=full, attention_mask=attention, position_ids=positions,
                                            **segments)

    def _inputs(self, prompt: Tensor, batch: Batch, input_perturbation: Tensor | None
                ) -> tuple[Tensor, Tensor, int, int]:
        """Virtual tokens before every row: embeddings (G*R, P+T, D), attention mask (G*R, P+T), G and P.
        A deep prompt is not in the sequence (it enters the attention layers): (G*R, T, D), (G*R, T), G and 0."""
        prompt = prompt if prompt.dim() == 3 else prompt.unsqueeze(0)  # (G, P, D)
        embeds = self.embed(batch).unsqueeze(0)  # (1, R, T, D)
        if input_perturbation is not None:
            mask = batch.text_mask.unsqueeze(-1).to(embeds.dtype)  # (R, T, 1)
            delta = input_perturbation if input_perturbation.dim() == 4 else input_perturbation.unsqueeze(0)
            embeds = embeds + (delta * mask).to(embeds.dtype)  # (Ge, R, T, D): Ge input perturbations
        groups = max(prompt.shape[0], embeds.shape[0])
        size, width = batch.input_ids.shape
        encoding.check_length(prompt.shape[1], width, self.max_positions, self.model_name)
        if self.prefix_shape is not None:
            full = embeds.expand(groups, -1, -1, -1).reshape(groups * size, width, -1)  # (G*R, T, D)
            return full, batch.attention_mask.repeat(groups, 1), groups, 0
        prompt = prompt.to(embeds.dtype).unsqueeze(1).expand(groups, size, -1, -1)  # (G, R, P, D)
        embeds = embeds.expand(groups, -1, -1, -1)  # (G, R, T, D)
        length = prompt.shape[2]
        full = torch.cat([prompt, embeds], dim=2).reshape(groups * size, length + width, -1)  # (G*R, P+T, D)
        ones = batch.attention_mask.new_ones(size, length)
        attention = torch.cat([ones, batch.attention_mask], dim=1).repeat(groups, 1)  # (G*R, P+T)
        return full, attention, groups, length

    @staticmethod
    def _segments(batch: Batch, length: int, groups: int) -> dict[str, Tensor]:
        """token_type_ids of a pair with segment 0 for the virtual tokens, as PEFT's SEQ_CLS forward does."""
        if batch.token_type_ids is None:
            return {}
        zeros = batch.token_type_ids.new_zeros(batch.rows, length)
        return {"token_type_ids": torch.cat([zeros, batch.token_type_ids], dim=1).repeat(groups, 1)}  # (G*R, P+T)

    def _seq2seq_logits(self, full: Tensor, attention: Tensor, batch: Batch, groups: int) -> Tensor:
        """Encoder-decoder: the label words at the first decoder step (G, R, C), or with candidates the sum of
        each candidate's token log-probabilities as the decoder writes it (G, R)."""
        rows = full.shape[0]
        start = torch.full((rows, 1), self.backbone.config.decoder_start_token_id, device=full.device)
        if not batch.choices:  # the whole model: encoder, one decoder step, the LM head at that step only
            out = self.backbone(inputs_embeds=full, attention_mask=attention, decoder_input_ids=start)
            return out.logits[:, -1, self.label_ids].reshape(groups, batch.rows, -1)  # (G, R, C)
        targets = batch.target_ids.repeat(groups, 1)  # (G*R, Tc)
        pad = self.backbone.config.pad_token_id or 0
        decoder_ids = torch.cat([start, targets[:, :-1].masked_fill(targets[:, :-1] == IGNORE, pad)], dim=1)
        out = self.backbone(inputs_embeds=full, attention_mask=attention, decoder_input_ids=decoder_ids)
        return target_log_probs(out.logits, targets).reshape(groups, batch.rows)  # (G, R)

    def _candidate_scores(self, head_params: dict[str, Tensor], hidden, batch: Batch, length: int,
                          groups: int) -> Tensor:
        """(G, R) the sum of log-probabilities of each row's candidate tokens, the LM head run only at the
        positions that predict them (never full-vocabulary logits at every position)."""
        targets = batch.target_ids.repeat(groups, 1)  # (G*R, T)
        rows, positions = (targets != IGNORE).nonzero(as_tuple=True)  # (N,) each: the scored positions
        states = hidden.last_hidden_state[rows, length + positions].unsqueeze(1)  # (N, 1, H)
        vocabulary = self._head_logits(head_params, type(hidden)(last_hidden_state=states), every_word=True)
        picked = torch.log_softmax(vocabulary.float(), dim=-1).gather(1, targets[rows, positions].unsqueeze(1))
        scores = picked.new_zeros(targets.shape[0]).index_add(0, rows, picked.squeeze(1))  # (G*R,)
        return scores.reshape(groups, batch.rows)

    def _run_head(self, head_params: dict[str, Tensor], hidden, groups: int, mask: Tensor | None = None) -> Tensor:
        """(G, B, C) class logits: the task model's own forward over `hidden` (and its attention `mask` (G*B, T),
        which a pooling head reads), with the head tensors substituted.

        Stacked head tensors (G, ...) run the head once per group on that group's rows (the backbone ran once).
        """
        shapes = {k: v.dim() for k, v in self._head_view.named_parameters()}
        stacked = any(v.dim() == shapes[k] + 1 for k, v in head_params.items())
        size = hidden.last_hidden_state.shape[0] // groups  # B: rows per group
        if not stacked:
            return self._head_logits(head_params, hidden, mask=mask).reshape(groups, size, -1)  # (G, B, C)
        parts = [self._head_logits({k: v[g] if v.dim() == shapes[k] + 1 else v for k, v in head_params.items()},
                                   slice_output(hidden, g * size, (g + 1) * size),
                                   mask=None if mask is None else mask[g * size:(g + 1) * size])
                 for g in range(groups)]
        return torch.stack(parts)  # (G, B, C)

    def _head_logits(self, head_params: dict[str, Tensor], hidden, every_word: bool = False,
                     mask: Tensor | None = None) -> Tensor:
        """(N, C) the head's logits: the classifier's (multiple choice: (N, 1), one score per candidate row), or
        the label words' at the answer position; every_word: the whole vocabulary there (N, V). mask (N, T): the
        attention mask of `hidden`'s positions, handed to the task model's forward as PEFT's forward hands it."""
        self._replay.output = hidden
        states = hidden.last_hidden_state  # HF's multiple-choice models fold a (N, K, ...) input: K = 1 here
        folded = self.choices and self.head == "classifier"
        inputs = {"inputs_embeds": states.unsqueeze(1) if folded else states}
        if mask is not None:
            inputs["attention_mask"] = mask.unsqueeze(1) if folded else mask  # (N, 1, T) or (N, T)
        try:
            out = functional_call(self._head_view, head_params, (), inputs, strict=False)
        finally:
            self._replay.output = None
        if self.head == "classifier":
            return out.logits.reshape(states.shape[0], -1)  # (N, C)
        return out.logits[:, -1] if every_word else out.logits[:, -1, self.label_ids]

    def loss(self, params: dict[str, Tensor], batch: Batch, input_perturbation: Tensor | None = None) -> Tensor:
        """Per-example cross-entropy (B,), or (G, B) for stacked params. --head lm: each example's summed target-token
        cross-entropy over the batch's token_scale, so that the mean over examples is the token mean (PEFT's
        `labels` loss on the batch; over a whole split with batch_split's shared scale)."""
        if self.head == "lm":
            return lm.per_example(self, lm.row_terms(self, params, batch, input_perturbation)[0], batch)
        return cross_entropy(self.logits(params, batch, input_perturbation), batch.labels)

    def scores(self, params: dict[str, Tensor], batch: Batch,
               input_perturbation: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-example cross-entropy and correctness (float 0/1), each (B,) or (G, B): one forward for both.
        --head lm: correctness is each example's greedy-correct target tokens over the token_scale (its mean: the
        token accuracy)."""
        if self.head == "lm":
            loss, correct = lm.row_terms(self, params, batch, input_perturbation)
            return lm.per_example(self, loss, batch), lm.per_example(self, correct, batch)
        logits = self.logits(params, batch, input_perturbation)
        return cross_entropy(logits, batch.labels), (logits.argmax(-1) == batch.labels).float()

    @torch.inference_mode()
    def predict(self, texts: list[str], params: dict[str, Tensor] | None = None, batch_size: int = 64) -> Tensor:
        """(N, C) class logits with the template applied."""
        params = params if params is not None else self.params
        parts = [self.logits(params, self.encode(texts[i:i + batch_size])).float()
                 for i in range(0, len(texts), batch_size)]
        return torch.cat(parts).cpu()

    # ---- initialization ---------------------------------------------------------------------
    def init_prompt(self, length: int, init: str, generator: torch.Generator, text: str = "") -> Tensor:
        """(P, D) initial prompt: random, sampled vocabulary, a text, or the label words (Lester et al. 2021)."""
        if length <= 0:
            raise ValueError(f"prompt length must be positive, got {length}")
        table = self.backbone.get_input_embeddings().weight.detach().float().cpu()  # (V, D)
        if init == "random":
            return torch.randn(length, table.shape[1], generator=generator) * table.std()
        if init == "vocab":
            special = set(self.tokenizer.all_special_ids)
            pool = torch.tensor([i for i in range(min(VOCAB_INIT_TOP, table.shape[0])) if i not in special])
            ids = pool[torch.randint(len(pool), (length,), generator=generator)]
        elif init in ("text", "label_words"):
            source = text if init == "text" else " ".join(self.label_words)
            if not source:
                raise ValueError(f"prompt init {init!r} needs {'--prompt-init-text' if init == 'text' else 'label words'}")
            tokens = self.tokenizer(source, add_special_tokens=False).input_ids
            ids = torch.tensor([tokens[i % len(tokens)] for i in range(length)])  # repeat to fill P
        else:
            raise ValueError(f"unknown prompt init {init!r}; use one of {', '.join(PROMPT_INITS)}")
        return table[ids].clone()

    @torch.no_grad()
    def deep_from_shallow(self, prompt: Tensor) -> Tensor:
        """(P, L*2*H*d) the keys and values every layer computes for the virtual tokens `prompt` (P, D) on their
        own, at their shallow positions: the deep prompt a decoder reads exactly as it reads the shallow one (causal
        attention: virtual tokens never see the text). The deep prompt's init (any shallow init, mapped)."""
        if self.prefix_shape is None:
            raise ValueError("deep_from_shallow needs a model built with prompt_type='deep'")
        embeds = prompt.to(self.device, self.backbone.get_input_embeddings().weight.dtype).unsqueeze(0)  # (1, P, D)
        positions = prefix.text_positions(self.backbone, 0, prompt.shape[0], self.device)  # (1, P)
        ones = torch.ones(1, prompt.shape[0], dtype=torch.long, device=self.device)
        with prefix.record() as layers:
            self.backbone.base_model(inputs_embeds=embeds, attention_mask=ones, position_ids=positions)
        keys_values = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])  # (L, 2, H, P, d)
        return prefix.join_layers(keys_values.float())

    def init_params(self, length: int, init: str, generator: torch.Generator, text: str = "") -> dict[str, Tensor]:
        """Trainable tensors: the prompt (deep: the keys and values of the shallow init) and, for the classifier
        head, a freshly seeded head."""
        self.check_length(length)
        params = {"prompt": self.init_prompt(length, init, generator, text)}
        if self.prefix_shape is not None:
            params["prompt"] = self.deep_from_shallow(params["prompt"]).cpu()
        for name, value in self.head_params().items():
            # HF's init of linear and norm layers at its default initializer_range: N(0, 0.02) matrices, zero biases,
            # unit norm scales (a fixed 0.02, not the config's: tiny test models inflate theirs for their body only)
            if name.endswith("bias"):
                params[name] = torch.zeros(value.shape)
            elif value.dim() == 1:
                params[name] = torch.ones(value.shape)
            else:
                params[name] = torch.randn(value.shape, generator=generator) * HEAD_INIT_STD
        return {k: v.to(self.device) for k, v in params.items()}
