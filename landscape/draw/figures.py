"""Paper figures of loss surfaces: 3D surfaces, contours, 1D profiles, differences.

Every function takes Surface objects and returns a matplotlib Figure; none computes a loss
or writes a file (`save_figure` does that, deterministically). Figures are built on
`matplotlib.figure.Figure` directly, so no pyplot state and no backend choice are involved:
they render under Agg on a machine without a display.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from landscape.surface import Surface, accuracy_name, loss_name
from ptp_core.io import write_atomic

# Okabe & Ito (2008) colour-blind-safe palette; the three methods of the paper get fixed colours.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
METHOD_COLORS = {"pt": "#0072B2", "ptp-rn": "#E69F00", "ptp-adv": "#009E73"}

# Widths follow the usual two-column paper (ACL/EMNLP: 3.25 in column, 6.75 in page).
STYLES = {
    "paper": dict(font=8, title=9, column=3.25, page=6.75, panel_height=2.0, line=1.0, marker=4),
    "slides": dict(font=14, title=16, column=6.0, page=12.0, panel_height=4.0, line=2.0, marker=8),
}

# Axis wording per direction kind: (first axis, second axis).
DIRECTION_LABELS = {
    "gradient": ("gradient direction", "orthogonal direction"),
    "random": ("random direction 1", "random direction 2"),
    "interp": ("first → second checkpoint", "first → third checkpoint"),
    "pca": ("trajectory PC 1", "trajectory PC 2"),
    "hessian": ("top Hessian eigenvector", "2nd Hessian eigenvector"),
}


def method_color(method: str, index: int) -> str:
    """Fixed colour for known methods, Okabe–Ito cycle for the rest."""
    return METHOD_COLORS.get(method, OKABE_ITO[index % len(OKABE_ITO)])


def direction_names(surface: Surface) -> tuple[str, str]:
    """What α and β move along: spec["direction_labels"] if given, else by spec["directions"]."""
    custom = surface.spec.get("direction_labels")
    if custom:
        return str(custom[0]), str(custom[1])
    return DIRECTION_LABELS.get(str(surface.spec.get("directions")), ("direction 1", "direction 2"))


def axis_labels(surface: Surface) -> tuple[str, str]:
    """("α (gradient direction)", "β (orthogonal direction)") for 2D axes."""
    first, second = direction_names(surface)
    return f"α ({first})", f"β ({second})"


def quantity_name(surfaces: Sequence[Surface], quantity: str = "loss") -> str:
    """What the surfaces' loss (or accuracy) is, as figures name it: "token-level cross-entropy" (and "token
    accuracy") for --head lm surfaces, "loss" (and "accuracy") for the others; a comparison never mixes the two."""
    head = next((s.spec.get("head") for s in surfaces if s.spec.get("head")), None)
    return loss_name(head) if quantity == "loss" else accuracy_name(head)


def axis_caption(surface: Surface) -> str:
    """"α: gradient direction   β: orthogonal direction", one line under 3D panels."""
    first, second = direction_names(surface)
    return f"α: {first}   β: {second}"


def grid_caption(surfaces: Sequence[Surface]) -> str:
    """"21x21 grid, 256 test examples": what the drawn surfaces were computed on (each distinct setting once)."""
    captions = []
    for surface in surfaces:
        nx, ny = surface.shape
        examples, split = surface.spec.get("examples"), surface.spec.get("split")
        text = f"{nx}x{ny} grid" + (f", {examples} {split or ''} examples".replace("  ", " ")
                                    if examples is not None else "")
        if not surface.is_complete:
            text += f" ({surface.points_done}/{surface.loss.size} points computed)"
        captions.append(text)
    return "; ".join(dict.fromkeys(captions))


def _caption(fig: Figure, surfaces: Sequence[Surface], size: float) -> None:
    """The grid caption as the figure's subtitle: a figure never leaves out what it was computed on."""
    fig.suptitle(grid_caption(surfaces), fontsize=size, color="0.3")


def _style(style: str) -> dict:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {sorted(STYLES)}")
    return STYLES[style]


