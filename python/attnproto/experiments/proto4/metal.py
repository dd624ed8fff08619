"""Prototype 4 on Metal (Issue 6): pipeline builds of the Prototype 1 kernel, specialised by
MTLFunctionConstantValues, and the MTLBinaryArchive.

The specs (archive matrix, cold sequence, first-dispatch specs) come from
attnproto.metal_specs, so the static checks (tools/metal_check) compile every one of them."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ... import lab, metal_specs
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from .common import by_phase, per_variant, run_fresh_process, wall_ms
from .metal_findings import metal_findings
from .summary import metal_summary_row

METAL_KERNEL = "flash_attention"
METAL_VARIANT_COUNTS = metal_specs.PROTO4_COLD_COUNTS
METAL_QUICK_VARIANT_COUNTS = (1, 10)
# A spec already built once, built cold again this many times: shows whether a cache below
# attnproto (the OS Metal shader cache) serves repeated builds.
METAL_REBUILD_REPEATS = 3
METAL_QUICK_REBUILD_REPEATS = 2
# First dispatch: B=1, Hkv=1, Hq = the spec's GQA group, Nq = Nkv = this many tokens: the
# dispatch itself is negligible next to a pipeline build.
METAL_LAUNCH_TOKENS = 128
# Where the Metal backend looks for a prebuilt library (kMetallibName in csrc/metal/metal_backend.mm),
# and the variable that makes it compile the .metal sources instead (kFromSourceEnv).
METALLIB_RELPATH = "metal/attnproto.metallib"
METAL_FROM_SOURCE_ENV = "ATTNPROTO_METAL_FROM_SOURCE"


def _metal_host():
    """(Metal GpuBackend, native module): a function so the harness test can substitute a fake."""
    from ... import backend as backend_mod  # noqa: PLC0415

    return backend_mod.get("metal"), backend_mod.native()


def _library_source() -> str:
    """How the backend gets its MTLLibrary: a prebuilt metallib or a compile of the sources."""
    from ...backend import shader_dir  # noqa: PLC0415

    if os.environ.get(METAL_FROM_SOURCE_ENV) == "1" or not (shader_dir() / METALLIB_RELPATH).is_file():
        return "source"
    return "metallib"


def _obtain(be, spec, mode: str, expect: str, phase: str):
    """(kernel, wall ms of the request) for a MetalSpec, checking the kernel's origin."""
    try:
        kern, wall = wall_ms(lambda: be.kernel(spec.name, mode=mode, **spec.as_dict()))
    except RuntimeError as exc:
        if expect == "archive":
            raise ExperimentError(f"{phase}: {spec} is not in the binary archive (archive_only load "
                                  f"missed): {str(exc).splitlines()[0]}") from exc
        raise ExperimentError(f"{phase}: building {spec} (mode {mode}) failed: {exc}") from exc
    if kern.origin != expect:
        raise ExperimentError(f"{phase}: {spec} (mode {mode}) came from '{kern.origin}', expected '{expect}'")
    return kern, wall


def metal_archive_load(be, specs: list[tuple[str, dict[str, int]]]) -> dict[str, Any]:
    """Load every (name, constants) archive-only; run in a fresh process by the Metal path.

    Returns per-spec load ms (the host's compile_ms: specialisation + pipeline from the
    archive; the first also opens the archive), the library load of the first request
    (k.load_ms: this process has no library yet) and the loop's wall time.
    """
    load, library = [], 0.0

    def load_all() -> None:
        nonlocal library
        for name, constants in specs:
            kern, _ = _obtain(be, metal_specs.MetalSpec.make(name, **constants), "archive_only", "archive",
                              "archive load in a fresh process")
            load.append(float(kern.compile_ms))
            library = max(library, float(kern.load_ms))

    _, total = wall_ms(load_all)
    return {"load_ms": load, "library_load_ms": library, "total_ms": total}


_METAL_LOADER = r"""
import json, sys
from attnproto.backend import get
from attnproto.experiments.proto4.metal import metal_archive_load
print(json.dumps(metal_archive_load(get("metal"), json.loads(sys.stdin.read()))))
"""


