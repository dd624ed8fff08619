"""Prototype 4's NVRTC / CUDA findings: cold compile cost, the cubin archive, compile phases,
first-launch latency and the AC-2.6 recommendation. Ids name the question (kernel, counts,
head dims, rule); the strategy the numbers pick is the recommendation's ``answer``."""
from __future__ import annotations

import numpy as np

from ...findings import Finding, fmt, fmt_pct, fmt_ratio
from ..registry import ExperimentContext
from .common import (
    CONSTANTS_BUDGET_MS,
    KERNEL,
    LAUNCH_REPEATS,
    LAUNCH_SHAPE,
    MIB,
    MS_PER_S,
    PROTOTYPE,
    STITCH_BUDGET_PCT,
    by_phase,
)
from .variants import SALT, _base_configs

PCT = 100.0


def _cold_finding(ctx: ExperimentContext, cold: list[dict]) -> Finding:
    where = f"{ctx.backend} ({ctx.device_name})"
    largest = max(cold, key=lambda r: r["config"]["variants"])
    return ctx.finding(
        prototype=PROTOTYPE, title=f"Cold NVRTC compile cost per flash_fwd_mma variant on {ctx.backend}",
        slug=f"cold-compile-per-variant-{ctx.backend}",
        claim=("Cold NVRTC -> cubin compiles of flash_fwd_mma (no memory or disk cache) on " + where + ": " + "; ".join(
            f"N={r['config']['variants']}: {fmt(r['metrics']['per_variant_median_ms'], 'ms')} per variant "
            f"(p10 {fmt(r['metrics']['per_variant_p10_ms'])}, p90 {fmt(r['metrics']['per_variant_p90_ms'])}), "
            f"batch wall {fmt(r['metrics']['batch_wall_ms'] / MS_PER_S, 's')} on {r['config']['jobs']} threads "
            f"({fmt(r['metrics']['wall_per_variant_ms'], 'ms')}/variant effective)" for r in cold)
            + f". Variants past the {len(_base_configs())} legal tile configurations differ only in {SALT}, "
              "a named constant the kernel ignores (identical compile work, distinct key)."),
        evidence={"per_variant_median_ms": largest["metrics"]["per_variant_median_ms"],
                  "per_variant_p90_ms": largest["metrics"]["per_variant_p90_ms"],
                  "batch_wall_ms": largest["metrics"]["batch_wall_ms"],
                  "wall_per_variant_ms": largest["metrics"]["wall_per_variant_ms"],
                  "legal_tiles_count": float(len(_base_configs()))},
        config={"kernel": KERNEL, "variant_counts": [r["config"]["variants"] for r in cold],
                "arch": largest["config"]["arch"]},
        cv=largest["timing"]["cv"], records=cold)


def _archive_finding(ctx: ExperimentContext, arch_rec: dict) -> Finding:
    m = arch_rec["metrics"]
    n = int(m["variants_count"])
    claim = (f"Building the archive of {n} variants ({arch_rec['config']['matrix']}) took "
             f"{fmt(m['build_wall_ms'] / MS_PER_S, 's')} wall on {fmt(int(m['jobs_count']))} threads "
             f"({fmt(m['compile_sum_ms'] / MS_PER_S, 's')} of compiles, median {fmt(m['compile_median_ms'], 'ms')} "
             f"each, {fmt(m['archive_bytes'] / MIB, 'MiB')} on disk). A fresh process read and verified all {n} in "
             f"{fmt(m['load_total_ms'], 'ms')} (median {fmt(m['load_median_ms'], 'ms')} each): "
             f"{fmt_ratio(m['load_speedup_x'])} faster per variant than compiling, {fmt_ratio(m['total_speedup_x'])} "
             f"over the set; the whole process including Python start and import took "
             f"{fmt(m['process_wall_ms'] / MS_PER_S, 's')}.")
    ev = {"build_wall_ms": m["build_wall_ms"], "load_median_ms": m["load_median_ms"],
          "load_speedup_x": m["load_speedup_x"], "total_speedup_x": m["total_speedup_x"]}
    if "kernel_load_median_ms" in m:
        claim += (f" Loading them as kernels (archive read + cuModuleLoadData + cuModuleGetFunction) took "
                  f"{fmt(m['kernel_load_median_ms'], 'ms')} each ({fmt(m['kernel_load_total_ms'], 'ms')} for all).")
        ev["kernel_load_median_ms"] = m["kernel_load_median_ms"]
    return ctx.finding(
        prototype=PROTOTYPE,
        title=f"Cubin archive of the {n}-variant matrix: build and fresh-process load on {ctx.backend}",
        slug=f"archive-{n}-variants-{ctx.backend}", claim=claim, evidence=ev,
        config={"kernel": KERNEL, "variants": n, "arch": arch_rec["config"]["arch"]},
        cv=arch_rec["timing"]["cv"], records=[arch_rec])


