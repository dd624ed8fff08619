"""Prototype 2 — run-time dispatch vs specialisation ("function stitching") on CUDA.

The Prototype 1 tensor-core kernel (flash_fwd_mma, mma.sync FA2) as
shaders/cuda/flash_fwd_mma_stitch.cu, with its per-tile score (+ mask), softmax and
accumulate stages dispatched four ways (attnproto.ops.stitch: 0 inline = flash_fwd_mma's
code, 1 __noinline__, 2 device function-pointer table, 3 separate LTO-IR linked by
nvJitLink at load time). Every mode runs the same stage code, so O and LSE must be
bit-identical to mode 0, and mode 0 to flash_fwd_mma.

Dispatched calls of one launch = per (batch, head), per CTA, per warp, 3 per K/V tile the
warp processes (causal: the tiles it sees; stitch.dispatched_calls). Overhead per call is
reported two ways: amortised over all calls of the launch, and along one warp's serial path
(the delta times the resident warps divided by the calls, resident warps from the
occupancy that registers, static + dynamic shared memory and the block size allow; the
kernels are __launch_bounds__(threads, 1), which caps threads per block, not blocks per
SM). On "cpu" the experiment measures what needs no GPU: NVRTC/nvJitLink build cost and
ptxas's resource report (registers, stack frame, spills) per mode.
"""
from __future__ import annotations

import json
import math
import numpy as np

from ..ops import occupancy, stitch
from ..records import timing_from_samples
from .proto4 import compiler_or_reason
from .registry import ExperimentContext, ExperimentError, ExperimentResult, experiment

PROTOTYPE = "proto2"
ARCH_FALLBACK = "sm_90a"
# (batch, heads, seq_len, head_dim, causal), BF16: N=2048 D=128, N=4096 D=64, N=2048 D=128 causal.
SHAPES = stitch.BENCH_PROBLEMS
DTYPE = stitch.BENCH_DTYPE
QUICK_SHAPES = ((1, 8, 1024, 128, False),)
WARMUP = 4
ITERS = 30
QUICK_ITERS = 5
BUILD_REPEATS = 2   # timing records need at least 2 samples
# AC-2.4 / AC-2.6: stitching is acceptable when it costs less than this.
STITCH_BUDGET_PCT = 1.0

def _resident_warps(info: dict, resources: dict, warps_per_block: int, dynamic_smem: int) -> int:
    """Warps resident on the whole device: blocks per SM from the compiled kernel's registers,
    static + dynamic shared memory and the SM's limits (attnproto.ops.occupancy)."""
    smem = int(resources["static_shared_bytes"]) + int(dynamic_smem)
    blocks = occupancy.resident_blocks_per_sm(warps_per_block * occupancy.WARP_SIZE, int(resources["registers"]),
                                              smem, int(info.get("shared_mem_per_sm") or 0))
    return blocks * warps_per_block * int(info["multiprocessors"])


# ====================================================================== build (cpu and cuda)
def _build_configs(shapes):
    """(problem, StitchConfig of mode 0) per distinct tile of the problems."""
    out, seen = [], set()
    for problem in shapes:
        cfg = stitch.bench_config(*problem, 0, dtype=DTYPE).check()
        if cfg.tile not in seen:
            seen.add(cfg.tile)
            out.append((problem, cfg))
    return out


def _measure_builds(ctx: ExperimentContext, arch: str, shapes) -> list[dict]:
    records = []
    for _, base in _build_configs(shapes):
        tile = base.tile
        for mode in stitch.MODES:
            cfg = base.with_mode(mode)
            builds = [stitch.build(cfg, arch, verbose=True) for _ in range(BUILD_REPEATS)]
            try:
                report = {**stitch.ptxas_report(builds[-1].log), "ptxas_report_count": 1.0}
            except ValueError:
                # Some NVRTC builds return no ptxas -v text in the program log; the device-side
                # resources (cuFuncGetAttribute) are still recorded by the run phase.
                report = {"ptxas_report_count": 0.0}
            metrics = {"build_median_ms": float(np.median([x.build_ms for x in builds])),
                       "link_median_ms": float(np.median([x.link_ms for x in builds])), **report}
            records.append(ctx.record({"phase": "build", "mode": mode, "mode_name": stitch.MODE_NAMES[mode],
                                       "head_dim": tile.head_dim, "causal": tile.causal, "tile": tile.label(),
                                       "block_r": tile.block_r, "block_c": tile.block_c, "warps": tile.warps,
                                       "stages": tile.stages, "dtype": DTYPE, "arch": arch},
                                      metrics, timing_from_samples([x.build_ms for x in builds])))
    return records


