// paged_decode.cu — decode attention over a paged KV cache (split-KV, "flash decoding"),
// warp-level tensor cores (mma.sync, sm_80+).
//
// For sequence b with ctx = context_lens[b] keys, the NQ newest tokens (query i at position
// ctx - NQ + i, causal among themselves) of HEADS query heads that share one kv head:
//   O = softmax(scale * Q K^T, masked) V,  LSE = logsumexp(scale * Q K^T) (natural log).
//   Q   [B, Hq, NQ, D] (p.q_stride), O like Q (p.o_stride), LSE float32 [B, Hq, NQ] (p.lse_stride)
//   K/V the pool of the KV policy (include/paged_kv.cuh): PAGE_SIZE > 0 pages of a block table
//       int32 [B, p.max_blocks_per_seq] (rows contiguous), PAGE_SIZE = 0 contiguous [B, Hkv, N, D]
//   query head h reads kv head h / (Hq / Hkv).
//
// Launch: grid (p.num_partitions, Hkv * (Hq / Hkv) / HEADS, B), block (WARPS * 32), dynamic
// shared memory kSmemBytes (mirrored by python/attnproto/ops/paged.py). Arguments:
//   (p, q, k_cache, v_cache, block_table, context_lens, o, lse, part_o, part_lse, alibi_slopes)
//   alibi_slopes: float32 [Hq] (ALIBI = 2; else null)
// CTA (partition, head block, b) takes keys [partition * p.partition_size, + p.partition_size)
// of sequence b (p.partition_size a multiple of the CTA's key tile) and all HEADS x NQ query
// rows of its head block together, so each K/V row is read once per kv head. SPLIT = 0: one
// partition, O and LSE written directly. SPLIT = 1: the normalised partial O (float32) and
// LSE of each partition go to part_o [B, Hq, NQ, P, D] and part_lse [B, Hq, NQ, P]
// (P = p.num_partitions), merged by paged_decode_reduce.cu; partitions starting at or past ctx
// return at once (the reduce never reads them).
//
// Design:
//   * Rows: row r = head-in-block * NQ + token, padded to whole 16-row mma tiles (a GQA
//     group of 8 with NQ = 1 fills half a tile: the tensor cores are idle in this
//     memory-bound kernel, so the padding costs no time).
//   * Q -> shared (cp.async) -> registers (ldmatrix) once; K/V tiles of WARPS * KEYS_PER_WARP
//     keys stream through a STAGES-deep cp.async ring, rows gathered page by page (16-byte
//     chunks, XOR-swizzled rows: ldmatrix is bank-conflict free). The page ids of the next
//     tile are loaded from the block table one tile ahead (one load per page a thread's rows
//     touch) and range-checked only when used, so the table read is off the critical path.
//   * Warp w takes keys [w * KEYS_PER_WARP, (w + 1) * KEYS_PER_WARP) of every tile with its own
//     online softmax (split-K inside the CTA), and copies only those rows itself: it waits on
//     its own cp.async groups, so the main loop has no CTA barrier at all and the warps drift
//     freely; their (max, sum, O) merge through shared memory at the end.
//   * Keys past the partition or past ctx are zero-filled, never read: stale or NaN bytes in
//     the unused slots of the last page cannot reach O.
//
// NaN / inf: the policy of python/attnproto/ref.py (module doc): NaN-propagating maxima,
// "no visible key" (O = 0, LSE = -inf) from the geometry. A table entry outside
// [0, num_blocks), or ctx outside [0, capacity], is never dereferenced and makes the
// sequence's rows NaN (O and LSE): never a silently wrong result.
//
// Variants (include/variants.cuh, Prototype 7; the semantics of attnproto.ref.attention with
// query i at position ctx - NQ + i): soft cap and ALiBi turn the raw scores into log2-domain
// logits before the masks (variant::ScoreMod, then the exp2 multiplier is 1); the left sliding
// window is a third mask beside the partition end and the diagonal, and the key tiles of a
// partition wholly left of every row's window are never loaded (the walk starts at the tile of
// the first row's first visible key; a partition left of the window loads no tile and writes
// O = 0, LSE = -inf, which the reduce weighs 0). ALiBi uses the per-element form
// -slope |pos_q - key| (ScoreMod<false>), not the causal per-column form with a row constant
// added back to LSE: a thread's rows belong to different query heads (different slopes), so a
// per-column bias would not be shared, and every partition's LSE stays the row's true partial
// LSE, so the reduce merges them unchanged. RoPE is refused: paged K is stored rotated
// (paged_rope_append.cu rotates Q and K where K is written).
//
// Constants (all required): HEAD_DIM, PAGE_SIZE, HEADS, NQ, WARPS, KEYS_PER_WARP, STAGES,
// SPLIT, DTYPE (0 = float16, 1 = bfloat16), and the variant constants ROPE (must be 0),
// ROPE_TABLE (must be 0), ALIBI, WINDOW, SOFTCAP (variants.cuh).
#include "common/attn_params.h"
#include "cuda/include/common.cuh"
#include "cuda/include/paged_kv.cuh"
#include "cuda/include/variants.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef PAGE_SIZE
#error "PAGE_SIZE must be defined"
#endif
#ifndef HEADS
#error "HEADS must be defined"
#endif
#ifndef NQ
#error "NQ must be defined"
#endif
#ifndef WARPS
#error "WARPS must be defined"
#endif
#ifndef KEYS_PER_WARP
#error "KEYS_PER_WARP must be defined"
#endif
#ifndef STAGES
#error "STAGES must be defined"
#endif
#ifndef SPLIT
#error "SPLIT must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined"
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "paged_decode needs sm_80 or newer (bf16 mma.sync, cp.async)"
#endif

