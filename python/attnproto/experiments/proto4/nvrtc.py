"""Prototype 4 on cpu and cuda: NVRTC cold compiles, where a compile spends its time, and the
on-disk cubin archive built and loaded in a fresh process (no GPU needed, except for the
kernel loads of the archive on cuda).

Every compile here goes straight to NVRTC (``cuda_compile``: no in-memory cache, no
archive; NVRTC itself keeps none), so each one is a cold compile."""
from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ... import lab
from ..registry import ExperimentContext, ExperimentError
from .common import DTYPE, KERNEL, LAUNCH_HEAD_DIM, PHASE_SEQ_LEN, per_variant, run_fresh_process, wall_ms
from .variants import (
    MULTI_ENTRIES,
    MULTI_ENTRY_KERNEL,
    SALT,
    SALTED_KERNEL,
    WARMUP_SALT,
    fresh_salt,
    matrix_specs,
    salted_variants,
)

VARIANT_COUNTS = (1, 10, 50, 100, 500)
QUICK_VARIANT_COUNTS = (1, 10)
# N = 1 has no spread: its one variant is compiled this many times (each a fresh NVRTC program).
SINGLE_REPEATS = 3
PHASE_REPEATS = 3
QUICK_PHASE_REPEATS = 2
PHASE_HEAD_DIMS = (64, 128, 256)
QUICK_PHASE_HEAD_DIMS = (128,)

_PTXAS_TIME = re.compile(r"Compile time = ([0-9.]+) ms")


def _jobs() -> int:
    return os.cpu_count() or 1


def representative() -> dict[str, int]:
    """The chooser's D=128 long-sequence tiles: the variant compiled alone (N=1)."""
    from ...ops import configs  # noqa: PLC0415

    return configs.choose_config(LAUNCH_HEAD_DIM, PHASE_SEQ_LEN, False, DTYPE).constants()


def _compile_batch(nat, specs, arch: str, jobs: int) -> tuple[list[float], float]:
    """Per-variant NVRTC ms and the wall ms of the whole batch on `jobs` threads."""
    def one(spec):
        return nat.cuda_compile(spec[0], spec[1], arch)[2]

    def batch():
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # NVRTC releases the GIL
            return list(pool.map(one, specs))

    return wall_ms(batch)


def measure_cold(ctx: ExperimentContext, nat, arch: str) -> list[dict]:
    counts = QUICK_VARIANT_COUNTS if ctx.quick else VARIANT_COUNTS
    jobs = _jobs()
    records, offset = [], 0
    # One untimed compile of the kernel first: loading NVRTC, its builtins and the sources once per
    # process is not a per-variant cost.
    nat.cuda_compile(SALTED_KERNEL, {**representative(), SALT: WARMUP_SALT}, arch)
    for n in ctx.progress(counts, desc="proto4 cold compile"):
        if n == 1:
            # The chooser's D=128 tiles: one representative variant, compiled alone (uncontended),
            # each repeat with its own salt.
            per = [nat.cuda_compile(SALTED_KERNEL, {**representative(), SALT: fresh_salt()}, arch)[2]
                   for _ in range(SINGLE_REPEATS)]
            wall = None
        else:
            specs = [(SALTED_KERNEL, {**c, SALT: fresh_salt()}) for c in salted_variants(n, offset)]
            per, wall = _compile_batch(nat, specs, arch, jobs)
        offset += n
        summary, stats = per_variant(per)
        wall = stats.median_ms if wall is None else wall
        metrics = {**summary, "batch_wall_ms": wall, "wall_per_variant_ms": wall / n,
                   "variants_count": float(n), "jobs_count": float(1 if n == 1 else jobs)}
        records.append(ctx.record({"phase": "cold_compile", "kernel": KERNEL, "variants": n, "arch": arch,
                                   "jobs": 1 if n == 1 else jobs, "output": "cubin"}, metrics, stats))
    return records


