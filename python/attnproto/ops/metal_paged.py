"""Paged decode attention on Metal (Apple GPU family 9): Prototype 3's two-phase
(PagedAttention V2) kernels shaders/metal/paged_attention.metal and paged_reduce.metal.

Statically checked on Linux, never run on Apple hardware: no number of this op exists
until a Mac runs it. On Linux it is exercised only through the tests' numpy stand-in backend.

Layouts (the CUDA side's): query Q [B, Hq, D]; caches k_cache, v_cache
[num_blocks, block_size, Hkv, D]; block table int32 [B, max_blocks]; context lengths int32
[B]. Token t of sequence b is slot t % block_size of cache block block_table[b, t // block_size];
sequence b's query attends its first context_lens[b] tokens (a decode step: the query is the
newest token, already written to the cache). GQA: Hq / Hkv query heads (at most 8) share a KV
head and one phase-1 threadgroup. Returns host O [B, Hq, D] (the element type, decoded as in
:mod:`attnproto.ops.metal_flash`) and LSE float32 [B, Hq] (natural log; -inf and O = 0 for a
context of 0). Every argument is checked before anything is uploaded or dispatched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from .. import metal_paged_specs as _ps
from .. import params as _params
from .. import validate as _v
from .metal_flash import (
    _BITS_DTYPE,
    LSE_DTYPE,
    METAL_DTYPES,
    _check_backend,
    _check_devices,
    _output_buffer,
    decode_elements,
    encode_elements,
)

__all__ = [
    "INDEX_DTYPE",
    "MetalPagedProblem",
    "MetalPagedLaunch",
    "check_metal_paged_inputs",
    "paged_launch_specs",
    "paged_params",
    "prepare_paged_decode",
    "paged_decode",
]

# Block table and context lengths: int32, as the kernels read them (device const int*).
INDEX_DTYPE = "int32"
PARTS_DTYPE = np.float32
# The argument that carries each quantity metal_paged_specs.paged_illegal can reject.
_ILLEGAL_ARGUMENT = {"head_dim": "q", "group": "q", "block_size": "k_cache",
                     "threadgroup_memory": "k_cache", "partition_size": "partition_size"}


@dataclass(frozen=True)
class MetalPagedProblem:
    """Checked arguments of one Metal paged decode (tensors stay with the caller)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int
    dtype: str
    scale: float
    partition_size: int
    max_context: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_partitions(self) -> int:
        return _ps.num_partitions(self.max_context, self.partition_size)


def _check_index(x: Any, name: str, ndim: int):
    info = _v.check_tensor(x, name, ndim=ndim, contiguous_last_dim=False)
    if info.dtype != INDEX_DTYPE:
        raise TypeError(f"{name}: dtype {info.dtype} not supported; the kernels read {INDEX_DTYPE}")
    _check_devices((x, name))
    return info


