"""Prototype 6 on cuda: our linear-attention kernels (fused and two-pass, every fused split),
torch SDPA (cuDNN), Prototype 1's causal kernel and flash-linear-attention on the same inputs,
timed with device events, after FP64 correctness checks of every dtype x head dim x chunk."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

from ... import lab, ref
from ...findings import fmt_ratio
from ...ops import linear as lin
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from .common import (
    CHECK_BATCH,
    CHECK_DTYPES,
    CHECK_HEADS,
    CHECK_SEQ_LEN,
    CHECK_SEQ_LEN_QUICK,
    CHUNKS,
    COPY_BYTES,
    CUDA_BATCH,
    CUDA_HEADS,
    CUDA_SEQ_LENS,
    CUDA_SEQ_LENS_QUICK,
    ESTIMATE_ITERS,
    FLA_AGREE_REL_ERR,
    FLA_CHUNK,
    GIGA,
    HEAD_DIMS,
    LONG_CHECK_CHUNK,
    LONG_CHECK_SEQ_LEN,
    MAX_ITERS,
    MAX_ITERS_QUICK,
    MIN_ITERS,
    MS_PER_S,
    OURS,
    OURS_FUSED_VARIANT,
    OURS_TWO_PASS,
    SWEEP_DTYPE,
    TARGET_TIMED_MS,
    TOLERANCES,
    WARMUP,
    _check_scale,
    _rel_err,
    _retnet_decay,
    _tolerance_ratio,
)
from .findings import findings_of_sweep
from .fused_findings import algorithm_findings
from .metrics import _linear_record, _softmax_record


def _iters_for(be: Any, fn: Callable[[], Any], quick: bool) -> int:
    est = be.time(fn, warmup=1, iters=ESTIMATE_ITERS)
    per = max(float(est.median_ms), 1e-3)
    cap = MAX_ITERS_QUICK if quick else MAX_ITERS
    return int(min(cap, max(MIN_ITERS, TARGET_TIMED_MS // per)))


def _time_cuda(be: Any, fn: Callable[[], Any], quick: bool) -> Any:
    fn()
    iters = _iters_for(be, fn, quick)
    return be.time(fn, warmup=WARMUP, iters=iters)


def _graphed(torch: Any, fn: Callable[[], Any]) -> tuple[Callable[[], Any], bool]:
    """fn captured in a CUDA graph (launch gaps out of the timing), or fn itself."""
    try:
        graph = lab.capture_cuda_graph(fn)
        torch.cuda.synchronize()
        return graph.replay, True
    except Exception:  # noqa: BLE001 - any capture failure falls back to eager launches (recorded)
        torch.cuda.synchronize()
        return fn, False


def _measure_copy_gbps(be: Any, torch: Any) -> tuple[float, Any]:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    timing = be.time(lambda: dst.copy_(src), warmup=WARMUP, iters=MIN_ITERS * 2)
    gbps = 2 * COPY_BYTES / (float(timing.median_ms) / MS_PER_S) / GIGA
    del src, dst
    return gbps, timing


def _correctness_cuda(ctx: ExperimentContext, torch: Any, quick: bool) -> dict[tuple[str, int, int, bool], float]:
    """Worst tolerance ratio per (dtype, D, C, decay) at N = CHECK_SEQ_LEN; raises on failure."""
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    n = CHECK_SEQ_LEN_QUICK if quick else CHECK_SEQ_LEN
    out: dict[tuple[str, int, int, bool], float] = {}
    for d in HEAD_DIMS:
        q64, k64, v64 = (ctx.rng.standard_normal((CHECK_BATCH, CHECK_HEADS, n, d)) for _ in range(3))
        scale = _check_scale(n, d)
        for dtype in CHECK_DTYPES:
            qt, kt, vt = (torch.tensor(x, dtype=tdt[dtype], device="cuda") for x in (q64, k64, v64))
            qh, kh, vh = (t.double().cpu().numpy() for t in (qt, kt, vt))   # the inputs as quantised
            for decay in (False, True):
                gamma = _retnet_decay(CHECK_HEADS) if decay else None
                exact = ref.linear_attention_recurrent(qh, kh, vh, scale=scale, decay=gamma)
                for c in CHUNKS:
                    worst = 0.0
                    for algorithm in ("auto", "two_pass"):
                        plan = lin.LinearPlan(qt, kt, vt, chunk_size=c, scale=scale, decay=gamma,
                                              algorithm=algorithm)
                        plan.out.fill_(float("nan"))          # poison: every element must be written
                        o = plan.run().double().cpu().numpy()
                        ratio = _tolerance_ratio(o, exact, dtype)
                        if ratio > 1.0:
                            raise ExperimentError(f"linear attention ({plan.algorithm}) {dtype} D={d} C={c} "
                                                  f"decay={decay} N={n}: error {ratio:.3g}x the tolerance "
                                                  f"{TOLERANCES[dtype]}")
                        worst = max(worst, ratio)
                    out[(dtype, d, c, decay)] = worst
    return out


def _long_check_cuda(ctx: ExperimentContext, torch: Any) -> dict[int, float]:
    """bfloat16 at N = 64K, one head, vs the FP64 recurrence; raises on failure."""
    out = {}
    n = LONG_CHECK_SEQ_LEN
    for d in HEAD_DIMS:
        x = [torch.tensor(ctx.rng.standard_normal((1, 1, n, d)), dtype=torch.bfloat16, device="cuda")
             for _ in range(3)]
        scale = _check_scale(n, d)
        exact = ref.linear_attention_recurrent(*(t.double().cpu().numpy() for t in x), scale=scale)
        o = lin.linear_attention(*x, chunk_size=LONG_CHECK_CHUNK, scale=scale).double().cpu().numpy()
        ratio = _tolerance_ratio(o, exact, SWEEP_DTYPE)
        if ratio > 1.0:
            raise ExperimentError(f"linear attention bfloat16 D={d} N={n}: error {ratio:.3g}x the tolerance")
        out[d] = ratio
    return out


def _load_fla() -> tuple[Optional[Callable[..., Any]], str]:
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - reported in the findings
        return None, f"flash-linear-attention not importable ({type(exc).__name__}: {exc})"
    return chunk_simple_gla, ""


def _load_proto1() -> tuple[Optional[Callable[..., Any]], str]:
    """A function (q, k, v, scale) -> PreparedLaunch of Prototype 1's default call on this GPU
    (kernel="auto": the family and tiles the Prototype 1 sweep measured fastest)."""
    try:
        from ...ops.flash import prepare_forward  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - reported in the findings
        return None, f"Prototype 1 (attnproto.ops.flash.prepare_forward) not importable ({type(exc).__name__})"
    return (lambda q, k, v, scale: prepare_forward(q, k, v, causal=True, scale=scale)), ""


def run_cuda(ctx: ExperimentContext) -> ExperimentResult:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from ... import backend as _backend  # noqa: PLC0415

    be = _backend.get("cuda")
    quick = ctx.quick
    seq_lens = CUDA_SEQ_LENS_QUICK if quick else CUDA_SEQ_LENS
    b, h = CUDA_BATCH, CUDA_HEADS
    tdt = torch.bfloat16
    notes: dict[str, str] = {}

    check = _correctness_cuda(ctx, torch, quick)
    long_check = {} if quick else _long_check_cuda(ctx, torch)
    copy_gbps, copy_timing = _measure_copy_gbps(be, torch)
    fla, fla_why = _load_fla()
    proto1, p1_why = _load_proto1()
    if fla_why:
        notes["fla"] = fla_why
    if p1_why:
        notes["proto1"] = p1_why
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
        sdpa_ctx = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])  # noqa: E731
    except ImportError as exc:
        raise ExperimentError(f"torch.nn.attention.sdpa_kernel unavailable: {exc}") from None

    copy_rec = ctx.record({"impl": "torch_copy", "op": "device_copy", "bytes": COPY_BYTES},
                          {"bandwidth_gbps": copy_gbps}, copy_timing)
    records = [copy_rec]
    lin_recs: dict[tuple[int, int, int], dict[str, Any]] = {}
    alt_recs: dict[tuple[str, int, int, int, Any], dict[str, Any]] = {}
    soft_recs: dict[tuple[str, int, int], dict[str, Any]] = {}
    fla_recs: dict[tuple[int, int], dict[str, Any]] = {}
    jobs = [(d, n) for d in HEAD_DIMS for n in seq_lens]
    for d, n in ctx.progress(jobs, desc="proto6[cuda]"):
        q, k, v = (torch.randn((b, h, n, d), dtype=tdt, device="cuda") for _ in range(3))
        scale = 1.0 / math.sqrt(d)      # FLA's default; the same on every implementation
        ours_by_chunk = {}
        for c in CHUNKS:
            tol = max(check[(SWEEP_DTYPE, d, c, dec)] for dec in (False, True))
            plan = lin.LinearPlan(q, k, v, chunk_size=c, scale=scale)
            lin_recs[(d, n, c)] = _time_plan(ctx, be, plan, OURS, (b, h, n, d, c), tol, copy_gbps, quick)
            ours_by_chunk[c] = plan.out.clone()
            if plan.algorithm == "fused":
                chosen = plan.fused_config
                two = lin.LinearPlan(q, k, v, chunk_size=c, scale=scale, algorithm="two_pass")
                alt_recs[(OURS_TWO_PASS, d, n, c, 0)] = _time_plan(ctx, be, two, OURS_TWO_PASS, (b, h, n, d, c),
                                                                   tol, copy_gbps, quick)
                for fcfg in lin.all_fused_variants(SWEEP_DTYPE, d, c, False):
                    fcfg = fcfg.with_segments(lin.fused_segments(fcfg, b * h, n, lin.device_sm_count(be)))
                    if fcfg == chosen:
                        continue
                    var = lin.LinearPlan(q, k, v, chunk_size=c, scale=scale, algorithm="fused", fused_config=fcfg)
                    alt_recs[(OURS_FUSED_VARIANT, d, n, c, (fcfg.block_dv, fcfg.state_warps))] = _time_plan(
                        ctx, be, var, OURS_FUSED_VARIANT, (b, h, n, d, c), tol, copy_gbps, quick)
                    del var
                del two
            del plan
        # torch SDPA, cuDNN backend, causal.
        with sdpa_ctx():
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: E731
            soft_recs[("sdpa_cudnn", d, n)] = _softmax_record(ctx, "sdpa_cudnn", SWEEP_DTYPE, b, h, n, d,
                                                              _time_cuda(be, sdpa, quick))
        if proto1 is not None:
            try:
                # Prepared once and timed from C++, like our linear kernels.
                launch = proto1(q, k, v, scale)
                launch.launch()
                timing = launch.time(warmup=WARMUP, iters=_iters_for(be, launch.launch, quick))
                soft_recs[("proto1", d, n)] = _softmax_record(ctx, "proto1", SWEEP_DTYPE, b, h, n, d, timing)
            except Exception as exc:  # noqa: BLE001 - recorded; the crossover then uses SDPA only
                notes["proto1"] = f"Prototype 1 failed at D={d} N={n}: {type(exc).__name__}: {exc}"
                proto1 = None
        if fla is not None:
            # FLA's layout is [B, T, H, D]: made contiguous outside the timed region.
            qf, kf, vf = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            call = lambda: fla(qf, kf, vf, scale=scale, chunk_size=FLA_CHUNK)[0]  # noqa: E731
            o_fla = call().transpose(1, 2)
            agree = _rel_err(ours_by_chunk[FLA_CHUNK].float().cpu().numpy(), o_fla.float().cpu().numpy())
            if not agree <= FLA_AGREE_REL_ERR:
                raise ExperimentError(f"ours and FLA disagree at D={d} N={n}: relative error {agree:.3g}")
            fn, graphed = _graphed(torch, call)
            fla_recs[(d, n)] = _linear_record(ctx, "fla_chunk_simple_gla", SWEEP_DTYPE, b, h, n, d, FLA_CHUNK,
                                              _time_cuda(be, fn, quick), tolerance_ratio=None,
                                              copy_gbps=copy_gbps,
                                              extra={"vs_ours_rel_err": agree, "cuda_graph_count": float(graphed)})
        del q, k, v, ours_by_chunk
        torch.cuda.empty_cache()
    records.extend(lin_recs.values())
    records.extend(alt_recs.values())
    records.extend(soft_recs.values())
    records.extend(fla_recs.values())
    impls = tuple(i for i in ("sdpa_cudnn", "proto1") if any(key[0] == i for key in soft_recs))
    if long_check:
        notes["long_check"] = ", ".join(f"D={d}: {fmt_ratio(r)} the tolerance" for d, r in long_check.items())
    findings = findings_of_sweep(ctx, lin_recs, soft_recs, softmax_impls=impls, fla_recs=fla_recs,
                                 copy_gbps=copy_gbps, notes=notes, copy_rec=copy_rec)
    findings += algorithm_findings(ctx, lin_recs, alt_recs)
    return ExperimentResult(records=records, findings=findings)


def _time_plan(ctx: ExperimentContext, be: Any, plan: Any, impl: str, shape: tuple[int, int, int, int, int],
               tol: float, copy_gbps: float, quick: bool) -> dict[str, Any]:
    """Time one LinearPlan (all its launches from C++) and record it with its algorithm."""
    b, h, n, d, c = shape
    times = plan.time(warmup=WARMUP, iters=_iters_for(be, plan.run, quick))
    extra = {f"{name}_ms": float(times[name].median_ms) for name in plan.names if name in times}
    cfg: dict[str, Any] = {}
    if plan.fused_config is not None:
        cfg = {"block_dv": plan.fused_config.block_dv, "stages": plan.fused_config.stages,
               "segments": plan.fused_config.segments, "state_warps": plan.fused_config.state_warps}
    return _linear_record(ctx, impl, SWEEP_DTYPE, b, h, n, d, c, times["total"], tolerance_ratio=tol,
                          copy_gbps=copy_gbps, extra=extra, algorithm=plan.algorithm, extra_config=cfg)
