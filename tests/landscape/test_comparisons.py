"""Comparisons never pool unlike runs: groups per method and comparable set, surface files that never collide,
re-rendered surfaces of unlike specs kept apart, partial surfaces flagged, every n and adjusted p in metrics.md."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import toy_rows
from landscape.compare import compare, find_checkpoints, from_surfaces
from landscape.draw.tables import write_tables
from landscape.grid.spec import SurfaceSpec
from landscape.measures.row import MetricsConfig
from landscape.stats import statistics
from landscape.surface import Surface, save_surface
from ptp_core.train import TrainConfig, train


@pytest.fixture(scope="module")
def two_tasks(tiny_dirs, toy_csv, tmp_path_factory):
    """Four pt checkpoints: three on task A (prompt lengths 3, 3, 6; seeds 0, 1, 2), one on task B (seed 0)."""
    root = tmp_path_factory.mktemp("two_tasks")
    task_b = root / "other.csv"
    with open(task_b, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label", "split"])
        writer.writeheader()
        writer.writerows(dict(r, split=s) for s, n, seed in (("train", 32, 7), ("validation", 8, 9), ("test", 16, 8))
                        for r in toy_rows(n, seed))
    for name, task, length, seed in (("a0", toy_csv, 3, 0), ("a1", toy_csv, 3, 1), ("a2", toy_csv, 6, 2),
                                     ("b0", str(task_b), 3, 0)):
        train(TrainConfig(model=tiny_dirs["bert"], task=task, head="classifier", out=str(root / "runs" / name),
                          steps=2, batch_size=8, prompt_length=length, eval_every=2, eval_examples=8,
                          test_examples=8, progress=False, dtype="float32", seed=seed))
    return root / "runs"


def test_plot_on_two_tasks_gives_groups_per_task_and_prompt_length(two_tasks, tmp_path):
    from landscape.cli import plot

    out = tmp_path / "fig"
    plot.main([str(two_tasks), "--out", str(out), "--grid", "3", "--examples", "8", "--directions", "random",
               "--metrics", "surface", "--no-progress"])
    rows = {r["checkpoint"].rsplit("/", 1)[-1]: r for r in json.loads((out / "metrics.json").read_text())}
    assert [rows[k]["group"] for k in ("a0", "a1", "a2", "b0")] == [
        "pt · task toy.csv · P=3", "pt · task toy.csv · P=3", "pt · task toy.csv · P=6",
        "pt · task other.csv · P=3"]
    # pt seed 0 on task A and on task B: two surface files, no collision
    assert len(list((out / "surfaces").glob("*-prompt.npz"))) == 4
    assert len(list((out / "surfaces").glob("pt-seed0-toy-*-prompt.npz"))) == 1
    assert len(list((out / "surfaces").glob("pt-seed0-other-*-prompt.npz"))) == 1
    markdown = (out / "metrics.md").read_text()
    assert "| pt · task toy.csv · P=3 | pt · task toy.csv · P=6 | pt · task other.csv · P=3 |" in markdown
    assert "(n=2)" in markdown and "(n=1)" in markdown
    assert "Pairwise tests" not in markdown  # 2 seeds against 1: no test has a p-value to report
    report = (out / "report.html").read_text()
    assert "other.csv" in report  # the metadata lists each group's own task, not the first surface's


def test_statistics_never_span_comparable_sets(two_tasks, tmp_path):
    spec = SurfaceSpec(grid="3", examples=8, directions="random", dtype="float32")
    comparison = compare(find_checkpoints([two_tasks]), spec, MetricsConfig(("surface",)), tmp_path, progress=False)
    summaries = {s.group: s for s in comparison.stats.summaries if s.metric == "center_loss"}
    assert {label: s.n for label, s in summaries.items()} == {
        "pt · task toy.csv · P=3": 2, "pt · task toy.csv · P=6": 1, "pt · task other.csv · P=3": 1}
    a = [r["center_loss"] for r in comparison.rows if r["group"] == "pt · task toy.csv · P=3"]
    assert summaries["pt · task toy.csv · P=3"].mean == pytest.approx(np.mean(a))  # not pooled with task B
    assert comparison.stats.tests == []  # one method per set: nothing to test
    sets = {c.comparable_set for c in comparison.stats.correlations}
    assert sets == {"task toy.csv · P=3", "task toy.csv · P=6", "task other.csv · P=3"}
    assert all(c.n <= 2 and c.spearman_rho is None for c in comparison.stats.correlations)
    groups = comparison.metadata["groups"]
    assert "task" not in comparison.metadata and groups["pt · task other.csv · P=3"]["task"].endswith("other.csv")
    assert groups["pt · task toy.csv · P=6"]["prompt_length"] == 6
    assert sorted(comparison.by_method("prompt")) == sorted(summaries)


def test_rows_of_two_methods_in_two_sets_are_tested_within_each_set_only(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"checkpoint": f"{task}/{m}/{s}", "method": m, "seed": s, "comparable": {"task": task},
             "grid_sharpness": float(rng.normal(shift + (5 if task == "b" else 0))),
             "test_accuracy": float(rng.uniform())}
            for task in ("a", "b") for m, shift in (("pt", 0), ("ptp", 1)) for s in range(3)]
    stats = statistics(rows)
    assert {(t.group_a, t.group_b) for t in stats.tests} == {("pt · task a", "ptp · task a"),
                                                              ("pt · task b", "ptp · task b")}
    assert {(c.comparable_set, c.n) for c in stats.correlations} == {("task a", 6), ("task b", 6)}
    markdown = write_tables(rows, tmp_path, stats)["md"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| metric | group a"))
    assert "Welch p (Holm)" in header and "MWU p (Holm)" in header and "| n a | n b |" in header
    assert "Holm over the 4 Welch tests of the pairwise table" in markdown  # the family is stated
    summary = markdown.split("## Per group")[1].split("##")[0]
    cells = [c for line in summary.splitlines()[4:] for c in line.strip("|").split("|")[1:]]
    assert cells and all("(n=3)" in c for c in cells)  # every cell shows its n


def _surface(path, checkpoint: str, norm: str = "filter", done: int | None = None, seed: int = 0) -> None:
    axis = np.linspace(-1, 1, 5)
    surface = Surface.empty(axis, axis, {"checkpoint": checkpoint, "method": "pt", "checkpoint_seed": seed,
                                         "task": "toy", "space": "prompt", "directions": "random",
                                         "normalization": norm, "split": "test", "examples": 8, "span": 1.0},
                            np.ones((3, 4)), np.zeros((3, 4)))
    loss = (1 + seed) * (axis[:, None] ** 2 + axis[None, :] ** 2) + 0.5  # (5, 5)
    surface.loss[:] = loss
    surface.accuracy[:] = 0.5
    if done is not None:
        surface.loss.reshape(-1)[done:] = np.nan
    save_surface(surface, path)


def test_rerendered_surfaces_keep_unlike_specs_apart_and_flag_partial_ones(tmp_path):
    _surface(tmp_path / "a", "runs/a", "filter")
    _surface(tmp_path / "b", "runs/b", "none", seed=1)
    comparison = from_surfaces([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert sorted(r["group"] for r in comparison.rows) == ["pt · norm filter", "pt · norm none"]
    assert all(s.n == 1 for s in comparison.stats.summaries)  # not one group of 2
    _surface(tmp_path / "a2", "runs/a", "none")  # a second prompt surface of checkpoint runs/a
    with pytest.raises(ValueError, match="both the prompt-space surface of runs/a"):
        from_surfaces([tmp_path / "a.npz", tmp_path / "a2.npz"])
    _surface(tmp_path / "c", "runs/c", "filter", done=20, seed=2)
    comparison = from_surfaces([tmp_path / "a.npz", tmp_path / "c.npz"])
    rows = {r["checkpoint"]: r for r in comparison.rows}
    assert rows["runs/c"]["partial"] is True and rows["runs/c"]["partial_points"] == "prompt 20/25"
    assert rows["runs/a"]["partial"] is False and rows["runs/c"]["group"] == "pt · partial"
    markdown = write_tables(comparison.rows, tmp_path / "out", comparison.stats)["md"].read_text()
    assert "yes (prompt 20/25)" in markdown and "| pt · complete |" in markdown and "| pt · partial |" in markdown
