// fa_mma.cuh — the mma.sync Flash Attention forward (Prototype 1) as a reusable body.
//
// Namespace fa_mma holds the named constants, their legality checks, the shared-memory
// addressing and copy helpers, the three per-tile stages (compute_scores + apply_mask,
// online_softmax, accumulate_pv) and the kernel body `forward<Stages>()`, which takes the
// stages from a policy object. shaders/cuda/flash_fwd_mma.cu is the production entry
// (InlineStages); shaders/cuda/flash_fwd_mma_stitch.cu dispatches the same stages in the
// four ways of Prototype 2. The algorithm, layouts and launch shape are documented at the
// top of flash_fwd_mma.cu.
//
// NaN / inf follow the policy written in python/attnproto/ref.py (module doc): the row max
// is NaN-propagating (ap::fmax_nan / ap::quad_max, PTX max.NaN.f32: the same FMNMX
// instruction as fmaxf), and the epilogue (include/fa_mma_kernel_body.cuh) decides "no
// visible key" from the causal geometry, so a NaN row is written as NaN, never as a zero
// row with LSE -inf. Known deviation (documented there): P V runs on 16x16 tensor-core
// tiles, so a non-finite V element at a key that is masked out for a row but lies in a
// key tile the row's warp processes reaches that O column through 0 * NaN.
//
// Deliberately WITHOUT an include guard: shaders/cuda/stitch_multi_entry.cu includes
// flash_fwd_mma.cu (and so this header) several times in one translation unit with
// `#define fa_mma fa_mma_<variant>` and different CAUSAL / DTYPE, and each inclusion must
// define a fresh namespace. Everything here therefore lives in namespace fa_mma (renamable)
// or is a preprocessor check; the three includes below carry their own guards.
//
// Prototype 7 variants (include/variants.cuh: ROPE, ROPE_TABLE, ALIBI, WINDOW, SOFTCAP, all
// required, the host passes every one: attnproto.ops.configs.FlashConfig.constants) enter
// only through `if constexpr` on its policies, so the base variant (all five 0) compiles to
// the kernel it was before they existed:
//   * soft cap / ALiBi: apply_score_mod turns the raw scores into log2-domain logits
//     (variant::ScoreMod) before the mask; the exp2 multiplier of the softmax becomes 1;
//   * window: apply_mask also masks keys left of each row's window, and the kernel body never
//     loads the key tiles left of its first row's window (time scales with the window);
//   * RoPE: rope_tile rotates a tile in shared memory in place, Q once per CTA and each K
//     tile after it lands (both pairings, both cos/sin sources, swizzled and padded rows).
#include "common/attn_params.h"
#include "cuda/include/common.cuh"
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
#ifndef WARPS
#error "WARPS must be defined"
#endif
#ifndef STAGES
#error "STAGES must be defined"
#endif
#ifndef CAUSAL
#error "CAUSAL must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined"
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "flash_fwd_mma needs sm_80 or newer (bf16 mma.sync, cp.async)"
#endif

