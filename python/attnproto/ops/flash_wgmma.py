"""Host side of the Hopper (sm_90a) wgmma + TMA flash-attention forward kernel
(shaders/cuda/flash_fwd_wgmma.cu).

Builds the three TMA descriptors (4-D over [B, H, N, D], 128-byte swizzle, zero
fill out of bounds), the AttentionParams block, and launches one CTA of
``64 * consumer_wg`` query rows per (row block, batch, head) with
``(consumer_wg + 1) * 128`` threads.

This module is the kernel's host code (configs, legality, TMA maps, the launch);
the family object that the front door uses is :mod:`attnproto.ops.families.wgmma`.

    flash_forward_wgmma(q, k, v, ...) / prepare_forward_wgmma(...)  = flash_forward(..., kernel="wgmma")
    WgmmaConfig(block_c, stages, consumer_wg); default_config(head_dim, causal) (FA3's tiles)
    sweep_space(head_dim) -> every legal tile the Prototype 1 sweep measures
    shared_bytes(config, head_dim) -> int

Inputs are torch CUDA tensors (float16 or bfloat16) Q [B, Hq, Nq, D],
K/V [B, Hkv, Nkv, D] with the head_dim axis contiguous; ``o``/``lse`` may be
passed in (e.g. NaN-poisoned by a test) and are written in place.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


KERNEL_NAME = "flash_fwd_wgmma"

#: DTYPE constant of the kernel per input dtype.
DTYPE_CODES = {"float16": 0, "bfloat16": 1}
#: dtype names of the backend's tensor_map for each input dtype.
TMA_DTYPES = {"float16": "f16", "bfloat16": "bf16"}
HEAD_DIMS = (64, 128, 256)

ELEMENT_BYTES = 2                    # float16 / bfloat16
WARPGROUP_THREADS = 128
ROWS_PER_CONSUMER = 64               # wgmma M: query rows per consumer warpgroup
MMA_K = 16                           # wgmma K of 16-bit inputs: BLOCK_C granularity
SWIZZLE_BYTES = 128                  # TMA / wgmma swizzle mode of every tile
SWIZZLE_COLS = SWIZZLE_BYTES // ELEMENT_BYTES   # 64 elements: the TMA box width
TMA_ALIGN_BYTES = 16                 # global address and strides of a tensor map
BARRIER_BYTES = 8                    # one mbarrier
META_BYTES = 8                       # two ints after the barriers: key count, first bad key (paged K/V)
SMEM_ALIGN_SLACK = 1024              # the kernel aligns its base to the 1024-byte swizzle period
HOPPER_SMEM_OPTIN = 227 * 1024       # per-block opt-in shared memory on H100/H200
BLOCK_C_RANGE = (64, 192)            # wgmma_ss specialisations in hopper.cuh
STAGES_RANGE = (2, 8)
MAX_GRID_X = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    """Tile shape of the kernel. ``block_r`` is implied: 64 * consumer_wg."""

    block_c: int = 128       # keys per K/V tile (wgmma N of S = Q K^T)
    stages: int = 2          # depth of the K/V TMA ring
    consumer_wg: int = 2     # consumer warpgroups, 64 query rows each

    @property
    def block_r(self) -> int:
        return ROWS_PER_CONSUMER * self.consumer_wg

    @property
    def threads(self) -> int:
        return (self.consumer_wg + 1) * WARPGROUP_THREADS


def _check_config(config: WgmmaConfig, head_dim: int) -> None:
    for field in ("block_c", "stages", "consumer_wg"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"config.{field}: expected an int, got {type(value).__name__}")
    if config.consumer_wg not in (1, 2):
        raise ValueError(f"config.consumer_wg: must be 1 or 2, got {config.consumer_wg}")
    lo, hi = BLOCK_C_RANGE
    if config.block_c % MMA_K or not lo <= config.block_c <= hi:
        raise ValueError(f"config.block_c: must be a multiple of {MMA_K} in [{lo}, {hi}], got {config.block_c}")
    lo, hi = STAGES_RANGE
    if not lo <= config.stages <= hi:
        raise ValueError(f"config.stages: must be in [{lo}, {hi}], got {config.stages}")
    need = shared_bytes(config, head_dim)
    if need > HOPPER_SMEM_OPTIN:
        raise ValueError(f"config: {config} at head_dim {head_dim} needs {need} bytes of shared memory, "
                         f"over the {HOPPER_SMEM_OPTIN}-byte Hopper limit; lower stages or block_c")


def shared_bytes(config: WgmmaConfig, head_dim: int, variant: Any = None) -> int:
    """Dynamic shared memory of one CTA; mirrors kSmemBytes in flash_fwd_wgmma.cu."""
    q_tile = config.block_r * head_dim * ELEMENT_BYTES
    kv_tile = config.block_c * head_dim * ELEMENT_BYTES
    barriers = (1 + 4 * config.stages) * BARRIER_BYTES   # q_full + k/v full + k/v empty per stage
    if variant is not None and variant.rope is not None:
        barriers += (1 + config.stages) * BARRIER_BYTES  # RoPE: q_ready + k_ready per stage (rotated tiles)
    return q_tile + 2 * config.stages * kv_tile + barriers + META_BYTES + SMEM_ALIGN_SLACK


def default_config(head_dim: int, causal: bool) -> WgmmaConfig:
    """Starting tiles, FlashAttention-3's published H100 choice: the family's tiles where the
    measured table has no entry (the Prototype 1 sweep chooses among :func:`sweep_space`).

    D = 64 / 128: 128 x 128 tiles, two consumer warpgroups; D = 64 keeps three
    stages since each tile is short work. D = 256: 128 x 80, the widest key tile
    whose O (128 fp32 registers / thread) + S + P fits the 240-register budget and
    whose two stages fit in 227 KiB.
    """
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: must be one of {HEAD_DIMS}, got {head_dim}")
    del causal  # FA3 uses the same tiles both ways
    if head_dim == 64:
        return WgmmaConfig(block_c=128, stages=3, consumer_wg=2)
    if head_dim == 128:
        return WgmmaConfig(block_c=128, stages=2, consumer_wg=2)
    return WgmmaConfig(block_c=80, stages=2, consumer_wg=2)


def as_config(config: Any, head_dim: int, causal: bool) -> WgmmaConfig:
    """A caller's config (WgmmaConfig, a dict of its fields, or None = the defaults), checked."""
    if config is None:
        cfg = default_config(head_dim, causal)
    elif isinstance(config, WgmmaConfig):
        cfg = config
    elif isinstance(config, dict):
        unknown = set(config) - {"block_c", "stages", "consumer_wg", "block_r"}
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        base = default_config(head_dim, causal)
        cfg = WgmmaConfig(block_c=config.get("block_c", base.block_c), stages=config.get("stages", base.stages),
                          consumer_wg=config.get("consumer_wg", base.consumer_wg))
        if "block_r" in config and config["block_r"] != cfg.block_r:
            raise ValueError(f"config.block_r: must equal 64 * consumer_wg = {cfg.block_r}, got {config['block_r']}")
    else:
        raise TypeError(f"config: expected a WgmmaConfig, a dict or None, got {type(config).__name__}")
    _check_config(cfg, head_dim)
    return cfg


