// metal_backend.mm — attnproto::Backend for Apple GPUs (Metal), Objective-C++ with ARC.
//
// Device singleton (MTLDevice, command queue, library), a pipeline cache keyed by
// KernelKey::canonical() (function constants set by name), an MTLBinaryArchive on disk,
// shared-storage buffers, 3D dispatch with dynamic threadgroup memory, and timing from
// GPUStartTime/GPUEndTime plus MTLCounterSampleBuffer stage-boundary timestamps.
//
// Binding indices come from shaders/metal/metal_bindings.h; kKernelSignatures and
// kFunctionConstants below are the host's half of the contract that
// tools/metal_check/check.py cross-checks against the shaders.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "metal_backend.h"
#include "metal_bindings.h"

namespace attnproto {
namespace {

// ---------------------------------------------------------------------------- constants

// MSL version the kernels need: simdgroup_matrix with bfloat (seed NFR-8).
constexpr MTLLanguageVersion kLanguageVersion = MTLLanguageVersion3_1;
constexpr const char* kLanguageVersionName = "3.1";
// Name of the metallib built at install time (metal.cmake), relative to shader_dir().
constexpr const char* kMetallibName = "metal/attnproto.metallib";
// Environment switch: compile shaders from source at run time even when a metallib exists.
constexpr const char* kFromSourceEnv = "ATTNPROTO_METAL_FROM_SOURCE";
// setBytes: takes at most 4 KiB; larger by-value arguments go through a temporary buffer.
constexpr size_t kMaxInlineBytes = 4096;
// Bytes written before each sample when TimingOptions::flush_l2 is set. Apple GPUs do not
// report their system-level cache size; 2 x 96 MiB covers the largest SLC Apple has shipped
// (M2 Ultra) twice over, matching "2x L2" on CUDA.
constexpr size_t kCacheFlushBytes = size_t(192) << 20;
constexpr double kMsPerSecond = 1e3;
constexpr double kMsPerNanosecond = 1e-6;
// Counter samples per timed pass: start and end of the compute encoder.
constexpr NSUInteger kSamplesPerPass = 2;

// ---------------------------------------------------------------------------- binding tables

enum class ArgKind { Pointer, Bytes };

struct ArgSlot {
    const char* name;
    NSUInteger index;
    ArgKind kind;
};

struct KernelSignature {
    const char* kernel;
    std::vector<ArgSlot> slots;  // kernel arguments in launch order
};

// Launch arguments of each kernel, in the order Backend::launch receives them.
const std::vector<KernelSignature> kKernelSignatures = {
    {"flash_attention", {
        {"params", ATTNPROTO_BUF_PARAMS, ArgKind::Bytes},
        {"q", ATTNPROTO_BUF_Q, ArgKind::Pointer},
        {"k", ATTNPROTO_BUF_K, ArgKind::Pointer},
        {"v", ATTNPROTO_BUF_V, ArgKind::Pointer},
        {"o", ATTNPROTO_BUF_O, ArgKind::Pointer},
        {"lse", ATTNPROTO_BUF_LSE, ArgKind::Pointer},
    }},
    {"paged_attention", {
        {"params", ATTNPROTO_BUF_PARAMS, ArgKind::Bytes},
        {"q", ATTNPROTO_BUF_PAGED_Q, ArgKind::Pointer},
        {"k_cache", ATTNPROTO_BUF_PAGED_K_CACHE, ArgKind::Pointer},
        {"v_cache", ATTNPROTO_BUF_PAGED_V_CACHE, ArgKind::Pointer},
        {"block_table", ATTNPROTO_BUF_PAGED_BLOCK_TABLE, ArgKind::Pointer},
        {"context_lens", ATTNPROTO_BUF_PAGED_CONTEXT_LENS, ArgKind::Pointer},
        {"o_parts", ATTNPROTO_BUF_PAGED_O_PARTS, ArgKind::Pointer},
        {"lse_parts", ATTNPROTO_BUF_PAGED_LSE_PARTS, ArgKind::Pointer},
    }},
    {"paged_reduce", {
        {"params", ATTNPROTO_BUF_PARAMS, ArgKind::Bytes},
        {"o_parts", ATTNPROTO_BUF_REDUCE_O_PARTS, ArgKind::Pointer},
        {"lse_parts", ATTNPROTO_BUF_REDUCE_LSE_PARTS, ArgKind::Pointer},
        {"context_lens", ATTNPROTO_BUF_REDUCE_CONTEXT_LENS, ArgKind::Pointer},
        {"o", ATTNPROTO_BUF_REDUCE_O, ArgKind::Pointer},
        {"lse", ATTNPROTO_BUF_REDUCE_LSE, ArgKind::Pointer},
    }},
    {"linear_chunk_h", {
        {"params", ATTNPROTO_BUF_PARAMS, ArgKind::Bytes},
        {"k", ATTNPROTO_BUF_LINEAR_H_K, ArgKind::Pointer},
        {"v", ATTNPROTO_BUF_LINEAR_H_V, ArgKind::Pointer},
        {"states", ATTNPROTO_BUF_LINEAR_H_STATES, ArgKind::Pointer},
    }},
    {"linear_chunk_o", {
        {"params", ATTNPROTO_BUF_PARAMS, ArgKind::Bytes},
        {"q", ATTNPROTO_BUF_LINEAR_O_Q, ArgKind::Pointer},
        {"k", ATTNPROTO_BUF_LINEAR_O_K, ArgKind::Pointer},
        {"v", ATTNPROTO_BUF_LINEAR_O_V, ArgKind::Pointer},
        {"states", ATTNPROTO_BUF_LINEAR_O_STATES, ArgKind::Pointer},
        {"o", ATTNPROTO_BUF_LINEAR_O_O, ArgKind::Pointer},
    }},
    {"rope", {
        {"params", ATTNPROTO_BUF_PARAMS, ArgKind::Bytes},
        {"x", ATTNPROTO_BUF_ROPE_X, ArgKind::Pointer},
        {"y", ATTNPROTO_BUF_ROPE_Y, ArgKind::Pointer},
    }},
    {"smoke", {
        {"x", ATTNPROTO_BUF_SMOKE_X, ArgKind::Pointer},
        {"y", ATTNPROTO_BUF_SMOKE_Y, ArgKind::Pointer},
        {"alpha", ATTNPROTO_BUF_SMOKE_ALPHA, ArgKind::Bytes},
        {"n", ATTNPROTO_BUF_SMOKE_N, ArgKind::Bytes},
    }},
};

struct FunctionConstantSpec {
    const char* name;
    NSUInteger index;
    MTLDataType type;
};

// Every function constant a shader declares: name, index and MSL type.
const std::vector<FunctionConstantSpec> kFunctionConstants = {
    {"HEAD_DIM", ATTNPROTO_FC_HEAD_DIM, MTLDataTypeInt},
    {"BLOCK_R", ATTNPROTO_FC_BLOCK_R, MTLDataTypeInt},
    {"BLOCK_C", ATTNPROTO_FC_BLOCK_C, MTLDataTypeInt},
    {"CAUSAL", ATTNPROTO_FC_CAUSAL, MTLDataTypeBool},
    {"DTYPE", ATTNPROTO_FC_DTYPE, MTLDataTypeInt},
    {"ROPE", ATTNPROTO_FC_ROPE, MTLDataTypeBool},
    {"ALIBI", ATTNPROTO_FC_ALIBI, MTLDataTypeBool},
    {"GQA_GROUP", ATTNPROTO_FC_GQA_GROUP, MTLDataTypeInt},
    {"BLOCK_SIZE", ATTNPROTO_FC_BLOCK_SIZE, MTLDataTypeInt},
    {"PARTITION_SIZE", ATTNPROTO_FC_PARTITION_SIZE, MTLDataTypeInt},
    {"CHUNK_SIZE", ATTNPROTO_FC_CHUNK_SIZE, MTLDataTypeInt},
    {"WINDOW", ATTNPROTO_FC_WINDOW, MTLDataTypeBool},
    {"SOFTCAP", ATTNPROTO_FC_SOFTCAP, MTLDataTypeBool},
};

const KernelSignature* find_signature(const std::string& kernel)
{
    for (const auto& sig : kKernelSignatures) {
        if (kernel == sig.kernel) return &sig;
    }
    return nullptr;
}

const FunctionConstantSpec* find_constant(const std::string& name)
{
    for (const auto& fc : kFunctionConstants) {
        if (name == fc.name) return &fc;
    }
    return nullptr;
}

// ---------------------------------------------------------------------------- helpers

NSString* ns(const std::string& s) { return [NSString stringWithUTF8String:s.c_str()]; }

std::string str(NSString* s) { return s ? std::string([s UTF8String]) : std::string(); }

std::string describe(NSError* err) { return err ? str([err localizedDescription]) : std::string("unknown error"); }

double now_ms()
{
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

bool env_flag(const char* name)
{
    const char* v = std::getenv(name);
    return v && *v && std::string(v) != "0";
}

std::string read_file(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in) throw BackendError("metal: cannot read " + path);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

// newLibraryWithSource: has no include path, so quoted includes are inlined here,
// resolved against the including file's directory and then shader_dir(). Each header is
// inlined once (all of attnproto's headers have include guards).
std::string expand_includes(const std::string& path, std::set<std::string>& seen)
{
    if (!seen.insert(path).second) return std::string();
    const std::string dir = path.substr(0, path.find_last_of('/') + 1);
    std::istringstream in(read_file(path));
    std::ostringstream out;
    std::string line;
    while (std::getline(in, line)) {
        const size_t hash = line.find_first_not_of(" \t");
        const size_t open = line.find('"');
        const bool quoted_include = hash != std::string::npos && line.compare(hash, 1, "#") == 0 &&
                                    line.find("include", hash) != std::string::npos && open != std::string::npos;
        if (!quoted_include) {
            out << line << '\n';
            continue;
        }
        const size_t close = line.find('"', open + 1);
        const std::string name = line.substr(open + 1, close - open - 1);
        const std::string local = dir + name;
        const std::string global = shader_dir() + "/" + name;
        const std::string target = file_exists(local) ? local : global;
        if (!file_exists(target)) throw BackendError("metal: " + path + " includes missing \"" + name + "\"");
        out << expand_includes(target, seen);
    }
    return out.str();
}

// Digest of arbitrary content through the core's SHA-256 (KernelKey::archive_key).
std::string content_digest(const std::string& bytes) { return KernelKey("metal_content").archive_key(bytes, "", ""); }

int64_t constant_or_throw(const KernelKey& key, const char* name)
{
    auto it = key.constants.find(name);
    if (it == key.constants.end()) {
        throw BackendError("metal: " + key.canonical() + " lacks function constant " + name);
    }
    return it->second;
}

// ---------------------------------------------------------------------------- objects

struct MetalBuffer final : Buffer {
    id<MTLBuffer> buffer = nil;
    uint64_t device_address() const override { return buffer.gpuAddress; }
    void* native_handle() const override { return (__bridge void*)buffer; }
};

struct MetalKernel final : Kernel {
    id<MTLComputePipelineState> pipeline = nil;
    const KernelSignature* signature = nullptr;
    size_t required_threadgroup_bytes = 0;  // dynamic threadgroup memory the kernel needs
    unsigned required_threads = 0;          // threads per threadgroup it was written for; 0 = any
};

class MetalBackend final : public Backend {
public:
    MetalBackend() { init_device(); }

    std::string name() const override { return "metal"; }
    bool available() const override { return device_ != nil && reason_.empty(); }
    std::string unavailable_reason() const override { return reason_; }

    DeviceInfo info() override
    {
        require();
        DeviceInfo d;
        d.backend = "metal";
        d.name = str(device_.name);
        d.arch = arch_;
        d.shared_mem_per_block = device_.maxThreadgroupMemoryLength;
        d.shared_mem_per_block_optin = device_.maxThreadgroupMemoryLength;
        d.global_mem_bytes = device_.recommendedMaxWorkingSetSize;
        d.max_threads_per_block = int(device_.maxThreadsPerThreadgroup.width);
        d.driver_version = str([[NSProcessInfo processInfo] operatingSystemVersionString]);
        d.compiler_version = std::string("MSL ") + kLanguageVersionName;
        return d;
    }

    std::shared_ptr<Kernel> kernel(const KernelKey& key, CacheMode mode) override
    {
        require();
        std::lock_guard<std::mutex> lock(mutex_);
        const std::string canon = key.canonical();
        if (mode != CacheMode::Cold) {
            auto it = cache_.find(canon);
            if (it != cache_.end()) {
                auto hit = std::make_shared<MetalKernel>(*it->second);
                hit->origin = KernelOrigin::Memory;
                hit->compile_ms = 0.0;
                return hit;
            }
        }
        auto k = build(key, mode);
        if (mode != CacheMode::Cold) cache_[canon] = k;
        return k;
    }

    void clear_memory_cache() override
    {
        std::lock_guard<std::mutex> lock(mutex_);
        cache_.clear();
    }

    std::shared_ptr<Buffer> alloc(size_t bytes) override
    {
        require();
        if (bytes == 0) throw BackendError("metal: cannot allocate a zero-byte buffer");
        auto b = std::make_shared<MetalBuffer>();
        b->buffer = [device_ newBufferWithLength:bytes options:MTLResourceStorageModeShared];
        if (b->buffer == nil) throw BackendError("metal: allocation of " + std::to_string(bytes) + " bytes failed");
        b->bytes = bytes;
        std::lock_guard<std::mutex> lock(mutex_);
        live_[b->buffer.gpuAddress] = b;
        return b;
    }

    void upload(Buffer& dst, const void* src, size_t bytes, size_t offset) override
    {
        auto& b = as_metal(dst, "upload");
        check_range(b, bytes, offset, "upload");
        synchronize();  // shared storage: the GPU must not be using the buffer
        std::memcpy(static_cast<uint8_t*>([b.buffer contents]) + offset, src, bytes);
    }

    void download(const Buffer& src, void* dst, size_t bytes, size_t offset) override
    {
        auto& b = as_metal(const_cast<Buffer&>(src), "download");
        check_range(b, bytes, offset, "download");
        synchronize();
        std::memcpy(dst, static_cast<const uint8_t*>([b.buffer contents]) + offset, bytes);
    }

    void fill_bytes(Buffer& dst, uint8_t value) override
    {
        auto& b = as_metal(dst, "fill_bytes");
        end_compute_encoder();
        id<MTLBlitCommandEncoder> blit = [current_command_buffer() blitCommandEncoder];
        [blit fillBuffer:b.buffer range:NSMakeRange(0, b.bytes) value:value];
        [blit endEncoding];
    }

    void launch(Kernel& kernel, const LaunchConfig& cfg, const std::vector<KernelArg>& args) override
    {
        require();
        auto* k = dynamic_cast<MetalKernel*>(&kernel);
        if (!k) throw BackendError("metal: launch got a kernel from another backend");
        validate_launch(*k, cfg, args);
        id<MTLComputeCommandEncoder> enc = compute_encoder();
        [enc setComputePipelineState:k->pipeline];
        for (size_t i = 0; i < args.size(); ++i) {
            const ArgSlot& slot = k->signature->slots[i];
            const KernelArg& arg = args[i];
            if (slot.kind == ArgKind::Pointer) {
                auto [buffer, offset] = resolve_pointer(arg, k->key, slot);
                [enc setBuffer:buffer offset:offset atIndex:slot.index];
            } else if (arg.bytes.size() <= kMaxInlineBytes) {
                [enc setBytes:arg.bytes.data() length:arg.bytes.size() atIndex:slot.index];
            } else {
                id<MTLBuffer> tmp = [device_ newBufferWithLength:arg.bytes.size() options:MTLResourceStorageModeShared];
                std::memcpy([tmp contents], arg.bytes.data(), arg.bytes.size());
                [enc setBuffer:tmp offset:0 atIndex:slot.index];
            }
        }
        if (cfg.shared_bytes > 0) {
            const size_t granule = ATTNPROTO_TG_MEMORY_GRANULE;
            const size_t rounded = (cfg.shared_bytes + granule - 1) / granule * granule;
            [enc setThreadgroupMemoryLength:rounded atIndex:ATTNPROTO_TG_SMEM];
        }
        [enc dispatchThreadgroups:MTLSizeMake(cfg.grid[0], cfg.grid[1], cfg.grid[2])
            threadsPerThreadgroup:MTLSizeMake(cfg.block[0], cfg.block[1], cfg.block[2])];
    }

    MemoryUsage memory_usage() override
    {
        require();
        MemoryUsage m;
        m.allocated_bytes = size_t(device_.currentAllocatedSize);
        m.total_bytes = size_t(device_.recommendedMaxWorkingSetSize);
        m.free_bytes = m.total_bytes > m.allocated_bytes ? m.total_bytes - m.allocated_bytes : 0;
        return m;
    }

    void synchronize() override
    {
        if (command_buffer_ == nil) return;
        end_compute_encoder();
        id<MTLCommandBuffer> cb = command_buffer_;
        command_buffer_ = nil;
        [cb commit];
        [cb waitUntilCompleted];
        check_completed(cb);
    }

    TimingStats time(const std::function<void()>& enqueue, const TimingOptions& opt) override
    {
        require();
        if (opt.iters <= 0) throw BackendError("metal: time() needs iters > 0");
        if (opt.warmup < 0) throw BackendError("metal: time() needs warmup >= 0");
        synchronize();
        id<MTLBuffer> flush = opt.flush_l2 ? [device_ newBufferWithLength:kCacheFlushBytes
                                                                   options:MTLResourceStorageModeShared]
                                           : nil;
        id<MTLCounterSampleBuffer> counters = make_counter_buffer(NSUInteger(opt.iters) * kSamplesPerPass);
        std::vector<double> samples;
        for (int i = 0; i < opt.warmup + opt.iters; ++i) {
            const bool timed = i >= opt.warmup;
            if (flush != nil) {
                id<MTLBlitCommandEncoder> blit = [current_command_buffer() blitCommandEncoder];
                [blit fillBuffer:flush range:NSMakeRange(0, kCacheFlushBytes) value:uint8_t(i)];
                [blit endEncoding];
                synchronize();
            }
            if (timed && counters != nil) {
                const NSUInteger first = NSUInteger(i - opt.warmup) * kSamplesPerPass;
                pending_pass_ = [MTLComputePassDescriptor computePassDescriptor];
                MTLComputePassSampleBufferAttachmentDescriptor* att =
                    [pending_pass_.sampleBufferAttachments objectAtIndexedSubscript:0];
                att.sampleBuffer = counters;
                att.startOfEncoderSampleIndex = first;
                att.endOfEncoderSampleIndex = first + 1;
            }
            enqueue();
            pending_pass_ = nil;
            if (command_buffer_ == nil) throw BackendError("metal: time(): enqueue launched no work");
            end_compute_encoder();
            id<MTLCommandBuffer> cb = command_buffer_;
            command_buffer_ = nil;
            [cb commit];
            [cb waitUntilCompleted];
            check_completed(cb);
            if (timed) samples.push_back((cb.GPUEndTime - cb.GPUStartTime) * kMsPerSecond);
        }
        stage_samples_ = counters != nil ? resolve_stage_samples(counters, NSUInteger(opt.iters)) : std::vector<double>();
        return TimingStats::from_samples(std::move(samples));
    }

    std::vector<double> stage_samples() const { return stage_samples_; }

private:
    // ------------------------------------------------------------------ device
    void init_device()
    {
        device_ = MTLCreateSystemDefaultDevice();
        if (device_ == nil) {
            reason_ = "no Metal device (MTLCreateSystemDefaultDevice returned nil)";
            return;
        }
        if (![device_ supportsFamily:MTLGPUFamilyApple9]) {
            reason_ = "Metal device '" + str(device_.name) +
                      "' is not Apple GPU family 9 (M3/M4 or later); attnproto's kernels need "
                      "simdgroup_matrix with bfloat under MSL 3.1 as tuned for that family";
            return;
        }
        arch_ = "apple9";
        queue_ = [device_ newCommandQueue];
        if (queue_ == nil) reason_ = "cannot create a Metal command queue";
    }

    void require() const
    {
        if (!available()) throw BackendError("metal backend unavailable: " + reason_);
    }

    // ------------------------------------------------------------------ libraries
    struct LibraryEntry {
        id<MTLLibrary> library = nil;
        std::string source_hash;
    };

    LibraryEntry& library_for(const std::string& kernel)
    {
        const std::string metallib = shader_dir() + "/" + kMetallibName;
        const bool from_source = env_flag(kFromSourceEnv) || !file_exists(metallib);
        const std::string cache_key = from_source ? "source:" + kernel : "metallib";
        auto it = libraries_.find(cache_key);
        if (it != libraries_.end()) return it->second;
        LibraryEntry entry;
        NSError* err = nil;
        if (from_source) {
            const std::string path = shader_dir() + "/metal/" + kernel + ".metal";
            std::set<std::string> seen;
            const std::string source = expand_includes(path, seen);
            MTLCompileOptions* options = [MTLCompileOptions new];
            options.languageVersion = kLanguageVersion;
            options.fastMathEnabled = YES;
            entry.library = [device_ newLibraryWithSource:ns(source) options:options error:&err];
            if (entry.library == nil) throw BackendError("metal: compiling " + path + " failed: " + describe(err));
            entry.source_hash = content_digest(source);
        } else {
            entry.library = [device_ newLibraryWithURL:[NSURL fileURLWithPath:ns(metallib)] error:&err];
            if (entry.library == nil) throw BackendError("metal: loading " + metallib + " failed: " + describe(err));
            entry.source_hash = content_digest(read_file(metallib));
        }
        return libraries_.emplace(cache_key, entry).first->second;
    }

    // ------------------------------------------------------------------ archive
    std::string archive_path(const std::string& source_hash) const
    {
        const std::string id = content_digest(source_hash + arch_ + str(device_.name) + kLanguageVersionName);
        return cache_dir() + "/metal/" + id + ".mtlarchive";
    }

    id<MTLBinaryArchive> archive_for(const std::string& source_hash, bool must_exist)
    {
        const std::string path = archive_path(source_hash);
        auto it = archives_.find(path);
        if (it != archives_.end()) return it->second;
        MTLBinaryArchiveDescriptor* desc = [MTLBinaryArchiveDescriptor new];
        if (file_exists(path)) {
            desc.url = [NSURL fileURLWithPath:ns(path)];
        } else if (must_exist) {
            throw BackendError("metal: no binary archive at " + path + " (CacheMode::ArchiveOnly)");
        }
        NSError* err = nil;
        id<MTLBinaryArchive> archive = [device_ newBinaryArchiveWithDescriptor:desc error:&err];
        if (archive == nil) throw BackendError("metal: opening binary archive " + path + " failed: " + describe(err));
        archives_[path] = archive;
        return archive;
    }

    void store_in_archive(id<MTLBinaryArchive> archive, MTLComputePipelineDescriptor* desc,
                          const std::string& source_hash, const std::string& what)
    {
        const std::string path = archive_path(source_hash);
        NSError* err = nil;
        NSString* dir = [ns(path) stringByDeletingLastPathComponent];
        if (![[NSFileManager defaultManager] createDirectoryAtPath:dir withIntermediateDirectories:YES
                                                        attributes:nil error:&err]) {
            throw BackendError("metal: cannot create " + str(dir) + ": " + describe(err));
        }
        if (![archive addComputePipelineFunctionsWithDescriptor:desc error:&err]) {
            throw BackendError("metal: adding " + what + " to the binary archive failed: " + describe(err));
        }
        if (![archive serializeToURL:[NSURL fileURLWithPath:ns(path)] error:&err]) {
            throw BackendError("metal: writing binary archive " + path + " failed: " + describe(err));
        }
    }

    // ------------------------------------------------------------------ pipelines
    MTLFunctionConstantValues* constant_values(const KernelKey& key)
    {
        MTLFunctionConstantValues* values = [MTLFunctionConstantValues new];
        for (const auto& [name, value] : key.constants) {
            const FunctionConstantSpec* fc = find_constant(name);
            if (!fc) throw BackendError("metal: " + key.canonical() + ": unknown function constant " + name);
            if (fc->type == MTLDataTypeBool) {
                if (value != 0 && value != 1) {
                    throw BackendError("metal: " + key.canonical() + ": " + name + " is a bool, got " +
                                       std::to_string(value));
                }
                const bool b = value != 0;
                [values setConstantValue:&b type:MTLDataTypeBool withName:ns(name)];
            } else {
                if (value < INT32_MIN || value > INT32_MAX) {
                    throw BackendError("metal: " + key.canonical() + ": " + name + " does not fit an int");
                }
                const int32_t i = int32_t(value);
                [values setConstantValue:&i type:MTLDataTypeInt withName:ns(name)];
            }
        }
        return values;
    }

    // Every constant the function declares must be one the host knows, at the same index
    // and type; a required one must be in the key.
    void verify_function_constants(id<MTLFunction> fn, const KernelKey& key)
    {
        NSDictionary<NSString*, MTLFunctionConstant*>* declared = fn.functionConstantsDictionary;
        for (NSString* name in declared) {
            MTLFunctionConstant* c = [declared objectForKey:name];
            const FunctionConstantSpec* fc = find_constant(str(name));
            if (!fc || fc->index != c.index || fc->type != c.type) {
                throw BackendError("metal: " + key.canonical() + ": function constant " + str(name) +
                                   " disagrees with the host table (metal_bindings.h)");
            }
            if (c.required && key.constants.count(str(name)) == 0) {
                throw BackendError("metal: " + key.canonical() + " lacks required function constant " + str(name));
            }
        }
    }

    std::shared_ptr<MetalKernel> build(const KernelKey& key, CacheMode mode)
    {
        const KernelSignature* sig = find_signature(key.name);
        if (!sig) throw BackendError("metal: unknown kernel '" + key.name + "' (no signature in metal_backend.mm)");
        auto k = std::make_shared<MetalKernel>();
        k->key = key;
        k->signature = sig;
        if (key.name == "flash_attention") {
            k->required_threadgroup_bytes = metal_flash_threadgroup_bytes(key);
            k->required_threads = ATTNPROTO_FLASH_THREADS(unsigned(constant_or_throw(key, "BLOCK_R")));
        } else if (key.name == "paged_attention") {
            k->required_threadgroup_bytes = metal_paged_threadgroup_bytes(key);
            k->required_threads = ATTNPROTO_PAGED_THREADS;
        } else if (key.name == "linear_chunk_h" || key.name == "linear_chunk_o") {
            const bool h = key.name == "linear_chunk_h";
            const int64_t d64 = constant_or_throw(key, "HEAD_DIM");
            const int64_t chunk = constant_or_throw(key, "CHUNK_SIZE");
            if (d64 < ATTNPROTO_LINEAR_H_COLS || d64 % ATTNPROTO_LINEAR_H_COLS || d64 > ATTNPROTO_LINEAR_MAX_HEAD_DIM ||
                chunk < ATTNPROTO_LINEAR_SUB || chunk % ATTNPROTO_LINEAR_SUB || chunk > ATTNPROTO_LINEAR_MAX_CHUNK) {
                throw BackendError("metal: " + key.canonical() + ": HEAD_DIM must be a multiple of 32 in [32, 128] "
                                   "and CHUNK_SIZE a multiple of 32 in [32, 256]");
            }
            const unsigned d = unsigned(d64);
            const size_t elem_bytes = 2;  // FP16 and BF16
            k->required_threadgroup_bytes = h ? ATTNPROTO_LINEAR_H_TG_BYTES(size_t(d), elem_bytes)
                                              : ATTNPROTO_LINEAR_O_TG_BYTES(size_t(d), elem_bytes);
            k->required_threads = h ? ATTNPROTO_LINEAR_H_THREADS(d) : ATTNPROTO_LINEAR_O_THREADS;
        } else if (key.name == "paged_reduce") {
            // The weights scale with the run-time partition count: the launch brings at least
            // one partition's worth; the kernel is written for exactly this many threads.
            k->required_threadgroup_bytes = ATTNPROTO_PAGED_REDUCE_TG_BYTES(1);
            k->required_threads = ATTNPROTO_PAGED_REDUCE_THREADS;
        }

        const double t_load = now_ms();
        LibraryEntry& lib = library_for(key.name);
        k->load_ms = now_ms() - t_load;
        k->archive_key = key.archive_key(lib.source_hash, arch_, std::string("MSL ") + kLanguageVersionName);

        const double t0 = now_ms();
        NSError* err = nil;
        id<MTLFunction> fn = [lib.library newFunctionWithName:ns(key.name) constantValues:constant_values(key)
                                                        error:&err];
        if (fn == nil) throw BackendError("metal: specialising " + key.canonical() + " failed: " + describe(err));
        verify_function_constants(fn, key);
        MTLComputePipelineDescriptor* desc = [MTLComputePipelineDescriptor new];
        desc.label = ns(key.canonical());
        desc.computeFunction = fn;

        id<MTLComputePipelineState> pso = nil;
        const bool use_archive = mode == CacheMode::Default || mode == CacheMode::ArchiveOnly;
        id<MTLBinaryArchive> archive = use_archive ? archive_for(lib.source_hash, mode == CacheMode::ArchiveOnly) : nil;
        if (archive != nil) {
            desc.binaryArchives = @[ archive ];
            pso = [device_ newComputePipelineStateWithDescriptor:desc
                                                         options:MTLPipelineOptionFailOnBinaryArchiveMiss
                                                      reflection:nullptr
                                                           error:&err];
            if (pso != nil) {
                k->origin = KernelOrigin::Archive;
            } else if (mode == CacheMode::ArchiveOnly) {
                throw BackendError("metal: " + key.canonical() + " is not in the binary archive: " + describe(err));
            }
        }
        if (pso == nil) {
            desc.binaryArchives = @[];
            err = nil;
            pso = [device_ newComputePipelineStateWithDescriptor:desc options:MTLPipelineOptionNone reflection:nullptr
                                                           error:&err];
            if (pso == nil) throw BackendError("metal: pipeline for " + key.canonical() + " failed: " + describe(err));
            k->origin = KernelOrigin::Compiled;
            if (archive != nil) store_in_archive(archive, desc, lib.source_hash, key.canonical());
        }
        k->compile_ms = now_ms() - t0;
        k->pipeline = pso;
        k->resources.max_threads_per_block = int(pso.maxTotalThreadsPerThreadgroup);
        k->resources.static_shared_bytes = int(pso.staticThreadgroupMemoryLength);
        if (mode == CacheMode::Cold) {
            k->log = "Cold: bypassed attnproto's caches; the OS Metal shader cache may still serve this pipeline";
        }
        return k;
    }

    // ------------------------------------------------------------------ launch helpers
    void validate_launch(const MetalKernel& k, const LaunchConfig& cfg, const std::vector<KernelArg>& args) const
    {
        const std::string what = "metal: launch " + k.key.canonical() + ": ";
        if (args.size() != k.signature->slots.size()) {
            throw BackendError(what + "expected " + std::to_string(k.signature->slots.size()) + " arguments, got " +
                               std::to_string(args.size()));
        }
        for (size_t i = 0; i < args.size(); ++i) {
            const ArgSlot& slot = k.signature->slots[i];
            const bool want_pointer = slot.kind == ArgKind::Pointer;
            if ((args[i].kind == KernelArg::Pointer) != want_pointer) {
                throw BackendError(what + "argument " + std::to_string(i) + " (" + slot.name + ") must be " +
                                   (want_pointer ? "a buffer" : "a by-value struct/scalar"));
            }
            if (slot.index == ATTNPROTO_BUF_PARAMS && !want_pointer && std::string(slot.name) == "params" &&
                args[i].bytes.size() != ATTNPROTO_PARAMS_SIZE) {
                throw BackendError(what + "params must be " + std::to_string(ATTNPROTO_PARAMS_SIZE) + " bytes, got " +
                                   std::to_string(args[i].bytes.size()));
            }
        }
        const size_t threads = size_t(cfg.block[0]) * cfg.block[1] * cfg.block[2];
        if (threads == 0 || threads > k.pipeline.maxTotalThreadsPerThreadgroup) {
            throw BackendError(what + std::to_string(threads) + " threads per threadgroup; the pipeline allows 1.." +
                               std::to_string(k.pipeline.maxTotalThreadsPerThreadgroup));
        }
        if (k.required_threads != 0 && threads != k.required_threads) {
            throw BackendError(what + "needs exactly " + std::to_string(k.required_threads) +
                               " threads per threadgroup, got " + std::to_string(threads));
        }
        if (cfg.shared_bytes < k.required_threadgroup_bytes) {
            throw BackendError(what + "needs " + std::to_string(k.required_threadgroup_bytes) +
                               " bytes of threadgroup memory, got " + std::to_string(cfg.shared_bytes));
        }
        if (cfg.shared_bytes + k.pipeline.staticThreadgroupMemoryLength > device_.maxThreadgroupMemoryLength) {
            throw BackendError(what + std::to_string(cfg.shared_bytes) + " bytes of threadgroup memory exceed the "
                               "device's " + std::to_string(device_.maxThreadgroupMemoryLength));
        }
        if (cfg.grid[0] == 0 || cfg.grid[1] == 0 || cfg.grid[2] == 0) throw BackendError(what + "empty grid");
    }

    std::pair<id<MTLBuffer>, NSUInteger> resolve_pointer(const KernelArg& arg, const KernelKey& key,
                                                         const ArgSlot& slot)
    {
        std::shared_ptr<Buffer> keep = arg.buffer;
        if (!keep) {  // foreign pointer: find the live attnproto buffer containing it
            std::lock_guard<std::mutex> lock(mutex_);
            auto it = live_.upper_bound(arg.address);
            if (it != live_.begin()) {
                --it;
                keep = it->second.lock();
            }
        }
        auto* mb = dynamic_cast<MetalBuffer*>(keep.get());
        if (!mb || arg.address < mb->device_address() || arg.address >= mb->device_address() + mb->bytes) {
            throw BackendError("metal: launch " + key.canonical() + ": argument '" + slot.name +
                               "' is not inside a Metal buffer allocated by attnproto");
        }
        return {mb->buffer, NSUInteger(arg.address - mb->device_address())};
    }

    MetalBuffer& as_metal(Buffer& b, const char* op) const
    {
        auto* mb = dynamic_cast<MetalBuffer*>(&b);
        if (!mb) throw BackendError(std::string("metal: ") + op + " got a buffer from another backend");
        return *mb;
    }

    void check_range(const MetalBuffer& b, size_t bytes, size_t offset, const char* op) const
    {
        if (offset > b.bytes || bytes > b.bytes - offset) {
            throw BackendError(std::string("metal: ") + op + " of " + std::to_string(bytes) + " bytes at offset " +
                               std::to_string(offset) + " overruns a " + std::to_string(b.bytes) + "-byte buffer");
        }
    }

    id<MTLCommandBuffer> current_command_buffer()
    {
        if (command_buffer_ == nil) command_buffer_ = [queue_ commandBuffer];
        return command_buffer_;
    }

    id<MTLComputeCommandEncoder> compute_encoder()
    {
        if (encoder_ == nil) {
            id<MTLCommandBuffer> cb = current_command_buffer();
            encoder_ = pending_pass_ != nil ? [cb computeCommandEncoderWithDescriptor:pending_pass_]
                                            : [cb computeCommandEncoder];
        }
        return encoder_;
    }

    void end_compute_encoder()
    {
        if (encoder_ != nil) {
            [encoder_ endEncoding];
            encoder_ = nil;
        }
    }

    void check_completed(id<MTLCommandBuffer> cb) const
    {
        if (cb.status == MTLCommandBufferStatusError) {
            throw BackendError("metal: command buffer failed: " + describe(cb.error));
        }
    }

    // ------------------------------------------------------------------ counters
    id<MTLCounterSampleBuffer> make_counter_buffer(NSUInteger samples)
    {
        if (![device_ supportsCounterSampling:MTLCounterSamplingPointAtStageBoundary]) return nil;
        id<MTLCounterSet> timestamps = nil;
        for (id<MTLCounterSet> set in device_.counterSets) {
            if ([set.name isEqualToString:MTLCommonCounterSetTimestamp]) timestamps = set;
        }
        if (timestamps == nil) return nil;
        MTLCounterSampleBufferDescriptor* desc = [MTLCounterSampleBufferDescriptor new];
        desc.counterSet = timestamps;
        desc.storageMode = MTLStorageModeShared;
        desc.sampleCount = samples;
        desc.label = @"attnproto stage timestamps";
        NSError* err = nil;
        id<MTLCounterSampleBuffer> buffer = [device_ newCounterSampleBufferWithDescriptor:desc error:&err];
        return buffer;  // nil (no stage samples) when the device refuses; GPUStart/EndTime still time
    }

    // GPU timestamps to ms, calibrated against the CPU clock (ns) around the run.
    std::vector<double> resolve_stage_samples(id<MTLCounterSampleBuffer> counters, NSUInteger passes)
    {
        MTLTimestamp cpu0 = 0, gpu0 = 0, cpu1 = 0, gpu1 = 0;
        [device_ sampleTimestamps:&cpu0 gpuTimestamp:&gpu0];
        NSData* data = [counters resolveCounterRange:NSMakeRange(0, passes * kSamplesPerPass)];
        [device_ sampleTimestamps:&cpu1 gpuTimestamp:&gpu1];
        std::vector<double> out;
        if (data == nil || gpu1 <= gpu0) return out;
        const double ns_per_tick = double(cpu1 - cpu0) / double(gpu1 - gpu0);
        const auto* ts = static_cast<const MTLCounterResultTimestamp*>([data bytes]);
        for (NSUInteger i = 0; i < passes; ++i) {
            const uint64_t start = ts[i * kSamplesPerPass].timestamp, end = ts[i * kSamplesPerPass + 1].timestamp;
            if (end > start) out.push_back(double(end - start) * ns_per_tick * kMsPerNanosecond);
        }
        return out;
    }

    id<MTLDevice> device_ = nil;
    id<MTLCommandQueue> queue_ = nil;
    id<MTLCommandBuffer> command_buffer_ = nil;
    id<MTLComputeCommandEncoder> encoder_ = nil;
    MTLComputePassDescriptor* pending_pass_ = nil;
    std::string reason_;
    std::string arch_;
    std::mutex mutex_;
    std::map<std::string, std::shared_ptr<MetalKernel>> cache_;
    std::map<std::string, LibraryEntry> libraries_;
    std::map<std::string, id<MTLBinaryArchive>> archives_;
    std::map<uint64_t, std::weak_ptr<MetalBuffer>> live_;
    std::vector<double> stage_samples_;
};

MetalBackend& instance()
{
    static MetalBackend backend;
    return backend;
}

}  // namespace

Backend& metal_backend() { return instance(); }

std::vector<double> metal_last_stage_samples_ms() { return instance().stage_samples(); }

size_t metal_flash_threadgroup_bytes(const KernelKey& key)
{
    const int64_t d = constant_or_throw(key, "HEAD_DIM");
    const int64_t br = constant_or_throw(key, "BLOCK_R");
    const int64_t bc = constant_or_throw(key, "BLOCK_C");
    const int64_t dtype = constant_or_throw(key, "DTYPE");
    if (dtype != ATTNPROTO_DTYPE_F16 && dtype != ATTNPROTO_DTYPE_BF16) {
        throw BackendError("metal: " + key.canonical() + ": DTYPE must be ATTNPROTO_DTYPE_F16 or _BF16");
    }
    if (d <= 0 || d % ATTNPROTO_FRAG || d > ATTNPROTO_FLASH_MAX_HEAD_DIM || br <= 0 || br % ATTNPROTO_FRAG ||
        bc <= 0 || bc % ATTNPROTO_FRAG || bc > ATTNPROTO_FLASH_MAX_BLOCK_C || br > bc) {
        throw BackendError("metal: " + key.canonical() + ": HEAD_DIM, BLOCK_R, BLOCK_C must be multiples of 8 with "
                           "HEAD_DIM <= 256, BLOCK_C <= 128 and BLOCK_R <= BLOCK_C");
    }
    const size_t elem_bytes = 2;  // FP16 and BF16
    const size_t bytes = ATTNPROTO_FLASH_TG_BYTES(size_t(d), size_t(br), size_t(bc), elem_bytes);
    if (bytes > ATTNPROTO_TG_MEMORY_LIMIT) {
        throw BackendError("metal: " + key.canonical() + " needs " + std::to_string(bytes) +
                           " bytes of threadgroup memory; the limit is " + std::to_string(ATTNPROTO_TG_MEMORY_LIMIT));
    }
    return bytes;
}

size_t metal_paged_threadgroup_bytes(const KernelKey& key)
{
    const int64_t d = constant_or_throw(key, "HEAD_DIM");
    const int64_t bs = constant_or_throw(key, "BLOCK_SIZE");
    const int64_t part = constant_or_throw(key, "PARTITION_SIZE");
    const int64_t group = constant_or_throw(key, "GQA_GROUP");
    const int64_t dtype = constant_or_throw(key, "DTYPE");
    if (dtype != ATTNPROTO_DTYPE_F16 && dtype != ATTNPROTO_DTYPE_BF16) {
        throw BackendError("metal: " + key.canonical() + ": DTYPE must be ATTNPROTO_DTYPE_F16 or _BF16");
    }
    if (d <= 0 || d % ATTNPROTO_FRAG || d > ATTNPROTO_PAGED_MAX_HEAD_DIM || bs <= 0 || bs % ATTNPROTO_FRAG ||
        bs > ATTNPROTO_PAGED_MAX_BLOCK_SIZE || part < bs || part % bs || group < 1 ||
        group > ATTNPROTO_PAGED_MAX_GROUP) {
        throw BackendError("metal: " + key.canonical() + ": HEAD_DIM (multiple of 8, <= 256), BLOCK_SIZE (multiple "
                           "of 8, <= 128), PARTITION_SIZE (multiple of BLOCK_SIZE) or GQA_GROUP (1..8) out of range");
    }
    const size_t elem_bytes = 2;  // FP16 and BF16
    const size_t bytes = ATTNPROTO_PAGED_TG_BYTES(size_t(d), size_t(bs), size_t(group), elem_bytes);
    if (bytes > ATTNPROTO_TG_MEMORY_LIMIT) {
        throw BackendError("metal: " + key.canonical() + " needs " + std::to_string(bytes) +
                           " bytes of threadgroup memory; the limit is " + std::to_string(ATTNPROTO_TG_MEMORY_LIMIT));
    }
    return bytes;
}

}  // namespace attnproto
