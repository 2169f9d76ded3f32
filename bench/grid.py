"""Grid evaluation speed: ours vs. a per-point loop vs. the `loss-landscapes` package, in one run.

Same model, examples, directions and grid for all three. Prints points/s, the ratios, and the
model FLOP/s of each as a fraction of this machine's dense matmul throughput (measured here,
same dtype). The row "ours, deep prompt" evaluates the same grid over a deep prompt of the same length
(keys and values in every layer, random filter-normalized directions) on the same backbone.
A --head lm model (a generation checkpoint, or --model smollm2 --head lm: rotten_tomatoes written as text) is
measured on its token-level cross-entropy; loss-landscapes, which needs class logits, is left out for it.

    python bench/grid.py --checkpoint /tmp/bench_ckpt --examples 32 --grid 7
    python bench/grid.py --model minilm --examples 32 --grid 7     # untrained prompt from init_params
    python bench/grid.py --model smollm2 --head lm --examples 32 --grid 3 --skip deep
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from landscape.grid.directions import prompt_directions
from landscape.grid.evaluate import auto_chunk, evaluate_points
from landscape.grid.spec import SurfaceSpec
from ptp_core.model.backbones import DTYPES, Backbone, resolve_dtype
from ptp_core.model.encoding import batch_split, share_token_scale
from ptp_core.model.prompt_model import PromptModel


def matmul_flops(dtype: torch.dtype, device: str, size: int = 2048, seconds: float = 2.0) -> float:
    """Dense (size x size) @ (size x size) FLOP/s: the best of repeated timings."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_flops_per_point(model, batches, prompt_length: int) -> float:
    """Forward FLOPs of one grid point over the examples, real tokens only (no padding).

    Per layer and sequence of length L: 2 L (4 H^2 + 2 H I) for the projections and the MLP,
    plus 4 L^2 H for attention scores and their weighted sum.
    """
    config = model.backbone.config
    hidden = model.embedding_dim
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    total = 0.0
    for batch in batches:
        for length in (batch.attention_mask.sum(1) + prompt_length).tolist():
            total += layers * (2 * length * (4 * hidden ** 2 + 2 * hidden * inner) + 4 * length ** 2 * hidden)
    return total


def per_point_loop(model, directions, batches, alphas, betas, dtype) -> np.ndarray:
    """The reference scripts' way: set one prompt, evaluate batch by batch, next point. --head lm: the batches
    share the set's token scale (share_token_scale), so the sum over examples / N is the token mean."""
    out = np.zeros((len(alphas), len(betas)))
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                params = dict(directions.center)
                params["prompt"] = directions.center["prompt"] + float(a) * directions.d1["prompt"] \
                    + float(b) * directions.d2["prompt"]  # (P, D)
                total = sum(model.loss(params, batch).sum().item() for batch in batches)
                out[i, j] = total / sum(len(batch) for batch in batches)
    return out


class PromptAsModule(nn.Module):
    """The soft prompt as the only nn.Parameter, for loss-landscapes; the frozen model is not a submodule."""

    def __init__(self, model, params):
        super().__init__()
        self.prompt = nn.Parameter(params["prompt"].detach().clone())
        self.held = {k: v for k, v in params.items() if k != "prompt"}
        self.__dict__["frozen"] = model  # not registered: loss-landscapes must see the prompt only

    def forward(self, batches):
        return torch.cat([self.frozen.logits({**self.held, "prompt": self.prompt}, b).float() for b in batches])


def loss_landscapes_plane(model, directions, batches, alphas, dtype) -> np.ndarray:
    """loss_landscapes.planar_interpolation over the same square grid (it cannot do nx != ny)."""
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    steps, step, span = len(alphas), float(alphas[1] - alphas[0]), float(-alphas[0])
    d1, d2 = directions.d1["prompt"], directions.d2["prompt"]
    # it walks a zig-zag: even rows i at start + i*step*d1 + j*step*d2, j in [1, steps]; odd rows j in [0, steps)
    origin = directions.center["prompt"] - span * d1 - (span + step) * d2
    start, end_one, end_two = (PromptAsModule(model, {**directions.center, "prompt": prompt})
                               for prompt in (origin, origin + steps * step * d1, origin + steps * step * d2))
    labels = torch.cat([b.labels for b in batches])
    metric = Loss(nn.functional.cross_entropy, batches, labels)
    with torch.no_grad(), torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return loss_landscapes.planar_interpolation(start, end_one, end_two, metric, steps=steps)