namespace fa_mma {

using ap::u16;
using ap::u32;

// ------------------------------------------------------------------ named constants
constexpr int kHeadDim = HEAD_DIM;
constexpr int kBlockR = BLOCK_R;
constexpr int kBlockC = BLOCK_C;
constexpr int kWarps = WARPS;
constexpr int kStages = STAGES;
constexpr bool kCausal = CAUSAL != 0;
constexpr int kDtype = DTYPE;

// mma.sync.m16n8k16 tile shape.
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 16;
// Accumulator floats of one m16n8 tile per thread (16 * 8 / 32).
constexpr int kAccPerTile = 4;

constexpr int kElemBytes = 2;                                  // f16 / bf16
constexpr int kChunkBytes = ap::kCpAsyncBytes;                 // one cp.async / ldmatrix row
constexpr int kChunkElems = kChunkBytes / kElemBytes;          // 8

// Largest head dim: O accumulators alone take HEAD_DIM / 2 floats per 16-row tile.
constexpr int kMaxHeadDim = 256;
// 16 warps = 512 threads; more would not leave 64 registers per thread.
constexpr int kMaxWarps = 16;
// Accumulator floats per thread (S and O tiles): 192 is 3/4 of the 255 registers; the
// rest holds the operand fragments, softmax state and addresses. Up to 160 nothing in
// the sweep spills (ptxas -v, sm_90a, nvcc 13.0); at 192 some shapes spill up to a few
// hundred bytes and are left for the sweep to judge; beyond it they cannot fit.
constexpr int kMaxAccRegs = 192;
// Keep Q's A fragments in registers when accumulators + Q fragments fit in this many
// floats (the same 160 that compiles spill-free), otherwise re-read Q from shared memory
// at every k step: D=128 with 16 rows/warp and D=64 with 32 rows/warp stay in registers.
constexpr int kQInRegsBudget = 160;

// Per-block dynamic shared memory a kernel may opt in to, by architecture.
constexpr int kSmemOptinSm80 = 166912;   // A100 / sm_87: 163 KB
constexpr int kSmemOptinSm86 = 101376;   // sm_86 / sm_89 / sm_120: 99 KB
constexpr int kSmemOptinSm90 = 232448;   // H100 / H200 / B200: 227 KB
#if defined(__CUDA_ARCH__)
constexpr int kArch = __CUDA_ARCH__;
#else
constexpr int kArch = 900;
#endif
constexpr int kSmemLimit = (kArch == 800 || kArch == 870) ? kSmemOptinSm80
                         : (kArch == 860 || kArch == 890 || kArch >= 1200) ? kSmemOptinSm86
                         : kSmemOptinSm90;

// ------------------------------------------------------------------ derived shapes
constexpr int kThreads = kWarps * ap::kWarpSize;
constexpr int kRowsPerWarp = kBlockR / kWarps;
constexpr int kMTiles = kRowsPerWarp / kMmaM;     // 16-row MMA tiles per warp
constexpr int kSTiles = kBlockC / kMmaN;          // n-tiles of S per 16-row tile
constexpr int kOTiles = kHeadDim / kMmaN;         // n-tiles of O per 16-row tile
constexpr int kQKSteps = kHeadDim / kMmaK;        // k steps of Q K^T
constexpr int kPVSteps = kBlockC / kMmaK;         // k steps of P V
constexpr int kChunksPerRow = kHeadDim / kChunkElems;

// Shared layout: [rows][HEAD_DIM] tiles of 16-byte chunks.
// 8 chunks = 128 bytes = all 32 banks: the swizzle permutes chunks within such groups.
constexpr int kSwizzleGroup = 8;
constexpr bool kSwizzle = kChunksPerRow % kSwizzleGroup == 0;
constexpr int kRowBytes = kHeadDim * kElemBytes + (kSwizzle ? 0 : kChunkBytes);
constexpr int kQTileBytes = kBlockR * kRowBytes;
constexpr int kKVTileBytes = kBlockC * kRowBytes;
constexpr int kSmemBytes = kQTileBytes + 2 * kStages * kKVTileBytes;

constexpr int kAccRegs = kMTiles * (kSTiles + kOTiles) * kAccPerTile;
constexpr int kQFragRegs = kMTiles * kQKSteps * 4;
constexpr bool kQInRegs = kAccRegs + kQFragRegs <= kQInRegsBudget;

// ------------------------------------------------------------------ legality
static_assert(kHeadDim % kMmaK == 0 && kHeadDim >= kMmaK && kHeadDim <= kMaxHeadDim,
              "HEAD_DIM must be a multiple of 16 in [16, 256]");
static_assert(kBlockC % kMmaK == 0 && kBlockC >= kMmaK,
              "BLOCK_C must be a positive multiple of 16 (k step of P V)");
static_assert(kWarps >= 1 && kWarps <= kMaxWarps, "WARPS must be in [1, 16]");
static_assert(kBlockR > 0 && kBlockR % (kMmaM * kWarps) == 0,
              "BLOCK_R must be a positive multiple of 16*WARPS (each warp owns whole 16-row MMA tiles)");
static_assert(kStages == 1 || kStages == 2, "STAGES must be 1 or 2");
static_assert(CAUSAL == 0 || CAUSAL == 1, "CAUSAL must be 0 or 1");
static_assert(kDtype == ap::kDtypeF16 || kDtype == ap::kDtypeBF16, "DTYPE must be 0 (f16) or 1 (bf16)");
static_assert(kSmemBytes <= kSmemLimit,
              "shared memory (BLOCK_R + 2*STAGES*BLOCK_C rows of HEAD_DIM) exceeds the per-block "
              "opt-in limit of this architecture (227 KB on sm_90)");
// RoPE rotates pairs in place in the shared tiles: rotate-half pairs chunk c with chunk
// c + kChunksPerRow / 2 (elements i and i + D/2, 8 pairs per chunk pair, in either row
// layout), interleaved pairs the two halves of each 32-bit word; both need whole chunks.
static_assert(!variant::kRope || kChunksPerRow % 2 == 0,
              "RoPE (rotate-half) pairs 16-byte chunk c with chunk c + HEAD_DIM/16: HEAD_DIM must be a multiple of 16");
static_assert(kAccRegs <= kMaxAccRegs,
              "register budget: (BLOCK_R/WARPS) x (BLOCK_C + HEAD_DIM) / 32 accumulator floats per "
              "thread exceed 192; use more WARPS or a smaller BLOCK_R or BLOCK_C");

// ------------------------------------------------------------------ shared addressing
// Byte offset of 16-byte chunk `chunk` of row `row` in a tile.
__device__ __forceinline__ u32 chunk_offset(int row, int chunk) {
    if constexpr (kSwizzle) {
        return row * kRowBytes + ((chunk ^ (row % kSwizzleGroup)) * kChunkBytes);
    } else {
        return row * kRowBytes + chunk * kChunkBytes;
    }
}

// Per-lane part of an ldmatrix.x4 address: the lane's row within a 16-row block
// (lane_row, blocks start at multiples of 16 rows so its swizzle key is
// lane_row % 8) and which 8-column half of a 16-column k step it reads.
//
// Swizzled: the physical chunk of logical chunk 2*step + half in row r is
// group + ((2*step % 8 + half) ^ (r % 8)) = group + ((2*step % 8) ^ x) with the
// lane constant x = half ^ (r % 8). Tiles start at multiples of 128 bytes and
// rows are multiples of 128 bytes long, so bits 4..6 of the lane's address
// (tile + row * row bytes + x * 16) hold exactly x and the k step becomes one
// XOR with a constant: no per-step address registers.
__device__ __forceinline__ u32 ldm_lane_offset(int lane_row, int half) {
    if constexpr (kSwizzle) {
        return lane_row * kRowBytes + ((half ^ (lane_row % kSwizzleGroup)) * kChunkBytes);
    } else {
        return lane_row * kRowBytes + half * kChunkBytes;
    }
}

// Address of the ldmatrix.x4 of rows [row_base, row_base + 16) and columns
// [16 * step, 16 * step + 16) of a tile; row_base (a multiple of 16) and step
// fold to constants in unrolled loops. `lane_addr` = tile + ldm_lane_offset().
__device__ __forceinline__ u32 ldm_addr(u32 lane_addr, int row_base, int step) {
    const int chunk = 2 * step;
    if constexpr (kSwizzle) {
        const int group = chunk & ~(kSwizzleGroup - 1);
        const int in_group = chunk & (kSwizzleGroup - 1);
        return (lane_addr ^ (u32)(in_group * kChunkBytes)) + row_base * kRowBytes + group * kChunkBytes;
    } else {
        return lane_addr + row_base * kRowBytes + chunk * kChunkBytes;
    }
}

// Copies rows [row0, row0 + ROWS) of a [N][HEAD_DIM] matrix (row stride in
// elements) to a tile, 16 bytes per cp.async; rows >= row_end are zero-filled
// (src-size 0; the source then points at `fallback`, any mapped address).
// `mine` = this thread's first chunk of row 0 when the threads cover whole rows
// (kFixedColumn: thread tid keeps chunk column tid % chunks-per-row and rows
// tid / chunks-per-row + i * kRowStep), else the matrix itself.
template <int ROWS>
struct TileCopy {
    static constexpr int kChunks = ROWS * kChunksPerRow;
    static constexpr int kIters = (kChunks + kThreads - 1) / kThreads;
    static constexpr bool kFixedColumn = kThreads % kChunksPerRow == 0;
    static constexpr int kRowStep = kFixedColumn ? kThreads / kChunksPerRow : 0;
    // A thread's shared offsets then differ by constants if the row step keeps the swizzle key.
    static constexpr bool kConstSmemStep = kFixedColumn && (!kSwizzle || kRowStep % kSwizzleGroup == 0);

