"""Prototype 4's Metal findings: cold pipeline builds, the binary archive, first dispatch, where a
specialisation spends its time, and the AC-2.6 recommendation. Ids name the question
(kernel, counts, library, matrix size); the strategy picked and the dominant cost are
``answer``s."""
from __future__ import annotations

from collections.abc import Sequence

from ... import metal_specs
from ...findings import Finding, fmt, fmt_list, fmt_pct, fmt_ratio
from ..registry import ExperimentContext
from .common import CONSTANTS_BUDGET_MS, MIB, MS_PER_S, PROTOTYPE, STITCH_BUDGET_PCT, by_phase

# A first build less than this many times slower than a rebuild of the same spec is reported
# as possibly served by the OS shader cache (a real compile is an order of magnitude slower).
CACHE_SUSPECT_RATIO = 2.0
# The 72-variant CUDA matrix (seed FR-5) that the Metal matrix stands in for.
CUDA_MATRIX_VARIANTS = 72
PCT = 100.0
ORIGINS = ("cold", "archive", "memory")


def _cache_note(rebuild: dict) -> str:
    met = rebuild["metrics"]
    ratio = met["first_over_rebuild_ratio"]
    return (f"a rebuild of an already-built spec took {fmt(met['rebuild_median_ms'], 'ms')} vs "
            f"{fmt(met['first_build_ms'], 'ms')} for its first build ({fmt_ratio(ratio)})"
            + (f": under {fmt_ratio(CACHE_SUSPECT_RATIO)}, so these 'cold' builds may have been served by the OS "
               "Metal shader cache (e.g. from an earlier run on this Mac)" if ratio < CACHE_SUSPECT_RATIO
               else ": a repeat is served by a cache below attnproto, a first build is not"))


def _cold_finding(ctx: ExperimentContext, cold: list[dict], rebuild: dict, requested: Sequence[int]) -> Finding:
    largest = max(cold, key=lambda r: r["config"]["variants"])
    counts = [r["config"]["variants"] for r in cold]
    lib = largest["config"]["library"]
    note = _cache_note(rebuild)
    return ctx.finding(
        prototype=PROTOTYPE, title=f"Cold pipeline-build cost per flash_attention variant on {ctx.backend}",
        slug=f"cold-build-per-variant-{ctx.backend}",
        claim=("Cold Metal builds of flash_attention (MTLFunctionConstantValues -> specialised MTLFunction -> "
               "MTLComputePipelineState; attnproto's memory cache and binary archive bypassed; library from "
               f"{lib}) on {ctx.backend} ({ctx.device_name}): " + "; ".join(
                   f"N={r['config']['variants']}: {fmt(r['metrics']['per_variant_median_ms'], 'ms')} per variant "
                   f"(p10 {fmt(r['metrics']['per_variant_p10_ms'])}, p90 {fmt(r['metrics']['per_variant_p90_ms'])}, "
                   f"max {fmt(r['metrics']['per_variant_max_ms'])}), "
                   f"{fmt(r['metrics']['build_sum_ms'] / MS_PER_S, 's')} in all" for r in cold)
               + f". The host builds one pipeline at a time, so N>1 is the first N builds of one sequence of "
                 f"{max(counts)} distinct specs (N=1: {metal_specs.PROTO4_SINGLE_BUILDS} specs, each built alone), "
                 f"drawn from the {int(largest['metrics']['candidates_count'])} legal CAUSAL x ROPE x ALIBI x "
                 f"GQA_GROUP x DTYPE x tile combinations outside the archive matrix; all requested counts "
                 f"{fmt_list(requested)} were measured. {note[0].upper()}{note[1:]}."),
        evidence={"per_variant_median_ms": largest["metrics"]["per_variant_median_ms"],
                  "per_variant_p90_ms": largest["metrics"]["per_variant_p90_ms"],
                  "single_build_ms": next(r for r in cold if r["config"]["variants"] == 1)["metrics"][
                      "per_variant_median_ms"],
                  "first_over_rebuild_ratio": rebuild["metrics"]["first_over_rebuild_ratio"]},
        config={"kernel": largest["config"]["kernel"], "variant_counts": counts, "library": lib},
        cv=largest["timing"]["cv"], records=cold + [rebuild])


