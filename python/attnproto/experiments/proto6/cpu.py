"""Prototype 6 on cpu (reduced sweep): attnproto.cpu's chunked linear attention in numpy against
the FP64 recurrence, and attnproto.cpu.flash_forward as the causal softmax baseline; every
config timed on the host clock (lab.time_host)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ... import lab, ref
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from .common import (
    CHUNKS,
    CPU_BATCH,
    CPU_CHUNKS_QUICK,
    CPU_HEAD_DIMS_QUICK,
    CPU_HEADS,
    CPU_REPEATS,
    CPU_REPEATS_QUICK,
    CPU_SEQ_LENS,
    CPU_SEQ_LENS_QUICK,
    CPU_SOFTMAX_BLOCK,
    CPU_WARMUP,
    HEAD_DIMS,
    TOLERANCES,
    _check_scale,
    _tolerance_ratio,
)
from .findings import findings_of_sweep
from .metrics import _linear_record, _softmax_record


def run_cpu(ctx: ExperimentContext) -> ExperimentResult:
    from ... import cpu  # noqa: PLC0415

    seq_lens = CPU_SEQ_LENS_QUICK if ctx.quick else CPU_SEQ_LENS
    chunks = CPU_CHUNKS_QUICK if ctx.quick else CHUNKS
    head_dims = CPU_HEAD_DIMS_QUICK if ctx.quick else HEAD_DIMS
    repeats = CPU_REPEATS_QUICK if ctx.quick else CPU_REPEATS
    dtype = "float32"
    b, h = CPU_BATCH, CPU_HEADS
    lin_recs: dict[tuple[int, int, int], dict[str, Any]] = {}
    soft_recs: dict[tuple[str, int, int], dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    jobs = [(d, n) for d in head_dims for n in seq_lens]
    for d, n in ctx.progress(jobs, desc="proto6[cpu]"):
        q, k, v = (ctx.rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
        scale = _check_scale(n, d)
        exact = ref.linear_attention_recurrent(q, k, v, scale=scale)
        for c in chunks:
            out = cpu.linear_attention(q, k, v, chunk_size=c, scale=scale)
            ratio = _tolerance_ratio(out, exact, dtype)
            if ratio > 1.0:
                raise ExperimentError(f"cpu linear attention D={d} N={n} C={c}: error {ratio:.3g}x the "
                                      f"FP32 tolerance {TOLERANCES[dtype]}")
            timing = lab.time_host(lambda c=c: cpu.linear_attention(q, k, v, chunk_size=c, scale=scale),
                                   warmup=CPU_WARMUP, iters=repeats)
            lin_recs[(d, n, c)] = _linear_record(ctx, "cpu_numpy", dtype, b, h, n, d, c, timing,
                                                 tolerance_ratio=ratio, copy_gbps=None)
        timing = lab.time_host(lambda: cpu.flash_forward(q, k, v, block_r=CPU_SOFTMAX_BLOCK,
                                                         block_c=CPU_SOFTMAX_BLOCK, causal=True),
                               warmup=CPU_WARMUP, iters=repeats)
        soft_recs[("cpu_flash", d, n)] = _softmax_record(ctx, "cpu_flash", dtype, b, h, n, d, timing)
    records.extend(lin_recs.values())
    records.extend(soft_recs.values())
    findings = findings_of_sweep(ctx, lin_recs, soft_recs, softmax_impls=("cpu_flash",), fla_recs={},
                                 copy_gbps=None, notes={})
    return ExperimentResult(records=records, findings=findings)
