// cuda_api.h — the subset of the CUDA driver API, NVRTC and nvJitLink that
// attnproto uses, declared as function-pointer types and loaded at run time
// with dlopen/dlsym. attnproto therefore builds without any CUDA toolkit and
// `import attnproto` works on machines with no driver: the backend then
// reports itself unavailable with the loader's reason.
//
// The declarations follow the C ABI documented in the CUDA Driver API and
// NVRTC references; tests/test_cuda_api_abi.py compiles a check of every
// constant and signature against the real cuda.h/nvrtc.h where available.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace attnproto::cuda {

// ---- driver API types -------------------------------------------------------
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
struct CUctx_st;     using CUcontext = CUctx_st*;
struct CUmod_st;     using CUmodule = CUmod_st*;
struct CUfunc_st;    using CUfunction = CUfunc_st*;
struct CUstream_st;  using CUstream = CUstream_st*;
struct CUevent_st;   using CUevent = CUevent_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;

// CUdevice_attribute values used here.
enum DeviceAttr : int {
    ATTR_MAX_THREADS_PER_BLOCK = 1,
    ATTR_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    ATTR_CLOCK_RATE = 13,
    ATTR_MULTIPROCESSOR_COUNT = 16,
    ATTR_L2_CACHE_SIZE = 38,
    ATTR_COMPUTE_CAPABILITY_MAJOR = 75,
    ATTR_COMPUTE_CAPABILITY_MINOR = 76,
    ATTR_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81,
    ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
};

// CUfunction_attribute values used here.
enum FuncAttr : int {
    FUNC_MAX_THREADS_PER_BLOCK = 0,
    FUNC_SHARED_SIZE_BYTES = 1,
    FUNC_CONST_SIZE_BYTES = 2,
    FUNC_LOCAL_SIZE_BYTES = 3,
    FUNC_NUM_REGS = 4,
    FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
};

constexpr unsigned EVENT_DEFAULT = 0;

// CUtensorMap: 128 bytes, 64-byte aligned, opaque.
struct alignas(64) TensorMap { uint64_t opaque[16]; };
static_assert(sizeof(TensorMap) == 128, "CUtensorMap is 128 bytes");

// cuTensorMapEncodeTiled enums (values from the driver API reference).
enum TensorMapDataType : int { TMA_UINT16 = 1, TMA_FLOAT16 = 6, TMA_FLOAT32 = 7, TMA_BFLOAT16 = 9 };
enum TensorMapInterleave : int { TMA_INTERLEAVE_NONE = 0 };
enum TensorMapSwizzle : int { TMA_SWIZZLE_NONE = 0, TMA_SWIZZLE_32B = 1, TMA_SWIZZLE_64B = 2, TMA_SWIZZLE_128B = 3 };
enum TensorMapL2Promotion : int { TMA_L2_NONE = 0, TMA_L2_64B = 1, TMA_L2_128B = 2, TMA_L2_256B = 3 };
enum TensorMapFloatOOBfill : int { TMA_OOB_FILL_NONE = 0, TMA_OOB_FILL_NAN_REQUEST_ZERO_FMA = 1 };

struct DriverApi {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDriverGetVersion)(int*);
    CUresult (*cuGetErrorName)(CUresult, const char**);
    CUresult (*cuGetErrorString)(CUresult, const char**);
    CUresult (*cuDeviceGetCount)(int*);
    CUresult (*cuDeviceGet)(CUdevice*, int);
    CUresult (*cuDeviceGetName)(char*, int, CUdevice);
    CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
    CUresult (*cuDeviceTotalMem)(size_t*, CUdevice);                  // cuDeviceTotalMem_v2
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxSynchronize)();
    CUresult (*cuMemAlloc)(CUdeviceptr*, size_t);                     // cuMemAlloc_v2
    CUresult (*cuMemFree)(CUdeviceptr);                               // cuMemFree_v2
    CUresult (*cuMemGetInfo)(size_t*, size_t*);                       // cuMemGetInfo_v2
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void*, size_t);       // cuMemcpyHtoD_v2
    CUresult (*cuMemcpyDtoH)(void*, CUdeviceptr, size_t);             // cuMemcpyDtoH_v2
    CUresult (*cuMemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
    CUresult (*cuModuleLoadData)(CUmodule*, const void*);
    CUresult (*cuModuleUnload)(CUmodule);
    CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
    CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
    CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               unsigned, CUstream, void**, void**);
    CUresult (*cuStreamSynchronize)(CUstream);
    CUresult (*cuEventCreate)(CUevent*, unsigned);
    CUresult (*cuEventDestroy)(CUevent);                              // cuEventDestroy_v2
    CUresult (*cuEventRecord)(CUevent, CUstream);
    CUresult (*cuEventSynchronize)(CUevent);
    CUresult (*cuEventElapsedTime)(float*, CUevent, CUevent);         // _v2 where present
    CUresult (*cuTensorMapEncodeTiled)(TensorMap*, int, unsigned, void*, const uint64_t*, const uint64_t*,
                                       const unsigned*, const unsigned*, int, int, int, int);  // may be null (pre-12.0)
};

