// fa_mma_kernel_body.cuh — the statements of the mma.sync Flash Attention forward kernel,
// included textually INSIDE the body of each entry built on include/fa_mma.cuh:
//
//   extern "C" __global__ void __launch_bounds__(fa_mma::kThreads, 1)
//   entry(const AttentionParams p, const ap::u16* __restrict__ q, const ap::u16* __restrict__ k,
//         const ap::u16* __restrict__ v, ap::u16* __restrict__ o, float* __restrict__ lse, ...) {
//       const <stage policy> stages{...};   // fa_mma::InlineStages or a dispatching policy
//       const fa_mma::VariantBuffers variant_buffers{...};  // RoPE tables, ALiBi slopes (or {})
//   #define FA_MMA_MASK_IN_SCORE 0           // see below
//   #include "cuda/include/fa_mma_kernel_body.cuh"
//   }
//
// Why an include and not a __forceinline__ function template: moving these statements into
// an inlined function changes what NVVM makes of the causal loop at some shapes (HEAD_DIM=80
// BLOCK_R=64 BLOCK_C=64 WARPS=4 STAGES=2 CAUSAL=1 DTYPE=0 gets different SASS, 3475 vs 3491
// instruction lines, nvcc 13.0, sm_90a), and the production kernel must compile to the same
// SASS as before the split. Textual inclusion gives the compiler the identical function.
//
// `stages` supplies the per-tile stages: score, mask, softmax and accumulate. The entry
// defines FA_MMA_MASK_IN_SCORE first: 0 calls stages.score(4 args) and then, for tiles that
// need it, stages.mask() (fa_mma::InlineStages; this is the production kernel's code);
// 1 makes the mask part of the score stage, stages.score(..., needs_mask), so that a
// dispatched score stage is one call per tile. (Passing needs_mask into even a force-inlined
// score also changes the causal kernels' SASS, hence the preprocessor switch rather than a
// flag.) No include guard: included once per entry, inside its body.
//
// The Prototype 7 variants (include/fa_mma.cuh, include/variants.cuh) appear only under
// `if constexpr` on the variant policies, in the FA_MMA_MASK_IN_SCORE 0 path (the soft cap
// must precede the mask; the stitch entries take the base variant only): RoPE rotates the Q
// tile once after its cp.async lands and each K tile after its wait and barrier, then another
// barrier; soft cap / ALiBi run between score and mask; the window masks keys left of each
// row's window and the CTA starts at its first row's first visible key tile.
#ifndef FA_MMA_MASK_IN_SCORE
#error "define FA_MMA_MASK_IN_SCORE (0 or 1) before including fa_mma_kernel_body.cuh"
#endif
    using namespace fa_mma;
    extern __shared__ __attribute__((aligned(128))) unsigned char smem[];

    const int tid = threadIdx.x;
    const int warp = tid / ap::kWarpSize;
    const int lane = tid % ap::kWarpSize;
    const int seq_q = (int)p.seq_q;
    const int seq_kv = (int)p.seq_kv;
    const int causal_offset = seq_kv - seq_q;  // query i sees keys j <= i + causal_offset
    // exp2 multiplier of the softmax: scale * log2(e) on raw scores, or 1 where apply_score_mod
    // has made them log2-domain logits already (soft cap / ALiBi)
    const float scale_log2 = variant::kScoreMod ? 1.0f : p.scale * ap::kLog2e;

    // Causal: heaviest query tiles (most keys) first for load balance.
    const int tile_q = kCausal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int kv_head = head / (int)(p.num_heads / p.num_kv_heads);
    const int q0 = tile_q * kBlockR;
    const int warp_row0 = warp * kRowsPerWarp;   // first row of this warp within the tile
    const int warp_q0 = q0 + warp_row0;          // ... and within the sequence

    const u16* q_g = q + batch * p.q_stride[0] + head * p.q_stride[1];
    const u16* k_g = k + batch * p.k_stride[0] + kv_head * p.k_stride[1];
    const u16* v_g = v + batch * p.v_stride[0] + kv_head * p.v_stride[1];
    u16* o_g = o + batch * p.o_stride[0] + head * p.o_stride[1];
    float* lse_g = lse + batch * p.lse_stride[0] + head * p.lse_stride[1];

    check_variant_inputs(p, variant_buffers);
    // WINDOW: query at position pos sees keys > pos - window. Positions are below Nkv, so every
    // window >= Nkv shows every key: clamping to Nkv keeps pos - window from overflowing.
    const int window = min((int)p.window, seq_kv);
    variant::ScoreMod<false> score_mod{};
    if constexpr (variant::kScoreMod) score_mod.init(p, head, variant_buffers.alibi_slopes);
    variant::Rope rope{};
    if constexpr (variant::kRope) rope.init(p, variant_buffers.rope_cos, variant_buffers.rope_sin);

    // K/V tiles this CTA visits: all of them, or (causal) up to the last key its
    // last valid row can see.
    const int kv_tiles = (seq_kv + kBlockC - 1) / kBlockC;
    int n_tiles = kv_tiles;
    if constexpr (kCausal) {
        const int last_key = min(q0 + kBlockR, seq_q) - 1 + causal_offset;
        n_tiles = last_key < 0 ? 0 : min(kv_tiles, last_key / kBlockC + 1);
    }
    // WINDOW: the tiles before the first row's first visible key are outside every row's
    // window and never loaded: the CTA visits tiles [first_tile, n_tiles).
    int first_tile = 0;
    if constexpr (variant::kWindow) first_tile = variant::first_visible_key(q0 + causal_offset, window) / kBlockC;

    const u32 s_q = ap::smem_u32(smem);
    const u32 s_k = s_q + kQTileBytes;                        // kStages K tiles
    const u32 s_v = s_k + kStages * kKVTileBytes;             // kStages V tiles
    // The XOR addressing of ldm_addr needs 128-byte aligned tiles (the declaration
    // asks for it; a toolchain that ignored it would fail loudly here).
    if (kSwizzle && s_q % (kSwizzleGroup * kChunkBytes) != 0) ap::trap();

    // ldmatrix lane addresses (fragment layouts in common.cuh):
    //   A of Q K^T (Q) and B of P V (V, .trans): lane -> row lane % 16, half lane / 16;
    //   B of Q K^T (K): lane -> row lane % 8 + 8 * (lane / 16), half (lane / 8) % 2.
    const u32 q_lanes = s_q + ldm_lane_offset(warp_row0 + lane % 16, lane / 16);
    const u32 v_lane_off = ldm_lane_offset(lane % 16, lane / 16);
    const u32 k_lane_off = ldm_lane_offset(lane % 8 + 8 * (lane / 16), (lane / 8) % 2);

    float o_acc[kMTiles][kOTiles][kAccPerTile];
    float row_max[kMTiles][2];
    float row_sum[kMTiles][2];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int d = 0; d < kOTiles; ++d)
