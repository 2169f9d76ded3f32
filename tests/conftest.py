"""Tiny random BERT / GPT-2 / Llama models and a toy sentiment task, built offline for the tests."""
from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOOD = ["good", "great", "fun", "lovely", "superb", "moving"]
BAD = ["bad", "awful", "dull", "boring", "weak", "messy"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "quite", "really", "a", "and", "it", "story"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = SPECIALS + GOOD + BAD + FILLER + ["terrible", "positive", "negative", "It", ".", ",", "Review", ":"]


def run_torchrun(script, *args: str, pythonpath: tuple = ()) -> None:
    """`torchrun --standalone --nproc_per_node 2 script args` on the CPU, one thread per rank; asserts that every rank
    finished (stderr's tail in the message), and kills torchrun and its workers if they pass 5 minutes."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *args]
    paths = os.pathsep.join(str(p) for p in (*pythonpath, tests.parent))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": paths}
    with subprocess.Popen(command, cwd=tests, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as run:
        try:
            _, errors = run.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)  # torchrun and both workers
            raise
    assert run.returncode == 0, errors[-3000:]


def make_tokenizer(kind: str):
    """A word-level fast tokenizer: BERT-style [CLS] x [SEP] for "masked", plain words for "causal",
    words then the end-of-sequence token [SEP] for "seq2seq" (T5 and BART end every input with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        return _byte_level_bpe()
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind in ("masked", "segments"):  # segments: a BERT tokenizer that also returns token_type_ids
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        inputs = ["input_ids", "token_type_ids", "attention_mask"] if kind == "segments" else None
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       **({"model_input_names": inputs} if inputs else {}))
    if kind == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]")


def _byte_level_bpe():
    """A Qwen2 tokenizer (byte-level BPE) trained on the toy vocabulary: transformers always loads a qwen2 folder's
    tokenizer as Qwen2Tokenizer, which would read a word-level vocabulary as nothing."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    trainer = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS)] * 5 + [r["text"] + " It was positive negative terrible." for r in toy_rows(200, 0)]
    trainer.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    model = json.loads(trainer._tokenizer.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split())
                                                        for m in model["merges"]])


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 3) + [rng.choice(GOOD if label else BAD)] + rng.sample(FILLER, rng.randint(0, 3))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


def _save(model, kind: str, path) -> str:
    torch.manual_seed(0)
    model.save_pretrained(path)
    make_tokenizer(kind).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random models: bert (with pooler and MLM head), gpt2, llama.

    initializer_range=0.3 (HF default 0.02) so that random features carry enough signal to learn the toy task.
    """
    from transformers import BertConfig, BertForPreTraining, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vocab = len(WORDS)
    bert = BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                                         initializer_range=0.3))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=3, eos_token_id=3, pad_token_id=0, initializer_range=0.3))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True,
                                         initializer_range=0.3))
    _grow_positions(bert.bert.embeddings.position_embeddings, bert.config, "max_position_embeddings")
    _grow_positions(gpt2.transformer.wpe, gpt2.config, "n_positions")
    return {"bert": _save(bert, "segments", root / "bert"), "gpt2": _save(gpt2, "causal", root / "gpt2"),
            "llama": _save(llama, "causal", root / "llama")}


def _grow_positions(table, config, key: str, rows: int = 256) -> None:
    """Room for a prompt plus the default 128 text tokens, drawn AFTER the model: every other random weight stays
    that of the 128-position draw, on which the learning tests' thresholds were set."""
    extra = torch.randn(rows - table.weight.shape[0], table.weight.shape[1],
                        generator=torch.Generator().manual_seed(1)) * config.initializer_range
    table.weight = torch.nn.Parameter(torch.cat([table.weight.data, extra]))
    table.num_embeddings = rows
    setattr(config, key, rows)


