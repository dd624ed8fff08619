// paged_rope_append.cu — paged_append with rotate-half (Llama) RoPE: K rotated once, as it is
// stored; Q rotated out of place in the same launch; V stored as is.
//
// Token i of sequence b sits at absolute position pos = positions[b] + i. Its K row
// (k_new [B, Hkv, NEW, D]) is rotated at pos and written to block block_table[b][pos / PAGE_SIZE],
// slot pos % PAGE_SIZE of k_cache; its V row goes to the same slot of v_cache unchanged; each of
// its Q rows (q [B, Hq, NEW, D]) is rotated at pos into q_rot (same shape). Rotation of the pair
// (x[j], x[j + D/2]) at pos: (x1 cos - x2 sin, x2 cos + x1 sin) with cos = cos_table[pos][j],
// sin = sin_table[pos][j] (float32 [max_pos, D/2], cos_table[p][j] = cos(p * theta^(-2j/D))),
// computed in float32 and rounded once to DTYPE.
//
// Bounds: a position outside [0, capacity) or [0, max_pos), or a table entry outside
// [0, num_blocks), writes nothing (the host check refuses all three before the launch; this
// guards a table changed after the check).
//
// Launch: grid (NEW, Hkv + Hq, B), block (HEAD_DIM / 2): one rotated pair per thread; blockIdx.y
// < Hkv is a kv head (K rotated + V copied into the pages), the rest are query heads.
// Arguments: (p, ra, k_new, v_new, q, q_rot, k_cache, v_cache, block_table, positions, cos_table,
// sin_table); p as for paged_append.cu (p.k_stride / p.v_stride the pool's {block, kv head, token}).
// Constants: HEAD_DIM, PAGE_SIZE, DTYPE (0 f16, 1 bf16).
#include "common/attn_params.h"
#include "cuda/include/common.cuh"
#include "cuda/include/paged_kv.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef PAGE_SIZE
#error "PAGE_SIZE must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined"
#endif

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM must be 64, 128 or 256");
static_assert(PAGE_SIZE > 0 && paged::legal_page_size(PAGE_SIZE), "PAGE_SIZE must be one of 1, 8, 16, 32, 64, 128, 256");
static_assert(DTYPE == ap::kDtypeF16 || DTYPE == ap::kDtypeBF16, "DTYPE must be 0 (f16) or 1 (bf16)");

// This kernel's own arguments (attn_params.h is shared by every kernel and stays as it is):
// element strides {batch, head, token} of k_new, v_new, q and q_rot; the query heads; the
// rows of the cos/sin tables.
struct RopeArgs {
    long long k[3];
    long long v[3];
    long long q[3];
    long long qo[3];
    int num_q_heads;
    int max_pos;
};

constexpr int kHalf = HEAD_DIM / 2;

__device__ __forceinline__ float to_f32(ap::u16 x) {
    float r;
    if (DTYPE == ap::kDtypeBF16) {
        r = __uint_as_float(((unsigned)x) << 16);
    } else {
        asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(r) : "h"(x));
    }
    return r;
}

__device__ __forceinline__ ap::u16 from_f32(float x) {
    ap::u16 r;
    if (DTYPE == ap::kDtypeBF16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    }
    return r;
}

// Rotate the pair (src[j], src[j + D/2]) at one position into dst.
__device__ __forceinline__ void rotate_pair(const ap::u16* __restrict__ src, ap::u16* __restrict__ dst, int j,
                                            float c, float s) {
    const float x1 = to_f32(src[j]);
    const float x2 = to_f32(src[j + kHalf]);
    dst[j] = from_f32(x1 * c - x2 * s);
    dst[j + kHalf] = from_f32(x2 * c + x1 * s);
}

extern "C" __global__ void __launch_bounds__(kHalf)
paged_rope_append(const AttentionParams p, const RopeArgs ra, const ap::u16* __restrict__ k_new,
                  const ap::u16* __restrict__ v_new, const ap::u16* __restrict__ q, ap::u16* __restrict__ q_rot,
                  ap::u16* __restrict__ k_cache, ap::u16* __restrict__ v_cache, const int* __restrict__ block_table,
                  const int* __restrict__ positions, const float* __restrict__ cos_table,
                  const float* __restrict__ sin_table) {
    using KV = paged::PagedKV<PAGE_SIZE>;
    const int tok = blockIdx.x;
    const int head = blockIdx.y;
    const int seq = blockIdx.z;
    const int j = threadIdx.x;
    const int pos = positions[seq] + tok;
    if (pos < 0 || pos >= ra.max_pos) return;
    const float c = cos_table[(long long)pos * kHalf + j];
    const float s = sin_table[(long long)pos * kHalf + j];
    const int kv_heads = (int)p.num_kv_heads;
    if (head >= kv_heads) {  // a query head: rotated out of place
        const int h = head - kv_heads;
        rotate_pair(q + seq * ra.q[0] + h * ra.q[1] + tok * ra.q[2],
                    q_rot + seq * ra.qo[0] + h * ra.qo[1] + tok * ra.qo[2], j, c, s);
        return;
    }
    if (pos >= KV::capacity(p)) return;
    const int page = KV::page_of(block_table + (long long)seq * p.max_blocks_per_seq, seq, pos, p);
    if (page == paged::kBadPage) return;
    rotate_pair(k_new + seq * ra.k[0] + head * ra.k[1] + tok * ra.k[2],
                k_cache + KV::offset(page, pos, head, p.k_stride), j, c, s);
    const ap::u16* vs = v_new + seq * ra.v[0] + head * ra.v[1] + tok * ra.v[2];
    ap::u16* vd = v_cache + KV::offset(page, pos, head, p.v_stride);
    vd[j] = vs[j];
    vd[j + kHalf] = vs[j + kHalf];
}
