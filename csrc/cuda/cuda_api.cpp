// cuda_api.cpp — run-time loading of libcuda, libnvrtc and libnvJitLink.
#include "cuda_api.h"

#include <dirent.h>
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace attnproto::cuda {
namespace {

std::mutex g_mutex;
std::vector<std::string> g_extra_dirs;
std::string g_nvrtc_path;
std::string g_nvjitlink_path;

// Resolves `sym` into `slot`; returns false (and names the symbol in *missing) if absent.
template <typename F>
bool bind(void* lib, const char* sym, F& slot, std::string* missing) {
    slot = reinterpret_cast<F>(::dlsym(lib, sym));
    if (!slot && missing && missing->empty()) *missing = sym;
    return slot != nullptr;
}

// First symbol of `names` that exists.
template <typename F>
bool bind_any(void* lib, std::initializer_list<const char*> names, F& slot, std::string* missing) {
    for (const char* n : names) {
        slot = reinterpret_cast<F>(::dlsym(lib, n));
        if (slot) return true;
    }
    if (missing && missing->empty()) *missing = *names.begin();
    return false;
}

void* open_first(const std::vector<std::string>& candidates, std::string* tried, std::string* opened) {
    for (const auto& c : candidates) {
        if (void* h = ::dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL)) {
            if (opened) *opened = c;
            return h;
        }
        if (tried) {
            const char* e = ::dlerror();
            *tried += "\n  " + c + ": " + (e ? e : "not found");
        }
    }
    return nullptr;
}

// libnvrtc dlopens libnvrtc-builtins by soname at compile time. When libnvrtc came from a
// directory outside the loader's search path (a pip wheel), load the builtins from that same
// directory first, so that the later lookup by soname finds the already-loaded library.
void preload_builtins(const std::string& nvrtc_path) {
    auto slash = nvrtc_path.rfind('/');
    if (slash == std::string::npos) return;
    const std::string dir = nvrtc_path.substr(0, slash);
    if (DIR* d = ::opendir(dir.c_str())) {
        while (dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n.rfind("libnvrtc-builtins.so", 0) == 0) ::dlopen((dir + "/" + n).c_str(), RTLD_NOW | RTLD_GLOBAL);
        }
        ::closedir(d);
    }
}

// Candidate paths of a CUDA toolkit library, in search order: the override variable, the
// directories added by add_library_dir (pip wheels), the loader's own path, the toolkit.
std::vector<std::string> toolkit_candidates(const char* env_override, std::initializer_list<const char*> sonames) {
    std::vector<std::string> candidates;
    if (const char* e = std::getenv(env_override)) candidates.push_back(e);
    {
        std::lock_guard<std::mutex> lk(g_mutex);
        for (const auto& d : g_extra_dirs)
            for (const char* s : sonames) candidates.push_back(d + "/" + s);
    }
    for (const char* s : sonames) candidates.push_back(s);
    for (const char* s : sonames) candidates.push_back(std::string("/usr/local/cuda/lib64/") + s);
    return candidates;
}

}  // namespace

void add_library_dir(const std::string& dir) {
    std::lock_guard<std::mutex> lk(g_mutex);
    g_extra_dirs.push_back(dir);
}

std::string nvrtc_library_path() {
    std::lock_guard<std::mutex> lk(g_mutex);
    return g_nvrtc_path;
}