def deep_twin(model, batches):
    """A deep prompt of the same length on the same backbone (built from the shallow one's init) and its
    random filter-normalized directions."""
    backbone = Backbone(model.backbone, model.tokenizer, model.kind, model.model_name, model.model_path)
    deep = PromptModel(backbone, model.head, model.num_labels, model.label_words, model.template, model.max_length,
                       prompt_type="deep")
    deep = deep.with_params({**model.params, "prompt": deep.deep_from_shallow(model.params["prompt"])})
    return deep, prompt_directions(deep, deep.params, batches, "random", "filter", 0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (else --model with an init prompt)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--head", default="classifier", choices=("classifier", "lm"),
                   help="the head of --model (lm: rotten_tomatoes written as text, its label names the targets)")
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--grid", type=int, default=7, help="n: an n x n grid")
    p.add_argument("--span", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward of the loop and loss-landscapes")
    p.add_argument("--our-batch-size", type=int, default=SurfaceSpec.batch_size, help="ours: examples per forward")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best time of each counts")
    p.add_argument("--chunk", type=int, default=None, help="our grid points per forward (default: automatic)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="the loop's and loss-landscapes' dtype; ours runs in float32 and in auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", default="", help="comma-separated evaluators to skip: loop,loss-landscapes,deep")
    args = p.parse_args(argv)
    from ptp_core.checkpoint import load_checkpoint
    from ptp_core.tasks.load import load_task

    dtype = DTYPES[args.dtype]
    auto = resolve_dtype("auto", args.device)
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        model = checkpoint.build_model(args.device)
        task = checkpoint.task()
    else:
        from ptp_core.model.backbones import load_backbone
        from ptp_core.model.prompt_model import PromptModel

        task = load_task("rotten_tomatoes")
        if args.head == "lm":  # the template and targets a --head lm run trains with
            from ptp_core.train import build_prompt_model
            from ptp_core.training.config import TrainConfig

            model = build_prompt_model(TrainConfig(model=args.model, head="lm"), task, args.device)
        else:
            backbone = load_backbone(args.model, "classifier", task.num_labels, args.device)
            model = PromptModel(backbone, "classifier", task.num_labels)
        model = model.with_params(model.init_params(20, "vocab", torch.Generator().manual_seed(0)))
    examples = task.splits["test"].head(args.examples)
    spec = SurfaceSpec(directions="random", grid=f"{args.grid}x{args.grid}", span=args.span, examples=args.examples,
                       batch_size=args.our_batch_size, dtype=args.dtype)
    alphas, betas = spec.axes()
    batches, order = batch_split(model, examples, args.our_batch_size, by_length=True)
    stored_batches = share_token_scale([model.encode(examples.texts[i:i + args.batch_size],
                                                     examples.labels[i:i + args.batch_size])
                                        for i in range(0, len(examples), args.batch_size)])  # the loop's: stored order
    directions = prompt_directions(model, model.params, batches, "random", "filter", 0)
    points = alphas.size * betas.size
    chunk = args.chunk or auto_chunk(model, batches, points, model.params["prompt"].shape[-2])
    grid_a = torch.as_tensor(np.repeat(alphas, betas.size), dtype=torch.float32, device=model.device)
    grid_b = torch.as_tensor(np.tile(betas, alphas.size), dtype=torch.float32, device=model.device)

    def ours(compute: torch.dtype, model=model, directions=directions, chunk=chunk) -> np.ndarray:
        out = [evaluate_points(model, batches, order, grid_a[s:s + chunk], grid_b[s:s + chunk], directions,
                               dtype=compute)[0] for s in range(0, points, chunk)]
        return np.concatenate(out).reshape(alphas.size, betas.size)

    skip = {"ours, deep prompt" if name == "deep" else name for name in filter(None, args.skip.split(","))}
    if model.head == "lm":  # loss-landscapes scores class logits, which --head lm has none of
        skip.add("loss-landscapes")
    evaluators = {"ours": lambda: ours(dtype), f"ours ({auto}, auto)": lambda: ours(DTYPES[auto]),
                  "loop": lambda: per_point_loop(model, directions, stored_batches, alphas, betas, dtype),
                  "loss-landscapes": lambda: loss_landscapes_plane(model, directions, stored_batches, alphas, dtype)}
    if "ours, deep prompt" not in skip:
        deep, deep_directions = deep_twin(model, batches)
        deep_chunk = args.chunk or auto_chunk(deep, batches, points, deep.params["prompt"].shape[-2])
        evaluators["ours, deep prompt"] = lambda: ours(dtype, deep, deep_directions, deep_chunk)
    compute_of = {name: DTYPES[auto] if "auto" in name else dtype for name in evaluators}
    flops = model_flops_per_point(model, batches, model.params["prompt"].shape[-2])
    ours(dtype), ours(DTYPES[auto])  # warm-up (allocator, kernels) so that no evaluator pays it
    # Other processes may share the machine: interleave the evaluators and the matmul probe over
    # rounds and keep each one's best, so that all see the same conditions.
    best, surfaces, peak = {}, {}, {}
    for _ in range(args.rounds):
        for compute in set(compute_of.values()):
            peak[compute] = max(peak.get(compute, 0.0), matmul_flops(compute, args.device))
        for name, run in evaluators.items():
            if name in skip:
                continue
            _sync(args.device)
            start = time.perf_counter()
            surfaces[name] = np.asarray(run(), np.float64)
            _sync(args.device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    results = {name: {"seconds": seconds, "points_per_s": points / seconds,
                      "matmul_fraction": flops * points / seconds / peak[compute_of[name]]}
               for name, seconds in best.items()}
    reference = surfaces["ours"]
    surfaces.pop("ours, deep prompt", None)  # another prompt: another surface
    if "ours, deep prompt" in results:  # no virtual tokens in the sequence: the text's FLOPs (the prefix's few ignored)
        deep_row = results["ours, deep prompt"]
        deep_row.update(max_abs_diff_vs_ours=float("nan"), matmul_fraction=model_flops_per_point(
            model, batches, 0) * points / deep_row["seconds"] / peak[dtype])
    for name, surface in surfaces.items():
        # loss-landscapes' zig-zag evaluates odd rows one beta-step lower: compare its even rows only
        rows = slice(None, None, 2) if name == "loss-landscapes" else slice(None)
        results[name]["max_abs_diff_vs_ours"] = float(np.max(np.abs(surface[rows] - reference[rows])))
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.node()} {platform.processor() or platform.machine()} "
          f"threads={torch.get_num_threads()} device={args.device} dtype={args.dtype}")
    print(f"# model={model.model_name} head={model.head} examples={len(examples)} grid={args.grid}x{args.grid} ({points} points) "
          f"batch ours={args.our_batch_size} (length-sorted) others={args.batch_size} (stored order) chunk={chunk} prompt={model.params['prompt'].shape[-2]} "
          f"matmul " + ", ".join(f"{str(k)[6:]} {v / 1e9:.1f}" for k, v in peak.items()) +
          f" GFLOP/s (best of {args.rounds}) rounds={args.rounds} model={flops / 1e9:.2f} GFLOP/point")
    print("| evaluator | seconds | points/s | speed vs loop | FLOP/s / matmul (same dtype) | max |diff| vs ours |")
    print("|---|---|---|---|---|---|")
    loop = results.get("loop", {}).get("points_per_s")
    for name, r in results.items():
        ratio = f"{r['points_per_s'] / loop:.2f}x" if loop else "-"
        print(f"| {name} | {r['seconds']:.1f} | {r['points_per_s']:.2f} | {ratio} | {r['matmul_fraction']:.0%} | "
              f"{r['max_abs_diff_vs_ours']:.1e} |")
    return results


if __name__ == "__main__":
    main()
