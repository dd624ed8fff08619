"""Family "cpu": the FlashAttention-2 algorithm in numpy (:func:`attnproto.cpu.flash_forward`),
float32 arithmetic, tiled block_r x block_c exactly as the GPU kernels tile."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ... import cpu as _cpu
from .. import variants as _variants
from ..problem import HOST, DeviceSpec, FlashProblem, HostLaunch, ProblemSpec, Rules
from .base import Family, Tile, as_tile

#: Tiles the Prototype 1 CPU sweep measures: the seeds' Br/Bc sets.
SWEEP_TILES = ((32, 64), (64, 64), (64, 128))
#: Default tile: numpy's per-call overhead falls with larger tiles; 64 x 128 keeps the
#: per-tile score matrix (64 x 128 float32 = 32 KiB) in a core's L1/L2.
DEFAULT_TILE = (64, 128)

#: The cpu family's config (a BLOCK_R x BLOCK_C tile).
CpuTile = Tile


class CpuFamily(Family):
    name = "cpu"
    backend = "cpu"
    label = "FlashAttention-2 in numpy (float32)"
    kernel_name = "cpu_tiled"
    rules = Rules(location=HOST, dtypes=tuple(_cpu.CPU_DTYPES))
    #: Head dims the contract tests and the sanitizer exercise (an odd one where the family takes it).
    test_head_dims = (32, 64, 80)
    config_keys = ("block_r", "block_c")
    #: Every Prototype 7 variant (the numpy loop applies them as the GPU kernels do).
    variant_features = frozenset(_variants.FEATURES)

    def sweep_space(self, head_dim: int, causal: bool, dtype: str, device: DeviceSpec) -> List[Any]:
        return [CpuTile(r, c) for r, c in SWEEP_TILES]

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        return CpuTile(*DEFAULT_TILE), f"default tile {DEFAULT_TILE[0]}x{DEFAULT_TILE[1]}"

    def config_for(self, spec: ProblemSpec, values: Dict[str, Any], device: DeviceSpec) -> Any:
        return self.coerce_config(CpuTile(int(values["block_r"]), int(values["block_c"])), spec, device)

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        return as_tile(config, self.name)

    def config_label(self, config: Any) -> str:
        return f"cpu {config.block_r}x{config.block_c}"

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> HostLaunch:
        def run():
            return _cpu.flash_forward(problem.q, problem.k, problem.v, block_r=config.block_r,
                                      block_c=config.block_c, causal=problem.causal, scale=problem.scale,
                                      **problem.values.host_kwargs(problem.variant))
        return HostLaunch(run=run, problem=problem, config=config, family=self.name)

    def run_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                 config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
        return _cpu.flash_forward(q, k, v, block_r=config.block_r, block_c=config.block_c, causal=causal)


FAMILY = CpuFamily()
