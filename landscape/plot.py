"""`python -m landscape.plot CKPT_OR_FOLDER [...] --out DIR`: surfaces, metrics, figures and a report.

Computes (or reuses) one surface per checkpoint and space, the metrics rows and tables, and
draws the comparison figures. `--surface FILE.npz [...]` re-renders saved surfaces without a model.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from landscape import render
from landscape.surface import Surface, load_surface, save_surface
from ptp_core.io import write_text

FIGURES = ("landscape_3d", "contour", "profiles", "difference")


@dataclass
class PlotConfig:
    out: Path
    spaces: tuple[str, ...] = ("prompt",)
    style: str = "paper"
    zmin: float | None = None
    zmax: float | None = None
    cmap: str = "viridis"

    def __post_init__(self):
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a directory")
        if self.style not in render.STYLES:
            raise ValueError(f"unknown --style {self.style!r}; use one of {', '.join(render.STYLES)}")
        if self.zmin is not None and self.zmax is not None and not self.zmin < self.zmax:
            raise ValueError(f"--zmin {self.zmin} must be below --zmax {self.zmax}")


def find_checkpoints(paths: list[str]) -> list[Path]:
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


def label(meta: dict, path: Path) -> str:
    return f"{meta.get('method', path.name)}-seed{meta['seed']}" if meta.get("seed") is not None else path.name


def by_method(surfaces: list[Surface]) -> dict[str, list[Surface]]:
    groups: dict[str, list[Surface]] = defaultdict(list)
    for surface in surfaces:
        groups[surface.spec.get("method") or "checkpoint"].append(surface)
    for group in groups.values():
        group.sort(key=lambda s: (s.spec.get("checkpoint_seed") is None, s.spec.get("checkpoint_seed") or 0))
    return dict(groups)


def draw(surfaces: list[Surface], rows: list[dict], config: PlotConfig, metadata: dict) -> list[Path]:
    """Write every figure and report.html for the surfaces (one list per space) into config.out."""
    from landscape.report import report_html

    written, report_surfaces, trajectories = [], {}, {}
    sharpness = {r["method"]: r.get("grid_sharpness") for r in rows if r.get("grid_sharpness") is not None}
    two_d = [s for s in surfaces if min(s.shape) > 1]
    for space in dict.fromkeys(s.spec.get("space", "prompt") for s in surfaces):
        groups = by_method([s for s in surfaces if s.spec.get("space", "prompt") == space])
        first = {m: g[0] for m, g in groups.items()}  # the representative seed of each method
        suffix = "" if space == "prompt" else f"_{space}"
        style = dict(style=config.style)
        figures = {"profiles": render.profiles(groups, **style)}
        if all(min(s.shape) > 1 for s in first.values()):
            limits = dict(zmin=config.zmin, zmax=config.zmax, cmap=config.cmap)
            figures["landscape_3d"] = render.landscape_3d(first, {m: sharpness.get(m) for m in first}, **style,
                                                          **limits)
            paths = {m: s.spec["trajectory"] for m, s in first.items() if s.spec.get("trajectory")}
            figures["contour"] = render.contour(first, paths or None, **style, **limits)
            trajectories.update({f"{m} ({space})": p for m, p in paths.items()})
        pair = [s for g in groups.values() for s in g]
        if len(pair) == 2 and min(pair[0].shape) > 1 and _shared_directions(*pair):
            names = [s.spec.get("method") or "a" for s in pair]
            figures["difference"] = render.difference(pair[0], pair[1], label_a=names[0], label_b=names[1], **style)
        for name, figure in figures.items():
            written += render.save_figure(figure, config.out / f"{name}{suffix}")
        report_surfaces.update({f"{m} ({space})": s for m, s in first.items() if min(s.shape) > 1})
    if two_d:
        from landscape.stats import compare_methods, summarize

        tables = {"Per checkpoint": [_brief(r) for r in rows]}
        if rows:
            tables["Per method: mean, std, 95% bootstrap CI"] = [asdict(s) for s in summarize(rows)]
            tables["Between methods: Welch t, Mann-Whitney U, effect sizes"] = [asdict(t) for t in compare_methods(rows)]
        html = report_html(report_surfaces, tables, metadata, zmin=config.zmin, zmax=config.zmax,
                           trajectories=trajectories or None)
        written.append(write_text(config.out / "report.html", html))
    return written


def _shared_directions(a: Surface, b: Surface) -> bool:
    """True when both surfaces were computed on the very same direction arrays (e.g. random, --norm none)."""
    import numpy as np

    return a.direction_1 is not None and b.direction_1 is not None and a.direction_1.shape == b.direction_1.shape \
        and np.array_equal(a.direction_1, b.direction_1) and np.array_equal(a.direction_2, b.direction_2)


def _brief(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("cost", "settings", "flat_radius")}


def project_trajectory(surface: Surface, prompts, center) -> list[list[float]]:
    """Training snapshots (S, P, D) around the trained prompt center (P, D) as (alpha, beta) in the
    surface's plane: least squares on d1, d2."""
    import numpy as np

    basis = np.stack([surface.direction_1.ravel(), surface.direction_2.ravel()], axis=1)  # (P*D, 2)
    offsets = (prompts - center).reshape(len(prompts), -1).T  # (P*D, S)
    coords, *_ = np.linalg.lstsq(basis, offsets, rcond=None)  # (2, S)
    return coords.T.round(6).tolist()


