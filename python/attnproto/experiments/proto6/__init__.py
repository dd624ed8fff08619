"""``proto6``: chunked causal linear attention (one fused pass, or chunk_h + chunk_o) —
throughput, chunk size, bandwidth, and the crossover against softmax attention.

Modules: ``common`` (constants, tolerances, the crossover), ``metrics`` (the records and
their two FLOP conventions), ``cpu`` and ``cuda`` (the two sweeps), ``findings`` and
``fused_findings``, ``summary`` (the report table). ``rederive_findings`` computes the cuda and
cpu findings again from a committed run's records (``attnproto kb rederive``).
"""
from __future__ import annotations

import re

from ..registry import ExperimentContext, ExperimentResult, Rederivation, experiment
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
    "rederive_findings", "softmax_flops", "summary_table",
]

#: The impl names of the records the cuda sweep writes besides ours (cuda.run_cuda).
FLA_IMPL = "fla_chunk_simple_gla"
COPY_IMPL = "torch_copy"
SOFTMAX_OP = "softmax_attention_causal"
#: The softmax baselines in the order run_cuda lists them; the cpu sweep's one baseline.
CUDA_SOFTMAX_IMPLS = ("sdpa_cudnn", "proto1")
CPU_SOFTMAX_IMPL = "cpu_flash"
RECOMMENDATION_SLUG = "recommendation-{backend}"
# A run note as _recommendation prints it in the claim: " Note (key): text."
_NOTE_RE = re.compile(r" Note \((?P<key>[a-z0-9_]+)\): (?P<text>.*?)\.(?= Note \(|$)")


def _run_notes(previous: list, backend: str) -> dict[str, str]:
    """The run's notes (anchors that failed to load, the long FP64 check), which the records do not
    hold: the previous recommendation's ``answer["notes"]``, or, for one that predates answers, the
    notes its claim printed."""
    old = next((f for f in previous if f.slug == RECOMMENDATION_SLUG.format(backend=backend)), None)
    if old is None:
        return {}
    if isinstance(old.answer.get("notes"), dict):
        return dict(old.answer["notes"])
    return {m["key"]: m["text"] for m in _NOTE_RE.finditer(old.claim)}


def rederive_findings(ctx: ExperimentContext, records: list[dict], previous: list) -> Rederivation:
    """:func:`run_cuda` / :func:`run_cpu`'s findings from a committed run's records (nothing measured):
    the records sorted back into the sweep's tables, in the order the run wrote them; the run's notes
    come from the previous recommendation (:func:`_run_notes`)."""
    if ctx.backend not in ("cuda", "cpu"):
        return Rederivation(unsupported=f"proto6's {ctx.backend} findings name the run's timer, which the records "
                                        "do not hold")
    lin_recs, alt_recs, soft_recs, fla_recs, copy_rec = {}, {}, {}, {}, None
    for r in records:
        c = r["config"]
        if c["impl"] == COPY_IMPL:
            copy_rec = r
        elif c["op"] == SOFTMAX_OP:
            soft_recs[(c["impl"], c["head_dim"], c["seq_len"])] = r
        elif c["impl"] == FLA_IMPL:
            fla_recs[(c["head_dim"], c["seq_len"])] = r
        elif c["impl"] == OURS_TWO_PASS:
            alt_recs[(OURS_TWO_PASS, c["head_dim"], c["seq_len"], c["chunk_size"], 0)] = r
        elif c["impl"] == OURS_FUSED_VARIANT:
            alt_recs[(OURS_FUSED_VARIANT, c["head_dim"], c["seq_len"], c["chunk_size"],
                      (c["block_dv"], c["state_warps"]))] = r
        else:
            lin_recs[(c["head_dim"], c["seq_len"], c["chunk_size"])] = r
    if ctx.backend == "cpu":
        return Rederivation(findings=findings_of_sweep(ctx, lin_recs, soft_recs, softmax_impls=(CPU_SOFTMAX_IMPL,),
                                                       fla_recs={}, copy_gbps=None, notes={}))
    impls = tuple(i for i in CUDA_SOFTMAX_IMPLS if any(key[0] == i for key in soft_recs))
    copy_gbps = copy_rec["metrics"]["bandwidth_gbps"] if copy_rec is not None else None
    found = findings_of_sweep(ctx, lin_recs, soft_recs, softmax_impls=impls, fla_recs=fla_recs, copy_gbps=copy_gbps,
                              notes=_run_notes(previous, ctx.backend), copy_rec=copy_rec)
    return Rederivation(findings=found + algorithm_findings(ctx, lin_recs, alt_recs))


@experiment("proto6", PROTOTYPE,
            "chunked causal linear attention: chunk size x N x head dim, crossover vs softmax, FLA anchor",
            backends=("cpu", "cuda", "metal"), rederive=rederive_findings)
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
