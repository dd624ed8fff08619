"""Shared builders of the paged-KV tests and of Prototype 3: a block pool filled from contiguous
K/V through a scattered (or identity) block table, unused slots and table entries poisoned.
Needs torch (GPU tests only)."""
from __future__ import annotations

import numpy as np

#: Slots of the pool that hold no token are filled with NaN: a kernel that reads them (or lets
#: them reach O through 0 * NaN) fails every comparison.
POOL_FILL = float("nan")
#: Table entries a sequence does not use: far out of range, so reading one would fault or NaN.
UNUSED_ENTRY = 2**30
#: Spare blocks in the pool beyond the ones the sequences use (the scattered ids spread over them).
SPARE_BLOCKS = 7


def build_pool(k, v, lens, block_size, *, scatter=True, layout="nhd", seed=0, max_blocks=None):
    """k/v torch [B, Hkv, N, D] -> (k_cache, v_cache, block_table int32 [B, max_blocks], lens int32 [B])."""
    import torch  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    b, hkv, n, d = k.shape
    used = [-(-int(x) // block_size) for x in lens]
    max_blocks = max_blocks or max(1, max(used))
    num_blocks = sum(used) + SPARE_BLOCKS
    ids = rng.permutation(num_blocks) if scatter else np.arange(num_blocks)
    table = np.full((b, max_blocks), UNUSED_ENTRY, dtype=np.int32)
    pos = 0
    for i, u in enumerate(used):
        table[i, :u] = ids[pos:pos + u]
        pos += u
    shape = (num_blocks, block_size, hkv, d) if layout == "nhd" else (num_blocks, hkv, block_size, d)
    caches = []
    for src in (k, v):
        pool = torch.full(shape, POOL_FILL, dtype=src.dtype, device=src.device)
        for i, length in enumerate(lens):
            for j in range(used[i]):
                t0, t1 = j * block_size, min(int(length), (j + 1) * block_size)
                blk = int(table[i, j])
                piece = src[i, :, t0:t1]                       # [Hkv, t, D]
                if layout == "nhd":
                    pool[blk, :t1 - t0] = piece.transpose(0, 1)
                else:
                    pool[blk, :, :t1 - t0] = piece
        caches.append(pool)
    dev = k.device
    return (caches[0], caches[1], torch.from_numpy(table).to(dev),
            torch.tensor([int(x) for x in lens], dtype=torch.int32, device=dev))


def hnd(cache, layout):
    """The [num_blocks, Hkv, block_size, D] view attnproto.ref.paged_attention reads."""
    return cache.permute(0, 2, 1, 3) if layout == "nhd" else cache


def host_table(table):
    """A host copy with unused entries zeroed (the reference checks every entry it reads only)."""
    t = table.cpu().numpy().copy()
    t[t == UNUSED_ENTRY] = 0
    return t
