"""Timing of prepared Metal dispatches with the timer recorded (seed AC-8.4).

The Metal backend samples MTLCounterSampleBuffer timestamps at the start and end of each timed
compute pass where the device supports stage-boundary sampling, and always records the command
buffers' GPUStartTime/GPUEndTime. :func:`timed` prefers the stage-boundary samples when there is
one per iteration and says which timer the returned TimingStats came from.
"""
from __future__ import annotations

from typing import Any

from . import lab

TIMER_COUNTERS = "MTLCounterSampleBuffer stage-boundary timestamps"
TIMER_COMMAND_BUFFER = "command-buffer GPUStartTime/GPUEndTime"


def stage_samples() -> list[float]:
    """Stage-boundary samples (ms) of the last Metal timing; [] where the build or device has none."""
    from . import backend as backend_mod  # noqa: PLC0415

    fn = getattr(backend_mod.native(), "metal_stage_samples_ms", None)
    return list(fn()) if fn is not None else []


def timed(launch: Any, warmup: int, iters: int) -> tuple[Any, str]:
    """(TimingStats, timer) of ``launch.time(warmup, iters)``: both timers come from the same passes."""
    stats = launch.time(warmup=warmup, iters=iters)
    stage = stage_samples()
    if len(stage) == iters and min(stage) > 0:
        return lab.timing(stage), TIMER_COUNTERS
    return stats, TIMER_COMMAND_BUFFER
