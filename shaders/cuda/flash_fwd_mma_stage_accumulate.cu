// flash_fwd_mma_stage_accumulate.cu — Prototype 2, STITCH_MODE 3: the accumulate stage of
// flash_fwd_mma_stitch (include/fa_mma_stitch.cuh) in its own translation unit. Compiled to
// LTO-IR (-dlto -rdc=true) with the same named constants as the kernel and linked with it by
// nvJitLink at load time; it has no kernel entry.
#include "cuda/include/fa_mma_stitch.cuh"

extern "C" __device__ void fa_mma_stage_accumulate(FA_MMA_STAGE_ACCUMULATE_PARAMS) {
    fa_stitch::accumulate_stage(FA_MMA_STAGE_ACCUMULATE_ARGS);
}
