"""Flash Attention forward and standalone RoPE on Metal (Apple GPU family 9).

Kernels: shaders/metal/flash_attention.metal (Prototype 1; the Prototype 7 variants RoPE,
ALiBi and a compile-time GQA group are function constants of the same kernel) and
shaders/metal/rope.metal. Specialisations, tile legality (32 KB of threadgroup memory) and
the launch geometry come from :mod:`attnproto.metal_specs`, the Python mirror of
shaders/metal/metal_bindings.h.

Inputs are host arrays: numpy float16, bfloat16 (``ml_dtypes``) or torch tensors of those
dtypes on the CPU or on MPS. They are copied into attnproto Metal buffers: the native
Metal backend binds only buffers it allocated (a DLPack tensor from torch MPS cannot be
passed without a copy; csrc/module.cpp takes device tensors from CUDA only). Outputs come
back as numpy: O in float16, or for bfloat16 as ``ml_dtypes.bfloat16`` when that package is
installed and float32 (an exact widening) otherwise; LSE float32 [B, Hq, Nq] (natural log;
-inf with an O row of 0 for a query that sees no key).

Conventions are the project's (shaders/common/attn_params.h): Q [B, Hq, Nq, D], K/V
[B, Hkv, Nkv, D], bottom-right aligned causal mask, rotate-half RoPE with K row j at
position j and Q row i at i + Nkv - Nq, ALiBi slope 2^(-max_bias (h+1) / Hq), a left sliding
window (``window``: query at position p sees keys j > p - window) and Gemma 2's logit soft cap
(``softcap``: score -> softcap * tanh(score / softcap), before ALiBi and the mask), as
:func:`attnproto.ref.attention` defines them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from .. import metal_specs as _ms
from .. import params as _params
from .. import validate as _v
from ..ref import DEFAULT_ALIBI_MAX_BIAS, DEFAULT_ROPE_THETA

__all__ = [
    "METAL_DTYPES",
    "MetalFlashProblem",
    "MetalLaunch",
    "check_metal_flash_inputs",
    "flash_launch_spec",
    "metal_flash_params",
    "prepare_flash_forward",
    "flash_forward",
    "time_flash_forward",
    "prepare_rope",
    "rope_forward",
    "encode_elements",
    "decode_elements",
]

METAL_DTYPES: Tuple[str, ...] = tuple(_ms.DTYPE_CODES)
# Devices whose tensors the op reads by copying through the host.
INPUT_DEVICES: Tuple[str, ...] = ("cpu", "mps")
LSE_DTYPE = np.float32
# Every Metal element type is stored as 16 bits; bfloat16 keeps the upper half of a float32.
_BITS_DTYPE = np.uint16
_BF16_SHIFT = 16
# The kernels index tokens with 32-bit ints.
MAX_SEQ_LEN = 2**31 - 1
# fill() byte that makes every float16 / bfloat16 / float32 output element a NaN, so an
# element the kernel fails to write cannot pass a comparison.
POISON_BYTE = 0xFF


# ------------------------------------------------------------------------ element bits
def encode_elements(x: Any, name: str, dtype: str) -> np.ndarray:
    """The contiguous 16-bit patterns of host-readable ``x`` (already of ``dtype``)."""
    arr = _v.to_host_numpy(x, name)
    if dtype == "float16":
        return np.ascontiguousarray(arr, dtype=np.float16).view(_BITS_DTYPE)
    if dtype == "bfloat16":
        # torch bfloat16 arrives widened to float32, ml_dtypes bfloat16 widens exactly: the
        # upper 16 bits are the bfloat16 value itself.
        wide = np.ascontiguousarray(arr, dtype=np.float32)
        return (wide.view(np.uint32) >> np.uint32(_BF16_SHIFT)).astype(_BITS_DTYPE)
    raise TypeError(f"{name}: dtype {dtype} not supported on Metal; expected one of "
                    f"{', '.join(METAL_DTYPES)}")


def decode_elements(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Host values of 16-bit patterns (see the module doc for bfloat16)."""
    bits = np.ascontiguousarray(bits, dtype=_BITS_DTYPE)
    if dtype == "float16":
        return bits.view(np.float16)
    if dtype == "bfloat16":
        wide = (bits.astype(np.uint32) << np.uint32(_BF16_SHIFT)).view(np.float32)
        try:
            import ml_dtypes  # noqa: PLC0415  (optional dependency)
        except ImportError:
            return wide
        return wide.astype(ml_dtypes.bfloat16)
    raise TypeError(f"dtype: {dtype} not supported on Metal; expected one of {', '.join(METAL_DTYPES)}")


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


