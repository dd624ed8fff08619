"""Prototype 4 — what specialisation costs: on CUDA NVRTC compile time per variant, the
on-disk cubin archive, first-launch latency, and where the compile time goes; on Metal the
same for pipeline builds of the Prototype 1 kernel (function constants) and the
MTLBinaryArchive.

Every compile here goes straight to NVRTC (``cuda_compile``: no in-memory cache, no
archive; NVRTC itself keeps none), so each one is a cold compile. Distinct constant sets
are the legal flash_fwd_mma tile configurations (proto1's sweep space over every head dim,
mask and dtype) and, beyond their number, the same configurations with a named constant
VARIANT_SALT that the kernel never reads: the source NVRTC compiles is identical, the
KernelKey (and archive key) differs. The NVRTC measurements need no GPU, so this
experiment runs on "cpu" too (launch latencies only on "cuda").

Modules: ``common`` (constants, compiler probe, wall clock, fresh-process runner),
``variants`` (the constant sets), ``nvrtc`` (cpu and cuda: cold compiles, phases, archive),
``cuda`` (first launch), ``findings``, ``metal`` and ``metal_findings`` (the Metal path),
``summary`` (summary rows). ``rederive_findings`` computes the findings again from a committed
run's records (``attnproto kb rederive``).
"""
from __future__ import annotations

import json

from ..registry import ExperimentContext, ExperimentError, ExperimentResult, Rederivation, experiment
from .common import (
    ARCH_FALLBACK,
    CONSTANTS_BUDGET_MS,
    DTYPE,
    KERNEL,
    LAUNCH_HEAD_DIM,
    LAUNCH_REPEATS,
    LAUNCH_SHAPE,
    LOAD_TIMEOUT_S,
    MIB,
    PHASE_SEQ_LEN,
    PROTOTYPE,
    STITCH_BUDGET_PCT,
    compiler_or_reason,
)
from .cuda import compute_cache_disabled, measure_first_launch
from .findings import nvrtc_findings
from .metal import (
    METAL_FROM_SOURCE_ENV,
    METAL_KERNEL,
    METAL_LAUNCH_TOKENS,
    METAL_QUICK_REBUILD_REPEATS,
    METAL_QUICK_VARIANT_COUNTS,
    METAL_REBUILD_REPEATS,
    METAL_VARIANT_COUNTS,
    METALLIB_RELPATH,
    metal_archive_load,
    run_metal,
)
from .metal_findings import CACHE_SUSPECT_RATIO, CUDA_MATRIX_VARIANTS, metal_findings
from .nvrtc import (
    PHASE_HEAD_DIMS,
    PHASE_REPEATS,
    QUICK_PHASE_HEAD_DIMS,
    QUICK_PHASE_REPEATS,
    QUICK_VARIANT_COUNTS,
    SINGLE_REPEATS,
    VARIANT_COUNTS,
    measure_archive,
    measure_cold,
    measure_phases,
)
from .summary import METAL_SUMMARY_METRICS, SUMMARY_METRICS, metal_summary_row, summary_row
from .variants import (
    MATRIX_BLOCK_C,
    MATRIX_BLOCK_R,
    MATRIX_HEAD_DIMS,
    MATRIX_ROWS_PER_WARP,
    MATRIX_STAGES,
    MATRIX_VARIANTS,
    MULTI_ENTRIES,
    MULTI_ENTRY_KERNEL,
    QUICK_MATRIX,
    SALT,
    SALTED_KERNEL,
    WARMUP_SALT,
    matrix_specs,
    salted_variants,
)

__all__ = [
    "ARCH_FALLBACK", "CACHE_SUSPECT_RATIO", "CONSTANTS_BUDGET_MS", "CUDA_MATRIX_VARIANTS", "DTYPE", "KERNEL",
    "LAUNCH_HEAD_DIM", "LAUNCH_REPEATS", "LAUNCH_SHAPE", "LOAD_TIMEOUT_S", "MATRIX_BLOCK_C", "MATRIX_BLOCK_R",
    "MATRIX_HEAD_DIMS", "MATRIX_ROWS_PER_WARP", "MATRIX_STAGES", "MATRIX_VARIANTS", "METALLIB_RELPATH",
    "METAL_FROM_SOURCE_ENV", "METAL_KERNEL", "METAL_LAUNCH_TOKENS", "METAL_QUICK_REBUILD_REPEATS",
    "METAL_QUICK_VARIANT_COUNTS", "METAL_REBUILD_REPEATS", "METAL_SUMMARY_METRICS", "METAL_VARIANT_COUNTS", "MIB",
    "MULTI_ENTRIES", "MULTI_ENTRY_KERNEL", "PHASE_HEAD_DIMS", "PHASE_REPEATS", "PHASE_SEQ_LEN", "PROTOTYPE",
    "QUICK_MATRIX", "QUICK_PHASE_HEAD_DIMS", "QUICK_PHASE_REPEATS", "QUICK_VARIANT_COUNTS", "SALT", "SALTED_KERNEL",
    "SINGLE_REPEATS", "STITCH_BUDGET_PCT", "SUMMARY_METRICS", "VARIANT_COUNTS", "WARMUP_SALT", "compiler_or_reason",
    "compute_cache_disabled", "matrix_specs", "measure_archive", "measure_cold", "measure_first_launch",
    "measure_phases", "metal_archive_load", "metal_findings", "metal_summary_row", "nvrtc_findings", "rederive_findings",
    "run", "run_metal",
    "salted_variants", "summary_row",
]