# ====================================================================== run (cuda)
def _measure_runs(ctx: ExperimentContext, shapes) -> list[dict]:
    import torch  # noqa: PLC0415

    from .. import backend as backend_mod  # noqa: PLC0415
    from ..ops import flash  # noqa: PLC0415

    be = backend_mod.get("cuda")
    iters = QUICK_ITERS if ctx.quick else ITERS
    torch.manual_seed(int(ctx.rng.integers(2**31)))
    records = []
    for b, h, n, d, causal in ctx.progress(shapes, desc="proto2[cuda]"):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        # The production kernel on the same inputs and tiles: mode 0 must equal it bit for bit.
        tile = stitch.bench_config(b, h, n, d, causal, 0, dtype=DTYPE).tile
        prod_o, prod_lse = (x.clone() for x in flash.prepare_forward(q, k, v, causal=causal, config=tile,
                                                                       backend=be).launch())
        calls = stitch.dispatched_calls(b, h, n, n, tile)
        ref_o = ref_lse = None
        base_ms = None
        for mode in stitch.MODES:
            launch = stitch.prepare(q, k, v, mode, config=tile, causal=causal, backend=be)
            launch.problem.out.fill_(float("nan"))
            o, lse = launch.launch()
            torch.cuda.synchronize()
            if mode == 0:
                ref_o, ref_lse = o.clone(), lse.clone()
            if not torch.isfinite(o).all():
                raise ExperimentError(f"mode {mode} D={d} N={n} causal={causal}: non-finite output")
            differing = int((o != ref_o).sum()) + int((lse != ref_lse).sum())
            differing_prod = int((o != prod_o).sum()) + int((lse != prod_lse).sum())
            max_diff = float((o.float() - ref_o.float()).abs().max())
            stats = launch.time(warmup=WARMUP, iters=iters)
            if mode == 0:
                base_ms = stats.median_ms
            res = launch.kernel.resources
            resident = _resident_warps(be.info, res, tile.warps, launch.shared_bytes)
            delta_ns = (stats.median_ms - base_ms) * 1e6
            metrics = {"median_ms": stats.median_ms, "overhead_pct": 100.0 * (stats.median_ms / base_ms - 1.0),
                       "delta_ns": delta_ns, "calls_count": float(calls),
                       "amortised_ns_per_call_ns": delta_ns / calls,
                       "serial_ns_per_call_ns": delta_ns * resident / calls,
                       "resident_warps_count": float(resident),
                       "differing_elements_count": float(differing),
                       "differing_from_production_count": float(differing_prod),
                       "max_abs_diff_err": max_diff,
                       "registers_regs": float(res["registers"]), "local_bytes": float(res["local_bytes"])}
            records.append(ctx.record({"phase": "run", "mode": mode, "mode_name": stitch.MODE_NAMES[mode],
                                       "batch": b, "num_heads": h, "seq_len": n, "head_dim": d, "causal": causal,
                                       "dtype": DTYPE, "tile": tile.label(), "block_r": tile.block_r,
                                       "block_c": tile.block_c, "warps": tile.warps, "stages": tile.stages},
                                      metrics, stats))
        del q, k, v
        torch.cuda.empty_cache()
    return records


# ====================================================================== findings
def _rows(records, phase, **match):
    return [r for r in records if r["config"]["phase"] == phase and all(r["config"].get(k) == v for k, v in match.items())]


