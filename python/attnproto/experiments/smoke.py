"""``smoke``: an end-to-end check of the measure -> record -> finding pipeline.

``rederive_findings`` computes the findings again from a committed run's records
(``attnproto kb rederive``)."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import ref
from ..findings import fmt, fmt_list, fmt_pct
from ..records import timing_from_samples
from .registry import ExperimentContext, ExperimentError, ExperimentResult, Rederivation, experiment

PROTOTYPE = "smoke"
DTYPE = np.float32

# Matmul shapes (m, n, k); the odd ones catch edge handling in blocked kernels.
MATMUL_SHAPES_QUICK = ((64, 64, 64), (96, 80, 72), (129, 65, 33))
MATMUL_SHAPES_FULL = MATMUL_SHAPES_QUICK + ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024))
# Attention shapes (batch, heads, seq_len, head_dim, key tile); seq_len not a
# multiple of the tile exercises the ragged last tile.
ATTENTION_SHAPES_QUICK = ((1, 2, 64, 32, 16), (1, 2, 70, 40, 32))
ATTENTION_SHAPE_KEYS = ("batch", "num_heads", "seq_len", "head_dim", "block_c")
ATTENTION_SHAPES_FULL = ATTENTION_SHAPES_QUICK + ((1, 4, 256, 64, 64), (2, 4, 512, 128, 64))

# Timed repetitions per config (after warm-up); the quick sweep trades a wider
# CV for CI speed.
REPEATS_QUICK = 5
REPEATS_FULL = 30
WARMUP = 2
# A timing sample spans at least this long (perf_counter_ns is ~100 ns
# resolution with ~1 us call overhead, so 1 ms keeps both below 0.1 %).
MIN_SAMPLE_MS = 1.0
# Floor on the single-call estimate used for calibration (guards a 0 ns reading).
MIN_CALL_MS = 1e-4

# Tiled float32 attention vs the float64 reference: the project's FP32
# tolerance (requirements NFR-4).
ATTN_FP32_ATOL = 1e-5
ATTN_FP32_RTOL = 1e-4

FLOPS_PER_MAC = 2
# QK^T and PV are each one MAC per (query, key, dim) element.
ATTENTION_MATMULS = 2
MS_PER_NS = 1e-6
S_PER_MS = 1e-3
GFLOP = 1e9


def _matmul_error_bound(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Elementwise forward-error bound gamma_k |A||B| of a k-term dot product.

    gamma_k = k u / (1 - k u) with unit roundoff u = eps / 2 (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., eq. 3.13).  It holds for
    any summation order, so blocked/FMA BLAS kernels must stay within it.
    """
    k = a.shape[1]
    u = eps / 2
    gamma = k * u / (1 - k * u)
    return gamma * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))


def _time_ms(fn: Any, repeats: int) -> dict[str, Any]:
    """Per-call time statistics of ``fn`` over ``repeats`` samples.

    Each sample times enough back-to-back calls to last MIN_SAMPLE_MS, so
    microsecond-scale calls are not dominated by timer and loop overhead.
    """
    for _ in range(WARMUP):
        fn()
    start = time.perf_counter_ns()
    fn()
    single_ms = max((time.perf_counter_ns() - start) * MS_PER_NS, MIN_CALL_MS)
    calls = max(1, math.ceil(MIN_SAMPLE_MS / single_ms))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) * MS_PER_NS / calls)
    return timing_from_samples(samples)


