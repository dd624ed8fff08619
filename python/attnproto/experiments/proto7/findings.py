"""Prototype 7 findings from the CUDA records: what each variant costs over the base kernel of the
same run (wgmma family, same tiles), fused vs standalone, window scaling, and against flex — each
with the issue's target and whether this run met it."""
from __future__ import annotations

from typing import Callable, List, Optional

from ...findings import Finding, fmt, fmt_pct, fmt_ratio
from ..registry import ExperimentContext
from . import common as C

FAMILY = "wgmma"


def _find(recs: List[dict], **match) -> List[dict]:
    return [r for r in recs if all(r["config"].get(k) == v for k, v in match.items())]


def _feature(name: str) -> str:
    try:
        return C.by_name(name).feature
    except KeyError:
        return ""


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _overhead(ctx: ExperimentContext, recs: List[dict], n: int, feature: str, target: Optional[float],
              extra: Optional[Callable[[List[dict]], str]] = None) -> Optional[Finding]:
    rows = [r for r in _find(recs, kernel=C.OURS, family=FAMILY, seq_len=n) if _feature(r["config"]["case"]) == feature]
    if not rows:
        return None
    bases = _find(recs, kernel=C.OURS_BASE, family=FAMILY, seq_len=n)
    worst = max(rows, key=lambda r: r["metrics"]["over_base_pct"])
    ok = target is None or worst["metrics"]["over_base_pct"] <= 100.0 * target
    ev = {f"{r['config']['case']}_g{r['config']['group']}_over_base_pct": r["metrics"]["over_base_pct"] for r in rows}
    if target is not None:
        ev["target_pct"] = 100.0 * target
    claim = (f"Fused {feature} on the wgmma kernel (N={n}, B={C.batch_of(n)}, {C.NUM_HEADS} query heads, D={C.HEAD_DIM}, "
             f"bf16, causal, tiles {', '.join(sorted({r['config'].get('tile', '') for r in rows}))}): over the base "
             "kernel of the same run at the same tiles by " + ", ".join(f"{r['config']['case']} g{r['config']['group']} "
                                   f"{fmt_pct(r['metrics']['over_base_pct'] / 100.0)}" for r in rows)
             + f"; worst {worst['config']['case']} at group {worst['config']['group']}"
             + (f"; target <= {fmt_pct(target)}: {_met(ok)}" if target is not None else " (the issue sets no target)"))
    if extra is not None:
        claim += extra(rows)
    return ctx.finding(prototype=C.PROTOTYPE, title=f"Cost of fused {feature} over the base kernel at N={n}",
                       claim=claim + ".", evidence=ev, config={"seq_len": n, "feature": feature, "family": FAMILY},
                       cv=max(r["timing"]["cv"] for r in rows + bases), records=rows + bases,
                       slug=f"fused-{feature}-overhead-n{n}",
                       answer={"target_met": ok} if target is not None else None)


def _rope_extra(rows: List[dict]) -> str:
    vs = [r for r in rows if "vs_standalone_x" in r["metrics"]]
    if not vs:
        return "; standalone RoPE not measured"
    slow = min(vs, key=lambda r: r["metrics"]["vs_standalone_x"])
    ok = slow["metrics"]["vs_standalone_x"] > 1.0
    return (f"; our RoPE kernel on Q and K + the base kernel takes {fmt_ratio(slow['metrics']['vs_standalone_x'])} "
            f"the fused time at worst ({slow['config']['case']} g{slow['config']['group']}); fused faster than "
            f"standalone: {_met(ok)}")


def gqa(ctx: ExperimentContext, recs: List[dict], n: int) -> Optional[Finding]:
    bases = sorted(_find(recs, kernel=C.OURS_BASE, family=FAMILY, seq_len=n), key=lambda r: r["config"]["group"])
    mha = next((r for r in bases if r["config"]["group"] == 1), None)
    if mha is None:
        return None
    # like with like: the base records at multi-head's tiles (a RoPE case adds bases at its own tiles)
    bases = [r for r in bases if r["config"].get("tile") == mha["config"].get("tile")]
    if len(bases) < 2:
        return None
    mats = _find(recs, kernel=C.MATERIALISED_GQA, seq_len=n)
    ev = {f"g{r['config']['group']}_vs_mha_ratio": r["timing"]["median_ms"] / mha["timing"]["median_ms"] for r in bases[1:]}
    ev.update({f"g{r['config']['group']}_materialised_over_fused_x": 1.0 / r["metrics"]["fused_over_materialised_ratio"]
               for r in mats})
    ok = all(v <= C.GQA_TARGET for k, v in ev.items() if k.endswith("_vs_mha_ratio"))
    ev["target_ratio"] = C.GQA_TARGET
    claim = (f"Fused GQA on the wgmma kernel (N={n}, {C.NUM_HEADS} query heads, causal): time relative to multi-head "
             f"attention ({fmt(mha['metrics']['time_us'])} us): "
             + ", ".join(f"group {r['config']['group']} {fmt_ratio(r['timing']['median_ms'] / mha['timing']['median_ms'])}"
                         for r in bases[1:])
             + f" (target <= {fmt_ratio(C.GQA_TARGET)}: {_met(ok)}); repeat_kv + the base kernel takes "
             + (", ".join(f"{fmt_ratio(1.0 / r['metrics']['fused_over_materialised_ratio'])} (group {r['config']['group']})"
                          for r in mats) or "(not measured)") + " the fused time.")
    return ctx.finding(prototype=C.PROTOTYPE, title=f"Fused GQA against multi-head and materialised K/V at N={n}",
                       claim=claim, evidence=ev, config={"seq_len": n, "feature": "gqa", "family": FAMILY},
                       cv=max(r["timing"]["cv"] for r in bases + mats), records=bases + mats,
                       slug=f"fused-gqa-n{n}", answer={"target_met": ok})


