"""Launch one linear-attention plan a few times (a target for ncu / compute-sanitizer).

    python3 tools/linear_probe.py --head-dim 64 --seq-len 16384 --chunk 64 [--algorithm fused] [--block-dv 32]

Inputs are random bfloat16 [batch, heads, N, D]; prints the plan's kernels and a device-event
median so a profile can be matched to the proto6 records.
"""
from __future__ import annotations

import argparse
import math

import torch

from attnproto.ops import linear as lin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--algorithm", default="auto", choices=lin.ALGORITHMS)
    ap.add_argument("--block-dv", type=int, default=0, help="fused: value columns per block (0: the chooser's)")
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    fused = None
    if args.block_dv:
        fused = lin.FusedConfig("bfloat16", args.head_dim, args.chunk, args.block_dv, lin.FUSED_STAGES, False)
    plan = lin.LinearPlan(q, k, v, chunk_size=args.chunk, scale=1.0 / math.sqrt(args.head_dim),
                          algorithm=args.algorithm, fused_config=fused)
    for _ in range(args.launches):
        plan.run()
    torch.cuda.synchronize()
    print(plan.algorithm, plan.fused_config or plan.config, f"{plan.time(iters=20)['total'].median_ms:.4f} ms")


if __name__ == "__main__":
    main()
