"""Prototype 7 on cpu (CI): every variant through the front door (kernel="cpu", the numpy
flash loop) against the base loop of the same run, FP64-gated; standalone RoPE (numpy, as a
separate pass over Q and K) + base; materialised GQA (np.repeat) + base; and AC-5.5.

The host path is the reference of the GPU kernels, not a performance claim for them."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ... import lab, ref
from ...findings import fmt, fmt_pct
from ...ops import flash_forward
from ...ops.families.cpu import CpuTile
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from . import common as C
from .validation import run_validation


def rope_numpy(x: np.ndarray, style: str, theta: float = ref.DEFAULT_ROPE_THETA) -> np.ndarray:
    """Standalone RoPE of x [B, H, N, D] in float32 (positions 0..N-1), as the GPU kernel does."""
    return np.asarray(ref.rope(x, theta, style=style), dtype=np.float32)


def _timed(fn) -> lab.TimingStats:
    return lab.time_host(fn, warmup=C.CPU_WARMUP, iters=C.CPU_ITERS)


def _gate(o: np.ndarray, q, k, v, case: C.Case, n: int, slopes) -> float:
    kw = case.kwargs(n, slopes=slopes)
    host = dict(rope=kw.get("rope", False), alibi="alibi" in kw, window=kw.get("window"),
                softcap=kw.get("softcap"), alibi_slopes=slopes if case.alibi == "slopes" else None)
    want = ref.attention(q, k, v, causal=True, **host)
    err = float(np.nan_to_num(np.abs(np.asarray(o, np.float64) - want), nan=np.inf).max())
    if not err <= C.CPU_ATOL:
        raise ExperimentError(f"proto7 cpu: {case.name} N={n} differs from FP64 by {err:.3g} (> {C.CPU_ATOL})")
    return err


def run_cpu(ctx: ExperimentContext) -> ExperimentResult:
    n, d, hq = C.CPU_SEQ_LEN, C.CPU_HEAD_DIM, C.CPU_HEADS
    records: List[Dict[str, Any]] = []
    findings = []
    call = dict(kernel="cpu", causal=True, config=CpuTile(C.CPU_BLOCK, C.CPU_BLOCK))
    for g in ctx.progress(C.CPU_GROUPS_QUICK if ctx.quick else C.CPU_GROUPS, desc="proto7[cpu]"):
        hkv = hq // g
        q = ctx.rng.standard_normal((1, hq, n, d)).astype(np.float32)
        k, v = (ctx.rng.standard_normal((1, hkv, n, d)).astype(np.float32) for _ in range(2))
        slopes = (ref.alibi_slopes(hq) * 0.5).astype(np.float32)   # caller slopes: half the standard
        cfg = {"sweep": "cpu", "batch": 1, "num_heads": hq, "num_kv_heads": hkv, "group": g, "seq_len": n,
               "head_dim": d, "dtype": "float32"}
        base_t = _timed(lambda: flash_forward(q, k, v, **call))
        base = ctx.record({**cfg, "kernel": C.OURS_BASE, "case": "base"}, {"time_us": base_t.median_ms * 1e3}, base_t)
        rows = [base]
        for case in C.CASES:
            if case.group not in (None, g):
                continue
            kw = case.kwargs(n, slopes=slopes)
            o, _ = flash_forward(q, k, v, **call, **kw)
            err = _gate(o, q, k, v, case, n, slopes)
            t = _timed(lambda kw=kw: flash_forward(q, k, v, **call, **kw))
            metrics = {"time_us": t.median_ms * 1e3, "over_base_pct": 100.0 * (t.median_ms / base_t.median_ms - 1.0),
                       "max_abs_err": err}
            if case.rope:
                plain = {key: val for key, val in kw.items() if key not in ("rope", "rope_table")}

                def standalone(plain=plain, style=case.rope):
                    return flash_forward(rope_numpy(q, style), rope_numpy(k, style), v, **call, **plain)
                st = _timed(standalone)
                rows.append(ctx.record({**cfg, "kernel": C.STANDALONE_ROPE, "case": case.name},
                                       {"time_us": st.median_ms * 1e3}, st))
                metrics["vs_standalone_x"] = st.median_ms / t.median_ms
            rows.append(ctx.record({**cfg, "kernel": C.OURS, "case": case.name}, metrics, t))
        if g > 1:
            mt = _timed(lambda: flash_forward(q, np.repeat(k, g, axis=1), np.repeat(v, g, axis=1), **call))
            rows.append(ctx.record({**cfg, "kernel": C.MATERIALISED_GQA, "case": "gqa"},
                                   {"time_us": mt.median_ms * 1e3, "vs_fused_x": mt.median_ms / base_t.median_ms}, mt))
        records += rows
        fused = [r for r in rows if r["config"]["kernel"] == C.OURS]
        claim = (f"numpy flash loop (B=1, {hq}/{hkv} heads, N={n}, D={d}, causal, tiles {C.CPU_BLOCK}x{C.CPU_BLOCK}): "
                 f"base {fmt(base['metrics']['time_us'])} us; each variant over it: "
                 + ", ".join(f"{r['config']['case']} {fmt_pct(r['metrics']['over_base_pct'] / 100.0)}" for r in fused)
                 + "; every variant within "
                 + f"{fmt(max(r['metrics']['max_abs_err'] for r in fused))} of FP64. The host reference of the "
                   "CUDA kernels, not a performance claim for them.")
        findings.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Variant cost of the numpy reference path, group {g}",
                                    claim=claim, evidence={f"{r['config']['case']}_over_base_pct": r["metrics"]["over_base_pct"]
                                                           for r in fused},
                                    config={"seq_len": n, "group": g, "backend_path": "numpy"},
                                    cv=max(r["timing"]["cv"] for r in rows), records=rows,
                                    slug=f"cpu-variant-cost-g{g}"))
    ac_records, ac = run_validation(ctx)
    return ExperimentResult(records + ac_records, findings + [ac])
