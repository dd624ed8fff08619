// paged_attention.metal — Prototype 3, phase 1 of two-phase (PagedAttention V2) decode over a
// paged KV cache, with GQA: one threadgroup per (partition, KV head, sequence) attends the
// GQA_GROUP query heads that share the KV head to the partition's PARTITION_SIZE tokens.
//
// Layouts (shaders/metal/metal_bindings.h): Q [B, Hq, D]; K/V caches [num_blocks, BLOCK_SIZE,
// Hkv, D] addressed through k_stride/v_stride {block, kv head, token}; token t of sequence b
// lives in cache block block_table[b * max_blocks_per_seq + t / BLOCK_SIZE], slot
// t % BLOCK_SIZE. The partition walks its cache blocks one at a time: K of the block is
// staged into threadgroup memory, the G x BLOCK_SIZE scores are simd_sum dot products, an
// online softmax per head updates (max, sum) and the probabilities, then V of the block is
// staged into the same buffer and each thread updates its share of the G x D accumulators
// (FP32) in registers. Scores are in base 2 (Q pre-scaled by scale * log2 e); LSE parts are
// written in natural log. A partition that starts at or past the sequence's context length
// writes O part 0 and LSE part -inf (phase 2 does not read it). A table entry outside the pool
// [0, num_blocks) is never dereferenced: the partition skips that block and writes NaN parts, so
// the sequence's O and LSE come out NaN (the op checks every entry on the host first).
//
// The threadgroup allocation is carved with the region macros of metal_bindings.h
// (ATTNPROTO_PAGED_TG_*), the same ones the host and attnproto.metal_paged_specs budget with;
// a specialisation over 32 KB fails its static_assert (the Linux static check) and the host
// refuses to build it. Inputs are assumed finite: the NaN / inf policy of ref.py is not yet
// followed here (masked scores are a finite sentinel under fast math). Statically checked
// only (tools/metal_check), never run on Apple hardware.
//
// Params used: batch, num_heads, num_kv_heads, head_dim, scale, block_size (== BLOCK_SIZE),
// max_blocks_per_seq, num_partitions, partition_size (== PARTITION_SIZE), num_blocks, q_stride {b, h, -},
// k_stride, v_stride.
// Launch: threadgroups (num_partitions, num_kv_heads, batch), ATTNPROTO_PAGED_THREADS threads,
// ATTNPROTO_PAGED_TG_BYTES(HEAD_DIM, BLOCK_SIZE, GQA_GROUP, 2) bytes at [[threadgroup(0)]].
#include <metal_stdlib>
#include "metal_bindings.h"

using namespace metal;

constant int HEAD_DIM       [[function_constant(ATTNPROTO_FC_HEAD_DIM)]];
constant int BLOCK_SIZE     [[function_constant(ATTNPROTO_FC_BLOCK_SIZE)]];
constant int PARTITION_SIZE [[function_constant(ATTNPROTO_FC_PARTITION_SIZE)]];
constant int GQA_GROUP      [[function_constant(ATTNPROTO_FC_GQA_GROUP)]];
constant int DTYPE          [[function_constant(ATTNPROTO_FC_DTYPE)]];

constexpr constant int   kThreads    = ATTNPROTO_PAGED_THREADS;
constexpr constant int   kSimdWidth  = ATTNPROTO_SIMD_WIDTH;
constexpr constant int   kSimdgroups = ATTNPROTO_PAGED_THREADS / ATTNPROTO_SIMD_WIDTH;
constexpr constant int   kMaxAcc     = ATTNPROTO_PAGED_MAX_ACC;
constexpr constant int   kStatMax    = 0;  // ATTNPROTO_PAGED_STATS slots per head: running max,
constexpr constant int   kStatSum    = 1;  // running sum of 2^(s - max),
constexpr constant int   kStatAlpha  = 2;  // and the rescale of this block
constexpr constant float kLog2e      = 1.4426950408889634f;
constexpr constant float kLn2        = 0.6931471805599453f;
// Score of a slot past the context. Finite on purpose: fast math lets the compiler assume no
// infinities. Real base-2 scores are bounded by |scale * q.k|, many orders of magnitude above.
constexpr constant float kMaskedScore = -1.0e30f;

