"""Prototype 4 on cuda only: first-launch latency of a flash_fwd_mma variant — compiled cold,
loaded from the archive, and served from memory."""
from __future__ import annotations

import os
import tempfile

from ... import lab
from ..registry import ExperimentContext, ExperimentError
from .common import DTYPE, KERNEL, LAUNCH_HEAD_DIM, LAUNCH_REPEATS, LAUNCH_SHAPE, wall_ms
from .variants import SALT

# A salt never compiled before: the first-launch variants' keys are new to every cache.
LAUNCH_SALT_BASE = 1_000_000
# (origin, kernel request mode, origin the backend must report)
LAUNCH_STEPS = (("cold", "default", "compiled"), ("archive", "archive_only", "archive"),
                ("memory", "default", "memory"))


def compute_cache_disabled() -> bool:
    """CUDA_CACHE_DISABLE=1: NVRTC on the H100 machine otherwise serves a compile of PTX it has
    seen before from the on-disk compute cache (~/.nv/ComputeCache; 22 ms instead of ~650 ms,
    tools/nvrtc_cache_probe.py). tools/device_run.sh sets it for this experiment."""
    return os.environ.get("CUDA_CACHE_DISABLE") == "1"


def measure_first_launch(ctx: ExperimentContext, nat) -> list[dict]:
    """Time from the kernel request to the end of its first launch: cold, archive, memory."""
    import torch  # noqa: PLC0415

    from ... import backend as backend_mod  # noqa: PLC0415
    from ...ops import configs, flash, variants  # noqa: PLC0415

    be = backend_mod.get("cuda")
    b, h, n = LAUNCH_SHAPE
    q, k, v = (torch.randn(b, h, n, LAUNCH_HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = configs.choose_config(LAUNCH_HEAD_DIM, n, False, DTYPE)
    problem = flash.check_flash_inputs(q, k, v)
    args = [flash.flash_params(problem), q, k, v, problem.out, problem.lse, *variants.buffer_args(problem.values)]
    grid, block, smem = cfg.grid(b, h, n), (cfg.threads, 1, 1), cfg.smem_bytes()

    def first_launch(consts: dict[str, int], mode: str):
        kern = be.kernel(KERNEL, mode=mode, **consts)
        be.launch(kern, grid, block, args, shared_bytes=smem)
        be.synchronize()
        return kern

    samples: dict[str, list[float]] = {origin: [] for origin, _, _ in LAUNCH_STEPS}
    previous = nat.cache_dir()
    with tempfile.TemporaryDirectory(prefix="attnproto-launch-") as tmp:
        nat.set_cache_dir(tmp)
        try:
            for rep in ctx.progress(range(LAUNCH_REPEATS), desc="proto4 first launch"):
                consts = {**cfg.constants(), SALT: LAUNCH_SALT_BASE + rep}  # a key never compiled before
                torch.cuda.synchronize()
                for origin, mode, expect in LAUNCH_STEPS:
                    if origin == "archive":
                        be.clear_memory_cache()
                    kern, ms = wall_ms(lambda consts=consts, mode=mode: first_launch(consts, mode))
                    samples[origin].append(ms)
                    if kern.origin != expect:
                        raise ExperimentError(f"first launch '{origin}' got a kernel of origin {kern.origin}")
        finally:
            nat.set_cache_dir(previous)
    records = []
    for origin, s in samples.items():
        stats = lab.timing(s, clock="host")
        records.append(ctx.record({"phase": "first_launch", "origin": origin, "kernel": KERNEL, "tiles": cfg.label(),
                                   "shape": list(LAUNCH_SHAPE), "compute_cache_disabled": compute_cache_disabled()},
                                  {"first_launch_median_ms": stats.median_ms}, stats))
    return records
