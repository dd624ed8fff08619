// params.cpp — compile-time layout assertions for AttentionParams.
#include "params.h"

#include <type_traits>

namespace attnproto {

static_assert(std::is_standard_layout<AttentionParams>::value, "AttentionParams must be standard layout");
static_assert(sizeof(AttentionParams) == ATTNPROTO_PARAMS_SIZE, "AttentionParams size changed: update ATTNPROTO_PARAMS_SIZE, MSL and Python");
static_assert(alignof(AttentionParams) == 8, "AttentionParams is 8-byte aligned (64-bit strides)");

#define AP_FIELD(f, off) \
    static_assert(offsetof(AttentionParams, f) == (off), "AttentionParams::" #f " moved")
AP_FIELD(batch, 0);
AP_FIELD(num_heads, 4);
AP_FIELD(num_kv_heads, 8);
AP_FIELD(seq_q, 12);
AP_FIELD(seq_kv, 16);
AP_FIELD(head_dim, 20);
AP_FIELD(scale, 24);
AP_FIELD(rope_theta, 28);
AP_FIELD(alibi_max_bias, 32);
AP_FIELD(block_size, 36);
AP_FIELD(max_blocks_per_seq, 40);
AP_FIELD(num_partitions, 44);
AP_FIELD(partition_size, 48);
AP_FIELD(chunk_size, 52);
AP_FIELD(num_blocks, 56);
AP_FIELD(window, 60);
AP_FIELD(softcap, 64);
AP_FIELD(rope_offset, 68);
AP_FIELD(rope_table_len, 72);
AP_FIELD(q_stride, 80);
AP_FIELD(k_stride, 104);
AP_FIELD(v_stride, 128);
AP_FIELD(o_stride, 152);
AP_FIELD(lse_stride, 176);
#undef AP_FIELD

std::vector<FieldLayout> params_layout() {
#define AP_ROW(f) FieldLayout{#f, offsetof(AttentionParams, f), sizeof(AttentionParams::f)}
    return {AP_ROW(batch),          AP_ROW(num_heads),      AP_ROW(num_kv_heads),       AP_ROW(seq_q),
            AP_ROW(seq_kv),         AP_ROW(head_dim),       AP_ROW(scale),              AP_ROW(rope_theta),
            AP_ROW(alibi_max_bias), AP_ROW(block_size),     AP_ROW(max_blocks_per_seq), AP_ROW(num_partitions),
            AP_ROW(partition_size), AP_ROW(chunk_size),     AP_ROW(num_blocks),          AP_ROW(window),
            AP_ROW(softcap),        AP_ROW(rope_offset),    AP_ROW(rope_table_len),
            AP_ROW(q_stride),       AP_ROW(k_stride),       AP_ROW(v_stride),           AP_ROW(o_stride),
            AP_ROW(lse_stride)};
#undef AP_ROW
}

}  // namespace attnproto
