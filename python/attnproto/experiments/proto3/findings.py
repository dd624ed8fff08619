"""Prototype 3 findings from the CUDA records: best block size, the budget map, what paging costs,
when split-KV pays, what GQA packing buys, and the recommendation (with the issue's targets)."""
from __future__ import annotations

from typing import Optional

from ...findings import Finding, fmt, fmt_pct
from ...ops.families import paged_decode as fam
from ..registry import ExperimentContext
from . import common as C

H200_SMEM = 232448          # per-block opt-in shared memory of the H100 / H200 (227 KB)
M4_THREADGROUP = 32768      # threadgroup memory of an Apple M4 GPU (32 KB), the seeds' budget
#: The issue's target for one-token pages: block 1 at >= 0.85x the speed of the main block size.
BLOCK1_TARGET_X = 0.85


def _find(recs: list[dict], **match) -> list[dict]:
    return [r for r in recs if all(r["config"].get(k) == v for k, v in match.items())]


def _one(recs: list[dict], **match) -> Optional[dict]:
    found = _find(recs, **match)
    return found[0] if found else None


def _t(rec: dict) -> float:
    return rec["timing"]["median_ms"]


def _cv(*recs: dict) -> float:
    return max(r["timing"]["cv"] for r in recs)


def best_block(ctx: ExperimentContext, recs: list[dict]) -> list[Finding]:
    out = []
    b, (hq, hkv) = C.MAIN_BATCH, C.MAIN_HEADS
    for n in sorted({r["config"]["context"] for r in _find(recs, sweep="block", kernel=C.OURS)}):
        rows = sorted(_find(recs, sweep="block", kernel=C.OURS, context=n), key=lambda r: r["config"]["block_size"])
        if not rows:
            continue
        best = min(rows, key=_t)
        base = _one(rows, block_size=C.MAIN_BLOCK) or best
        one = _one(rows, block_size=1)
        ev = {f"bs{r['config']['block_size']}_us": r["metrics"]["time_us"] for r in rows}
        claim = (f"Decode B={b}, Hq={hq}, Hkv={hkv}, D={C.HEAD_DIM}, context {n}: block size "
                 f"{best['config']['block_size']} is fastest ({fmt(best['metrics']['time_us'])} us, "
                 f"{fmt(best['metrics']['bandwidth_tbps'])} TB/s); across "
                 f"{', '.join(str(r['config']['block_size']) for r in rows)} the times span "
                 f"{fmt(min(_t(r) for r in rows) * 1e3)}-{fmt(max(_t(r) for r in rows) * 1e3)} us")
        if one is not None:
            ratio = _t(base) / _t(one)
            ev["bs1_vs_bs16_x"] = ratio
            ev["target_x"] = BLOCK1_TARGET_X
            claim += (f"; block 1 runs at {fmt(ratio)}x the speed of block {C.MAIN_BLOCK} "
                      f"(target >= {fmt(BLOCK1_TARGET_X)})")
        out.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Best KV block size for decode at context {n}",
                               claim=claim + ".", evidence=ev, config={"context": n, "batch": b, "heads": f"{hq}/{hkv}"},
                               cv=_cv(*rows), records=rows, slug=f"best-block-size-decode-n{n}",
                               answer={"block_size": best["config"]["block_size"]}))
    return out


def budget_table(rows: list[dict]) -> list[dict]:
    """The budget map as printed at the end of a CUDA run: per D x block size, the CTA's shared
    memory (checked by the kernel itself at launch) against the H200's and the M4's limits."""
    return [{"head_dim": r["head_dim"], "block_size": r["block_size"], "heads_per_cta": r["heads"],
             "smem_bytes": r["smem_bytes"], "of_h200": r["smem_bytes"] / H200_SMEM,
             "fits_m4_32kb": r["smem_bytes"] <= M4_THREADGROUP, "registers": r["registers"]} for r in rows]


