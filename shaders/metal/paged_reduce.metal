// paged_reduce.metal — Prototype 3, phase 2 of two-phase (PagedAttention V2) decode: combine
// the per-partition outputs of paged_attention.metal into O and LSE with the log-sum-exp
// rule: M = max_p lse_p, w_p = exp(lse_p - M), O = sum_p w_p o_p / sum_p w_p,
// LSE = M + log(sum_p w_p). One threadgroup per (query head, sequence); only the
// ceil(context / PARTITION_SIZE) partitions that hold tokens are read; a sequence of
// context 0 writes O = 0 and LSE = -inf. Inputs are assumed finite (see paged_attention.metal).
// Statically checked only (tools/metal_check), never run on Apple hardware.
//
// Params used: batch, num_heads, head_dim, num_partitions (<= ATTNPROTO_PAGED_MAX_PARTITIONS),
// partition_size (== PARTITION_SIZE), o_stride {b, h, -}, lse_stride {b, h}.
// Launch: threadgroups (num_heads, batch), ATTNPROTO_PAGED_REDUCE_THREADS threads,
// ATTNPROTO_PAGED_REDUCE_TG_BYTES(num_partitions) bytes at [[threadgroup(0)]]: the weights,
// then one float per simdgroup.
#include <metal_stdlib>
#include "metal_bindings.h"

using namespace metal;

constant int HEAD_DIM       [[function_constant(ATTNPROTO_FC_HEAD_DIM)]];
constant int PARTITION_SIZE [[function_constant(ATTNPROTO_FC_PARTITION_SIZE)]];
constant int DTYPE          [[function_constant(ATTNPROTO_FC_DTYPE)]];

constexpr constant int kThreads    = ATTNPROTO_PAGED_REDUCE_THREADS;
constexpr constant int kSimdgroups = ATTNPROTO_PAGED_REDUCE_THREADS / ATTNPROTO_SIMD_WIDTH;
// Below every real LSE part (finite inputs); the start of the running max.
constexpr constant float kLowestLse = -1.0e30f;

// Sum (or max, with take_max) of one float per thread across the threadgroup; every thread
// gets the result. Two threadgroup barriers: scratch is free again when it returns.
static float threadgroup_combine(float value, bool take_max, threadgroup float* scratch, ushort sg, ushort lane)
{
    value = take_max ? simd_max(value) : simd_sum(value);
    if (lane == 0) {
        scratch[sg] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float out = scratch[0];
    for (int s = 1; s < kSimdgroups; ++s) {
        out = take_max ? max(out, scratch[s]) : out + scratch[s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return out;
}

template <typename T>
static void paged_reduce_impl(constant AttentionParams& p, device const float* o_parts,
                              device const float* lse_parts, device const int* context_lens, device T* o,
                              device float* lse, threadgroup uchar* smem, uint3 tgid, ushort tid, ushort sg,
                              ushort lane)
{
    ATTNPROTO_FC_STATIC_ASSERT(HEAD_DIM > 0 && HEAD_DIM % ATTNPROTO_FRAG == 0 &&
                               HEAD_DIM <= ATTNPROTO_PAGED_MAX_HEAD_DIM,
                               "HEAD_DIM must be a multiple of 8 in [8, 256]");
    ATTNPROTO_FC_STATIC_ASSERT(PARTITION_SIZE > 0, "PARTITION_SIZE must be positive");
    ATTNPROTO_FC_STATIC_ASSERT(ATTNPROTO_PAGED_REDUCE_TG_BYTES(ATTNPROTO_PAGED_MAX_PARTITIONS) <=
                               ATTNPROTO_TG_MEMORY_LIMIT,
                               "the reduce's weights at ATTNPROTO_PAGED_MAX_PARTITIONS exceed 32 KB");

    const int num_parts = int(p.num_partitions);
    threadgroup float* weights = reinterpret_cast<threadgroup float*>(smem);
    threadgroup float* scratch = weights + num_parts;

    const int h = int(tgid.x);
    const int b = int(tgid.y);
    const int used = (context_lens[b] + PARTITION_SIZE - 1) / PARTITION_SIZE;
    device T* o_row = o + b * p.o_stride[0] + h * p.o_stride[1];
    device float* lse_out = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
    if (used == 0) {  // uniform across the threadgroup
        for (int d = tid; d < HEAD_DIM; d += kThreads) {
            o_row[d] = T(0.0f);
        }
        if (tid == 0) {
            *lse_out = -INFINITY;
        }
        return;
    }
    const long row = long(b) * p.num_heads + h;
    device const float* lse_row = lse_parts + row * num_parts;
    device const float* o_part_rows = o_parts + row * num_parts * HEAD_DIM;

    float m = kLowestLse;
    for (int q = tid; q < used; q += kThreads) {
        m = max(m, lse_row[q]);
    }
    m = threadgroup_combine(m, true, scratch, sg, lane);
    float total = 0.0f;
    for (int q = tid; q < used; q += kThreads) {
        const float w = exp(lse_row[q] - m);
        weights[q] = w;
        total += w;
    }
    total = threadgroup_combine(total, false, scratch, sg, lane);  // its barriers publish the weights

    for (int d = tid; d < HEAD_DIM; d += kThreads) {
        float a = 0.0f;
        for (int q = 0; q < used; ++q) {
            a += weights[q] * o_part_rows[long(q) * HEAD_DIM + d];
        }
        o_row[d] = T(a / total);
    }
    if (tid == 0) {
        *lse_out = m + log(total);
    }
}

kernel void paged_reduce(constant AttentionParams& params [[buffer(ATTNPROTO_BUF_PARAMS)]],
                         device const float* o_parts [[buffer(ATTNPROTO_BUF_REDUCE_O_PARTS)]],
                         device const float* lse_parts [[buffer(ATTNPROTO_BUF_REDUCE_LSE_PARTS)]],
                         device const int* context_lens [[buffer(ATTNPROTO_BUF_REDUCE_CONTEXT_LENS)]],
                         device uchar* o [[buffer(ATTNPROTO_BUF_REDUCE_O)]],
                         device float* lse [[buffer(ATTNPROTO_BUF_REDUCE_LSE)]],
                         threadgroup uchar* smem [[threadgroup(ATTNPROTO_TG_SMEM)]],
                         uint3 tgid [[threadgroup_position_in_grid]],
                         ushort tid [[thread_index_in_threadgroup]],
                         ushort sg [[simdgroup_index_in_threadgroup]],
                         ushort lane [[thread_index_in_simdgroup]])
{
    ATTNPROTO_FC_STATIC_ASSERT(DTYPE == ATTNPROTO_DTYPE_F16 || DTYPE == ATTNPROTO_DTYPE_BF16,
                               "DTYPE must be ATTNPROTO_DTYPE_F16 or ATTNPROTO_DTYPE_BF16");
    if (DTYPE == ATTNPROTO_DTYPE_BF16) {
        paged_reduce_impl(params, o_parts, lse_parts, context_lens, reinterpret_cast<device bfloat*>(o), lse, smem,
                          tgid, tid, sg, lane);
    } else {
        paged_reduce_impl(params, o_parts, lse_parts, context_lens, reinterpret_cast<device half*>(o), lse, smem,
                          tgid, tid, sg, lane);
    }
}
