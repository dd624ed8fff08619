"""torch custom ops over attnproto's kernels (namespace ``attnproto``).

    torch.ops.attnproto.flash_attention(q, k, v, causal, scale) -> (O, LSE)
    torch.ops.attnproto.paged_decode(q, k_cache, v_cache, block_table, context_lens, scale) -> (O, LSE)
    torch.ops.attnproto.paged_prefill(q, k_cache, v_cache, block_table, context_lens, scale) -> (O, LSE)
        (both also take check, alibi_slopes [Hq] float32, window, softcap: the Prototype 7 variants)
    torch.ops.attnproto.append_kv(k_new, v_new, k_cache, v_cache, block_table, positions) -> ()   # mutates the caches
    torch.ops.attnproto.rope_append(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin) -> q_rot
    torch.ops.attnproto.fused_prefill(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin, scale)
        -> (O, LSE)                                                                      # mutates the caches

``rope_append`` / ``fused_prefill`` take Q, K, V before RoPE: K is rotated once, as it is stored
(rotate-half RoPE at the absolute position ``positions[b] + i``, cos/sin float32 tables
``[max_pos, D/2]``, :func:`attnproto.ops.paged_rope.rope_tables`), Q is rotated out of place in
the same launch (``shaders/cuda/paged_rope_append.cu``), V is stored as is; ``fused_prefill``
then attends over the cache (``positions + T`` keys per sequence): two launches instead of four
(rope q, rope k, append, attention). ``rope_append`` alone is the decode step's first half
(followed by ``paged_decode``).

CUDA tensors run attnproto's kernels (``kernel="auto"``; the paged kernels of
:mod:`attnproto.ops.paged`) on torch's current stream, so the ops join CUDA graphs and
``torch.compile`` sees each as one opaque node. CPU tensors run the numpy backend (float32
arithmetic, the result cast back to the input dtype): the reference path, and what lets
``torch.library.opcheck`` check the ops' schema, fake implementations and mutation
declarations on a machine without a GPU. Shapes as in :mod:`attnproto.ops`: Q
``[B, Hq, Nq, D]``, K/V ``[B, Hkv, Nkv, D]``, paged pools ``[num_blocks, block_size, Hkv, D]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import cpu as _cpu
from ..ops import flash as _flash
from ..ops import paged as _paged
from ..ops import paged_rope as _rope

Tensor = torch.Tensor
NAMESPACE = "attnproto"


@torch.library.custom_op(f"{NAMESPACE}::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float] = None
                    ) -> Tuple[Tensor, Tensor]:
    """Flash attention forward: (O like q, LSE float32 [B, Hq, Nq]); causal is bottom-right aligned."""
    if q.is_cuda:
        launch = _flash.prepare_forward(q, k, v, causal=causal, scale=scale)
        return launch.launch(stream=_paged.current_stream())
    o, lse = _flash.flash_forward(q, k, v, causal=causal, scale=scale)
    return torch.from_numpy(o).to(q.dtype), torch.from_numpy(lse)


@flash_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


def _variant_kwargs(alibi_slopes: Optional[Tensor], window: Optional[int], softcap: Optional[float],
                    cuda: bool) -> dict:
    """The variant keywords of the CUDA front door (``alibi`` = the slopes) or of the numpy path."""
    if cuda:
        return dict(alibi=False if alibi_slopes is None else alibi_slopes, window=window, softcap=softcap)
    return dict(alibi=alibi_slopes is not None, alibi_slopes=None if alibi_slopes is None else alibi_slopes.numpy(),
                window=window, softcap=softcap)


@torch.library.custom_op(f"{NAMESPACE}::paged_decode", mutates_args=())
def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_lens: Tensor,
                 scale: Optional[float] = None, check: bool = True, alibi_slopes: Optional[Tensor] = None,
                 window: Optional[int] = None, softcap: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Decode over a paged cache; q [B, Hq, D] or [B, Hq, Nq, D] (Nq <= 8). ``check``: verify every
    table entry and length on the device first (one host sync; a caller owning the table skips it).
    ``alibi_slopes`` (float32 [Hq]), ``window``, ``softcap``: the variants of :mod:`attnproto.ops.paged`."""
    if q.is_cuda:  # the front door launches on torch's current stream
        return _paged.paged_decode(q, k_cache, v_cache, block_table, context_lens, scale=scale, check=check,
                                   **_variant_kwargs(alibi_slopes, window, softcap, True))
    q4 = q.unsqueeze(2) if q.dim() == 3 else q
    # The numpy path reads [num_blocks, Hkv, block_size, D]: the same pool, permuted.
    o, lse = _cpu.paged_forward(q4, k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3), block_table,
                                context_lens, causal=q4.shape[2] > 1, scale=scale,
                                **_variant_kwargs(alibi_slopes, window, softcap, False))
    o, lse = torch.from_numpy(o).to(q.dtype), torch.from_numpy(lse)
    return (o.squeeze(2), lse.squeeze(2)) if q.dim() == 3 else (o, lse)


