"""The registry of the verification matrix: one tiny random config per family and the cells it is checked in.

Each family's settings exercise what makes it different (grouped-query heads, sliding windows shorter than the
test texts, ALiBi, partial rotary, logit softcapping, learned positions that start at an offset, mean pooling),
at 2 layers, hidden 32 and the toy vocabulary of conftest. A cell is (prompt type, head) with the independent
reference it is checked against; ptp_core.model.verified.VERIFIED must equal CELLS (test_matrix asserts it), so that
no family, prompt type or head is accepted without a cell here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conftest import WORDS, make_tokenizer

# what each reference is (the docs table prints these)
PEFT_SEQ_CLS = "PEFT SEQ_CLS prompt tuning"
PEFT_CAUSAL = "PEFT CAUSAL_LM prompt tuning"
PEFT_SEQ2SEQ = "PEFT SEQ_2_SEQ_LM prompt tuning"
PEFT_PREFIX = "PEFT CAUSAL_LM prefix tuning"
PEFT_PREFIX_CACHE = "PEFT's prefix cache in HF's SequenceClassification"
HF_MASKED = "HF MaskedLM forward, prompt concatenated"
HF_CHOICE = "HF MultipleChoice forward, prompt concatenated"
FLOAT64 = "explicit float64 prefix attention"
FLOAT64_MODERNBERT = "explicit float64 ModernBERT, windowed prefix"
PEFT_LM_CAUSAL = "PEFT CAUSAL_LM prompt tuning, labels loss"  # --head lm (tests/model/test_lm_matrix.py)
PEFT_LM_PREFIX = "PEFT CAUSAL_LM prefix tuning, labels loss"
PEFT_LM_SEQ2SEQ = "PEFT SEQ_2_SEQ_LM prompt tuning, labels loss"

WINDOW = 8  # sliding windows: shorter than the longer test texts (the window cuts inside them), long enough that
#            the prompt reaches the answer of the shortest through 2 layers (else a cell could not fail)

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=256, pad_token_id=0, initializer_range=0.3)
GQA = dict(SMALL, num_attention_heads=4, num_key_value_heads=2)  # 2 query heads per key/value head

ENCODER_CELLS = {("shallow", "classifier"): PEFT_SEQ_CLS, ("shallow", "verbalizer"): HF_MASKED,
                 ("shallow", "multiple-choice classifier"): HF_CHOICE, ("shallow", "multiple-choice verbalizer"): HF_MASKED}
FLOAT64_CELLS = {**ENCODER_CELLS, ("deep", "classifier"): FLOAT64}
DECODER_CELLS = {("shallow", "classifier"): PEFT_SEQ_CLS, ("shallow", "verbalizer"): PEFT_CAUSAL,
                 ("shallow", "multiple-choice verbalizer"): PEFT_CAUSAL, ("shallow", "lm"): PEFT_LM_CAUSAL,
                 ("deep", "classifier"): PEFT_PREFIX_CACHE, ("deep", "verbalizer"): PEFT_PREFIX,
                 ("deep", "multiple-choice verbalizer"): PEFT_PREFIX, ("deep", "lm"): PEFT_LM_PREFIX}
ALIBI_CELLS = {cell: reference for cell, reference in DECODER_CELLS.items() if cell[0] == "shallow"}
SEQ2SEQ_CELLS = {("shallow", "verbalizer"): PEFT_SEQ2SEQ, ("shallow", "multiple-choice verbalizer"): PEFT_SEQ2SEQ,
                 ("shallow", "lm"): PEFT_LM_SEQ2SEQ}


@dataclass(frozen=True)
class Family:
    config: str  # transformers config class
    settings: dict  # besides vocab_size
    tokenizer: str  # a toy tokenizer kind (tokenizer below)
    kind: str  # masked, causal, seq2seq (ptp_core.model.backbones.model_kind)
    cells: dict = field(default_factory=dict)  # (prompt type, head) -> reference
    why: str = ""  # what the settings exercise
    deep_settings: dict = field(default_factory=dict)  # overrides for the deep cells


FAMILIES: dict[str, Family] = {
    # ---- encoders: BERT's pair segments, learned positions from padding_idx + 1, relative positions, mean pooling
    "bert": Family("BertConfig", SMALL, "segments", "masked", FLOAT64_CELLS, "segment ids of a pair"),
    "roberta": Family("RobertaConfig", dict(SMALL, type_vocab_size=1, max_position_embeddings=257), "masked",
                      "masked", FLOAT64_CELLS, "positions from padding_idx + 1"),
    "xlm-roberta": Family("XLMRobertaConfig", dict(SMALL, type_vocab_size=1, max_position_embeddings=257), "unigram",
                          "masked", FLOAT64_CELLS, "positions from padding_idx + 1, a Unigram tokenizer"),
    "distilbert": Family("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                  max_position_embeddings=256, pad_token_id=0, initializer_range=0.3),
                         "masked", "masked", ENCODER_CELLS, "pre_classifier head"),
    "albert": Family("AlbertConfig", dict(SMALL, embedding_size=16), "segments", "masked", ENCODER_CELLS,
                     "embeddings narrower than the hidden size"),
    "electra": Family("ElectraConfig", dict(SMALL, embedding_size=16), "masked", "masked", FLOAT64_CELLS,
                      "embeddings narrower than the hidden size"),
    "deberta-v2": Family("DebertaV2Config", dict(SMALL, relative_attention=True, position_buckets=16,
                                                 pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                                 pooler_hidden_size=32),
                         "masked", "masked", ENCODER_CELLS, "disentangled relative attention"),
    "mpnet": Family("MPNetConfig", dict(SMALL, max_position_embeddings=257), "masked", "masked", ENCODER_CELLS,
                    "relative attention bias, positions from padding_idx + 1"),
    "modernbert": Family("ModernBertConfig", dict(SMALL, classifier_pooling="mean", local_attention=WINDOW,
                                                  global_attn_every_n_layers=2, cls_token_id=2, sep_token_id=3,
                                                  bos_token_id=2, eos_token_id=3),
                         "masked", "masked", {**ENCODER_CELLS, ("deep", "classifier"): FLOAT64_MODERNBERT},
                         "mean pooling, a global then a local layer"),
    # ---- decoders
    "gpt2": Family("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=3,
                                      eos_token_id=3, pad_token_id=0, initializer_range=0.3),
                   "causal", "causal", DECODER_CELLS, "learned positions"),
    "llama": Family("LlamaConfig", dict(GQA, bos_token_id=2, eos_token_id=3), "causal", "causal", DECODER_CELLS,
                    "grouped-query attention"),
    "qwen2": Family("Qwen2Config", dict(GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                        bos_token_id=0, eos_token_id=0),
                    "bpe", "causal", DECODER_CELLS, "a full layer, then a sliding window; byte-level BPE"),
    "qwen3": Family("Qwen3Config", dict(GQA, head_dim=8, bos_token_id=2, eos_token_id=3), "causal", "causal",
                    DECODER_CELLS, "query/key norms"),
    "mistral": Family("MistralConfig", dict(GQA, sliding_window=WINDOW, bos_token_id=2, eos_token_id=3), "causal",
                      "causal", DECODER_CELLS, "sliding window"),
    "gemma": Family("GemmaConfig", dict(GQA, num_key_value_heads=1, head_dim=8, bos_token_id=2, eos_token_id=3),
                    "causal", "causal", DECODER_CELLS, "scaled embeddings, one key/value head"),
    "gemma2": Family("Gemma2Config", dict(GQA, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                                          final_logit_softcapping=3.0, query_pre_attn_scalar=8, bos_token_id=2,
                                          eos_token_id=3),
                     "causal", "causal", DECODER_CELLS, "sliding window, attention and final softcapping"),
    "gemma3_text": Family("Gemma3TextConfig", dict(GQA, head_dim=8, sliding_window=WINDOW,
                                                   layer_types=["sliding_attention", "full_attention"],
                                                   final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                                                   bos_token_id=2, eos_token_id=3),
                          "causal", "causal", DECODER_CELLS, "sliding and full layers, final softcapping"),
    "phi": Family("PhiConfig", dict(SMALL, partial_rotary_factor=0.5, bos_token_id=2, eos_token_id=3), "causal",
                  "causal", DECODER_CELLS, "partial rotary"),
    "phi3": Family("Phi3Config", dict(GQA, sliding_window=WINDOW, bos_token_id=2, eos_token_id=3), "causal", "causal",
                   DECODER_CELLS, "sliding window, fused projections"),
    "gpt_neox": Family("GPTNeoXConfig", dict(SMALL, rotary_pct=0.25, bos_token_id=2, eos_token_id=3), "causal",
                       "causal", DECODER_CELLS, "partial rotary, parallel residual"),
    "gptj": Family("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, rotary_dim=4, bos_token_id=2,
                                      eos_token_id=3, pad_token_id=0, initializer_range=0.3),
                   "causal", "causal", DECODER_CELLS, "partial rotary"),
    "opt": Family("OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                    word_embed_proj_dim=32, max_position_embeddings=256, pad_token_id=0,
                                    bos_token_id=2, eos_token_id=3, init_std=0.3),
                  "causal", "causal", DECODER_CELLS, "learned positions offset by 2"),
    "falcon": Family("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, alibi=True,
                                          multi_query=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                          initializer_range=0.3),
                     "causal", "causal", DECODER_CELLS, "ALiBi (deep cells: rotary), multi-query",
                     deep_settings=dict(alibi=False)),  # ALiBi deep prompts are refused by ptp_core.model.prefix
    "olmo": Family("OlmoConfig", dict(SMALL, clip_qkv=2.0, bos_token_id=2, eos_token_id=3), "causal", "causal",
                   DECODER_CELLS, "clipped query/key/value"),
    "olmo2": Family("Olmo2Config", dict(SMALL, bos_token_id=2, eos_token_id=3), "causal", "causal", DECODER_CELLS,
                    "post-norms, query/key norms"),
    "starcoder2": Family("Starcoder2Config", dict(GQA, sliding_window=WINDOW, bos_token_id=2, eos_token_id=3),
                         "causal", "causal", DECODER_CELLS, "sliding window"),
    "gpt_bigcode": Family("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, multi_query=True,
                                                   bos_token_id=2, eos_token_id=3, pad_token_id=0,
                                                   initializer_range=0.3),
                          "causal", "causal", DECODER_CELLS, "multi-query, learned positions"),
    "bloom": Family("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=2,
                                       eos_token_id=3, initializer_range=0.3),
                    "causal", "causal", ALIBI_CELLS, "ALiBi"),
    "smollm3": Family("SmolLM3Config", dict(GQA, no_rope_layers=[1, 0], bos_token_id=2, eos_token_id=3),
                      "causal", "causal", DECODER_CELLS, "a layer without rotary positions"),
    # ---- encoder-decoders
    "t5": Family("T5Config", dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
                                  eos_token_id=3, decoder_start_token_id=0, initializer_factor=1.0,
                                  feed_forward_proj="gated-gelu"),
                 "seq2seq", "seq2seq", SEQ2SEQ_CELLS, "relative position buckets, gated GELU"),
    "bart": Family("BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                      decoder_start_token_id=3, init_std=0.3),
                   "seq2seq", "seq2seq", SEQ2SEQ_CELLS, "learned positions offset by 2"),
}


def cells() -> dict[str, dict[str, dict[str, str]]]:
    """family -> prompt type -> head -> reference: what ptp_core.model.verified.VERIFIED must equal."""
    table: dict = {}
    for name, family in FAMILIES.items():
        for (prompt_type, head), reference in family.cells.items():
            table.setdefault(name, {}).setdefault(prompt_type, {})[head] = reference
    return table


def unigram_tokenizer(kind: str = "masked", mask_takes_space: bool = True):
    """A SentencePiece-style Unigram tokenizer (Metaspace pieces) on the toy vocabulary, BERT's specials first so
    that their ids are those of the other toy tokenizers ([PAD] 0, [CLS] 2, [SEP] 3, [MASK] 4); specials around the
    text as conftest.make_tokenizer(kind) places them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from conftest import SPECIALS

    pieces = [(w, 0.0) for w in SPECIALS] + [("▁", -5.0)]
    pieces += [("▁" + w, -1.0 - i / 100) for i, w in enumerate(WORDS[len(SPECIALS):])]
    pieces += [(c, -10.0) for c in sorted({c for w in WORDS for c in w})]  # pieces of words outside the list
    tok = Tokenizer(models.Unigram(pieces, unk_id=1, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    if kind == "masked":  # XLM-R's pair: </s></s> between the segments
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    elif kind == "seq2seq":  # T5: every input ends with EOS
        tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", pair="$A [SEP] $B [SEP]",
                                                           special_tokens=[("[SEP]", 3)])
    # as XLM-R's <mask>: it takes the space before it (without: a lone "▁" piece stands before the mask)
    mask = AddedToken("[MASK]", lstrip=mask_takes_space, special=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token=mask, eos_token="[SEP]")


def tokenizer(kind: str):
    """A toy tokenizer: conftest.make_tokenizer's kinds, "unigram" (XLM-R-like), "unigram-causal", "unigram-seq2seq"."""
    if kind.startswith("unigram"):
        return unigram_tokenizer(kind.partition("-")[2] or "masked")
    return make_tokenizer(kind)


def build_config(name: str, tokenizer_kind: str | None = None, prompt_type: str = "shallow"):
    """The family's tiny config for a toy tokenizer (vocab_size = the tokenizer's length) and prompt type."""
    import transformers

    family = FAMILIES[name]
    vocab = len(tokenizer(tokenizer_kind or family.tokenizer))
    settings = {**family.settings, **(family.deep_settings if prompt_type == "deep" else {})}
    return getattr(transformers, family.config)(vocab_size=vocab, num_labels=2, **settings)


def labels_inputs(tok, kind: str, contexts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """HF's `labels` inputs for an LM learning `targets` after `contexts`, right-padded, from the tokenizer's own call:
    causal, context and target tokenized as one text, then eos, labels -100 over the context and the padding;
    seq2seq, the context for the encoder and the target's own encoding (with its specials) as labels."""
    ids, labels = [], []
    for context, target in zip(contexts, targets):
        if kind == "seq2seq":
            ids.append(tok(context).input_ids)
            labels.append(tok(target).input_ids)
            continue
        whole, before = tok(f"{context} {target}").input_ids, tok(context).input_ids
        assert whole[:len(before)] == before, "the target's tokens must follow the context's"
        ids.append(whole + [tok.eos_token_id])
        labels.append([-100] * len(before) + ids[-1][len(before):])
    width, label_width = max(map(len, ids)), max(map(len, labels))
    return {"input_ids": torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids]),  # (B, T)
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
            "labels": torch.tensor([label + [-100] * (label_width - len(label)) for label in labels])}  # (B, T|Tc)


