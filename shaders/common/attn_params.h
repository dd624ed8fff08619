// attn_params.h — the one parameter block shared by the C++ host, CUDA (NVRTC)
// and Metal (MSL) kernels of attnproto.
//
// Every kernel receives an AttentionParams by value (CUDA: kernel parameter;
// Metal: a constant buffer at index ATTNPROTO_PARAMS_BUFFER_INDEX). The layout is
// fixed: 80 bytes of 32-bit fields followed by 64-bit strides; the host
// asserts the offsets in C++ (csrc/params.cpp) and Python checks them against
// attnproto.params.PARAMS_DTYPE. (80 bytes of 32-bit fields since the Prototype 7
// variants: window, softcap and the RoPE position fields.)
//
// Tensor layouts (all strides in ELEMENTS, the head_dim axis always contiguous):
//   Q   [batch, num_heads,    seq_q,  head_dim]   strides q_stride = {b, h, token}
//   K,V [batch, num_kv_heads, seq_kv, head_dim]   strides k_stride/v_stride = {b, h, token}
//       paged: a block pool, e.g. [num_blocks, block_size, num_kv_heads, head_dim] (vLLM / FlashInfer
//       "NHD"), strides = {block, kv head, token} (any order of the three outer axes)
//   O   [batch, num_heads,    seq_q,  head_dim]   strides o_stride = {b, h, token}
//   LSE [batch, num_heads,    seq_q]  float32     strides lse_stride = {b, h}, token stride 1
#ifndef ATTNPROTO_ATTN_PARAMS_H
#define ATTNPROTO_ATTN_PARAMS_H

#if defined(__METAL_VERSION__)
typedef uint  ap_u32;
typedef long  ap_i64;   // MSL long is 64-bit
typedef float ap_f32;
#elif defined(__CUDACC_RTC__) || defined(__CUDACC__)
typedef unsigned int ap_u32;
typedef long long    ap_i64;
typedef float        ap_f32;
#else
#include <stdint.h>
typedef uint32_t ap_u32;
typedef int64_t  ap_i64;
typedef float    ap_f32;
#endif

// Buffer index of the parameter block in Metal kernels (MSL [[buffer(n)]]).
#define ATTNPROTO_PARAMS_BUFFER_INDEX 0
// Size in bytes of AttentionParams; asserted by the host and by Python.
#define ATTNPROTO_PARAMS_SIZE 192

struct AttentionParams {
    // ---- problem shape and variant values (32-bit, bytes 0..79) ----
    ap_u32 batch;              // B: sequences in the batch
    ap_u32 num_heads;          // Hq: query heads
    ap_u32 num_kv_heads;       // Hkv: key/value heads; Hq % Hkv == 0, GQA group = Hq / Hkv
    ap_u32 seq_q;              // Nq: query tokens per sequence
    ap_u32 seq_kv;             // Nkv: key/value tokens per sequence (paged: longest context)
    ap_u32 head_dim;           // D: elements per head row; a kernel specialised on HEAD_DIM requires equality
    ap_f32 scale;              // multiplier applied to Q.K^T before the softmax (usually 1/sqrt(D))
    ap_f32 rope_theta;         // RoPE base frequency theta (e.g. 10000.0); read only by RoPE variants
    ap_f32 alibi_max_bias;     // ALiBi: slope of head h (0-based) = 2^(-alibi_max_bias * (h+1) / Hq); 8.0 in the paper
    ap_u32 block_size;         // paged KV: tokens per physical cache block; 0 = contiguous K/V
    ap_u32 max_blocks_per_seq; // paged KV: entries per row of the int32 block table [B, max_blocks_per_seq]
    ap_u32 num_partitions;     // two-phase (V2) attention: KV partitions per (sequence, head)
    ap_u32 partition_size;     // two-phase (V2) attention: KV tokens per partition
    ap_u32 chunk_size;         // linear attention: tokens per chunk
    ap_u32 num_blocks;         // paged KV: blocks in the pool; kernels check every table entry against it
    ap_u32 window;             // sliding window (WINDOW variants): query at position p sees keys j > p - window; 0 = none
    ap_f32 softcap;            // logit soft cap (SOFTCAP variants): score -> softcap * tanh(score / softcap); 0 = none
    ap_u32 rope_offset;        // RoPE: position of key 0 (query i sits at rope_offset + i + seq_kv - seq_q)
    ap_u32 rope_table_len;     // RoPE with a cos/sin table: rows of the float32 [rope_table_len, D/2] tables
    // ---- strides in elements (64-bit, bytes 80..191) ----
    ap_i64 q_stride[3];        // Q: {batch, head, token}
    ap_i64 k_stride[3];        // K: {batch or block, kv head, token}
    ap_i64 v_stride[3];        // V: {batch or block, kv head, token}
    ap_i64 o_stride[3];        // O: {batch, head, token}
    ap_i64 lse_stride[2];      // LSE (float32): {batch, head}; token stride is 1
};

#endif  // ATTNPROTO_ATTN_PARAMS_H
