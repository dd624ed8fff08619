"""CPU backend: each experiment's algorithm as the GPU kernels run it, in float32 numpy.

This is not a reference (see :mod:`attnproto.ref` for the float64 ones): it
reproduces the kernels' order of operations so every experiment runs without
a GPU and so its numerical behaviour can be studied on the host.

* Inputs: numpy float16 / float32 arrays, bfloat16 arrays when the optional
  ``ml_dtypes`` package provides the dtype, or torch CPU tensors of those
  dtypes. They are widened to float32 (exact) and all arithmetic is float32,
  like the kernels' fp32 accumulators. Outputs are float32.
* ``p_dtype`` ("float16" / "bfloat16") rounds the probability tile P to that
  dtype before P @ V, as the tensor-core kernels do (the row sum l keeps the
  float32 P, as in FlashAttention-2).
* Layouts and conventions are the project's (shaders/common/attn_params.h):
  Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D], LSE [B, Hq, Nq] natural log,
  bottom-right causal alignment, rows that see no key give O = 0, LSE = -inf.
* NaN / inf follow the one policy written in :mod:`attnproto.ref` (module doc): the
  running max propagates NaN (numpy's maximum does), keys masked out for a row never
  reach it (not even through 0 * NaN in P @ V), and "this row saw no key" is decided
  from the mask geometry, not from l = 0, so a NaN row stays NaN. Unlike the GPU
  kernels, whose P V runs on whole tensor-core tiles, this follows the policy exactly.
* Linear attention: a ``chunk_size`` above the sequence length N is clamped to N (one
  chunk; the result and the state shapes are those of chunk_size = N); above
  :data:`attnproto.validate.MAX_CHUNK_SIZE` it is rejected.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np

from . import validate as _v
from .ref import DEFAULT_ALIBI_MAX_BIAS, DEFAULT_ROPE_THETA
from .ref import _check_slopes, _visible_matmul, rope_style

__all__ = [
    "CPU_DTYPES",
    "P_DTYPES",
    "numpy_dtype",
    "quantize",
    "round_to_bfloat16",
    "flash_forward",
    "partitioned_phase1",
    "reduce_partitions",
    "partitioned_forward",
    "paged_forward",
    "linear_chunk_h",
    "linear_chunk_o",
    "linear_attention",
]

# Input dtypes the CPU backend takes (those of the GPU kernels).
CPU_DTYPES: Tuple[str, ...] = _v.KERNEL_DTYPES
# Dtypes P may be rounded to before P @ V (the MMA operand types).
P_DTYPES: Tuple[str, ...] = _v.HALF_DTYPES

_F32 = np.float32
# bfloat16 keeps the upper 16 bits of a float32.
_BF16_DROPPED_BITS = 16
_BF16_ROUND_HALF = np.uint32((1 << (_BF16_DROPPED_BITS - 1)) - 1)   # 0x7FFF
_BF16_KEEP_MASK = np.uint32(0xFFFF0000)

Array = np.ndarray
KVLoader = Callable[[int, int], Tuple[Array, Array]]


# ---------------------------------------------------------------------- dtypes
def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a canonical name; bfloat16 needs the optional ``ml_dtypes`` package."""
    if name == "bfloat16":
        try:
            import ml_dtypes  # noqa: PLC0415  (optional dependency)
        except ImportError:
            raise TypeError("bfloat16 on the CPU backend needs the optional 'ml_dtypes' package "
                            "(pip install ml_dtypes); numpy has no bfloat16 of its own") from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in _v.FLOAT_DTYPES:
        raise TypeError(f"dtype: {name!r} not supported; expected one of "
                        f"{', '.join(_v.FLOAT_DTYPES)}")
    return np.dtype(name)


