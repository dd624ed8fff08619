"""Metal specialisations, threadgroup-memory budgets and launch geometry of the paged decode
kernels (Prototype 3): shaders/metal/paged_attention.metal (phase 1, per partition) and
shaders/metal/paged_reduce.metal (phase 2).

The Python mirror of the ATTNPROTO_PAGED_* macros of shaders/metal/metal_bindings.h, which the
kernels carve their threadgroup allocation with: ``paged_threadgroup_regions`` is the kernel's
layout region by region, and tests/test_metal_paged.py compiles the header's macros and compares
them with these functions at every block size, head dim, group and dtype, so the budget map
(AC-3.3) is the kernels' own and not a hand-typed copy.
"""
from __future__ import annotations

import itertools

from .metal_specs import DTYPE_BYTES, DTYPE_CODES, FRAG, SIMD_WIDTH, THREADGROUP_MEMORY_LIMIT, MetalSpec, ceil_div

PAGED_KERNEL = "paged_attention"
REDUCE_KERNEL = "paged_reduce"

# Geometry of the kernels (ATTNPROTO_PAGED_* in metal_bindings.h; reasons there).
PAGED_THREADS = 128
PAGED_MAX_HEAD_DIM = 256
PAGED_MAX_GROUP = 8
PAGED_MAX_BLOCK_SIZE = 128
PAGED_STATS = 3
PAGED_MAX_PARTITIONS = 2048
REDUCE_THREADS = 128
FLOAT_BYTES = 4

# Seed AC-3.3: the budget is mapped at these cache block sizes (tokens).
BLOCK_SIZES = (8, 16, 32, 64, 128)
# vLLM's PagedAttention V2 partition (tokens), the default; a multiple of every block size above.
PARTITION_SIZE = 512
# Partition sizes the sweep compares (and the static checks compile): 128 tokens, the largest
# block size, gives 4x the threadgroups at the same context (parallelism for a small batch)
# for 4x the reduce's partitions.
PARTITION_SIZES = (128, PARTITION_SIZE)
# Prototype 3 sweep (seed task 4.8 and the budget map): head dims and GQA groups whose
# specialisations are compiled by the static checks; TinyLlama-1.1B decodes with D = 64 and
# group 8, Llama-2/3-8B with D = 128 and group 4, group 1 is multi-head attention.
HEAD_DIMS = (64, 128)
GQA_GROUPS = (1, 4, 8)


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype: must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    return dtype


def paged_threadgroup_regions(head_dim: int, block_size: int, group: int, dtype: str = "float16"
                              ) -> dict[str, int]:
    """Bytes of each region of paged_attention's threadgroup allocation, in kernel order
    (ATTNPROTO_PAGED_TG_{Q,S,STATS,KV}_BYTES)."""
    elem = DTYPE_BYTES[_check_dtype(dtype)]
    return {"q": group * head_dim * FLOAT_BYTES,
            "scores": group * block_size * FLOAT_BYTES,
            "stats": group * PAGED_STATS * FLOAT_BYTES,
            "kv_block": block_size * head_dim * elem}


def paged_threadgroup_bytes(head_dim: int, block_size: int, group: int, dtype: str = "float16") -> int:
    """Threadgroup memory of one paged_attention threadgroup (ATTNPROTO_PAGED_TG_BYTES)."""
    return sum(paged_threadgroup_regions(head_dim, block_size, group, dtype).values())


