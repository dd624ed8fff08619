"""Prototype 4 — what specialisation costs: on CUDA NVRTC compile time per variant, the
on-disk cubin archive, first-launch latency, and where the compile time goes; on Metal the
same for pipeline builds of the Prototype 1 kernel (function constants) and the
MTLBinaryArchive (``_run_metal``, at the end of this module).

Every compile here goes straight to NVRTC (``cuda_compile``: no in-memory cache, no
archive; NVRTC itself keeps none), so each one is a cold compile. Distinct constant sets
are the legal flash_fwd_mma tile configurations (proto1's sweep space over every head dim,
mask and dtype) and, beyond their number, the same configurations with a named constant
VARIANT_SALT that the kernel never reads: the source NVRTC compiles is identical, the
KernelKey (and archive key) differs. The NVRTC measurements need no GPU, so this
experiment runs on "cpu" too (launch latencies only on "cuda").
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import metal_specs
from ..records import timing_from_samples
from .registry import ExperimentContext, ExperimentError, ExperimentResult, experiment

PROTOTYPE = "proto4"
KERNEL = "flash_fwd_mma"
# What timed cold compiles compile: flash_fwd_mma's translation unit plus a kernel storing the
# salt, so each measured compile has distinct PTX and no code-keyed compile cache can serve it
# (on the H100 machine a repeated compile of identical PTX took ~30 ms instead of ~450 ms).
SALTED_KERNEL = "flash_fwd_mma_salted"
MULTI_ENTRY_KERNEL = "stitch_multi_entry"   # four CAUSAL x DTYPE entries of flash_fwd_mma in one TU
MULTI_ENTRIES = 4
SALT = "VARIANT_SALT"
WARMUP_SALT = -1                            # the untimed first compile's salt (never a measured key)
ARCH_FALLBACK = "sm_90a"                    # what the cpu backend compiles for (CI's arch)

VARIANT_COUNTS = (1, 10, 50, 100, 500)
QUICK_VARIANT_COUNTS = (1, 10)
# N = 1 has no spread: its one variant is compiled this many times (each a fresh NVRTC program).
SINGLE_REPEATS = 3
PHASE_REPEATS = 3
QUICK_PHASE_REPEATS = 2
PHASE_HEAD_DIMS = (64, 128, 256)
QUICK_PHASE_HEAD_DIMS = (128,)
PHASE_SEQ_LEN = 4096                        # the chooser's long-sequence tiles
DTYPE = "bfloat16"

# ---- the 72-variant matrix (seed FR-5): HEAD_DIM x BLOCK_R x BLOCK_C x VARIANT ----
MATRIX_HEAD_DIMS = (64, 128, 256)
MATRIX_BLOCK_R = (64, 128)
MATRIX_BLOCK_C = (32, 64, 128)
MATRIX_VARIANTS = tuple((causal, dtype) for causal in (False, True) for dtype in ("float16", "bfloat16"))
MATRIX_ROWS_PER_WARP = 16                   # one 16-row MMA tile per warp: WARPS = BLOCK_R / 16
MATRIX_STAGES = 1                           # fits D=256 x BLOCK_C=128 in 227 KB
QUICK_MATRIX = ((128, 64, 64),)             # (head_dim, block_r, block_c) x the 4 variants
LOAD_TIMEOUT_S = 300

# ---- first launch (cuda only) ----
LAUNCH_REPEATS = 3
LAUNCH_SHAPE = (1, 1, 128)                  # batch, heads, tokens: the launch itself is negligible
LAUNCH_HEAD_DIM = 128

# ---- AC-2.6 ----
CONSTANTS_BUDGET_MS = 50.0                  # use run-time function constants if a compile is cheaper
STITCH_BUDGET_PCT = 1.0                     # (proto2) use stitching if its overhead is below this

_PTXAS_TIME = re.compile(r"Compile time = ([0-9.]+) ms")


# ====================================================================== variant sets
def _base_configs() -> list[dict[str, int]]:
    from ..ops import configs  # noqa: PLC0415

    out = []
    for d in configs.SUPPORTED_HEAD_DIMS:
        for causal in (False, True):
            for dtype in configs.DTYPE_CODES:
                out += [c.constants() for c in configs.sweep_space(d, causal, dtype)]
    return out


def salted_variants(count: int, offset: int = 0) -> list[dict[str, int]]:
    """`count` distinct constant sets: legal tile configurations in turn, VARIANT_SALT = round."""
    if count < 1:
        raise ValueError(f"count: must be >= 1, got {count}")
    bases = _base_configs()
    return [{**bases[(offset + i) % len(bases)], SALT: (offset + i) // len(bases)} for i in range(count)]


def matrix_specs(quick: bool = False) -> list[tuple[str, dict[str, int]]]:
    """The 72-variant archive matrix (4 in quick mode); every entry legal on sm_90."""
    from ..ops import configs  # noqa: PLC0415

    tiles = QUICK_MATRIX if quick else [(d, r, c) for d in MATRIX_HEAD_DIMS for r in MATRIX_BLOCK_R
                                        for c in MATRIX_BLOCK_C]
    out = []
    for d, r, c in tiles:
        for causal, dtype in MATRIX_VARIANTS:
            cfg = configs.FlashConfig(d, r, c, r // MATRIX_ROWS_PER_WARP, MATRIX_STAGES, causal, dtype)
            ok, why = cfg.is_legal()
            if not ok:
                raise ExperimentError(f"matrix entry {cfg.label()} is illegal: {why}")
            out.append((KERNEL, cfg.constants()))
    return out


# ====================================================================== helpers
def compiler_or_reason(need_nvjitlink: bool) -> tuple[Any, str]:
    """(native module, "") when NVRTC (and nvJitLink if asked) load, else (None, the reason)."""
    from ..backend import BackendUnavailable, native  # noqa: PLC0415

    try:
        nat = native()
        if not hasattr(nat, "cuda_compile"):
            return None, "this build has no CUDA backend (no NVRTC path)"
        nat.cuda_nvrtc_version()
        if need_nvjitlink:
            nat.cuda_nvjitlink_version()
    except (BackendUnavailable, RuntimeError) as exc:
        return None, str(exc).splitlines()[0]
    return nat, ""


def _jobs() -> int:
    return os.cpu_count() or 1


def _representative() -> dict[str, int]:
    from ..ops import configs  # noqa: PLC0415

    return configs.choose_config(LAUNCH_HEAD_DIM, PHASE_SEQ_LEN, False, DTYPE).constants()


_SALTS = iter(range(1, 2**31))


def _fresh_salt() -> int:
    """A salt no earlier compile of this process used."""
    return next(_SALTS)


def _compile_batch(nat, specs, arch: str, jobs: int) -> tuple[list[float], float]:
    """Per-variant NVRTC ms and the wall ms of the whole batch on `jobs` threads."""
    def one(spec):
        return nat.cuda_compile(spec[0], spec[1], arch)[2]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # NVRTC releases the GIL
        per = list(pool.map(one, specs))
    return per, (time.perf_counter() - t0) * 1e3


def _summary(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    return {"per_variant_median_ms": float(np.median(arr)), "per_variant_p10_ms": float(np.percentile(arr, 10)),
            "per_variant_p90_ms": float(np.percentile(arr, 90)), "per_variant_max_ms": float(arr.max())}


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
    from ..backend import shader_dir  # noqa: PLC0415

    env = {**os.environ, "ATTNPROTO_CACHE_DIR": cache_dir, "ATTNPROTO_SHADER_DIR": str(shader_dir())}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _LOADER], input=json.dumps([specs, arch, gpu]), env=env,
                         capture_output=True, text=True, timeout=LOAD_TIMEOUT_S, check=False)
    wall = (time.perf_counter() - t0) * 1e3
    if res.returncode != 0:
        raise ExperimentError(f"archive load in a fresh process failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_ms"] = wall
    return out


# ====================================================================== measurements
def _measure_cold(ctx: ExperimentContext, nat, arch: str) -> list[dict]:
    counts = QUICK_VARIANT_COUNTS if ctx.quick else VARIANT_COUNTS
    jobs = _jobs()
    records, offset = [], 0
    # One untimed compile of the kernel first: loading NVRTC, its builtins and the sources once per
    # process is not a per-variant cost.
    nat.cuda_compile(SALTED_KERNEL, {**_representative(), SALT: WARMUP_SALT}, arch)
    for n in ctx.progress(counts, desc="proto4 cold compile"):
        if n == 1:
            # The chooser's D=128 tiles: one representative variant, compiled alone (uncontended),
            # each repeat with its own salt.
            per = [nat.cuda_compile(SALTED_KERNEL, {**_representative(), SALT: _fresh_salt()}, arch)[2]
                   for _ in range(SINGLE_REPEATS)]
            wall = float(np.median(per))
        else:
            specs = [(SALTED_KERNEL, {**c, SALT: _fresh_salt()}) for c in salted_variants(n, offset)]
            per, wall = _compile_batch(nat, specs, arch, jobs)
        offset += n
        metrics = {**_summary(per), "batch_wall_ms": wall, "wall_per_variant_ms": wall / n,
                   "variants_count": float(n), "jobs_count": float(1 if n == 1 else jobs)}
        records.append(ctx.record({"phase": "cold_compile", "kernel": KERNEL, "variants": n, "arch": arch,
                                   "jobs": 1 if n == 1 else jobs, "output": "cubin"},
                                  metrics, timing_from_samples(per)))
    return records


def _measure_phases(ctx: ExperimentContext, nat, arch: str) -> list[dict]:
    """PTX only (front end + NVVM) vs cubin (+ ptxas), ptxas's own time, PCH, multi-entry."""
    from ..ops import configs  # noqa: PLC0415

    reps = QUICK_PHASE_REPEATS if ctx.quick else PHASE_REPEATS
    records = []
    pch_dir = tempfile.mkdtemp(prefix="attnproto-pch-")
    for d in ctx.progress(QUICK_PHASE_HEAD_DIMS if ctx.quick else PHASE_HEAD_DIMS, desc="proto4 phases"):
        cfg = configs.choose_config(d, PHASE_SEQ_LEN, False, DTYPE)
        consts = cfg.constants()
        ptx = [nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: _fresh_salt()}, arch, "ptx")[2] for _ in range(reps)]
        cubin, ptxas = [], []
        from_log = True
        for _ in range(reps):
            salted = {**consts, SALT: _fresh_salt()}
            _, log, ms = nat.cuda_compile(SALTED_KERNEL, salted, arch, "cubin", ["--ptxas-options=-v"])
            cubin.append(ms)
            found = _PTXAS_TIME.findall(log)
            if found:
                ptxas.append(sum(float(x) for x in found))
                continue
            # Some NVRTC builds return no ptxas -v text in the program log: time ptxas alone
            # instead, as nvJitLink assembling this kernel's PTX into a cubin.
            from_log = False
            ptx_text, _, _ = nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: _fresh_salt()}, arch, "ptx")
            _, _, link_ms = nat.cuda_link([(ptx_text, "ptx", SALTED_KERNEL)], arch, [])
            ptxas.append(float(link_ms))
        base = {"kernel": KERNEL, "head_dim": d, "tiles": cfg.label(), "arch": arch, "jobs": 1}
        med = float(np.median(cubin))
        records.append(ctx.record({**base, "phase": "split"}, {
            "ptx_median_ms": float(np.median(ptx)), "cubin_median_ms": med,
            "frontend_median_ms": float(np.median([c - p for c, p in zip(cubin, ptxas)])),
            "ptxas_median_ms": float(np.median(ptxas)),
            "ptxas_share_pct": 100.0 * float(np.median(ptxas)) / med,
            "ptxas_from_log_count": float(from_log)}, timing_from_samples(cubin)))

        # Precompiled headers: NVRTC's automatic PCH (-pch) creates one on the first compile
        # and uses it on the next ones.
        pch_opts = ["-pch", f"--pch-dir={pch_dir}", "--pch-messages=true"]
        pch_runs, used = [], 0
        for _ in range(reps + 1):
            _, log, ms = nat.cuda_compile(SALTED_KERNEL, {**consts, SALT: _fresh_salt()}, arch, "cubin", pch_opts)
            pch_runs.append(ms)
            used += "using precompiled header" in log
        with_pch = pch_runs[1:]
        records.append(ctx.record({**base, "phase": "pch"}, {
            "pch_create_ms": pch_runs[0], "pch_use_median_ms": float(np.median(with_pch)),
            "no_pch_median_ms": med, "pch_used_count": float(used),
            "pch_speedup_x": med / float(np.median(with_pch))}, timing_from_samples(with_pch)))

        # One TU with the four CAUSAL x DTYPE entries vs the four single-entry compiles.
        tiles = {k: v for k, v in consts.items() if k not in ("CAUSAL", "DTYPE")}
        multi = [nat.cuda_compile(MULTI_ENTRY_KERNEL, {**tiles, SALT: _fresh_salt()}, arch)[2] for _ in range(reps)]
        singles = [sum(nat.cuda_compile(SALTED_KERNEL, {**tiles, "CAUSAL": c, "DTYPE": t, SALT: _fresh_salt()}, arch)[2]
                       for c in (0, 1) for t in (0, 1)) for _ in range(reps)]
        records.append(ctx.record({**base, "phase": "multi_entry", "entries": MULTI_ENTRIES}, {
            "multi_entry_median_ms": float(np.median(multi)), "four_singles_median_ms": float(np.median(singles)),
            "one_single_median_ms": med, "multi_over_singles_ratio": float(np.median(multi) / np.median(singles))},
            timing_from_samples(multi)))
    return records


