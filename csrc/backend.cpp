// backend.cpp — backend-independent parts of the core: statistics, arguments,
// directories and the registry of compiled-in backends.
#include "backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>

namespace attnproto {

#ifdef ATTNPROTO_WITH_CUDA
Backend& cuda_backend();
#endif
#ifdef ATTNPROTO_WITH_METAL
Backend& metal_backend();
#endif

namespace {
std::mutex g_dir_mutex;
std::string g_shader_dir;
std::string g_cache_dir;

// Linear interpolation between closest ranks (numpy's default "linear" method).
double quantile(const std::vector<double>& sorted, double q) {
    if (sorted.empty()) return 0.0;
    double pos = q * double(sorted.size() - 1);
    size_t lo = size_t(std::floor(pos));
    size_t hi = std::min(lo + 1, sorted.size() - 1);
    double frac = pos - double(lo);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}
}  // namespace

TimingStats TimingStats::from_samples(std::vector<double> s) {
    TimingStats t;
    t.samples_ms = s;
    if (s.empty()) return t;
    std::sort(s.begin(), s.end());
    t.median_ms = quantile(s, 0.5);
    t.p10_ms = quantile(s, 0.1);
    t.p90_ms = quantile(s, 0.9);
    t.min_ms = s.front();
    t.mean_ms = std::accumulate(s.begin(), s.end(), 0.0) / double(s.size());
    double var = 0;
    for (double x : s) var += (x - t.mean_ms) * (x - t.mean_ms);
    var = s.size() > 1 ? var / double(s.size() - 1) : 0.0;  // sample variance
    t.cv = t.mean_ms > 0 ? std::sqrt(var) / t.mean_ms : 0.0;
    return t;
}

KernelArg KernelArg::pointer(uint64_t addr, std::shared_ptr<Buffer> keep) {
    KernelArg a;
    a.kind = Pointer;
    a.address = addr;
    a.buffer = std::move(keep);
    a.align = sizeof(uint64_t);
    return a;
}

KernelArg KernelArg::raw(const void* data, size_t size, size_t align) {
    if (align == 0 || (align & (align - 1)) != 0) throw std::invalid_argument("kernel argument alignment must be a power of two");
    KernelArg a;
    a.kind = Bytes;
    a.bytes.resize(size);
    if (size) std::memcpy(a.bytes.data(), data, size);
    a.align = align;
    return a;
}

std::vector<std::string> compiled_backends() {
    std::vector<std::string> names;
#ifdef ATTNPROTO_WITH_CUDA
    names.push_back("cuda");
#endif
#ifdef ATTNPROTO_WITH_METAL
    names.push_back("metal");
#endif
    return names;
}

Backend& get_backend(const std::string& name) {
#ifdef ATTNPROTO_WITH_CUDA
    if (name == "cuda") return cuda_backend();
#endif
#ifdef ATTNPROTO_WITH_METAL
    if (name == "metal") return metal_backend();
#endif
    std::string have;
    for (auto& n : compiled_backends()) have += (have.empty() ? "" : ", ") + n;
    throw std::invalid_argument("backend '" + name + "' is not compiled into this build (compiled: " +
                                (have.empty() ? std::string("none") : have) + ")");
}

void set_shader_dir(const std::string& dir) {
    std::lock_guard<std::mutex> lk(g_dir_mutex);
    g_shader_dir = dir;
}

std::string shader_dir() {
    std::lock_guard<std::mutex> lk(g_dir_mutex);
    if (!g_shader_dir.empty()) return g_shader_dir;
    if (const char* e = std::getenv("ATTNPROTO_SHADER_DIR")) return e;
#ifdef ATTNPROTO_DEFAULT_SHADER_DIR
    return ATTNPROTO_DEFAULT_SHADER_DIR;
#else
    return "shaders";
#endif
}

void set_cache_dir(const std::string& dir) {
    std::lock_guard<std::mutex> lk(g_dir_mutex);
    g_cache_dir = dir;
}

std::string cache_dir() {
    std::lock_guard<std::mutex> lk(g_dir_mutex);
    if (!g_cache_dir.empty()) return g_cache_dir;
    if (const char* e = std::getenv("ATTNPROTO_CACHE_DIR")) return e;
    if (const char* x = std::getenv("XDG_CACHE_HOME")) return std::string(x) + "/attnproto";
    if (const char* h = std::getenv("HOME")) return std::string(h) + "/.cache/attnproto";
    return ".attnproto-cache";
}

}  // namespace attnproto
