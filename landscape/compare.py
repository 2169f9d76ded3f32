"""Checkpoints -> surfaces, metric rows and statistics: what `landscape.plot`, the demo and notebooks call.

    comparison = compare(find_checkpoints(["runs/"]), SurfaceSpec(grid="21"), MetricsConfig(), "figures/cmp")
    draw(comparison, PlotConfig("figures/cmp"))   # landscape.draw.comparison

Every input is checked (checkpoints, tasks, specs) before anything is written; then one surface per
checkpoint and space is computed or resumed under OUT/surfaces/, one metrics row per checkpoint is
measured, and the statistics across checkpoints are computed once. Drawing is the caller's.

Each row carries `comparable` (landscape.surface.comparable_identity: task, model, head, prompt, surface settings)
and `group`, its label in tables and figures: the method, plus the settings that set its comparable set apart from
the others' ("pt · task B", "pt · P=6"). Statistics never pool, test or correlate across comparable sets.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np

from landscape.connect.run import RESULT_FILE, ConnectConfig, check_pair, connect_pair, write_result
from landscape.grid.driver import compute_surface
from landscape.grid.spec import SPACES, SurfaceSpec, device_defaults
from landscape.measures.row import MetricsConfig, measure, metrics_row, surface_topology
from landscape.measures.surface_metrics import surface_metrics
from landscape.stats import IDENTITY, Statistics, row_groups, statistics
from landscape.surface import (CHECKPOINT_KEYS, TOKEN_ACCURACY, TOKEN_LOSS, Surface, check_one_loss,
                               comparable_identity, is_generation, load_surface, save_surface, surface_paths)
from ptp_core.checkpoint import Checkpoint, load_checkpoint
from ptp_core.io import to_json
from ptp_core.model.backbones import resolve_device, resolve_dtype
from ptp_core.tasks.metrics import METRIC_KEYS
from ptp_core.tasks.task import Task

LM_TEST_KEYS = ("token_accuracy", "perplexity")  # what ptp.json records of a --head lm prompt's test split


@dataclass
class Comparison:
    """Surfaces keyed by (checkpoint, space), one metrics row per checkpoint, statistics computed once."""

    surfaces: dict[tuple[str, str], Surface]
    rows: list[dict]  # metrics.json rows; input-space numbers carry the input_ prefix
    stats: Statistics
    metadata: dict = field(default_factory=dict)
    connections: list[dict] = field(default_factory=list)  # connect.json of every pair of seeds within a method

    def row(self, checkpoint: str) -> dict:
        return next((r for r in self.rows if r["checkpoint"] == checkpoint), {})

    def metric(self, surface: Surface, name: str):
        """The value of metric `name` for the checkpoint and space this very surface belongs to."""
        space = surface.spec.get("space") or "prompt"
        return self.row(surface.spec.get("checkpoint") or "").get(name if space == "prompt" else f"input_{name}")

    def spaces(self) -> list[str]:
        return list(dict.fromkeys(space for _, space in self.surfaces))

    def by_method(self, space: str) -> dict[str, list[Surface]]:
        """group label (the method, plus what sets its comparable set apart) -> its surfaces in `space`, ordered by
        seed (the first one represents the group)."""
        groups: dict[str, list[Surface]] = {}
        for (checkpoint, where), surface in self.surfaces.items():
            if where == space:
                label = self.row(checkpoint).get("group") or surface.spec.get("method") or "checkpoint"
                groups.setdefault(label, []).append(surface)
        for group in groups.values():
            group.sort(key=lambda s: (s.spec.get("checkpoint_seed") is None, s.spec.get("checkpoint_seed") or 0))
        return groups


def find_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Checkpoint directories named directly or found below folders (e.g. runs/ from the sweep)."""
    found = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; give checkpoint directories or folders of them")
        if (path / "adapter_config.json").exists():
            found.append(path)
        else:
            below = sorted(p.parent for p in path.rglob("adapter_config.json") if not p.parent.name.startswith("."))
            if not below:
                raise ValueError(f"{path} holds no checkpoint (no adapter_config.json below it)")
            found.extend(below)
    return list(dict.fromkeys(found))


def run_label(meta: dict, path: Path) -> str:
    """method-seedK (method-deep-seedK for a deep prompt) for our runs, the folder name for anything else: names
    the surface files."""
    if meta.get("seed") is None:
        return path.name
    deep = "-deep" if meta.get("prompt_type") == "deep" else ""
    return f"{meta.get('method', path.name)}{deep}-seed{meta['seed']}"


