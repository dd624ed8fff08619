// backend.h — the one interface behind which the CUDA and Metal backends sit.
//
// A Backend owns a device (singleton per process), compiles/loads kernels by
// KernelKey through its cache, allocates buffers, launches kernels and times
// them. The nanobind module (_attnproto) and the benchmark binaries (bench/)
// both use only this interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_key.h"

namespace attnproto {

// Raised for every failed driver/compiler call; the message names the kernel and key.
struct BackendError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct DeviceInfo {
    std::string backend;            // "cuda" | "metal"
    std::string name;               // device name as reported by the driver
    std::string arch;               // "sm_90a" (CUDA) or "apple9" (Metal GPU family)
    int compute_major = 0;          // CUDA compute capability (0 on Metal)
    int compute_minor = 0;
    int multiprocessors = 0;        // SMs (CUDA) / GPU cores (Metal, 0 if unknown)
    size_t shared_mem_per_block = 0;        // bytes a block gets without opt-in (48 KiB on CUDA; 32 KiB on Apple)
    size_t shared_mem_per_block_optin = 0;  // bytes a block may request after opt-in (227 KiB on H100)
    size_t shared_mem_per_sm = 0;           // bytes per multiprocessor
    size_t l2_bytes = 0;            // L2 cache size in bytes
    size_t global_mem_bytes = 0;    // device memory in bytes
    int max_threads_per_block = 0;
    int clock_khz = 0;              // max SM clock in kHz (0 if unknown)
    std::string driver_version;     // e.g. "13.0"
    std::string compiler_version;   // NVRTC "13.0" / Metal language version
};

// How a kernel was obtained, recorded on each Kernel for first-launch studies.
enum class KernelOrigin { Compiled, Archive, Memory };

// Compiler's resource report for one kernel.
struct KernelResources {
    int registers = 0;              // per thread
    int static_shared_bytes = 0;    // statically declared shared memory
    int local_bytes = 0;            // per-thread local memory (stack / spills)
    int max_threads_per_block = 0;  // limit given the resources
    int const_bytes = 0;
};

struct Kernel {
    KernelKey key;
    KernelOrigin origin = KernelOrigin::Compiled;
    double compile_ms = 0.0;        // time to compile (Compiled) or load (Archive); 0 for Memory
    double load_ms = 0.0;           // module load into the context
    KernelResources resources;
    std::string log;                // compiler log (warnings), may be empty
    std::string archive_key;        // hex key of the on-disk entry
    virtual ~Kernel() = default;
};

struct Buffer {
    size_t bytes = 0;
    virtual ~Buffer() = default;
    virtual uint64_t device_address() const = 0;  // CUDA: CUdeviceptr; Metal: gpuAddress
    virtual void* native_handle() const = 0;      // CUDA: same as address; Metal: id<MTLBuffer>
};

// One kernel argument: either a device pointer (Buffer or foreign tensor) or raw bytes
// (a scalar or a struct passed by value, e.g. AttentionParams).
struct KernelArg {
    enum Kind { Pointer, Bytes } kind = Bytes;
    uint64_t address = 0;                 // Pointer: device address
    std::shared_ptr<Buffer> buffer;       // Pointer: keeps a Buffer alive (may be null for foreign memory)
    std::vector<uint8_t> bytes;           // Bytes: the value
    size_t align = 4;                     // Bytes: alignment in bytes

    static KernelArg pointer(uint64_t addr, std::shared_ptr<Buffer> keep = nullptr);
    static KernelArg raw(const void* data, size_t size, size_t align);
};

struct LaunchConfig {
    unsigned grid[3] = {1, 1, 1};     // blocks (CUDA) / threadgroups (Metal)
    unsigned block[3] = {1, 1, 1};    // threads per block / threadgroup
    size_t shared_bytes = 0;          // dynamic shared (threadgroup) memory in bytes
    // CUDA: the CUstream to launch on (0 = the backend's stream, the legacy default stream), so a
    // launch joins the caller's stream (torch's current stream) and CUDA-graph capture on it.
    // Metal: not used (the backend's one command queue orders every dispatch).
    uint64_t stream = 0;
};

struct TimingOptions {
    int warmup = 4;        // untimed launches first (seed NFR-7)
    int iters = 50;        // timed samples
    bool flush_l2 = false; // write a buffer of 2x L2 size before each sample
    double guard_us = 0;   // keep the GPU busy this long before each start event (hides host launch latency)
};

struct TimingStats {
    std::vector<double> samples_ms;  // one per timed sample, in issue order
    double median_ms = 0, p10_ms = 0, p90_ms = 0, mean_ms = 0, min_ms = 0;
    double cv = 0;  // stddev / mean of the samples
    static TimingStats from_samples(std::vector<double> s);
};

enum class CacheMode {
    Default,       // memory -> archive -> compile (and store)
    ArchiveOnly,   // memory -> archive; missing entry is an error
    NoArchive,     // memory -> compile; archive neither read nor written
    Cold,          // compile, bypass memory and archive entirely (compile-cost studies)
};

// Device memory as the driver reports it, for the leak check (NFR-11, attnproto.leakcheck).
struct MemoryUsage {
    size_t allocated_bytes = 0;  // Metal: MTLDevice.currentAllocatedSize; CUDA: total - free (the whole device)
    size_t free_bytes = 0;       // CUDA: cuMemGetInfo's free; Metal: the working set left (0 when over it)
    size_t total_bytes = 0;      // CUDA: cuMemGetInfo's total; Metal: recommendedMaxWorkingSetSize
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    virtual bool available() const = 0;
    virtual std::string unavailable_reason() const = 0;
    virtual DeviceInfo info() = 0;

    virtual std::shared_ptr<Kernel> kernel(const KernelKey& key, CacheMode mode = CacheMode::Default) = 0;
    virtual void clear_memory_cache() = 0;

    virtual std::shared_ptr<Buffer> alloc(size_t bytes) = 0;
    virtual void upload(Buffer& dst, const void* src, size_t bytes, size_t offset = 0) = 0;
    virtual void download(const Buffer& src, void* dst, size_t bytes, size_t offset = 0) = 0;
    virtual void fill_bytes(Buffer& dst, uint8_t value) = 0;  // poison/zero a buffer
    virtual MemoryUsage memory_usage() = 0;

    virtual void launch(Kernel& k, const LaunchConfig& cfg, const std::vector<KernelArg>& args) = 0;
    virtual void synchronize() = 0;

    // Times `enqueue` (which launches work on this backend) with device-side timestamps.
    virtual TimingStats time(const std::function<void()>& enqueue, const TimingOptions& opt) = 0;
};

// Backends compiled into this build, by name ("cuda", "metal"). The object exists even when
// the device is unavailable (available() == false, unavailable_reason() says why).
std::vector<std::string> compiled_backends();
Backend& get_backend(const std::string& name);

// Directory of kernel sources (contains common/, cuda/, metal/). Set by the Python package
// at import (package data) or by ATTNPROTO_SHADER_DIR; bench binaries get it from CMake.
void set_shader_dir(const std::string& dir);
std::string shader_dir();
// Directory of the on-disk kernel archive; default $ATTNPROTO_CACHE_DIR or ~/.cache/attnproto.
void set_cache_dir(const std::string& dir);
std::string cache_dir();

}  // namespace attnproto
