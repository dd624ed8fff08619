// linear_fused.cu — chunked causal linear attention in ONE pass (16-bit inputs).
//
// The same math as linear_chunk_h + linear_chunk_o (include/linear.cuh):
//     o_i     = s * (gamma^(i+1) q_i H_c + sum_{j<=i, same chunk} gamma^(i-j) (q_i . k_j) v_j)
//     H_{c+1} = gamma^C H_c + sum_j gamma^(C-1-j) k_j^T v_j
// but one block walks the chunks of one (batch, head) in order and keeps the
// running state H in FP32 registers, so the states never go through device
// memory: Q, K and V are read once and O written once (the two-pass kernels
// also write and re-read one D x D state per chunk).
//
// Parallelism. A block owns BLOCK_DV of the HEAD_DIM value columns (its part
// of the state, H[:, dv0 : dv0 + BLOCK_DV], and of the output) and one of
// `num_segments` runs of consecutive chunks. Grid x = (HEAD_DIM / BLOCK_DV) *
// num_segments (value slice fastest, so the blocks of one head run together and
// share their Q and K reads through L2), y = batch * num_heads. The price of the
// value split is Q K^T recomputed by each of the HEAD_DIM / BLOCK_DV blocks of a
// head; the price of segment s > 0 is a state-only walk over the chunks before
// it (K and V loads and the state update, no outputs) to build its H. Both buy
// blocks: one block's chunks are a serial chain, so a few blocks per SM are
// what hides the latency of each chunk's dependent MMAs.
//
// Per chunk c (CHUNK tokens; kOutWarps = CHUNK / 16 output warps, plus as many
// state warps when STATE_WARPS = 1):
//   1. Output warp w owns query rows [16w, 16w + 16) of the chunk. One pass over the
//      k dimension (HEAD_DIM) loads each Q fragment once for both products:
//      S = Q K^T (key tiles right of the warp's diagonal skipped) and
//      O = Q H_c (H_c rounded to the element type in shared memory, the operand
//      type chunk_o reads too). Then the causal mask and gamma^(i-j) on S,
//      O *= gamma^(i+1) per row, O += P V (P rounded to the element type in
//      registers: the accumulator layout of S is the A layout of P V),
//      O *= s, staged through the warp's own Q rows and stored 16 bytes at a time.
//      Only tiles on the warp's diagonal block are masked; tiles left of it are
//      fully visible.
//   2. The state warps (STATE_WARPS = 1: a second group, so that the two phases
//      of a chunk run concurrently and each SM holds twice the warps; 0: the
//      output warps themselves, after phase 1) tile the block's state H[dk][dv]: kWarpsDK warps over the dk
//      rows (16-row MMA tiles) times kWarpsDV over the dv columns;
//      H <- gamma^C H + K^T diag(gamma^(C-1-j)) V with FP32 tensor-core
//      accumulation (4 MMAs per 64 tokens, the 16-bit argument of
//      linear_chunk_h.cu), then H is written, rounded, to the other half of a
//      double-buffered shared tile for chunk c + 1. Skipped after the last chunk.
//   Q/K/V tiles of chunk c + STAGES - 1 stream in (cp.async ring, rows past the
//   sequence zero-filled) while chunk c is computed; one __syncthreads per chunk
//   (with STATE_WARPS = 1 each group runs its own loop; both reach the barrier
//   once per chunk).
//
// Block: (1 + STATE_WARPS) * CHUNK / 16 warps. Dynamic shared memory: linear_fused_smem_bytes
// (mirrored by python/attnproto/ops/linear.py). Arguments: p (batch, num_heads,
// seq_q, head_dim, scale, q/k/v/o strides), Q, K, V, O [B, H, N, HEAD_DIM]
// (k/v with p.num_kv_heads = p.num_heads), log2_decay float32 [num_heads]
// (log2 gamma; read only when HAS_DECAY), num_segments (>= 1; segment s covers
// chunks [s S, (s + 1) S), S = ceil(num_chunks / num_segments)).
#include "common/attn_params.h"
#include "cuda/include/linear.cuh"

