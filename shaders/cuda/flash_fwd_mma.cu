// flash_fwd_mma.cu — Flash Attention forward, warp-level tensor cores (mma.sync, sm_80+).
//
// O = softmax(scale * Q K^T, masked) V and LSE = logsumexp(scale * Q K^T) (natural log), with
// the Prototype 7 variants (include/variants.cuh: RoPE, ALiBi, sliding window, soft cap) as
// compile-time policies; semantics those of attnproto.ref.attention.
//   Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D], O like Q (FP16 or BF16, head_dim contiguous,
//   other strides from AttentionParams); LSE float32 [B, Hq, Nq] (token stride 1).
//   Query head h reads kv head h / (Hq / Hkv). Causal is bottom-right aligned: query i
//   sees keys j <= i + Nkv - Nq; a row that sees no key gets O = 0 and LSE = -inf.
//   p.scale must be positive (the running max is kept on unscaled scores).
//
// Launch: grid (ceil(Nq / BLOCK_R), Hq, B), block (WARPS * 32), dynamic shared memory
// fa_mma::kSmemBytes = (BLOCK_R + 2 * STAGES * BLOCK_C) * row bytes (include/fa_mma.cuh), which
// python/attnproto/ops/configs.py mirrors. Arguments: (p, q, k, v, o, lse, rope_cos, rope_sin,
// alibi_slopes); the last three are null where the variant reads none (traps if it needs one).
// Every tensor base and every token/head/batch stride must be 16-byte aligned.
//
// Design (FA2-style):
//   * CTA = BLOCK_R query rows of one (batch, head); warp w owns rows
//     [w * BLOCK_R / WARPS, (w + 1) * BLOCK_R / WARPS) as whole 16-row MMA tiles, so the
//     softmax of a row never leaves its quad of lanes.
//   * Q tile -> shared (cp.async) -> registers with ldmatrix, kept there when the
//     accumulators leave room (kQInRegs), otherwise re-read from shared per k step.
//   * K/V tiles of BLOCK_C keys stream through shared memory with 16-byte cp.async
//     (zero-filled past Nkv). STAGES = 1: one K and one V buffer, V_j loads during
//     S_j = Q K_j^T and K_{j+1} during O += P_j V_j. STAGES = 2: K and V double
//     buffered, tile j+1 loads during all of tile j; one barrier per tile.
//   * Rows of HEAD_DIM * 2 bytes, 16-byte chunk c of row r stored at chunk
//     c ^ (r % 8) within its group of 8 (XOR swizzle, HEAD_DIM % 64 == 0), or rows
//     padded by 16 bytes for other head dims: cp.async stores, ldmatrix loads and
//     the epilogue's 4-byte stores are all bank-conflict free.
//   * S via ldmatrix(K) -> mma.sync.m16n8k16 (f32 accumulate); online softmax
//     in registers (exp2 of scores pre-scaled by scale * log2(e)); P rounded to
//     16 bits in registers becomes the A operand of P V directly (the m16n8
//     accumulator layout of S equals the m16k16 A layout); V via ldmatrix.trans.
//   * Causal: query tiles in reverse order (heaviest first), tiles above the
//     diagonal never loaded, a warp skips the math of tiles its rows cannot see,
//     only tiles crossing the diagonal or the key tail are masked.
//   * Variants (include/fa_mma.cuh): RoPE rotates the Q tile once per CTA in shared memory
//     after its cp.async lands, and each K tile once it has landed (all threads, between two
//     barriers); soft cap and ALiBi turn the scores into log2-domain logits before the mask;
//     a window masks keys left of each row's window and key tiles left of the CTA's first
//     row's window are never loaded.
//   * Epilogue: O normalised, rounded, staged through the warp's own rows of the
//     Q buffer, written with 16-byte stores (rows >= Nq skipped); LSE by one
//     lane per row.
//
// The constants, helpers and stages live in include/fa_mma.cuh and the kernel's statements in
// include/fa_mma_kernel_body.cuh, shared with the Prototype 2 entry flash_fwd_mma_stitch.cu;
// this entry force-inlines the stages (fa_mma::InlineStages).
#include "cuda/include/fa_mma.cuh"

extern "C" __global__ void __launch_bounds__(fa_mma::kThreads, 1)
flash_fwd_mma(const AttentionParams p, const ap::u16* __restrict__ q, const ap::u16* __restrict__ k,
              const ap::u16* __restrict__ v, ap::u16* __restrict__ o, float* __restrict__ lse,
              const float* __restrict__ rope_cos, const float* __restrict__ rope_sin,
              const float* __restrict__ alibi_slopes) {
    const fa_mma::InlineStages stages{};
    const fa_mma::VariantBuffers variant_buffers{rope_cos, rope_sin, alibi_slopes};
#define FA_MMA_MASK_IN_SCORE 0
#include "cuda/include/fa_mma_kernel_body.cuh"
#undef FA_MMA_MASK_IN_SCORE
}