def budget(ctx: ExperimentContext, rows: list[dict], recs: list[dict]) -> Finding:
    ev = {f"d{r['head_dim']}_bs{r['block_size']}_smem_bytes": float(r["smem_bytes"]) for r in rows}
    ev.update({f"d{r['head_dim']}_bs{r['block_size']}_regs": float(r["registers"]) for r in rows})
    worst = max(rows, key=lambda r: r["smem_bytes"])
    fits_m4 = [r for r in rows if r["smem_bytes"] <= M4_THREADGROUP]
    ev.update(h200_smem_bytes=float(H200_SMEM), m4_threadgroup_bytes=float(M4_THREADGROUP),
              worst_of_h200_ratio=worst["smem_bytes"] / H200_SMEM, pairs_count=float(len(rows)),
              fit_m4_count=float(len(fits_m4)))
    spread = {d: {r["smem_bytes"] for r in rows if r["head_dim"] == d} for d in {r["head_dim"] for r in rows}}
    same = all(len(v) == 1 for v in spread.values())
    claim = (f"Shared memory per CTA of the compiled decode kernel (unsplit, {C.MAIN_HEADS[0]}/{C.MAIN_HEADS[1]} "
             f"heads): at most {worst['smem_bytes']} bytes (D={worst['head_dim']}), "
             f"{fmt_pct(worst['smem_bytes'] / H200_SMEM)} of the H200's {H200_SMEM}; "
             f"{len(fits_m4)} of {len(rows)} (D, block) pairs fit the M4's {M4_THREADGROUP}-byte threadgroup memory. "
             + ("The block size does not change it: pages are gathered row by row into the same K/V ring."
                if same else "It varies with the block size."))
    ref = _find(recs, sweep="block", kernel=C.OURS) or recs[:1]
    return ctx.finding(prototype=C.PROTOTYPE, title="Shared-memory budget of paged decode per block size and D",
                       claim=claim, evidence=ev, config={"heads": f"{C.MAIN_HEADS[0]}/{C.MAIN_HEADS[1]}"},
                       cv=_cv(*ref), records=ref, slug="paged-decode-budget-map")


def overhead(ctx: ExperimentContext, recs: list[dict]) -> list[Finding]:
    out = []
    b, (hq, hkv) = C.MAIN_BATCH, C.MAIN_HEADS
    for n in sorted({r["config"]["context"] for r in _find(recs, sweep="block", kernel=C.OURS)}):
        ours = _one(recs, sweep="block", kernel=C.OURS, context=n, block_size=C.MAIN_BLOCK)
        ident = _one(recs, sweep="block", kernel=C.OURS_IDENTITY, context=n, block_size=C.MAIN_BLOCK)
        cont = _one(recs, sweep="block", kernel=C.OURS_CONTIGUOUS, context=n)
        cudnn = _one(recs, sweep="block", kernel=C.CUDNN, context=n)
        gather = _one(recs, sweep="block", kernel=C.GATHER, context=n, block_size=C.MAIN_BLOCK)
        flex = _one(recs, kernel=C.FLEX, context=n)
        if not (ours and ident and cont):
            continue
        cited = [r for r in (ours, ident, cont, cudnn, gather, flex) if r]
        ev = {"ours_us": ours["metrics"]["time_us"], "identity_us": ident["metrics"]["time_us"],
              "contiguous_us": cont["metrics"]["time_us"], "ours_tbps": ours["metrics"]["bandwidth_tbps"],
              "paging_cost_ratio": _t(ours) / _t(cont) - 1}
        claim = (f"Decode B={b}, Hq={hq}, Hkv={hkv}, D={C.HEAD_DIM}, context {n}, block {C.MAIN_BLOCK}: "
                 f"scattered table {fmt(ours['metrics']['time_us'])} us, identity table "
                 f"{fmt(ident['metrics']['time_us'])} us, same kernel on contiguous K/V "
                 f"{fmt(cont['metrics']['time_us'])} us (paging costs {fmt_pct(_t(ours) / _t(cont) - 1)})")
        flex_name = (f"flex_attention over torch's paged cache (block {flex['config']['block_size']}, "
                     f"{flex['config'].get('tile', 'flex')} kernel)") if flex else ""
        for name, rec in (("cuDNN SDPA on contiguous K/V", cudnn), ("gather + SDPA", gather), (flex_name, flex)):
            if rec:
                ev[f"vs_{rec['config']['kernel']}_x"] = _t(rec) / _t(ours)
                claim += f"; {fmt(_t(rec) / _t(ours))}x the speed of {name} ({fmt(rec['metrics']['time_us'])} us)"
        out.append(ctx.finding(prototype=C.PROTOTYPE, title=f"What paging costs in decode at context {n}",
                               claim=claim + ".", evidence=ev, config={"context": n, "batch": b, "block_size": C.MAIN_BLOCK},
                               cv=_cv(*cited), records=cited, slug=f"paging-overhead-decode-n{n}"))
    return out


