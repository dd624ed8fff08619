"""The smallest end-to-end GPU check: a tiled FP32 matmul kernel compiled
through the kernel cache, launched, timed with device events and compared
with a float64 product on the host."""
from __future__ import annotations

import numpy as np

#: Tile edge of the smoke kernel; 16x16 = 256 threads, a legal block on every CUDA GPU.
SMOKE_TILE = 16
KERNEL = "smoke_matmul"


def specialisations() -> list[tuple[str, dict[str, int]]]:
    """The smoke kernel and the timing guard's spin kernel (used by every timed experiment)."""
    return [(KERNEL, {"TILE": SMOKE_TILE}), ("spin_wait", {})]


def run_matmul(backend, m: int, n: int, k: int, rng: np.random.Generator, *, iters: int = 50) -> dict:
    """C = A·B on `backend` (a GpuBackend); returns error vs float64, timing and kernel facts."""
    for name, v in (("m", m), ("n", n), ("k", k)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    kern = backend.kernel(KERNEL, TILE=SMOKE_TILE)
    da, db = backend.from_numpy(a), backend.from_numpy(b)
    dc = backend.alloc(m * n * 4)
    backend.fill(dc, 0xFF)  # poison: NaN everywhere until the kernel writes
    grid = ((n + SMOKE_TILE - 1) // SMOKE_TILE, (m + SMOKE_TILE - 1) // SMOKE_TILE)
    args = [da, db, dc, np.int32(m), np.int32(n), np.int32(k)]
    backend.launch(kern, grid, (SMOKE_TILE, SMOKE_TILE), args)
    backend.synchronize()
    c = backend.to_numpy(dc, np.float32, (m, n))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = np.abs(c.astype(np.float64) - ref)
    # Worst-case FP32 rounding bound of a length-k dot product: gamma_k |A||B|, gamma_k = ku/(1-ku).
    unit_roundoff = float(np.finfo(np.float32).eps) / 2
    gamma = k * unit_roundoff / (1 - k * unit_roundoff)
    bound = gamma * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    bound = np.maximum(bound, np.finfo(np.float64).tiny)
    stats = backend.time_launch(kern, grid, (SMOKE_TILE, SMOKE_TILE), args, iters=iters)
    flops = 2.0 * m * n * k
    return {
        "max_abs_err": float(np.nanmax(err)) if np.isfinite(c).all() else float("inf"),
        "rel_err": float(np.linalg.norm(c - ref) / np.linalg.norm(ref)),
        "bound_ratio": float(np.nanmax(err / bound)) if np.isfinite(c).all() else float("inf"),
        "all_written": bool(np.isfinite(c).all()),
        "timing": stats,
        "gflops": flops / (stats.median_ms * 1e-3) / 1e9,
        "kernel_origin": kern.origin,
        "compile_ms": kern.compile_ms,
        "resources": kern.resources,
    }
