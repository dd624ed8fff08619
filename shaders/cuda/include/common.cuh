// common.cuh — generic device helpers for attnproto CUDA kernels (sm_80+).
//
// NVRTC compiles these without any toolkit header, so 16-bit floats are raw
// 16-bit patterns (u16, packed in pairs as u32) and every conversion, matrix,
// copy and shuffle instruction is written as inline PTX.
//
// Contents:
//   types and constants    u16/u32/u64, kNegInf, kLog2e, kLn2
//   shared memory          smem_u32 (generic -> shared-window address), ld/st.shared (b32, v2, v4)
//   16-bit packing          pack_f16x2, pack_bf16x2, pack_half2<DTYPE>
//   tensor-core operands    ldmatrix_x4, ldmatrix_x4_trans
//   tensor-core math        mma_m16n8k16<DTYPE> (f32 accumulate, in place)
//   async copies            cp_async_16 (zero-fill when !valid), commit, wait
//   global stores           st_global_v4
//   math                    exp2_approx, log2_approx, rcp_approx (MUFU, ftz), fmax_nan, quiet_nan
//   warp reductions         shfl_xor, quad_max, quad_sum, warp_max, warp_sum (the max ones NaN-propagating)
//   control                 syncwarp, trap, dynamic_smem_size
#ifndef ATTNPROTO_CUDA_COMMON_CUH
#define ATTNPROTO_CUDA_COMMON_CUH

#if !defined(__CUDACC_RTC__) && !defined(__CUDACC__)
#error "common.cuh is CUDA device code"
#endif

namespace ap {

typedef unsigned short     u16;
typedef unsigned int       u32;
typedef unsigned long long u64;

// DTYPE codes of the kernels' named constant.
constexpr int kDtypeF16 = 0;
constexpr int kDtypeBF16 = 1;

constexpr int kWarpSize = 32;
// Lanes that share one row of an mma.sync m16n8 accumulator (a "quad").
constexpr int kQuadSize = 4;

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

// -inf without <math.h>: the IEEE-754 single bit pattern 0xff800000.
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// ------------------------------------------------------------------ shared memory
// 32-bit address of a generic pointer into the shared window (what ldmatrix,
// cp.async and ld/st.shared take).
__device__ __forceinline__ u32 smem_u32(const void* ptr) {
    u32 addr;
    asm volatile("{ .reg .u64 a64; cvta.to.shared.u64 a64, %1; cvt.u32.u64 %0, a64; }"
                 : "=r"(addr) : "l"(ptr));
    return addr;
}

__device__ __forceinline__ void st_shared_b32(u32 addr, u32 value) {
    asm volatile("st.shared.b32 [%0], %1;" :: "r"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ void ld_shared_v4(u32 addr, u32 (&r)[4]) {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

__device__ __forceinline__ void ld_shared_v2(u32 addr, u32 (&r)[2]) {
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr) : "memory");
}

__device__ __forceinline__ void st_shared_v2(u32 addr, const u32 (&r)[2]) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};" :: "r"(addr), "r"(r[0]), "r"(r[1]) : "memory");
}

__device__ __forceinline__ void st_shared_v4(u32 addr, const u32 (&r)[4]) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};"
                 :: "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// ------------------------------------------------------------------ 16-bit packing
// Round two floats to IEEE half (round to nearest even) and pack them: `lo` in
// bits 0..15, `hi` in bits 16..31 (the element order mma.sync expects).
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Same for bfloat16 (sm_80+).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <int kDt>
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    static_assert(kDt == kDtypeF16 || kDt == kDtypeBF16, "dtype code must be 0 (f16) or 1 (bf16)");
    if constexpr (kDt == kDtypeF16) {
        return pack_f16x2(lo, hi);
    } else {
        return pack_bf16x2(lo, hi);
    }
}