def compute(checkpoints: list[Path], spec_args: dict, metrics_config, config: PlotConfig, device: str,
            cache_dir: Path | None, overwrite: bool, progress: bool) -> tuple[list[Surface], list[dict]]:
    """Surfaces (one per checkpoint and space, cached under OUT/surfaces/) and metrics rows."""
    from landscape.grid import SurfaceSpec, compute_surface
    from landscape.measure import measure
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.data import load_task

    loaded = [load_checkpoint(p) for p in checkpoints]
    models, tasks, surfaces, rows = {}, {}, [], []
    groups = [loaded] if spec_args.get("directions") == "interp" else [[c] for c in loaded]
    for group in groups:
        ckpt = group[0]
        meta = ckpt.meta
        key = (meta["model"], meta["head"], tuple(meta.get("label_words") or ()), meta.get("template"))
        if key not in models:  # one backbone per model: checkpoints differ only in their params
            models[key] = ckpt.build_model(device, cache_dir=cache_dir)
        model = models[key]
        if meta.get("task") not in tasks:
            if not meta.get("task"):
                raise ValueError(f"{ckpt.path} does not name its task in ptp.json")
            tasks[meta["task"]] = load_task(meta["task"], label_words=meta.get("label_words"),
                                            label_names=meta.get("label_names"))
        examples = tasks[meta["task"]].splits[spec_args.get("split", "test")]
        by_space = {}
        for space in config.spaces:
            spec = SurfaceSpec(**{**spec_args, "space": space,
                                  "directions": "gradient" if space == "input" else spec_args["directions"]})
            path = config.out / "surfaces" / f"{label(meta, ckpt.path)}-{space}"
            surface = compute_surface(group, spec, path, model=model, examples=examples, overwrite=overwrite,
                                      progress=progress)
            if spec.directions in ("pca", "interp") and ckpt.trajectory is not None and space == "prompt":
                surface.spec["trajectory"] = project_trajectory(surface, ckpt.trajectory["prompts"].numpy(),
                                                               ckpt.params["prompt"].numpy())
                save_surface(surface, path)  # re-rendering from --surface draws the path too
            by_space[space] = surface
        surfaces += by_space.values()
        params = {k: v.to(model.device) for k, v in ckpt.params.items()}
        rows.append(measure(model, params, examples, by_space.get("prompt"), metrics_config, str(ckpt.path),
                            meta.get("method", "checkpoint"), meta.get("seed"),
                            (meta.get("metrics") or {}).get("test_accuracy"), by_space.get("input")))
    return surfaces, rows


