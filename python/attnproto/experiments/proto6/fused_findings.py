"""Prototype 6's algorithm findings (cuda): one fused pass against chunk_h + chunk_o, and whether
the fused kernel's block_dv chooser picked the fastest measured split."""
from __future__ import annotations

from ...findings import Finding, fmt, fmt_list, fmt_ratio
from ...ops import linear as lin
from ..registry import ExperimentContext
from .common import (
    FLA_TARGET_MIN_N,
    OURS_FUSED_VARIANT,
    OURS_TWO_PASS,
    PROTOTYPE,
    SWEEP_DTYPE,
    _cv,
    _gmean,
    _med,
    fmt_n,
)


def _fused_label(rec: dict) -> str:
    c = rec["config"]
    return f"block_dv {c.get('block_dv')}, state warps {c.get('state_warps')}, {c.get('segments')} segment(s)"


def _fused_vs_two_pass(ctx: ExperimentContext, d: int, pairs: list, seq_lens: list[int],
                       long_ns: list[int]) -> Finding:
    speed = [_med(t) / _med(f) for f, t in pairs]
    at_long = [_med(t) / _med(f) for f, t in pairs if f["config"]["seq_len"] in long_ns] or speed
    n_top = max(f["config"]["seq_len"] for f, _ in pairs)
    best_f = min((f for f, _ in pairs if f["config"]["seq_len"] == n_top), key=_med)
    best_t = min((t for _, t in pairs if t["config"]["seq_len"] == n_top), key=_med)
    recs = [r for pair in pairs for r in pair]
    chunks = sorted({f["config"]["chunk_size"] for f, _ in pairs})
    return ctx.finding(
        prototype=PROTOTYPE, slug=f"fused-vs-two-pass-d{d}-{ctx.backend}",
        title=f"Linear attention D={d}: one fused pass vs chunk_h + chunk_o on {ctx.backend}",
        claim=(f"Same inputs and chunk: the fused kernel (state kept on chip) runs at {fmt(min(speed))}-"
               f"{fmt_ratio(max(speed))} the speed of the two-pass kernels over N {fmt_n(seq_lens[0])}-"
               f"{fmt_n(seq_lens[-1])} and chunks {fmt_list(chunks)} (geometric mean {fmt_ratio(_gmean(at_long))} "
               f"at N >= {fmt_n(long_ns[0])}). At N={fmt_n(n_top)}: fused best {fmt(_med(best_f), 'ms')} "
               f"(C={best_f['config']['chunk_size']}, {_fused_label(best_f)}, "
               f"{fmt(best_f['metrics']['bandwidth_gbps'], 'GB/s')} of its least bytes), two-pass best "
               f"{fmt(_med(best_t), 'ms')} (C={best_t['config']['chunk_size']})."),
        evidence={"min_speedup_x": min(speed), "max_speedup_x": max(speed),
                  "long_n_gmean_speedup_x": _gmean(at_long)},
        config={"head_dim": d, "seq_lens": seq_lens, "dtype": SWEEP_DTYPE},
        answer={"faster_at_long_n": "fused" if _gmean(at_long) > 1.0 else "two_pass"},
        cv=_cv(recs), records=recs)


def _chooser_findings(ctx: ExperimentContext, lin_recs: dict, alt_recs: dict) -> list[Finding]:
    """The chooser's block_dv against the other legal splits, at every measured point."""
    hits, total, worst, worst_at = 0, 0, 1.0, None
    recs = []
    for key, rec in sorted(lin_recs.items()):
        if rec["config"].get("algorithm") != "fused":
            continue
        alts = [r for (impl, *k, _), r in alt_recs.items() if impl == OURS_FUSED_VARIANT and tuple(k) == key]
        if not alts:
            continue
        total += 1
        fastest = min(alts + [rec], key=_med)
        recs += alts + [rec]
        if fastest is rec:
            hits += 1
        elif _med(fastest) / _med(rec) < worst:
            worst = _med(fastest) / _med(rec)
            worst_at = (*key, _fused_label(fastest), _fused_label(rec))
    if not total:
        return []
    tail = "" if worst_at is None else (
        f"; where it was not, the worst case was D={worst_at[0]} N={fmt_n(worst_at[1])} C={worst_at[2]}: "
        f"{worst_at[3]} took {fmt_ratio(worst)} the time of the chosen {worst_at[4]}")
    return [ctx.finding(
        prototype=PROTOTYPE, slug=f"fused-block-dv-choice-{ctx.backend}",
        title=f"Fused linear attention: the block_dv chooser against every legal split on {ctx.backend}",
        claim=(f"The chooser (state warps {lin.FUSED_STATE_WARPS} where legal; widest value-column split "
               f"whose grid, with the segments that fit in the resident blocks, fills {fmt(lin.FUSED_MIN_WAVES)} "
               f"wave) picked the fastest of the measured variants (every legal block_dv x state warps 0/1) at "
               f"{fmt(hits)} of {fmt(total)} (D, N, chunk) points" + tail + "."),
        evidence={"chooser_hits_count": float(hits), "points_count": float(total), "worst_time_ratio_x": worst},
        config={"dtype": SWEEP_DTYPE, "min_waves": lin.FUSED_MIN_WAVES, "state_warps": lin.FUSED_STATE_WARPS},
        answer={"chooser_always_fastest": hits == total},
        cv=_cv(recs), records=recs)]


def algorithm_findings(ctx: ExperimentContext, lin_recs: dict, alt_recs: dict) -> list[Finding]:
    """Fused vs two-pass per head dim, and whether the fused chooser's block_dv was the fastest measured."""
    if not alt_recs:
        return []
    findings = []
    head_dims = sorted({d for d, _, _ in lin_recs})
    seq_lens = sorted({n for _, n, _ in lin_recs})
    long_ns = [n for n in seq_lens if n >= FLA_TARGET_MIN_N] or seq_lens[-1:]
    for d in head_dims:
        pairs = [(lin_recs[key], alt_recs[(OURS_TWO_PASS, *key, 0)]) for key in sorted(lin_recs)
                 if key[0] == d and (OURS_TWO_PASS, *key, 0) in alt_recs]
        if pairs:
            findings.append(_fused_vs_two_pass(ctx, d, pairs, seq_lens, long_ns))
    return findings + _chooser_findings(ctx, lin_recs, alt_recs)