def _build_findings(ctx, records) -> list:
    main_tile = _rows(records, "build")[0]["config"]["tile"]
    rows = {r["config"]["mode"]: r for r in _rows(records, "build", tile=main_tile)}
    d = rows[0]["config"]["head_dim"]
    out = []
    m0 = rows[0]["metrics"]
    out.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Build cost of each dispatch mode (NVRTC, nvJitLink) on {ctx.backend}",
        slug=f"build-cost-per-mode-{ctx.backend}",
        claim=(f"At {main_tile}: " + "; ".join(
            f"mode {m} ({stitch.MODE_NAMES[m]}) {r['metrics']['build_median_ms']:.0f} ms"
            + (f" (4 LTO-IR compiles + nvJitLink link {r['metrics']['link_median_ms']:.0f} ms)" if m == stitch.LINKED_MODE else "")
            for m, r in sorted(rows.items()))
            + ". Mode 3's link is the load-time cost of stitching pre-compiled stages."),
        evidence={"inline_build_ms": m0["build_median_ms"],
                  "linked_build_ms": rows[stitch.LINKED_MODE]["metrics"]["build_median_ms"],
                  "link_ms": rows[stitch.LINKED_MODE]["metrics"]["link_median_ms"]},
        config={"head_dim": d, "tile": main_tile, "dtype": DTYPE}, cv=max(r["timing"]["cv"] for r in rows.values()),
        records=list(rows.values())))
    if not all(r["metrics"]["ptxas_report_count"] == 1.0 for r in rows.values()):
        return out
    out.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Resource cost of non-inlined stages (ptxas report) on {ctx.backend}",
        slug=f"resources-per-mode-{ctx.backend}",
        claim=(f"At {main_tile} (ptxas -v / nvJitLink -verbose): " + "; ".join(
            f"mode {m} ({stitch.MODE_NAMES[m]}) {r['metrics']['registers_regs']:.0f} registers, "
            f"{r['metrics']['stack_frame_bytes']:.0f} B kernel stack frame, {r['metrics']['spill_bytes']:.0f} B spills, "
            f"{r['metrics']['device_functions_count']:.0f} separately compiled stage functions"
            for m, r in sorted(rows.items()))
            + (". The nvJitLink LTO link inlined all three stages into the kernel."
               if rows[stitch.LINKED_MODE]["metrics"]["device_functions_count"] == 0 else
               ". The nvJitLink link kept the stages as separate functions.")),
        evidence={f"mode{m}_stack_frame_bytes": r["metrics"]["stack_frame_bytes"] for m, r in rows.items()}
        | {f"mode{m}_registers_regs": r["metrics"]["registers_regs"] for m, r in rows.items()},
        config={"head_dim": d, "tile": main_tile, "dtype": DTYPE}, cv=max(r["timing"]["cv"] for r in rows.values()),
        records=list(rows.values())))
    return out