def check_metal_paged_inputs(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                             scale: Optional[float] = None,
                             partition_size: int = _ps.PARTITION_SIZE) -> MetalPagedProblem:
    """Check everything about a Metal paged decode; each error names its argument.

    TypeError: dtypes (Q/caches float16 or bfloat16 and equal; indices int32), non-int
    partition size. ValueError: ranks and shapes, Hq % Hkv, a GQA group over 8, head_dim,
    a block size the kernel rejects (its reason, e.g. over 32 KB of threadgroup memory), a
    context length < 0 or over the table's capacity, a block id outside the cache, too many
    partitions, device, non-finite scale.
    """
    qi = _v.check_tensor(q, "q", ndim=3, allowed_dtypes=METAL_DTYPES)
    ki = _v.check_tensor(k_cache, "k_cache", ndim=4, allowed_dtypes=METAL_DTYPES)
    vi = _v.check_tensor(v_cache, "v_cache", ndim=4, allowed_dtypes=METAL_DTYPES)
    _check_devices((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"))
    for info in (ki, vi):
        if info.dtype != qi.dtype:
            raise TypeError(f"{info.name}: dtype {info.dtype} does not match q dtype {qi.dtype}")
    if vi.shape != ki.shape:
        raise ValueError(f"v_cache: shape {vi.shape} does not match k_cache shape {ki.shape}")
    batch, num_heads, head_dim = qi.shape
    num_blocks, block_size, num_kv_heads, cache_dim = ki.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache: head_dim {cache_dim} does not match q head_dim {head_dim} "
                         "(caches are [num_blocks, block_size, Hkv, D])")
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} query heads are not a multiple of k_cache's {num_kv_heads} KV heads")
    if isinstance(partition_size, bool) or not isinstance(partition_size, int):
        raise TypeError(f"partition_size: expected an int, got {type(partition_size).__name__}")
    group = num_heads // num_kv_heads
    bad = _ps.paged_illegal(head_dim, block_size, group, qi.dtype, partition_size)
    if bad is not None:
        raise ValueError(f"{_ILLEGAL_ARGUMENT[bad[0]]}: the paged kernel rejects this problem: {bad[1]}")
    scale = _v.check_scale(scale, head_dim)

    ti = _check_index(block_table, "block_table", 2)
    li = _check_index(context_lens, "context_lens", 1)
    if ti.shape[0] != batch:
        raise ValueError(f"block_table: {ti.shape[0]} rows do not match q's batch {batch}")
    if li.shape[0] != batch:
        raise ValueError(f"context_lens: {li.shape[0]} entries do not match q's batch {batch}")
    max_blocks = ti.shape[1]
    table = _v.to_host_numpy(block_table, "block_table").astype(np.int64)
    lens = _v.to_host_numpy(context_lens, "context_lens").astype(np.int64)
    capacity = max_blocks * block_size
    for b in range(batch):
        if not 0 <= lens[b] <= capacity:
            raise ValueError(f"context_lens[{b}] = {lens[b]} out of range [0, {capacity}] (block_table has "
                             f"{max_blocks} entries per sequence x block_size {block_size})")
        used = -(-int(lens[b]) // block_size)
        bad = np.nonzero((table[b, :used] < 0) | (table[b, :used] >= num_blocks))[0]
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"block_table[{b}, {j}] = {table[b, j]} is not a block of the cache "
                             f"[0, {num_blocks})")
    max_context = int(lens.max())
    parts = _ps.num_partitions(max_context, partition_size)
    if parts > _ps.PAGED_MAX_PARTITIONS:
        raise ValueError(f"context_lens: the longest context ({max_context}) needs {parts} partitions of "
                         f"{partition_size}; the reduce takes at most {_ps.PAGED_MAX_PARTITIONS}")
    return MetalPagedProblem(batch, num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks,
                             qi.dtype, scale, partition_size, max_context)


def paged_launch_specs(problem: MetalPagedProblem):
    """(paged_attention spec, paged_reduce spec) of a checked problem."""
    return (_ps.paged_spec(problem.head_dim, problem.block_size, problem.group, problem.dtype,
                           problem.partition_size),
            _ps.reduce_spec(problem.head_dim, problem.dtype, problem.partition_size))


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))


def paged_params(problem: MetalPagedProblem) -> np.void:
    """AttentionParams for contiguous buffers as the op uploads them: Q [B, Hq, D] (q_stride
    {b, h, -}), caches [num_blocks, block_size, Hkv, D] (k/v_stride {block, kv head, token}),
    O [B, Hq, D] (o_stride), LSE [B, Hq] (lse_stride); num_blocks bounds the table entries."""
    p = problem
    q_b, q_h, _ = _contiguous_strides((p.batch, p.num_heads, p.head_dim))
    c_block, c_token, c_head, _ = _contiguous_strides((p.num_blocks, p.block_size, p.num_kv_heads, p.head_dim))
    cache_stride = (c_block, c_head, c_token)
    return _params.make_params(
        batch=p.batch, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads, seq_q=1, seq_kv=p.max_context,
        head_dim=p.head_dim, scale=p.scale, q_stride=(q_b, q_h, 0), k_stride=cache_stride,
        v_stride=cache_stride, o_stride=(q_b, q_h, 0), lse_stride=(p.num_heads, 1),
        block_size=p.block_size, max_blocks_per_seq=p.max_blocks, num_partitions=p.num_partitions,
        partition_size=p.partition_size, num_blocks=p.num_blocks)


