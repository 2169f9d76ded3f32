"""Everything drawn for a Comparison: its figures, metric tables and report.html, written into one folder.

    draw(compare(...), PlotConfig("figures/cmp"))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from landscape.compare import Comparison
from landscape.connect.run import FIGURE_STEM, ConnectResult, write_result
from landscape.draw import analysis
from landscape.draw import figures as plots
from landscape.draw.report import comparison_html
from landscape.draw.tables import write_tables
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
        if self.style not in plots.STYLES:
            raise ValueError(f"unknown --style {self.style!r}; use one of {', '.join(plots.STYLES)}")
        if self.zmin is not None and self.zmax is not None and not self.zmin < self.zmax:
            raise ValueError(f"--zmin {self.zmin} must be below --zmax {self.zmax}")


def figures(comparison: Comparison, config: PlotConfig) -> dict[str, Figure]:
    """Every figure of the comparison by file stem: profiles, landscape_3d, contour, difference (+ _input)."""
    style, limits = dict(style=config.style), dict(zmin=config.zmin, zmax=config.zmax, cmap=config.cmap)
    out = {}
    for space in comparison.spaces():
        suffix = "" if space == "prompt" else f"_{space}"
        groups = comparison.by_method(space)
        first = {m: g[0] for m, g in groups.items()}  # the representative seed of each group
        out[f"profiles{suffix}"] = plots.profiles(groups, **style)
        if all(min(s.shape) > 1 for s in first.values()):
            # each title states the metric of the very surface drawn under it, in its own space
            values = {m: comparison.metric(s, "grid_sharpness") for m, s in first.items()}
            out[f"landscape_3d{suffix}"] = plots.landscape_3d(
                first, {m: v for m, v in values.items() if v is not None}, sharpness_label="grid sharpness",
                **style, **limits)
            out[f"contour{suffix}"] = plots.contour(first, _trajectories(first) or None, **style, **limits)
        diagrams = {m: comparison.metric(s, "persistence") for m, s in first.items()}
        if any(diagrams.values()):
            out[f"persistence{suffix}"] = analysis.persistence_diagram(
                {m: d for m, d in diagrams.items() if d}, _basin_tau(comparison), **style,
                loss=plots.quantity_name(list(first.values())))
        pair = [(label, s) for label, g in groups.items() for s in g]
        identities = [comparison.row(s.spec.get("checkpoint") or "").get("comparable") for _, s in pair]
        if len(pair) == 2 and identities[0] == identities[1] and min(pair[0][1].shape) > 1 \
                and same_directions(pair[0][1], pair[1][1]):  # a difference of unlike landscapes means nothing
            names, pair = [label for label, _ in pair], [s for _, s in pair]
            out[f"difference{suffix}"] = plots.difference(pair[0], pair[1], label_a=names[0], label_b=names[1],
                                                           **style)
    quadratures = {}
    for row in comparison.rows:  # the first checkpoint of each group, as for the surfaces
        label = row.get("group") or row.get("method")
        if row.get("hessian_spectrum_nodes") and label not in quadratures:
            quadratures[label] = (row["hessian_spectrum_nodes"], row["hessian_spectrum_weights"])
    if quadratures:
        out["spectrum"] = analysis.spectrum(quadratures, **style)
    if any(row.get("layer_hessian_top_eigenvalue") for row in comparison.rows):  # deep prompts
        out["layer_curvature"] = analysis.layer_curvature(comparison.rows, **style)
    if comparison.connections:
        out["connectivity"] = analysis.connectivity(comparison.connections[0], **style)  # every pair: OUT/connect/
    return out


def _basin_tau(comparison: Comparison) -> float | None:
    return next((r["settings"].get("basin_tau") for r in comparison.rows if r.get("settings")), None)


def draw(comparison: Comparison, config: PlotConfig) -> list[Path]:
    """The metric tables, every figure and report.html for the comparison, written into config.out; the
    connectivity figure of every pair of seeds into that pair's folder (compare(): OUT/connect/PAIR/)."""
    written = list(write_tables(comparison.rows, config.out, comparison.stats).values()) if comparison.rows else []
    for stem, figure in figures(comparison, config).items():
        written += plots.save_figure(figure, config.out / stem)
    report_surfaces, trajectories = {}, {}
    for space in comparison.spaces():
        first = {m: g[0] for m, g in comparison.by_method(space).items()}
        if all(min(s.shape) > 1 for s in first.values()):
            report_surfaces.update({f"{m} ({space})": s for m, s in first.items()})
            trajectories.update({f"{m} ({space})": p for m, p in _trajectories(first).items()})
    for connection in comparison.connections:
        if connection.get("folder"):
            figure = analysis.connectivity(connection, style=config.style)
            written += plots.save_figure(figure, Path(connection["folder"]) / FIGURE_STEM)
    if report_surfaces:
        html = comparison_html(comparison, report_surfaces, trajectories, zmin=config.zmin, zmax=config.zmax)
        written.append(write_text(config.out / "report.html", html))
    return written


def _trajectories(surfaces: dict[str, Surface]) -> dict[str, list]:
    return {m: s.spec["trajectory"] for m, s in surfaces.items() if s.spec.get("trajectory")}


def write_connection(result: ConnectResult, out_dir: str | Path, style: str = "paper") -> list[Path]:
    """connect.json, curve.safetensors and the connectivity figure (connect.pdf, .png) in DIR: all or nothing."""
    figure = analysis.connectivity(result, style=style)
    return write_result(result, out_dir, lambda folder: plots.save_figure(figure, folder / FIGURE_STEM))
