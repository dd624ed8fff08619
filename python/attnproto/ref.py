"""FP64 CPU references for every attention variant attnproto implements.

Everything here converts its inputs to float64 and computes the textbook
formula with numpy, without tiling, so it can judge the kernels and the tiled
CPU backend (:mod:`attnproto.cpu`). Inputs may be numpy arrays of any real
dtype (bfloat16 through ml_dtypes), array-likes, or torch tensors (converted
on the host; torch is never imported here).

Project conventions (see shaders/common/attn_params.h):

* Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D], O like Q, LSE [B, Hq, Nq] (natural log);
  query head h reads kv head h // (Hq / Hkv).
* Causal masking is bottom-right aligned: query row i sits at position
  i + Nkv - Nq and sees keys j <= that position. A row that sees no key has
  O = 0 and LSE = -inf.
* RoPE "rotate half": pairs (i, i + D/2), frequency theta^(-2i/D).
* ALiBi slope of head h (0-based) 2^(-max_bias (h+1) / Hq), bias -slope |pos_q - pos_k|.
* Inputs must have a floating-point dtype: int, bool, complex and object arrays are
  rejected with a TypeError naming the argument (integer arrays are taken only where
  they are indices or positions: block tables, seq_lens, RoPE positions).

NaN / inf policy (the one every backend follows: these references, :mod:`attnproto.cpu`,
the CUDA kernels shaders/cuda/flash_fwd_mma.cu, flash_fwd_wgmma.cu, flash_fwd_mma_stitch.cu
and the Metal kernel shaders/metal/flash_attention.metal). It is IEEE arithmetic of the
plain formula with a NaN-propagating row max; for query row i with visible keys V(i)
(all keys, or under the causal mask j <= i + Nkv - Nq):

1. s_ij = scale q_i . k_j (+ ALiBi bias) for j in V(i). Keys outside V(i) are not part
   of row i at all: their scores are -inf before anything else is computed and their
   values are never multiplied in, so NaN / inf in q, k or v at an invisible key never
   touches the row.
2. m_i = max over j in V(i) of s_ij; a NaN score makes m_i NaN (it is not skipped).
3. p_ij = exp(s_ij - m_i), l_i = sum_j p_ij, O_i = (sum_{j in V(i)} p_ij v_j) / l_i,
   LSE_i = m_i + log(l_i).
4. A row with no visible key (causal, Nq > Nkv, its first rows) has O_i = 0 and
   LSE_i = -inf, whatever q_i holds: the one deliberate exception to the formula.

Consequences: NaN in q_i, or in k_j of a key visible to row i, makes all of O_i and LSE_i
NaN (every query head of the GQA group that sees the key). NaN in v_jd of a visible key
makes O_i[d] NaN (that column only; LSE_i and the other columns stay finite), even where
p_ij underflowed to 0 (0 * NaN = NaN, as in torch's math SDPA); +inf in v_jd gives
O_i[d] = +inf where p_ij > 0 and NaN where p_ij = 0. +-inf in q or k gives +-inf or NaN
scores (inf * 0, inf - inf in the dot product): a +inf or NaN score, or a row whose every
visible score is -inf (m_i = -inf, so p = exp(-inf + inf) = NaN), makes O_i and LSE_i NaN;
a -inf score beside finite ones is just a weight of 0. The kernels and the CPU backend
keep a running max over key tiles whose "nothing seen yet" state is m = -inf (offset 0),
and decide "no visible key" from the mask geometry, never from l = 0 or m = -inf: a row
with keys and l = 0 is the all -inf case above (NaN), and l = NaN stays NaN.

torch's math SDPA (2.x, CPU) agrees on every pattern without a mask and, under a mask,
for bad values at keys the row sees; it differs where the mask matters, because it masks
additively and multiplies masked p = 0 into V: a NaN k or v at a masked-out key reaches
every row of the head (NaN + -inf = NaN; 0 * NaN = NaN), a NaN query in a row without
keys gives NaN, and a row whose every score is -inf gives 0 (its safe softmax; fully
masked rows are 0 there too). tests/test_nan_policy.py pins these down.

Known deviations, each tested and documented where it arises:

* Two-phase attention (:func:`partitioned_attention`, ``cpu.partitioned_forward``)
  applies the formula per partition, then the reduction's plain math: a partition whose
  visible scores are all -inf (an inf in q or k) is NaN there although the whole row's
  formula would give that key a weight of 0.
* GPU kernels: the P V product runs on whole MMA tiles (16 rows x 16 keys on the tensor
  cores, 8 x 8 on Apple GPUs), so a NaN / inf in v_jd at a key that is masked out for
  row i but lies in a key tile the row's warp (CUDA mma.sync), CTA (wgmma) or simdgroup
  (Metal) processes does reach O_i[d] through 0 * NaN; keys in tiles the row never
  visits do not. Rows with no visible key are still written as exact zeros.
* Metal: the kernel implements the policy for IEEE arithmetic, but the host builds it
  with fast math, under which the compiler may assume no NaN / inf; it is statically
  checked only, never run on Apple hardware here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from . import validate as _v

__all__ = [
    "DEFAULT_ROPE_THETA",
    "DEFAULT_ALIBI_MAX_BIAS",
    "to_float64",
    "logsumexp",
    "softmax",
    "rope",
    "rope_frequencies",
    "rope_style",
    "ROPE_STYLES",
    "alibi_slopes",
    "alibi_bias",
    "causal_mask",
    "attention",
    "paged_gather",
    "paged_attention",
    "partition_parts",
    "reduce_partitions",
    "partitioned_attention",
    "linear_attention_recurrent",
    "linear_chunk_h",
    "linear_chunk_o",
    "linear_attention_chunked",
    "AllcloseResult",
    "allclose",
    "assert_allclose",
]

# RoPE base frequency of Llama 1/2 and GPT-NeoX.
DEFAULT_ROPE_THETA = 10000.0
# ALiBi paper's m for the last head (slopes 2^-8/H ... 2^-8).
DEFAULT_ALIBI_MAX_BIAS = 8.0

ArrayLike = Any


# ------------------------------------------------------------------------ helpers
def to_float64(x: ArrayLike, name: str = "x", *, integers: bool = False) -> np.ndarray:
    """``x`` as a float64 numpy array (exact for every float dtype up to float64).

    Floating-point dtypes only (float16, bfloat16, float32, float64); with ``integers``
    also int / uint arrays (positions). Anything else (bool, complex, object, strings)
    is a TypeError naming ``name``.
    """
    return _to_float64(x, name, "fiu" if integers else "f")


def _to_float64(x: ArrayLike, name: str, kinds: str) -> np.ndarray:
    arr = _v.to_host_numpy(x, name)
    if arr.dtype.kind not in kinds and _v.dtype_name(arr.dtype) != "bfloat16":
        expected = "a floating-point dtype" if kinds == "f" else "a real number dtype"
        raise TypeError(f"{name}: dtype {_v.dtype_name(arr.dtype)} not supported; expected "
                        f"{expected} ({', '.join(_v.FLOAT_DTYPES)})")
    return arr.astype(np.float64)


def _as_index(x: ArrayLike, name: str) -> np.ndarray:
    arr = _v.to_host_numpy(x, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: dtype {_v.dtype_name(arr.dtype)} not supported; expected an "
                        f"integer dtype")
    return arr


def _check_theta(theta: Any) -> float:
    if isinstance(theta, (bool, np.bool_)) or not isinstance(theta, (int, float, np.number)):
        raise TypeError(f"rope_theta: expected a float, got {type(theta).__name__}")
    if not (math.isfinite(float(theta)) and float(theta) > 0.0):
        raise ValueError(f"rope_theta: must be finite and positive, got {theta}")
    return float(theta)


def _check_max_bias(max_bias: Any) -> float:
    if isinstance(max_bias, (bool, np.bool_)) or not isinstance(max_bias, (int, float, np.number)):
        raise TypeError(f"alibi_max_bias: expected a float, got {type(max_bias).__name__}")
    if not math.isfinite(float(max_bias)):
        raise ValueError(f"alibi_max_bias: must be finite, got {max_bias}")
    return float(max_bias)


def logsumexp(x: ArrayLike, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """Stable log(sum(exp(x))) in float64.

    A slice of only -inf gives -inf (an empty sum); a NaN anywhere in the slice gives NaN;
    otherwise a +inf gives +inf (the limit, as torch.logsumexp). Attention's LSE is not
    this function: it is m + log(l) of the module's NaN / inf policy.
    """
    x = to_float64(x, "x")
    m = np.max(x, axis=axis, keepdims=True)              # NaN-propagating
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        out = np.log(np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)) + m_safe
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(x: ArrayLike, axis: int = -1) -> np.ndarray:
    """Softmax exp(x - m) / sum exp(x - m) in float64, m the (NaN-propagating) max.

    Every row sums to 1, except: a row of only -inf (fully masked) is all 0; a row with a
    NaN or a +inf is all NaN (exp(inf - inf) is NaN, and so is the sum), as torch.softmax.
    Never a silent zero for a non-finite input.
    """
    x = to_float64(x, "x")
    m = np.max(x, axis=axis, keepdims=True)
    empty = m == -np.inf                                 # only -inf: nothing to normalise
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p = np.exp(x - np.where(empty, 0.0, m))
        p = p / np.sum(p, axis=axis, keepdims=True)
    return np.where(empty, 0.0, p)


def rope_frequencies(head_dim: int, theta: float = DEFAULT_ROPE_THETA) -> np.ndarray:
    """theta^(-2i/D) for i in [0, D/2), float64."""
    head_dim = _v.check_positive_int(head_dim, "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
    theta = _check_theta(theta)
    return theta ** (-2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim)


#: RoPE pairings: "half" (GPT-NeoX / Llama: element i with i + D/2) and "interleaved"
#: (GPT-J: element 2i with 2i + 1); ``True`` means "half".
ROPE_STYLES = ("half", "interleaved")


def rope_style(rope: Any, name: str = "rope") -> Optional[str]:
    """The RoPE pairing a ``rope`` argument asks for: None (no RoPE), "half" or "interleaved"."""
    if rope is None or rope is False:
        return None
    if rope is True:
        return "half"
    if isinstance(rope, str) and rope in ROPE_STYLES:
        return rope
    raise ValueError(f"{name}: expected False/None, True, 'half' or 'interleaved', got {rope!r}")


def rope(x: ArrayLike, theta: float = DEFAULT_ROPE_THETA,
         positions: Optional[ArrayLike] = None, style: str = "half") -> np.ndarray:
    """RoPE of ``x`` [..., N, D] in float64.

    style "half": pair (i, i + D/2) at position p is rotated by p * theta^(-2i/D);
    "interleaved": pair (2i, 2i + 1) by the same angle.
    ``positions`` (default 0..N-1) broadcasts against [..., N].
    """
    return _apply_rope(to_float64(x, "x"), theta, positions, rope_style(style, "style"))


def _apply_rope(x: np.ndarray, theta: float, positions: Optional[ArrayLike],
                style: str = "half") -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"x: expected [..., N, D], got shape {x.shape}")
    seq, head_dim = x.shape[-2], x.shape[-1]
    freqs = rope_frequencies(head_dim, theta)
    pos = (np.arange(seq, dtype=np.float64) if positions is None
           else to_float64(positions, "positions", integers=True))
    if pos.ndim == 0 or pos.shape[-1] != seq:
        raise ValueError(f"positions: last dimension must be N={seq}, got shape {pos.shape}")
    angle = pos[..., None] * freqs
    cos, sin = np.cos(angle), np.sin(angle)
    if style == "interleaved":
        out = np.empty_like(x)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def alibi_slopes(num_heads: int, max_bias: float = DEFAULT_ALIBI_MAX_BIAS) -> np.ndarray:
    """Slope of head h (0-based): 2^(-max_bias (h+1) / num_heads), float64 [num_heads]."""
    num_heads = _v.check_positive_int(num_heads, "num_heads")
    max_bias = _check_max_bias(max_bias)
    return 2.0 ** (-max_bias * np.arange(1, num_heads + 1, dtype=np.float64) / num_heads)


def _query_positions(seq_q: int, seq_kv: int) -> np.ndarray:
    return np.arange(seq_q, dtype=np.int64) + (seq_kv - seq_q)


def _check_lengths(seq_q: Any, seq_kv: Any) -> Tuple[int, int]:
    return _v.check_nonnegative_int(seq_q, "seq_q"), _v.check_nonnegative_int(seq_kv, "seq_kv")


def causal_mask(seq_q: int, seq_kv: int) -> np.ndarray:
    """Bool [Nq, Nkv], True where query i may see key j (bottom-right aligned)."""
    seq_q, seq_kv = _check_lengths(seq_q, seq_kv)
    return np.arange(seq_kv)[None, :] <= _query_positions(seq_q, seq_kv)[:, None]


def window_mask(seq_q: int, seq_kv: int, window: int) -> np.ndarray:
    """Bool [Nq, Nkv], True where query i may see key j under a LEFT sliding window of
    ``window`` tokens (Mistral, Gemma): j > pos_i - window, pos_i = i + Nkv - Nq (bottom-right
    aligned). Keys right of pos_i are not excluded here; combine with :func:`causal_mask`."""
    seq_q, seq_kv = _check_lengths(seq_q, seq_kv)
    window = _v.check_positive_int(window, "window")
    return np.arange(seq_kv)[None, :] > _query_positions(seq_q, seq_kv)[:, None] - window


def softcap_scores(s: np.ndarray, cap: float) -> np.ndarray:
    """Gemma 2's logit soft cap: cap * tanh(s / cap) (bounded in (-cap, cap), NaN stays NaN,
    +-inf goes to +-cap)."""
    return cap * np.tanh(s / cap)


def _check_softcap(cap: Any) -> float:
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.integer, np.floating)):
        raise TypeError(f"softcap: expected a positive float or None, got {type(cap).__name__}")
    cap = float(cap)
    if not (np.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap: must be positive and finite, got {cap}")
    return cap


def alibi_bias(num_heads: int, seq_q: int, seq_kv: int,
               max_bias: float = DEFAULT_ALIBI_MAX_BIAS,
               slopes: Optional[ArrayLike] = None) -> np.ndarray:
    """-slope_h |pos_q - pos_k|, float64 [num_heads, Nq, Nkv]; ``slopes`` [num_heads] replaces
    the standard ones (:func:`alibi_slopes`)."""
    seq_q, seq_kv = _check_lengths(seq_q, seq_kv)
    dist = np.abs(_query_positions(seq_q, seq_kv)[:, None] - np.arange(seq_kv)[None, :])
    m = alibi_slopes(num_heads, max_bias) if slopes is None else _check_slopes(slopes, num_heads)
    return -m[:, None, None] * dist[None].astype(np.float64)


def _check_slopes(slopes: ArrayLike, num_heads: int) -> np.ndarray:
    """Caller-given ALiBi slopes: finite, one per query head (float64)."""
    m = to_float64(slopes, "alibi_slopes")
    if m.shape != (num_heads,):
        raise ValueError(f"alibi_slopes: expected shape ({num_heads},) (one slope per query head), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("alibi_slopes: every slope must be finite")
    return m


def _scores(q: np.ndarray, k: np.ndarray, scale: float, causal: bool, alibi: bool,
            alibi_max_bias: float, window: Optional[int] = None,
            softcap: Optional[float] = None,
            alibi_slopes: Optional[ArrayLike] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Masked, biased scores [B, Hq, Nq, Nkv] (K already expanded to Hq heads) and the
    visibility mask [Nq, Nkv] (None: every key visible). Masked scores are -inf whatever
    q and k hold there (policy step 1). Order: scale, soft cap, ALiBi bias, mask."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    with np.errstate(invalid="ignore", over="ignore"):
        s = scale * (q @ np.swapaxes(k, -1, -2))
        if softcap is not None:
            s = softcap_scores(s, softcap)
        if alibi:
            s = s + alibi_bias(q.shape[1], seq_q, seq_kv, alibi_max_bias, alibi_slopes)[None]
    visible = causal_mask(seq_q, seq_kv) if causal else None
    if window is not None:
        win = window_mask(seq_q, seq_kv, window)
        visible = win if visible is None else visible & win
    if visible is not None:
        s = np.where(visible, s, -np.inf)
    return s, visible


def _visible_matmul(p: np.ndarray, v: np.ndarray, visible: Optional[np.ndarray]) -> np.ndarray:
    """sum over visible j of p_ij v_jd, in IEEE arithmetic, for p [..., R, C], v [..., C, D].

    ``visible`` is None (every pair) or a bool array broadcasting against p. A term of an
    invisible pair is left out entirely, even where v_jd is not finite (a plain matmul
    would add 0 * NaN = NaN); every other term follows IEEE: a NaN p_ij (only in rows
    that are NaN under the policy) makes the row NaN, 0 * inf and NaN * x are NaN,
    +inf + -inf is NaN. Non-finite values are classified by counting instead of being
    multiplied, so the result does not depend on how a BLAS treats them; with finite
    inputs this is exactly ``p @ v``. Shared by the CPU backend (float32) and these
    references (float64).
    """
    p_nan = np.isnan(p)
    v_finite = np.isfinite(v)
    any_p_nan, all_v_finite = bool(p_nan.any()), bool(v_finite.all())
    if not any_p_nan and all_v_finite:
        return p @ v
    dt = np.result_type(p.dtype, v.dtype)
    vis = (np.ones(p.shape, dtype=bool) if visible is None
           else np.broadcast_to(visible, p.shape))
    out = np.where(p_nan, 0, p).astype(dt, copy=False) @ np.where(v_finite, v, 0).astype(dt)
    row_nan = np.any(p_nan & vis, axis=-1, keepdims=True)          # [..., R, 1]
    if not all_v_finite:
        def pairs(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:   # how many (j) terms
            return rows.astype(dt) @ cols.astype(dt)
        live = vis & (p > 0)              # p_ij * inf = +-inf (0 < p <= 1)
        dead = vis & (p == 0)             # 0 * inf = NaN
        pos, neg = v == np.inf, v == -np.inf
        n_nan = pairs(vis, np.isnan(v)) + pairs(dead, pos | neg)
        n_pos, n_neg = pairs(live, pos), pairs(live, neg)
        extra = np.where((n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), np.nan,
                         np.where(n_pos > 0, np.inf, np.where(n_neg > 0, -np.inf, 0.0)))
        out = out + extra.astype(dt)
    return np.where(row_nan, np.array(np.nan, dtype=dt), out)


def _attend(s: np.ndarray, v: np.ndarray,
            visible: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """O and LSE of masked scores s [..., Nq, Nkv] by the module's NaN / inf policy.

    ``visible`` [Nq, Nkv] (None: all keys) also decides which rows have no key at all:
    those give (0, -inf), whatever s and v hold.
    """
    has_key = (np.ones(s.shape[-2], dtype=bool) if visible is None
               else np.any(visible, axis=-1))[:, None]                   # [Nq, 1]
    m = np.max(s, axis=-1, keepdims=True)                               # NaN-propagating
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p = np.exp(s - np.where(has_key, m, 0.0))
        l = np.sum(p, axis=-1, keepdims=True)
        o = _visible_matmul(p / np.where(has_key, l, 1.0), v, visible)
        lse = m + np.log(l)
    return np.where(has_key, o, 0.0), np.where(has_key, lse, -np.inf)[..., 0]


def _expand_kv(x: np.ndarray, group: int) -> np.ndarray:
    return np.repeat(x, group, axis=1) if group > 1 else x


def _prepare(q: ArrayLike, k: ArrayLike, v: ArrayLike, causal: Any, scale: Any,
             flags: Tuple[Tuple[Any, str], ...]):
    q, k, v = to_float64(q, "q"), to_float64(k, "k"), to_float64(v, "v")
    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=("float64",),
                                      contiguous_last_dim=False)
    for value, name in flags:
        _v.check_bool(value, name)
    return q, k, v, shape, _v.check_scale(scale, shape.head_dim)


# ---------------------------------------------------------------------- attention
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, scale: Optional[float] = None,
              causal: bool = False, alibi: bool = False,
              alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS, rope: Union[bool, str] = False,
              rope_theta: float = DEFAULT_ROPE_THETA, return_lse: bool = False,
              window: Optional[int] = None, softcap: Optional[float] = None,
              rope_offset: int = 0, alibi_slopes: Optional[ArrayLike] = None
              ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """softmax(scale Q K^T + bias, masked) V in float64; O [B, Hq, Nq, D] (and LSE [B, Hq, Nq]).

    With ``rope`` (True or "half": rotate-half, "interleaved": GPT-J pairs) Q row i is
    rotated at position rope_offset + i + Nkv - Nq and K row j at rope_offset + j.
    ``alibi_slopes`` [Hq] replaces the standard slopes of ``alibi``. ``window``:
    a left sliding window of that many tokens (query i sees keys j > i + Nkv - Nq - window;
    with ``causal`` also j <= i + Nkv - Nq). ``softcap``: scores become
    softcap * tanh(score / softcap) before the ALiBi bias and the mask (Gemma 2).
    """
    style = rope_style(rope)
    q, k, v, shape, scale = _prepare(q, k, v, causal, scale,
                                     ((alibi, "alibi"), (return_lse, "return_lse")))
    rope_offset = _v.check_nonnegative_int(rope_offset, "rope_offset")
    if alibi_slopes is not None and not alibi:
        raise ValueError("alibi_slopes: given without alibi=True")
    if alibi:
        alibi_max_bias = _check_max_bias(alibi_max_bias)
    if window is not None:
        window = _v.check_positive_int(window, "window")
    if softcap is not None:
        softcap = _check_softcap(softcap)
    if style is not None:
        offset = rope_offset + shape.seq_kv - shape.seq_q
        q = _apply_rope(q, rope_theta, np.arange(shape.seq_q) + offset, style)
        k = _apply_rope(k, rope_theta, np.arange(shape.seq_kv) + rope_offset, style)
    s, visible = _scores(q, _expand_kv(k, shape.group), scale, causal, alibi, alibi_max_bias, window, softcap,
                         alibi_slopes)
    o, lse = _attend(s, _expand_kv(v, shape.group), visible)
    return (o, lse) if return_lse else o


# ------------------------------------------------------------------------ paged KV
def paged_gather(cache: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike, block_size: int,
                 *, padded: bool = False) -> Union[List[np.ndarray], np.ndarray]:
    """Read each sequence's K (or V) out of a paged cache, bit-exactly (cache dtype kept).

    cache [num_blocks, Hkv, block_size, D]; block_table int [B, max_blocks_per_seq];
    token t of sequence b lives in block block_table[b, t // block_size] at slot
    t % block_size. Returns a list of [Hkv, seq_lens[b], D] arrays, or with
    ``padded`` one [B, Hkv, max(seq_lens), D] array, zero beyond each length.
    """
    cache = _v.to_host_numpy(cache, "cache")
    _v.check_tensor(cache, "cache", ndim=4, contiguous_last_dim=False)
    block_size = _v.check_positive_int(block_size, "block_size")
    if cache.shape[2] != block_size:
        raise ValueError(f"block_size: {block_size} does not match the cache's block axis "
                         f"(cache shape {cache.shape}, [num_blocks, Hkv, block_size, D])")
    table, lens = _as_index(block_table, "block_table"), _as_index(seq_lens, "seq_lens")
    _v.check_tensor(table, "block_table", ndim=2)
    _v.check_block_table(table, lens, batch=table.shape[0],
                         num_blocks=cache.shape[0], block_size=block_size,
                         index_dtypes=_v.INDEX_DTYPES)
    num_kv_heads, head_dim = cache.shape[1], cache.shape[3]
    out = []
    for row, length in zip(table, lens):
        used = -(-int(length) // block_size)
        blocks = cache[row[:used].astype(np.int64)]            # [used, Hkv, bs, D]
        seq = np.swapaxes(blocks, 0, 1).reshape(num_kv_heads, used * block_size, head_dim)
        out.append(seq[:, :int(length)].copy())
    if not padded:
        return out
    longest = max(int(x) for x in lens)
    result = np.zeros((len(out), num_kv_heads, longest, head_dim), dtype=cache.dtype)
    for b, seq in enumerate(out):
        result[b, :, :seq.shape[1]] = seq
    return result


def paged_attention(q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike,
                    block_table: ArrayLike, seq_lens: ArrayLike, *,
                    scale: Optional[float] = None, causal: bool = False, alibi: bool = False,
                    alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS, rope: bool = False,
                    rope_theta: float = DEFAULT_ROPE_THETA, return_lse: bool = False,
                    alibi_slopes: Optional[ArrayLike] = None, window: Optional[int] = None,
                    softcap: Optional[float] = None
                    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Attention of Q [B, Hq, Nq, D] over each sequence's paged K/V (float64).

    Sequence b has seq_lens[b] keys; its Nq queries are its last Nq tokens
    (bottom-right alignment: query i at position seq_lens[b] - Nq + i), so decode is
    Nq = 1 and prefill Nq = seq_lens[b]. A sequence of length 0 gives O = 0 and LSE = -inf.
    ``alibi_slopes``, ``window`` and ``softcap`` are those of :func:`attention`, per sequence.
    """
    for value, name in ((causal, "causal"), (alibi, "alibi"), (rope, "rope"),
                        (return_lse, "return_lse")):
        _v.check_bool(value, name)
    q = to_float64(q, "q")
    k_cache, v_cache = to_float64(k_cache, "k_cache"), to_float64(v_cache, "v_cache")
    table, lens = _as_index(block_table, "block_table"), _as_index(seq_lens, "seq_lens")
    shape = _v.check_paged_inputs(q, k_cache, v_cache, table, lens, allowed_dtypes=("float64",),
                                  index_dtypes=_v.INDEX_DTYPES, contiguous_last_dim=False)
    # checked here too, so a bad value is refused even where every sequence is empty
    if alibi_slopes is not None:
        if not alibi:
            raise ValueError("alibi_slopes: given without alibi=True")
        alibi_slopes = _check_slopes(alibi_slopes, shape.num_heads)
    if window is not None:
        window = _v.check_positive_int(window, "window")
    if softcap is not None:
        softcap = _check_softcap(softcap)
    ks = paged_gather(k_cache, table, lens, shape.block_size)
    vs = paged_gather(v_cache, table, lens, shape.block_size)
    o = np.zeros(q.shape, dtype=np.float64)
    lse = np.full(q.shape[:3], -np.inf)
    for b in range(shape.batch):
        if lens[b] == 0:
            continue
        o_b, lse_b = attention(q[b:b + 1], ks[b][None], vs[b][None], scale=scale, causal=causal,
                               alibi=alibi, alibi_max_bias=alibi_max_bias, rope=rope,
                               rope_theta=rope_theta, return_lse=True, alibi_slopes=alibi_slopes,
                               window=window, softcap=softcap)
        o[b], lse[b] = o_b[0], lse_b[0]
    return (o, lse) if return_lse else o


# ------------------------------------------------------- two-phase (partitioned)
def partition_parts(q: ArrayLike, k: ArrayLike, v: ArrayLike, partition_size: int, *,
                    scale: Optional[float] = None, causal: bool = False, alibi: bool = False,
                    alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Phase 1: attention of each query over each KV partition on its own.

    Partition p holds keys [p P, min((p+1) P, Nkv)), P = ``partition_size``.
    Returns o_parts [B, Hq, Nq, num_partitions, D] (each normalised within its
    partition) and lse_parts [B, Hq, Nq, num_partitions]; a partition a row
    cannot see gives (0, -inf).
    """
    q, k, v, shape, scale = _prepare(q, k, v, causal, scale, ((alibi, "alibi"),))
    size = _v.check_partition_size(partition_size)
    if alibi:
        alibi_max_bias = _check_max_bias(alibi_max_bias)
    s, visible = _scores(q, _expand_kv(k, shape.group), scale, causal, alibi, alibi_max_bias)
    v = _expand_kv(v, shape.group)
    o_parts, lse_parts = [], []
    for start in range(0, shape.seq_kv, size):
        o_p, lse_p = _attend(s[..., start:start + size], v[:, :, start:start + size],
                             None if visible is None else visible[:, start:start + size])
        o_parts.append(o_p)
        lse_parts.append(lse_p)
    return np.stack(o_parts, axis=-2), np.stack(lse_parts, axis=-1)


def reduce_partitions(o_parts: ArrayLike, lse_parts: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Phase 2: O = sum_p exp(lse_p - LSE) o_p with LSE = logsumexp_p(lse_p).

    o_parts [..., num_partitions, D], lse_parts [..., num_partitions]. A partition with
    lse_p = -inf saw no key: it is left out (its o_p is not read). Rows whose every
    partition is -inf give (0, -inf). The rest is the NaN / inf policy's plain math
    (module doc) with the lse_p as scores: a NaN lse_p makes the row NaN, a NaN in o_p
    makes that column NaN, even at weight 0.
    """
    o_parts, lse_parts = to_float64(o_parts, "o_parts"), to_float64(lse_parts, "lse_parts")
    if o_parts.ndim < 2 or o_parts.shape[:-1] != lse_parts.shape:
        raise ValueError(f"lse_parts: shape {lse_parts.shape} does not match o_parts "
                         f"{o_parts.shape} ([..., P] vs [..., P, D])")
    seen = lse_parts != -np.inf                                         # [..., P]
    any_seen = np.any(seen, axis=-1)
    m = np.max(lse_parts, axis=-1)                                      # NaN-propagating
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        w = np.exp(lse_parts - np.where(any_seen, m, 0.0)[..., None])
        total = np.sum(w, axis=-1)
        o = np.sum(np.where(seen[..., None], w[..., None] * o_parts, 0.0), axis=-2)
        o = o / np.where(any_seen, total, 1.0)[..., None]
        lse = m + np.log(total)
    return np.where(any_seen[..., None], o, 0.0), np.where(any_seen, lse, -np.inf)


def partitioned_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, partition_size: int, *,
                          scale: Optional[float] = None, causal: bool = False,
                          alibi: bool = False, alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS,
                          return_lse: bool = False
                          ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Two-phase attention: :func:`partition_parts` then :func:`reduce_partitions`."""
    _v.check_bool(return_lse, "return_lse")
    o, lse = reduce_partitions(*partition_parts(q, k, v, partition_size, scale=scale,
                                                causal=causal, alibi=alibi,
                                                alibi_max_bias=alibi_max_bias))
    return (o, lse) if return_lse else o


# --------------------------------------------------------------- linear attention
def _linear_prepare(q, k, v, decay, initial_state, chunk_size=None, names=("q", "k", "v")):
    q, k, v = (to_float64(x, n) for x, n in zip((q, k, v), names))
    shape, gamma = _v.check_linear_attention_inputs(q, k, v, allowed_dtypes=("float64",),
                                                    chunk_size=chunk_size, decay=decay,
                                                    contiguous_last_dim=False, names=names)
    if initial_state is None:
        state = np.zeros((shape.batch, shape.num_heads, shape.key_dim, shape.value_dim))
    else:
        state = to_float64(initial_state, "initial_state")
        _v.check_state(state, shape)
    return q, k, v, shape, gamma, state


def _check_scale_value(scale: Any) -> float:
    return _v.check_scale(1.0 if scale is None else scale, 1)


def linear_attention_recurrent(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, scale: float = 1.0,
                               decay: Any = None, initial_state: Optional[ArrayLike] = None,
                               output_final_state: bool = False
                               ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Causal linear attention by its recurrence, token by token (float64).

    S_t = gamma_h S_{t-1} + k_t^T v_t (S_{-1} = initial_state or 0),
    o_t = scale q_t S_t, i.e. o_t = scale q_t sum_{s<=t} gamma^(t-s) k_s^T v_s.
    q, k [B, H, N, Dk]; v [B, H, N, Dv]; decay None or gamma_h in (0, 1] per head.
    Returns O [B, H, N, Dv] (and the final state [B, H, Dk, Dv]).
    """
    scale = _check_scale_value(scale)
    _v.check_bool(output_final_state, "output_final_state")
    q, k, v, shape, gamma, state = _linear_prepare(q, k, v, decay, initial_state)
    g = np.ones(shape.num_heads) if gamma is None else gamma
    g = g[None, :, None, None]
    o = np.empty((shape.batch, shape.num_heads, shape.seq_len, shape.value_dim))
    for t in range(shape.seq_len):
        state = g * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, :, t], state)
    return (o, state) if output_final_state else o


