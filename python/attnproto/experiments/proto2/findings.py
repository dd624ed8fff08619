"""Prototype 2's findings: build cost and resources per mode (cpu and cuda); dispatch overhead,
bit identity, the AC-2.4 break-even and the dispatch recommendation (cuda).

Every id names the question (shape, tile, budget); what the numbers picked (modes under
the budget, the recommended composition) is the finding's ``answer``."""
from __future__ import annotations

import math

from ...findings import Finding, fmt, fmt_pct
from ...ops import stitch
from ..registry import ExperimentContext
from .common import DTYPE, PROTOTYPE, STITCH_BUDGET_PCT, rows, signed_pct
from .cuda import NS_PER_MS

PS_PER_NS = 1e3
PCT = 100.0


def _cv(recs) -> float:
    return max(r["timing"]["cv"] for r in recs)


def build_findings(ctx: ExperimentContext, records: list[dict]) -> list[Finding]:
    main_tile = rows(records, "build")[0]["config"]["tile"]
    by_mode = {r["config"]["mode"]: r for r in rows(records, "build", tile=main_tile)}
    d = by_mode[0]["config"]["head_dim"]
    linked = by_mode[stitch.LINKED_MODE]["metrics"]
    out = [ctx.finding(
        prototype=PROTOTYPE, title=f"Build cost of each dispatch mode (NVRTC, nvJitLink) on {ctx.backend}",
        slug=f"build-cost-per-mode-{ctx.backend}",
        claim=(f"At {main_tile}: " + "; ".join(
            f"mode {m} ({stitch.MODE_NAMES[m]}) {fmt(r['metrics']['build_median_ms'], 'ms')}"
            + (f" (4 LTO-IR compiles + nvJitLink link {fmt(r['metrics']['link_median_ms'], 'ms')})"
               if m == stitch.LINKED_MODE else "")
            for m, r in sorted(by_mode.items()))
            + ". Mode 3's link is the load-time cost of stitching pre-compiled stages."),
        evidence={"inline_build_ms": by_mode[0]["metrics"]["build_median_ms"],
                  "linked_build_ms": linked["build_median_ms"], "link_ms": linked["link_median_ms"]},
        config={"head_dim": d, "tile": main_tile, "dtype": DTYPE}, cv=_cv(by_mode.values()),
        records=list(by_mode.values()))]
    if not all(r["metrics"]["ptxas_report_count"] == 1.0 for r in by_mode.values()):
        return out
    inlined = linked["device_functions_count"] == 0
    out.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Resource cost of non-inlined stages (ptxas report) on {ctx.backend}",
        slug=f"resources-per-mode-{ctx.backend}",
        claim=(f"At {main_tile} (ptxas -v / nvJitLink -verbose): " + "; ".join(
            f"mode {m} ({stitch.MODE_NAMES[m]}) {fmt(int(r['metrics']['registers_regs']))} registers, "
            f"{fmt(int(r['metrics']['stack_frame_bytes']), 'B')} kernel stack frame, "
            f"{fmt(int(r['metrics']['spill_bytes']), 'B')} spills, "
            f"{fmt(int(r['metrics']['device_functions_count']))} separately compiled stage functions"
            for m, r in sorted(by_mode.items()))
            + (". The nvJitLink LTO link inlined all three stages into the kernel." if inlined else
               ". The nvJitLink link kept the stages as separate functions.")),
        evidence={f"mode{m}_stack_frame_bytes": r["metrics"]["stack_frame_bytes"] for m, r in by_mode.items()}
        | {f"mode{m}_registers_regs": r["metrics"]["registers_regs"] for m, r in by_mode.items()},
        config={"head_dim": d, "tile": main_tile, "dtype": DTYPE}, answer={"linked_stages_inlined": bool(inlined)},
        cv=_cv(by_mode.values()), records=list(by_mode.values())))
    return out


def _shape_rows(records, shape) -> dict[int, dict]:
    b, h, n, d, causal = shape
    return {r["config"]["mode"]: r for r in rows(records, "run", batch=b, num_heads=h, seq_len=n, head_dim=d,
                                                  causal=causal)}


