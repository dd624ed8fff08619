// metal_bindings.h — the one place the Metal binding indices come from.
//
// Included by every MSL kernel (shaders/metal/*.metal) and by the Objective-C++
// host (csrc/metal/metal_backend.mm). tools/metal_check/check.py parses this file
// and cross-checks the shaders' [[buffer(N)]] / [[function_constant(N)]] uses
// against the host's binding table, so an index changed on one side only fails CI.
//
// Plain #defines on purpose: they must be usable inside MSL attributes
// ([[buffer(ATTNPROTO_BUF_Q)]]), in Objective-C++ (atIndex:ATTNPROTO_BUF_Q) and
// in the checker's C++ builds.
#ifndef ATTNPROTO_METAL_BINDINGS_H
#define ATTNPROTO_METAL_BINDINGS_H

#include "../common/attn_params.h"

// ---- function-constant indices ([[function_constant(N)]]); set by name on the host ----
#define ATTNPROTO_FC_HEAD_DIM   0   // int: D, a multiple of 8, at most ATTNPROTO_FLASH_MAX_HEAD_DIM
#define ATTNPROTO_FC_BLOCK_R    1   // int: query rows per threadgroup (8 per simdgroup)
#define ATTNPROTO_FC_BLOCK_C    2   // int: key/value rows per inner tile
#define ATTNPROTO_FC_CAUSAL     3   // bool: bottom-right aligned causal mask
#define ATTNPROTO_FC_DTYPE      4   // int: element type of Q/K/V/O, ATTNPROTO_DTYPE_*
#define ATTNPROTO_FC_ROPE       5   // bool: rotate-half RoPE applied to Q and K while staging
#define ATTNPROTO_FC_ALIBI      6   // bool: ALiBi bias added to the scores
#define ATTNPROTO_FC_GQA_GROUP  7   // int: query heads per KV head fixed at compile time; 0 = from params
                                    //      (paged kernels: required, 1..ATTNPROTO_PAGED_MAX_GROUP)
#define ATTNPROTO_FC_BLOCK_SIZE 8   // int: paged KV: tokens per physical cache block
#define ATTNPROTO_FC_PARTITION_SIZE 9  // int: paged KV: tokens per partition (a multiple of BLOCK_SIZE)
#define ATTNPROTO_FC_CHUNK_SIZE 10    // int: linear attention: tokens per chunk
#define ATTNPROTO_FC_WINDOW    11   // bool: left sliding window of params.window tokens (keys j > pos - window)
#define ATTNPROTO_FC_SOFTCAP   12   // bool: logit soft cap, score -> params.softcap * tanh(score / params.softcap)

// ---- element types (values of DTYPE) ----
#define ATTNPROTO_DTYPE_F16  0
#define ATTNPROTO_DTYPE_BF16 1

// ---- buffer indices ([[buffer(N)]]); the host binds kernel arguments in this order ----
#define ATTNPROTO_BUF_PARAMS ATTNPROTO_PARAMS_BUFFER_INDEX  // constant AttentionParams&
#define ATTNPROTO_BUF_Q      1
#define ATTNPROTO_BUF_K      2
#define ATTNPROTO_BUF_V      3
#define ATTNPROTO_BUF_O      4
#define ATTNPROTO_BUF_LSE    5
// rope: X (read) and Y (written, may alias X); strides from q_stride (X) and o_stride (Y)
#define ATTNPROTO_BUF_ROPE_X 1
#define ATTNPROTO_BUF_ROPE_Y 2
// paged_attention (phase 1, decode): Q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]
// (strides k_stride/v_stride = {block, kv head, token}); block table int32 [B, max_blocks_per_seq];
// context lengths int32 [B]; per-partition outputs float32, contiguous: O parts [B, Hq, P, D],
// LSE parts [B, Hq, P] (natural log; a partition past the context is (0, -inf)).
#define ATTNPROTO_BUF_PAGED_Q            1
#define ATTNPROTO_BUF_PAGED_K_CACHE      2
#define ATTNPROTO_BUF_PAGED_V_CACHE      3
#define ATTNPROTO_BUF_PAGED_BLOCK_TABLE  4
#define ATTNPROTO_BUF_PAGED_CONTEXT_LENS 5
#define ATTNPROTO_BUF_PAGED_O_PARTS      6
#define ATTNPROTO_BUF_PAGED_LSE_PARTS    7
// paged_reduce (phase 2): the parts above -> O [B, Hq, D] (element type, strides o_stride
// {b, h, -}) and LSE float32 [B, Hq] (strides lse_stride {b, h}).
#define ATTNPROTO_BUF_REDUCE_O_PARTS      1
#define ATTNPROTO_BUF_REDUCE_LSE_PARTS    2
#define ATTNPROTO_BUF_REDUCE_CONTEXT_LENS 3
#define ATTNPROTO_BUF_REDUCE_O            4
#define ATTNPROTO_BUF_REDUCE_LSE          5
// linear_chunk_h: K, V [B, H, N, D] (strides {b, h, token}) -> states float32 [B, H, num_chunks, D, D]
#define ATTNPROTO_BUF_LINEAR_H_K      1
#define ATTNPROTO_BUF_LINEAR_H_V      2
#define ATTNPROTO_BUF_LINEAR_H_STATES 3
// linear_chunk_o: Q, K, V [B, H, N, D], the states above -> O [B, H, N, D] (strides o_stride)
#define ATTNPROTO_BUF_LINEAR_O_Q      1
#define ATTNPROTO_BUF_LINEAR_O_K      2
#define ATTNPROTO_BUF_LINEAR_O_V      3
#define ATTNPROTO_BUF_LINEAR_O_STATES 4
#define ATTNPROTO_BUF_LINEAR_O_O      5
// smoke: y = alpha * x + y over n elements
#define ATTNPROTO_BUF_SMOKE_X     0
#define ATTNPROTO_BUF_SMOKE_Y     1
#define ATTNPROTO_BUF_SMOKE_ALPHA 2
#define ATTNPROTO_BUF_SMOKE_N     3