@contextmanager
def style_context(style: str) -> Iterator[dict]:
    """Fonts and embedding for one figure, without touching the global rcParams."""
    s = _style(style)
    with matplotlib.rc_context({
        "font.size": s["font"], "axes.titlesize": s["title"], "axes.labelsize": s["font"],
        "xtick.labelsize": s["font"] - 1, "ytick.labelsize": s["font"] - 1, "legend.fontsize": s["font"] - 1,
        "figure.labelsize": s["font"], "figure.titlesize": s["title"], "lines.linewidth": s["line"],
        "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
    }):
        yield s


def _width(style: dict, panels: int) -> float:
    return style["column"] if panels == 1 else style["page"]


def _loss_range(surfaces: Sequence[Surface], zmin: float | None, zmax: float | None) -> tuple[float, float]:
    """Shared z-range over all 2D surfaces (finite points only) unless given."""
    if any(min(s.shape) < 2 for s in surfaces):
        raise ValueError("a 1D surface (grid of one row) has no 2D picture; draw it with profiles(), "
                         "or compute a 2D grid (--grid 21 rather than --grid 21x1)")
    finite = np.concatenate([s.loss[np.isfinite(s.loss)] for s in surfaces])
    if finite.size == 0 and (zmin is None or zmax is None):
        raise ValueError("the surfaces have no computed point; compute the grid before drawing it")
    low = float(finite.min()) if zmin is None else zmin
    high = float(finite.max()) if zmax is None else zmax
    if not high > low:
        high = low + 1e-12 + abs(low) * 1e-6
    return low, high


def landscape_3d(surfaces: Mapping[str, Surface], sharpness: Mapping[str, float] | None = None, *,
                 sharpness_label: str = "sharpness", style: str = "paper", zmin: float | None = None,
                 zmax: float | None = None, cmap: str = "viridis") -> Figure:
    """One 3D loss surface per method side by side, all on one z-range and colour scale.

    surfaces: method -> Surface (loss (nx, ny)). sharpness: method -> value shown in the title.
    """
    with style_context(style) as s:
        low, high = _loss_range(list(surfaces.values()), zmin, zmax)
        norm = Normalize(low, high)
        n = len(surfaces)
        height = s["panel_height"] * (1.15 if n > 1 else 1.3)
        fig = Figure(figsize=(_width(s, n), height), layout="constrained")
        for k, (method, surface) in enumerate(surfaces.items()):
            ax = fig.add_subplot(1, n, k + 1, projection="3d")
            alpha_grid, beta_grid = np.meshgrid(surface.alphas, surface.betas, indexing="ij")  # (nx, ny)
            # Clip so an explicit zmin/zmax crops the surface instead of drawing it outside the box.
            z = np.clip(surface.loss, low, high)
            ax.plot_surface(alpha_grid, beta_grid, z, cmap=cmap, norm=norm, linewidth=0, antialiased=False,
                            rcount=min(surface.alphas.size, 101), ccount=min(surface.betas.size, 101))
            ax.set_zlim(low, high)
            # Long direction names do not fit along a 3D axis at paper size: the axes say α/β
            # and one line under the panels says what α and β are.
            ax.set_xlabel("α", labelpad=-7)
            ax.set_ylabel("β", labelpad=-7)
            ax.tick_params(pad=-3)
            ax.set_box_aspect(None, zoom=0.95)
            title = method if not sharpness or method not in sharpness else (
                f"{method}\n{sharpness_label} {sharpness[method]:.3g}")
            ax.set_title(title, pad=0)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=fig.axes, shrink=0.7,
                     label=quantity_name(list(surfaces.values())), pad=0.04)
        first = next(iter(surfaces.values()))
        fig.supxlabel(axis_caption(first))
        _caption(fig, list(surfaces.values()), s["font"])
    return fig


def _log_levels(low: float, high: float, count: int) -> np.ndarray:
    """Log-spaced contour levels; losses are positive (cross-entropy), floors guard exact zeros."""
    low = max(low, high * 1e-6, 1e-12)
    return np.geomspace(low, high, count)


