// cuda_backend.h — CUDA-specific entry points beyond the Backend interface:
// compiling without a device (CI), and TMA descriptors for Hopper kernels.
#pragma once

#include <string>
#include <vector>

#include "../backend.h"

namespace attnproto {

struct CompileError : BackendError {
    using BackendError::BackendError;
};

namespace cuda {

enum class Output { Cubin, Ptx, LtoIr };

struct CompileResult {
    std::vector<uint8_t> binary;  // cubin, PTX text or LTO-IR
    std::string log;              // NVRTC log (warnings on success)
    double compile_ms = 0.0;      // wall time of nvrtcCompileProgram + extraction
    std::string options;          // the option string that went into the archive key
};

// Compiles `key` from <shader_dir>/cuda/<name>.cu for `arch` (e.g. "sm_90a"); needs NVRTC
// only, no driver or GPU. Throws CompileError (with the NVRTC log) on failure.
// `extra_options` are appended to the NVRTC options (compile-cost studies: -pch,
// --ptxas-options=-v); kernels obtained through the cache never pass any.
CompileResult compile(const KernelKey& key, const std::string& arch, Output out = Output::Cubin,
                      const std::vector<std::string>& extra_options = {});

// One input of a link: a binary (LTO-IR, PTX or cubin) and the name used in link logs.
struct LinkInput {
    std::vector<uint8_t> data;
    Output kind = Output::LtoIr;
    std::string name;
};

struct LinkResult {
    std::vector<uint8_t> cubin;
    std::string log;          // nvJitLink info log (with -verbose: per-function resource report)
    double link_ms = 0.0;     // wall time of create + add + complete + extraction
};

// Links `inputs` into one cubin for `arch` with nvJitLink (-lto is added when any input is
// LTO-IR); needs nvJitLink only, no driver or GPU. Throws CompileError with the error log.
LinkResult link(const std::vector<LinkInput>& inputs, const std::string& arch,
                const std::vector<std::string>& extra_options = {});

// "13.0" from nvJitLinkVersion; throws BackendError if nvJitLink is missing.
std::string nvjitlink_version();

// Loads a cubin built outside the cache (e.g. by link()) as a Kernel of the CUDA backend;
// `key.name` is the __global__ entry. The kernel bypasses the memory cache and the archive;
// origin Compiled, compile_ms 0 (the caller timed the build), load_ms measured.
std::shared_ptr<Kernel> kernel_from_cubin(const KernelKey& key, const std::vector<uint8_t>& cubin);

// A cubin obtained through the on-disk archive (or compiled, per `mode`); no device needed.
struct Obtained {
    std::vector<uint8_t> cubin;
    KernelOrigin origin = KernelOrigin::Compiled;  // Compiled or Archive
    double ms = 0.0;          // compile time, or archive read + verify time
    std::string log;          // compiler log and any archive note (e.g. a rejected entry)
    std::string archive_key;  // hex key of the entry
};
Obtained obtain_cubin(const KernelKey& key, const std::string& arch, CacheMode mode);

// SHA-256 over the kernel's source file and every header it may include
// (shaders/common/*, shaders/cuda/include/*), in sorted path order.
std::string source_hash(const std::string& kernel_name);

// "13.0" from nvrtcVersion; throws BackendError if NVRTC is missing.
std::string nvrtc_version();

// A CUtensorMap (128 bytes) for a tiled TMA copy, as a by-value kernel argument.
// dims/box innermost first; strides_bytes has rank-1 entries (dims 1..rank-1).
KernelArg tensor_map(const std::string& dtype, uint64_t address, const std::vector<uint64_t>& dims,
                     const std::vector<uint64_t>& strides_bytes, const std::vector<uint32_t>& box,
                     int swizzle_bytes, bool oob_nan);

}  // namespace cuda
}  // namespace attnproto
