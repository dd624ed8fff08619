"""Family "metal": shaders/metal/flash_attention.metal (Apple GPU family 9, simdgroup_matrix).

Host code (tile legality within 32 KB of threadgroup memory, buffers, dispatch) lives in
:mod:`attnproto.ops.metal_flash` and :mod:`attnproto.metal_specs`. Statically checked on
Linux; it has not run on Apple hardware (the README says so).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ... import metal_specs as _ms
from .. import metal_flash as _mf
from ..problem import HOST, DeviceSpec, FlashProblem, HostLaunch, ProblemSpec, Rules
from .base import Family, Tile, as_tile

#: The metal family's config (a BLOCK_R x BLOCK_C tile).
MetalTile = Tile


class MetalFamily(Family):
    name = "metal"
    backend = "metal"
    label = "simdgroup_matrix flash attention (Metal, Apple GPU family 9)"
    kernel_name = _ms.FLASH_KERNEL
    rules = Rules(location=HOST, dtypes=tuple(_mf.METAL_DTYPES), head_dim_multiple=_ms.FRAG,
                  head_dim_range=(_ms.FRAG, _ms.MAX_HEAD_DIM))
    #: Head dims the contract tests and the sanitizer exercise (an odd one where the family takes it).
    test_head_dims = (64, 72, 128)
    config_keys = ("block_r", "block_c")

    def sweep_space(self, head_dim: int, causal: bool, dtype: str, device: DeviceSpec) -> List[Any]:
        return [MetalTile(r, c) for r, c in _ms.flash_tiles(head_dim, dtype)]

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        r, c = _ms.choose_flash_tile(spec.head_dim, spec.dtype, spec.seq_q)
        return MetalTile(r, c), ("default tiles, an unmeasured rule: the largest "
                                 "legal BLOCK_R covering the query rows, then the largest BLOCK_C")

    def config_for(self, spec: ProblemSpec, values: Dict[str, Any], device: DeviceSpec) -> Any:
        return self.coerce_config(MetalTile(int(values["block_r"]), int(values["block_c"])), spec, device)

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        config = as_tile(config, self.name)
        if not _ms.flash_tile_legal(spec.head_dim, config.block_r, config.block_c, spec.dtype):
            raise ValueError(f"config: tile {config.block_r}x{config.block_c} is illegal at D={spec.head_dim} "
                             f"({spec.dtype}): over {_ms.THREADGROUP_MEMORY_LIMIT} bytes of threadgroup memory "
                             f"or off the {_ms.FRAG}-row grid")
        return config

    def config_label(self, config: Any) -> str:
        return f"metal {config.block_r}x{config.block_c}"

    def specialisations(self) -> List[Any]:
        return []  # Metal specialisations are listed by attnproto.metal_specs (the static checks)

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> HostLaunch:
        launch = _mf.prepare_flash_forward(problem.q, problem.k, problem.v, causal=problem.causal,
                                           scale=problem.scale, block_r=config.block_r, block_c=config.block_c,
                                           backend=backend)
        return HostLaunch(run=lambda: launch.launch().result(), problem=problem, config=config, family=self.name,
                          time_fn=lambda warmup, iters: launch.time(warmup=warmup, iters=iters),
                          shared_bytes=int(launch.shared_bytes), resources={"threads": int(launch.block[0])})

    def run_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                 config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
        conv = [_mf.decode_elements(_mf.encode_elements(x, n, dtype), dtype) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
        o, lse = _mf.prepare_flash_forward(*conv, causal=causal, block_r=config.block_r, block_c=config.block_c,
                                           backend=backend).launch().result()
        return np.asarray(o, dtype=np.float32), np.asarray(lse, dtype=np.float32)


FAMILY = MetalFamily()