def checkpoint_identity(checkpoint: Checkpoint) -> dict:
    """The CHECKPOINT_KEYS of landscape.surface for a checkpoint: what its surfaces are comparable on."""
    meta = checkpoint.meta
    identity = {key: meta.get(key) for key in CHECKPOINT_KEYS}
    identity.update(prompt_type=checkpoint.prompt_type, prompt_length=int(checkpoint.params["prompt"].shape[0]))
    return identity


def surface_stem(checkpoint: Checkpoint) -> str:
    """run_label, the task and a short hash of the checkpoint's folder, content and comparable identity: the
    surfaces (and connect folders) of two different checkpoints never share a name, whatever their method, seed
    or task."""
    task = str(checkpoint.meta.get("task") or "")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(task).stem if Path(task).suffix else task).strip("_")
    key = json.dumps([str(Path(checkpoint.path).resolve()), checkpoint.content_hash(),
                      checkpoint_identity(checkpoint)], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return "-".join(p for p in (run_label(checkpoint.meta, checkpoint.path), slug, digest) if p)


def project_trajectory(surface: Surface, prompts: np.ndarray, center: np.ndarray) -> list[list[float]]:
    """Training snapshots (S, P, D) around the trained prompt center (P, D) as (alpha, beta) coordinates in the
    surface's plane: the least-squares solution of [d1 d2] c = snapshot - center."""
    basis = np.stack([surface.direction_1.ravel(), surface.direction_2.ravel()], axis=1)  # (P*D, 2)
    offsets = (prompts - center).reshape(len(prompts), -1).T  # (P*D, S)
    coords, *_ = np.linalg.lstsq(basis, offsets, rcond=None)  # (2, S)
    return coords.T.round(6).tolist()


def plan(checkpoints: list, spec: SurfaceSpec, spaces: tuple[str, ...], metrics: MetricsConfig, device: str,
         defaulted: tuple[str, ...] = ()) -> str:
    """What compare() will compute, in which dtype, on which device; `defaulted` names the flags that took their
    device default (landscape.grid.spec.DEVICE_DEFAULTS), and the plan says why."""
    spec = spec.for_device(device)
    points = spec.shape[0] * spec.shape[1]
    line = (f"plan: {len(checkpoints)} checkpoint(s) x {len(spaces)} space(s) x {points} points "
            f"({spec.shape[0]}x{spec.shape[1]}) on {spec.examples} {spec.split} examples, "
            f"{resolve_dtype(spec.dtype, device)} on {device}; metrics {','.join(metrics.which)} on "
            f"{metrics.examples} examples")
    if defaulted:
        flags = " and ".join(f"--{name}" for name in defaulted)
        line += f"\n      {flags}: the {device.split(':')[0]} default ({device_defaults(device)[1]}); give {flags} to change"
    return line


@dataclass
class Clock:
    """Says how long compare() will take: from the first measured chunk, then from the first whole checkpoint."""

    report: Callable[[str], None]
    points: int  # grid points of every surface of the comparison
    checkpoints: int
    started: float = field(default_factory=time.time)
    first_chunk: bool = True

    def chunk(self, points: int, seconds: float) -> None:
        if self.first_chunk and points:
            self.first_chunk = False
            self.report(f"estimate: the first chunk took {seconds:.1f} s for {points} points, so the surfaces take "
                        f"about {_minutes(seconds / points * self.points)} ({self.points} points; fewer if resumed), "
                        "metrics on top")

    def checkpoint_done(self, index: int) -> None:
        if index == 0 and self.checkpoints > 1:
            spent = time.time() - self.started
            self.report(f"estimate: the first checkpoint took {_minutes(spent)} (surfaces and metrics), so about "
                        f"{_minutes(spent * (self.checkpoints - 1))} are left")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def compare(checkpoints: list[Path], spec: SurfaceSpec, metrics: MetricsConfig, out: str | Path,
            spaces: tuple[str, ...] = ("prompt",), *, device: str = "auto", cache_dir: Path | None = None,
            overwrite: bool = False, progress: bool = True, report: Callable[[str], None] | None = None,
            connect: ConnectConfig | None = None, task: str | None = None) -> Comparison:
    """Surfaces (cached under out/surfaces/), a metrics row per checkpoint, and their statistics.

    report(line), if given, receives time estimates: after the first grid chunk and after the first checkpoint.
    connect: also connect every pair of seeds within a method (landscape.connect; cached under out/connect/).
    task: the task of checkpoints whose ptp.json names none (adapters saved by PEFT or PTPTrainer)."""
    if not checkpoints:
        raise ValueError("no checkpoints to compare; give checkpoint directories or folders of them")
    if unknown := [s for s in spaces if s not in SPACES]:
        raise ValueError(f"unknown space {unknown[0]!r}; use prompt, input or both")
    device = resolve_device(device)
    spec = spec.for_device(device)
    specs = {space: replace(spec, space=space, directions="gradient" if space == "input" else spec.directions)
             for space in spaces}  # input space has per-example gradient directions only
    loaded = [load_checkpoint(p).with_task(task) for p in checkpoints]
    check_one_loss([(str(c.path), c.meta.get("head")) for c in loaded])  # one kind of loss on every figure and table
    warn_identical(loaded)
    tasks = _tasks(loaded)  # every task loads before anything is written
    pairs = _seed_pairs(loaded) if connect is not None else []
    groups = [loaded] if spec.directions == "interp" else [[c] for c in loaded]
    clock = Clock(report, len(groups) * len(spaces) * spec.shape[0] * spec.shape[1], len(groups)) if report else None
    models = {}  # one backbone per model (checkpoints differ only in their params), all loaded before any writing
    for group in groups:
        key = _model_key(group[0].meta)
        if key not in models:
            own = tasks[group[0].meta["task"]]  # its label words, when the checkpoint does not record them
            models[key] = group[0].build_model(device, cache_dir=cache_dir, num_labels=own.num_labels,
                                               label_words=None if group[0].meta.get("label_words") else own.label_words)
    surfaces, rows = {}, []
    for index, group in enumerate(groups):
        checkpoint, meta = group[0], group[0].meta
        model, split = models[_model_key(meta)], tasks[meta["task"]].splits[spec.split]
        mine = {space: _surface(group, specs[space], Path(out), model, split, overwrite, progress,
                                clock.chunk if clock else None) for space in spaces}
        surfaces.update({(str(checkpoint.path), space): s for space, s in mine.items()})
        params = {k: v.to(model.device) for k, v in checkpoint.params.items()}
        rows.append({**_measure(model, params, split, mine, metrics, checkpoint), **_row_identity(mine)})
        if clock:
            clock.checkpoint_done(index)
    _label_groups(rows)
    groups_of = {row["checkpoint"]: row["group"] for row in rows}
    connections = [{**_connection(a, b, models[_model_key(a.meta)], tasks[a.meta["task"]], connect, Path(out),
                                  progress), "group": groups_of[str(a.path)]} for a, b in pairs]
    return Comparison(surfaces, rows, statistics(rows, connections=connections),
                      _metadata(rows, list(surfaces.values())), connections)


def warn_identical(checkpoints: list[Checkpoint]) -> None:
    """A warning naming every set of checkpoints that hold identical parameters (e.g. a ptp run whose regularizer
    never switched on equals the pt run of its seed): their rows measure one point twice."""
    by_hash: dict[str, list[str]] = {}
    for checkpoint in checkpoints:
        by_hash.setdefault(checkpoint.content_hash(), []).append(str(checkpoint.path))
    for paths in by_hash.values():
        if len(paths) > 1:
            warnings.warn(f"{' and '.join(paths)} hold identical parameters (content hash); their landscapes and "
                          "metrics are the same point measured twice - check that the runs trained what you meant")


def from_surfaces(paths: list[str | Path]) -> Comparison:
    """Saved surface files, with the metrics a surface alone gives (no model: no Hessian or sharpness).

    Surfaces that differ in their comparable identity (directions, normalization, grid, span, examples, split, task,
    ...) land in separate groups; a partly computed surface is measured over its points done and its row says so
    (`partial`, `partial_points`). Two surfaces of one checkpoint and space are refused: one row holds one of each."""
    surfaces, sources = {}, {}
    for path in paths:
        surface = load_surface(path)
        key = (surface.spec.get("checkpoint") or str(path), surface.spec.get("space") or "prompt")
        if key in sources:
            raise ValueError(f"{surface_paths(sources[key])[0]} and {surface_paths(path)[0]} are both the "
                             f"{key[1]}-space surface of {key[0]}; give one surface per checkpoint and space "
                             "(re-render the others in a separate --surface run)")
        surfaces[key], sources[key] = surface, path
    check_one_loss([(str(sources[key]), s.spec.get("head")) for key, s in surfaces.items()], "draw")
    rows, used = {}, {}
    for (checkpoint, space), s in surfaces.items():
        if min(s.shape) > 1 and s.points_done:
            used.setdefault(checkpoint, {})[space] = s
            row = rows.setdefault(checkpoint, metrics_row(checkpoint, s.spec.get("method") or "checkpoint",
                                                          s.spec.get("checkpoint_seed"), None,
                                                          settings={"basin_tau": MetricsConfig.basin_tau,
                                                                    "surface_examples": s.spec.get("examples")}))
            values = surface_metrics(s.alphas, s.betas, s.loss, s.accuracy)
            row.update(surface_topology(s, MetricsConfig.basin_tau, "" if space == "prompt" else "input_"))
            if space == "prompt":
                row.update({k: v for k, v in values.to_dict().items() if k not in ("radius", "tau", "points_used")})
            else:
                row.update(input_grid_sharpness=values.grid_sharpness,
                           input_curvature_eigenvalues=values.curvature_eigenvalues)
    rows = [{**row, **_row_identity(used[checkpoint])} for checkpoint, row in rows.items()]
    _label_groups(rows)
    return Comparison(surfaces, rows, statistics(rows), _metadata(rows, list(surfaces.values())))


def _row_identity(surfaces: dict[str, Surface]) -> dict:
    """`comparable` of a checkpoint's row from the surfaces it was measured on (prompt-space keys plain, another
    space's keys prefixed where they differ), `partial` and, when partial, `partial_points` ("prompt 12/25")."""
    identity: dict = {"spaces": sorted(surfaces)}
    for space in sorted(surfaces, key=lambda s: s != "prompt"):
        for key, value in comparable_identity(surfaces[space]).items():
            if key in ("space", "partial"):
                continue
            if key not in identity:
                identity[key] = value
            elif identity[key] != value:
                identity[f"{space}_{key}"] = value
    partial = {space: s for space, s in surfaces.items() if not s.is_complete}
    identity["partial"] = bool(partial)
    row = {IDENTITY: identity, "partial": bool(partial)}
    if partial:
        row["partial_points"] = ", ".join(f"{space} {s.points_done}/{s.loss.size}" for space, s in partial.items())
    return row


def _label_groups(rows: list[dict]) -> None:
    """row["group"]: the row's label in tables and figures (landscape.stats.row_groups)."""
    for row, group in zip(rows, row_groups(rows)):
        row["group"] = group.label


def _seed_pairs(checkpoints) -> list[tuple]:
    """Every pair of seeds within each method and comparable set (one task, model, head, prompt), checked to share
    one landscape before anything is computed."""
    by_method: dict[str, list] = {}
    for checkpoint in checkpoints:
        key = json.dumps([checkpoint.method_label, checkpoint_identity(checkpoint)], sort_keys=True, default=str)
        by_method.setdefault(key, []).append(checkpoint)
    pairs = [pair for group in by_method.values()
             for pair in itertools.combinations(sorted(group, key=lambda c: (c.meta.get("seed") is None,
                                                                             c.meta.get("seed") or 0)), 2)]
    for a, b in pairs:
        check_pair(a, b)
    return pairs


def _connection(a: Checkpoint, b: Checkpoint, model, task: Task, config: ConnectConfig, out: Path,
                progress: bool) -> dict:
    """connect.json of the pair: read when it was computed with this config, else computed and written. The
    folder it lies in is added under "folder" (the figure is drawn there by landscape.draw)."""
    path = out / "connect" / f"{surface_stem(a)}--{surface_stem(b)}"
    if (path / RESULT_FILE).exists():
        saved = json.loads((path / RESULT_FILE).read_text())
        if (saved.get("hash_a"), saved.get("hash_b"), saved.get("config")) == (
                a.content_hash(), b.content_hash(), to_json(asdict(config))):
            return {**saved, "folder": str(path)}
    result = connect_pair(a, b, model, config, task, progress)
    write_result(result, path)
    return {**to_json(result.to_dict()), "folder": str(path)}


def _model_key(meta: dict) -> tuple:
    """What one built model serves: checkpoints that agree on these differ only in their params."""
    return (meta["model"], meta["head"], tuple(meta.get("label_words") or ()), meta.get("template"),
            meta.get("prompt_type") or "shallow")


def _tasks(checkpoints: list[Checkpoint]) -> dict[str, Task]:
    """Each checkpoint's task by name, every one loaded (and refused) before anything is written."""
    tasks = {}
    for checkpoint in checkpoints:
        name = checkpoint.meta.get("task")
        if name not in tasks or not name:
            tasks[name] = checkpoint.task()
    return tasks


def _surface(group, spec: SurfaceSpec, out: Path, model, split, overwrite: bool, progress: bool,
             on_chunk=None) -> Surface:
    checkpoint = group[0]
    path = out / "surfaces" / f"{surface_stem(checkpoint)}-{spec.space}"
    if all(p.exists() for p in surface_paths(path)):
        held = load_surface(path).spec
        if held.get("checkpoint") != str(checkpoint.path) and held.get("checkpoint_hash") != checkpoint.content_hash():
            raise ValueError(f"{surface_paths(path)[0]} holds the surface of another checkpoint "
                             f"({held.get('checkpoint')}); give this comparison another --out")
    surface = compute_surface(group, spec, path, model=model, split=split, overwrite=overwrite,
                              progress=progress, on_chunk=on_chunk)
    identity = {k: v for k, v in checkpoint_identity(checkpoint).items()
                if surface.spec.get(k) != v and (k, v) != ("prompt_type", "shallow")}  # shallow: the grid's default
    if identity:  # the checkpoint's side of the surface's comparable identity, for re-rendering with --surface
        surface.spec.update(identity)
        save_surface(surface, path)
    if spec.space == "prompt" and spec.directions in ("pca", "interp") and checkpoint.trajectory is not None:
        surface.spec["trajectory"] = project_trajectory(surface, checkpoint.trajectory["prompts"].numpy(),
                                                       checkpoint.params["prompt"].numpy())
        save_surface(surface, path)  # re-rendering from --surface draws the path too
    return surface


def _measure(model, params, split, surfaces: dict[str, Surface], config: MetricsConfig, checkpoint) -> dict:
    meta, scores = checkpoint.meta, checkpoint.meta.get("metrics") or {}
    task_scores = {f"test_{key}": scores[f"test_{key}"] for key in METRIC_KEYS.get(meta.get("metric", "accuracy"), ())
                   if f"test_{key}" in scores}  # the benchmark's metric beside test accuracy: test_f1, test_mcc, ...
    if checkpoint.generation:  # --head lm: its test scores over target tokens (beside a rank-classification accuracy)
        task_scores.update({f"test_{key}": scores[f"test_{key}"] for key in LM_TEST_KEYS if f"test_{key}" in scores})
    row = measure(model, params, split, surfaces.get("prompt"), config, str(checkpoint.path),
                  checkpoint.method_label, meta.get("seed"), scores.get("test_accuracy"),
                  surfaces.get("input"), task_scores)
    row["settings"]["test_examples"] = scores.get("test_n")  # the n of test_accuracy (ptp.json), not a metric
    if checkpoint.generation and meta.get("generation"):
        row["test_accuracy_reason"] = ("a generation task has no classes to be accurate on: its test score is "
                                       "test_token_accuracy")
    return row


def _metadata(rows: list[dict], surfaces: list[Surface] = ()) -> dict:
    """The settings every row shares (and the direction seed, when one), and under "groups" each group's own
    settings (where the rows differ)."""
    identities = {row["group"]: row[IDENTITY] for row in rows} or {s.method: comparable_identity(s) for s in surfaces}
    keys = list(dict.fromkeys(k for identity in identities.values() for k in identity))
    shared = [k for k in keys if len({json.dumps(i.get(k), sort_keys=True, default=str)
                                      for i in identities.values()}) == 1]
    first = next(iter(identities.values()), {})
    metadata = {k: first.get(k) for k in shared}
    if any(is_generation(identity.get("head")) for identity in identities.values()):
        metadata["loss"] = f"{TOKEN_LOSS} over the target tokens (PEFT's labels loss); accuracy: {TOKEN_ACCURACY}"
    if len(shared) < len(keys):
        metadata["groups"] = {label: {k: v for k, v in identity.items() if k not in shared}
                              for label, identity in identities.items()}
    if len(seeds := {s.spec.get("seed") for s in surfaces}) == 1:
        metadata["seed"] = seeds.pop()
    checkpoints = [row["checkpoint"] for row in rows] + [str(s.spec.get("checkpoint")) for s in surfaces]
    return {**metadata, "checkpoints": sorted(set(checkpoints)), "date": date.today().isoformat()}
