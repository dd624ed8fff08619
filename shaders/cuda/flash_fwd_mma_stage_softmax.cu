// flash_fwd_mma_stage_softmax.cu — Prototype 2, STITCH_MODE 3: the softmax stage of
// flash_fwd_mma_stitch (include/fa_mma_stitch.cuh) in its own translation unit. Compiled to
// LTO-IR (-dlto -rdc=true) with the same named constants as the kernel and linked with it by
// nvJitLink at load time; it has no kernel entry.
#include "cuda/include/fa_mma_stitch.cuh"

extern "C" __device__ void fa_mma_stage_softmax(FA_MMA_STAGE_SOFTMAX_PARAMS) {
    fa_stitch::softmax_stage(FA_MMA_STAGE_SOFTMAX_ARGS);
}
