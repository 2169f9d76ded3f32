"""Figures of what the measures found beyond the surfaces: mode connectivity, curvature spectra, persistence diagrams."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from landscape.draw.figures import method_color, style_context
from landscape.measures.spectral_density import density_curves
from landscape.surface import loss_name

# Path colours of connectivity(): neither is a method colour, since the method colours mark the two end checkpoints.
PATH_COLORS = {"linear": "#D55E00", "curve": "#CC79A7"}


def connectivity(result: Mapping | object, *, style: str = "paper") -> Figure:
    """Loss along t for the straight line and the trained Bezier curve between two checkpoints, barriers marked.

    result: the dict of connect.json or a landscape.connect.ConnectResult: t (T,), linear_loss and curve_loss (T,),
    linear_barrier / curve_barrier and the t of each, method_a/b and seed_a/b for the ends, and head (--head lm: the
    loss axis says token-level cross-entropy). The barrier max_t L(t) − ((1 − t) L(0) + t L(1)) (Frankle et al.
    2020) is drawn as a segment from the chord to the path.
    """
    data = result if isinstance(result, Mapping) else result.to_dict()
    missing = [k for k in ("t", "linear_loss", "curve_loss") if k not in data]
    if missing:
        raise ValueError(f"connectivity data lacks {', '.join(missing)}; pass connect.json or a ConnectResult")
    t = np.asarray(data["t"], dtype=float)  # (T,)
    with style_context(style) as s:
        fig = Figure(figsize=(s["column"], s["panel_height"] * 1.5), layout="constrained")  # legend below
        ax = fig.subplots()
        ends = np.asarray(data["linear_loss"], dtype=float)[[0, -1]]  # L(A), L(B): both paths share them
        ax.plot([0.0, 1.0], ends, color="0.6", linestyle=":", linewidth=s["line"] * 0.7,
                label="chord (1 − t) L(0) + t L(1)")
        for key, name, dashes in (("linear", "linear path", "--"), ("curve", "Bezier curve", "-")):
            loss = np.asarray(data[f"{key}_loss"], dtype=float)  # (T,)
            height, where = data.get(f"{key}_barrier"), data.get(f"{key}_barrier_t")
            label = name if height is None else f"{name}, barrier {height:.3g}"
            ax.plot(t, loss, dashes, color=PATH_COLORS[key], label=label)
            if height is not None and where is not None and height > 0:  # a path below its chord has none to mark
                i = int(np.argmin(np.abs(t - where)))
                chord = (1 - t[i]) * ends[0] + t[i] * ends[1]
                ax.vlines(t[i], chord, loss[i], color=PATH_COLORS[key], linewidth=s["line"] * 1.5)
                ax.annotate(f"{height:.3g}", (t[i], (chord + loss[i]) / 2), xytext=(3, 0), textcoords="offset points",
                            color=PATH_COLORS[key], va="center", fontsize=s["font"] - 1)
        for k, (x, side, marker) in enumerate(((0.0, "a", "o"), (1.0, "b", "s"))):
            method, seed = data.get(f"method_{side}"), data.get(f"seed_{side}")
            label = (method or ("first", "second")[k] + " checkpoint") + ("" if seed is None else f" seed {seed}")
            ax.plot([x], [ends[k]], marker=marker, linestyle="none", color=method_color(method or "", k),
                    markeredgecolor="black", markeredgewidth=0.4, markersize=s["marker"] * 1.3, label=label, zorder=3)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("t (0: first checkpoint, 1: second)")
        ax.set_ylabel(loss_name(data.get("head")))
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
    return fig


def spectrum(quadratures: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, sigma: float | None = None,
             style: str = "paper") -> Figure:
    """Hessian eigenvalue density per method from SLQ quadratures (landscape.spectrum), on a log scale.

    quadratures: label -> (nodes, weights) of one checkpoint (hessian_spectrum_nodes/_weights). Each node is
    broadened by a Gaussian of std sigma (default: 1% of the range of all nodes), as in Ghorbani et al. 2019.
    """
    if not quadratures:
        raise ValueError("spectrum needs at least one (nodes, weights) quadrature; measure with --metrics spectrum")
    grid, densities, sigma = density_curves(dict(quadratures), sigma)
    with style_context(style) as s:
        fig = Figure(figsize=(s["column"], s["panel_height"] * 1.2), layout="constrained")
        ax = fig.subplots()
        floor = 1e-8  # log axis: show the bulk and the outliers, not the Gaussian tails down to 0
        for index, (label, density) in enumerate(densities.items()):
            ax.plot(grid, np.maximum(density, floor), color=method_color(label, index), linewidth=s["line"], label=label)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xlabel("Hessian eigenvalue (prompt)")
        ax.set_ylabel("density (SLQ)")
        ax.axvline(0.0, color="0.7", linewidth=0.6, zorder=0)
        ax.legend(frameon=False)
    return fig


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per label of a persistence diagram


def persistence_diagram(diagrams: Mapping[str, Sequence[Sequence[float | None]]], tau: float | None = None, *,
                        style: str = "paper", loss: str = "loss") -> Figure:
    """0-dimensional persistence (birth, death) of each surface's minima (landscape.topology), one colour a label.

    A point's height above the diagonal is its basin's depth; the global minimum's infinite death is drawn on a
    line above the finite ones. Points above the dashed line (death - birth >= tau) are the counted basins; the
    line (and its legend entry) is left out when no point could reach it within the axes. Each label has its own
    marker and a small sideways nudge, so coinciding minima of two labels stay visible. loss: what the surfaces'
    loss is called on the axes ("token-level cross-entropy" for --head lm).
    """
    if not diagrams:
        raise ValueError("persistence_diagram needs at least one diagram; compute a complete 2D surface first")
    pairs = {label: np.array([[b, np.inf if d is None else d] for b, d in points], dtype=float).reshape(-1, 2)
             for label, points in diagrams.items()}
    every = np.concatenate(list(pairs.values()))
    finite = every[np.isfinite(every)]
    low, high = float(finite.min()), float(finite.max())
    pad = 0.05 * ((high - low) or 1.0)
    top = high + 3 * pad  # where infinite deaths are drawn
    with style_context(style) as s:
        fig = Figure(figsize=(s["column"], s["column"]), layout="constrained")
        ax = fig.subplots()
        ax.plot([low - pad, top], [low - pad, top], color="0.6", linewidth=0.7)
        if tau and low - pad + tau < top:  # the legend names the line only where it crosses the axes
            ax.plot([low - pad, top - tau], [low - pad + tau, top], color="0.6", linewidth=0.7, linestyle="--",
                    label=f"persistence = {tau:g}")
        elif tau:
            ax.set_title(f"every finite persistence < {tau:g} (basin threshold, above the axes)", fontsize=s["font"])
        ax.axhline(top, color="0.85", linewidth=0.7)
        for index, (label, points) in enumerate(pairs.items()):
            # distinct markers, see-through faces and a small per-label nudge: coinciding minima of two labels
            # (one global minimum each, often at the same loss) stay visible side by side
            death = np.where(np.isfinite(points[:, 1]), points[:, 1], top)
            nudge = (index - (len(pairs) - 1) / 2) * 0.4 * pad
            ax.scatter(points[:, 0] + nudge, death, s=s["marker"] ** 2 * 1.5, color=method_color(label, index),
                       marker=MARKERS[index % len(MARKERS)], alpha=0.7, edgecolors="black", linewidths=0.3,
                       label=label, zorder=3 + index)
        ax.set_xlim(low - pad, top)
        ax.set_ylim(low - pad, top + pad)
        ax.set_xlabel(f"birth ({loss} at the minimum)")
        ax.set_ylabel(f"death ({loss} at the merging saddle); top: ∞")
        ax.legend(frameon=False, loc="lower right")
    return fig


LAYER_KEYS = (("layer_hessian_top_eigenvalue", "top eigenvalue of H_ll"), ("layer_hessian_trace", "trace of H_ll"))


def layer_curvature(rows: Sequence[Mapping], *, style: str = "paper") -> Figure:
    """A deep prompt's curvature per layer: layer vs the top eigenvalue and the trace of the Hessian block of that
    layer's keys and values, one line per method (the mean over its checkpoints, each checkpoint a thin line)."""
    by_method: dict[str, list[Mapping]] = {}
    for row in rows:
        if row.get("layer_hessian_top_eigenvalue"):
            by_method.setdefault(str(row.get("method")), []).append(row)
    if not by_method:
        raise ValueError("no row has per-layer curvature; measure a deep prompt with --metrics hessian")
    keys = [(k, label) for k, label in LAYER_KEYS if any(r.get(k) for g in by_method.values() for r in g)]
    with style_context(style) as s:
        fig = Figure(figsize=(s["column"] * len(keys), s["panel_height"] * 1.2), layout="constrained")
        for ax, (key, label) in zip(np.atleast_1d(fig.subplots(1, len(keys))), keys):
            for index, (method, group) in enumerate(by_method.items()):
                values = np.array([r[key] for r in group if r.get(key)], dtype=float)  # (checkpoints, L)
                layers = np.arange(1, values.shape[1] + 1)
                color = method_color(method, index)
                for one in values:
                    ax.plot(layers, one, color=color, linewidth=s["line"] * 0.4, alpha=0.5)
                ax.plot(layers, values.mean(0), "o-", color=color, linewidth=s["line"], markersize=s["marker"],
                        label=f"{method} (n={len(values)})")
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.set_xticks(layers)
            if all(np.all(np.asarray(r[key], dtype=float) > 0) for g in by_method.values() for r in g if r.get(key)):
                ax.set_yscale("log")
        ax.legend(frameon=False)
    return fig
