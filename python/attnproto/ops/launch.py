"""A kernel launch prepared once and replayed: what benchmarks time.

Validation, parameter packing and TMA descriptor encoding happen in the
op's ``prepare_*`` function; :class:`PreparedLaunch` then only enqueues the
kernel, so device-event timing measures the kernel and not Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedLaunch:
    backend: Any                 # attnproto.backend.GpuBackend
    kernel: Any                  # native Kernel
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: list[Any]
    shared_bytes: int
    outputs: tuple[Any, ...] = field(default=())   # tensors the kernel writes (e.g. O, LSE)

    def launch(self) -> tuple[Any, ...]:
        self.backend.launch(self.kernel, self.grid, self.block, self.args, self.shared_bytes)
        return self.outputs

    def time(self, *, warmup: int = 4, iters: int = 50, flush_l2: bool = False):
        """Device-event TimingStats of the kernel alone."""
        return self.backend.time_launch(self.kernel, self.grid, self.block, self.args, self.shared_bytes,
                                        warmup=warmup, iters=iters, flush_l2=flush_l2)
