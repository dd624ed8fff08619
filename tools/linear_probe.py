"""Launch one linear-attention plan a few times (a target for ncu / compute-sanitizer).

    python3 tools/linear_probe.py --head-dim 64 --seq-len 16384 --chunk 64 [--algorithm fused]
                                  [--block-dv 32] [--segments 2]
    python3 tools/linear_probe.py --grid      # every fused block_dv x state warps x segments 1/2/4,
                                              # D 64/128, N 4K/16K

Inputs are random bfloat16 [batch, heads, N, D]; prints the plan's kernels and a device-event
median so a profile can be matched to the proto6 records (the grid mode is a development
probe; the measured choices are made by `attnproto run proto6`).
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
    ap.add_argument("--segments", type=int, default=0, help="fused: chunk segments (0: the chooser's)")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--grid", action="store_true", help="time every fused block_dv x segments 1/2/4")
    args = ap.parse_args()
    if args.grid:
        grid(args)
        return
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    fused = None
    if args.block_dv:
        fused = lin.FusedConfig("bfloat16", args.head_dim, args.chunk, args.block_dv, lin.FUSED_STAGES, False,
                                max(args.segments, 1))
    plan = lin.LinearPlan(q, k, v, chunk_size=args.chunk, scale=1.0 / math.sqrt(args.head_dim),
                          algorithm=args.algorithm, fused_config=fused)
    for _ in range(args.launches):
        plan.run()
    torch.cuda.synchronize()
    print(plan.algorithm, plan.fused_config or plan.config, f"{plan.time(iters=20)['total'].median_ms:.4f} ms")


GRID_SEGMENTS = (1, 2, 4)


def grid(args) -> None:
    for d in (64, 128):
        for n in (4096, 16384):
            q, k, v = (torch.randn((args.batch, args.heads, n, d), dtype=torch.bfloat16, device="cuda")
                       for _ in range(3))
            scale = 1.0 / math.sqrt(d)
            ref = lin.linear_attention(q, k, v, chunk_size=64, scale=scale, algorithm="two_pass").float()
            for c in lin.FUSED_CHUNKS:
                two = lin.LinearPlan(q, k, v, chunk_size=c, scale=scale, algorithm="two_pass")
                rows = [("two_pass", two.time(iters=20)["total"].median_ms)]
                auto = lin.LinearPlan(q, k, v, chunk_size=c, scale=scale)
                rows.append((f"auto dv{auto.fused_config.block_dv} s{auto.fused_config.segments}",
                             auto.time(iters=20)["total"].median_ms))
                for cfg in lin.all_fused_variants("bfloat16", d, c, False):
                    for seg in GRID_SEGMENTS:
                        plan = lin.LinearPlan(q, k, v, chunk_size=c, scale=scale, algorithm="fused",
                                              fused_config=cfg.with_segments(seg))
                        out = plan.run().float()
                        rel = float((out - ref).norm() / ref.norm())
                        assert rel < 2e-2, f"dv{cfg.block_dv} s{seg}: relative difference {rel:.3g}"
                        rows.append((f"dv{cfg.block_dv} w{cfg.state_warps} s{seg}",
                                     plan.time(iters=20)["total"].median_ms))
                print(f"D={d} N={n} C={c}: " + "  ".join(f"{name} {ms:.4f}" for name, ms in rows), flush=True)


if __name__ == "__main__":
    main()