def _overhead_finding(ctx: ExperimentContext, records, shape) -> Finding:
    b, h, n, d, causal = shape
    by_mode = _shape_rows(records, shape)
    base = by_mode[0]
    mask = "causal" if causal else "non-causal"
    claim = (f"B={b}, H={h}, N={n}, D={d}, {mask} ({DTYPE}, tiles {base['config']['tile']}; "
             f"{fmt(int(base['metrics']['calls_count']))} dispatched calls per launch, "
             f"{fmt(int(base['metrics']['resident_warps_count']))} resident warps): mode 0 (inline) "
             f"{fmt(base['metrics']['median_ms'], 'ms')}; " + "; ".join(
                 f"mode {m} ({stitch.MODE_NAMES[m]}) {fmt(r['metrics']['median_ms'], 'ms')}, "
                 f"{signed_pct(r['metrics']['overhead_pct'])} = {fmt(r['metrics']['serial_ns_per_call_ns'], 'ns')} "
                 f"per call on a warp's serial path "
                 f"({fmt(r['metrics']['amortised_ns_per_call_ns'] * PS_PER_NS, 'ps')} amortised), "
                 f"{fmt(int(r['metrics']['registers_regs']))} regs, {fmt(int(r['metrics']['local_bytes']), 'B')} local"
                 for m, r in sorted(by_mode.items()) if m != 0) + ".")
    return ctx.finding(
        prototype=PROTOTYPE, title=f"Dispatch overhead per mode at N={n}, D={d} ({mask})",
        slug=f"overhead-n{n}-d{d}" + ("-causal" if causal else ""), claim=claim,
        evidence={f"mode{m}_overhead_pct": r["metrics"]["overhead_pct"] for m, r in by_mode.items() if m}
        | {f"mode{m}_serial_ns": r["metrics"]["serial_ns_per_call_ns"] for m, r in by_mode.items() if m},
        config={"batch": b, "num_heads": h, "seq_len": n, "head_dim": d, "causal": causal, "dtype": DTYPE},
        cv=_cv(by_mode.values()), records=list(by_mode.values()))


def _identity_finding(ctx: ExperimentContext, runs, shapes) -> Finding:
    """Bit identity over every shape: every mode against mode 0, and mode 0 against flash_fwd_mma."""
    diff = sum(r["metrics"]["differing_elements_count"] for r in runs)
    diff_prod = sum(r["metrics"]["differing_from_production_count"] for r in runs if r["config"]["mode"] == 0)
    by_mode = {m: sum(r["metrics"]["differing_elements_count"] for r in runs if r["config"]["mode"] == m)
               for m in stitch.MODES if m}
    max_diff = max(r["metrics"]["max_abs_diff_err"] for r in runs)
    prod_text = ("mode 0 equals the production flash_fwd_mma bit for bit (its SASS is the same code)"
                 if diff_prod == 0 else f"mode 0 differs from flash_fwd_mma in {fmt(int(diff_prod))} elements")
    if diff == 0:
        claim = (f"On random BF16 inputs at {fmt(len(shapes))} shapes, modes 1-3 differ from mode 0 in "
                 f"{fmt(int(diff))} O/LSE elements (max abs difference {fmt(max_diff)}) and {prod_text}: every "
                 "mode runs the same stage code (mma.sync, MUFU exp2, explicit fmaf), so neither the call "
                 "boundary nor LTO changed the arithmetic.")
    else:
        claim = ("Modes 1-3 differ from mode 0 in O/LSE elements ("
                 + ", ".join(f"mode {m}: {fmt(int(c))}" for m, c in by_mode.items())
                 + f"), {prod_text}: the compiler contracted or reordered floating point differently across the "
                   "call boundary (candidate: row_max * scale_log2 - mx_scaled in online_softmax).")
    return ctx.finding(
        prototype=PROTOTYPE, title="Bit identity of the four dispatch modes' attention outputs",
        slug="bit-identity", claim=claim,
        evidence={"differing_elements_count": diff, "differing_from_production_count": diff_prod,
                  "max_abs_diff_err": max_diff},
        config={"shapes": [list(s) for s in shapes]},
        answer={"bit_identical": diff == 0 and diff_prod == 0, "modes_equal_mode0": diff == 0,
                "mode0_equals_production": diff_prod == 0},
        cv=_cv(runs), records=runs)


def _breakeven_part(m: int, r: dict, base_ms: float, compile_ms: float, per_call_work_ns: float,
                    ev: dict[str, float]) -> str:
    budget = fmt_pct(STITCH_BUDGET_PCT / PCT)
    over = max(r["metrics"]["serial_ns_per_call_ns"], 0.0)
    need_ns = over * (PCT / STITCH_BUDGET_PCT)
    delta_ms = r["metrics"]["median_ms"] - base_ms
    ev[f"mode{m}_breakeven_work_ns"] = need_ns
    if delta_ms <= 0:
        # No overhead to amortise: the mode stays in budget at any work per call, and a
        # specialised compile wins nothing back per launch.
        return (f"mode {m}: no measurable overhead ({fmt(delta_ms * NS_PER_MS, 'ns')} per launch against mode 0), "
                f"so it stays under {budget} at any work per call and a specialised compile "
                f"({fmt(compile_ms, 'ms')}) has no per-launch cost to win back")
    launches = compile_ms / delta_ms
    ev[f"mode{m}_breakeven_launches_count"] = launches
    ev[f"mode{m}_breakeven_whole_launches_count"] = float(math.ceil(launches))   # what the claim prints
    return (f"mode {m}: {fmt(over, 'ns')}/call needs >= {fmt(need_ns, 'ns')} of work per call to stay under "
            f"{budget} (now {fmt(per_call_work_ns, 'ns')}); a specialised compile ({fmt(compile_ms, 'ms')}) "
            f"pays for itself after {fmt(math.ceil(launches))} launches")


