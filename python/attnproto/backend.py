"""Backends as Python sees them: "cpu" (numpy, always present) and the native
GPU backends compiled into ``_attnproto`` ("cuda" on Linux, "metal" on macOS).

``get("cuda")`` returns a :class:`GpuBackend` — kernels by name and named
constants (through the native kernel cache and on-disk archive), buffers,
launches and device-side timing. Launch arguments may be :class:`Buffer`,
any CUDA tensor that implements ``__dlpack__`` (torch, cupy: passed without a
copy), numpy scalars (``np.int32(7)``, ``np.float32(0.5)``: passed by value)
or an AttentionParams from :func:`attnproto.params.make_params`.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import lab as _lab
from . import params as _params

#: Order in which "auto" picks a backend.
PREFERENCE = ("cuda", "metal", "cpu")

_PKG_DIR = Path(__file__).resolve().parent
_NVRTC_WHEEL_SUBDIRS = ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cu12/lib")


class BackendUnavailable(RuntimeError):
    """The requested backend is not compiled in or has no usable device; the message says why."""


@dataclass
class BackendStatus:
    name: str
    available: bool
    reason: str = ""
    info: dict = field(default_factory=dict)


def shader_dir() -> Path:
    """Kernel sources: installed with the package, or the source tree's shaders/ when run from it."""
    env = os.environ.get("ATTNPROTO_SHADER_DIR")
    if env:
        return Path(env)
    installed = _PKG_DIR / "shaders"
    if installed.is_dir():
        return installed
    return _PKG_DIR.parent.parent / "shaders"


def _nvrtc_dirs() -> list[str]:
    dirs = []
    for entry in sys.path:
        for sub in _NVRTC_WHEEL_SUBDIRS:
            d = Path(entry or ".") / sub
            if d.is_dir() and any(d.glob("libnvrtc.so*")):
                dirs.append(str(d))
    return dirs


@functools.lru_cache(maxsize=1)
def _native_state():
    """(module, None) once configured, or (None, reason) if the extension cannot load."""
    try:
        from . import _attnproto as nat  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the build
        return None, f"native core not built ({exc})"
    _params.check_layout(nat.params_layout(), nat.PARAMS_SIZE)
    nat.set_shader_dir(str(shader_dir()))
    if hasattr(nat, "cuda_add_library_dir"):
        for d in _nvrtc_dirs():
            nat.cuda_add_library_dir(d)
    return nat, None


def native():
    """The configured native module; raises BackendUnavailable when it is not built."""
    nat, why = _native_state()
    if nat is None:
        raise BackendUnavailable(why)
    return nat


_CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in _CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_status() -> BackendStatus:
    """The numpy CPU backend: always available."""
    return BackendStatus(
        "cpu",
        True,
        "",
        {
            "backend": "cpu",
            "name": cpu_model(),
            "arch": platform.machine(),
            "cores": os.cpu_count(),
            "numpy": np.__version__,
            "driver": f"numpy {np.__version__}",
        },
    )


def list_backends() -> list[BackendStatus]:
    """Every backend this installation knows, available or not, with the reason."""
    out = []
    nat, why = _native_state()
    if nat is None:
        out.append(BackendStatus("cuda" if sys.platform != "darwin" else "metal", False, why))
    else:
        for name in nat.compiled_backends():
            b = nat.get_backend(name)
            if b.available:
                out.append(BackendStatus(name, True, "", b.info()))
            else:
                out.append(BackendStatus(name, False, b.unavailable_reason))
    out.append(cpu_status())
    return out


def best_backend() -> str:
    """The first available backend in PREFERENCE order ("cpu" always is)."""
    avail = {s.name for s in list_backends() if s.available}
    return next(n for n in PREFERENCE if n in avail)


def resolve(name: str) -> str:
    """'auto' -> best backend; otherwise validates the name."""
    if name == "auto":
        return best_backend()
    if name not in PREFERENCE:
        raise ValueError(f"backend: '{name}' is not one of auto, {', '.join(PREFERENCE)}")
    return name