namespace pd {

using ap::u16;
using ap::u32;
using KV = typename paged::KVPolicy<PAGE_SIZE>::type;

constexpr int kHeadDim = HEAD_DIM;
constexpr int kDtype = DTYPE;
constexpr bool kSplit = SPLIT != 0;
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;   // mma.sync.m16n8k16
constexpr int kAccPerTile = 4;                    // floats of an m16n8 accumulator per thread
constexpr int kElemBytes = 2;
constexpr int kChunkBytes = ap::kCpAsyncBytes;
constexpr int kChunkElems = kChunkBytes / kElemBytes;
// Speculative decode checks at most 8 draft tokens per step (the issue's bound).
constexpr int kMaxNq = 8;
// 8 warps = 256 threads: more splits a tile into slices too thin to keep a warp's loads deep.
constexpr int kMaxWarps = 8;
// Accumulator floats per thread (S and O of all the warp's row tiles); beyond this the
// kernel spills (the bound of include/fa_mma.cuh, measured there with ptxas -v).
constexpr int kMaxAccRegs = 192;
// Q fragments stay in registers when accumulators + fragments fit this many floats (fa_mma's
// spill-free bound); otherwise they are re-read from shared memory at every k step.
constexpr int kQInRegsBudget = 160;
// H100 / H200 per-block opt-in shared memory (227 KB).
constexpr int kSmemLimit = 232448;

constexpr int kRows = HEADS * NQ;
constexpr int kMTiles = (kRows + kMmaM - 1) / kMmaM;
constexpr int kRowsPadded = kMTiles * kMmaM;
constexpr int kThreads = WARPS * ap::kWarpSize;
constexpr int kTileKeys = WARPS * KEYS_PER_WARP;
constexpr int kSTiles = KEYS_PER_WARP / kMmaN;
constexpr int kOTiles = kHeadDim / kMmaN;
constexpr int kQKSteps = kHeadDim / kMmaK;
constexpr int kPVSteps = KEYS_PER_WARP / kMmaK;
constexpr int kChunksPerRow = kHeadDim / kChunkElems;
constexpr int kSwizzleGroup = 8;                  // 8 chunks = 128 bytes = all 32 banks
constexpr int kRowBytes = kHeadDim * kElemBytes;
constexpr int kQTileBytes = kRowsPadded * kRowBytes;
constexpr int kKVTileBytes = kTileKeys * kRowBytes;
constexpr int kRingBytes = 2 * STAGES * kKVTileBytes;
// Copy geometry: every warp copies only its own KEYS_PER_WARP rows of a tile, so it waits on
// its own cp.async groups and the main loop has no CTA barrier. Lane l owns chunk column
// l % kChunksPerRow of the warp's rows l / kChunksPerRow + i * kRowStep.
constexpr int kRowStep = ap::kWarpSize / kChunksPerRow;
constexpr int kCopyIters = KEYS_PER_WARP / kRowStep;
// Table reads per thread and tile: one per page its rows touch. A thread's rows are kRowStep
// apart, so kItersPerPage consecutive copy iterations share a page (all of them when a page
// holds the whole tile; contiguous K/V needs no read at all).
constexpr int kItersPerPage = !KV::kPaged ? kCopyIters
                            : (KV::kPageSize / kRowStep < 1 ? 1
                               : (KV::kPageSize / kRowStep > kCopyIters ? kCopyIters : KV::kPageSize / kRowStep));
constexpr int kLookups = kCopyIters / kItersPerPage;
// Merge area (after the loop, over the K/V ring): per warp O [rows][D] + max + sum, float32.
constexpr int kMergeFloatsPerWarp = kRowsPadded * (kHeadDim + 2);
constexpr int kMergeBytes = WARPS * kMergeFloatsPerWarp * 4 + WARPS * kRowsPadded * 4;  // + weights
constexpr int kSmemBytes = kQTileBytes + (kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes);

constexpr int kAccRegs = kMTiles * (kSTiles + kOTiles) * kAccPerTile;
constexpr int kQFragRegs = kMTiles * kQKSteps * 4;
constexpr bool kQInRegs = kAccRegs + kQFragRegs <= kQInRegsBudget;

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM must be 64, 128 or 256");
static_assert(paged::legal_page_size(PAGE_SIZE), "PAGE_SIZE must be 0 (contiguous) or one of 1, 8, 16, 32, 64, 128, 256");
static_assert(HEADS >= 1 && NQ >= 1 && NQ <= kMaxNq, "NQ must be in [1, 8] and HEADS positive");
static_assert(WARPS >= 1 && WARPS <= kMaxWarps, "WARPS must be in [1, 8]");
static_assert(KEYS_PER_WARP % kMmaK == 0 && KEYS_PER_WARP >= kMmaK,
              "KEYS_PER_WARP must be a positive multiple of 16 (k step of P V)");
static_assert(STAGES >= 2 && STAGES <= 6, "STAGES must be in [2, 6] (one tile computes while the next lands)");
static_assert(SPLIT == 0 || SPLIT == 1, "SPLIT must be 0 or 1");
static_assert(kDtype == ap::kDtypeF16 || kDtype == ap::kDtypeBF16, "DTYPE must be 0 (f16) or 1 (bf16)");
static_assert(ap::kWarpSize % kChunksPerRow == 0 && KEYS_PER_WARP % kRowStep == 0,
              "copy geometry: a warp's lanes must cover whole rows and its slice whole row steps");
static_assert(kAccRegs <= kMaxAccRegs,
              "register budget: ceil(HEADS*NQ/16) x (KEYS_PER_WARP + HEAD_DIM) / 8 x 4 accumulator floats per "
              "thread exceed 192: put fewer heads in a CTA or use a smaller KEYS_PER_WARP");
static_assert(kSmemBytes <= kSmemLimit, "shared memory (Q tile + 2 * STAGES K/V tiles) exceeds 227 KB: lower STAGES");
static_assert(kRowsPadded <= kThreads, "epilogue: one thread per query row");
static_assert(!variant::kRope && !variant::kRopeTable,
              "ROPE with paged decode: paged K is stored already rotated (RoPE where K is written, "
              "paged_rope_append); rotate Q there too and run paged_decode with ROPE=0");

// Byte offset of chunk `c` of row `r` in a tile (chunk c stored at c ^ (r % 8) in its group of 8).
__device__ __forceinline__ u32 chunk_offset(int r, int c) {
    return r * kRowBytes + ((c ^ (r % kSwizzleGroup)) * kChunkBytes);
}

// Lane part of an ldmatrix.x4 address (see include/fa_mma.cuh): rows start at multiples of
// 16, rows are multiples of 128 bytes, so a k step is one XOR with a constant.
__device__ __forceinline__ u32 ldm_lane_offset(int lane_row, int half) {
    return lane_row * kRowBytes + ((half ^ (lane_row % kSwizzleGroup)) * kChunkBytes);
}
__device__ __forceinline__ u32 ldm_addr(u32 lane_addr, int row_base, int step) {
    const int chunk = 2 * step;
    const int group = chunk & ~(kSwizzleGroup - 1);
    const int in_group = chunk & (kSwizzleGroup - 1);
    return (lane_addr ^ (u32)(in_group * kChunkBytes)) + row_base * kRowBytes + group * kChunkBytes;
}

// The raw table entries of the pages a thread's rows of one tile lie on, loaded a tile ahead
// and checked only in copy_tile. Pages past `end` are not looked up.
struct Pages {
    int id[kLookups];
};

__device__ __forceinline__ void lookup(Pages& pg, const int* __restrict__ table_row, int seq, int key0, int end,
                                       int r0) {
#pragma unroll
    for (int i = 0; i < kLookups; ++i) {
        const int key = key0 + r0 + i * kItersPerPage * kRowStep;  // r0: the lane's first row in the tile
        pg.id[i] = key < end ? KV::raw_page(table_row, seq, key) : paged::kBadPage;
    }
}

// Issues the cp.async copies of one K and one V tile (keys [key0, key0 + kTileKeys)).
// Returns true if a row this thread had to read lies on a bad page.
// Issues the cp.async copies of the calling warp's rows of one K and one V tile (tile keys
// [key0, key0 + kTileKeys); r0 = the lane's first row in the tile, inside the warp's slice).
// Returns true if a row this lane had to read lies on a bad page.
__device__ __forceinline__ bool copy_tile(u32 k_dst, u32 v_dst, const u16* __restrict__ k, const u16* __restrict__ v,
                                          const Pages& pg, int key0, int end, int kv_head, int r0, int lane,
                                          const AttentionParams& p) {
    const int c = lane % kChunksPerRow;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < kCopyIters; ++i) {
        const int r = r0 + i * kRowStep;
        const int key = key0 + r;
        const int page = KV::checked(pg.id[i / kItersPerPage], p);
        const bool in_range = key < end;
        const bool valid = in_range && page != paged::kBadPage;
        bad |= in_range && !valid;
        const u16* ks = valid ? k + KV::offset(page, key, kv_head, p.k_stride) + c * kChunkElems : k;
        const u16* vs = valid ? v + KV::offset(page, key, kv_head, p.v_stride) + c * kChunkElems : v;
        const u32 off = chunk_offset(r, c);
        ap::cp_async_16(k_dst + off, ks, valid);
        ap::cp_async_16(v_dst + off, vs, valid);
    }
    return bad;
}

}  // namespace pd