def _measure_archive(ctx: ExperimentContext, nat, arch: str, gpu: bool) -> list[dict]:
    from .. import kernels  # noqa: PLC0415

    specs = matrix_specs(ctx.quick)
    jobs = _jobs()
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-archive-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            t0 = time.perf_counter()
            rows = kernels.precompile(specs, arch=arch, jobs=jobs)
            build_ms = (time.perf_counter() - t0) * 1e3
        finally:
            nat.set_cache_dir(previous)
        bad = [r for r in rows if not r["ok"] or r["origin"] != "compiled"]
        if bad:
            raise ExperimentError(f"archive build: {len(bad)} entries failed or were not compiled: {bad[:2]}")
        archive_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        loaded = _fresh_process_load(specs, arch, tmp, gpu)
    compile_ms = [r["ms"] for r in rows]
    load_ms = loaded["obtain_ms"]
    n = len(specs)
    metrics = {
        "build_wall_ms": build_ms, "compile_sum_ms": float(sum(compile_ms)),
        "compile_median_ms": float(np.median(compile_ms)), "load_median_ms": float(np.median(load_ms)),
        "load_total_ms": loaded["obtain_total_ms"], "process_wall_ms": loaded["process_wall_ms"],
        "archive_bytes": float(archive_bytes), "variants_count": float(n), "jobs_count": float(jobs),
        "load_speedup_x": float(np.median(compile_ms) / np.median(load_ms)),
        "total_speedup_x": float(sum(compile_ms) / loaded["obtain_total_ms"]),
    }
    if gpu:
        metrics["kernel_load_median_ms"] = float(np.median(loaded["kernel_ms"]))
        metrics["kernel_load_total_ms"] = loaded["kernel_total_ms"]
    cfg = {"phase": "archive", "kernel": KERNEL, "variants": n, "arch": arch, "jobs": jobs,
           "matrix": "quick" if ctx.quick else "HEAD_DIM{64,128,256} x BLOCK_R{64,128} x BLOCK_C{32,64,128} x "
                                               "(CAUSAL x DTYPE)"}
    return [ctx.record(cfg, metrics, timing_from_samples(load_ms))]


