// linear_chunk_o.metal — Prototype 6, pass 2 of chunked causal linear attention (FLA's chunk_o,
// without decay): O_i = scale * (q_i H[c] + sum_{chunk start <= j <= i} (q_i . k_j) v_j) for query
// row i of chunk c, with the states H[c] of linear_chunk_h.metal.
//
// One threadgroup per (ATTNPROTO_LINEAR_O_ROWS query rows of one chunk, batch x head); simdgroup s
// owns rows 8s .. 8s+7, Q in registers (FP16/BF16 simdgroup_matrix), O accumulated in FP32
// fragments. Inter-chunk: H[c] streams through threadgroup memory in column blocks of
// ATTNPROTO_LINEAR_O_HCOLS(D), cast to the element type (as FLA's chunk_o casts h to Q's dtype).
// Intra-chunk: keys of the chunk up to the block's last row, ATTNPROTO_LINEAR_SUB at a time: S = Q
// K^T in FP32, masked causally (j <= i, j < N) into P in the element type, O += P V. Tokens past N
// are zeros and rows past N are not stored. Statically checked only, never run on Apple hardware.
//
// Params used: batch, num_heads, seq_q (N), head_dim, chunk_size (== CHUNK_SIZE), scale, q/k/v/o
// strides {b, h, token}. Launch: threadgroups (ceil(N / ATTNPROTO_LINEAR_O_ROWS), batch * heads),
// ATTNPROTO_LINEAR_O_THREADS threads, ATTNPROTO_LINEAR_O_TG_BYTES(D, 2) bytes at [[threadgroup(0)]].
#include <metal_stdlib>
#include "metal_bindings.h"

using namespace metal;

constant int HEAD_DIM   [[function_constant(ATTNPROTO_FC_HEAD_DIM)]];
constant int CHUNK_SIZE [[function_constant(ATTNPROTO_FC_CHUNK_SIZE)]];
constant int DTYPE      [[function_constant(ATTNPROTO_FC_DTYPE)]];

constexpr constant int kFrag      = ATTNPROTO_FRAG;
constexpr constant int kSimdWidth = ATTNPROTO_SIMD_WIDTH;
constexpr constant int kRows      = ATTNPROTO_LINEAR_O_ROWS;
constexpr constant int kSub       = ATTNPROTO_LINEAR_SUB;
constexpr constant int kThreads   = ATTNPROTO_LINEAR_O_THREADS;
constexpr constant int kMaxDFrags = ATTNPROTO_LINEAR_MAX_HEAD_DIM / ATTNPROTO_FRAG;
constexpr constant int kSubFrags  = ATTNPROTO_LINEAR_SUB / ATTNPROTO_FRAG;
constant int kHCols = ATTNPROTO_LINEAR_O_HCOLS(HEAD_DIM);

// Stage rows [0, rows) x columns [0, cols) of a row-major source (rows `ld` apart) into dst
// (cols wide), as the element type; rows at or past `valid` become zeros.
template <typename T, typename S>
static void stage(threadgroup T* dst, device const S* src, long ld, int rows, int cols, int valid, ushort tid)
{
    for (int e = tid; e < rows * cols; e += kThreads) {
        const int r = e / cols;
        dst[e] = r < valid ? T(float(src[long(r) * ld + e % cols])) : T(0.0f);
    }
}

