// flash_fwd_wgmma.cu — Flash Attention forward for Hopper (sm_90a): TMA loads
// into 128-byte-swizzled shared memory, an mbarrier ring of K/V stages, one
// producer warpgroup and CONSUMER_WG consumer warpgroups running wgmma.
//
// Work of one CTA: BLOCK_R = 64 * CONSUMER_WG query rows of one (batch, head).
//   producer warpgroup (warpgroup 0): lowers its register budget (setmaxnreg),
//     one thread issues the TMA load of the Q tile, then walks the key blocks
//     of the CTA (last block first) loading K and V tiles into a STAGES-deep
//     ring: per stage it waits on `k_empty` / `v_empty`, arms `k_full` / `v_full`
//     with the tile bytes (arrive.expect_tx) and issues the bulk-tensor copies.
//   consumer warpgroup c (warpgroups 1..CONSUMER_WG): owns query rows
//     [64c, 64c + 64) of the tile and raises its register budget. Per key block:
//       S = Q_c K^T        wgmma m64 n BLOCK_C k16, A = Q (smem), B = K (smem, K-major)
//       online softmax     in the accumulator registers (fp32, exp2 domain)
//       O += P V           wgmma m64 n HEAD_DIM k16, A = P (registers, 16-bit),
//                          B = V (smem, MN-major through the transpose bit)
//     software-pipelined FA3-style: S of block i+1 and P V of block i are issued
//     back to back and the softmax of block i+1 runs while P V is in flight.
//     Every consumer thread arrives on `k_empty` once S is complete and on
//     `v_empty` once P V is complete.
//   epilogue: O / l written from registers to global memory, LSE = ln(sum exp).
//
// Shared memory: every tile is stored as HEAD_DIM/64 column blocks of
// [rows x 64] 16-bit elements, 128 bytes per row, swizzled by TMA with
// CU_TENSOR_MAP_SWIZZLE_128B (the same layout the wgmma descriptors describe).
// Column block cb of a tile with R rows starts at cb * R * 128 bytes; every
// block start is 1024-byte aligned so the descriptors' base offset is 0.
//
// Tensor maps (built on the host, python/attnproto/ops/flash_wgmma.py): 4-D over
// [B, H, N, D], dims innermost first (D, N, H, B), box (64, rows, 1, 1),
// 128-byte swizzle, zero fill out of bounds: rows past N of a head read as zeros
// (scores of keys >= Nkv are masked to -inf; rows of queries >= Nq are not stored).
//
// Masking: keys >= Nkv, and with CAUSAL keys j > i + Nkv - Nq (bottom-right
// aligned). Key blocks entirely above the diagonal are skipped; a query row that
// sees no key gets O = 0, LSE = -inf. With CAUSAL the heaviest row blocks of all
// heads are scheduled first.
//
// NaN / inf: the policy of python/attnproto/ref.py (module doc). The row max is
// NaN-propagating (ap::fmax_nan, PTX max.NaN.f32: same FMNMX instruction as fmaxf), and
// "the row sees no key" is decided from the mask geometry in the epilogue, so a NaN row
// is never written as a zero row. Known deviation (documented there): P V runs on whole
// wgmma tiles, so a non-finite V at a key masked out for a row but inside a key block
// the row's CTA processes reaches that row's O column through 0 * NaN.
//
// Paged K/V (PAGE_SIZE > 0; chunked prefill over a block pool). K/V live in a pool
// k_cache, v_cache [num_blocks, PAGE_SIZE, Hkv, D] (any strides, D contiguous); sequence
// b owns the pages block_table[b][0 .. ceil(ctx[b] / PAGE_SIZE)) and has ctx[b] keys
// (context_lens, read on the device: no host synchronisation). Q [B, Hq, Nq, D] holds the
// last Nq tokens of every sequence, so the causal diagonal is bottom-right per sequence:
// query i of sequence b sees keys j <= i + ctx[b] - Nq. The tensor maps of K and V are
// 4-D over the pool (D, slot, kv head, page) and the producer's tile-address step is the
// only place the two layouts differ (KvAddress below): key row r of sequence b is slot
// r % PAGE_SIZE of page block_table[b][r / PAGE_SIZE]. A K/V tile is gathered in boxes of
// kBoxRows = gcd(PAGE_SIZE, BLOCK_C) keys, one TMA per box and 64-column block: one box
// per column block when the page holds the whole key block, one per page (or part of a
// page) otherwise, issued by the 32 lanes of the producer warp.
//   Boxes shorter than the 8-row swizzle atom (PAGE_SIZE 1): a box lands at a 128-byte
//   aligned, not 1024-byte aligned, shared address. PTX ISA "Tensor swizzling modes": the
//   128-byte pattern repeats from 1024-byte boundaries and a copy to any other dstMem
//   starts with base offset (dstMem / 128) % 8, i.e. row r of the tile is XORed with r % 8
//   whichever box wrote it. That is the pattern the wgmma descriptors read (base offset 0
//   at the 1024-aligned tile start; PTX ISA "Matrix Descriptor Format"), so one TMA path
//   serves every page size.
// Safety (a table changed after the host's checks): the producer reads table entries only
// for keys < ctx, with ctx clamped to [0, max_blocks_per_seq * PAGE_SIZE]; a page id < 0
// or >= num_blocks is never copied (its box is skipped and the transaction bytes lowered).
// Such rows are not silently wrong: the CTA records the first key of a bad page, and every
// query row whose visible keys reach it writes O = NaN, LSE = NaN; a ctx out of range makes
// all rows of the sequence NaN. (The skipped box leaves stale shared memory that rows not
// seeing it multiply by P = 0: finite stale data adds nothing, non-finite stale data turns
// them NaN as well; never a finite wrong value.)
// Slots of the last page past ctx[b] are real pool memory and may hold anything (NaN bit
// patterns of torch.empty). Their K columns are masked to -inf like any key >= Nkv; their
// V rows would still reach O through 0 * NaN on the tensor cores, so the consumers zero
// the V rows >= ctx of the one key block that crosses ctx (its first step, before P V;
// boxes past ctx are not loaded at all and are zeroed with them).
//
// Variants (shaders/cuda/include/variants.cuh; Prototype 7). Soft cap and ALiBi transform the
// scores in the consumers' softmax step (ScoreMod); the sliding window is a third mask beside
// the key count and the causal diagonal, and key blocks wholly left of every row's window are
// never loaded (the producer and the consumers walk [first_block, n_blocks)). RoPE: the three
// idle warps of the producer warpgroup ("rope warps") rotate the Q tile once per CTA and every
// K tile as it lands, in shared memory, between the TMA's full barrier and a second "ready"
// barrier the consumers wait on (q_ready, k_ready[]); their writes reach the tensor cores'
// async proxy through fence.proxy.async before they arrive. Paged K/V is stored already
// rotated (RoPE is applied where K is written), so PAGE_SIZE > 0 with ROPE is refused.
//
// Kernel arguments, in order:
//   p             AttentionParams (paged: seq_kv = max_blocks_per_seq * PAGE_SIZE, the
//                 capacity; block_size = PAGE_SIZE; max_blocks_per_seq = table columns, also
//                 the table's row stride (rows contiguous); num_blocks = pages in the pool)
//   tm_q          TMA map of Q
//   tm_k, tm_v    TMA maps of K and V: [B, Hkv, Nkv, D], or paged over the pool
//   o, lse        outputs
//   block_table   int32 [B, max_blocks_per_seq] (paged; null for contiguous K/V)
//   context_lens  int32 [B] (paged; null for contiguous K/V)
//   rope_cos, rope_sin  float32 [p.rope_table_len, D/2] (ROPE_TABLE = 1; else null)
//   alibi_slopes  float32 [Hq] (ALIBI = 2; else null)
//
// Constants (all required): HEAD_DIM, BLOCK_R, BLOCK_C, STAGES, CONSUMER_WG,
// CAUSAL, DTYPE (0 = float16, 1 = bfloat16), PAGE_SIZE (0 = contiguous K/V), and the
// variant constants ROPE, ROPE_TABLE, ALIBI, WINDOW, SOFTCAP (variants.cuh).
#include "common/attn_params.h"
#include "cuda/include/common.cuh"   // ap::fmax_nan, ap::quiet_nan
#include "cuda/include/hopper.cuh"
#include "cuda/include/variants.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef BLOCK_R
#error "BLOCK_R must be defined"
#endif
#ifndef BLOCK_C
#error "BLOCK_C must be defined"
#endif
#ifndef STAGES
#error "STAGES must be defined"
#endif
#ifndef CONSUMER_WG
#error "CONSUMER_WG must be defined"
#endif
#ifndef CAUSAL
#error "CAUSAL must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined"
#endif
#ifndef PAGE_SIZE
#error "PAGE_SIZE must be defined (0 = contiguous K/V)"
#endif

