"""Run every cell of the verification matrix and write its table into docs/backbones.md.

    python tests/matrix_table.py      # rewrites the blocks between the marker comments, nothing else

The numbers are the max |logit difference| between our batched forward and each cell's reference
(tests/model/test_matrix.py), for the lm cells the |loss difference| against PEFT's `labels` loss
(tests/model/test_lm_matrix.py); a cell that fails is written with its error, so the table never claims more than was
run.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "backbones.md"
BEGIN, END = "<!-- matrix:begin (python tests/matrix_table.py) -->", "<!-- matrix:end -->"
TOKENIZERS_BEGIN, TOKENIZERS_END = "<!-- tokenizers:begin (python tests/matrix_table.py) -->", "<!-- tokenizers:end -->"


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def shown(outcome, reach: bool = False, tolerance: float | None = None) -> str:
    """A cell's max |dlogit| or |dloss| (or its reach: how far the prompt moved moves it), or the error it failed
    with; tolerance: the cell's (default: the logits')."""
    if isinstance(outcome, str):
        return f"fails: {outcome.replace('|', '/')}"
    from test_matrix import REACH, TOLERANCE

    value = outcome[1 if reach else 0]
    failed = value < REACH if reach else value > (tolerance or TOLERANCE)
    return f"{value:.1e}" + (" (fails)" if failed else "")


def provenance() -> str:
    import peft
    import torch
    import transformers

    return (f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} cores), float32; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}.")


def matrix_rows(out: Path) -> list[str]:
    from families import FAMILIES
    from test_lm_matrix import TOLERANCE as LM_TOLERANCE
    from test_lm_matrix import measure_lm_family
    from test_matrix import measure_family

    rows = ["| family | prompt type | head | reference | max abs delta | prompt moved | what the config exercises |",
            "|---|---|---|---|---|---|---|"]
    for name, family in FAMILIES.items():
        gaps = {**measure_family(name, out / name), **measure_lm_family(name, out / name)}
        rows += [f"| {name} | {prompt_type} | {head} | {family.cells[prompt_type, head]} | "
                 f"{shown(gaps[prompt_type, head], tolerance=LM_TOLERANCE if head == 'lm' else None)} | "
                 f"{shown(gaps[prompt_type, head], reach=True)} | {family.why} |" for prompt_type, head in family.cells]
    return rows


def tokenizer_rows(out: Path) -> list[str]:
    from test_matrix import TASKS, TOKENIZER_MODELS, measure_tokenizers

    rows = ["| model | head | tokenizer | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
    for name, (head, _) in TOKENIZER_MODELS.items():
        gaps = measure_tokenizers(name, out / f"tokenizers-{name}")
        for tokenizer_kind in dict.fromkeys(kind for kind, _ in gaps):
            rows.append(f"| {name} | {head} | {tokenizer_kind} | "
                        + " | ".join(shown(gaps[tokenizer_kind, task]) for task in TASKS) + " |")
    return rows


def replace_block(text: str, begin: str, end: str, lines: list[str]) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"{DOCS} has no {begin} ... {end} block; add the two marker lines where the table goes")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1]


def main() -> None:
    sys.path[:0] = [str(HERE), str(HERE / "model")]  # families.py here, test_matrix.py in model/
    import conftest  # noqa: F401  (offline settings)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        text = DOCS.read_text()
        text = replace_block(text, BEGIN, END, matrix_rows(out) + ["", provenance()])
        text = replace_block(text, TOKENIZERS_BEGIN, TOKENIZERS_END, tokenizer_rows(out) + ["", provenance()])
    DOCS.write_text(text)


if __name__ == "__main__":
    main()
