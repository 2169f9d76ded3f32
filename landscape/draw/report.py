"""One self-contained interactive HTML report: 3D surfaces, contours, metrics tables, run metadata.

plotly.js is embedded inline once, so the page opens offline and makes no network request.
The page is a pure function of its inputs (fixed div ids, no timestamps): the same surfaces
give the same bytes.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io
import plotly.offline
from plotly.subplots import make_subplots

from landscape.draw.figures import axis_caption, axis_labels, quantity_name
from landscape.draw.tables import rows_head
from landscape.measures.spectral_density import density_curves
from landscape.stats import DISTRIBUTIONS
from landscape.surface import Surface, loss_name

if TYPE_CHECKING:  # for annotations only: importing compare would load torch into a drawing module
    from landscape.compare import Comparison

Table = str | Sequence[Mapping[str, object]]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
"""


def _nan_to_none(values: np.ndarray) -> list:
    """Nested lists with NaN -> None, so JSON holds null and plotly leaves a gap."""
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in values.tolist()]


def surface_figure(surfaces: Mapping[str, Surface], zrange: tuple[float, float], cmap: str = "Viridis") -> go.Figure:
    """Interactive 3D surfaces, one scene per method on one z-range and colour scale.

    Hover shows α, β, loss and accuracy (accuracy travels as customdata). One figure holds all
    scenes so the page needs a single WebGL context, whatever the number of methods.
    """
    methods = list(surfaces)
    loss, accuracy = (quantity_name(list(surfaces.values()), q) for q in ("loss", "accuracy"))
    cols = min(3, len(methods))  # more than three scenes per row get too small to read
    rows = math.ceil(len(methods) / cols)
    fig = make_subplots(rows=rows, cols=cols, specs=[[{"type": "scene"}] * cols] * rows,
                        subplot_titles=methods, horizontal_spacing=0.02, vertical_spacing=0.04)
    for index, method in enumerate(methods):
        surface = surfaces[method]
        # plotly draws z[row=y, col=x]; loss is (nx, ny) -> transpose to (ny, nx).
        fig.add_trace(go.Surface(
            x=surface.alphas.tolist(), y=surface.betas.tolist(), z=_nan_to_none(surface.loss.T),
            customdata=_nan_to_none(surface.accuracy.T), colorscale=cmap, cmin=zrange[0], cmax=zrange[1],
            showscale=index == 0, colorbar=dict(title=loss, thickness=12), name=method,
            hovertemplate=f"<b>{html.escape(method)}</b><br>α=%{{x:.3f}}<br>β=%{{y:.3f}}<br>{loss}=%{{z:.4f}}"
                          f"<br>{accuracy}=%{{customdata:.3f}}<extra></extra>",
        ), row=index // cols + 1, col=index % cols + 1)
    fig.update_scenes(xaxis_title="α", yaxis_title="β", zaxis_title="", zaxis=dict(range=list(zrange)),
                      aspectmode="cube", camera=dict(eye=dict(x=-1.55, y=-1.55, z=1.05)))
    # Long direction names do not fit along 3D axes: one line under the scenes says what α, β are.
    first = next(iter(surfaces.values()))
    fig.update_layout(height=440 * rows + 20, margin=dict(l=0, r=0, t=40, b=50),
                      annotations=list(fig.layout.annotations) + [dict(
                          text=axis_caption(first),
                          x=0.5, y=-0.02, xref="paper", yref="paper", yanchor="top", showarrow=False)])
    return fig


def contour_figure(surfaces: Mapping[str, Surface], zrange: tuple[float, float], cmap: str = "Viridis",
                   trajectories: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> go.Figure:
    """log10(loss) contours, one panel per method, shared colour scale, centre marked."""
    methods = list(surfaces)
    loss = quantity_name(list(surfaces.values()))
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=methods, horizontal_spacing=0.06,
                        vertical_spacing=0.12)
    low, high = (math.log10(max(v, 1e-12)) for v in zrange)
    ticks = np.linspace(low, high, 5).tolist()  # colour bar in log10(loss), labelled in loss units
    for index, method in enumerate(methods):
        row, col = index // cols + 1, index % cols + 1
        surface = surfaces[method]
        log_loss = np.log10(np.clip(surface.loss.T, 1e-12, None))  # (ny, nx); NaN stays NaN
        fig.add_trace(go.Contour(
            x=surface.alphas.tolist(), y=surface.betas.tolist(), z=_nan_to_none(log_loss),
            customdata=_nan_to_none(surface.loss.T), colorscale=cmap, zmin=low, zmax=high,
            contours=dict(start=low, end=high, size=(high - low) / 14 or 1.0), showscale=index == 0,
            colorbar=dict(title=loss, thickness=12, tickvals=ticks, ticktext=[f"{10 ** t:.3g}" for t in ticks]),
            hovertemplate=f"α=%{{x:.3f}}<br>β=%{{y:.3f}}<br>{loss}=%{{customdata:.4f}}<extra></extra>",
        ), row=row, col=col)
        path = (trajectories or {}).get(method)
        if path is not None and len(path):
            points = np.asarray(path, dtype=float)  # (S, 2)
            fig.add_trace(go.Scatter(x=points[:, 0].tolist(), y=points[:, 1].tolist(), mode="lines+markers",
                                     line=dict(color="white"), marker=dict(size=5, color="white"),
                                     name="trajectory", showlegend=False), row=row, col=col)
        fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", name="trained prompt", showlegend=False,
                                 marker=dict(symbol="star", size=12, color="#D55E00", line=dict(width=1))),
                      row=row, col=col)
        x_label, y_label = axis_labels(surface)
        fig.update_xaxes(title_text=x_label, row=row, col=col)
        fig.update_yaxes(title_text=y_label if col == 1 else None, row=row, col=col)
    fig.update_layout(height=360 * rows + 20, margin=dict(l=40, r=20, t=40, b=40))
    return fig


