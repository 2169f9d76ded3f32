"""landscape.pipeline: titles that state the metric of the surface under them, one grid meaning, clean refusals."""
import json
import re
import shutil

import numpy as np
import pytest

from landscape.grid.spec import SurfaceSpec
from landscape.measures.row import MetricsConfig
from landscape.compare import compare, find_checkpoints, project_trajectory
from landscape.draw.comparison import PlotConfig, figures
from landscape.surface import Surface
from ptp_core.train import TrainConfig, train


@pytest.fixture(scope="module")
def four_runs(tiny_dirs, toy_csv, tmp_path_factory):
    """Two methods x two seeds of tiny BERT."""
    root = tmp_path_factory.mktemp("runs4")
    for method in ("pt", "ptp-rn"):
        for seed in (0, 1):
            train(TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", method=method, seed=seed,
                              out=str(root / method / f"seed{seed}"), steps=4, batch_size=16, prompt_length=3, dtype="float32",
                              eval_every=4, progress=False))
    return root


@pytest.fixture(scope="module")
def comparison(four_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    spec = SurfaceSpec(grid="5", span=0.5, examples=8, directions="random", dtype="float32")
    return compare(find_checkpoints([four_runs]), spec, MetricsConfig(("surface",)), out, ("prompt", "input"),
                   progress=False)


def test_each_3d_title_states_the_metric_of_its_own_surface(comparison, tmp_path):
    figs = figures(comparison, PlotConfig(tmp_path))
    for space, key in (("prompt", "grid_sharpness"), ("input", "input_grid_sharpness")):
        panels = [ax for ax in figs["landscape_3d" + ("" if space == "prompt" else "_input")].axes if ax.name == "3d"]
        groups = comparison.by_method(space)
        assert [ax.get_title().splitlines()[0] for ax in panels] == list(groups)
        for ax, (method, surfaces) in zip(panels, groups.items()):
            shown = float(re.search(r"grid sharpness (\S+)", ax.get_title())[1])  # read back from the figure
            drawn = surfaces[0]  # the first seed's surface is the one drawn
            assert drawn.spec["checkpoint_seed"] == 0 and drawn.spec["space"] == space
            row = comparison.row(drawn.spec["checkpoint"])
            assert shown == float(f"{row[key]:.3g}")
            other = comparison.row(surfaces[1].spec["checkpoint"])[key]  # the other seed: a different number
            assert f"{other:.3g}" != f"{row[key]:.3g}"


def test_rows_and_surfaces_are_keyed_by_checkpoint_and_space(comparison):
    assert len(comparison.rows) == 4 and len(comparison.surfaces) == 8
    for (checkpoint, space), surface in comparison.surfaces.items():
        assert surface.spec["checkpoint"] == checkpoint and surface.spec["space"] == space
        assert surface.shape == (5, 5)
    assert {s.method for s in comparison.stats.summaries} == {"pt", "ptp-rn"}


def test_grid_n_means_n_by_n_in_every_command():
    from landscape.cli.arguments import add_surface_arguments, spec_from_args
    from landscape.cli.plot import parser as _parser
    from ptp_core import cli

    grid_parser = cli.parser("grid", "")
    add_surface_arguments(grid_parser)
    for parser, extra in ((grid_parser, {}), (_parser(), {"space": "prompt"})):
        assert spec_from_args(parser.parse_args(["--grid", "7"]), **extra).shape == (7, 7)
        assert spec_from_args(parser.parse_args(["--grid", "7x1"]), **extra).shape == (7, 1)


def test_metrics_without_surface_still_draw(four_runs, tmp_path):
    from landscape.cli import plot

    out = tmp_path / "hessian-only"
    plot.main([str(four_runs / "pt"), "--out", str(out), "--grid", "3", "--examples", "4", "--metrics", "hessian",
               "--metric-examples", "4", "--no-progress"])
    assert (out / "landscape_3d.png").is_file()
    rows = json.loads((out / "metrics.json").read_text())
    assert all("grid_sharpness" not in r and len(r["hessian_eigenvalues"]) == 3 for r in rows)


def test_a_refused_run_leaves_no_folder(four_runs, tmp_path):
    from landscape.cli import plot

    orphan = tmp_path / "orphan"
    shutil.copytree(four_runs / "pt" / "seed0", orphan)
    meta = json.loads((orphan / "ptp.json").read_text())
    del meta["task"]
    (orphan / "ptp.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not name its task"):
        plot.main([str(four_runs / "pt"), str(orphan), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


def test_project_trajectory_recovers_plane_coordinates():
    rng = np.random.default_rng(0)
    d1, d2, center = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    surface = Surface.empty(np.zeros(1), np.zeros(1), {}, d1, d2)
    coords = np.array([[0.0, 0.0], [0.5, -0.25], [-1.0, 2.0]])
    prompts = np.stack([center + a * d1 + b * d2 for a, b in coords])  # (S, P, D) in the plane
    np.testing.assert_allclose(project_trajectory(surface, prompts, center), coords, atol=1e-6)
    off_plane = prompts + 0.1 * rng.normal(size=prompts.shape)  # least squares: the closest point in the plane
    basis = np.stack([d1.ravel(), d2.ravel()], 1)
    for (a, b), snapshot in zip(project_trajectory(surface, off_plane, center), off_plane):
        residual = (snapshot - center).ravel() - basis @ np.array([a, b])
        np.testing.assert_allclose(basis.T @ residual, 0.0, atol=1e-5)


def test_left_out_grid_and_examples_take_the_device_default():
    from landscape.cli.arguments import spec_from_args
    from landscape.grid.spec import DEVICE_DEFAULTS
    from landscape.compare import plan
    from landscape.measures.row import MetricsConfig
    from landscape.cli.plot import parser as _parser

    args = _parser().parse_args(["ckpt"])
    assert args.grid is None and args.examples is None
    cpu, gpu = spec_from_args(args, "cpu", space="prompt"), spec_from_args(args, "cuda:1", space="prompt")
    assert (cpu.grid, cpu.examples) == DEVICE_DEFAULTS["cpu"][:2] and (gpu.grid, gpu.examples) == DEVICE_DEFAULTS["cuda"][:2]
    assert spec_from_args(_parser().parse_args(["ckpt", "--examples", "9"]), "cpu").examples == 9
    line = plan(["a", "b"], cpu, ("prompt",), MetricsConfig(), "cpu", ("grid", "examples"))
    assert "--grid and --examples: the cpu default" in line and DEVICE_DEFAULTS["cpu"][2] in line


def test_clock_estimates_from_the_first_chunk_then_the_first_checkpoint():
    from landscape.compare import Clock

    said = []
    clock = Clock(said.append, points=2 * 441, checkpoints=2, started=0.0)
    clock.chunk(49, 10.0)
    clock.chunk(49, 10.0)  # only the first chunk speaks
    assert len(said) == 1 and "about 3.0 min" in said[0]  # 10 s / 49 points * 882 points = 180 s
    clock.started = __import__("time").time() - 120
    clock.checkpoint_done(0)
    clock.checkpoint_done(1)
    assert len(said) == 2 and "about 2.0 min are left" in said[1]


def test_spectrum_topology_calibration_and_connectivity_reach_rows_tables_figures_and_report(four_runs, tmp_path):
    """Spectrum, topology, calibration and connectivity end to end on tiny BERT: every new key in the rows, the barrier statistics per method, the figures,
    the tables and the report; a second compare() reads the pairs' connect.json instead of retraining."""
    from landscape.connect.run import ConnectConfig
    from landscape.draw.comparison import draw
    from landscape.stats import metric_names
    from landscape.measures.topology import loss_topology

    spec = SurfaceSpec(grid="5", span=0.5, examples=8, directions="random", dtype="float32")
    metrics = MetricsConfig(("surface", "calibration", "spectrum"), examples=8, spectrum_probes=2, spectrum_steps=6,
                            max_hvps=60, calibration_examples=16)
    connect = ConnectConfig(steps=3, points=5, examples=8, batch_size=8, dtype="float32")
    comparison = compare(find_checkpoints([four_runs]), spec, metrics, tmp_path, ("prompt",), progress=False,
                         connect=connect)
    for row in comparison.rows:
        assert len(row["hessian_spectrum_nodes"]) == len(row["hessian_spectrum_weights"]) == 2 * 6
        assert sum(row["hessian_spectrum_weights"]) == pytest.approx(1.0)
        assert row["hessian_min_eigenvalue"] <= min(row["hessian_spectrum_nodes"]) + 1e-4  # Ritz values interlace
        surface = comparison.surfaces[(row["checkpoint"], "prompt")]
        topology = loss_topology(surface.loss, metrics.basin_tau)
        assert row["persistence"] == topology.persistence and row["basins"] == topology.basins >= 1
        assert 0 <= row["center_ece"] <= 1 and row["settings"]["basin_tau"] == metrics.basin_tau
    names = metric_names(comparison.rows)
    assert "center_ece" in names and not any(n.startswith(("hessian_spectrum", "persistence")) for n in names)
    assert {(c["method_a"], c["seed_a"], c["seed_b"]) for c in comparison.connections} == {("pt", 0, 1),
                                                                                         ("ptp-rn", 0, 1)}
    assert {(s.method, s.metric) for s in comparison.stats.barriers} == {
        (m, k) for m in ("pt", "ptp-rn") for k in ("linear_barrier", "curve_barrier")}
    assert any(c.target == "center_ece" for c in comparison.stats.correlations)
    figs = figures(comparison, PlotConfig(tmp_path))
    assert {"spectrum", "persistence", "connectivity"} <= set(figs)
    draw(comparison, PlotConfig(tmp_path))
    assert "Mode connectivity" in (tmp_path / "metrics.md").read_text()
    import csv

    with open(tmp_path / "metrics.csv") as f:
        cells = list(csv.DictReader(f))
    from ptp_core.io import to_json

    assert [json.loads(c["persistence"]) for c in cells] == [to_json(r["persistence"]) for r in comparison.rows]
    assert json.loads(cells[0]["hessian_spectrum_nodes"]) == pytest.approx(comparison.rows[0]["hessian_spectrum_nodes"])
    page = (tmp_path / "report.html").read_text()
    assert "Curvature spectrum" in page and "Basins" in page and "Mode connectivity" in page
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "connect").rglob("connect.json")}
    assert len(stamp) == 2
    again = compare(find_checkpoints([four_runs]), spec, MetricsConfig(("surface",)), tmp_path, ("prompt",),
                    progress=False, connect=connect)
    assert [c["curve_barrier"] for c in again.connections] == [c["curve_barrier"] for c in comparison.connections]
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # read back, not recomputed