#: PAGE_SIZE of contiguous K/V; paged K/V uses the pool's block size (paged_prefill_wgmma.PAGE_SIZES).
CONTIGUOUS = 0


def constants(config: WgmmaConfig, head_dim: int, causal: bool, dtype: str,
              page_size: int = CONTIGUOUS, variant: Any = None) -> dict[str, int]:
    """Named constants (NVRTC -D macros) of one specialisation; ``variant`` an
    :class:`attnproto.ops.variants.Variant` (None: the base kernel)."""
    from .variants import BASE  # noqa: PLC0415  (variants imports nothing of this module)

    return {
        "HEAD_DIM": int(head_dim), "BLOCK_R": config.block_r, "BLOCK_C": int(config.block_c),
        "STAGES": int(config.stages), "CONSUMER_WG": int(config.consumer_wg),
        "CAUSAL": int(bool(causal)), "DTYPE": DTYPE_CODES[dtype], "PAGE_SIZE": int(page_size),
        **(variant or BASE).constants(),
    }


def variant_args(values: Any) -> list:
    """The kernel's variant buffer arguments after the pool arguments (variants.buffer_args)."""
    from .variants import buffer_args  # noqa: PLC0415

    return buffer_args(values)


# ---- the Prototype 1 sweep of this kernel ----
#: Every BLOCK_C the kernel has a wgmma_ss specialisation for (hopper.cuh).
SWEEP_BLOCK_C = tuple(range(BLOCK_C_RANGE[0], BLOCK_C_RANGE[1] + 1, MMA_K))
#: Ring depths worth measuring: 2 (FA3's default) to 4 (deeper rings only cost shared memory
#: once the loads of one tile hide under the two GEMMs of the previous one).
SWEEP_STAGES = (2, 3, 4)
SWEEP_CONSUMER_WG = (1, 2)


