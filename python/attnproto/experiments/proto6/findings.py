"""Prototype 6's sweep findings (cpu and cuda): the fastest chunk, throughput by N, the crossover
against causal softmax attention, bandwidth, the FLA anchor (cuda) and the recommendation.

Each id names the question (head dim, swept N and chunks, dtype, implementation); the chunk
the sweep picks and the crossover it finds are ``answer``s, never part of the config."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from ...findings import Finding, fmt, fmt_list, fmt_pct, fmt_ratio
from ..registry import ExperimentContext
from .common import (
    CHUNKS,
    FLA_CHUNK,
    FLA_TARGET_MIN_N,
    FLA_TARGET_RATIO,
    PCT,
    PROTOTYPE,
    _crossover,
    _cv,
    _med,
    fmt_n,
)


def _best_chunks(ctx, lin_recs, head_dims, long_ns, chunks, dtype, impl) -> tuple[dict[int, int], list[Finding]]:
    """1. best chunk size per head dim: geometric-mean time over the long Ns."""
    best_chunk: dict[int, int] = {}
    out = []
    for d in head_dims:
        gmean = {c: math.exp(np.mean([math.log(_med(lin_recs[(d, n, c)])) for n in long_ns])) for c in chunks}
        best = min(gmean, key=gmean.get)
        best_chunk[d] = best
        worst = max(gmean, key=gmean.get)
        recs = [lin_recs[(d, n, c)] for n in long_ns for c in chunks]
        out.append(ctx.finding(
            prototype=PROTOTYPE, slug=f"best-chunk-d{d}-{ctx.backend}",
            title=f"Linear attention D={d}: the fastest chunk size on {ctx.backend}",
            claim=(f"Over N in {fmt_list([fmt_n(n) for n in long_ns])} ({dtype}, {impl}) chunk {best} has the "
                   f"lowest geometric-mean time ({fmt(gmean[best], 'ms')}); chunk {worst} is "
                   f"{fmt_ratio(gmean[worst] / gmean[best])} slower. Times by chunk: "
                   + ", ".join(f"C={c}: {fmt(gmean[c], 'ms')}" for c in chunks) + "."),
            evidence={"best_chunk_count": float(best), "best_gmean_ms": gmean[best],
                      "worst_over_best_x": gmean[worst] / gmean[best],
                      **{f"c{c}_gmean_ms": gmean[c] for c in chunks}},
            config={"head_dim": d, "seq_lens": long_ns, "chunks": chunks, "dtype": dtype, "impl": impl},
            answer={"chunk_size": best, "slowest_chunk_size": worst},
            cv=_cv(recs), records=recs))
    return best_chunk, out


def _throughput(ctx, lin_recs, d, c, seq_lens, dtype, impl) -> Finding:
    """2. throughput by N at the best chunk."""
    recs = [lin_recs[(d, n, c)] for n in seq_lens]
    tf = {n: lin_recs[(d, n, c)]["metrics"]["tflops"] for n in seq_lens}
    # Empirical exponent of time in N over the sweep (1: linear, 2: quadratic).
    if len(seq_lens) > 1:
        growth = math.log(_med(recs[-1]) / _med(recs[0])) / math.log(seq_lens[-1] / seq_lens[0])
        growth_txt = f"; time grows as N^{fmt(growth)} from N={fmt_n(seq_lens[0])} to {fmt_n(seq_lens[-1])}"
    else:
        growth, growth_txt = 0.0, ""
    return ctx.finding(
        prototype=PROTOTYPE, slug=f"throughput-by-n-d{d}-{ctx.backend}",
        title=f"Linear attention D={d} throughput by sequence length on {ctx.backend}",
        claim=(f"At chunk {c} ({dtype}) the chunked algorithm runs at "
               + ", ".join(f"{fmt_n(n)}: {fmt(tf[n], 'TFLOPS')} ({fmt(_med(lin_recs[(d, n, c)]), 'ms')})"
                           for n in seq_lens)
               + growth_txt + "."),
        evidence={"min_n_tflops": tf[seq_lens[0]], "max_n_tflops": tf[seq_lens[-1]],
                  "max_n_median_ms": _med(lin_recs[(d, seq_lens[-1], c)]),
                  "time_ratio_max_over_min_n_x": _med(recs[-1]) / _med(recs[0]),
                  "time_growth_exponent_ratio": growth},
        config={"head_dim": d, "seq_lens": seq_lens, "dtype": dtype, "impl": impl},
        answer={"chunk_size": c}, cv=_cv(recs), records=recs)


def _crossover_finding(ctx, lin_recs, soft_recs, d, c, seq_lens, chunks, softmax_impls, dtype, notes,
                       cross) -> Optional[Finding]:
    """3. crossover vs each softmax implementation at one head dim (fills ``cross``)."""
    t_lin = [min(_med(lin_recs[(d, n, cc)]) for cc in chunks) for n in seq_lens]
    evidence, parts, recs = {}, [], [lin_recs[(d, n, cc)] for n in seq_lens for cc in chunks]
    answer: dict[str, Any] = {"chunk_size": c, "crossover_tokens": {}}
    for si in softmax_impls:
        srecs = [soft_recs[(si, d, n)] for n in seq_lens if (si, d, n) in soft_recs]
        if len(srecs) != len(seq_lens):
            continue
        recs += srecs
        n_star, how = _crossover(seq_lens, t_lin, [_med(r) for r in srecs])
        cross[(si, d)] = n_star
        answer["crossover_tokens"][si] = n_star
        speed = _med(srecs[-1]) / t_lin[-1]
        if n_star is None:
            parts.append(f"vs {si}: linear is never faster up to N={fmt_n(seq_lens[-1])} "
                         f"({fmt_ratio(speed)} at the largest N)")
        else:
            where = (f"already at the smallest N swept ({fmt_n(n_star)})" if how == "below"
                     else f"from N ~ {fmt_n(n_star)} (log-interpolated)")
            parts.append(f"vs {si}: linear is faster {where}, {fmt_ratio(speed)} faster at N={fmt_n(seq_lens[-1])}")
            evidence[f"{si}_crossover_tokens"] = n_star
        evidence[f"{si}_speedup_at_max_n_x"] = speed
    if not evidence:
        return None
    if "proto1" in notes and ctx.backend == "cuda":
        parts.append(f"Prototype 1 not included: {notes['proto1']}")
    return ctx.finding(
        prototype=PROTOTYPE, slug=f"crossover-d{d}-{ctx.backend}",
        title=f"Linear vs causal softmax attention crossover at D={d} on {ctx.backend}",
        claim=(f"Linear attention ({dtype}, fastest chunk at each N; chunk {c} overall) against causal "
               "softmax on the same shapes: " + "; ".join(parts) + "."),
        evidence=evidence,
        config={"head_dim": d, "seq_lens": seq_lens, "softmax": list(softmax_impls), "dtype": dtype},
        answer=answer, cv=_cv(recs), records=recs)


def _bandwidth(ctx, lin_recs, best_chunk, head_dims, n_max, dtype, copy_gbps, copy_rec) -> Finding:
    """4. bandwidth use at the largest N, each head dim at its best chunk."""
    best = {d: lin_recs[(d, n_max, best_chunk[d])] for d in head_dims}
    recs = list(best.values())
    algorithms = {d: best[d]["config"].get("algorithm", "two_pass") for d in head_dims}
    ev = {f"d{d}_bandwidth_gbps": best[d]["metrics"]["bandwidth_gbps"] for d in head_dims}
    ceiling = ""
    if copy_gbps:
        ev["copy_ceiling_gbps"] = copy_gbps
        for d in head_dims:
            ev[f"d{d}_copy_bw_pct"] = best[d]["metrics"]["copy_bw_pct"]
        ceiling = f" of a measured {fmt(copy_gbps, 'GB/s')} device copy"
        if copy_rec is not None:
            recs = recs + [copy_rec]
    return ctx.finding(
        prototype=PROTOTYPE, slug=f"bandwidth-{ctx.backend}",
        title=f"Linear attention memory bandwidth at N={fmt_n(n_max)} on {ctx.backend}",
        claim=("Counting the least bytes of the algorithm that ran (fused: Q, K, V and O once; two-pass: K, V "
               "and states in chunk_h, Q, K, V, states and O in chunk_o): " + "; ".join(
                   f"D={d} (chunk {best_chunk[d]}, {algorithms[d]}): {fmt(ev[f'd{d}_bandwidth_gbps'], 'GB/s')}"
                   + (f" = {fmt_pct(ev[f'd{d}_copy_bw_pct'] / PCT)}" if copy_gbps else "")
                   for d in head_dims) + ceiling + "."),
        evidence=ev,
        config={"seq_len": n_max, "head_dims": head_dims, "dtype": dtype},
        answer={"chunk_size": {str(d): best_chunk[d] for d in head_dims},
                "algorithm": {str(d): algorithms[d] for d in head_dims}},
        cv=_cv(recs), records=recs)


def _fla_anchor(ctx, lin_recs, fla_recs, dtype) -> Finding:
    """5. FLA anchor (cuda only): our forward against FLA's chunk_simple_gla on the same inputs."""
    ratios, best_ratios, best_of = {}, {}, {}
    for (d, n), frec in fla_recs.items():
        ratios[(d, n)] = _med(frec) / _med(lin_recs[(d, n, FLA_CHUNK)])      # > 1: ours faster
        fastest = min((lin_recs[(d, n, c)] for c in CHUNKS if (d, n, c) in lin_recs), key=_med)
        best_of[(d, n)] = fastest
        best_ratios[(d, n)] = _med(frec) / _med(fastest)
    target = [r for (d, n), r in best_ratios.items() if n >= FLA_TARGET_MIN_N]
    worst = min(target) if target else min(best_ratios.values())
    same_target = [r for (d, n), r in ratios.items() if n >= FLA_TARGET_MIN_N]
    worst_same = min(same_target) if same_target else min(ratios.values())
    recs = list(fla_recs.values()) + [lin_recs[(d, n, FLA_CHUNK)] for d, n in fla_recs]
    recs += [r for r in best_of.values() if r not in recs]
    graphed = all(r["metrics"]["cuda_graph_count"] == 1.0 for r in fla_recs.values())
    met = worst >= FLA_TARGET_RATIO
    ours_algorithms = sorted({lin_recs[(d, n, FLA_CHUNK)]["config"].get("algorithm", "two_pass") for d, n in fla_recs})
    return ctx.finding(
        prototype=PROTOTYPE, slug=f"fla-anchor-{ctx.backend}",
        title=f"Our chunk kernels vs flash-linear-attention chunk_simple_gla on {ctx.backend}",
        claim=(f"Same inputs, {dtype}, no normalisation, same scale; FLA at its chunk {FLA_CHUNK}: outputs agree to "
               f"{fmt(max(r['metrics']['vs_ours_rel_err'] for r in fla_recs.values()))} relative error. "
               f"Our forward with our fastest chunk at each N / FLA's: " + ", ".join(
                   f"D={d} N={fmt_n(n)}: {fmt_ratio(r)} (C={best_of[(d, n)]['config']['chunk_size']})"
                   for (d, n), r in sorted(best_ratios.items()))
               + f"; at the same chunk {FLA_CHUNK}: " + ", ".join(
                   f"D={d} N={fmt_n(n)}: {fmt_ratio(r)}" for (d, n), r in sorted(ratios.items()))
               + f". Worst at N >= {fmt_n(FLA_TARGET_MIN_N)}: {fmt_ratio(worst)} with our chunk choice, "
               f"{fmt_ratio(worst_same)} at chunk {FLA_CHUNK} (target >= {fmt_ratio(FLA_TARGET_RATIO)}: "
               + ("met" if met else "NOT met") + "). Both sides timed without host gaps: ours as launches issued "
               "from C++ (" + ", ".join(ours_algorithms) + "), FLA "
               + ("as CUDA-graph replays" if graphed else "eagerly (graph capture failed)") + "."),
        evidence={"worst_ratio_at_target_n_x": worst, "worst_same_chunk_ratio_at_target_n_x": worst_same,
                  "best_ratio_x": max(best_ratios.values()),
                  **{f"d{d}_n{n}_best_chunk_x": r for (d, n), r in best_ratios.items()},
                  **{f"d{d}_n{n}_same_chunk_x": r for (d, n), r in ratios.items()}},
        config={"fla_chunk_size": FLA_CHUNK, "dtype": dtype, "target_min_seq_len": FLA_TARGET_MIN_N},
        answer={"target_met": met}, cv=_cv(recs), records=recs)