# ------------------------------------------------------------------------ checks
def _check_real(value: Any, name: str, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0.0) or (non_negative and value < 0.0):
        need = " and positive" if positive else (" and >= 0" if non_negative else "")
        raise ValueError(f"{name}: must be finite{need}, got {value}")
    return value


def _check_devices(*pairs: Tuple[Any, str], devices: Tuple[str, ...] = INPUT_DEVICES) -> None:
    for x, name in pairs:
        device = _v.tensor_info(x, name).device
        if device not in devices:
            raise ValueError(f"{name}: on device '{device}'; this Metal path takes arrays on "
                             f"{' or '.join(devices)}")


def _check_backend(backend: Any) -> Any:
    if backend is None:
        from .. import backend as _backend  # noqa: PLC0415

        return _backend.get("metal")
    if getattr(backend, "name", None) != "metal":
        raise ValueError(f"backend: expected the metal backend, got {getattr(backend, 'name', backend)!r}")
    return backend


@dataclass(frozen=True)
class MetalFlashProblem:
    """Checked arguments of one Metal flash forward (tensors stay with the caller)."""

    shape: _v.AttentionShape
    causal: bool
    scale: float
    rope: bool
    rope_theta: float
    alibi: bool
    alibi_max_bias: float
    gqa_group: int      # GQA_GROUP function constant: 0 = read from the params at run time
    block_r: int
    block_c: int
    window: int = 0     # WINDOW constant on when > 0 (params.window)
    softcap: float = 0.0  # SOFTCAP constant on when > 0 (params.softcap)


def check_metal_flash_inputs(q: Any, k: Any, v: Any, *, causal: bool = False,
                             scale: Optional[float] = None, rope: bool = False,
                             rope_theta: float = DEFAULT_ROPE_THETA, alibi: bool = False,
                             alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS,
                             fixed_gqa_group: bool = False, block_r: Optional[int] = None,
                             block_c: Optional[int] = None, window: Optional[int] = None,
                             softcap: Optional[float] = None,
                             input_devices: Tuple[str, ...] = INPUT_DEVICES) -> MetalFlashProblem:
    """Check everything about a Metal flash forward; each error names its argument.

    ``input_devices``: where q, k and v may live (the native op: host or torch MPS;
    :mod:`attnproto.integrations.mlx`: MLX arrays).

    TypeError: non-tensor, dtype other than float16/bfloat16, mixed dtypes, non-bool flags,
    non-int tile sizes. ValueError: rank, shapes, Hq % Hkv, head_dim (a multiple of 8 in
    [8, 256]), device, negative strides, sequence length, non-finite scale/theta/bias, a
    tile the kernel rejects (over 32 KB of threadgroup memory or off the 8-row grid), a
    window that is not a positive int (up to 2^31 - 1), a soft cap that is not positive.
    """
    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=METAL_DTYPES,
                                      contiguous_last_dim=False)
    _check_devices((q, "q"), (k, "k"), (v, "v"), devices=input_devices)
    d = shape.head_dim
    if d % _ms.FRAG or d > _ms.MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {d} not supported by the Metal kernel; expected a multiple of "
                         f"{_ms.FRAG} in [{_ms.FRAG}, {_ms.MAX_HEAD_DIM}]")
    for n, name in ((shape.seq_q, "q"), (shape.seq_kv, "k")):
        if n > MAX_SEQ_LEN:
            raise ValueError(f"{name}: sequence length {n} exceeds {MAX_SEQ_LEN}")
    scale = _v.check_scale(scale, d)
    for flag, name in ((rope, "rope"), (alibi, "alibi"), (fixed_gqa_group, "fixed_gqa_group")):
        _v.check_bool(flag, name)
    rope_theta = _check_real(rope_theta, "rope_theta", positive=True)
    alibi_max_bias = _check_real(alibi_max_bias, "alibi_max_bias", non_negative=True)
    if window is not None:
        window = _v.check_positive_int(window, "window")
        if window > MAX_SEQ_LEN:
            raise ValueError(f"window: {window} exceeds {MAX_SEQ_LEN} (params.window is 32-bit)")
    if softcap is not None:
        softcap = _check_real(softcap, "softcap", positive=True)
    if (block_r is None) != (block_c is None):
        raise ValueError(f"{'block_c' if block_c is None else 'block_r'}: give both block_r and "
                         "block_c, or neither (the default tile)")
    if block_r is None:
        block_r, block_c = _ms.choose_flash_tile(d, shape.dtype, shape.seq_q)
    for value, name in ((block_r, "block_r"), (block_c, "block_c")):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    problem = MetalFlashProblem(shape, bool(causal), scale, bool(rope), rope_theta, bool(alibi),
                                alibi_max_bias, shape.group if fixed_gqa_group else 0,
                                int(block_r), int(block_c), window or 0, softcap or 0.0)
    flash_launch_spec(problem)  # raises ValueError for a tile the kernel rejects
    return problem


