"""Prototype 5's static phase (every backend, no GPU needed): each kernel compiled cold for
sm_90a, its generated code read (PTX target and matrix instructions, SASS by class,
registers, spills, shared memory), its lines of source and its compile time.

Kernels: the DSL families' default tile (Triton's compile API; Helion's code generation, then
Triton's), and our wgmma and mma
families at their chosen tiles for the sweep's largest N (NVRTC), per head dim and mask.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from ...ops import chooser, families
from ...ops.problem import DeviceSpec, ProblemSpec
from ..registry import ExperimentContext
from . import codegen
from .common import ARCH, DSL_FAMILIES, DTYPE, HAND_WRITTEN, SOURCES, STATIC_PHASE


def _problem(head_dim: int, causal: bool, seq: int) -> ProblemSpec:
    return ProblemSpec(1, 1, 1, seq, seq, head_dim, DTYPE, causal)


def nvrtc_missing() -> str:
    """Why our kernels cannot be compiled here ("" when NVRTC and the native module are present)."""
    from ...backend import BackendUnavailable, native  # noqa: PLC0415

    try:
        nat = native()
        if not hasattr(nat, "cuda_compile"):
            return "this build has no CUDA backend"
        nat.cuda_nvrtc_version()
    except (BackendUnavailable, ImportError, RuntimeError, OSError) as exc:
        return f"NVRTC unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return ""


def _nvrtc_compile(fam: Any, spec: ProblemSpec) -> Tuple[Any, Any, Any]:
    """(compile_once, tile label, dynamic shared bytes) of a hand-written family at its chosen tile."""
    from ...backend import native  # noqa: PLC0415

    nat = native()
    cfg, _ = chooser.family_choice(fam, spec, DeviceSpec.for_arch(ARCH.rstrip("a")))
    consts = fam.constants(cfg, spec)

    def once() -> Tuple[bytes, str]:
        cubin = nat.cuda_compile(fam.kernel_name, consts, ARCH)[0]
        ptx = nat.cuda_compile(fam.kernel_name, consts, ARCH, "ptx")[0]
        return bytes(cubin), bytes(ptx).decode(errors="replace")

    return once, fam.config_label(cfg), fam.shared_bytes(cfg, spec)


def _dsl_compile(name: str, spec: ProblemSpec) -> Tuple[Any, Any, Any]:
    """(compile_once, tile label, shared bytes holder) of a DSL family's default tile: Triton's
    compile API on the Triton kernel, or Helion's code generation then Triton's."""
    fam = families.get(name)
    cfg, _ = fam.default_config(spec, DeviceSpec.for_arch(ARCH.rstrip("a")))
    shared = {}
    if name == "triton":
        from ...ops import triton_flash as module  # noqa: PLC0415
    else:
        from ...ops import helion_flash as module  # noqa: PLC0415

    def once() -> Tuple[bytes, str]:
        with codegen.cold_triton_cache() as tmp:
            saved = os.environ.get("TRITON_CACHE_DIR")
            os.environ["TRITON_CACHE_DIR"] = tmp
            if name == "helion":
                module.fixed_kernel.cache_clear()  # a new Helion kernel object: its codegen runs again
            try:
                k = module.aot_compile(cfg, spec.head_dim, spec.causal, spec.dtype)
            finally:
                if saved is None:
                    os.environ.pop("TRITON_CACHE_DIR", None)
                else:
                    os.environ["TRITON_CACHE_DIR"] = saved
        shared["bytes"] = int(k.metadata.shared)
        return bytes(k.asm["cubin"]), str(k.asm["ptx"])

    return once, fam.config_label(cfg), shared


def source_lines() -> Dict[str, int]:
    """Lines of kernel source of each kernel (code lines: no blanks, comments or docstrings)."""
    from ...backend import shader_dir  # noqa: PLC0415

    root = shader_dir()
    out = {name: codegen.cuda_source_lines(root / rel, root) for name, rel in SOURCES.items()}
    usable = {name for name in DSL_FAMILIES
              if families.get(name).supports_spec(_problem(64, False, 64), DeviceSpec.for_arch("sm_90"))[0]}
    if "triton" in usable:
        from ...ops import triton_flash  # noqa: PLC0415

        out["triton"] = codegen.python_source_lines(triton_flash.attn_fwd, triton_flash._inner)
    if "helion" in usable:
        from ...ops import helion_flash  # noqa: PLC0415

        out["helion"] = codegen.python_source_lines(helion_flash.attention)
    return out


def static_records(ctx: ExperimentContext, head_dims: Tuple[int, ...], seq: int,
                   masks: Tuple[bool, ...] = (False, True)) -> Tuple[List[dict], Dict[str, str]]:
    """One record per (kernel, head dim, causal in ``masks``): generated-code metrics, timing =
    cold compiles."""
    lines = source_lines()
    records, skipped = [], {}
    device = DeviceSpec.for_arch(ARCH.rstrip("a"))
    no_nvrtc = nvrtc_missing()
    for d in head_dims:
        for causal in masks:
            spec = _problem(d, causal, seq)
            kernels = []
            for name in DSL_FAMILIES + HAND_WRITTEN:
                ok, why = families.get(name).supports_spec(spec, device)
                if ok and name in HAND_WRITTEN and no_nvrtc:
                    ok, why = False, no_nvrtc
                if not ok:
                    skipped[name] = why
                    continue
                kernels.append(name)
            for name in kernels:
                if name in DSL_FAMILIES:
                    once, label, shared = _dsl_compile(name, spec)
                else:
                    once, label, shared = _nvrtc_compile(families.get(name), spec)
                cubin, ptx, ms = codegen.timed_compiles(once)
                dyn = shared["bytes"] if isinstance(shared, dict) else shared
                ptx_info = codegen.ptx_stats(ptx)
                metrics = {**codegen.cubin_stats(cubin), "dynamic_shared_bytes": float(dyn),
                           "ptx_wgmma_count": float(ptx_info["ptx_wgmma"]),
                           "ptx_mma_sync_count": float(ptx_info["ptx_mma_sync"]),
                           "ptx_tma_count": float(ptx_info["ptx_tma"]), "source_lines_count": float(lines[name]),
                           "compile_ms": float(sorted(ms)[len(ms) // 2])}
                config = {"phase": STATIC_PHASE, "kernel": name, "tile": label, "head_dim": d, "causal": causal,
                          "dtype": DTYPE, "arch": ARCH, "ptx_target": ptx_info["ptx_target"],
                          "compiler": name if name in DSL_FAMILIES else "nvrtc"}
                records.append(ctx.record(config, metrics, _compile_timing(ms)))
    return records, skipped


def _compile_timing(ms: List[float]) -> Any:
    from ... import lab  # noqa: PLC0415

    return lab.timing(ms, clock="host")