_BY_VALUE_KINDS = "iuf"

#: Default timing guard (microseconds): a spin kernel keeps the GPU busy this long before each
#: start event, so host-side dispatch (Python, torch) of the timed work is not measured as GPU
#: idle time. 200 us covers torch SDPA's Python dispatch with margin; every experiment uses it.
DEFAULT_TIMING_GUARD_US = 200.0


def _pack(i: int, a):
    nat = native()
    if isinstance(a, (nat.Buffer, nat.Arg)):
        return a
    if isinstance(a, np.void) and a.dtype == _params.PARAMS_DTYPE:
        return nat.Arg.raw(a.tobytes(), _params.PARAMS_ALIGN)
    if isinstance(a, np.generic) and a.dtype.kind in _BY_VALUE_KINDS:
        return nat.Arg.raw(a.tobytes(), a.dtype.itemsize)
    if isinstance(a, (bool, int, float)):
        raise TypeError(
            f"args[{i}]: a Python {type(a).__name__} is ambiguous as a kernel argument; "
            "wrap it (np.int32, np.uint32, np.int64, np.float32)"
        )
    if isinstance(a, np.ndarray):
        raise TypeError(f"args[{i}]: a host numpy array cannot be a kernel argument; upload it (backend.from_numpy)")
    return a  # a device tensor: the native side checks __dlpack__ and the device