def flash_launch_spec(problem: MetalFlashProblem) -> _ms.MetalSpec:
    """The flash_attention specialisation (function constants) of a checked problem."""
    return _ms.flash_spec(problem.shape.head_dim, problem.block_r, problem.block_c,
                          problem.shape.dtype, causal=problem.causal, rope=problem.rope,
                          alibi=problem.alibi, gqa_group=problem.gqa_group,
                          window=problem.window > 0, softcap=problem.softcap > 0)


def metal_flash_params(problem: MetalFlashProblem) -> np.void:
    """AttentionParams for contiguous Q/K/V/O/LSE buffers (how the op uploads them)."""
    s = problem.shape
    q_shape = (s.batch, s.num_heads, s.seq_q, s.head_dim)
    kv_shape = (s.batch, s.num_kv_heads, s.seq_kv, s.head_dim)
    kv_stride = _contiguous_strides(kv_shape)[:3]
    q_stride = _contiguous_strides(q_shape)[:3]
    return _params.make_params(
        batch=s.batch, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, seq_q=s.seq_q,
        seq_kv=s.seq_kv, head_dim=s.head_dim, scale=problem.scale, rope_theta=problem.rope_theta,
        alibi_max_bias=problem.alibi_max_bias, window=problem.window, softcap=problem.softcap,
        q_stride=q_stride, k_stride=kv_stride,
        v_stride=kv_stride, o_stride=q_stride,
        lse_stride=_contiguous_strides((s.batch, s.num_heads, s.seq_q))[:2])


# ------------------------------------------------------------------------ launches
@dataclass
class MetalLaunch:
    """One prepared Metal dispatch with its device buffers; replayable for timing."""

    backend: Any
    kernel: Any
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_bytes: int
    args: list
    outputs: Tuple[Tuple[Any, Any, Tuple[int, ...]], ...]   # (buffer, numpy dtype, shape)
    dtype: str
    spec: _ms.MetalSpec

    def launch(self) -> "MetalLaunch":
        self.backend.launch(self.kernel, grid=self.grid, block=self.block, args=self.args,
                            shared_bytes=self.shared_bytes)
        return self

    def result(self) -> Tuple[np.ndarray, ...]:
        """Download the outputs (waits for the GPU); 16-bit outputs decoded to host values."""
        self.backend.synchronize()
        out = []
        for buf, dtype, shape in self.outputs:
            host = self.backend.to_numpy(buf, dtype, shape)
            out.append(decode_elements(host, self.dtype) if dtype == _BITS_DTYPE else host)
        return tuple(out)

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False):
        """GPU time of the dispatch (TimingStats: median_ms, p10_ms, p90_ms, cv, ...)."""
        return self.backend.time_launch(self.kernel, self.grid, self.block, self.args,
                                        shared_bytes=self.shared_bytes, warmup=warmup, iters=iters,
                                        flush_l2=flush_l2)


def _output_buffer(backend: Any, nbytes: int) -> Any:
    buf = backend.alloc(nbytes)
    backend.fill(buf, POISON_BYTE)
    return buf


