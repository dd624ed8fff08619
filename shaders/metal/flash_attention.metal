// flash_attention.metal — Prototype 1 (tiled Flash Attention forward with simdgroup_matrix)
// and Prototype 7 (RoPE, ALiBi, GQA, sliding window and logit soft cap as function-constant
// variants of the same kernel).
//
// One threadgroup computes BLOCK_R query rows of one (batch, head); simdgroup s owns rows
// 8s .. 8s+7. Q is staged once into registers (simdgroup_matrix fragments, FP16/BF16);
// K and V stream through threadgroup memory in tiles of BLOCK_C keys, column chunk by
// column chunk (ATTNPROTO_FLASH_KV_CHUNK_D) so D = 256 fits in 32 KB. Scores S = Q K^T
// accumulate in FP32 fragments, go to threadgroup memory for the online softmax (four
// lanes per row, quad shuffles), come back as P in the element type, and O += P V
// accumulates in FP32 fragments. Row rescaling multiplies O by a diagonal 8x8 matrix, so
// the kernel never relies on the (undocumented) lane layout of a simdgroup_matrix.
//
// Masking: keys >= seq_kv and, with CAUSAL, keys j > i + seq_kv - seq_q (bottom-right
// aligned) get -inf scores; tails of Q/K/V tiles are zero-filled; a row that sees no key
// writes O = 0 and LSE = -inf (a masked score is a finite sentinel, see kMaskedScore).
// Softmax runs in base 2 (scores scaled by log2 e); LSE is written in natural log.
// NaN / inf: the policy of python/attnproto/ref.py (module doc), as far as an 8x8 matrix
// kernel can follow it. The row max propagates NaN (max_nan); a row whose running max is
// NaN or +inf ("invalid") contributes P = 0 and alpha = 0 from then on, so its O row stays
// finite and cannot spread through the diagonal rescale matrices (0 * NaN = NaN would
// reach the other 7 rows of the simdgroup), and is written as NaN (normalise factor NaN,
// LSE NaN) at the end; a row with keys whose l is 0 (every visible score -inf) is NaN too;
// "this row sees no key" is geometry, and such rows are stored as exact zeros. Deviation:
// a non-finite V element reaches that column of every row of a simdgroup that processes its
// key tile (P V and the rescale are 8x8 products), masked or not. These semantics need
// IEEE NaN / inf: the host compiles with fast math, under which the compiler may assume
// neither occurs. Statically checked only (tools/metal_check), never run on Apple hardware.
// RoPE (fused): K row j rotates at position j, Q row i at i + seq_kv - seq_q (the causal
// alignment), as attnproto.ref.attention(rope=True) defines it.
// SOFTCAP: the scaled score s becomes params.softcap * tanh(s / params.softcap) before the
// ALiBi bias and the mask (Gemma 2). WINDOW: query i (position p = i + seq_kv - seq_q) sees
// keys j > p - params.window only (Mistral / Gemma's left window; with CAUSAL also j <= p);
// key tiles wholly left of the threadgroup's window are never loaded, so the work scales
// with the window. The host checks params.window >= 1 and params.softcap > 0 when the
// constant is set; attnproto.ref.attention(window=..., softcap=...) is the reference.
//
// Launch: threadgroups (ceil(seq_q / BLOCK_R), num_heads, batch), ATTNPROTO_FLASH_THREADS
// (BLOCK_R) threads, ATTNPROTO_FLASH_TG_BYTES(...) bytes at [[threadgroup(ATTNPROTO_TG_SMEM)]].
#include <metal_stdlib>
#include "metal_bindings.h"
#include "rope_common.h"

using namespace metal;

constant int  HEAD_DIM  [[function_constant(ATTNPROTO_FC_HEAD_DIM)]];
constant int  BLOCK_R   [[function_constant(ATTNPROTO_FC_BLOCK_R)]];
constant int  BLOCK_C   [[function_constant(ATTNPROTO_FC_BLOCK_C)]];
constant int  DTYPE     [[function_constant(ATTNPROTO_FC_DTYPE)]];
constant bool CAUSAL    [[function_constant(ATTNPROTO_FC_CAUSAL)]];
constant bool ROPE      [[function_constant(ATTNPROTO_FC_ROPE)]];
constant bool ALIBI     [[function_constant(ATTNPROTO_FC_ALIBI)]];
constant int  GQA_GROUP [[function_constant(ATTNPROTO_FC_GQA_GROUP)]];
constant bool WINDOW    [[function_constant(ATTNPROTO_FC_WINDOW)]];
constant bool SOFTCAP   [[function_constant(ATTNPROTO_FC_SOFTCAP)]];