const DriverApi* driver_api(std::string* why) {
    static DriverApi api{};
    static const DriverApi* result = nullptr;
    static std::string reason;
    static std::once_flag once;
    std::call_once(once, [] {
        std::string tried;
        void* lib = open_first({"libcuda.so.1", "libcuda.so"}, &tried, nullptr);
        if (!lib) {
            reason = "NVIDIA driver library libcuda not found (no NVIDIA driver on this machine):" + tried;
            return;
        }
        std::string missing;
        bool ok = true;
        ok &= bind(lib, "cuInit", api.cuInit, &missing);
        ok &= bind(lib, "cuDriverGetVersion", api.cuDriverGetVersion, &missing);
        ok &= bind(lib, "cuGetErrorName", api.cuGetErrorName, &missing);
        ok &= bind(lib, "cuGetErrorString", api.cuGetErrorString, &missing);
        ok &= bind(lib, "cuDeviceGetCount", api.cuDeviceGetCount, &missing);
        ok &= bind(lib, "cuDeviceGet", api.cuDeviceGet, &missing);
        ok &= bind(lib, "cuDeviceGetName", api.cuDeviceGetName, &missing);
        ok &= bind(lib, "cuDeviceGetAttribute", api.cuDeviceGetAttribute, &missing);
        ok &= bind(lib, "cuDeviceTotalMem_v2", api.cuDeviceTotalMem, &missing);
        ok &= bind(lib, "cuDevicePrimaryCtxRetain", api.cuDevicePrimaryCtxRetain, &missing);
        ok &= bind(lib, "cuCtxSetCurrent", api.cuCtxSetCurrent, &missing);
        ok &= bind(lib, "cuCtxSynchronize", api.cuCtxSynchronize, &missing);
        ok &= bind(lib, "cuMemAlloc_v2", api.cuMemAlloc, &missing);
        ok &= bind(lib, "cuMemFree_v2", api.cuMemFree, &missing);
        ok &= bind(lib, "cuMemGetInfo_v2", api.cuMemGetInfo, &missing);
        ok &= bind(lib, "cuMemcpyHtoD_v2", api.cuMemcpyHtoD, &missing);
        ok &= bind(lib, "cuMemcpyDtoH_v2", api.cuMemcpyDtoH, &missing);
        ok &= bind(lib, "cuMemsetD8Async", api.cuMemsetD8Async, &missing);
        ok &= bind(lib, "cuModuleLoadData", api.cuModuleLoadData, &missing);
        ok &= bind(lib, "cuModuleUnload", api.cuModuleUnload, &missing);
        ok &= bind(lib, "cuModuleGetFunction", api.cuModuleGetFunction, &missing);
        ok &= bind(lib, "cuFuncGetAttribute", api.cuFuncGetAttribute, &missing);
        ok &= bind(lib, "cuFuncSetAttribute", api.cuFuncSetAttribute, &missing);
        ok &= bind(lib, "cuLaunchKernel", api.cuLaunchKernel, &missing);
        ok &= bind(lib, "cuStreamSynchronize", api.cuStreamSynchronize, &missing);
        ok &= bind(lib, "cuEventCreate", api.cuEventCreate, &missing);
        ok &= bind_any(lib, {"cuEventDestroy_v2", "cuEventDestroy"}, api.cuEventDestroy, &missing);
        ok &= bind(lib, "cuEventRecord", api.cuEventRecord, &missing);
        ok &= bind(lib, "cuEventSynchronize", api.cuEventSynchronize, &missing);
        ok &= bind_any(lib, {"cuEventElapsedTime_v2", "cuEventElapsedTime"}, api.cuEventElapsedTime, &missing);
        api.cuTensorMapEncodeTiled =
            reinterpret_cast<decltype(api.cuTensorMapEncodeTiled)>(::dlsym(lib, "cuTensorMapEncodeTiled"));
        if (!ok) {
            reason = "libcuda lacks " + missing + " (driver too old)";
            return;
        }
        result = &api;
    });
    if (!result && why) *why = reason;
    return result;
}

