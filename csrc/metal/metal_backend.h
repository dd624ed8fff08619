// metal_backend.h — the Metal implementation of attnproto::Backend (Objective-C++ in
// metal_backend.mm, built on Apple platforms only; see metal.cmake).
//
// Kernels come from shaders/metal/: by default from the metallib built at install time
// (<shader_dir>/metal/attnproto.metallib); with ATTNPROTO_METAL_FROM_SOURCE=1, or when no
// metallib is installed, from <shader_dir>/metal/<kernel>.metal compiled at run time
// (development). A KernelKey's constants become MTLFunctionConstantValues by name; the
// pipelines go to an MTLBinaryArchive under cache_dir()/metal/.
#pragma once

#include <cstddef>
#include <vector>

#include "backend.h"

namespace attnproto {

// The process-wide Metal backend (constructed on first use; available() says whether an
// Apple GPU family 9 device was found, unavailable_reason() why not).
Backend& metal_backend();

// Stage-boundary durations (MTLCounterSampleBuffer, start/end of each timed compute pass)
// of the most recent Backend::time() on the Metal backend, in ms, one per sample; empty
// when the device cannot sample timestamps at stage boundaries.
std::vector<double> metal_last_stage_samples_ms();

// Threadgroup memory, in bytes, a flash_attention specialisation needs (the formula of
// shaders/metal/metal_bindings.h); throws BackendError naming the constant that is missing.
size_t metal_flash_threadgroup_bytes(const KernelKey& key);

// Threadgroup memory, in bytes, a paged_attention specialisation needs (ATTNPROTO_PAGED_TG_BYTES);
// throws BackendError for a missing constant or a specialisation the kernel rejects.
size_t metal_paged_threadgroup_bytes(const KernelKey& key);

}  // namespace attnproto
