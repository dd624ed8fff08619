// linear_chunk_o.cu — chunked causal linear attention, pass 2: the output
//     o_i = scale * (gamma^(i+1) q_i H_c + sum_{j<=i, same chunk} gamma^(i-j) (q_i . k_j) v_j)
// for every token i of chunk c, with H_c from linear_chunk_h (math in include/linear.cuh).
//
// One block per (BLOCK_Q query rows, batch, query head); BLOCK_Q divides CHUNK,
// so a block's rows share one chunk c and one state H_c. Each warp owns 16 query
// rows and all HEAD_DIM output columns (FP32 accumulators):
//   1. Q tile, H_c (skipped for c = 0, where H_0 = 0) and the first K/V tile
//      arrive in one cp.async group; O = Q H_c on tensor cores, rows scaled by
//      gamma^(i+1).
//   2. For each BLOCK_Q-key tile of the chunk up to the diagonal: S = Q K^T
//      (FP32), causal mask on the diagonal tile, decay gamma^(i-j), S rounded to
//      the operand type in registers (the accumulator layout is the next A
//      fragment) and O += S V. Key tiles and k steps wholly above the diagonal
//      of a warp's rows are skipped: the intra-chunk products cost the causal
//      half of C^2 D, rounded up to whole MMA tiles.
//   3. O *= scale, staged through the warp's own rows of the Q tile, written
//      with 16-byte stores.
// With GQA, query head h reads K, V and H of kv head h / (num_heads / num_kv_heads).
//
// Grid: x = ceil(seq_q / BLOCK_Q), y = batch * num_heads. Block: 32 * BLOCK_Q / 16.
// Dynamic shared memory: linear_chunk_o_smem_bytes (mirrored by the host).
// Arguments: p, Q, K, V, h (as written by linear_chunk_h), O, log2_decay float32
// [num_kv_heads] (read only when HAS_DECAY).
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
#ifndef BLOCK_Q
#error "BLOCK_Q must be defined (query rows per block, 16 per warp)"
#endif
#ifndef STAGES
#error "STAGES must be defined (1 or 2 K/V tiles in flight)"
#endif
#ifndef HAS_DECAY
#error "HAS_DECAY must be defined (0 or 1)"
#endif

#define LIN_O_WARPS (BLOCK_Q / 16)
#define LIN_O_THREADS (LIN_O_WARPS * 32)

namespace {

using namespace lin;
typedef Traits<DTYPE>::elem elem_t;

constexpr int kD = HEAD_DIM;
constexpr int kBQ = BLOCK_Q;
constexpr int kThreads = LIN_O_THREADS;
constexpr int kKStep = Traits<DTYPE>::kstep;
constexpr int kKUnroll = Traits<DTYPE>::kk_unroll;
constexpr int kTilesPerK = kKStep / kMmaN;     // 8-column S tiles per P.V k step (2 or 1)
constexpr int kLdQ = kD + pad_row<DTYPE>();    // Q and K: read along rows
constexpr int kLdH = kD + pad_col<DTYPE>();    // H and V: read down columns
constexpr int kQElems = kBQ * kLdQ;
constexpr int kHElems = kD * kLdH;
constexpr int kStageElems = kBQ * kLdQ + kBQ * kLdH;
constexpr int kNO = kD / kMmaN;                // output column tiles per warp
constexpr int kNS = kBQ / kMmaN;               // key column tiles of S per warp

static_assert(DTYPE == kF16 || DTYPE == kBF16 || DTYPE == kF32, "DTYPE must be 0, 1 or 2");
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "HEAD_DIM must be 64 or 128");
static_assert(CHUNK == 32 || CHUNK == 64 || CHUNK == 128 || CHUNK == 256, "CHUNK must be 32, 64, 128 or 256");
static_assert(BLOCK_Q == 32 || BLOCK_Q == 64, "BLOCK_Q must be 32 or 64 (two or four warps of 16 rows)");
static_assert(CHUNK % BLOCK_Q == 0, "BLOCK_Q must divide CHUNK so that a block's rows share one state");
static_assert(STAGES == 1 || STAGES == 2, "STAGES must be 1 or 2");
static_assert(HAS_DECAY == 0 || HAS_DECAY == 1, "HAS_DECAY must be 0 or 1");
static_assert(kNS % 2 == 0 && kNO % 2 == 0, "B fragments are loaded two 8-column tiles at a time");

}  // namespace

