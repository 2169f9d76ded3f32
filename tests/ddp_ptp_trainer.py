"""Two optimizer steps of PTPTrainer on a tiny PEFT prompt model, in one process or one per torchrun rank.

    torchrun --nproc_per_node 2 tests/ddp_ptp_trainer.py MODEL_DIR OUT    # OUT/{method}-rank{r}.safetensors, .json

Run by tests/test_hf.py (gloo on the CPU), which trains the same global batches in its own process and compares.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from conftest import toy_rows

METHODS = ("pt", "ptp-rn")
GLOBAL_BATCH = 8


def train(model_dir: str, method: str, out: Path, processes: int = 1) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The trained tensors (PEFT's state dict of the adapter) and the training logs, GLOBAL_BATCH examples a step."""
    from peft import get_peft_model_state_dict
    from transformers import DataCollatorWithPadding, TrainingArguments

    from ptp_core.hf import PTPTrainer
    from ptp_core.training.perturb import PerturbConfig
    from test_hf import peft_model, toy_dataset

    peft, tokenizer = peft_model(model_dir, "bert", "SEQ_CLS")
    rows = toy_rows(2 * GLOBAL_BATCH, seed=21)
    dataset = toy_dataset(tokenizer, [r["text"] for r in rows], [int(r["label"] == "positive") for r in rows])
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, seed=3, max_steps=2,
                             per_device_train_batch_size=GLOBAL_BATCH // processes, learning_rate=0.1,
                             logging_steps=1, train_sampling_strategy="sequential", save_strategy="no",
                             ddp_backend="gloo" if processes > 1 else None)
    trainer = PTPTrainer(model=peft, args=args, processing_class=tokenizer, method=method, train_dataset=dataset,
                         data_collator=DataCollatorWithPadding(tokenizer),
                         perturb=PerturbConfig(target="input", reg_warmup=0, reg_ramp=0))
    trainer.train()
    tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft).items()}
    return tensors, [row for row in trainer.state.log_history if "clean_loss" in row]


def main(model_dir: str, out: str) -> None:
    """Train every method in this process (a torchrun rank or alone); write its tensors and logs to `out`."""
    from safetensors.torch import save_file

    rank, processes = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    for method in METHODS:
        tensors, logs = train(model_dir, method, Path(out) / method, processes)
        save_file(tensors, str(Path(out) / f"{method}-rank{rank}.safetensors"))
        (Path(out) / f"{method}-rank{rank}.json").write_text(json.dumps(logs, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # leave as ptp_core.cli.run leaves a rank: torch.distributed's C++ side can abort at interpreter exit with gloo
    # ("terminate called without an active exception") after the work is saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
