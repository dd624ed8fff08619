"""Resident blocks per SM: the limits the CUDA occupancy calculator applies (sm_80 / sm_90).

One function for every place that needs the number before or after a compile: the
fused linear-attention chooser (registers assumed at the __launch_bounds__ maximum) and
Prototype 2's serial-path call count (registers from the compiled kernel).
"""
from __future__ import annotations

import math

__all__ = [
    "MAX_WARPS_PER_SM",
    "MAX_BLOCKS_PER_SM",
    "REGISTERS_PER_SM",
    "REG_ALLOC_UNIT",
    "SMEM_PER_SM",
    "SMEM_RESERVED_PER_BLOCK",
    "WARP_SIZE",
    "resident_blocks_per_sm",
]

WARP_SIZE = 32
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 65536
REG_ALLOC_UNIT = 256            # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024        # Hopper (H100 / H200): 228 KB of shared memory per SM
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per block


def resident_blocks_per_sm(threads: int, registers: int, smem_bytes: int, smem_per_sm: int = SMEM_PER_SM) -> int:
    """Blocks of `threads` threads, `registers` registers per thread and `smem_bytes` of shared
    memory (static + dynamic) one SM holds at once; at least 1 (a launchable block runs)."""
    warps = -(-int(threads) // WARP_SIZE)
    regs_per_warp = math.ceil(max(int(registers), 1) * WARP_SIZE / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
    by_smem = int(smem_per_sm) // (int(smem_bytes) + SMEM_RESERVED_PER_BLOCK)
    return max(1, min(by_regs, by_smem, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps))