def _cell(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return html.escape(json.dumps(value, sort_keys=True, default=str))
    return html.escape(str(value))


def table_html(table: Table) -> str:
    """Rows (list of dicts) or a markdown pipe table -> HTML table; an HTML string passes through."""
    if isinstance(table, str):
        text = table.strip()
        if text.startswith("<"):
            return text
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines or not all(line.startswith("|") for line in lines):
            return f"<pre>{html.escape(text)}</pre>"
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines
                 if not set(line.replace("|", "").strip()) <= set("-: ")]
        header, body = cells[0], cells[1:]
        rows = [dict(zip(header, row)) for row in body]
    else:
        rows = [dict(row) for row in table]
        header = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body_html = "".join("<tr>" + "".join(f"<td>{_cell(row.get(h, ''))}</td>" for h in header) + "</tr>"
                        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body_html}</tbody></table>"


def report_html(surfaces: Mapping[str, Surface], tables: Mapping[str, Table] | None = None,
                metadata: Mapping[str, object] | None = None, *, title: str = "Loss landscape report",
                trajectories: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                zmin: float | None = None, zmax: float | None = None, cmap: str = "Viridis",
                figures: Mapping[str, go.Figure] | None = None) -> str:
    """The whole report as one HTML string (write it with any text writer).

    surfaces: method -> Surface. tables: caption -> rows (list of dicts), markdown or HTML
    (metrics with CIs and tests, computed elsewhere). metadata: model, task, directions, seed,
    examples, date, ... shown as a key/value table. figures: heading -> further plotly figures (spectrum, basins,
    mode connectivity), each in its own section after the contours.
    """
    if not surfaces:
        raise ValueError("report_html needs at least one surface")
    if any(min(s.shape) < 2 for s in surfaces.values()):
        raise ValueError("a 1D surface (grid of one row) has no 3D or contour view; compute a 2D grid "
                         "(--grid 21 rather than --grid 21x1) for the report")
    spaces: dict[str, dict[str, Surface]] = {}  # prompt and input losses differ in scale: one z-range each
    for name, surface in surfaces.items():
        spaces.setdefault(surface.spec.get("space") or "prompt", {})[name] = surface

    def embed(fig: go.Figure, div_id: str) -> str:
        return plotly.io.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                                 config={"displaylogo": False, "responsive": True})

    surface_divs, contour_divs = [], []
    for index, (space, group) in enumerate(spaces.items()):
        finite = np.concatenate([s.loss[np.isfinite(s.loss)] for s in group.values()])
        if finite.size == 0 and (zmin is None or zmax is None):
            raise ValueError("the surfaces have no computed point; compute the grid before writing a report")
        zrange = (float(finite.min()) if zmin is None else zmin, float(finite.max()) if zmax is None else zmax)
        suffix = "" if index == 0 else f"-{space}"
        heading = f"<h3>{html.escape(space)} space</h3>" if len(spaces) > 1 else ""
        surface_divs.append(heading + embed(surface_figure(group, zrange, cmap), f"surfaces{suffix}"))
        contour_divs.append(heading + embed(contour_figure(group, zrange, cmap, trajectories), f"contours{suffix}"))
    surface_div, contour_div = "".join(surface_divs), "".join(contour_divs)
    figure_sections = "".join(f"<h2>{html.escape(heading)}</h2>{embed(fig, f'figure-{index}')}"
                              for index, (heading, fig) in enumerate((figures or {}).items()))
    table_sections = "".join(f"<h3>{html.escape(caption)}</h3>{table_html(table)}"
                             for caption, table in (tables or {}).items())
    meta_rows = [{"key": key, "value": value if isinstance(value, (str, int, float, list, tuple))
                  else json.dumps(value, sort_keys=True, default=str)} for key, value in (metadata or {}).items()]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<h2>Run</h2>{table_html(meta_rows) if meta_rows else "<p>(no metadata)</p>"}