def split(ctx: ExperimentContext, recs: list[dict]) -> list[Finding]:
    out = []
    for b, n in sorted({(r["config"]["batch"], r["config"]["context"]) for r in _find(recs, sweep="split")}):
        rows = [r for r in _find(recs, sweep="split", batch=b, context=n) if r["config"]["kernel"].startswith(C.OURS)]
        auto = _one(rows, kernel=C.OURS)
        fixed = sorted([r for r in rows if r is not auto], key=lambda r: r["metrics"]["partitions_count"])
        if not auto or not fixed:
            continue
        best = min(fixed, key=_t)
        one = next((r for r in fixed if r["metrics"]["partitions_count"] == 1), fixed[0])
        ev = {f"p{int(r['metrics']['partitions_count'])}_us": r["metrics"]["time_us"] for r in fixed}
        ev.update(auto_partitions_count=auto["metrics"]["partitions_count"], auto_of_best_ratio=_t(best) / _t(auto),
                  auto_of_ceiling_ratio=auto["metrics"].get("of_ceiling_ratio", 0.0), best_vs_one_x=_t(one) / _t(best))
        claim = (f"Decode B={b}, {C.MAIN_HEADS[0]}/{C.MAIN_HEADS[1]} heads, context {n}: "
                 f"{int(best['metrics']['partitions_count'])} partitions are fastest ({fmt(best['metrics']['time_us'])} us, "
                 f"{fmt(_t(one) / _t(best))}x one partition); the automatic rule picks "
                 f"{int(auto['metrics']['partitions_count'])} and runs at {fmt(_t(best) / _t(auto))}x the best, "
                 f"{fmt(auto['metrics']['bandwidth_tbps'])} TB/s = {fmt_pct(auto['metrics'].get('of_ceiling_ratio', 0.0))} "
                 f"of the measured read ceiling")
        out.append(ctx.finding(prototype=C.PROTOTYPE, title=f"When split-KV pays: batch {b}, context {n}",
                               claim=claim + ".", evidence=ev, config={"batch": b, "context": n},
                               cv=_cv(*rows), records=rows, slug=f"split-kv-b{b}-n{n}",
                               answer={"partitions": int(best["metrics"]["partitions_count"])}))
    return out


def packing(ctx: ExperimentContext, recs: list[dict]) -> Optional[Finding]:
    pairs = []
    for r in _find(recs, sweep="pack", kernel=C.OURS):
        c = r["config"]
        u = _one(recs, sweep="pack", kernel=C.OURS_UNPACKED, num_heads=c["num_heads"], context=c["context"])
        if u:
            pairs.append((r, u))
    if not pairs:
        return None
    ev = {f"h{r['config']['num_heads']}_n{r['config']['context']}_speedup_x": _t(u) / _t(r) for r, u in pairs}
    parts = [f"Hq={r['config']['num_heads']}/Hkv={r['config']['num_kv_heads']} context {r['config']['context']}: "
             f"{fmt(_t(u) / _t(r))}x ({fmt(r['metrics']['time_us'])} vs {fmt(u['metrics']['time_us'])} us)"
             for r, u in pairs]
    cited = [x for pr in pairs for x in pr]
    return ctx.finding(prototype=C.PROTOTYPE, title="What packing the GQA group into one CTA buys in decode",
                       claim=("Reading each K/V row once for the whole GQA group (one CTA per kv head) against one "
                              f"CTA per query head, B={C.MAIN_BATCH}, block {C.MAIN_BLOCK}: " + "; ".join(parts) + "."),
                       evidence=ev, config={"batch": C.MAIN_BATCH, "block_size": C.MAIN_BLOCK}, cv=_cv(*cited),
                       records=cited, slug="gqa-packing-decode")


