// linear_chunk_h.metal — Prototype 6, pass 1 of chunked causal linear attention (FLA's chunk_h,
// without decay): the state entering each chunk, H[c] = sum over tokens t < c * CHUNK_SIZE of
// k_t^T v_t, FP32, written to states [B, H, num_chunks, D, D] (row = key dim, column = value dim).
//
// One threadgroup per (ATTNPROTO_LINEAR_H_COLS value columns of the state, batch x head); simdgroup
// s keeps rows 8s .. 8s+7 of its state columns in FP32 simdgroup_matrix registers for the whole
// sequence. Chunk by chunk it stores the state, then adds K^T V over the chunk's tokens, staged
// ATTNPROTO_LINEAR_SUB tokens at a time through threadgroup memory (K: all D columns, V: this
// threadgroup's columns), so the budget does not grow with CHUNK_SIZE. Tokens past N are zeros.
// Statically checked only (tools/metal_check), never run on Apple hardware.
//
// Params used: batch, num_heads, seq_q (N), head_dim, chunk_size (== CHUNK_SIZE), k_stride,
// v_stride {b, h, token}. Launch: threadgroups (D / ATTNPROTO_LINEAR_H_COLS, batch * heads),
// ATTNPROTO_LINEAR_H_THREADS(D) threads, ATTNPROTO_LINEAR_H_TG_BYTES(D, 2) bytes at [[threadgroup(0)]].
#include <metal_stdlib>
#include "metal_bindings.h"

using namespace metal;

constant int HEAD_DIM   [[function_constant(ATTNPROTO_FC_HEAD_DIM)]];
constant int CHUNK_SIZE [[function_constant(ATTNPROTO_FC_CHUNK_SIZE)]];
constant int DTYPE      [[function_constant(ATTNPROTO_FC_DTYPE)]];

constexpr constant int kFrag    = ATTNPROTO_FRAG;
constexpr constant int kSub     = ATTNPROTO_LINEAR_SUB;
constexpr constant int kCols    = ATTNPROTO_LINEAR_H_COLS;
constexpr constant int kColFrag = ATTNPROTO_LINEAR_H_COLS / ATTNPROTO_FRAG;
constant int kThreads = ATTNPROTO_LINEAR_H_THREADS(HEAD_DIM);

