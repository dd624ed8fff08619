"""A transformers ``Cache`` backed by attnproto's block pool: every layer's K/V live in pages
``[num_blocks, block_size, Hkv, D]`` addressed through one block table ``int32 [B, max_blocks]``.

    cache = PagedKVCache(model.config, batch_size=B, max_cache_len=N, block_size=16)
    model.generate(ids, attention_mask=mask, past_key_values=cache, attn_implementation="attnproto")

The store is deferred into the attention call: ``update()`` keeps the new tokens' K/V (already
rotated by the model's own RoPE) as pending and returns them; the ``"attnproto"`` attention
function (:mod:`.transformers`) recognises them, writes them into their pages
(``torch.ops.attnproto.append_kv``) and attends over the table: paged decode
(``paged_decode``: up to 8 new tokens) or paged prefill (``paged_prefill``), GQA in the kernel.
The store sits in the attention call because that is where transformers hands over the padding
mask: a left-padded prompt is stored without its padding (sequence b's real tokens at positions
0..len_b-1) and every sequence keeps its own context length. Only the ``"attnproto"`` attention
function understands a pending update: with any other implementation this cache raises.

Context lengths live on the device (``int32 [B]`` per layer), advanced in place by each store, so
a decode step reads no host state that changes between steps: captured once in a CUDA graph it
replays step after step (the host-side count of processed columns, ``get_seq_length``, is what
transformers' position and mask bookkeeping reads; :meth:`PagedKVCache.advance` moves it after
graph replays). The table maps sequence b to a scattered set of blocks (a permutation drawn
once, so a test sees real paging, not an identity table).
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Dict, Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

#: id of the K tensor handed out by update() -> its layer, until the attention call consumes it.
_PENDING: Dict[int, "PagedLayer"] = {}


class PagedLayer(CacheLayerMixin):
    """One decoder layer's pages and per-sequence context lengths; the block table is the cache's."""

    is_compileable = False

    def __init__(self, cache: "PagedKVCache"):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.length = 0          # columns processed (padding included), what transformers counts
        self.lens: Optional[torch.Tensor] = None
        self.pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from .transformers import check_supported  # noqa: PLC0415

        c = self._cache
        b, hkv, _, d = key_states.shape
        if b != c.num_seqs:
            raise ValueError(f"key_states: batch {b} does not match the cache's batch_size {c.num_seqs}")
        check_supported(key_states.device.type, key_states.dtype, d)
        shape = (c.num_blocks, c.block_size, hkv, d)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.lens = torch.zeros((b,), dtype=torch.int32, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.keys.dtype:
            raise TypeError(f"key_states: dtype {key_states.dtype} does not match the cache's {self.keys.dtype}")
        c = self._cache
        new = key_states.shape[2]
        if self.length + new > c.max_cache_len:
            raise ValueError(f"key_states: the cache is full: {self.length} cached + {new} new tokens exceed "
                             f"max_cache_len {c.max_cache_len}")
        if self.pending is not None:
            raise RuntimeError("PagedKVCache: the previous update was never stored; this cache needs "
                               "attn_implementation='attnproto' (its attention function does the store)")
        self.pending = (key_states, value_states)
        _PENDING[id(key_states)] = self
        return key_states, value_states

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor,
              attention_mask: Optional[torch.Tensor]) -> bool:
        """Write the pending tokens into their pages and advance the lengths; True when this was a
        padded first prefill (sequence b's ``pad_b`` leading columns dropped)."""
        new = key_states.shape[2]
        table = self._cache.table(self.keys.device)
        padded = attention_mask is not None and self.length == 0
        if padded:
            key_states, value_states, real = _left_compact(key_states, value_states, attention_mask[:, -new:])
            positions = self.lens.clone()
            self.lens.copy_(real)
        else:
            positions = self.lens.clone()
            self.lens.add_(new)
        # check=False: the table is this cache's own permutation of its pool and the positions are
        # its lengths, kept within max_cache_len by update(): valid by construction, so the per-layer
        # device check (a host sync per layer, 22 per forward) is skipped.
        torch.ops.attnproto.append_kv(key_states, value_states, self.keys, self.values, table, positions, False)
        self.length += new
        self.pending = None
        return padded

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._cache.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.lens.zero_()
        self.length = 0
        self.pending = None


def capturing(x: torch.Tensor) -> bool:
    """Whether x's device is recording a CUDA graph (no host read of device values then)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _left_compact(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift each left-padded row so its real tokens come first; (K, V, real lengths int32)."""
    keep = mask.to(torch.int32)
    real = keep.sum(dim=1, dtype=torch.int32)
    t = mask.shape[1]
    starts = torch.arange(t, device=mask.device)[None, :] >= (t - real)[:, None]
    if not capturing(mask) and not bool(torch.equal(starts, keep.bool())):
        raise ValueError("attention_mask: only left padding is supported (zeros before the tokens of a row)")
    pad = (t - real).long()
    idx = (torch.arange(t, device=mask.device)[None, :] + pad[:, None]).clamp(max=t - 1)   # [B, T]
    gather = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, gather), v.gather(2, gather), real