extern "C" __global__ void __launch_bounds__(pd::kThreads)
paged_decode(const AttentionParams p, const ap::u16* __restrict__ q, const ap::u16* __restrict__ k,
             const ap::u16* __restrict__ v, const int* __restrict__ block_table, const int* __restrict__ context_lens,
             ap::u16* __restrict__ o, float* __restrict__ lse, float* __restrict__ part_o,
             float* __restrict__ part_lse, const float* __restrict__ alibi_slopes) {
    using namespace pd;
    extern __shared__ __attribute__((aligned(128))) unsigned char smem[];
    // The host sizes the launch from its mirror of kSmemBytes (ops/families/paged_decode.py:
    // shared_bytes, the budget map of Prototype 3): a mismatch traps instead of overrunning.
    if (p.head_dim != HEAD_DIM || ap::dynamic_smem_size() < (u32)kSmemBytes) ap::trap();
    // A variant without the buffer or value it reads (the host checks all of these).
    if constexpr (variant::kAlibi || variant::kWindow || variant::kSoftcap)
        if ((ALIBI == variant::kAlibiSlopes && alibi_slopes == nullptr) || (variant::kWindow && p.window == 0) ||
            (variant::kSoftcap && !(p.softcap > 0.f)))
            ap::trap();

    const int tid = threadIdx.x;
    const int warp = tid / ap::kWarpSize;
    const int lane = tid % ap::kWarpSize;
    const int partition = blockIdx.x;
    const int seq = blockIdx.z;
    const int group = (int)(p.num_heads / p.num_kv_heads);
    const int head0 = blockIdx.y * HEADS;             // first query head of the block
    const int kv_head = head0 / group;
    // The exp2 multiplier: scale * log2(e), or 1 where ScoreMod made the scores log2-domain logits.
    const float scale_log2 = variant::kScoreMod ? 1.0f : p.scale * ap::kLog2e;

    // Keys of the sequence, clamped to what the table (or the contiguous K/V) holds.
    const int capacity = KV::capacity(p);
    const int ctx_raw = context_lens[seq];
    bool bad = ctx_raw < 0 || ctx_raw > capacity;
    const int ctx = min(max(ctx_raw, 0), capacity);
    const int start = partition * (int)p.partition_size;
    if (kSplit && start >= ctx && !bad) return;       // the reduce reads partitions below ctx only
    const int end = min(ctx, start + (int)p.partition_size);
    // WINDOW: query i sees keys j > ctx - NQ + i - window; the walk starts at the tile (of this
    // partition) holding the first row's first visible key. Without a window it starts at `start`.
    const int window = (int)p.window;
    const int key_begin = variant::kWindow
        ? start + max(0, (variant::first_visible_key(ctx - NQ, window) - start) / kTileKeys) * kTileKeys : start;
    const int n_tiles = end > key_begin ? (end - key_begin + kTileKeys - 1) / kTileKeys : 0;
    const int diag = ctx - NQ;                        // query i sees keys j <= diag + i
    const int* table_row = block_table + (long long)seq * p.max_blocks_per_seq;

    const u32 s_q = ap::smem_u32(smem);
    const u32 s_k = s_q + kQTileBytes;
    const u32 s_v = s_k + STAGES * kKVTileBytes;
    if (s_q % (kSwizzleGroup * kChunkBytes) != 0) ap::trap();  // the XOR addressing needs 128-byte tiles

    // ---- Q rows: row r = head-in-block * NQ + token; padding rows zero-filled
    for (int idx = tid; idx < kRowsPadded * kChunksPerRow; idx += kThreads) {
        const int r = idx / kChunksPerRow;
        const int c = idx % kChunksPerRow;
        const bool valid = r < kRows;
        const u16* src = valid ? q + (long long)seq * p.q_stride[0] + (long long)(head0 + r / NQ) * p.q_stride[1] +
                                     (long long)(r % NQ) * p.q_stride[2] + c * kChunkElems
                               : q;
        ap::cp_async_16(s_q + chunk_offset(r, c), src, valid);
    }
    ap::cp_async_commit();

    // ---- prologue: tiles 0 .. STAGES-2, one group each
    const int r0 = warp * KEYS_PER_WARP + lane / kChunksPerRow;
    Pages pg;
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) {
        if (t < n_tiles) {
            lookup(pg, table_row, seq, key_begin + t * kTileKeys, end, r0);
            bad |= copy_tile(s_k + t * kKVTileBytes, s_v + t * kKVTileBytes, k, v, pg, key_begin + t * kTileKeys, end,
                             kv_head, r0, lane, p);
        }
        ap::cp_async_commit();
    }
    if (STAGES - 1 < n_tiles) lookup(pg, table_row, seq, key_begin + (STAGES - 1) * kTileKeys, end, r0);

    // ldmatrix lane addresses (fragment layouts in common.cuh):
    //   A of Q K^T (Q) and B of P V (V, .trans): lane -> row lane % 16, half lane / 16;
    //   B of Q K^T (K): lane -> row lane % 8 + 8 * (lane / 16), half (lane / 8) % 2.
    const u32 q_lanes = s_q + ldm_lane_offset(lane % 16, lane / 16);
    const u32 v_lane_off = ldm_lane_offset(warp * KEYS_PER_WARP + lane % 16, lane / 16);
    const u32 k_lane_off = ldm_lane_offset(warp * KEYS_PER_WARP + lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
    const int g = lane / ap::kQuadSize;
    const int tq = lane % ap::kQuadSize;

    float o_acc[kMTiles][kOTiles][kAccPerTile];
    float row_max[kMTiles][2];
    float row_sum[kMTiles][2];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int d = 0; d < kOTiles; ++d)
