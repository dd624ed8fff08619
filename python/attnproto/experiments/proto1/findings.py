"""Prototype 1's findings. Each finding's config is its question (head dim, length, mask);
the measured choice is its answer; claims format numbers to three significant digits."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...findings import fmt, fmt_list, fmt_pct, fmt_ratio
from ..registry import ExperimentContext
from . import common as C
from .common import anchor, auto_record, best, family_of, label, ours


def _tf(r: dict) -> str:
    return fmt(r["metrics"]["tflops"], "TFLOPS")


def _mode(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def _answer(r: dict) -> dict[str, Any]:
    return {"config": label(r["config"]), "family": family_of(r) or r["config"].get("family")}


def general(ctx: ExperimentContext, records: list[dict], rejected: list[dict]) -> list:
    findings = []
    dims = sorted({r["config"]["head_dim"] for r in records})
    longest = max(r["config"]["seq_len"] for r in records)

    # 1. best tile per head dim at the longest length, non-causal
    for d in dims:
        b = best(records, head_dim=d, seq_len=longest, causal=False)
        if b is None:
            continue
        cands = [r for r in records if ours(r) and r["config"]["head_dim"] == d
                 and r["config"]["seq_len"] == longest and not r["config"]["causal"]]
        worst = min(cands, key=lambda r: r["metrics"]["tflops"])
        ev = {"best_tflops": b["metrics"]["tflops"], "worst_tflops": worst["metrics"]["tflops"],
              "best_median_ms": b["timing"]["median_ms"], "best_cv": b["timing"]["cv"], "configs_count": len(cands)}
        claim = (f"At D={d}, N={longest} (B={b['config']['batch']}, H={b['config']['num_heads']}, non-causal) the "
                 f"fastest of {len(cands)} configurations is {label(b['config'])} at {_tf(b)} (median "
                 f"{fmt(b['timing']['median_ms'], 'ms')}, CV {fmt_pct(b['timing']['cv'])}); the slowest, "
                 f"{label(worst['config'])}, reaches {_tf(worst)}.")
        cited = [b, worst]
        for name in ("sdpa_flash", "sdpa_cudnn", "flex"):
            a = anchor(records, name, head_dim=d, seq_len=longest, causal=False)
            if a is not None:
                ev[f"vs_{name}_ratio"] = b["metrics"]["tflops"] / a["metrics"]["tflops"]
                claim += f" {name}: {_tf(a)} (ours {fmt_ratio(ev[f'vs_{name}_ratio'])})."
                cited.append(a)
        findings.append(ctx.finding(
            prototype=C.PROTOTYPE, title=f"Best tile for D={d} at N={longest}", slug=f"best-tile-d{d}-n{longest}",
            claim=claim, evidence=ev, config={"head_dim": d, "seq_len": longest, "causal": False},
            answer=_answer(b), cv=b["timing"]["cv"], records=cited))

    # 2. the shape of the TFLOPS surface over N (best config per N) at D=128 (or the widest measured)
    d = 128 if 128 in dims else dims[-1]
    curve = [(n, best(records, head_dim=d, seq_len=n, causal=False))
             for n in sorted({r["config"]["seq_len"] for r in records})]
    curve = [(n, r) for n, r in curve if r is not None]
    if len(curve) >= 2:
        (n0, r0), (n1, r1) = curve[0], curve[-1]
        spread = [r for r in records if ours(r) and r["config"]["head_dim"] == d and
                  r["config"]["seq_len"] == n1 and not r["config"]["causal"]]
        lo = min(r["metrics"]["tflops"] for r in spread)
        findings.append(ctx.finding(
            prototype=C.PROTOTYPE, title=f"TFLOPS surface over N at D={d}", slug=f"tflops-surface-d{d}",
            claim=(f"Best-configuration throughput at D={d} (non-causal) goes from {_tf(r0)} at N={n0} to {_tf(r1)} "
                   f"at N={n1} (" + ", ".join(f"N={n}: {_tf(r)}" for n, r in curve) + f"); at N={n1} the tile "
                   f"choice spans {fmt(lo)}..{_tf(r1)} ({fmt_ratio(r1['metrics']['tflops'] / lo)})."),
            evidence={"short_tflops": r0["metrics"]["tflops"], "long_tflops": r1["metrics"]["tflops"],
                      "long_worst_tflops": lo, "tile_spread_ratio": r1["metrics"]["tflops"] / lo,
                      "long_cv": r1["timing"]["cv"]},
            config={"head_dim": d, "causal": False},
            answer={"seq_lens": [n for n, _ in curve], **{str(n): label(r["config"]) for n, r in curve}},
            cv=max(r["timing"]["cv"] for _, r in curve), records=[r for _, r in curve]))

    # 3. the cost of causal masking at the longest length
    for d in dims:
        nc = best(records, head_dim=d, seq_len=longest, causal=False)
        ca = best(records, head_dim=d, seq_len=longest, causal=True)
        if nc is None or ca is None:
            continue
        ratio = ca["metrics"]["tflops"] / nc["metrics"]["tflops"]
        findings.append(ctx.finding(
            prototype=C.PROTOTYPE, title=f"Causal vs non-causal throughput at D={d}, N={longest}",
            slug=f"causal-cost-d{d}-n{longest}",
            claim=(f"Causal attention (only visible pairs counted) reaches {_tf(ca)} with {label(ca['config'])} "
                   f"against {_tf(nc)} non-causal with {label(nc['config'])}: {fmt_ratio(ratio)} of the non-causal "
                   f"rate ({'within' if ratio >= C.CAUSAL_TARGET_RATIO else 'outside'} the "
                   f"{fmt_pct(1 - C.CAUSAL_TARGET_RATIO)} target)."),
            evidence={"causal_tflops": ca["metrics"]["tflops"], "noncausal_tflops": nc["metrics"]["tflops"],
                      "causal_over_noncausal_ratio": ratio, "max_shortfall_ratio": 1 - C.CAUSAL_TARGET_RATIO},
            config={"head_dim": d, "seq_len": longest}, answer={"causal": label(ca["config"]),
                                                                 "noncausal": label(nc["config"])},
            cv=max(ca["timing"]["cv"], nc["timing"]["cv"]), records=[ca, nc]))

    # 4. kernel="auto" against the best measured family x tile, per head dim and mask
    for d in dims:
        for causal in (False, True):
            rows = []
            for n in sorted({r["config"]["seq_len"] for r in records}):
                a = auto_record(records, head_dim=d, seq_len=n, causal=causal)
                b = best(records, head_dim=d, seq_len=n, causal=causal)
                if a is not None and b is not None:
                    rows.append((n, a, b, a["metrics"]["tflops"] / b["metrics"]["tflops"]))
            if not rows:
                continue
            worst = min(rows, key=lambda t: t[3])
            findings.append(ctx.finding(
                prototype=C.PROTOTYPE, title=f"kernel='auto' against the best measured tile, D={d}, {_mode(causal)}",
                slug=f"auto-vs-best-d{d}-{'causal' if causal else 'noncausal'}",
                claim=(f"The default call flash_forward(q, k, v) (kernel='auto', table from this sweep) at D={d}, "
                       f"{_mode(causal)}: " + "; ".join(
                           f"N={n} {_tf(a)} with {a['config']['chose']} vs best {_tf(b)} ({fmt_ratio(x)})"
                           for n, a, b, x in rows) +
                       f". Lowest ratio {fmt_ratio(worst[3])} at N={worst[0]} "
                       f"({'within' if worst[3] >= C.AUTO_BAR_RATIO else 'outside'} the "
                       f"{fmt_pct(1 - C.AUTO_BAR_RATIO)} bar)."),
                evidence={"min_auto_over_best_ratio": worst[3], "rows_count": len(rows),
                          "max_shortfall_ratio": 1 - C.AUTO_BAR_RATIO,
                          **{f"n{n}_auto_over_best_ratio": x for n, _, _, x in rows}},
                config={"head_dim": d, "causal": causal}, answer={str(n): a["config"]["chose"] for n, a, _, _ in rows},
                cv=max(max(a["timing"]["cv"], b["timing"]["cv"]) for _, a, b, _ in rows),
                records=[x for _, a, b, _ in rows for x in (a, b)]))

    # 5. kernels rejected by the correctness gates
    if rejected:
        best_any = best(records, seq_len=longest, causal=False)
        findings.append(ctx.finding(
            prototype=C.PROTOTYPE, title="Kernel configurations excluded by the correctness gates",
            slug="rejected-configs",
            claim=(f"{len(rejected)} candidate configurations failed the FP64 gate (atol {fmt(C.ATOL)}, rtol "
                   f"{fmt(C.RTOL)}) or the full-size comparison and were not timed: " +
                   "; ".join(f"{label(r)} D={r['head_dim']} {_mode(r['causal'])}: {r['why']}" for r in rejected[:8])
                   + ("; ..." if len(rejected) > 8 else "")),
            evidence={"rejected_count": len(rejected)}, config={},
            answer={"rejected": [label(r) for r in rejected]},
            cv=best_any["timing"]["cv"] if best_any else 0.0, records=[best_any] if best_any else []))
    return findings


def cuda(ctx: ExperimentContext, records: list[dict]) -> list:
    findings = []
    dims = sorted({r["config"]["head_dim"] for r in records})
    longest = max(r["config"]["seq_len"] for r in records)

    # register / shared-memory pressure from the compiler's resource report
    mine = [r for r in records if ours(r) and r["config"]["seq_len"] == longest and not r["config"]["causal"]]
    if mine:
        spill = [r for r in mine if r["metrics"]["local_bytes"] > 0]
        top = sorted(mine, key=lambda r: -r["metrics"]["tflops"])[: max(1, len(mine) // 4)]
        rest = [r for r in mine if r not in top]
        mean = lambda rows, key: float(np.mean([r["metrics"][key] for r in rows])) if rows else 0.0  # noqa: E731
        findings.append(ctx.finding(
            prototype=C.PROTOTYPE, title="Register and shared-memory pressure of the tile configurations",
            slug=f"resource-pressure-n{longest}",
            claim=(f"Over {len(mine)} kernel configurations at N={longest} (non-causal), the fastest quarter uses "
                   f"{fmt(mean(top, 'registers_regs'))} registers and {fmt(mean(top, 'smem_bytes') / 1024, 'KiB')} "
                   f"of shared memory per CTA on average against {fmt(mean(rest, 'registers_regs'))} and "
                   f"{fmt(mean(rest, 'smem_bytes') / 1024, 'KiB')} for the rest; {len(spill)} configurations spill "
                   f"to local memory (compiler report, cuFuncGetAttribute)."),
            evidence={"top_mean_regs": mean(top, "registers_regs"), "rest_mean_regs": mean(rest, "registers_regs"),
                      "top_mean_smem_bytes": mean(top, "smem_bytes"), "rest_mean_smem_bytes": mean(rest, "smem_bytes"),
                      "spilling_count": len(spill), "configs_count": len(mine)},
            config={"seq_len": longest, "causal": False}, answer={"spilling": [label(r["config"]) for r in spill]},
            cv=max(r["timing"]["cv"] for r in top), records=top))

    for d in dims:
        # wgmma + TMA vs mma.sync
        m = best(records, family="mma", head_dim=d, seq_len=longest, causal=False)
        w = best(records, family="wgmma", head_dim=d, seq_len=longest, causal=False)
        if m is not None and w is not None:
            ratio = w["metrics"]["tflops"] / m["metrics"]["tflops"]
            findings.append(ctx.finding(
                prototype=C.PROTOTYPE, title=f"wgmma+TMA vs mma.sync at D={d}, N={longest}",
                slug=f"wgmma-vs-mma-d{d}-n{longest}",
                claim=(f"The Hopper wgmma + TMA kernel ({label(w['config'])}) reaches {_tf(w)} against {_tf(m)} for "
                       f"the best mma.sync kernel ({label(m['config'])}): {fmt_ratio(ratio)}."),
                evidence={"wgmma_tflops": w["metrics"]["tflops"], "mma_tflops": m["metrics"]["tflops"],
                          "wgmma_over_mma_ratio": ratio},
                config={"head_dim": d, "seq_len": longest, "causal": False},
                answer={"wgmma": label(w["config"]), "mma": label(m["config"])},
                cv=max(w["timing"]["cv"], m["timing"]["cv"]), records=[w, m]))
        # the swept wgmma tile against FA3's published default
        findings += _wgmma_default(ctx, records, d, longest)

    # standing against the anchors at N >= FLOOR_MIN_SEQ
    for d in dims:
        for causal in (False, True):
            rows, cited = [], []
            for n in sorted({r["config"]["seq_len"] for r in records}):
                if n < C.FLOOR_MIN_SEQ:
                    continue
                b = best(records, head_dim=d, seq_len=n, causal=causal)
                fa = anchor(records, "sdpa_flash", head_dim=d, seq_len=n, causal=causal)
                cu = anchor(records, "sdpa_cudnn", head_dim=d, seq_len=n, causal=causal)
                if b is None or fa is None:
                    continue
                rows.append((n, b, fa, cu))
                cited += [x for x in (b, fa, cu) if x is not None]
            if not rows:
                continue
            worst_fa = min(b["metrics"]["tflops"] / fa["metrics"]["tflops"] for _, b, fa, _ in rows)
            cu_rows = [(n, b, cu) for n, b, _, cu in rows if cu is not None]
            ev = {"min_vs_sdpa_flash_ratio": worst_fa}
            claim = (f"At D={d}, {_mode(causal)}, N >= {C.FLOOR_MIN_SEQ}: " + "; ".join(
                f"N={n} ours {_tf(b)} ({label(b['config'])}), flash {_tf(fa)}" + (f", cuDNN {_tf(cu)}" if cu else "")
                for n, b, fa, cu in rows) + f". Lowest ratio to SDPA flash: {fmt_ratio(worst_fa)}")
            if cu_rows:
                ev["min_vs_sdpa_cudnn_ratio"] = min(b["metrics"]["tflops"] / cu["metrics"]["tflops"] for _, b, cu in cu_rows)
                claim += f"; to cuDNN: {fmt_ratio(ev['min_vs_sdpa_cudnn_ratio'])}"
            findings.append(ctx.finding(
                prototype=C.PROTOTYPE, title=f"Standing against SDPA flash and cuDNN, D={d}, {_mode(causal)}",
                slug=f"anchors-d{d}-{'causal' if causal else 'noncausal'}", claim=claim + ".", evidence=ev,
                config={"head_dim": d, "causal": causal, "min_seq_len": C.FLOOR_MIN_SEQ},
                answer={str(n): label(b["config"]) for n, b, _, _ in rows},
                cv=max(x["timing"]["cv"] for x in cited), records=cited))
    return findings


def _wgmma_default(ctx: ExperimentContext, records: list[dict], d: int, n: int) -> list:
    from ...ops import flash_wgmma  # noqa: PLC0415

    out = []
    for causal in (False, True):
        default = flash_wgmma.default_config(d, causal)
        dflt = next((r for r in records if family_of(r) == "wgmma" and r["config"]["head_dim"] == d
                     and r["config"]["seq_len"] == n and r["config"]["causal"] == causal
                     and all(r["config"][k] == getattr(default, k) for k in ("block_c", "stages", "consumer_wg"))), None)
        b = best(records, family="wgmma", head_dim=d, seq_len=n, causal=causal)
        if dflt is None or b is None:
            continue
        swept = len([r for r in records if family_of(r) == "wgmma" and r["config"]["head_dim"] == d
                     and r["config"]["seq_len"] == n and r["config"]["causal"] == causal])
        ratio = b["metrics"]["tflops"] / dflt["metrics"]["tflops"]
        out.append(ctx.finding(
            prototype=C.PROTOTYPE, title=f"Swept wgmma tile vs FA3's default, D={d}, N={n}, {_mode(causal)}",
            slug=f"wgmma-tile-vs-fa3-default-d{d}-n{n}-{'causal' if causal else 'noncausal'}",
            claim=(f"Of {swept} legal wgmma tiles at D={d}, N={n}, {_mode(causal)}, the fastest is {label(b['config'])} "
                   f"at {_tf(b)}; FA3's published default {label(dflt['config'])} reaches {_tf(dflt)} "
                   f"({fmt_ratio(ratio)} for the swept choice)."),
            evidence={"best_tflops": b["metrics"]["tflops"], "fa3_default_tflops": dflt["metrics"]["tflops"],
                      "best_over_default_ratio": ratio, "swept_count": swept},
            config={"head_dim": d, "seq_len": n, "causal": causal}, answer={"config": label(b["config"])},
            cv=max(b["timing"]["cv"], dflt["timing"]["cv"]), records=[b, dflt]))
    return out


def metal(ctx: ExperimentContext, records: list[dict], rejected: list[dict]) -> list:
    """Metal-specific findings: standing against MLX / torch MPS, threadgroup memory."""
    from .metal import METAL_ANCHORS  # noqa: PLC0415

    findings = []
    longest = max(r["config"]["seq_len"] for r in records)
    dims = sorted({r["config"]["head_dim"] for r in records})
    wall_best = lambda **m: max((r for r in records if family_of(r) == "metal" and all(  # noqa: E731
        r["config"].get(k) == v for k, v in m.items())), key=lambda r: r["metrics"]["wall_tflops"], default=None)
    for d in dims:
        for causal in (False, True):
            mine = wall_best(head_dim=d, seq_len=longest, causal=causal)
            present = {n: a for n in METAL_ANCHORS
                       if (a := anchor(records, n, head_dim=d, seq_len=longest, causal=causal)) is not None}
            if mine is None or not present:
                continue
            ev = {f"vs_{n}_wall_ratio": mine["metrics"]["wall_tflops"] / a["metrics"]["tflops"] for n, a in present.items()}
            claim = (f"At D={d}, N={longest}, {_mode(causal)}, wall clock (launch to completion): ours "
                     f"{label(mine['config'])} {fmt(mine['metrics']['wall_tflops'], 'TFLOPS')}; " + "; ".join(
                         f"{n} {_tf(a)} (ours {fmt_ratio(ev[f'vs_{n}_wall_ratio'])})" for n, a in present.items()) + ".")
            missing = [n for n in METAL_ANCHORS if n not in present]
            if missing:
                claim += f" Not run: {fmt_list(missing)}."
            findings.append(ctx.finding(
                prototype=C.PROTOTYPE, title=f"Standing against MLX / torch MPS SDPA, D={d}, {_mode(causal)}, N={longest}",
                slug=f"metal-anchors-d{d}-{'causal' if causal else 'noncausal'}-n{longest}",
                claim=claim, evidence=ev, config={"head_dim": d, "seq_len": longest, "causal": causal},
                answer={"config": label(mine["config"])},
                cv=max([mine["timing"]["cv"]] + [a["timing"]["cv"] for a in present.values()]),
                records=[mine, *present.values()]))
    mine_long = [r for r in records if family_of(r) == "metal" and r["config"]["seq_len"] == longest
                 and not r["config"]["causal"]]
    if len(mine_long) >= 2:
        top = sorted(mine_long, key=lambda r: -r["metrics"]["tflops"])[: max(1, len(mine_long) // 4)]
        rest = [r for r in mine_long if r not in top]
        mean = lambda rows, key: float(np.mean([r["metrics"][key] for r in rows]))  # noqa: E731
        findings.append(ctx.finding(
            prototype=C.PROTOTYPE, title="Threadgroup memory of the fastest Metal tiles",
            slug=f"metal-threadgroup-memory-n{longest}",
            claim=(f"Over {len(mine_long)} gated tiles at N={longest} (non-causal), the fastest quarter uses "
                   f"{fmt(mean(top, 'smem_bytes') / 1024, 'KiB')} of threadgroup memory and "
                   f"{fmt(mean(top, 'threads'))} threads per threadgroup on average, against "
                   f"{fmt(mean(rest, 'smem_bytes') / 1024, 'KiB')} and {fmt(mean(rest, 'threads'))} for the rest "
                   f"(limit 32 KiB)."),
            evidence={"top_mean_smem_bytes": mean(top, "smem_bytes"), "rest_mean_smem_bytes": mean(rest, "smem_bytes"),
                      "top_mean_threads": mean(top, "threads"), "rest_mean_threads": mean(rest, "threads")},
            config={"seq_len": longest, "causal": False}, answer={"top": [label(r["config"]) for r in top]},
            cv=max(r["timing"]["cv"] for r in top), records=top))
    return findings


PUBLISHED_FILE = Path(__file__).resolve().parent.parent.parent / "data" / "published.json"


def published_findings(prototype: str = C.PROTOTYPE) -> list:
    """Cited context from data/published.json (source "published": never measured here)."""
    from ...findings import make_finding  # noqa: PLC0415

    return [make_finding(prototype=row["prototype"], title=row["title"], claim=row["claim"], evidence=row["evidence"],
                         config=row["config"], device=row["device"], backend=row["backend"], source="published",
                         citation=row["citation"], slug=row["slug"])
            for row in json.loads(PUBLISHED_FILE.read_text()) if row["prototype"] == prototype]