def compute_cache_disabled() -> bool:
    """CUDA_CACHE_DISABLE=1: NVRTC on the H100 machine otherwise serves a compile of PTX it has
    seen before from the on-disk compute cache (~/.nv/ComputeCache; 22 ms instead of ~650 ms,
    tools/nvrtc_cache_probe.py). tools/device_run.sh sets it for this experiment."""
    return os.environ.get("CUDA_CACHE_DISABLE") == "1"


def _measure_first_launch(ctx: ExperimentContext, nat) -> list[dict]:
    """Time from the kernel request to the end of its first launch: cold, archive, memory."""
    import torch  # noqa: PLC0415

    from .. import backend as backend_mod  # noqa: PLC0415
    from ..ops import configs, flash  # noqa: PLC0415

    be = backend_mod.get("cuda")
    b, h, n = LAUNCH_SHAPE
    q, k, v = (torch.randn(b, h, n, LAUNCH_HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = configs.choose_config(LAUNCH_HEAD_DIM, n, False, DTYPE)
    problem = flash.check_flash_inputs(q, k, v)
    args = [flash.flash_params(problem), q, k, v, problem.out, problem.lse]
    grid, block, smem = cfg.grid(b, h, n), (cfg.threads, 1, 1), cfg.smem_bytes()
    records = []
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-launch-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            samples: dict[str, list[float]] = {"cold": [], "archive": [], "memory": []}
            for rep in range(LAUNCH_REPEATS):
                consts = {**cfg.constants(), SALT: 1_000_000 + rep}  # a key never compiled before
                torch.cuda.synchronize()
                for origin, mode in (("cold", "default"), ("archive", "archive_only"), ("memory", "default")):
                    if origin == "archive":
                        be.clear_memory_cache()
                    t0 = time.perf_counter()
                    kern = be.kernel(KERNEL, mode=mode, **consts)
                    be.launch(kern, grid, block, args, shared_bytes=smem)
                    be.synchronize()
                    samples[origin].append((time.perf_counter() - t0) * 1e3)
                    if kern.origin != {"cold": "compiled", "archive": "archive", "memory": "memory"}[origin]:
                        raise ExperimentError(f"first launch '{origin}' got a kernel of origin {kern.origin}")
        finally:
            nat.set_cache_dir(previous)
    for origin, s in samples.items():
        records.append(ctx.record({"phase": "first_launch", "origin": origin, "kernel": KERNEL, "tiles": cfg.label(),
                                   "shape": list(LAUNCH_SHAPE), "compute_cache_disabled": compute_cache_disabled()},
                                  {"first_launch_median_ms": float(np.median(s))}, timing_from_samples(s)))
    return records


# ====================================================================== findings
def _by_phase(records, phase):
    return [r for r in records if r["config"]["phase"] == phase]


def _findings(ctx: ExperimentContext, records: list[dict]) -> list:
    findings = []
    where = f"{ctx.backend} ({ctx.device_name})"
    cold = _by_phase(records, "cold_compile")
    largest = max(cold, key=lambda r: r["config"]["variants"])
    med = largest["metrics"]["per_variant_median_ms"]
    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Cold NVRTC compile cost per flash_fwd_mma variant on {ctx.backend}",
        slug=f"cold-compile-per-variant-{ctx.backend}",
        claim=("Cold NVRTC -> cubin compiles of flash_fwd_mma (no memory or disk cache) on " + where + ": " + "; ".join(
            f"N={r['config']['variants']}: {r['metrics']['per_variant_median_ms']:.0f} ms per variant "
            f"(p10 {r['metrics']['per_variant_p10_ms']:.0f}, p90 {r['metrics']['per_variant_p90_ms']:.0f}), batch wall "
            f"{r['metrics']['batch_wall_ms'] / 1e3:.2f} s on {r['config']['jobs']} threads "
            f"({r['metrics']['wall_per_variant_ms']:.0f} ms/variant effective)" for r in cold)
            + f". Variants past the {len(_base_configs())} legal tile configurations differ only in {SALT}, "
              "a named constant the kernel ignores (identical compile work, distinct key)."),
        evidence={"per_variant_median_ms": med, "per_variant_p90_ms": largest["metrics"]["per_variant_p90_ms"],
                  "batch_wall_ms": largest["metrics"]["batch_wall_ms"],
                  "wall_per_variant_ms": largest["metrics"]["wall_per_variant_ms"]},
        config={"kernel": KERNEL, "variant_counts": [r["config"]["variants"] for r in cold],
                "arch": largest["config"]["arch"]},
        cv=largest["timing"]["cv"], records=cold))

    arch_rec = _by_phase(records, "archive")[0]
    m = arch_rec["metrics"]
    n = int(m["variants_count"])
    claim = (f"Building the archive of {n} variants ({arch_rec['config']['matrix']}) took {m['build_wall_ms'] / 1e3:.2f} s "
             f"wall on {int(m['jobs_count'])} threads ({m['compile_sum_ms'] / 1e3:.1f} s of compiles, median "
             f"{m['compile_median_ms']:.0f} ms each, {m['archive_bytes'] / 2**20:.1f} MiB on disk). A fresh process "
             f"read and verified all {n} in {m['load_total_ms']:.1f} ms (median {m['load_median_ms']:.2f} ms each): "
             f"{m['load_speedup_x']:.0f}x faster per variant than compiling, {m['total_speedup_x']:.0f}x over the set; "
             f"the whole process including Python start and import took {m['process_wall_ms'] / 1e3:.2f} s.")
    ev = {"build_wall_ms": m["build_wall_ms"], "load_median_ms": m["load_median_ms"],
          "load_speedup_x": m["load_speedup_x"], "total_speedup_x": m["total_speedup_x"]}
    if "kernel_load_median_ms" in m:
        claim += (f" Loading them as kernels (archive read + cuModuleLoadData + cuModuleGetFunction) took "
                  f"{m['kernel_load_median_ms']:.2f} ms each ({m['kernel_load_total_ms']:.0f} ms for all).")
        ev["kernel_load_median_ms"] = m["kernel_load_median_ms"]
    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Cubin archive of the {n}-variant matrix: build and fresh-process load on {ctx.backend}",
        slug=f"archive-{n}-variants-{ctx.backend}", claim=claim, evidence=ev,
        config={"kernel": KERNEL, "variants": n, "arch": arch_rec["config"]["arch"]},
        cv=arch_rec["timing"]["cv"], records=[arch_rec]))

    split = _by_phase(records, "split")
    pch = _by_phase(records, "pch")
    multi = _by_phase(records, "multi_entry")
    share = float(np.median([r["metrics"]["ptxas_share_pct"] for r in split]))
    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Where NVRTC spends a flash_fwd_mma compile on {ctx.backend}",
        slug=f"compile-phases-{ctx.backend}",
        claim=("; ".join(
            f"D={r['config']['head_dim']} ({r['config']['tiles']}): cubin {r['metrics']['cubin_median_ms']:.0f} ms = "
            f"ptxas {r['metrics']['ptxas_median_ms']:.0f} ms ({r['metrics']['ptxas_share_pct']:.0f} %, "
            + ("ptxas's own report" if r["metrics"].get("ptxas_from_log_count", 1.0) == 1.0
               else "ptxas alone: nvJitLink assembling the PTX")
            + f") + front end and NVVM {r['metrics']['frontend_median_ms']:.0f} ms; a PTX-only compile took "
            f"{r['metrics']['ptx_median_ms']:.0f} ms" for r in split)
            + ". Automatic precompiled headers (-pch): " + "; ".join(
            f"D={r['config']['head_dim']}: {r['metrics']['pch_use_median_ms']:.0f} ms with the PCH vs "
            f"{r['metrics']['no_pch_median_ms']:.0f} ms without ({r['metrics']['pch_speedup_x']:.2f}x, used "
            f"{int(r['metrics']['pch_used_count'])} times)" for r in pch)
            + ". Four CAUSAL x DTYPE entries in one translation unit vs four single-entry compiles: " + "; ".join(
            f"D={r['config']['head_dim']}: {r['metrics']['multi_entry_median_ms']:.0f} vs "
            f"{r['metrics']['four_singles_median_ms']:.0f} ms ({r['metrics']['multi_over_singles_ratio']:.2f}x)"
            for r in multi) + "."),
        evidence={"ptxas_share_pct": share,
                  "pch_speedup_x": float(np.median([r["metrics"]["pch_speedup_x"] for r in pch])),
                  "multi_over_singles_ratio": float(np.median([r["metrics"]["multi_over_singles_ratio"] for r in multi]))},
        config={"kernel": KERNEL, "head_dims": [r["config"]["head_dim"] for r in split]},
        cv=max(r["timing"]["cv"] for r in split + pch + multi), records=split + pch + multi))

    launch = _by_phase(records, "first_launch")
    if launch:
        lm = {r["config"]["origin"]: r for r in launch}
        findings.append(ctx.finding(
            prototype=PROTOTYPE, title="First-launch latency of a flash_fwd_mma variant: cold, archive, memory",
            slug="first-launch-latency",
            claim=(f"From the kernel request to the end of its first (tiny, {LAUNCH_SHAPE}) launch: cold "
                   f"{lm['cold']['metrics']['first_launch_median_ms']:.1f} ms, from the archive "
                   f"{lm['archive']['metrics']['first_launch_median_ms']:.2f} ms, from memory "
                   f"{lm['memory']['metrics']['first_launch_median_ms']:.3f} ms (median of {LAUNCH_REPEATS}); "
                   + ("the machine's compute cache was disabled (CUDA_CACHE_DISABLE=1), so 'cold' compiled for real."
                      if lm["cold"]["config"].get("compute_cache_disabled") else
                      "the machine's compute cache was NOT disabled: 'cold' may have been served from it.")),
            evidence={f"{o}_first_launch_ms": lm[o]["metrics"]["first_launch_median_ms"] for o in lm},
            config={"kernel": KERNEL, "tiles": lm["cold"]["config"]["tiles"]},
            cv=max(r["timing"]["cv"] for r in launch), records=launch))

    # AC-2.6 recommendation, derived from the numbers above: an on-demand compile is one variant
    # compiled alone (the N=1 record), not the contended per-variant time inside a batch.
    single = next(r for r in cold if r["config"]["variants"] == 1)
    one = single["metrics"]["per_variant_median_ms"]
    load = m["load_median_ms"]
    if one < CONSTANTS_BUDGET_MS:
        verdict = (f"compile specialisations on demand (named constants): a cold compile costs {one:.0f} ms "
                   f"< {CONSTANTS_BUDGET_MS:.0f} ms")
    else:
        verdict = (f"pre-compile every variant into the archive and load at start-up: a cold compile of one "
                   f"variant costs {one:.0f} ms >= {CONSTANTS_BUDGET_MS:.0f} ms ({med:.0f} ms each inside the "
                   f"{largest['config']['variants']}-variant batch), an archive load {load:.2f} ms "
                   f"({m['load_speedup_x']:.0f}x less); compiling on demand stalls the first call of each "
                   f"variant by the compile time")
    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"AC-2.6 recommendation for variant specialisation on CUDA ({ctx.backend})",
        slug=f"recommendation-{ctx.backend}",
        claim=(f"AC-2.6 rule (stitch if overhead < {STITCH_BUDGET_PCT:.0f} %, function constants if compile < "
               f"{CONSTANTS_BUDGET_MS:.0f} ms/variant, else pre-compile): {verdict}. The {n}-variant archive builds in "
               f"{m['build_wall_ms'] / 1e3:.1f} s on {int(m['jobs_count'])} threads, so building it in CI/at install "
               f"is cheap; the run-time dispatch side of the rule is measured by proto2."),
        evidence={"single_compile_ms": one, "budget_ms": CONSTANTS_BUDGET_MS, "load_median_ms": load,
                  "build_wall_ms": m["build_wall_ms"]},
        config={"kernel": KERNEL, "rule": "AC-2.6"}, cv=max(single["timing"]["cv"], arch_rec["timing"]["cv"]),
        records=[single, largest, arch_rec]))
    return findings