@dataclass
class MetalPagedLaunch:
    """The two prepared dispatches (partition, reduce) with their buffers; replayable for timing."""

    backend: Any
    problem: MetalPagedProblem
    launches: Tuple[Tuple[Any, Tuple[int, int, int], Tuple[int, int, int], list, int], ...]
    outputs: Tuple[Tuple[Any, Any, Tuple[int, ...]], ...]   # (buffer, numpy dtype, shape)
    specs: Tuple[Any, Any]

    def launch(self) -> "MetalPagedLaunch":
        for kernel, grid, block, args, shared in self.launches:
            self.backend.launch(kernel, grid=grid, block=block, args=args, shared_bytes=shared)
        return self

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """(O [B, Hq, D], LSE [B, Hq]) on the host (waits for the GPU)."""
        self.backend.synchronize()
        (o_buf, o_dtype, o_shape), (l_buf, l_dtype, l_shape) = self.outputs
        o = decode_elements(self.backend.to_numpy(o_buf, o_dtype, o_shape), self.problem.dtype)
        return o, self.backend.to_numpy(l_buf, l_dtype, l_shape)

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False):
        """GPU time of both dispatches issued back to back (TimingStats)."""
        return self.backend.time_sequence(list(self.launches), warmup=warmup, iters=iters, flush_l2=flush_l2)


def prepare_paged_decode(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                         scale: Optional[float] = None, partition_size: int = _ps.PARTITION_SIZE,
                         backend: Any = None) -> MetalPagedLaunch:
    """Check, upload, specialise: the paged decode dispatches to launch or time.

    Outputs (the final O and LSE, and the per-partition parts) are poisoned with NaN until a
    kernel writes them.
    """
    problem = check_metal_paged_inputs(q, k_cache, v_cache, block_table, context_lens, scale=scale,
                                       partition_size=partition_size)
    backend = _check_backend(backend)
    p = problem
    paged_spec, reduce_spec = paged_launch_specs(p)
    parts = p.num_partitions
    grid1, block1, shared1 = _ps.paged_dispatch(p.batch, p.num_kv_heads, parts, p.head_dim, p.block_size,
                                                p.group, p.dtype)
    grid2, block2, shared2 = _ps.reduce_dispatch(p.batch, p.num_heads, parts)
    k1 = backend.kernel(paged_spec.name, **paged_spec.as_dict())
    k2 = backend.kernel(reduce_spec.name, **reduce_spec.as_dict())
    for kern, block, spec in ((k1, block1, paged_spec), (k2, block2, reduce_spec)):
        allowed = int(kern.resources["max_threads_per_block"])
        if block[0] > allowed:
            raise ValueError(f"backend: {spec} needs {block[0]} threads per threadgroup; this device's pipeline "
                             f"allows {allowed}")
    q_buf, k_buf, v_buf = (backend.from_numpy(encode_elements(x, n, p.dtype))
                           for x, n in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")))
    table_buf = backend.from_numpy(np.ascontiguousarray(_v.to_host_numpy(block_table, "block_table"), np.int32))
    lens_buf = backend.from_numpy(np.ascontiguousarray(_v.to_host_numpy(context_lens, "context_lens"), np.int32))
    item = np.dtype(PARTS_DTYPE).itemsize
    o_parts = _output_buffer(backend, p.batch * p.num_heads * parts * p.head_dim * item)
    lse_parts = _output_buffer(backend, p.batch * p.num_heads * parts * item)
    o_shape, lse_shape = (p.batch, p.num_heads, p.head_dim), (p.batch, p.num_heads)
    o_buf = _output_buffer(backend, math.prod(o_shape) * np.dtype(_BITS_DTYPE).itemsize)
    lse_buf = _output_buffer(backend, math.prod(lse_shape) * np.dtype(LSE_DTYPE).itemsize)
    params = paged_params(p)
    launches = ((k1, grid1, block1, [params, q_buf, k_buf, v_buf, table_buf, lens_buf, o_parts, lse_parts], shared1),
                (k2, grid2, block2, [params, o_parts, lse_parts, lens_buf, o_buf, lse_buf], shared2))
    return MetalPagedLaunch(backend, p, launches, ((o_buf, _BITS_DTYPE, o_shape), (lse_buf, LSE_DTYPE, lse_shape)),
                            (paged_spec, reduce_spec))


def paged_decode(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any,
                 **kwargs: Any) -> Tuple[np.ndarray, np.ndarray]:
    """One decode step of attention over a paged KV cache on the Metal GPU; host (O, LSE).

    Keyword arguments are those of :func:`prepare_paged_decode`.
    """
    return prepare_paged_decode(q, k_cache, v_cache, block_table, context_lens, **kwargs).launch().result()
