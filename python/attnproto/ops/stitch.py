"""Prototype 2 host side: the stitched attention inner loop (``shaders/cuda/stitch_attn.cu``).

One SIMT Flash Attention forward whose per-tile work is split into three stages
(score, softmax_update, accumulate; ``shaders/cuda/include/stitch.cuh``), dispatched
in one of four ways chosen by the named constant STITCH_MODE:

====  ==========  ===========================================================
mode  name        how the kernel reaches the stages
====  ==========  ===========================================================
0     inline      force-inlined: the monolithic, specialised baseline
1     noinline    ``__noinline__`` device functions in the same translation unit
2     table       a device function-pointer table in global memory, row chosen
                  by a kernel argument (indirect calls)
3     linked      stages in separate translation units compiled to LTO-IR by
                  NVRTC and linked at load time by nvJitLink
====  ==========  ===========================================================

Every mode does the same arithmetic (explicit round-to-nearest FMAs, MUFU exp2), so
outputs are bit-identical to mode 0. Compiling and linking need NVRTC and nvJitLink
only (:func:`compile_mode`, :func:`link_linked_mode`); launching needs the CUDA backend
and torch tensors (:func:`prepare`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .. import params as _params
from .. import validate as _v
from . import configs as _cfg

__all__ = [
    "KERNEL_NAME",
    "STAGE_SOURCES",
    "MODES",
    "MODE_NAMES",
    "LINKED_MODE",
    "STAGES_PER_TILE",
    "StitchConfig",
    "BuiltModule",
    "compile_mode",
    "link_linked_mode",
    "build",
    "ptxas_report",
    "dispatched_calls",
    "StitchLaunch",
    "prepare",
    "stitch_specialisations",
]

KERNEL_NAME = "stitch_attn"
#: Translation units of the stages (mode 3 links these with the kernel's LTO-IR).
STAGE_SOURCES: Tuple[str, ...] = ("stitch_score", "stitch_softmax", "stitch_accumulate")
MODES: Tuple[int, ...] = (0, 1, 2, 3)
MODE_NAMES: Dict[int, str] = {0: "inline", 1: "noinline", 2: "table", 3: "linked"}
LINKED_MODE = 3
#: Dispatched stage calls per warp per K/V tile: score, softmax_update, accumulate.
STAGES_PER_TILE = 3
#: Function-pointer table rows of mode 2 (stitch::kTableRows); row 0 holds the stages.
TABLE_ROWS = 1
TABLE_ROW = 0

# ---- mirrors of include/stitch.cuh ----
WARP_SIZE = 32
MAX_WARPS = 32
STATIC_SMEM_LIMIT = 48 * 1024
WORD_BYTES = 4
ELEM_BYTES = 2
OUT_DTYPE = "float32"

# Tiles the Prototype 2 benchmark uses: 64 keys per tile (2 per lane) and 4 warps (4 query
# rows) per CTA keep every benchmarked head dim (64, 128) inside 48 KiB of static shared memory.
BENCH_BLOCK_C = 64
BENCH_WARPS = 4
BENCH_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class StitchConfig:
    """One specialisation of stitch_attn (dtype stored as its name)."""

    head_dim: int
    block_c: int
    warps: int
    dtype: str
    mode: int

    def __post_init__(self) -> None:
        for name in ("head_dim", "block_c", "warps", "mode"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        code = _cfg.dtype_code(self.dtype)
        object.__setattr__(self, "dtype", next(n for n, c in _cfg.DTYPE_CODES.items() if c == code))

    @property
    def threads(self) -> int:
        return self.warps * WARP_SIZE

    def smem_bytes(self) -> int:
        """Static shared memory: padded K tile, V tile and one float query row per warp."""
        k_words = self.block_c * (self.head_dim // 2 + 1)
        v_words = self.block_c * (self.head_dim // 2)
        return (k_words + v_words + self.warps * self.head_dim) * WORD_BYTES

    def is_legal(self) -> Tuple[bool, str]:
        """(True, "") or (False, reason), in the order of the kernel's static_asserts."""
        if self.mode not in MODES:
            return False, f"STITCH_MODE must be one of {MODES} (got {self.mode})"
        if self.head_dim <= 0 or self.head_dim % (2 * WARP_SIZE):
            return False, f"HEAD_DIM must be a positive multiple of 64 (got {self.head_dim})"
        if self.block_c <= 0 or self.block_c % WARP_SIZE:
            return False, f"BLOCK_C must be a positive multiple of 32 (got {self.block_c})"
        if not 1 <= self.warps <= MAX_WARPS:
            return False, f"WARPS must be in [1, {MAX_WARPS}] (got {self.warps})"
        if self.smem_bytes() > STATIC_SMEM_LIMIT:
            return False, (f"shared memory {self.smem_bytes()} bytes exceeds {STATIC_SMEM_LIMIT} bytes of "
                           "static shared memory")
        return True, ""

    def check(self) -> "StitchConfig":
        ok, why = self.is_legal()
        if not ok:
            raise ValueError(f"config: {self.label()} is illegal: {why}")
        return self

    def constants(self) -> Dict[str, int]:
        return {"HEAD_DIM": self.head_dim, "BLOCK_C": self.block_c, "WARPS": self.warps,
                "DTYPE": _cfg.DTYPE_CODES[self.dtype], "STITCH_MODE": self.mode}

    def grid(self, batch: int, num_heads: int, seq_q: int) -> Tuple[int, int, int]:
        return (-(-seq_q // self.warps), num_heads, batch)

    def with_mode(self, mode: int) -> "StitchConfig":
        return StitchConfig(self.head_dim, self.block_c, self.warps, self.dtype, mode)

    def label(self) -> str:
        return f"d{self.head_dim}_c{self.block_c}_w{self.warps}_{self.dtype}_mode{self.mode}"


def stitch_specialisations() -> List[Tuple[str, Dict[str, int]]]:
    """Cubin specialisations of the Prototype 2 benchmark (modes 0-2; mode 3 exists only as
    LTO-IR linked at load time, which tests/test_proto2_4.py covers)."""
    out = []
    for head_dim in BENCH_HEAD_DIMS:
        for dtype in _cfg.DTYPE_CODES:
            for mode in MODES:
                if mode == LINKED_MODE:
                    continue
                cfg = StitchConfig(head_dim, BENCH_BLOCK_C, BENCH_WARPS, dtype, mode).check()
                out.append((KERNEL_NAME, cfg.constants()))
    return out


# --------------------------------------------------------------------------- building
@dataclass
class BuiltModule:
    """A cubin of one mode and what it cost: NVRTC ms per translation unit, nvJitLink ms."""

    config: StitchConfig
    cubin: bytes
    compile_ms: Dict[str, float]
    link_ms: float
    log: str

    @property
    def build_ms(self) -> float:
        return sum(self.compile_ms.values()) + self.link_ms


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"Function properties for (\w+)\s*\n[^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_ENTRY = "stitch_attn"


def ptxas_report(log: str, entry: str = _PTXAS_ENTRY) -> Dict[str, float]:
    """Registers of the entry, its stack frame, the total spill bytes and the number of
    functions ptxas compiled separately, from a ``ptxas -v`` (or nvJitLink -verbose) log."""
    frames = {m.group(1): (int(m.group(2)), int(m.group(3)) + int(m.group(4))) for m in _PTXAS_FRAME.finditer(log)}
    regs = _PTXAS_REGS.findall(log)
    if entry not in frames or not regs:
        raise ValueError(f"log: no ptxas resource report for {entry!r} (compile with --ptxas-options=-v "
                         "or link with -verbose)")
    return {"registers_regs": float(regs[0]), "stack_frame_bytes": float(frames[entry][0]),
            "spill_bytes": float(sum(s for _, s in frames.values())),
            "device_functions_count": float(len(frames) - 1)}


def compile_mode(config: StitchConfig, arch: str, verbose: bool = False) -> BuiltModule:
    """NVRTC cubin of modes 0-2 (no device needed); ``verbose`` adds the ptxas report to the log."""
    from ..backend import native  # noqa: PLC0415

    config.check()
    if config.mode == LINKED_MODE:
        raise ValueError("config: mode 3 is built by link_linked_mode (LTO-IR + nvJitLink)")
    opts = ["--ptxas-options=-v"] if verbose else []
    cubin, log, ms = native().cuda_compile(KERNEL_NAME, config.constants(), arch, "cubin", opts)
    return BuiltModule(config, cubin, {KERNEL_NAME: ms}, 0.0, log)


def link_linked_mode(config: StitchConfig, arch: str, verbose: bool = False) -> BuiltModule:
    """Mode 3: the kernel and the three stage translation units compiled to LTO-IR by NVRTC
    and linked into one cubin by nvJitLink (no device needed)."""
    from ..backend import native  # noqa: PLC0415

    config.check()
    if config.mode != LINKED_MODE:
        raise ValueError(f"config: mode {config.mode} is not the linked mode ({LINKED_MODE})")
    nat = native()
    inputs, times = [], {}
    for name in (KERNEL_NAME,) + STAGE_SOURCES:
        blob, _, ms = nat.cuda_compile(name, config.constants(), arch, "ltoir")
        inputs.append((blob, "ltoir", name))
        times[name] = ms
    cubin, log, link_ms = nat.cuda_link(inputs, arch, ["-verbose"] if verbose else [])
    return BuiltModule(config, cubin, times, link_ms, log)


def build(config: StitchConfig, arch: str, verbose: bool = False) -> BuiltModule:
    """The cubin of any mode."""
    if config.mode == LINKED_MODE:
        return link_linked_mode(config, arch, verbose)
    return compile_mode(config, arch, verbose)


def dispatched_calls(batch: int, num_heads: int, seq_q: int, seq_kv: int, block_c: int) -> int:
    """Stage calls of one launch: one warp per query row, STAGES_PER_TILE calls per K/V tile."""
    tiles = -(-seq_kv // block_c)
    return batch * num_heads * seq_q * tiles * STAGES_PER_TILE


# --------------------------------------------------------------------------- launching
@dataclass
class StitchLaunch:
    """A ready launch of one mode on torch CUDA tensors; outputs O and LSE float32."""

    backend: Any
    kernel: Any
    config: StitchConfig
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    args: list
    out: Any
    lse: Any
    module: Optional[BuiltModule]

    def launch(self) -> Tuple[Any, Any]:
        self.backend.launch(self.kernel, grid=self.grid, block=self.block, args=self.args)
        return self.out, self.lse

    def time(self, warmup: int = 4, iters: int = 50):
        return self.backend.time_launch(self.kernel, self.grid, self.block, self.args, warmup=warmup, iters=iters)


def _check_inputs(q: Any, k: Any, v: Any, scale: Optional[float]):
    shape = _v.check_attention_inputs(q, k, v, causal=False, allowed_dtypes=tuple(_cfg.DTYPE_CODES), device="cuda")
    scale = _v.check_scale(scale, shape.head_dim)
    if scale <= 0.0:
        raise ValueError(f"scale: must be positive, got {scale}")
    infos = {}
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        infos[name] = _v.tensor_info(x, name)
        if x.data_ptr() % WORD_BYTES:
            raise ValueError(f"{name}: data pointer {x.data_ptr():#x} is not {WORD_BYTES}-byte aligned")
        if any(s % (WORD_BYTES // ELEM_BYTES) for s, n in zip(infos[name].strides[:3], infos[name].shape[:3]) if n > 1):
            raise ValueError(f"{name}: batch/head/token strides must be even (the kernel reads 32-bit pairs)")
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q is on {q.device}")
    return shape, scale, infos


def prepare(q: Any, k: Any, v: Any, mode: int, *, block_c: int = BENCH_BLOCK_C, warps: int = BENCH_WARPS,
            scale: Optional[float] = None, backend: Any = None, cache_mode: str = "default") -> StitchLaunch:
    """Check Q/K/V (torch CUDA, float16/bfloat16, non-causal, GQA allowed), allocate float32
    O and LSE and obtain the kernel of ``mode`` (modes 0-2 through the kernel cache with
    ``cache_mode``; mode 3 compiled to LTO-IR and linked now)."""
    import torch  # noqa: PLC0415

    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    shape, scale, _ = _check_inputs(q, k, v, scale)
    cfg = StitchConfig(shape.head_dim, block_c, warps, shape.dtype, mode)
    ok, why = cfg.is_legal()
    if not ok:
        raise ValueError(f"q: head_dim {shape.head_dim} with block_c={block_c}, warps={warps} is not supported: {why}")
    if backend is None:
        from .. import backend as _backend  # noqa: PLC0415

        backend = _backend.get("cuda")
    module = None
    if mode == LINKED_MODE:
        from ..backend import native  # noqa: PLC0415

        module = link_linked_mode(cfg, backend.info["arch"])
        kern = native().cuda_kernel_from_cubin(KERNEL_NAME, cfg.constants(), module.cubin)
    else:
        kern = backend.kernel(KERNEL_NAME, mode=cache_mode, **cfg.constants())
    out = torch.empty((shape.batch, shape.num_heads, shape.seq_q, shape.head_dim), dtype=torch.float32,
                      device=q.device)
    lse = torch.empty((shape.batch, shape.num_heads, shape.seq_q), dtype=torch.float32, device=q.device)
    qs, ks, vs = (tuple(int(s) for s in x.stride()[:3]) for x in (q, k, v))
    p = _params.make_params(batch=shape.batch, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                            seq_q=shape.seq_q, seq_kv=shape.seq_kv, head_dim=shape.head_dim, scale=scale,
                            q_stride=qs, k_stride=ks, v_stride=vs, o_stride=tuple(out.stride()[:3]),
                            lse_stride=tuple(lse.stride()[:2]))
    import numpy as np  # noqa: PLC0415

    args = [p, q, k, v, out, lse, np.int32(TABLE_ROW)]
    return StitchLaunch(backend, kern, cfg, cfg.grid(shape.batch, shape.num_heads, shape.seq_q),
                        (cfg.threads, 1, 1), args, out, lse, module)
