// flash_fwd_mma_salted.cu — compile-cost studies only (Prototype 4).
//
// The whole flash_fwd_mma translation unit plus a one-line kernel that stores
// VARIANT_SALT. Every salt therefore yields distinct PTX and SASS, so no cache
// keyed on the generated code (a ptxas or driver compute cache on the machine)
// can serve a "cold" compile from an earlier one. Never launched as attention.
#include "cuda/flash_fwd_mma.cu"

#ifndef VARIANT_SALT
#error "VARIANT_SALT must be defined (a distinct integer per measured compile)"
#endif

extern "C" __global__ void flash_fwd_mma_salted(int* salt_out) { *salt_out = VARIANT_SALT; }
