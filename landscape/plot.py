"""`python -m landscape.plot CKPT_OR_FOLDER [...] --out DIR`: surfaces, metrics, figures and a report.

argparse, then `landscape.pipeline.compare` (or `from_surfaces` for `--surface FILE.npz ...`, no model),
then the drawing of what it returned: figures, metrics tables and report.html.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from landscape import render
from landscape.pipeline import Comparison
from landscape.surface import Surface, same_directions
from ptp_core.io import write_text


@dataclass
class PlotConfig:
    out: Path
    style: str = "paper"
    zmin: float | None = None
    zmax: float | None = None
    cmap: str = "viridis"

    def __post_init__(self):
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a directory")
        if self.style not in render.STYLES:
            raise ValueError(f"unknown --style {self.style!r}; use one of {', '.join(render.STYLES)}")
        if self.zmin is not None and self.zmax is not None and not self.zmin < self.zmax:
            raise ValueError(f"--zmin {self.zmin} must be below --zmax {self.zmax}")


def figures(comparison: Comparison, config: PlotConfig) -> dict[str, Figure]:
    """Every figure of the comparison by file stem: profiles, landscape_3d, contour, difference (+ _input)."""
    style, limits = dict(style=config.style), dict(zmin=config.zmin, zmax=config.zmax, cmap=config.cmap)
    out = {}
    for space in comparison.spaces():
        suffix = "" if space == "prompt" else f"_{space}"
        groups = comparison.by_method(space)
        first = {m: g[0] for m, g in groups.items()}  # the representative seed of each method
        out[f"profiles{suffix}"] = render.profiles(groups, **style)
        if all(min(s.shape) > 1 for s in first.values()):
            # each title states the metric of the very surface drawn under it, in its own space
            values = {m: comparison.metric(s, "grid_sharpness") for m, s in first.items()}
            out[f"landscape_3d{suffix}"] = render.landscape_3d(
                first, {m: v for m, v in values.items() if v is not None}, sharpness_label="grid sharpness",
                **style, **limits)
            out[f"contour{suffix}"] = render.contour(first, _trajectories(first) or None, **style, **limits)
        diagrams = {m: comparison.metric(s, "persistence") for m, s in first.items()}
        if any(diagrams.values()):
            out[f"persistence{suffix}"] = render.persistence_diagram(
                {m: d for m, d in diagrams.items() if d}, _basin_tau(comparison), **style)
        pair = [s for g in groups.values() for s in g]
        if len(pair) == 2 and min(pair[0].shape) > 1 and same_directions(*pair):
            names = [s.spec.get("method") or "a" for s in pair]
            out[f"difference{suffix}"] = render.difference(pair[0], pair[1], label_a=names[0], label_b=names[1],
                                                           **style)
    quadratures = {}
    for row in comparison.rows:  # the first checkpoint of each method, as for the surfaces
        if row.get("hessian_spectrum_nodes") and row.get("method") not in quadratures:
            quadratures[row["method"]] = (row["hessian_spectrum_nodes"], row["hessian_spectrum_weights"])
    if quadratures:
        out["spectrum"] = render.spectrum(quadratures, **style)
    if comparison.connections:
        out["connectivity"] = render.connectivity(comparison.connections[0], **style)  # every pair: OUT/connect/
    return out


def _basin_tau(comparison: Comparison) -> float | None:
    return next((r["settings"].get("basin_tau") for r in comparison.rows if r.get("settings")), None)


def draw(comparison: Comparison, config: PlotConfig) -> list[Path]:
    """The metric tables, every figure and report.html for the comparison, written into config.out."""
    from landscape.report import comparison_html
    from landscape.stats import write_tables

    written = list(write_tables(comparison.rows, config.out, comparison.stats).values()) if comparison.rows else []
    for stem, figure in figures(comparison, config).items():
        written += render.save_figure(figure, config.out / stem)
    report_surfaces, trajectories = {}, {}
    for space in comparison.spaces():
        first = {m: g[0] for m, g in comparison.by_method(space).items()}
        if all(min(s.shape) > 1 for s in first.values()):
            report_surfaces.update({f"{m} ({space})": s for m, s in first.items()})
            trajectories.update({f"{m} ({space})": p for m, p in _trajectories(first).items()})
    if report_surfaces:
        html = comparison_html(comparison, report_surfaces, trajectories, zmin=config.zmin, zmax=config.zmax)
        written.append(write_text(config.out / "report.html", html))
    return written


def _trajectories(surfaces: dict[str, Surface]) -> dict[str, list]:
    return {m: s.spec["trajectory"] for m, s in surfaces.items() if s.spec.get("trajectory")}


def main(argv: list[str] | None = None) -> list[Path]:
    from landscape.stats import console_table
    from ptp_core import cli

    args = _parser().parse_args(argv)
    if not args.checkpoints and not args.surface:
        raise ValueError("give checkpoint directories (or folders of them) or --surface FILE.npz")
    first = Path(args.checkpoints[0] if args.checkpoints else args.surface[0])
    config = PlotConfig(args.out or Path("figures") / first.name.removesuffix(".npz"), args.style, args.zmin,
                        args.zmax, args.cmap)
    started = time.time()
    if args.surface:
        from landscape.pipeline import from_surfaces

        comparison = from_surfaces(args.surface)
    else:
        from landscape.grid import spec_from_args
        from landscape.measure import MetricsConfig
        from landscape.pipeline import compare, find_checkpoints, plan

        device = cli.auto_device(args.device)
        spec = spec_from_args(args, device, space="prompt")  # --space both: compare() makes one spec per space
        metrics = MetricsConfig(tuple(m for m in args.metrics.split(",") if m), args.metric_examples,
                                params=args.params, seed=args.seed)
        checkpoints = find_checkpoints(args.checkpoints)
        cli.quiet_transformers()
        spaces = ("prompt", "input") if args.space == "both" else (args.space,)
        defaulted = tuple(name for name in ("grid", "examples") if getattr(args, name) is None)
        print(plan(checkpoints, spec, spaces, metrics, device, defaulted), flush=True)
        connect = None
        if args.connect:
            from landscape.connect import ConnectConfig

            connect = ConnectConfig(steps=args.connect_steps, split=spec.split, params=args.params, seed=args.seed,
                                    dtype=spec.dtype if spec.dtype in ("auto", "float32", "bfloat16") else "float32",
                                    device=device)
        comparison = compare(checkpoints, spec, metrics, config.out, spaces, device=device, cache_dir=cli.cache_dir(),
                             overwrite=args.overwrite, progress=args.progress,
                             report=lambda line: print(line, flush=True), connect=connect)
    written = draw(comparison, config)
    print(console_table(comparison.rows))
    print(f"wrote {len(written)} files to {config.out} in {time.time() - started:.0f} s")
    return written


def _parser() -> argparse.ArgumentParser:
    from landscape.connect import ConnectConfig
    from landscape.grid import add_surface_arguments
    from landscape.measure import DEFAULT_METRICS, METRIC_KINDS
    from ptp_core import cli

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
    p.add_argument("--style", default="paper", choices=("paper", "slides"))
    p.add_argument("--zmin", type=float, default=None)
    p.add_argument("--zmax", type=float, default=None)
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="recompute surfaces whose spec changed")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    return p


if __name__ == "__main__":
    from ptp_core.cli import run

    run(main)
