"""Every CUDA kernel specialisation the project uses, and two ways to compile them
without a GPU (NVRTC only). The flash-attention families come from the registry
(:data:`attnproto.ops.families.FAMILIES`, each family's ``specialisations()``); the
other ops (the smoke matmul, linear attention, Prototype 2's stitched kernel) list
their own:

* :func:`compile_all` — compile each one and report errors (CI fails on any);
* :func:`precompile` — fill the on-disk archive, so a GPU machine loads instead
  of compiling (the archive key covers source hash, arch and compiler version).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

#: (module, function) pairs returning list[(kernel name, constants)], besides the families.
_PROVIDERS = (
    ("attnproto.gpu_smoke", "specialisations"),
    ("attnproto.ops.linear", "linear_specialisations"),
    ("attnproto.ops.stitch", "stitch_specialisations"),
    ("attnproto.ops.families.paged_decode", "specialisations"),
    ("attnproto.ops.paged", "append_specialisations"),
    ("attnproto.ops.rope", "specialisations"),
    ("attnproto.ops.paged_rope", "rope_append_specialisations"),
)

#: The arch CI compiles for: Hopper with arch-specific features (wgmma, setmaxnreg).
DEFAULT_ARCH = "sm_90a"

Spec = tuple[str, dict[str, int]]


def family_specialisations() -> list[Spec]:
    """Every specialisation of every registered flash family."""
    from .ops import families  # noqa: PLC0415

    return [spec for fam in families.FAMILIES for spec in fam.specialisations()]


def all_specialisations() -> list[Spec]:
    seen, out = set(), []
    providers = [family_specialisations] + [getattr(importlib.import_module(m), fn) for m, fn in _PROVIDERS]
    for provider in providers:
        for name, consts in provider():
            key = (name, tuple(sorted(consts.items())))
            if key not in seen:
                seen.add(key)
                out.append((name, dict(consts)))
    return out


def _parallel(work: Callable[[Spec], dict], specs: Iterable[Spec], jobs: int | None, progress) -> list[dict]:
    specs = list(specs)
    rows = []
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:  # NVRTC releases the GIL
        for i, row in enumerate(pool.map(work, specs)):
            rows.append(row)
            if progress:
                progress(i + 1, len(specs))
    return rows


def _row(nat, name, consts) -> dict:
    return {"kernel": nat.kernel_key(name, consts), "ok": True, "origin": "compiled", "ms": 0.0, "log": ""}


def compile_all(arch: str = DEFAULT_ARCH, specs: Iterable[Spec] | None = None, jobs: int | None = None,
                progress=None) -> list[dict]:
    """Compile every specialisation for `arch`; one row per kernel (ok, ms, log)."""
    from .backend import native  # noqa: PLC0415

    nat = native()

    def one(spec: Spec) -> dict:
        row = _row(nat, *spec)
        try:
            _, log, ms = nat.cuda_compile(spec[0], spec[1], arch)
            row.update(ms=ms, log=log)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none hidden
            row.update(ok=False, log=str(exc))
        return row

    return _parallel(one, all_specialisations() if specs is None else specs, jobs, progress)


def precompile(specs: Iterable[Spec] | None = None, arch: str = DEFAULT_ARCH, jobs: int | None = None,
               progress=None) -> list[dict]:
    """Put every specialisation in `specs` (default: all) into the on-disk archive for `arch`."""
    from .backend import native  # noqa: PLC0415

    nat = native()

    def one(spec: Spec) -> dict:
        row = _row(nat, *spec)
        try:
            _, origin, ms, log, _ = nat.cuda_obtain(spec[0], spec[1], arch)
            row.update(origin=origin, ms=ms, log=log)
        except Exception as exc:  # noqa: BLE001 - reported per kernel
            row.update(ok=False, log=str(exc))
        return row

    return _parallel(one, all_specialisations() if specs is None else specs, jobs, progress)
