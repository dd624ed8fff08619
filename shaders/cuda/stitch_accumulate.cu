// stitch_accumulate.cu — Prototype 2, STITCH_MODE 3: the accumulate stage of include/stitch.cuh in its
// own translation unit. Compiled to LTO-IR (-dlto -rdc=true) with the same named constants as
// stitch_attn.cu and linked with it by nvJitLink at load time; it has no kernel entry.
#include "cuda/include/stitch.cuh"

extern "C" __device__ STITCH_ACCUMULATE_SIGNATURE { stitch::accumulate_impl(p, v_tile, keys_valid, rescale, acc); }
