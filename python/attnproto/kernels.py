"""Every CUDA kernel specialisation the project uses, from each kernel family's
own list. CI compiles each one with NVRTC (no GPU needed) and fails on any
compile error; `attnproto kernels --compile` does the same by hand."""
from __future__ import annotations

import importlib

#: Modules that define `specialisations()` -> list[(kernel name, constants)].
_PROVIDERS = (
    "attnproto.gpu_smoke",
    "attnproto.ops.configs",
    "attnproto.ops.flash_wgmma",
    "attnproto.ops.linear",
)

#: The arch CI compiles for: Hopper with arch-specific features (wgmma, setmaxnreg).
DEFAULT_ARCH = "sm_90a"


def all_specialisations() -> list[tuple[str, dict[str, int]]]:
    seen, out = set(), []
    for mod_name in _PROVIDERS:
        mod = importlib.import_module(mod_name)
        for name, consts in mod.specialisations():
            key = (name, tuple(sorted(consts.items())))
            if key not in seen:
                seen.add(key)
                out.append((name, dict(consts)))
    return out


def compile_all(arch: str = DEFAULT_ARCH, progress=None) -> list[dict]:
    """Compile every specialisation for `arch`; returns one row per kernel (ok, ms, log)."""
    from .backend import native  # noqa: PLC0415

    nat = native()
    rows = []
    specs = all_specialisations()
    for i, (name, consts) in enumerate(specs):
        row = {"kernel": nat.kernel_key(name, consts), "ok": True, "ms": 0.0, "log": ""}
        try:
            _, log, ms = nat.cuda_compile(name, consts, arch)
            row.update(ms=ms, log=log)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none hidden
            row.update(ok=False, log=str(exc))
        rows.append(row)
        if progress:
            progress(i + 1, len(specs))
    return rows
