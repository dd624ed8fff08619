"""Prototype 5 — DSL-generated attention next to hand-written: the Prototype 1 forward written in
Triton (:mod:`attnproto.ops.triton_flash`, family ``triton``) and in Helion
(:mod:`attnproto.ops.helion_flash`, family ``helion``, compiled to Triton), against our wgmma
and mma kernels on the same inputs, and the code each compiler generated.

Modules: ``common`` (shapes, bars), ``codegen`` (SASS/PTX/resource readers, lines of source),
``static`` (cold compiles for sm_90a and their generated code; every backend), ``cuda``
(FP64-gated, timed comparison), ``findings``.
"""
from __future__ import annotations

from ...findings import fmt
from ..registry import ExperimentContext, ExperimentError, ExperimentResult, experiment
from .common import (
    HEAD_DIMS,
    ITERS,
    PROTOTYPE,
    QUICK_ITERS,
    QUICK_SEQ_LENS,
    QUICK_STATIC_HEAD_DIMS,
    QUICK_STATIC_MASKS,
    SEQ_LENS,
)
from .findings import measured_findings, ratio_rows, static_findings
from .static import static_records

__all__ = ["ratio_rows", "run"]


@experiment(name="proto5", prototype=PROTOTYPE, backends=("cpu", "cuda"),
            description="DSL (Triton, Helion) flash forward vs hand-written wgmma/mma: TFLOPS, SASS, source, compile")
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: a Triton flash forward written the way a strong Triton author targets Hopper
    (TMA descriptors, tl.dot, exp2 online softmax, autotuned tiles) compiles to wgmma (HGMMA in
    its SASS) with TMA loads, in a fraction of our hand-written kernel's source lines, but
    without warp specialisation or ping-pong scheduling it keeps only part of our wgmma
    kernel's throughput (the seeds expected a DSL 30-60 % slower), least at long N where our
    producer/consumer pipeline pays off; Helion, one level higher (torch code over tiles),
    gives away more than Triton written by hand.

    Sweep (every backend, static): for D in {64, 128} x causal/non-causal, bfloat16, the DSL
    kernels' default tile (Triton's compile API, target cuda sm_90; Helion's code generation
    first) and our wgmma and mma kernels at their chosen tiles for the sweep's largest N
    (16K; quick: 4K) (NVRTC, sm_90a), each compiled cold twice (quick: D = 128, causal only):
    PTX target and wgmma/mma.sync/TMA counts, SASS instructions by class and HGMMA/HMMA
    (cuobjdump, on PATH or shipped with triton), registers, stack, local (spill) bytes,
    shared memory, lines of kernel source, compile time.
    Sweep (cuda, measured): N in {1K, 2K, 4K, 8K, 16K} (quick: 1K, 4K) with batch x N = 16K
    tokens and heads x D = 2048, D in {64, 128} x causal/non-causal, bfloat16: every
    registered DSL family (Triton autotuned over every tile of attnproto.ops.dsl_tiles that fits,
    Helion benchmarking the same list) and our wgmma and mma families at their measured tiles, each FP64-gated (lab.fp64_gate; DSL
    families at their default tile), the full-size output checked against our first family's,
    then timed (lab timer, L2 flushed, 30 iterations; quick 5); TFLOPS from
    lab.attention_flops, registers/spills of the kernel that ran.
    """
    if ctx.backend not in ("cpu", "cuda"):
        raise ExperimentError(f"proto5 has no {ctx.backend} path")
    seq_lens = QUICK_SEQ_LENS if ctx.quick else SEQ_LENS
    static_dims, masks = (QUICK_STATIC_HEAD_DIMS, QUICK_STATIC_MASKS) if ctx.quick else (HEAD_DIMS, (False, True))
    records, skipped = static_records(ctx, static_dims, max(seq_lens), masks)
    findings = static_findings(ctx, records)
    notes = dict(skipped)
    if ctx.backend == "cuda":
        from .cuda import measured_records  # noqa: PLC0415  (torch on a GPU)

        measured, left_out = measured_records(ctx, HEAD_DIMS, seq_lens, QUICK_ITERS if ctx.quick else ITERS)
        records += measured
        notes.update(left_out)
        findings += measured_findings(ctx, records)
    summary = [{k: (fmt(v) if isinstance(v, float) else v) for k, v in row.items() if k != "records"}
               for row in ratio_rows(records)]
    summary += [{"left_out": name, "why": why} for name, why in notes.items()]
    return ExperimentResult(records=records, findings=findings, summary=summary)