def tiled_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, tile: int) -> np.ndarray:
    """Online-softmax attention over key tiles of ``tile`` rows, in q's dtype.

    q [B, H, N, D], k/v [B, H, M, D] (same head count), scale 1/sqrt(D).
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"q must be [B,H,N,D] and k, v equal [B,H,M,D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head_dim")
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    dtype = q.dtype
    scale = dtype.type(1.0 / np.sqrt(q.shape[3]))
    row_max = np.full(q.shape[:3] + (1,), -np.inf, dtype=dtype)
    row_sum = np.zeros(q.shape[:3] + (1,), dtype=dtype)
    acc = np.zeros(q.shape, dtype=dtype)
    for start in range(0, k.shape[2], tile):
        kt = k[:, :, start:start + tile]
        vt = v[:, :, start:start + tile]
        s = (q @ kt.swapaxes(-1, -2)) * scale
        new_max = np.maximum(row_max, s.max(axis=-1, keepdims=True))
        p = np.exp(s - new_max)
        correction = np.exp(row_max - new_max)
        row_sum = row_sum * correction + p.sum(axis=-1, keepdims=True)
        acc = acc * correction + p @ vt
        row_max = new_max
    return acc / row_sum


def _cpu_matmul(ctx: ExperimentContext, shape: Sequence[int], repeats: int) -> dict[str, Any]:
    m, n, k = shape
    a = ctx.rng.standard_normal((m, k)).astype(DTYPE)
    b = ctx.rng.standard_normal((k, n)).astype(DTYPE)
    out = a @ b
    exact = a.astype(np.float64) @ b.astype(np.float64)
    err = np.abs(out.astype(np.float64) - exact)
    bound = _matmul_error_bound(a, b, float(np.finfo(DTYPE).eps))
    timing = _time_ms(lambda: a @ b, repeats)
    return {"max_abs_err": float(err.max()), "bound_ratio": float((err / bound).max()), "timing": timing}


def _gpu_matmul(ctx: ExperimentContext, shape: Sequence[int]) -> dict[str, Any]:
    """One matmul through :func:`attnproto.gpu_smoke.run_matmul` on ``ctx.backend``.

    run_matmul reports ``bound_ratio``: the largest elementwise ratio of the
    error to the worst-case FP32 rounding bound gamma_k |A||B|; <= 1 passes.
    """
    from .. import backend as backend_mod  # noqa: PLC0415  (needs the native core; GPU branch only)
    from .. import gpu_smoke  # noqa: PLC0415

    m, n, k = shape
    res = gpu_smoke.run_matmul(backend_mod.get(ctx.backend), m, n, k, ctx.rng)
    if res.get("all_written") is False:
        raise ExperimentError(f"matmul {m}x{n}x{k}: the kernel left output elements unwritten")
    return {"max_abs_err": float(res["max_abs_err"]), "bound_ratio": float(res["bound_ratio"]),
            "timing": res["timing"]}


def _median_ms(timing: Any) -> float:
    return float(timing["median_ms"] if isinstance(timing, dict) else timing.median_ms)


def rederive_findings(ctx: ExperimentContext, records: list[dict[str, Any]], previous: list) -> Rederivation:
    """:func:`run`'s findings from a committed run's records (nothing measured)."""
    by_op: dict[str, list[dict[str, Any]]] = {"matmul": [], "tiled_attention": []}
    for r in records:
        by_op[r["config"]["op"]].append(r)
    found = [_matmul_finding(ctx, by_op["matmul"])] if by_op["matmul"] else []
    if by_op["tiled_attention"]:
        found.append(_attention_finding(ctx, by_op["tiled_attention"]))
    return Rederivation(findings=found)


@experiment("smoke", PROTOTYPE, "float32 matmul and tiled attention vs float64, timed", backends=("cpu", "cuda"),
            rederive=rederive_findings)
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: the backend's float32 matmul stays within the gamma_k forward
    error bound of a float64 reference, a tiled online-softmax attention stays
    within the FP32 tolerance (atol 1e-5, rtol 1e-4), and the measurement,
    record and finding pipeline produces consistent, citable output.

    Sweep: matmul (m, n, k) over MATMUL_SHAPES_QUICK (quick) or
    MATMUL_SHAPES_FULL; on CPU also tiled attention over ATTENTION_SHAPES_*;
    REPEATS_QUICK / REPEATS_FULL timed repeats after WARMUP warm-up runs.
    """
    on_gpu = ctx.backend != "cpu"
    repeats = REPEATS_QUICK if ctx.quick else REPEATS_FULL
    mm_shapes = MATMUL_SHAPES_QUICK if ctx.quick else MATMUL_SHAPES_FULL
    attn_shapes = () if on_gpu else (ATTENTION_SHAPES_QUICK if ctx.quick else ATTENTION_SHAPES_FULL)
    records: list[dict[str, Any]] = []
    mm_records: list[dict[str, Any]] = []
    attn_records: list[dict[str, Any]] = []
    jobs = [("matmul", s) for s in mm_shapes] + [("attention", s) for s in attn_shapes]

    for op, shape in ctx.progress(jobs, desc=f"smoke[{ctx.backend}]"):
        if op == "matmul":
            m, n, k = shape
            res = _gpu_matmul(ctx, shape) if on_gpu else _cpu_matmul(ctx, shape, repeats)
            if res["bound_ratio"] > 1:
                raise ExperimentError(f"matmul {m}x{n}x{k}: max error {res['max_abs_err']:.3e} exceeds the "
                                      f"bound by {res['bound_ratio']:.2f}x")
            flops = FLOPS_PER_MAC * m * n * k
            config = {"op": "matmul", "dtype": "float32", "m": m, "n": n, "k": k}
            rec = ctx.record(config, {
                "max_abs_err": res["max_abs_err"],
                "bound_ratio": res["bound_ratio"],
                "gflops": flops / (_median_ms(res["timing"]) * S_PER_MS) / GFLOP,
            }, res["timing"])
            mm_records.append(rec)
        else:
            batch, heads, seq, dim, tile = shape
            q, k, v = (ctx.rng.standard_normal((batch, heads, seq, dim)).astype(DTYPE) for _ in range(3))
            out = tiled_attention(q, k, v, tile)
            exact = ref.attention(q, k, v)
            err = np.abs(out.astype(np.float64) - exact)
            allowed = ATTN_FP32_ATOL + ATTN_FP32_RTOL * np.abs(exact)
            ratio = float((err / allowed).max())
            if ratio > 1:
                raise ExperimentError(f"tiled attention {shape}: max error {err.max():.3e} exceeds "
                                      f"atol {ATTN_FP32_ATOL} + rtol {ATTN_FP32_RTOL}|ref| by {ratio:.2f}x")
            timing = _time_ms(lambda: tiled_attention(q, k, v, tile), repeats)
            flops = ATTENTION_MATMULS * FLOPS_PER_MAC * batch * heads * seq * seq * dim
            config = {"op": "tiled_attention", "dtype": "float32", "batch": batch, "num_heads": heads,
                      "seq_len": seq, "head_dim": dim, "block_c": tile}
            rec = ctx.record(config, {
                "max_abs_err": float(err.max()),
                "tolerance_ratio": ratio,
                "gflops": flops / (timing["median_ms"] * S_PER_MS) / GFLOP,
            }, timing)
            attn_records.append(rec)
        records.append(rec)

    findings = [_matmul_finding(ctx, mm_records)]
    if attn_records:
        findings.append(_attention_finding(ctx, attn_records))
    return ExperimentResult(records=records, findings=findings)