def reduce_threadgroup_bytes(num_partitions: int) -> int:
    """Threadgroup memory of one paged_reduce threadgroup (ATTNPROTO_PAGED_REDUCE_TG_BYTES)."""
    return num_partitions * FLOAT_BYTES + (REDUCE_THREADS // SIMD_WIDTH) * FLOAT_BYTES


def paged_illegal(head_dim: int, block_size: int, group: int, dtype: str = "float16",
                  partition_size: int = PARTITION_SIZE) -> tuple[str, str] | None:
    """(what, why) the kernel's static_asserts reject this combination for, or None when it
    compiles; ``what`` is one of "head_dim", "block_size", "partition_size", "group",
    "threadgroup_memory"."""
    _check_dtype(dtype)
    if head_dim <= 0 or head_dim % FRAG or head_dim > PAGED_MAX_HEAD_DIM:
        return "head_dim", f"head_dim {head_dim} is not a multiple of {FRAG} in [{FRAG}, {PAGED_MAX_HEAD_DIM}]"
    if block_size <= 0 or block_size % FRAG or block_size > PAGED_MAX_BLOCK_SIZE:
        return "block_size", (f"block_size {block_size} is not a multiple of {FRAG} in "
                              f"[{FRAG}, {PAGED_MAX_BLOCK_SIZE}]")
    if partition_size < block_size or partition_size % block_size:
        return "partition_size", (f"partition_size {partition_size} is not a positive multiple of "
                                  f"block_size {block_size}")
    if not 1 <= group <= PAGED_MAX_GROUP:
        return "group", f"GQA group {group} (query heads per KV head) is not in [1, {PAGED_MAX_GROUP}]"
    need = paged_threadgroup_bytes(head_dim, block_size, group, dtype)
    if need > THREADGROUP_MEMORY_LIMIT:
        return "threadgroup_memory", (
            f"needs {need} bytes of threadgroup memory (Q {group}x{head_dim} float, scores, one "
            f"{block_size}-token K/V block), over the {THREADGROUP_MEMORY_LIMIT}-byte limit")
    return None


def paged_illegal_reason(head_dim: int, block_size: int, group: int, dtype: str = "float16",
                         partition_size: int = PARTITION_SIZE) -> str | None:
    """Why the kernel's static_asserts reject this combination, or None when it compiles."""
    bad = paged_illegal(head_dim, block_size, group, dtype, partition_size)
    return None if bad is None else bad[1]


def paged_spec(head_dim: int, block_size: int, group: int, dtype: str = "float16",
               partition_size: int = PARTITION_SIZE) -> MetalSpec:
    """The paged_attention specialisation; ValueError with the reason for one the kernel rejects."""
    for value, name in ((head_dim, "head_dim"), (block_size, "block_size"), (group, "group"),
                        (partition_size, "partition_size")):
        _check_int(value, name)
    reason = paged_illegal_reason(head_dim, block_size, group, dtype, partition_size)
    if reason is not None:
        raise ValueError(f"paged_attention: {reason}")
    return MetalSpec.make(PAGED_KERNEL, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GQA_GROUP=group,
                          PARTITION_SIZE=partition_size, DTYPE=DTYPE_CODES[dtype])


def reduce_spec(head_dim: int, dtype: str = "float16", partition_size: int = PARTITION_SIZE) -> MetalSpec:
    """The paged_reduce specialisation."""
    _check_int(head_dim, "head_dim")
    _check_int(partition_size, "partition_size")
    _check_dtype(dtype)
    if head_dim <= 0 or head_dim % FRAG or head_dim > PAGED_MAX_HEAD_DIM:
        raise ValueError(f"head_dim: {head_dim} is not a multiple of {FRAG} in [{FRAG}, {PAGED_MAX_HEAD_DIM}]")
    if partition_size <= 0:
        raise ValueError(f"partition_size: must be positive, got {partition_size}")
    return MetalSpec.make(REDUCE_KERNEL, HEAD_DIM=head_dim, PARTITION_SIZE=partition_size, DTYPE=DTYPE_CODES[dtype])


def num_partitions(max_context: int, partition_size: int = PARTITION_SIZE) -> int:
    """Partitions per (sequence, head) for the longest context (at least 1: a grid is never empty)."""
    return max(1, ceil_div(max_context, partition_size))


def paged_dispatch(batch: int, num_kv_heads: int, partitions: int, head_dim: int, block_size: int, group: int,
                   dtype: str = "float16") -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """(threadgroups, threads per threadgroup, threadgroup bytes) of one paged_attention launch."""
    reason = paged_illegal_reason(head_dim, block_size, group, dtype)
    if reason is not None:
        raise ValueError(f"paged_attention: {reason}")
    return ((partitions, num_kv_heads, batch), (PAGED_THREADS, 1, 1),
            paged_threadgroup_bytes(head_dim, block_size, group, dtype))


def reduce_dispatch(batch: int, num_heads: int, partitions: int
                    ) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """(threadgroups, threads per threadgroup, threadgroup bytes) of one paged_reduce launch."""
    if not 1 <= partitions <= PAGED_MAX_PARTITIONS:
        raise ValueError(f"num_partitions: {partitions} not in [1, {PAGED_MAX_PARTITIONS}] "
                         "(ATTNPROTO_PAGED_MAX_PARTITIONS)")
    return (num_heads, batch, 1), (REDUCE_THREADS, 1, 1), reduce_threadgroup_bytes(partitions)


def budget_map(dtype: str = "float16") -> list[dict]:
    """AC-3.3: paged_attention's threadgroup memory at every seed block size x head dim x group,
    region by region, with whether it fits 32 KB and, if not, why the kernel rejects it."""
    rows = []
    for d, bs, g in itertools.product(HEAD_DIMS, BLOCK_SIZES, GQA_GROUPS):
        reason = paged_illegal_reason(d, bs, g, dtype)
        rows.append({"head_dim": d, "block_size": bs, "group": g, "dtype": dtype,
                     **{f"{k}_bytes": v for k, v in paged_threadgroup_regions(d, bs, g, dtype).items()},
                     "total_bytes": paged_threadgroup_bytes(d, bs, g, dtype),
                     "limit_bytes": THREADGROUP_MEMORY_LIMIT, "legal": reason is None, "reason": reason or ""})
    return rows


def proto3_specs() -> list[MetalSpec]:
    """Every paged specialisation Prototype 3 and its tests dispatch: the legal budget-map
    entries x dtype x PARTITION_SIZES, and the reduce per head dim x dtype x PARTITION_SIZES."""
    specs = [paged_spec(d, bs, g, dtype, part) for dtype in DTYPE_CODES for part in PARTITION_SIZES
             for d, bs, g in itertools.product(HEAD_DIMS, BLOCK_SIZES, GQA_GROUPS)
             if paged_illegal_reason(d, bs, g, dtype, part) is None]
    specs += [reduce_spec(d, dtype, part) for dtype in DTYPE_CODES for part in PARTITION_SIZES for d in HEAD_DIMS]
    return specs


def illegal_budget_entries(dtype: str = "float16") -> list[tuple[int, int, int]]:
    """(head_dim, block_size, group) of the budget map the kernel rejects (over 32 KB)."""
    return [(r["head_dim"], r["block_size"], r["group"]) for r in budget_map(dtype) if not r["legal"]]
