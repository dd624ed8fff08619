// linear.cuh — device helpers shared by the chunked causal linear-attention
// kernels (linear_chunk_h.cu, linear_chunk_o.cu).
//
// Math (per (batch, head); scale s, per-head decay gamma in (0, 1], gamma = 1 is
// plain linear attention):
//     S_t = gamma * S_{t-1} + k_t^T v_t          (S_{-1} = 0, D x D, FP32)
//     o_t = s * q_t S_t = s * sum_{j<=t} gamma^(t-j) (q_t . k_j) v_j
// Chunked with chunk C, chunk c = tokens [cC, cC + C), local index i, and
// H_c = S_{cC-1} (the state before the chunk, H_0 = 0):
//     H_{c+1} = gamma^C H_c + sum_i gamma^(C-1-i) k_i^T v_i           (chunk_h)
//     o_i     = s * (gamma^(i+1) q_i H_c + sum_{j<=i} gamma^(i-j) (q_i . k_j) v_j)   (chunk_o)
//
// Tensor-core fragments (PTX ISA "Matrix fragments for mma.m16n8k16/.m16n8k8"),
// g = lane / 4, t = lane % 4:
//   16-bit (m16n8k16): A {a0,a1,a2,a3} = A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]
//                      B {b0,b1}       = B[2t..2t+1][g], B[2t+8..2t+9][g]
//   tf32  (m16n8k8):   A {a0,a1,a2,a3} = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]
//                      B {b0,b1}       = B[t][g], B[t+4][g]
//   C (both):          {c0,c1,c2,c3}   = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]
// For tf32 the kernels use a PERMUTED k order inside each 8-wide k step: MMA
// slot t holds logical k = 2t and slot t+4 holds k = 2t+1. A and B use the same
// permutation, so the product is unchanged, and then (a) the FP32 accumulator of
// one product is directly the A fragment of the next (c0 -> a0, c1 -> a2,
// c2 -> a1, c3 -> a3), exactly as for 16-bit types, and (b) row-major operands
// load as one 8-byte shared-memory access.
//
// Compiled by NVRTC without toolkit headers: raw integer types and inline PTX.
#ifndef ATTNPROTO_LINEAR_CUH
#define ATTNPROTO_LINEAR_CUH

#include "common/attn_params.h"

namespace lin {

typedef unsigned short     u16;
typedef unsigned int       u32;
typedef long long          i64;

// 8-byte pair of floats (no toolkit vector types under NVRTC).
struct alignas(8) f2 { float x, y; };

// DTYPE codes (shared with the host, python/attnproto/ops/linear.py).
constexpr int kF16  = 0;
constexpr int kBF16 = 1;
constexpr int kF32  = 2;

constexpr int kWarpSize = 32;
constexpr int kMmaM = 16;            // rows of one MMA tile
constexpr int kMmaN = 8;             // columns of one MMA tile
constexpr int kVecBytes = 16;        // cp.async / vector access width
// Row padding of shared tiles, in elements, so that fragment loads hit distinct
// banks. 16-bit: 8 elements (16 B) makes consecutive rows start 16 B apart
// modulo 128 B: ldmatrix's eight 16-byte rows fall in eight bank groups.
// FP32 tiles read row-major with 8-byte accesses (lane reads row g, column 2t)
// want a row stride of 8 mod 32 words; tiles read column-wise (lane reads row
// 2t, column g) want 4 mod 32 words.
constexpr int kPad16    = 8;
constexpr int kPad32Row = 8;
constexpr int kPad32Col = 4;

// Unroll factor of k-step loops. 16-bit: full (the loops have at most 16
// steps). FP32 (3xTF32): none: a fully unrolled loop lets ptxas hoist every
// hi/lo fragment and it runs out of registers (seen: 255 registers and spills
// at HEAD_DIM 128); one step at a time keeps it spill-free.
#define LIN_KK_UNROLL_16 16
#define LIN_KK_UNROLL_F32 1
// Unroll factor of the cp.async tile-copy loops (see load_tile_async).
constexpr int kLoadUnroll = 8;

template <int DT> struct Traits;
template <> struct Traits<kF16>  { typedef u16   elem; static constexpr int kstep = 16; static constexpr int kk_unroll = LIN_KK_UNROLL_16; };
template <> struct Traits<kBF16> { typedef u16   elem; static constexpr int kstep = 16; static constexpr int kk_unroll = LIN_KK_UNROLL_16; };
template <> struct Traits<kF32>  { typedef float elem; static constexpr int kstep = 8;  static constexpr int kk_unroll = LIN_KK_UNROLL_F32; };

template <int DT> __host__ __device__ constexpr int elem_bytes() { return DT == kF32 ? 4 : 2; }
template <int DT> __host__ __device__ constexpr int vec_elems() { return kVecBytes / elem_bytes<DT>(); }
// Padding for a tile whose fragments are read along rows (A of Q, B of K^T)...
template <int DT> __host__ __device__ constexpr int pad_row() { return DT == kF32 ? kPad32Row : kPad16; }
// ...and for one read down columns (A of K^T, B of V and of the state H).
template <int DT> __host__ __device__ constexpr int pad_col() { return DT == kF32 ? kPad32Col : kPad16; }

// ---------------------------------------------------------------- scalars
__device__ __forceinline__ float u32_as_float(u32 x) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(x));
    return f;
}