def recommendation(ctx: ExperimentContext, recs: list[dict], blocks: list[Finding]) -> Optional[Finding]:
    (hq, hkv), b = C.MAIN_HEADS, C.MAIN_BATCH
    ratios = []
    for r in _find(recs, kernel=C.OURS, batch=b, num_heads=hq, num_kv_heads=hkv, block_size=C.MAIN_BLOCK):
        n = r["config"]["context"]
        cudnn = _one(recs, kernel=C.CUDNN, batch=b, num_heads=hq, num_kv_heads=hkv, context=n,
                     sweep=r["config"]["sweep"])
        if cudnn and n >= 4096 and r["config"]["sweep"] in ("block", "scale"):
            ratios.append((n, _t(cudnn) / _t(r), r, cudnn))
    if not ratios:
        return None
    worst = min(ratios, key=lambda x: x[1])
    ev = {f"n{n}_vs_cudnn_x": ratio for n, ratio, _, _ in ratios}
    best_bs = [f.answer.get("block_size") for f in blocks if f.answer]
    claim = (f"Decode with block {C.MAIN_BLOCK}, B={b}, {hq}/{hkv} heads, context >= 4K runs at "
             f"{fmt(worst[1])}-{fmt(max(x[1] for x in ratios))}x cuDNN's contiguous decode (target >= 1.0; worst at "
             f"context {worst[0]}); the block-size sweep's winners: {', '.join(map(str, best_bs)) or 'none'}. "
             f"Recommendation: page the KV cache at block {C.MAIN_BLOCK} unless a finding above says otherwise, "
             "and split the context only when the batch leaves SMs idle.")
    cited = [x for _, _, r, c in ratios for x in (r, c)]
    return ctx.finding(prototype=C.PROTOTYPE, title="Paged decode recommendation", claim=claim, evidence=ev,
                       config={"batch": b, "heads": f"{hq}/{hkv}"}, cv=_cv(*cited), records=cited,
                       slug="paged-decode-recommendation", answer={"block_size": C.MAIN_BLOCK})


def tiles(ctx: ExperimentContext, recs: list[dict]) -> list[Finding]:
    out = []
    default = fam.choose_config(C.HEAD_DIM, 1, C.MAIN_HEADS[0] // C.MAIN_HEADS[1])[0].label()
    groups = sorted({(r["config"]["batch"], r["config"]["context"], r["config"]["block_size"])
                     for r in _find(recs, sweep="tile")})
    for b, n, bs in groups:
        rows = _find(recs, sweep="tile", batch=b, context=n, block_size=bs)
        best = min(rows, key=_t)
        dflt = _one(rows, tile=default)
        ev = {f"{r['config']['tile'].replace(' ', '_')}_us": r["metrics"]["time_us"] for r in rows}
        where = "contiguous K/V" if bs == 0 else f"block {bs}"
        claim = (f"Decode B={b}, {C.MAIN_HEADS[0]}/{C.MAIN_HEADS[1]} heads, D={C.HEAD_DIM}, context {n}, "
                 f"{where}: tile {best['config']['tile']} is fastest ({fmt(best['metrics']['time_us'])} us, "
                 f"{fmt(best['metrics']['bandwidth_tbps'])} TB/s) of {len(rows)} legal tiles")
        if dflt:
            ev["default_of_best_ratio"] = _t(best) / _t(dflt)
            claim += f"; the default {default} runs at {fmt(_t(best) / _t(dflt))}x the best"
        out.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Best decode tile at batch {b}, context {n}, {where}",
                               claim=claim + ".", evidence=ev, config={"batch": b, "context": n, "block_size": bs},
                               cv=_cv(*rows), records=rows, slug=f"best-decode-tile-b{b}-n{n}-bs{bs}",
                               answer={"tile": best["config"]["tile"]}))
    return out


def findings_of(ctx: ExperimentContext, recs: list[dict], budget_rows: list[dict]) -> list[Finding]:
    blocks = best_block(ctx, recs)
    out = blocks + [budget(ctx, budget_rows, recs)] + overhead(ctx, recs) + split(ctx, recs) + tiles(ctx, recs)
    for f in (packing(ctx, recs), recommendation(ctx, recs, blocks)):
        if f is not None:
            out.append(f)
    return out