# The metrics printed per phase (every metric is in records.jsonl).
SUMMARY_METRICS = {
    "cold_compile": ("per_variant_median_ms", "per_variant_p90_ms", "batch_wall_ms", "wall_per_variant_ms"),
    "split": ("ptx_median_ms", "cubin_median_ms", "ptxas_median_ms", "frontend_median_ms", "ptxas_share_pct"),
    "pch": ("pch_create_ms", "pch_use_median_ms", "no_pch_median_ms", "pch_speedup_x"),
    "multi_entry": ("multi_entry_median_ms", "four_singles_median_ms", "multi_over_singles_ratio"),
    "archive": ("build_wall_ms", "compile_median_ms", "load_median_ms", "load_speedup_x", "total_speedup_x",
                "kernel_load_median_ms"),
    "first_launch": ("first_launch_median_ms",),
}


def _summary_row(r: dict) -> dict[str, Any]:
    cfg, met = r["config"], r["metrics"]
    what = cfg.get("variants", cfg.get("head_dim", cfg.get("origin", "")))
    return {"phase": cfg["phase"], "what": what,
            "metrics": ", ".join(f"{k}={met[k]:.4g}" for k in SUMMARY_METRICS[cfg["phase"]] if k in met)}


# ====================================================================== Metal (Issue 6)
# The Prototype 1 Metal kernel, specialised by MTLFunctionConstantValues. The specs (archive
# matrix, cold sequence, first-dispatch specs) come from attnproto.metal_specs, so the static
# checks (tools/metal_check) compile every one of them.
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
# A first build less than this many times slower than a rebuild of the same spec is reported
# as possibly served by the OS shader cache (a real compile is an order of magnitude slower).
CACHE_SUSPECT_RATIO = 2.0
# Where the Metal backend looks for a prebuilt library (kMetallibName in csrc/metal/metal_backend.mm),
# and the variable that makes it compile the .metal sources instead (kFromSourceEnv).
METALLIB_RELPATH = "metal/attnproto.metallib"
METAL_FROM_SOURCE_ENV = "ATTNPROTO_METAL_FROM_SOURCE"
# The 72-variant CUDA matrix (seed FR-5) that the Metal matrix stands in for.
CUDA_MATRIX_VARIANTS = 72
MIB = 2**20


