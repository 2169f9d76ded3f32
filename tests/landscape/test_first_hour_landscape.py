"""What a newcomer meets in the first hour of landscape.grid / landscape.plot: grids as asked (odd counts, evenly
spaced, the JSON saying what was computed), no silent zeros, tables with notes for every `–`, a warning for
identical checkpoints, figures that state their grid and examples, consoles one message a line."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from landscape.cli import grid as grid_cli
from landscape.cli import plot as plot_cli
from landscape.draw import analysis, figures
from landscape.grid.spec import SurfaceSpec, grid_axis
from landscape.surface import Surface
from ptp_core import cli
from ptp_core.train import TrainConfig, train


@pytest.fixture(scope="module")
def runs(tiny_dirs, toy_csv, tmp_path_factory):
    """One tiny pt checkpoint and a copy of it under another name (identical parameters: a ptp run whose
    regularizer never switched on)."""
    root = tmp_path_factory.mktemp("first_hour")
    pt = train(TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", out=str(root / "runs/pt/seed0"),
                           steps=2, batch_size=8, prompt_length=3, eval_every=2, eval_examples=8, test_examples=8,
                           progress=False, dtype="float32", seed=0))
    copy = shutil.copytree(pt, root / "runs/ptp-rn/seed0")
    meta = json.loads((copy / "ptp.json").read_text())
    (copy / "ptp.json").write_text(json.dumps({**meta, "method": "ptp-rn"}))
    return root / "runs"


def _run(main, argv, capsys) -> tuple[int, str, str]:
    """ptp_core.cli.run in process: (exit code, stdout, stderr)."""
    try:
        cli.run(main, [str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_grid_counts_are_odd_and_evenly_spaced():
    # reference: numpy's own evenly spaced axis, which holds 0.0 exactly for an odd count
    for count in (3, 5, 21):
        axis = grid_axis(count, 0.7)
        np.testing.assert_allclose(axis, np.linspace(-0.7, 0.7, count), rtol=0, atol=1e-15)
        assert axis.size == count and axis[count // 2] == 0.0
    assert grid_axis(1, 0.7).tolist() == [0.0]
    assert SurfaceSpec(grid="5").axes()[0].size == 5 and SurfaceSpec(grid="5x1").shape == (5, 1)
    for grid in ("4", "21x4", "2x1"):
        with pytest.raises(ValueError, match=r"has an even count \d+, .*use an odd count, e\.g\. --grid \d+$"):
            SurfaceSpec(grid=grid)
    with pytest.raises(ValueError, match="no centre point"):
        grid_axis(4, 1.0)


def test_even_grid_is_refused_by_every_command(runs, tmp_path, capsys):
    checkpoint = runs / "pt/seed0"
    for main, argv in ((grid_cli.main, [checkpoint, "--out", tmp_path / "s"]),
                       (plot_cli.main, [checkpoint, "--out", tmp_path / "p", "--metrics", "surface"])):
        code, _, err = _run(main, [*argv, "--grid", "4", "--examples", "4", "--no-progress"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--grid 5" in err, err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "p").exists()


def test_grid_says_what_it_wrote_and_a_rerun_is_complete(runs, tmp_path, capsys):
    checkpoint, out = runs / "pt/seed0", tmp_path / "surface"
    argv = [checkpoint, "--out", out, "--grid", "3", "--examples", "4", "--progress", "--directions", "random"]
    code, printed, err = _run(grid_cli.main, argv, capsys)
    assert code == 0 and printed.strip() == f"wrote {out}.npz (3x3 grid, 9 points on 4 test examples)"
    # stderr is a log here, not a terminal: the finished bar is one line of its own, printed once
    assert [line for line in err.splitlines() if "surface" in line] == [
        next(line for line in err.splitlines() if line.startswith("prompt surface: 9/9 points, "))]
    spec = json.loads(out.with_suffix(".json").read_text())
    arrays = np.load(out.with_suffix(".npz"))
    assert spec["grid"] == [3, 3] and spec["points"] == 9 and arrays["loss"].shape == (3, 3)
    np.testing.assert_array_equal(arrays["alphas"], np.linspace(-1, 1, 3))
    code, printed, _ = _run(grid_cli.main, argv, capsys)
    assert code == 0 and printed.strip() == f"{out}.npz already complete (3x3 grid, 9 points)"
    # another grid on the same --out: the mend is another --out or --overwrite, never plot's --surface
    code, _, err = _run(grid_cli.main, [*argv[:4], "5", *argv[5:]], capsys)
    assert code == 2 and "another grid" in err and "another --out" in err and "--surface" not in err, err


def test_plot_on_a_coarse_grid_leaves_nothing_silent(runs, tmp_path, capsys):
    out = tmp_path / "fig"
    code, printed, err = _run(plot_cli.main, [runs, "--out", out, "--grid", "3", "--examples", "4", "--metrics",
                                              "surface", "--directions", "random", "--no-progress"], capsys)
    assert code == 0, err
    # identical parameters: one warning line naming both checkpoints
    warning = [line for line in err.splitlines() if "identical parameters" in line]
    assert len(warning) == 1 and "pt/seed0" in warning[0] and "ptp-rn/seed0" in warning[0]

    rows = json.loads((out / "metrics.json").read_text())
    for row in rows:
        # --grid 3 (step 1) leaves only the centre in the disc r = 0.5: null and why, never 0
        assert row["grid_sharpness"] is None and "finer --grid" in row["grid_sharpness_reason"]
        settings = row["settings"]
        assert not {"radius", "tau", "examples"} & set(settings)
        assert settings["surface_radius"] == 0.5 and settings["metric_examples"] == 32
        assert settings["surface_examples"] == 4 and settings["test_examples"] == 8
    markdown = (out / "metrics.md").read_text()
    headline = markdown.split("## ")[1]
    header = headline.splitlines()[2]
    assert header.count("|") - 1 <= 12 and "| pt/seed0 |" in headline and "| ptp-rn/seed0 |" in headline
    assert str(runs) not in headline  # names relative to the common root of the checkpoints
    # every dash has a numbered note; the notes say why (grid too coarse, metric not requested)
    for section in markdown.split("## ")[1:]:
        marks = set(re.findall(r"–(\[\d+\])", section))
        assert marks <= set(re.findall(r"^(\[\d+\]) ", section, flags=re.M)) and "| – |" not in section
    notes = dict(re.findall(r"^(\[\d+\]) (.+?)\s*$", headline, flags=re.M))
    assert any(text.startswith("grid_sharpness") and "finer --grid" in text for text in notes.values())
    assert "hessian_eigenvalues: not requested (--metrics surface; add hessian)" in notes.values()
    # one checkpoint a group: no pairwise tests or correlations of dashes
    assert "Pairwise tests" not in markdown and "Rank correlations" not in markdown and "Per group" not in markdown
    assert "center_acc (on the surface's 4 examples)" in markdown and "test_accuracy (n=8 test examples)" in markdown
    assert "0.5 (n=8)" in headline or "(n=8)" in headline
    # the console prints the headline table: the same cells, never None
    assert "None" not in printed
    for line in headline.splitlines()[4:6]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.search(r"\s+".join(map(re.escape, cells)), printed), (cells, printed)


def _surface(loss: np.ndarray, examples: int = 4, method: str = "pt") -> Surface:
    axis = grid_axis(loss.shape[0], 1.0)
    surface = Surface.empty(axis, axis, {"examples": examples, "split": "test", "method": method,
                                         "directions": "random"})
    surface.loss[...] = loss
    surface.accuracy[...] = 0.5
    return surface


def test_figures_state_grid_and_examples_and_legends_only_what_is_drawn():
    x, y = np.meshgrid(grid_axis(5, 1.0), grid_axis(5, 1.0), indexing="ij")
    a, b = _surface(1 + x**2 + y**2), _surface(1 + 2 * x**2 + y**2)
    drawn = {"landscape_3d": figures.landscape_3d({"pt": a, "ptp": b}), "contour": figures.contour({"pt": a}),
             "profiles": figures.profiles({"pt": a}), "difference": figures.difference(a, b)}
    for name, figure in drawn.items():
        assert figure._suptitle is not None and figure._suptitle.get_text() == "5x5 grid, 4 test examples", name
    # every finite persistence is far below tau: the threshold line lies outside the axes and is not in the legend
    diagrams = {"pt": [[0.1, None], [0.2, 0.21]], "ptp": [[0.1, None], [0.2, 0.21]]}
    figure = analysis.persistence_diagram(diagrams, tau=5.0)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels == ["pt", "ptp"]
    markers = [c.get_paths()[0].vertices.tobytes() for c in figure.axes[0].collections]
    offsets = [c.get_offsets()[:, 0] for c in figure.axes[0].collections]
    assert markers[0] != markers[1] and not np.allclose(offsets[0], offsets[1])  # one label never hides another
    figure = analysis.persistence_diagram(diagrams, tau=0.005)
    assert "persistence = 0.005" in figure.axes[0].get_legend_handles_labels()[1]