// Variants default to off when the host leaves their constant unset.
constant bool kCausal   = is_function_constant_defined(CAUSAL) && CAUSAL;
constant bool kRope     = is_function_constant_defined(ROPE) && ROPE;
constant bool kAlibi    = is_function_constant_defined(ALIBI) && ALIBI;
constant int  kGqaGroup = is_function_constant_defined(GQA_GROUP) ? GQA_GROUP : 0;
constant bool kWindow   = is_function_constant_defined(WINDOW) && WINDOW;
constant bool kSoftcap  = is_function_constant_defined(SOFTCAP) && SOFTCAP;

constant int kChunkD  = ATTNPROTO_FLASH_KV_CHUNK_D(HEAD_DIM);
constant int kThreads = ATTNPROTO_FLASH_THREADS(BLOCK_R);

constexpr constant int   kFrag      = ATTNPROTO_FRAG;
constexpr constant int   kSimdWidth = ATTNPROTO_SIMD_WIDTH;
constexpr constant int   kQuad      = 4;  // lanes that share one score row in the softmax
constexpr constant int   kMaxDFrags = ATTNPROTO_FLASH_MAX_HEAD_DIM / ATTNPROTO_FRAG;
constexpr constant int   kMaxCFrags = ATTNPROTO_FLASH_MAX_BLOCK_C / ATTNPROTO_FRAG;
constexpr constant float kLog2e     = 1.4426950408889634f;
constexpr constant float kLn2       = 0.6931471805599453f;
// Score of a masked key. Finite on purpose: Metal compiles with fast math by default, which
// lets the compiler assume no infinities, so -inf cannot be tested for inside the kernel.
// Real base-2 scores are bounded by |scale * q.k| + ALiBi, many orders of magnitude above.
constexpr constant float kMaskedScore = -1.0e30f;
// A running max at or above this is +inf or (failing the comparison) NaN: an invalid row.
constexpr constant float kMaxFiniteScore = 3.0e38f;

// max(a, b) that PROPAGATES NaN: NaN if either is NaN (metal::max / fmax return the other
// operand). A NaN compares unequal to itself; with fast math the compiler may drop that test.
static inline float max_nan(float a, float b)
{
    return (a < b || b != b) ? b : a;
}

// Stage rows [0, rows) x columns [col0, col0 + kChunkD) of a [*, HEAD_DIM] tensor whose
// rows are `ld` elements apart into dst (row-major, kChunkD wide). Rows at or past
// `valid_rows` become zero; with `rope`, row r is rotated as token position pos0 + r.
template <typename T>
static void stage_chunk(threadgroup T* dst, device const T* src, long ld, int rows,
                        int valid_rows, int col0, int pos0, bool rope, float rope_theta,
                        ushort tid)
{
    const int elems = rows * kChunkD;
    for (int e = tid; e < elems; e += kThreads) {
        const int r = e / kChunkD;
        const int d = col0 + e % kChunkD;
        float value = 0.0f;
        if (r < valid_rows) {
            device const T* row = src + long(r) * ld;
            value = float(row[d]);
            if (rope) {
                const int half_dim = HEAD_DIM / 2;
                const float partner = float(row[d < half_dim ? d + half_dim : d - half_dim]);
                value = attnproto_rope_rotate(value, partner, d, pos0 + r, HEAD_DIM, rope_theta);
            }
        }
        dst[e] = T(value);
    }
}