#ifndef DTYPE
#error "DTYPE must be defined (0 = float16, 1 = bfloat16)"
#endif
#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef CHUNK
#error "CHUNK must be defined (tokens per chunk, 16 per output warp)"
#endif
#ifndef BLOCK_DV
#error "BLOCK_DV must be defined (value columns per block)"
#endif
#ifndef STAGES
#error "STAGES must be defined (chunks in the cp.async ring)"
#endif
#ifndef STATE_WARPS
#error "STATE_WARPS must be defined (0: output warps update the state, 1: a separate group does)"
#endif
#ifndef HAS_DECAY
#error "HAS_DECAY must be defined (0 or 1)"
#endif

#define LIN_F_OUT_WARPS (CHUNK / 16)
#define LIN_F_THREADS (LIN_F_OUT_WARPS * (1 + STATE_WARPS) * 32)

namespace {

using namespace lin;
typedef Traits<DTYPE>::elem elem_t;

constexpr int kD = HEAD_DIM;
constexpr int kC = CHUNK;
constexpr int kDV = BLOCK_DV;
constexpr int kStages = STAGES;
constexpr bool kStateGroup = STATE_WARPS != 0;
constexpr int kOutWarps = LIN_F_OUT_WARPS;
constexpr int kWarps = kOutWarps;              // warps that tile the state (either group)
constexpr int kThreads = LIN_F_THREADS;
constexpr int kKStep = 16;                    // m16n8k16
constexpr int kMaxWarpsDK = kD / kMmaM;
constexpr int kWarpsDK = kWarps < kMaxWarpsDK ? kWarps : kMaxWarpsDK;   // warps along the state rows
constexpr int kWarpsDV = kWarps / kWarpsDK;                             // ... and along its columns
constexpr int kDKW = kD / kWarpsDK;           // state rows per warp
constexpr int kDVW = kDV / kWarpsDV;          // state columns per warp
constexpr int kLdQK = kD + kPad16;            // Q, K tiles [token][d]
constexpr int kLdV = kDV + kPad16;            // V tile [token][dv]
constexpr int kLdH = kDV + kPad16;            // H tile [dk][dv]
constexpr int kStageElems = kC * kLdQK * 2 + kC * kLdV;
constexpr int kHElems = kD * kLdH;
constexpr int kNS = kC / kMmaN;               // 8-column tiles of S per warp
constexpr int kNO = kDV / kMmaN;              // 8-column tiles of O per warp
constexpr int kNH = kDVW / kMmaN;             // 8-column tiles of H per warp
constexpr int kMH = kDKW / kMmaM;             // 16-row tiles of H per warp
// Accumulators of S (kNS tiles), O (kNO) and H (kMH * kNH), 4 floats each,
// must leave room for the operand fragments under 255 registers per thread.
constexpr int kMaxAccRegs = 160;

static_assert(DTYPE == kF16 || DTYPE == kBF16,
              "linear_fused takes float16/bfloat16 (DTYPE 0 or 1); float32 uses linear_chunk_h/o (3xTF32)");
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "HEAD_DIM must be 64 or 128");
static_assert(CHUNK == 32 || CHUNK == 64 || CHUNK == 128, "CHUNK must be 32, 64 or 128 (2, 4 or 8 output warps)");
static_assert(BLOCK_DV == 16 || BLOCK_DV == 32 || BLOCK_DV == 64 || BLOCK_DV == 128,
              "BLOCK_DV must be 16, 32, 64 or 128");
static_assert(HEAD_DIM % BLOCK_DV == 0, "BLOCK_DV must divide HEAD_DIM");
static_assert(STATE_WARPS == 0 || STATE_WARPS == 1, "STATE_WARPS must be 0 or 1");
// 64K registers per SM: beyond 256 threads a block cannot have 255 registers per thread,
// and the state plus S/O accumulators spill (seen: CHUNK 128 with state warps, 512 threads).
constexpr int kMaxThreads = 256;
static_assert(kThreads <= kMaxThreads, "(1 + STATE_WARPS) * CHUNK / 16 warps exceed 256 threads: use STATE_WARPS 0 or a smaller CHUNK");
static_assert(kWarpsDK * kWarpsDV == kWarps && kDKW % kMmaM == 0, "each warp owns whole 16-row state tiles");
static_assert(kDVW % (2 * kMmaN) == 0,
              "BLOCK_DV / (warps along the state columns) must be a multiple of 16 (B fragments in pairs)");