    // First global element a thread copies (add row0 * row_stride for a tile).
    __device__ __forceinline__ static const u16* thread_start(const u16* g, long long row_stride, int tid) {
        if constexpr (kFixedColumn) {
            return g + (long long)(tid / kChunksPerRow) * row_stride + (tid % kChunksPerRow) * kChunkElems;
        } else {
            return g;
        }
    }

    __device__ __forceinline__ static void copy(u32 tile, const u16* mine, long long row_stride, int row0,
                                                int row_end, const void* fallback, int tid) {
        if constexpr (kFixedColumn) {
            const int r0 = tid / kChunksPerRow;
            const int c = tid % kChunksPerRow;
            const u32 smem0 = chunk_offset(r0, c);
            const u16* src = mine + (long long)row0 * row_stride;
            const long long step = (long long)kRowStep * row_stride;
#pragma unroll
            for (int i = 0; i < kIters; ++i) {
                const int r = r0 + i * kRowStep;
                if (kChunks % kThreads == 0 || r < ROWS) {
                    const bool valid = row0 + r < row_end;
                    const u32 dst = kConstSmemStep ? smem0 + i * kRowStep * kRowBytes : chunk_offset(r, c);
                    ap::cp_async_16(tile + dst, valid ? (const void*)src : fallback, valid);
                }
                src += step;
            }
        } else {
#pragma unroll
            for (int i = 0; i < kIters; ++i) {
                const int idx = tid + i * kThreads;
                if (kChunks % kThreads == 0 || idx < kChunks) {
                    const int r = idx / kChunksPerRow;
                    const int c = idx % kChunksPerRow;
                    const bool valid = row0 + r < row_end;
                    const void* src = valid ? (const void*)(mine + (long long)(row0 + r) * row_stride + c * kChunkElems)
                                            : fallback;
                    ap::cp_async_16(tile + chunk_offset(r, c), src, valid);
                }
            }
        }
    }
};

// S = Q K^T for this warp's rows and one K tile.
__device__ __forceinline__ void compute_scores(float (&s)[kMTiles][kSTiles][kAccPerTile],
                                               const u32 (&q_frag)[kQInRegs ? kMTiles : 1][kQInRegs ? kQKSteps : 1][4],
                                               u32 q_lanes, u32 k_lanes) {
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
            ap::ldmatrix_x4(b, ldm_addr(k_lanes, nn * 2 * kMmaN, kk));
#pragma unroll
            for (int m = 0; m < kMTiles; ++m) {
                ap::mma_m16n8k16<kDtype>(s[m][2 * nn], a[m], b[0], b[1]);
                ap::mma_m16n8k16<kDtype>(s[m][2 * nn + 1], a[m], b[2], b[3]);
            }
        }
    }
}