const NvrtcApi* nvrtc_api(std::string* why) {
    static NvrtcApi api{};
    static const NvrtcApi* result = nullptr;
    static std::string reason;
    static std::once_flag once;
    std::call_once(once, [] {
        const auto candidates =
            toolkit_candidates("ATTNPROTO_NVRTC", {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"});
        std::string tried, opened;
        void* lib = open_first(candidates, &tried, &opened);
        if (lib) preload_builtins(opened);
        if (!lib) {
            reason = "NVRTC not found (pip install nvidia-cuda-nvrtc, or set ATTNPROTO_NVRTC); tried:" + tried;
            return;
        }
        std::string missing;
        bool ok = true;
        ok &= bind(lib, "nvrtcGetErrorString", api.nvrtcGetErrorString, &missing);
        ok &= bind(lib, "nvrtcVersion", api.nvrtcVersion, &missing);
        ok &= bind(lib, "nvrtcCreateProgram", api.nvrtcCreateProgram, &missing);
        ok &= bind(lib, "nvrtcDestroyProgram", api.nvrtcDestroyProgram, &missing);
        ok &= bind(lib, "nvrtcCompileProgram", api.nvrtcCompileProgram, &missing);
        ok &= bind(lib, "nvrtcGetProgramLogSize", api.nvrtcGetProgramLogSize, &missing);
        ok &= bind(lib, "nvrtcGetProgramLog", api.nvrtcGetProgramLog, &missing);
        ok &= bind(lib, "nvrtcGetCUBINSize", api.nvrtcGetCUBINSize, &missing);
        ok &= bind(lib, "nvrtcGetCUBIN", api.nvrtcGetCUBIN, &missing);
        ok &= bind(lib, "nvrtcGetPTXSize", api.nvrtcGetPTXSize, &missing);
        ok &= bind(lib, "nvrtcGetPTX", api.nvrtcGetPTX, &missing);
        api.nvrtcGetLTOIRSize = reinterpret_cast<decltype(api.nvrtcGetLTOIRSize)>(::dlsym(lib, "nvrtcGetLTOIRSize"));
        api.nvrtcGetLTOIR = reinterpret_cast<decltype(api.nvrtcGetLTOIR)>(::dlsym(lib, "nvrtcGetLTOIR"));
        if (!ok) {
            reason = opened + " lacks " + missing;
            return;
        }
        {
            std::lock_guard<std::mutex> lk(g_mutex);
            g_nvrtc_path = opened;
        }
        result = &api;
    });
    if (!result && why) *why = reason;
    return result;
}

std::string nvjitlink_library_path() {
    std::lock_guard<std::mutex> lk(g_mutex);
    return g_nvjitlink_path;
}

const NvJitLinkApi* nvjitlink_api(std::string* why) {
    static NvJitLinkApi api{};
    static const NvJitLinkApi* result = nullptr;
    static std::string reason;
    static std::once_flag once;
    std::call_once(once, [] {
        const auto candidates = toolkit_candidates(
            "ATTNPROTO_NVJITLINK", {"libnvJitLink.so.13", "libnvJitLink.so.12", "libnvJitLink.so"});
        std::string tried, opened;
        void* lib = open_first(candidates, &tried, &opened);
        if (!lib) {
            reason = "nvJitLink not found (pip install nvidia-nvjitlink, or set ATTNPROTO_NVJITLINK); tried:" + tried;
            return;
        }
        std::string missing;
        bool ok = true;
        // Versioned exports first (13.0, then 12.0), then the unversioned aliases.
        ok &= bind_any(lib, {"__nvJitLinkCreate_13_0", "__nvJitLinkCreate_12_0", "nvJitLinkCreate"}, api.nvJitLinkCreate, &missing);
        ok &= bind_any(lib, {"__nvJitLinkDestroy_13_0", "__nvJitLinkDestroy_12_0", "nvJitLinkDestroy"}, api.nvJitLinkDestroy, &missing);
        ok &= bind_any(lib, {"__nvJitLinkAddData_13_0", "__nvJitLinkAddData_12_0", "nvJitLinkAddData"}, api.nvJitLinkAddData, &missing);
        ok &= bind_any(lib, {"__nvJitLinkComplete_13_0", "__nvJitLinkComplete_12_0", "nvJitLinkComplete"}, api.nvJitLinkComplete, &missing);
        ok &= bind_any(lib, {"__nvJitLinkGetLinkedCubinSize_13_0", "__nvJitLinkGetLinkedCubinSize_12_0",
                             "nvJitLinkGetLinkedCubinSize"}, api.nvJitLinkGetLinkedCubinSize, &missing);
        ok &= bind_any(lib, {"__nvJitLinkGetLinkedCubin_13_0", "__nvJitLinkGetLinkedCubin_12_0", "nvJitLinkGetLinkedCubin"},
                       api.nvJitLinkGetLinkedCubin, &missing);
        ok &= bind_any(lib, {"__nvJitLinkGetErrorLogSize_13_0", "__nvJitLinkGetErrorLogSize_12_0", "nvJitLinkGetErrorLogSize"},
                       api.nvJitLinkGetErrorLogSize, &missing);
        ok &= bind_any(lib, {"__nvJitLinkGetErrorLog_13_0", "__nvJitLinkGetErrorLog_12_0", "nvJitLinkGetErrorLog"},
                       api.nvJitLinkGetErrorLog, &missing);
        ok &= bind_any(lib, {"__nvJitLinkGetInfoLogSize_13_0", "__nvJitLinkGetInfoLogSize_12_0", "nvJitLinkGetInfoLogSize"},
                       api.nvJitLinkGetInfoLogSize, &missing);
        ok &= bind_any(lib, {"__nvJitLinkGetInfoLog_13_0", "__nvJitLinkGetInfoLog_12_0", "nvJitLinkGetInfoLog"},
                       api.nvJitLinkGetInfoLog, &missing);
        api.nvJitLinkVersion = reinterpret_cast<decltype(api.nvJitLinkVersion)>(::dlsym(lib, "nvJitLinkVersion"));
        if (!ok) {
            reason = opened + " lacks " + missing;
            return;
        }
        {
            std::lock_guard<std::mutex> lk(g_mutex);
            g_nvjitlink_path = opened;
        }
        result = &api;
    });
    if (!result && why) *why = reason;
    return result;
}

}  // namespace attnproto::cuda