static_assert(STAGES >= 2 && STAGES <= 4, "STAGES must be 2, 3 or 4");
static_assert(HAS_DECAY == 0 || HAS_DECAY == 1, "HAS_DECAY must be 0 or 1");
static_assert(kNO % 2 == 0 && kNS % 2 == 0, "B fragments are loaded two 8-column tiles at a time");
static_assert((kNS + kNO + kMH * kNH) * 4 <= kMaxAccRegs,
              "register budget: S, O and state accumulators exceed 160 floats per thread; use a smaller BLOCK_DV");

// Phase 1 for output warp `warp` and the chunk in (qs, ks, vs): O rows [16 warp, 16 warp + 16)
// of the chunk starting at token t0, written to og (rows >= n skipped). hs = H_c (bf16 / f16
// in shared memory), read when has_state.
__device__ __forceinline__ void output_phase(int warp, elem_t* qs, const elem_t* ks, const elem_t* vs,
                                             const elem_t* hs, bool has_state, int t0, int n, elem_t* og,
                                             i64 o_row_stride, float scale, float l2g) {
    const int lane = (int)threadIdx.x % kWarpSize;
    const int g = lane / 4, t4 = lane % 4;
    const int wrow = warp * kMmaM;   // the warp's first query row within the chunk
    // Keys right of the warp's last row are masked for every row: their S tiles are skipped.
    const int key_end = wrow + kMmaM;

    float sacc[kNS][4];
    float acc[kNO][4];
#pragma unroll
    for (int j = 0; j < kNS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[j][e] = 0.0f;
#pragma unroll
    for (int j = 0; j < kNO; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kD; kk += kKStep) {
        FragA<DTYPE> a;
        load_a_rowmajor<DTYPE, kLdQK>(a, qs, wrow, kk);
#pragma unroll
        for (int j = 0; j < kNS; j += 2) {
            if (j * kMmaN < key_end) {
                FragB<DTYPE> bb;
                load_b_colmajor_x2<DTYPE, kLdQK>(bb, ks, kk, j * kMmaN);
                mma_frag<DTYPE>(sacc[j], a, bb, 0);
                mma_frag<DTYPE>(sacc[j + 1], a, bb, 1);
            }
        }
        if (has_state) {
#pragma unroll
            for (int j = 0; j < kNO; j += 2) {
                FragB<DTYPE> bb;
                load_b_rowmajor_x2<DTYPE, kLdH>(bb, hs, kk, j * kMmaN);
                mma_frag<DTYPE>(acc[j], a, bb, 0);
                mma_frag<DTYPE>(acc[j + 1], a, bb, 1);
            }
        }
    }
    const int r_lo = wrow + g;   // this lane's rows within the chunk: r_lo, r_lo + 8
    if constexpr (HAS_DECAY) {
        if (has_state) {
            const float f_lo = exp2f(l2g * (float)(r_lo + 1));
            const float f_hi = exp2f(l2g * (float)(r_lo + 9));
#pragma unroll
            for (int j = 0; j < kNO; ++j) {
                acc[j][0] *= f_lo; acc[j][1] *= f_lo;
                acc[j][2] *= f_hi; acc[j][3] *= f_hi;
            }
        }
#pragma unroll
        for (int j = 0; j < kNS; ++j) {
            if (j * kMmaN < key_end) {   // tiles right of the diagonal block were never computed
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = r_lo + (e < 2 ? 0 : 8);
                    const int col = j * kMmaN + 2 * t4 + (e & 1);
                    sacc[j][e] *= exp2f(l2g * (float)(row - col));   // masked entries are zeroed below
                }
            }
        }
    }
    // Causal mask: zero where the key is right of the row. Only tiles on the warp's
    // diagonal block can hold such keys (tiles right of it were never computed).
#pragma unroll
    for (int j = 0; j < kNS; ++j) {
        if (j * kMmaN + kMmaN > wrow) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = r_lo + (e < 2 ? 0 : 8);
                const int col = j * kMmaN + 2 * t4 + (e & 1);
                if (col > row) sacc[j][e] = 0.0f;
            }
        }
    }
#pragma unroll
    for (int kt = 0; kt < kC / kKStep; ++kt) {
        if (kt * kKStep < key_end) {
            FragA<DTYPE> a;
            acc_to_a<DTYPE>(a, sacc[2 * kt], sacc[2 * kt + 1]);
#pragma unroll
            for (int j = 0; j < kNO; j += 2) {
                FragB<DTYPE> bb;
                load_b_rowmajor_x2<DTYPE, kLdV>(bb, vs, kt * kKStep, j * kMmaN);
                mma_frag<DTYPE>(acc[j], a, bb, 0);
                mma_frag<DTYPE>(acc[j + 1], a, bb, 1);
            }
        }
    }
    // Stage O in the warp's own Q rows (no other warp reads them) for 16-byte stores.
    store_warp_rows<DTYPE, kDV, kLdQK>(qs + wrow * kLdQK, acc, scale, og, o_row_stride, t0 + wrow, n);
}