// -inf where key col > limit of the row (limit = last visible key) and, with a window
// (variant::kWindow), where the key lies left of the row's window (`window` is unused otherwise).
__device__ __forceinline__ void apply_mask(float (&s)[kMTiles][kSTiles][kAccPerTile], int row0,
                                           int col0, int seq_kv, int causal_offset, int lane, int window) {
    const int g = lane / ap::kQuadSize;
    const int t = lane % ap::kQuadSize;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + m * kMmaM + g + h * (kMmaM / 2);
            int limit = seq_kv - 1;
            if constexpr (kCausal) limit = min(limit, row + causal_offset);
#pragma unroll
            for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + n * kMmaN + 2 * t + e;
                    bool masked = col > limit;
                    if constexpr (variant::kWindow)
                        masked = masked || variant::outside_window(row + causal_offset, col, window);
                    if (masked) s[m][n][2 * h + e] = ap::neg_inf();
                }
            }
        }
    }
}

// Soft cap / ALiBi (variant::kScoreMod): raw scores -> log2-domain logits of (query position,
// key), before the mask (a masked -inf must stay -inf, not become -cap). Rows start at
// row0 (query positions row + causal_offset); the softmax then uses an exp2 multiplier of 1.
__device__ __forceinline__ void apply_score_mod(float (&s)[kMTiles][kSTiles][kAccPerTile], int row0, int col0,
                                                int causal_offset, int lane, const variant::ScoreMod<false>& mod) {
    const int g = lane / ap::kQuadSize;
    const int t = lane % ap::kQuadSize;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int q_pos = row0 + m * kMmaM + g + h * (kMmaM / 2) + causal_offset;
#pragma unroll
            for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    s[m][n][2 * h + e] = mod.logit_log2(s[m][n][2 * h + e], 0.0f,
                                                        (float)(q_pos - (col0 + n * kMmaN + 2 * t + e)));
            }
        }
    }
}

// The variant buffers of an entry's kernel arguments (null where the variant reads none);
// entries without them (the Prototype 2 stitch, base variant only) pass an empty one.
struct VariantBuffers {
    const float* rope_cos = nullptr;      // float32 [rope_table_len, D/2] (ROPE_TABLE)
    const float* rope_sin = nullptr;
    const float* alibi_slopes = nullptr;  // float32 [Hq] (ALIBI = 2)
};

