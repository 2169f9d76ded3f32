"""`python -m landscape.demo [--mode quick|full]`: train PT, PTP-RN and PTP-ADV and compare their landscapes."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from landscape.demo_pipeline import run_demo
from ptp_core import cli


def main(argv: list[str] | None = None) -> Path:
    p = cli.parser("python -m landscape.demo", "Train PT / PTP-RN / PTP-ADV and compare their loss landscapes.")
    p.add_argument("--mode", default="quick", choices=("quick", "full"))
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    args = p.parse_args(argv)
    cli.quiet_transformers()
    started = time.time()
    figures = run_demo(args.mode, Path("."), cli.auto_device(args.device), args.progress)
    print(f"\ndemo ({args.mode}) finished in {time.time() - started:.0f} s; open {figures}/report.html")
    return figures