template <typename T>
static void chunk_h_impl(constant AttentionParams& p, device const T* k, device const T* v, device float* states,
                         threadgroup uchar* smem, uint3 tgid, ushort tid, ushort sg)
{
    ATTNPROTO_FC_STATIC_ASSERT(HEAD_DIM >= ATTNPROTO_LINEAR_H_COLS && HEAD_DIM % ATTNPROTO_LINEAR_H_COLS == 0 &&
                               HEAD_DIM <= ATTNPROTO_LINEAR_MAX_HEAD_DIM,
                               "HEAD_DIM must be a multiple of 32 in [32, 128]");
    ATTNPROTO_FC_STATIC_ASSERT(CHUNK_SIZE >= ATTNPROTO_LINEAR_SUB && CHUNK_SIZE % ATTNPROTO_LINEAR_SUB == 0 &&
                               CHUNK_SIZE <= ATTNPROTO_LINEAR_MAX_CHUNK,
                               "CHUNK_SIZE must be a multiple of 32 in [32, 256]");
    ATTNPROTO_FC_STATIC_ASSERT(ATTNPROTO_LINEAR_H_TG_BYTES(HEAD_DIM, sizeof(T)) <= ATTNPROTO_TG_MEMORY_LIMIT,
                               "chunk_h needs more than 32 KB of threadgroup memory");

    threadgroup T* k_tile = reinterpret_cast<threadgroup T*>(smem);                 // [kSub][HEAD_DIM]
    threadgroup T* v_tile = k_tile + kSub * HEAD_DIM;                                // [kSub][kCols]

    const int col0 = int(tgid.x) * kCols;
    const int bh = int(tgid.y);
    const int b = bh / int(p.num_heads);
    const int h = bh % int(p.num_heads);
    const int n = int(p.seq_q);
    const int num_chunks = (n + CHUNK_SIZE - 1) / CHUNK_SIZE;
    device const T* k_base = k + b * p.k_stride[0] + h * p.k_stride[1];
    device const T* v_base = v + b * p.v_stride[0] + h * p.v_stride[1] + col0;
    device float* s_base = states + long(bh) * num_chunks * HEAD_DIM * HEAD_DIM + (sg * kFrag) * HEAD_DIM + col0;

    simdgroup_float8x8 acc[kColFrag];
    for (int f = 0; f < kColFrag; ++f) {
        acc[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    for (int c = 0; c < num_chunks; ++c) {
        device float* s_chunk = s_base + long(c) * HEAD_DIM * HEAD_DIM;
        for (int f = 0; f < kColFrag; ++f) {
            simdgroup_store(acc[f], s_chunk + f * kFrag, HEAD_DIM);
        }
        for (int t0 = c * CHUNK_SIZE; t0 < min((c + 1) * CHUNK_SIZE, n); t0 += kSub) {
            const int valid = min(kSub, n - t0);
            threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tokens' reads are done
            for (int e = tid; e < kSub * HEAD_DIM; e += kThreads) {
                const int r = e / HEAD_DIM;
                k_tile[e] = r < valid ? k_base[long(t0 + r) * p.k_stride[2] + e % HEAD_DIM] : T(0.0f);
            }
            for (int e = tid; e < kSub * kCols; e += kThreads) {
                const int r = e / kCols;
                v_tile[e] = r < valid ? v_base[long(t0 + r) * p.v_stride[2] + e % kCols] : T(0.0f);
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (int kk = 0; kk < kSub / kFrag; ++kk) {
                simdgroup_matrix<T, 8, 8> kt;  // K^T: rows = this simdgroup's key dims, cols = 8 tokens
                simdgroup_load(kt, k_tile + kk * kFrag * HEAD_DIM + sg * kFrag, HEAD_DIM, ulong2(0), true);
                for (int f = 0; f < kColFrag; ++f) {
                    simdgroup_matrix<T, 8, 8> vf;
                    simdgroup_load(vf, v_tile + kk * kFrag * kCols + f * kFrag, kCols);
                    simdgroup_multiply_accumulate(acc[f], kt, vf, acc[f]);
                }
            }
        }
    }
}

kernel void linear_chunk_h(constant AttentionParams& params [[buffer(ATTNPROTO_BUF_PARAMS)]],
                           device const uchar* k [[buffer(ATTNPROTO_BUF_LINEAR_H_K)]],
                           device const uchar* v [[buffer(ATTNPROTO_BUF_LINEAR_H_V)]],
                           device float* states [[buffer(ATTNPROTO_BUF_LINEAR_H_STATES)]],
                           threadgroup uchar* smem [[threadgroup(ATTNPROTO_TG_SMEM)]],
                           uint3 tgid [[threadgroup_position_in_grid]],
                           ushort tid [[thread_index_in_threadgroup]],
                           ushort sg [[simdgroup_index_in_threadgroup]])
{
    ATTNPROTO_FC_STATIC_ASSERT(DTYPE == ATTNPROTO_DTYPE_F16 || DTYPE == ATTNPROTO_DTYPE_BF16,
                               "DTYPE must be ATTNPROTO_DTYPE_F16 or ATTNPROTO_DTYPE_BF16");
    if (DTYPE == ATTNPROTO_DTYPE_BF16) {
        chunk_h_impl(params, reinterpret_cast<device const bfloat*>(k), reinterpret_cast<device const bfloat*>(v),
                     states, smem, tgid, tid, sg);
    } else {
        chunk_h_impl(params, reinterpret_cast<device const half*>(k), reinterpret_cast<device const half*>(v),
                     states, smem, tgid, tid, sg);
    }
}