#pragma unroll
            for (int e = 0; e < kAccPerTile; ++e) o_acc[m][d][e] = 0.0f;
        row_max[m][0] = row_max[m][1] = ap::neg_inf();
        row_sum[m][0] = row_sum[m][1] = 0.0f;
    }
    u32 q_frag[kQInRegs ? kMTiles : 1][kQInRegs ? kQKSteps : 1][4];
    // Soft cap and ALiBi of each accumulator row (its query head's slope; padding rows take the
    // last real row's head, so a slopes buffer is never read past Hq).
    variant::ScoreMod<false> mod[kMTiles][2];
    if constexpr (variant::kScoreMod) {
#pragma unroll
        for (int m = 0; m < kMTiles; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                mod[m][h].init(p, head0 + min(m * kMmaM + g + h * (kMmaM / 2), kRows - 1) / NQ, alibi_slopes);
    }

    // Q (the oldest group) landed for every thread and is visible to every warp: the only CTA
    // barrier before the merge. (A CTA with no tile skips it together: n_tiles is uniform.)
    if (n_tiles > 0) {
        ap::cp_async_wait<STAGES - 1>();
        __syncthreads();
        if constexpr (kQInRegs) {
#pragma unroll
            for (int m = 0; m < kMTiles; ++m)
#pragma unroll
                for (int kk = 0; kk < kQKSteps; ++kk) ap::ldmatrix_x4(q_frag[m][kk], ldm_addr(q_lanes, m * kMmaM, kk));
        }
    }

    for (int j = 0; j < n_tiles; ++j) {
        const int stage = j % STAGES;
        const int key0 = key_begin + j * kTileKeys;
        // The warp's rows of tile j landed (its own copies); the warp is done with its rows of
        // tile j - 1, whose slot the copies below overwrite. No other warp reads them.
        ap::cp_async_wait<STAGES - 2>();
        ap::syncwarp();
        const int next = j + STAGES - 1;
        if (next < n_tiles) {
            const int slot = next % STAGES;
            bad |= copy_tile(s_k + slot * kKVTileBytes, s_v + slot * kKVTileBytes, k, v, pg,
                             key_begin + next * kTileKeys, end, kv_head, r0, lane, p);
            if (next + 1 < n_tiles) lookup(pg, table_row, seq, key_begin + (next + 1) * kTileKeys, end, r0);
        }
        ap::cp_async_commit();

        const u32 k_tile = s_k + stage * kKVTileBytes + k_lane_off;
        const u32 v_tile = s_v + stage * kKVTileBytes + v_lane_off;
        const int col0 = key0 + warp * KEYS_PER_WARP;  // first key of this warp's slice

        // S = Q K^T for the warp's slice
        float s[kMTiles][kSTiles][kAccPerTile];
#pragma unroll
        for (int m = 0; m < kMTiles; ++m)
#pragma unroll
            for (int n = 0; n < kSTiles; ++n)
#pragma unroll
                for (int e = 0; e < kAccPerTile; ++e) s[m][n][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < kQKSteps; ++kk) {
            u32 a[kMTiles][4];
#pragma unroll
            for (int m = 0; m < kMTiles; ++m) {
                if constexpr (kQInRegs) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) a[m][i] = q_frag[m][kk][i];
                } else {
                    ap::ldmatrix_x4(a[m], ldm_addr(q_lanes, m * kMmaM, kk));
                }
            }
#pragma unroll
            for (int nn = 0; nn < kSTiles / 2; ++nn) {
                u32 b[4];
                ap::ldmatrix_x4(b, ldm_addr(k_tile, nn * 2 * kMmaN, kk));
#pragma unroll
                for (int m = 0; m < kMTiles; ++m) {
                    ap::mma_m16n8k16<kDtype>(s[m][2 * nn], a[m], b[0], b[1]);
                    ap::mma_m16n8k16<kDtype>(s[m][2 * nn + 1], a[m], b[2], b[3]);
                }
            }
        }

        // Soft cap and ALiBi: log2-domain logits (before the masks, as the reference orders them).
        if constexpr (variant::kScoreMod) {
#pragma unroll
            for (int m = 0; m < kMTiles; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int pos = diag + (m * kMmaM + g + h * (kMmaM / 2)) % NQ;
#pragma unroll
                    for (int n = 0; n < kSTiles; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            s[m][n][2 * h + e] = mod[m][h].logit_log2(s[m][n][2 * h + e], 0.0f,
                                                                      (float)(pos - (col0 + n * kMmaN + 2 * tq + e)));
                }
        }

        // Mask keys past the partition end and (NQ > 1) right of each row's diagonal; WINDOW: keys
        // left of a row's window (the newest row, at diag + NQ - 1, has the rightmost window start).
        const bool crosses_window = variant::kWindow && col0 <= diag + NQ - 1 - window;
        if (col0 + KEYS_PER_WARP > end || col0 + KEYS_PER_WARP - 1 > diag || crosses_window) {
#pragma unroll
            for (int m = 0; m < kMTiles; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = m * kMmaM + g + h * (kMmaM / 2);
                    const int limit = min(end - 1, diag + row % NQ);
#pragma unroll
                    for (int n = 0; n < kSTiles; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            if (col0 + n * kMmaN + 2 * tq + e > limit ||
                                variant::outside_window(diag + row % NQ, col0 + n * kMmaN + 2 * tq + e, window))
                                s[m][n][2 * h + e] = ap::neg_inf();
                }
        }

        // Online softmax (running max of unscaled scores, exp2 domain), as include/fa_mma.cuh.
#pragma unroll
        for (int m = 0; m < kMTiles; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[m][h];
#pragma unroll
                for (int n = 0; n < kSTiles; ++n) mx = ap::fmax_nan(mx, ap::fmax_nan(s[m][n][2 * h], s[m][n][2 * h + 1]));
                mx = ap::quad_max(mx);
                const float mx_scaled = mx == ap::neg_inf() ? 0.0f : mx * scale_log2;
                const float alpha = ap::exp2_approx(row_max[m][h] * scale_log2 - mx_scaled);
                row_max[m][h] = mx;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < kSTiles; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pe = ap::exp2_approx(fmaf(s[m][n][2 * h + e], scale_log2, -mx_scaled));
                        s[m][n][2 * h + e] = pe;
                        sum += pe;
                    }
                row_sum[m][h] = fmaf(row_sum[m][h], alpha, sum);
#pragma unroll
                for (int d = 0; d < kOTiles; ++d) {
                    o_acc[m][d][2 * h] *= alpha;
                    o_acc[m][d][2 * h + 1] *= alpha;
                }
            }

        // O += P V for the warp's slice (P rounded to 16 bits in registers)
#pragma unroll
        for (int kk = 0; kk < kPVSteps; ++kk) {
            u32 a[kMTiles][4];
#pragma unroll
            for (int m = 0; m < kMTiles; ++m) {
                a[m][0] = ap::pack_half2<kDtype>(s[m][2 * kk][0], s[m][2 * kk][1]);
                a[m][1] = ap::pack_half2<kDtype>(s[m][2 * kk][2], s[m][2 * kk][3]);
                a[m][2] = ap::pack_half2<kDtype>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
                a[m][3] = ap::pack_half2<kDtype>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < kOTiles / 2; ++dd) {
                u32 b[4];
                ap::ldmatrix_x4_trans(b, ldm_addr(v_tile, kk * kMmaK, dd));
#pragma unroll
                for (int m = 0; m < kMTiles; ++m) {
                    ap::mma_m16n8k16<kDtype>(o_acc[m][2 * dd], a[m], b[0], b[1]);
                    ap::mma_m16n8k16<kDtype>(o_acc[m][2 * dd + 1], a[m], b[2], b[3]);
                }
            }
        }
    }

    // ---------------------------------------------------------------- merge the warps
    ap::cp_async_wait<0>();
    bad = __syncthreads_or(bad);                      // also: every warp is done with the ring
    float* merge = reinterpret_cast<float*>(smem + kQTileBytes);
    float* w_o = merge + warp * kMergeFloatsPerWarp;  // [rows][D]
    float* w_max = w_o + kRowsPadded * kHeadDim;      // [rows]
    float* w_sum = w_max + kRowsPadded;               // [rows]
    float* weight = merge + WARPS * kMergeFloatsPerWarp;  // [WARPS][rows]