def _chunk_bounds(seq_len: int, chunk_size: int) -> List[Tuple[int, int]]:
    return [(s, min(s + chunk_size, seq_len)) for s in range(0, seq_len, chunk_size)]


def linear_chunk_h(k: ArrayLike, v: ArrayLike, chunk_size: int, *, decay: Any = None,
                   initial_state: Optional[ArrayLike] = None, output_final_state: bool = False
                   ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Chunk states: H[c] = state entering chunk c, [B, H, num_chunks, Dk, Dv] (float64).

    H[0] = initial_state (or 0); H[c+1] = gamma^L_c H[c] + K_c^T diag(gamma^(L_c-1-j)) V_c
    with L_c the length of chunk c (the last one may be short).
    """
    _v.check_bool(output_final_state, "output_final_state")
    _, k, v, shape, gamma, state = _linear_prepare(k, k, v, decay, initial_state, chunk_size,
                                                   names=("k", "k", "v"))
    g = np.ones(shape.num_heads) if gamma is None else gamma
    bounds = _chunk_bounds(shape.seq_len, chunk_size)
    states = np.empty((shape.batch, shape.num_heads, len(bounds), shape.key_dim, shape.value_dim))
    for c, (start, end) in enumerate(bounds):
        states[:, :, c] = state
        length = end - start
        weight = g[:, None] ** (length - 1 - np.arange(length))[None, :]      # [H, L]
        kc = k[:, :, start:end] * weight[None, :, :, None]
        state = (g ** length)[None, :, None, None] * state + np.swapaxes(kc, -1, -2) @ v[:, :,
                                                                                         start:end]
    return (states, state) if output_final_state else states


def linear_chunk_o(q: ArrayLike, k: ArrayLike, v: ArrayLike, states: ArrayLike, chunk_size: int,
                   *, scale: float = 1.0, decay: Any = None) -> np.ndarray:
    """Chunk outputs O_c = scale (diag(gamma^(i+1)) Q_c H[c] + (Q_c K_c^T * D_c) V_c) (float64).

    D_c[i, j] = gamma^(i-j) for j <= i and 0 above the diagonal (i, j local to
    the chunk); ``states`` from :func:`linear_chunk_h`.
    """
    scale = _check_scale_value(scale)
    q, k, v, shape, gamma, _ = _linear_prepare(q, k, v, decay, None, chunk_size)
    bounds = _chunk_bounds(shape.seq_len, chunk_size)
    states = to_float64(states, "states")
    expected = (shape.batch, shape.num_heads, len(bounds), shape.key_dim, shape.value_dim)
    if states.shape != expected:
        raise ValueError(f"states: expected shape {expected} ([B, H, num_chunks, Dk, Dv]), got "
                         f"{states.shape}")
    g = np.ones(shape.num_heads) if gamma is None else gamma
    o = np.empty((shape.batch, shape.num_heads, shape.seq_len, shape.value_dim))
    for c, (start, end) in enumerate(bounds):
        idx = np.arange(end - start)
        lag = idx[:, None] - idx[None, :]
        intra = np.where(lag >= 0, g[:, None, None] ** np.maximum(lag, 0)[None], 0.0)  # [H, L, L]
        inter = g[:, None] ** (idx + 1)[None, :]                                      # [H, L]
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        o_inter = inter[None, :, :, None] * (qc @ states[:, :, c])
        o_intra = ((qc @ np.swapaxes(kc, -1, -2)) * intra[None]) @ vc
        o[:, :, start:end] = scale * (o_inter + o_intra)
    return o


def linear_attention_chunked(q: ArrayLike, k: ArrayLike, v: ArrayLike, chunk_size: int, *,
                             scale: float = 1.0, decay: Any = None,
                             initial_state: Optional[ArrayLike] = None,
                             output_final_state: bool = False
                             ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Chunked linear attention: :func:`linear_chunk_h` then :func:`linear_chunk_o`.

    Equals :func:`linear_attention_recurrent` to float64 rounding for any N
    (N need not be a multiple of ``chunk_size``).
    """
    states, final = linear_chunk_h(k, v, chunk_size, decay=decay, initial_state=initial_state,
                                   output_final_state=True)
    o = linear_chunk_o(q, k, v, states, chunk_size, scale=scale, decay=decay)
    _v.check_bool(output_final_state, "output_final_state")
    return (o, final) if output_final_state else o


# ---------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class AllcloseResult:
    """Outcome of :func:`allclose`; true when every element passes."""

    ok: bool
    atol: float
    rtol: float
    actual_shape: Tuple[int, ...]
    expected_shape: Tuple[int, ...]
    num_elements: int
    num_violations: int
    worst_index: Optional[Tuple[int, ...]]
    actual: Optional[float]
    expected: Optional[float]
    abs_err: Optional[float]
    rel_err: Optional[float]
    max_abs_err: float
    max_rel_err: float

    def __bool__(self) -> bool:
        return self.ok

    @property
    def shape_mismatch(self) -> bool:
        return self.actual_shape != self.expected_shape

    def report(self) -> str:
        if self.shape_mismatch:
            return (f"allclose FAILED: shape {self.actual_shape} (actual) != "
                    f"{self.expected_shape} (expected)")
        criterion = f"|a-e| <= atol + rtol*|e| (atol={self.atol:g}, rtol={self.rtol:g})"
        if self.worst_index is None:
            return f"allclose passed: 0 elements, {criterion}"
        verdict = "FAILED" if not self.ok else "passed"
        label = "worst" if not self.ok else "largest error"
        return (f"allclose {verdict}: {self.num_violations} of {self.num_elements} elements "
                f"violate {criterion}; {label} at {self.worst_index}: actual={self.actual!r}, "
                f"expected={self.expected!r}, abs err={self.abs_err:.3e}, "
                f"rel err={self.rel_err:.3e}; max abs err {self.max_abs_err:.3e}, "
                f"max rel err {self.max_rel_err:.3e}")

    __str__ = report


def _check_tolerance(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not (math.isfinite(float(value)) and float(value) >= 0.0):
        raise ValueError(f"{name}: must be finite and >= 0, got {value}")
    return float(value)


def allclose(actual: ArrayLike, expected: ArrayLike, *, atol: float, rtol: float) -> AllcloseResult:
    """Elementwise |actual - expected| <= atol + rtol |expected| (numpy/torch semantics).

    NaN never passes (not even against NaN); equal infinities pass; shapes must
    match exactly (no broadcasting). The worst element is the one furthest
    beyond its tolerance (or, when all pass, the one with the largest error).
    """
    atol, rtol = _check_tolerance(atol, "atol"), _check_tolerance(rtol, "rtol")
    a, e = _to_float64(actual, "actual", "fiub"), _to_float64(expected, "expected", "fiub")
    if a.shape != e.shape:
        return AllcloseResult(False, atol, rtol, a.shape, e.shape, 0, 0, None, None, None, None,
                              None, math.nan, math.nan)
    if a.size == 0:
        return AllcloseResult(True, atol, rtol, a.shape, e.shape, 0, 0, None, None, None, None,
                              None, 0.0, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.abs(a - e)
        diff = np.where(a == e, 0.0, diff)                 # equal infinities: no error
        tol = atol + rtol * np.abs(e)
        finite = np.isfinite(a) & np.isfinite(e)
        # an infinity is close only to itself; NaN compares false everywhere
        close = (a == e) | (finite & (diff <= tol))
        rel = np.where(diff == 0.0, 0.0, np.where(np.isinf(e), np.inf, diff / np.abs(e)))
        excess = np.where(close, -np.inf,
                          np.where(~finite | (tol == 0.0), np.inf, diff / tol))
    violations = int(np.count_nonzero(~close))
    flat = int(np.argmax(excess)) if violations else int(np.argmax(np.nan_to_num(diff, nan=0.0)))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    finite_diff = diff[np.isfinite(diff)]
    finite_rel = rel[np.isfinite(rel)]
    return AllcloseResult(
        ok=violations == 0, atol=atol, rtol=rtol, actual_shape=a.shape, expected_shape=e.shape,
        num_elements=int(a.size), num_violations=violations, worst_index=index,
        actual=float(a[index]), expected=float(e[index]), abs_err=float(diff[index]),
        rel_err=float(rel[index]),
        max_abs_err=float(finite_diff.max()) if finite_diff.size else math.nan,
        max_rel_err=float(finite_rel.max()) if finite_rel.size else math.nan)


def assert_allclose(actual: ArrayLike, expected: ArrayLike, *, atol: float, rtol: float,
                    msg: str = "") -> AllcloseResult:
    """:func:`allclose`, raising AssertionError with its report when it fails."""
    result = allclose(actual, expected, atol=atol, rtol=rtol)
    if not result:
        raise AssertionError(f"{msg}: {result.report()}" if msg else result.report())
    return result
