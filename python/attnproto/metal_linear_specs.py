"""Metal specialisations, threadgroup-memory budgets and launch geometry of the chunked linear
attention kernels (Prototype 6): shaders/metal/linear_chunk_h.metal and linear_chunk_o.metal.

The Python mirror of the ATTNPROTO_LINEAR_* macros of shaders/metal/metal_bindings.h, with which
the kernels carve their threadgroup allocation; tests/test_metal_linear.py compiles the macros and
compares them with these functions. Both kernels stage ATTNPROTO_LINEAR_SUB tokens at a time, so
their budget depends on the head dim only and every seed chunk size (32 - 256) fits 32 KB.
"""
from __future__ import annotations

import itertools

from .metal_specs import DTYPE_BYTES, DTYPE_CODES, FRAG, SIMD_WIDTH, THREADGROUP_MEMORY_LIMIT, MetalSpec, ceil_div

CHUNK_H_KERNEL = "linear_chunk_h"
CHUNK_O_KERNEL = "linear_chunk_o"

# Geometry (ATTNPROTO_LINEAR_* in metal_bindings.h).
SUB = 32              # tokens staged through threadgroup memory at a time
H_COLS = 32           # state (value) columns per chunk_h threadgroup
O_ROWS = 32           # query rows per chunk_o threadgroup
MAX_HEAD_DIM = 128    # chunk_o's Q and O fragments live in registers
MAX_CHUNK = 256       # the seeds' largest chunk (AC-4.3)
O_HCOLS_MAX = 64      # chunk_o stages H[c] in column blocks of at most this many
FLOAT_BYTES = 4
# Seeds AC-4.3 / FR-9: chunk sizes and the head dims of the Prototype 6 sweep.
CHUNKS = (32, 64, 128, 256)
HEAD_DIMS = (64, 128)


def _check(head_dim: int, chunk: int, dtype: str) -> str | None:
    if dtype not in DTYPE_CODES:
        return f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}"
    if head_dim < H_COLS or head_dim % H_COLS or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not a multiple of {H_COLS} in [{H_COLS}, {MAX_HEAD_DIM}]"
    if chunk < SUB or chunk % SUB or chunk > MAX_CHUNK:
        return f"chunk_size {chunk} is not a multiple of {SUB} in [{SUB}, {MAX_CHUNK}]"
    for kernel, need in ((CHUNK_H_KERNEL, chunk_h_threadgroup_bytes(head_dim, dtype)),
                         (CHUNK_O_KERNEL, chunk_o_threadgroup_bytes(head_dim, dtype))):
        if need > THREADGROUP_MEMORY_LIMIT:
            return f"{kernel} needs {need} bytes of threadgroup memory, over {THREADGROUP_MEMORY_LIMIT}"
    return None


def o_hcols(head_dim: int) -> int:
    """Columns of H[c] chunk_o stages at a time (ATTNPROTO_LINEAR_O_HCOLS)."""
    return head_dim if head_dim <= O_HCOLS_MAX else O_HCOLS_MAX


def chunk_h_threads(head_dim: int) -> int:
    """Threads per chunk_h threadgroup: one simdgroup per 8 state rows (ATTNPROTO_LINEAR_H_THREADS)."""
    return head_dim // FRAG * SIMD_WIDTH


def chunk_o_threads() -> int:
    """Threads per chunk_o threadgroup (ATTNPROTO_LINEAR_O_THREADS)."""
    return O_ROWS // FRAG * SIMD_WIDTH


def chunk_h_threadgroup_bytes(head_dim: int, dtype: str = "float16") -> int:
    """K of SUB tokens (all D columns) + V of SUB tokens (H_COLS columns) (ATTNPROTO_LINEAR_H_TG_BYTES)."""
    return (SUB * head_dim + SUB * H_COLS) * DTYPE_BYTES[dtype]


def chunk_o_threadgroup_regions(head_dim: int, dtype: str = "float16") -> dict[str, int]:
    """chunk_o's threadgroup regions in kernel order (ATTNPROTO_LINEAR_O_TG_BYTES)."""
    elem = DTYPE_BYTES[dtype]
    return {"stage": max(head_dim * o_hcols(head_dim), SUB * head_dim) * elem,
            "scores": O_ROWS * SUB * FLOAT_BYTES, "probs": O_ROWS * SUB * elem,
            "scratch": (O_ROWS // FRAG) * FRAG * FRAG * FLOAT_BYTES}


def chunk_o_threadgroup_bytes(head_dim: int, dtype: str = "float16") -> int:
    return sum(chunk_o_threadgroup_regions(head_dim, dtype).values())


def illegal_reason(head_dim: int, chunk: int, dtype: str = "float16") -> str | None:
    """Why the kernels' static_asserts reject this combination, or None."""
    return _check(head_dim, chunk, dtype)


def linear_specs(head_dim: int, chunk: int, dtype: str = "float16") -> tuple[MetalSpec, MetalSpec]:
    """(chunk_h spec, chunk_o spec); ValueError with the reason for a combination the kernels reject."""
    for value, name in ((head_dim, "head_dim"), (chunk, "chunk_size")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    reason = _check(head_dim, chunk, dtype)
    if reason is not None:
        raise ValueError(f"linear attention: {reason}")
    consts = {"HEAD_DIM": head_dim, "CHUNK_SIZE": chunk, "DTYPE": DTYPE_CODES[dtype]}
    return MetalSpec.make(CHUNK_H_KERNEL, **consts), MetalSpec.make(CHUNK_O_KERNEL, **consts)


def dispatch(batch: int, num_heads: int, seq_len: int, head_dim: int, dtype: str = "float16"):
    """((grid, threads, bytes) of chunk_h, (grid, threads, bytes) of chunk_o)."""
    for value, name in ((batch, "batch"), (num_heads, "num_heads"), (seq_len, "seq_len")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    h = ((head_dim // H_COLS, batch * num_heads, 1), (chunk_h_threads(head_dim), 1, 1),
         chunk_h_threadgroup_bytes(head_dim, dtype))
    o = ((ceil_div(seq_len, O_ROWS), batch * num_heads, 1), (chunk_o_threads(), 1, 1),
         chunk_o_threadgroup_bytes(head_dim, dtype))
    return h, o


def budget_map(dtype: str = "float16") -> list[dict]:
    """Both kernels' threadgroup memory at every head dim x chunk of the sweep, with legality."""
    return [{"head_dim": d, "chunk": c, "dtype": dtype, "chunk_h_bytes": chunk_h_threadgroup_bytes(d, dtype),
             "chunk_o_bytes": chunk_o_threadgroup_bytes(d, dtype), "limit_bytes": THREADGROUP_MEMORY_LIMIT,
             "legal": _check(d, c, dtype) is None}
            for d, c in itertools.product(HEAD_DIMS, CHUNKS)]


def proto6_specs() -> list[MetalSpec]:
    """Every linear-attention specialisation Prototype 6 dispatches: head dims x chunks x dtypes."""
    return [s for dtype in DTYPE_CODES for d, c in itertools.product(HEAD_DIMS, CHUNKS)
            for s in linear_specs(d, c, dtype)]
