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
CompileResult compile(const KernelKey& key, const std::string& arch, Output out = Output::Cubin);

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