// ---- threadgroup memory ----
// Index of the dynamically sized threadgroup allocation ([[threadgroup(N)]]).
#define ATTNPROTO_TG_SMEM 0
// Threadgroup memory an Apple GPU family 9 threadgroup may use (seed NFR-1).
#define ATTNPROTO_TG_MEMORY_LIMIT 32768
// Metal requires threadgroup memory lengths in multiples of 16 bytes.
#define ATTNPROTO_TG_MEMORY_GRANULE 16

// ---- flash_attention geometry, shared by the kernel (static_assert in checks) and the host ----
#define ATTNPROTO_SIMD_WIDTH 32          // threads per simdgroup on Apple GPUs
#define ATTNPROTO_FRAG 8                 // simdgroup_matrix is 8x8
#define ATTNPROTO_FLASH_MAX_HEAD_DIM 256 // register arrays are sized for this D
#define ATTNPROTO_FLASH_MAX_BLOCK_C 128  // register arrays are sized for this Bc
// K/V (and Q) are staged through threadgroup memory in column chunks of this many
// elements, so D = 256 fits the 32 KB budget: the largest of D (if <= 64), 64, 32, 16, 8
// that divides D.
#define ATTNPROTO_FLASH_KV_CHUNK_D(D) \
    ((D) <= 64 ? (D) : ((D) % 64 == 0 ? 64 : ((D) % 32 == 0 ? 32 : ((D) % 16 == 0 ? 16 : 8))))
// Bytes of threadgroup memory flash_attention needs: one K/V chunk (Bc x chunk elements),
// the score tile (Br x Bc float; P overwrites it in the element type), and one 8x8 float
// scratch matrix per simdgroup (row-scaling diagonal, output staging).
#define ATTNPROTO_FLASH_TG_BYTES(D, BR, BC, ELEM_BYTES)              \
    ((BC) * ATTNPROTO_FLASH_KV_CHUNK_D(D) * (ELEM_BYTES) +           \
     (BR) * (BC) * 4 +                                               \
     ((BR) / ATTNPROTO_FRAG) * ATTNPROTO_FRAG * ATTNPROTO_FRAG * 4)
// Threads per flash_attention threadgroup: one simdgroup per 8 query rows.
#define ATTNPROTO_FLASH_THREADS(BR) (((BR) / ATTNPROTO_FRAG) * ATTNPROTO_SIMD_WIDTH)

// ---- paged decode geometry (paged_attention.metal, paged_reduce.metal), shared with the host ----
// Four simdgroups per threadgroup: enough lanes to stage a cache block and to hold the
// GQA_GROUP x HEAD_DIM output accumulators in registers (at most 16 per thread at the maxima
// below) while several threadgroups stay resident per core.
#define ATTNPROTO_PAGED_THREADS 128
#define ATTNPROTO_PAGED_MAX_HEAD_DIM 256   // accumulator registers are sized for this D
#define ATTNPROTO_PAGED_MAX_GROUP 8        // ... and this GQA group (Llama-2/3 70B, TinyLlama: 8)
#define ATTNPROTO_PAGED_MAX_BLOCK_SIZE 128 // the seeds' largest cache block (AC-3.3: 8 .. 128)
#define ATTNPROTO_PAGED_MAX_ACC \
    ((ATTNPROTO_PAGED_MAX_GROUP * ATTNPROTO_PAGED_MAX_HEAD_DIM) / ATTNPROTO_PAGED_THREADS)
