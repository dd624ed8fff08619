// linear_chunk_h.cu — chunked causal linear attention, pass 1: the state before
// every chunk, H_c = S_{cC-1} (see include/linear.cuh for the math).
//
// One block per (BLOCK_DK x BLOCK_DV state tile, batch, kv head). The block walks
// the sequence in tiles of TILE_T tokens, keeping its state tile in FP32
// registers for the whole walk:
//     H <- gamma^TILE_T H + K_tile^T diag(gamma^(TILE_T-1-j)) V_tile    (tensor cores)
// and writes H to h[b, hkv, c] whenever a chunk boundary is reached, rounded
// to the element type (the operand type chunk_o's tensor cores read it in).
// Only full chunks feed later states, so the walk covers tokens
// [0, (num_chunks - 1) * CHUNK) and never reads past the sequence.
//
// Where the running state lives. A tensor core's FP32 accumulation is not an
// IEEE add: it aligns the addends to the largest exponent with a few extra
// bits and normalizes the sum by truncation (round toward zero; Fasi et al.,
// PeerJ CS 7:e330, 2021), so every MMA that accumulates into the state shrinks
// it by up to 1 ulp, and that bias does not average out over the walk. Per
// element of H that is ~2^-24 relative per MMA, times the MMAs in the chain:
//   FP32 (3xTF32, k8): 3 * TILE_T / 8 = 24 MMAs per 64-token tile; at
//     N = 65,536 that is ~24,500 MMAs, a ~1.5e-3 relative error of H (seen on
//     H100: FP32 output off by 5.7e-4 at RMS 0.25, 2.2x the tolerance of
//     AC-4.2). So on the FP32 path the tensor cores accumulate each tile into
//     zeroed registers (24 MMAs: ~1.4e-6 of the tile's contribution, of random
//     sign across tiles) and the tile is folded into a separate FP32 state with
//     one round-to-nearest FFMA per element per tile (random error,
//     ~sqrt(N / TILE_T) * 2^-25 ~ 1e-6 relative at N = 65,536: no compensated
//     summation needed).
//   16-bit (k16): TILE_T / 16 = 4 MMAs per tile, ~4,100 at N = 65,536: ~2.4e-4
//     relative, no larger than the rounding of the stored state (unit roundoff
//     2^-11 fp16, 2^-8 bf16) and 40x below the half-precision rtol of 1e-2
//     (still below it at N = 1M). There the state stays in the accumulators,
//     sparing 4 * BLOCK_DV / 8 registers and the per-tile fold on the fast path.
//
// Warps split the BLOCK_DK rows (16 each); every warp spans all BLOCK_DV
// columns. K/V tiles stream through a LIN_H_STAGES-deep cp.async ring.
//
// Grid: x = (HEAD_DIM / BLOCK_DK) * (HEAD_DIM / BLOCK_DV) (dv tile fastest, so
// blocks sharing a K tile run together and hit L2), y = batch * num_kv_heads.
// Block: LIN_H_THREADS. Dynamic shared memory: linear_chunk_h_smem_bytes below
// (the host computes the same number in python/attnproto/ops/linear.py).
//
// Arguments: p (AttentionParams: batch, num_kv_heads, seq_kv, head_dim,
// chunk_size, k_stride, v_stride), K, V, h [batch, num_kv_heads, num_chunks,
// HEAD_DIM, HEAD_DIM] contiguous, log2_decay float32 [num_kv_heads]
// (log2 gamma; read only when HAS_DECAY).
#include "common/attn_params.h"
#include "cuda/include/linear.cuh"

#ifndef DTYPE
#error "DTYPE must be defined (0 = float16, 1 = bfloat16, 2 = float32)"
#endif
#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef CHUNK
#error "CHUNK must be defined (tokens per chunk)"
#endif
#ifndef BLOCK_DV
#error "BLOCK_DV must be defined (state columns per block)"
#endif
#ifndef HAS_DECAY
#error "HAS_DECAY must be defined (0 or 1)"
#endif