def _fresh_process_load_metal(specs: list[tuple[str, dict[str, int]]], cache_dir: str) -> dict[str, Any]:
    """metal_archive_load in a new Python process whose archive is `cache_dir`."""
    return run_fresh_process(_METAL_LOADER, specs, cache_dir, f"archive-only load of {len(specs)} specs")


def _spec_list(specs) -> list[tuple[str, dict[str, int]]]:
    return [(s.name, s.as_dict()) for s in specs]


def _metal_cold(ctx: ExperimentContext, be) -> list[dict]:
    """Cold builds (mode "cold": attnproto's memory cache and archive bypassed)."""
    counts = METAL_QUICK_VARIANT_COUNTS if ctx.quick else METAL_VARIANT_COUNTS
    pool = metal_specs.proto4_cold_specs()
    warm = metal_specs.PROTO4_WARMUP_BUILDS
    singles = pool[warm:warm + metal_specs.PROTO4_SINGLE_BUILDS]
    sequence = pool[warm + len(singles):warm + len(singles) + max(counts)]
    if len(sequence) < max(counts):
        raise ExperimentError(f"cold build: {max(counts)} variants requested, metal_specs.proto4_cold_specs() "
                              f"holds {len(sequence)} after the warm-up and single builds")
    phase = "cold build"
    # The process's first build also loads the library (measured in the fresh-process load).
    for spec in pool[:warm]:
        _obtain(be, spec, "cold", "compiled", phase)

    def build_all(specs) -> tuple[list[float], list[float]]:
        """Host build ms (compile_ms) and the request's wall ms per spec."""
        built = [_obtain(be, spec, "cold", "compiled", phase) for spec in specs]
        return [float(kern.compile_ms) for kern, _ in built], [wall for _, wall in built]

    single_ms, single_wall = build_all(singles)
    seq_ms, seq_wall = build_all(ctx.progress(sequence, desc="proto4 metal cold builds"))
    candidates = len(metal_specs.proto4_candidates())
    records = []
    for n in counts:
        per, walls = (single_ms, single_wall) if n == 1 else (seq_ms[:n], seq_wall[:n])
        how = (f"{len(singles)} specs, each built alone" if n == 1
               else f"the first {n} of one sequence of {len(sequence)} distinct specs")
        summary, stats = per_variant(per)
        metrics = {**summary, "build_sum_ms": float(sum(per)), "wall_sum_ms": float(sum(walls)),
                   "host_overhead_median_ms": float(np.median(np.subtract(walls, per))),
                   "variants_count": float(n), "candidates_count": float(candidates)}
        records.append(ctx.record({"phase": "metal_cold_build", "kernel": METAL_KERNEL, "variants": n,
                                   "mode": "cold", "specs": how, "library": _library_source()}, metrics, stats))
    repeats = METAL_QUICK_REBUILD_REPEATS if ctx.quick else METAL_REBUILD_REPEATS
    again = lab.timing([float(_obtain(be, singles[0], "cold", "compiled", phase)[0].compile_ms)
                        for _ in range(repeats)], clock="host")
    records.append(ctx.record(
        {"phase": "metal_rebuild", "kernel": METAL_KERNEL, "spec": singles[0].canonical(), "mode": "cold"},
        {"first_build_ms": single_ms[0], "rebuild_median_ms": again.median_ms,
         "first_over_rebuild_ratio": single_ms[0] / again.median_ms}, again))
    return records


def _braced(values) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


def _matrix_text(quick: bool) -> str:
    if quick:
        return "quick: " + "x".join(map(str, metal_specs.PROTO4_QUICK_TILE)) + " x (CAUSAL x DTYPE)"
    legal_of = len(metal_specs.SWEEP_HEAD_DIM) * len(metal_specs.SWEEP_BLOCK_R) * len(metal_specs.SWEEP_BLOCK_C)
    return (f"HEAD_DIM{_braced(metal_specs.SWEEP_HEAD_DIM)} x BLOCK_R{_braced(metal_specs.SWEEP_BLOCK_R)} x "
            f"BLOCK_C{_braced(metal_specs.SWEEP_BLOCK_C)} x (CAUSAL x DTYPE), the {len(metal_specs.sweep_tiles())} of "
            f"{legal_of} tiles within {metal_specs.THREADGROUP_MEMORY_LIMIT} bytes of threadgroup memory")


