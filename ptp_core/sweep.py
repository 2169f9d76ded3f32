"""Multi-seed sweeps: every method x seed, resumable, spread over torchrun ranks; the stability summary.

    python -m ptp_core.sweep --methods pt,ptp-rn,ptp-adv --seeds 0,1,2,3,4 --out runs/ [training flags]
    torchrun --nproc_per_node 2 -m ptp_core.sweep ...   # run i on rank i % world; gloo, works on CPU

Runs land in OUT/<method>/seed<k>/; a run whose ptp.json says status "complete" is skipped, so the
same command resumes an interrupted sweep. OUT/summary.csv and OUT/summary.md answer the PTP
paper's question per method: test accuracy (mean, std, min, max over seeds), best validation
accuracy, the seed spread of the validation-accuracy curve over training, and the mean and std of the
task's own metric (CB macro-F1, MRPC F1, CoLA MCC, MultiRC F1a and EM) when it has one. A --head lm sweep also
gives the test loss (the token-mean cross-entropy), and its accuracy is what its runs select on: rank
classification on a classification task, token accuracy on a generation task; the summary names which.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from io import StringIO
from pathlib import Path

import torch.distributed as dist

from ptp_core import cli
from ptp_core.checkpoint import META
from ptp_core.io import write_text
from ptp_core.tasks.metrics import METRIC_KEYS
from ptp_core.train import TrainConfig, add_arguments, config_from_args, train
from ptp_core.training.config import METHODS, schedule_note
from ptp_core.training.evaluation import COLLAPSE_TOLERANCE

SUMMARY_COLUMNS = ("method", "runs", "test_accuracy_mean", "test_accuracy_std", "test_accuracy_min",
                   "test_accuracy_max", "best_validation_accuracy_mean", "best_validation_accuracy_std",
                   "validation_curve_seed_std_mean", "validation_curve_seed_std_final", "collapsed")
# --head lm: which accuracy a run's test_accuracy and validation curve are, and the token-mean loss (nats, not %)
LM_COLUMNS = ("accuracy_kind", "test_loss_mean", "test_loss_std")
ACCURACY_NAMES = {"class": "acc", "rank": "rank acc", "token": "token acc"}
ACCURACY_NOTES = {
    "rank": "--head lm on a classification task: acc is rank classification (the label whose target text is most "
            "likely); loss is the mean cross-entropy over the target tokens",
    "token": "--head lm on a generation task: acc is the token accuracy (the greedy next token right, teacher-forced, "
             "over all target tokens); loss is the mean cross-entropy over the target tokens",
}


def run_dir(out: Path, method: str, seed: int) -> Path:
    return Path(out) / method / f"seed{seed}"


def read_meta(path: Path) -> dict | None:
    """A run's ptp.json, or None when the run is missing or was cut off before it was written."""
    try:
        return json.loads((path / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(path: Path) -> bool:
    meta = read_meta(path)
    return meta is not None and meta.get("status") == "complete"


def run_sweep(base: TrainConfig, methods: list[str], seeds: list[int], out: str | Path, rank: int = 0,
              world: int = 1) -> list[dict]:
    """Train this rank's share of seeds x methods (run i on rank i % world); return what happened to each.

    Seed-major order: a sweep stopped early holds every method for the seeds it finished.
    """
    done = []
    for i, (seed, method) in enumerate((s, m) for s in seeds for m in methods):
        if i % world != rank:
            continue
        path = run_dir(Path(out), method, seed)
        if is_complete(path):
            done.append({"method": method, "seed": seed, "path": str(path), "status": "skipped"})
            continue
        try:  # overwrite: whatever is there is an unfinished run of this same cell
            train(replace(base, method=method, seed=seed, out=str(path), overwrite=True))
            status = "trained"
        except ValueError as error:  # a diverged run is saved with its reason; the sweep goes on
            if read_meta(path) is None:
                raise
            status = str(error)
        done.append({"method": method, "seed": seed, "path": str(path), "status": status})
    return done


def _std(values: list[float]) -> float:
    """Sample standard deviation across seeds (ddof=1); NaN for a single seed."""
    return statistics.stdev(values) if len(values) > 1 else math.nan


def accuracy_kind(meta: dict) -> str:
    """What a run's accuracy is: "class" (a classifier or verbalizer), "rank" (--head lm on a classification task:
    rank classification) or "token" (--head lm on a generation task: teacher-forced token accuracy)."""
    metrics = meta.get("metrics", {})
    if "test_accuracy" not in metrics and "test_token_accuracy" in metrics:
        return "token"
    return "rank" if meta.get("head") == "lm" else "class"


def test_accuracy(meta: dict) -> float:
    """The test accuracy of the kind the run selected on (accuracy_kind)."""
    metrics = meta["metrics"]
    return metrics["test_token_accuracy"] if accuracy_kind(meta) == "token" else metrics["test_accuracy"]


def validation_curve(meta: dict) -> dict[int, float]:
    """{step: validation accuracy} from a run's log."""
    return {row["step"]: row["validation_accuracy"] for row in meta.get("log", []) if "validation_accuracy" in row}


def summarize_runs(out: str | Path, methods: list[str], seeds: list[int]) -> list[dict]:
    """One row per method over its complete runs (see SUMMARY_COLUMNS)."""
    rows = []
    for method in methods:
        metas = [m for m in (read_meta(run_dir(Path(out), method, s)) for s in seeds)
                 if m is not None and m.get("status") == "complete"]
        row = {"method": method, "runs": len(metas)}
        if metas:
            test = [test_accuracy(m) for m in metas]
            valid = [m["metrics"]["best_validation_accuracy"] for m in metas  # None: a run that used no validation
                     if m["metrics"]["best_validation_accuracy"] is not None]
            curves = [validation_curve(m) for m in metas]
            steps = sorted(set.intersection(*(set(c) for c in curves)))  # evaluated by every seed
            spread = [_std([c[s] for c in curves]) for s in steps]
            row.update(collapsed=sum(bool(m["metrics"].get("collapsed")) for m in metas),
                       test_accuracy_mean=statistics.fmean(test), test_accuracy_std=_std(test),
                       test_accuracy_min=min(test), test_accuracy_max=max(test),
                       best_validation_accuracy_mean=statistics.fmean(valid) if valid else math.nan,
                       best_validation_accuracy_std=_std(valid),
                       validation_curve_seed_std_mean=statistics.fmean(spread) if spread else math.nan,
                       validation_curve_seed_std_final=spread[-1] if spread else math.nan)
        rows.append({**{k: row.get(k, 0 if k == "collapsed" else math.nan) for k in SUMMARY_COLUMNS},
                     **lm_summary(metas), **task_metric_summary(metas)})
    return rows


def lm_summary(metas: list[dict]) -> dict:
    """--head lm runs: their accuracy_kind, the test loss's mean and std (ddof=1) over runs, and collapsed None (a
    token loss has no label prior to compare with: not measured). Other runs: {}."""
    if not metas or metas[0].get("head") != "lm":
        return {}
    losses = [m["metrics"]["test_loss"] for m in metas]
    return {"collapsed": None, "accuracy_kind": accuracy_kind(metas[0]), "test_loss_mean": statistics.fmean(losses),
            "test_loss_std": _std(losses)}


def task_metric_summary(metas: list[dict]) -> dict[str, float]:
    """test_<key>_mean and test_<key>_std (ddof=1) over runs of the task's metric keys (ptp.json's "metric")."""
    keys = METRIC_KEYS.get(metas[0].get("metric", "accuracy"), ()) if metas else ()
    out = {}
    for key in keys:
        values = [m["metrics"][f"test_{key}"] for m in metas if f"test_{key}" in m["metrics"]]
        out.update({f"test_{key}_mean": statistics.fmean(values) if values else math.nan,
                    f"test_{key}_std": _std(values)})
    return out


def summary_columns(rows: list[dict]) -> list[str]:
    """SUMMARY_COLUMNS, then the task metric's columns that any row has."""
    return list(dict.fromkeys([*SUMMARY_COLUMNS, *(k for r in rows for k in r)]))


def collapsed_runs(out: str | Path, methods: list[str], seeds: list[int]) -> list[str]:
    """'method seed K' for every complete run whose last validation loss sat on the label prior's entropy."""
    return [f"{method} seed {seed}" for seed in seeds for method in methods
            if (meta := read_meta(run_dir(Path(out), method, seed))) and meta.get("status") == "complete"
            and meta["metrics"].get("collapsed")]


def summary_markdown(rows: list[dict], collapsed: list[str] = ()) -> str:
    """The summary as a markdown table (accuracies in %, losses in nats, std over seeds with ddof=1), then what the
    accuracy is (--head lm) and the collapsed runs."""
    def missing(value):
        return value is None or (isinstance(value, float) and math.isnan(value))

    def cell(key, value):
        if missing(value):
            return "n/a"
        return f"{value:.4f}" if key.startswith("test_loss") else f"{100 * value:.2f}"

    kinds = [r["accuracy_kind"] for r in rows if isinstance(r.get("accuracy_kind"), str)]
    kind = kinds[0] if kinds else "class"
    acc = ACCURACY_NAMES[kind]
    extra = [k for k in summary_columns(rows)[len(SUMMARY_COLUMNS):] if k != "accuracy_kind"]  # loss, task metric
    names = [k.removeprefix("test_").replace("_mean", " mean").replace("_std", " std") for k in extra]
    lines = [f"| method | runs | test {acc} mean | std | min | max | best val {acc} mean | std | "
             "val-curve seed std (mean over steps) | (final) | collapsed to the constant predictor |"
             + "".join(f" test {name} |" for name in names),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['runs']} | " + " | ".join(cell(k, r[k]) for k in SUMMARY_COLUMNS[2:-1])
                     + f" | {'n/a' if missing(r['collapsed']) else r['collapsed']} |"
                     + "".join(f" {cell(k, r.get(k))} |" for k in extra))
    lines.append("")
    if kind in ACCURACY_NOTES:
        lines.append(ACCURACY_NOTES[kind] + ".")
    measured = [r for r in rows if not missing(r["collapsed"])]
    if len(measured) < len(rows):
        lines.append("Collapse to the constant predictor is not measured for --head lm (a token loss has no label "
                     "prior to compare with).")
    if measured:
        lines.append(f"Collapsed to the constant predictor (last validation loss within {COLLAPSE_TOLERANCE} nats of "
                     f"the label prior's entropy): {sum(r['collapsed'] for r in measured)} of "
                     f"{sum(r['runs'] for r in measured)} runs" + (f": {', '.join(collapsed)}." if collapsed else "."))
    return "\n".join(lines) + "\n"


def write_summary(out: str | Path, rows: list[dict], collapsed: list[str] = ()) -> tuple[Path, Path]:
    """OUT/summary.csv and OUT/summary.md, each written to a temp file and renamed into place."""
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=summary_columns(rows), restval=math.nan, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(Path(out) / "summary.csv", buffer.getvalue()), \
        write_text(Path(out) / "summary.md", summary_markdown(rows, collapsed))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.parser("python -m ptp_core.sweep", "Train every method x seed; summarize accuracy and seed spread.")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", required=True, help="runs go to OUT/<method>/seed<k>/")
    add_arguments(p)
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods or not args.seeds:
        raise ValueError(f"--methods {','.join(args.methods)} / --seeds: give methods from {', '.join(METHODS)} "
                         "and at least one seed" + (cli.did_you_mean(unknown[0], METHODS) if unknown else ""))
    cli.quiet_transformers()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.device = cli.auto_device(args.device)
    if str(args.device).startswith("cuda") and world > 1:  # cuda or cuda:N: one GPU per local rank
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    base = config_from_args(args, out=args.out)  # validates every flag before any run starts
    for note in dict.fromkeys(schedule_note(replace(base, method=m)) for m in args.methods):  # each ptp-* alike
        if note:
            print(f"note: {note}", file=sys.stderr)
    if world > 1:  # a barrier only: each rank trains on its own; runs can take hours, hence the long timeout
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    started = time.time()
    done = run_sweep(base, args.methods, args.seeds, args.out, rank, world)
    for item in done:
        learned_nothing = (read_meta(Path(item["path"])) or {}).get("metrics", {}).get("collapsed")
        print(f"rank {rank}: {item['method']} seed {item['seed']}: {item['status']} ({item['path']})"
              + (", collapsed to the constant predictor" if learned_nothing else ""), flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        rows = summarize_runs(args.out, args.methods, args.seeds)
        collapsed = collapsed_runs(args.out, args.methods, args.seeds)
        csv_path, md_path = write_summary(args.out, rows, collapsed)
        print(summary_markdown(rows, collapsed), end="")
        print(f"wrote {csv_path} and {md_path} ({time.time() - started:.0f} s)")
        if collapsed:
            runs = sum(row["runs"] for row in rows if row["collapsed"] is not None)
            print(f"warning: {len(collapsed)} of {runs} runs learned nothing (collapsed to the constant predictor: "
                  f"{', '.join(collapsed)}); see the collapsed column of {csv_path}; try other seeds, a lower --lr, "
                  "more --steps or, for ptp-*, a longer --reg-warmup", file=sys.stderr)
    cli.end_distributed()
    return done


if __name__ == "__main__":
    cli.run(main)
