"""The README's first-five-minutes recipe runs end to end, its PTP prompt differs from its PT prompt, and the first
table of its metrics.md fits a page (at most 12 columns). Run as the notebooks are: the embedded minilm, tiny settings
(flags appended to the README's own command lines; argparse keeps the last value)."""
import re
import shlex
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = {"ptp_core.sweep": ["--steps", "6", "--reg-warmup", "2", "--reg-ramp", "2", "--eval-every", "3",
                           "--eval-examples", "16", "--test-examples", "16", "--max-length", "32", "--no-progress"],
        "landscape.plot": ["--grid", "5", "--examples", "8", "--metrics", "surface", "--no-progress"]}


def recipe() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- first-five-minutes:begin -->\n(.*?)<!-- first-five-minutes:end -->", text, re.S)[1]
    return [shlex.split(line.strip()) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_recipe_runs_and_its_methods_differ(tmp_path, monkeypatch):
    from landscape.cli.plot import main as plot
    from ptp_core.sweep import main as sweep

    monkeypatch.chdir(tmp_path)
    commands = recipe()
    assert [c[:3] for c in commands] == [["python", "-m", "ptp_core.sweep"], ["python", "-m", "landscape.plot"]]
    for command in commands:
        {"ptp_core.sweep": sweep, "landscape.plot": plot}[command[2]](command[3:] + TINY[command[2]])
    pt, ptp = (load_file(tmp_path / "runs/first" / method / "seed0" / "adapter_model.safetensors")["prompt_embeddings"]
               for method in ("pt", "ptp-rn"))
    assert (pt - ptp).abs().max() > 1e-6  # the regularizer switched on: not plain PT under another name
    table = next(line for line in (tmp_path / "figures/first/metrics.md").read_text().splitlines()
                 if line.startswith("|"))
    assert 3 <= table.count("|") - 1 <= 12, table