// Four warps of 16 state rows each: the block's state tile is 64 rows deep.
#define LIN_H_WARPS 4
#define LIN_H_THREADS (LIN_H_WARPS * 32)
#define LIN_H_BLOCK_DK (LIN_H_WARPS * 16)
// Tokens per streamed tile: 64 keeps a 16-bit stage at 18 KB; smaller chunks
// use the chunk itself so that a tile never straddles a chunk boundary.
#define LIN_H_MAX_TILE_T 64
#define LIN_H_TILE_T (CHUNK < LIN_H_MAX_TILE_T ? CHUNK : LIN_H_MAX_TILE_T)
// Three tiles in flight per block (~55 KB of 16-bit loads, four blocks per SM
// by shared memory): well above the ~25 KB per SM that Little's law asks for
// at ~3.3 TB/s and ~1 us latency on 132 SMs.
#define LIN_H_STAGES 3

namespace {

using namespace lin;
typedef Traits<DTYPE>::elem elem_t;

constexpr int kD = HEAD_DIM;
constexpr int kDK = LIN_H_BLOCK_DK;
constexpr int kDV = BLOCK_DV;
constexpr int kT = LIN_H_TILE_T;
constexpr int kStages = LIN_H_STAGES;
constexpr int kKStep = Traits<DTYPE>::kstep;
constexpr int kKUnroll = Traits<DTYPE>::kk_unroll;
constexpr int kLdK = kDK + pad_col<DTYPE>();   // K tile read down columns (A = K^T)
constexpr int kLdV = kDV + pad_col<DTYPE>();   // V tile read down columns (B = V)
constexpr int kStageElems = kT * kLdK + kT * kLdV;
constexpr int kNT = kDV / kMmaN;               // 8-column accumulator tiles per warp
// FP32 inputs keep the running state out of the tensor-core accumulators (see
// the header: truncating accumulation over thousands of MMAs).
constexpr bool kSeparateState = DTYPE == kF32;

static_assert(DTYPE == kF16 || DTYPE == kBF16 || DTYPE == kF32, "DTYPE must be 0, 1 or 2");
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "HEAD_DIM must be 64 or 128");
static_assert(CHUNK == 32 || CHUNK == 64 || CHUNK == 128 || CHUNK == 256, "CHUNK must be 32, 64, 128 or 256");
static_assert(HAS_DECAY == 0 || HAS_DECAY == 1, "HAS_DECAY must be 0 or 1");
static_assert(BLOCK_DV == 16 || BLOCK_DV == 32 || BLOCK_DV == 64, "BLOCK_DV must be 16, 32 or 64");
static_assert(BLOCK_DV <= HEAD_DIM && HEAD_DIM % BLOCK_DV == 0, "BLOCK_DV must divide HEAD_DIM");
static_assert(HEAD_DIM % LIN_H_BLOCK_DK == 0, "HEAD_DIM must be a multiple of the 64-row state tile");
static_assert(CHUNK % LIN_H_TILE_T == 0, "the token tile must divide the chunk");
static_assert(LIN_H_TILE_T % 16 == 0, "the token tile must be a whole number of MMA k steps");
static_assert(kNT % 2 == 0, "B fragments are loaded two 8-column tiles at a time");

}  // namespace

// Shared memory: the K/V ring plus the per-token decay table.
constexpr int linear_chunk_h_smem_bytes =
    kStages * kStageElems * elem_bytes<DTYPE>() + (HAS_DECAY ? kT * 4 : 0);
static_assert(linear_chunk_h_smem_bytes <= 227 * 1024, "linear_chunk_h: shared memory over the 227 KB Hopper limit");

