"""Host side of the Hopper (sm_90a) wgmma + TMA flash-attention forward kernel
(shaders/cuda/flash_fwd_wgmma.cu).

Builds the three TMA descriptors (4-D over [B, H, N, D], 128-byte swizzle, zero
fill out of bounds), the AttentionParams block, and launches one CTA of
``64 * consumer_wg`` query rows per (row block, batch, head) with
``(consumer_wg + 1) * 128`` threads.

Public API::

    flash_forward_wgmma(q, k, v, *, causal=False, scale=None, config=None,
                        out=None, lse=None, backend=None) -> (o, lse)
    prepare_forward_wgmma(...same...) -> PreparedLaunch   (for timing without Python in the loop)
    WgmmaConfig(block_r, block_c, stages, consumer_wg); default_config(head_dim, causal)
    shared_bytes(config, head_dim) -> int
    specialisations() / wgmma_specialisations() -> [(kernel name, constants)]

Inputs are torch CUDA tensors (float16 or bfloat16) Q [B, Hq, Nq, D],
K/V [B, Hkv, Nkv, D] with the head_dim axis contiguous; ``o``/``lse`` may be
passed in (e.g. NaN-poisoned by a test) and are written in place.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from .. import params as _params
from .. import validate as _v
from . import flash as _flash

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


def shared_bytes(config: WgmmaConfig, head_dim: int) -> int:
    """Dynamic shared memory of one CTA; mirrors kSmemBytes in flash_fwd_wgmma.cu."""
    q_tile = config.block_r * head_dim * ELEMENT_BYTES
    kv_tile = config.block_c * head_dim * ELEMENT_BYTES
    barriers = (1 + 4 * config.stages) * BARRIER_BYTES   # q_full + k/v full + k/v empty per stage
    return q_tile + 2 * config.stages * kv_tile + barriers + SMEM_ALIGN_SLACK


def default_config(head_dim: int, causal: bool) -> WgmmaConfig:
    """Starting tiles (FlashAttention-3's table for H100; not yet tuned on this project's runs).

    D = 64 / 128: 128 x 128 tiles, two consumer warpgroups; D = 64 keeps three
    stages since each tile is short work. D = 256: 128 x 80, the widest key tile
    whose O (128 fp32 registers / thread) + S + P fits the 240-register budget and
    whose two stages fit in 227 KiB.
    """
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: must be one of {HEAD_DIMS}, got {head_dim}")
    del causal  # same tiles both ways until measured otherwise
    if head_dim == 64:
        return WgmmaConfig(block_c=128, stages=3, consumer_wg=2)
    if head_dim == 128:
        return WgmmaConfig(block_c=128, stages=2, consumer_wg=2)
    return WgmmaConfig(block_c=80, stages=2, consumer_wg=2)


def _as_config(config: Any, head_dim: int, causal: bool) -> WgmmaConfig:
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


def constants(config: WgmmaConfig, head_dim: int, causal: bool, dtype: str) -> dict[str, int]:
    """Named constants (NVRTC -D macros) of one specialisation."""
    return {
        "HEAD_DIM": int(head_dim), "BLOCK_R": config.block_r, "BLOCK_C": int(config.block_c),
        "STAGES": int(config.stages), "CONSUMER_WG": int(config.consumer_wg),
        "CAUSAL": int(bool(causal)), "DTYPE": DTYPE_CODES[dtype],
    }


#: Extra tiles compiled by CI besides the defaults: the FA3 non-causal D = 128
#: tile (128 x 176) and one-consumer variants, for benchmarking against the defaults.
EXTRA_CONFIGS = (
    (128, WgmmaConfig(block_c=176, stages=2, consumer_wg=2)),
    (128, WgmmaConfig(block_c=128, stages=2, consumer_wg=1)),
    (64, WgmmaConfig(block_c=128, stages=2, consumer_wg=1)),
    (256, WgmmaConfig(block_c=64, stages=2, consumer_wg=2)),
)


def specialisations() -> list[tuple[str, dict[str, int]]]:
    """Every specialisation the project uses (CI compiles each with NVRTC)."""
    out = []
    for causal in (False, True):
        for dtype in DTYPE_CODES:
            for d in HEAD_DIMS:
                out.append((KERNEL_NAME, constants(default_config(d, causal), d, causal, dtype)))
            for d, cfg in EXTRA_CONFIGS:
                out.append((KERNEL_NAME, constants(cfg, d, causal, dtype)))
    return out


wgmma_specialisations = specialisations


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


def _check_address(x: Any, name: str) -> None:
    if x.data_ptr() % TMA_ALIGN_BYTES:
        raise ValueError(f"{name}: data pointer is not 16-byte aligned (TMA requirement)")


def _check_output(x: Any, name: str, shape: tuple[int, ...], dtype: str, device: Any,
                  contiguous_last: bool) -> _v.TensorInfo:
    info = _v.check_tensor(x, name, ndim=len(shape), allowed_dtypes=(dtype,), contiguous_last_dim=contiguous_last,
                           device="cuda")
    if info.shape != shape:
        raise ValueError(f"{name}: shape {info.shape} does not match the expected {shape}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, the inputs are on {device}")
    return info


def flash_forward_wgmma(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                        config: Any = None, out: Any = None, lse: Any = None, backend: Any = None):
    """Flash attention forward on Hopper through wgmma + TMA; returns (O, LSE).

    O is like ``q``; LSE is float32 [B, Hq, Nq] (natural log; -inf for a query
    row that sees no key, whose O row is 0). ``scale`` defaults to 1/sqrt(D) and
    must be positive (the kernel takes the running max on unscaled scores).
    """
    return prepare_forward_wgmma(q, k, v, causal=causal, scale=scale, config=config, out=out, lse=lse,
                                 backend=backend).launch()


def prepare_forward_wgmma(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                          config: Any = None, out: Any = None, lse: Any = None, backend: Any = None) -> _flash.PreparedLaunch:
    """Validate, allocate outputs, encode the TMA maps and compile; returns the launch to replay."""
    import torch  # noqa: PLC0415  (GPU-only path)

    from .. import backend as _backend  # noqa: PLC0415

    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=tuple(DTYPE_CODES),
                                      head_dims=HEAD_DIMS, device="cuda")
    scale = _v.check_scale(scale, shape.head_dim)
    if scale <= 0.0:
        raise ValueError(f"scale: must be positive, got {scale}")
    cfg = _as_config(config, shape.head_dim, causal)
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_address(x, name)
    for x, name in ((k, "k"), (v, "v")):
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q is on {q.device}")

    b, hq, hkv, nq, nkv, d = (shape.batch, shape.num_heads, shape.num_kv_heads, shape.seq_q, shape.seq_kv,
                              shape.head_dim)
    o_shape, lse_shape = (b, hq, nq, d), (b, hq, nq)
    if out is None:
        out = torch.empty(o_shape, dtype=q.dtype, device=q.device)
    o_info = _check_output(out, "out", o_shape, shape.dtype, q.device, contiguous_last=True)
    if any(s % 2 for s in o_info.strides[:3]) or out.data_ptr() % 4:
        raise ValueError("out: strides and address must be even in elements (the kernel stores 2 elements at once)")
    if lse is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    lse_info = _check_output(lse, "lse", lse_shape, "float32", q.device, contiguous_last=True)

    m_blocks = math.ceil(nq / cfg.block_r)
    grid_x = m_blocks * b * hq
    if grid_x > MAX_GRID_X:
        raise ValueError(f"q: {grid_x} CTAs exceed the grid limit {MAX_GRID_X}")

    be = _backend.get("cuda") if backend is None else backend
    tdt = TMA_DTYPES[shape.dtype]
    maps = []
    for x, name, rows, heads, seq in ((q, "q", cfg.block_r, hq, nq), (k, "k", cfg.block_c, hkv, nkv),
                                      (v, "v", cfg.block_c, hkv, nkv)):
        info = _v.tensor_info(x, name)
        strides = _tma_strides(info.shape, info.strides, name)
        maps.append(be.tensor_map(x, tdt, [d, seq, heads, b], strides, [SWIZZLE_COLS, rows, 1, 1],
                                  SWIZZLE_BYTES, False))

    qs, ks, vs = (_v.tensor_info(x, n).strides for x, n in ((q, "q"), (k, "k"), (v, "v")))
    prm = _params.make_params(
        batch=b, num_heads=hq, num_kv_heads=hkv, seq_q=nq, seq_kv=nkv, head_dim=d, scale=scale,
        q_stride=qs[:3], k_stride=ks[:3], v_stride=vs[:3], o_stride=o_info.strides[:3],
        lse_stride=lse_info.strides[:2])
    kern = be.kernel(KERNEL_NAME, **constants(cfg, d, causal, shape.dtype))
    problem = _flash.FlashProblem(q, k, v, out, lse, shape, bool(causal), scale, tuple(qs[:3]), tuple(ks[:3]),
                                  tuple(vs[:3]), tuple(o_info.strides[:3]), tuple(lse_info.strides[:2]))
    return _flash.PreparedLaunch(be, kern, (grid_x, 1, 1), (cfg.threads, 1, 1), [prm, *maps, out, lse],
                                 shared_bytes(cfg, d), problem, cfg)


def _prepare_registered(problem: Any, config: Any, backend: Any) -> Any:
    """flash.KERNELS entry: ``flash_forward(..., kernel="wgmma")`` (inputs re-checked for TMA)."""
    return prepare_forward_wgmma(problem.q, problem.k, problem.v, causal=problem.causal, scale=problem.scale,
                                 config=config, out=problem.out, lse=problem.lse, backend=backend)


_flash.register_kernel("wgmma", _prepare_registered)
