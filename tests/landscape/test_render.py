"""Paper figures: they return Figures, save as vector PDFs with embedded fonts, reproduce byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from landscape.draw import analysis, figures as render
from landscape.surface import Surface


def quadratic(scale: float, seed: int = 0, n: int = 15, kind: str = "gradient", method: str = "pt") -> Surface:
    """L = 0.3 + scale (α² + β²/2) + small noise on a grid with an exact centre."""
    alphas, betas = np.linspace(-1.0, 1.0, n), np.linspace(-1.0, 1.0, n + 2)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")  # (nx, ny)
    loss = 0.3 + scale * (grid_a**2 + 0.5 * grid_b**2) + 0.02 * np.random.default_rng(seed).random(grid_a.shape)
    return Surface(alphas, betas, loss, 1.0 / (1.0 + loss), {"method": method, "directions": kind, "seed": seed})


@pytest.fixture(scope="module")
def surfaces() -> dict[str, Surface]:
    return {"pt": quadratic(3.0), "ptp-rn": quadratic(1.5, method="ptp-rn"),
            "ptp-adv": quadratic(0.8, method="ptp-adv")}


def all_figures(surfaces: dict[str, Surface]) -> dict[str, Figure]:
    seeds = {m: [quadratic(s.loss.max() / 3, seed=k, method=m) for k in range(3)] for m, s in surfaces.items()}
    return {
        "landscape_3d": render.landscape_3d(surfaces, {"pt": 3.1, "ptp-rn": 1.2, "ptp-adv": 0.4}),
        "contour": render.contour(surfaces, {"pt": [(-0.8, -0.5), (-0.3, -0.2), (0.0, 0.0)]}),
        "contour_single": render.contour({"pt": surfaces["pt"]}),
        "profiles": render.profiles(seeds),
        "difference": render.difference(surfaces["pt"], surfaces["ptp-adv"]),
    }


def test_import_has_no_side_effects() -> None:
    """Importing the plotting modules must neither pick a backend nor load pyplot (STYLE rule 6)."""
    # rcParams.copy(): reading rcParams["backend"] itself would resolve the backend via pyplot.
    code = ("import sys, matplotlib; before = matplotlib.rcParams.copy(); "
            "import landscape.draw.figures, landscape.draw.report, landscape.surface; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "assert matplotlib.rcParams.copy() == before, 'rcParams changed'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_functions_return_figures_without_touching_rcparams(surfaces) -> None:
    import matplotlib
    before = matplotlib.rcParams.copy()
    figures = all_figures(surfaces)
    assert all(isinstance(fig, Figure) for fig in figures.values())
    assert matplotlib.rcParams.copy() == before  # styles apply through rc_context only


def test_labels_name_the_direction_kind(surfaces) -> None:
    figures = all_figures(surfaces)
    ax = figures["contour"].axes[0]
    assert ax.get_xlabel() == "α (gradient direction)" and ax.get_ylabel() == "β (orthogonal direction)"
    fig3d = figures["landscape_3d"]
    assert "gradient direction" in fig3d._supxlabel.get_text()
    titles = [ax.get_title() for ax in fig3d.axes if ax.name == "3d"]
    assert titles == ["pt\nsharpness 3.1", "ptp-rn\nsharpness 1.2", "ptp-adv\nsharpness 0.4"]
    pca = render.contour({"pt": quadratic(1.0, kind="pca")})
    assert pca.axes[0].get_xlabel() == "α (trajectory PC 1)"


def test_3d_panels_share_one_z_range(surfaces) -> None:
    fig = render.landscape_3d(surfaces)
    limits = {ax.get_zlim() for ax in fig.axes if ax.name == "3d"}
    low = min(s.loss.min() for s in surfaces.values())
    high = max(s.loss.max() for s in surfaces.values())
    assert limits == {(low, high)}
    fig = render.landscape_3d(surfaces, zmin=0.0, zmax=2.0, cmap="cividis")
    assert {ax.get_zlim() for ax in fig.axes if ax.name == "3d"} == {(0.0, 2.0)}


def test_contour_levels_are_log_spaced_and_shared(surfaces) -> None:
    fig = render.contour(surfaces, levels=9)
    level_sets = [tuple(c.levels) for ax in fig.axes[:3] for c in ax.collections if hasattr(c, "levels")]
    assert len(set(level_sets)) == 1
    levels = np.array(level_sets[0])
    ratios = levels[1:] / levels[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert levels.size == 9 and ratios[0] > 1


def test_profiles_show_mean_and_band() -> None:
    seeds = [quadratic(1.0, seed=s) for s in range(4)]
    fig = render.profiles({"pt": seeds, "ptp-adv": quadratic(0.5, method="ptp-adv")})
    along_alpha = fig.axes[0]
    mean_line = along_alpha.lines[0]
    i, j = seeds[0].center_index
    np.testing.assert_allclose(mean_line.get_ydata(), np.mean([s.loss[:, j] for s in seeds], axis=0))
    bands = [c for c in along_alpha.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # only the method with several seeds gets a band
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), np.mean([s.loss[i, :] for s in seeds], axis=0))


def test_one_dimensional_surfaces() -> None:
    line = Surface(np.linspace(-1, 1, 11), np.array([0.0]), np.linspace(-1, 1, 11)[:, None] ** 2 + 0.1,
                   np.ones((11, 1)), {"directions": "random"})
    fig = render.profiles({"pt": line})
    assert len(fig.axes) == 1 and fig.get_figwidth() == pytest.approx(3.25)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), line.loss[:, 0])
    with pytest.raises(ValueError, match="1D surface"):
        render.contour({"pt": line})


def test_difference_is_centred_at_zero(surfaces) -> None:
    fig = render.difference(surfaces["pt"], surfaces["ptp-adv"])
    filled = fig.axes[0].collections[0]
    assert filled.norm.vcenter == 0.0 and filled.norm.vmin == -filled.norm.vmax
    assert fig.axes[0].get_title() == "L(ptp-adv) − L(pt)"
    with pytest.raises(ValueError, match="one grid"):
        render.difference(surfaces["pt"], quadratic(1.0, n=9))


def test_bad_arguments_are_refused(surfaces) -> None:
    with pytest.raises(ValueError, match="unknown style"):
        render.contour(surfaces, style="poster")
    with pytest.raises(ValueError, match="quantity"):
        render.profiles(surfaces, quantity="perplexity")
    empty = Surface.empty(np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
    with pytest.raises(ValueError, match="no computed point"):
        render.contour({"pt": empty})


def test_paper_sizes_and_slides_are_larger(surfaces) -> None:
    assert render.contour({"pt": surfaces["pt"]}).get_figwidth() == pytest.approx(3.25)
    assert render.contour(surfaces).get_figwidth() == pytest.approx(6.75)
    slides = render.contour(surfaces, style="slides")
    assert slides.get_figwidth() > 6.75
    assert slides.axes[0].xaxis.label.get_fontsize() > render.contour(surfaces).axes[0].xaxis.label.get_fontsize()


def test_no_text_is_clipped(surfaces) -> None:
    """The tight box around everything drawn (labels, titles, ticks, colour bars) fits the canvas."""
    for name, fig in all_figures(surfaces).items():
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        drawn, canvas = fig.get_tightbbox(renderer), fig.bbox_inches  # both in inches
        tolerance = 0.01
        assert (drawn.x0 >= canvas.x0 - tolerance and drawn.y0 >= canvas.y0 - tolerance
                and drawn.x1 <= canvas.x1 + tolerance and drawn.y1 <= canvas.y1 + tolerance), (
            f"{name}: content {drawn} exceeds the canvas {canvas}")


def test_pdfs_are_vector_with_embedded_truetype_fonts(surfaces, tmp_path: Path) -> None:
    for name, fig in all_figures(surfaces).items():
        (pdf,) = render.save_figure(fig, tmp_path / name, formats=("pdf",))
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF")
        assert b"/FontFile2" in data, f"{name}: fonts not embedded as TrueType"
        assert b"/Type3" not in data and b"/Subtype /Type3" not in data, f"{name}: Type 3 font"
        assert b"CreationDate" not in data and b"Producer" not in data
        if name != "landscape_3d":  # its continuous colour bar may be a small raster strip
            assert b"/Subtype /Image" not in data, f"{name}: contains a raster image"


def test_saving_twice_is_byte_identical(surfaces, tmp_path: Path) -> None:
    """Two fresh renders of the same surfaces give the same PNG and PDF bytes."""
    for attempt in ("a", "b"):
        for name, fig in all_figures(surfaces).items():
            render.save_figure(fig, tmp_path / attempt / name, formats=("png", "pdf"), dpi=60)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 10  # five figures, two formats, no temp files left
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert b"matplotlib" not in (tmp_path / "a" / "contour.png").read_bytes().lower()  # no Software tag


def test_saved_png_has_requested_size(surfaces, tmp_path: Path) -> None:
    (png,) = render.save_figure(render.contour({"pt": surfaces["pt"]}), tmp_path / "c", formats=("png",), dpi=200)
    width, height = (int.from_bytes(png.read_bytes()[16 + 4 * k: 20 + 4 * k], "big") for k in range(2))
    assert width == round(3.25 * 200)
    assert png == tmp_path / "c.png"
    assert abs(height - 3.25 * 0.85 * 200) <= 1  # one contour panel: 0.85 of a column high
