"""Chunked causal linear attention on Metal (Apple GPU family 9): Prototype 6's two passes,
shaders/metal/linear_chunk_h.metal (states entering each chunk, FP32) and linear_chunk_o.metal
(outputs), FLA's chunk_h / chunk_o without decay.

Statically checked on Linux, never run on Apple hardware: no number of this op exists until a Mac
runs it. On Linux it is exercised only through the tests' numpy stand-in backend.

o_t = scale * q_t sum_{s <= t} k_s^T v_s for q, k, v [B, H, N, D] (one head dim for keys and
values), as attnproto.ref.linear_attention_recurrent without decay. Returns host O [B, H, N, D] in
the element type (decoded as in :mod:`attnproto.ops.metal_flash`); ``MetalLinearLaunch.result``
also returns the states [B, H, num_chunks, D, D] (float32). Every argument is checked before
anything is uploaded or dispatched.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np

from .. import metal_linear_specs as _ls
from .. import params as _params
from .. import validate as _v
from .metal_flash import (
    _BITS_DTYPE,
    MAX_SEQ_LEN,
    METAL_DTYPES,
    _check_backend,
    _check_devices,
    _check_real,
    _contiguous_strides,
    _output_buffer,
    decode_elements,
    encode_elements,
)

__all__ = ["MetalLinearProblem", "MetalLinearLaunch", "check_metal_linear_inputs", "linear_params",
           "prepare_linear_attention", "linear_attention"]

STATES_DTYPE = np.float32


@dataclass(frozen=True)
class MetalLinearProblem:
    batch: int
    num_heads: int
    seq_len: int
    head_dim: int
    dtype: str
    chunk_size: int
    scale: float

    @property
    def num_chunks(self) -> int:
        return -(-self.seq_len // self.chunk_size)


def check_metal_linear_inputs(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0) -> MetalLinearProblem:
    """Check everything about a Metal linear-attention forward; each error names its argument.

    TypeError: dtypes (float16/bfloat16, equal), non-int chunk size. ValueError: ranks, shapes (q,
    k and v all [B, H, N, D]), a head dim or chunk size the kernels reject (with the reason),
    sequence length, device, non-finite scale.
    """
    infos = [_v.check_tensor(x, n, ndim=4, allowed_dtypes=METAL_DTYPES) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    _check_devices((q, "q"), (k, "k"), (v, "v"))
    qi = infos[0]
    for info in infos[1:]:
        if info.dtype != qi.dtype:
            raise TypeError(f"{info.name}: dtype {info.dtype} does not match q dtype {qi.dtype}")
        if info.shape != qi.shape:
            raise ValueError(f"{info.name}: shape {info.shape} does not match q shape {qi.shape} (the Metal "
                             "kernels take one head dim for keys and values)")
    batch, heads, n, d = qi.shape
    if n > MAX_SEQ_LEN:
        raise ValueError(f"q: sequence length {n} exceeds {MAX_SEQ_LEN}")
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size: expected an int, got {type(chunk_size).__name__}")
    reason = _ls.illegal_reason(d, int(chunk_size), qi.dtype)
    if reason is not None:
        raise ValueError(f"{'q' if reason.startswith('head_dim') else 'chunk_size'}: the Metal kernels reject "
                         f"this problem: {reason}")
    scale = _check_real(scale, "scale")
    return MetalLinearProblem(batch, heads, n, d, qi.dtype, int(chunk_size), scale)


def linear_params(problem: MetalLinearProblem) -> np.void:
    """AttentionParams for contiguous [B, H, N, D] buffers as the op uploads them."""
    p = problem
    strides = _contiguous_strides((p.batch, p.num_heads, p.seq_len, p.head_dim))[:3]
    return _params.make_params(batch=p.batch, num_heads=p.num_heads, seq_q=p.seq_len, head_dim=p.head_dim,
                               scale=p.scale, q_stride=strides, k_stride=strides, v_stride=strides,
                               o_stride=strides, chunk_size=p.chunk_size)


@dataclass
class MetalLinearLaunch:
    """The two prepared dispatches (chunk_h, chunk_o) and their buffers; replayable for timing."""

    backend: Any
    problem: MetalLinearProblem
    launches: Tuple[Tuple[Any, Tuple[int, int, int], Tuple[int, int, int], list, int], ...]
    o_buf: Any
    states_buf: Any
    specs: Tuple[Any, Any]

    def launch(self) -> "MetalLinearLaunch":
        for kernel, grid, block, args, shared in self.launches:
            self.backend.launch(kernel, grid=grid, block=block, args=args, shared_bytes=shared)
        return self

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """(O [B, H, N, D], states [B, H, num_chunks, D, D] float32) on the host."""
        self.backend.synchronize()
        p = self.problem
        o = self.backend.to_numpy(self.o_buf, _BITS_DTYPE, (p.batch, p.num_heads, p.seq_len, p.head_dim))
        states = self.backend.to_numpy(self.states_buf, STATES_DTYPE,
                                       (p.batch, p.num_heads, p.num_chunks, p.head_dim, p.head_dim))
        return decode_elements(o, p.dtype), states

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False):
        """GPU time of both passes issued back to back (TimingStats)."""
        return self.backend.time_sequence(list(self.launches), warmup=warmup, iters=iters, flush_l2=flush_l2)


def prepare_linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                             backend: Any = None) -> MetalLinearLaunch:
    """Check, upload, specialise: the two passes to launch or time (outputs NaN-poisoned until written)."""
    p = check_metal_linear_inputs(q, k, v, chunk_size=chunk_size, scale=scale)
    backend = _check_backend(backend)
    spec_h, spec_o = _ls.linear_specs(p.head_dim, p.chunk_size, p.dtype)
    (grid_h, block_h, smem_h), (grid_o, block_o, smem_o) = _ls.dispatch(p.batch, p.num_heads, p.seq_len,
                                                                         p.head_dim, p.dtype)
    kernels = []
    for spec, block in ((spec_h, block_h), (spec_o, block_o)):
        kern = backend.kernel(spec.name, **spec.as_dict())
        allowed = int(kern.resources["max_threads_per_block"])
        if block[0] > allowed:
            raise ValueError(f"q: head_dim {p.head_dim} needs {block[0]} threads per {spec.name} threadgroup; "
                             f"this device's pipeline allows {allowed}")
        kernels.append(kern)
    q_buf, k_buf, v_buf = (backend.from_numpy(encode_elements(x, n, p.dtype)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    states = _output_buffer(backend, p.batch * p.num_heads * p.num_chunks * p.head_dim ** 2 *
                            np.dtype(STATES_DTYPE).itemsize)
    o_buf = _output_buffer(backend, math.prod((p.batch, p.num_heads, p.seq_len, p.head_dim)) *
                           np.dtype(_BITS_DTYPE).itemsize)
    params = linear_params(p)
    launches = ((kernels[0], grid_h, block_h, [params, k_buf, v_buf, states], smem_h),
                (kernels[1], grid_o, block_o, [params, q_buf, k_buf, v_buf, states, o_buf], smem_o))
    return MetalLinearLaunch(backend, p, launches, o_buf, states, (spec_h, spec_o))


def linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                     backend: Any = None) -> np.ndarray:
    """Chunked causal linear attention on the Metal GPU (chunk_h then chunk_o); host O [B, H, N, D]."""
    o, _ = prepare_linear_attention(q, k, v, chunk_size=chunk_size, scale=scale, backend=backend).launch().result()
    return o