namespace fwd {

using hopper::u32;
using hopper::u64;

constexpr bool kBF16 = (DTYPE == 1);
constexpr bool kCausal = (CAUSAL != 0);
constexpr bool kPaged = (PAGE_SIZE != 0);

constexpr int kWarpgroupThreads = 128;
constexpr int kRowsPerConsumer = 64;          // wgmma M
constexpr int kMmaK = 16;                     // wgmma K for 16-bit inputs
constexpr int kElemBytes = 2;                 // float16 / bfloat16
constexpr int kColsPerBlock = hopper::kSwizzleRowBytes / kElemBytes;  // 64 elements per swizzled row
constexpr int kThreads = (CONSUMER_WG + 1) * kWarpgroupThreads;
constexpr int kConsumerThreads = CONSUMER_WG * kWarpgroupThreads;
constexpr int kColBlocks = HEAD_DIM / kColsPerBlock;

// Register budgets after setmaxnreg. The register file holds 64 K 32-bit
// registers, i.e. 512 per thread-slot of a 128-thread warpgroup: with two
// consumer warpgroups 24 (producer) + 2 x 240 = 504 <= 512. The producer only
// keeps loop counters and coordinates; 24 is the architectural minimum.
// RoPE variants: the rope warps of the producer warpgroup rotate in registers. setmaxnreg moves
// registers only within the CTA's pool (PTX ISA, setmaxnreg: .inc blocks until the registers
// released by .dec suffice), so the budgets must satisfy 128 (L - P) >= 128 CW (C - L) with L the
// launch's per-thread count: P + 2 C <= 3 L = 504 for two consumer warpgroups (kLaunchRegs).
// D <= 128: 56 for the rope warps, 224 for the consumers (ptxas: no spills either side).
// D = 256: the consumers' O accumulator needs 240, which leaves the producer 24 (the rope warps
// spill their recurrence state to local memory, off the tensor cores' critical path).
constexpr bool kWideHead = HEAD_DIM > 128;
constexpr u32 kProducerRegs = (variant::kRope && !kWideHead) ? 56 : 24;
constexpr u32 kConsumerRegs = (variant::kRope && !kWideHead) ? 224 : 240;
constexpr u32 kRegisterFileSlots = 65536 / kWarpgroupThreads;
// setmaxnreg is used with two or more consumer warpgroups: with one, the launch
// bound of 256 threads already gives every thread the 255-register maximum.
constexpr bool kUseSetmaxnreg = CONSUMER_WG >= 2;

static_assert(DTYPE == 0 || DTYPE == 1, "DTYPE must be 0 (float16) or 1 (bfloat16)");
static_assert(CAUSAL == 0 || CAUSAL == 1, "CAUSAL must be 0 or 1");
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM must be 64, 128 or 256");
static_assert(CONSUMER_WG == 1 || CONSUMER_WG == 2, "CONSUMER_WG must be 1 or 2");
static_assert(BLOCK_R == kRowsPerConsumer * CONSUMER_WG, "BLOCK_R must be 64 * CONSUMER_WG (one wgmma M of 64 rows per consumer warpgroup)");
static_assert(BLOCK_C % kMmaK == 0 && BLOCK_C >= 64 && BLOCK_C <= 192,
              "BLOCK_C must be a multiple of 16 in [64, 192] (wgmma K of P.V; wgmma_ss specialisations)");
static_assert(STAGES >= 2 && STAGES <= 8, "STAGES must be in [2, 8] (the consumer holds one K/V stage while the next is loading)");
// Registers per thread at launch: the register file over the block's threads, in setmaxnreg's
// granularity of 8 (168 for 384 threads).
constexpr u32 kLaunchRegs = (65536u / (u32)kThreads) / 8u * 8u;
static_assert(!kUseSetmaxnreg || kProducerRegs + CONSUMER_WG * kConsumerRegs <= kRegisterFileSlots,
              "setmaxnreg budgets exceed the register file");
static_assert(!kUseSetmaxnreg ||
              kWarpgroupThreads * (kLaunchRegs - kProducerRegs) >= kConsumerThreads * (kConsumerRegs - kLaunchRegs),
              "setmaxnreg: the consumers ask for more registers than the producer releases (the pool is per CTA; "
              "setmaxnreg.inc would wait forever)");
static_assert(PAGE_SIZE == 0 || PAGE_SIZE == 1 || PAGE_SIZE == 8 || PAGE_SIZE == 16 || PAGE_SIZE == 32 ||
              PAGE_SIZE == 64 || PAGE_SIZE == 128 || PAGE_SIZE == 256,
              "PAGE_SIZE must be 0 (contiguous K/V) or a paged-KV block size of 1, 8, 16, 32, 64, 128 or 256 tokens");
static_assert(!(kPaged && variant::kRope),
              "ROPE with PAGE_SIZE > 0: paged K is stored already rotated (RoPE where K is written, "
              "paged_rope_append); rotate Q there too and run the paged kernel with ROPE=0");

// ---- K/V addressing ----
__host__ __device__ constexpr int gcd_int(int a, int b) { return b == 0 ? a : gcd_int(b, a % b); }
// Keys per TMA box: boxes never straddle a page (rows of one box are consecutive slots)
// and tile the key block exactly, so their height divides both PAGE_SIZE and BLOCK_C.
constexpr int kBoxRows = kPaged ? gcd_int(PAGE_SIZE, BLOCK_C) : BLOCK_C;
constexpr int kBoxesPerBlock = BLOCK_C / kBoxRows;
// Tokens per page as the divisor of the paged addressing (1 where K/V is contiguous, so the
// paged policy, compiled either way, never divides by zero).
constexpr u32 kPageTokens = kPaged ? (u32)PAGE_SIZE : 1u;
// One warp gathers a paged tile (one lane per box, several boxes per lane for PAGE_SIZE 1);
// contiguous tiles keep the single issuing thread.
constexpr int kWarpLanes = 32;
constexpr int kProducerLanes = kPaged ? kWarpLanes : 1;
constexpr int kBoxesPerLane = (kBoxesPerBlock + kProducerLanes - 1) / kProducerLanes;
// "No bad page seen" and "context length out of range" (every row NaN) markers of the
// first-bad-key word: a row is poisoned iff that word is <= its last visible key.
constexpr int kNoBadKey = 0x7fffffff;
constexpr int kCtxInvalid = -0x7fffffff - 1;
// Named barrier of the consumer warpgroups (id 0 is __syncthreads).
constexpr u32 kConsumerBarrierId = 1;
constexpr int kBytesPerZeroStore = 16;

// ---- shared memory plan (byte offsets from the 1024-aligned base) ----
constexpr u32 kQTileBytes = BLOCK_R * HEAD_DIM * kElemBytes;
constexpr u32 kKVTileBytes = BLOCK_C * HEAD_DIM * kElemBytes;
constexpr u32 kQColBlockBytes = BLOCK_R * hopper::kSwizzleRowBytes;
constexpr u32 kKVColBlockBytes = BLOCK_C * hopper::kSwizzleRowBytes;
constexpr u32 kConsumerQOffset = kRowsPerConsumer * hopper::kSwizzleRowBytes;  // rows of consumer c start here in each column block
constexpr u32 kOffQ = 0;
constexpr u32 kOffK = kOffQ + kQTileBytes;
constexpr u32 kOffV = kOffK + STAGES * kKVTileBytes;
constexpr u32 kOffBarriers = kOffV + STAGES * kKVTileBytes;
constexpr u32 kBarrierBytes = 8;                                   // one mbarrier (b64)
// q_full, k_full[], v_full[], k_empty[], v_empty[]; RoPE adds q_ready and k_ready[] (rotated tiles)
constexpr u32 kNumBarriers = 1 + 4 * STAGES + (variant::kRope ? 1 + STAGES : 0);
constexpr u32 kOffMeta = kOffBarriers + kNumBarriers * kBarrierBytes;
constexpr u32 kOffMetaCtx = kOffMeta;                             // paged: the sequence's key count (int)
constexpr u32 kOffMetaFirstBad = kOffMeta + 4;                     // paged: first key of a bad page (int)
constexpr u32 kMetaBytes = 8;
constexpr u32 kSmemUsed = kOffMeta + kMetaBytes;
constexpr u32 kSmemAlignSlack = hopper::kSwizzleAtomBytes;        // dynamic smem is only guaranteed 16-byte aligned
constexpr u32 kSmemBytes = kSmemUsed + kSmemAlignSlack;            // the host requests exactly this (flash_wgmma.py)
constexpr u32 kHopperSmemOptin = 227 * 1024;
static_assert(kSmemBytes <= kHopperSmemOptin,
              "shared memory (Q tile + 2 * STAGES K/V tiles + barriers + 8 bytes + 1 KiB alignment slack) exceeds the 227 KiB Hopper opt-in limit: lower STAGES or BLOCK_C");
static_assert(kQColBlockBytes % hopper::kSwizzleAtomBytes == 0 && kKVColBlockBytes % hopper::kSwizzleAtomBytes == 0,
              "tile column blocks must start on 1024-byte swizzle boundaries");

// wgmma accumulator fragment (m64nN, fp32): thread `lane` of warp w holds, for
// every 8-column chunk j, rows 16w + lane/4 (+8) and columns 8j + 2(lane%4) (+1)
// at indices 4j + 2*half + e.
constexpr int kSRegs = BLOCK_C / 2;
constexpr int kORegs = HEAD_DIM / 2;
constexpr int kPChunks = BLOCK_C / kMmaK;  // A fragments of P (4 registers each)
constexpr int kKStepsPerBlock = kColsPerBlock / kMmaK;  // wgmma k-steps inside one 64-column block
constexpr u32 kKStepBytes = kMmaK * kElemBytes;          // start-address advance of one k-step (32 B)

struct Tile {
    int m_block;     // query row block
    int batch;
    int head;
    int kv_head;
    int seq_kv;      // keys of the sequence (paged: its context length, clamped)
    int n_blocks;    // key blocks processed: [first_block, n_blocks), walked from the last
    int first_block; // 0, or with WINDOW the first key block any row of the tile sees
    int n_iters;     // n_blocks - first_block (0: the tile sees no key)
};

// The CTA's query rows and (batch, head); the key extent is set by set_key_extent.
__device__ __forceinline__ Tile tile_of_block(const AttentionParams& p) {
    const int m_blocks = ((int)p.seq_q + BLOCK_R - 1) / BLOCK_R;
    const int bh_count = (int)(p.batch * p.num_heads);
    const int linear = (int)blockIdx.x;
    Tile t;
    int bh;
    if (kCausal) {  // heaviest row blocks (largest m) of every head first
        t.m_block = m_blocks - 1 - linear / bh_count;
        bh = linear % bh_count;
    } else {        // row blocks of one head adjacent: they share K/V in L2
        t.m_block = linear % m_blocks;
        bh = linear / m_blocks;
    }
    t.batch = bh / (int)p.num_heads;
    t.head = bh % (int)p.num_heads;
    t.kv_head = t.head / (int)(p.num_heads / p.num_kv_heads);
    t.seq_kv = 0;
    t.n_blocks = 0;
    t.first_block = 0;
    t.n_iters = 0;
    return t;
}

__device__ __forceinline__ void set_key_extent(Tile& t, const AttentionParams& p, int seq_kv) {
    t.seq_kv = seq_kv;
    const int kv_blocks = (seq_kv + BLOCK_C - 1) / BLOCK_C;
    t.n_blocks = kv_blocks;
    if (kCausal) {
        // last key visible to the last row of the tile (bottom-right aligned)
        const int last_key = t.m_block * BLOCK_R + BLOCK_R - 1 + seq_kv - (int)p.seq_q;
        t.n_blocks = last_key < 0 ? 0 : min(kv_blocks, last_key / BLOCK_C + 1);
    }
    // WINDOW: the tile's first row sees keys > its position - window; blocks left of that are skipped.
    const int first_key = variant::first_visible_key(t.m_block * BLOCK_R + seq_kv - (int)p.seq_q, (int)p.window);
    t.first_block = min(first_key / BLOCK_C, t.n_blocks);
    t.n_iters = t.n_blocks - t.first_block;
}

// The paged pool as the producer sees it (null / zero for contiguous K/V).
struct PagedPool {
    const int* table;          // block_table [B, max_blocks_per_seq], rows contiguous
    long long table_stride;    // elements between table rows (p.max_blocks_per_seq)
    int num_blocks;            // pages in the pool (p.num_blocks)
};

struct Barriers {
    u32 q_full;
    u32 base;  // four arrays of STAGES barriers: k_full, v_full, k_empty, v_empty (RoPE: then q_ready, k_ready[])
    __device__ __forceinline__ u32 k_full(int s) const { return base + kBarrierBytes * s; }
    __device__ __forceinline__ u32 v_full(int s) const { return base + kBarrierBytes * (STAGES + s); }
    __device__ __forceinline__ u32 k_empty(int s) const { return base + kBarrierBytes * (2 * STAGES + s); }
    __device__ __forceinline__ u32 v_empty(int s) const { return base + kBarrierBytes * (3 * STAGES + s); }
    __device__ __forceinline__ u32 q_ready() const { return base + kBarrierBytes * (4 * STAGES); }
    __device__ __forceinline__ u32 k_ready(int s) const { return base + kBarrierBytes * (4 * STAGES + 1 + s); }
    // What the consumers wait on: the TMA's barriers, or (RoPE) the rope warps' ready barriers.
    __device__ __forceinline__ u32 q_use() const { return variant::kRope ? q_ready() : q_full; }
    __device__ __forceinline__ u32 k_use(int s) const { return variant::kRope ? k_ready(s) : k_full(s); }
};

// Ring position of the it-th key block walked by a CTA.
__device__ __forceinline__ int stage_of(int it) { return it % STAGES; }
__device__ __forceinline__ u32 phase_of(int it) { return (u32)(it / STAGES) & 1u; }

// The producer's tile-address step (the KV-addressing policy): which TMA boxes fill the
// K/V tile of key block n, and their transaction bytes. Contiguous: one box of BLOCK_C
// rows per column block at (row, kv head, batch), issued by one thread. Paged: the
// producer warp's lane l takes boxes l, l + 32, ...; a box of keys [key, key + kBoxRows)
// is slot key % PAGE_SIZE of page table[key / PAGE_SIZE].
struct KvTile {
    u32 bytes;     // transaction bytes of the K (or V) tile
    u32 boxes;     // paged: bit i set where this lane's i-th box is copied
};

template <bool kPagedKV> struct KvAddress;

template <> struct KvAddress<false> {
    int batch, kv_head;
    __device__ __forceinline__ KvAddress(const Tile& t, const PagedPool&, u32) : batch(t.batch), kv_head(t.kv_head) {}
    __device__ __forceinline__ void fetch(int) {}
    __device__ __forceinline__ KvTile resolve(int) { return KvTile{kKVTileBytes, 0u}; }
    __device__ __forceinline__ void load(u32 dst, const hopper::TensorMap* map, u32 bar, int n, const KvTile&) const {
#pragma unroll
        for (int cb = 0; cb < kColBlocks; ++cb)
            hopper::tma_load_4d(dst + cb * kKVColBlockBytes, map, bar, cb * kColsPerBlock, n * BLOCK_C, kv_head, batch);
    }
};

template <> struct KvAddress<true> {
    const int* table_row;      // block_table row of the tile's sequence
    int num_blocks;
    int seq_kv;
    int kv_head;
    int lane;
    u32 meta_bad;              // shared address of the CTA's first-bad-key word
    int first_bad;             // lane 0's copy of that word
    int page[kBoxesPerLane];   // page ids of this lane's boxes of the next block (fetch)

    __device__ __forceinline__ KvAddress(const Tile& t, const PagedPool& pool, u32 meta_bad_addr)
        : table_row(pool.table + (long long)t.batch * pool.table_stride), num_blocks(pool.num_blocks),
          seq_kv(t.seq_kv), kv_head(t.kv_head), lane((int)threadIdx.x % kWarpLanes), meta_bad(meta_bad_addr),
          first_bad(hopper::ld_shared_s32(meta_bad_addr)) {
#pragma unroll
        for (int i = 0; i < kBoxesPerLane; ++i) page[i] = 0;
    }

    __device__ __forceinline__ int box_key(int n, int i) const {
        return n * BLOCK_C + (lane + i * kWarpLanes) * kBoxRows;
    }
    __device__ __forceinline__ bool box_needed(int n, int i) const {
        return lane + i * kWarpLanes < kBoxesPerBlock && box_key(n, i) < seq_kv;
    }

    // Reads the table entries of block n (only for keys < seq_kv, which is within the
    // table's capacity); issued a block ahead so the loads complete during the ring waits.
    __device__ __forceinline__ void fetch(int n) {
#pragma unroll
        for (int i = 0; i < kBoxesPerLane; ++i)
            if (box_needed(n, i)) page[i] = __ldg(table_row + (u32)box_key(n, i) / kPageTokens);
    }

    // Boxes of block n to copy (ids in [0, num_blocks)) and their bytes; records the first
    // key of a bad page id in the CTA's word (lane 0 stores it before arming the barrier,
    // whose release orders it before the consumers' epilogue reads).
    __device__ __forceinline__ KvTile resolve(int n) {
        KvTile tile{0u, 0u};
        int bad_key = kNoBadKey;
        u32 copied = 0;
#pragma unroll
        for (int i = 0; i < kBoxesPerLane; ++i) {
            const bool needed = box_needed(n, i);
            const bool good = needed && page[i] >= 0 && page[i] < num_blocks;
            if (needed && !good) bad_key = min(bad_key, box_key(n, i));
            if (good) tile.boxes |= 1u << i;
            copied += (u32)__popc(__ballot_sync(0xffffffffu, good));
        }
        tile.bytes = copied * kBoxRows * hopper::kSwizzleRowBytes * kColBlocks;
        bad_key = __reduce_min_sync(0xffffffffu, bad_key);
        if (lane == 0 && bad_key < first_bad) {
            first_bad = bad_key;
            hopper::st_shared_s32(meta_bad, bad_key);
        }
        return tile;
    }

    __device__ __forceinline__ void load(u32 dst, const hopper::TensorMap* map, u32 bar, int n, const KvTile& tile) const {
#pragma unroll
        for (int i = 0; i < kBoxesPerLane; ++i) {
            if (!(tile.boxes & (1u << i))) continue;
            const u32 box_dst = dst + (u32)(lane + i * kWarpLanes) * kBoxRows * hopper::kSwizzleRowBytes;
            const int slot = (int)((u32)box_key(n, i) % kPageTokens);
#pragma unroll
            for (int cb = 0; cb < kColBlocks; ++cb)
                hopper::tma_load_4d(box_dst + cb * kKVColBlockBytes, map, bar, cb * kColsPerBlock, slot, kv_head, page[i]);
        }
    }
};

// Called by the kProducerLanes first threads of the producer warpgroup.
__device__ __forceinline__ void producer(const Tile& t, u32 smem, const Barriers& bars, const PagedPool& pool,
                                         const hopper::TensorMap* tm_q, const hopper::TensorMap* tm_k,
                                         const hopper::TensorMap* tm_v) {
    // Nothing to load for a tile that sees no key (the consumers do not wait
    // either); a copy still in flight when the CTA retires would be undefined.
    if (t.n_iters == 0) return;
    const bool leader = threadIdx.x == 0;
    if (leader) {
        hopper::tma_prefetch_descriptor(tm_q);
        hopper::tma_prefetch_descriptor(tm_k);
        hopper::tma_prefetch_descriptor(tm_v);
        const int q_row = t.m_block * BLOCK_R;
        hopper::mbar_arrive_expect_tx(bars.q_full, kQTileBytes);
#pragma unroll
        for (int cb = 0; cb < kColBlocks; ++cb)
            hopper::tma_load_4d(smem + kOffQ + cb * kQColBlockBytes, tm_q, bars.q_full,
                                cb * kColsPerBlock, q_row, t.head, t.batch);
    }
    KvAddress<kPaged> kv(t, pool, smem + kOffMetaFirstBad);
    kv.fetch(t.n_blocks - 1);
    for (int it = 0; it < t.n_iters; ++it) {
        const int n = t.n_blocks - 1 - it;
        const int stage = stage_of(it);
        // A fresh barrier is in phase 0: waiting for parity 1 passes on the first lap.
        const u32 free_parity = phase_of(it) ^ 1u;
        const u32 k_dst = smem + kOffK + stage * kKVTileBytes;
        const u32 v_dst = smem + kOffV + stage * kKVTileBytes;
        const KvTile tile = kv.resolve(n);
        hopper::mbar_wait(bars.k_empty(stage), free_parity);
        if (leader) hopper::mbar_arrive_expect_tx(bars.k_full(stage), tile.bytes);
        if constexpr (kPaged) __syncwarp();  // the barrier is armed before any box of it lands
        kv.load(k_dst, tm_k, bars.k_full(stage), n, tile);
        hopper::mbar_wait(bars.v_empty(stage), free_parity);
        if (leader) hopper::mbar_arrive_expect_tx(bars.v_full(stage), tile.bytes);
        if constexpr (kPaged) __syncwarp();
        kv.load(v_dst, tm_v, bars.v_full(stage), n, tile);
        if (n > t.first_block) kv.fetch(n - 1);
    }
}

// ---- RoPE in shared memory (the rope warps: warps 1-3 of the producer warpgroup) ----
constexpr int kRopeThreads = kWarpgroupThreads - kWarpLanes;
constexpr int kChunkBytes = 16;                              // one swizzle chunk: 8 16-bit elements
constexpr int kChunkElems = kChunkBytes / kElemBytes;
constexpr int kChunksPerRow = HEAD_DIM / kChunkElems;
constexpr int kChunksPerColBlock = hopper::kSwizzleRowBytes / kChunkBytes;
static_assert(!variant::kRope || (HEAD_DIM / 2) % kChunkElems == 0,
              "rotate-half RoPE pairs whole 16-byte chunks: D/2 must be a multiple of 8");

// Shared address of 16-byte chunk j (elements [8j, 8j + 8)) of row r of a tile whose column
// blocks are kColBlockBytes apart: the 128-byte swizzle XORs the chunk index with r % 8.
template <u32 kColBlockBytes>
__device__ __forceinline__ u32 chunk_addr(u32 tile, int r, int j) {
    const int cb = j / kChunksPerColBlock;
    const int in_row = (j % kChunksPerColBlock) ^ (r % hopper::kSwizzleAtomRows);
    return tile + cb * kColBlockBytes + (u32)r * hopper::kSwizzleRowBytes + (u32)in_row * kChunkBytes;
}

// One rope thread's share of a tile: a fixed column unit j of four pairs in rows r0, r0 +
// kRopeRowStep, ... Interleaved: unit j is chunk j, pairs (2i, 2i + 1) for i in [4j, 4j + 4).
// Rotate-half: unit j is the 8-byte half j % 2 of chunk j / 2 (< D/16) and the same half of its
// partner chunk D/16 further, pairs (i, i + D/2) for i in [4j, 4j + 4). The cos/sin of the first
// row come from the table (ROPE_TABLE) or fast_sincos; each next row's are the angle-addition
// recurrence c' = c cos(step f) - s sin(step f), s' = s cos(step f) + c sin(step f) (4 FMAs per
// pair, no special-function unit, which the consumers' exp2 keeps busy; float32 drift over the
// <= 43 steps of a tile stays ~1e-6). Four pairs per unit keep the recurrence state in registers.
constexpr int kPairsPerUnit = 4;
constexpr int kUnitsPerRow = HEAD_DIM / 2 / kPairsPerUnit;
constexpr int kRopeRowStep = kRopeThreads / kUnitsPerRow;
constexpr u32 kHalfChunkBytes = kChunkBytes / 2;
static_assert(!variant::kRope || kRopeThreads % kUnitsPerRow == 0,
              "the rope threads must split evenly into column units (a fixed unit per thread)");

struct RopeLane {
    int j;                        // column unit
    int r0;                       // first row
    int i0;                       // first pair index of the unit
    float step_c[kPairsPerUnit];  // cos / sin of kRopeRowStep * inv_freq
    float step_s[kPairsPerUnit];

