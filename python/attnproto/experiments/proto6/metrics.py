"""Prototype 6's records and the two FLOP counts behind their ``tflops``.

FLOP conventions (the one place they are stated for proto6):

* softmax attention (the crossover baselines: cpu_flash, sdpa_cudnn, proto1) — the
  project's one count, :func:`attnproto.lab.attention_flops` with Nq = Nkv = N and
  ``causal=True``: 2 matmuls x 2 FLOPs per MAC x D per visible (query, key) pair, the
  N (N + 1) / 2 pairs of the causal mask counted exactly;
* linear attention (ours, FLA) — :func:`linear_flops`, the chunked algorithm's own matrix
  work (attnproto.ops.linear.linear_attention_flops): per (batch, head) and chunk c of
  length L_c (chunk size C, head dim D = value dim), 2 C D^2 for K_c^T V_c plus D^2 for the
  state prefix add in every chunk but the last, 2 L_c D^2 for Q_c H_c in every chunk but
  the first, and L_c (L_c + 1) D for the intra-chunk causal Q_c K_c^T and P V_c — the same
  exact causal-pair convention as the softmax count, applied inside each chunk. It is the
  work this algorithm does, not the work of softmax attention at the same shape, so the
  two TFLOPS are rates of different FLOPs; compare the two by time (the crossover does).
"""
from __future__ import annotations

from typing import Any, Optional

from ... import lab
from ...ops import linear as lin
from ..registry import ExperimentContext
from .common import GIGA, MS_PER_S, PCT, TERA


def linear_flops(batch: int, num_heads: int, seq_len: int, head_dim: int, chunk: int) -> int:
    """FLOPs of chunked causal linear attention (module docstring: the chunked algorithm's count)."""
    return lin.linear_attention_flops(batch, num_heads, seq_len, head_dim, chunk)


def softmax_flops(batch: int, num_heads: int, seq_len: int, head_dim: int) -> int:
    """FLOPs of causal softmax attention at Nq = Nkv = seq_len (lab.attention_flops)."""
    return lab.attention_flops(batch, num_heads, seq_len, seq_len, head_dim, causal=True)


def _median_ms(timing: Any) -> float:
    return float(timing["median_ms"] if isinstance(timing, dict) else timing.median_ms)


def _linear_record(ctx: ExperimentContext, impl: str, dtype: str, b: int, h: int, n: int, d: int, c: int,
                   timing: Any, *, tolerance_ratio: Optional[float], copy_gbps: Optional[float],
                   extra: Optional[dict[str, float]] = None, algorithm: str = "two_pass",
                   extra_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    med = _median_ms(timing)
    flops = linear_flops(b, h, n, d, c)
    nbytes = lin.linear_attention_bytes(b, h, n, d, c, dtype, algorithm)
    gbps = nbytes / (med / MS_PER_S) / GIGA
    metrics = {"tflops": flops / (med / MS_PER_S) / TERA, "bandwidth_gbps": gbps,
               "algorithm_bytes": float(nbytes), "algorithm_flops_count": float(flops)}
    if copy_gbps:
        metrics["copy_bw_pct"] = PCT * gbps / copy_gbps
    if tolerance_ratio is not None:
        metrics["tolerance_ratio"] = tolerance_ratio
    if extra:
        metrics.update(extra)
    config = {"impl": impl, "op": "linear_attention", "dtype": dtype, "batch": b, "num_heads": h,
              "seq_len": n, "head_dim": d, "chunk_size": c, "algorithm": algorithm, **(extra_config or {})}
    return ctx.record(config, metrics, timing)


def _softmax_record(ctx: ExperimentContext, impl: str, dtype: str, b: int, h: int, n: int, d: int,
                    timing: Any, extra: Optional[dict[str, float]] = None) -> dict[str, Any]:
    metrics = {"tflops": softmax_flops(b, h, n, d) / (_median_ms(timing) / MS_PER_S) / TERA}
    if extra:
        metrics.update(extra)
    config = {"impl": impl, "op": "softmax_attention_causal", "dtype": dtype, "batch": b, "num_heads": h,
              "seq_len": n, "head_dim": d}
    return ctx.record(config, metrics, timing)