#pragma unroll
            for (int e = 0; e < kAccPerTile; ++e) o_acc[m][d][e] = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_max[m][h] = ap::neg_inf();
            row_sum[m][h] = 0.0f;
        }
    }
    u32 q_frag[kQInRegs ? kMTiles : 1][kQInRegs ? kQKSteps : 1][4];

    // This thread's first K/V chunk; the strides and the fallback source of
    // zero-filled chunks are re-read from the parameter block (constant bank)
    // instead of occupying registers through the loop.
    using KVCopy = TileCopy<kBlockC>;
    const u16* k_mine = KVCopy::thread_start(k_g, p.k_stride[2], tid);
    const u16* v_mine = KVCopy::thread_start(v_g, p.v_stride[2], tid);

    if (n_tiles > first_tile) {
        // Prologue: Q (own group), then K_0 (STAGES = 1) or K_0 + V_0 (STAGES = 2) (tile 0 being
        // first_tile, in the stage the loop expects it in).
        using QCopy = TileCopy<kBlockR>;
        QCopy::copy(s_q, QCopy::thread_start(q_g, p.q_stride[2], tid), p.q_stride[2], q0, seq_q, q, tid);
        ap::cp_async_commit();
        const int first_col = first_tile * kBlockC;
        const u32 first_stage = kStages == 2 ? (u32)(first_tile & 1) * kKVTileBytes : 0u;
        KVCopy::copy(s_k + first_stage, k_mine, p.k_stride[2], first_col, seq_kv, k, tid);
        if constexpr (kStages == 2) KVCopy::copy(s_v + first_stage, v_mine, p.v_stride[2], first_col, seq_kv, v, tid);
        ap::cp_async_commit();
        ap::cp_async_wait<1>();
        __syncthreads();
        if constexpr (variant::kRope) {
            // Q landed (K_0 may still be in flight): rotate it once, before any ldmatrix reads it.
            rope_tile<kBlockR>(s_q, seq_q - q0, rope.offset + q0 + causal_offset, rope, tid);
            __syncthreads();
        }
        if constexpr (kQInRegs) {
#pragma unroll
            for (int m = 0; m < kMTiles; ++m)
#pragma unroll
                for (int kk = 0; kk < kQKSteps; ++kk) ap::ldmatrix_x4(q_frag[m][kk], ldm_addr(q_lanes, m * kMmaM, kk));
        }
    }

    for (int j = first_tile; j < n_tiles; ++j) {
        const int stage = kStages == 2 ? (j & 1) : 0;
        const int col0 = j * kBlockC;
        const u32 k_tile = s_k + stage * kKVTileBytes;
        const u32 v_tile = s_v + stage * kKVTileBytes;

        // Tile j's loads have landed for every thread, and every warp is done with
        // tile j-1, whose buffers the loads below may overwrite.
        ap::cp_async_wait<0>();
        __syncthreads();
        if constexpr (kStages == 1) {
            KVCopy::copy(s_v, v_mine, p.v_stride[2], col0, seq_kv, v, tid);
        } else if (j + 1 < n_tiles) {
            const u32 next = (stage ^ 1) * kKVTileBytes;
            KVCopy::copy(s_k + next, k_mine, p.k_stride[2], col0 + kBlockC, seq_kv, k, tid);
            KVCopy::copy(s_v + next, v_mine, p.v_stride[2], col0 + kBlockC, seq_kv, v, tid);
        }
        ap::cp_async_commit();
        if constexpr (variant::kRope) {
            // K_j landed for every thread (the wait and barrier above): rotate it in place.
            rope_tile<kBlockC>(k_tile, seq_kv - col0, rope.offset + col0, rope, tid);
            __syncthreads();
        }

        // Warp-uniform: does any row of this warp see a key of the tile, and does
        // any (row, key) pair of the tile need masking (key tail, diagonal, window)?
        bool warp_sees_tile = !kCausal || col0 <= warp_q0 + kRowsPerWarp - 1 + causal_offset;
        bool needs_mask = col0 + kBlockC > seq_kv ||
                          (kCausal && col0 + kBlockC - 1 > warp_q0 + causal_offset);
        if constexpr (variant::kWindow) {
            // The warp's first row has the leftmost window, its last row the rightmost.
            warp_sees_tile = warp_sees_tile &&
                             col0 + kBlockC > variant::first_visible_key(warp_q0 + causal_offset, window);
            needs_mask = needs_mask || col0 <= warp_q0 + kRowsPerWarp - 1 + causal_offset - window;
        }
        float s[kMTiles][kSTiles][kAccPerTile];
        if (warp_sees_tile) {
#if FA_MMA_MASK_IN_SCORE
            static_assert(!variant::kScoreMod && !variant::kWindow,
                          "FA_MMA_MASK_IN_SCORE 1 (the stitch entries) takes the base variant only");
            stages.score(s, q_frag, q_lanes, k_tile + k_lane_off, warp_q0, col0, seq_kv, causal_offset, lane,
                         needs_mask);
#else
            stages.score(s, q_frag, q_lanes, k_tile + k_lane_off);
            if constexpr (variant::kScoreMod) apply_score_mod(s, warp_q0, col0, causal_offset, lane, score_mod);
            if (needs_mask) stages.mask(s, warp_q0, col0, seq_kv, causal_offset, lane, window);
#endif
            stages.softmax(s, row_max, row_sum, o_acc, scale_log2);
        }

        if constexpr (kStages == 1) {
            // V_j landed; every warp is done reading K_j.
            ap::cp_async_wait<0>();
            __syncthreads();
            if (j + 1 < n_tiles) KVCopy::copy(s_k, k_mine, p.k_stride[2], col0 + kBlockC, seq_kv, k, tid);
            ap::cp_async_commit();
        }

        if (warp_sees_tile) stages.accumulate(o_acc, s, v_tile + v_lane_off);
    }

    // ---------------------------------------------------------------- epilogue
    // Only this warp ever read its rows of the Q buffer (and every cp.async into
    // them completed before the first tile; RoPE's writes to them before a barrier), so it
    // may reuse them for O.
    ap::syncwarp();
    const int g = lane / ap::kQuadSize;
    const int t = lane % ap::kQuadSize;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = ap::quad_sum(row_sum[m][h]);
            const int row = warp_row0 + m * kMmaM + g + h * (kMmaM / 2);
            // NaN / inf policy (python/attnproto/ref.py, module doc): whether the row sees a
            // key is geometry (causal: its first key, key 0, is at or left of its position),
            // never l > 0, so a row whose l is NaN (a NaN or +inf score) keeps O and LSE NaN.
            // With a key, l >= 1 (the max contributes 2^0) for finite scores, so the
            // approximate reciprocal and log2 (error ~2^-22) are safe; l = 0 means every
            // visible score was -inf (an inf input): O = 0 * rcp(0) = NaN, LSE NaN. A row
            // with no key writes O = 0 exactly (selected: even if a masked NaN in V reached
            // its accumulator through 0 * NaN) and LSE = -inf. A window never empties a row: a
            // row at position pos >= 0 still sees key max(0, pos - window + 1) <= pos (window
            // >= 1), and without causal every row sees key Nkv - 1.
            const bool has_key = !kCausal || q0 + row + causal_offset >= 0;
            const float inv_l = has_key ? ap::rcp_approx(l) : 0.0f;
            const float mx_scaled = row_max[m][h] * scale_log2;
            const float row_lse = l > 0.0f ? (mx_scaled + ap::log2_approx(l)) * ap::kLn2
                                           : (has_key ? ap::quiet_nan() : ap::neg_inf());