    __device__ __forceinline__ RopeLane(const variant::Rope& rope, int tid)
        : j(tid % kUnitsPerRow), r0(tid / kUnitsPerRow), i0(j * kPairsPerUnit) {
#pragma unroll
        for (int q = 0; q < kPairsPerUnit; ++q)
            variant::fast_sincos((float)kRopeRowStep * rope.inv_freq(i0 + q), step_s[q], step_c[q]);
    }
};

// Rotates rows [0, valid) of a tile whose row r sits at position pos0 + r; rows >= valid (zero
// fill past N) are left alone and their positions never read.
template <int kRows, u32 kColBlockBytes>
__device__ __forceinline__ void rope_tile(u32 tile, int valid, int pos0, const variant::Rope& rope,
                                          const RopeLane& lane) {
    if (lane.r0 < valid) {
        float c[kPairsPerUnit], sn[kPairsPerUnit], inv[kPairsPerUnit];
#pragma unroll
        for (int q = 0; q < kPairsPerUnit; ++q) inv[q] = rope.inv_freq(lane.i0 + q);
        rope.cos_sin<kPairsPerUnit>(pos0 + lane.r0, lane.i0, inv, c, sn);
        for (int r = lane.r0; r < min(valid, kRows); r += kRopeRowStep) {
            if constexpr (variant::kInterleaved) {
                const u32 a = chunk_addr<kColBlockBytes>(tile, r, lane.j);
                u32 w[4];
                ap::ld_shared_v4(a, w);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x1, x2;
                    variant::unpack2<kBF16>(w[e], x1, x2);
                    variant::rotate(x1, x2, c[e], sn[e]);
                    w[e] = hopper::pack2<kBF16>(x1, x2);
                }
                ap::st_shared_v4(a, w);
            } else {
                const u32 half = (u32)(lane.j % 2) * kHalfChunkBytes;
                const u32 a1 = chunk_addr<kColBlockBytes>(tile, r, lane.j / 2) + half;
                const u32 a2 = chunk_addr<kColBlockBytes>(tile, r, lane.j / 2 + kChunksPerRow / 2) + half;
                u32 w1[2], w2[2];
                ap::ld_shared_v2(a1, w1);
                ap::ld_shared_v2(a2, w2);
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x1[2], x2[2];
                    variant::unpack2<kBF16>(w1[e], x1[0], x1[1]);
                    variant::unpack2<kBF16>(w2[e], x2[0], x2[1]);
#pragma unroll
                    for (int h = 0; h < 2; ++h) variant::rotate(x1[h], x2[h], c[2 * e + h], sn[2 * e + h]);
                    w1[e] = hopper::pack2<kBF16>(x1[0], x1[1]);
                    w2[e] = hopper::pack2<kBF16>(x2[0], x2[1]);
                }
                ap::st_shared_v2(a1, w1);
                ap::st_shared_v2(a2, w2);
            }
#pragma unroll
            for (int q = 0; q < kPairsPerUnit; ++q) {
                const float nc = c[q] * lane.step_c[q] - sn[q] * lane.step_s[q];
                sn[q] = sn[q] * lane.step_c[q] + c[q] * lane.step_s[q];
                c[q] = nc;
            }
        }
    }
    // the generic-proxy writes become visible to the wgmma reads (async proxy) of the tile
    hopper::fence_proxy_async_shared();
}