// paged_attention's threadgroup memory, region by region (the kernel carves its allocation
// with these offsets, so the budget below is the kernel's own layout):
//   Q of the group's heads, pre-scaled, float [G][D] | scores / probabilities of one block,
//   float [G][BS] | running (max, sum, rescale) per head, float [G][3] | one cache block of
//   K, then of V, element type [BS][D].
#define ATTNPROTO_PAGED_STATS 3
#define ATTNPROTO_PAGED_TG_Q_BYTES(D, G) ((G) * (D) * 4)
#define ATTNPROTO_PAGED_TG_S_BYTES(BS, G) ((G) * (BS) * 4)
#define ATTNPROTO_PAGED_TG_STATS_BYTES(G) ((G) * ATTNPROTO_PAGED_STATS * 4)
#define ATTNPROTO_PAGED_TG_KV_BYTES(D, BS, ELEM_BYTES) ((BS) * (D) * (ELEM_BYTES))
#define ATTNPROTO_PAGED_TG_BYTES(D, BS, G, ELEM_BYTES)                          \
    (ATTNPROTO_PAGED_TG_Q_BYTES(D, G) + ATTNPROTO_PAGED_TG_S_BYTES(BS, G) +     \
     ATTNPROTO_PAGED_TG_STATS_BYTES(G) + ATTNPROTO_PAGED_TG_KV_BYTES(D, BS, ELEM_BYTES))
// paged_reduce: one weight per partition and one float per simdgroup (cross-simdgroup max
// and sum). At most this many partitions per sequence: 2048 x a 512-token partition is a
// 1M-token context, in 8 KB of weights.
#define ATTNPROTO_PAGED_MAX_PARTITIONS 2048
#define ATTNPROTO_PAGED_REDUCE_THREADS 128
#define ATTNPROTO_PAGED_REDUCE_TG_BYTES(P) \
    ((P) * 4 + (ATTNPROTO_PAGED_REDUCE_THREADS / ATTNPROTO_SIMD_WIDTH) * 4)

// ---- chunked linear attention geometry (linear_chunk_h.metal, linear_chunk_o.metal) ----
// Tokens staged through threadgroup memory at a time: the budget does not grow with the chunk.
#define ATTNPROTO_LINEAR_SUB 32
#define ATTNPROTO_LINEAR_H_COLS 32         // state (value) columns per chunk_h threadgroup
#define ATTNPROTO_LINEAR_O_ROWS 32         // query rows per chunk_o threadgroup (<= ATTNPROTO_LINEAR_SUB)
#define ATTNPROTO_LINEAR_MAX_HEAD_DIM 128  // chunk_o keeps Q and O fragments of this D in registers
#define ATTNPROTO_LINEAR_MAX_CHUNK 256     // the seeds' largest chunk (AC-4.3)
// chunk_h: one simdgroup per 8 state rows; K of SUB tokens (all D columns) + V of SUB tokens
// (H_COLS columns), element type.
#define ATTNPROTO_LINEAR_H_THREADS(D) (((D) / ATTNPROTO_FRAG) * ATTNPROTO_SIMD_WIDTH)
#define ATTNPROTO_LINEAR_H_TG_BYTES(D, ELEM_BYTES) \
    ((ATTNPROTO_LINEAR_SUB * (D) + ATTNPROTO_LINEAR_SUB * ATTNPROTO_LINEAR_H_COLS) * (ELEM_BYTES))
// chunk_o: one simdgroup per 8 query rows; a staging buffer (Q rows, a column block of H[c], K or
// V of SUB tokens, element type) | S float [O_ROWS][SUB] | P [O_ROWS][SUB] | one 8x8 float scratch
// per simdgroup. H[c] is staged in column blocks of ATTNPROTO_LINEAR_O_HCOLS(D).
#define ATTNPROTO_LINEAR_O_THREADS ((ATTNPROTO_LINEAR_O_ROWS / ATTNPROTO_FRAG) * ATTNPROTO_SIMD_WIDTH)
#define ATTNPROTO_LINEAR_O_HCOLS(D) ((D) <= 64 ? (D) : 64)
#define ATTNPROTO_LINEAR_O_STAGE_ELEMS(D)                                         \
    ((D) * ATTNPROTO_LINEAR_O_HCOLS(D) > ATTNPROTO_LINEAR_SUB * (D) ? (D) * ATTNPROTO_LINEAR_O_HCOLS(D) \
                                                                    : ATTNPROTO_LINEAR_SUB * (D))
#define ATTNPROTO_LINEAR_O_TG_BYTES(D, ELEM_BYTES)                                       \
    (ATTNPROTO_LINEAR_O_STAGE_ELEMS(D) * (ELEM_BYTES) +                                  \
     ATTNPROTO_LINEAR_O_ROWS * ATTNPROTO_LINEAR_SUB * 4 + ATTNPROTO_LINEAR_O_ROWS * ATTNPROTO_LINEAR_SUB * (ELEM_BYTES) + \
     (ATTNPROTO_LINEAR_O_ROWS / ATTNPROTO_FRAG) * ATTNPROTO_FRAG * ATTNPROTO_FRAG * 4)

// Checks on function-constant values. Real MSL function constants are resolved when the
// pipeline is created, so they are not constant expressions to the front end: there the
// host enforces the same conditions (csrc/metal/metal_backend.mm) before creating a
// pipeline. The Linux static check (tools/metal_check) turns each function constant into
// a constexpr of one specialisation, where these become static_asserts.
#if defined(ATTNPROTO_METAL_STANDIN)
#define ATTNPROTO_FC_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define ATTNPROTO_FC_STATIC_ASSERT(cond, msg)
#endif

#endif  // ATTNPROTO_METAL_BINDINGS_H