// Phase 2 for state warp `warp` (0 .. kWarps - 1): H <- gamma^C H + K^T diag(f) V on its tile
// (rows dk_w.., columns dv_w..), then, if `publish`, H rounded into hn for the next chunk.
__device__ __forceinline__ void state_phase(int warp, float (&hacc)[kMH][kNH][4], const elem_t* ks,
                                            const elem_t* vs, const float* tok_decay, float chunk_decay,
                                            elem_t* hn, bool publish) {
    const int lane = (int)threadIdx.x % kWarpSize;
    const int g = lane / 4, t4 = lane % 4;
    const int dk_w = (warp % kWarpsDK) * kDKW;
    const int dv_w = (warp / kWarpsDK) * kDVW;
    if constexpr (HAS_DECAY) {
#pragma unroll
        for (int m = 0; m < kMH; ++m)
#pragma unroll
            for (int j = 0; j < kNH; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) hacc[m][j][e] *= chunk_decay;
    }
#pragma unroll
    for (int kk = 0; kk < kC; kk += kKStep) {
        FragA<DTYPE> a[kMH];
#pragma unroll
        for (int m = 0; m < kMH; ++m)
            load_a_colmajor<DTYPE, kLdQK, HAS_DECAY != 0>(a[m], ks, dk_w + m * kMmaM, kk, tok_decay + kk);
#pragma unroll
        for (int j = 0; j < kNH; j += 2) {
            FragB<DTYPE> bb;
            load_b_rowmajor_x2<DTYPE, kLdV>(bb, vs, kk, dv_w + j * kMmaN);
#pragma unroll
            for (int m = 0; m < kMH; ++m) {
                mma_frag<DTYPE>(hacc[m][j], a[m], bb, 0);
                mma_frag<DTYPE>(hacc[m][j + 1], a[m], bb, 1);
            }
        }
    }
    if (publish) {
#pragma unroll
        for (int m = 0; m < kMH; ++m) {
            const int row = dk_w + m * kMmaM + g;
#pragma unroll
            for (int j = 0; j < kNH; ++j) {
                const int col = dv_w + j * kMmaN + 2 * t4;
                store_pair<DTYPE>(hn + row * kLdH + col, hacc[m][j][0], hacc[m][j][1]);
                store_pair<DTYPE>(hn + (row + 8) * kLdH + col, hacc[m][j][2], hacc[m][j][3]);
            }
        }
    }
}

}  // namespace

constexpr int linear_fused_smem_bytes =
    (kStages * kStageElems + 2 * kHElems) * elem_bytes<DTYPE>() + (HAS_DECAY ? kC * 4 : 0);
static_assert(linear_fused_smem_bytes <= 227 * 1024, "linear_fused: shared memory over the 227 KB Hopper limit");