// ------------------------------------------------------------------ ldmatrix
// Four 8x8 16-bit matrices; lane l gives the address of row (l % 8) of matrix
// (l / 8); r[i] receives matrix i in the mma.sync fragment layout (thread t
// holds row t/4, columns 2(t%4), 2(t%4)+1).
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Same with each 8x8 matrix transposed on the way (thread t holds column t/4,
// rows 2(t%4), 2(t%4)+1): turns a row-major [k][n] tile into B fragments.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// ------------------------------------------------------------------ mma.sync
// d += A(16x16, row-major) * B(16x8, column-major), f32 accumulate.
// Fragments (g = lane/4, t = lane%4):
//   a[0] (g, 2t..2t+1)  a[1] (g+8, 2t..)  a[2] (g, 2t+8..)  a[3] (g+8, 2t+8..)
//   b0   (k 2t..2t+1, n g)                b1   (k 2t+8.., n g)
//   d[0..1] (g, 2t..2t+1)                 d[2..3] (g+8, 2t..2t+1)
template <int kDt>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    static_assert(kDt == kDtypeF16 || kDt == kDtypeBF16, "dtype code must be 0 (f16) or 1 (bf16)");
    if constexpr (kDt == kDtypeF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// ------------------------------------------------------------------ cp.async
// Bytes one cp.async moves here (the widest size; .cg needs exactly 16).
constexpr int kCpAsyncBytes = 16;

// Copy 16 bytes global -> shared, bypassing L1 (.cg). When !valid no global
// byte is read (src-size 0) and the 16 shared bytes are zero-filled; `gmem`
// must still be a mapped address, so pass the tensor base then.
__device__ __forceinline__ void cp_async_16(u32 smem_addr, const void* gmem, bool valid) {
    const int src_bytes = valid ? kCpAsyncBytes : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// ------------------------------------------------------------------ global stores
__device__ __forceinline__ void st_global_v4(void* gmem, const u32 (&r)[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                 :: "l"(gmem), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// ------------------------------------------------------------------ math
// 2^x with the MUFU unit (about 2 ulp); ex2(-inf) = +0, subnormal results flush to 0.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// log2(x) with the MUFU unit (absolute error ~2^-22 near 1); log2(0) = -inf.
__device__ __forceinline__ float log2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 1/x with the MUFU unit (about 1 ulp); no slow path for special values.
__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// max(a, b) that PROPAGATES NaN: NaN if either operand is NaN (PTX max.NaN.f32, sm_80+).
// fmaxf (max.f32) returns the other operand instead, so a row max built from it skips a
// NaN score and the row looks fine or all-masked. Same SASS instruction as fmaxf (FMNMX,
// with its .NAN modifier), so it costs nothing. Every row max / running max of the
// attention kernels uses it: the NaN / inf policy of python/attnproto/ref.py (module doc).
__device__ __forceinline__ float fmax_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// A quiet NaN without <math.h> (0x7fffffff, the canonical pattern the hardware produces).
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// ------------------------------------------------------------------ warp reductions
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
    float r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;"
                 : "=f"(r) : "f"(v), "r"(lane_mask));
    return r;
}

// Reductions over the 4 lanes of a quad (lanes 4q..4q+3): every lane gets the result.
// The max is NaN-propagating (fmax_nan): one lane's NaN makes the whole quad's max NaN.
__device__ __forceinline__ float quad_max(float v) {
    v = fmax_nan(v, shfl_xor(v, 1));
    return fmax_nan(v, shfl_xor(v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += shfl_xor(v, 1);
    return v + shfl_xor(v, 2);
}

// Reductions over the whole warp: every lane gets the result (the max NaN-propagating).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) v = fmax_nan(v, shfl_xor(v, mask));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) v += shfl_xor(v, mask);
    return v;
}

// Bytes of dynamic shared memory this launch got (the %dynamic_smem_size register): kernels
// whose host mirrors their layout formula refuse to run on a mismatch instead of corrupting memory.
__device__ __forceinline__ u32 dynamic_smem_size() {
    u32 r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

__device__ __forceinline__ void syncwarp() { asm volatile("bar.warp.sync 0xffffffff;" ::: "memory"); }

// Abort the kernel (the launch fails with an illegal-instruction error): for
// violated invariants that would otherwise produce silent garbage.
__device__ __forceinline__ void trap() { asm volatile("trap;"); }

}  // namespace ap

#endif  // ATTNPROTO_CUDA_COMMON_CUH