constexpr int linear_chunk_o_smem_bytes = (kQElems + kHElems + STAGES * kStageElems) * elem_bytes<DTYPE>();
static_assert(linear_chunk_o_smem_bytes <= 227 * 1024, "linear_chunk_o: shared memory over the 227 KB Hopper limit");


extern "C" __global__ void __launch_bounds__(LIN_O_THREADS, 1)
linear_chunk_o(const AttentionParams p, const elem_t* __restrict__ q, const elem_t* __restrict__ k,
               const elem_t* __restrict__ v, const elem_t* __restrict__ h, elem_t* __restrict__ o,
               const float* __restrict__ log2_decay) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    elem_t* qs = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* hs = qs + kQElems;
    elem_t* ring = hs + kHElems;

    const int warp = (int)threadIdx.x / kWarpSize;
    const int lane = (int)threadIdx.x % kWarpSize;
    const int g = lane / 4, t4 = lane % 4;

    const int n = (int)p.seq_q;
    const int q0 = (int)blockIdx.x * kBQ;
    const int chunk = q0 / CHUNK;
    const int cs = chunk * CHUNK;
    const int num_chunks = (n + CHUNK - 1) / CHUNK;
    const int hq = (int)blockIdx.y % (int)p.num_heads;
    const int b = (int)blockIdx.y / (int)p.num_heads;
    const int hk = hq / ((int)p.num_heads / (int)p.num_kv_heads);
    const int num_key_tiles = (q0 - cs) / kBQ + 1;

    const elem_t* qg = q + (i64)b * p.q_stride[0] + (i64)hq * p.q_stride[1] + (i64)q0 * p.q_stride[2];
    const elem_t* kg = k + (i64)b * p.k_stride[0] + (i64)hk * p.k_stride[1];
    const elem_t* vg = v + (i64)b * p.v_stride[0] + (i64)hk * p.v_stride[1];

    auto load_kv = [&](int tile, int slot) {
        elem_t* ks = ring + slot * kStageElems;
        elem_t* vs = ks + kBQ * kLdQ;
        const int key0 = cs + tile * kBQ;
        const int valid = n - key0;
        load_tile_async<DTYPE, kBQ, kD, kLdQ, kThreads>(ks, kg + (i64)key0 * p.k_stride[2], p.k_stride[2], valid);
        load_tile_async<DTYPE, kBQ, kD, kLdH, kThreads>(vs, vg + (i64)key0 * p.v_stride[2], p.v_stride[2], valid);
    };

    // Group 0: Q, H_c and the first K/V tile; then one group per further stage.
    load_tile_async<DTYPE, kBQ, kD, kLdQ, kThreads>(qs, qg, p.q_stride[2], n - q0);
    if (chunk > 0) {
        const elem_t* hg = h + ((i64)((i64)b * p.num_kv_heads + hk) * num_chunks + chunk) * kD * kD;
        load_tile_async<DTYPE, kD, kD, kLdH, kThreads>(hs, hg, kD, kD);
    }
    load_kv(0, 0);
    cp_async_commit();
#pragma unroll
    for (int s = 1; s < STAGES; ++s) {
        if (s < num_key_tiles) load_kv(s, s);
        cp_async_commit();
    }

    float l2g = 0.0f;
    if constexpr (HAS_DECAY) l2g = log2_decay[hk];

    const int wrow = warp * kMmaM;                 // warp's first row within the block
    const int row_lo = q0 + wrow + g;              // this lane's two query rows (global)
    const int row_hi = row_lo + 8;

    float acc[kNO][4];
