"""``proto6``: chunked causal linear attention (one fused pass, or chunk_h + chunk_o) —
throughput, chunk size, bandwidth, and the crossover against softmax attention.

Modules: ``common`` (constants, tolerances, the crossover), ``metrics`` (the records and
their two FLOP conventions), ``cpu`` and ``cuda`` (the two sweeps), ``findings`` and
``fused_findings``, ``summary`` (the report table).
"""
from __future__ import annotations

from ..registry import ExperimentContext, ExperimentResult, experiment
from .common import (
    CHECK_BATCH,
    CHECK_DTYPES,
    CHECK_HEADS,
    CHECK_SEQ_LEN,
    CHECK_SEQ_LEN_QUICK,
    CHUNKS,
    COPY_BYTES,
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
    CUDA_BATCH,
    CUDA_HEADS,
    CUDA_SEQ_LENS,
    CUDA_SEQ_LENS_QUICK,
    ESTIMATE_ITERS,
    FLA_AGREE_REL_ERR,
    FLA_CHUNK,
    FLA_TARGET_MIN_N,
    FLA_TARGET_RATIO,
    HEAD_DIMS,
    LONG_CHECK_CHUNK,
    LONG_CHECK_SEQ_LEN,
    MAX_ITERS,
    MAX_ITERS_QUICK,
    MIN_ITERS,
    OURS,
    OURS_FUSED_VARIANT,
    OURS_TWO_PASS,
    OUTPUT_RMS,
    PROTOTYPE,
    RETNET_DECAY_BASE_EXP,
    SWEEP_DTYPE,
    TARGET_TIMED_MS,
    TOLERANCES,
    WARMUP,
    fmt_n,
)
from .cpu import run_cpu
from .cuda import run_cuda
from .findings import findings_of_sweep
from .fused_findings import algorithm_findings
from .metrics import linear_flops, softmax_flops
from .summary import summary_table

__all__ = [
    "CHECK_BATCH", "CHECK_DTYPES", "CHECK_HEADS", "CHECK_SEQ_LEN", "CHECK_SEQ_LEN_QUICK", "CHUNKS", "COPY_BYTES",
    "CPU_BATCH", "CPU_CHUNKS_QUICK", "CPU_HEADS", "CPU_HEAD_DIMS_QUICK", "CPU_REPEATS", "CPU_REPEATS_QUICK",
    "CPU_SEQ_LENS", "CPU_SEQ_LENS_QUICK", "CPU_SOFTMAX_BLOCK", "CPU_WARMUP", "CUDA_BATCH", "CUDA_HEADS",
    "CUDA_SEQ_LENS", "CUDA_SEQ_LENS_QUICK", "ESTIMATE_ITERS", "FLA_AGREE_REL_ERR", "FLA_CHUNK", "FLA_TARGET_MIN_N",
    "FLA_TARGET_RATIO", "HEAD_DIMS", "LONG_CHECK_CHUNK", "LONG_CHECK_SEQ_LEN", "MAX_ITERS", "MAX_ITERS_QUICK",
    "MIN_ITERS", "OURS", "OURS_FUSED_VARIANT", "OURS_TWO_PASS", "OUTPUT_RMS",
    "PROTOTYPE", "RETNET_DECAY_BASE_EXP", "SWEEP_DTYPE", "TARGET_TIMED_MS", "TOLERANCES",
    "WARMUP", "algorithm_findings", "findings_of_sweep", "fmt_n", "linear_flops", "run", "run_cpu", "run_cuda",
    "softmax_flops", "summary_table",
]


@experiment("proto6", PROTOTYPE,
            "chunked causal linear attention: chunk size x N x head dim, crossover vs softmax, FLA anchor",
            backends=("cpu", "cuda", "metal"))
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: chunked causal linear attention (tensor cores, FP32 state) costs
    O(N D^2) and is memory-bound, so it overtakes causal softmax attention
    (O(N^2 D)) beyond a few thousand tokens (seed AC-4.4 expects N > 4096-8192);
    a chunk of 64-128 balances the per-chunk state traffic (D^2 per chunk, worst
    for small chunks) against the intra-chunk C^2 D work (worst for large
    chunks); keeping the state on chip in one fused pass (linear_fused: Q, K, V
    read once, O written once) beats the two-pass chunk_h + chunk_o, which
    writes and re-reads a D x D state per chunk; and on an H100 our forward
    matches or beats flash-linear-attention's Triton chunk kernels at N >= 4K.

    Sweep (cuda): bfloat16, batch 4 x 16 heads, chunk 32/64/128/256 x N 1K..64K
    (powers of two) x head dim 64/128, each with the op's default algorithm
    (fused where it exists) and, where that is fused, the two-pass kernels and
    every other legal value-column split of the fused kernel; per config the median of device-event
    timings (TFLOPS of the chunked algorithm's FLOPs, causal half counted; GB/s
    of its least bytes, % of a measured device copy), our Prototype 1 causal
    kernel (if importable) and torch SDPA (cuDNN backend, causal) on the same
    shapes, FLA chunk_simple_gla (chunk 64) on the same inputs. Correctness:
    float16/bfloat16/float32 x head dims x chunks (+ decay) at N = 1000 and
    bfloat16 at N = 64K against the FP64 recurrent reference.
    Sweep (metal): float16, batch 1 x 8 heads, two passes (linear_chunk_h + linear_chunk_o; no
    fused kernel: its D x D FP32 state is over 32 KB at D=128), chunk 32/64/128/256 x N 1K..64K x
    head dim 64/128, each specialisation gated against the FP64 recurrence; our Prototype 1 causal
    flash kernel up to N = 16K as the softmax baseline (statically checked on Linux, not run there).
    Sweep (cpu, reduced): attnproto.cpu in numpy, batch 1 x 2 heads, N 256..2K
    (quick: 128, 256), softmax baseline attnproto.cpu.flash_forward.
    """
    if ctx.backend == "cuda":
        return run_cuda(ctx)
    if ctx.backend == "metal":
        from .metal import run_metal  # noqa: PLC0415  (loads the Metal op only when asked)

        return run_metal(ctx)
    return run_cpu(ctx)
