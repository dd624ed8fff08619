"""The one input check of the paged-KV ops (decode, append, prefill) and the problem it returns.

Cache layout: a block pool ``k_cache, v_cache`` of ``[num_blocks, block_size, Hkv, D]``
(``layout="nhd"``, what vLLM and FlashInfer use) or ``[num_blocks, Hkv, block_size, D]``
(``layout="hnd"``, :func:`attnproto.ref.paged_attention`'s); any strides with D
contiguous. Block table ``int32 [B, max_blocks]`` (rows contiguous), context lengths
``int32 [B]``, both on the device of ``q``. Token t of sequence b lives in block
``block_table[b, t // block_size]``, slot ``t % block_size``.

Values (table entries against the pool, lengths against the table's capacity) are checked
with ``check=True`` (default): one synchronising device reduction, skipped while a CUDA graph
is being captured. Either way the kernels never read or write outside the pool: a bad entry
that reaches them gives NaN rows (decode) or a skipped write (append).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .. import validate as _v

__all__ = ["CONTIGUOUS", "LAYOUTS", "PAGE_SIZES", "PagedProblem", "check_paged", "check_table_values"]

#: Tokens per block the kernels are built for (shaders/cuda/include/paged_kv.cuh, legal_page_size).
PAGE_SIZES = (1, 8, 16, 32, 64, 128, 256)
#: Head dims of the paged kernels (their static_asserts).
HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16")
INDEX_DTYPE = "int32"
#: Cache axis order by layout name: (block axis, token axis, kv-head axis).
LAYOUTS = {"nhd": (0, 1, 2), "hnd": (0, 2, 1)}
#: Layout name of a problem over contiguous K/V [B, Hkv, N, D] (the kernels' ContiguousKV policy).
CONTIGUOUS = "contiguous"
#: Query tokens per sequence of one decode step (speculative decode checks up to 8 drafts).
MAX_DECODE_TOKENS = 8
#: The kernels move 16-byte chunks: every base address and outer stride is a multiple of it.
ALIGN_BYTES = 16
ELEMENT_BYTES = 2
#: Token indices and the table's capacity are 32-bit ints in the kernels.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class PagedProblem:
    """Checked paged-KV inputs; strides in elements, cache strides as {block, kv head, token}."""

    q: Any
    k_cache: Any
    v_cache: Any
    block_table: Any
    context_lens: Any
    batch: int
    num_heads: int
    num_kv_heads: int
    seq_q: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int
    dtype: str
    layout: str
    scale: float
    q_stride: Tuple[int, int, int]
    k_stride: Tuple[int, int, int]
    v_stride: Tuple[int, int, int]

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def capacity(self) -> int:
        """Tokens one sequence can address through its table row."""
        return self.max_blocks * self.block_size

    @property
    def device(self) -> Any:
        return self.q.device


def _aligned(x: Any, info: _v.TensorInfo, outer_axes: Tuple[int, ...]) -> None:
    if x.data_ptr() % ALIGN_BYTES:
        raise ValueError(f"{info.name}: data pointer {x.data_ptr():#x} is not {ALIGN_BYTES}-byte aligned")
    for axis in outer_axes:
        if info.shape[axis] > 1 and (info.strides[axis] * ELEMENT_BYTES) % ALIGN_BYTES:
            raise ValueError(f"{info.name}: stride {info.strides[axis]} of axis {axis} is not a multiple of "
                             f"{ALIGN_BYTES // ELEMENT_BYTES} elements ({ALIGN_BYTES} bytes)")


def _same_device(x: Any, name: str, q: Any) -> None:
    if getattr(x, "device", None) != q.device:
        raise ValueError(f"{name}: on {getattr(x, 'device', 'the host')}, q is on {q.device}")


def check_cache(k_cache: Any, v_cache: Any, layout: str, q: Any) -> Tuple[int, int, int, int, Any, Any]:
    """(num_blocks, block_size, Hkv, D, k strides, v strides) of a pool; strides {block, head, token}."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    blk, tok, head = LAYOUTS[layout]
    infos = []
    for x, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        info = _v.check_tensor(x, name, ndim=4, allowed_dtypes=DTYPES)
        _same_device(x, name, q)
        _aligned(x, info, (0, 1, 2))
        infos.append(info)
    ki, vi = infos
    if vi.shape != ki.shape:
        raise ValueError(f"v_cache: shape {vi.shape} does not match k_cache shape {ki.shape}")
    if vi.dtype != ki.dtype:
        raise TypeError(f"v_cache: dtype {vi.dtype} does not match k_cache dtype {ki.dtype}")
    num_blocks, block_size, kv_heads, dim = ki.shape[blk], ki.shape[tok], ki.shape[head], ki.shape[3]
    if block_size not in PAGE_SIZES:
        raise ValueError(f"k_cache: block size {block_size} (axis {tok} of layout {layout!r}) is not one of "
                         f"{', '.join(map(str, PAGE_SIZES))}")
    if num_blocks > MAX_TOKENS:
        raise ValueError(f"k_cache: {num_blocks} blocks exceed {MAX_TOKENS}")
    strides = [(i.strides[blk], i.strides[head], i.strides[tok]) for i in infos]
    return num_blocks, block_size, kv_heads, dim, strides[0], strides[1]