def _phases_finding(ctx: ExperimentContext, records: list[dict]) -> Finding:
    split = by_phase(records, "split")
    pch = by_phase(records, "pch")
    multi = by_phase(records, "multi_entry")

    def split_text(r: dict) -> str:
        met = r["metrics"]
        how = ("ptxas's own report" if met.get("ptxas_from_log_count", 1.0) == 1.0
               else "ptxas alone: nvJitLink assembling the PTX")
        return (f"D={r['config']['head_dim']} ({r['config']['tiles']}): cubin {fmt(met['cubin_median_ms'], 'ms')} = "
                f"ptxas {fmt(met['ptxas_median_ms'], 'ms')} ({fmt_pct(met['ptxas_share_pct'] / PCT)}, {how}) + "
                f"front end and NVVM {fmt(met['frontend_median_ms'], 'ms')}; a PTX-only compile took "
                f"{fmt(met['ptx_median_ms'], 'ms')}")

    claim = ("; ".join(split_text(r) for r in split)
             + ". Automatic precompiled headers (-pch): " + "; ".join(
                 f"D={r['config']['head_dim']}: {fmt(r['metrics']['pch_use_median_ms'], 'ms')} with the PCH vs "
                 f"{fmt(r['metrics']['no_pch_median_ms'], 'ms')} without ({fmt_ratio(r['metrics']['pch_speedup_x'])}, "
                 f"used {fmt(int(r['metrics']['pch_used_count']))} times)" for r in pch)
             + ". Four CAUSAL x DTYPE entries in one translation unit vs four single-entry compiles: " + "; ".join(
                 f"D={r['config']['head_dim']}: {fmt(r['metrics']['multi_entry_median_ms'])} vs "
                 f"{fmt(r['metrics']['four_singles_median_ms'], 'ms')} "
                 f"({fmt_ratio(r['metrics']['multi_over_singles_ratio'])})" for r in multi) + ".")
    return ctx.finding(
        prototype=PROTOTYPE, title=f"Where NVRTC spends a flash_fwd_mma compile on {ctx.backend}",
        slug=f"compile-phases-{ctx.backend}", claim=claim,
        evidence={"ptxas_share_pct": float(np.median([r["metrics"]["ptxas_share_pct"] for r in split])),
                  "pch_speedup_x": float(np.median([r["metrics"]["pch_speedup_x"] for r in pch])),
                  "multi_over_singles_ratio": float(np.median([r["metrics"]["multi_over_singles_ratio"]
                                                               for r in multi]))},
        config={"kernel": KERNEL, "head_dims": [r["config"]["head_dim"] for r in split]},
        cv=max(r["timing"]["cv"] for r in split + pch + multi), records=split + pch + multi)


