"""Prototype 4's shared constants and helpers: the compiler probe (also used by proto2), the
one-shot wall clock, the per-variant summary of compile samples, and the fresh-process runner
that both archive loads (CUDA cubins, Metal binary archive) go through."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ... import lab
from ..registry import ExperimentError

PROTOTYPE = "proto4"
KERNEL = "flash_fwd_mma"
ARCH_FALLBACK = "sm_90a"                    # what the cpu backend compiles for (CI's arch)
DTYPE = "bfloat16"
PHASE_SEQ_LEN = 4096                        # the chooser's long-sequence tiles
LOAD_TIMEOUT_S = 300
MS_PER_S = 1e3
MIB = 2**20

# ---- first launch (cuda only) ----
LAUNCH_REPEATS = 3
LAUNCH_SHAPE = (1, 1, 128)                  # batch, heads, tokens: the launch itself is negligible
LAUNCH_HEAD_DIM = 128

# ---- AC-2.6 ----
CONSTANTS_BUDGET_MS = 50.0                  # use run-time function constants if a compile is cheaper
STITCH_BUDGET_PCT = 1.0                     # (proto2) use stitching if its overhead is below this

T = TypeVar("T")


def compiler_or_reason(need_nvjitlink: bool) -> tuple[Any, str]:
    """(native module, "") when NVRTC (and nvJitLink if asked) load, else (None, the reason)."""
    from ...backend import BackendUnavailable, native  # noqa: PLC0415

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


def wall_ms(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), its wall-clock ms): one measurement of a one-off event (a cold compile, a first
    launch, a whole batch). Repeated identical calls are timed with lab.time_host instead."""
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * MS_PER_S


def by_phase(records: Iterable[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    return [r for r in records if r["config"]["phase"] == phase]


def per_variant(samples_ms: Sequence[float]) -> tuple[dict[str, float], lab.TimingStats]:
    """Per-variant metrics of compile / build samples (one per variant) and their TimingStats.

    The samples are host-measured ms (NVRTC's and the Metal host's own compile clocks)."""
    stats = lab.timing(samples_ms, clock="host")
    return {"per_variant_median_ms": stats.median_ms, "per_variant_p10_ms": stats.p10_ms,
            "per_variant_p90_ms": stats.p90_ms, "per_variant_max_ms": max(stats.samples_ms)}, stats


def run_fresh_process(code: str, payload: Any, cache_dir: str, what: str) -> dict[str, Any]:
    """Run ``code`` in a new Python process whose archive is ``cache_dir``, ``payload`` as JSON on
    its stdin; its last stdout line is JSON. Adds ``process_wall_ms`` (start, import and work)."""
    from ...backend import shader_dir  # noqa: PLC0415

    env = {**os.environ, "ATTNPROTO_CACHE_DIR": cache_dir, "ATTNPROTO_SHADER_DIR": str(shader_dir())}
    res, wall = wall_ms(lambda: subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), env=env,
                                               capture_output=True, text=True, timeout=LOAD_TIMEOUT_S,
                                               check=False))
    if res.returncode != 0:
        raise ExperimentError(f"{what} in a fresh process failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_ms"] = wall
    return out