def _metal_host():
    """(Metal GpuBackend, native module): a function so the harness test can substitute a fake."""
    from .. import backend as backend_mod  # noqa: PLC0415

    return backend_mod.get("metal"), backend_mod.native()


def _library_source() -> str:
    """How the backend gets its MTLLibrary: a prebuilt metallib or a compile of the sources."""
    from ..backend import shader_dir  # noqa: PLC0415

    if os.environ.get(METAL_FROM_SOURCE_ENV) == "1" or not (shader_dir() / METALLIB_RELPATH).is_file():
        return "source"
    return "metallib"


def _obtain(be, spec, mode: str, expect: str, phase: str):
    """(kernel, wall ms of the request) for a MetalSpec, checking the kernel's origin."""
    t0 = time.perf_counter()
    try:
        kern = be.kernel(spec.name, mode=mode, **spec.as_dict())
    except RuntimeError as exc:
        if expect == "archive":
            raise ExperimentError(f"{phase}: {spec} is not in the binary archive (archive_only load "
                                  f"missed): {str(exc).splitlines()[0]}") from exc
        raise ExperimentError(f"{phase}: building {spec} (mode {mode}) failed: {exc}") from exc
    wall = (time.perf_counter() - t0) * 1e3
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
    t0 = time.perf_counter()
    for name, constants in specs:
        kern, _ = _obtain(be, metal_specs.MetalSpec.make(name, **constants), "archive_only", "archive",
                          "archive load in a fresh process")
        load.append(float(kern.compile_ms))
        library = max(library, float(kern.load_ms))
    return {"load_ms": load, "library_load_ms": library, "total_ms": (time.perf_counter() - t0) * 1e3}


_METAL_LOADER = r"""
import json, sys
from attnproto.backend import get
from attnproto.experiments.proto4 import metal_archive_load
print(json.dumps(metal_archive_load(get("metal"), json.loads(sys.stdin.read()))))
"""


def _fresh_process_load_metal(specs: list[tuple[str, dict[str, int]]], cache_dir: str) -> dict[str, Any]:
    """metal_archive_load in a new Python process whose archive is `cache_dir`."""
    from ..backend import shader_dir  # noqa: PLC0415

    env = {**os.environ, "ATTNPROTO_CACHE_DIR": cache_dir, "ATTNPROTO_SHADER_DIR": str(shader_dir())}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _METAL_LOADER], input=json.dumps(specs), env=env,
                         capture_output=True, text=True, timeout=LOAD_TIMEOUT_S, check=False)
    wall = (time.perf_counter() - t0) * 1e3
    if res.returncode != 0:
        raise ExperimentError(f"archive-only load of {len(specs)} specs in a fresh process failed:\n"
                              f"{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_ms"] = wall
    return out


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
    single_ms, single_wall = [], []
    for spec in singles:
        kern, wall = _obtain(be, spec, "cold", "compiled", phase)
        single_ms.append(float(kern.compile_ms))
        single_wall.append(wall)
    seq_ms, seq_wall = [], []
    for spec in ctx.progress(sequence, desc="proto4 metal cold builds"):
        kern, wall = _obtain(be, spec, "cold", "compiled", phase)
        seq_ms.append(float(kern.compile_ms))
        seq_wall.append(wall)
    candidates = len(metal_specs.proto4_candidates())
    records = []
    for n in counts:
        per, walls = (single_ms, single_wall) if n == 1 else (seq_ms[:n], seq_wall[:n])
        how = (f"{len(singles)} specs, each built alone" if n == 1
               else f"the first {n} of one sequence of {len(sequence)} distinct specs")
        metrics = {**_summary(per), "build_sum_ms": float(sum(per)), "wall_sum_ms": float(sum(walls)),
                   "host_overhead_median_ms": float(np.median(np.subtract(walls, per))),
                   "variants_count": float(n), "candidates_count": float(candidates)}
        records.append(ctx.record({"phase": "metal_cold_build", "kernel": METAL_KERNEL, "variants": n,
                                   "mode": "cold", "specs": how, "library": _library_source()},
                                  metrics, timing_from_samples(per)))
    repeats = METAL_QUICK_REBUILD_REPEATS if ctx.quick else METAL_REBUILD_REPEATS
    again = [float(_obtain(be, singles[0], "cold", "compiled", phase)[0].compile_ms) for _ in range(repeats)]
    records.append(ctx.record(
        {"phase": "metal_rebuild", "kernel": METAL_KERNEL, "spec": singles[0].canonical(), "mode": "cold"},
        {"first_build_ms": single_ms[0], "rebuild_median_ms": float(np.median(again)),
         "first_over_rebuild_ratio": single_ms[0] / float(np.median(again))},
        timing_from_samples(again)))
    return records


def _braced(values) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