def window(ctx: ExperimentContext, recs: List[dict], n: int) -> Optional[Finding]:
    rows = [r for r in _find(recs, kernel=C.OURS, family=FAMILY, seq_len=n) if "window_vs_full_ratio" in r["metrics"]]
    if not rows:
        return None
    fulls = _find(recs, kernel=C.OURS_BASE_FULL, family=FAMILY, seq_len=n)
    worst = max(rows, key=lambda r: r["metrics"]["window_vs_full_ratio"])
    ok = worst["metrics"]["window_vs_full_ratio"] <= C.WINDOW_TARGET
    ev = {f"{r['config']['case']}_g{r['config']['group']}_vs_full_ratio": r["metrics"]["window_vs_full_ratio"] for r in rows}
    ev.update({f"{r['config']['case']}_g{r['config']['group']}_vs_causal_pairs_ratio":
               r["metrics"]["window_vs_causal_pairs_ratio"] for r in rows})
    ev["target_ratio"] = C.WINDOW_TARGET
    claim = (f"Sliding window on the wgmma kernel (N={n}, causal): time(W) / ((W/N) x the non-causal full-attention "
             "time of the same kernel and tiles) is "
             + ", ".join(f"{fmt(r['metrics']['window_vs_full_ratio'])} (W={int(r['metrics']['window_tokens'])}, "
                         f"g{r['config']['group']})" for r in rows)
             + f"; target <= {C.WINDOW_TARGET}: {_met(ok)}. Against the causal kernel scaled by the visible (query, key) "
               "pairs the ratio is " + ", ".join(fmt(r["metrics"]["window_vs_causal_pairs_ratio"]) for r in rows) + ".")
    return ctx.finding(prototype=C.PROTOTYPE, title=f"Sliding-window time against (W/N) x full attention at N={n}",
                       claim=claim, evidence=ev, config={"seq_len": n, "feature": "window", "family": FAMILY},
                       cv=max(r["timing"]["cv"] for r in rows + fulls), records=rows + fulls,
                       slug=f"window-scaling-n{n}", answer={"target_met": ok})


def flex(ctx: ExperimentContext, recs: List[dict], n: int) -> Optional[Finding]:
    rows = [r for r in _find(recs, kernel=C.OURS, family=FAMILY, seq_len=n) if "flex_over_ours_x" in r["metrics"]]
    if not rows:
        return None
    cited = rows + _find(recs, kernel=C.FLEX, seq_len=n) + _find(recs, kernel=C.FLEX_PREROTATED, seq_len=n)
    worst = min(rows, key=lambda r: r["metrics"]["flex_over_ours_x"])
    ok = worst["metrics"]["flex_over_ours_x"] >= C.FLEX_TARGET
    claim = (f"Against compiled flex_attention with the same score_mod / block mask (N={n}, causal; RoPE: flex on "
             "inputs rotated by the eager torch RoPE, that RoPE timed with it): ours is "
             + ", ".join(f"{fmt_ratio(r['metrics']['flex_over_ours_x'])} ({r['config']['case']} g{r['config']['group']})"
                         for r in rows)
             + f" faster; target >= {fmt_ratio(C.FLEX_TARGET)} for every variant: {_met(ok)}.")
    return ctx.finding(prototype=C.PROTOTYPE, title=f"Fused variants against compiled flex_attention at N={n}",
                       claim=claim, evidence={f"{r['config']['case']}_g{r['config']['group']}_flex_over_ours_x":
                                              r["metrics"]["flex_over_ours_x"] for r in rows}
                       | {"target_ratio": C.FLEX_TARGET},
                       config={"seq_len": n, "feature": "flex", "family": FAMILY},
                       cv=max(r["timing"]["cv"] for r in cited), records=cited, slug=f"vs-flex-n{n}",
                       answer={"target_met": ok, "worst_case": worst["config"]["case"]})


def findings_of(ctx: ExperimentContext, recs: List[dict]) -> List[Finding]:
    out: List[Optional[Finding]] = []
    for n in sorted({r["config"]["seq_len"] for r in recs if "seq_len" in r["config"]}):
        out.append(_overhead(ctx, recs, n, "alibi", C.ALIBI_TARGET))
        out.append(_overhead(ctx, recs, n, "rope", C.ROPE_TARGET, _rope_extra))
        out.append(_overhead(ctx, recs, n, "softcap", None))
        out.append(_overhead(ctx, recs, n, "model", None, _rope_extra))
        out += [gqa(ctx, recs, n), window(ctx, recs, n), flex(ctx, recs, n)]
    return [f for f in out if f is not None]