def is_legal(config: WgmmaConfig, head_dim: int) -> tuple[bool, str]:
    """(True, "") or (False, the kernel's static_assert that fails)."""
    try:
        _check_config(config, head_dim)
    except (TypeError, ValueError) as exc:
        return False, str(exc)
    return True, ""


def sweep_space(head_dim: int) -> list[WgmmaConfig]:
    """Every legal BLOCK_C x STAGES x CONSUMER_WG tile at ``head_dim`` (shared memory within 227 KiB)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: must be one of {HEAD_DIMS}, got {head_dim}")
    out = []
    for wg in SWEEP_CONSUMER_WG:
        for c in SWEEP_BLOCK_C:
            for st in SWEEP_STAGES:
                cfg = WgmmaConfig(block_c=c, stages=st, consumer_wg=wg)
                if is_legal(cfg, head_dim)[0]:
                    out.append(cfg)
    return out


def _tma_strides(shape: tuple[int, ...], strides: tuple[int, ...], name: str) -> list[int]:
    """Byte strides of dims 1..3 of the (D, N, H, B) map, innermost first.

    A dimension of extent 1 is never stepped, so its stride is replaced by the
    packed one (torch reports arbitrary strides for such dimensions, which TMA
    might reject).
    """
    b, h, n, d = shape
    sb, sh, sn, _ = strides
    packed = {"token": d, "head": n * d, "batch": h * n * d}
    out = []
    for label, extent, stride in (("token", n, sn), ("head", h, sh), ("batch", b, sb)):
        if extent == 1:
            stride = packed[label]
        if stride <= 0:
            raise ValueError(f"{name}: {label} stride {stride} must be positive (broadcast views are not supported)")
        nbytes = stride * ELEMENT_BYTES
        if nbytes % TMA_ALIGN_BYTES:
            raise ValueError(f"{name}: {label} stride of {stride} elements is not a multiple of "
                             f"{TMA_ALIGN_BYTES // ELEMENT_BYTES} elements (TMA needs 16-byte strides)")
        out.append(nbytes)
    return out


#: The kernel's paged-pool arguments for contiguous K/V (block_table, context_lens: null
#: pointers), after ``lse`` (argument order: top of the .cu).
CONTIGUOUS_POOL_ARGS = (np.uint64(0), np.uint64(0))


def prepare(problem: Any, cfg: WgmmaConfig, backend: Any) -> Any:
    """The launch of a checked CUDA problem (attnproto.ops.problem): TMA maps, params, kernel."""
    from .problem import PreparedLaunch, flash_params  # noqa: PLC0415

    s = problem.shape
    b, hq, hkv, nq, nkv, d = s.batch, s.num_heads, s.num_kv_heads, s.seq_q, s.seq_kv, s.head_dim
    grid_x = math.ceil(nq / cfg.block_r) * b * hq
    if grid_x > MAX_GRID_X:
        raise ValueError(f"q: {grid_x} CTAs exceed the grid limit {MAX_GRID_X}")
    tdt = TMA_DTYPES[s.dtype]
    maps = []
    for name, rows, heads, seq in (("q", cfg.block_r, hq, nq), ("k", cfg.block_c, hkv, nkv), ("v", cfg.block_c, hkv, nkv)):
        x, info = getattr(problem, name), problem.infos[name]
        strides = _tma_strides(info.shape, info.strides, name)
        maps.append(backend.tensor_map(x, tdt, [d, seq, heads, b], strides, [SWIZZLE_COLS, rows, 1, 1],
                                       SWIZZLE_BYTES, False))
    kern = backend.kernel(KERNEL_NAME, **constants(cfg, d, problem.causal, s.dtype, CONTIGUOUS, problem.variant))
    return PreparedLaunch(backend, kern, (grid_x, 1, 1), (cfg.threads, 1, 1),
                          [flash_params(problem), *maps, problem.out, problem.lse, *CONTIGUOUS_POOL_ARGS,
                           *variant_args(problem.values)],
                          shared_bytes(cfg, d, problem.variant), problem, cfg, family="wgmma")


def flash_forward_wgmma(q: Any, k: Any, v: Any, **kwargs: Any):
    """``flash_forward(q, k, v, kernel="wgmma", **kwargs)``; returns (O, LSE)."""
    from .flash import flash_forward  # noqa: PLC0415

    return flash_forward(q, k, v, kernel="wgmma", **kwargs)


def prepare_forward_wgmma(q: Any, k: Any, v: Any, **kwargs: Any):
    """``prepare_forward(q, k, v, kernel="wgmma", **kwargs)``: the launch to replay."""
    from .flash import prepare_forward  # noqa: PLC0415

    return prepare_forward(q, k, v, kernel="wgmma", **kwargs)