def _recommendation(ctx, lin_recs, best_chunk, cross, head_dims, seq_lens, softmax_impls, dtype, impl,
                    notes) -> Finding:
    """6. recommendation: the chunk per head dim and from where linear attention wins."""
    recs = [lin_recs[(d, n, best_chunk[d])] for d in head_dims for n in seq_lens]
    cross_txt, ev, crossover = [], {}, {}
    for d in head_dims:
        vals = [cross[(si, d)] for si in softmax_impls if (si, d) in cross and cross[(si, d)] is not None]
        crossover[str(d)] = max(vals) if vals else None
        if vals:
            ev[f"d{d}_crossover_tokens"] = max(vals)
            cross_txt.append(f"D={d}: beyond ~{fmt_n(max(vals))} tokens")
        else:
            cross_txt.append(f"D={d}: not within N <= {fmt_n(seq_lens[-1])}")
        ev[f"d{d}_best_chunk_count"] = float(best_chunk[d])
    extra = "".join(f" Note ({k}): {v}." for k, v in sorted(notes.items()))
    return ctx.finding(
        prototype=PROTOTYPE, slug=f"recommendation-{ctx.backend}",
        title=f"Recommendation for causal linear attention on {ctx.backend}",
        claim=("Use chunk " + ", ".join(f"{best_chunk[d]} at D={d}" for d in head_dims)
               + "; prefer linear over causal softmax attention (crossover against the fastest softmax "
               "implementation measured here) " + "; ".join(cross_txt) + "." + extra),
        evidence=ev,
        config={"head_dims": head_dims, "seq_lens": seq_lens, "dtype": dtype, "impl": impl},
        answer={"chunk_size": {str(d): best_chunk[d] for d in head_dims}, "crossover_tokens": crossover,
                "notes": dict(sorted(notes.items()))},
        cv=_cv(recs), records=recs)