__device__ __forceinline__ u32 float_as_u32(float f) {
    u32 x;
    asm("mov.b32 %0, %1;" : "=r"(x) : "f"(f));
    return x;
}

// Two floats -> one 32-bit register of the 16-bit type, `lo` in the low half.
template <int DT> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<kF16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<kBF16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <int DT> __device__ __forceinline__ void unpack2(u32 x, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack2<kF16>(u32 x, float& lo, float& hi) {
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}\n"
        : "=f"(lo), "=f"(hi) : "r"(x));
}
template <> __device__ __forceinline__ void unpack2<kBF16>(u32 x, float& lo, float& hi) {
    lo = u32_as_float(x << 16);
    hi = u32_as_float(x & 0xffff0000u);
}

// FP32 -> tf32 operand (round to nearest, ties away: cvt.rna).
__device__ __forceinline__ u32 to_tf32(float f) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}

// ---------------------------------------------------------------- shared memory, cp.async
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{\n.reg .u64 a;\ncvta.to.shared.u64 a, %1;\ncvt.u32.u64 %0, a;\n}\n" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte global -> shared copy; when !valid nothing is read and zeros land.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    const u32 src_bytes = valid ? kVecBytes : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

// Copies rows [0, ROWS) x columns [0, COLS) of a row-major global tile (row
// stride `gstride` elements, columns contiguous) into shared memory (row stride
// LD elements) with 16-byte cp.async; rows >= rows_valid are zero-filled.
template <int DT, int ROWS, int COLS, int LD, int THREADS>
__device__ __forceinline__ void load_tile_async(typename Traits<DT>::elem* sdst,
                                                const typename Traits<DT>::elem* gsrc,
                                                i64 gstride, int rows_valid) {
    constexpr int VEC = vec_elems<DT>();
    static_assert(COLS % VEC == 0, "tile width must be a whole number of 16-byte vectors");
    static_assert((LD * elem_bytes<DT>()) % kVecBytes == 0, "shared row stride must keep 16-byte alignment");
    constexpr int VPR = COLS / VEC;
    constexpr int TOTAL = ROWS * VPR;
    const u32 sbase = smem_u32(sdst);
    // Partial unroll: enough independent copies in flight per thread without
    // ptxas precomputing every address of a 64-iteration loop into registers.
#pragma unroll kLoadUnroll
    for (int it = 0; it < (TOTAL + THREADS - 1) / THREADS; ++it) {
        const int idx = it * THREADS + (int)threadIdx.x;
        if (TOTAL % THREADS == 0 || idx < TOTAL) {
            const int r = idx / VPR;
            const int cv = (idx % VPR) * VEC;
            const bool ok = r < rows_valid;
            const typename Traits<DT>::elem* src = gsrc + (ok ? (i64)r * gstride : 0) + cv;
            cp_async16(sbase + (u32)((r * LD + cv) * elem_bytes<DT>()), src, ok);
        }
    }
}

// ---------------------------------------------------------------- ldmatrix (16-bit types)
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

// ---------------------------------------------------------------- MMA
template <int DT> __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]);
template <> __device__ __forceinline__ void mma<kF16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma<kBF16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma<kF32>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Operand fragments. For FP32 inputs every operand x is split into two tf32
// numbers, hi = tf32(x) and lo = tf32(x - hi), and a product is three MMAs
// (lo*hi + hi*lo + hi*hi; the lo*lo term is below FP32 rounding). This
// "3xTF32" keeps FP32 accuracy (relative error ~1e-6 instead of tf32's ~5e-4)
// at three times the tensor-core work, which the FP32 path affords: it is the
// correctness path (seed AC-4.2: atol 1e-4, rtol 1e-3), not the fast one.
// 16-bit types use `hi` only; `lo` is never touched and costs no registers.
template <int DT> struct FragA { u32 hi[4]; u32 lo[4]; };
// Two adjacent 8-column B tiles: hi[0..1] for columns n0.., hi[2..3] for n0 + 8...
template <int DT> struct FragB { u32 hi[4]; u32 lo[4]; };

__device__ __forceinline__ void split_tf32(float x, u32& hi, u32& lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - u32_as_float(hi));
}

