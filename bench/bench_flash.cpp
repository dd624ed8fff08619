// bench_flash.cpp — times one attention-forward kernel specialisation without
// Python in the loop: the core library compiles it through the kernel cache,
// launches it on random inputs and reports median / p10 / p90 / CV and TFLOPS.
//
//   attnproto_bench_flash --kernel flash_fwd_mma --const HEAD_DIM=128 --const BLOCK_R=128 ...
//       --threads 256 --smem 81920 --batch 4 --heads 16 --seq 4096 [--causal] [--dtype bf16]
//       [--warmup 10] [--iters 100] [--flush-l2] [--tma]
//
// Kernel ABIs (shaders/cuda/flash_fwd_*.cu):
//   default: (AttentionParams p, q, k, v, o, lse, rope_cos, rope_sin, alibi_slopes), grid
//            (ceil(N / BLOCK_R), heads, batch)                                           [flash_fwd_mma]
//   --tma:   (p, TMA map q, TMA map k, TMA map v, o, lse, block_table, context_lens, rope_cos,
//            rope_sin, alibi_slopes), 1-D grid of ceil(N / BLOCK_R) * heads * batch
//            CTAs; 4-D maps over (D, N, H, B) with 128-byte swizzle, boxes of 64 x BLOCK_R (q) and
//            64 x BLOCK_C (k, v)                                                           [flash_fwd_wgmma]
// tools/bench_args.py prints the arguments of the best configuration per head dim
// (the chooser's table for mma, the wgmma defaults) and tools/device_run.sh runs them.
#include "cuda/cuda_backend.h"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "backend.h"
#include "params.h"

using namespace attnproto;

namespace {

// Forward-pass FLOPs: two matmuls of 2*N*N*D per (batch, head); causal does about half.
constexpr double kMatmulsPerForward = 2.0;
constexpr double kFlopsPerMac = 2.0;
constexpr double kCausalFraction = 0.5;
// TMA boxes of the wgmma kernel: 64 elements (128 bytes) of the head dim, 128-byte swizzle.
constexpr uint32_t kTmaBoxCols = 64;
constexpr int kTmaSwizzleBytes = 128;
// The variant buffers both kernels take last (flash_fwd_wgmma after its pool arguments):
// rope_cos, rope_sin, alibi_slopes.
constexpr int kVariantBufferArgs = 3;

[[noreturn]] void usage(const std::string& why) {
    std::fprintf(stderr, "attnproto_bench_flash: %s\n", why.c_str());
    std::fprintf(stderr,
                 "usage: attnproto_bench_flash --kernel NAME --const K=V... --threads T --smem BYTES\n"
                 "       --batch B --heads H --seq N [--kv-heads HKV] [--causal] [--dtype bf16|f16]\n"
                 "       [--warmup W] [--iters I] [--flush-l2]\n");
    std::exit(2);
}

uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
    return uint16_t(u >> 16);
}

uint16_t to_f16(float f) {
    // Inputs are in [-1, 1): normal or zero halves only, no overflow handling needed.
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000;
    int exp = int((u >> 23) & 0xFF) - 127 + 15;
    uint32_t mant = u & 0x7FFFFF;
    if (exp <= 0) return uint16_t(sign);
    uint32_t h = sign | (uint32_t(exp) << 10) | (mant >> 13);
    if ((mant >> 12) & 1) h += 1;  // round half up on the dropped bits
    return uint16_t(h);
}

long parse_long(const std::string& flag, const char* v) {
    char* end = nullptr;
    long x = std::strtol(v, &end, 10);
    if (!end || *end) usage(flag + ": '" + v + "' is not an integer");
    return x;
}

}  // namespace