def quantize(x: Any, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and stored in it (how test inputs for a dtype are made)."""
    return np.asarray(x).astype(numpy_dtype(dtype))


def round_to_bfloat16(x: Array) -> Array:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept in float32.

    Pure numpy, so bfloat16 rounding of P does not need ml_dtypes. NaN stays NaN.
    """
    x = np.ascontiguousarray(x, dtype=_F32)
    bits = x.view(np.uint32)
    lsb = (bits >> np.uint32(_BF16_DROPPED_BITS)) & np.uint32(1)
    rounded = ((bits + _BF16_ROUND_HALF + lsb) & _BF16_KEEP_MASK).view(_F32)
    return np.where(np.isnan(x), x, rounded)


def _round_p(p: Array, p_dtype: Optional[str]) -> Array:
    if p_dtype is None:
        return p
    if p_dtype == "float16":
        return p.astype(np.float16).astype(_F32)
    return round_to_bfloat16(p)


def _check_p_dtype(p_dtype: Any) -> Optional[str]:
    if p_dtype is None:
        return None
    name = _v.dtype_name(p_dtype)
    if name not in P_DTYPES:
        raise TypeError(f"p_dtype: {name} not supported; expected None or one of "
                        f"{', '.join(P_DTYPES)}")
    return name


def _load(x: Any, name: str) -> Array:
    return np.ascontiguousarray(_v.to_host_numpy(x, name), dtype=_F32)


def _check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        _v.check_bool(value, name)


# ------------------------------------------------------------- position terms
def _alibi_slopes32(num_heads: int, max_bias: float) -> Array:
    exponent = -max_bias * np.arange(1, num_heads + 1, dtype=np.float64) / num_heads
    return np.exp2(exponent).astype(_F32)


def _rope32(x: Array, theta: float, positions: Array, style: str = "half") -> Array:
    """RoPE in float32 (rotate-half, or GPT-J's interleaved pairs): a float32 inverse-frequency
    table, float32 angles."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"q: RoPE needs an even head_dim, got {head_dim}")
    inv_freq = (theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)).astype(_F32)
    angle = positions.astype(_F32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    if style == "interleaved":
        out = np.empty_like(x)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ---------------------------------------------------------- the tiled core
def _flash_core(q: Array, load_kv: KVLoader, seq_k: int, *, key_offset: int, seq_kv_total: int,
                scale: float, block_r: int, block_c: int, causal: bool,
                slopes: Optional[Array], p_dtype: Optional[str], window: Optional[int] = None,
                softcap: Optional[float] = None) -> Tuple[Array, Array]:
    """FlashAttention-2 forward over keys [0, seq_k) of one KV range, float32.

    q [B, Hkv, G, Nq, D] (query heads grouped by their kv head). ``load_kv(j0, j1)``
    returns the K and V tiles [B, Hkv, 1, j1 - j0, D] of local keys j0..j1-1,
    whose global positions are key_offset + j. Query row i sits at position
    i + seq_kv_total - Nq. Returns O [B, Hkv, G, Nq, D] and LSE [B, Hkv, G, Nq].

    Query tiles are independent (one thread block each on a GPU), so all of
    them advance together through the key tiles; tile (t, j) is visited only
    when the last row of query tile t can see the first key of key tile j,
    i.e. exactly the tiles a causal FlashAttention-2 kernel does not skip; with a left
    ``window`` of W tokens a key tile is visited only by the query tiles whose first row's
    window reaches it (key tiles wholly left of every row's window are skipped, so the work
    scales with W). ``softcap`` turns scaled scores into softcap * tanh(score / softcap)
    before the ALiBi bias and the mask.
    Rows of a visited tile that see nothing of it keep their state bit for bit
    (rescale factor exactly 1, zero contributions), so this matches the
    tile-by-tile kernel.

    NaN / inf (policy in :mod:`attnproto.ref`): np.maximum and max propagate NaN, so a
    NaN score makes the running max NaN for good; P @ V leaves out the (row, key) pairs
    the causal mask hides, also where V is not finite (:func:`attnproto.ref._visible_matmul`;
    with finite V it is the plain product). A row "has a key" when the mask lets it see
    the first key of the range (geometry, not l > 0): such a row with l = 0 (all its
    visible scores were -inf) gives O = NaN, LSE = NaN; l = NaN stays NaN.
    """
    batch, hkv, group, seq_q, head_dim = q.shape
    m = np.full((batch, hkv, group, seq_q), -np.inf, dtype=_F32)
    l = np.zeros((batch, hkv, group, seq_q), dtype=_F32)
    acc = np.zeros((batch, hkv, group, seq_q, head_dim), dtype=_F32)
    q_pos = np.arange(seq_q, dtype=np.int64) + (seq_kv_total - seq_q)
    scale32 = _F32(scale)
    offset = seq_kv_total - seq_q                                 # position of query row 0
    for j0 in range(0, seq_k, block_c):
        j1 = min(j0 + block_c, seq_k)
        k_pos = np.arange(j0, j1, dtype=np.int64) + key_offset
        r0, r1 = 0, seq_q
        if causal:
            first_row = int(k_pos[0] - offset)                    # first row that sees key j0
            if first_row >= seq_q:
                break                                             # later key tiles: further right
            r0 = max(first_row, 0) // block_r * block_r
        if window is not None:
            # rows whose window (pos - W, pos] reaches the tile's last key: pos < k_last + W
            last_row = int(k_pos[-1]) + window - offset           # first row past the window
            r1 = min(seq_q, -(-max(last_row, 0) // block_r) * block_r)
            if r1 <= r0:
                continue                                          # left of every row's window
        rows = slice(r0, r1)
        k_tile, v_tile = load_kv(j0, j1)
        with np.errstate(invalid="ignore", over="ignore"):               # inf * 0, inf - inf
            s = (q[:, :, :, rows] @ np.swapaxes(k_tile, -1, -2)) * scale32  # [B, Hkv, G, R, C]
            if softcap is not None:
                cap32 = _F32(softcap)
                s = cap32 * np.tanh(s / cap32)
        if slopes is not None:
            dist = np.abs(q_pos[rows, None] - k_pos[None, :]).astype(_F32)
            s = s - slopes[None, :, :, None, None] * dist
        visible = None
        if causal:
            visible = k_pos[None, :] <= q_pos[rows, None]
        if window is not None:
            in_window = k_pos[None, :] > q_pos[rows, None] - window
            visible = in_window if visible is None else visible & in_window
        if visible is not None:
            s = np.where(visible, s, _F32(-np.inf))
        m_old = m[..., rows]
        m_new = np.maximum(m_old, s.max(axis=-1))            # NaN-propagating
        m_use = np.where(m_new == -np.inf, _F32(0), m_new)    # a row that saw nothing yet
        with np.errstate(invalid="ignore", over="ignore"):
            p = np.exp(s - m_use[..., None])
            alpha = np.exp(m_old - m_use)
            l[..., rows] = alpha * l[..., rows] + p.sum(axis=-1, dtype=_F32)
            acc[..., rows, :] = (alpha[..., None] * acc[..., rows, :]
                                 + _visible_matmul(_round_p(p, p_dtype), v_tile, visible))
        m[..., rows] = m_new
    # Row i sees a key of [key_offset, key_offset + seq_k) iff the range meets its visible
    # interval [pos - W + 1 (window), pos (causal)]: geometry, never l > 0.
    lo = np.maximum(key_offset, q_pos - window + 1) if window is not None else np.full(seq_q, key_offset)
    hi = np.minimum(key_offset + seq_k - 1, q_pos) if causal else np.full(seq_q, key_offset + seq_k - 1)
    has_key = (lo <= hi) & (seq_k > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(has_key[:, None], acc / l[..., None], _F32(0))   # key, l = 0: 0/0 = NaN
        lse = np.where(has_key, np.where(l > 0, m + np.log(l), _F32(np.nan)), _F32(-np.inf))
    return o.astype(_F32), lse.astype(_F32)


def _group_q(q: Array, num_kv_heads: int) -> Array:
    b, hq, n, d = q.shape
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, n, d)


def _ungroup(x: Array) -> Array:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _contiguous_loader(k: Array, v: Array) -> KVLoader:
    k5, v5 = k[:, :, None], v[:, :, None]
    return lambda j0, j1: (k5[..., j0:j1, :], v5[..., j0:j1, :])


def _head_slopes(alibi: bool, num_heads: int, num_kv_heads: int,
                 max_bias: float, slopes: Any = None) -> Optional[Array]:
    if not alibi:
        if slopes is not None:
            raise ValueError("alibi_slopes: given without alibi=True")
        return None
    if slopes is not None:
        m = _check_slopes(_v.to_host_numpy(slopes, "alibi_slopes"), num_heads).astype(_F32)
    else:
        m = _alibi_slopes32(num_heads, _v.check_real(max_bias, "alibi_max_bias"))
    return m.reshape(num_kv_heads, num_heads // num_kv_heads)


def _check_window_softcap(window: Any, softcap: Any) -> Tuple[Optional[int], Optional[float]]:
    from .ref import _check_softcap  # noqa: PLC0415  (the one definition of a legal cap)

    return (None if window is None else _v.check_positive_int(window, "window"),
            None if softcap is None else _check_softcap(softcap))


# ------------------------------------------------------------------ forward
def flash_forward(q: Any, k: Any, v: Any, *, block_r: int, block_c: int, causal: bool = False,
                  scale: Optional[float] = None, alibi: bool = False,
                  alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS, rope: bool = False,
                  rope_theta: float = DEFAULT_ROPE_THETA, p_dtype: Optional[str] = None,
                  window: Optional[int] = None, softcap: Optional[float] = None,
                  rope_offset: int = 0, alibi_slopes: Any = None
                  ) -> Tuple[Array, Array]:
    """FlashAttention-2 forward, tiled block_r x block_c; returns (O, LSE) float32.

    ``rope`` (True/"half" or "interleaved"), ``rope_offset`` and ``alibi_slopes`` follow
    :func:`attnproto.ref.attention`.

    ``window`` (a left sliding window of W tokens) and ``softcap`` (Gemma 2's
    cap * tanh(score / cap)) follow :func:`attnproto.ref.attention`.

    Online softmax per query row over key tiles of ``block_c``: running max m
    and sum l, rescale of the accumulator by exp(m_old - m_new), one final
    divide by l. Tails of any N are masked; causal tiles above the diagonal
    are skipped. ``rope`` rotates Q (row i at position i + Nkv - Nq) and K
    (row j at j) in float32 before the loop, as a fused kernel does on load.
    """
    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=CPU_DTYPES,
                                      device="cpu")
    block_r = _v.check_positive_int(block_r, "block_r")
    block_c = _v.check_positive_int(block_c, "block_c")
    scale = _v.check_scale(scale, shape.head_dim)
    _check_flags(alibi=alibi)
    style = rope_style(rope)
    rope_offset = _v.check_nonnegative_int(rope_offset, "rope_offset")
    p_dtype = _check_p_dtype(p_dtype)
    slopes = _head_slopes(alibi, shape.num_heads, shape.num_kv_heads, alibi_max_bias, alibi_slopes)
    q32, k32, v32 = _load(q, "q"), _load(k, "k"), _load(v, "v")
    if style is not None:
        theta = _v.check_real(rope_theta, "rope_theta", positive=True)
        q32 = _rope32(q32, theta, np.arange(shape.seq_q) + (rope_offset + shape.seq_kv - shape.seq_q), style)
        k32 = _rope32(k32, theta, np.arange(shape.seq_kv) + rope_offset, style)
    window, softcap = _check_window_softcap(window, softcap)
    o, lse = _flash_core(_group_q(q32, shape.num_kv_heads), _contiguous_loader(k32, v32),
                         shape.seq_kv, key_offset=0, seq_kv_total=shape.seq_kv, scale=scale,
                         block_r=block_r, block_c=block_c, causal=causal, slopes=slopes,
                         p_dtype=p_dtype, window=window, softcap=softcap)
    return _ungroup(o), _ungroup(lse)


# ------------------------------------------------------ two-phase (partitioned)
def partitioned_phase1(q: Any, k: Any, v: Any, *, partition_size: int,
                       block_c: Optional[int] = None, block_r: Optional[int] = None,
                       causal: bool = False, scale: Optional[float] = None, alibi: bool = False,
                       alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS,
                       p_dtype: Optional[str] = None) -> Tuple[Array, Array]:
    """Phase 1: each KV partition of ``partition_size`` keys on its own (float32).

    Within a partition the keys are walked in tiles of ``block_c`` (default:
    the whole partition) with the online softmax. Returns o_parts
    [B, Hq, Nq, P, D] (normalised within the partition) and lse_parts
    [B, Hq, Nq, P]; partitions a row cannot see give (0, -inf).
    """
    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=CPU_DTYPES,
                                      device="cpu")
    size = _v.check_partition_size(partition_size)
    block_c = size if block_c is None else _v.check_positive_int(block_c, "block_c")
    block_r = shape.seq_q if block_r is None else _v.check_positive_int(block_r, "block_r")
    scale = _v.check_scale(scale, shape.head_dim)
    _check_flags(alibi=alibi)
    p_dtype = _check_p_dtype(p_dtype)
    slopes = _head_slopes(alibi, shape.num_heads, shape.num_kv_heads, alibi_max_bias)
    q5 = _group_q(_load(q, "q"), shape.num_kv_heads)
    k32, v32 = _load(k, "k"), _load(v, "v")
    o_parts, lse_parts = [], []
    for start in range(0, shape.seq_kv, size):
        end = min(start + size, shape.seq_kv)
        o_p, lse_p = _flash_core(q5, _contiguous_loader(k32[:, :, start:end], v32[:, :, start:end]),
                                 end - start, key_offset=start, seq_kv_total=shape.seq_kv,
                                 scale=scale, block_r=block_r, block_c=block_c, causal=causal,
                                 slopes=slopes, p_dtype=p_dtype)
        o_parts.append(_ungroup(o_p))
        lse_parts.append(_ungroup(lse_p))
    return np.stack(o_parts, axis=-2), np.stack(lse_parts, axis=-1)


def reduce_partitions(o_parts: Any, lse_parts: Any) -> Tuple[Array, Array]:
    """Phase 2 in float32: weights exp(lse_p - max_p lse_p), O = sum w o_p / sum w.

    o_parts [..., P, D], lse_parts [..., P] (float32 or float64); returns
    (O [..., D], LSE [...]) float32, (0, -inf) where every partition is -inf.
    A partition with lse_p = -inf saw no key and is left out (its o_p is not read);
    otherwise NaN / inf follow the plain math, as :func:`attnproto.ref.reduce_partitions`.
    """
    oi = _v.check_tensor(o_parts, "o_parts", allowed_dtypes=("float32", "float64"),
                         contiguous_last_dim=False)
    li = _v.check_tensor(lse_parts, "lse_parts", allowed_dtypes=("float32", "float64"),
                         contiguous_last_dim=False)
    if oi.ndim < 2 or oi.shape[:-1] != li.shape:
        raise ValueError(f"lse_parts: shape {li.shape} does not match o_parts {oi.shape} "
                         f"([..., P] vs [..., P, D])")
    o32, lse32 = _load(o_parts, "o_parts"), _load(lse_parts, "lse_parts")
    part_seen = lse32 != -np.inf                          # partitions that saw a key
    seen = part_seen.any(axis=-1)
    m = lse32.max(axis=-1)                                # NaN-propagating
    m_use = np.where(seen, m, _F32(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = np.exp(lse32 - m_use[..., None])
        total = w.sum(axis=-1, dtype=_F32)
        terms = np.where(part_seen[..., None], w[..., None] * o32, _F32(0))
        o = terms.sum(axis=-2, dtype=_F32) / np.where(seen, total, _F32(1))[..., None]
        lse = np.where(seen, m_use + np.log(np.where(seen, total, _F32(1))), _F32(-np.inf))
    return np.where(seen[..., None], o, _F32(0)).astype(_F32), lse.astype(_F32)


def partitioned_forward(q: Any, k: Any, v: Any, *, partition_size: int,
                        block_c: Optional[int] = None, block_r: Optional[int] = None,
                        causal: bool = False, scale: Optional[float] = None, alibi: bool = False,
                        alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS,
                        p_dtype: Optional[str] = None) -> Tuple[Array, Array]:
    """Two-phase (split-KV) attention: :func:`partitioned_phase1` + :func:`reduce_partitions`."""
    return reduce_partitions(*partitioned_phase1(
        q, k, v, partition_size=partition_size, block_c=block_c, block_r=block_r, causal=causal,
        scale=scale, alibi=alibi, alibi_max_bias=alibi_max_bias, p_dtype=p_dtype))


# --------------------------------------------------------------------- paged KV
def _paged_loader(k_cache: Array, v_cache: Array, row: Array, block_size: int) -> KVLoader:
    """K/V tiles read through one block-table row, token by token, as the kernel addresses them."""
    def load(j0: int, j1: int) -> Tuple[Array, Array]:
        tokens = np.arange(j0, j1)
        blocks = row[tokens // block_size].astype(np.int64)
        slots = tokens % block_size
        k_tile = k_cache[blocks, :, slots]                    # [C, Hkv, D]
        v_tile = v_cache[blocks, :, slots]
        return (np.swapaxes(k_tile, 0, 1)[None, :, None].astype(_F32),
                np.swapaxes(v_tile, 0, 1)[None, :, None].astype(_F32))
    return load


def paged_forward(q: Any, k_cache: Any, v_cache: Any, block_table: Any, seq_lens: Any, *,
                  block_c: Optional[int] = None, block_r: Optional[int] = None,
                  causal: bool = False, scale: Optional[float] = None, alibi: bool = False,
                  alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS, p_dtype: Optional[str] = None,
                  alibi_slopes: Any = None, window: Optional[int] = None, softcap: Optional[float] = None
                  ) -> Tuple[Array, Array]:
    """Attention over a paged KV cache; returns (O [B, Hq, Nq, D], LSE [B, Hq, Nq]) float32.

    k_cache/v_cache [num_blocks, Hkv, block_size, D]; block_table int32
    [B, max_blocks_per_seq]; seq_lens int32 [B]. Token t of sequence b is read
    from block block_table[b, t // block_size], slot t % block_size, tile by
    tile (``block_c``, default block_size). Sequence b's Nq queries are its
    last Nq tokens (bottom-right: query i at position seq_lens[b] - Nq + i); a
    sequence of length 0 gives (0, -inf). ``alibi`` / ``alibi_slopes`` [Hq], ``window`` and
    ``softcap`` follow :func:`attnproto.ref.attention` at those positions (key tiles wholly
    left of every row's window are skipped, as in :func:`flash_forward`).
    """
    shape = _v.check_paged_inputs(q, k_cache, v_cache, block_table, seq_lens,
                                  allowed_dtypes=CPU_DTYPES, device="cpu")
    _check_flags(causal=causal, alibi=alibi)
    block_c = shape.block_size if block_c is None else _v.check_positive_int(block_c, "block_c")
    block_r = shape.seq_q if block_r is None else _v.check_positive_int(block_r, "block_r")
    scale = _v.check_scale(scale, shape.head_dim)
    p_dtype = _check_p_dtype(p_dtype)
    slopes = _head_slopes(alibi, shape.num_heads, shape.num_kv_heads, alibi_max_bias, alibi_slopes)
    window, softcap = _check_window_softcap(window, softcap)
    q5 = _group_q(_load(q, "q"), shape.num_kv_heads)
    kc, vc = _v.to_host_numpy(k_cache, "k_cache"), _v.to_host_numpy(v_cache, "v_cache")
    table = _v.to_host_numpy(block_table, "block_table")
    lens = _v.to_host_numpy(seq_lens, "seq_lens").astype(np.int64)
    o = np.zeros(q5.shape, dtype=_F32)
    lse = np.full(q5.shape[:-1], -np.inf, dtype=_F32)
    for b in range(shape.batch):
        length = int(lens[b])
        if length == 0:
            continue
        o_b, lse_b = _flash_core(q5[b:b + 1], _paged_loader(kc, vc, table[b], shape.block_size),
                                 length, key_offset=0, seq_kv_total=length, scale=scale,
                                 block_r=block_r, block_c=block_c, causal=causal, slopes=slopes,
                                 p_dtype=p_dtype, window=window, softcap=softcap)
        o[b], lse[b] = o_b[0], lse_b[0]
    return _ungroup(o), _ungroup(lse)


# ------------------------------------------------------------- linear attention
def _log_decay(gamma: Optional[Array], num_heads: int) -> Array:
    """log(gamma_h) in float32 (0 without decay); decay powers are exp(n log gamma)."""
    if gamma is None:
        return np.zeros(num_heads, dtype=_F32)
    return np.log(gamma).astype(_F32)


def _chunked(x: Array, chunk_size: int) -> Array:
    """[B, H, N, D] -> [B, H, num_chunks, chunk_size, D], zero-padded at the end."""
    b, h, n, d = x.shape
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    if pad:
        x = np.concatenate([x, np.zeros((b, h, pad, d), dtype=x.dtype)], axis=2)
    return x.reshape(b, h, num_chunks, chunk_size, d)


def _linear_setup(q, k, v, chunk_size, decay, names=("q", "k", "v")):
    """(shape, log decay, effective chunk size): chunk_size checked, then clamped to N.

    A chunk longer than the sequence holds the whole sequence either way (one chunk,
    zero-padded), so the clamp changes no result and no output shape, only how much
    padding is allocated: chunk_size = 10**5 on N = 50 would otherwise build 10**5 x 10**5
    intra-chunk matrices.
    """
    if chunk_size is None:
        raise TypeError("chunk_size: required (tokens per chunk)")
    shape, gamma = _v.check_linear_attention_inputs(q, k, v, allowed_dtypes=CPU_DTYPES,
                                                    chunk_size=chunk_size, decay=decay,
                                                    device="cpu", names=names)
    return shape, _log_decay(gamma, shape.num_heads), min(int(chunk_size), shape.seq_len)


def linear_chunk_h(k: Any, v: Any, *, chunk_size: int, decay: Any = None,
                   initial_state: Any = None, output_final_state: bool = False):
    """chunk_h kernel: states H[c] entering each chunk, float32 [B, H, num_chunks, Dk, Dv].

    Per-chunk contributions dS_c = K_c^T diag(gamma^(L_c-1-j)) V_c are one batched
    matmul (parallel over chunks); the inter-chunk prefix
    H[c+1] = gamma^L_c H[c] + dS_c is a sequential scan, as in the kernel.
    """
    shape, log_g, chunk_size = _linear_setup(k, k, v, chunk_size, decay, names=("k", "k", "v"))
    _check_flags(output_final_state=output_final_state)
    _v.check_state(initial_state, shape)
    kc = _chunked(_load(k, "k"), chunk_size)
    vc = _chunked(_load(v, "v"), chunk_size)
    num_chunks = kc.shape[2]
    lengths = np.minimum(chunk_size, shape.seq_len - chunk_size * np.arange(num_chunks))
    j = np.arange(chunk_size)
    steps = (lengths[:, None] - 1 - j[None, :]).astype(_F32)                     # [NC, C]
    weight = np.where(steps >= 0, np.exp(log_g[:, None, None] * steps[None]), _F32(0))
    contrib = np.swapaxes(kc * weight[None, :, :, :, None], -1, -2) @ vc       # [B,H,NC,Dk,Dv]
    chunk_decay = np.exp(log_g[:, None] * lengths[None, :].astype(_F32))      # [H, NC]
    state = (np.zeros((shape.batch, shape.num_heads, shape.key_dim, shape.value_dim), dtype=_F32)
             if initial_state is None else _load(initial_state, "initial_state"))
    states = np.empty_like(contrib)
    for c in range(num_chunks):
        states[:, :, c] = state
        state = chunk_decay[None, :, c, None, None] * state + contrib[:, :, c]
    return (states, state) if output_final_state else states


def linear_chunk_o(q: Any, k: Any, v: Any, states: Any, *, chunk_size: int,
                   scale: float = 1.0, decay: Any = None) -> Array:
    """chunk_o kernel: O_c = scale (diag(gamma^(i+1)) Q_c H[c] + (Q_c K_c^T * D) V_c), float32.

    D[i, j] = gamma^(i-j) for j <= i, else 0; all chunks in parallel.
    Returns O [B, H, N, Dv].
    """
    shape, log_g, chunk_size = _linear_setup(q, k, v, chunk_size, decay)
    scale = _v.check_real(scale, "scale")
    num_chunks = -(-shape.seq_len // chunk_size)
    expected = (shape.batch, shape.num_heads, num_chunks, shape.key_dim, shape.value_dim)
    si = _v.check_tensor(states, "states", ndim=5, allowed_dtypes=("float32", "float64"),
                         contiguous_last_dim=False)
    if si.shape != expected:
        raise ValueError(f"states: expected shape {expected} ([B, H, num_chunks, Dk, Dv]), got "
                         f"{si.shape}")
    qc, kc, vc = (_chunked(_load(x, n), chunk_size) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    i = np.arange(chunk_size)
    lag = (i[:, None] - i[None, :]).astype(_F32)
    intra = np.where(lag >= 0, np.exp(log_g[:, None, None] * np.maximum(lag, 0)[None]), _F32(0))
    inter = np.exp(log_g[:, None] * (i + 1).astype(_F32)[None, :])                # [H, C]
    o_inter = inter[None, :, None, :, None] * (qc @ _load(states, "states"))
    scores = (qc @ np.swapaxes(kc, -1, -2)) * intra[None, :, None]
    o = _F32(scale) * (o_inter + scores @ vc)
    return o.reshape(shape.batch, shape.num_heads, -1, shape.value_dim)[:, :, :shape.seq_len]


def linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                     decay: Any = None, initial_state: Any = None,
                     output_final_state: bool = False):
    """Chunked causal linear attention (chunk_h then chunk_o) in float32.

    q, k [B, H, N, Dk]; v [B, H, N, Dv]; decay None or gamma_h in (0, 1] per
    head; N need not be a multiple of ``chunk_size``, and a ``chunk_size`` above N
    is clamped to N (one chunk). Returns O [B, H, N, Dv]
    (and the final state [B, H, Dk, Dv] with ``output_final_state``).
    """
    _, _, chunk_size = _linear_setup(q, k, v, chunk_size, decay)
    _check_flags(output_final_state=output_final_state)
    states, final = linear_chunk_h(k, v, chunk_size=chunk_size, decay=decay,
                                   initial_state=initial_state, output_final_state=True)
    o = linear_chunk_o(q, k, v, states, chunk_size=chunk_size, scale=scale, decay=decay)
    return (o, final) if output_final_state else o