# Every family the README lists, as a tiny random task model: (tokenizer kind, HF class, config class, config).
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=256, pad_token_id=0, initializer_range=0.3)
FAMILIES = {
    "bert": ("masked", "BertForSequenceClassification", "BertConfig", SMALL),
    "roberta": ("masked", "RobertaForSequenceClassification", "RobertaConfig", dict(SMALL, type_vocab_size=1, max_position_embeddings=257)),
    "distilbert": ("masked", "DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=256, pad_token_id=0,
                        initializer_range=0.3)),
    "deberta-v2": ("masked", "DebertaV2ForSequenceClassification", "DebertaV2Config",
                   dict(SMALL, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                        position_biased_input=False, pooler_hidden_size=32)),
    "albert": ("masked", "AlbertForSequenceClassification", "AlbertConfig", dict(SMALL, embedding_size=16)),
    "electra": ("masked", "ElectraForSequenceClassification", "ElectraConfig", dict(SMALL, embedding_size=16)),
    "gpt2": ("causal", "GPT2ForSequenceClassification", "GPT2Config",
             dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=3, eos_token_id=3, pad_token_id=0,
                  initializer_range=0.3)),
    "llama": ("causal", "LlamaForSequenceClassification", "LlamaConfig",
              dict(SMALL, num_key_value_heads=1, bos_token_id=2, eos_token_id=3)),
    "qwen2": ("bpe", "Qwen2ForSequenceClassification", "Qwen2Config",
              dict(SMALL, num_key_value_heads=1, bos_token_id=0, eos_token_id=0)),
    "t5": ("seq2seq", "T5ForConditionalGeneration", "T5Config",
           dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=3,
                decoder_start_token_id=0, initializer_factor=1.0,
                feed_forward_proj="gated-gelu")),  # T5 v1.1 / Flan-T5, the LM-adapted T5 of Lester et al.
    "bart": ("seq2seq", "BartForConditionalGeneration", "BartConfig",
             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3, init_std=0.3)),
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random task models, one per family in FAMILIES (classifiers with 2 labels, seq2seq LMs)."""
    import transformers

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, (kind, model_class, config_class, settings) in FAMILIES.items():
        torch.manual_seed(0)
        vocab = len(make_tokenizer(kind)) if kind == "bpe" else len(WORDS)
        config = getattr(transformers, config_class)(vocab_size=vocab, num_labels=2, **settings)
        dirs[name] = _save(getattr(transformers, model_class)(config), kind, root / name)
    return dirs


def family_head(name: str) -> str:
    return "verbalizer" if FAMILIES[name][0] == "seq2seq" else "classifier"


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> str:
    """A learnable toy sentiment task with train/validation/test splits."""
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    rows = [dict(r, split=s) for s, n, seed in (("train", 96, 1), ("validation", 32, 2), ("test", 32, 3))
            for r in toy_rows(n, seed)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def build_model(model_dir: str, head: str, seed: int = 0, prompt_length: int = 4):
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel

    backbone = load_backbone(model_dir, head, num_labels=2)
    model = PromptModel(backbone, head, 2, label_words=["negative", "positive"],
                        template="{text} It was {mask}." if head == "verbalizer" else "{text}")
    model = model.with_params(model.init_params(prompt_length, "random", torch.Generator().manual_seed(seed)))
    return model


@pytest.fixture(scope="session")
def tiny_bert_model(tiny_dirs):
    """PromptModel: tiny BERT with the classifier head, 4 virtual tokens."""
    return build_model(tiny_dirs["bert"], "classifier")


@pytest.fixture(scope="session")
def tiny_gpt2_model(tiny_dirs):
    """PromptModel: tiny GPT-2 with the causal verbalizer head."""
    return build_model(tiny_dirs["gpt2"], "verbalizer")


@pytest.fixture(scope="session")
def tiny_t5_model(family_dirs):
    """PromptModel: tiny T5 (encoder-decoder) with the verbalizer read at the first decoder step."""
    return build_model(family_dirs["t5"], "verbalizer")


@pytest.fixture(scope="session")
def tiny_roberta_model(family_dirs):
    """PromptModel: tiny RoBERTa, whose classifier is HF's two-layer ClassificationHead."""
    return build_model(family_dirs["roberta"], "classifier")


@pytest.fixture(scope="session")
def tiny_batch_texts() -> tuple[list[str], list[int]]:
    rows = toy_rows(6, seed=7)
    return [r["text"] for r in rows], [int(r["label"] == "positive") for r in rows]


def one_token_hessian(model, batch):
    """A real prompt-curvature problem small enough for a dense Hessian: one virtual token (D params), the head
    held. Returns (loss_fn, params {"prompt": (1, D)}, dense (D, D) float64 Hessian, symmetrized)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    held = {k: v.detach() for k, v in model.params.items() if k != "prompt"}
    params = {"prompt": model.params["prompt"][:1].detach()}  # (1, D)

    def loss_fn(p):
        return model.loss({**held, **p}, batch).mean(-1)

    with sdpa_kernel(SDPBackend.MATH):  # the one attention kernel with a second derivative
        dense = torch.autograd.functional.hessian(lambda v: loss_fn({"prompt": v.float().reshape(1, -1)}).double(),
                                                  params["prompt"].double().flatten(), vectorize=True)  # (D, D)
    return loss_fn, params, (dense + dense.T) / 2


def pytest_collection_modifyitems(config, items):
    """The slow tests first: the two pytest workers then start on the longest ones (notebooks, minilm) and share
    the short ones after, instead of one worker finishing a four-minute test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