class GpuBackend:
    """A native GPU backend ("cuda" or "metal")."""

    def __init__(self, name: str):
        nat = native()
        if name not in nat.compiled_backends():
            raise BackendUnavailable(f"backend '{name}' is not compiled into this build")
        self._b = nat.get_backend(name)
        if not self._b.available:
            raise BackendUnavailable(f"{name} backend unavailable: {self._b.unavailable_reason}")
        self.name = name

    @functools.cached_property
    def info(self) -> dict:
        return self._b.info()

    # ---- kernels ----
    def kernel(self, name: str, *, mode: str = "default", **constants: int):
        """Kernel `name` specialised by integer named constants (through the cache)."""
        for k, v in constants.items():
            if isinstance(v, bool):
                constants[k] = int(v)
            elif not isinstance(v, (int, np.integer)):
                raise TypeError(f"{k}: named constants are integers, got {type(v).__name__}")
        return self._b.kernel(name, {k: int(v) for k, v in constants.items()}, mode)

    def clear_memory_cache(self) -> None:
        self._b.clear_memory_cache()

    # ---- memory ----
    def alloc(self, nbytes: int):
        if nbytes < 0:
            raise ValueError(f"nbytes: {nbytes} is negative")
        return self._b.alloc(int(nbytes))

    def from_numpy(self, array: np.ndarray):
        a = np.ascontiguousarray(array)
        buf = self._b.alloc(a.nbytes)
        self._b.upload(buf, a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8))
        return buf

    def to_numpy(self, buf, dtype, shape) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes > buf.nbytes:
            raise ValueError(f"shape: {out.nbytes} bytes requested from a buffer of {buf.nbytes}")
        self._b.download(buf, out.reshape(-1).view(np.uint8))
        return out

    def memory_usage(self) -> dict:
        """Device memory as the driver reports it: ``allocated_bytes`` (CUDA: total - free of the
        whole device; Metal: ``MTLDevice.currentAllocatedSize``), ``free_bytes``, ``total_bytes``."""
        return dict(self._b.memory_usage())

    def fill(self, buf, byte: int) -> None:
        """Set every byte of `buf` (e.g. 0xFF poisons float outputs with NaN)."""
        self._b.fill_bytes(buf, int(byte) & 0xFF)

    # ---- launches ----
    def launch(self, kernel, grid, block, args, shared_bytes: int = 0, stream: int = 0) -> None:
        """Launch asynchronously; ``stream`` (CUDA) is a CUstream handle such as
        ``torch.cuda.current_stream().cuda_stream`` (0: the backend's legacy default stream)."""
        if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or stream < 0:
            raise TypeError(f"stream: expected a CUstream handle (a non-negative int), got {stream!r}")
        packed = [_pack(i, a) for i, a in enumerate(args)]
        self._b.launch(kernel, list(_dims("grid", grid)), list(_dims("block", block)), packed, int(shared_bytes),
                       int(stream))

    def time_launch(self, kernel, grid, block, args, shared_bytes=0, warmup=4, iters=50, flush_l2=False,
                    guard_us=DEFAULT_TIMING_GUARD_US):
        packed = [_pack(i, a) for i, a in enumerate(args)]
        return _lab.watch_dispatches(self._b.time_launch(
            kernel, list(_dims("grid", grid)), list(_dims("block", block)), packed, int(shared_bytes), int(warmup),
            int(iters), bool(flush_l2), float(guard_us)))

    def time_sequence(self, launches, warmup=4, iters=50, flush_l2=False, guard_us=DEFAULT_TIMING_GUARD_US):
        """Time several launches issued back to back from C++: [(kernel, grid, block, args, shared_bytes)]."""
        native_launches = [
            (k, list(_dims("grid", g)), list(_dims("block", b)), [_pack(i, a) for i, a in enumerate(args)], int(smem))
            for k, g, b, args, smem in launches
        ]
        return _lab.watch_dispatches(self._b.time_sequence(native_launches, int(warmup), int(iters), bool(flush_l2),
                                                           float(guard_us)))

    def time(self, enqueue, warmup=4, iters=50, flush_l2=False, guard_us=DEFAULT_TIMING_GUARD_US):
        """Device-side timing of `enqueue()` (any work on this backend's stream)."""
        return _lab.watch_dispatches(self._b.time(enqueue, int(warmup), int(iters), bool(flush_l2), float(guard_us)))

    def synchronize(self) -> None:
        self._b.synchronize()

    def tensor_map(self, tensor, dtype: str, dims, strides_bytes, box, swizzle_bytes: int = 0, oob_nan: bool = False):
        """A TMA descriptor over `tensor` (a CUDA tensor or Buffer); dims/box innermost first."""
        nat = native()
        if not hasattr(nat, "cuda_tensor_map"):
            raise BackendUnavailable("tensor maps need the CUDA backend")
        if isinstance(tensor, nat.Buffer):
            addr = tensor.address
        elif hasattr(tensor, "data_ptr"):
            addr = tensor.data_ptr()
        else:
            raise TypeError("tensor: expected a CUDA tensor with data_ptr() or a Buffer")
        return nat.cuda_tensor_map(dtype, int(addr), [int(d) for d in dims], [int(s) for s in strides_bytes],
                                   [int(b) for b in box], int(swizzle_bytes), bool(oob_nan))


def _dims(name: str, d) -> tuple[int, ...]:
    t = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    if not 1 <= len(t) <= 3 or any(int(x) < 1 for x in t):
        raise ValueError(f"{name}: expected 1 to 3 positive dimensions, got {d!r}")
    return tuple(int(x) for x in t)


@functools.lru_cache(maxsize=None)
def _get_cached(name: str) -> GpuBackend:
    return GpuBackend(name)


def get(name: str = "auto") -> GpuBackend:
    """The GPU backend `name` ("cuda", "metal" or "auto" = best GPU); raises BackendUnavailable."""
    if name == "auto":
        name = best_backend()
    if name == "cpu":
        raise BackendUnavailable("the cpu backend has no kernels to launch; use attnproto.cpu")
    if name not in PREFERENCE:
        raise ValueError(f"backend: '{name}' is not one of auto, {', '.join(PREFERENCE)}")
    return _get_cached(name)


def cuda_available() -> tuple[bool, str]:
    """(available, reason) for the CUDA backend; for skip messages."""
    try:
        get("cuda")
        return True, ""
    except (BackendUnavailable, ImportError) as exc:
        return False, str(exc)