def _archive_finding(ctx: ExperimentContext, build: dict, load: dict) -> Finding:
    m_build, m_load = build["metrics"], load["metrics"]
    n = int(m_build["variants_count"])
    lib = build["config"]["library"]
    return ctx.finding(
        prototype=PROTOTYPE,
        title=f"Binary archive of the {n}-variant matrix: build and fresh-process load on {ctx.backend}",
        slug=f"archive-{n}-variants-{ctx.backend}",
        claim=(f"The Metal matrix is {n} variants ({build['config']['matrix']}), not {CUDA_MATRIX_VARIANTS}. "
               f"Building it into an MTLBinaryArchive took {fmt(m_build['build_wall_ms'] / MS_PER_S, 's')} (median "
               f"{fmt(m_build['build_median_ms'], 'ms')} per variant including adding it to the archive and writing "
               f"the archive file, {fmt(m_build['store_overhead_median_ms'], 'ms')} above a cold build; first "
               f"quarter {fmt(m_build['build_first_quarter_median_ms'], 'ms')}, last quarter "
               f"{fmt(m_build['build_last_quarter_median_ms'], 'ms')}; {fmt(m_build['archive_bytes'] / MIB, 'MiB')}). "
               f"A fresh process loaded all {n} archive-only in {fmt(m_load['load_total_ms'], 'ms')} (median "
               f"{fmt(m_load['load_median_ms'], 'ms')} each, the first, which opens the archive, "
               f"{fmt(m_load['load_first_ms'], 'ms')}) after loading the library ({lib}) in "
               f"{fmt(m_load['library_load_ms'], 'ms')}: {fmt_ratio(m_load['load_speedup_x'])} faster per variant "
               f"than a cold build ({fmt(m_load['cold_build_median_ms'], 'ms')}), "
               f"{fmt_ratio(m_load['total_speedup_x'])} over the set vs building the archive; the whole process "
               f"including Python start and import took {fmt(m_load['process_wall_ms'] / MS_PER_S, 's')}."),
        evidence={"build_wall_ms": m_build["build_wall_ms"], "load_median_ms": m_load["load_median_ms"],
                  "load_speedup_x": m_load["load_speedup_x"], "total_speedup_x": m_load["total_speedup_x"],
                  "library_load_ms": m_load["library_load_ms"]},
        config={"kernel": build["config"]["kernel"], "variants": n, "library": lib},
        cv=max(build["timing"]["cv"], load["timing"]["cv"]), records=[build, load])


def _dispatch_finding(ctx: ExperimentContext, launch: dict[str, dict]) -> Finding:
    lm = {o: launch[o]["metrics"] for o in launch}
    cold_cfg = launch["cold"]["config"]
    return ctx.finding(
        prototype=PROTOTYPE,
        title="First-dispatch latency of a flash_attention variant on Metal: cold, archive, memory",
        slug=f"first-dispatch-latency-{ctx.backend}",
        claim=(f"From the kernel request to the end of its first dispatch (B=1, N={cold_cfg['tokens']}, "
               f"median of {len(cold_cfg['specs'])} never-built specs) on {ctx.backend} ({ctx.device_name}): "
               + "; ".join(f"{o} {fmt(lm[o]['first_dispatch_median_ms'], 'ms')} "
                           f"({fmt(lm[o]['kernel_median_ms'], 'ms')} obtaining the pipeline, "
                           f"{fmt(lm[o]['dispatch_median_ms'], 'ms')} dispatch, wait and host overhead)"
                           for o in ORIGINS)
               + ". 'archive' reloads from the binary archive this process wrote (memory cache cleared)."),
        evidence={f"{o}_first_dispatch_ms": lm[o]["first_dispatch_median_ms"] for o in lm},
        config={"kernel": cold_cfg["kernel"], "tokens": cold_cfg["tokens"]},
        cv=max(r["timing"]["cv"] for r in launch.values()), records=list(launch.values()))


def _phases_finding(ctx: ExperimentContext, largest: dict, build: dict, load: dict) -> Finding:
    m_build, m_load = build["metrics"], load["metrics"]
    n = int(m_build["variants_count"])
    lib = largest["config"]["library"]
    med = largest["metrics"]["per_variant_median_ms"]
    library_ms = m_load["library_load_ms"]
    builds_ms, loads_ms = n * med, m_load["load_total_ms"]
    build_share = PCT * builds_ms / (library_ms + builds_ms)
    load_share = PCT * loads_ms / (library_ms + loads_ms)
    without = "builds" if builds_ms >= library_ms else "library_load"
    with_archive = "archive_loads" if loads_ms >= library_ms else "library_load"
    return ctx.finding(
        prototype=PROTOTYPE, title=f"What a Metal specialisation spends its time on ({ctx.backend})",
        slug=f"build-phases-{ctx.backend}",
        claim=(f"Library load ({lib}) in a fresh process: {fmt(library_ms, 'ms')}, once. Per variant: cold "
               f"specialisation + pipeline build {fmt(med, 'ms')} (median over {largest['config']['variants']}), "
               f"writing it to the archive {fmt(m_build['store_overhead_median_ms'], 'ms')} more, loading it from "
               f"the archive {fmt(m_load['load_median_ms'], 'ms')}. Starting a process that needs the {n}-variant "
               f"matrix: without an archive, library {fmt(library_ms, 'ms')} + builds {fmt(builds_ms, 'ms')} (builds "
               f"{fmt_pct(build_share / PCT)}: "
               + ("builds dominate" if without == "builds" else "library load dominates")
               + f"); with the archive, library {fmt(library_ms, 'ms')} + loads {fmt(loads_ms, 'ms')} (loads "
                 f"{fmt_pct(load_share / PCT)}: "
               + ("archive loads dominate" if with_archive == "archive_loads" else "library load dominates")
               + "). Function specialisation (newFunctionWithName:constantValues:) and pipeline creation "
                 "(newComputePipelineStateWithDescriptor:) cannot be split: the host times them together as the "
                 "kernel's compile_ms."),
        evidence={"library_load_ms": library_ms, "cold_build_median_ms": med, "build_share_pct": build_share,
                  "load_share_pct": load_share, "store_overhead_median_ms": m_build["store_overhead_median_ms"],
                  "load_median_ms": m_load["load_median_ms"]},
        config={"kernel": largest["config"]["kernel"], "library": lib, "variants": n},
        answer={"dominant_without_archive": without, "dominant_with_archive": with_archive},
        cv=max(largest["timing"]["cv"], build["timing"]["cv"], load["timing"]["cv"]),
        records=[largest, build, load])


