"""Tiles of the DSL flash kernels (Prototype 5's Triton and Helion families), without importing
either DSL: what the registry, the records and CI list on any machine.

A tile is BLOCK_M query rows x BLOCK_N keys per step, with ``warps`` warps and ``stages``
pipeline stages (the knobs ``triton.autotune`` and Helion configs take).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from .configs import SMEM_LIMIT_SM90

ELEMENT_BYTES = 2          # float16 / bfloat16
#: The autotune space: the usual Hopper grid of a Triton flash kernel (64/128-row query blocks,
#: 64/128-key blocks, one or two warpgroups, 2-4 stages).
BLOCK_MS: Tuple[int, ...] = (64, 128)
BLOCK_NS: Tuple[int, ...] = (64, 128)
WARPS: Tuple[int, ...] = (4, 8)
STAGES: Tuple[int, ...] = (2, 3, 4)


@dataclass(frozen=True)
class TritonConfig:
    """One tile of the DSL kernels."""

    block_m: int
    block_n: int
    warps: int
    stages: int


def shared_bytes_estimate(cfg: TritonConfig, head_dim: int) -> int:
    """Shared memory the pipelined loop holds: ``stages`` K and V tiles plus the Q tile.

    An estimate for pruning (the compiler decides the final layout; the compiled kernel's
    own figure is in its metadata)."""
    kv = 2 * cfg.stages * cfg.block_n * head_dim * ELEMENT_BYTES
    return kv + cfg.block_m * head_dim * ELEMENT_BYTES


def configs(head_dim: int, smem_limit: int = SMEM_LIMIT_SM90) -> List[TritonConfig]:
    """The autotune space for ``head_dim``: every combination whose shared memory fits."""
    out = [TritonConfig(m, n, w, s) for m in BLOCK_MS for n in BLOCK_NS for w in WARPS for s in STAGES]
    return [c for c in out if shared_bytes_estimate(c, head_dim) <= smem_limit]


def default_config(head_dim: int) -> TritonConfig:
    """The fixed tile of a call without autotuning: 128-row query blocks over 8 warps (two
    warpgroups of wgmma M = 64), 64-key blocks, 3 stages (fits D = 128's pipeline)."""
    del head_dim  # the same tile fits both head dims
    return TritonConfig(block_m=128, block_n=64, warps=8, stages=3)
