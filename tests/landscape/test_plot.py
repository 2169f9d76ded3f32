"""`python -m landscape.plot` end to end on tiny checkpoints: every file, re-render, bad input."""
import subprocess
import sys

import pytest

from ptp_core.train import TrainConfig, train

FILES = ["landscape_3d.pdf", "landscape_3d.png", "contour.pdf", "contour.png", "profiles.pdf", "profiles.png",
         "difference.pdf", "difference.png", "landscape_3d_input.png", "profiles_input.png", "report.html",
         "metrics.json", "metrics.csv", "metrics.md", "metrics.tex"]


@pytest.fixture(scope="module")
def two_runs(tiny_dirs, toy_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        train(TrainConfig(model=tiny_dirs["bert"], task=toy_csv, head="classifier", out=str(root / f"pt/seed{seed}"),
                          steps=6, batch_size=16, prompt_length=3, eval_every=3, snapshot_every=2, progress=False,
                          dtype="float32",
                          seed=seed))
    return root


def _plot(*args, expect=0):
    result = subprocess.run([sys.executable, "-m", "landscape.plot", *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == expect, result.stderr[-3000:]
    if expect == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    return result


def test_plot_end_to_end_and_rerender(two_runs, tmp_path):
    out = tmp_path / "fig"
    _plot(two_runs, "--out", out, "--grid", "5", "--examples", "8", "--space", "both", "--directions", "random",
          "--norm", "none", "--metric-examples", "4", "--no-progress")
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    surfaces = sorted((out / "surfaces").glob("*-prompt.npz"))
    assert len(surfaces) == 2
    first = (out / "contour.png").read_bytes()
    again = tmp_path / "again"
    _plot("--surface", *surfaces, "--out", again)
    assert (again / "contour.png").read_bytes() == first
    assert (again / "landscape_3d.png").read_bytes() == (out / "landscape_3d.png").read_bytes()
    assert (again / "persistence.png").read_bytes() == (out / "persistence.png").read_bytes()  # basins, no model
    # a second run reuses the cached surfaces (resume) and rewrites the same figure
    _plot(two_runs, "--out", out, "--grid", "5", "--examples", "8", "--directions", "random", "--norm", "none",
          "--metrics", "surface", "--no-progress")
    assert (out / "contour.png").read_bytes() == first


def test_plot_bad_input(two_runs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a file" in _plot(two_runs, "--out", blocker, expect=2).stderr
    assert "does not exist" in _plot(tmp_path / "nothing", "--out", tmp_path / "o", expect=2).stderr
    assert "grid" in _plot(two_runs, "--out", tmp_path / "o", "--grid", "0", expect=2).stderr
    assert "span" in _plot(two_runs, "--out", tmp_path / "o", "--span", "-1", expect=2).stderr
    assert "examples" in _plot(two_runs, "--out", tmp_path / "o", "--examples", "0", expect=2).stderr
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    (tmp_path / "broken.json").write_text("{}")
    _plot("--surface", broken, "--out", tmp_path / "o2", expect=2)
    assert not (tmp_path / "o2").exists()


def test_pca_contour_shows_the_projected_trajectory(two_runs, tmp_path):
    import json

    import numpy as np

    out = tmp_path / "pca"
    _plot(two_runs / "pt" / "seed0", "--out", out, "--grid", "5", "--examples", "8", "--directions", "pca",
          "--metrics", "surface", "--no-progress")
    spec = json.loads(next((out / "surfaces").glob("*-prompt.json")).read_text())
    path = np.array(spec["trajectory"])
    assert path.shape[1] == 2 and len(path) >= 2
    assert (out / "contour.png").is_file()