template <typename T>
static void chunk_o_impl(constant AttentionParams& p, device const T* q, device const T* k, device const T* v,
                         device const float* states, device T* o, threadgroup uchar* smem, uint3 tgid, ushort tid,
                         ushort sg, ushort lane)
{
    ATTNPROTO_FC_STATIC_ASSERT(HEAD_DIM >= ATTNPROTO_FRAG && HEAD_DIM % ATTNPROTO_LINEAR_H_COLS == 0 &&
                               HEAD_DIM <= ATTNPROTO_LINEAR_MAX_HEAD_DIM,
                               "HEAD_DIM must be a multiple of 32 in [32, 128]");
    ATTNPROTO_FC_STATIC_ASSERT(CHUNK_SIZE >= ATTNPROTO_LINEAR_O_ROWS && CHUNK_SIZE % ATTNPROTO_LINEAR_O_ROWS == 0 &&
                               CHUNK_SIZE <= ATTNPROTO_LINEAR_MAX_CHUNK,
                               "CHUNK_SIZE must be a multiple of 32 in [32, 256]");
    ATTNPROTO_FC_STATIC_ASSERT(ATTNPROTO_LINEAR_O_TG_BYTES(HEAD_DIM, sizeof(T)) <= ATTNPROTO_TG_MEMORY_LIMIT,
                               "chunk_o needs more than 32 KB of threadgroup memory");

    // ---- threadgroup memory: staging (Q, H column block, K, V) | S float | P | scratch ----
    threadgroup T* stage_buf = reinterpret_cast<threadgroup T*>(smem);
    threadgroup float* s_tile =
        reinterpret_cast<threadgroup float*>(smem + ATTNPROTO_LINEAR_O_STAGE_ELEMS(HEAD_DIM) * sizeof(T));
    threadgroup T* p_tile = reinterpret_cast<threadgroup T*>(s_tile + kRows * kSub);
    threadgroup float* scratch =
        reinterpret_cast<threadgroup float*>(p_tile + kRows * kSub) + sg * kFrag * kFrag;

    const int r0 = int(tgid.x) * kRows;
    const int bh = int(tgid.y);
    const int b = bh / int(p.num_heads);
    const int h = bh % int(p.num_heads);
    const int n = int(p.seq_q);
    const int c = r0 / CHUNK_SIZE;
    const int num_chunks = (n + CHUNK_SIZE - 1) / CHUNK_SIZE;
    device const T* q_base = q + b * p.q_stride[0] + h * p.q_stride[1];
    device const T* k_base = k + b * p.k_stride[0] + h * p.k_stride[1];
    device const T* v_base = v + b * p.v_stride[0] + h * p.v_stride[1];
    device T* o_base = o + b * p.o_stride[0] + h * p.o_stride[1];
    device const float* h_state = states + (long(bh) * num_chunks + c) * HEAD_DIM * HEAD_DIM;

    // ---- Q rows -> registers ----
    stage(stage_buf, q_base + long(r0) * p.q_stride[2], p.q_stride[2], kRows, HEAD_DIM, n - r0, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<T, 8, 8> q_frag[kMaxDFrags];
    for (int f = 0; f < HEAD_DIM / kFrag; ++f) {
        simdgroup_load(q_frag[f], stage_buf + sg * kFrag * HEAD_DIM + f * kFrag, HEAD_DIM);
    }
    simdgroup_float8x8 o_acc[kMaxDFrags];
    for (int f = 0; f < HEAD_DIM / kFrag; ++f) {
        o_acc[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }

    // ---- inter-chunk: O = Q H[c], H in column blocks ----
    for (int col0 = 0; col0 < HEAD_DIM; col0 += kHCols) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        stage(stage_buf, h_state + col0, HEAD_DIM, HEAD_DIM, kHCols, HEAD_DIM, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int f = 0; f < kHCols / kFrag; ++f) {
            for (int kk = 0; kk < HEAD_DIM / kFrag; ++kk) {
                simdgroup_matrix<T, 8, 8> hf;
                simdgroup_load(hf, stage_buf + kk * kFrag * kHCols + f * kFrag, kHCols);
                simdgroup_multiply_accumulate(o_acc[col0 / kFrag + f], q_frag[kk], hf, o_acc[col0 / kFrag + f]);
            }
        }
    }

    // ---- intra-chunk: O += causal(Q K^T) V over the chunk's keys up to the block's last row ----
    const int key_end = min(r0 + kRows, n);
    for (int j0 = c * CHUNK_SIZE; j0 < key_end; j0 += kSub) {
        const int valid = min(kSub, n - j0);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        stage(stage_buf, k_base + long(j0) * p.k_stride[2], p.k_stride[2], kSub, HEAD_DIM, valid, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_float8x8 s_acc[kSubFrags];
        for (int jj = 0; jj < kSubFrags; ++jj) {
            s_acc[jj] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            for (int kk = 0; kk < HEAD_DIM / kFrag; ++kk) {
                simdgroup_matrix<T, 8, 8> kt;
                simdgroup_load(kt, stage_buf + jj * kFrag * HEAD_DIM + kk * kFrag, HEAD_DIM, ulong2(0), true);
                simdgroup_multiply_accumulate(s_acc[jj], q_frag[kk], kt, s_acc[jj]);
            }
            simdgroup_store(s_acc[jj], s_tile + sg * kFrag * kSub + jj * kFrag, kSub);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int e = lane; e < kFrag * kSub; e += kSimdWidth) {
            const int i = r0 + sg * kFrag + e / kSub;
            const int j = j0 + e % kSub;
            const float s = s_tile[sg * kFrag * kSub + e];
            p_tile[sg * kFrag * kSub + e] = T(j <= i && j < n ? s : 0.0f);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_matrix<T, 8, 8> p_frag[kSubFrags];
        for (int jj = 0; jj < kSubFrags; ++jj) {
            simdgroup_load(p_frag[jj], p_tile + sg * kFrag * kSub + jj * kFrag, kSub);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with K
        stage(stage_buf, v_base + long(j0) * p.v_stride[2], p.v_stride[2], kSub, HEAD_DIM, valid, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int f = 0; f < HEAD_DIM / kFrag; ++f) {
            for (int jj = 0; jj < kSubFrags; ++jj) {
                simdgroup_matrix<T, 8, 8> vf;
                simdgroup_load(vf, stage_buf + jj * kFrag * HEAD_DIM + f * kFrag, HEAD_DIM);
                simdgroup_multiply_accumulate(o_acc[f], p_frag[jj], vf, o_acc[f]);
            }
        }
    }

    // ---- epilogue: scale, masked store through the scratch matrix ----
    for (int f = 0; f < HEAD_DIM / kFrag; ++f) {
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_store(o_acc[f], scratch, kFrag);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int e = lane; e < kFrag * kFrag; e += kSimdWidth) {
            const int row = r0 + sg * kFrag + e / kFrag;
            if (row < n) {
                o_base[long(row) * p.o_stride[2] + f * kFrag + e % kFrag] = T(scratch[e] * p.scale);
            }
        }
    }
}

kernel void linear_chunk_o(constant AttentionParams& params [[buffer(ATTNPROTO_BUF_PARAMS)]],
                           device const uchar* q [[buffer(ATTNPROTO_BUF_LINEAR_O_Q)]],
                           device const uchar* k [[buffer(ATTNPROTO_BUF_LINEAR_O_K)]],
                           device const uchar* v [[buffer(ATTNPROTO_BUF_LINEAR_O_V)]],
                           device const float* states [[buffer(ATTNPROTO_BUF_LINEAR_O_STATES)]],
                           device uchar* o [[buffer(ATTNPROTO_BUF_LINEAR_O_O)]],
                           threadgroup uchar* smem [[threadgroup(ATTNPROTO_TG_SMEM)]],
                           uint3 tgid [[threadgroup_position_in_grid]],
                           ushort tid [[thread_index_in_threadgroup]],
                           ushort sg [[simdgroup_index_in_threadgroup]],
                           ushort lane [[thread_index_in_simdgroup]])
{
    ATTNPROTO_FC_STATIC_ASSERT(DTYPE == ATTNPROTO_DTYPE_F16 || DTYPE == ATTNPROTO_DTYPE_BF16,
                               "DTYPE must be ATTNPROTO_DTYPE_F16 or ATTNPROTO_DTYPE_BF16");
    if (DTYPE == ATTNPROTO_DTYPE_BF16) {
        chunk_o_impl(params, reinterpret_cast<device const bfloat*>(q), reinterpret_cast<device const bfloat*>(k),
                     reinterpret_cast<device const bfloat*>(v), states, reinterpret_cast<device bfloat*>(o), smem,
                     tgid, tid, sg, lane);
    } else {
        chunk_o_impl(params, reinterpret_cast<device const half*>(q), reinterpret_cast<device const half*>(k),
                     reinterpret_cast<device const half*>(v), states, reinterpret_cast<device half*>(o), smem, tgid,
                     tid, sg, lane);
    }
}
