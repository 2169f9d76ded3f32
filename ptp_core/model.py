"""PromptModel: a frozen backbone, a soft prompt, a head, and the ONE loss every consumer calls.

The model is functional in its trainable tensors: `loss(params, batch)` takes the prompt (and
head) as arguments and never stores them by mutation. A leading stack dimension G on the
params evaluates G prompt variants in one forward by folding G into the batch.
Virtual tokens go before every input token and the attention mask is extended for them
(PEFT's convention, so checkpoints are interchangeable with PEFT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptp_core.backbones import Backbone

PROMPT_INITS = ("random", "vocab", "text", "label_words")
VOCAB_INIT_TOP = 5000  # Lester et al. 2021 sample init tokens from the 5k most common ids


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) right-padded
    attention_mask: Tensor  # (B, T)
    text_mask: Tensor  # (B, T) bool: tokens of the input text, the only ones a perturbation may touch
    answer_index: Tensor  # (B,) position, in the unprompted sequence, where the verbalizer reads
    labels: Tensor  # (B,)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.text_mask,
                                               self.answer_index, self.labels)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index) -> "Batch":
        return Batch(self.input_ids[index], self.attention_mask[index], self.text_mask[index],
                     self.answer_index[index], self.labels[index])


def _head_module(model: nn.Module) -> tuple[str, nn.Module]:
    for name in ("classifier", "score"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return name, module
    raise ValueError(f"{type(model).__name__} has no linear `classifier`/`score` head; use --head verbalizer")


class PromptModel(nn.Module):
    """Frozen backbone + soft prompt + classifier or verbalizer head."""

    def __init__(self, backbone: Backbone, head: str, num_labels: int, label_words: list[str] | None = None,
                 template: str = "{text}", max_length: int = 128, params: dict[str, Tensor] | None = None):
        super().__init__()
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.kind, self.head, self.num_labels = backbone.kind, head, num_labels
        self.model_name, self.model_path = backbone.name, backbone.path
        self.template, self.max_length = template, max_length
        self.label_words = list(label_words or [])
        if head == "classifier":
            self.head_name, module = _head_module(self.backbone)
            if module.out_features != num_labels:
                raise ValueError(f"classifier has {module.out_features} outputs but the task has {num_labels} labels")
            self.register_buffer("label_ids", torch.empty(0, dtype=torch.long), persistent=False)
        else:
            if len(self.label_words) != num_labels:
                raise ValueError(f"verbalizer needs {num_labels} label words, got {self.label_words}")
            self.register_buffer("label_ids", self._label_word_ids(), persistent=False)
            if self.kind == "masked" and self.tokenizer.mask_token is None:
                raise ValueError(f"{self.model_name} has no mask token for a masked-LM verbalizer")
        self.params = params or {}

    # ---- shapes and names -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def embedding_dim(self) -> int:
        return self.backbone.get_input_embeddings().weight.shape[1]

    @property
    def prompt_length(self) -> int:
        return self.params["prompt"].shape[-2]

    def head_params(self) -> dict[str, Tensor]:
        """The head's initial tensors (classifier only): names as in the HF model, e.g. classifier.weight."""
        if self.head != "classifier":
            return {}
        return {f"{self.head_name}.{k}": v.detach().clone() for k, v in
                getattr(self.backbone, self.head_name).named_parameters()}

    def _label_word_ids(self) -> Tensor:
        ids = []
        for word in self.label_words:
            text = " " + word if self.kind == "causal" else word  # causal LMs see the word after a space
            tokens = self.tokenizer(text, add_special_tokens=False).input_ids
            if not tokens:
                raise ValueError(f"label word {word!r} tokenizes to nothing")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"label words {self.label_words} share their first token; choose distinct words")
        return torch.tensor(ids)

    # ---- tokenization -----------------------------------------------------------------------
    def render(self, text: str) -> tuple[str, int]:
        """Apply the template; return the string and the character offset where the text starts."""
        if self.head == "classifier":
            template = self.template.replace("{mask}", "").rstrip()
        elif self.kind == "causal":
            template = self.template.split("{mask}")[0].rstrip()  # the answer is the next token
        else:
            template = self.template.replace("{mask}", self.tokenizer.mask_token)
        prefix = template.split("{text}")[0]
        return template.replace("{text}", text, 1), len(prefix)

    def _tokenize(self, text: str) -> tuple[list[int], list[bool], int]:
        for _ in range(3):  # truncate the text (never the template) until the sequence fits
            rendered, start = self.render(text)
            end = start + len(text)
            enc = self.tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            text_mask = [s >= start and e <= end and e > s for s, e in offsets]
            excess = len(ids) - self.max_length
            if excess <= 0:
                break
            text_positions = [i for i, m in enumerate(text_mask) if m]
            keep = max(1, len(text_positions) - excess)
            text = text[:offsets[text_positions[keep - 1]][1] - start]
        if self.head == "verbalizer" and self.kind == "masked":
            answer = max(i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id and not text_mask[i])
        else:
            answer = len(ids) - 1  # causal verbalizer and decoder classifiers read the last real token
        return ids, text_mask, answer

    def encode(self, texts: list[str], labels: list[int] | None = None) -> Batch:
        """Tokenize, apply the template and right-pad to the longest example."""
        rows = [self._tokenize(t) for t in texts]
        width = max(len(ids) for ids, _, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        text_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (ids, mask, _) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
            text_mask[i, :len(ids)] = torch.tensor(mask)
        answer = torch.tensor([a for _, _, a in rows])
        label_tensor = torch.tensor(labels if labels is not None else [-100] * len(rows))
        return Batch(input_ids, attention, text_mask, answer, label_tensor).to(self.device)

    def embed(self, batch: Batch) -> Tensor:
        """(B, T, D) word embeddings of the batch's tokens."""
        return self.backbone.get_input_embeddings()(batch.input_ids)

    # ---- the one loss -----------------------------------------------------------------------
    def logits(self, params: dict[str, Tensor], batch: Batch, input_perturbation: Tensor | None = None,
               inputs_embeds: Tensor | None = None) -> Tensor:
        """Class logits (B, C), or (G, B, C) when params["prompt"] is stacked (G, P, D)."""
        prompt = params["prompt"]
        stacked = prompt.dim() == 3 or (input_perturbation is not None and input_perturbation.dim() == 4)
        prompt = prompt if prompt.dim() == 3 else prompt.unsqueeze(0)  # (G, P, D)
        embeds = self.embed(batch) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        embeds = embeds if embeds.dim() == 4 else embeds.unsqueeze(0)  # (Ge, B, T, D)
        if input_perturbation is not None:
            mask = batch.text_mask.unsqueeze(-1).to(embeds.dtype)  # (B, T, 1)
            delta = input_perturbation if input_perturbation.dim() == 4 else input_perturbation.unsqueeze(0)
            embeds = embeds + delta * mask  # (Ge, B, T, D)
        groups = max(prompt.shape[0], embeds.shape[0])
        size, width = batch.input_ids.shape
        prompt = prompt.to(embeds.dtype).unsqueeze(1).expand(groups, size, -1, -1)  # (G, B, P, D)
        embeds = embeds.expand(groups, -1, -1, -1)  # (G, B, T, D)
        length = prompt.shape[2]
        full = torch.cat([prompt, embeds], dim=2).reshape(groups * size, length + width, -1)  # (G*B, P+T, D)
        ones = batch.attention_mask.new_ones(size, length)
        attention = torch.cat([ones, batch.attention_mask], dim=1).repeat(groups, 1)  # (G*B, P+T)
        hidden = self.backbone.base_model(inputs_embeds=full, attention_mask=attention)
        logits = self._head(params, hidden, length + batch.answer_index.repeat(groups), groups)  # (G, B, C)
        return logits if stacked else logits.squeeze(0)

    def _head(self, params: dict[str, Tensor], hidden, answer: Tensor, groups: int) -> Tensor:
        if self.head == "classifier":
            pooled = getattr(hidden, "pooler_output", None)
            if pooled is None:  # decoder classifiers read the last real token, as HF's do
                states = hidden.last_hidden_state
                pooled = states[torch.arange(states.shape[0], device=states.device), answer]  # (G*B, H)
            pooled = pooled.reshape(groups, -1, pooled.shape[-1])  # (G, B, H)
            weight = params[f"{self.head_name}.weight"]
            weight = weight if weight.dim() == 3 else weight.unsqueeze(0)  # (G|1, C, H)
            logits = torch.einsum("gbh,gch->gbc", pooled, weight.to(pooled.dtype).expand(groups, -1, -1))
            bias = params.get(f"{self.head_name}.bias")
            if bias is not None:
                logits = logits + (bias if bias.dim() == 2 else bias.unsqueeze(0)).unsqueeze(1)  # (G, B, C)
            return logits
        states = hidden.last_hidden_state
        picked = states[torch.arange(states.shape[0], device=states.device), answer]  # (G*B, H)
        return self._label_word_logits(picked).reshape(groups, -1, self.num_labels)

    def _label_word_logits(self, hidden: Tensor) -> Tensor:
        """Label-word logits (N, C) from hidden states (N, H) at the answer position only."""
        decoder = self.backbone.get_output_embeddings()
        if self.kind == "masked":
            cls = getattr(self.backbone, "cls", None)
            if cls is not None:  # BERT: transform, then only the label-word rows of the decoder
                hidden = cls.predictions.transform(hidden)
            else:  # other MLM heads: the full head at this one position, then the label words
                head = getattr(self.backbone, "lm_head")
                return head(hidden)[:, self.label_ids]
        logits = hidden @ decoder.weight[self.label_ids].T.to(hidden.dtype)  # (N, C)
        if getattr(decoder, "bias", None) is not None:
            logits = logits + decoder.bias[self.label_ids]
        return logits

    def loss(self, params: dict[str, Tensor], batch: Batch, input_perturbation: Tensor | None = None,
             inputs_embeds: Tensor | None = None) -> Tensor:
        """Per-example cross-entropy (B,), or (G, B) for stacked params."""
        logits = self.logits(params, batch, input_perturbation, inputs_embeds)
        flat = logits.reshape(-1, self.num_labels).float()  # (G*B, C)
        labels = batch.labels.repeat(flat.shape[0] // batch.labels.shape[0])
        return F.cross_entropy(flat, labels, reduction="none").reshape(logits.shape[:-1])

    @torch.inference_mode()
    def predict(self, texts: list[str], params: dict[str, Tensor] | None = None, batch_size: int = 64) -> Tensor:
        """(N, C) class logits with the template applied."""
        params = params or self.params
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

    def init_params(self, length: int, init: str, generator: torch.Generator, text: str = "") -> dict[str, Tensor]:
        """Trainable tensors: the prompt and, for the classifier head, a freshly seeded head."""
        params = {"prompt": self.init_prompt(length, init, generator, text)}
        for name, value in self.head_params().items():
            # HF's own init for a linear head: N(0, 0.02) weights, zero bias, from our seed
            params[name] = (torch.randn(value.shape, generator=generator) * 0.02 if name.endswith("weight")
                            else torch.zeros(value.shape))
        return {k: v.to(self.device) for k, v in params.items()}