def check_index(x: Any, name: str, shape: Tuple[int, ...], q: Any) -> _v.TensorInfo:
    """An int32 tensor of exactly ``shape`` on q's device, rows contiguous."""
    info = _v.check_tensor(x, name, ndim=len(shape), allowed_dtypes=(INDEX_DTYPE,), contiguous_last_dim=True)
    _same_device(x, name, q)
    if info.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {info.shape}")
    if len(shape) == 2 and shape[0] > 1 and info.strides[0] != shape[1]:
        raise ValueError(f"{name}: rows must be contiguous (row stride {shape[1]}), got stride {info.strides[0]}")
    return info


def _cuda_query(q: Any, max_q_tokens: Optional[int]) -> Any:
    """q as a torch CUDA tensor [B, Hq, Nq, D] ([B, Hq, D] gets Nq = 1), Nq within ``max_q_tokens``."""
    qi = _v.tensor_info(q, "q")
    if qi.kind != "torch" or qi.device != "cuda":
        raise ValueError(f"q: the paged kernels take torch CUDA tensors, got a {qi.kind} on {qi.device} "
                         f"(attnproto.cpu.paged_forward is the host path)")
    if qi.ndim == 3:
        q = q.unsqueeze(2)
    seq_q = _v.tensor_info(q, "q").shape[2] if qi.ndim in (3, 4) else 0
    if max_q_tokens is not None and seq_q > max_q_tokens:
        raise ValueError(f"q: {seq_q} query tokens per sequence exceed {max_q_tokens} (decode; use paged_prefill)")
    return q