def _ptxas_ms(nat, consts: dict[str, int], arch: str) -> tuple[float, float, bool]:
    """(cubin ms, ptxas ms, whether ptxas's time came from its own -v report) of one fresh compile."""
    _, log, ms = nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: fresh_salt()}, arch, "cubin",
                                  ["--ptxas-options=-v"])
    found = _PTXAS_TIME.findall(log)
    if found:
        return ms, sum(float(x) for x in found), True
    # Some NVRTC builds return no ptxas -v text in the program log: time ptxas alone
    # instead, as nvJitLink assembling this kernel's PTX into a cubin.
    ptx_text, _, _ = nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: fresh_salt()}, arch, "ptx")
    _, _, link_ms = nat.cuda_link([(ptx_text, "ptx", SALTED_KERNEL)], arch, [])
    return ms, float(link_ms), False


def measure_phases(ctx: ExperimentContext, nat, arch: str) -> list[dict]:
    """PTX only (front end + NVVM) vs cubin (+ ptxas), ptxas's own time, PCH, multi-entry."""
    from ...ops import configs  # noqa: PLC0415

    reps = QUICK_PHASE_REPEATS if ctx.quick else PHASE_REPEATS
    records = []
    pch_dir = tempfile.mkdtemp(prefix="attnproto-pch-")
    for d in ctx.progress(QUICK_PHASE_HEAD_DIMS if ctx.quick else PHASE_HEAD_DIMS, desc="proto4 phases"):
        cfg = configs.choose_config(d, PHASE_SEQ_LEN, False, DTYPE)
        consts = cfg.constants()
        ptx = [nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: fresh_salt()}, arch, "ptx")[2] for _ in range(reps)]
        split = [_ptxas_ms(nat, consts, arch) for _ in range(reps)]
        cubin = [c for c, _, _ in split]
        ptxas = [p for _, p, _ in split]
        from_log = all(f for _, _, f in split)
        base = {"kernel": KERNEL, "head_dim": d, "tiles": cfg.label(), "arch": arch, "jobs": 1}
        med = float(np.median(cubin))
        records.append(ctx.record({**base, "phase": "split"}, {
            "ptx_median_ms": float(np.median(ptx)), "cubin_median_ms": med,
            "frontend_median_ms": float(np.median([c - p for c, p in zip(cubin, ptxas)])),
            "ptxas_median_ms": float(np.median(ptxas)),
            "ptxas_share_pct": 100.0 * float(np.median(ptxas)) / med,
            "ptxas_from_log_count": float(from_log)}, lab.timing(cubin, clock="host")))

        # Precompiled headers: NVRTC's automatic PCH (-pch) creates one on the first compile
        # and uses it on the next ones.
        pch_opts = ["-pch", f"--pch-dir={pch_dir}", "--pch-messages=true"]
        pch_runs, used = [], 0
        for _ in range(reps + 1):
            _, log, ms = nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: fresh_salt()}, arch, "cubin", pch_opts)
            pch_runs.append(ms)
            used += "using precompiled header" in log
        with_pch = pch_runs[1:]
        records.append(ctx.record({**base, "phase": "pch"}, {
            "pch_create_ms": pch_runs[0], "pch_use_median_ms": float(np.median(with_pch)),
            "no_pch_median_ms": med, "pch_used_count": float(used),
            "pch_speedup_x": med / float(np.median(with_pch))}, lab.timing(with_pch, clock="host")))

        # One TU with the four CAUSAL x DTYPE entries vs the four single-entry compiles.
        tiles = {k: v for k, v in consts.items() if k not in ("CAUSAL", "DTYPE")}
        multi = [nat.cuda_compile(MULTI_ENTRY_KERNEL, {**tiles, SALT: fresh_salt()}, arch)[2] for _ in range(reps)]
        singles = [sum(nat.cuda_compile(SALTED_KERNEL, {**tiles, "CAUSAL": c, "DTYPE": t, SALT: fresh_salt()}, arch)[2]
                       for c in (0, 1) for t in (0, 1)) for _ in range(reps)]
        records.append(ctx.record({**base, "phase": "multi_entry", "entries": MULTI_ENTRIES}, {
            "multi_entry_median_ms": float(np.median(multi)), "four_singles_median_ms": float(np.median(singles)),
            "one_single_median_ms": med, "multi_over_singles_ratio": float(np.median(multi) / np.median(singles))},
            lab.timing(multi, clock="host")))
    return records


