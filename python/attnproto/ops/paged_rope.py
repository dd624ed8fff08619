"""RoPE fused into the paged KV store (CUDA): ``shaders/cuda/paged_rope_append.cu``.

    cos, sin = rope_tables(max_pos, head_dim, theta=10000.0, device="cuda")
    q_rot = rope_append(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin)
    o, lse = fused_prefill(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin)

Design: K is rotated once, as it is stored. One launch rotates the new tokens' K (rotate-half,
Llama's RoPE) at their absolute positions ``positions[b] + i``, writes it and V (unrotated) into
their pages, and rotates Q out of place into ``q_rot``; the attention then runs over the cache
(paged prefill for a prompt chunk, paged decode for up to 8 new tokens). A prefill is two
launches instead of four (rope q, rope k, append, attention); RoPE itself is not fused into the
attention kernel's Q load (the attention kernels and their shared parameter block are unchanged).
The cos/sin tables are float32 ``[max_pos, D/2]``, ``cos[p, i] = cos(p * theta^(-2i/D))``,
computed in float64 and rounded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from .. import validate as _v
from . import paged as _paged
from .paged_problem import HEAD_DIMS, PAGE_SIZES

__all__ = ["ROPE_APPEND_KERNEL", "RopeAppendPlan", "fused_prefill", "prepare_rope_append", "rope_append",
           "rope_append_specialisations", "rope_tables"]

ROPE_APPEND_KERNEL = "paged_rope_append"
#: Llama's RoPE base (LlamaConfig's default rope_theta).
DEFAULT_THETA = 10000.0
TABLE_DTYPE = "float32"
DTYPE_CODES = {"float16": 0, "bfloat16": 1}


def rope_tables(max_pos: int, head_dim: int, theta: float = DEFAULT_THETA, device: Any = "cpu") -> Tuple[Any, Any]:
    """(cos, sin) float32 ``[max_pos, head_dim / 2]`` torch tensors on ``device``."""
    import torch  # noqa: PLC0415

    from .. import ref  # noqa: PLC0415

    max_pos = _v.check_positive_int(max_pos, "max_pos")
    freqs = ref.rope_frequencies(head_dim, theta)
    angle = np.arange(max_pos, dtype=np.float64)[:, None] * freqs[None, :]
    return (torch.from_numpy(np.cos(angle).astype(np.float32)).to(device),
            torch.from_numpy(np.sin(angle).astype(np.float32)).to(device))


def check_tables(cos: Any, sin: Any, head_dim: int, like: Any) -> int:
    """The tables' rows (max_pos); float32 ``[max_pos, head_dim / 2]``, contiguous, on like's device."""
    infos = [_v.check_tensor(t, n, ndim=2, allowed_dtypes=(TABLE_DTYPE,)) for t, n in ((cos, "cos"), (sin, "sin"))]
    for t, info in zip((cos, sin), infos):
        if info.shape[1] != head_dim // 2:
            raise ValueError(f"{info.name}: expected [max_pos, {head_dim // 2}] (head_dim / 2 columns), "
                             f"got {info.shape}")
        if info.strides != (info.shape[1], 1):
            raise ValueError(f"{info.name}: must be contiguous, got strides {info.strides}")
        if t.device != like.device:
            raise ValueError(f"{info.name}: on {t.device}, the new tokens are on {like.device}")
    if infos[0].shape != infos[1].shape:
        raise ValueError(f"sin: shape {infos[1].shape} does not match cos {infos[0].shape}")
    return infos[0].shape[0]


@dataclass
class RopeAppendPlan:
    """One launch: K rotated into the pages, V copied, Q rotated into ``q_rot``."""

    backend: Any
    launch_: Any
    q_rot: Any

    def launch(self, stream: Optional[int] = None) -> Any:
        """Enqueue on ``stream`` (default: torch's current stream); returns q_rot; no host sync."""
        ln = self.launch_
        self.backend.launch(ln.kernel, ln.grid, ln.block, ln.args, ln.shared_bytes,
                            stream=_paged.current_stream() if stream is None else stream)
        return self.q_rot


def prepare_rope_append(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, block_table: Any,
                        positions: Any, cos: Any, sin: Any, *, q_rot: Any = None, check: bool = True
                        ) -> RopeAppendPlan:
    """q ``[B, Hq, T, D]``, k_new/v_new ``[B, Hkv, T, D]`` (torch CUDA, fp16/bf16), pools
    ``[num_blocks, block_size, Hkv, D]``; token i of sequence b at position ``positions[b] + i``."""
    import torch  # noqa: PLC0415

    from ..backend import native  # noqa: PLC0415

    backend = _paged._backend()
    _paged._check_compute(backend, name="k_new")
    a = _paged.check_append(k_new, v_new, k_cache, v_cache, block_table, positions, check=check)
    qi = _v.check_tensor(q, "q", ndim=4, allowed_dtypes=tuple(DTYPE_CODES))
    if qi.dtype != _v.dtype_name(k_new.dtype):
        raise TypeError(f"q: dtype {qi.dtype} does not match k_new dtype {_v.dtype_name(k_new.dtype)}")
    b, hq, t, d = qi.shape
    if (b, t, d) != (a.batch, a.tokens, a.dim):
        raise ValueError(f"q: shape {qi.shape} does not match the new tokens (B={a.batch}, T={a.tokens}, D={a.dim})")
    if hq % a.kv_heads:
        raise ValueError(f"q: {hq} query heads are not a multiple of the {a.kv_heads} kv heads")
    if q.device != k_new.device:
        raise ValueError(f"q: on {q.device}, k_new is on {k_new.device}")
    max_pos = check_tables(cos, sin, d, k_new)
    if check and not torch.cuda.is_current_stream_capturing():
        last = int((positions.long() + t).max())  # one synchronising reduction, as the table check
        if last > max_pos:
            raise ValueError(f"positions: a new token reaches position {last - 1}, the RoPE tables hold {max_pos}")
    if q_rot is None:
        q_rot = torch.empty_like(q, memory_format=torch.contiguous_format)
    oi = _v.check_output(q_rot, "q_rot", shape=qi.shape, allowed_dtypes=(qi.dtype,), device="cuda")
    strides = np.array(list(a.strides) + list(qi.strides[:3]) + list(oi.strides[:3]), dtype=np.int64)
    # RopeArgs of paged_rope_append.cu: 12 int64 strides, then num_q_heads and max_pos as int32.
    raw = strides.tobytes() + np.array([hq, max_pos], dtype=np.int32).tobytes()
    ra = native().Arg.raw(raw, 8)
    kern = backend.kernel(ROPE_APPEND_KERNEL, HEAD_DIM=d, PAGE_SIZE=a.block_size, DTYPE=DTYPE_CODES[qi.dtype])
    args = [a.params, ra, a.k_new, a.v_new, q, q_rot, k_cache, v_cache, block_table, positions, cos, sin]
    ln = _paged.Launch(kern, (t, a.kv_heads + hq, b), (d // 2, 1, 1), args, 0)
    return RopeAppendPlan(backend, ln, q_rot)


def rope_append(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, block_table: Any, positions: Any,
                cos: Any, sin: Any, *, q_rot: Any = None, check: bool = True) -> Any:
    """Rotate q into q_rot (returned), store rotated K and V into their pages: one launch."""
    return prepare_rope_append(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin,
                               q_rot=q_rot, check=check).launch()


def fused_prefill(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, block_table: Any, positions: Any,
                  cos: Any, sin: Any, *, scale: Optional[float] = None, check: bool = True) -> Tuple[Any, Any]:
    """RoPE + store + attention of a prompt chunk: rope_append, then paged prefill (up to
    ``MAX_DECODE_TOKENS`` new tokens: paged decode) over ``positions + T`` keys per sequence.
    Two launches (three where the decode splits its context)."""
    from .paged_problem import MAX_DECODE_TOKENS  # noqa: PLC0415

    q_rot = rope_append(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin, check=check)
    lens = positions + q.shape[2]
    attend = _paged.paged_decode if q.shape[2] <= MAX_DECODE_TOKENS else _paged.paged_prefill
    return attend(q_rot, k_cache, v_cache, block_table, lens, scale=scale, check=check)


def rope_append_specialisations() -> List[Tuple[str, dict]]:
    """The RoPE append at every D x block size x dtype (what CI compiles with NVRTC)."""
    return [(ROPE_APPEND_KERNEL, {"HEAD_DIM": d, "PAGE_SIZE": b, "DTYPE": c})
            for d in HEAD_DIMS for b in PAGE_SIZES for c in DTYPE_CODES.values()]
