"""`python -m landscape.connect CKPT_A CKPT_B --out DIR`: a Bezier curve and the straight line between two prompts."""
from __future__ import annotations

import argparse
from pathlib import Path

from landscape.connect.run import RESULT_FILE, ConnectConfig, ConnectResult, connect_checkpoints
from landscape.draw.comparison import write_connection
from landscape.grid.spec import PARAM_SCOPES
from ptp_core import cli
from ptp_core.io import check_output_folder
from ptp_core.tasks.task import SPLITS
from ptp_core.training.config import TRAIN_DTYPES


def parser() -> argparse.ArgumentParser:
    d = ConnectConfig()
    p = cli.parser("python -m landscape.connect", "Train a Bezier curve between two checkpoints; compare its loss "
                   "barrier with the straight line's.")
    p.add_argument("checkpoint_a")
    p.add_argument("checkpoint_b")
    p.add_argument("--out", required=True, help="directory for connect.json, curve.safetensors, connect.pdf/.png")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Adam steps on the control point (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam step size (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="train examples per step (default 16)")
    p.add_argument("--points", type=int, default=d.points, help=f"t values in [0, 1] evaluated (default {d.points})")
    p.add_argument("--examples", type=int, default=d.examples, help=f"the first N of --split (default {d.examples})")
    p.add_argument("--split", default=d.split, choices=SPLITS)
    p.add_argument("--params", dest="param_scope", default=d.param_scope, choices=PARAM_SCOPES,
                   help="prompt: bend the prompt, a trained head follows the line; all: bend the head too")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=TRAIN_DTYPES,
                   help="auto: train in bf16 where native, evaluate in float32; otherwise this dtype for both")
    p.add_argument("--device", default=d.device)
    p.add_argument("--overwrite", action="store_true", help="replace connect.json and its files in --out")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    return p


def main(argv: list[str] | None = None) -> ConnectResult:
    args = parser().parse_args(argv)
    config = ConnectConfig(**{k: v for k, v in vars(args).items() if k in ConnectConfig.__dataclass_fields__})
    check_output_folder(Path(args.out), args.overwrite, marker=RESULT_FILE)
    cli.quiet_transformers()
    result = connect_checkpoints(args.checkpoint_a, args.checkpoint_b, config, cache_dir=cli.cache_dir(),
                                 progress=args.progress)
    write_connection(result, args.out)
    print(f"linear barrier {result.linear.barrier:.4f} at t={result.linear.t_at_max:.2f}, curve barrier "
          f"{result.curve.barrier:.4f} at t={result.curve.t_at_max:.2f}; wrote {args.out} in "
          f"{result.info['seconds']:.0f} s")
    return result