def contour(surfaces: Mapping[str, Surface],
            trajectories: Mapping[str, Sequence[tuple[float, float]]] | None = None, *,
            levels: int = 14, style: str = "paper", zmin: float | None = None, zmax: float | None = None,
            cmap: str = "viridis") -> Figure:
    """Filled contours of the loss with log-spaced levels, one panel per method, centre marked.

    trajectories: method -> [(alpha, beta), ...] training path in the plane (pca/interp directions).
    """
    with style_context(style) as s:
        low, high = _loss_range(list(surfaces.values()), zmin, zmax)
        bounds = _log_levels(low, high, levels)
        norm = BoundaryNorm(bounds, ncolors=256)
        n = len(surfaces)
        height = s["panel_height"] if n > 1 else s["column"] * 0.85
        fig = Figure(figsize=(_width(s, n), height), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False, sharex=False, sharey=False)[0]
        for ax, (method, surface) in zip(axes, surfaces.items()):
            # contourf wants z[y, x]; loss is (nx, ny) so transpose. Values beyond the range are
            # clipped into the end bins so every computed point gets a colour.
            z = np.clip(surface.loss.T, bounds[0], bounds[-1])  # (ny, nx)
            filled = ax.contourf(surface.alphas, surface.betas, z, levels=bounds, cmap=cmap, norm=norm)
            ax.contour(surface.alphas, surface.betas, z, levels=bounds, colors="white", linewidths=0.25,
                       alpha=0.5)
            path = (trajectories or {}).get(method)
            if path is not None and len(path):
                points = np.asarray(path, dtype=float)  # (S, 2)
                ax.plot(points[:, 0], points[:, 1], "-o", color="white", markersize=s["marker"] * 0.5,
                        markeredgecolor="black", markeredgewidth=0.4, linewidth=s["line"] * 0.8,
                        label="trajectory")
            ax.plot([0.0], [0.0], marker="*", color="#D55E00", markeredgecolor="black", markeredgewidth=0.4,
                    markersize=s["marker"] * 2, linestyle="none", label="trained prompt")
            x_label, y_label = axis_labels(surface)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.set_title(method)
            ax.set_aspect("auto")
        ticks = bounds[np.unique(np.linspace(0, len(bounds) - 1, 5).round().astype(int))]  # ends included
        colorbar = fig.colorbar(filled, ax=list(axes), label=f"{quantity_name(list(surfaces.values()))} "
                                "(log-spaced levels)", pad=0.02)
        colorbar.ax.set_yticks(ticks, [f"{v:.3g}" for v in ticks])
        _caption(fig, list(surfaces.values()), s["font"])
    return fig


def _as_list(value: Surface | Sequence[Surface]) -> list[Surface]:
    return [value] if isinstance(value, Surface) else list(value)


def profiles(surfaces: Mapping[str, Surface | Sequence[Surface]], *, style: str = "paper",
             quantity: str = "loss") -> Figure:
    """1D slices through the centre along α (β = 0) and β (α = 0), methods overlaid.

    surfaces: method -> one Surface, or a list of seeds: then the mean line and a min–max band.
    quantity: "loss" or "accuracy".
    """
    if quantity not in ("loss", "accuracy"):
        raise ValueError(f"quantity must be 'loss' or 'accuracy', got {quantity!r}")
    with style_context(style) as s:
        all_seeds = [surface for value in surfaces.values() for surface in _as_list(value)]
        # A 1D surface (betas == [0]) has only the α profile.
        panels = 1 if all(surface.betas.size == 1 for surface in all_seeds) else 2
        width = s["column"] if panels == 1 else s["page"] * (0.6 if style == "paper" else 1.0)
        fig = Figure(figsize=(width, s["panel_height"]), layout="constrained")
        axes = fig.subplots(1, panels, sharey=True, squeeze=False)[0]
        for k, (method, value) in enumerate(surfaces.items()):
            seeds = _as_list(value)
            color = method_color(method, k)
            for axis, ax in enumerate(axes):
                coordinates, curves = _slices(seeds, axis, quantity)  # (n,), (seeds, n)
                mean = curves.mean(axis=0)
                label = method if len(seeds) == 1 else f"{method} (mean, min–max of {len(seeds)})"
                ax.plot(coordinates, mean, color=color, label=label)
                if len(seeds) > 1:
                    ax.fill_between(coordinates, curves.min(axis=0), curves.max(axis=0), color=color,
                                    alpha=0.2, linewidth=0)
        first = _as_list(next(iter(surfaces.values())))[0]
        for ax, label in zip(axes, axis_labels(first)):
            ax.axvline(0.0, color="0.6", linewidth=0.5, linestyle=":")
            ax.set_xlabel(label)
        axes[0].set_ylabel(quantity_name(all_seeds, quantity))
        axes[0].legend(frameon=False)
        _caption(fig, all_seeds, s["font"])
    return fig


