// variants.cuh — the Prototype 7 attention variants as compile-time policies, shared by the
// CUDA flash kernels (flash_fwd_wgmma.cu, the mma.sync family) and later the paged kernels.
//
// A kernel includes this header with five constants defined (all required; the host passes
// every one, attnproto.ops.variants.Variant.constants):
//   ROPE        0 none, 1 rotate-half (GPT-NeoX / Llama: element i pairs with i + D/2),
//               2 interleaved (GPT-J: element 2i pairs with 2i + 1)
//   ROPE_TABLE  0 cos/sin computed in the kernel, 1 read from float32 tables [rope_table_len, D/2]
//   ALIBI       0 none, 1 standard slopes 2^(-alibi_max_bias (h+1) / Hq), 2 slopes from a buffer [Hq]
//   WINDOW      0 none, 1 left sliding window of AttentionParams::window tokens
//   SOFTCAP     0 none, 1 logit soft cap AttentionParams::softcap (Gemma 2)
// Semantics (attnproto.ref.attention, the FP64 reference): s = scale q.k; s = cap tanh(s / cap);
// s -= slope_h |pos_q - key|; then the masks (keys >= Nkv, causal, window: key > pos_q - window),
// with pos_q = i + Nkv - Nq the query's bottom-right-aligned position. RoPE rotates query i at
// position rope_offset + pos_q and key j at rope_offset + j.
//
// The kernels never branch on a variant's name: each policy below is a struct whose members
// compile to nothing when the variant is off (`if constexpr` on its constants), so the base
// kernel (all five 0) is the kernel it was before the variants existed.
#ifndef ATTNPROTO_VARIANTS_CUH
#define ATTNPROTO_VARIANTS_CUH

#include "common/attn_params.h"

#ifndef ROPE
#error "ROPE must be defined (0 none, 1 rotate-half, 2 interleaved)"
#endif
#ifndef ROPE_TABLE
#error "ROPE_TABLE must be defined (0 computed, 1 cos/sin table)"
#endif
#ifndef ALIBI
#error "ALIBI must be defined (0 none, 1 standard slopes, 2 slopes buffer)"
#endif
#ifndef WINDOW
#error "WINDOW must be defined (0 or 1)"
#endif
#ifndef SOFTCAP
#error "SOFTCAP must be defined (0 or 1)"
#endif