def check_paged(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                layout: str = "nhd", scale: Optional[float] = None, max_q_tokens: Optional[int] = None,
                check: bool = True) -> PagedProblem:
    """The one input check of :func:`paged_decode` / :func:`paged_prefill`: TypeError for a wrong
    type or dtype, ValueError for shapes, devices, strides, alignment and (``check``) values, each
    naming the argument. q is ``[B, Hq, Nq, D]`` (or ``[B, Hq, D]``, Nq = 1) on a CUDA device."""
    _v.check_bool(check, "check")
    q = _cuda_query(q, max_q_tokens)
    qi = _v.check_tensor(q, "q", ndim=4, allowed_dtypes=DTYPES)
    _aligned(q, qi, (0, 1, 2))
    batch, num_heads, seq_q, head_dim = qi.shape
    num_blocks, block_size, kv_heads, dim, ks, vs = check_cache(k_cache, v_cache, layout, q)
    if _v.dtype_name(k_cache.dtype) != qi.dtype:
        raise TypeError(f"k_cache: dtype {_v.dtype_name(k_cache.dtype)} does not match q dtype {qi.dtype}")
    if dim != head_dim:
        raise ValueError(f"k_cache: head_dim {dim} does not match q head_dim {head_dim}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q: head_dim {head_dim} not supported by the paged kernels; expected one of "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    if num_heads % kv_heads:
        raise ValueError(f"k_cache: {kv_heads} kv heads do not divide the {num_heads} query heads of q "
                         f"(GQA needs Hq % Hkv == 0)")
    bt = _v.tensor_info(block_table, "block_table")
    if bt.ndim != 2:
        raise ValueError(f"block_table: expected 2 dimensions [B, max_blocks], got shape {bt.shape}")
    check_index(block_table, "block_table", (batch, bt.shape[1]), q)
    check_index(context_lens, "context_lens", (batch,), q)
    max_blocks = bt.shape[1]
    if max_blocks < 1:
        raise ValueError("block_table: needs at least one column")
    if max_blocks * block_size > MAX_TOKENS:
        raise ValueError(f"block_table: capacity {max_blocks} x {block_size} tokens exceeds {MAX_TOKENS}")
    scale = _v.check_scale(scale, head_dim)
    if scale <= 0.0:
        raise ValueError(f"scale: must be positive (the kernels keep the running max of unscaled scores), got {scale}")
    problem = PagedProblem(q, k_cache, v_cache, block_table, context_lens, batch, num_heads, kv_heads, seq_q,
                           head_dim, num_blocks, block_size, max_blocks, qi.dtype, layout, scale, qi.strides[:3],
                           ks, vs)
    if check:
        check_table_values(block_table, context_lens, problem.capacity, num_blocks, block_size)
    return problem


def _capturing() -> bool:
    import torch  # noqa: PLC0415  (CUDA tensors exist)

    return bool(torch.cuda.is_current_stream_capturing())


def check_table_values(block_table: Any, context_lens: Any, capacity: int, num_blocks: int, block_size: int,
                       *, positions: Any = None, new_tokens: int = 0) -> None:
    """Lengths in [0, capacity] (or, for append, positions + new_tokens within it) and every table
    entry a sequence uses in [0, num_blocks). One synchronising reduction; skipped under capture."""
    if _capturing():
        return
    import torch  # noqa: PLC0415

    if positions is None:
        lens = context_lens.long()
        name = "context_lens"
        bad_len = (lens < 0) | (lens > capacity)
    else:
        lens = positions.long() + new_tokens
        name = "positions"
        bad_len = (positions.long() < 0) | (lens > capacity)
    used = (lens.clamp(0, capacity) + block_size - 1) // block_size
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    in_use = cols[None, :] < used[:, None]
    bad_entry = in_use & ((block_table < 0) | (block_table >= num_blocks))
    flags = torch.stack([bad_len.any(), bad_entry.any()]).cpu()
    if bool(flags[0]):
        b = int(torch.nonzero(bad_len)[0, 0])
        value = int((positions if positions is not None else context_lens)[b])
        extra = f" + {new_tokens} new tokens" if positions is not None else ""
        raise ValueError(f"{name}[{b}] = {value}{extra} out of range [0, {capacity}] (max_blocks {capacity // block_size}"
                         f" x block_size {block_size})")
    if bool(flags[1]):
        b, j = (int(x) for x in torch.nonzero(bad_entry)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} out of range [0, {num_blocks}) "
                         f"(num_blocks of the cache)")


def check_contiguous(q: Any, k: Any, v: Any, context_lens: Any, *, scale: Optional[float] = None,
                     max_q_tokens: Optional[int] = None) -> PagedProblem:
    """Decode over contiguous K/V ``[B, Hkv, N, D]`` with per-sequence lengths (the same kernel with
    its contiguous KV policy): the baseline that shows what paging costs."""
    q = _cuda_query(q, max_q_tokens)
    shape = _v.check_attention_inputs(q, k, v, allowed_dtypes=DTYPES, head_dims=HEAD_DIMS)
    infos = []
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _same_device(x, name, q)
        info = _v.tensor_info(x, name)
        _aligned(x, info, (0, 1, 2))
        infos.append(info)
    check_index(context_lens, "context_lens", (shape.batch,), q)
    scale = _v.check_scale(scale, shape.head_dim)
    if scale <= 0.0:
        raise ValueError(f"scale: must be positive, got {scale}")
    # One "block" per sequence holding all N tokens: capacity N; the table is never read.
    return PagedProblem(q, k, v, context_lens, context_lens, shape.batch, shape.num_heads, shape.num_kv_heads,
                        shape.seq_q, shape.head_dim, shape.batch, shape.seq_kv, 1, shape.dtype, CONTIGUOUS, scale,
                        infos[0].strides[:3], infos[1].strides[:3], infos[2].strides[:3])