// The rope warps: rotate Q once, then each K tile between its full and ready barriers.
__device__ __forceinline__ void rope_warps(const AttentionParams& p, const Tile& t, u32 smem, const Barriers& bars,
                                           const float* rope_cos, const float* rope_sin) {
    if (t.n_iters == 0) return;
    const int tid = (int)threadIdx.x - kWarpLanes;
    variant::Rope rope;
    rope.init(p, rope_cos, rope_sin);
    const RopeLane lane(rope, tid);
    const int q_row0 = t.m_block * BLOCK_R;
    hopper::mbar_wait(bars.q_full, 0);
    rope_tile<BLOCK_R, kQColBlockBytes>(smem + kOffQ, (int)p.seq_q - q_row0,
                                        rope.offset + q_row0 + t.seq_kv - (int)p.seq_q, rope, lane);
    hopper::mbar_arrive(bars.q_ready());
    for (int it = 0; it < t.n_iters; ++it) {
        const int n = t.n_blocks - 1 - it;
        const int stage = stage_of(it);
        hopper::mbar_wait(bars.k_full(stage), phase_of(it));
        rope_tile<BLOCK_C, kKVColBlockBytes>(smem + kOffK + stage * kKVTileBytes, t.seq_kv - n * BLOCK_C,
                                             rope.offset + n * BLOCK_C, rope, lane);
        hopper::mbar_arrive(bars.k_ready(stage));
    }
}