extern "C" __global__ void __launch_bounds__(LIN_H_THREADS, 1)
linear_chunk_h(const AttentionParams p, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
               elem_t* __restrict__ h, const float* __restrict__ log2_decay) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    elem_t* ring = reinterpret_cast<elem_t*>(smem_raw);
    float* tok_decay = reinterpret_cast<float*>(smem_raw + kStages * kStageElems * elem_bytes<DTYPE>());

    const int warp = (int)threadIdx.x / kWarpSize;
    const int lane = (int)threadIdx.x % kWarpSize;
    const int g = lane / 4, t4 = lane % 4;

    constexpr int kTilesDV = kD / kDV;
    const int dk0 = ((int)blockIdx.x / kTilesDV) * kDK;
    const int dv0 = ((int)blockIdx.x % kTilesDV) * kDV;
    const int bh = (int)blockIdx.y;
    const int b = bh / (int)p.num_kv_heads;
    const int hk = bh % (int)p.num_kv_heads;

    const int n = (int)p.seq_kv;
    const int num_chunks = (n + CHUNK - 1) / CHUNK;
    const int num_tiles = (num_chunks - 1) * (CHUNK / kT);   // tiles feeding some later chunk

    const elem_t* kg = k + (i64)b * p.k_stride[0] + (i64)hk * p.k_stride[1] + dk0;
    const elem_t* vg = v + (i64)b * p.v_stride[0] + (i64)hk * p.v_stride[1] + dv0;
    elem_t* hg = h + (i64)bh * num_chunks * kD * kD;

    float tile_decay = 1.0f;   // gamma^TILE_T
    if constexpr (HAS_DECAY) {
        const float l2g = log2_decay[hk];
        tile_decay = exp2f(l2g * (float)kT);
        for (int j = (int)threadIdx.x; j < kT; j += LIN_H_THREADS)
            tok_decay[j] = exp2f(l2g * (float)(kT - 1 - j));
        // Made visible to all warps by the first __syncthreads of the loop.
    }

    auto load_stage = [&](int tile, int slot) {
        elem_t* ks = ring + slot * kStageElems;
        elem_t* vs = ks + kT * kLdK;
        const i64 tok = (i64)tile * kT;
        load_tile_async<DTYPE, kT, kDK, kLdK, LIN_H_THREADS>(ks, kg + tok * p.k_stride[2], p.k_stride[2], kT);
        load_tile_async<DTYPE, kT, kDV, kLdV, LIN_H_THREADS>(vs, vg + tok * p.v_stride[2], p.v_stride[2], kT);
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < num_tiles) load_stage(s, s);
        cp_async_commit();
    }

    // acc: tensor-core accumulators. 16-bit: the running state itself. FP32:
    // one tile's K^T V, zeroed per tile and folded into `sep` (the running
    // state); `state` names whichever holds the state (unused `sep` of the
    // 16-bit path is dead code and takes no registers).
    float acc[kNT][4];
    float sep[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = sep[j][e] = 0.0f;
    float (&state)[kNT][4] = kSeparateState ? sep : acc;

    const int row0 = dk0 + warp * kMmaM + g;   // this lane's state rows: row0, row0 + 8
    auto store_state = [&](int chunk) {
        elem_t* dst = hg + (i64)chunk * kD * kD;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
            const int col = dv0 + j * kMmaN + 2 * t4;
            store_pair<DTYPE>(dst + (i64)row0 * kD + col, state[j][0], state[j][1]);
            store_pair<DTYPE>(dst + (i64)(row0 + 8) * kD + col, state[j][2], state[j][3]);
        }
    };

    constexpr int kTilesPerChunk = CHUNK / kT;
    for (int tile = 0; tile < num_tiles; ++tile) {
        if (tile % kTilesPerChunk == 0) store_state(tile / kTilesPerChunk);

        cp_async_wait<kStages - 2>();
        __syncthreads();   // tile `tile` visible to all; slot (tile - 1) % kStages free
        const int next = tile + kStages - 1;
        if (next < num_tiles) load_stage(next, next % kStages);
        cp_async_commit();

        const elem_t* ks = ring + (tile % kStages) * kStageElems;
        const elem_t* vs = ks + kT * kLdK;
        if constexpr (kSeparateState || HAS_DECAY) {
            // FP32: start the tile's product from zero. 16-bit: decay the state.
#pragma unroll
            for (int j = 0; j < kNT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[j][e] = kSeparateState ? 0.0f : acc[j][e] * tile_decay;
        }
#pragma unroll kKUnroll
        for (int kk = 0; kk < kT; kk += kKStep) {
            FragA<DTYPE> a;
            load_a_colmajor<DTYPE, kLdK, HAS_DECAY != 0>(a, ks, warp * kMmaM, kk, tok_decay + kk);
#pragma unroll
            for (int j = 0; j < kNT; j += 2) {
                FragB<DTYPE> bb;
                load_b_rowmajor_x2<DTYPE, kLdV>(bb, vs, kk, j * kMmaN);
                mma_frag<DTYPE>(acc[j], a, bb, 0);
                mma_frag<DTYPE>(acc[j + 1], a, bb, 1);
            }
        }
        if constexpr (kSeparateState) {
            // H <- gamma^TILE_T H + tile, one IEEE rounding per element.
#pragma unroll
            for (int j = 0; j < kNT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    sep[j][e] = HAS_DECAY ? fmaf(sep[j][e], tile_decay, acc[j][e]) : sep[j][e] + acc[j][e];
        }
    }
    cp_async_wait<0>();
    store_state(num_chunks - 1);
}