def _metal_archive(ctx: ExperimentContext, be, nat, cold_median_ms: float) -> list[dict]:
    """Build the matrix into a temporary binary archive, then load it archive-only in a fresh process."""
    specs = metal_specs.proto4_matrix_specs(ctx.quick)
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-mtlarchive-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            build_ms = []
            t0 = time.perf_counter()
            for spec in ctx.progress(specs, desc="proto4 metal archive build"):
                kern, _ = _obtain(be, spec, "default", "compiled", "archive build")
                build_ms.append(float(kern.compile_ms))
            build_wall = (time.perf_counter() - t0) * 1e3
        finally:
            nat.set_cache_dir(previous)
        archive_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        if archive_bytes == 0:
            raise ExperimentError(f"archive build: nothing was written under {tmp}")
        loaded = _fresh_process_load_metal(_spec_list(specs), tmp)
    n = len(specs)
    legal_of = len(metal_specs.SWEEP_HEAD_DIM) * len(metal_specs.SWEEP_BLOCK_R) * len(metal_specs.SWEEP_BLOCK_C)
    matrix = ("quick: " + "x".join(map(str, metal_specs.PROTO4_QUICK_TILE)) + " x (CAUSAL x DTYPE)" if ctx.quick else
              f"HEAD_DIM{_braced(metal_specs.SWEEP_HEAD_DIM)} x BLOCK_R{_braced(metal_specs.SWEEP_BLOCK_R)} x "
              f"BLOCK_C{_braced(metal_specs.SWEEP_BLOCK_C)} x (CAUSAL x DTYPE), the {len(metal_specs.sweep_tiles())} of "
              f"{legal_of} tiles within {metal_specs.THREADGROUP_MEMORY_LIMIT} bytes of threadgroup memory")
    base = {"kernel": METAL_KERNEL, "variants": n, "matrix": matrix, "library": _library_source()}
    quarter = max(1, n // 4)
    build_median = float(np.median(build_ms))
    build = ctx.record({**base, "phase": "metal_archive_build", "mode": "default"}, {
        "build_wall_ms": build_wall, "build_sum_ms": float(sum(build_ms)), "build_median_ms": build_median,
        "build_first_quarter_median_ms": float(np.median(build_ms[:quarter])),
        "build_last_quarter_median_ms": float(np.median(build_ms[-quarter:])),
        "store_overhead_median_ms": build_median - cold_median_ms,
        "archive_bytes": float(archive_bytes), "variants_count": float(n)}, timing_from_samples(build_ms))
    load_ms = loaded["load_ms"]
    load_median = float(np.median(load_ms))
    load = ctx.record({**base, "phase": "metal_archive_load", "mode": "archive_only", "process": "fresh"}, {
        "load_median_ms": load_median, "load_first_ms": float(load_ms[0]), "load_total_ms": loaded["total_ms"],
        "library_load_ms": loaded["library_load_ms"], "process_wall_ms": loaded["process_wall_ms"],
        "cold_build_median_ms": cold_median_ms, "load_speedup_x": cold_median_ms / load_median,
        "total_speedup_x": float(sum(build_ms)) / loaded["total_ms"], "variants_count": float(n)},
        timing_from_samples(load_ms))
    return [build, load]


def _metal_dispatch_args(ctx: ExperimentContext, be, spec):
    """(grid, block, threadgroup bytes, args, (O buffer, O shape)) of one small dispatch of `spec`."""
    from ..ops import metal_flash  # noqa: PLC0415

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


def _metal_first_dispatch(ctx: ExperimentContext, be, nat) -> list[dict]:
    """Kernel request + first dispatch + wait: cold (never built), from the archive, from memory."""
    from ..ops import metal_flash  # noqa: PLC0415

    specs = metal_specs.proto4_launch_specs()
    total: dict[str, list[float]] = {"cold": [], "archive": [], "memory": []}
    kernel_ms: dict[str, list[float]] = {o: [] for o in total}
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-mtldispatch-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            for spec in specs:
                grid, block, shared, args, (o_buf, o_shape) = _metal_dispatch_args(ctx, be, spec)
                steps = (("cold", "cold", "compiled"), ("store", "default", "compiled"),
                         ("archive", "archive_only", "archive"), ("memory", "default", "memory"))
                for origin, mode, expect in steps:
                    if origin == "archive":
                        be.clear_memory_cache()
                    t0 = time.perf_counter()
                    kern, _ = _obtain(be, spec, mode, expect, f"first dispatch ({origin})")
                    be.launch(kern, grid, block, args, shared_bytes=shared)
                    be.synchronize()
                    ms = (time.perf_counter() - t0) * 1e3
                    if origin in total:  # "store" only writes the archive the next step reads
                        total[origin].append(ms)
                        kernel_ms[origin].append(float(kern.compile_ms))
                out = metal_flash.decode_elements(be.to_numpy(o_buf, np.uint16, o_shape), metal_specs.PROTO4_LAUNCH_DTYPE)
                if np.isnan(np.asarray(out, dtype=np.float32)).any():
                    raise ExperimentError(f"first dispatch: {spec} left output elements unwritten (NaN poison)")
        finally:
            nat.set_cache_dir(previous)
    records = []
    for origin, samples in total.items():
        records.append(ctx.record(
            {"phase": "metal_first_dispatch", "origin": origin, "kernel": METAL_KERNEL,
             "specs": [s.canonical() for s in specs], "tokens": METAL_LAUNCH_TOKENS},
            {"first_dispatch_median_ms": float(np.median(samples)), "kernel_median_ms": float(np.median(kernel_ms[origin])),
             "dispatch_median_ms": float(np.median(np.subtract(samples, kernel_ms[origin])))},
            timing_from_samples(samples)))
    return records


def _metal_findings(ctx: ExperimentContext, records: list[dict]) -> list:
    findings = []
    where = f"{ctx.backend} ({ctx.device_name})"
    cold = _by_phase(records, "metal_cold_build")
    rebuild = _by_phase(records, "metal_rebuild")[0]
    build = _by_phase(records, "metal_archive_build")[0]
    load = _by_phase(records, "metal_archive_load")[0]
    launch = {r["config"]["origin"]: r for r in _by_phase(records, "metal_first_dispatch")}
    largest = max(cold, key=lambda r: r["config"]["variants"])
    single = next(r for r in cold if r["config"]["variants"] == 1)
    med = largest["metrics"]["per_variant_median_ms"]
    one = single["metrics"]["per_variant_median_ms"]
    counts = [r["config"]["variants"] for r in cold]
    requested = METAL_QUICK_VARIANT_COUNTS if ctx.quick else METAL_VARIANT_COUNTS
    candidates = int(largest["metrics"]["candidates_count"])
    ratio = rebuild["metrics"]["first_over_rebuild_ratio"]
    cache_note = (f"a rebuild of an already-built spec took {rebuild['metrics']['rebuild_median_ms']:.1f} ms vs "
                  f"{rebuild['metrics']['first_build_ms']:.1f} ms for its first build ({ratio:.1f}x)"
                  + (f": under {CACHE_SUSPECT_RATIO:.0f}x, so these 'cold' builds may have been served by the OS "
                     "Metal shader cache (e.g. from an earlier run on this Mac)" if ratio < CACHE_SUSPECT_RATIO
                     else ": a repeat is served by a cache below attnproto, a first build is not"))
    lib = largest["config"]["library"]
    m_load, m_build = load["metrics"], build["metrics"]
    n = int(m_build["variants_count"])

    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Cold pipeline-build cost per flash_attention variant on {ctx.backend}",
        slug=f"cold-build-per-variant-{ctx.backend}",
        claim=("Cold Metal builds of flash_attention (MTLFunctionConstantValues -> specialised MTLFunction -> "
               "MTLComputePipelineState; attnproto's memory cache and binary archive bypassed; library from "
               f"{lib}) on {where}: " + "; ".join(
                   f"N={r['config']['variants']}: {r['metrics']['per_variant_median_ms']:.1f} ms per variant "
                   f"(p10 {r['metrics']['per_variant_p10_ms']:.1f}, p90 {r['metrics']['per_variant_p90_ms']:.1f}, "
                   f"max {r['metrics']['per_variant_max_ms']:.1f}), {r['metrics']['build_sum_ms'] / 1e3:.2f} s in all"
                   for r in cold)
               + f". The host builds one pipeline at a time, so N>1 is the first N builds of one sequence of "
                 f"{max(counts)} distinct specs (N=1: {metal_specs.PROTO4_SINGLE_BUILDS} specs, each built alone), "
                 f"drawn from the {candidates} legal CAUSAL x ROPE x ALIBI x GQA_GROUP x DTYPE x tile combinations "
                 f"outside the archive matrix; all requested counts {list(requested)} were measured. "
                 f"{cache_note[0].upper()}{cache_note[1:]}."),
        evidence={"per_variant_median_ms": med, "per_variant_p90_ms": largest["metrics"]["per_variant_p90_ms"],
                  "single_build_ms": one, "first_over_rebuild_ratio": ratio},
        config={"kernel": METAL_KERNEL, "variant_counts": counts, "library": lib},
        cv=largest["timing"]["cv"], records=cold + [rebuild]))

    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"Binary archive of the {n}-variant matrix: build and fresh-process load on {ctx.backend}",
        slug=f"archive-{n}-variants-{ctx.backend}",
        claim=(f"The Metal matrix is {n} variants ({build['config']['matrix']}), not {CUDA_MATRIX_VARIANTS}. "
               f"Building it into an MTLBinaryArchive took {m_build['build_wall_ms'] / 1e3:.2f} s (median "
               f"{m_build['build_median_ms']:.1f} ms per variant including adding it to the archive and writing "
               f"the archive file, {m_build['store_overhead_median_ms']:.1f} ms above a cold build; first quarter "
               f"{m_build['build_first_quarter_median_ms']:.1f} ms, last quarter "
               f"{m_build['build_last_quarter_median_ms']:.1f} ms; {m_build['archive_bytes'] / MIB:.1f} MiB). "
               f"A fresh process loaded all {n} archive-only in {m_load['load_total_ms']:.1f} ms (median "
               f"{m_load['load_median_ms']:.2f} ms each, the first, which opens the archive, "
               f"{m_load['load_first_ms']:.1f} ms) after loading the library ({lib}) in "
               f"{m_load['library_load_ms']:.1f} ms: {m_load['load_speedup_x']:.0f}x faster per variant than a cold "
               f"build ({m_load['cold_build_median_ms']:.1f} ms), {m_load['total_speedup_x']:.0f}x over the set vs "
               f"building the archive; the whole process including Python start and import took "
               f"{m_load['process_wall_ms'] / 1e3:.2f} s."),
        evidence={"build_wall_ms": m_build["build_wall_ms"], "load_median_ms": m_load["load_median_ms"],
                  "load_speedup_x": m_load["load_speedup_x"], "total_speedup_x": m_load["total_speedup_x"],
                  "library_load_ms": m_load["library_load_ms"]},
        config={"kernel": METAL_KERNEL, "variants": n, "library": lib},
        cv=max(build["timing"]["cv"], load["timing"]["cv"]), records=[build, load]))

    lm = {o: launch[o]["metrics"] for o in launch}
    findings.append(ctx.finding(
        prototype=PROTOTYPE, title="First-dispatch latency of a flash_attention variant on Metal: cold, archive, memory",
        slug=f"first-dispatch-latency-{ctx.backend}",
        claim=(f"From the kernel request to the end of its first dispatch (B=1, N={METAL_LAUNCH_TOKENS}, "
               f"median of {len(launch['cold']['config']['specs'])} never-built specs) on {where}: " + "; ".join(
                   f"{o} {lm[o]['first_dispatch_median_ms']:.2f} ms ({lm[o]['kernel_median_ms']:.2f} ms obtaining "
                   f"the pipeline, {lm[o]['dispatch_median_ms']:.2f} ms dispatch, wait and host overhead)"
                   for o in ("cold", "archive", "memory"))
               + ". 'archive' reloads from the binary archive this process wrote (memory cache cleared)."),
        evidence={f"{o}_first_dispatch_ms": lm[o]["first_dispatch_median_ms"] for o in lm},
        config={"kernel": METAL_KERNEL, "tokens": METAL_LAUNCH_TOKENS},
        cv=max(r["timing"]["cv"] for r in launch.values()), records=list(launch.values())))

    library_ms = m_load["library_load_ms"]
    builds_ms, loads_ms = n * med, m_load["load_total_ms"]
    build_share = 100.0 * builds_ms / (library_ms + builds_ms)
    load_share = 100.0 * loads_ms / (library_ms + loads_ms)

    def larger(a: str, a_ms: float, b: str, b_ms: float) -> str:
        return a if a_ms >= b_ms else b

    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"What a Metal specialisation spends its time on ({ctx.backend})",
        slug=f"build-phases-{ctx.backend}",
        claim=(f"Library load ({lib}) in a fresh process: {library_ms:.1f} ms, once. Per variant: cold "
               f"specialisation + pipeline build {med:.1f} ms (median over {largest['config']['variants']}), writing "
               f"it to the archive {m_build['store_overhead_median_ms']:.1f} ms more, loading it from the archive "
               f"{m_load['load_median_ms']:.2f} ms. Starting a process that needs the {n}-variant matrix: without "
               f"an archive, library {library_ms:.0f} ms + builds {builds_ms:.0f} ms (builds {build_share:.0f} %: "
               f"{larger('builds dominate', builds_ms, 'library load dominates', library_ms)}); with the archive, "
               f"library {library_ms:.0f} ms + loads {loads_ms:.0f} ms (loads {load_share:.0f} %: "
               f"{larger('archive loads dominate', loads_ms, 'library load dominates', library_ms)}). Function specialisation "
               "(newFunctionWithName:constantValues:) and pipeline creation (newComputePipelineStateWithDescriptor:) "
               "cannot be split: the host times them together as the kernel's compile_ms."),
        evidence={"library_load_ms": library_ms, "cold_build_median_ms": med, "build_share_pct": build_share,
                  "load_share_pct": load_share,
                  "store_overhead_median_ms": m_build["store_overhead_median_ms"],
                  "load_median_ms": m_load["load_median_ms"]},
        config={"kernel": METAL_KERNEL, "library": lib, "variants": n},
        cv=max(largest["timing"]["cv"], build["timing"]["cv"], load["timing"]["cv"]),
        records=[largest, build, load]))

    if one < CONSTANTS_BUDGET_MS:
        verdict = (f"specialise with function constants on demand: a cold build of one variant costs {one:.1f} ms "
                   f"< {CONSTANTS_BUDGET_MS:.0f} ms; the binary archive still cuts a first call's "
                   f"{one:.1f} ms to {m_load['load_median_ms']:.2f} ms")
    else:
        verdict = (f"ship the binary archive (build it at install or in CI) and load at start-up: a cold build of "
                   f"one variant costs {one:.1f} ms >= {CONSTANTS_BUDGET_MS:.0f} ms ({med:.1f} ms each over "
                   f"{largest['config']['variants']} variants), an archive load {m_load['load_median_ms']:.2f} ms "
                   f"({m_load['load_speedup_x']:.0f}x less); building on demand stalls the first call of each variant")
    findings.append(ctx.finding(
        prototype=PROTOTYPE, title=f"AC-2.6 recommendation for variant specialisation on Metal ({ctx.backend})",
        slug=f"recommendation-{ctx.backend}",
        claim=(f"AC-2.6 rule (stitch if overhead < {STITCH_BUDGET_PCT:.0f} %, function constants if a build < "
               f"{CONSTANTS_BUDGET_MS:.0f} ms/variant, else pre-compile): {verdict}. The {n}-variant archive builds "
               f"in {m_build['build_wall_ms'] / 1e3:.2f} s and a fresh process loads it in "
               f"{(library_ms + m_load['load_total_ms']) / 1e3:.2f} s including the library."
               + (f" Caveat: {cache_note}." if ratio < CACHE_SUSPECT_RATIO else "")),
        evidence={"single_build_ms": one, "budget_ms": CONSTANTS_BUDGET_MS, "load_median_ms": m_load["load_median_ms"],
                  "build_wall_ms": m_build["build_wall_ms"]},
        config={"kernel": METAL_KERNEL, "rule": "AC-2.6"},
        cv=max(single["timing"]["cv"], load["timing"]["cv"]), records=[single, largest, build, load]))
    return findings