// Per-thread state of one consumer warpgroup.
struct Consumer {
    int row[2];       // global query rows of the thread's two accumulator rows
    int wg_row0;      // first query row of the warpgroup
    int quad_col;     // first of the thread's two adjacent columns in each 8-column chunk
    int diag;         // query i sees keys j <= i + diag (bottom-right aligned)
    int seq_kv;
    float scale_log2; // multiplier of the exp2 argument: scale * log2(e), or 1 where ScoreMod made the
                      // scores log2-domain logits already
    int window;       // WINDOW: query at position p sees keys > p - window
    variant::ScoreMod<kCausal> mod;  // soft cap and ALiBi (kScoreMod)
    float m_run[2];   // running row max of the scaled scores (log2 domain)
    float l_run[2];   // this thread's partial row sums of exp2(...)
};

// S = Q_c K^T for the K tile of `stage`, issued asynchronously (committed as one group).
__device__ __forceinline__ void issue_qk(float (&s)[kSRegs], u64 desc_q, u32 k_tile) {
    const u64 desc_k = hopper::make_desc_kmajor(k_tile);
    hopper::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / kMmaK; ++kk) {
        // k-step kk: column block kk / 4, then a 32-byte step inside the 128-byte row
        const u32 cb = kk / kKStepsPerBlock;
        const u32 in_row = (kk % kKStepsPerBlock) * kKStepBytes;
        const u32 q_off = cb * kQColBlockBytes + in_row;
        const u32 k_off = cb * kKVColBlockBytes + in_row;
        hopper::wgmma_ss<BLOCK_C, kBF16>(s, desc_q + (q_off >> 4), desc_k + (k_off >> 4), kk > 0 ? 1u : 0u);
    }
    hopper::wgmma_commit();
}

