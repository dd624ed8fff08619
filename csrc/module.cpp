// module.cpp — the nanobind module `attnproto._attnproto`: a thin binding of
// the core (backend.h, kernel_key.h, params.h, cuda_backend.h). Policy and
// convenience live in python/attnproto/backend.py.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>

#include "backend.h"
#include "kernel_key.h"
#include "params.h"
#ifdef ATTNPROTO_WITH_CUDA
#include "cuda/cuda_api.h"
#include "cuda/cuda_backend.h"
#endif
#ifdef ATTNPROTO_WITH_METAL
#include "metal/metal_backend.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using namespace attnproto;

namespace {

CacheMode parse_mode(const std::string& m) {
    if (m == "default") return CacheMode::Default;
    if (m == "archive_only") return CacheMode::ArchiveOnly;
    if (m == "no_archive") return CacheMode::NoArchive;
    if (m == "cold") return CacheMode::Cold;
    throw std::invalid_argument("mode: '" + m + "' is not one of default, archive_only, no_archive, cold");
}

#ifdef ATTNPROTO_WITH_CUDA
cuda::Output parse_output(const std::string& o, const std::string& what) {
    if (o == "cubin") return cuda::Output::Cubin;
    if (o == "ptx") return cuda::Output::Ptx;
    if (o == "ltoir") return cuda::Output::LtoIr;
    throw std::invalid_argument(what + ": '" + o + "' is not one of cubin, ptx, ltoir");
}
#endif

const char* origin_name(KernelOrigin o) {
    switch (o) {
        case KernelOrigin::Compiled: return "compiled";
        case KernelOrigin::Archive: return "archive";
        case KernelOrigin::Memory: return "memory";
    }
    return "?";
}

nb::dict info_dict(const DeviceInfo& i) {
    nb::dict d;
    d["backend"] = i.backend;
    d["name"] = i.name;
    d["arch"] = i.arch;
    d["compute_capability"] = nb::make_tuple(i.compute_major, i.compute_minor);
    d["compute_major"] = i.compute_major;
    d["compute_minor"] = i.compute_minor;
    d["multiprocessors"] = i.multiprocessors;
    d["shared_mem_per_block"] = i.shared_mem_per_block;
    d["shared_mem_per_block_optin"] = i.shared_mem_per_block_optin;
    d["shared_mem_per_sm"] = i.shared_mem_per_sm;
    d["l2_bytes"] = i.l2_bytes;
    d["global_mem_bytes"] = i.global_mem_bytes;
    d["max_threads_per_block"] = i.max_threads_per_block;
    d["clock_khz"] = i.clock_khz;
    d["driver_version"] = i.driver_version;
    d["compiler_version"] = i.compiler_version;
    return d;
}

LaunchConfig make_config(const std::vector<unsigned>& grid, const std::vector<unsigned>& block, size_t shared) {
    if (grid.empty() || grid.size() > 3) throw std::invalid_argument("grid: expected 1 to 3 dimensions");
    if (block.empty() || block.size() > 3) throw std::invalid_argument("block: expected 1 to 3 dimensions");
    LaunchConfig c;
    for (size_t i = 0; i < grid.size(); ++i) c.grid[i] = grid[i];
    for (size_t i = 0; i < block.size(); ++i) c.block[i] = block[i];
    c.shared_bytes = shared;
    return c;
}

// Python launch arguments -> KernelArg: Buffer, Arg, or any CUDA tensor with __dlpack__.
std::vector<KernelArg> convert_args(const nb::list& args) {
    std::vector<KernelArg> out;
    out.reserve(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
        nb::handle a = args[i];
        std::shared_ptr<Buffer> buf;
        if (nb::try_cast(a, buf) && buf) {
            out.push_back(KernelArg::pointer(buf->device_address(), buf));
            continue;
        }
        KernelArg ka;
        if (nb::try_cast(a, ka)) {
            out.push_back(std::move(ka));
            continue;
        }
        nb::ndarray<> arr;
        if (nb::try_cast(a, arr)) {
            if (arr.device_type() != nb::device::cuda::value)
                throw nb::type_error(("args[" + std::to_string(i) +
                                      "]: tensor is not on a CUDA device (DLPack device type " +
                                      std::to_string(arr.device_type()) + "); upload it first").c_str());
            out.push_back(KernelArg::pointer(reinterpret_cast<uint64_t>(arr.data())));
            continue;
        }
        std::string tn = nb::type_name(a.type()).c_str();
        throw nb::type_error(("args[" + std::to_string(i) + "]: unsupported kernel argument of type " + tn +
                              " (expected a Buffer, an Arg, or a CUDA tensor)").c_str());
    }
    return out;
}

}  // namespace

