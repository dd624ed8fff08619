"""Prototype 5's findings: the generated code (tensor-core instructions, SASS mix, registers,
spills, shared memory), source size and compile time (static phase, every backend), the
TFLOPS ratio of each DSL kernel to our best hand-written one (measured phase, CUDA), and the
AC-6.5 recommendation from those ratios."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

from ...findings import Finding, fmt, fmt_ratio
from ..registry import ExperimentContext
from .common import DSL_FAMILIES, GOOD_ENOUGH_RATIO, HAND_WRITTEN, MEASURED_PHASE, PROTOTYPE, STATIC_PHASE


def _by(records: Sequence[dict], phase: str) -> Dict[tuple, dict]:
    out = {}
    for r in records:
        c = r["config"]
        if c["phase"] == phase:
            key = (c["kernel"], c["head_dim"], c["causal"]) + ((c["seq_len"],) if phase == MEASURED_PHASE else ())
            out[key] = r
    return out


def _n(x: float) -> int:
    """A count or size stored as a float metric, printed exactly."""
    return int(round(x))


def _cv(recs: Sequence[dict]) -> float:
    return max(r["timing"]["cv"] for r in recs)


def static_findings(ctx: ExperimentContext, records: Sequence[dict]) -> List[Finding]:
    st = _by(records, STATIC_PHASE)
    out = []
    for dsl in DSL_FAMILIES:
        for (kernel, d, causal), r in sorted(st.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if kernel != dsl or ("wgmma", d, causal) not in st:
                continue
            ours = st[("wgmma", d, causal)]
            m, o = r["metrics"], ours["metrics"]
            mask = "causal" if causal else "non-causal"
            uses = "uses" if m["hgmma_count"] > 0 else "does not use"
            out.append(ctx.finding(
                prototype=PROTOTYPE, slug=f"{dsl}-codegen-d{d}-{'causal' if causal else 'full'}",
                title=f"{dsl} D={d} {mask}: generated SASS against our wgmma kernel",
                claim=(f"{dsl}'s kernel ({r['config']['tile']}) {uses} the Hopper tensor-core path: "
                       f"{fmt(_n(m['hgmma_count']), 'HGMMA')} and {fmt(_n(m['hmma_count']), 'HMMA')} in its SASS against our wgmma "
                       f"kernel's {fmt(_n(o['hgmma_count']), 'HGMMA')} ({ours['config']['tile']}); {fmt(_n(m['sass_instructions_count']))} "
                       f"instructions against {fmt(_n(o['sass_instructions_count']))} ({fmt_ratio(m['sass_instructions_count'] / o['sass_instructions_count'])}), "
                       f"{fmt(_n(m['registers_regs']))} registers against {fmt(_n(o['registers_regs']))}, {fmt(_n(m['local_bytes']))} B "
                       f"of local (spill) memory against {fmt(_n(o['local_bytes']))}, {fmt(_n(m['dynamic_shared_bytes']))} B "
                       f"of dynamic shared memory against {fmt(_n(o['dynamic_shared_bytes']))}; TMA in PTX: "
                       f"{fmt(_n(m['ptx_tma_count']))} against {fmt(_n(o['ptx_tma_count']))}"),
                evidence={f"{dsl}_hgmma_count": m["hgmma_count"], "wgmma_hgmma_count": o["hgmma_count"],
                          f"{dsl}_sass_instructions_count": m["sass_instructions_count"],
                          "wgmma_sass_instructions_count": o["sass_instructions_count"], f"{dsl}_registers_regs": m["registers_regs"],
                          "wgmma_registers_regs": o["registers_regs"], f"{dsl}_local_bytes": m["local_bytes"],
                          f"{dsl}_sass_fp32_count": m["sass_fp32_count"], "wgmma_sass_fp32_count": o["sass_fp32_count"],
                          f"{dsl}_sass_special_func_count": m["sass_special_func_count"],
                          "wgmma_sass_special_func_count": o["sass_special_func_count"]},
                config={"head_dim": d, "causal": causal, "arch": r["config"]["arch"], "dsl": dsl},
                cv=_cv([r, ours]), records=[r, ours], answer={"uses_tensor_cores": m["hgmma_count"] > 0}))
        size = [(k, r) for k, r in st.items() if k[0] == dsl]
        if not size:
            continue
        ours = [st[(h, k[1], k[2])] for k, _ in size for h in HAND_WRITTEN if (h, k[1], k[2]) in st]
        if not ours:
            continue
        lines = size[0][1]["metrics"]["source_lines_count"]
        ms = sorted(r["metrics"]["compile_ms"] for _, r in size)[len(size) // 2]
        w = [r for r in ours if r["config"]["kernel"] == "wgmma"] or ours
        w_lines = w[0]["metrics"]["source_lines_count"]
        w_ms = sorted(r["metrics"]["compile_ms"] for r in w)[len(w) // 2]
        out.append(ctx.finding(
            prototype=PROTOTYPE, slug=f"{dsl}-source-and-compile-time",
            title=f"{dsl}: lines of kernel source and cold compile time against our wgmma kernel",
            claim=(f"{dsl}'s attention kernel is {fmt(_n(lines))} lines of code against {fmt(_n(w_lines))} for our wgmma "
                   f"kernel and its headers ({fmt_ratio(lines / w_lines)}); a cold compile for "
                   f"{size[0][1]['config']['arch']} takes a median {fmt(ms, 'ms')} against NVRTC's {fmt(w_ms, 'ms')}"),
            evidence={f"{dsl}_source_lines_count": lines, "wgmma_source_lines_count": w_lines, f"{dsl}_compile_ms": ms,
                      "wgmma_compile_ms": w_ms},
            config={"dsl": dsl, "arch": size[0][1]["config"]["arch"]},
            cv=_cv([r for _, r in size] + w), records=[r for _, r in size] + w))
    return out


def _gmean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def ratio_rows(records: Sequence[dict]) -> List[Dict[str, Any]]:
    """Per (DSL, D, causal, N): its TFLOPS over the best hand-written family's (the closing table)."""
    me = _by(records, MEASURED_PHASE)
    rows = []
    for (kernel, d, causal, n), r in sorted(me.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        if kernel not in DSL_FAMILIES:
            continue
        ours = [me[(h, d, causal, n)] for h in HAND_WRITTEN if (h, d, causal, n) in me]
        if not ours:
            continue
        best = max(ours, key=lambda x: x["metrics"]["tflops"])
        rows.append({"dsl": kernel, "head_dim": d, "causal": causal, "seq_len": n, "dsl_tile": r["config"]["tile"],
                     "dsl_tflops": r["metrics"]["tflops"], "ours": best["config"]["tile"],
                     "ours_tflops": best["metrics"]["tflops"],
                     "ratio": r["metrics"]["tflops"] / best["metrics"]["tflops"], "records": [r, *ours]})
    return rows


def measured_findings(ctx: ExperimentContext, records: Sequence[dict]) -> List[Finding]:
    rows = ratio_rows(records)
    out = []
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["dsl"], row["head_dim"], row["causal"]), []).append(row)
    for (dsl, d, causal), rs in sorted(groups.items()):
        g = _gmean([x["ratio"] for x in rs])
        lo = min(rs, key=lambda x: x["ratio"])
        recs = [rec for x in rs for rec in x["records"]]
        mask = "causal" if causal else "non-causal"
        ns = [x["seq_len"] for x in rs]
        out.append(ctx.finding(
            prototype=PROTOTYPE, slug=f"{dsl}-tflops-ratio-d{d}-{'causal' if causal else 'full'}",
            title=f"{dsl} D={d} {mask}: TFLOPS against our best hand-written kernel, N {min(ns)}-{max(ns)}",
            claim=(f"{dsl} reaches a geometric mean {fmt_ratio(g)} of our best hand-written kernel's TFLOPS over "
                   f"N = {', '.join(map(str, ns))} (lowest {fmt_ratio(lo['ratio'])} at N = {lo['seq_len']}: "
                   f"{fmt(lo['dsl_tflops'], 'TFLOPS')} against {lo['ours']}'s {fmt(lo['ours_tflops'], 'TFLOPS')})"),
            evidence={"gmean_ratio": g, "min_ratio": lo["ratio"],
                      **{f"n{x['seq_len']}_ratio": x["ratio"] for x in rs}},
            config={"dsl": dsl, "head_dim": d, "causal": causal, "seq_lens": ns},
            cv=_cv(recs), records=recs, answer={"lowest_at": lo["seq_len"]}))
    for dsl in sorted({r["dsl"] for r in rows}):
        rs = [r for r in rows if r["dsl"] == dsl]
        good = [r for r in rs if r["ratio"] >= GOOD_ENOUGH_RATIO]
        recs = [rec for x in rs for rec in x["records"]]
        where = ", ".join(f"D={r['head_dim']} {'causal' if r['causal'] else 'full'} N={r['seq_len']}" for r in good)
        verdict = ("good enough everywhere measured" if len(good) == len(rs) else
                   "not good enough anywhere measured" if not good else "good enough only at " + where)
        out.append(ctx.finding(
            prototype=PROTOTYPE, slug=f"{dsl}-recommendation",
            title=f"AC-6.5: is {dsl} good enough for attention next to hand-written kernels?",
            claim=(f"against a bar of {fmt_ratio(GOOD_ENOUGH_RATIO)} of our best hand-written kernel's TFLOPS, "
                   f"{dsl} is {verdict} ({len(good)} of {len(rs)} points; geometric mean "
                   f"{fmt_ratio(_gmean([r['ratio'] for r in rs]))})"),
            evidence={"points_count": float(len(rs)), "good_points_count": float(len(good)),
                      "gmean_ratio": _gmean([r["ratio"] for r in rs])},
            config={"dsl": dsl, "bar": GOOD_ENOUGH_RATIO}, cv=_cv(recs), records=recs,
            answer={"good_enough_points": len(good)}))
    return out