namespace variant {

constexpr int kRopeNone = 0, kRopeHalf = 1, kRopeInterleaved = 2;
constexpr int kAlibiNone = 0, kAlibiStandard = 1, kAlibiSlopes = 2;

static_assert(ROPE == kRopeNone || ROPE == kRopeHalf || ROPE == kRopeInterleaved,
              "ROPE must be 0 (none), 1 (rotate-half) or 2 (interleaved)");
static_assert(ROPE_TABLE == 0 || ROPE_TABLE == 1, "ROPE_TABLE must be 0 (computed) or 1 (table)");
static_assert(ROPE != kRopeNone || ROPE_TABLE == 0,
              "ROPE_TABLE=1 without ROPE: a cos/sin table is only read by a RoPE variant");
static_assert(ALIBI == kAlibiNone || ALIBI == kAlibiStandard || ALIBI == kAlibiSlopes,
              "ALIBI must be 0 (none), 1 (standard slopes) or 2 (slopes buffer)");
static_assert(WINDOW == 0 || WINDOW == 1, "WINDOW must be 0 or 1");
static_assert(SOFTCAP == 0 || SOFTCAP == 1, "SOFTCAP must be 0 or 1");

constexpr bool kRope = ROPE != kRopeNone;
constexpr bool kRopeTable = ROPE_TABLE == 1;
constexpr bool kInterleaved = ROPE == kRopeInterleaved;
constexpr bool kAlibi = ALIBI != kAlibiNone;
constexpr bool kWindow = WINDOW == 1;
constexpr bool kSoftcap = SOFTCAP == 1;
// Whether scores are transformed before the softmax (then the kernel's exp2 argument is the
// transformed logit times log2(e), not the raw score times scale * log2(e)).
constexpr bool kScoreMod = kAlibi || kSoftcap;

constexpr float kLog2e = 1.4426950408889634f;

// ---- logits transform: soft cap, then ALiBi (per query head) ----
// tanh on the special-function unit (MUFU.TANH; max relative error 2^-10.99, PTX ISA): one
// instruction where the accurate tanhf is a ~20-instruction branchy routine per score. The
// kernels' error stays within the FP64 gate's bound (tests/test_variants_gpu.py).
__device__ __forceinline__ float tanh_approx(float x) {
    float r;
    asm("tanh.approx.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

// Under a causal mask every visible key j is at or left of the query (pos_q >= j), so the ALiBi
// bias -slope (pos_q - j) = slope (j - ref) - slope (pos_q - ref) for any reference position ref:
// the second term is one constant per row, which cancels in the softmax and is added back to
// LSE (row_shift_log2); the first is one value per key column, shared by the thread's rows.
// ref = the warpgroup's first query position keeps both terms small near the diagonal, where
// the softmax mass is (positions are exact in float32 below 2^24). Without the causal mask the
// bias is -slope |pos_q - j| per element.
template <bool kCausalMask>
struct ScoreMod {
    static constexpr bool kLinearAlibi = kAlibi && kCausalMask;
    float scale_log2;       // scale * log2(e)
    float scale_over_cap;   // scale / cap (kSoftcap)
    float cap_log2;         // cap * log2(e) (kSoftcap)
    float slope_log2;       // ALiBi slope of the thread's query head, times log2(e) (kAlibi)

    __device__ __forceinline__ void init(const AttentionParams& p, int head, const float* __restrict__ slopes) {
        scale_log2 = p.scale * kLog2e;
        scale_over_cap = kSoftcap ? p.scale / p.softcap : 0.f;
        cap_log2 = kSoftcap ? p.softcap * kLog2e : 0.f;
        float slope = 0.f;
        if constexpr (ALIBI == kAlibiStandard)
            slope = exp2f(-p.alibi_max_bias * (float)(head + 1) / (float)p.num_heads);
        if constexpr (ALIBI == kAlibiSlopes) slope = __ldg(slopes + head);
        slope_log2 = slope * kLog2e;
    }
    // Linear ALiBi: the bias of key column `key_minus_ref` (key - ref); 0 otherwise.
    __device__ __forceinline__ float col_bias(float key_minus_ref) const {
        return kLinearAlibi ? slope_log2 * key_minus_ref : 0.f;
    }
    // The log2-domain logit of raw score s (q.k). col: col_bias() of the key; q_minus_key: pos_q - key
    // (read only by ALiBi without the causal mask).
    __device__ __forceinline__ float logit_log2(float s, float col, float q_minus_key) const {
        float x = kSoftcap ? cap_log2 * tanh_approx(s * scale_over_cap) : s * scale_log2;
        if constexpr (kLinearAlibi) x += col;
        else if constexpr (kAlibi) x = fmaf(-slope_log2, fabsf(q_minus_key), x);
        return x;
    }
    // What linear ALiBi removed from the row at position q_pos (log2 domain): LSE adds it back.
    __device__ __forceinline__ float row_shift_log2(int q_minus_ref) const {
        return kLinearAlibi ? -slope_log2 * (float)q_minus_ref : 0.f;
    }
};

// ---- the left sliding window (on top of the causal mask and the key-count mask) ----
// Query at position q_pos sees key j iff j > q_pos - window.
__device__ __forceinline__ bool outside_window(int q_pos, int key, int window) {
    return kWindow && key <= q_pos - window;
}
// First key any query at position >= q_pos0 may see (0 without a window).
__device__ __forceinline__ int first_visible_key(int q_pos0, int window) {
    return kWindow ? max(0, q_pos0 - window + 1) : 0;
}

// ---- RoPE: cos/sin of pair i at position pos ----
// Computed cos/sin: the float32 angle pos * inv_freq as torch / HF form it, reduced to
// [-pi, pi] with a two-term 2*pi (Cody-Waite), then the special-function unit's sin and cos
// (absolute error ~2^-21 on [-pi, pi], CUDA C Programming Guide, intrinsic functions): far below
// the float32 angle's own rounding at large positions, and ~10x fewer instructions than sincosf.
constexpr float kInvTwoPi = 0.15915494309189535f;
constexpr float kTwoPiHi = 6.28318548202514648f;      // float(2 pi)
constexpr float kTwoPiLo = -1.7484556e-07f;           // 2 pi - float(2 pi)

__device__ __forceinline__ void fast_sincos(float angle, float& s, float& c) {
    const float k = rintf(angle * kInvTwoPi);
    const float r = fmaf(-k, kTwoPiLo, fmaf(-k, kTwoPiHi, angle));
    __sincosf(r, &s, &c);
}

struct Rope {
    const float* __restrict__ cos_table;   // [table_len, D/2] (kRopeTable)
    const float* __restrict__ sin_table;
    int half;                              // D / 2: the table's row length and the pair count
    int table_len;
    int offset;                            // position of key 0
    float neg_log2_theta_over_half;        // inv_freq_i = 2^(i * this) = theta^(-2i/D)

    __device__ __forceinline__ void init(const AttentionParams& p, const float* cos_t, const float* sin_t) {
        cos_table = cos_t;
        sin_table = sin_t;
        half = (int)p.head_dim / 2;
        table_len = (int)p.rope_table_len;
        offset = (int)p.rope_offset;
        neg_log2_theta_over_half = -log2f(p.rope_theta) / (float)half;
    }
    // Positions outside the table are never read (the host checks rope_offset + Nkv <= table_len).
    __device__ __forceinline__ bool in_range(int pos) const { return !kRopeTable || (pos >= 0 && pos < table_len); }
    __device__ __forceinline__ float inv_freq(int i) const { return exp2f((float)i * neg_log2_theta_over_half); }
    // cos/sin of the kN consecutive pairs [i0, i0 + kN) at position pos (inv: their inv_freq, computed path).
    template <int kN>
    __device__ __forceinline__ void cos_sin(int pos, int i0, const float (&inv)[kN], float (&c)[kN], float (&s)[kN]) const {
        if constexpr (kRopeTable) {
            static_assert(kN % 4 == 0, "table rows are read as float4");
            const float4* ct = reinterpret_cast<const float4*>(cos_table + (long long)pos * half + i0);
            const float4* st = reinterpret_cast<const float4*>(sin_table + (long long)pos * half + i0);
#pragma unroll
            for (int q = 0; q < kN / 4; ++q) {
                const float4 cv = __ldg(ct + q), sv = __ldg(st + q);
                c[4 * q] = cv.x; c[4 * q + 1] = cv.y; c[4 * q + 2] = cv.z; c[4 * q + 3] = cv.w;
                s[4 * q] = sv.x; s[4 * q + 1] = sv.y; s[4 * q + 2] = sv.z; s[4 * q + 3] = sv.w;
            }
        } else {
#pragma unroll
            for (int q = 0; q < kN; ++q) fast_sincos((float)pos * inv[q], s[q], c[q]);
        }
    }
};

// Rotates one pair (x1, x2) by the angle of (c, s).
__device__ __forceinline__ void rotate(float& x1, float& x2, float c, float s) {
    const float a = x1 * c - x2 * s;
    const float b = x2 * c + x1 * s;
    x1 = a;
    x2 = b;
}

// Two 16-bit values of one 32-bit word as floats (lo = the lower column).
template <bool kBF16> __device__ __forceinline__ void unpack2(ap_u32 w, float& lo, float& hi) {
    if constexpr (kBF16) {
        lo = __uint_as_float(w << 16);
        hi = __uint_as_float(w & 0xffff0000u);
    } else {
        const unsigned short lo16 = (unsigned short)(w & 0xffffu), hi16 = (unsigned short)(w >> 16);
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(lo) : "h"(lo16));
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(hi) : "h"(hi16));
    }
}

}  // namespace variant

#endif  // ATTNPROTO_VARIANTS_CUH
