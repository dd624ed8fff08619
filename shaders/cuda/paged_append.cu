// paged_append.cu — write new tokens' K and V into their pages (vLLM's reshape_and_cache).
//
// Token i of sequence b (k_new/v_new [B, Hkv, NEW, D], D contiguous, strides in NewStrides)
// goes to position positions[b] + i of the sequence: block block_table[b][pos / PAGE_SIZE],
// slot pos % PAGE_SIZE of k_cache/v_cache (strides p.k_stride / p.v_stride = {block, kv head,
// token}). A position outside [0, capacity) or a table entry outside [0, num_blocks) is
// never written (the host check refuses both before the launch; this guards a table changed
// after the check).
//
// Launch: grid (NEW, Hkv, B), block (HEAD_DIM / 8): one 16-byte chunk per thread.
// Arguments: (p, new_strides, k_new, v_new, k_cache, v_cache, block_table, positions);
// p.seq_q = NEW, p.max_blocks_per_seq, p.num_blocks, p.block_size as for paged_decode.cu.
// Constants: HEAD_DIM, PAGE_SIZE.
#include "common/attn_params.h"
#include "cuda/include/common.cuh"
#include "cuda/include/paged_kv.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef PAGE_SIZE
#error "PAGE_SIZE must be defined"
#endif

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM must be 64, 128 or 256");
static_assert(PAGE_SIZE > 0 && paged::legal_page_size(PAGE_SIZE), "PAGE_SIZE must be one of 1, 8, 16, 32, 64, 128, 256");

// Strides (elements) of the new tokens' tensors: {batch, kv head, token}.
struct NewStrides {
    long long k[3];
    long long v[3];
};

constexpr int kChunkElems = 8;  // 16 bytes of 16-bit elements

extern "C" __global__ void __launch_bounds__(HEAD_DIM / kChunkElems)
paged_append(const AttentionParams p, const NewStrides ns, const ap::u16* __restrict__ k_new,
             const ap::u16* __restrict__ v_new, ap::u16* __restrict__ k_cache, ap::u16* __restrict__ v_cache,
             const int* __restrict__ block_table, const int* __restrict__ positions) {
    using KV = paged::PagedKV<PAGE_SIZE>;
    const int tok = blockIdx.x;
    const int kv_head = blockIdx.y;
    const int seq = blockIdx.z;
    const int pos = positions[seq] + tok;
    if (pos < 0 || pos >= KV::capacity(p)) return;
    const int page = KV::page_of(block_table + (long long)seq * p.max_blocks_per_seq, seq, pos, p);
    if (page == paged::kBadPage) return;
    const int c = threadIdx.x * kChunkElems;
    const uint4 kv = *reinterpret_cast<const uint4*>(k_new + seq * ns.k[0] + kv_head * ns.k[1] + tok * ns.k[2] + c);
    const uint4 vv = *reinterpret_cast<const uint4*>(v_new + seq * ns.v[0] + kv_head * ns.v[1] + tok * ns.v[2] + c);
    *reinterpret_cast<uint4*>(k_cache + KV::offset(page, pos, kv_head, p.k_stride) + c) = kv;
    *reinterpret_cast<uint4*>(v_cache + KV::offset(page, pos, kv_head, p.v_stride) + c) = vv;
}
