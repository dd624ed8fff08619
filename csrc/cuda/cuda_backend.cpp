// cuda_backend.cpp — the CUDA backend: primary context on one device, NVRTC
// compilation through the memory cache and the on-disk archive, buffers,
// launches and CUDA-event timing.
#include "cuda_backend.h"

#include <dirent.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "../archive.h"
#include "../sha256.h"
#include "cuda_api.h"

namespace attnproto {
namespace cuda {
namespace {

// Dynamic shared memory above this needs the per-kernel opt-in attribute.
constexpr size_t kDefaultDynamicSmemLimit = 48 * 1024;
// The L2 flush buffer is this many times the L2 size, so that no earlier line survives.
constexpr size_t kFlushFactor = 2;
// Kernel that busy-waits on %globaltimer (shaders/cuda/spin_wait.cu): the timing guard.
constexpr const char* kSpinKernel = "spin_wait";

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return {};
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

bool file_exists(const std::string& path) {
    std::ifstream in(path);
    return bool(in);
}

std::vector<std::string> list_files(const std::string& dir) {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(dir.c_str())) {
        while (dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n == "." || n == "..") continue;
            out.push_back(dir + "/" + n);
        }
        ::closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::string kernel_path(const std::string& name) { return shader_dir() + "/cuda/" + name + ".cu"; }

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

const NvrtcApi& nvrtc_or_throw() {
    std::string why;
    const NvrtcApi* n = nvrtc_api(&why);
    if (!n) throw BackendError(why);
    return *n;
}

}  // namespace

std::string nvrtc_version() {
    const NvrtcApi& n = nvrtc_or_throw();
    int major = 0, minor = 0;
    n.nvrtcVersion(&major, &minor);
    return std::to_string(major) + "." + std::to_string(minor);
}

std::string source_hash(const std::string& kernel_name) {
    const std::string path = kernel_path(kernel_name);
    std::string src = read_file(path);
    if (src.empty() && !file_exists(path))
        throw std::invalid_argument("kernel '" + kernel_name + "': no source " + path);
    Sha256 h;
    auto add = [&](const std::string& p, const std::string& text) {
        h.update(p.substr(shader_dir().size()));
        h.update(std::to_string(text.size()) + ":");
        h.update(text);
    };
    add(path, src);
    for (const char* sub : {"/common", "/cuda/include"})
        for (const auto& f : list_files(shader_dir() + sub)) add(f, read_file(f));
    return Sha256::hex(h.digest());
}

CompileResult compile(const KernelKey& key, const std::string& arch, Output out,
                      const std::vector<std::string>& extra_options) {
    const NvrtcApi& n = nvrtc_or_throw();
    const std::string path = kernel_path(key.name);
    std::string src = read_file(path);
    if (src.empty() && !file_exists(path))
        throw std::invalid_argument("kernel '" + key.name + "': no source file " + path);

    std::vector<std::string> opts = {"--std=c++17", "-I" + shader_dir(), "--gpu-architecture=" + arch};
    // Numeric arch for #if in kernels: sm_90a -> 90.
    std::string digits;
    for (char c : arch) if (c >= '0' && c <= '9') digits += c;
    opts.push_back("-DATTNPROTO_ARCH=" + digits);
    if (out == Output::LtoIr) opts.push_back("-dlto");
    if (out == Output::LtoIr) opts.push_back("-rdc=true");
    for (auto& kv : key.constants) opts.push_back("-D" + kv.first + "=" + std::to_string(kv.second));
    for (const auto& o : extra_options) opts.push_back(o);

    CompileResult r;
    for (auto& o : opts) r.options += o + " ";
    auto t0 = std::chrono::steady_clock::now();
    nvrtcProgram prog = nullptr;
    nvrtcResult rc = n.nvrtcCreateProgram(&prog, src.c_str(), (key.name + ".cu").c_str(), 0, nullptr, nullptr);
    if (rc != NVRTC_SUCCESS)
        throw CompileError("kernel " + key.canonical() + ": nvrtcCreateProgram failed: " + n.nvrtcGetErrorString(rc));
    std::vector<const char*> argv;
    for (auto& o : opts) argv.push_back(o.c_str());
    rc = n.nvrtcCompileProgram(prog, int(argv.size()), argv.data());
    size_t log_size = 0;
    n.nvrtcGetProgramLogSize(prog, &log_size);
    if (log_size > 1) {
        r.log.resize(log_size);
        n.nvrtcGetProgramLog(prog, r.log.data());
        r.log.resize(log_size - 1);
    }
    if (rc != NVRTC_SUCCESS) {
        n.nvrtcDestroyProgram(&prog);
        throw CompileError("kernel " + key.canonical() + " failed to compile for " + arch + " (" +
                           n.nvrtcGetErrorString(rc) + "):\n" + r.log);
    }
    size_t size = 0;
    nvrtcResult gr = NVRTC_SUCCESS;
    if (out == Output::Cubin) {
        gr = n.nvrtcGetCUBINSize(prog, &size);
        r.binary.resize(size);
        if (gr == NVRTC_SUCCESS) gr = n.nvrtcGetCUBIN(prog, reinterpret_cast<char*>(r.binary.data()));
    } else if (out == Output::Ptx) {
        gr = n.nvrtcGetPTXSize(prog, &size);
        r.binary.resize(size);
        if (gr == NVRTC_SUCCESS) gr = n.nvrtcGetPTX(prog, reinterpret_cast<char*>(r.binary.data()));
    } else {
        if (!n.nvrtcGetLTOIRSize || !n.nvrtcGetLTOIR) {
            n.nvrtcDestroyProgram(&prog);
            throw CompileError("this NVRTC cannot emit LTO-IR (needs CUDA 12+)");
        }
        gr = n.nvrtcGetLTOIRSize(prog, &size);
        r.binary.resize(size);
        if (gr == NVRTC_SUCCESS) gr = n.nvrtcGetLTOIR(prog, reinterpret_cast<char*>(r.binary.data()));
    }
    n.nvrtcDestroyProgram(&prog);
    if (gr != NVRTC_SUCCESS)
        throw CompileError("kernel " + key.canonical() + ": extracting the binary failed: " + n.nvrtcGetErrorString(gr));
    r.compile_ms = ms_since(t0);
    return r;
}

std::string nvjitlink_version() {
    std::string why;
    const NvJitLinkApi* j = nvjitlink_api(&why);
    if (!j) throw BackendError(why);
    if (!j->nvJitLinkVersion) return "12.x (no nvJitLinkVersion)";
    unsigned major = 0, minor = 0;
    j->nvJitLinkVersion(&major, &minor);
    return std::to_string(major) + "." + std::to_string(minor);
}

LinkResult link(const std::vector<LinkInput>& inputs, const std::string& arch,
                const std::vector<std::string>& extra_options) {
    std::string why;
    const NvJitLinkApi* j = nvjitlink_api(&why);
    if (!j) throw BackendError(why);
    if (inputs.empty()) throw std::invalid_argument("link: no inputs");
    bool lto = false;
    for (const auto& in : inputs) {
        if (in.data.empty()) throw std::invalid_argument("link: input '" + in.name + "' is empty");
        lto |= in.kind == Output::LtoIr;
    }
    std::vector<std::string> opts = {"-arch=" + arch};
    if (lto) opts.push_back("-lto");
    for (const auto& o : extra_options) opts.push_back(o);
    std::vector<const char*> argv;
    for (auto& o : opts) argv.push_back(o.c_str());

    LinkResult r;
    auto t0 = std::chrono::steady_clock::now();
    nvJitLinkHandle h = nullptr;
    nvJitLinkResult rc = j->nvJitLinkCreate(&h, uint32_t(argv.size()), argv.data());
    if (rc != NVJITLINK_SUCCESS)
        throw CompileError("nvJitLinkCreate failed (error " + std::to_string(rc) + ") with options " +
                           [&] { std::string s; for (auto& o : opts) s += o + " "; return s; }());
    struct Destroy {
        const NvJitLinkApi* j; nvJitLinkHandle* h;
        ~Destroy() { if (*h) j->nvJitLinkDestroy(h); }
    } destroy{j, &h};
    auto logs = [&](bool error) {
        size_t n = 0;
        std::string text;
        if ((error ? j->nvJitLinkGetErrorLogSize(h, &n) : j->nvJitLinkGetInfoLogSize(h, &n)) == NVJITLINK_SUCCESS && n > 1) {
            text.resize(n);
            if (error) j->nvJitLinkGetErrorLog(h, text.data());
            else j->nvJitLinkGetInfoLog(h, text.data());
            text.resize(n - 1);
        }
        return text;
    };
    for (const auto& in : inputs) {
        const int kind = in.kind == Output::LtoIr ? NVJITLINK_INPUT_LTOIR
                         : in.kind == Output::Ptx ? NVJITLINK_INPUT_PTX : NVJITLINK_INPUT_CUBIN;
        rc = j->nvJitLinkAddData(h, kind, in.data.data(), in.data.size(), in.name.c_str());
        if (rc != NVJITLINK_SUCCESS)
            throw CompileError("nvJitLinkAddData(" + in.name + ") failed (error " + std::to_string(rc) + "):\n" + logs(true));
    }
    rc = j->nvJitLinkComplete(h);
    if (rc != NVJITLINK_SUCCESS)
        throw CompileError("nvJitLink failed to link for " + arch + " (error " + std::to_string(rc) + "):\n" + logs(true));
    size_t size = 0;
    rc = j->nvJitLinkGetLinkedCubinSize(h, &size);
    if (rc == NVJITLINK_SUCCESS) {
        r.cubin.resize(size);
        rc = j->nvJitLinkGetLinkedCubin(h, r.cubin.data());
    }
    if (rc != NVJITLINK_SUCCESS)
        throw CompileError("nvJitLink: extracting the linked cubin failed (error " + std::to_string(rc) + ")");
    r.log = logs(false);
    r.link_ms = ms_since(t0);
    return r;
}

KernelArg tensor_map(const std::string& dtype, uint64_t address, const std::vector<uint64_t>& dims,
                     const std::vector<uint64_t>& strides_bytes, const std::vector<uint32_t>& box,
                     int swizzle_bytes, bool oob_nan) {
    std::string why;
    const DriverApi* d = driver_api(&why);
    if (!d) throw BackendError(why);
    if (!d->cuTensorMapEncodeTiled) throw BackendError("tensor_map: the driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    const size_t rank = dims.size();
    if (rank < 1 || rank > 5) throw std::invalid_argument("tensor_map: dims must have 1..5 entries");
    if (strides_bytes.size() != rank - 1) throw std::invalid_argument("tensor_map: strides_bytes must have len(dims)-1 entries");
    if (box.size() != rank) throw std::invalid_argument("tensor_map: box must have len(dims) entries");
    int dt;
    if (dtype == "f16" || dtype == "float16") dt = TMA_FLOAT16;
    else if (dtype == "bf16" || dtype == "bfloat16") dt = TMA_BFLOAT16;
    else if (dtype == "f32" || dtype == "float32") dt = TMA_FLOAT32;
    else if (dtype == "u16" || dtype == "uint16") dt = TMA_UINT16;
    else throw std::invalid_argument("tensor_map: dtype '" + dtype + "' not supported (f16, bf16, f32, u16)");
    int sw;
    switch (swizzle_bytes) {
        case 0: sw = TMA_SWIZZLE_NONE; break;
        case 32: sw = TMA_SWIZZLE_32B; break;
        case 64: sw = TMA_SWIZZLE_64B; break;
        case 128: sw = TMA_SWIZZLE_128B; break;
        default: throw std::invalid_argument("tensor_map: swizzle_bytes must be 0, 32, 64 or 128");
    }
    std::vector<uint32_t> elem_strides(rank, 1);
    TensorMap map{};
    CUresult rc = d->cuTensorMapEncodeTiled(&map, dt, unsigned(rank), reinterpret_cast<void*>(address), dims.data(),
                                            strides_bytes.data(), box.data(), elem_strides.data(), TMA_INTERLEAVE_NONE,
                                            sw, TMA_L2_128B, oob_nan ? TMA_OOB_FILL_NAN_REQUEST_ZERO_FMA : TMA_OOB_FILL_NONE);
    if (rc != CUDA_SUCCESS) {
        const char* s = nullptr;
        d->cuGetErrorString(rc, &s);
        throw BackendError(std::string("tensor_map: cuTensorMapEncodeTiled failed: ") + (s ? s : "?") +
                           " (check 16-byte aligned address/strides, box <= 256 per dim, box[0]*elem <= swizzle)");
    }
    return KernelArg::raw(&map, sizeof(map), alignof(TensorMap));
}

Obtained obtain_cubin(const KernelKey& key, const std::string& arch, CacheMode mode) {
    Obtained o;
    const std::string compiler = nvrtc_version();
    const std::string shash = source_hash(key.name);
    o.archive_key = key.archive_key(shash, arch, compiler);
    const bool use_archive = mode == CacheMode::Default || mode == CacheMode::ArchiveOnly;
    if (!use_archive) {
        CompileResult r = compile(key, arch, Output::Cubin);
        o.cubin = std::move(r.binary);
        o.log = r.log;
        o.ms = r.compile_ms;
        return o;
    }
    const std::string desc = key.canonical() + "|" + arch + "|nvrtc " + compiler + "|src " + shash;
    DiskArchive ar(cache_dir() + "/cuda");
    auto lock = ar.lock(o.archive_key);  // one compile per entry across processes
    auto t0 = std::chrono::steady_clock::now();
    std::string note;
    auto hit = ar.load(o.archive_key, desc, &note);
    if (!note.empty()) o.log = note + "\n";
    if (hit) {
        o.cubin = std::move(*hit);
        o.origin = KernelOrigin::Archive;
        o.ms = ms_since(t0);
        return o;
    }
    if (mode == CacheMode::ArchiveOnly)
        throw BackendError("kernel " + key.canonical() + ": not in the archive " + ar.dir() + " (archive-only mode)" +
                           (note.empty() ? "" : "; " + note));
    CompileResult r = compile(key, arch, Output::Cubin);
    o.cubin = std::move(r.binary);
    o.log += r.log;
    o.ms = r.compile_ms;
    ar.store(o.archive_key, desc, o.cubin);
    return o;
}

namespace {

struct CudaBuffer : Buffer {
    CUdeviceptr ptr = 0;
    const DriverApi* d = nullptr;
    ~CudaBuffer() override {
        if (ptr && d) d->cuMemFree(ptr);
    }
    uint64_t device_address() const override { return ptr; }
    void* native_handle() const override { return reinterpret_cast<void*>(ptr); }
};

// A loaded module; shared by every Kernel handle of one compiled specialisation.
struct Module {
    const DriverApi* d = nullptr;
    CUmodule module = nullptr;
    CUfunction fn = nullptr;
    size_t dyn_smem_limit = kDefaultDynamicSmemLimit;  // current MAX_DYNAMIC_SHARED_SIZE_BYTES
    std::mutex attr_mutex;
    ~Module() {
        if (module && d) d->cuModuleUnload(module);
    }
};

struct CudaKernel : Kernel {
    std::shared_ptr<Module> mod;
};

class CudaBackend final : public Backend {
public:
    std::string name() const override { return "cuda"; }

    bool available() const override {
        const_cast<CudaBackend*>(this)->init();
        return ok_;
    }
    std::string unavailable_reason() const override {
        const_cast<CudaBackend*>(this)->init();
        return ok_ ? std::string() : why_;
    }

    DeviceInfo info() override {
        require();
        return info_;
    }

    std::shared_ptr<Kernel> kernel(const KernelKey& key, CacheMode mode) override {
        require();
        const std::string canon = key.canonical();
        if (mode != CacheMode::Cold) {
            std::lock_guard<std::mutex> lk(mu_);
            auto it = mem_.find(canon);
            if (it != mem_.end()) {
                // A memory hit shares the module but reports its own origin and no compile time.
                auto k = std::make_shared<CudaKernel>(*it->second);
                k->origin = KernelOrigin::Memory;
                k->compile_ms = 0.0;
                k->load_ms = 0.0;
                return k;
            }
        }
        std::shared_ptr<CudaKernel> k = build(key, mode);
        if (mode != CacheMode::Cold) {
            std::lock_guard<std::mutex> lk(mu_);
            mem_.emplace(canon, k);
        }
        return k;
    }

    void clear_memory_cache() override {
        std::lock_guard<std::mutex> lk(mu_);
        mem_.clear();  // modules stay loaded while any Kernel handle refers to them
    }

    std::shared_ptr<Buffer> alloc(size_t bytes) override {
        require();
        current();
        auto b = std::make_shared<CudaBuffer>();
        b->d = d_;
        b->bytes = bytes;
        if (bytes) check(d_->cuMemAlloc(&b->ptr, bytes), "cuMemAlloc(" + std::to_string(bytes) + " bytes)");
        return b;
    }

    void upload(Buffer& dst, const void* src, size_t bytes, size_t offset) override {
        require();
        bounds(dst, bytes, offset, "upload");
        current();
        if (bytes) check(d_->cuMemcpyHtoD(dst.device_address() + offset, src, bytes), "cuMemcpyHtoD");
    }

    void download(const Buffer& src, void* dst, size_t bytes, size_t offset) override {
        require();
        bounds(src, bytes, offset, "download");
        current();
        if (bytes) check(d_->cuMemcpyDtoH(dst, src.device_address() + offset, bytes), "cuMemcpyDtoH" + after_last());
    }

    void fill_bytes(Buffer& dst, uint8_t value) override {
        require();
        current();
        if (dst.bytes) check(d_->cuMemsetD8Async(dst.device_address(), value, dst.bytes, stream_), "cuMemsetD8Async");
    }

    void launch(Kernel& kb, const LaunchConfig& cfg, const std::vector<KernelArg>& args) override {
        require();
        current();
        auto& k = static_cast<CudaKernel&>(kb);
        const std::string who = "kernel " + k.key.canonical();
        for (int i = 0; i < 3; ++i) {
            if (cfg.grid[i] == 0 || cfg.block[i] == 0)
                throw std::invalid_argument(who + ": grid and block dimensions must be >= 1");
        }
        unsigned threads = cfg.block[0] * cfg.block[1] * cfg.block[2];
        if (k.resources.max_threads_per_block && int(threads) > k.resources.max_threads_per_block)
            throw std::invalid_argument(who + ": block of " + std::to_string(threads) + " threads exceeds the kernel's limit of " +
                                        std::to_string(k.resources.max_threads_per_block));
        Module& m = *k.mod;
        {
            std::lock_guard<std::mutex> lk(m.attr_mutex);
            if (cfg.shared_bytes > m.dyn_smem_limit) {
                size_t cap = info_.shared_mem_per_block_optin - size_t(k.resources.static_shared_bytes);
                if (cfg.shared_bytes > cap)
                    throw std::invalid_argument(who + ": " + std::to_string(cfg.shared_bytes) +
                                                " bytes of dynamic shared memory exceed the device limit of " +
                                                std::to_string(cap));
                check(d_->cuFuncSetAttribute(m.fn, FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(cfg.shared_bytes)),
                      who + ": raising the dynamic shared memory limit");
                m.dyn_smem_limit = cfg.shared_bytes;
            }
        }
        std::vector<uint64_t> ptrs(args.size());
        std::vector<void*> argv(args.size());
        for (size_t i = 0; i < args.size(); ++i) {
            if (args[i].kind == KernelArg::Pointer) {
                ptrs[i] = args[i].address;
                argv[i] = &ptrs[i];
            } else {
                argv[i] = const_cast<uint8_t*>(args[i].bytes.data());
            }
        }
        check(d_->cuLaunchKernel(m.fn, cfg.grid[0], cfg.grid[1], cfg.grid[2], cfg.block[0], cfg.block[1], cfg.block[2],
                                 unsigned(cfg.shared_bytes), cfg.stream ? reinterpret_cast<CUstream>(cfg.stream) : stream_,
                                 argv.data(), nullptr),
              who + ": launch");
        last_kernel_ = k.key.canonical();
        if (sync_check_) synchronize();
    }

    void synchronize() override {
        require();
        current();
        check(d_->cuCtxSynchronize(), "synchronize" + after_last());
    }

    MemoryUsage memory_usage() override {
        require();
        current();
        MemoryUsage m;
        check(d_->cuMemGetInfo(&m.free_bytes, &m.total_bytes), "cuMemGetInfo");
        m.allocated_bytes = m.total_bytes - m.free_bytes;
        return m;
    }

    TimingStats time(const std::function<void()>& enqueue, const TimingOptions& opt) override {
        require();
        current();
        if (opt.iters < 1) throw std::invalid_argument("timing: iters must be >= 1");
        if (opt.warmup < 0) throw std::invalid_argument("timing: warmup must be >= 0");
        std::shared_ptr<Buffer> flush;
        if (opt.flush_l2) flush = flush_buffer();
        for (int i = 0; i < opt.warmup; ++i) enqueue();
        std::vector<CUevent> ev(2 * size_t(opt.iters), nullptr);
        struct Destroy {
            const DriverApi* d; std::vector<CUevent>& ev;
            ~Destroy() { for (auto e : ev) if (e) d->cuEventDestroy(e); }
        } destroy{d_, ev};
        for (auto& e : ev) check(d_->cuEventCreate(&e, EVENT_DEFAULT), "cuEventCreate");
        std::shared_ptr<Kernel> spin;
        std::vector<KernelArg> spin_args;
        if (opt.guard_us < 0) throw std::invalid_argument("timing: guard_us must be >= 0");
        if (opt.guard_us > 0) {
            spin = kernel(KernelKey(kSpinKernel), CacheMode::Default);
            const unsigned long long ns = static_cast<unsigned long long>(opt.guard_us * 1e3);
            spin_args.push_back(KernelArg::raw(&ns, sizeof(ns), sizeof(ns)));
        }
        LaunchConfig one;
        for (int i = 0; i < opt.iters; ++i) {
            if (flush)
                check(d_->cuMemsetD8Async(flush->device_address(), uint8_t(i), flush->bytes, stream_), "L2 flush");
            if (spin) launch(*spin, one, spin_args);
            check(d_->cuEventRecord(ev[2 * i], stream_), "cuEventRecord");
            enqueue();
            check(d_->cuEventRecord(ev[2 * i + 1], stream_), "cuEventRecord");
        }
        check(d_->cuEventSynchronize(ev.back()), "timing" + after_last());
        std::vector<double> samples(opt.iters);
        for (int i = 0; i < opt.iters; ++i) {
            float ms = 0;
            check(d_->cuEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cuEventElapsedTime");
            samples[i] = ms;
        }
        return TimingStats::from_samples(std::move(samples));
    }

    // A Kernel from a cubin built outside the cache (kernel_from_cubin); not memoised.
    std::shared_ptr<Kernel> load_cubin(const KernelKey& key, const std::vector<uint8_t>& cubin) {
        require();
        if (cubin.empty()) throw std::invalid_argument("kernel " + key.canonical() + ": empty cubin");
        auto k = std::make_shared<CudaKernel>();
        k->key = key;
        k->origin = KernelOrigin::Compiled;
        load_module(*k, cubin);
        return k;
    }

    ~CudaBackend() override = default;

private:
    void init() {
        std::call_once(once_, [this] {
            std::string why;
            d_ = driver_api(&why);
            if (!d_) { why_ = why; return; }
            CUresult rc = d_->cuInit(0);
            if (rc != CUDA_SUCCESS) { why_ = "cuInit failed: " + err(rc) + " (no usable NVIDIA GPU)"; return; }
            int count = 0;
            d_->cuDeviceGetCount(&count);
            if (count < 1) { why_ = "no CUDA device present"; return; }
            int ordinal = 0;
            if (const char* e = std::getenv("ATTNPROTO_CUDA_DEVICE")) ordinal = std::atoi(e);
            if (ordinal < 0 || ordinal >= count) { why_ = "ATTNPROTO_CUDA_DEVICE out of range"; return; }
            if ((rc = d_->cuDeviceGet(&dev_, ordinal)) != CUDA_SUCCESS) { why_ = "cuDeviceGet: " + err(rc); return; }
            if ((rc = d_->cuDevicePrimaryCtxRetain(&ctx_, dev_)) != CUDA_SUCCESS) { why_ = "cuDevicePrimaryCtxRetain: " + err(rc); return; }
            if (!nvrtc_api(&why)) { why_ = why; return; }
            fill_info();
            const char* s = std::getenv("ATTNPROTO_SYNC_CHECK");
            sync_check_ = s && std::string(s) == "1";
            ok_ = true;
        });
    }

    void require() const {
        const_cast<CudaBackend*>(this)->init();
        if (!ok_) throw BackendError("CUDA backend unavailable: " + why_);
    }

    void current() const { d_->cuCtxSetCurrent(ctx_); }

    std::string err(CUresult rc) const {
        const char* name = nullptr;
        const char* text = nullptr;
        if (d_) { d_->cuGetErrorName(rc, &name); d_->cuGetErrorString(rc, &text); }
        return std::string(name ? name : "CUDA_ERROR") + " (" + (text ? text : "?") + ")";
    }

    void check(CUresult rc, const std::string& what) const {
        if (rc != CUDA_SUCCESS) throw BackendError(what + ": " + err(rc));
    }

    std::string after_last() const { return last_kernel_.empty() ? "" : " (after launching " + last_kernel_ + ")"; }

    static void bounds(const Buffer& b, size_t bytes, size_t offset, const char* what) {
        if (offset > b.bytes || bytes > b.bytes - offset)
            throw std::out_of_range(std::string(what) + ": " + std::to_string(bytes) + " bytes at offset " + std::to_string(offset) +
                                    " exceed the buffer's " + std::to_string(b.bytes) + " bytes");
    }

    int attr(int a) const {
        int v = 0;
        d_->cuDeviceGetAttribute(&v, a, dev_);
        return v;
    }

    void fill_info() {
        char name[256] = {0};
        d_->cuDeviceGetName(name, sizeof(name), dev_);
        info_.backend = "cuda";
        info_.name = name;
        info_.compute_major = attr(ATTR_COMPUTE_CAPABILITY_MAJOR);
        info_.compute_minor = attr(ATTR_COMPUTE_CAPABILITY_MINOR);
        // Arch-specific ("a") targets unlock wgmma/setmaxnreg on sm_90 and tcgen05 on sm_100.
        std::string suffix = (info_.compute_major >= 9) ? "a" : "";
        info_.arch = "sm_" + std::to_string(info_.compute_major) + std::to_string(info_.compute_minor) + suffix;
        info_.multiprocessors = attr(ATTR_MULTIPROCESSOR_COUNT);
        info_.shared_mem_per_block = size_t(attr(ATTR_MAX_SHARED_MEMORY_PER_BLOCK));
        info_.shared_mem_per_block_optin = size_t(attr(ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN));
        info_.shared_mem_per_sm = size_t(attr(ATTR_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR));
        info_.l2_bytes = size_t(attr(ATTR_L2_CACHE_SIZE));
        info_.max_threads_per_block = attr(ATTR_MAX_THREADS_PER_BLOCK);
        info_.clock_khz = attr(ATTR_CLOCK_RATE);
        size_t mem = 0;
        d_->cuDeviceTotalMem(&mem, dev_);
        info_.global_mem_bytes = mem;
        int v = 0;
        d_->cuDriverGetVersion(&v);
        info_.driver_version = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
        info_.compiler_version = nvrtc_version();
    }

    std::shared_ptr<Buffer> flush_buffer() {
        std::lock_guard<std::mutex> lk(mu_);
        if (!flush_) flush_ = alloc(std::max<size_t>(info_.l2_bytes, 1) * kFlushFactor);
        return flush_;
    }

    std::shared_ptr<CudaKernel> build(const KernelKey& key, CacheMode mode) {
        auto k = std::make_shared<CudaKernel>();
        k->key = key;
        Obtained got = obtain_cubin(key, info_.arch, mode);
        k->origin = got.origin;
        k->compile_ms = got.ms;
        k->log = got.log;
        k->archive_key = got.archive_key;
        load_module(*k, got.cubin);
        return k;
    }

    void load_module(CudaKernel& k, const std::vector<uint8_t>& cubin) {
        current();
        const std::string who = "kernel " + k.key.canonical();
        auto t0 = std::chrono::steady_clock::now();
        auto m = std::make_shared<Module>();
        m->d = d_;
        check(d_->cuModuleLoadData(&m->module, cubin.data()), who + ": cuModuleLoadData");
        CUresult rc = d_->cuModuleGetFunction(&m->fn, m->module, k.key.name.c_str());
        if (rc != CUDA_SUCCESS)
            throw BackendError(who + ": no extern \"C\" __global__ function named '" + k.key.name + "' in the module: " + err(rc));
        k.mod = m;
        k.load_ms = ms_since(t0);
        auto fattr = [&](int a) { int v = 0; d_->cuFuncGetAttribute(&v, a, m->fn); return v; };
        k.resources.registers = fattr(FUNC_NUM_REGS);
        k.resources.static_shared_bytes = fattr(FUNC_SHARED_SIZE_BYTES);
        k.resources.local_bytes = fattr(FUNC_LOCAL_SIZE_BYTES);
        k.resources.max_threads_per_block = fattr(FUNC_MAX_THREADS_PER_BLOCK);
        k.resources.const_bytes = fattr(FUNC_CONST_SIZE_BYTES);
    }

    std::once_flag once_;
    bool ok_ = false;
    std::string why_;
    const DriverApi* d_ = nullptr;
    CUdevice dev_ = 0;
    CUcontext ctx_ = nullptr;
    CUstream stream_ = nullptr;  // the legacy default stream: ordered with torch's default stream
    DeviceInfo info_;
    bool sync_check_ = false;
    std::string last_kernel_;
    std::mutex mu_;
    std::unordered_map<std::string, std::shared_ptr<CudaKernel>> mem_;
    std::shared_ptr<Buffer> flush_;
};

}  // namespace
}  // namespace cuda

Backend& cuda_backend() {
    static cuda::CudaBackend* b = new cuda::CudaBackend();  // process lifetime: modules outlive Python teardown
    return *b;
}

std::shared_ptr<Kernel> cuda::kernel_from_cubin(const KernelKey& key, const std::vector<uint8_t>& cubin) {
    return static_cast<cuda::CudaBackend&>(cuda_backend()).load_cubin(key, cubin);
}

}  // namespace attnproto