// O += P V for the V tile of `stage`, issued asynchronously (committed as one group).
__device__ __forceinline__ void issue_pv(float (&o)[kORegs], const u32 (&pa)[kPChunks][4], u32 v_tile) {
    const u64 desc_v = hopper::make_desc_mnmajor(v_tile, kKVColBlockBytes);
    hopper::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kPChunks; ++kk) {
        // k-step kk: V rows [16 kk, 16 kk + 16) = two 8-row swizzle atoms further
        const u32 v_off = kk * kMmaK * hopper::kSwizzleRowBytes;
        hopper::wgmma_rs_bt<HEAD_DIM, kBF16>(o, pa[kk], desc_v + (v_off >> 4), 1u);
    }
    hopper::wgmma_commit();
}

// Masks key block n (keys >= Nkv; keys right of the causal diagonal), then turns
// the scores in `s` into P = exp2(S * scale_log2 - m_new) in place and updates
// the running max and sums. Returns, per accumulator row, the factor
// exp2(m_old - m_new) by which O must be rescaled before P V is added.
__device__ __forceinline__ void softmax_block(Consumer& c, float (&s)[kSRegs], int n, float (&alpha)[2]) {
    const int col0 = n * BLOCK_C;
    if constexpr (variant::kScoreMod) {
        // key positions relative to the warpgroup's first query position (ScoreMod, linear ALiBi)
        const float key0 = (float)(col0 + c.quad_col - (c.wg_row0 + c.diag));
        const float q_rel[2] = {(float)(c.row[0] - c.wg_row0), (float)(c.row[1] - c.wg_row0)};
#pragma unroll
        for (int j = 0; j < BLOCK_C / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float key = key0 + (float)(8 * j + e);
                const float col = c.mod.col_bias(key);
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    s[4 * j + 2 * h + e] = c.mod.logit_log2(s[4 * j + 2 * h + e], col, q_rel[h] - key);
            }
    }
    const bool crosses_end = col0 + BLOCK_C > c.seq_kv;
    const bool crosses_diag = kCausal && (col0 + BLOCK_C - 1 > c.wg_row0 + c.diag);
    // WINDOW: some row of the warpgroup (the last sees the most recent keys) has keys of this block left of its window
    const bool crosses_window = variant::kWindow && col0 <= c.wg_row0 + kRowsPerConsumer - 1 + c.diag - c.window;
    if (crosses_end || crosses_diag || crosses_window) {
#pragma unroll
        for (int j = 0; j < BLOCK_C / 8; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + 8 * j + c.quad_col + e;
                    const bool masked = col >= c.seq_kv || (kCausal && col > c.row[h] + c.diag) ||
                                        variant::outside_window(c.row[h] + c.diag, col, c.window);
                    if (masked) s[4 * j + 2 * h + e] = hopper::neg_inf();
                }
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        // NaN-propagating max (a NaN score makes the row max NaN, not skipped); started
        // from the first pair rather than -inf so no extra max is issued.
        float mx = ap::fmax_nan(s[2 * h], s[2 * h + 1]);
#pragma unroll
        for (int j = 1; j < BLOCK_C / 8; ++j) mx = ap::fmax_nan(mx, ap::fmax_nan(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
        // the four threads of a quad hold the same two rows
        mx = ap::fmax_nan(mx, hopper::shfl_xor(mx, 1));
        mx = ap::fmax_nan(mx, hopper::shfl_xor(mx, 2));
        const float m_new = ap::fmax_nan(c.m_run[h], mx * c.scale_log2);  // scale > 0 (checked on the host)
        const float m_use = (m_new == hopper::neg_inf()) ? 0.f : m_new;  // row has seen no key yet
        alpha[h] = hopper::fast_exp2(c.m_run[h] - m_use);
        c.m_run[h] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BLOCK_C / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pv = hopper::fast_exp2(fmaf(s[4 * j + 2 * h + e], c.scale_log2, -m_use));
                s[4 * j + 2 * h + e] = pv;
                sum += pv;
            }
        }
        c.l_run[h] = c.l_run[h] * alpha[h] + sum;
    }
}