@paged_decode.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_lens: Tensor,
      scale: Optional[float] = None, check: bool = True, alibi_slopes: Optional[Tensor] = None,
      window: Optional[int] = None, softcap: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::paged_prefill", mutates_args=())
def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_lens: Tensor,
                  scale: Optional[float] = None, check: bool = True, alibi_slopes: Optional[Tensor] = None,
                  window: Optional[int] = None, softcap: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """A chunk of Nq new tokens per sequence (the last Nq of its context_lens[b] keys), causal
    bottom-right, over the paged cache (CUDA: the Hopper wgmma kernel); variants as paged_decode."""
    if q.is_cuda:  # the front door launches on torch's current stream
        return _paged.paged_prefill(q, k_cache, v_cache, block_table, context_lens, scale=scale, check=check,
                                    **_variant_kwargs(alibi_slopes, window, softcap, True))
    o, lse = _cpu.paged_forward(q, k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3), block_table,
                                context_lens, causal=True, scale=scale,
                                **_variant_kwargs(alibi_slopes, window, softcap, False))
    return torch.from_numpy(o).to(q.dtype), torch.from_numpy(lse)


@paged_prefill.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_lens: Tensor,
      scale: Optional[float] = None, check: bool = True, alibi_slopes: Optional[Tensor] = None,
      window: Optional[int] = None, softcap: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::append_kv", mutates_args=("k_cache", "v_cache"))
def append_kv(k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
              positions: Tensor, check: bool = True) -> None:
    """Write the new tokens' K/V ([B, Hkv, T, D]) into their pages, at positions[b] + i (``check``:
    as for paged_decode)."""
    if k_new.is_cuda:  # the front door launches on torch's current stream
        _paged.append_kv(k_new, v_new, k_cache, v_cache, block_table, positions, check=check)
        return
    _append_host(k_new, v_new, k_cache, v_cache, block_table, positions)


@append_kv.register_fake
def _(k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
      positions: Tensor, check: bool = True) -> None:
    return None