def _run_findings(ctx, records) -> list:
    out = []
    runs = _rows(records, "run")
    # In measurement order: the first shape is the main one (N=2048, D=128, non-causal).
    shapes = list(dict.fromkeys((r["config"]["batch"], r["config"]["num_heads"], r["config"]["seq_len"],
                                 r["config"]["head_dim"], r["config"]["causal"]) for r in runs))
    for b, h, n, d, causal in shapes:
        rows = {r["config"]["mode"]: r for r in _rows(records, "run", batch=b, num_heads=h, seq_len=n, head_dim=d,
                                                      causal=causal)}
        base = rows[0]
        mask = "causal" if causal else "non-causal"
        claim = (f"B={b}, H={h}, N={n}, D={d}, {mask} ({DTYPE}, tiles {base['config']['tile']}; "
                 f"{int(base['metrics']['calls_count'])} dispatched calls per "
                 f"launch, {int(base['metrics']['resident_warps_count'])} resident warps): mode 0 (inline) "
                 f"{base['metrics']['median_ms']:.3f} ms; " + "; ".join(
                     f"mode {m} ({stitch.MODE_NAMES[m]}) {r['metrics']['median_ms']:.3f} ms, "
                     f"{r['metrics']['overhead_pct']:+.1f} % = {r['metrics']['serial_ns_per_call_ns']:.1f} ns per call on a "
                     f"warp's serial path ({r['metrics']['amortised_ns_per_call_ns'] * 1e3:.2f} ps amortised), "
                     f"{r['metrics']['registers_regs']:.0f} regs, {r['metrics']['local_bytes']:.0f} B local"
                     for m, r in sorted(rows.items()) if m != 0) + ".")
        out.append(ctx.finding(
            prototype=PROTOTYPE, title=f"Dispatch overhead per mode at N={n}, D={d} ({mask})",
            slug=f"overhead-n{n}-d{d}" + ("-causal" if causal else ""), claim=claim,
            evidence={f"mode{m}_overhead_pct": r["metrics"]["overhead_pct"] for m, r in rows.items() if m}
            | {f"mode{m}_serial_ns": r["metrics"]["serial_ns_per_call_ns"] for m, r in rows.items() if m},
            config={"batch": b, "num_heads": h, "seq_len": n, "head_dim": d, "causal": causal, "dtype": DTYPE},
            cv=max(r["timing"]["cv"] for r in rows.values()), records=list(rows.values())))

    # Bit identity over every shape: every mode against mode 0, and mode 0 against flash_fwd_mma.
    diff = sum(r["metrics"]["differing_elements_count"] for r in runs)
    diff_prod = sum(r["metrics"]["differing_from_production_count"] for r in runs if r["config"]["mode"] == 0)
    by_mode = {m: sum(r["metrics"]["differing_elements_count"] for r in runs if r["config"]["mode"] == m)
               for m in stitch.MODES if m}
    prod_text = (f"mode 0 equals the production flash_fwd_mma bit for bit (its SASS is the same code)"
                 if diff_prod == 0 else f"mode 0 differs from flash_fwd_mma in {int(diff_prod)} elements")
    identical = diff == 0 and diff_prod == 0
    out.append(ctx.finding(
        prototype=PROTOTYPE,
        title=("All four dispatch modes produce bit-identical attention outputs" if identical else
               "Dispatch modes do not all produce bit-identical attention outputs"),
        slug="bit-identity",
        claim=(f"On random BF16 inputs at {len(shapes)} shapes, modes 1-3 differ from mode 0 in {int(diff)} O/LSE "
               f"elements (max abs difference {max(r['metrics']['max_abs_diff_err'] for r in runs):.3g}) and "
               f"{prod_text}: every mode runs the same stage code (mma.sync, MUFU exp2, explicit fmaf), so "
               "neither the call boundary nor LTO changed the arithmetic." if diff == 0 else
               f"Modes 1-3 differ from mode 0 in O/LSE elements ("
               + ", ".join(f"mode {m}: {int(c)}" for m, c in by_mode.items())
               + f"), {prod_text}: the compiler contracted or reordered floating point differently across the "
               "call boundary (candidate: row_max * scale_log2 - mx_scaled in online_softmax)."),
        evidence={"differing_elements_count": diff, "differing_from_production_count": diff_prod,
                  "max_abs_diff_err": max(r["metrics"]["max_abs_diff_err"] for r in runs)},
        config={"shapes": [list(s) for s in shapes]}, cv=max(r["timing"]["cv"] for r in runs), records=runs))

    # AC-2.4 break-even at the main shape.
    b, h, n, d, causal = shapes[0]
    rows = {r["config"]["mode"]: r for r in _rows(records, "run", batch=b, num_heads=h, seq_len=n, head_dim=d,
                                                  causal=causal)}
    build = {r["config"]["mode"]: r for r in _rows(records, "build", tile=rows[0]["config"]["tile"])}
    base_ms = rows[0]["metrics"]["median_ms"]
    compile_ms = build[0]["metrics"]["build_median_ms"] if 0 in build else math.nan
    per_call_work_ns = base_ms * 1e6 * rows[0]["metrics"]["resident_warps_count"] / rows[0]["metrics"]["calls_count"]
    parts, ev = [], {"per_call_work_ns": per_call_work_ns, "compile_ms": compile_ms}
    for m, r in sorted(rows.items()):
        if m == 0:
            continue
        over = max(r["metrics"]["serial_ns_per_call_ns"], 0.0)
        need_ns = over * (100.0 / STITCH_BUDGET_PCT)
        delta_ms = r["metrics"]["median_ms"] - base_ms
        launches = compile_ms / delta_ms if delta_ms > 0 else math.inf
        ev[f"mode{m}_breakeven_work_ns"] = need_ns
        parts.append(f"mode {m}: {over:.1f} ns/call needs >= {need_ns:.0f} ns of work per call to stay under "
                     f"{STITCH_BUDGET_PCT:.0f} % (now {per_call_work_ns:.0f} ns); a specialised compile "
                     f"({compile_ms:.0f} ms) pays for itself after "
                     + (f"{launches:.0f} launches" if math.isfinite(launches) else "never (no measurable overhead)"))
        if math.isfinite(launches):
            ev[f"mode{m}_breakeven_launches_count"] = launches
    out.append(ctx.finding(
        prototype=PROTOTYPE, title=f"AC-2.4 break-even of run-time dispatch at N={n}, D={d}",
        slug=f"breakeven-n{n}-d{d}",
        claim=(f"Each stage call does {per_call_work_ns:.0f} ns of work on a warp's serial path in mode 0. "
               + "; ".join(parts) + "."),
        evidence=ev, config={"batch": b, "num_heads": h, "seq_len": n, "head_dim": d, "causal": causal},
        cv=max(r["timing"]["cv"] for r in rows.values()), records=list(rows.values()) + list(build.values())))

    # Recommendation for Attention<Q,K,V>, derived from the numbers.
    over = {m: r["metrics"]["overhead_pct"] for m, r in rows.items() if m}
    cheap = [m for m, o in sorted(over.items()) if o < STITCH_BUDGET_PCT]
    costly = [m for m, o in sorted(over.items()) if o >= STITCH_BUDGET_PCT]
    text = (f"Measured at N={n}, D={d}: modes under the {STITCH_BUDGET_PCT:.0f} % budget: "
            + (", ".join(f"{stitch.MODE_NAMES[m]} ({over[m]:+.1f} %)" for m in cheap) or "none")
            + "; over it: " + (", ".join(f"{stitch.MODE_NAMES[m]} ({over[m]:+.1f} %)" for m in costly) or "none") + ". ")
    if stitch.LINKED_MODE in cheap:
        text += (f"A production Attention<Q,K,V> should keep the attention loop specialised per variant and compose "
                 f"user-supplied stages (score modifiers, masks) by linking LTO-IR with nvJitLink at load time "
                 f"({build[stitch.LINKED_MODE]['metrics']['link_median_ms']:.0f} ms link, then inline speed); ")
    else:
        text += "A production Attention<Q,K,V> should specialise every variant at compile time; "
    text += ("run-time dispatch inside the inner loop (" + ", ".join(stitch.MODE_NAMES[m] for m in costly)
             + ") must not be used." if costly else "run-time dispatch inside the loop is affordable at this shape.")
    out.append(ctx.finding(
        prototype=PROTOTYPE, title="How a production Attention<Q,K,V> should dispatch variants on CUDA",
        slug="dispatch-recommendation", claim=text,
        evidence={f"mode{m}_overhead_pct": o for m, o in over.items()},
        config={"seq_len": n, "head_dim": d, "budget_pct": STITCH_BUDGET_PCT},
        cv=max(r["timing"]["cv"] for r in rows.values()), records=list(rows.values())))
    return out


