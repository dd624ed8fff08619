// fa_mma_stitch.cuh — Prototype 2: the three per-tile stages of the mma.sync Flash Attention
// forward (include/fa_mma.cuh) as functions with external linkage, and the stage policy that
// dispatches them per STITCH_MODE:
//
//   0  inline    fa_mma::InlineStages: the production kernel's code (flash_fwd_mma)
//   1  noinline  __noinline__ definitions in the kernel's translation unit, direct calls
//   2  table     a function-pointer table in writable global memory, row chosen by a kernel
//                argument: every stage call is an indirect call
//   3  linked    extern declarations only; the definitions come from flash_fwd_mma_stage_score.cu,
//                flash_fwd_mma_stage_softmax.cu and flash_fwd_mma_stage_accumulate.cu, each
//                compiled to LTO-IR with the same named constants and linked at load time by
//                nvJitLink (the CUDA counterpart of Metal's stitchable functions)
//
// Stages (one call each per K/V tile the warp sees):
//   fa_mma_stage_score       S = Q K^T, then the causal / key-tail mask when the tile needs it
//   fa_mma_stage_softmax     online softmax: running max and sum, O rescale, S -> P
//   fa_mma_stage_accumulate  O += P V
// They take POINTERS to the kernel's register arrays (S, O, Q fragments, row max and sum).
// A pointer to a register array forces that array into local memory around every call that
// is not inlined (stores before, loads after, and the callee works on local memory): that
// traffic, the call ABI and the lost scheduling across the call are exactly the cost that
// Prototype 2 measures. The arithmetic of every stage is the same code as in mode 0, NaN / inf
// handling included (the NaN-propagating row max of fa_mma::online_softmax and the epilogue of
// include/fa_mma_kernel_body.cuh: policy in python/attnproto/ref.py), so every mode stays bit
// for bit equal to flash_fwd_mma, on non-finite inputs too.
#ifndef ATTNPROTO_CUDA_FA_MMA_STITCH_CUH
#define ATTNPROTO_CUDA_FA_MMA_STITCH_CUH

#include "cuda/include/fa_mma.cuh"

#ifndef STITCH_MODE
#error "STITCH_MODE must be defined"
#endif

namespace fa_stitch {

using ap::u32;

constexpr int kModeInline = 0;
constexpr int kModeNoinline = 1;
constexpr int kModeTable = 2;
constexpr int kModeLinked = 3;
constexpr int kMode = STITCH_MODE;
// Prototype 2 measures the dispatch of the base kernel's stages: their ABI carries no variant
// state (the host passes the base variant's constants, attnproto.ops.stitch).
static_assert(!variant::kRope && !variant::kAlibi && !variant::kWindow && !variant::kSoftcap,
              "flash_fwd_mma_stitch takes the base variant only (ROPE, ALIBI, WINDOW, SOFTCAP all 0)");
static_assert(kMode == kModeInline || kMode == kModeNoinline || kMode == kModeTable || kMode == kModeLinked,
              "STITCH_MODE must be 0 (inline), 1 (noinline), 2 (table) or 3 (linked)");
// Rows of the mode-2 function-pointer table (row 0 holds the stages above).
constexpr int kTableRows = 1;

// The register arrays of the kernel body, by type.
using Scores = float[fa_mma::kMTiles][fa_mma::kSTiles][fa_mma::kAccPerTile];
using Output = float[fa_mma::kMTiles][fa_mma::kOTiles][fa_mma::kAccPerTile];
using RowStat = float[fa_mma::kMTiles][2];
using QFrag = u32[fa_mma::kQInRegs ? fa_mma::kMTiles : 1][fa_mma::kQInRegs ? fa_mma::kQKSteps : 1][4];

}  // namespace fa_stitch

// Parameter and argument lists of the three stages (one definition for declarations,
// definitions in every mode, the table's pointer types and the calls).
#define FA_MMA_STAGE_SCORE_PARAMS                                                                    \
    float *s, const ap::u32 *q_frag, ap::u32 q_lanes, ap::u32 k_lanes, int row0, int col0, int seq_kv, \
        int causal_offset, int lane, bool needs_mask
#define FA_MMA_STAGE_SCORE_ARGS s, q_frag, q_lanes, k_lanes, row0, col0, seq_kv, causal_offset, lane, needs_mask
#define FA_MMA_STAGE_SOFTMAX_PARAMS float *s, float *row_max, float *row_sum, float *o, float scale_log2
#define FA_MMA_STAGE_SOFTMAX_ARGS s, row_max, row_sum, o, scale_log2
#define FA_MMA_STAGE_ACCUMULATE_PARAMS float *o, const float *s, ap::u32 v_lanes
#define FA_MMA_STAGE_ACCUMULATE_ARGS o, s, v_lanes

