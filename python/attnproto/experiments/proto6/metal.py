"""Prototype 6 on Metal (Apple GPU family 9): chunked causal linear attention in two passes
(linear_chunk_h.metal + linear_chunk_o.metal, simdgroup_matrix, FP16 in, FP32 state) against our
Metal flash kernel (Prototype 1, causal) on the same shapes: chunk size, throughput, crossover.

``run_metal(ctx)`` is ``attnproto run proto6 --backend metal``. Statically checked on Linux, never
run on Apple hardware: without a Metal device it raises ExperimentError saying so and measures
nothing. No one-pass fused kernel on Metal: its D x D FP32 state alone is 64 KB at D = 128, twice
the 32 KB of threadgroup memory (the CUDA fused kernel keeps it in registers across 8+ warps).
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ... import lab, metal_specs, metal_timing, ref
from ... import metal_linear_specs as ls
from ...findings import fmt, fmt_ratio
from ...ops import metal_flash, metal_linear
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from .common import PROTOTYPE, TOLERANCES, fmt_n
from .metrics import linear_flops, softmax_flops

METAL_DTYPE = "float16"                     # numpy holds it natively (FP64 gates need no ml_dtypes)
METAL_BATCH, METAL_HEADS = 1, 8             # 64K tokens at chunk 32 keep 1 GiB of FP32 states
METAL_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)   # seeds AC-4.3: up to 65536
QUICK = {"seq_lens": (1024, 4096), "head_dims": (64,), "chunks": (64,)}
# Causal softmax at 64K is ~1 PFLOP per head-batch; past this N its O(N^2) minutes per point add
# nothing to the crossover, which the seeds expect at 4K-8K.
SOFTMAX_MAX_N = 16384
GATE_SEQ_LEN = 200                          # not a multiple of any chunk: a partial last chunk
GATE_BATCH, GATE_HEADS = 1, 2
WARMUP, ITERS, QUICK_ITERS = 4, 20, 3       # seed NFR-7 warm-up dispatches; samples per point
TERA = 1e12


def _metal_backend():
    """The Metal GpuBackend, or ExperimentError when there is none (a function: tests substitute)."""
    from ... import backend as backend_mod  # noqa: PLC0415

    try:
        return backend_mod.get("metal")
    except (backend_mod.BackendUnavailable, ImportError, ValueError) as exc:
        raise ExperimentError("proto6 --backend metal needs an Apple GPU family 9 Metal device (the kernels are "
                              f"statically checked on Linux, never run there); nothing was measured: {exc}") from exc


def _half(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)


def _inputs(rng, b: int, h: int, n: int, d: int):
    """FP16 q, k, v [b, h, n, d]; keys scaled by 1/sqrt(d) keep the un-normalised outputs small."""
    q, k, v = (_half(rng, b, h, n, d) for _ in range(3))
    return q, (k.astype(np.float32) / math.sqrt(d)).astype(np.float16), v


def gate(be, rng, head_dim: int, chunk: int) -> tuple[bool, float, str]:
    """(passed, max abs error, why not) of one specialisation against the FP64 recurrence."""
    q, k, v = _inputs(rng, GATE_BATCH, GATE_HEADS, GATE_SEQ_LEN, head_dim)
    o = np.asarray(metal_linear.linear_attention(q, k, v, chunk_size=chunk, backend=be), np.float64)
    exact = ref.linear_attention_recurrent(q, k, v)
    atol, rtol = TOLERANCES[METAL_DTYPE]
    err = float(np.nan_to_num(np.abs(o - exact), nan=math.inf).max())
    check = ref.allclose(o, exact, atol=atol, rtol=rtol)
    return bool(check), err, "" if check else f"O vs FP64 recurrence: {check.report()}"


def _sweep(ctx: ExperimentContext, be, timers: set) -> tuple[list[dict], list[dict]]:
    dims = QUICK["head_dims"] if ctx.quick else ls.HEAD_DIMS
    chunks = QUICK["chunks"] if ctx.quick else ls.CHUNKS
    lens = QUICK["seq_lens"] if ctx.quick else METAL_SEQ_LENS
    iters = QUICK_ITERS if ctx.quick else ITERS
    records, rejected, b, h = [], [], METAL_BATCH, METAL_HEADS
    for d in ctx.progress(dims, desc="proto6[metal]"):
        passed = {}
        for c in chunks:
            ok, err, why = gate(be, ctx.rng, d, c)
            if ok:
                passed[c] = err
            else:
                rejected.append({"head_dim": d, "chunk": c, "why": why})
        for n in lens:
            q, k, v = _inputs(ctx.rng, b, h, n, d)
            for c, err in passed.items():
                launch = metal_linear.prepare_linear_attention(q, k, v, chunk_size=c, backend=be)
                stats, timer = metal_timing.timed(launch, WARMUP, iters)
                timers.add(timer)
                records.append(ctx.record(
                    {"kernel": "linear_chunked", "head_dim": d, "seq_len": n, "chunk": c, "batch": b, "heads": h,
                     "dtype": METAL_DTYPE},
                    {"tflops": linear_flops(b, h, n, d, c) / (stats.median_ms / lab.MS_PER_S) / TERA,
                     "chunk_h_smem_bytes": float(launch.launches[0][4]),
                     "chunk_o_smem_bytes": float(launch.launches[1][4]), "vs_reference_max_abs_err": err}, stats))
            if n <= SOFTMAX_MAX_N:
                launch = metal_flash.prepare_flash_forward(q, k, v, causal=True, scale=1.0, backend=be)
                stats, timer = metal_timing.timed(launch, WARMUP, iters)
                timers.add(timer)
                tile = launch.spec.as_dict()
                records.append(ctx.record(
                    {"kernel": metal_specs.FLASH_KERNEL, "head_dim": d, "seq_len": n, "block_r": tile["BLOCK_R"],
                     "block_c": tile["BLOCK_C"], "batch": b, "heads": h, "dtype": METAL_DTYPE, "causal": True},
                    {"tflops": softmax_flops(b, h, n, d) / (stats.median_ms / lab.MS_PER_S) / TERA,
                     "smem_bytes": float(launch.shared_bytes)}, stats))
    return records, rejected


def _pick(records, **match) -> list[dict]:
    return [r for r in records if all(r["config"].get(key) == val for key, val in match.items())]


def _findings(ctx: ExperimentContext, records: list[dict], timer: str) -> tuple[list, list[dict]]:
    found, table = [], []
    linear = _pick(records, kernel="linear_chunked")
    for d in sorted({r["config"]["head_dim"] for r in linear}):
        crossing = None
        for n in sorted({r["config"]["seq_len"] for r in _pick(linear, head_dim=d)}):
            best = min(_pick(linear, head_dim=d, seq_len=n), key=lambda r: r["timing"]["median_ms"])
            soft = _pick(records, kernel=metal_specs.FLASH_KERNEL, head_dim=d, seq_len=n)
            row = {"head_dim": d, "seq_len": n, "chunk": best["config"]["chunk"],
                   "linear_ms": best["timing"]["median_ms"], "linear_tflops": best["metrics"]["tflops"]}
            ev = {"linear_ms": row["linear_ms"], "linear_tflops": row["linear_tflops"]}
            claim = (f"At D={d}, N={fmt_n(n)} (FP16, batch {METAL_BATCH} x {METAL_HEADS} heads; {timer}), the fastest chunk is "
                     f"{best['config']['chunk']}: {fmt(row['linear_ms'], 'ms')}")
            cited = [best]
            if soft:
                ev["softmax_over_linear_ratio"] = row["softmax_over_linear"] = soft[0]["timing"]["median_ms"] / row[
                    "linear_ms"]
                claim += f"; our causal flash kernel takes {fmt_ratio(ev['softmax_over_linear_ratio'])} of that"
                cited.append(soft[0])
                if crossing is None and ev["softmax_over_linear_ratio"] > 1.0:
                    crossing = (n, cited)
            table.append(row)
            found.append(ctx.finding(prototype=PROTOTYPE, title=f"Metal linear attention, D={d}, N={fmt_n(n)}",
                                     slug=f"metal-linear-d{d}-n{n}", claim=claim + ".", evidence=ev,
                                     config={"head_dim": d, "seq_len": n}, answer={"chunk": best["config"]["chunk"]},
                                     cv=max(r["timing"]["cv"] for r in cited), records=cited))
        if crossing is not None:
            n, cited = crossing
            found.append(ctx.finding(
                prototype=PROTOTYPE, title=f"Metal crossover of linear over softmax attention, D={d}",
                slug=f"metal-linear-crossover-d{d}",
                claim=f"At D={d} chunked linear attention is first faster than our causal flash kernel at N={fmt_n(n)} "
                      f"(smallest measured length where it wins; seeds expected 4K-8K).",
                evidence={"crossover_tokens": float(n)}, config={"head_dim": d}, answer={"seq_len": n},
                cv=max(r["timing"]["cv"] for r in cited), records=cited))
    return found, table


def run_metal(ctx: ExperimentContext) -> ExperimentResult:
    """Metal path of proto6 (hypothesis and sweep in the package's ``run``): FP16 two-pass chunked
    linear attention, chunk 32/64/128/256 x N 1K..64K x D 64/128, each specialisation gated
    against the FP64 recurrence first; our causal flash kernel up to N = 16K as the baseline."""
    if ctx.backend != "metal":
        raise ExperimentError(f"run_metal is the metal path of proto6, not {ctx.backend}")
    be = _metal_backend()
    timers: set = set()
    records, rejected = _sweep(ctx, be, timers)
    if not _pick(records, kernel="linear_chunked"):
        raise ExperimentError("no linear-attention specialisation passed its gate: " + json.dumps(rejected)[:2000])
    timer = " and ".join(sorted(timers))
    found, table = _findings(ctx, records, timer)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"table": table, "rejected": rejected, "budget_map": ls.budget_map(METAL_DTYPE),
                               "timer": timer,
                               "fused": "not on Metal: a D x D FP32 state is 64 KB at D=128, over 32 KB"}
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return ExperimentResult(records=records, findings=found, summary=table)
