// stitch_attn.cu — Prototype 2: the attention inner loop of include/stitch.cuh with its three
// stages dispatched per STITCH_MODE (0 inline, 1 __noinline__, 2 function-pointer table,
// 3 extern stages linked from separate LTO-IR with nvJitLink). See include/stitch.cuh for
// the algorithm, the launch shape and the arguments.
//
// Mode 3 compiles only as relocatable LTO-IR (-dlto -rdc=true): the stages are resolved by
// the link with stitch_score.cu, stitch_softmax.cu and stitch_accumulate.cu.
#include "cuda/include/stitch.cuh"

#ifndef STITCH_MODE
#error "STITCH_MODE must be defined"
#endif

namespace stitch {
constexpr int kModeInline = 0;
constexpr int kModeNoinline = 1;
constexpr int kModeTable = 2;
constexpr int kModeLinked = 3;
constexpr int kMode = STITCH_MODE;
static_assert(kMode == kModeInline || kMode == kModeNoinline || kMode == kModeTable || kMode == kModeLinked,
              "STITCH_MODE must be 0, 1, 2 or 3");

typedef void (*ScoreFn)(const float*, const u32*, int, float, Scores*);
typedef float (*SoftmaxFn)(Scores*, RowState*);
typedef void (*AccumulateFn)(const Scores*, const u32*, int, float, Acc*);
struct StageTable {
    ScoreFn score;
    SoftmaxFn softmax_update;
    AccumulateFn accumulate;
};
}  // namespace stitch

#if STITCH_MODE == 1 || STITCH_MODE == 2
extern "C" __device__ __noinline__ STITCH_SCORE_SIGNATURE { stitch::score_impl(q_row, k_tile, keys_valid, scale_log2, out); }
extern "C" __device__ __noinline__ STITCH_SOFTMAX_SIGNATURE { return stitch::softmax_update_impl(sc, st); }
extern "C" __device__ __noinline__ STITCH_ACCUMULATE_SIGNATURE {
    stitch::accumulate_impl(p, v_tile, keys_valid, rescale, acc);
}
#elif STITCH_MODE == 3
extern "C" __device__ STITCH_SCORE_SIGNATURE;
extern "C" __device__ STITCH_SOFTMAX_SIGNATURE;
extern "C" __device__ STITCH_ACCUMULATE_SIGNATURE;
#endif

#if STITCH_MODE == 2
// In writable global memory (the host may patch it through cuModuleGetGlobal), so the compiler
// cannot resolve the calls at compile time: every stage call is an indirect call.
__device__ stitch::StageTable g_stitch_table[stitch::kTableRows] = {
    {&stitch_score, &stitch_softmax_update, &stitch_accumulate},
};
#endif

namespace stitch {

// The three stage calls of one tile, dispatched per STITCH_MODE.
struct Dispatch {
    StageTable table;  // mode 2 only

    __device__ __forceinline__ void score(const float* q_row, const u32* k_tile, int keys_valid, float scale_log2,
                                          Scores* out) const {
        if constexpr (kMode == kModeInline) score_impl(q_row, k_tile, keys_valid, scale_log2, out);
#if STITCH_MODE == 2
        else if constexpr (kMode == kModeTable) table.score(q_row, k_tile, keys_valid, scale_log2, out);
#endif
#if STITCH_MODE == 1 || STITCH_MODE == 3
        else stitch_score(q_row, k_tile, keys_valid, scale_log2, out);
#endif
    }
    __device__ __forceinline__ float softmax_update(Scores* sc, RowState* st) const {
        if constexpr (kMode == kModeInline) return softmax_update_impl(sc, st);
#if STITCH_MODE == 2
        else if constexpr (kMode == kModeTable) return table.softmax_update(sc, st);
#endif
#if STITCH_MODE == 1 || STITCH_MODE == 3
        else return stitch_softmax_update(sc, st);
#endif
    }
    __device__ __forceinline__ void accumulate(const Scores* p, const u32* v_tile, int keys_valid, float rescale,
                                               Acc* acc) const {
        if constexpr (kMode == kModeInline) accumulate_impl(p, v_tile, keys_valid, rescale, acc);
#if STITCH_MODE == 2
        else if constexpr (kMode == kModeTable) table.accumulate(p, v_tile, keys_valid, rescale, acc);
#endif
#if STITCH_MODE == 1 || STITCH_MODE == 3
        else stitch_accumulate(p, v_tile, keys_valid, rescale, acc);
#endif
    }
};

}  // namespace stitch