#pragma unroll
    for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m * kMmaM + g + h * (kMmaM / 2);
#pragma unroll
            for (int d = 0; d < kOTiles; ++d) {
                w_o[row * kHeadDim + d * kMmaN + 2 * tq] = o_acc[m][d][2 * h];
                w_o[row * kHeadDim + d * kMmaN + 2 * tq + 1] = o_acc[m][d][2 * h + 1];
            }
            const float l = ap::quad_sum(row_sum[m][h]);
            if (tq == 0) {
                w_max[row] = row_max[m][h];
                w_sum[row] = l;
            }
        }
    __syncthreads();

    // One thread per row: merged max, sum and LSE; the per-warp weights 2^(m_w - m) / l.
    if (tid < kRowsPadded) {
        const int row = tid;
        float mx = ap::neg_inf();
        for (int w = 0; w < WARPS; ++w) mx = ap::fmax_nan(mx, merge[w * kMergeFloatsPerWarp + kRowsPadded * kHeadDim + row]);
        const float mx_scaled = mx == ap::neg_inf() ? 0.0f : mx * scale_log2;
        float l = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float* base = merge + w * kMergeFloatsPerWarp + kRowsPadded * kHeadDim;
            const float f = ap::exp2_approx(base[row] * scale_log2 - mx_scaled);
            weight[w * kRowsPadded + row] = f;
            l = fmaf(base[kRowsPadded + row], f, l);
        }
        // Geometry decides "no key" (ref.py policy): the row sees a key of this partition iff
        // the partition is not empty and its first key is at or left of the row's diagonal
        // (WINDOW: and its last key is not left of the row's window).
        const bool has_key = end > start && start <= diag + row % NQ &&
                             (!variant::kWindow || end - 1 >= variant::first_visible_key(diag + row % NQ, window));
        const float inv = has_key ? 1.0f / l : 0.0f;
        const float row_lse = bad ? ap::quiet_nan()
                            : l > 0.0f ? (mx_scaled + ap::log2_approx(l)) * ap::kLn2
                                       : (has_key ? ap::quiet_nan() : ap::neg_inf());
        for (int w = 0; w < WARPS; ++w) weight[w * kRowsPadded + row] = bad ? ap::quiet_nan() : weight[w * kRowsPadded + row] * inv;
        if (row < kRows) {
            const int head = head0 + row / NQ;
            const int tok = row % NQ;
            if constexpr (kSplit) {
                part_lse[(((long long)seq * p.num_heads + head) * NQ + tok) * p.num_partitions + partition] = row_lse;
            } else {
                lse[(long long)seq * p.lse_stride[0] + (long long)head * p.lse_stride[1] + tok] = row_lse;
            }
        }
    }
    __syncthreads();

    // Every thread: pairs of columns of O = sum_w weight_w * O_w.
    constexpr int kPairs = kRows * kHeadDim / 2;
    for (int idx = tid; idx < kPairs; idx += kThreads) {
        const int row = idx / (kHeadDim / 2);
        const int col = 2 * (idx % (kHeadDim / 2));
        float o0 = 0.0f, o1 = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float f = weight[w * kRowsPadded + row];
            const float* src = merge + w * kMergeFloatsPerWarp + row * kHeadDim + col;
            // A weight of 0 (a warp that saw no key of the row) must not turn a 0 accumulator into NaN.
            if (f != 0.0f) {
                o0 = fmaf(f, src[0], o0);
                o1 = fmaf(f, src[1], o1);
            }
        }
        const bool has_key = end > start && start <= diag + row % NQ &&
                             (!variant::kWindow || end - 1 >= variant::first_visible_key(diag + row % NQ, window));
        if (!has_key && !bad) o0 = o1 = 0.0f;
        const int head = head0 + row / NQ;
        const int tok = row % NQ;
        if constexpr (kSplit) {
            float* dst = part_o + ((((long long)seq * p.num_heads + head) * NQ + tok) * p.num_partitions + partition) * kHeadDim + col;
            dst[0] = o0;
            dst[1] = o1;
        } else {
            u16* dst = o + (long long)seq * p.o_stride[0] + (long long)head * p.o_stride[1] + (long long)tok * p.o_stride[2] + col;
            *reinterpret_cast<u32*>(dst) = ap::pack_half2<kDtype>(o0, o1);
        }
    }
}