#pragma unroll
    for (int j = 0; j < kNO; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

    for (int tile = 0; tile < num_key_tiles; ++tile) {
        cp_async_wait<STAGES - 1>();
        __syncthreads();

        if (tile == 0 && chunk > 0) {
            // Inter-chunk term: O = gamma^(i+1) Q H_c.
#pragma unroll kKUnroll
            for (int kk = 0; kk < kD; kk += kKStep) {
                FragA<DTYPE> a;
                load_a_rowmajor<DTYPE, kLdQ>(a, qs, wrow, kk);
#pragma unroll
                for (int j = 0; j < kNO; j += 2) {
                    FragB<DTYPE> bb;
                    load_b_rowmajor_x2<DTYPE, kLdH>(bb, hs, kk, j * kMmaN);
                    mma_frag<DTYPE>(acc[j], a, bb, 0);
                    mma_frag<DTYPE>(acc[j + 1], a, bb, 1);
                }
            }
            if constexpr (HAS_DECAY) {
                const float f_lo = exp2f(l2g * (float)(row_lo - cs + 1));
                const float f_hi = exp2f(l2g * (float)(row_hi - cs + 1));
#pragma unroll
                for (int j = 0; j < kNO; ++j) {
                    acc[j][0] *= f_lo; acc[j][1] *= f_lo;
                    acc[j][2] *= f_hi; acc[j][3] *= f_hi;
                }
            }
        }

        // Intra-chunk term over keys [key0, key0 + BLOCK_Q).
        const elem_t* ks = ring + (tile % STAGES) * kStageElems;
        const elem_t* vs = ks + kBQ * kLdQ;
        const int key0 = cs + tile * kBQ;
        const bool diag = key0 == q0;
        // On the diagonal tile, key columns past the warp's last row are all masked.
        const int key_end = diag ? wrow + kMmaM : kBQ;

        float sacc[kNS][4];
#pragma unroll
        for (int j = 0; j < kNS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) sacc[j][e] = 0.0f;
#pragma unroll kKUnroll
        for (int kk = 0; kk < kD; kk += kKStep) {
            FragA<DTYPE> a;
            load_a_rowmajor<DTYPE, kLdQ>(a, qs, wrow, kk);
#pragma unroll
            for (int j = 0; j < kNS; j += 2) {
                if (j * kMmaN < key_end) {
                    FragB<DTYPE> bb;
                    load_b_colmajor_x2<DTYPE, kLdQ>(bb, ks, kk, j * kMmaN);
                    mma_frag<DTYPE>(sacc[j], a, bb, 0);
                    mma_frag<DTYPE>(sacc[j + 1], a, bb, 1);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kNS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = (e < 2) ? row_lo : row_hi;
                const int col = key0 + j * kMmaN + 2 * t4 + (e & 1);
                if (diag && col > row) {
                    sacc[j][e] = 0.0f;
                } else if constexpr (HAS_DECAY) {
                    sacc[j][e] *= exp2f(l2g * (float)(row - col));
                }
            }
        }
#pragma unroll kKUnroll
        for (int ks_i = 0; ks_i < kBQ / kKStep; ++ks_i) {
            if (ks_i * kKStep < key_end) {
                FragA<DTYPE> a;
                acc_to_a<DTYPE>(a, sacc[ks_i * kTilesPerK], sacc[ks_i * kTilesPerK + kTilesPerK - 1]);
#pragma unroll
                for (int j = 0; j < kNO; j += 2) {
                    FragB<DTYPE> bb;
                    load_b_rowmajor_x2<DTYPE, kLdH>(bb, vs, ks_i * kKStep, j * kMmaN);
                    mma_frag<DTYPE>(acc[j], a, bb, 0);
                    mma_frag<DTYPE>(acc[j + 1], a, bb, 1);
                }
            }
        }

        __syncthreads();   // every warp is done with this slot
        const int next = tile + STAGES;
        if (next < num_key_tiles) load_kv(next, next % STAGES);
        cp_async_commit();
    }

    // Epilogue: scale, stage in the warp's own Q rows (only this warp reads
    // them), then 16-byte coalesced stores of the rows inside the sequence.
    elem_t* og = o + (i64)b * p.o_stride[0] + (i64)hq * p.o_stride[1];
    store_warp_rows<DTYPE, kD, kLdQ>(qs + wrow * kLdQ, acc, p.scale, og, p.o_stride[2], q0 + wrow, n);
}