@experiment(name="proto2", prototype=PROTOTYPE, backends=("cpu", "cuda"),
            description="Run-time dispatch vs specialisation: inline, noinline, function table, nvJitLink LTO")
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: in the tensor-core inner loop of Prototype 1, __noinline__ stages and a device
    function-pointer table cost well over 1 % (the S and O register tiles go through local
    memory at every call, plus the call ABI and no scheduling across the call), while stages
    compiled separately to LTO-IR and linked by nvJitLink at load time are inlined by the link
    and run at the specialised speed; every mode gives outputs bit-identical to mode 0, and
    mode 0 to flash_fwd_mma.

    Sweep: STITCH_MODE 0/1/2/3 x (B, H, N, D, causal) = (4, 16, 2048, 128, no), (2, 16, 4096,
    64, no), (4, 16, 2048, 128, yes), BF16, the Prototype 1 chooser's tiles (quick: (1, 8,
    1024, 128, no)); per mode the NVRTC/nvJitLink build time and ptxas resource report (cpu
    and cuda), and on cuda the kernel time against mode 0, the calls dispatched, and the
    element-wise equality of O and LSE with mode 0 and with flash_fwd_mma.
    """
    if ctx.backend not in ("cpu", "cuda"):
        raise ExperimentError(f"proto2 has no {ctx.backend} path")
    gpu = ctx.backend == "cuda"
    nat, why = compiler_or_reason(need_nvjitlink=True)
    if nat is None:
        if gpu:
            raise ExperimentError(f"proto2 needs NVRTC and nvJitLink: {why}")
        # Nothing here runs without NVRTC and nvJitLink: say so instead of measuring nothing silently.
        return ExperimentResult(records=[], findings=[], summary=[{"not_measured": why}])
    shapes = QUICK_SHAPES if ctx.quick else SHAPES
    arch = ctx.device.get("arch", ARCH_FALLBACK) if gpu else ARCH_FALLBACK
    records = _measure_builds(ctx, arch, shapes)
    findings = _build_findings(ctx, records)
    if gpu:
        records += _measure_runs(ctx, shapes)
        findings += _run_findings(ctx, records)
    summary = [{"phase": r["config"]["phase"], "mode": r["config"]["mode"], "tile": r["config"]["tile"],
                **{k: round(v, 4) for k, v in r["metrics"].items()}} for r in records]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return ExperimentResult(records=records, findings=findings, summary=summary)
