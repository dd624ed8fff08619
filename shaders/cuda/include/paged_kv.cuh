// paged_kv.cuh — where key/value row `key` of one (sequence, kv head) lives: the KV
// addressing policies of the decode, append and prefill kernels.
//
// A policy maps a token to (page, slot): the element offset of its row is
//   page * stride[0] + kv_head * stride[1] + slot * stride[2]
// with the strides of AttentionParams::k_stride / v_stride ({block or batch, kv head, token}).
//   PagedKV<PAGE>  page = block_table[seq][key / PAGE] (checked against num_blocks), slot = key % PAGE
//   ContiguousKV   page = seq, slot = key (K/V [B, Hkv, N, D]: the same kernel on contiguous KV)
// The kernels never branch on which policy they run: they call page_of / offset.
//
// Bounds: page_of returns kBadPage for a table entry outside [0, num_blocks), so a kernel
// never reads or writes outside the pool, even when the table changed after the host check;
// the kernels turn a bad page into NaN output rows (decode) or a skipped write (append).
// raw_page / checked split the lookup so a kernel can fetch page ids a tile ahead and check
// them only when it uses them (the check would otherwise wait for the load at once).
#ifndef ATTNPROTO_PAGED_KV_CUH
#define ATTNPROTO_PAGED_KV_CUH

#include "common/attn_params.h"

namespace paged {

// Page id of a table entry that is out of range (never dereferenced).
constexpr int kBadPage = -1;

// Page sizes the kernels are built for (tokens per block); 0 = contiguous K/V.
__host__ __device__ constexpr bool legal_page_size(int page) {
    return page == 0 || page == 1 || page == 8 || page == 16 || page == 32 || page == 64 || page == 128 ||
           page == 256;
}

template <int kPage>
struct PagedKV {
    static_assert(kPage > 0 && (kPage & (kPage - 1)) == 0, "PAGE_SIZE must be a power of two (key / PAGE is a shift)");
    static constexpr bool kPaged = true;
    static constexpr int kPageSize = kPage;

    // Tokens a sequence can address: its table row's entries x PAGE.
    __device__ __forceinline__ static int capacity(const AttentionParams& p) {
        return (int)(p.max_blocks_per_seq * (unsigned)kPage);
    }
    // The raw table entry of the page holding `key` (`table_row` = block_table + seq *
    // max_blocks_per_seq): a plain load that may stay in flight until checked() first needs it.
    __device__ __forceinline__ static int raw_page(const int* __restrict__ table_row, int /*seq*/, int key) {
        return __ldg(table_row + key / kPage);
    }
    // The entry if it lies in the pool, else kBadPage.
    __device__ __forceinline__ static int checked(int id, const AttentionParams& p) {
        return (id >= 0 && (unsigned)id < p.num_blocks) ? id : kBadPage;
    }
    __device__ __forceinline__ static int page_of(const int* __restrict__ table_row, int seq, int key,
                                                  const AttentionParams& p) {
        return checked(raw_page(table_row, seq, key), p);
    }
    __device__ __forceinline__ static long long offset(int page, int key, int kv_head, const ap_i64 (&stride)[3]) {
        return (long long)page * stride[0] + (long long)kv_head * stride[1] + (long long)(key % kPage) * stride[2];
    }
};

struct ContiguousKV {
    static constexpr bool kPaged = false;
    static constexpr int kPageSize = 0;

    __device__ __forceinline__ static int capacity(const AttentionParams& p) { return (int)p.seq_kv; }
    __device__ __forceinline__ static int raw_page(const int* __restrict__ /*table_row*/, int seq, int /*key*/) {
        return seq;
    }
    __device__ __forceinline__ static int checked(int id, const AttentionParams& /*p*/) { return id; }
    __device__ __forceinline__ static int page_of(const int* __restrict__ table_row, int seq, int key,
                                                  const AttentionParams& p) {
        return checked(raw_page(table_row, seq, key), p);
    }
    __device__ __forceinline__ static long long offset(int page, int key, int kv_head, const ap_i64 (&stride)[3]) {
        return (long long)page * stride[0] + (long long)kv_head * stride[1] + (long long)key * stride[2];
    }
};

template <int kPage>
struct KVPolicy {
    using type = PagedKV<kPage>;
};
template <>
struct KVPolicy<0> {
    using type = ContiguousKV;
};

}  // namespace paged

#endif  // ATTNPROTO_PAGED_KV_CUH