def prefix_reference_inputs(model, prompt: torch.Tensor, texts: list):
    """What a written-out prefix reference starts from: the task model, its base and config, the encoded batch and
    the prompt (P, L*2*H*d) as (P, L, 2, H, d) keys and values."""
    task_model = model.backbone
    config = task_model.config
    heads = config.num_attention_heads
    layers = prompt.reshape(prompt.shape[0], config.num_hidden_layers, 2, heads, config.hidden_size // heads)
    return task_model, task_model.base_model, config, model.encode(texts), layers


def reference_encoder_logits(model, prompt: torch.Tensor, texts: list) -> torch.Tensor:
    """(N, C) a BERT-like classifier's logits with the prefix written out: each layer's keys and values are the
    prefix's concatenated before the text's, the mask lets every text position see the prefix, positions start
    after it (RoBERTa's and XLM-R's after their padding offset), a pair's segment ids as the tokenizer gives them.
    In the model's dtype (float64 for a reference), the HF modules called one by one."""
    task_model, base, config, batch, layers = prefix_reference_inputs(model, prompt, texts)
    (rows, width), length = batch.input_ids.shape, prompt.shape[0]
    heads, dim = layers.shape[3], layers.shape[4]
    start = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    segments = {} if batch.token_type_ids is None else {"token_type_ids": batch.token_type_ids}
    hidden = base.embeddings(input_ids=batch.input_ids, position_ids=torch.arange(width)[None] + start + length,
                             **segments)
    if hasattr(base, "embeddings_project"):  # ELECTRA: embeddings narrower than the hidden size
        hidden = base.embeddings_project(hidden)
    keep = torch.cat([torch.ones(rows, length, dtype=torch.bool), batch.attention_mask.bool()], 1)  # (N, P+T)
    for index, layer in enumerate(base.encoder.layer):
        attention = layer.attention.self

        def split(x):
            return x.view(rows, -1, heads, dim).transpose(1, 2)  # (N, H, T, d)

        prefix_keys = layers[:, index, 0].permute(1, 0, 2).expand(rows, -1, -1, -1)  # (N, H, P, d)
        prefix_values = layers[:, index, 1].permute(1, 0, 2).expand(rows, -1, -1, -1)
        keys = torch.cat([prefix_keys, split(attention.key(hidden))], 2)
        values = torch.cat([prefix_values, split(attention.value(hidden))], 2)
        scores = split(attention.query(hidden)) @ keys.transpose(-1, -2) / dim ** 0.5  # (N, H, T, P+T)
        weights = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        context = (weights @ values).transpose(1, 2).reshape(rows, width, -1)
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    if config.model_type in ("roberta", "xlm-roberta", "electra"):  # their heads read the first token themselves
        return task_model.classifier(hidden)
    return task_model.classifier(base.pooler(hidden))