def _metal_archive(ctx: ExperimentContext, be, nat, cold_median_ms: float) -> list[dict]:
    """Build the matrix into a temporary binary archive, then load it archive-only in a fresh process."""
    specs = metal_specs.proto4_matrix_specs(ctx.quick)
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-mtlarchive-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            build_ms, build_wall = wall_ms(lambda: [
                float(_obtain(be, spec, "default", "compiled", "archive build")[0].compile_ms)
                for spec in ctx.progress(specs, desc="proto4 metal archive build")])
        finally:
            nat.set_cache_dir(previous)
        archive_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        if archive_bytes == 0:
            raise ExperimentError(f"archive build: nothing was written under {tmp}")
        loaded = _fresh_process_load_metal(_spec_list(specs), tmp)
    n = len(specs)
    base = {"kernel": METAL_KERNEL, "variants": n, "matrix": _matrix_text(ctx.quick), "library": _library_source()}
    quarter = max(1, n // 4)
    build_stats = lab.timing(build_ms, clock="host")
    build = ctx.record({**base, "phase": "metal_archive_build", "mode": "default"}, {
        "build_wall_ms": build_wall, "build_sum_ms": float(sum(build_ms)), "build_median_ms": build_stats.median_ms,
        "build_first_quarter_median_ms": float(np.median(build_ms[:quarter])),
        "build_last_quarter_median_ms": float(np.median(build_ms[-quarter:])),
        "store_overhead_median_ms": build_stats.median_ms - cold_median_ms,
        "archive_bytes": float(archive_bytes), "variants_count": float(n)}, build_stats)
    load_ms = loaded["load_ms"]
    load_stats = lab.timing(load_ms, clock="host")
    load = ctx.record({**base, "phase": "metal_archive_load", "mode": "archive_only", "process": "fresh"}, {
        "load_median_ms": load_stats.median_ms, "load_first_ms": float(load_ms[0]), "load_total_ms": loaded["total_ms"],
        "library_load_ms": loaded["library_load_ms"], "process_wall_ms": loaded["process_wall_ms"],
        "cold_build_median_ms": cold_median_ms, "load_speedup_x": cold_median_ms / load_stats.median_ms,
        "total_speedup_x": float(sum(build_ms)) / loaded["total_ms"], "variants_count": float(n)}, load_stats)
    return [build, load]


def _metal_dispatch_args(ctx: ExperimentContext, be, spec):
    """(grid, block, threadgroup bytes, args, (O buffer, O shape)) of one small dispatch of `spec`."""
    from ...ops import metal_flash  # noqa: PLC0415

    c = spec.as_dict()
    dtype = {code: name for name, code in metal_specs.DTYPE_CODES.items()}[c["DTYPE"]]
    if dtype != metal_specs.PROTO4_LAUNCH_DTYPE:
        raise ExperimentError(f"first dispatch: {spec} is {dtype}; the launch inputs are "
                              f"{metal_specs.PROTO4_LAUNCH_DTYPE}")
    group = c["GQA_GROUP"]
    heads = max(group, 1)
    n, d = METAL_LAUNCH_TOKENS, c["HEAD_DIM"]
    q = ctx.rng.standard_normal((1, heads, n, d), dtype=np.float32).astype(np.float16)
    k, v = (ctx.rng.standard_normal((1, 1, n, d), dtype=np.float32).astype(np.float16) for _ in range(2))
    problem = metal_flash.check_metal_flash_inputs(
        q, k, v, causal=bool(c["CAUSAL"]), rope=bool(c["ROPE"]), alibi=bool(c["ALIBI"]),
        fixed_gqa_group=group > 0, block_r=c["BLOCK_R"], block_c=c["BLOCK_C"])
    if metal_flash.flash_launch_spec(problem) != spec:
        raise ExperimentError(f"first dispatch: the inputs specialise to {metal_flash.flash_launch_spec(problem)}, "
                              f"not {spec}")
    grid, block, shared = metal_specs.flash_dispatch(1, heads, n, c["BLOCK_R"], d, c["BLOCK_C"], dtype)
    inputs = [be.from_numpy(metal_flash.encode_elements(x, name, dtype)) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    o_shape = (1, heads, n, d)
    outputs = []
    for nbytes in (q.nbytes, np.dtype(metal_flash.LSE_DTYPE).itemsize * heads * n):
        buf = be.alloc(nbytes)
        be.fill(buf, metal_flash.POISON_BYTE)
        outputs.append(buf)
    args = [metal_flash.metal_flash_params(problem), *inputs, *outputs]
    return grid, block, shared, args, (outputs[0], o_shape)


# (origin, kernel request mode, origin the host must report); "store" only writes the archive
# the next step reads and is not reported.
_DISPATCH_STEPS = (("cold", "cold", "compiled"), ("store", "default", "compiled"),
                   ("archive", "archive_only", "archive"), ("memory", "default", "memory"))


def _metal_first_dispatch(ctx: ExperimentContext, be, nat) -> list[dict]:
    """Kernel request + first dispatch + wait: cold (never built), from the archive, from memory."""
    from ...ops import metal_flash  # noqa: PLC0415

    specs = metal_specs.proto4_launch_specs()
    total: dict[str, list[float]] = {"cold": [], "archive": [], "memory": []}
    kernel_ms: dict[str, list[float]] = {o: [] for o in total}
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-mtldispatch-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            for spec in specs:
                grid, block, shared, args, (o_buf, o_shape) = _metal_dispatch_args(ctx, be, spec)
                for origin, mode, expect in _DISPATCH_STEPS:
                    if origin == "archive":
                        be.clear_memory_cache()

                    def dispatch(mode=mode, expect=expect, origin=origin):
                        kern, _ = _obtain(be, spec, mode, expect, f"first dispatch ({origin})")
                        be.launch(kern, grid, block, args, shared_bytes=shared)
                        be.synchronize()
                        return kern

                    kern, ms = wall_ms(dispatch)
                    if origin in total:
                        total[origin].append(ms)
                        kernel_ms[origin].append(float(kern.compile_ms))
                out = metal_flash.decode_elements(be.to_numpy(o_buf, np.uint16, o_shape),
                                                  metal_specs.PROTO4_LAUNCH_DTYPE)
                if np.isnan(np.asarray(out, dtype=np.float32)).any():
                    raise ExperimentError(f"first dispatch: {spec} left output elements unwritten (NaN poison)")
        finally:
            nat.set_cache_dir(previous)
    records = []
    for origin, samples in total.items():
        stats = lab.timing(samples, clock="host")
        records.append(ctx.record(
            {"phase": "metal_first_dispatch", "origin": origin, "kernel": METAL_KERNEL,
             "specs": [s.canonical() for s in specs], "tokens": METAL_LAUNCH_TOKENS},
            {"first_dispatch_median_ms": stats.median_ms, "kernel_median_ms": float(np.median(kernel_ms[origin])),
             "dispatch_median_ms": float(np.median(np.subtract(samples, kernel_ms[origin])))}, stats))
    return records


def run_metal(ctx: ExperimentContext) -> ExperimentResult:
    """The Metal path of proto4: cold builds, archive build + fresh-process load, first dispatch."""
    be, nat = _metal_host()
    records = _metal_cold(ctx, be)
    cold_median = max(by_phase(records, "metal_cold_build"),
                      key=lambda r: r["config"]["variants"])["metrics"]["per_variant_median_ms"]
    records += _metal_archive(ctx, be, nat, cold_median)
    records += _metal_first_dispatch(ctx, be, nat)
    summary = [metal_summary_row(r) for r in records]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    requested = METAL_QUICK_VARIANT_COUNTS if ctx.quick else METAL_VARIANT_COUNTS
    return ExperimentResult(records=records, findings=metal_findings(ctx, records, requested), summary=summary)