#pragma unroll
            for (int d = 0; d < kOTiles; ++d) {
                const u32 rounded = ap::pack_half2<kDtype>(o_acc[m][d][2 * h] * inv_l, o_acc[m][d][2 * h + 1] * inv_l);
                const u32 packed = has_key ? rounded : 0u;  // +0.0 in both halves
                ap::st_shared_b32(s_q + chunk_offset(row, d) + t * 2 * kElemBytes, packed);
            }
            if (t == 0 && q0 + row < seq_q) lse_g[q0 + row] = row_lse;
        }
    }
    ap::syncwarp();

    constexpr int kOutChunks = kRowsPerWarp * kChunksPerRow;
    static_assert(kOutChunks % ap::kWarpSize == 0, "epilogue: warp rows x chunks must fill whole warps");
#pragma unroll
    for (int i = 0; i < kOutChunks / ap::kWarpSize; ++i) {
        const int idx = lane + i * ap::kWarpSize;
        const int row = warp_row0 + idx / kChunksPerRow;
        const int c = idx % kChunksPerRow;
        if (q0 + row < seq_q) {
            u32 val[4];
            ap::ld_shared_v4(s_q + chunk_offset(row, c), val);
            ap::st_global_v4(o_g + (long long)(q0 + row) * p.o_stride[2] + c * kChunkElems, val);
        }
    }
