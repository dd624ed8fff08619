"""Prototype 1 on Metal (Apple GPU family 9): the seeds' Br x Bc x D tiles of
shaders/metal/flash_attention.metal that fit 32 KB of threadgroup memory (the registry's
"metal" family sweep space), each gated against float64, with MLX's and torch MPS's SDPA
as wall-clock anchors when installed (absent ones are listed in summary.json, never
substituted). Statically checked on Linux; no Metal number exists until a Mac runs it."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ... import lab, ref
from ...ops.problem import DeviceSpec
from ..registry import ExperimentContext
from . import common as C
from .sweep import Bench

METAL_KERNEL = "flash_attention"
# float16: numpy holds it natively (the FP64 gates need no ml_dtypes) and both anchors take it.
METAL_DTYPE = "float16"
METAL_HEAD_DIMS = (64, 128, 256)
# The FA3 setting (TOKENS x HIDDEN) up to N = 4K: 16K-token runs of every tile would take
# minutes per configuration on an M3-class GPU.
METAL_TOKENS = C.TOKENS
METAL_HIDDEN = C.HIDDEN
METAL_SEQ_LENS = (512, 1024, 2048, 4096)
METAL_QUICK_HEAD_DIMS = (64, 128)
METAL_QUICK_SEQ_LENS = (512, 1024)
# FP64 gates (batch, heads, seq_q, seq_kv): the CUDA gate's odd square shape, and Nq < Nkv for
# the bottom-right causal alignment.
METAL_GATE_SHAPES = ((1, 2, 333, 333), (1, 2, 77, 333))
# At full size our output is compared, on one (batch, head) slice, with the FP64 reference.
METAL_CHECK_SLICE = (slice(0, 1), slice(0, 1))
METAL_ANCHORS = ("mlx_sdpa", "mps_sdpa")
# Wall-clock anchors: enough runs for a stable median (seed NFR: median of many, after warm-up).
ANCHOR_ITERS = 30
ANCHOR_QUICK_ITERS = 5
TIMING_NOTE = ("ours: GPU time of each command buffer (backend time_launch) in the record, plus wall_median_ms "
               "(launch + wait, like the anchors); anchors: wall clock around a synchronised call; standing against "
               "the anchors compares wall clock with wall clock")


def metal_problem(head_dim: int, seq_len: int) -> tuple[int, int]:
    """(batch, heads) of the Metal sweep's setting for a head dim and length."""
    return max(1, METAL_TOKENS // seq_len), max(1, METAL_HIDDEN // head_dim)


def metal_sweep_specs(quick: bool = False) -> list:
    """Every flash_attention specialisation the Metal sweep dispatches (MetalSpec)."""
    from ... import metal_specs  # noqa: PLC0415

    dims = METAL_QUICK_HEAD_DIMS if quick else METAL_HEAD_DIMS
    return [metal_specs.flash_spec(d, r, c, METAL_DTYPE, causal=causal)
            for d in dims for causal in (False, True) for r, c in metal_specs.flash_tiles(d, METAL_DTYPE)]


def _metal_backend():
    """The Metal GpuBackend (a function so the harness test can substitute a CPU-computing fake)."""
    from ... import backend as backend_mod  # noqa: PLC0415

    return backend_mod.get("metal")


def _half_inputs(rng: np.random.Generator, batch: int, heads: int, nq: int, nkv: int, head_dim: int):
    return tuple(rng.standard_normal((batch, heads, n, head_dim), dtype=np.float32).astype(np.float16)
                 for n in (nq, nkv, nkv))


def _wall_timing(fn: Callable[[], Any], warmup: int, iters: int) -> lab.TimingStats:
    """Median-of-many wall-clock timing of a call that returns once its GPU work is complete."""
    return lab.time_host(fn, warmup=warmup, iters=iters)


def _mlx_anchor(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, scale: float):
    """(time(warmup, iters) -> TimingStats, output() -> float32 O) of MLX's fused SDPA, or why not."""
    try:
        import mlx.core as mx  # noqa: PLC0415
    except ImportError:
        return "not installed (import mlx.core failed)"
    try:
        qm, km, vm = mx.array(q), mx.array(k), mx.array(v)
        mask = "causal" if causal else None

        def compute():
            out = mx.fast.scaled_dot_product_attention(qm, km, vm, scale=scale, mask=mask)
            mx.eval(out)
            return out

        compute()
    except Exception as exc:  # noqa: BLE001 - reported as unavailable in the summary
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return (lambda warmup, iters: _wall_timing(compute, warmup, iters),
            lambda: np.array(compute().astype(mx.float32)))


def _mps_anchor(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, scale: float):
    """torch's scaled_dot_product_attention on MPS, wall-clock timed around a synchronised call."""
    try:
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415, N812
    except ImportError:
        return "not installed (import torch failed)"
    if not torch.backends.mps.is_available():
        return "torch is installed but torch.backends.mps.is_available() is False"
    try:
        qt, kt, vt = (torch.from_numpy(x).to("mps") for x in (q, k, v))

        def compute():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)

        compute()
        torch.mps.synchronize()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    def synced():
        compute()
        torch.mps.synchronize()

    return (lambda warmup, iters: _wall_timing(synced, warmup, iters)), lambda: compute().float().cpu().numpy()