// d += A * B(tile nt of the pair), nt in {0, 1}.
template <int DT>
__device__ __forceinline__ void mma_frag(float (&d)[4], const FragA<DT>& a, const FragB<DT>& b, int nt) {
    const u32 bh[2] = {b.hi[2 * nt], b.hi[2 * nt + 1]};
    if constexpr (DT == kF32) {
        const u32 bl[2] = {b.lo[2 * nt], b.lo[2 * nt + 1]};
        mma<kF32>(d, a.lo, bh);
        mma<kF32>(d, a.hi, bl);
        mma<kF32>(d, a.hi, bh);
    } else {
        mma<DT>(d, a.hi, bh);
    }
}

// ---------------------------------------------------------------- fragment loads
// Shared tiles are row-major with row stride LD elements. Four kinds of operand:
//   A row-major    A[m][k] = S[m0 + m][k0 + k]   (Q)
//   A col-major    A[m][k] = S[k0 + k][m0 + m]   (K^T in K^T V: S = K[token][dk])
//   B col-major    B[k][n] = S[n0 + n][k0 + k]   (K^T in Q K^T: S = K[token][d])
//   B row-major    B[k][n] = S[k0 + k][n0 + n]   (V in P V, H in Q H)
// B loads fetch two adjacent 8-column tiles at once.

template <int DT, int LD>
__device__ __forceinline__ void load_a_rowmajor(FragA<DT>& a, const typename Traits<DT>::elem* s, int m0, int k0) {
    const int lane = (int)threadIdx.x % kWarpSize;
    if constexpr (DT == kF32) {
        const int g = lane / 4, t = lane % 4;
        const f2 lo = *reinterpret_cast<const f2*>(s + (m0 + g) * LD + k0 + 2 * t);
        const f2 hi = *reinterpret_cast<const f2*>(s + (m0 + g + 8) * LD + k0 + 2 * t);
        split_tf32(lo.x, a.hi[0], a.lo[0]); split_tf32(lo.y, a.hi[2], a.lo[2]);
        split_tf32(hi.x, a.hi[1], a.lo[1]); split_tf32(hi.y, a.hi[3], a.lo[3]);
    } else {
        const int i = lane / 8, r = lane % 8;
        ldsm_x4(a.hi, smem_u32(s + (m0 + (i % 2) * 8 + r) * LD + k0 + (i / 2) * 8));
    }
}

// With SCALED, logical k = kk is multiplied by f[kk] (tokens weighted by a
// per-token factor; f points into shared memory) before the single rounding to
// the operand type.
template <int DT, int LD, bool SCALED>
__device__ __forceinline__ void load_a_colmajor(FragA<DT>& a, const typename Traits<DT>::elem* s, int m0, int k0,
                                                const float* f) {
    const int lane = (int)threadIdx.x % kWarpSize;
    const int g = lane / 4, t = lane % 4;
    if constexpr (DT == kF32) {
        const float* r0 = s + (k0 + 2 * t) * LD + m0 + g;
        const float f0 = SCALED ? f[2 * t] : 1.0f;
        const float f1 = SCALED ? f[2 * t + 1] : 1.0f;
        split_tf32(r0[0] * f0, a.hi[0], a.lo[0]);  split_tf32(r0[8] * f0, a.hi[1], a.lo[1]);
        split_tf32(r0[LD] * f1, a.hi[2], a.lo[2]); split_tf32(r0[LD + 8] * f1, a.hi[3], a.lo[3]);
    } else {
        const int i = lane / 8, r = lane % 8;
        ldsm_x4_trans(a.hi, smem_u32(s + (k0 + (i / 2) * 8 + r) * LD + m0 + (i % 2) * 8));
        if constexpr (SCALED) {
            // a0, a1: k = 2t, 2t+1; a2, a3: k = 2t+8, 2t+9 (low, high halves).
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int k = 2 * t + (q / 2) * 8;
                float lo, hi;
                unpack2<DT>(a.hi[q], lo, hi);
                a.hi[q] = pack2<DT>(lo * f[k], hi * f[k + 1]);
            }
        }
    }
}

template <int DT, int LD>
__device__ __forceinline__ void load_b_colmajor_x2(FragB<DT>& b, const typename Traits<DT>::elem* s, int k0, int n0) {
    const int lane = (int)threadIdx.x % kWarpSize;
    if constexpr (DT == kF32) {
        const int g = lane / 4, t = lane % 4;
        const f2 p = *reinterpret_cast<const f2*>(s + (n0 + g) * LD + k0 + 2 * t);
        const f2 q = *reinterpret_cast<const f2*>(s + (n0 + 8 + g) * LD + k0 + 2 * t);
        split_tf32(p.x, b.hi[0], b.lo[0]); split_tf32(p.y, b.hi[1], b.lo[1]);
        split_tf32(q.x, b.hi[2], b.lo[2]); split_tf32(q.y, b.hi[3], b.lo[3]);
    } else {
        const int i = lane / 8, r = lane % 8;
        ldsm_x4(b.hi, smem_u32(s + (n0 + (i / 2) * 8 + r) * LD + k0 + (i % 2) * 8));
    }
}