// ---- NVRTC ------------------------------------------------------------------
using nvrtcResult = int;
struct _nvrtcProgram; using nvrtcProgram = _nvrtcProgram*;
constexpr nvrtcResult NVRTC_SUCCESS = 0;

struct NvrtcApi {
    const char* (*nvrtcGetErrorString)(nvrtcResult);
    nvrtcResult (*nvrtcVersion)(int*, int*);
    nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*,
                                      const char* const*);
    nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*);
    nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
    nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
    nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*);
    nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*);
    nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram, char*);
    nvrtcResult (*nvrtcGetPTXSize)(nvrtcProgram, size_t*);
    nvrtcResult (*nvrtcGetPTX)(nvrtcProgram, char*);
    nvrtcResult (*nvrtcGetLTOIRSize)(nvrtcProgram, size_t*);          // may be null (pre-12.0)
    nvrtcResult (*nvrtcGetLTOIR)(nvrtcProgram, char*);
};

// ---- nvJitLink (link-time optimisation of separately compiled LTO-IR) ---------
using nvJitLinkResult = int;
struct nvJitLink; using nvJitLinkHandle = nvJitLink*;
constexpr nvJitLinkResult NVJITLINK_SUCCESS = 0;
// nvJitLinkInputType values used here.
constexpr int NVJITLINK_INPUT_CUBIN = 1;
constexpr int NVJITLINK_INPUT_PTX = 2;
constexpr int NVJITLINK_INPUT_LTOIR = 3;

// The library exports each entry point under a versioned name (__nvJitLinkCreate_13_0);
// nvJitLink.h maps the plain names onto those with static inline wrappers.
struct NvJitLinkApi {
    nvJitLinkResult (*nvJitLinkCreate)(nvJitLinkHandle*, uint32_t, const char**);
    nvJitLinkResult (*nvJitLinkDestroy)(nvJitLinkHandle*);
    nvJitLinkResult (*nvJitLinkAddData)(nvJitLinkHandle, int, const void*, size_t, const char*);
    nvJitLinkResult (*nvJitLinkComplete)(nvJitLinkHandle);
    nvJitLinkResult (*nvJitLinkGetLinkedCubinSize)(nvJitLinkHandle, size_t*);
    nvJitLinkResult (*nvJitLinkGetLinkedCubin)(nvJitLinkHandle, void*);
    nvJitLinkResult (*nvJitLinkGetErrorLogSize)(nvJitLinkHandle, size_t*);
    nvJitLinkResult (*nvJitLinkGetErrorLog)(nvJitLinkHandle, char*);
    nvJitLinkResult (*nvJitLinkGetInfoLogSize)(nvJitLinkHandle, size_t*);
    nvJitLinkResult (*nvJitLinkGetInfoLog)(nvJitLinkHandle, char*);
    nvJitLinkResult (*nvJitLinkVersion)(unsigned*, unsigned*);  // may be null (before 12.3)
};

// Loads libcuda / libnvrtc once per process. Each returns nullptr and sets `why` when the
// library or a required symbol is missing.
const DriverApi* driver_api(std::string* why);
const NvrtcApi* nvrtc_api(std::string* why);
// Loads libnvJitLink once per process (same search directories as NVRTC, or
// $ATTNPROTO_NVJITLINK); nullptr and `why` when it or a symbol is missing.
const NvJitLinkApi* nvjitlink_api(std::string* why);
std::string nvjitlink_library_path();
// Where the NVRTC library was found (for `attnproto info`), empty if not loaded.
std::string nvrtc_library_path();
// Extra directories searched for libnvrtc and libnvJitLink (e.g. the nvidia-cuda-nvrtc and
// nvidia-nvjitlink wheels' lib dir); must be called before the first nvrtc_api()/nvjitlink_api().
void add_library_dir(const std::string& dir);

}  // namespace attnproto::cuda
