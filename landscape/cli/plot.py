"""`python -m landscape.plot CKPT_OR_FOLDER [...] --out DIR`: surfaces, metrics, figures and a report.

argparse, then `landscape.compare.compare` (or `from_surfaces` for `--surface FILE.npz ...`, no model),
then `landscape.draw.comparison.draw` of what it returned: figures, metric tables and report.html.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from landscape.cli.arguments import add_surface_arguments, spec_from_args
from landscape.compare import Comparison, compare, find_checkpoints, from_surfaces, plan
from landscape.connect.run import ConnectConfig
from landscape.draw.comparison import PlotConfig, draw
from landscape.draw.tables import console_table
from landscape.grid.spec import DEVICE_DEFAULT_FIELDS
from landscape.measures.row import DEFAULT_METRICS, METRIC_KINDS, MetricsConfig
from landscape.surface import check_one_loss
from ptp_core import cli, load_checkpoint
from ptp_core.training.config import TRAIN_DTYPES


def parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m landscape.plot", "Loss-landscape figures, metrics and an HTML report for checkpoints.")
    p.add_argument("checkpoints", nargs="*", help="checkpoint directories or folders of them (e.g. runs/)")
    p.add_argument("--out", default=None, help="output directory (default figures/<first checkpoint name>)")
    p.add_argument("--surface", nargs="+", default=None, help="re-render saved surface files; no model needed")
    p.add_argument("--space", default="prompt", choices=("prompt", "input", "both"))
    add_surface_arguments(p, skip=("space",))
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated subset of {','.join(METRIC_KINDS)} ('surface' is free; spectrum costs "
                        "~150 HVPs a checkpoint)")
    p.add_argument("--connect", default=False, action=argparse.BooleanOptionalAction,
                   help="also connect every pair of seeds within a method (Bezier curve + line: landscape.connect)")
    p.add_argument("--connect-steps", type=int, default=ConnectConfig.steps, help="Adam steps of each curve")
    p.add_argument("--metric-examples", type=int, default=32, help="examples for the model-based metrics")
    p.add_argument("--task", default=None,
                   help="the task of checkpoints whose ptp.json names none (adapters saved by PEFT or PTPTrainer)")
    p.add_argument("--style", default="paper", choices=("paper", "slides"))
    p.add_argument("--zmin", type=float, default=None)
    p.add_argument("--zmax", type=float, default=None)
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute surfaces of the same checkpoint whose spec changed")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    return p


def compare_from_args(args: argparse.Namespace, out: Path) -> Comparison:
    """compare() with the surface spec, metrics and connectivity settings of the command line; prints the plan."""
    device = cli.auto_device(args.device)
    spec = spec_from_args(args, device, space="prompt")  # --space both: compare() makes one spec per space
    metrics = MetricsConfig(tuple(m for m in args.metrics.split(",") if m), args.metric_examples,
                            param_scope=spec.param_scope, seed=args.seed)
    checkpoints = find_checkpoints(args.checkpoints)
    # one kind of loss, refused before the plan is printed (compare() checks it again for Python callers)
    check_one_loss([(str(p), load_checkpoint(p).meta.get("head")) for p in checkpoints])
    cli.quiet_transformers()
    spaces = ("prompt", "input") if args.space == "both" else (args.space,)
    defaulted = tuple(name for name in DEVICE_DEFAULT_FIELDS if getattr(args, name) is None)
    print(plan(checkpoints, spec, spaces, metrics, device, defaulted), flush=True)
    connect = None
    if args.connect:
        connect = ConnectConfig(steps=args.connect_steps, split=spec.split, param_scope=spec.param_scope,
                                seed=args.seed, dtype=spec.dtype if spec.dtype in TRAIN_DTYPES else "float32",
                                device=device)
    return compare(checkpoints, spec, metrics, out, spaces, device=device, cache_dir=cli.cache_dir(),
                   overwrite=args.overwrite, progress=args.progress, report=tqdm.write,  # above a running bar
                   connect=connect, task=args.task)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parser().parse_args(argv)
    if not args.checkpoints and not args.surface:
        raise ValueError("give checkpoint directories (or folders of them) or --surface FILE.npz")
    first = Path(args.checkpoints[0] if args.checkpoints else args.surface[0])
    config = PlotConfig(args.out or Path("figures") / first.name.removesuffix(".npz"), args.style, args.zmin,
                        args.zmax, args.cmap)
    started = time.time()
    comparison = from_surfaces(args.surface) if args.surface else compare_from_args(args, config.out)
    written = draw(comparison, config)
    print(console_table(comparison.rows))
    print(f"wrote {len(written)} files to {config.out} in {time.time() - started:.0f} s")
    return written
