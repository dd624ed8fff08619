// stitch.cuh — the Prototype 2 ("function stitching") attention inner loop, split into
// three stages so that the same arithmetic can be dispatched four ways (STITCH_MODE):
//
//   0  monolithic: the stages are force-inlined into the kernel (the specialised baseline)
//   1  separate __noinline__ device functions in the kernel's translation unit
//   2  a device function-pointer table in global memory, row chosen by a kernel argument
//   3  stages in their own translation units (stitch_score.cu, stitch_softmax.cu,
//      stitch_accumulate.cu), compiled to LTO-IR and linked at load time with nvJitLink
//
// The kernel is a SIMT Flash Attention forward (non-causal, GQA through AttentionParams):
// one warp per query row, CTA = WARPS rows sharing each K/V tile of BLOCK_C keys in shared
// memory. Per tile the warp calls, in order,
//   stitch_score            s_i = (q . k_j) * scale * log2(e)   lane owns keys j = lane + 32 i
//   stitch_softmax_update   running max m, sum l, p_i = 2^(s_i - m), returns the O rescale
//   stitch_accumulate       o = o * rescale + sum_j p_j v_j      lane owns dims 2(lane + 32 i) + {0,1}
// Every multiply-add is an explicit __fmaf_rn / __fmul_rn / __fadd_rn and exp2/log2 are the
// MUFU instructions, so no mode can contract or reassociate differently: all four modes
// must produce bit-identical O and LSE.
//
// Inputs FP16/BF16 (DTYPE 0/1), outputs O float32 [B, Hq, Nq, D] and LSE float32 (natural
// log), strides from AttentionParams. Launch: grid (ceil(Nq / WARPS), Hq, B), block WARPS*32,
// no dynamic shared memory. Arguments: (p, q, k, v, o, lse, table_row).
#ifndef ATTNPROTO_CUDA_STITCH_CUH
#define ATTNPROTO_CUDA_STITCH_CUH

#include "common/attn_params.h"
#include "cuda/include/common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef BLOCK_C
#error "BLOCK_C must be defined"
#endif
#ifndef WARPS
#error "WARPS must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined"
#endif

namespace stitch {

using ap::u16;
using ap::u32;

constexpr int kHeadDim = HEAD_DIM;
constexpr int kBlockC = BLOCK_C;
constexpr int kWarps = WARPS;
constexpr int kDtype = DTYPE;
constexpr int kThreads = kWarps * ap::kWarpSize;

// Lane l owns keys l + 32 i of a tile and head-dim pairs (2 (l + 32 i), 2 (l + 32 i) + 1).
constexpr int kKeysPerLane = kBlockC / ap::kWarpSize;
constexpr int kPairsPerLane = kHeadDim / (2 * ap::kWarpSize);
constexpr int kDimsPerLane = 2 * kPairsPerLane;
// K rows are padded by one 32-bit word: lanes reading row `lane` at the same column then hit
// 32 different banks (row stride HEAD_DIM/2 + 1 words is odd).
constexpr int kKRowWords = kHeadDim / 2 + 1;
constexpr int kVRowWords = kHeadDim / 2;
constexpr int kSmemBytes = (kBlockC * (kKRowWords + kVRowWords) + kWarps * kHeadDim) * 4;
// Static shared memory is limited to 48 KiB per block without the dynamic opt-in.
constexpr int kStaticSmemLimit = 48 * 1024;
constexpr int kMaxWarps = 32;
// Rows of the function-pointer table of mode 2.
constexpr int kTableRows = 1;

static_assert(kDtype == ap::kDtypeF16 || kDtype == ap::kDtypeBF16, "DTYPE must be 0 (float16) or 1 (bfloat16)");
static_assert(kHeadDim > 0 && kHeadDim % (2 * ap::kWarpSize) == 0,
              "HEAD_DIM must be a positive multiple of 64 (each lane owns whole pairs of dims)");
static_assert(kBlockC > 0 && kBlockC % ap::kWarpSize == 0, "BLOCK_C must be a positive multiple of 32 (keys per lane)");
static_assert(kWarps >= 1 && kWarps <= kMaxWarps, "WARPS must be in [1, 32]");
static_assert(kSmemBytes <= kStaticSmemLimit,
              "shared memory (BLOCK_C x HEAD_DIM K and V tiles + WARPS query rows) exceeds 48 KiB of static shared memory");

// ------------------------------------------------------------------ 16-bit -> float
__device__ __forceinline__ void unpack2(u32 w, float& lo, float& hi) {
    if constexpr (kDtype == ap::kDtypeF16) {
        asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
            : "=f"(lo), "=f"(hi) : "r"(w));
    } else {
        lo = __int_as_float(int(w << 16));
        hi = __int_as_float(int(w & 0xffff0000u));
    }
}

