"""Prototype 8 findings, generated from the run's records (no typed numbers)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ...findings import fmt, fmt_pct, fmt_ratio
from ..registry import ExperimentContext
from . import common as C


def _cv(rows: List[dict]) -> float:
    return max(r["timing"]["cv"] for r in rows)


def _one(rows: List[dict], **config: Any) -> Optional[dict]:
    for r in rows:
        if all(r["config"].get(k) == v for k, v in config.items()):
            return r
    return None


def framework_findings(ctx: ExperimentContext, rows: List[dict]) -> list:
    out = []
    fw = _one(rows, sweep="framework")
    if fw is not None:
        m = fw["metrics"]
        parts = ", ".join(f"{name} {int(m['glue_lines_' + name + '_count'])}" for name in C.GLUE_MODULES)
        claim = (f"attnproto enters PyTorch and transformers without a fork in {int(m['glue_lines_count'])} code lines of "
                 f"glue ({parts}); torch.compile(fullgraph) of the model's forward with our attention has "
                 f"{int(m['graph_breaks_count'])} graph breaks; torch.library.opcheck passes for "
                 f"{int(m['opcheck_passed_count'])} of {int(m['opcheck_total_count'])} ops ({ctx.backend}).")
        out.append(ctx.finding(prototype=C.PROTOTYPE, title="What a custom attention kernel costs a framework",
                               claim=claim, evidence={k: m[k] for k in ("glue_lines_count", "graph_breaks_count", "opcheck_passed_count")},
                               config={"modules": fw["config"]["modules"]}, cv=_cv([fw]), records=[fw],
                               slug="glue-graph-breaks-opcheck"))
    disp = [r for r in rows if r["config"].get("sweep") == "dispatch"]
    by = {r["config"]["path"]: r for r in disp}
    if {"op", "direct", "sdpa"} <= set(by):
        us = {k: r["metrics"]["per_call_us"] for k, r in by.items()}
        claim = (f"Dispatch of torch.ops.attnproto.paged_decode: {fmt(us['op'], 'us')} per call against "
                 f"{fmt(us['direct'], 'us')} for our kernel called directly (overhead {fmt(us['op'] - us['direct'], 'us')})"
                 f" and {fmt(us['sdpa'], 'us')} for an eager SDPA call")
        if "graph_replay" in us:
            claim += f"; replayed from a CUDA graph {fmt(us['graph_replay'], 'us')}"
        if "kernel_device" in us:
            claim += f" (the kernel itself {fmt(us['kernel_device'], 'us')} on the device)"
        s = by["op"]["config"]
        claim += f" (B={s['batch']}, {s['num_heads']}/{s['num_kv_heads']} heads, D={s['head_dim']}, context {s['context']})."
        out.append(ctx.finding(prototype=C.PROTOTYPE, title="Dispatch overhead of the custom op", claim=claim,
                               evidence={f"{k}_us": v for k, v in us.items()} | {"overhead_us": us["op"] - us["direct"]},
                               config={"context": s["context"], "head_dim": s["head_dim"]}, cv=_cv(disp),
                               records=disp, slug=f"dispatch-overhead-n{s['context']}"))
    return out


def e2e_findings(ctx: ExperimentContext, rows: List[dict]) -> list:
    out = []
    pre = [r for r in rows if r["config"].get("sweep") == "prefill"]
    for n in sorted({r["config"]["prompt"] for r in pre}):
        pts = [r for r in pre if r["config"]["prompt"] == n]
        ours, sdpa = _one(pts, impl="attnproto"), _one(pts, impl="sdpa")
        if ours is None or sdpa is None:
            continue
        ms = {r["config"]["impl"]: r["metrics"]["prefill_ms"] for r in pts}
        claim = (f"Prefill of a {n}-token prompt (batch 1): " + ", ".join(f"{k} {fmt(v, 'ms')}" for k, v in ms.items())
                 + f"; attnproto takes {fmt_ratio(ms['attnproto'] / ms['sdpa'])} the time of sdpa.")
        out.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Prefill latency at {n} tokens", claim=claim,
                               evidence={f"{k}_ms": v for k, v in ms.items()}
                               | {"attnproto_over_sdpa_ratio": ms["attnproto"] / ms["sdpa"]},
                               config={"prompt": n}, cv=_cv(pts),
                               records=pts, slug=f"prefill-n{n}"))
    dec = [r for r in rows if r["config"].get("sweep") == "decode"]
    for b, n in sorted({(r["config"]["batch"], r["config"]["context"]) for r in dec}):
        pts = [r for r in dec if (r["config"]["batch"], r["config"]["context"]) == (b, n)]
        ours = _one(pts, impl="attnproto", cuda_graph=True) or _one(pts, impl="attnproto", cuda_graph=False)
        base = _one(pts, impl="sdpa", cuda_graph=ours["config"]["cuda_graph"]) if ours else None
        if ours is None or base is None:
            continue
        mode = "under CUDA graphs" if ours["config"]["cuda_graph"] else "in eager (Python) mode"
        tps = {f"{r['config']['impl']}{'_graph' if r['config']['cuda_graph'] else ''}": r["metrics"]["tokens_per_s"]
               for r in pts}
        om = ours["metrics"]
        claim = (f"Decode at batch {b}, context {n} {mode}: attnproto {fmt(om['tokens_per_s'])} tokens/s "
                 f"({fmt(om['step_ms'], 'ms')}/step), {fmt_ratio(om['tokens_per_s'] / base['metrics']['tokens_per_s'])}"
                 f" HF sdpa's; every row (tokens/s): " + ", ".join(f"{k} {fmt(v)}" for k, v in tps.items()))
        ev: Dict[str, float] = {f"{k}_tokens_per_s": v for k, v in tps.items()}
        ev["attnproto_over_sdpa_tokens_ratio"] = om["tokens_per_s"] / base["metrics"]["tokens_per_s"]
        if "floor_ratio" in om:
            claim += (f"; the step's floor (weights + KV over the measured copy bandwidth) is {fmt(om['floor_ms'], 'ms')}"
                      f": ours reaches {fmt_pct(om['floor_ratio'])} of it")
            ev["floor_ratio"] = om["floor_ratio"]
        if "attention_ratio" in om:
            claim += f"; attention (append + paged decode, every layer) is {fmt_pct(om['attention_ratio'])} of our step"
            ev["attention_ratio"] = om["attention_ratio"]
        out.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Decode throughput at batch {b}, context {n}",
                               claim=claim + ".", evidence=ev, config={"batch": b, "context": n}, cv=_cv(pts),
                               records=pts, slug=f"decode-b{b}-n{n}"))
    return out
