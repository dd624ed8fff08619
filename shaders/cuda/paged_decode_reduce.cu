// paged_decode_reduce.cu — the log-sum-exp merge of paged_decode's partitions (SPLIT = 1).
//
// For each (sequence b, query head h, token i): partitions p < ceil(ctx / partition_size)
// hold a normalised partial O_p (float32) and LSE_p; the result is
//   LSE = log(sum_p exp(LSE_p)),  O = sum_p exp(LSE_p - LSE) O_p
// (computed around the largest LSE_p). Partitions at or past ctx were not written and are
// not read. A NaN LSE_p (a bad table entry, a NaN input) makes the row NaN; all LSE_p = -inf
// (the row sees no key) gives O = 0, LSE = -inf; ctx outside [0, capacity] gives NaN rows.
//
// Launch: grid (Hq * NQ, B), block (HEAD_DIM / 2): thread t owns columns 2t, 2t + 1.
// Arguments: (p, context_lens, part_o, part_lse, o, lse); part_o [B, Hq, NQ, P, D] and
// part_lse [B, Hq, NQ, P] as paged_decode.cu writes them (P = p.num_partitions).
// Constants: HEAD_DIM, NQ, DTYPE (0 = float16, 1 = bfloat16).
#include "common/attn_params.h"
#include "cuda/include/common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef NQ
#error "NQ must be defined"
#endif
#ifndef DTYPE
#error "DTYPE must be defined"
#endif

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM must be 64, 128 or 256");
static_assert(NQ >= 1 && NQ <= 8, "NQ must be in [1, 8]");
static_assert(DTYPE == ap::kDtypeF16 || DTYPE == ap::kDtypeBF16, "DTYPE must be 0 (f16) or 1 (bf16)");

extern "C" __global__ void __launch_bounds__(HEAD_DIM / 2)
paged_decode_reduce(const AttentionParams p, const int* __restrict__ context_lens, const float* __restrict__ part_o,
                    const float* __restrict__ part_lse, ap::u16* __restrict__ o, float* __restrict__ lse) {
    const int seq = blockIdx.y;
    const int head = blockIdx.x / NQ;
    const int tok = blockIdx.x % NQ;
    const int col = 2 * threadIdx.x;
    const int parts = (int)p.num_partitions;
    const int psize = (int)p.partition_size;
    // The capacity is p.seq_kv (the host sets it to the table's tokens, or to N of contiguous K/V).
    const int ctx_raw = context_lens[seq];
    const bool bad = ctx_raw < 0 || ctx_raw > (int)p.seq_kv;
    const int used = bad ? parts : min(parts, (ctx_raw + psize - 1) / psize);

    const long long row = ((long long)seq * p.num_heads + head) * NQ + tok;
    const float* lse_row = part_lse + row * parts;
    const float* o_row = part_o + row * parts * HEAD_DIM + col;
    // Independent loads, unrolled so that many are in flight (a loop whose next load waits on a
    // branch over the previous one costs an L2 round trip per partition). A partition without a
    // visible key holds O = 0 and LSE = -inf: weight 0, and 0 * 0 adds nothing.
    float mx = ap::neg_inf();
#pragma unroll 8
    for (int i = 0; i < used; ++i) mx = ap::fmax_nan(mx, lse_row[i]);
    const float m_use = mx == ap::neg_inf() ? 0.0f : mx;
    float sum = 0.0f, o0 = 0.0f, o1 = 0.0f;
#pragma unroll 8
    for (int i = 0; i < used; ++i) {
        const float w = ap::exp2_approx((lse_row[i] - m_use) * ap::kLog2e);
        const float2 part = *reinterpret_cast<const float2*>(o_row + (long long)i * HEAD_DIM);
        sum += w;
        o0 = fmaf(w, part.x, o0);
        o1 = fmaf(w, part.y, o1);
    }
    const bool has_key = mx != ap::neg_inf();  // NaN compares unequal: a NaN row stays NaN
    const float inv = bad ? ap::quiet_nan() : (has_key ? 1.0f / sum : 0.0f);
    ap::u16* dst = o + (long long)seq * p.o_stride[0] + (long long)head * p.o_stride[1] + (long long)tok * p.o_stride[2] + col;
    *reinterpret_cast<ap::u32*>(dst) = ap::pack_half2<DTYPE>(has_key || bad ? o0 * inv : 0.0f, has_key || bad ? o1 * inv : 0.0f);
    if (threadIdx.x == 0) {
        lse[(long long)seq * p.lse_stride[0] + (long long)head * p.lse_stride[1] + tok] =
            bad ? ap::quiet_nan() : (has_key ? mx + __logf(sum) : ap::neg_inf());
    }
}