// ------------------------------------------------------------------ stage state
struct Scores { float s[kKeysPerLane]; };   // scores, then probabilities, of the lane's keys
struct RowState { float m; float l; };      // running max (log2 domain) and sum of the row
struct Acc { float o[kDimsPerLane]; };      // the lane's unnormalised output dims

// ------------------------------------------------------------------ stage bodies
// s_i = (q . k_{lane + 32 i}) * scale_log2; keys >= keys_valid get -inf.
__device__ __forceinline__ void score_impl(const float* q_row, const u32* k_tile, int keys_valid, float scale_log2,
                                           Scores* out) {
    const int lane = threadIdx.x % ap::kWarpSize;
#pragma unroll
    for (int i = 0; i < kKeysPerLane; ++i) {
        const int j = lane + i * ap::kWarpSize;
        const u32* krow = k_tile + j * kKRowWords;
        float acc = 0.0f;
#pragma unroll 8
        for (int w = 0; w < kHeadDim / 2; ++w) {
            float k0, k1;
            unpack2(krow[w], k0, k1);
            acc = __fmaf_rn(q_row[2 * w], k0, acc);
            acc = __fmaf_rn(q_row[2 * w + 1], k1, acc);
        }
        out->s[i] = j < keys_valid ? __fmul_rn(acc, scale_log2) : ap::neg_inf();
    }
}

// Online softmax over one tile: updates (m, l), turns scores into 2^(s - m_new) and returns
// the factor 2^(m_old - m_new) by which the accumulator must be rescaled.
__device__ __forceinline__ float softmax_update_impl(Scores* sc, RowState* st) {
    float tile_max = ap::neg_inf();
#pragma unroll
    for (int i = 0; i < kKeysPerLane; ++i) tile_max = fmaxf(tile_max, sc->s[i]);
    tile_max = ap::warp_max(tile_max);
    const float m_new = fmaxf(st->m, tile_max);
    const float rescale = ap::exp2_approx(__fsub_rn(st->m, m_new));  // m_old = -inf: 2^-inf = 0
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kKeysPerLane; ++i) {
        sc->s[i] = ap::exp2_approx(__fsub_rn(sc->s[i], m_new));
        sum = __fadd_rn(sum, sc->s[i]);
    }
    sum = ap::warp_sum(sum);
    st->l = __fmaf_rn(st->l, rescale, sum);
    st->m = m_new;
    return rescale;
}

// o = o * rescale + sum_j p_j v_j over the tile's valid keys, in key order.
__device__ __forceinline__ void accumulate_impl(const Scores* p, const u32* v_tile, int keys_valid, float rescale,
                                                Acc* acc) {
    const int lane = threadIdx.x % ap::kWarpSize;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) acc->o[d] = __fmul_rn(acc->o[d], rescale);
#pragma unroll
    for (int i = 0; i < kKeysPerLane; ++i) {
#pragma unroll 4
        for (int src = 0; src < ap::kWarpSize; ++src) {
            const int j = src + i * ap::kWarpSize;
            const float pj = __shfl_sync(0xffffffffu, p->s[i], src);
            if (j >= keys_valid) break;  // uniform across the warp
            const u32* vrow = v_tile + j * kVRowWords;
#pragma unroll
            for (int c = 0; c < kPairsPerLane; ++c) {
                float v0, v1;
                unpack2(vrow[lane + c * ap::kWarpSize], v0, v1);
                acc->o[2 * c] = __fmaf_rn(pj, v0, acc->o[2 * c]);
                acc->o[2 * c + 1] = __fmaf_rn(pj, v1, acc->o[2 * c + 1]);
            }
        }
    }
}

}  // namespace stitch

// The three stages as functions with external linkage (modes 1-3 call these; mode 3 defines
// each in its own translation unit).
#define STITCH_SCORE_SIGNATURE \
    void stitch_score(const float* q_row, const ap::u32* k_tile, int keys_valid, float scale_log2, stitch::Scores* out)
#define STITCH_SOFTMAX_SIGNATURE float stitch_softmax_update(stitch::Scores* sc, stitch::RowState* st)
#define STITCH_ACCUMULATE_SIGNATURE \
    void stitch_accumulate(const stitch::Scores* p, const ap::u32* v_tile, int keys_valid, float rescale, stitch::Acc* acc)

#endif  // ATTNPROTO_CUDA_STITCH_CUH