def prepare_flash_forward(q: Any, k: Any, v: Any, *, causal: bool = False,
                          scale: Optional[float] = None, rope: bool = False,
                          rope_theta: float = DEFAULT_ROPE_THETA, alibi: bool = False,
                          alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS,
                          fixed_gqa_group: bool = False, block_r: Optional[int] = None,
                          block_c: Optional[int] = None, window: Optional[int] = None,
                          softcap: Optional[float] = None, backend: Any = None) -> MetalLaunch:
    """Check, upload, specialise: the flash_attention dispatch to launch or time.

    ``fixed_gqa_group`` compiles the GQA group (Hq / Hkv) into the kernel (function constant
    GQA_GROUP) instead of reading it from the params. ``window`` (tokens) / ``softcap`` turn on
    the WINDOW / SOFTCAP constants with that value. ``block_r``/``block_c`` default to
    :func:`attnproto.metal_specs.choose_flash_tile`. Outputs are poisoned with NaN until the
    kernel writes them.
    """
    problem = check_metal_flash_inputs(q, k, v, causal=causal, scale=scale, rope=rope,
                                       rope_theta=rope_theta, alibi=alibi,
                                       alibi_max_bias=alibi_max_bias,
                                       fixed_gqa_group=fixed_gqa_group, block_r=block_r,
                                       block_c=block_c, window=window, softcap=softcap)
    backend = _check_backend(backend)
    s = problem.shape
    spec = flash_launch_spec(problem)
    grid, block, shared = _ms.flash_dispatch(s.batch, s.num_heads, s.seq_q, problem.block_r,
                                             s.head_dim, problem.block_c, s.dtype)
    kernel = backend.kernel(spec.name, **spec.as_dict())
    allowed = int(kernel.resources["max_threads_per_block"])
    if block[0] > allowed:
        raise ValueError(f"block_r: {problem.block_r} rows need {block[0]} threads per threadgroup; the "
                         f"{spec} pipeline allows {allowed} on this device: choose a smaller block_r")
    inputs = [backend.from_numpy(encode_elements(x, name, s.dtype)) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    o_shape = (s.batch, s.num_heads, s.seq_q, s.head_dim)
    lse_shape = o_shape[:3]
    o_buf = _output_buffer(backend, math.prod(o_shape) * np.dtype(_BITS_DTYPE).itemsize)
    lse_buf = _output_buffer(backend, math.prod(lse_shape) * np.dtype(LSE_DTYPE).itemsize)
    args = [metal_flash_params(problem), *inputs, o_buf, lse_buf]
    return MetalLaunch(backend, kernel, grid, block, shared, args,
                       ((o_buf, _BITS_DTYPE, o_shape), (lse_buf, LSE_DTYPE, lse_shape)), s.dtype, spec)


def flash_forward(q: Any, k: Any, v: Any, **kwargs: Any) -> Tuple[np.ndarray, np.ndarray]:
    """softmax(softcap(scale Q K^T) + ALiBi, masked) V on the Metal GPU; returns host (O, LSE).

    Keyword arguments are those of :func:`prepare_flash_forward`.
    """
    o, lse = prepare_flash_forward(q, k, v, **kwargs).launch().result()
    return o, lse


def time_flash_forward(q: Any, k: Any, v: Any, *, warmup: int = 4, iters: int = 50,
                       flush_l2: bool = False, **kwargs: Any):
    """GPU timing (TimingStats) of the dispatch :func:`prepare_flash_forward` builds."""
    return prepare_flash_forward(q, k, v, **kwargs).time(warmup=warmup, iters=iters, flush_l2=flush_l2)


def prepare_rope(x: Any, *, theta: float = DEFAULT_ROPE_THETA, backend: Any = None) -> MetalLaunch:
    """The standalone rope dispatch for x [B, H, N, D]: token n rotated at position n."""
    info = _v.check_tensor(x, "x", ndim=4, allowed_dtypes=METAL_DTYPES, contiguous_last_dim=False)
    _check_devices((x, "x"))
    batch, heads, tokens, head_dim = info.shape
    if head_dim % 2:
        raise ValueError(f"x: RoPE needs an even head_dim, got {head_dim}")
    if tokens > MAX_SEQ_LEN:
        raise ValueError(f"x: {tokens} tokens exceed {MAX_SEQ_LEN}")
    theta = _check_real(theta, "theta", positive=True)
    backend = _check_backend(backend)
    spec = _ms.rope_spec(head_dim, info.dtype)
    kernel = backend.kernel(spec.name, **spec.as_dict())
    max_threads = min(_ms.ROPE_THREADGROUP_THREADS, int(kernel.resources["max_threads_per_block"]))
    grid, block = _ms.rope_dispatch(batch, heads, tokens, head_dim, max_threads)
    strides = _contiguous_strides(info.shape)[:3]
    params = _params.make_params(batch=batch, num_heads=heads, seq_q=tokens, head_dim=head_dim,
                                 rope_theta=theta, q_stride=strides, o_stride=strides)
    x_buf = backend.from_numpy(encode_elements(x, "x", info.dtype))
    y_buf = _output_buffer(backend, math.prod(info.shape) * np.dtype(_BITS_DTYPE).itemsize)
    return MetalLaunch(backend, kernel, grid, block, 0, [params, x_buf, y_buf],
                       ((y_buf, _BITS_DTYPE, info.shape),), info.dtype, spec)


def rope_forward(x: Any, *, theta: float = DEFAULT_ROPE_THETA, backend: Any = None) -> np.ndarray:
    """Rotate-half RoPE of x [B, H, N, D] on the Metal GPU (as attnproto.ref.rope); host result."""
    (y,) = prepare_rope(x, theta=theta, backend=backend).launch().result()
    return y
