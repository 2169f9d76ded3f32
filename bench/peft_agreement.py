"""The agreement table of docs/backbones.md: max |logit difference| from PEFT's own forward, per family and direction.

    .venv/bin/python bench/peft_agreement.py

Builds the test suite's tiny random model of every family (tests/conftest.py) and runs the two checks of
tests/test_families.py: a PEFT-saved adapter read here, and our checkpoint read by PeftModel.from_pretrained.
PEFT's forward runs one example at a time; ours runs them as one right-padded batch.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import peft
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    import conftest
    from test_families import ours_to_peft, peft_saved_to_ours

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


if __name__ == "__main__":
    main()
