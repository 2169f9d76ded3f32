"""`python -m landscape.grid CKPT [CKPT ...] --out surfaces/x`: compute (or resume) one surface file.

    torchrun --standalone --nproc_per_node 2 -m landscape.grid CKPT --out surfaces/x ...
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from landscape.cli.arguments import add_surface_arguments, spec_from_args
from landscape.grid.driver import Shard, compute_surface
from landscape.surface import Surface, surface_paths
from ptp_core import cli
from ptp_core.checkpoint import load_checkpoint

DISTRIBUTED_TIMEOUT = datetime.timedelta(minutes=30)  # a rank may wait on a slow chunk of another


def parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m landscape.grid", "Compute (or resume) a loss surface file NAME.npz + NAME.json.")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True, help="surface path NAME (NAME.npz and NAME.json are written)")
    add_surface_arguments(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a surface file computed with another spec")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    return p


def all_gather(item: object) -> list:
    """torch.distributed's all_gather_object: the Shard gather of a torchrun process."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def distributed_shard(device: str) -> tuple[str, Shard]:
    """Under torchrun: this rank's device and its share of the chunks (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, Shard()
    if device.startswith("cuda"):  # cuda or cuda:N: each rank takes the GPU of its local rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return device, Shard(dist.get_rank(), dist.get_world_size(), all_gather)


def main(argv: list[str] | None = None) -> Surface:
    args = parser().parse_args(argv)
    cli.quiet_transformers()
    device = cli.auto_device(args.device)
    spec = spec_from_args(args, device)
    device, shard = distributed_shard(device)
    evaluated = []  # points evaluated by this run: none means the file was already complete
    try:
        checkpoints = [load_checkpoint(c) for c in args.checkpoints]
        surface = compute_surface(checkpoints, spec, args.out, device=device, cache_dir=cli.cache_dir(),
                                  overwrite=args.overwrite, progress=args.progress, shard=shard,
                                  on_chunk=lambda points, seconds: evaluated.append(points))
    finally:
        cli.end_distributed()
    if shard.rank == 0:
        path = surface_paths(args.out)[0]
        nx, ny = surface.shape
        print(f"{path} already complete ({nx}x{ny} grid, {surface.loss.size} points)" if not evaluated else
              f"wrote {path} ({nx}x{ny} grid, {surface.loss.size} points on {surface.spec.get('examples')} "
              f"{surface.spec.get('split')} examples)", flush=True)
    return surface