def _launch_finding(ctx: ExperimentContext, launch: list[dict]) -> Finding:
    lm = {r["config"]["origin"]: r for r in launch}
    b, h, n = LAUNCH_SHAPE
    first = {o: lm[o]["metrics"]["first_launch_median_ms"] for o in lm}
    return ctx.finding(
        prototype=PROTOTYPE, title="First-launch latency of a flash_fwd_mma variant: cold, archive, memory",
        slug="first-launch-latency",
        claim=(f"From the kernel request to the end of its first (tiny: B={b}, H={h}, N={n}) launch: cold "
               f"{fmt(first['cold'], 'ms')}, from the archive {fmt(first['archive'], 'ms')}, from memory "
               f"{fmt(first['memory'], 'ms')} (median of {LAUNCH_REPEATS}); "
               + ("the machine's compute cache was disabled (CUDA_CACHE_DISABLE=1), so 'cold' compiled for real."
                  if lm["cold"]["config"].get("compute_cache_disabled") else
                  "the machine's compute cache was NOT disabled: 'cold' may have been served from it.")),
        evidence={f"{o}_first_launch_ms": ms for o, ms in first.items()},
        config={"kernel": KERNEL, "tiles": lm["cold"]["config"]["tiles"]},
        cv=max(r["timing"]["cv"] for r in launch), records=launch)


def _recommendation_finding(ctx: ExperimentContext, cold: list[dict], arch_rec: dict) -> Finding:
    """AC-2.6, derived from the numbers: an on-demand compile is one variant compiled alone (the
    N=1 record), not the contended per-variant time inside a batch."""
    largest = max(cold, key=lambda r: r["config"]["variants"])
    med = largest["metrics"]["per_variant_median_ms"]
    single = next(r for r in cold if r["config"]["variants"] == 1)
    one = single["metrics"]["per_variant_median_ms"]
    m = arch_rec["metrics"]
    n = int(m["variants_count"])
    load = m["load_median_ms"]
    budget = fmt(CONSTANTS_BUDGET_MS, "ms")
    on_demand = one < CONSTANTS_BUDGET_MS
    if on_demand:
        verdict = (f"compile specialisations on demand (named constants): a cold compile costs {fmt(one, 'ms')} "
                   f"< {budget}")
    else:
        verdict = (f"pre-compile every variant into the archive and load at start-up: a cold compile of one "
                   f"variant costs {fmt(one, 'ms')} >= {budget} ({fmt(med, 'ms')} each inside the "
                   f"{largest['config']['variants']}-variant batch), an archive load {fmt(load, 'ms')} "
                   f"({fmt_ratio(m['load_speedup_x'])} less); compiling on demand stalls the first call of each "
                   f"variant by the compile time")
    return ctx.finding(
        prototype=PROTOTYPE, title=f"AC-2.6 recommendation for variant specialisation on CUDA ({ctx.backend})",
        slug=f"recommendation-{ctx.backend}",
        claim=(f"AC-2.6 rule (stitch if overhead < {fmt_pct(STITCH_BUDGET_PCT / PCT)}, function constants if "
               f"compile < {budget}/variant, else pre-compile): {verdict}. The {n}-variant archive builds in "
               f"{fmt(m['build_wall_ms'] / MS_PER_S, 's')} on {fmt(int(m['jobs_count']))} threads, so building it "
               f"in CI/at install is cheap; the run-time dispatch side of the rule is measured by proto2."),
        evidence={"single_compile_ms": one, "budget_ms": CONSTANTS_BUDGET_MS, "load_median_ms": load,
                  "build_wall_ms": m["build_wall_ms"]},
        config={"kernel": KERNEL, "rule": "AC-2.6"},
        answer={"strategy": "compile_on_demand" if on_demand else "precompile_archive"},
        cv=max(single["timing"]["cv"], arch_rec["timing"]["cv"]), records=[single, largest, arch_rec])


def nvrtc_findings(ctx: ExperimentContext, records: list[dict]) -> list[Finding]:
    cold = by_phase(records, "cold_compile")
    arch_rec = by_phase(records, "archive")[0]
    out = [_cold_finding(ctx, cold), _archive_finding(ctx, arch_rec), _phases_finding(ctx, records)]
    launch = by_phase(records, "first_launch")
    if launch:
        out.append(_launch_finding(ctx, launch))
    out.append(_recommendation_finding(ctx, cold, arch_rec))
    return out
