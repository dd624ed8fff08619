// stitch_score.cu — Prototype 2, STITCH_MODE 3: the score stage of include/stitch.cuh in its
// own translation unit. Compiled to LTO-IR (-dlto -rdc=true) with the same named constants as
// stitch_attn.cu and linked with it by nvJitLink at load time; it has no kernel entry.
#include "cuda/include/stitch.cuh"

extern "C" __device__ STITCH_SCORE_SIGNATURE { stitch::score_impl(q_row, k_tile, keys_valid, scale_log2, out); }