extern "C" __device__ void fa_mma_stage_score(FA_MMA_STAGE_SCORE_PARAMS);
extern "C" __device__ void fa_mma_stage_softmax(FA_MMA_STAGE_SOFTMAX_PARAMS);
extern "C" __device__ void fa_mma_stage_accumulate(FA_MMA_STAGE_ACCUMULATE_PARAMS);

namespace fa_stitch {

// ------------------------------------------------------------------ stage bodies
// What every definition of the extern stages runs: the fa_mma stage functions on the
// arrays behind the pointers (the same code as mode 0, so the same arithmetic).
__device__ __forceinline__ void score_stage(FA_MMA_STAGE_SCORE_PARAMS) {
    Scores& sa = *reinterpret_cast<Scores*>(s);
    fa_mma::compute_scores(sa, *reinterpret_cast<const QFrag*>(q_frag), q_lanes, k_lanes);
    constexpr int kNoWindow = 0;  // apply_mask's window (unused: the base variant has none)
    if (needs_mask) fa_mma::apply_mask(sa, row0, col0, seq_kv, causal_offset, lane, kNoWindow);
}

__device__ __forceinline__ void softmax_stage(FA_MMA_STAGE_SOFTMAX_PARAMS) {
    fa_mma::online_softmax(*reinterpret_cast<Scores*>(s), *reinterpret_cast<RowStat*>(row_max),
                           *reinterpret_cast<RowStat*>(row_sum), *reinterpret_cast<Output*>(o), scale_log2);
}

__device__ __forceinline__ void accumulate_stage(FA_MMA_STAGE_ACCUMULATE_PARAMS) {
    fa_mma::accumulate_pv(*reinterpret_cast<Output*>(o), *reinterpret_cast<const Scores*>(s), v_lanes);
}

// ------------------------------------------------------------------ dispatching policy
typedef void (*ScoreFn)(FA_MMA_STAGE_SCORE_PARAMS);
typedef void (*SoftmaxFn)(FA_MMA_STAGE_SOFTMAX_PARAMS);
typedef void (*AccumulateFn)(FA_MMA_STAGE_ACCUMULATE_PARAMS);
struct StageTable {
    ScoreFn score;
    SoftmaxFn softmax;
    AccumulateFn accumulate;
};

// The stage policy of modes 1-3 (include/fa_mma_kernel_body.cuh with FA_MMA_MASK_IN_SCORE 1):
// one call per stage, through `table` in mode 2, direct to the extern functions otherwise.
struct CallStages {
    StageTable table;  // mode 2 only (its row of the global table, read once per thread)

    __device__ __forceinline__ void score(Scores& s, const QFrag& q_frag, u32 q_lanes, u32 k_lanes, int row0, int col0,
                                          int seq_kv, int causal_offset, int lane, bool needs_mask) const {
        if constexpr (kMode == kModeTable) {
            table.score(&s[0][0][0], &q_frag[0][0][0], q_lanes, k_lanes, row0, col0, seq_kv, causal_offset, lane,
                        needs_mask);
        } else {
            fa_mma_stage_score(&s[0][0][0], &q_frag[0][0][0], q_lanes, k_lanes, row0, col0, seq_kv, causal_offset,
                               lane, needs_mask);
        }
    }
    __device__ __forceinline__ void softmax(Scores& s, RowStat& row_max, RowStat& row_sum, Output& o,
                                            float scale_log2) const {
        if constexpr (kMode == kModeTable) {
            table.softmax(&s[0][0][0], &row_max[0][0], &row_sum[0][0], &o[0][0][0], scale_log2);
        } else {
            fa_mma_stage_softmax(&s[0][0][0], &row_max[0][0], &row_sum[0][0], &o[0][0][0], scale_log2);
        }
    }
    __device__ __forceinline__ void accumulate(Output& o, const Scores& s, u32 v_lanes) const {
        if constexpr (kMode == kModeTable) {
            table.accumulate(&o[0][0][0], &s[0][0][0], v_lanes);
        } else {
            fa_mma_stage_accumulate(&o[0][0][0], &s[0][0][0], v_lanes);
        }
    }
};

}  // namespace fa_stitch

#endif  // ATTNPROTO_CUDA_FA_MMA_STITCH_CUH
