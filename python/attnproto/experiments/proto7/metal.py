"""Prototype 7 on Metal (Apple GPU family 9): the variants of shaders/metal/flash_attention.metal
(function constants ROPE, ALIBI, WINDOW, SOFTCAP, GQA_GROUP) against the base kernel at one tile
(metal_specs.PROTO7_*), and fused RoPE against the standalone rope.metal + base.

``run_metal(ctx)`` is the ``attnproto run proto7 --backend metal`` path. Statically checked on
Linux (tools/metal_check compiles every metal_specs.proto7_specs() spec), never run on Apple
hardware: without a Metal device it raises ExperimentError saying so, and nothing is measured.
On a Mac every specialisation is FP64-gated first on a small odd shape, then timed (timer:
attnproto.metal_timing, named in every claim). Standalone RoPE + base is the sum of three
separately timed dispatches (RoPE on Q, on K, the base kernel)."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ... import lab, metal_specs as ms, metal_timing, ref
from ...findings import fmt, fmt_pct
from ...ops import metal_flash
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from . import common as C

METAL_DTYPE = "float16"          # numpy holds it natively: the FP64 gates need no ml_dtypes
SEQ_LEN = 2048                   # seed task 4.20
QUICK = {"seq_len": 256, "heads": 8, "groups": (1, 4)}
WARMUP, ITERS, QUICK_ITERS = 4, 30, 3
#: FP64 gate shape per spec: odd lengths (a partial query and key tile), Hq = 8.
GATE_HEADS, GATE_SEQ = 8, 77
GATE_WINDOW = 20
ATOL, RTOL = 5e-3, 1e-2          # seed NFR-3 (FP16)


def _metal_backend():
    """The Metal GpuBackend, or ExperimentError when there is none (a function: tests substitute)."""
    from ... import backend as backend_mod  # noqa: PLC0415

    try:
        return backend_mod.get("metal")
    except (backend_mod.BackendUnavailable, ImportError, ValueError) as exc:
        raise ExperimentError("proto7 --backend metal needs an Apple GPU family 9 Metal device (the kernels are "
                              f"statically checked on Linux, never run there); nothing was measured: {exc}") from exc


def _kwargs(name: str, n: int, window: int) -> Dict[str, Any]:
    """metal_flash keyword arguments of a metal_specs.PROTO7_VARIANTS entry."""
    spec = ms.PROTO7_VARIANTS[name]
    kw: Dict[str, Any] = {"causal": spec.get("causal", False), "rope": spec.get("rope", False),
                          "alibi": spec.get("alibi", False), "block_r": ms.PROTO7_BLOCK_R, "block_c": ms.PROTO7_BLOCK_C}
    if spec.get("window"):
        kw["window"] = window
    if spec.get("softcap"):
        kw["softcap"] = C.SOFTCAP
    return kw


def _gate(be, rng, name: str, group: int) -> float:
    """Max |O - FP64| of the variant on the gate shape; ExperimentError outside tolerance."""
    kw = _kwargs(name, GATE_SEQ, GATE_WINDOW)
    hkv = GATE_HEADS // group
    q = rng.standard_normal((1, GATE_HEADS, GATE_SEQ, ms.PROTO7_HEAD_DIM)).astype(np.float16)
    k, v = (rng.standard_normal((1, hkv, GATE_SEQ, ms.PROTO7_HEAD_DIM)).astype(np.float16) for _ in range(2))
    o, _ = metal_flash.flash_forward(q, k, v, backend=be, **kw)
    want = ref.attention(q, k, v, causal=kw["causal"], rope=kw["rope"], alibi=kw["alibi"], window=kw.get("window"),
                         softcap=kw.get("softcap"))
    got = np.asarray(o, np.float64)
    check = ref.allclose(got, want, atol=ATOL, rtol=RTOL)
    if not check:
        raise ExperimentError(f"proto7 metal: {name} (group {group}) vs FP64: {check.report()}")
    return float(np.abs(got - want).max())


def run_metal(ctx: ExperimentContext) -> ExperimentResult:
    be = _metal_backend()
    n = QUICK["seq_len"] if ctx.quick else SEQ_LEN
    hq = QUICK["heads"] if ctx.quick else C.NUM_HEADS
    groups = QUICK["groups"] if ctx.quick else ms.PROTO7_GQA_GROUPS
    iters = QUICK_ITERS if ctx.quick else ITERS
    d = ms.PROTO7_HEAD_DIM
    records: List[dict] = []
    findings = []
    timers = set()

    def timed(launch):
        stats, timer = metal_timing.timed(launch, WARMUP, iters)
        timers.add(timer)
        return lab.from_native(stats) if not isinstance(stats, lab.TimingStats) else stats

    for g in ctx.progress(groups, desc="proto7[metal]"):
        q = ctx.rng.standard_normal((1, hq, n, d)).astype(np.float16)
        k, v = (ctx.rng.standard_normal((1, hq // g, n, d)).astype(np.float16) for _ in range(2))
        cfg = {"sweep": "metal", "seq_len": n, "num_heads": hq, "num_kv_heads": hq // g, "group": g, "head_dim": d,
               "dtype": METAL_DTYPE, "tile": f"{ms.PROTO7_BLOCK_R}x{ms.PROTO7_BLOCK_C}"}
        names = [x for x in ms.PROTO7_VARIANTS if x not in ("llama", "gemma2")]
        names += [x for x, grp in (("llama", C.LLAMA_GROUP), ("gemma2", C.GEMMA_GROUP)) if grp == g]
        rows = []
        base_t = None
        for name in names:
            windows = ((n // 8, n // 4) if name == "window" else
                       (min(C.GEMMA_WINDOW, n // 2),) if name == "gemma2" else (0,))
            for w in windows:
                err = _gate(be, ctx.rng, name, g)
                launch = metal_flash.prepare_flash_forward(q, k, v, backend=be, **_kwargs(name, n, w))
                t = timed(launch)
                base_t = t if name == "base" else base_t
                metrics = {"time_us": t.median_ms * 1e3, "gate_abs_err": err,
                           "over_base_pct": 100.0 * (t.median_ms / base_t.median_ms - 1.0)}
                if w:
                    metrics["window_tokens"] = w
                if name == "rope":
                    rope_t = sum(timed(metal_flash.prepare_rope(x, backend=be)).median_ms for x in (q, k))
                    metrics["vs_standalone_x"] = (rope_t + base_t.median_ms) / t.median_ms
                label = name if not w or name != "window" else f"window-n{n // w}"
                rows.append(ctx.record({**cfg, "kernel": C.OURS if name != "base" else C.OURS_BASE, "case": label},
                                       metrics, t))
        records += rows
        fused = [r for r in rows if r["config"]["case"] != "base"]
        timer = ", ".join(sorted(timers))
        claim = (f"Metal flash_attention ({METAL_DTYPE}, N={n}, {hq}/{hq // g} heads, D={d}, causal, tile "
                 f"{cfg['tile']}; timer: {timer}): base {fmt(rows[0]['metrics']['time_us'])} us; over it: "
                 + ", ".join(f"{r['config']['case']} {fmt_pct(r['metrics']['over_base_pct'] / 100.0)}" for r in fused) + ".")
        findings.append(ctx.finding(prototype=C.PROTOTYPE, title=f"Metal variant cost over the base kernel, group {g}",
                                    claim=claim, evidence={f"{r['config']['case']}_over_base_pct": r["metrics"]["over_base_pct"]
                                                           for r in fused},
                                    config={"seq_len": n, "group": g, "backend_path": "metal"},
                                    cv=max(r["timing"]["cv"] for r in rows), records=rows, slug=f"metal-variant-cost-g{g}"))
    return ExperimentResult(records, findings)
