"""The Prototype 1 sweep, one loop for every backend: every registered family of the
backend x its sweep space, gated in FP64, timed against the backend's anchors on the
same inputs, and at each point, right after its tiles, the default call
(``kernel="auto"``) on the same inputs, choosing from the table this sweep measured.

The default call at a swept point depends only on that point's entries (its head dim,
mask, dtype and N are all tabulated), so choosing from the entries measured so far is the
choice the finished table makes; the run checks that at the end. Timing it next to the
tiles it is compared with keeps both in the same state of the GPU: the first H200 run
timed the default calls in a pass after the whole sweep, and at N <= 2K they came out up
to 12 % slower than the same kernels in the sweep (results/nvidia-h200/proto1 at 037bf43).

The sweep is a list of independent points (:func:`sweep_points`, one per head dim x mask
x N, its anchors included), measured by :func:`measure_point` and merged by
:func:`merge_points`: serially by :func:`run_sweep`, or on several GPUs through
``attnproto run proto1 --gpus N`` (:mod:`attnproto.shard`, the same functions).

A backend plugs in through a :class:`Bench`: its sizes, inputs, anchors, reference and
full-size check (cuda.py, metal.py, cpu.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ... import lab
from ...ops import chooser, families
from ...ops import flash as front
from ...findings import canonical_json
from ...ops.problem import DeviceSpec, ProblemSpec, check_flash_inputs
from ..registry import ExperimentContext, ExperimentError, Point, PointResult
from . import common as C


@dataclass
class Bench:
    """What one backend contributes to the sweep.

    ``inputs(rng, batch, heads, seq, head_dim)`` -> (q, k, v) on the device, drawn from the
    point's numpy generator ``rng`` (so they do not depend on which points ran before); ``anchors(q, k, v,
    causal, head_dim, seq)`` -> {name: time() -> TimingStats, or a reason string};
    ``reference(q, k, v, causal)`` -> the output full-size results are compared with (None:
    no comparison); ``full_check(o, reference)`` -> (ok, max abs diff, why);
    ``extra_metrics(launch)`` -> additional record metrics; ``release()`` after each point.
    """

    backend: str
    device: DeviceSpec
    backend_obj: Any
    dtype: str
    head_dims: tuple[int, ...]
    seq_lens: tuple[int, ...]
    iters: int
    problem: Callable[[int, int], tuple[int, int]]
    inputs: Callable[..., tuple[Any, Any, Any]]
    anchors: Callable[..., dict[str, Any]]
    reference: Callable[..., Any]
    full_check: Callable[[Any, Any], tuple[bool, float, str]]
    gate_shapes: tuple[tuple[int, ...], ...] = lab.GATE_SHAPES
    elem_bytes: int = C.ELEM_BYTES
    extra_metrics: Callable[[Any], dict[str, float]] = lambda launch: {}
    #: Device clocks read right after each timing (e.g. {"sm_clock_mhz": ...}), where readable.
    clocks: Callable[[], dict[str, float]] = lambda: {}
    release: Callable[[], None] = lambda: None
    notes: dict[str, Any] = field(default_factory=lambda: {"anchors_unavailable": {}})


# ctx.extras key of the per-context memo of FP64 gate verdicts (_gates).
_GATES_EXTRA = "proto1_gates"


def candidates(device: DeviceSpec, dtype: str, head_dim: int, causal: bool) -> list[tuple[Any, Any]]:
    """(family, config) of every registered family of the device's backend that supports the
    head dim, times its sweep space (DSL families excluded: Prototype 5 measures them)."""
    spec = ProblemSpec(1, 1, 1, 1, 1, head_dim, dtype, causal)
    return [(fam, cfg) for fam in families.for_backend(device.backend)
            if not fam.dsl and fam.supports_spec(spec, device)[0]
            for cfg in fam.sweep_space(head_dim, causal, dtype, device)]


def sweep_specialisations() -> list[tuple[str, dict[str, int]]]:
    """Every CUDA kernel specialisation the full sweep launches on sm_90 (the families list them too)."""
    device = DeviceSpec.for_arch("sm_90")
    return [(fam.kernel_name, fam.constants(cfg, ProblemSpec(1, 1, 1, 1, 1, d, C.DTYPE, causal)))
            for d in C.HEAD_DIMS for causal in (False, True) for fam, cfg in candidates(device, C.DTYPE, d, causal)]


def _base(head_dim: int, seq: int, batch: int, heads: int, causal: bool, dtype: str) -> dict[str, Any]:
    return {"head_dim": head_dim, "seq_len": seq, "batch": batch, "num_heads": heads, "causal": causal,
            "dtype": dtype}


def _our_config(fam: Any, cfg: Any) -> dict[str, Any]:
    return {"kernel": fam.kernel_name, "family": fam.name, **fam.config_dict(cfg)}


def _time_point(ctx: ExperimentContext, bench: Bench, launch: Any, reference: Any, base: dict,
                config: dict, flops: float, nbytes: float, records: list, rejected: list,
                extra: dict[str, float]) -> None:
    o, _ = launch.launch()
    ok, diff, why = bench.full_check(o, reference)
    if not ok:
        rejected.append({**config, **base, "why": why})
        return
    stats = launch.time(warmup=C.WARMUP, iters=bench.iters, flush_l2=C.FLUSH_L2)
    m = C.metrics(flops, nbytes, stats.median_ms)
    m.update(extra)
    if math.isfinite(diff):
        m["vs_reference_max_abs_err"] = diff
    m.update(bench.extra_metrics(launch))
    m.update(bench.clocks())
    records.append(ctx.record({**base, **config}, m, stats))


def point_key(head_dim: int, causal: bool, seq: int) -> str:
    return f"D={head_dim} causal={causal} N={seq}"


def sweep_points(bench: Bench) -> list[Point]:
    """One point per (head dim, mask, N): its tiles, its anchors and its default call on the same
    inputs, so anchors and the tiles they are compared with run on the same device."""
    return [Point(point_key(d, c, n), {"head_dim": d, "causal": c, "seq_len": n})
            for d in bench.head_dims for c in (False, True) for n in bench.seq_lens]


def _gates(ctx: ExperimentContext, bench: Bench, head_dim: int, causal: bool) -> tuple[list, list]:
    """(passing (family, config, gate error), rejected rows) of the FP64 gate at (head dim, mask).

    The gate's inputs come from its own stream (``ctx.point_rng``), so every point of that head
    dim and mask, in whatever process, gets the same verdicts; they are computed once per
    context (``ctx.extras``) and reused by its later points."""
    memo = ctx.extras.setdefault(_GATES_EXTRA, {})
    key = (head_dim, causal)
    if key in memo:
        return memo[key]
    rng = ctx.point_rng(f"gate D={head_dim} causal={causal}")
    good, rejected = [], []
    for fam, cfg in candidates(bench.device, bench.dtype, head_dim, causal):
        gate = lab.fp64_gate(
            lambda q, k, v, fam=fam, cfg=cfg: fam.run_host(q, k, v, causal=causal, dtype=bench.dtype,
                                                          config=cfg, backend=bench.backend_obj),
            head_dim=head_dim, causal=causal, dtype=bench.dtype, rng=rng, shapes=bench.gate_shapes,
            atol=C.ATOL, rtol=C.RTOL)
        if gate:
            good.append((fam, cfg, gate.max_abs_err))
        else:
            rejected.append({**_our_config(fam, cfg), "head_dim": head_dim, "causal": causal, "why": gate.why})
    memo[key] = (good, rejected)
    return good, rejected


def measure_point(ctx: ExperimentContext, bench: Bench, point: Point) -> PointResult:
    """One point: anchors, every gated tile, then the default call, on one set of inputs."""
    head_dim, causal, seq = point.params["head_dim"], point.params["causal"], point.params["seq_len"]
    good, gate_rejected = _gates(ctx, bench, head_dim, causal)
    records: list[dict] = []
    rejected = list(gate_rejected)
    unavailable: dict[str, str] = {}
    batch, heads = bench.problem(head_dim, seq)
    base = _base(head_dim, seq, batch, heads, causal, bench.dtype)
    flops = float(lab.attention_flops(batch, heads, seq, seq, head_dim, causal))
    nbytes = C.min_bytes(batch, heads, seq, head_dim, bench.elem_bytes)
    q, k, v = bench.inputs(ctx.point_rng(point.key), batch, heads, seq, head_dim)
    for name, time_fn in bench.anchors(q, k, v, causal, head_dim, seq).items():
        if isinstance(time_fn, str):
            unavailable[f"{name} D={head_dim} N={seq} causal={causal}"] = time_fn
            continue
        stats = time_fn()
        m = {**C.metrics(flops, nbytes, stats.median_ms), **bench.clocks()}
        records.append(ctx.record({**base, "kernel": name}, m, stats))
    reference = bench.reference(q, k, v, causal)
    for fam, cfg, gate_err in good:
        problem = check_flash_inputs(q, k, v, causal=causal)
        launch = fam.prepare(problem, cfg, bench.backend_obj)
        _time_point(ctx, bench, launch, reference, base, _our_config(fam, cfg), flops, nbytes, records,
                    rejected, {"gate_max_abs_err": gate_err})
    _time_auto(ctx, bench, q, k, v, causal, reference, base, flops, nbytes, records, rejected)
    del q, k, v, reference
    bench.release()
    return PointResult(point.key, records, {"rejected": rejected, "anchors_unavailable": unavailable})


def merge_points(ctx: ExperimentContext, bench: Bench, results: list[PointResult]
                 ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The points' records in point order, their rejected configurations (a gate's verdicts,
    which every point of its head dim and mask reports, once) and notes; then the check that
    every default call chose what the finished table chooses. Returns (records, rejected, notes)."""
    records = [r for res in results for r in res.records]
    rejected: list[dict] = []
    seen: set[str] = set()
    for res in results:
        for row in res.extra.get("rejected", []):
            text = canonical_json(row)
            if text not in seen:
                seen.add(text)
                rejected.append(row)
        bench.notes["anchors_unavailable"].update(res.extra.get("anchors_unavailable", {}))
    _check_auto_choices(ctx, bench, records)
    bench.notes["rejected"] = rejected
    return records, rejected, bench.notes


