// stitch_multi_entry.cu — Prototype 4 ("compile only the needed kernel"): one translation unit
// holding MULTI_ENTRIES specialisations of flash_fwd_mma, the CAUSAL x DTYPE variants of the
// tiles given by the named constants (HEAD_DIM, BLOCK_R, BLOCK_C, WARPS, STAGES). Compared
// with compiling the four single-entry kernels one by one, it shows whether the front end
// (parsing the shared headers once) or ptxas (per entry) dominates NVRTC's cost.
//
// Each inclusion renames the kernel's namespace and entry point with macros, so the entries
// are flash_fwd_mma_nc_f16, flash_fwd_mma_nc_bf16, flash_fwd_mma_c_f16 and flash_fwd_mma_c_bf16.
// CAUSAL and DTYPE must not be passed as named constants: this file sets them.
#if defined(CAUSAL) || defined(DTYPE)
#error "stitch_multi_entry sets CAUSAL and DTYPE itself; do not pass them"
#endif

#define CAUSAL 0
#define DTYPE 0
#define fa_mma fa_mma_nc_f16
#define flash_fwd_mma flash_fwd_mma_nc_f16
#include "cuda/flash_fwd_mma.cu"
#undef fa_mma
#undef flash_fwd_mma
#undef DTYPE

#define DTYPE 1
#define fa_mma fa_mma_nc_bf16
#define flash_fwd_mma flash_fwd_mma_nc_bf16
#include "cuda/flash_fwd_mma.cu"
#undef fa_mma
#undef flash_fwd_mma
#undef DTYPE
#undef CAUSAL

#define CAUSAL 1
#define DTYPE 0
#define fa_mma fa_mma_c_f16
#define flash_fwd_mma flash_fwd_mma_c_f16
#include "cuda/flash_fwd_mma.cu"
#undef fa_mma
#undef flash_fwd_mma
#undef DTYPE

#define DTYPE 1
#define fa_mma fa_mma_c_bf16
#define flash_fwd_mma flash_fwd_mma_c_bf16
#include "cuda/flash_fwd_mma.cu"
#undef fa_mma
#undef flash_fwd_mma
#undef DTYPE
#undef CAUSAL

#ifdef VARIANT_SALT
// Compile-cost studies: a distinct salt gives distinct PTX (see flash_fwd_mma_salted.cu).
extern "C" __global__ void stitch_multi_entry_salt(int* salt_out) { *salt_out = VARIANT_SALT; }
#endif
