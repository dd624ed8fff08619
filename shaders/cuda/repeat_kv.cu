// repeat_kv.cu — GQA materialised (Prototype 7's comparison for the fused head mapping):
// out[b, h, n, :] = x[b, h / group, n, :], what HF's repeat_kv builds before a kernel without GQA.
//
// x [B, Hkv, N, D], out [B, Hkv * group, N, D] (16-bit, D contiguous; strides p.k_stride of x,
// p.o_stride of out = {b, h, token}); p.num_heads = Hkv * group, p.num_kv_heads = Hkv,
// p.seq_q = N. Launch: grid (ceil(N * D / 8 / kThreads), Hkv * group, B), block kThreads; one
// 16-byte chunk per thread. Arguments: (p, x, out). Constants: HEAD_DIM.
#include "common/attn_params.h"
#include "cuda/include/common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif

namespace repeat_kv_kernel {
constexpr int kThreads = 128;
constexpr int kChunkElems = 8;  // 16 bytes of 16-bit elements
constexpr int kChunksPerRow = HEAD_DIM / kChunkElems;
static_assert(HEAD_DIM % kChunkElems == 0, "HEAD_DIM must be a multiple of 8 (16-byte chunks)");
}  // namespace repeat_kv_kernel

extern "C" __global__ void __launch_bounds__(repeat_kv_kernel::kThreads)
repeat_kv(const AttentionParams p, const ap::u16* __restrict__ x, ap::u16* __restrict__ out) {
    using namespace repeat_kv_kernel;
    if (p.head_dim != HEAD_DIM) ap::trap();
    const int chunk = blockIdx.x * kThreads + threadIdx.x;
    const int row = chunk / kChunksPerRow;
    if (row >= (int)p.seq_q) return;
    const int c = (chunk % kChunksPerRow) * kChunkElems;
    const int head = blockIdx.y;
    const int kv_head = head / (int)(p.num_heads / p.num_kv_heads);
    const long long src = (long long)blockIdx.z * p.k_stride[0] + (long long)kv_head * p.k_stride[1] +
                          (long long)row * p.k_stride[2] + c;
    const long long dst = (long long)blockIdx.z * p.o_stride[0] + (long long)head * p.o_stride[1] +
                          (long long)row * p.o_stride[2] + c;
    *reinterpret_cast<uint4*>(out + dst) = *reinterpret_cast<const uint4*>(x + src);
}
