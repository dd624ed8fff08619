"""The flash-attention kernel families: the one list.

Adding a family is one new module in this package (a :class:`~.base.Family` subclass
and its ``FAMILY`` object) plus one line in :data:`FAMILIES`. Everything that
enumerates kernels iterates this list: the front door (``kernel="auto"`` and
``kernel=NAME``), ``attnproto kernels precompile`` and the CI NVRTC compile
(:mod:`attnproto.kernels`), the sanitizer workloads (tools/sanitize.py), the benchmark
binary's arguments (tools/bench_args.py), the Prototype 1 sweep and the correctness
test over families x dtypes x head dims x variants (tests/test_families.py).

Order matters where nothing was measured: ``kernel="auto"`` falls back to the first
family of the backend that supports the call (wgmma before mma on Hopper). DSL families
(``Family.dsl``: triton, helion) are never chosen by ``kernel="auto"``: Prototype 5 measures them.
"""
from __future__ import annotations

from typing import List, Tuple

from . import cpu, helion, metal, mma, triton, wgmma
from .base import Family, FamilyDtypeUnsupported, FamilyUnsupported, unsupported_error

#: Every family, by backend, in fallback order.
FAMILIES: Tuple[Family, ...] = (
    wgmma.FAMILY,
    mma.FAMILY,
    triton.FAMILY,
    helion.FAMILY,
    metal.FAMILY,
    cpu.FAMILY,
)

__all__ = ["FAMILIES", "Family", "FamilyDtypeUnsupported", "FamilyUnsupported", "for_backend", "get", "names",
           "unsupported_error"]


def names() -> List[str]:
    return [f.name for f in FAMILIES]


def get(name: str) -> Family:
    """The family called ``name``; ValueError naming the argument ``kernel`` otherwise."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"kernel: {name!r} is not a registered family; available: auto, {', '.join(names())}")


def for_backend(backend: str) -> List[Family]:
    return [f for f in FAMILIES if f.backend == backend]