extern "C" __global__ void __launch_bounds__(LIN_F_THREADS, 1)
linear_fused(const AttentionParams p, const elem_t* __restrict__ q, const elem_t* __restrict__ k,
             const elem_t* __restrict__ v, elem_t* __restrict__ o, const float* __restrict__ log2_decay,
             int num_segments) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    elem_t* ring = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* hbuf = ring + kStages * kStageElems;                 // two [kD][kLdH] tiles
    float* tok_decay = reinterpret_cast<float*>(hbuf + 2 * kHElems);

    const int warp = (int)threadIdx.x / kWarpSize;

    constexpr int kSlices = kD / kDV;
    const int dv0 = ((int)blockIdx.x % kSlices) * kDV;
    const int segment = (int)blockIdx.x / kSlices;
    const int hq = (int)blockIdx.y % (int)p.num_heads;
    const int b = (int)blockIdx.y / (int)p.num_heads;
    const int n = (int)p.seq_q;
    const int num_chunks = (n + kC - 1) / kC;
    const int per_segment = (num_chunks + num_segments - 1) / num_segments;
    const int c_begin = segment * per_segment;                          // first chunk with outputs
    const int c_end = c_begin + per_segment < num_chunks ? c_begin + per_segment : num_chunks;
    if (c_begin >= c_end) return;   // the whole block: no barrier is left waiting

    const elem_t* qg = q + (i64)b * p.q_stride[0] + (i64)hq * p.q_stride[1];
    const elem_t* kg = k + (i64)b * p.k_stride[0] + (i64)hq * p.k_stride[1];
    const elem_t* vg = v + (i64)b * p.v_stride[0] + (i64)hq * p.v_stride[1] + dv0;
    elem_t* og = o + (i64)b * p.o_stride[0] + (i64)hq * p.o_stride[1] + dv0;

    float l2g = 0.0f;
    float chunk_decay = 1.0f;   // gamma^C
    if constexpr (HAS_DECAY) {
        l2g = log2_decay[hq];
        chunk_decay = exp2f(l2g * (float)kC);
        for (int j = (int)threadIdx.x; j < kC; j += kThreads) tok_decay[j] = exp2f(l2g * (float)(kC - 1 - j));
        // Made visible to all warps by the first __syncthreads of the loop.
    }

    // Chunks before c_begin only feed the state: their Q is not loaded.
    auto load_chunk = [&](int c, int slot) {
        elem_t* qs = ring + slot * kStageElems;
        elem_t* ks = qs + kC * kLdQK;
        elem_t* vs = ks + kC * kLdQK;
        const int t0 = c * kC;
        const int valid = n - t0;
        if (c >= c_begin)
            load_tile_async<DTYPE, kC, kD, kLdQK, kThreads>(qs, qg + (i64)t0 * p.q_stride[2], p.q_stride[2], valid);
        load_tile_async<DTYPE, kC, kD, kLdQK, kThreads>(ks, kg + (i64)t0 * p.k_stride[2], p.k_stride[2], valid);
        load_tile_async<DTYPE, kC, kDV, kLdV, kThreads>(vs, vg + (i64)t0 * p.v_stride[2], p.v_stride[2], valid);
    };
    // Every thread of the block runs this once per chunk (in either loop below): the ring's
    // wait, the block barrier and the next chunk's loads.
    auto begin_chunk = [&](int c) {
        cp_async_wait<kStages - 2>();
        __syncthreads();   // chunk c and H_c visible to all; slot (c - 1) % kStages and H buffer (c + 1) % 2 free
        const int next = c + kStages - 1;
        if (next < c_end) load_chunk(next, next % kStages);
        cp_async_commit();
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < c_end) load_chunk(s, s);
        cp_async_commit();
    }

    const float scale = p.scale;
    const i64 o_row_stride = p.o_stride[2];
    auto slot_of = [&](int c) { return ring + (c % kStages) * kStageElems; };
    auto run_output = [&](int c, int w) {
        elem_t* qs = slot_of(c);
        output_phase(w, qs, qs + kC * kLdQK, qs + 2 * kC * kLdQK, hbuf + (c % 2) * kHElems, c > 0, c * kC, n, og,
                     o_row_stride, scale, l2g);
    };
    auto run_state = [&](int c, int w, float (&hacc)[kMH][kNH][4]) {
        const elem_t* ks = slot_of(c) + kC * kLdQK;
        state_phase(w, hacc, ks, ks + kC * kLdQK, tok_decay, chunk_decay, hbuf + ((c + 1) % 2) * kHElems,
                    c + 1 >= c_begin);
    };
    auto zero_state = [](float (&hacc)[kMH][kNH][4]) {
#pragma unroll
        for (int m = 0; m < kMH; ++m)
#pragma unroll
            for (int j = 0; j < kNH; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) hacc[m][j][e] = 0.0f;
    };

    if constexpr (kStateGroup) {
        if (warp < kOutWarps) {
            for (int c = 0; c < c_end; ++c) {
                begin_chunk(c);
                if (c >= c_begin) run_output(c, warp);
            }
        } else {
            float hacc[kMH][kNH][4];
            zero_state(hacc);
            for (int c = 0; c < c_end; ++c) {
                begin_chunk(c);
                if (c + 1 < c_end) run_state(c, warp - kOutWarps, hacc);
            }
        }
    } else {
        float hacc[kMH][kNH][4];
        zero_state(hacc);
        for (int c = 0; c < c_end; ++c) {
            begin_chunk(c);
            if (c >= c_begin) run_output(c, warp);
            if (c + 1 < c_end) run_state(c, warp, hacc);
        }
    }
    cp_async_wait<0>();
}