template <typename T>
static void paged_attention_impl(constant AttentionParams& p, device const T* q,
                                 device const T* k_cache, device const T* v_cache,
                                 device const int* block_table, device const int* context_lens,
                                 device float* o_parts, device float* lse_parts,
                                 threadgroup uchar* smem, uint3 tgid, ushort tid, ushort sg, ushort lane)
{
    ATTNPROTO_FC_STATIC_ASSERT(HEAD_DIM > 0 && HEAD_DIM % ATTNPROTO_FRAG == 0 &&
                               HEAD_DIM <= ATTNPROTO_PAGED_MAX_HEAD_DIM,
                               "HEAD_DIM must be a multiple of 8 in [8, 256]");
    ATTNPROTO_FC_STATIC_ASSERT(BLOCK_SIZE > 0 && BLOCK_SIZE % ATTNPROTO_FRAG == 0 &&
                               BLOCK_SIZE <= ATTNPROTO_PAGED_MAX_BLOCK_SIZE,
                               "BLOCK_SIZE must be a multiple of 8 in [8, 128]");
    ATTNPROTO_FC_STATIC_ASSERT(PARTITION_SIZE >= BLOCK_SIZE && PARTITION_SIZE % BLOCK_SIZE == 0,
                               "PARTITION_SIZE must be a positive multiple of BLOCK_SIZE");
    ATTNPROTO_FC_STATIC_ASSERT(GQA_GROUP >= 1 && GQA_GROUP <= ATTNPROTO_PAGED_MAX_GROUP,
                               "GQA_GROUP must be in [1, 8] (query heads per KV head)");
    ATTNPROTO_FC_STATIC_ASSERT(ATTNPROTO_PAGED_TG_BYTES(HEAD_DIM, BLOCK_SIZE, GQA_GROUP, sizeof(T)) <=
                               ATTNPROTO_TG_MEMORY_LIMIT,
                               "paged block needs more than 32 KB of threadgroup memory");

    // ---- threadgroup memory: Q | S | stats | K/V block ----
    threadgroup float* q_tile = reinterpret_cast<threadgroup float*>(smem);
    threadgroup float* s_tile =
        reinterpret_cast<threadgroup float*>(smem + ATTNPROTO_PAGED_TG_Q_BYTES(HEAD_DIM, GQA_GROUP));
    threadgroup float* stats = s_tile + GQA_GROUP * BLOCK_SIZE;
    threadgroup T* kv_tile = reinterpret_cast<threadgroup T*>(
        smem + ATTNPROTO_PAGED_TG_Q_BYTES(HEAD_DIM, GQA_GROUP) + ATTNPROTO_PAGED_TG_S_BYTES(BLOCK_SIZE, GQA_GROUP) +
        ATTNPROTO_PAGED_TG_STATS_BYTES(GQA_GROUP));

    const int part = int(tgid.x);
    const int kv_head = int(tgid.y);
    const int b = int(tgid.z);
    const int num_heads = int(p.num_heads);
    const int num_parts = int(p.num_partitions);
    const int context = context_lens[b];
    const int start = part * PARTITION_SIZE;
    const int elems = GQA_GROUP * HEAD_DIM;  // outputs of this threadgroup: G heads x D

    if (start >= context) {  // uniform across the threadgroup: no barrier is skipped by some threads only
        for (int e = tid; e < elems; e += kThreads) {
            const int hq = kv_head * GQA_GROUP + e / HEAD_DIM;
            o_parts[(long(b * num_heads + hq) * num_parts + part) * HEAD_DIM + e % HEAD_DIM] = 0.0f;
            if (e % HEAD_DIM == 0) {
                lse_parts[long(b * num_heads + hq) * num_parts + part] = -INFINITY;
            }
        }
        return;
    }
    const int end = min(start + PARTITION_SIZE, context);

    // ---- Q of the group's heads -> threadgroup memory, in base-2 score units ----
    const float scale_log2 = p.scale * kLog2e;
    for (int e = tid; e < elems; e += kThreads) {
        const int hq = kv_head * GQA_GROUP + e / HEAD_DIM;
        q_tile[e] = float(q[b * p.q_stride[0] + hq * p.q_stride[1] + e % HEAD_DIM]) * scale_log2;
    }
    for (int g = tid; g < GQA_GROUP; g += kThreads) {
        stats[g * ATTNPROTO_PAGED_STATS + kStatMax] = kMaskedScore;
        stats[g * ATTNPROTO_PAGED_STATS + kStatSum] = 0.0f;
    }
    float acc[kMaxAcc];
    for (int i = 0; i < kMaxAcc; ++i) {
        acc[i] = 0.0f;
    }

    device const int* table_row = block_table + long(b) * p.max_blocks_per_seq;
    bool bad_entry = false;  // uniform: every thread reads the same table entries
    for (int t0 = start; t0 < end; t0 += BLOCK_SIZE) {
        const int tokens = min(BLOCK_SIZE, end - t0);
        const long block = table_row[t0 / BLOCK_SIZE];
        if (block < 0 || block >= long(p.num_blocks)) {
            bad_entry = true;
            continue;  // taken by the whole threadgroup: no barrier is skipped by some threads only
        }
        device const T* k_block = k_cache + block * p.k_stride[0] + kv_head * p.k_stride[1];
        device const T* v_block = v_cache + block * p.v_stride[0] + kv_head * p.v_stride[1];

        // ---- stage K of the block (slots past the context as zeros) ----
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block's V reads are done
        for (int e = tid; e < BLOCK_SIZE * HEAD_DIM; e += kThreads) {
            const int r = e / HEAD_DIM;
            kv_tile[e] = r < tokens ? k_block[r * p.k_stride[2] + e % HEAD_DIM] : T(0.0f);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // ---- scores: one simdgroup per (head, slot) pair, lanes across D ----
        for (int pair = sg; pair < GQA_GROUP * BLOCK_SIZE; pair += kSimdgroups) {
            const int g = pair / BLOCK_SIZE;
            const int r = pair % BLOCK_SIZE;
            float partial = 0.0f;
            for (int d = lane; d < HEAD_DIM; d += kSimdWidth) {
                partial += q_tile[g * HEAD_DIM + d] * float(kv_tile[r * HEAD_DIM + d]);
            }
            const float s = simd_sum(partial);
            if (lane == 0) {
                s_tile[pair] = r < tokens ? s : kMaskedScore;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // ---- online softmax: one simdgroup per head, lanes across the block's slots ----
        for (int g = sg; g < GQA_GROUP; g += kSimdgroups) {
            threadgroup float* st = stats + g * ATTNPROTO_PAGED_STATS;
            const float m_old = st[kStatMax];
            const float l_old = st[kStatSum];
            float m_blk = kMaskedScore;
            for (int r = lane; r < BLOCK_SIZE; r += kSimdWidth) {
                m_blk = max(m_blk, s_tile[g * BLOCK_SIZE + r]);
            }
            const float m_new = max(m_old, simd_max(m_blk));
            float l_blk = 0.0f;
            for (int r = lane; r < BLOCK_SIZE; r += kSimdWidth) {
                const float pr = r < tokens ? exp2(s_tile[g * BLOCK_SIZE + r] - m_new) : 0.0f;
                s_tile[g * BLOCK_SIZE + r] = pr;
                l_blk += pr;
            }
            l_blk = simd_sum(l_blk);
            simdgroup_barrier(mem_flags::mem_threadgroup);  // every lane has read the old stats
            if (lane == 0) {
                const float alpha = exp2(m_old - m_new);  // 0 on the first block (m_old is the sentinel)
                st[kStatMax] = m_new;
                st[kStatSum] = l_old * alpha + l_blk;
                st[kStatAlpha] = alpha;
            }
        }

        // ---- stage V of the block into the same buffer ----
        threadgroup_barrier(mem_flags::mem_threadgroup);  // K reads and the softmax are done
        for (int e = tid; e < BLOCK_SIZE * HEAD_DIM; e += kThreads) {
            const int r = e / HEAD_DIM;
            kv_tile[e] = r < tokens ? v_block[r * p.v_stride[2] + e % HEAD_DIM] : T(0.0f);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // ---- O = alpha O + P V, each thread on its elements of the G x D outputs ----
        for (int i = 0; i < kMaxAcc; ++i) {
            const int e = tid + i * kThreads;
            if (e >= elems) {
                break;
            }
            const int g = e / HEAD_DIM;
            const int d = e % HEAD_DIM;
            float a = acc[i] * stats[g * ATTNPROTO_PAGED_STATS + kStatAlpha];
            for (int r = 0; r < tokens; ++r) {
                a += s_tile[g * BLOCK_SIZE + r] * float(kv_tile[r * HEAD_DIM + d]);
            }
            acc[i] = a;
        }
    }

    // ---- epilogue: normalised O part and natural-log LSE part per head ----
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = 0; i < kMaxAcc; ++i) {
        const int e = tid + i * kThreads;
        if (e >= elems) {
            break;
        }
        const int g = e / HEAD_DIM;
        const int hq = kv_head * GQA_GROUP + g;
        const long row = long(b * num_heads + hq) * num_parts + part;
        const float l = stats[g * ATTNPROTO_PAGED_STATS + kStatSum];
        o_parts[row * HEAD_DIM + e % HEAD_DIM] = bad_entry ? NAN : acc[i] / l;
        if (e % HEAD_DIM == 0) {
            lse_parts[row] = bad_entry ? NAN : (stats[g * ATTNPROTO_PAGED_STATS + kStatMax] + log2(l)) * kLn2;
        }
    }
}

kernel void paged_attention(constant AttentionParams& params [[buffer(ATTNPROTO_BUF_PARAMS)]],
                            device const uchar* q [[buffer(ATTNPROTO_BUF_PAGED_Q)]],
                            device const uchar* k_cache [[buffer(ATTNPROTO_BUF_PAGED_K_CACHE)]],
                            device const uchar* v_cache [[buffer(ATTNPROTO_BUF_PAGED_V_CACHE)]],
                            device const int* block_table [[buffer(ATTNPROTO_BUF_PAGED_BLOCK_TABLE)]],
                            device const int* context_lens [[buffer(ATTNPROTO_BUF_PAGED_CONTEXT_LENS)]],
                            device float* o_parts [[buffer(ATTNPROTO_BUF_PAGED_O_PARTS)]],
                            device float* lse_parts [[buffer(ATTNPROTO_BUF_PAGED_LSE_PARTS)]],
                            threadgroup uchar* smem [[threadgroup(ATTNPROTO_TG_SMEM)]],
                            uint3 tgid [[threadgroup_position_in_grid]],
                            ushort tid [[thread_index_in_threadgroup]],
                            ushort sg [[simdgroup_index_in_threadgroup]],
                            ushort lane [[thread_index_in_simdgroup]])
{
    ATTNPROTO_FC_STATIC_ASSERT(DTYPE == ATTNPROTO_DTYPE_F16 || DTYPE == ATTNPROTO_DTYPE_BF16,
                               "DTYPE must be ATTNPROTO_DTYPE_F16 or ATTNPROTO_DTYPE_BF16");
    if (DTYPE == ATTNPROTO_DTYPE_BF16) {
        paged_attention_impl(params, reinterpret_cast<device const bfloat*>(q),
                             reinterpret_cast<device const bfloat*>(k_cache),
                             reinterpret_cast<device const bfloat*>(v_cache), block_table, context_lens,
                             o_parts, lse_parts, smem, tgid, tid, sg, lane);
    } else {
        paged_attention_impl(params, reinterpret_cast<device const half*>(q),
                             reinterpret_cast<device const half*>(k_cache),
                             reinterpret_cast<device const half*>(v_cache), block_table, context_lens,
                             o_parts, lse_parts, smem, tgid, tid, sg, lane);
    }
}