METAL_SUMMARY_METRICS = {
    "metal_cold_build": ("per_variant_median_ms", "per_variant_p90_ms", "build_sum_ms"),
    "metal_rebuild": ("first_build_ms", "rebuild_median_ms", "first_over_rebuild_ratio"),
    "metal_archive_build": ("build_wall_ms", "build_median_ms", "store_overhead_median_ms", "archive_bytes"),
    "metal_archive_load": ("load_median_ms", "load_total_ms", "library_load_ms", "load_speedup_x", "total_speedup_x"),
    "metal_first_dispatch": ("first_dispatch_median_ms", "kernel_median_ms", "dispatch_median_ms"),
}


def _run_metal(ctx: ExperimentContext) -> ExperimentResult:
    be, nat = _metal_host()
    records = _metal_cold(ctx, be)
    cold_median = max(_by_phase(records, "metal_cold_build"),
                      key=lambda r: r["config"]["variants"])["metrics"]["per_variant_median_ms"]
    records += _metal_archive(ctx, be, nat, cold_median)
    records += _metal_first_dispatch(ctx, be, nat)
    summary = []
    for r in records:
        cfg, met = r["config"], r["metrics"]
        summary.append({"phase": cfg["phase"], "what": cfg.get("variants", cfg.get("origin", cfg.get("spec", ""))),
                        "metrics": ", ".join(f"{k}={met[k]:.4g}" for k in METAL_SUMMARY_METRICS[cfg["phase"]])})
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return ExperimentResult(records=records, findings=_metal_findings(ctx, records), summary=summary)