_LOADER = r"""
import json, sys, time
t_import = time.perf_counter()
from attnproto.backend import native, get
nat = native()
specs, arch, gpu = json.loads(sys.stdin.read())
rows = []
t0 = time.perf_counter()
for name, consts in specs:
    _, origin, ms, _, _ = nat.cuda_obtain(name, consts, arch, "archive_only")
    rows.append(ms)
total = (time.perf_counter() - t0) * 1e3
kernel_rows, kernel_total = [], 0.0
if gpu:
    be = get("cuda")
    t0 = time.perf_counter()
    for name, consts in specs:
        t1 = time.perf_counter()
        k = be.kernel(name, mode="archive_only", **consts)
        kernel_rows.append((time.perf_counter() - t1) * 1e3)
    kernel_total = (time.perf_counter() - t0) * 1e3
print(json.dumps({"obtain_ms": rows, "obtain_total_ms": total, "kernel_ms": kernel_rows,
                  "kernel_total_ms": kernel_total}))
"""


def _fresh_process_load(specs, arch: str, cache_dir: str, gpu: bool) -> dict[str, Any]:
    """Archive-only loads of every spec (and, on cuda, of the kernels) in a new process."""
    return run_fresh_process(_LOADER, [specs, arch, gpu], cache_dir, "archive load")


def measure_archive(ctx: ExperimentContext, nat, arch: str, gpu: bool) -> list[dict]:
    from ... import kernels  # noqa: PLC0415

    specs = matrix_specs(ctx.quick)
    jobs = _jobs()
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-archive-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            rows, build_ms = wall_ms(lambda: kernels.precompile(specs, arch=arch, jobs=jobs))
        finally:
            nat.set_cache_dir(previous)
        bad = [r for r in rows if not r["ok"] or r["origin"] != "compiled"]
        if bad:
            raise ExperimentError(f"archive build: {len(bad)} entries failed or were not compiled: {bad[:2]}")
        archive_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        loaded = _fresh_process_load(specs, arch, tmp, gpu)
    compile_ms = [r["ms"] for r in rows]
    load = lab.timing(loaded["obtain_ms"], clock="host")
    n = len(specs)
    metrics = {
        "build_wall_ms": build_ms, "compile_sum_ms": float(sum(compile_ms)),
        "compile_median_ms": float(np.median(compile_ms)), "load_median_ms": load.median_ms,
        "load_total_ms": loaded["obtain_total_ms"], "process_wall_ms": loaded["process_wall_ms"],
        "archive_bytes": float(archive_bytes), "variants_count": float(n), "jobs_count": float(jobs),
        "load_speedup_x": float(np.median(compile_ms) / load.median_ms),
        "total_speedup_x": float(sum(compile_ms) / loaded["obtain_total_ms"]),
    }
    if gpu:
        metrics["kernel_load_median_ms"] = float(np.median(loaded["kernel_ms"]))
        metrics["kernel_load_total_ms"] = loaded["kernel_total_ms"]
    cfg = {"phase": "archive", "kernel": KERNEL, "variants": n, "arch": arch, "jobs": jobs,
           "matrix": "quick" if ctx.quick else "HEAD_DIM{64,128,256} x BLOCK_R{64,128} x BLOCK_C{32,64,128} x "
                                               "(CAUSAL x DTYPE)"}
    return [ctx.record(cfg, metrics, load)]
