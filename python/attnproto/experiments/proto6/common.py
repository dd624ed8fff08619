"""Prototype 6's constants and the small helpers its role modules share (tolerances, the
crossover, record selection, token-count formatting)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from ...findings import fmt
from ...ops import linear as lin

PROTOTYPE = "proto6"

CHUNKS = lin.SUPPORTED_CHUNKS                    # 32, 64, 128, 256
HEAD_DIMS = lin.SUPPORTED_HEAD_DIMS              # 64, 128

# ---- CUDA sweep ----
# Fixed batch x heads: 64 heads give chunk_h (sequential over chunks, parallel
# over state tiles x heads) >= 2 blocks per SM on 132 SMs at both head dims, and
# keep the N = 64K softmax baselines at ~0.1 s a call.
CUDA_BATCH = 4
CUDA_HEADS = 16
CUDA_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
CUDA_SEQ_LENS_QUICK = (1024, 4096)
SWEEP_DTYPE = "bfloat16"
# FLA's chunk kernels are tuned for (and default to) 64-token chunks.
FLA_CHUNK = 64
# The target: our forward >= FLA's at N >= 4K (H100).
FLA_TARGET_MIN_N = 4096
FLA_TARGET_RATIO = 1.0

# ---- CPU (reduced) sweep: attnproto.cpu in numpy ----
CPU_BATCH = 1
CPU_HEADS = 2
CPU_SEQ_LENS = (256, 512, 1024, 2048)
CPU_SEQ_LENS_QUICK = (128, 256)
CPU_CHUNKS_QUICK = (32, 64)
CPU_HEAD_DIMS_QUICK = (64,)
# Tile of the CPU softmax baseline (attnproto.cpu.flash_forward).
CPU_SOFTMAX_BLOCK = 64

# ---- correctness (FP64 recurrent reference, seeds AC-4.2 / NFR-3) ----
TOLERANCES = {"float32": (1e-4, 1e-3), "float16": (5e-3, 1e-2), "bfloat16": (5e-3, 1e-2)}
CHECK_DTYPES = ("float16", "bfloat16", "float32")
# Not a multiple of any chunk: exercises the ragged last chunk.
CHECK_SEQ_LEN = 1000
CHECK_SEQ_LEN_QUICK = 200
CHECK_BATCH, CHECK_HEADS = 1, 2
# The long check (N = 64K, one head; the recurrent FP64 loop takes seconds).
LONG_CHECK_SEQ_LEN = 65536
LONG_CHECK_CHUNK = 64
# Decay per head for the decayed checks (RetNet: gamma_h = 1 - 2^(-5 - h)).
RETNET_DECAY_BASE_EXP = 5
# Inputs are N(0, 1); scale = OUTPUT_RMS / sqrt(N D) puts the last token's
# output at RMS ~ OUTPUT_RMS (undecayed), the O(1) regime the seeds' absolute
# tolerances assume (output magnitude grows as sqrt(t) without normalisation).
OUTPUT_RMS = 0.25
# FLA and ours on identical inputs: both round states/probabilities to bf16
# (at different points), so they agree to bf16 accuracy, not bit for bit.
FLA_AGREE_REL_ERR = 2e-2

# ---- timing ----
WARMUP = 4
MIN_ITERS = 10
MAX_ITERS = 50
MAX_ITERS_QUICK = 10
# Timed iterations are chosen so one config's samples take about this long.
TARGET_TIMED_MS = 500.0
ESTIMATE_ITERS = 3
CPU_WARMUP = 1
CPU_REPEATS = 5
CPU_REPEATS_QUICK = 3
# Device-to-device copy for the measured bandwidth ceiling (bytes of the source).
COPY_BYTES = 1 << 30

# Implementation names of our records: the op as it runs by default, the two-pass kernels
# where the default is fused, and the fused kernel's other block_dv splits.
OURS = "ours"
OURS_TWO_PASS = "ours_two_pass"
OURS_FUSED_VARIANT = "ours_fused_variant"

MS_PER_S = 1e3
TERA = 1e12
GIGA = 1e9
PCT = 100.0
TOKENS_PER_K = 1024


def _retnet_decay(num_heads: int) -> np.ndarray:
    return 1.0 - 2.0 ** (-(RETNET_DECAY_BASE_EXP + np.arange(num_heads, dtype=np.float64)))


def _check_scale(seq_len: int, head_dim: int) -> float:
    return OUTPUT_RMS / math.sqrt(seq_len * head_dim)


def _tolerance_ratio(out: np.ndarray, exact: np.ndarray, dtype: str) -> float:
    """max |out - exact| / (atol + rtol |exact|); <= 1 passes; NaN fails."""
    atol, rtol = TOLERANCES[dtype]
    out = np.asarray(out, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return math.inf
    return float((np.abs(out - exact) / (atol + rtol * np.abs(exact))).max())


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _crossover(ns: Sequence[int], t_lin: Sequence[float], t_soft: Sequence[float]) -> tuple[Optional[float], str]:
    """Smallest N from which linear attention stays faster, log-interpolated.

    Returns (N*, how): N* None when linear never wins in the sweep; "below"
    when it wins already at the smallest N (then N* is that N, an upper bound).
    """
    ratio = [tl / ts for tl, ts in zip(t_lin, t_soft)]        # < 1: linear faster
    idx = None
    for i in range(len(ns) - 1, -1, -1):
        if ratio[i] < 1.0:
            idx = i
        else:
            break
    if idx is None:
        return None, "never"
    if idx == 0:
        return float(ns[0]), "below"
    # Interpolate log(ratio) against log(N) between ns[idx-1] (>= 1) and ns[idx] (< 1).
    x0, x1 = math.log(ns[idx - 1]), math.log(ns[idx])
    y0, y1 = math.log(ratio[idx - 1]), math.log(ratio[idx])
    x = x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else x1
    return math.exp(x), "interpolated"


def fmt_n(n: float) -> str:
    """A token count for a claim: whole multiples of 1024 as "4K", other counts >= 1024 in K to
    three significant digits ("5.20K", an interpolated crossover), smaller ones as they are."""
    if float(n).is_integer() and int(n) % TOKENS_PER_K == 0 and n >= TOKENS_PER_K:
        return fmt(int(n) // TOKENS_PER_K) + "K"
    if n >= TOKENS_PER_K:
        return fmt(n / TOKENS_PER_K) + "K"
    return fmt(int(n)) if float(n).is_integer() else fmt(n)


def _cv(recs: Sequence[dict[str, Any]]) -> float:
    return max(r["timing"]["cv"] for r in recs)


def _med(rec: dict[str, Any]) -> float:
    return rec["timing"]["median_ms"]


def _gmean(xs: Sequence[float]) -> float:
    return math.exp(float(np.mean([math.log(x) for x in xs])))