@experiment(name="proto4", prototype=PROTOTYPE, backends=("cpu", "cuda", "metal"),
            description="Specialisation cost: cold NVRTC compiles / Metal pipeline builds, kernel archive, "
                        "first launch, compile phases")
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: a cold NVRTC compile of the Prototype 1 kernel costs far more than the
    AC-2.6 budget of 50 ms per variant (ptxas and the front end both hundreds of ms), so
    variants must be pre-compiled; loading a cubin from the on-disk archive is two to three
    orders of magnitude cheaper than compiling it, and precompiled headers barely help
    because the kernels include only two small headers.

    Sweep: cold compiles of 1/10/50/100/500 distinct constant sets (quick: 1/10) on a thread
    pool of os.cpu_count() threads; PTX-only vs cubin (ptxas's own time from -v), automatic
    PCH, one TU with four entries vs four single-entry TUs, per head dim 64/128/256; the
    72-variant archive (HEAD_DIM x BLOCK_R x BLOCK_C x CAUSAL x DTYPE; quick: 4) built into
    a temporary cache and loaded in a fresh process; on cuda the first-launch latency of a
    variant cold, from the archive and from memory.

    Metal hypothesis (unmeasured: no Metal run exists yet): a cold build of one
    flash_attention specialisation (function constants -> MTLFunction ->
    MTLComputePipelineState) costs at least an order of magnitude more than loading the
    same pipeline from an MTLBinaryArchive, so the archive decides the first-call latency
    whichever side of the AC-2.6 50 ms budget a build falls; the library load is paid once
    per process and is small next to building the whole matrix.

    Metal sweep (specs from attnproto.metal_specs): cold builds of 1/10/50/100/500 distinct
    legal specialisations (quick: 1/10; N=1 is three specs each built alone, larger N the
    first N builds of one sequence) plus rebuilds of one spec (does the OS shader cache
    serve them?); the archive matrix HEAD_DIM x BLOCK_R x BLOCK_C x (CAUSAL x DTYPE), its
    84 legal variants (21 of the 27 tiles fit 32 KB) rather than 72 (quick: 4), built into a
    temporary archive and loaded archive-only in a fresh process; the first dispatch of
    three never-built specs cold, from the archive and from memory.
    """
    if ctx.backend == "metal":
        return _run_metal(ctx)
    if ctx.backend not in ("cpu", "cuda"):
        raise ExperimentError(f"proto4 has no {ctx.backend} path")
    gpu = ctx.backend == "cuda"
    nat, why = compiler_or_reason(need_nvjitlink=False)
    if nat is None:
        if gpu:
            raise ExperimentError(f"proto4 needs NVRTC: {why}")
        # Nothing here runs without NVRTC: say so instead of measuring nothing silently.
        return ExperimentResult(records=[], findings=[], summary=[{"not_measured": why}])
    arch = ctx.device.get("arch", ARCH_FALLBACK) if gpu else ARCH_FALLBACK
    records = _measure_cold(ctx, nat, arch)
    records += _measure_phases(ctx, nat, arch)
    records += _measure_archive(ctx, nat, arch, gpu)
    if gpu:
        records += _measure_first_launch(ctx, nat)
    summary = [_summary_row(r) for r in records]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return ExperimentResult(records=records, findings=_findings(ctx, records), summary=summary)