NB_MODULE(_attnproto, m) {
    m.doc() = "attnproto native core: backends, kernel cache, buffers, launches, timing";
    // Backends, their kernels and buffers live for the whole process by design (device singletons);
    // nanobind's shutdown leak report would list them every time.
    nb::set_leak_warnings(false);

    static nb::exception<BackendError> backend_error(m, "BackendError", PyExc_RuntimeError);
#ifdef ATTNPROTO_WITH_CUDA
    static nb::exception<CompileError> compile_error(m, "KernelCompileError", backend_error.ptr());
#endif

    m.attr("PARAMS_SIZE") = sizeof(AttentionParams);
    m.def("params_layout", [] {
        std::vector<std::tuple<std::string, size_t, size_t>> rows;
        for (auto& f : params_layout()) rows.emplace_back(f.name, f.offset, f.size);
        return rows;
    }, "(name, offset, size) of every AttentionParams field, in declaration order");

    m.def("compiled_backends", &compiled_backends);
    m.def("set_shader_dir", &set_shader_dir);
    m.def("shader_dir", &shader_dir);
    m.def("set_cache_dir", &set_cache_dir);
    m.def("cache_dir", &cache_dir);
    m.def("kernel_key", [](const std::string& name, const std::map<std::string, int64_t>& c) {
        return KernelKey(name, c).canonical();
    }, "name"_a, "constants"_a);
    m.def("archive_key", [](const std::string& name, const std::map<std::string, int64_t>& c, const std::string& src,
                            const std::string& arch, const std::string& compiler, const std::string& options) {
        return KernelKey(name, c).archive_key(src, arch, compiler, options);
    }, "name"_a, "constants"_a, "source_hash"_a, "arch"_a, "compiler_version"_a, "options"_a = "");

    nb::class_<TimingStats>(m, "TimingStats")
        .def_ro("samples_ms", &TimingStats::samples_ms)
        .def_ro("median_ms", &TimingStats::median_ms)
        .def_ro("p10_ms", &TimingStats::p10_ms)
        .def_ro("p90_ms", &TimingStats::p90_ms)
        .def_ro("mean_ms", &TimingStats::mean_ms)
        .def_ro("min_ms", &TimingStats::min_ms)
        .def_ro("cv", &TimingStats::cv)
        .def_static("from_samples", &TimingStats::from_samples, "samples_ms"_a)
        .def("__repr__", [](const TimingStats& t) {
            return "TimingStats(median_ms=" + std::to_string(t.median_ms) + ", cv=" + std::to_string(t.cv) +
                   ", n=" + std::to_string(t.samples_ms.size()) + ")";
        });

    nb::class_<KernelArg>(m, "Arg")
        .def_static("raw", [](nb::bytes data, size_t align) { return KernelArg::raw(data.c_str(), data.size(), align); },
                    "data"_a, "align"_a, "A by-value argument: the bytes of a scalar or struct")
        .def_static("pointer", [](uint64_t addr) { return KernelArg::pointer(addr); }, "address"_a)
        .def_prop_ro("size", [](const KernelArg& a) { return a.kind == KernelArg::Pointer ? sizeof(uint64_t) : a.bytes.size(); })
        .def_ro("align", &KernelArg::align)
        .def_prop_ro("is_pointer", [](const KernelArg& a) { return a.kind == KernelArg::Pointer; });

    nb::class_<Buffer>(m, "Buffer")
        .def_ro("nbytes", &Buffer::bytes)
        .def_prop_ro("address", &Buffer::device_address)
        .def("view", [](nb::handle self, const std::string& dtype, const std::vector<size_t>& shape) {
            Buffer& b = nb::cast<Buffer&>(self);
            nb::dlpack::dtype dt;
            size_t item = 0;
            if (dtype == "float16") { dt = nb::dtype<uint16_t>(); dt.code = uint8_t(nb::dlpack::dtype_code::Float); item = 2; }
            else if (dtype == "bfloat16") { dt = nb::dtype<uint16_t>(); dt.code = uint8_t(nb::dlpack::dtype_code::Bfloat); item = 2; }
            else if (dtype == "float32") { dt = nb::dtype<float>(); item = 4; }
            else if (dtype == "int32") { dt = nb::dtype<int32_t>(); item = 4; }
            else if (dtype == "uint8") { dt = nb::dtype<uint8_t>(); item = 1; }
            else throw std::invalid_argument("dtype: '" + dtype + "' not one of float16, bfloat16, float32, int32, uint8");
            size_t n = item;
            for (size_t s : shape) n *= s;
            if (n > b.bytes) throw std::invalid_argument("shape: view of " + std::to_string(n) + " bytes exceeds the buffer's " + std::to_string(b.bytes));
            return nb::ndarray<nb::array_api>(reinterpret_cast<void*>(b.device_address()), shape.size(), shape.data(), self,
                                               nullptr, dt, nb::device::cuda::value, 0);
        }, "dtype"_a, "shape"_a, "Zero-copy DLPack view (torch.from_dlpack / cupy.from_dlpack) of the buffer");

    nb::class_<Kernel>(m, "Kernel")
        .def_prop_ro("key", [](const Kernel& k) { return k.key.canonical(); })
        .def_prop_ro("name", [](const Kernel& k) { return k.key.name; })
        .def_prop_ro("constants", [](const Kernel& k) { return k.key.constants; })
        .def_prop_ro("origin", [](const Kernel& k) { return std::string(origin_name(k.origin)); })
        .def_ro("compile_ms", &Kernel::compile_ms)
        .def_ro("load_ms", &Kernel::load_ms)
        .def_ro("log", &Kernel::log)
        .def_ro("archive_key", &Kernel::archive_key)
        .def_prop_ro("resources", [](const Kernel& k) {
            nb::dict d;
            d["registers"] = k.resources.registers;
            d["static_shared_bytes"] = k.resources.static_shared_bytes;
            d["local_bytes"] = k.resources.local_bytes;
            d["max_threads_per_block"] = k.resources.max_threads_per_block;
            d["const_bytes"] = k.resources.const_bytes;
            return d;
        })
        .def("__repr__", [](const Kernel& k) { return "<Kernel " + k.key.canonical() + " (" + origin_name(k.origin) + ")>"; });

    nb::class_<Backend>(m, "Backend")
        .def_prop_ro("name", &Backend::name)
        .def_prop_ro("available", &Backend::available)
        .def_prop_ro("unavailable_reason", &Backend::unavailable_reason)
        .def("info", [](Backend& b) { return info_dict(b.info()); })
        .def("kernel", [](Backend& b, const std::string& name, const std::map<std::string, int64_t>& constants,
                          const std::string& mode) {
            KernelKey key(name, constants);
            CacheMode cm = parse_mode(mode);
            nb::gil_scoped_release unlocked;  // compiles may run in parallel threads
            return b.kernel(key, cm);
        },
             "name"_a, "constants"_a, "mode"_a = "default")
        .def("clear_memory_cache", &Backend::clear_memory_cache)
        .def("alloc", &Backend::alloc, "nbytes"_a)
        .def("upload", [](Backend& b, Buffer& dst, nb::ndarray<nb::c_contig, nb::device::cpu> src, size_t offset) {
            b.upload(dst, src.data(), src.nbytes(), offset);
        }, "dst"_a, "src"_a, "offset"_a = 0)
        .def("download", [](Backend& b, const Buffer& src, nb::ndarray<nb::c_contig, nb::device::cpu> dst, size_t offset) {
            if (dst.is_valid() && dst.nbytes() > 0) b.download(src, dst.data(), dst.nbytes(), offset);
        }, "src"_a, "dst"_a, "offset"_a = 0)
        .def("fill_bytes", &Backend::fill_bytes, "buffer"_a, "value"_a)
        .def("launch", [](Backend& b, Kernel& k, const std::vector<unsigned>& grid, const std::vector<unsigned>& block,
                          const nb::list& args, size_t shared_bytes, uint64_t stream) {
            LaunchConfig cfg = make_config(grid, block, shared_bytes);
            cfg.stream = stream;
            b.launch(k, cfg, convert_args(args));
        }, "kernel"_a, "grid"_a, "block"_a, "args"_a, "shared_bytes"_a = 0, "stream"_a = 0)
        .def("synchronize", &Backend::synchronize)
        .def("memory_usage", [](Backend& b) {
            MemoryUsage m = b.memory_usage();
            nb::dict d;
            d["allocated_bytes"] = m.allocated_bytes;
            d["free_bytes"] = m.free_bytes;
            d["total_bytes"] = m.total_bytes;
            return d;
        })
        .def("time", [](Backend& b, const std::function<void()>& fn, int warmup, int iters, bool flush_l2,
                        double guard_us) {
            return b.time(fn, TimingOptions{warmup, iters, flush_l2, guard_us});
        }, "enqueue"_a, "warmup"_a = 4, "iters"_a = 50, "flush_l2"_a = false, "guard_us"_a = 0.0)
        .def("time_launch", [](Backend& b, Kernel& k, const std::vector<unsigned>& grid, const std::vector<unsigned>& block,
                               const nb::list& args, size_t shared_bytes, int warmup, int iters, bool flush_l2,
                               double guard_us) {
            LaunchConfig cfg = make_config(grid, block, shared_bytes);
            std::vector<KernelArg> a = convert_args(args);
            return b.time([&] { b.launch(k, cfg, a); }, TimingOptions{warmup, iters, flush_l2, guard_us});
        }, "kernel"_a, "grid"_a, "block"_a, "args"_a, "shared_bytes"_a = 0, "warmup"_a = 4, "iters"_a = 50,
           "flush_l2"_a = false, "guard_us"_a = 0.0)
        .def("time_sequence", [](Backend& b, const nb::list& launches, int warmup, int iters, bool flush_l2,
                                 double guard_us) {
            // Several launches back to back from C++ (no Python between them), timed as one sample.
            struct One { Kernel* k; LaunchConfig cfg; std::vector<KernelArg> args; std::shared_ptr<Kernel> keep; };
            std::vector<One> seq;
            for (size_t i = 0; i < launches.size(); ++i) {
                nb::tuple t = nb::cast<nb::tuple>(launches[i]);
                if (t.size() != 5)
                    throw std::invalid_argument("launches[" + std::to_string(i) +
                                                "]: expected (kernel, grid, block, args, shared_bytes)");
                auto k = nb::cast<std::shared_ptr<Kernel>>(t[0]);
                seq.push_back({k.get(), make_config(nb::cast<std::vector<unsigned>>(t[1]),
                                                     nb::cast<std::vector<unsigned>>(t[2]), nb::cast<size_t>(t[4])),
                               convert_args(nb::cast<nb::list>(t[3])), k});
            }
            return b.time([&] { for (auto& o : seq) b.launch(*o.k, o.cfg, o.args); },
                          TimingOptions{warmup, iters, flush_l2, guard_us});
        }, "launches"_a, "warmup"_a = 4, "iters"_a = 50, "flush_l2"_a = false, "guard_us"_a = 0.0);

    m.def("get_backend", &get_backend, "name"_a, nb::rv_policy::reference);

#ifdef ATTNPROTO_WITH_METAL
    m.def("metal_stage_samples_ms", &metal_last_stage_samples_ms,
          "Stage-boundary (MTLCounterSampleBuffer) durations in ms of the last Metal time(), one per sample; "
          "empty when the device cannot sample timestamps at stage boundaries");
#endif

#ifdef ATTNPROTO_WITH_CUDA
    m.def("cuda_add_library_dir", &cuda::add_library_dir, "dir"_a,
          "Extra directory searched for libnvrtc and libnvJitLink (call before the first CUDA use)");
    m.def("cuda_nvrtc_library", &cuda::nvrtc_library_path);
    m.def("cuda_nvrtc_version", &cuda::nvrtc_version);
    m.def("cuda_source_hash", &cuda::source_hash, "name"_a);
    m.def("cuda_compile", [](const std::string& name, const std::map<std::string, int64_t>& constants,
                             const std::string& arch, const std::string& output, const std::vector<std::string>& options) {
        cuda::Output o = parse_output(output, "output");
        KernelKey key(name, constants);
        cuda::CompileResult r;
        {
            nb::gil_scoped_release unlocked;
            r = cuda::compile(key, arch, o, options);
        }
        return nb::make_tuple(nb::bytes(reinterpret_cast<const char*>(r.binary.data()), r.binary.size()), r.log,
                              r.compile_ms);
    }, "name"_a, "constants"_a, "arch"_a, "output"_a = "cubin", "options"_a = std::vector<std::string>(),
       "Compile a kernel with NVRTC without a device; returns (binary, log, compile_ms). `options` are extra "
       "NVRTC options (compile-cost studies)");
    m.def("cuda_nvjitlink_version", &cuda::nvjitlink_version);
    m.def("cuda_nvjitlink_library", &cuda::nvjitlink_library_path);
    m.def("cuda_link", [](const std::vector<std::tuple<nb::bytes, std::string, std::string>>& inputs, const std::string& arch,
                          const std::vector<std::string>& options) {
        std::vector<cuda::LinkInput> in;
        in.reserve(inputs.size());
        for (size_t i = 0; i < inputs.size(); ++i) {
            const auto& [data, kind, name] = inputs[i];
            cuda::LinkInput li;
            li.data.assign(reinterpret_cast<const uint8_t*>(data.c_str()),
                           reinterpret_cast<const uint8_t*>(data.c_str()) + data.size());
            li.kind = parse_output(kind, "inputs[" + std::to_string(i) + "] kind");
            li.name = name;
            in.push_back(std::move(li));
        }
        cuda::LinkResult r;
        {
            nb::gil_scoped_release unlocked;
            r = cuda::link(in, arch, options);
        }
        return nb::make_tuple(nb::bytes(reinterpret_cast<const char*>(r.cubin.data()), r.cubin.size()), r.log, r.link_ms);
    }, "inputs"_a, "arch"_a, "options"_a = std::vector<std::string>(),
       "Link (binary, kind, name) inputs (kind: ltoir, ptx, cubin) into one cubin with nvJitLink, without a device; "
       "returns (cubin, info_log, link_ms)");
    m.def("cuda_kernel_from_cubin", [](const std::string& name, const std::map<std::string, int64_t>& constants,
                                       nb::bytes cubin) {
        std::vector<uint8_t> bin(reinterpret_cast<const uint8_t*>(cubin.c_str()),
                                 reinterpret_cast<const uint8_t*>(cubin.c_str()) + cubin.size());
        return cuda::kernel_from_cubin(KernelKey(name, constants), bin);
    }, "name"_a, "constants"_a, "cubin"_a,
       "Load a cubin built outside the cache (e.g. by cuda_link) as a Kernel whose entry is `name`");
    m.def("cuda_obtain", [](const std::string& name, const std::map<std::string, int64_t>& constants,
                            const std::string& arch, const std::string& mode) {
        KernelKey key(name, constants);
        CacheMode cm = parse_mode(mode);
        cuda::Obtained o;
        {
            nb::gil_scoped_release unlocked;
            o = cuda::obtain_cubin(key, arch, cm);
        }
        return nb::make_tuple(nb::bytes(reinterpret_cast<const char*>(o.cubin.data()), o.cubin.size()),
                              std::string(origin_name(o.origin)), o.ms, o.log, o.archive_key);
    }, "name"_a, "constants"_a, "arch"_a, "mode"_a = "default",
       "The archive path of kernel(), without a device: returns (cubin, origin, ms, log, archive_key)");
    m.def("cuda_tensor_map", &cuda::tensor_map, "dtype"_a, "address"_a, "dims"_a, "strides_bytes"_a, "box"_a,
          "swizzle_bytes"_a = 0, "oob_nan"_a = false, "A CUtensorMap kernel argument (dims/box innermost first)");
#endif
}
