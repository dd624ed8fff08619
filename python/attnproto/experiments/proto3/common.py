"""Prototype 3 constants: the sweeps, the anchors' names, the timing counts."""
from __future__ import annotations

PROTOTYPE = "paged"
SWEEP_DTYPE = "bfloat16"
HEAD_DIM = 128
#: (Hq, Hkv): Llama-3-8B's 4:1 GQA, a 70B-like 8:1, and multi-head attention.
HEAD_CONFIGS = ((32, 8), (64, 8), (32, 32))
MAIN_HEADS = (32, 8)
MAIN_BATCH = 32
BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
MAIN_BLOCK = 16
CONTEXTS = (1024, 4096, 16384, 32768, 131072)
BATCHES = (1, 8, 32, 128, 256)
BLOCK_SWEEP_CONTEXTS = (4096, 16384)
SPLIT_BATCHES = (1, 8)
SPLIT_CONTEXT = 32768
#: (batch, context) points of the split sweep: one sequence at short, medium and long context
#: (what MIN_PARTITION_KEYS trades), and a batch of 8 (what the one-wave rule trades).
SPLIT_POINTS = ((1, 1024), (1, 4096), (1, 32768), (8, 32768))
SPLIT_PARTITIONS = (1, 2, 4, 8, 16, 32, 64, 128)
PACK_CONTEXTS = (4096, 16384)
#: Decode tiles (warps, keys per warp, stages) timed at the main shape (block 16 and contiguous).
TILES = ((4, 16, 2), (4, 16, 3), (4, 16, 4), (4, 32, 2), (4, 32, 3), (8, 16, 2), (8, 16, 3),
         (2, 16, 4), (2, 32, 3), (2, 64, 2))
TILE_CONTEXTS = (4096, 16384)
TILE_BLOCKS = (0, 16)                 # 0: the same kernel on contiguous K/V
#: Points whose contiguous K+V exceed this are skipped (the pool doubles it; 141 GB on the H200).
MAX_KV_BYTES = 16 * 2**30
QUICK_CONTEXTS = (1024, 4096)
QUICK_BATCHES = (1, 32)
WARMUP = 5
ITERS = 30
QUICK_ITERS = 5
#: Full-size check: |ours - cuDNN's| on the same inputs at most this (bf16 outputs of O(1)).
FULL_SIZE_DIFF = 2e-2
#: Bytes of the read-ceiling buffer (well past the 50 MB L2), its block size and the grids
#: (CTAs per SM) tried; the sentinel is a value the XOR of random data is not compared against
#: usefully (the kernel stores only on equality, so its loads cannot be optimised away).
CEILING_BYTES = 4 * 2**30
CEILING_THREADS = 512
CEILING_CTAS_PER_SM = (2, 4, 8)
CEILING_SENTINEL = 0x9E3779B9
ELEMENT_BYTES = 2

OURS = "attnproto_paged"
OURS_IDENTITY = "attnproto_paged_identity"
OURS_CONTIGUOUS = "attnproto_contiguous"
OURS_UNPACKED = "attnproto_paged_unpacked"
CUDNN = "sdpa_cudnn"
FLASH = "sdpa_flash"
GATHER = "gather_sdpa"
FLEX = "flex_paged"
CEILING = "read_ceiling"
#: flex_attention compiles per shape: run it at these points of the block sweep only. Its paged
#: block mask needs pages of at least its key tile (a 16-token page left Inductor no kernel
#: choice in the first H200 run), so it runs at block 128.
FLEX_POINTS = ((32, 4096, 128), (32, 16384, 128))


def kv_bytes(batch: int, kv_heads: int, context: int, head_dim: int = HEAD_DIM) -> int:
    """K + V bytes a decode step reads."""
    return 2 * batch * kv_heads * context * head_dim * ELEMENT_BYTES