def _recommendation_finding(ctx: ExperimentContext, single: dict, largest: dict, build: dict, load: dict,
                            rebuild: dict) -> Finding:
    m_build, m_load = build["metrics"], load["metrics"]
    n = int(m_build["variants_count"])
    one = single["metrics"]["per_variant_median_ms"]
    med = largest["metrics"]["per_variant_median_ms"]
    budget = fmt(CONSTANTS_BUDGET_MS, "ms")
    on_demand = one < CONSTANTS_BUDGET_MS
    if on_demand:
        verdict = (f"specialise with function constants on demand: a cold build of one variant costs "
                   f"{fmt(one, 'ms')} < {budget}; the binary archive still cuts a first call's "
                   f"{fmt(one, 'ms')} to {fmt(m_load['load_median_ms'], 'ms')}")
    else:
        verdict = (f"ship the binary archive (build it at install or in CI) and load at start-up: a cold build of "
                   f"one variant costs {fmt(one, 'ms')} >= {budget} ({fmt(med, 'ms')} each over "
                   f"{largest['config']['variants']} variants), an archive load {fmt(m_load['load_median_ms'], 'ms')} "
                   f"({fmt_ratio(m_load['load_speedup_x'])} less); building on demand stalls the first call of each "
                   f"variant")
    suspect = rebuild["metrics"]["first_over_rebuild_ratio"] < CACHE_SUSPECT_RATIO
    return ctx.finding(
        prototype=PROTOTYPE, title=f"AC-2.6 recommendation for variant specialisation on Metal ({ctx.backend})",
        slug=f"recommendation-{ctx.backend}",
        claim=(f"AC-2.6 rule (stitch if overhead < {fmt_pct(STITCH_BUDGET_PCT / PCT)}, function constants if a "
               f"build < {budget}/variant, else pre-compile): {verdict}. The {n}-variant archive builds "
               f"in {fmt(m_build['build_wall_ms'] / MS_PER_S, 's')} and a fresh process loads it in "
               f"{fmt((m_load['library_load_ms'] + m_load['load_total_ms']) / MS_PER_S, 's')} including the library."
               + (f" Caveat: {_cache_note(rebuild)}." if suspect else "")),
        evidence={"single_build_ms": one, "budget_ms": CONSTANTS_BUDGET_MS, "load_median_ms": m_load["load_median_ms"],
                  "build_wall_ms": m_build["build_wall_ms"]},
        config={"kernel": single["config"]["kernel"], "rule": "AC-2.6"},
        answer={"strategy": "function_constants_on_demand" if on_demand else "ship_binary_archive",
                "os_shader_cache_suspected": suspect},
        cv=max(single["timing"]["cv"], load["timing"]["cv"]), records=[single, largest, build, load])


def metal_findings(ctx: ExperimentContext, records: list[dict], requested: Sequence[int]) -> list[Finding]:
    """The five Metal findings; ``requested`` is the sweep's variant counts (all must have been measured)."""
    cold = by_phase(records, "metal_cold_build")
    rebuild = by_phase(records, "metal_rebuild")[0]
    build = by_phase(records, "metal_archive_build")[0]
    load = by_phase(records, "metal_archive_load")[0]
    launch = {r["config"]["origin"]: r for r in by_phase(records, "metal_first_dispatch")}
    largest = max(cold, key=lambda r: r["config"]["variants"])
    single = next(r for r in cold if r["config"]["variants"] == 1)
    return [_cold_finding(ctx, cold, rebuild, requested), _archive_finding(ctx, build, load),
            _dispatch_finding(ctx, launch), _phases_finding(ctx, largest, build, load),
            _recommendation_finding(ctx, single, largest, build, load, rebuild)]
