"""The GPU check: CUDA-only checks and the benchmark in one command; writes one JSON and a Markdown table.

    python bench/gpu.py --out bench/gpu-results            # on a CUDA machine: under 10 minutes on one H100
    python bench/gpu.py --device cpu --quick --out /tmp/g  # a smoke run of the same code on a CPU

Checks: a bf16 surface against float32 (max |loss difference| within BF16_TOLERANCE of the loss scale), the
out-of-memory back-off (a chunk far too large must shrink and give the same numbers), torchrun with NCCL on
the GPUs present (two ranks' surface == one process's), and PTP-ADV training steps in bf16. Benchmark: a 51x51
prompt-space surface on 512 test examples for smollm2 (verbalizer) and minilm (classifier), dtype auto:
seconds for the whole grid, points/s, and model FLOP/s as a fraction of a bf16 matmul's measured throughput.
Every check runs even if another fails; each records its error instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
BF16_TOLERANCE = 0.01  # max |L_bf16 - L_fp32| / max L_fp32 over the grid


def _model(name: str, head: str, device: str):
    from ptp_core.model.backbones import load_backbone
    from ptp_core.model.prompt_model import PromptModel
    from ptp_core.tasks.load import load_task

    task = load_task("rotten_tomatoes")
    model = PromptModel(load_backbone(name, head, task.num_labels, device), head, task.num_labels, task.label_words,
                        task.template if head == "verbalizer" else "{text}")
    return model.with_params(model.init_params(20, "vocab", torch.Generator().manual_seed(0))), task


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_bf16_surface(device: str, quick: bool) -> dict:
    from landscape.grid.driver import surface_for_params
    from landscape.grid.spec import SurfaceSpec

    model, task = _model("minilm", "classifier", device)
    spec = dict(grid="5", examples=32 if quick else 128, span=1.0, directions="random")
    exact = surface_for_params(model, dict(model.params), task.splits["test"], SurfaceSpec(**spec, dtype="float32"),
                               progress=False)
    fast = surface_for_params(model, dict(model.params), task.splits["test"], SurfaceSpec(**spec, dtype="bfloat16"),
                              progress=False)
    deviation = float(np.abs(fast.loss - exact.loss).max() / np.abs(exact.loss).max())
    return {"ok": deviation <= BF16_TOLERANCE, "relative_max_deviation": deviation, "tolerance": BF16_TOLERANCE}


def check_oom_backoff(device: str, quick: bool) -> dict:
    """A chunk of every grid point at once on 512 examples: on a GPU it must hit out-of-memory and back off."""
    from landscape.grid import evaluate as grid
    from landscape.grid.directions import prompt_directions
    from ptp_core.model.encoding import batch_split

    model, task = _model("minilm", "classifier", device)
    examples = task.splits["test"].head(64 if quick else 512)
    batches, order = batch_split(model, examples, 512, by_length=True)  # one batch of every example: a big forward
    directions = prompt_directions(model, dict(model.params), batches, "random", "filter", 0)
    points = 16 if quick else 4096
    alphas = torch.linspace(-1, 1, points, device=device)
    betas = torch.zeros(points, device=device)

    def evaluate(a, b):
        return grid.evaluate_points(model, batches, order, a, b, directions, dtype=torch.bfloat16)

    cap = grid.MemoryCap(points)
    loss, _ = grid.evaluate_chunk(evaluate, alphas, betas, cap)
    reference, _ = evaluate(alphas[:2], betas[:2])
    same = float(np.abs(loss[:2] - reference).max())
    return {"ok": same < 1e-3 and (quick or cap.points < points), "start_points": points, "cap_after": cap.points,
            "max_abs_diff_vs_small_chunk": same}


def check_torchrun_nccl(device: str, quick: bool, work: Path) -> dict:
    from landscape.surface import load_surface
    from ptp_core.checkpoint import save_checkpoint

    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    if gpus < 1:
        return {"ok": None, "skipped": "no CUDA device"}
    model, task = _model("minilm", "classifier", device)
    meta = {"model": "minilm", "head": "classifier", "task": "rotten_tomatoes", "num_labels": 2, "method": "pt",
            "seed": 0, "template": "{text}", "label_words": task.label_words, "label_names": task.label_names}
    checkpoint = save_checkpoint(work / "ckpt", dict(model.params), meta)
    flags = ["--grid", "9", "--examples", "64", "--chunk", "7", "--no-progress", "--device", "cuda", "--dtype",
             "float32"]
    ranks = max(2, gpus)  # two ranks may share one GPU: NCCL still runs (one communicator per rank)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = {}
    for name, command in (("one", [sys.executable, "-m", "landscape.grid"]),
                          ("ranks", [str(torchrun), "--standalone", f"--nproc_per_node={min(ranks, gpus)}",
                                     "-m", "landscape.grid"])):
        result = subprocess.run(command + [str(checkpoint), "--out", str(work / name)] + flags, capture_output=True,
                                text=True, env=env, cwd=ROOT, timeout=300)
        if result.returncode != 0:
            return {"ok": False, "failed": name, "stderr": result.stderr[-1500:]}
        out[name] = load_surface(work / name)
    diff = float(np.abs(out["one"].loss - out["ranks"].loss).max())
    return {"ok": diff < 1e-4, "gpus": gpus, "ranks": min(ranks, gpus), "max_abs_diff": diff,
            "note": "one GPU: a single rank under torchrun (NCCL needs distinct GPUs per rank)" if gpus == 1 else ""}


def check_bf16_training(device: str, quick: bool, work: Path) -> dict:
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.train import TrainConfig, train

    steps = 4 if quick else 30
    started = time.perf_counter()
    out = train(TrainConfig(model="minilm", method="ptp-adv", steps=steps, eval_every=steps, eval_examples=64,
                            test_examples=64, device=device, dtype="bfloat16", out=str(work / "train"),
                            progress=False, overwrite=True))
    meta = load_checkpoint(out).meta
    losses = [row["loss"] for row in meta["log"] if "loss" in row]
    return {"ok": meta["status"] == "complete" and all(np.isfinite(losses)), "steps": steps,
            "seconds_per_step": (time.perf_counter() - started) / steps, "compute_dtype": meta["compute_dtype"]}


def benchmark(name: str, head: str, device: str, quick: bool, peak: float) -> dict:
    from grid import model_flops_per_point

    from landscape.grid.driver import surface_for_params
    from landscape.grid.spec import SurfaceSpec
    from ptp_core.model.encoding import batch_split

    model, task = _model(name, head, device)
    grid_size, examples = (5, 16) if quick else (51, 512)
    spec = SurfaceSpec(grid=str(grid_size), examples=examples, directions="random", dtype="auto", batch_size=64)
    warm = SurfaceSpec(grid="3", examples=examples, directions="random", dtype="auto", batch_size=64)
    surface_for_params(model, dict(model.params), task.splits["test"], warm, progress=False)  # kernels, allocator
    _sync(device)
    started = time.perf_counter()
    surface = surface_for_params(model, dict(model.params), task.splits["test"], spec, progress=False)
    _sync(device)
    seconds = time.perf_counter() - started
    batches, _ = batch_split(model, task.splits["test"].head(examples), 64, by_length=True)
    flops = model_flops_per_point(model, batches, 20) * grid_size ** 2
    return {"model": name, "head": head, "grid": f"{grid_size}x{grid_size}", "examples": examples,
            "dtype": surface.spec["dtype"], "seconds": seconds, "points_per_s": grid_size ** 2 / seconds,
            "model_tflops": flops / seconds / 1e12, "fraction_of_bf16_matmul": flops / seconds / peak}


def markdown(results: dict) -> str:
    lines = [f"GPU check, {results['date']}, {results['device']} (torch {results['torch']}), "
             f"bf16 matmul {results['bf16_matmul_tflops']:.0f} TFLOP/s measured", "",
             "| check | ok | details |", "|---|---|---|"]
    for name, check in results["checks"].items():
        details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()
                            if k not in ("ok", "trace", "stderr"))
        lines.append(f"| {name} | {check.get('ok')} | {details} |")
    lines += ["", "| model | grid | examples | dtype | seconds | points/s | model TFLOP/s | of bf16 matmul |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["benchmark"]:
        if "error" in row:
            lines.append(f"| {row['model']} | error: {row['error']} | | | | | | |")
            continue
        lines.append(f"| {row['model']} ({row['head']}) | {row['grid']} | {row['examples']} | {row['dtype']} | "
                     f"{row['seconds']:.1f} | {row['points_per_s']:.1f} | {row['model_tflops']:.1f} | "
                     f"{row['fraction_of_bf16_matmul']:.0%} |")
    return "\n".join(lines) + "\n"


def _guard(function, *args) -> dict:
    try:
        return function(*args)
    except Exception as error:  # a failed check is a result too; the next one still runs
        return {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                "trace": traceback.format_exc()[-2000:]}


def main(argv: list[str] | None = None) -> dict:
    from grid import matmul_flops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/gpu-results", help="folder for gpu.json and gpu.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script itself")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run this on a GPU machine (or --device cpu --quick for a smoke run)",
              file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ptp_core.cli import quiet_transformers

    quiet_transformers()
    peak = matmul_flops(torch.bfloat16, args.device, size=8192 if args.device.startswith("cuda") else 1024)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    results = {"date": date.today().isoformat(), "device": name, "torch": torch.__version__,
               "bf16_matmul_tflops": peak / 1e12, "checks": {}, "benchmark": []}
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        results["checks"]["bf16 surface vs float32"] = _guard(check_bf16_surface, args.device, args.quick)
        results["checks"]["out-of-memory back-off"] = _guard(check_oom_backoff, args.device, args.quick)
        results["checks"]["torchrun + NCCL"] = _guard(check_torchrun_nccl, args.device, args.quick, work)
        results["checks"]["PTP-ADV training in bf16"] = _guard(check_bf16_training, args.device, args.quick, work)
        for model, head in (("smollm2", "verbalizer"), ("minilm", "classifier")):
            row = _guard(benchmark, model, head, args.device, args.quick, peak)
            results["benchmark"].append({"model": model, "head": head, **row})
    results["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(results))
    print(markdown(results), end="")
    print(f"{results['seconds']:.0f} s; wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return results


if __name__ == "__main__":
    main()
