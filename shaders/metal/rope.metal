// rope.metal — Prototype 7 standalone RoPE: Y = rope(X) for a [batch, heads, tokens, HEAD_DIM]
// tensor (Q or K), rotate-half convention, position = token index. Y may alias X: each
// thread reads and writes only its own pair (i, i + HEAD_DIM/2) of one token.
//
// Params used: batch, num_heads (heads of THIS tensor), seq_q (tokens), head_dim, rope_theta,
// q_stride (X strides {b, h, token}), o_stride (Y strides).
// Launch: threads (HEAD_DIM/2, tokens, batch*heads) in any threadgroup shape; out-of-range
// threads return.
#include <metal_stdlib>
#include "metal_bindings.h"
#include "rope_common.h"

using namespace metal;

constant int HEAD_DIM [[function_constant(ATTNPROTO_FC_HEAD_DIM)]];
constant int DTYPE    [[function_constant(ATTNPROTO_FC_DTYPE)]];

template <typename T>
static void rope_impl(constant AttentionParams& p, device const T* x, device T* y, uint3 gid)
{
    ATTNPROTO_FC_STATIC_ASSERT(HEAD_DIM > 0 && HEAD_DIM % 2 == 0, "RoPE needs an even HEAD_DIM");
    const int half_dim = HEAD_DIM / 2;
    const int pair = int(gid.x);
    const int token = int(gid.y);
    const int bh = int(gid.z);
    if (pair >= half_dim || token >= int(p.seq_q) || bh >= int(p.batch * p.num_heads)) {
        return;
    }
    const int b = bh / int(p.num_heads);
    const int h = bh % int(p.num_heads);
    device const T* x_row = x + b * p.q_stride[0] + h * p.q_stride[1] + long(token) * p.q_stride[2];
    device T* y_row = y + b * p.o_stride[0] + h * p.o_stride[1] + long(token) * p.o_stride[2];
    const float lo = float(x_row[pair]);
    const float hi = float(x_row[pair + half_dim]);
    y_row[pair] = T(attnproto_rope_rotate(lo, hi, pair, token, HEAD_DIM, p.rope_theta));
    y_row[pair + half_dim] = T(attnproto_rope_rotate(hi, lo, pair + half_dim, token, HEAD_DIM, p.rope_theta));
}

kernel void rope(constant AttentionParams& params [[buffer(ATTNPROTO_BUF_PARAMS)]],
                 device const uchar* x [[buffer(ATTNPROTO_BUF_ROPE_X)]],
                 device uchar* y [[buffer(ATTNPROTO_BUF_ROPE_Y)]],
                 uint3 gid [[thread_position_in_grid]])
{
    ATTNPROTO_FC_STATIC_ASSERT(DTYPE == ATTNPROTO_DTYPE_F16 || DTYPE == ATTNPROTO_DTYPE_BF16,
                               "DTYPE must be ATTNPROTO_DTYPE_F16 or ATTNPROTO_DTYPE_BF16");
    if (DTYPE == ATTNPROTO_DTYPE_BF16) {
        rope_impl(params, reinterpret_cast<device const bfloat*>(x), reinterpret_cast<device bfloat*>(y), gid);
    } else {
        rope_impl(params, reinterpret_cast<device const half*>(x), reinterpret_cast<device half*>(y), gid);
    }
}