template <typename T>
static void flash_attention_impl(constant AttentionParams& p,
                                 device const T* q, device const T* k, device const T* v,
                                 device T* o, device float* lse, threadgroup uchar* smem,
                                 uint3 tgid, ushort tid, ushort sg, ushort lane)
{
    ATTNPROTO_FC_STATIC_ASSERT(HEAD_DIM > 0 && HEAD_DIM % ATTNPROTO_FRAG == 0 &&
                               HEAD_DIM <= ATTNPROTO_FLASH_MAX_HEAD_DIM,
                               "HEAD_DIM must be a multiple of 8 in [8, 256]");
    ATTNPROTO_FC_STATIC_ASSERT(BLOCK_R > 0 && BLOCK_R % ATTNPROTO_FRAG == 0,
                               "BLOCK_R must be a positive multiple of 8 (one simdgroup per 8 rows)");
    ATTNPROTO_FC_STATIC_ASSERT(BLOCK_C > 0 && BLOCK_C % ATTNPROTO_FRAG == 0 &&
                               BLOCK_C <= ATTNPROTO_FLASH_MAX_BLOCK_C,
                               "BLOCK_C must be a multiple of 8 in [8, 128]");
    ATTNPROTO_FC_STATIC_ASSERT(BLOCK_R <= BLOCK_C, "Q staging reuses the BLOCK_C-row K/V chunk buffer");
    ATTNPROTO_FC_STATIC_ASSERT(ATTNPROTO_FLASH_TG_BYTES(HEAD_DIM, BLOCK_R, BLOCK_C, sizeof(T)) <=
                               ATTNPROTO_TG_MEMORY_LIMIT,
                               "tile needs more than 32 KB of threadgroup memory");
    ATTNPROTO_FC_STATIC_ASSERT(!is_function_constant_defined(GQA_GROUP) || GQA_GROUP >= 0,
                               "GQA_GROUP must be >= 0");

    // ---- threadgroup memory: K/V chunk | S (float; P in T overwrites each row) | scratch ----
    threadgroup T* kv_tile = reinterpret_cast<threadgroup T*>(smem);
    threadgroup float* s_tile =
        reinterpret_cast<threadgroup float*>(smem + BLOCK_C * kChunkD * sizeof(T));
    threadgroup T* p_tile = reinterpret_cast<threadgroup T*>(s_tile);
    const int p_ld = BLOCK_C * int(sizeof(float) / sizeof(T));  // P row r starts where S row r does
    threadgroup float* scratch = s_tile + BLOCK_R * BLOCK_C + sg * kFrag * kFrag;

    const int b = int(tgid.z);
    const int h = int(tgid.y);
    const int q0 = int(tgid.x) * BLOCK_R;
    const int seq_q = int(p.seq_q);
    const int seq_kv = int(p.seq_kv);
    const int shift = seq_kv - seq_q;  // bottom-right alignment of queries against keys
    const int group = kGqaGroup > 0 ? kGqaGroup : int(p.num_heads / p.num_kv_heads);
    const int kv_head = h / group;

    device const T* q_base = q + b * p.q_stride[0] + h * p.q_stride[1] + long(q0) * p.q_stride[2];
    device const T* k_base = k + b * p.k_stride[0] + kv_head * p.k_stride[1];
    device const T* v_base = v + b * p.v_stride[0] + kv_head * p.v_stride[1];
    device T* o_base = o + b * p.o_stride[0] + h * p.o_stride[1];

    const float scale_log2 = p.scale * kLog2e;
    // Soft cap in base 2: cap * tanh(scale * raw / cap) * log2 e = cap_log2 * tanh(raw * inv_cap).
    const float cap_log2 = kSoftcap ? p.softcap * kLog2e : 0.0f;
    const float softcap_inv = kSoftcap ? p.scale / p.softcap : 0.0f;
    const int window = kWindow ? int(p.window) : 0;
    const float slope_log2 =
        kAlibi ? exp2(-p.alibi_max_bias * float(h + 1) / float(p.num_heads)) * kLog2e : 0.0f;

    // ---- Q -> registers (RoPE: query row i sits at position i + seq_kv - seq_q) ----
    const int q_valid = min(BLOCK_R, seq_q - q0);
    simdgroup_matrix<T, 8, 8> q_frag[kMaxDFrags];
    for (int c0 = 0; c0 < HEAD_DIM; c0 += kChunkD) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        stage_chunk(kv_tile, q_base, p.q_stride[2], BLOCK_R, q_valid, c0, q0 + shift, kRope, p.rope_theta, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int f = 0; f < kChunkD / kFrag; ++f) {
            simdgroup_load(q_frag[c0 / kFrag + f], kv_tile + sg * kFrag * kChunkD + f * kFrag, kChunkD);
        }
    }

    simdgroup_float8x8 o_acc[kMaxDFrags];
    for (int d = 0; d < HEAD_DIM / kFrag; ++d) {
        o_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    for (int e = lane; e < kFrag * kFrag; e += kSimdWidth) {
        scratch[e] = 0.0f;  // off-diagonal entries of the row-scaling matrix stay zero
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    const int row = lane / kQuad;      // row within this simdgroup's 8 rows
    const int quarter = lane % kQuad;  // this lane's share of the row's columns
    const int qi = q0 + sg * kFrag + row;
    const int q_pos = qi + shift;
    float m_run = kMaskedScore;  // running max of the base-2 scores
    float l_run = 0.0f;       // running sum of 2^(s - m_run)

    const int kv_end = kCausal ? clamp(q0 + q_valid + shift, 0, seq_kv) : seq_kv;
    // WINDOW: the first key the tile's first row sees is q0 + shift - window + 1 (64-bit: the
    // window may be up to 2^31 - 1); start at the key tile holding it.
    const long first_key = kWindow ? max(0L, long(q0 + shift) - long(window) + 1L) : 0L;
    const int kv_begin = int(min(first_key, long(seq_kv))) / BLOCK_C * BLOCK_C;
    for (int kv0 = kv_begin; kv0 < kv_end; kv0 += BLOCK_C) {
        const int kv_valid = min(BLOCK_C, seq_kv - kv0);

        // ---- S = Q K^T ----
        simdgroup_float8x8 s_acc[kMaxCFrags];
        for (int j = 0; j < BLOCK_C / kFrag; ++j) {
            s_acc[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
        for (int c0 = 0; c0 < HEAD_DIM; c0 += kChunkD) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
            stage_chunk(kv_tile, k_base + long(kv0) * p.k_stride[2], p.k_stride[2], BLOCK_C,
                        kv_valid, c0, kv0, kRope, p.rope_theta, tid);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (int j = 0; j < BLOCK_C / kFrag; ++j) {
                for (int f = 0; f < kChunkD / kFrag; ++f) {
                    simdgroup_matrix<T, 8, 8> k_frag;
                    simdgroup_load(k_frag, kv_tile + j * kFrag * kChunkD + f * kFrag, kChunkD,
                                   ulong2(0), true);
                    simdgroup_multiply_accumulate(s_acc[j], q_frag[c0 / kFrag + f], k_frag, s_acc[j]);
                }
            }
        }
        threadgroup float* s_rows = s_tile + sg * kFrag * BLOCK_C;
        for (int j = 0; j < BLOCK_C / kFrag; ++j) {
            simdgroup_store(s_acc[j], s_rows + j * kFrag, BLOCK_C);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        // ---- online softmax on this lane's quarter of its row ----
        threadgroup float* s_row = s_rows + row * BLOCK_C;
        float p_val[ATTNPROTO_FLASH_MAX_BLOCK_C / kQuad];
        float m_blk = kMaskedScore;
        for (int t = 0; t < BLOCK_C / kQuad; ++t) {
            const int key = kv0 + quarter + t * kQuad;
            const float raw = s_row[quarter + t * kQuad];
            float s = kSoftcap ? cap_log2 * precise::tanh(raw * softcap_inv) : raw * scale_log2;
            if (kAlibi) {
                s -= slope_log2 * float(abs(q_pos - key));
            }
            const bool in_window = !kWindow || long(key) > long(q_pos) - long(window);
            const bool visible = qi < seq_q && key < seq_kv && (!kCausal || key <= q_pos) && in_window;
            p_val[t] = visible ? s : kMaskedScore;
            m_blk = max_nan(m_blk, p_val[t]);
        }
        m_blk = max_nan(m_blk, quad_shuffle_xor(m_blk, 1));
        m_blk = max_nan(m_blk, quad_shuffle_xor(m_blk, 2));
        const float m_new = max_nan(m_run, m_blk);
        // NaN or +inf max (a NaN or +inf score, now or in an earlier tile: m_run keeps it):
        // the row is NaN whatever follows; it adds nothing more, so its O row stays finite.
        const bool invalid = !(m_new < kMaxFiniteScore);
        // exp2 of (masked - real) underflows to 0; (masked - masked) gives 1 on an all-zero O row.
        const float alpha = invalid ? 0.0f : exp2(m_run - m_new);
        float l_blk = 0.0f;
        for (int t = 0; t < BLOCK_C / kQuad; ++t) {
            p_val[t] = (invalid || p_val[t] == kMaskedScore) ? 0.0f : exp2(p_val[t] - m_new);
            l_blk += p_val[t];
        }
        l_blk += quad_shuffle_xor(l_blk, 1);
        l_blk += quad_shuffle_xor(l_blk, 2);
        l_run = l_run * alpha + l_blk;
        m_run = m_new;

        simdgroup_barrier(mem_flags::mem_threadgroup);  // every S read of the row precedes P writes
        threadgroup T* p_row = p_tile + (sg * kFrag + row) * p_ld;
        for (int t = 0; t < BLOCK_C / kQuad; ++t) {
            p_row[quarter + t * kQuad] = T(p_val[t]);
        }
        if (quarter == 0) {
            scratch[row * kFrag + row] = alpha;
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        // ---- O = diag(alpha) O + P V ----
        simdgroup_float8x8 rescale;
        simdgroup_load(rescale, scratch, kFrag);
        for (int d = 0; d < HEAD_DIM / kFrag; ++d) {
            simdgroup_multiply(o_acc[d], rescale, o_acc[d]);
        }
        simdgroup_matrix<T, 8, 8> p_frag[kMaxCFrags];
        for (int j = 0; j < BLOCK_C / kFrag; ++j) {
            simdgroup_load(p_frag[j], p_tile + sg * kFrag * p_ld + j * kFrag, p_ld);
        }
        for (int c0 = 0; c0 < HEAD_DIM; c0 += kChunkD) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
            stage_chunk(kv_tile, v_base + long(kv0) * p.v_stride[2], p.v_stride[2], BLOCK_C,
                        kv_valid, c0, kv0, false, p.rope_theta, tid);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (int f = 0; f < kChunkD / kFrag; ++f) {
                for (int j = 0; j < BLOCK_C / kFrag; ++j) {
                    simdgroup_matrix<T, 8, 8> v_frag;
                    simdgroup_load(v_frag, kv_tile + j * kFrag * kChunkD + f * kFrag, kChunkD);
                    simdgroup_multiply_accumulate(o_acc[c0 / kFrag + f], p_frag[j], v_frag,
                                                  o_acc[c0 / kFrag + f]);
                }
            }
        }
    }

    // ---- epilogue: O /= l, LSE, masked store through the scratch matrix ----
    // A row sees a key iff (causal) key 0 is at or left of its position (a window keeps key
    // min(p, seq_kv - 1) for every row: p <= seq_kv - 1 by the alignment). With a key, l = 0
    // means an invalid row or every visible score -inf: NaN (normalise factor and LSE).
    const bool has_key = !kCausal || q_pos >= 0;
    if (quarter == 0) {
        scratch[row * kFrag + row] = !has_key ? 0.0f : (l_run > 0.0f ? 1.0f / l_run : NAN);
        if (qi < seq_q) {
            lse[b * p.lse_stride[0] + h * p.lse_stride[1] + qi] =
                !has_key ? -INFINITY : (l_run > 0.0f ? (m_run + log2(l_run)) * kLn2 : NAN);
        }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 normalise;
    simdgroup_load(normalise, scratch, kFrag);
    for (int d = 0; d < HEAD_DIM / kFrag; ++d) {
        simdgroup_multiply(o_acc[d], normalise, o_acc[d]);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_store(o_acc[d], scratch, kFrag);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int e = lane; e < kFrag * kFrag; e += kSimdWidth) {
            const int out_row = q0 + sg * kFrag + e / kFrag;
            if (out_row < seq_q) {
                // Rows without a key are exact zeros, whatever another row's NaN did to them
                // through the 8x8 products.
                const bool row_has_key = !kCausal || out_row + shift >= 0;
                o_base[long(out_row) * p.o_stride[2] + d * kFrag + e % kFrag] =
                    row_has_key ? T(scratch[e]) : T(0.0f);
            }
        }
    }
}

kernel void flash_attention(constant AttentionParams& params [[buffer(ATTNPROTO_BUF_PARAMS)]],
                            device const uchar* q [[buffer(ATTNPROTO_BUF_Q)]],
                            device const uchar* k [[buffer(ATTNPROTO_BUF_K)]],
                            device const uchar* v [[buffer(ATTNPROTO_BUF_V)]],
                            device uchar* o [[buffer(ATTNPROTO_BUF_O)]],
                            device float* lse [[buffer(ATTNPROTO_BUF_LSE)]],
                            threadgroup uchar* smem [[threadgroup(ATTNPROTO_TG_SMEM)]],
                            uint3 tgid [[threadgroup_position_in_grid]],
                            ushort tid [[thread_index_in_threadgroup]],
                            ushort sg [[simdgroup_index_in_threadgroup]],
                            ushort lane [[thread_index_in_simdgroup]])
{
    ATTNPROTO_FC_STATIC_ASSERT(DTYPE == ATTNPROTO_DTYPE_F16 || DTYPE == ATTNPROTO_DTYPE_BF16,
                               "DTYPE must be ATTNPROTO_DTYPE_F16 or ATTNPROTO_DTYPE_BF16");
    if (DTYPE == ATTNPROTO_DTYPE_BF16) {
        flash_attention_impl(params, reinterpret_cast<device const bfloat*>(q),
                             reinterpret_cast<device const bfloat*>(k),
                             reinterpret_cast<device const bfloat*>(v),
                             reinterpret_cast<device bfloat*>(o), lse, smem, tgid, tid, sg, lane);
    } else {
        flash_attention_impl(params, reinterpret_cast<device const half*>(q),
                             reinterpret_cast<device const half*>(k),
                             reinterpret_cast<device const half*>(v),
                             reinterpret_cast<device half*>(o), lse, smem, tgid, tid, sg, lane);
    }
}