def _breakeven_finding(ctx: ExperimentContext, records, shape) -> Finding:
    """AC-2.4 break-even at the main shape."""
    b, h, n, d, causal = shape
    by_mode = _shape_rows(records, shape)
    build = {r["config"]["mode"]: r for r in rows(records, "build", tile=by_mode[0]["config"]["tile"])}
    base = by_mode[0]["metrics"]
    compile_ms = build[0]["metrics"]["build_median_ms"] if 0 in build else math.nan
    per_call_work_ns = base["median_ms"] * NS_PER_MS * base["resident_warps_count"] / base["calls_count"]
    ev = {"per_call_work_ns": per_call_work_ns, "compile_ms": compile_ms}
    parts = [_breakeven_part(m, r, base["median_ms"], compile_ms, per_call_work_ns, ev)
             for m, r in sorted(by_mode.items()) if m != 0]
    return ctx.finding(
        prototype=PROTOTYPE, title=f"AC-2.4 break-even of run-time dispatch at N={n}, D={d}",
        slug=f"breakeven-n{n}-d{d}",
        claim=(f"Each stage call does {fmt(per_call_work_ns, 'ns')} of work on a warp's serial path in mode 0. "
               + "; ".join(parts) + "."),
        evidence=ev, config={"batch": b, "num_heads": h, "seq_len": n, "head_dim": d, "causal": causal},
        cv=_cv(by_mode.values()), records=list(by_mode.values()) + list(build.values()))


def _recommendation_finding(ctx: ExperimentContext, records, shape) -> Finding:
    """Recommendation for Attention<Q,K,V>, derived from the numbers at the main shape."""
    _, _, n, d, _ = shape
    by_mode = _shape_rows(records, shape)
    build = {r["config"]["mode"]: r for r in rows(records, "build", tile=by_mode[0]["config"]["tile"])}
    over = {m: r["metrics"]["overhead_pct"] for m, r in by_mode.items() if m}
    cheap = [m for m, o in sorted(over.items()) if o < STITCH_BUDGET_PCT]
    costly = [m for m, o in sorted(over.items()) if o >= STITCH_BUDGET_PCT]
    text = (f"Measured at N={n}, D={d}: modes under the {fmt_pct(STITCH_BUDGET_PCT / PCT)} budget: "
            + (", ".join(f"{stitch.MODE_NAMES[m]} ({signed_pct(over[m])})" for m in cheap) or "none")
            + "; over it: " + (", ".join(f"{stitch.MODE_NAMES[m]} ({signed_pct(over[m])})" for m in costly)
                               or "none") + ". ")
    link = stitch.LINKED_MODE in cheap
    if link:
        text += (f"A production Attention<Q,K,V> should keep the attention loop specialised per variant and compose "
                 f"user-supplied stages (score modifiers, masks) by linking LTO-IR with nvJitLink at load time "
                 f"({fmt(build[stitch.LINKED_MODE]['metrics']['link_median_ms'], 'ms')} link, then inline speed); ")
    else:
        text += "A production Attention<Q,K,V> should specialise every variant at compile time; "
    text += ("run-time dispatch inside the inner loop (" + ", ".join(stitch.MODE_NAMES[m] for m in costly)
             + ") must not be used." if costly else "run-time dispatch inside the loop is affordable at this shape.")
    return ctx.finding(
        prototype=PROTOTYPE, title="How a production Attention<Q,K,V> should dispatch variants on CUDA",
        slug="dispatch-recommendation", claim=text,
        evidence={**{f"mode{m}_overhead_pct": o for m, o in over.items()},
                  **({"link_ms": build[stitch.LINKED_MODE]["metrics"]["link_median_ms"]} if link else {})},
        config={"seq_len": n, "head_dim": d, "budget_pct": STITCH_BUDGET_PCT},
        answer={"under_budget_modes": [stitch.MODE_NAMES[m] for m in cheap],
                "over_budget_modes": [stitch.MODE_NAMES[m] for m in costly],
                "compose_stages_by": "nvjitlink_lto" if link else "compile_time_specialisation",
                "runtime_dispatch_affordable": not costly},
        cv=_cv(by_mode.values()),
        records=list(by_mode.values()) + ([build[stitch.LINKED_MODE]] if link else []))


def run_findings(ctx: ExperimentContext, records: list[dict]) -> list[Finding]:
    runs = rows(records, "run")
    # In measurement order: the first shape is the main one (N=2048, D=128, non-causal).
    shapes = list(dict.fromkeys((r["config"]["batch"], r["config"]["num_heads"], r["config"]["seq_len"],
                                 r["config"]["head_dim"], r["config"]["causal"]) for r in runs))
    out = [_overhead_finding(ctx, records, shape) for shape in shapes]
    out.append(_identity_finding(ctx, runs, shapes))
    out.append(_breakeven_finding(ctx, records, shapes[0]))
    out.append(_recommendation_finding(ctx, records, shapes[0]))
    return out
