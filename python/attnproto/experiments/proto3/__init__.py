"""``proto3``: PagedAttention — split-KV decode over a paged KV cache, its block size, what paging
costs against contiguous KV, when splitting the context pays, and what packing a GQA group buys.

Modules: ``common`` (sweeps, names), ``cuda`` (the H200 sweep and its anchors), ``flex`` (the
flex_attention paged anchor), ``cpu`` (the numpy path CI runs), ``findings``, ``summary`` (the report table).
"""
from __future__ import annotations

from ..registry import ExperimentContext, ExperimentResult, experiment
from . import common as C
from .summary import summary_table

__all__ = ["run", "summary_table"]


@experiment("proto3", C.PROTOTYPE, "paged KV decode: block size, paging overhead, split-KV, GQA packing vs torch",
            backends=("cpu", "cuda", "metal"))
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: decode is a pure read of K and V, so a kernel that gathers pages row by row
    through a cp.async ring (the page ids fetched one tile ahead) reads at the speed of a
    contiguous kernel: paging costs nothing measurable at block 16, even block 1 stays within
    15 %, packing a GQA group into one CTA divides the K/V traffic by the group, and splitting
    the context pays exactly when the batch x kv heads leaves SMs idle.

    Sweep (cuda): bf16, D = 128. Block sweep: B = 32, 32/8 heads, context 4K and 16K, block
    sizes 1-256, ours on a scattered and an identity table and on contiguous K/V, anchors
    (torch SDPA cuDNN and flash on contiguous K/V with enable_gqa, gather + SDPA, compiled
    flex_attention over torch's paged helper at one point). Scale sweep: block 16, heads
    (32, 8), (64, 8), (32, 32) x context 1K-128K x batch 1-256 (K+V <= 16 GiB), with the SDPA
    anchors. Split sweep: B = 1 at context 1K, 4K and 32K and B = 8 at 32K, partitions 1-128
    and auto. Tile sweep: warps x keys per warp x stages at B = 32 (4K, 16K; block 16 and
    contiguous) and B = 1 (32K). Packing: packed vs one head per CTA. Bandwidth against a
    pure-read ceiling (shaders/cuda/read_ceiling.cu over 4 GiB) measured first; every output
    checked against cuDNN's at full size. Sweep (metal): ``metal.run_metal``
    (statically checked on Linux, not run there). Sweep (cpu): numpy paged_forward vs
    flash_forward, blocks 1/16/64, context 256 and 1024, against FP64.
    """
    if ctx.backend == "cuda":
        from .cuda import Runner, budget_map, run_points  # noqa: PLC0415
        from .findings import budget_table, findings_of  # noqa: PLC0415

        runner = Runner(ctx)
        runner.read_ceiling()
        run_points(runner)
        rows = budget_map(runner)
        runner.write_notes()
        return ExperimentResult(runner.records, findings_of(ctx, runner.records, rows), summary=budget_table(rows))
    if ctx.backend == "metal":
        from .metal import run_metal  # noqa: PLC0415

        return run_metal(ctx)
    from .cpu import run_cpu  # noqa: PLC0415

    return run_cpu(ctx)