def _largest(records: list[dict[str, Any]], size_keys: Sequence[str]) -> dict[str, Any]:
    return max(records, key=lambda r: int(np.prod([r["config"][key] for key in size_keys])))


def _shape_label(config: dict[str, Any], keys: Sequence[str]) -> str:
    """A shape as one word, e.g. ``129x65x33`` (never a Python list in a claim)."""
    return "x".join(str(config[key]) for key in keys)


MATMUL_SHAPE_KEYS = ("m", "n", "k")


def _matmul_finding(ctx: ExperimentContext, records: list[dict[str, Any]]):
    worst_rec = max(records, key=lambda r: r["metrics"]["bound_ratio"])
    worst = worst_rec["metrics"]["bound_ratio"]
    big = _largest(records, MATMUL_SHAPE_KEYS)
    t = big["timing"]
    shapes = [[r["config"][key] for key in MATMUL_SHAPE_KEYS] for r in records]
    labels = [_shape_label(r["config"], MATMUL_SHAPE_KEYS) for r in records]
    return ctx.finding(
        prototype=PROTOTYPE,
        title=f"float32 matmul on {ctx.backend} stays within the gamma_k error bound",
        slug=f"fp32-matmul-error-bound-{ctx.backend}",
        claim=(f"Over {len(records)} shapes ({fmt_list(labels)}) the worst max-abs error was {fmt(worst)} of "
               f"the gamma_k|A||B| bound (at {_shape_label(worst_rec['config'], MATMUL_SHAPE_KEYS)}); "
               f"{_shape_label(big['config'], MATMUL_SHAPE_KEYS)} ran at {fmt(big['metrics']['gflops'], 'GFLOP/s')} "
               f"(median {fmt(t['median_ms'], 'ms')}, CV {fmt_pct(t['cv'])}) on {ctx.device_name}."),
        evidence={"worst_bound_ratio": worst, "largest_gflops": big["metrics"]["gflops"],
                  "largest_median_ms": t["median_ms"], "largest_cv": t["cv"]},
        # The question: which shapes, in which dtype (the same id as before answers existed).
        # The answer: the verdict and the worst shape.
        config={"op": "matmul", "dtype": "float32", "shapes": shapes},
        answer={"within_bound": worst <= 1, "worst_shape": _shape_label(worst_rec["config"], MATMUL_SHAPE_KEYS)},
        cv=t["cv"],
        records=records,
    )


ATTENTION_LABEL_KEYS = ("batch", "num_heads", "seq_len", "head_dim")


def _attention_label(config: dict[str, Any]) -> str:
    return (f"B={config['batch']} H={config['num_heads']} N={config['seq_len']} D={config['head_dim']} "
            f"key tile {config['block_c']}")


def _attention_finding(ctx: ExperimentContext, records: list[dict[str, Any]]):
    worst_rec = max(records, key=lambda r: r["metrics"]["tolerance_ratio"])
    worst = worst_rec["metrics"]["tolerance_ratio"]
    big = _largest(records, ATTENTION_LABEL_KEYS)
    t = big["timing"]
    return ctx.finding(
        prototype=PROTOTYPE,
        title=f"tiled online-softmax attention in float32 on {ctx.backend} meets the FP32 tolerance",
        slug=f"fp32-tiled-attention-tolerance-{ctx.backend}",
        claim=(f"Over {len(records)} shapes the worst error was {fmt(worst)} of atol {fmt(ATTN_FP32_ATOL)} + "
               f"rtol {fmt(ATTN_FP32_RTOL)}|ref| (at {_attention_label(worst_rec['config'])}); "
               f"{_attention_label(big['config'])} ran at {fmt(big['metrics']['gflops'], 'GFLOP/s')} "
               f"(median {fmt(t['median_ms'], 'ms')}, CV {fmt_pct(t['cv'])}) on {ctx.device_name}."),
        evidence={"worst_tolerance_ratio": worst, "largest_gflops": big["metrics"]["gflops"],
                  "largest_median_ms": t["median_ms"], "largest_cv": t["cv"]},
        config={"op": "tiled_attention", "dtype": "float32",
                "shapes": [[r["config"][key] for key in ATTENTION_SHAPE_KEYS] for r in records]},
        answer={"within_tolerance": worst <= 1,
                "worst_shape": _shape_label(worst_rec["config"], ATTENTION_SHAPE_KEYS)},
        cv=t["cv"],
        records=records,
    )
