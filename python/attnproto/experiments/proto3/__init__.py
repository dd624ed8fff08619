"""``proto3``: PagedAttention — split-KV decode over a paged KV cache, its block size, what paging
costs against contiguous KV, when splitting the context pays, and what packing a GQA group buys.

Modules: ``common`` (sweeps, names), ``cuda`` (the H200 sweep and its anchors), ``flex`` (the
flex_attention paged anchor), ``cpu`` (the numpy path CI runs), ``findings``, ``summary`` (the report table).
``rederive_findings`` computes the CUDA findings again from a committed run's records (``attnproto kb rederive``).
"""
from __future__ import annotations

import re

from ..registry import ExperimentContext, ExperimentResult, Rederivation, experiment
from . import common as C
from .summary import summary_table

__all__ = ["budget_rows_from_finding", "rederive_findings", "run", "summary_table"]

#: Slug of the budget-map finding, whose evidence holds the compiled kernel's resources per (D, block).
BUDGET_SLUG = "paged-decode-budget-map"
_BUDGET_KEY_RE = re.compile(r"d(?P<d>\d+)_bs(?P<bs>\d+)_(?P<what>smem_bytes|regs)")
_BUDGET_FIELDS = {"smem_bytes": "smem_bytes", "regs": "registers"}


def budget_rows_from_finding(finding) -> list[dict]:
    """The budget map's rows (per D x block size: shared memory and registers of the compiled kernel,
    which :func:`cuda.budget_map` reads from the driver) as the budget finding's evidence recorded them."""
    rows: dict[tuple[int, int], dict] = {}
    for key, value in finding.evidence.items():
        m = _BUDGET_KEY_RE.fullmatch(key)
        if m:
            d, bs = int(m["d"]), int(m["bs"])
            rows.setdefault((d, bs), {"head_dim": d, "block_size": bs})[_BUDGET_FIELDS[m["what"]]] = int(value)
    return [rows[k] for k in sorted(rows) if set(_BUDGET_FIELDS.values()) <= set(rows[k])]


def rederive_findings(ctx: ExperimentContext, records: list[dict], previous: list) -> Rederivation:
    """The CUDA run's findings from its records (nothing measured). The budget map's kernel resources
    come from the driver, not from a timed record: they are read back from the previous budget finding's
    evidence (kept as it is when there is none)."""
    if ctx.backend != "cuda":
        return Rederivation(unsupported=f"proto3's {ctx.backend} findings are computed inside its measuring loop "
                                        "(cpu) or name the run's timer (metal), not by a generator over records")
    from .findings import best_block, budget, overhead, packing, recommendation, split, tiles  # noqa: PLC0415

    blocks = best_block(ctx, records)
    found = blocks + overhead(ctx, records) + split(ctx, records) + tiles(ctx, records)
    kept = {}
    old = next((f for f in previous if f.slug == BUDGET_SLUG), None)
    rows = budget_rows_from_finding(old) if old is not None else []
    if rows:
        found.insert(len(blocks), budget(ctx, rows, records))
    else:
        kept[BUDGET_SLUG] = "the compiled kernel's shared memory and registers are not in records.jsonl"
    found += [f for f in (packing(ctx, records), recommendation(ctx, records, blocks)) if f is not None]
    return Rederivation(findings=found, kept=kept)


@experiment("proto3", C.PROTOTYPE, "paged KV decode: block size, paging overhead, split-KV, GQA packing vs torch",
            backends=("cpu", "cuda", "metal"), rederive=rederive_findings)
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