// P as the A operand of the next wgmma: the fp32 accumulator layout of two
// adjacent 8-column chunks is exactly the m64k16 16-bit A-fragment layout
// (registers: rows g / g+8 x columns 2t..2t+1, then the same 8 columns on).
__device__ __forceinline__ void convert_p(const float (&s)[kSRegs], u32 (&pa)[kPChunks][4]) {
#pragma unroll
    for (int kk = 0; kk < kPChunks; ++kk) {
        pa[kk][0] = hopper::pack2<kBF16>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = hopper::pack2<kBF16>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = hopper::pack2<kBF16>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = hopper::pack2<kBF16>(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// Paged K/V: zeroes V rows [first_row, BLOCK_C) of a V tile (keys >= ctx of the key block
// that crosses ctx: unloaded boxes and the unused slots of the last page, which may hold
// NaN), so P = 0 there contributes exactly 0 to O. Run by every consumer thread; the
// zeros are handed to the tensor cores by the async-proxy fence and a consumer barrier.
__device__ __forceinline__ void zero_v_rows(u32 v_tile, int first_row) {
    const u32 tid = (u32)threadIdx.x - kWarpgroupThreads;  // consumer threads are 128..
#pragma unroll
    for (int cb = 0; cb < kColBlocks; ++cb) {
        const u32 begin = v_tile + cb * kKVColBlockBytes + (u32)first_row * hopper::kSwizzleRowBytes;
        const u32 end = v_tile + cb * kKVColBlockBytes + BLOCK_C * hopper::kSwizzleRowBytes;
        for (u32 a = begin + tid * kBytesPerZeroStore; a < end; a += kConsumerThreads * kBytesPerZeroStore)
            hopper::st_shared_zero16(a);
    }
    hopper::fence_proxy_async_shared();
    hopper::named_barrier_sync(kConsumerBarrierId, kConsumerThreads);
}

__device__ __forceinline__ void rescale_o(float (&o)[kORegs], const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) {
        o[4 * j + 0] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
    }
}

// Consumer warpgroup `consumer_wg`. Software pipeline inside the warpgroup
// (the FlashAttention-3 schedule): in step it the tensor cores compute
// S_it = Q K_it^T and O += P_(it-1) V_(it-1) back to back while the warpgroup
// runs the softmax of S_it as soon as S_it has landed (wgmma.wait_group 1).
// Registers in flight are never touched: O is rescaled before its wgmma is
// issued, and P_it is packed only after wait_group 0.
__device__ __forceinline__ void consumer(const AttentionParams& p, const Tile& t, u32 smem, const Barriers& bars,
                                         int consumer_wg, unsigned short* __restrict__ o_out,
                                         float* __restrict__ lse_out, const float* __restrict__ alibi_slopes) {
    const int tid = (int)threadIdx.x % kWarpgroupThreads;
    const int warp = tid / 32;
    const int lane = tid % 32;
    Consumer c;
    c.wg_row0 = t.m_block * BLOCK_R + consumer_wg * kRowsPerConsumer;
    c.row[0] = c.wg_row0 + warp * 16 + lane / 4;
    c.row[1] = c.row[0] + 8;
    c.quad_col = 2 * (lane % 4);
    c.diag = t.seq_kv - (int)p.seq_q;
    c.seq_kv = t.seq_kv;
    c.scale_log2 = variant::kScoreMod ? 1.f : p.scale * variant::kLog2e;
    c.window = (int)p.window;
    c.mod.init(p, t.head, alibi_slopes);
    c.m_run[0] = c.m_run[1] = hopper::neg_inf();
    c.l_run[0] = c.l_run[1] = 0.f;

    float o[kORegs];
#pragma unroll
    for (int i = 0; i < kORegs; ++i) o[i] = 0.f;

    if (t.n_iters > 0) {
        const u64 desc_q = hopper::make_desc_kmajor(smem + kOffQ + consumer_wg * kConsumerQOffset);
        float s[kSRegs];
        u32 pa[kPChunks][4];
        float alpha[2];
        hopper::mbar_wait(bars.q_use(), 0);

        // step 0: S_0 and its softmax (O is still zero: no rescale needed)
        hopper::mbar_wait(bars.k_use(stage_of(0)), phase_of(0));
        issue_qk(s, desc_q, smem + kOffK + stage_of(0) * kKVTileBytes);
        hopper::wgmma_wait<0>();
        hopper::reg_fence_array(s);
        hopper::mbar_arrive(bars.k_empty(stage_of(0)));
        softmax_block(c, s, t.n_blocks - 1, alpha);
        convert_p(s, pa);
        if constexpr (kPaged) {
            // The first block walked is the last one: the only block that can cross ctx.
            const int valid_rows = t.seq_kv - (t.n_blocks - 1) * BLOCK_C;
            if (valid_rows < BLOCK_C) {
                hopper::mbar_wait(bars.v_full(stage_of(0)), phase_of(0));
                zero_v_rows(smem + kOffV + stage_of(0) * kKVTileBytes, valid_rows);
            }
        }

        for (int it = 1; it < t.n_iters; ++it) {
            const int stage = stage_of(it);
            const int prev = stage_of(it - 1);
            hopper::mbar_wait(bars.k_use(stage), phase_of(it));
            issue_qk(s, desc_q, smem + kOffK + stage * kKVTileBytes);
            rescale_o(o, alpha);
            hopper::mbar_wait(bars.v_full(prev), phase_of(it - 1));
            issue_pv(o, pa, smem + kOffV + prev * kKVTileBytes);
            hopper::wgmma_wait<1>();  // S_it complete; P V may still run
            hopper::reg_fence_array(s);
            hopper::mbar_arrive(bars.k_empty(stage));
            softmax_block(c, s, t.n_blocks - 1 - it, alpha);
            hopper::wgmma_wait<0>();
            hopper::reg_fence_array(o);
            hopper::mbar_arrive(bars.v_empty(prev));
            convert_p(s, pa);
        }

        // last P V
        const int last = stage_of(t.n_iters - 1);
        rescale_o(o, alpha);
        hopper::mbar_wait(bars.v_full(last), phase_of(t.n_iters - 1));
        issue_pv(o, pa, smem + kOffV + last * kKVTileBytes);
        hopper::wgmma_wait<0>();
        hopper::reg_fence_array(o);
        hopper::mbar_arrive(bars.v_empty(last));
    }

    // ---- epilogue: O / l, LSE = ln(2) * (m + log2(l)) ----
    const float ln2 = 0.6931471805599453f;
    // Paged: the first key of a bad page id the producer met (kNoBadKey: none; kCtxInvalid:
    // the context length was out of range). Read after the last full barrier the
    // consumer waited on, which orders the producer's stores before this load.
    const int first_bad = kPaged ? hopper::ld_shared_s32(smem + kOffMetaFirstBad) : kNoBadKey;
    const long long o_base = (long long)t.batch * p.o_stride[0] + (long long)t.head * p.o_stride[1];
    const long long lse_base = (long long)t.batch * p.lse_stride[0] + (long long)t.head * p.lse_stride[1];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = c.l_run[h];
        l += hopper::shfl_xor(l, 1);
        l += hopper::shfl_xor(l, 2);
        // The row sees a key iff (causal) key 0 is at or left of its position: geometry,
        // not l > 0, so a NaN l (a NaN or +inf score) keeps O and LSE NaN, and l = 0 with a
        // key (every visible score -inf, from an inf input) gives O = 0 / 0 = NaN, LSE NaN.
        // A row with no key writes O = 0 exactly (selected, whatever a masked V put in o)
        // and LSE = -inf.
        // (A paged sequence may have no key at all: ctx = 0.)
        // WINDOW: the row's keys are [first_visible_key, last_key]; it may see none.
        const int last_key = kCausal ? min(c.row[h] + c.diag, c.seq_kv - 1) : c.seq_kv - 1;
        const bool has_key = c.seq_kv > 0 && last_key >= variant::first_visible_key(c.row[h] + c.diag, c.window) &&
                             (!kCausal || c.row[h] + c.diag >= 0);
        // A row whose visible keys [0, last_key] reach a bad page (or whose sequence had a
        // bad context length) is NaN: its result would silently miss keys otherwise.
        const bool poisoned = kPaged && first_bad <= last_key;
        const float inv = has_key ? 1.f / l : 0.f;
        // (linear ALiBi dropped one constant per row from the logits: added back here)
        const float lse_ok = l > 0.f ? (c.m_run[h] + hopper::fast_log2(l) + c.mod.row_shift_log2(c.row[h] - c.wg_row0)) * ln2
                                     : (has_key ? ap::quiet_nan() : hopper::neg_inf());
        const float lse = poisoned ? ap::quiet_nan() : lse_ok;
        const u32 nan_pair = hopper::pack2<kBF16>(ap::quiet_nan(), ap::quiet_nan());
        if (c.row[h] < (int)p.seq_q) {
            unsigned short* orow = o_out + o_base + (long long)c.row[h] * p.o_stride[2];
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 8; ++j) {
                const u32 rounded = hopper::pack2<kBF16>(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
                const u32 kept = has_key ? rounded : 0u;  // +0.0 in both halves
                const u32 packed = poisoned ? nan_pair : kept;
                *reinterpret_cast<u32*>(orow + 8 * j + c.quad_col) = packed;
            }
            if (c.quad_col == 0) lse_out[lse_base + c.row[h]] = lse;
        }
    }
}

}  // namespace fwd