def findings_of_sweep(ctx: ExperimentContext, lin_recs: dict, soft_recs: dict, *, softmax_impls: Sequence[str],
                      fla_recs: dict, copy_gbps: Optional[float], notes: dict[str, str],
                      copy_rec: Optional[dict[str, Any]] = None) -> list[Finding]:
    head_dims = sorted({d for d, _, _ in lin_recs})
    seq_lens = sorted({n for _, n, _ in lin_recs})
    chunks = sorted({c for _, _, c in lin_recs})
    long_ns = [n for n in seq_lens if n >= FLA_TARGET_MIN_N] or seq_lens[-1:]
    impl = next(iter(lin_recs.values()))["config"]["impl"]
    dtype = next(iter(lin_recs.values()))["config"]["dtype"]

    best_chunk, findings = _best_chunks(ctx, lin_recs, head_dims, long_ns, chunks, dtype, impl)
    findings += [_throughput(ctx, lin_recs, d, best_chunk[d], seq_lens, dtype, impl) for d in head_dims]
    cross: dict[tuple[str, int], Optional[float]] = {}
    for d in head_dims:
        f = _crossover_finding(ctx, lin_recs, soft_recs, d, best_chunk[d], seq_lens, chunks, softmax_impls, dtype,
                               notes, cross)
        if f is not None:
            findings.append(f)
    findings.append(_bandwidth(ctx, lin_recs, best_chunk, head_dims, seq_lens[-1], dtype, copy_gbps, copy_rec))
    if fla_recs:
        findings.append(_fla_anchor(ctx, lin_recs, fla_recs, dtype))
    elif ctx.backend == "cuda":
        notes.setdefault("fla", "flash-linear-attention anchor not run")
    findings.append(_recommendation(ctx, lin_recs, best_chunk, cross, head_dims, seq_lens, softmax_impls, dtype,
                                    impl, notes))
    return findings