def run_sweep(ctx: ExperimentContext, bench: Bench) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Every point in order, then :func:`merge_points`; returns (records, rejected, notes)."""
    results = [measure_point(ctx, bench, p) for p in ctx.progress(sweep_points(bench), desc=f"proto1[{bench.backend}]")]
    return merge_points(ctx, bench, results)


def _time_auto(ctx: ExperimentContext, bench: Bench, q: Any, k: Any, v: Any, causal: bool, reference: Any,
               base: dict, flops: float, nbytes: float, records: list, rejected: list) -> None:
    """Time ``prepare_forward(q, k, v)`` (kernel="auto") choosing from the point's own entries
    (``records``: what the finished table has at this point, module doc)."""
    with chooser.use_entries(chooser.build_entries(records, bench.device.arch, ctx.device_name)):
        launch = front.prepare_forward(q, k, v, causal=causal, backend=bench.backend_obj or bench.backend)
    config = {"kernel": C.AUTO, "family": launch.family,
              "chose": families.get(launch.family).config_label(launch.config), "reason": launch.reason}
    _time_point(ctx, bench, launch, reference, base, config, flops, nbytes, records, rejected, {})


def _check_auto_choices(ctx: ExperimentContext, bench: Bench, records: list) -> None:
    """Every default call chose what the finished table chooses at its point (module doc)."""
    table = chooser.build_entries(records, bench.device.arch, ctx.device_name)
    bench.notes["auto_table_entries"] = len(table)
    with chooser.use_entries(table):
        for r in records:
            c = r["config"]
            if c["kernel"] != C.AUTO:
                continue
            spec = ProblemSpec(c["batch"], c["num_heads"], c["num_heads"], c["seq_len"], c["seq_len"], c["head_dim"],
                               c["dtype"], c["causal"])
            final = chooser.choose(spec, bench.device)
            if (final.family.name, final.label) != (c["family"], c["chose"]):
                raise ExperimentError(f"kernel='auto' at D={c['head_dim']} N={c['seq_len']} causal={c['causal']} "
                                      f"chose {c['chose']} during the sweep but {final.label} from the finished table")
