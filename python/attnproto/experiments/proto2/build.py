"""Prototype 2 on cpu and cuda: NVRTC / nvJitLink build cost and ptxas's resource report per mode."""
from __future__ import annotations

from typing import Any

import numpy as np

from ... import lab
from ...ops import stitch
from ..registry import ExperimentContext
from .common import BUILD_REPEATS, DTYPE


def build_configs(shapes) -> list[tuple[Any, stitch.StitchConfig]]:
    """(problem, StitchConfig of mode 0) per distinct tile of the problems."""
    out, seen = [], set()
    for problem in shapes:
        cfg = stitch.bench_config(*problem, 0, dtype=DTYPE).check()
        if cfg.tile not in seen:
            seen.add(cfg.tile)
            out.append((problem, cfg))
    return out


def measure_builds(ctx: ExperimentContext, arch: str, shapes) -> list[dict]:
    """One record per (distinct tile, mode): build and link ms of BUILD_REPEATS fresh builds."""
    records = []
    for _, base in ctx.progress(list(build_configs(shapes)), desc="proto2 builds"):
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
                                      metrics, lab.timing([x.build_ms for x in builds], clock="host")))
    return records
