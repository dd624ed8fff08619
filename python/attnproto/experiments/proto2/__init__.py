"""Prototype 2 — run-time dispatch vs specialisation ("function stitching") on CUDA.

The Prototype 1 tensor-core kernel (flash_fwd_mma, mma.sync FA2) as
shaders/cuda/flash_fwd_mma_stitch.cu, with its per-tile score (+ mask), softmax and
accumulate stages dispatched four ways (attnproto.ops.stitch: 0 inline = flash_fwd_mma's
code, 1 __noinline__, 2 device function-pointer table, 3 separate LTO-IR linked by
nvJitLink at load time). Every mode runs the same stage code, so O and LSE must be
bit-identical to mode 0, and mode 0 to flash_fwd_mma.

Dispatched calls of one launch = per (batch, head), per CTA, per warp, 3 per K/V tile the
warp processes (causal: the tiles it sees; stitch.dispatched_calls). Overhead per call is
reported two ways: amortised over all calls of the launch, and along one warp's serial path
(the delta times the resident warps divided by the calls, resident warps from the
occupancy that registers, static + dynamic shared memory and the block size allow; the
kernels are __launch_bounds__(threads, 1), which caps threads per block, not blocks per
SM). On "cpu" the experiment measures what needs no GPU: NVRTC/nvJitLink build cost and
ptxas's resource report (registers, stack frame, spills) per mode.

Modules: ``common`` (constants), ``build`` (cpu and cuda: build cost), ``cuda`` (kernel
times and bit identity), ``findings``. ``rederive_findings`` computes the findings again from a
committed run's records (``attnproto kb rederive``).
"""
from __future__ import annotations

import json

from ..proto4 import compiler_or_reason
from ..registry import ExperimentContext, ExperimentError, ExperimentResult, Rederivation, experiment
from .build import build_configs, measure_builds
from .common import (
    ARCH_FALLBACK,
    BUILD_REPEATS,
    DTYPE,
    ITERS,
    PROTOTYPE,
    QUICK_ITERS,
    QUICK_SHAPES,
    SHAPES,
    STITCH_BUDGET_PCT,
    WARMUP,
)
from .cuda import measure_runs, resident_warps
from .findings import build_findings, run_findings

__all__ = [
    "ARCH_FALLBACK", "BUILD_REPEATS", "DTYPE", "ITERS", "PROTOTYPE", "QUICK_ITERS", "QUICK_SHAPES", "SHAPES",
    "STITCH_BUDGET_PCT", "WARMUP", "build_configs", "build_findings", "compiler_or_reason", "measure_builds",
    "measure_runs", "rederive_findings", "resident_warps", "run", "run_findings",
]


def rederive_findings(ctx: ExperimentContext, records: list[dict], previous: list) -> Rederivation:
    """:func:`run`'s findings from a committed run's records (nothing measured or compiled)."""
    if not records:
        return Rederivation(unsupported="the run recorded nothing (NVRTC or nvJitLink was missing)")
    found = build_findings(ctx, records)
    if ctx.backend == "cuda":
        found += run_findings(ctx, records)
    return Rederivation(findings=found)


@experiment(name="proto2", prototype=PROTOTYPE, backends=("cpu", "cuda"), rederive=rederive_findings,
            description="Run-time dispatch vs specialisation: inline, noinline, function table, nvJitLink LTO")
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: in the tensor-core inner loop of Prototype 1, __noinline__ stages and a device
    function-pointer table cost well over 1 % (the S and O register tiles go through local
    memory at every call, plus the call ABI and no scheduling across the call), while stages
    compiled separately to LTO-IR and linked by nvJitLink at load time are inlined by the link
    and run at the specialised speed; every mode gives outputs bit-identical to mode 0, and
    mode 0 to flash_fwd_mma.

    Sweep: STITCH_MODE 0/1/2/3 x (B, H, N, D, causal) = (4, 16, 2048, 128, no), (2, 16, 4096,
    64, no), (4, 16, 2048, 128, yes), BF16, the Prototype 1 chooser's tiles (quick: (1, 8,
    1024, 128, no)); per mode the NVRTC/nvJitLink build time and ptxas resource report (cpu
    and cuda), and on cuda the kernel time against mode 0, the calls dispatched, and the
    element-wise equality of O and LSE with mode 0 and with flash_fwd_mma.
    """
    if ctx.backend not in ("cpu", "cuda"):
        raise ExperimentError(f"proto2 has no {ctx.backend} path")
    gpu = ctx.backend == "cuda"
    nat, why = compiler_or_reason(need_nvjitlink=True)
    if nat is None:
        if gpu:
            raise ExperimentError(f"proto2 needs NVRTC and nvJitLink: {why}")
        # Nothing here runs without NVRTC and nvJitLink: say so instead of measuring nothing silently.
        return ExperimentResult(records=[], findings=[], summary=[{"not_measured": why}])
    shapes = QUICK_SHAPES if ctx.quick else SHAPES
    arch = ctx.device.get("arch", ARCH_FALLBACK) if gpu else ARCH_FALLBACK
    records = measure_builds(ctx, arch, shapes)
    findings = build_findings(ctx, records)
    if gpu:
        records += measure_runs(ctx, shapes)
        findings += run_findings(ctx, records)
    summary = [{"phase": r["config"]["phase"], "mode": r["config"]["mode"], "tile": r["config"]["tile"],
                **{k: round(v, 4) for k, v in r["metrics"].items()}} for r in records]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return ExperimentResult(records=records, findings=findings, summary=summary)
