"""Max |logit difference| from PEFT's own forward, per family and direction.

    .venv/bin/python bench/peft_agreement.py

Builds the test suite's tiny random model of every family (tests/conftest.py) and runs the two checks of
tests/model/test_families.py: a PEFT-saved adapter read here, and our checkpoint read by PeftModel.from_pretrained.
PEFT's forward runs one example at a time; ours runs them as one right-padded batch.
Deep prompts (tests/model/test_deep.py): decoders against PEFT's CAUSAL_LM prefix tuning in both directions (Llama and
Qwen2 with fewer key/value heads than heads); encoders against an explicit float64 attention with the prefix
concatenated (PEFT's SEQ_CLS prefix tuning does not run on transformers 5).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "model")]  # conftest.py, families.py; test_families.py


def main() -> None:
    import conftest
    import peft
    import torch
    import transformers
    from test_families import ours_to_peft, peft_saved_to_ours
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, float32")
        print("| family | head | PEFT-saved adapter -> ours | ours -> PeftModel.from_pretrained |")
        print("|---|---|---|---|")
        for name, (kind, model_class, config_class, settings) in conftest.FAMILIES.items():
            torch.manual_seed(0)
            vocab = len(conftest.make_tokenizer(kind)) if kind == "bpe" else len(conftest.WORDS)
            config = getattr(transformers, config_class)(vocab_size=vocab, num_labels=2, **settings)
            directory = conftest._save(getattr(transformers, model_class)(config), kind, Path(root) / name)
            head = conftest.family_head(name)
            work = Path(tempfile.mkdtemp(dir=root))
            forward = peft_saved_to_ours(directory, work)
            backward = ours_to_peft(directory, head, work)
            print(f"| {name} | {head} | {forward:.1e} | {backward:.1e} |")
        deep_table(Path(root))


def deep_table(root: Path) -> None:
    """The deep-prompt rows: max |logit difference| per family and direction."""
    import conftest
    import torch
    import transformers
    from test_deep import deep_ours_to_peft, deep_peft_to_ours, encoder_reference_gaps

    small = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, initializer_range=0.3)
    decoders = {"gpt2": ("causal", transformers.GPT2LMHeadModel(transformers.GPT2Config(
                    vocab_size=len(conftest.WORDS), n_embd=32, n_layer=2, n_head=2, bos_token_id=3, eos_token_id=3,
                    pad_token_id=0, initializer_range=0.3))),
                "llama (2 heads, 1 kv)": ("causal", transformers.LlamaForCausalLM(transformers.LlamaConfig(
                    vocab_size=len(conftest.WORDS), num_attention_heads=2, num_key_value_heads=1, bos_token_id=2,
                    eos_token_id=3, pad_token_id=0, **small))),
                "qwen2 (4 heads, 2 kv)": ("bpe", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                    vocab_size=len(conftest.make_tokenizer("bpe")), num_attention_heads=4, num_key_value_heads=2,
                    bos_token_id=0, eos_token_id=0, **small)))}
    print("\nDeep prompts, decoders (label-word logits, CAUSAL_LM prefix tuning):")
    print("| family | PEFT-saved prefix adapter -> ours | ours -> PeftModel.from_pretrained |")
    print("|---|---|---|")
    for name, (kind, model) in decoders.items():
        torch.manual_seed(0)
        directory = conftest._save(model, kind, root / "deep" / name.split()[0])
        print(f"| {name} | {deep_peft_to_ours(directory, root / 'deep' / 'peft' / name.split()[0]):.1e} | "
              f"{deep_ours_to_peft(directory, root / 'deep' / 'ours' / name.split()[0]):.1e} |")
    print("\nDeep prompts, encoders (classifier logits vs an explicit float64 attention with the prefix):")
    print("| family | ours float64 | ours float32 | without the prefix (the check's reach) |")
    print("|---|---|---|---|")
    for name in ("bert", "roberta", "electra"):
        kind, model_class, config_class, settings = conftest.FAMILIES[name]
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(vocab_size=len(conftest.WORDS), num_labels=2, **settings)
        directory = conftest._save(getattr(transformers, model_class)(config), kind, root / "deep" / name)
        float64, float32, without = encoder_reference_gaps(directory)
        print(f"| {name} | {float64:.1e} | {float32:.1e} | {without:.1e} |")


if __name__ == "__main__":
    main()
