// flash_fwd_mma_stitch.cu — Prototype 2: the Prototype 1 tensor-core kernel (flash_fwd_mma,
// include/fa_mma.cuh + include/fa_mma_kernel_body.cuh) with its per-tile score (+ mask),
// softmax and accumulate stages dispatched per STITCH_MODE (include/fa_mma_stitch.cuh):
// 0 inline (the code of flash_fwd_mma), 1 __noinline__, 2 device function-pointer table,
// 3 extern stages resolved by nvJitLink from separately compiled LTO-IR.
//
// Named constants: those of flash_fwd_mma (HEAD_DIM, BLOCK_R, BLOCK_C, WARPS, STAGES,
// CAUSAL, DTYPE; every legal combination there is legal here; the five variant constants, which
// must be the base variant, all 0: include/fa_mma_stitch.cuh) plus STITCH_MODE.
// Launch: exactly as flash_fwd_mma (grid, block, dynamic shared memory fa_mma::kSmemBytes).
// Arguments: (p, q, k, v, o, lse, table_row); table_row selects the row of the mode-2
// function table (0; out of range traps) and is ignored by the other modes.
//
// Mode 3 compiles only as relocatable LTO-IR: the stages are resolved by linking with
// flash_fwd_mma_stage_score.cu, flash_fwd_mma_stage_softmax.cu and
// flash_fwd_mma_stage_accumulate.cu (a plain cubin compile fails with unresolved externs).
#include "cuda/include/fa_mma_stitch.cuh"

#if STITCH_MODE == 1 || STITCH_MODE == 2
extern "C" __device__ __noinline__ void fa_mma_stage_score(FA_MMA_STAGE_SCORE_PARAMS) {
    fa_stitch::score_stage(FA_MMA_STAGE_SCORE_ARGS);
}
extern "C" __device__ __noinline__ void fa_mma_stage_softmax(FA_MMA_STAGE_SOFTMAX_PARAMS) {
    fa_stitch::softmax_stage(FA_MMA_STAGE_SOFTMAX_ARGS);
}
extern "C" __device__ __noinline__ void fa_mma_stage_accumulate(FA_MMA_STAGE_ACCUMULATE_PARAMS) {
    fa_stitch::accumulate_stage(FA_MMA_STAGE_ACCUMULATE_ARGS);
}
#endif

#if STITCH_MODE == 2
// Writable global memory (the host could patch it through cuModuleGetGlobal), so the compiler
// cannot resolve the pointers at compile time: every stage call stays indirect.
__device__ fa_stitch::StageTable g_fa_mma_stage_table[fa_stitch::kTableRows] = {
    {&fa_mma_stage_score, &fa_mma_stage_softmax, &fa_mma_stage_accumulate},
};
#endif

extern "C" __global__ void __launch_bounds__(fa_mma::kThreads, 1)
flash_fwd_mma_stitch(const AttentionParams p, const ap::u16* __restrict__ q, const ap::u16* __restrict__ k,
                     const ap::u16* __restrict__ v, ap::u16* __restrict__ o, float* __restrict__ lse,
                     int table_row) {
#if STITCH_MODE == 0
    (void)table_row;
    const fa_mma::InlineStages stages{};
#define FA_MMA_MASK_IN_SCORE 0
#elif STITCH_MODE == 2
    if (table_row < 0 || table_row >= fa_stitch::kTableRows) ap::trap();
    const fa_stitch::CallStages stages{g_fa_mma_stage_table[table_row]};
#define FA_MMA_MASK_IN_SCORE 1
#else
    (void)table_row;
    const fa_stitch::CallStages stages{};
#define FA_MMA_MASK_IN_SCORE 1
#endif
    const fa_mma::VariantBuffers variant_buffers{};  // the base variant reads none
#include "cuda/include/fa_mma_kernel_body.cuh"
#undef FA_MMA_MASK_IN_SCORE
}