def _slices(seeds: list[Surface], axis: int, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    """Values along one axis through the centre, for surfaces sharing that axis' coordinates."""
    coordinates = seeds[0].alphas if axis == 0 else seeds[0].betas
    curves = []
    for surface in seeds:
        own = surface.alphas if axis == 0 else surface.betas
        if not np.array_equal(own, coordinates):
            raise ValueError("surfaces of one method lie on different grids; "
                             "compute all seeds with one --grid/--span")
        i, j = surface.center_index
        values = getattr(surface, quantity)
        curves.append(values[:, j] if axis == 0 else values[i, :])
    return coordinates, np.stack(curves)  # (n,), (seeds, n)


def difference(surface_a: Surface, surface_b: Surface, *, label_a: str | None = None,
               label_b: str | None = None, style: str = "paper", limit: float | None = None,
               cmap: str = "PuOr_r", levels: int = 17) -> Figure:
    """L_b − L_a on shared directions, diverging colour map centred at 0 (symmetric ±limit)."""
    if not (np.array_equal(surface_a.alphas, surface_b.alphas)
            and np.array_equal(surface_a.betas, surface_b.betas)):
        raise ValueError("difference needs surfaces on one grid; compute both with the same --grid/--span")
    if surface_a.direction_1 is not None and surface_b.direction_1 is not None and not (
            np.array_equal(surface_a.direction_1, surface_b.direction_1)
            and np.array_equal(surface_a.direction_2, surface_b.direction_2)):
        raise ValueError("difference needs shared directions; compute both surfaces with one direction set")
    if min(surface_a.shape) < 2:
        raise ValueError("a 1D surface has no 2D difference map; compare profiles() instead")
    label_a, label_b = label_a or surface_a.method, label_b or surface_b.method
    delta = surface_b.loss - surface_a.loss  # (nx, ny)
    finite = np.abs(delta[np.isfinite(delta)])
    bound = limit if limit is not None else (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    with style_context(style) as s:
        fig = Figure(figsize=(s["column"], s["column"] * 0.85), layout="constrained")
        ax = fig.subplots()
        bounds = np.linspace(-bound, bound, levels)
        filled = ax.contourf(surface_a.alphas, surface_a.betas, np.clip(delta.T, -bound, bound),  # (ny, nx)
                             levels=bounds, cmap=cmap, norm=TwoSlopeNorm(0.0, -bound, bound))
        ax.plot([0.0], [0.0], marker="+", color="black", markersize=s["marker"] * 1.5, linestyle="none")
        x_label, y_label = axis_labels(surface_a)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(f"L({label_b}) − L({label_a})")
        fig.colorbar(filled, ax=ax, label=f"{quantity_name([surface_a, surface_b])} difference",
                     ticks=np.linspace(-bound, bound, 5))
        _caption(fig, [surface_a, surface_b], s["font"])
    return fig


def save_figure(fig: Figure, path_stem: str | os.PathLike, formats: Sequence[str] = ("pdf", "png"),
                dpi: int = 300) -> list[Path]:
    """Write STEM.pdf / STEM.png / ... atomically and byte-reproducibly; returns the paths.

    No timestamps or version strings go into the files, and PDF fonts are embedded as
    TrueType (pdf.fonttype 42), which camera-ready checks of ACL/IEEE venues require.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "png": {"Software": None},
        "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
        "svg": {"Creator": None, "Date": None},
    }
    written = []
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
                                "svg.hashsalt": "ptp-landscape"}):
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata.get(fmt))
            target = stem.with_name(f"{stem.name}.{fmt}")
            write_atomic(target, lambda stream: stream.write(buffer.getvalue()))
            written.append(target)
    return written
