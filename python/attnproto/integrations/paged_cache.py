"""A transformers ``Cache`` backed by attnproto's block pool: every layer's K/V live in pages
``[num_blocks, block_size, Hkv, D]`` addressed through one block table ``int32 [B, max_blocks]``.

    cache = PagedKVCache(model.config, batch_size=B, max_cache_len=N, block_size=16)
    model.generate(ids, past_key_values=cache, attn_implementation="attnproto")

``update()`` writes the new tokens into their pages (``torch.ops.attnproto.append_kv``) and
hands the attention function the pools themselves; the ``"attnproto"`` attention function
(:mod:`.transformers`) recognises them and runs paged decode (``paged_decode``: up to 8 new
tokens) or paged prefill (``paged_prefill``) over the table, GQA in the kernel. The first
prefill of an empty cache attends to the new K/V directly (flash attention), as nothing else
is cached yet. Only the ``"attnproto"`` attention function understands the pools: with any
other attention implementation this cache raises.

Every sequence of the batch has the same length (unpadded batches; the attention function
refuses padding); the table maps sequence b to a scattered set of blocks (a permutation drawn
once, so a test sees real paging, not an identity table).
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

#: data_ptr of a layer's K pool -> the layer (how the attention function finds the table).
_POOLS: "weakref.WeakValueDictionary[int, PagedLayer]" = weakref.WeakValueDictionary()


class PagedLayer(CacheLayerMixin):
    """One decoder layer's pages; the block table and lengths are the cache's."""

    is_compileable = False

    def __init__(self, cache: "PagedKVCache"):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self._cache
        b, hkv, _, d = key_states.shape
        if b != c.num_seqs:
            raise ValueError(f"key_states: batch {b} does not match the cache's batch_size {c.num_seqs}")
        shape = (c.num_blocks, c.block_size, hkv, d)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.device = key_states.device
        self.is_initialized = True
        _POOLS[self.keys.data_ptr()] = self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        from . import torch_ops  # noqa: F401, PLC0415  (registers torch.ops.attnproto)

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self._cache
        new = key_states.shape[2]
        if self.length + new > c.max_cache_len:
            raise ValueError(f"key_states: {self.length} cached + {new} new tokens exceed max_cache_len "
                             f"{c.max_cache_len}")
        table = c.table(self.keys.device)
        positions = torch.full((c.num_seqs,), self.length, dtype=torch.int32, device=self.keys.device)
        torch.ops.attnproto.append_kv(key_states, value_states, self.keys, self.values, table, positions)
        first = self.length == 0
        self.length += new
        if first:  # nothing else is cached: attention over the new tokens themselves
            return key_states, value_states
        return self.keys, self.values

    def context_lens(self) -> torch.Tensor:
        return torch.full((self._cache.num_seqs,), self.length, dtype=torch.int32, device=self.keys.device)

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._cache.max_cache_len

    def reset(self) -> None:
        super().reset()
        self.length = 0


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
        self.num_seqs, self.max_cache_len, self.block_size = batch_size, max_cache_len, block_size
        self.max_blocks = math.ceil(max_cache_len / block_size)
        self.num_blocks = batch_size * self.max_blocks
        perm = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(seed))
        self._table = perm.view(batch_size, self.max_blocks).to(torch.int32).contiguous()
        self._tables: dict = {}
        layers = int(getattr(config, "num_hidden_layers"))
        super().__init__(layers=[PagedLayer(self) for _ in range(layers)])

    def table(self, device: Any) -> torch.Tensor:
        """The block table on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self._table.to(device)
        return self._tables[key]


def paged_layer_of(key: torch.Tensor) -> Optional[PagedLayer]:
    """The layer whose K pool ``key`` is, or None (a plain K tensor)."""
    if key.dim() != 4 or key.device.type == "meta":
        return None
    layer = _POOLS.get(key.data_ptr())
    return layer if layer is not None and layer.keys is key else None


__all__ = ["PagedKVCache", "PagedLayer", "paged_layer_of"]