template <int DT, int LD>
__device__ __forceinline__ void load_b_rowmajor_x2(FragB<DT>& b, const typename Traits<DT>::elem* s, int k0, int n0) {
    const int lane = (int)threadIdx.x % kWarpSize;
    if constexpr (DT == kF32) {
        const int g = lane / 4, t = lane % 4;
        const float* r0 = s + (k0 + 2 * t) * LD + n0 + g;
        split_tf32(r0[0], b.hi[0], b.lo[0]); split_tf32(r0[LD], b.hi[1], b.lo[1]);
        split_tf32(r0[8], b.hi[2], b.lo[2]); split_tf32(r0[LD + 8], b.hi[3], b.lo[3]);
    } else {
        const int i = lane / 8, r = lane % 8;
        ldsm_x4_trans(b.hi, smem_u32(s + (k0 + (i % 2) * 8 + r) * LD + n0 + (i / 2) * 8));
    }
}

// FP32 accumulators -> an A fragment: columns 16j..16j+15 (two 8-column tiles
// c0, c1) for 16-bit types; one 8-column tile c0 for tf32 with the permuted k
// order (c1 unused).
template <int DT>
__device__ __forceinline__ void acc_to_a(FragA<DT>& a, const float (&c0)[4], const float (&c1)[4]) {
    if constexpr (DT == kF32) {
        split_tf32(c0[0], a.hi[0], a.lo[0]); split_tf32(c0[1], a.hi[2], a.lo[2]);
        split_tf32(c0[2], a.hi[1], a.lo[1]); split_tf32(c0[3], a.hi[3], a.lo[3]);
    } else {
        a.hi[0] = pack2<DT>(c0[0], c0[1]); a.hi[1] = pack2<DT>(c0[2], c0[3]);
        a.hi[2] = pack2<DT>(c1[0], c1[1]); a.hi[3] = pack2<DT>(c1[2], c1[3]);
    }
}

// Stores the pair (x, y) at `dst` in the element type (8 bytes FP32, 4 bytes 16-bit).
template <int DT> __device__ __forceinline__ void store_pair(typename Traits<DT>::elem* dst, float x, float y) {
    if constexpr (DT == kF32) {
        f2 v; v.x = x; v.y = y;
        *reinterpret_cast<f2*>(dst) = v;
    } else {
        *reinterpret_cast<u32*>(dst) = pack2<DT>(x, y);
    }
}

// One 16-byte vector (no toolkit vector types under NVRTC).
struct alignas(16) vec16 { u32 x, y, z, w; };

// Epilogue of a warp that owns 16 output rows: its FP32 accumulator tiles acc[j] (m16n8
// C layout, 8 columns each, COLS in all) times `scale`, rounded to the element type,
// staged in `stage` (16 rows of row stride LD elements that only this warp touches) and
// written to rows [row0, row0 + 16) of the row-major global matrix `dst` (row stride
// `row_stride` elements) with 16-byte stores; rows >= n are not written.
template <int DT, int COLS, int LD>
__device__ __forceinline__ void store_warp_rows(typename Traits<DT>::elem* stage, const float (&acc)[COLS / kMmaN][4],
                                                float scale, typename Traits<DT>::elem* dst, i64 row_stride,
                                                int row0, int n) {
    typedef typename Traits<DT>::elem elem;
    const int lane = (int)threadIdx.x % kWarpSize;
    const int g = lane / 4, t4 = lane % 4;
    __syncwarp();
#pragma unroll
    for (int j = 0; j < COLS / kMmaN; ++j) {
        const int col = j * kMmaN + 2 * t4;
        store_pair<DT>(stage + g * LD + col, acc[j][0] * scale, acc[j][1] * scale);
        store_pair<DT>(stage + (g + 8) * LD + col, acc[j][2] * scale, acc[j][3] * scale);
    }
    __syncwarp();
    constexpr int kVec = vec_elems<DT>();
    constexpr int kVecPerRow = COLS / kVec;
#pragma unroll
    for (int idx = lane; idx < kMmaM * kVecPerRow; idx += kWarpSize) {
        const int r = idx / kVecPerRow;
        const int cv = (idx % kVecPerRow) * kVec;
        const int row = row0 + r;
        if (row < n) {
            *reinterpret_cast<vec16*>(dst + (i64)row * row_stride + cv) =
                *reinterpret_cast<const vec16*>(stage + r * LD + cv);
        }
    }
}

}  // namespace lin

#endif  // ATTNPROTO_LINEAR_CUH