def rederive_findings(ctx: ExperimentContext, records: list[dict], previous: list) -> Rederivation:
    """:func:`run`'s findings from a committed run's records (nothing compiled or launched); the Metal
    sweep's requested variant counts follow from the run's ``quick`` flag, as in :func:`run_metal`."""
    if ctx.backend == "metal":
        requested = METAL_QUICK_VARIANT_COUNTS if ctx.quick else METAL_VARIANT_COUNTS
        return Rederivation(findings=metal_findings(ctx, records, requested))
    if not records:
        return Rederivation(unsupported="the run recorded nothing (NVRTC was missing)")
    return Rederivation(findings=nvrtc_findings(ctx, records))


@experiment(name="proto4", prototype=PROTOTYPE, backends=("cpu", "cuda", "metal"), rederive=rederive_findings,
            description="Specialisation cost: cold NVRTC compiles / Metal pipeline builds, kernel archive, "
                        "first launch, compile phases")
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: a cold NVRTC compile of the Prototype 1 kernel costs far more than the
    AC-2.6 budget of 50 ms per variant (ptxas and the front end both hundreds of ms), so
    variants must be pre-compiled; loading a cubin from the on-disk archive is two to three
    orders of magnitude cheaper than compiling it, and precompiled headers barely help
    because the kernels include only two small headers.

    Sweep: cold compiles of 1/10/50/100/500 distinct constant sets (quick: 1/10) on a thread
    pool of os.cpu_count() threads; PTX-only vs cubin (ptxas's own time from -v), automatic
    PCH, one TU with four entries vs four single-entry TUs, per head dim 64/128/256; the
    72-variant archive (HEAD_DIM x BLOCK_R x BLOCK_C x CAUSAL x DTYPE; quick: 4) built into
    a temporary cache and loaded in a fresh process; on cuda the first-launch latency of a
    variant cold, from the archive and from memory.

    Metal hypothesis (unmeasured: no Metal run exists yet): a cold build of one
    flash_attention specialisation (function constants -> MTLFunction ->
    MTLComputePipelineState) costs at least an order of magnitude more than loading the
    same pipeline from an MTLBinaryArchive, so the archive decides the first-call latency
    whichever side of the AC-2.6 50 ms budget a build falls; the library load is paid once
    per process and is small next to building the whole matrix.

    Metal sweep (specs from attnproto.metal_specs): cold builds of 1/10/50/100/500 distinct
    legal specialisations (quick: 1/10; N=1 is three specs each built alone, larger N the
    first N builds of one sequence) plus rebuilds of one spec (does the OS shader cache
    serve them?); the archive matrix HEAD_DIM x BLOCK_R x BLOCK_C x (CAUSAL x DTYPE), its
    84 legal variants (21 of the 27 tiles fit 32 KB) rather than 72 (quick: 4), built into a
    temporary archive and loaded archive-only in a fresh process; the first dispatch of
    three never-built specs cold, from the archive and from memory.
    """
    if ctx.backend == "metal":
        return run_metal(ctx)
    if ctx.backend not in ("cpu", "cuda"):
        raise ExperimentError(f"proto4 has no {ctx.backend} path")
    gpu = ctx.backend == "cuda"
    nat, why = compiler_or_reason(need_nvjitlink=False)
    if nat is None:
        if gpu:
            raise ExperimentError(f"proto4 needs NVRTC: {why}")
        # Nothing here runs without NVRTC: say so instead of measuring nothing silently.
        return ExperimentResult(records=[], findings=[], summary=[{"not_measured": why}])
    arch = ctx.device.get("arch", ARCH_FALLBACK) if gpu else ARCH_FALLBACK
    records = measure_cold(ctx, nat, arch)
    records += measure_phases(ctx, nat, arch)
    records += measure_archive(ctx, nat, arch, gpu)
    if gpu:
        records += measure_first_launch(ctx, nat)
    summary = [summary_row(r) for r in records]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return ExperimentResult(records=records, findings=nvrtc_findings(ctx, records), summary=summary)
