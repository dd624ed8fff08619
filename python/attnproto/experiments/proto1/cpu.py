"""Prototype 1 on the CPU backend: the same algorithm in numpy at small N, a check of the
pipeline (every tile FP64-gated first); CPU timings are never compared with GPU ones."""
from __future__ import annotations

import numpy as np

from ... import ref

from ...ops.problem import DeviceSpec
from ..registry import ExperimentContext
from .sweep import Bench

CPU_DTYPE = "float32"
CPU_HEAD_DIMS = (64, 128)
CPU_SEQ_LENS = (256, 512)
CPU_QUICK_SEQ_LENS = (128, 256)
CPU_BATCH_HEADS = (1, 2)
CPU_REPEATS = 3
CPU_ELEM_BYTES = 4
# Full-size outputs against float64: float32 arithmetic on float32 inputs.
CPU_ATOL, CPU_RTOL = 1e-4, 1e-3


def _reference(q, k, v, causal: bool):
    return ref.attention(q, k, v, causal=causal)


def _full_check(o, reference) -> tuple[bool, float, str]:
    check = ref.allclose(np.asarray(o, np.float64), reference, atol=CPU_ATOL, rtol=CPU_RTOL)
    diff = float(np.abs(np.asarray(o, np.float64) - reference).max())
    return bool(check), diff, "" if check else f"full-size output vs FP64: {check.report()}"


def bench(ctx: ExperimentContext) -> Bench:
    def inputs(rng: np.random.Generator, batch: int, heads: int, seq: int, head_dim: int):
        return tuple(rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32) for _ in range(3))

    return Bench(backend="cpu", device=DeviceSpec.from_backend(None), backend_obj=None, dtype=CPU_DTYPE,
                 head_dims=CPU_HEAD_DIMS, seq_lens=CPU_QUICK_SEQ_LENS if ctx.quick else CPU_SEQ_LENS,
                 iters=CPU_REPEATS, problem=lambda d, n: CPU_BATCH_HEADS, inputs=inputs,
                 anchors=lambda *a: {}, reference=_reference, full_check=_full_check,
                 elem_bytes=CPU_ELEM_BYTES)