<h2>Loss surfaces</h2>{surface_div}
<h2>Contours</h2>{contour_div}
{figure_sections}
<h2>Metrics</h2>{table_sections or "<p>(no metrics)</p>"}
</body></html>
"""


def comparison_html(comparison: Comparison, surfaces: Mapping[str, Surface], trajectories: Mapping[str, Sequence] | None = None,
                    *, zmin: float | None = None, zmax: float | None = None) -> str:
    """The report of a Comparison: the given surfaces, its rows and its statistics."""
    hidden = ("cost", "settings", "comparable", "flat_radius", *DISTRIBUTIONS)  # comparable: in the Run table
    tables = {"Per checkpoint": [{k: v for k, v in r.items() if k not in hidden} for r in comparison.rows]}
    if comparison.rows:
        stats = comparison.stats
        families = stats.families
        tables["Per group: mean, std, 95% Student t interval of the n finite values; infinite values counted"] = [
            asdict(s) for s in stats.summaries]
        tables["Between groups of one comparable set: Welch t, Mann-Whitney U, effect sizes; adjusted p: "
               f"{families.get('welch_p_holm', 'Holm')}, {families.get('mann_whitney_p_holm', 'Holm')}"] = [
            asdict(t) for t in stats.tests]
        tables["Spearman correlations within each comparable set: metrics vs test accuracy, sharpness vs calibration "
               f"error; p exact (n <= 9) or by permutation; adjusted p: {families.get('p_holm', 'Holm')}"] = [
            asdict(c) for c in stats.correlations]
        if stats.barriers:
            tables["Mode connectivity between seeds of one group (loss barriers over pairs; no interval where pairs "
                   "share seeds)"] = [asdict(s) for s in stats.barriers]
    return report_html(surfaces, tables, comparison.metadata, zmin=zmin, zmax=zmax, trajectories=trajectories or None,
                       figures=_analysis_figures(comparison))


def _analysis_figures(comparison: Comparison) -> dict[str, go.Figure]:
    """Interactive spectrum density, persistence diagrams and connectivity paths of a comparison (when measured)."""
    out, first, loss = {}, {}, loss_name(rows_head(comparison.rows))
    for row in comparison.rows:
        first.setdefault(row.get("group") or row.get("method"), row)  # the representative checkpoint of each group
    quadratures = {m: (r["hessian_spectrum_nodes"], r["hessian_spectrum_weights"]) for m, r in first.items()
                   if r.get("hessian_spectrum_nodes")}
    if quadratures:
        grid, densities, _ = density_curves(quadratures, points=600)
        fig = go.Figure([go.Scatter(x=grid, y=np.maximum(density, 1e-8), name=str(m))
                         for m, density in densities.items()])
        fig.update_layout(xaxis_title="Hessian eigenvalue (prompt)", yaxis_title="density (SLQ)", yaxis_type="log")
        out["Curvature spectrum (stochastic Lanczos quadrature)"] = fig
    diagrams = {f"{m} ({space})": r[key] for m, r in first.items()
                for space, key in (("prompt", "persistence"), ("input", "input_persistence")) if r.get(key)}
    if diagrams:
        finite = [d for pairs in diagrams.values() for _, d in pairs if d is not None]
        top = max(finite) * 1.05 if finite else 1.0
        fig = go.Figure([go.Scatter(x=[b for b, _ in pairs], y=[top if d is None else d for _, d in pairs],
                                    mode="markers", name=label) for label, pairs in diagrams.items()])
        fig.update_layout(xaxis_title=f"birth ({loss} at the minimum)", yaxis_title=f"death (top {top:.3g}: never)")
        out["Basins: 0-dimensional persistence of each surface"] = fig
    if comparison.connections:
        fig = go.Figure()
        for c in comparison.connections:
            name = f"{c.get('method_a')} {c.get('seed_a')}–{c.get('seed_b')}"
            fig.add_trace(go.Scatter(x=c["t"], y=c["linear_loss"], name=f"{name} line", line={"dash": "dash"}))
            fig.add_trace(go.Scatter(x=c["t"], y=c["curve_loss"], name=f"{name} Bezier"))
        fig.update_layout(xaxis_title="t", yaxis_title=loss)
        out["Mode connectivity: loss along the line and the trained Bezier curve"] = fig
    return out