@torch.library.custom_op(f"{NAMESPACE}::rope_append", mutates_args=("k_cache", "v_cache"))
def rope_append(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of q ([B, Hq, T, D], returned rotated) and k_new at positions[b] + i; rotated K and V
    ([B, Hkv, T, D]) written into their pages."""
    if q.is_cuda:
        return _rope.rope_append(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin)
    q_rot, k_rot = _rope_host(q, k_new, positions, cos, sin)
    _append_host(k_rot, v_new, k_cache, v_cache, block_table, positions)
    return q_rot


@rope_append.register_fake
def _(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
      positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{NAMESPACE}::fused_prefill", mutates_args=("k_cache", "v_cache"))
def fused_prefill(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                  positions: Tensor, cos: Tensor, sin: Tensor, scale: Optional[float] = None
                  ) -> Tuple[Tensor, Tensor]:
    """RoPE + KV store + attention of T new tokens per sequence (causal, bottom-right, over the
    positions[b] + T keys of sequence b): rope_append, then paged prefill (T <= 8: paged decode)."""
    if q.is_cuda:
        return _rope.fused_prefill(q, k_new, v_new, k_cache, v_cache, block_table, positions, cos, sin, scale=scale)
    q_rot, k_rot = _rope_host(q, k_new, positions, cos, sin)
    _append_host(k_rot, v_new, k_cache, v_cache, block_table, positions)
    lens = positions + q.shape[2]
    o, lse = _cpu.paged_forward(q_rot, k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3), block_table, lens,
                                causal=q.shape[2] > 1, scale=scale)
    return torch.from_numpy(o).to(q.dtype), torch.from_numpy(lse)


@fused_prefill.register_fake
def _(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
      positions: Tensor, cos: Tensor, sin: Tensor, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


def _rope_host(q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """The CPU path's RoPE (float32, as the kernel computes it), with the CUDA op's checks."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q / k_new: expected [B, H, T, D], got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q: dtype {q.dtype} does not match k_new dtype {k.dtype}")
    if positions.dtype != torch.int32:
        raise TypeError(f"positions: expected int32, got {positions.dtype}")
    b, _, t, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
        raise ValueError(f"q: shape {tuple(q.shape)} does not match the new tokens {tuple(k.shape)}")
    max_pos = _rope.check_tables(cos, sin, d, k)
    pos = positions.long()[:, None] + torch.arange(t)[None, :]                    # [B, T]
    if bool(((pos < 0) | (pos >= max_pos)).any()):
        raise ValueError(f"positions: the new tokens reach positions [{int(pos.min())}, {int(pos.max())}], "
                         f"the RoPE tables hold [0, {max_pos})")
    c, s = cos[pos][:, None], sin[pos][:, None]                                   # [B, 1, T, D/2]

    def rot(x: Tensor) -> Tensor:
        x1, x2 = x.float()[..., :d // 2], x.float()[..., d // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rot(q), rot(k)


def _append_host(k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                 positions: Tensor) -> None:
    """The CPU path of append_kv, with the same checks as the CUDA op (ValueError naming the argument)."""
    if k_new.dim() == 3:
        k_new, v_new = k_new.unsqueeze(2), v_new.unsqueeze(2)
    if k_new.shape != v_new.shape:
        raise ValueError(f"v_new: shape {tuple(v_new.shape)} does not match k_new {tuple(k_new.shape)}")
    if block_table.dtype != torch.int32 or positions.dtype != torch.int32:
        raise TypeError("block_table / positions: expected int32")
    b, hkv, t, d = k_new.shape
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    if tuple(k_cache.shape[2:]) != (hkv, d):
        raise ValueError(f"k_new: {hkv} heads x head_dim {d} do not match the cache's {tuple(k_cache.shape[2:])}")
    capacity = block_table.shape[1] * block_size
    pos = positions.long()[:, None] + torch.arange(t)[None, :]                    # [B, T]
    bad = (positions.long() < 0) | (pos[:, -1] >= capacity)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"positions[{i}] = {int(positions[i])} + {t} new tokens out of range [0, {capacity}]")
    pages = block_table.long().gather(1, pos // block_size)                       # [B, T]
    if bool(((pages < 0) | (pages >= num_blocks)).any()):
        raise ValueError(f"block_table: an entry for the new tokens is out of range [0, {num_blocks})")
    slots = pos % block_size
    k_cache[pages, slots] = k_new.permute(0, 2, 1, 3).to(k_cache.dtype)
    v_cache[pages, slots] = v_new.permute(0, 2, 1, 3).to(v_cache.dtype)


__all__ = ["NAMESPACE", "append_kv", "flash_attention", "fused_prefill", "paged_decode", "paged_prefill", "rope_append"]