extern "C" __global__ void __launch_bounds__(fwd::kThreads, 1)
flash_fwd_wgmma(const AttentionParams p,
                const __grid_constant__ hopper::TensorMap tm_q,
                const __grid_constant__ hopper::TensorMap tm_k,
                const __grid_constant__ hopper::TensorMap tm_v,
                unsigned short* __restrict__ o,
                float* __restrict__ lse,
                const int* __restrict__ block_table,
                const int* __restrict__ context_lens,
                const float* __restrict__ rope_cos,
                const float* __restrict__ rope_sin,
                const float* __restrict__ alibi_slopes) {
    using namespace fwd;
    extern __shared__ unsigned char smem_raw[];
    // The host sizes the launch from the same formula; a mismatch would corrupt
    // memory, so refuse to run instead (as for a paged kernel without its pool arguments).
    if (ap::dynamic_smem_size() < kSmemBytes || p.head_dim != HEAD_DIM || p.block_size != PAGE_SIZE) __trap();
    if (kPaged && (block_table == nullptr || context_lens == nullptr || p.max_blocks_per_seq == 0 || p.num_blocks == 0))
        __trap();
    // A variant without the buffer or value it reads (the host checks all of these).
    if ((variant::kRopeTable && (rope_cos == nullptr || rope_sin == nullptr)) ||
        (ALIBI == variant::kAlibiSlopes && alibi_slopes == nullptr) || (variant::kWindow && p.window == 0) ||
        (variant::kSoftcap && !(p.softcap > 0.f)))
        __trap();
    const u32 raw = hopper::smem_u32(smem_raw);
    const u32 smem = (raw + hopper::kSwizzleAtomBytes - 1) & ~(hopper::kSwizzleAtomBytes - 1);
    Barriers bars;
    bars.q_full = smem + kOffBarriers;
    bars.base = smem + kOffBarriers + kBarrierBytes;
    Tile t = tile_of_block(p);
    // Paged: one read of the context length per CTA (the producer and the consumers must
    // agree on the key blocks), issued before the barrier set-up so its latency overlaps it.
    const int ctx_raw = (kPaged && threadIdx.x == 0) ? context_lens[t.batch] : 0;

    if (threadIdx.x == 0) {
        hopper::mbar_init(bars.q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            hopper::mbar_init(bars.k_full(s), 1);
            hopper::mbar_init(bars.v_full(s), 1);
            hopper::mbar_init(bars.k_empty(s), kConsumerThreads);  // every consumer thread arrives
            hopper::mbar_init(bars.v_empty(s), kConsumerThreads);
        }
        if constexpr (variant::kRope) {
            hopper::mbar_init(bars.q_ready(), kRopeThreads);  // every rope thread arrives
            for (int s = 0; s < STAGES; ++s) hopper::mbar_init(bars.k_ready(s), kRopeThreads);
        }
        hopper::mbar_init_fence();
    }
    const u32 meta_ctx = smem + kOffMetaCtx;
    const u32 meta_bad = smem + kOffMetaFirstBad;
    if (kPaged && threadIdx.x == 0) {
        // Clamped to the table's capacity; out of range poisons the sequence's rows.
        const int capacity = (int)(p.max_blocks_per_seq * (u32)PAGE_SIZE);
        const bool ctx_ok = ctx_raw >= 0 && ctx_raw <= capacity;
        hopper::st_shared_s32(meta_ctx, ctx_ok ? ctx_raw : max(0, min(ctx_raw, capacity)));
        hopper::st_shared_s32(meta_bad, ctx_ok ? kNoBadKey : kCtxInvalid);
    }
    __syncthreads();
    set_key_extent(t, p, kPaged ? hopper::ld_shared_s32(meta_ctx) : (int)p.seq_kv);
    const PagedPool pool{block_table, (long long)p.max_blocks_per_seq, (int)p.num_blocks};
    const int warpgroup = (int)threadIdx.x / kWarpgroupThreads;
    if (warpgroup == 0) {
        if constexpr (kUseSetmaxnreg) hopper::setmaxnreg_dec<kProducerRegs>();
        if (threadIdx.x < kProducerLanes) producer(t, smem, bars, pool, &tm_q, &tm_k, &tm_v);
        if constexpr (variant::kRope)
            if (threadIdx.x >= kWarpLanes) rope_warps(p, t, smem, bars, rope_cos, rope_sin);
    } else {
        if constexpr (kUseSetmaxnreg) hopper::setmaxnreg_inc<kConsumerRegs>();
        consumer(p, t, smem, bars, warpgroup - 1, o, lse, alibi_slopes);
    }
}