class PagedKVCache(Cache):
    """A paged KV cache for ``num_hidden_layers`` layers of ``config``'s attention."""

    def __init__(self, config: Any, *, batch_size: int, max_cache_len: int, block_size: int = 16,
                 seed: int = 0):
        from ..ops.paged_problem import PAGE_SIZES  # noqa: PLC0415

        if block_size not in PAGE_SIZES:
            raise ValueError(f"block_size: must be one of {PAGE_SIZES}, got {block_size}")
        for value, name in ((batch_size, "batch_size"), (max_cache_len, "max_cache_len")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        # transformers' Cache exposes max_cache_len as a read-only property (5.17): ours returns this
        self.num_seqs, self._max_cache_len, self.block_size = batch_size, max_cache_len, block_size
        self.max_blocks = math.ceil(max_cache_len / block_size)
        self.num_blocks = batch_size * self.max_blocks
        perm = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(seed))
        self._table = perm.view(batch_size, self.max_blocks).to(torch.int32).contiguous()
        self._tables: dict = {}
        layers = int(getattr(config, "num_hidden_layers"))
        super().__init__(layers=[PagedLayer(self) for _ in range(layers)])

    @property
    def max_cache_len(self) -> int:
        """Tokens every sequence may hold (the table's capacity in whole blocks is at least this)."""
        return self._max_cache_len

    def table(self, device: Any) -> torch.Tensor:
        """The block table on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self._table.to(device)
        return self._tables[key]

    def context_lens(self) -> torch.Tensor:
        """Sequence b's stored tokens (int32 [B], on the device; every layer holds the same)."""
        return self.layers[0].lens

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` columns a replayed CUDA graph stored (the device lengths moved in the graph)."""
        for layer in self.layers:
            layer.length += tokens

    def fill_random(self, context: int, *, dtype: Any, device: Any, head_dim: int, kv_heads: int,
                    seed: int = 0) -> None:
        """Every layer holding ``context`` random tokens per sequence (a decode benchmark's
        starting state without running the prefill)."""
        if not 0 <= context <= self.max_cache_len:
            raise ValueError(f"context: {context} is outside [0, max_cache_len={self.max_cache_len}]")
        g = torch.Generator(device=device).manual_seed(seed)
        probe = torch.empty((self.num_seqs, kv_heads, 1, head_dim), dtype=dtype, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(probe, probe)
            layer.keys.normal_(generator=g)
            layer.values.normal_(generator=g)
            layer.lens.fill_(context)
            layer.length = context


def pending_layer_of(key: Any) -> Optional[PagedLayer]:
    """The layer whose pending update ``key`` is (consumed), or None (a plain K tensor)."""
    if not _PENDING:
        return None
    layer = _PENDING.pop(id(key), None)
    return layer if layer is not None and layer.pending is not None and layer.pending[0] is key else None


__all__ = ["PagedKVCache", "PagedLayer", "capturing", "pending_layer_of"]
