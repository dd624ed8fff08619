// rope_apply.cu — standalone RoPE (Prototype 7's comparison for the fused variants): out = RoPE(x),
// in place (out == x) or out of place.
//
// x, out [B, H, N, D] (16-bit, D contiguous; strides p.q_stride / p.o_stride = {b, h, token});
// row n of every head sits at position p.rope_offset + n. ROPE = 1 rotate-half (pair i with
// i + D/2), 2 interleaved (pair 2i with 2i + 1); ROPE_TABLE = 1 reads cos/sin from float32
// tables [p.rope_table_len, D/2], 0 computes them in float32 (variants.cuh, variant::Rope:
// the same cos/sin code as the fused kernels).
//
// Launch: grid (ceil(N * kUnitsPerRow / kThreads), H, B), block kThreads; a thread rotates one
// unit: a 16-byte chunk and its partner chunk D/2 further (rotate-half) or one 16-byte chunk
// (interleaved). Each thread reads what it writes, so in place needs no barrier.
// Arguments: (p, x, out, rope_cos, rope_sin). Constants: HEAD_DIM, ROPE, ROPE_TABLE, DTYPE.
#include "common/attn_params.h"
#include "cuda/include/common.cuh"

// The standalone kernel rotates only: no scores, so the score and mask variants are off.
#define ALIBI 0
#define WINDOW 0
#define SOFTCAP 0
#include "cuda/include/variants.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined (0 = float16, 1 = bfloat16)"
#endif

namespace rope_kernel {

constexpr bool kBF16 = DTYPE == ap::kDtypeBF16;
constexpr int kThreads = 128;
constexpr int kChunkElems = 8;                                   // 16 bytes of 16-bit elements
constexpr int kChunksPerRow = HEAD_DIM / kChunkElems;
constexpr int kUnitsPerRow = variant::kInterleaved ? kChunksPerRow : kChunksPerRow / 2;

static_assert(variant::kRope, "the standalone RoPE kernel needs ROPE = 1 (rotate-half) or 2 (interleaved)");
static_assert(DTYPE == ap::kDtypeF16 || DTYPE == ap::kDtypeBF16, "DTYPE must be 0 (float16) or 1 (bfloat16)");
static_assert(HEAD_DIM % (2 * kChunkElems) == 0 && HEAD_DIM <= 512,
              "HEAD_DIM must be a multiple of 16 (rotate-half pairs whole 16-byte chunks) and at most 512");

__device__ __forceinline__ void load16(const ap::u16* p, ap::u32 (&w)[4]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
__device__ __forceinline__ void store16(ap::u16* p, const ap::u32 (&w)[4]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace rope_kernel

extern "C" __global__ void __launch_bounds__(rope_kernel::kThreads)
rope_apply(const AttentionParams p, const ap::u16* x, ap::u16* out, const float* __restrict__ rope_cos,
           const float* __restrict__ rope_sin) {
    using namespace rope_kernel;
    if (p.head_dim != HEAD_DIM || (variant::kRopeTable && (rope_cos == nullptr || rope_sin == nullptr))) ap::trap();
    const int unit = blockIdx.x * kThreads + threadIdx.x;
    const int row = unit / kUnitsPerRow;
    const int j = unit % kUnitsPerRow;
    if (row >= (int)p.seq_q) return;
    variant::Rope rope;
    rope.init(p, rope_cos, rope_sin);
    const int pos = rope.offset + row;
    if (!rope.in_range(pos)) return;  // the host checks rope_offset + N <= rope_table_len
    const long long xb = (long long)blockIdx.z * p.q_stride[0] + (long long)blockIdx.y * p.q_stride[1] +
                         (long long)row * p.q_stride[2];
    const long long ob = (long long)blockIdx.z * p.o_stride[0] + (long long)blockIdx.y * p.o_stride[1] +
                         (long long)row * p.o_stride[2];
    if constexpr (variant::kInterleaved) {
        constexpr int kPairs = kChunkElems / 2;
        float inv[kPairs], c[kPairs], s[kPairs];
#pragma unroll
        for (int q = 0; q < kPairs; ++q) inv[q] = rope.inv_freq(j * kPairs + q);
        rope.cos_sin<kPairs>(pos, j * kPairs, inv, c, s);
        ap::u32 w[4];
        load16(x + xb + j * kChunkElems, w);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x1, x2;
            variant::unpack2<kBF16>(w[e], x1, x2);
            variant::rotate(x1, x2, c[e], s[e]);
            w[e] = ap::pack_half2<DTYPE>(x1, x2);
        }
        store16(out + ob + j * kChunkElems, w);
    } else {
        constexpr int kHalf = HEAD_DIM / 2;
        float inv[kChunkElems], c[kChunkElems], s[kChunkElems];
#pragma unroll
        for (int q = 0; q < kChunkElems; ++q) inv[q] = rope.inv_freq(j * kChunkElems + q);
        rope.cos_sin<kChunkElems>(pos, j * kChunkElems, inv, c, s);
        ap::u32 w1[4], w2[4];
        load16(x + xb + j * kChunkElems, w1);
        load16(x + xb + kHalf + j * kChunkElems, w2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float a[2], b[2];
            variant::unpack2<kBF16>(w1[e], a[0], a[1]);
            variant::unpack2<kBF16>(w2[e], b[0], b[1]);
#pragma unroll
            for (int h = 0; h < 2; ++h) variant::rotate(a[h], b[h], c[2 * e + h], s[2 * e + h]);
            w1[e] = ap::pack_half2<DTYPE>(a[0], a[1]);
            w2[e] = ap::pack_half2<DTYPE>(b[0], b[1]);
        }
        store16(out + ob + j * kChunkElems, w1);
        store16(out + ob + kHalf + j * kChunkElems, w2);
    }
}