METAL_ANCHOR_FNS = {"mlx_sdpa": _mlx_anchor, "mps_sdpa": _mps_anchor}


def bench(ctx: ExperimentContext) -> Bench:
    be = _metal_backend()
    iters = C.QUICK_ITERS if ctx.quick else C.ITERS
    anchor_iters = ANCHOR_QUICK_ITERS if ctx.quick else ANCHOR_ITERS

    def anchors(q, k, v, causal: bool, head_dim: int, seq: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in METAL_ANCHORS:
            a = METAL_ANCHOR_FNS[name](q, k, v, causal, 1.0 / math.sqrt(head_dim))
            out[name] = a if isinstance(a, str) else (lambda a=a: a[0](C.WARMUP, anchor_iters))
        return out

    def reference(q, k, v, causal: bool):
        bs, hs = METAL_CHECK_SLICE
        return ref.attention(q[bs, hs], k[bs, hs], v[bs, hs], causal=causal)

    def full_check(o, exact) -> tuple[bool, float, str]:
        bs, hs = METAL_CHECK_SLICE
        got = np.asarray(o, np.float64)[bs, hs]
        check = ref.allclose(got, exact, atol=C.ATOL, rtol=C.RTOL)
        diff = float(np.nan_to_num(np.abs(got - exact), nan=math.inf).max())
        return bool(check), diff, "" if check else f"full-size output (batch 0, head 0) vs FP64: {check.report()}"

    def extra(launch) -> dict[str, float]:
        wall = _wall_timing(lambda: (launch.launch(), be.synchronize()), C.WARMUP, iters)
        s = launch.problem.shape
        flops = lab.attention_flops(s.batch, s.num_heads, s.seq_q, s.seq_kv, s.head_dim, launch.problem.causal)
        return {"wall_median_ms": wall.median_ms, "wall_tflops": flops / (wall.median_ms * C.MS) / C.TERA,
                "smem_bytes": float(launch.shared_bytes),
                "threads": float(launch.resources.get("threads", 0.0) or 0.0)}

    gate_shapes = tuple((b, h, h, nq, nkv) for b, h, nq, nkv in METAL_GATE_SHAPES)
    return Bench(backend="metal", device=DeviceSpec.from_backend(be), backend_obj=be, dtype=METAL_DTYPE,
                 head_dims=METAL_QUICK_HEAD_DIMS if ctx.quick else METAL_HEAD_DIMS,
                 seq_lens=METAL_QUICK_SEQ_LENS if ctx.quick else METAL_SEQ_LENS, iters=iters,
                 problem=metal_problem,
                 inputs=lambda rng, b, h, n, d: _half_inputs(rng, b, h, n, n, d), anchors=anchors,
                 reference=reference, full_check=full_check, gate_shapes=gate_shapes, extra_metrics=extra,
                 notes={"anchors_unavailable": {}, "timing": TIMING_NOTE, "dtype": METAL_DTYPE})