// Traps when a variant lacks the buffer or value it reads (the host checks all of these first):
// a table shorter than the positions read, or a query position below 0, would read outside it.
__device__ __forceinline__ void check_variant_inputs(const AttentionParams& p, const VariantBuffers& buffers) {
    if constexpr (variant::kRopeTable) {
        if (buffers.rope_cos == nullptr || buffers.rope_sin == nullptr ||
            (long long)p.rope_offset + p.seq_kv > (long long)p.rope_table_len ||
            (long long)p.rope_offset + p.seq_kv < (long long)p.seq_q)
            ap::trap();
    }
    if constexpr (ALIBI == variant::kAlibiSlopes) {
        if (buffers.alibi_slopes == nullptr) ap::trap();
    }
    if constexpr (variant::kWindow) {
        if (p.window == 0) ap::trap();
    }
    if constexpr (variant::kSoftcap) {
        if (!(p.softcap > 0.0f)) ap::trap();
    }
}

// RoPE of rows [0, valid) of a ROWS-row tile in place (row r at position pos0 + r), by all
// kThreads threads; the caller synchronises before and after. Rows >= valid (zero-filled past
// N) are left alone. The rotation runs in float32 and rounds once back to 16 bits.
//   rotate-half: a unit is chunk c < kChunksPerRow/2 with its partner c + kChunksPerRow/2,
//                eight pairs (i, i + D/2), i = 8c .. 8c + 7;
//   interleaved: a unit is one chunk, four pairs (2i, 2i + 1) in its four 32-bit words.
// chunk_offset places the chunks in either row layout (XOR-swizzled or padded).
template <int ROWS>
__device__ __forceinline__ void rope_tile(u32 tile, int valid, int pos0, const variant::Rope& rope, int tid) {
    constexpr bool kBF16 = kDtype == ap::kDtypeBF16;
    constexpr int kHalfChunks = kChunksPerRow / 2;
    constexpr int kUnitsPerRow = variant::kInterleaved ? kChunksPerRow : kHalfChunks;
    constexpr int kWords = kChunkBytes / 4;   // 32-bit words (two elements each) per chunk
    const int units = min(valid, ROWS) * kUnitsPerRow;
    for (int u = tid; u < units; u += kThreads) {
        const int r = u / kUnitsPerRow;
        const int c = u % kUnitsPerRow;
        const int pos = pos0 + r;
        if constexpr (variant::kInterleaved) {
            const u32 a = tile + chunk_offset(r, c);
            u32 w[kWords];
            float inv[kWords], cs[kWords], sn[kWords];
#pragma unroll
            for (int e = 0; e < kWords; ++e) inv[e] = rope.inv_freq(c * kWords + e);
            rope.cos_sin<kWords>(pos, c * kWords, inv, cs, sn);
            ap::ld_shared_v4(a, w);
#pragma unroll
            for (int e = 0; e < kWords; ++e) {
                float x1, x2;
                variant::unpack2<kBF16>(w[e], x1, x2);
                variant::rotate(x1, x2, cs[e], sn[e]);
                w[e] = ap::pack_half2<kDtype>(x1, x2);
            }
            ap::st_shared_v4(a, w);
        } else {
            const u32 a1 = tile + chunk_offset(r, c);
            const u32 a2 = tile + chunk_offset(r, c + kHalfChunks);
            u32 w1[kWords], w2[kWords];
            float inv[kChunkElems], cs[kChunkElems], sn[kChunkElems];
#pragma unroll
            for (int e = 0; e < kChunkElems; ++e) inv[e] = rope.inv_freq(c * kChunkElems + e);
            rope.cos_sin<kChunkElems>(pos, c * kChunkElems, inv, cs, sn);
            ap::ld_shared_v4(a1, w1);
            ap::ld_shared_v4(a2, w2);
#pragma unroll
            for (int e = 0; e < kWords; ++e) {
                float x1[2], x2[2];
                variant::unpack2<kBF16>(w1[e], x1[0], x1[1]);
                variant::unpack2<kBF16>(w2[e], x2[0], x2[1]);
#pragma unroll
                for (int h = 0; h < 2; ++h) variant::rotate(x1[h], x2[h], cs[2 * e + h], sn[2 * e + h]);
                w1[e] = ap::pack_half2<kDtype>(x1[0], x1[1]);
                w2[e] = ap::pack_half2<kDtype>(x2[0], x2[1]);
            }
            ap::st_shared_v4(a1, w1);
            ap::st_shared_v4(a2, w2);
        }
    }
}

