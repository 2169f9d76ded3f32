"""The demo's recipe (`make demo`): train PT, PTP-RN and PTP-ADV on the embedded default, compare their landscapes.

    python -m landscape.demo --mode quick   # minilm + rotten_tomatoes, 1 seed, 15x15 grids: < 10 min on 2 CPU cores
    python -m landscape.demo --mode full    # 5 seeds, + smollm2 with the verbalizer head, 31x31 grids

Runs go to runs/demo[-full]/, figures and tables to figures/demo[-full]/. Finished runs and
surfaces are reused, so an interrupted demo resumes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from landscape.compare import compare, find_checkpoints
from landscape.connect.run import ConnectConfig, connect_checkpoints
from landscape.draw.comparison import PlotConfig, draw, write_connection
from landscape.draw.tables import console_table
from landscape.grid.spec import SurfaceSpec
from landscape.measures.row import MetricsConfig
from ptp_core.model.backbones import native_bf16, resolve_device, resolve_dtype
from ptp_core.sweep import run_dir, run_sweep, summarize_runs, summary_markdown, write_summary
from ptp_core.train import TrainConfig
from ptp_core.training.config import METHODS


@dataclass(frozen=True)
class DemoSetting:
    model: str
    seeds: tuple[int, ...]
    steps: int  # training steps per run
    batch_size: int
    eval_examples: int  # validation examples for model selection
    test_examples: int | None  # test examples for the reported accuracy (None: all 1275)
    grid: str  # landscape grid per axis
    examples: int  # evaluation examples per grid point
    metric_examples: int  # examples for the Hessian / sharpness estimators
    metrics: str
    spectrum: tuple[int, int, int]  # SLQ probes, Lanczos steps, HVP cap of the smallest eigenvalue
    connect: tuple[int, int, int]  # Bezier curve between pt and ptp-rn seed 0: Adam steps, examples, t points


# quick: sized so that 3 trainings + 6 surfaces of 15x15 + every metric (a small spectrum included) + one
# connectivity curve finish in under 10 minutes on a 2-core CPU with bf16 autocast (its cost: docs/results.md):
# batch 16 (~0.5 s per PTP step), surfaces ~9 points/s on 16 examples, HVPs on 8 examples
QUICK = [DemoSetting("minilm", (0,), 100, 16, 200, 512, "15", 16, 8,
                     "surface,hessian,sharpness,input,calibration,spectrum", (1, 12, 40), (30, 24, 11))]
FULL = [DemoSetting("minilm", (0, 1, 2, 3, 4), 300, 32, 1275, None, "31", 256, 32,
                    "surface,hessian,trace,sharpness,input,calibration,spectrum", (4, 30, 500), (60, 128, 21)),
        DemoSetting("smollm2", (0, 1, 2, 3, 4), 200, 16, 256, None, "31", 256, 16,
                    "surface,hessian,trace,sharpness,input,calibration,spectrum", (4, 30, 500), (60, 128, 21))]


def run_demo(mode: str = "quick", root: Path = Path("."), device: str = "auto", progress: bool = True) -> Path:
    """Train, measure and draw every setting of the mode; return the figures folder."""
    settings = QUICK if mode == "quick" else FULL
    device = resolve_device(device)
    dtype = resolve_dtype("auto", device)
    print(f"device {device}; dtype {dtype}" + (" autocast (the hardware multiplies bf16 natively)" if native_bf16(device)
                                               else " (no native bf16 matmul here)"), flush=True)
    suffix = "" if mode == "quick" else "-full"
    figures = root / "figures" / f"demo{suffix}"
    for setting in settings:
        name = "" if setting.model == "minilm" else f"-{setting.model}"
        runs = root / "runs" / f"demo{suffix}{name}"
        out = figures if not name else figures.with_name(figures.name + name)
        print(f"\n== {setting.model}: {', '.join(METHODS)} x seeds {list(setting.seeds)}, {setting.steps} steps; "
              f"landscapes {setting.grid}x{setting.grid} on {setting.examples} test examples "
              f"(model metrics on {setting.metric_examples}) ==", flush=True)
        train_runs(setting, runs, device, progress)
        draw_landscapes(setting, runs, out, device, progress)
        print(f"figures: {out}/landscape_3d.pdf, contour.pdf, profiles.pdf, report.html; "
              f"tables: {out}/metrics.md (.csv, .tex, .json); runs: {runs}/summary.md")
    return figures


def train_runs(setting: DemoSetting, runs: Path, device: str, progress: bool) -> None:
    """Every method x seed of the setting (finished runs are reused), and their summary table."""
    started = time.time()
    base = TrainConfig(model=setting.model, steps=setting.steps, batch_size=setting.batch_size,
                       eval_every=max(1, setting.steps // 3), eval_examples=setting.eval_examples,
                       test_examples=setting.test_examples, device=device, progress=progress)
    run_sweep(base, list(METHODS), list(setting.seeds), runs)
    rows = summarize_runs(runs, list(METHODS), list(setting.seeds))
    write_summary(runs, rows)
    print(summary_markdown(rows), end="")
    print(f"training: {time.time() - started:.0f} s", flush=True)


def draw_landscapes(setting: DemoSetting, runs: Path, out: Path, device: str, progress: bool) -> None:
    """Surfaces in both spaces, metrics, figures and report of the runs; one connectivity curve pt <-> ptp-rn."""
    started = time.time()
    spec = SurfaceSpec(grid=setting.grid, examples=setting.examples)
    probes, steps, hvps = setting.spectrum
    metrics = MetricsConfig(tuple(setting.metrics.split(",")), setting.metric_examples, spectrum_probes=probes,
                            spectrum_steps=steps, max_hvps=hvps, calibration_examples=min(512, 2 * setting.eval_examples))
    comparison = compare(find_checkpoints([runs]), spec, metrics, out, ("prompt", "input"), device=device,
                         progress=progress)
    draw(comparison, PlotConfig(out))
    print(console_table(comparison.rows))
    print(f"landscapes and metrics: {time.time() - started:.0f} s")
    started = time.time()
    steps, examples, points = setting.connect
    # one pair for the figure: two methods' seed-0 prompts (landscape.plot --connect pairs seeds of one method)
    result = connect_checkpoints(run_dir(runs, "pt", 0), run_dir(runs, "ptp-rn", 0),
                                 ConnectConfig(steps=steps, examples=examples, points=points, device=device),
                                 progress=progress)
    write_connection(result, out / "connect")
    print(f"mode connectivity pt <-> ptp-rn: {time.time() - started:.0f} s ({out}/connect/connect.pdf)")