extern "C" __global__ void __launch_bounds__(stitch::kThreads)
stitch_attn(const AttentionParams p, const ap::u16* __restrict__ q, const ap::u16* __restrict__ k,
            const ap::u16* __restrict__ v, float* __restrict__ o, float* __restrict__ lse, int table_row) {
    using namespace stitch;
    __shared__ u32 k_tile[kBlockC * kKRowWords];
    __shared__ u32 v_tile[kBlockC * kVRowWords];
    __shared__ float q_rows[kWarps * kHeadDim];

    Dispatch dispatch{};
#if STITCH_MODE == 2
    if (table_row < 0 || table_row >= kTableRows) ap::trap();
    dispatch.table = g_stitch_table[table_row];
#else
    (void)table_row;
#endif

    const int warp = threadIdx.x / ap::kWarpSize;
    const int lane = threadIdx.x % ap::kWarpSize;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int kv_head = head / int(p.num_heads / p.num_kv_heads);
    const int seq_q = int(p.seq_q);
    const int seq_kv = int(p.seq_kv);
    const int row = blockIdx.x * kWarps + warp;
    const bool row_valid = row < seq_q;

    const ap::u16* q_base = q + batch * p.q_stride[0] + head * p.q_stride[1];
    const ap::u16* k_base = k + batch * p.k_stride[0] + kv_head * p.k_stride[1];
    const ap::u16* v_base = v + batch * p.v_stride[0] + kv_head * p.v_stride[1];

    // The warp's query row as floats (rows past Nq read row 0 and are never stored).
    float* q_row = q_rows + warp * kHeadDim;
    {
        const u32* src = reinterpret_cast<const u32*>(q_base + (row_valid ? row : 0) * p.q_stride[2]);
        for (int w = lane; w < kHeadDim / 2; w += ap::kWarpSize) unpack2(src[w], q_row[2 * w], q_row[2 * w + 1]);
    }
    const float scale_log2 = __fmul_rn(p.scale, ap::kLog2e);

    RowState st{ap::neg_inf(), 0.0f};
    Acc acc;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) acc.o[d] = 0.0f;
    Scores sc;

    for (int tile = 0; tile < seq_kv; tile += kBlockC) {
        const int keys_valid = min(kBlockC, seq_kv - tile);
        __syncthreads();  // the previous tile is no longer read
        for (int w = threadIdx.x; w < kBlockC * (kHeadDim / 2); w += kThreads) {
            const int j = w / (kHeadDim / 2);
            const int c = w % (kHeadDim / 2);
            u32 kw = 0, vw = 0;
            if (j < keys_valid) {
                kw = reinterpret_cast<const u32*>(k_base + (tile + j) * p.k_stride[2])[c];
                vw = reinterpret_cast<const u32*>(v_base + (tile + j) * p.v_stride[2])[c];
            }
            k_tile[j * kKRowWords + c] = kw;
            v_tile[j * kVRowWords + c] = vw;
        }
        __syncthreads();
        dispatch.score(q_row, k_tile, keys_valid, scale_log2, &sc);
        const float rescale = dispatch.softmax_update(&sc, &st);
        dispatch.accumulate(&sc, v_tile, keys_valid, rescale, &acc);
    }

    if (!row_valid) return;
    float* o_row = o + batch * p.o_stride[0] + head * p.o_stride[1] + row * p.o_stride[2];
    const bool empty = seq_kv == 0;
    const float inv_l = empty ? 0.0f : __frcp_rn(st.l);
#pragma unroll
    for (int c = 0; c < kPairsPerLane; ++c) {
        const int d = 2 * (lane + c * ap::kWarpSize);
        o_row[d] = __fmul_rn(acc.o[2 * c], inv_l);
        o_row[d + 1] = __fmul_rn(acc.o[2 * c + 1], inv_l);
    }
    if (lane == 0) {
        float* lse_row = lse + batch * p.lse_stride[0] + head * p.lse_stride[1];
        lse_row[row] = empty ? ap::neg_inf() : __fmul_rn(__fadd_rn(st.m, ap::log2_approx(st.l)), ap::kLn2);
    }
}
