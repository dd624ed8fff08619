"""Prototype 3 on cpu (CI): attnproto.cpu.paged_forward in numpy against the contiguous
attnproto.cpu.flash_forward on the same K/V, checked against the FP64 reference, host clock."""
from __future__ import annotations

from typing import Any

import numpy as np

from ... import lab, ref
from ...findings import fmt
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from . import common as C

CPU_BLOCKS = (1, 16, 64)
CPU_CONTEXTS = (256, 1024)
CPU_QUICK_CONTEXTS = (256,)
CPU_SHAPE = (2, 4, 2, 64)       # batch, Hq, Hkv, D
CPU_ITERS, CPU_WARMUP = 3, 1
#: Key tile of the contiguous numpy flash_forward (its default-sized tile).
CPU_FLASH_BLOCK = 64
#: float32 numpy against float64: well inside this.
CPU_ATOL = 1e-4


def _pool(rng, k, v, bs):
    b, h, n, d = k.shape
    nblk = -(-n // bs)
    ids = rng.permutation(b * nblk)
    table = ids.reshape(b, nblk).astype(np.int32)
    pools = []
    for x in (k, v):
        pad = np.zeros((b, h, nblk * bs, d), np.float32)
        pad[:, :, :n] = x
        blocks = pad.reshape(b, h, nblk, bs, d).transpose(0, 2, 1, 3, 4).reshape(b * nblk, h, bs, d)
        pool = np.empty_like(blocks)
        pool[ids] = blocks
        pools.append(pool)
    return pools[0], pools[1], table, np.full(b, n, np.int32)


def run_cpu(ctx: ExperimentContext) -> ExperimentResult:
    from ... import cpu  # noqa: PLC0415

    b, hq, hkv, d = CPU_SHAPE
    records: list[dict[str, Any]] = []
    findings = []
    for n in ctx.progress(CPU_QUICK_CONTEXTS if ctx.quick else CPU_CONTEXTS, desc="proto3[cpu]"):
        q = ctx.rng.standard_normal((b, hq, 1, d)).astype(np.float32)
        k, v = (ctx.rng.standard_normal((b, hkv, n, d)).astype(np.float32) for _ in range(2))
        want = ref.attention(q, k, v)
        cont_t = lab.time_host(lambda: cpu.flash_forward(q, k, v, block_r=1, block_c=CPU_FLASH_BLOCK), warmup=CPU_WARMUP, iters=CPU_ITERS)
        base = {"sweep": "cpu", "batch": b, "num_heads": hq, "num_kv_heads": hkv, "head_dim": d, "context": n,
                "dtype": "float32"}
        cont = ctx.record({**base, "kernel": "cpu_contiguous", "block_size": 0}, {"time_us": cont_t.median_ms * 1e3},
                          cont_t)
        rows = [cont]
        for bs in CPU_BLOCKS:
            kc, vc, table, lens = _pool(ctx.rng, k, v, bs)
            o, _ = cpu.paged_forward(q, kc, vc, table, lens)
            err = float(np.abs(o - want).max())
            if not err <= CPU_ATOL:
                raise ExperimentError(f"proto3 cpu: paged_forward block {bs} N={n} differs from FP64 by {err:.3g}")
            t = lab.time_host(lambda kc=kc, vc=vc, table=table, lens=lens: cpu.paged_forward(q, kc, vc, table, lens),
                              warmup=CPU_WARMUP, iters=CPU_ITERS)
            rows.append(ctx.record({**base, "kernel": "cpu_paged", "block_size": bs},
                                   {"time_us": t.median_ms * 1e3, "max_err": err,
                                    "vs_contiguous_x": t.median_ms / cont_t.median_ms}, t))
        records += rows
        paged = rows[1:]
        claim = (f"numpy decode (B={b}, {hq}/{hkv} heads, D={d}, context {n}): paged_forward takes "
                 + ", ".join(f"{fmt(r['metrics']['vs_contiguous_x'])}x (block {r['config']['block_size']})" for r in paged)
                 + f" the time of the contiguous flash_forward ({fmt(cont['metrics']['time_us'])} us); "
                 "the host reference of the CUDA kernels, not a performance claim for them.")
        findings.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Paging cost of the numpy reference path at context {n}",
                                    claim=claim, evidence={f"bs{r['config']['block_size']}_vs_contiguous_x":
                                                           r["metrics"]["vs_contiguous_x"] for r in paged},
                                    config={"context": n}, cv=max(r["timing"]["cv"] for r in rows), records=rows,
                                    slug=f"cpu-paging-cost-n{n}"))
    return ExperimentResult(records, findings)
