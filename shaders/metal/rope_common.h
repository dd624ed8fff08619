// rope_common.h — rotate-half rotary position embedding, shared by the standalone
// rope kernel and the RoPE variant of flash_attention so both round identically.
//
// Convention (Llama / GPT-NeoX): element d of a head row pairs with d +- D/2; pair i
// (0 <= i < D/2) rotates by angle pos * theta^(-2i/D):
//   y[i]       = x[i] cos - x[i + D/2] sin
//   y[i + D/2] = x[i + D/2] cos + x[i] sin
#ifndef ATTNPROTO_ROPE_COMMON_H
#define ATTNPROTO_ROPE_COMMON_H

#include <metal_stdlib>

// Rotation angle of pair `pair` at token position `pos`. precise:: because the angle
// grows with the position and fast-math sin/cos lose accuracy at large arguments.
inline float attnproto_rope_angle(int pos, int pair, int head_dim, float theta)
{
    const float exponent = -2.0f * float(pair) / float(head_dim);
    return float(pos) * metal::precise::pow(theta, exponent);
}

// Rotated value of element d given x[d] and its partner x[d +- D/2].
inline float attnproto_rope_rotate(float x, float partner, int d, int pos, int head_dim, float theta)
{
    const int half_dim = head_dim / 2;
    const bool first_half = d < half_dim;
    const float angle = attnproto_rope_angle(pos, first_half ? d : d - half_dim, head_dim, theta);
    const float c = metal::precise::cos(angle);
    const float s = metal::precise::sin(angle);
    return first_half ? x * c - partner * s : x * c + partner * s;
}

#endif  // ATTNPROTO_ROPE_COMMON_H