// Online softmax of one tile: updates the running max (unscaled) and the per-lane
// partial row sums, rescales O, and turns S into P = 2^(S*scale_log2 - max*scale_log2).
// NaN / inf (policy in python/attnproto/ref.py, module doc): the max is NaN-propagating
// (ap::fmax_nan, ap::quad_max), so one NaN score makes the row max NaN, and with it alpha,
// P, the row sum and O, for the rest of the loop; -inf scores (masked or from inf inputs)
// give P = 0 exactly.
__device__ __forceinline__ void online_softmax(float (&s)[kMTiles][kSTiles][kAccPerTile],
                                               float (&row_max)[kMTiles][2], float (&row_sum)[kMTiles][2],
                                               float (&o)[kMTiles][kOTiles][kAccPerTile], float scale_log2) {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = row_max[m][h];
#pragma unroll
            for (int n = 0; n < kSTiles; ++n) mx = ap::fmax_nan(mx, ap::fmax_nan(s[m][n][2 * h], s[m][n][2 * h + 1]));
            mx = ap::quad_max(mx);
            // A row that has seen no key yet keeps max -inf; offset by 0 so that
            // exp2(-inf - offset) stays 0 instead of NaN. (A NaN max fails the test and
            // stays NaN.)
            const float mx_scaled = mx == ap::neg_inf() ? 0.0f : mx * scale_log2;
            const float alpha = ap::exp2_approx(row_max[m][h] * scale_log2 - mx_scaled);
            row_max[m][h] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pe = ap::exp2_approx(fmaf(s[m][n][2 * h + e], scale_log2, -mx_scaled));
                    s[m][n][2 * h + e] = pe;
                    sum += pe;
                }
            }
            row_sum[m][h] = fmaf(row_sum[m][h], alpha, sum);
#pragma unroll
            for (int d = 0; d < kOTiles; ++d) {
                o[m][d][2 * h] *= alpha;
                o[m][d][2 * h + 1] *= alpha;
            }
        }
    }
}

// O += P V for one V tile; P (in s) is rounded to 16 bits in registers.
__device__ __forceinline__ void accumulate_pv(float (&o)[kMTiles][kOTiles][kAccPerTile],
                                              const float (&s)[kMTiles][kSTiles][kAccPerTile],
                                              u32 v_lanes) {
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
            ap::ldmatrix_x4_trans(b, ldm_addr(v_lanes, kk * kMmaK, dd));
#pragma unroll
            for (int m = 0; m < kMTiles; ++m) {
                ap::mma_m16n8k16<kDtype>(o[m][2 * dd], a[m], b[0], b[1]);
                ap::mma_m16n8k16<kDtype>(o[m][2 * dd + 1], a[m], b[2], b[3]);
            }
        }
    }
}

// ------------------------------------------------------------------ stage policy
// The per-tile stages as include/fa_mma_kernel_body.cuh calls them (FA_MMA_MASK_IN_SCORE 0):
// score (S = Q K^T), mask (only for tiles crossing the diagonal, the key tail or a window edge), softmax
// (online softmax, O rescale, S -> P) and accumulate (O += P V). InlineStages force-inlines
// them: the specialised production kernel.
struct InlineStages {
    __device__ __forceinline__ void score(float (&s)[kMTiles][kSTiles][kAccPerTile],
                                          const u32 (&q_frag)[kQInRegs ? kMTiles : 1][kQInRegs ? kQKSteps : 1][4],
                                          u32 q_lanes, u32 k_lanes) const {
        compute_scores(s, q_frag, q_lanes, k_lanes);
    }
    __device__ __forceinline__ void mask(float (&s)[kMTiles][kSTiles][kAccPerTile], int row0, int col0, int seq_kv,
                                         int causal_offset, int lane, int window) const {
        apply_mask(s, row0, col0, seq_kv, causal_offset, lane, window);
    }
    __device__ __forceinline__ void softmax(float (&s)[kMTiles][kSTiles][kAccPerTile],
                                            float (&row_max)[kMTiles][2], float (&row_sum)[kMTiles][2],
                                            float (&o)[kMTiles][kOTiles][kAccPerTile], float scale_log2) const {
        online_softmax(s, row_max, row_sum, o, scale_log2);
    }
    __device__ __forceinline__ void accumulate(float (&o)[kMTiles][kOTiles][kAccPerTile],
                                               const float (&s)[kMTiles][kSTiles][kAccPerTile],
                                               u32 v_lanes) const {
        accumulate_pv(o, s, v_lanes);
    }
};

}  // namespace fa_mma
