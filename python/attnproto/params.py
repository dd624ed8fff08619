"""The AttentionParams block shared with the kernels (shaders/common/attn_params.h).

``PARAMS_DTYPE`` mirrors the C struct field for field; ``check_layout()``
compares it with the layout the native core reports (offsets asserted at C++
compile time), so a drifting header fails loudly instead of feeding kernels
garbage.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PARAMS_DTYPE = np.dtype(
    [
        ("batch", "<u4"),
        ("num_heads", "<u4"),
        ("num_kv_heads", "<u4"),
        ("seq_q", "<u4"),
        ("seq_kv", "<u4"),
        ("head_dim", "<u4"),
        ("scale", "<f4"),
        ("rope_theta", "<f4"),
        ("alibi_max_bias", "<f4"),
        ("block_size", "<u4"),
        ("max_blocks_per_seq", "<u4"),
        ("num_partitions", "<u4"),
        ("partition_size", "<u4"),
        ("chunk_size", "<u4"),
        ("num_blocks", "<u4"),
        ("window", "<u4"),
        ("softcap", "<f4"),
        ("rope_offset", "<u4"),
        ("rope_table_len", "<u4"),
        ("q_stride", "<i8", (3,)),
        ("k_stride", "<i8", (3,)),
        ("v_stride", "<i8", (3,)),
        ("o_stride", "<i8", (3,)),
        ("lse_stride", "<i8", (2,)),
    ],
    align=True,
)

#: Alignment of the struct (its 64-bit strides): the by-value kernel argument's alignment.
PARAMS_ALIGN = 8

_U32_MAX = 2**32 - 1
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_ALIBI_MAX_BIAS = 8.0


def layout() -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field as numpy lays out PARAMS_DTYPE."""
    rows = []
    for name in PARAMS_DTYPE.names:
        sub, offset = PARAMS_DTYPE.fields[name][:2]
        rows.append((name, offset, sub.itemsize))
    return rows


def check_layout(native_rows: Sequence[tuple[str, int, int]], native_size: int) -> None:
    """Raise RuntimeError if the native struct and PARAMS_DTYPE disagree."""
    mine = layout()
    if list(map(tuple, native_rows)) != mine or native_size != PARAMS_DTYPE.itemsize:
        raise RuntimeError(
            "AttentionParams layout mismatch between attn_params.h and attnproto.params: "
            f"native={list(native_rows)} size={native_size}; python={mine} size={PARAMS_DTYPE.itemsize}"
        )


def _u32(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if not 0 <= int(value) <= _U32_MAX:
        raise ValueError(f"{name}: {value} is outside 0..{_U32_MAX}")
    return int(value)


def _strides(name: str, value, n: int) -> tuple[int, ...]:
    vals = tuple(int(v) for v in value)
    if len(vals) != n:
        raise ValueError(f"{name}: expected {n} strides, got {len(vals)}")
    return vals


def make_params(
    *,
    batch: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    seq_q: int,
    seq_kv: int | None = None,
    head_dim: int,
    scale: float | None = None,
    q_stride: Sequence[int] = (0, 0, 0),
    k_stride: Sequence[int] = (0, 0, 0),
    v_stride: Sequence[int] = (0, 0, 0),
    o_stride: Sequence[int] = (0, 0, 0),
    lse_stride: Sequence[int] = (0, 0),
    rope_theta: float = _DEFAULT_ROPE_THETA,
    alibi_max_bias: float = _DEFAULT_ALIBI_MAX_BIAS,
    block_size: int = 0,
    max_blocks_per_seq: int = 0,
    num_partitions: int = 0,
    partition_size: int = 0,
    chunk_size: int = 0,
    num_blocks: int = 0,
    window: int = 0,
    softcap: float = 0.0,
    rope_offset: int = 0,
    rope_table_len: int = 0,
) -> np.void:
    """Build one AttentionParams value (a numpy structured scalar of PARAMS_DTYPE)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    seq_kv = seq_q if seq_kv is None else seq_kv
    p = np.zeros((), dtype=PARAMS_DTYPE)
    for name, value in (
        ("batch", batch), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("seq_q", seq_q),
        ("seq_kv", seq_kv), ("head_dim", head_dim), ("block_size", block_size),
        ("max_blocks_per_seq", max_blocks_per_seq), ("num_partitions", num_partitions),
        ("partition_size", partition_size), ("chunk_size", chunk_size), ("num_blocks", num_blocks),
        ("window", window), ("rope_offset", rope_offset), ("rope_table_len", rope_table_len),
    ):
        p[name] = _u32(name, value)
    if p["num_kv_heads"] == 0 or p["num_heads"] % p["num_kv_heads"]:
        raise ValueError(f"num_kv_heads: {num_kv_heads} must divide num_heads={num_heads}")
    if p["head_dim"] == 0:
        raise ValueError("head_dim: must be positive")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: {scale} is not finite")
    p["scale"] = scale
    p["rope_theta"] = float(rope_theta)
    p["alibi_max_bias"] = float(alibi_max_bias)
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0.0:
        raise ValueError(f"softcap: must be finite and >= 0 (0 = none), got {softcap}")
    p["softcap"] = softcap
    p["q_stride"] = _strides("q_stride", q_stride, 3)
    p["k_stride"] = _strides("k_stride", k_stride, 3)
    p["v_stride"] = _strides("v_stride", v_stride, 3)
    p["o_stride"] = _strides("o_stride", o_stride, 3)
    p["lse_stride"] = _strides("lse_stride", lse_stride, 2)
    return p[()]