def main(argv: list[str] | None = None) -> list[Path]:
    from ptp_core import cli

    p = cli.parser("python -m landscape.plot", "Loss-landscape figures, metrics and an HTML report for checkpoints.")
    p.add_argument("checkpoints", nargs="*", help="checkpoint directories or folders of them (e.g. runs/)")
    p.add_argument("--out", default=None, help="output directory (default figures/<first checkpoint name>)")
    p.add_argument("--surface", nargs="+", default=None, help="re-render saved surface files; no model needed")
    p.add_argument("--space", default="prompt", choices=("prompt", "input", "both"))
    p.add_argument("--directions", default="gradient", choices=("gradient", "random", "interp", "pca", "hessian"))
    p.add_argument("--norm", default="filter", choices=("filter", "layer", "none"))
    p.add_argument("--grid", default="21", help="points per axis: 21 (21x21) or 21x31")
    p.add_argument("--span", type=float, default=1.0)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--split", default="test")
    p.add_argument("--params", default="prompt", choices=("prompt", "all"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--chunk", type=int, default=None, help="grid points per forward (default: from free memory)")
    p.add_argument("--metrics", default="surface,hessian,trace,sharpness,input",
                   help="comma-separated subset of surface,hessian,trace,sharpness,input ('surface' is free)")
    p.add_argument("--metric-examples", type=int, default=32, help="examples for the model-based metrics")
    p.add_argument("--style", default="paper", choices=("paper", "slides"))
    p.add_argument("--zmin", type=float, default=None)
    p.add_argument("--zmax", type=float, default=None)
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="recompute surfaces whose spec changed")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    args = p.parse_args(argv)
    if not args.checkpoints and not args.surface:
        raise ValueError("give checkpoint directories (or folders of them) or --surface FILE.npz")
    first = Path(args.checkpoints[0] if args.checkpoints else args.surface[0])
    out = Path(args.out) if args.out else Path("figures") / first.name.removesuffix(".npz")
    spaces = ("prompt", "input") if args.space == "both" else (args.space,)
    config = PlotConfig(out, spaces, args.style, args.zmin, args.zmax, args.cmap)
    started = time.time()
    if args.surface:
        surfaces = [load_surface(path) for path in args.surface]
        rows = _surface_rows(surfaces)
    else:
        from landscape.grid import SurfaceSpec
        from landscape.measure import MetricsConfig

        grid = args.grid if "x" in args.grid else f"{args.grid}x{args.grid}"
        spec_args = dict(directions=args.directions, norm=args.norm, grid=grid, span=args.span,
                         examples=args.examples, split=args.split, params=args.params, seed=args.seed,
                         dtype=args.dtype, chunk=args.chunk)
        SurfaceSpec(**spec_args)  # bad values fail here, before any model loads
        metrics_config = MetricsConfig(tuple(m for m in args.metrics.split(",") if m), args.metric_examples,
                                       params=args.params, seed=args.seed)
        checkpoints = find_checkpoints(args.checkpoints)
        cli.quiet_transformers()
        config.out.mkdir(parents=True, exist_ok=True)
        surfaces, rows = compute(checkpoints, spec_args, metrics_config, config, cli.auto_device(args.device),
                                 cli.cache_dir(), args.overwrite, args.progress)
    config.out.mkdir(parents=True, exist_ok=True)
    from landscape.stats import write_tables

    written = list(write_tables(rows, config.out).values()) if rows else []
    written += draw(surfaces, rows, config, _metadata(surfaces))
    print(_summary(rows))
    print(f"wrote {len(written)} files to {config.out} in {time.time() - started:.0f} s")
    return written


def _surface_rows(surfaces: list[Surface]) -> list[dict]:
    """Surface-only metrics rows for re-rendering (no model: no Hessian or sharpness estimators)."""
    from landscape.metrics import metrics_row, surface_metrics

    rows = []
    for s in surfaces:
        if s.spec.get("space", "prompt") == "prompt" and min(s.shape) > 1 and s.points_done:
            rows.append(metrics_row(s.spec.get("checkpoint", ""), s.spec.get("method") or "checkpoint",
                                    s.spec.get("checkpoint_seed"), None,
                                    surface_metrics(s.alphas, s.betas, s.loss, s.accuracy)))
    return rows


def _metadata(surfaces: list[Surface]) -> dict:
    spec = surfaces[0].spec if surfaces else {}
    return {"model": spec.get("model"), "task": spec.get("task"), "directions": spec.get("directions"),
            "normalization": spec.get("normalization"), "seed": spec.get("seed"), "split": spec.get("split"),
            "examples": spec.get("examples"), "grid": "x".join(str(n) for n in surfaces[0].shape) if surfaces else "",
            "checkpoints": sorted({str(s.spec.get("checkpoint")) for s in surfaces}), "date": date.today().isoformat()}


def _summary(rows: list[dict]) -> str:
    keys = ("method", "seed", "test_accuracy", "center_loss", "grid_sharpness", "hessian_eigenvalues",
            "worst_case_sharpness", "input_worst_case_sharpness")
    lines = ["  ".join(f"{k:>14}" for k in keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k)
            v = v[0] if isinstance(v, list) and v else v
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    from ptp_core.cli import run

    run(main)
