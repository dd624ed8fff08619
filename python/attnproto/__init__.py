"""attnproto — hand-written attention kernels, measured honestly.

The native core (``attnproto._attnproto``) is imported lazily so that the pure
Python layers (references, CPU backend, findings store, CLI) work even where the
extension is not built, e.g. when running from a source tree.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "native"]


def native():
    """The configured native module (shader dir, NVRTC search dirs, layout check);
    raises attnproto.backend.BackendUnavailable with the reason when it is not built."""
    from .backend import native as _native  # noqa: PLC0415  (deliberately lazy)

    return _native()


def __getattr__(name: str):
    """``attnproto.BackendError`` / ``attnproto.KernelCompileError`` from the native core, lazily."""
    if name in ("BackendError", "KernelCompileError"):
        return getattr(native(), name)
    raise AttributeError(f"module 'attnproto' has no attribute {name!r}")