int main(int argc, char** argv) {
    std::string kernel, dtype = "bf16";
    std::map<std::string, int64_t> consts;
    long threads = 0, smem = 0, batch = 0, heads = 0, kv_heads = 0, seq = 0, warmup = 10, iters = 100;
    bool causal = false, flush = false, tma = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> const char* {
            if (i + 1 >= argc) usage(a + " needs a value");
            return argv[++i];
        };
        if (a == "--kernel") kernel = next();
        else if (a == "--const") {
            std::string kv = next();
            auto eq = kv.find('=');
            if (eq == std::string::npos) usage("--const expects NAME=VALUE, got " + kv);
            consts[kv.substr(0, eq)] = parse_long("--const", kv.c_str() + eq + 1);
        } else if (a == "--threads") threads = parse_long(a, next());
        else if (a == "--smem") smem = parse_long(a, next());
        else if (a == "--batch") batch = parse_long(a, next());
        else if (a == "--heads") heads = parse_long(a, next());
        else if (a == "--kv-heads") kv_heads = parse_long(a, next());
        else if (a == "--seq") seq = parse_long(a, next());
        else if (a == "--warmup") warmup = parse_long(a, next());
        else if (a == "--iters") iters = parse_long(a, next());
        else if (a == "--dtype") dtype = next();
        else if (a == "--causal") causal = true;
        else if (a == "--flush-l2") flush = true;
        else if (a == "--tma") tma = true;
        else usage("unknown argument " + a);
    }
    if (kernel.empty() || threads <= 0 || batch <= 0 || heads <= 0 || seq <= 0 || smem < 0)
        usage("--kernel, --threads, --smem, --batch, --heads and --seq are required");
    if (dtype != "bf16" && dtype != "f16") usage("--dtype must be bf16 or f16");
    if (kv_heads == 0) kv_heads = heads;
    auto hd = consts.find("HEAD_DIM");
    auto br = consts.find("BLOCK_R");
    if (hd == consts.end() || br == consts.end()) usage("--const HEAD_DIM=.. and --const BLOCK_R=.. are required");
    const long d = long(hd->second), block_r = long(br->second);
    consts["CAUSAL"] = causal ? 1 : 0;
    consts["DTYPE"] = dtype == "bf16" ? 1 : 0;

    try {
        Backend& be = get_backend("cuda");
        if (!be.available()) {
            std::fprintf(stderr, "CUDA backend unavailable: %s\n", be.unavailable_reason().c_str());
            return 1;
        }
        auto k = be.kernel(KernelKey(kernel, consts));
        const size_t q_elems = size_t(batch) * heads * seq * d;
        const size_t kv_elems = size_t(batch) * kv_heads * seq * d;
        std::vector<uint16_t> host(std::max(q_elems, kv_elems));
        uint64_t state = 0x9E3779B97F4A7C15ull ^ uint64_t(std::rand());
        auto fill = [&](size_t n) {
            for (size_t i = 0; i < n; ++i) {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;  // xorshift64
                float f = float(state >> 40) / float(1 << 24) * 2.0f - 1.0f;
                host[i] = dtype == "bf16" ? to_bf16(f) : to_f16(f);
            }
        };
        auto q = be.alloc(q_elems * 2), kk = be.alloc(kv_elems * 2), v = be.alloc(kv_elems * 2);
        auto o = be.alloc(q_elems * 2), lse = be.alloc(size_t(batch) * heads * seq * 4);
        fill(q_elems); be.upload(*q, host.data(), q_elems * 2);
        fill(kv_elems); be.upload(*kk, host.data(), kv_elems * 2);
        fill(kv_elems); be.upload(*v, host.data(), kv_elems * 2);

        AttentionParams p{};
        p.batch = uint32_t(batch); p.num_heads = uint32_t(heads); p.num_kv_heads = uint32_t(kv_heads);
        p.seq_q = p.seq_kv = uint32_t(seq); p.head_dim = uint32_t(d);
        p.scale = float(1.0 / std::sqrt(double(d)));
        const int64_t sq[3] = {int64_t(heads) * seq * d, int64_t(seq) * d, int64_t(d)};
        const int64_t skv[3] = {int64_t(kv_heads) * seq * d, int64_t(seq) * d, int64_t(d)};
        std::memcpy(p.q_stride, sq, sizeof(sq)); std::memcpy(p.o_stride, sq, sizeof(sq));
        std::memcpy(p.k_stride, skv, sizeof(skv)); std::memcpy(p.v_stride, skv, sizeof(skv));
        p.lse_stride[0] = int64_t(heads) * seq; p.lse_stride[1] = seq;

        LaunchConfig cfg;
        const unsigned m_blocks = unsigned((seq + block_r - 1) / block_r);
        if (tma) {
            cfg.grid[0] = m_blocks * unsigned(heads) * unsigned(batch);
        } else {
            cfg.grid[0] = m_blocks; cfg.grid[1] = unsigned(heads); cfg.grid[2] = unsigned(batch);
        }
        cfg.block[0] = unsigned(threads);
        cfg.shared_bytes = size_t(smem);
        std::vector<KernelArg> args = {KernelArg::raw(&p, sizeof(p), alignof(AttentionParams))};
        if (tma) {
            auto bc = consts.find("BLOCK_C");
            if (bc == consts.end()) usage("--tma needs --const BLOCK_C=..");
            auto map = [&](const Buffer& b, long h, uint32_t rows) {
                const uint64_t row = uint64_t(d) * 2;
                return cuda::tensor_map(dtype == "bf16" ? "bf16" : "f16", b.device_address(),
                                        {uint64_t(d), uint64_t(seq), uint64_t(h), uint64_t(batch)},
                                        {row, row * uint64_t(seq), row * uint64_t(seq) * uint64_t(h)},
                                        {kTmaBoxCols, rows, 1, 1}, kTmaSwizzleBytes, false);
            };
            args.push_back(map(*q, heads, uint32_t(block_r)));
            args.push_back(map(*kk, kv_heads, uint32_t(bc->second)));
            args.push_back(map(*v, kv_heads, uint32_t(bc->second)));
        } else {
            args.push_back(KernelArg::pointer(q->device_address()));
            args.push_back(KernelArg::pointer(kk->device_address()));
            args.push_back(KernelArg::pointer(v->device_address()));
        }
        args.push_back(KernelArg::pointer(o->device_address()));
        args.push_back(KernelArg::pointer(lse->device_address()));
        if (tma) {  // flash_fwd_wgmma's block_table and context_lens: null for contiguous K/V (PAGE_SIZE=0)
            args.push_back(KernelArg::pointer(0));
            args.push_back(KernelArg::pointer(0));
        }
        // rope_cos, rope_sin, alibi_slopes: null (the bench times variants whose values live in
        // AttentionParams only: computed RoPE, standard ALiBi; window and softcap stay 0 = none)
        for (int i = 0; i < kVariantBufferArgs; ++i) args.push_back(KernelArg::pointer(0));
        TimingStats t = be.time([&] { be.launch(*k, cfg, args); }, TimingOptions{int(warmup), int(iters), flush, 0.0});
        double flops = kMatmulsPerForward * kFlopsPerMac * double(batch) * heads * double(seq) * seq * d;
        if (causal) flops *= kCausalFraction;
        std::printf("%s B=%ld H=%ld N=%ld D=%ld causal=%d dtype=%s regs=%d local=%dB: median %.4f ms "
                    "(p10 %.4f, p90 %.4f, cv %.2f%%) %.1f TFLOPS\n",
                    k->key.canonical().c_str(), batch, heads, seq, d, int(causal), dtype.c_str(), k->resources.registers,
                    k->resources.local_bytes, t.median_ms, t.p10_ms, t.p90_ms, 100.0 * t.cv,
                    flops / (t.median_ms * 1e-3) / 1e12);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "attnproto_bench_flash: %s\n", e.what());
        return 1;
    }
    return 0;
}
