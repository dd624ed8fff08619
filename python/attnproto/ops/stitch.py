"""Prototype 2 host side: the Prototype 1 tensor-core kernel with dispatchable stages
(``shaders/cuda/flash_fwd_mma_stitch.cu``).

flash_fwd_mma's per-tile work is three stages (``shaders/cuda/include/fa_mma_stitch.cuh``):
score (S = Q K^T plus the causal / key-tail mask), softmax (online softmax, O rescale,
S -> P) and accumulate (O += P V). The named constant STITCH_MODE chooses how the kernel
reaches them:

====  ==========  ===========================================================
mode  name        how the kernel reaches the stages
====  ==========  ===========================================================
0     inline      force-inlined: the code (and SASS) of flash_fwd_mma
1     noinline    ``__noinline__`` device functions in the same translation unit
2     table       a device function-pointer table in writable global memory, row
                  chosen by a kernel argument (indirect calls)
3     linked      stages in separate translation units compiled to LTO-IR by
                  NVRTC and linked at load time by nvJitLink
====  ==========  ===========================================================

The stages take pointers to the kernel's register arrays, so in modes 1-3 (unless the
nvJitLink link inlines them) the arrays live in local memory across each call: that is
the cost measured. Every mode runs the same stage code, so O and LSE are expected to be
bit-identical to mode 0 (the only freedom left to the compiler is contracting the
softmax's ``row_max * scale_log2 - mx_scaled`` into an FMA differently when the stage is a
separate function; tests/test_proto2_gpu.py checks equality). Tiles, launch shape and
outputs are those of flash_fwd_mma (:class:`~attnproto.ops.configs.FlashConfig`).

Compiling and linking need NVRTC and nvJitLink only (:func:`compile_mode`,
:func:`link_linked_mode`); launching needs the CUDA backend and torch tensors
(:func:`prepare`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import configs as _cfg
from . import flash as _flash

__all__ = [
    "KERNEL_NAME",
    "STAGE_SOURCES",
    "MODES",
    "MODE_NAMES",
    "LINKED_MODE",
    "STAGES_PER_TILE",
    "TABLE_ROW",
    "BENCH_PROBLEMS",
    "StitchConfig",
    "BuiltModule",
    "compile_mode",
    "link_linked_mode",
    "build",
    "ptxas_report",
    "warp_tiles",
    "dispatched_calls",
    "StitchLaunch",
    "prepare",
    "stitch_specialisations",
]

KERNEL_NAME = "flash_fwd_mma_stitch"
#: Translation units of the stages (mode 3 links these with the kernel's LTO-IR).
STAGE_SOURCES: Tuple[str, ...] = ("flash_fwd_mma_stage_score", "flash_fwd_mma_stage_softmax",
                                  "flash_fwd_mma_stage_accumulate")
#: The extern stage functions (ptxas reports each one it compiles separately).
STAGE_FUNCTIONS: Tuple[str, ...] = ("fa_mma_stage_score", "fa_mma_stage_softmax", "fa_mma_stage_accumulate")
MODES: Tuple[int, ...] = (0, 1, 2, 3)
MODE_NAMES: Dict[int, str] = {0: "inline", 1: "noinline", 2: "table", 3: "linked"}
LINKED_MODE = 3
#: Dispatched stage calls per warp per K/V tile it sees: score (+ mask), softmax, accumulate.
STAGES_PER_TILE = 3
#: Row of the mode-2 function-pointer table (fa_stitch::kTableRows = 1: row 0 holds the stages).
TABLE_ROW = 0

#: (batch, heads, seq_len, head_dim, causal) of the Prototype 2 benchmark, BF16: the issue's
#: N = 2048, D = 128, a longer and narrower shape, and the causal variant of the first.
BENCH_PROBLEMS: Tuple[Tuple[int, int, int, int, bool], ...] = (
    (4, 16, 2048, 128, False), (2, 16, 4096, 64, False), (4, 16, 2048, 128, True))
BENCH_DTYPE = "bfloat16"


@dataclass(frozen=True)
class StitchConfig:
    """One specialisation of flash_fwd_mma_stitch: a Prototype 1 tile plus STITCH_MODE."""

    tile: _cfg.FlashConfig
    mode: int

    def __post_init__(self) -> None:
        if not isinstance(self.tile, _cfg.FlashConfig):
            raise TypeError(f"tile: expected a FlashConfig, got {type(self.tile).__name__}")
        if isinstance(self.mode, bool) or not isinstance(self.mode, int):
            raise TypeError(f"mode: expected an int, got {type(self.mode).__name__}")

    @property
    def threads(self) -> int:
        return self.tile.threads

    @property
    def head_dim(self) -> int:
        return self.tile.head_dim

    def smem_bytes(self) -> int:
        """Dynamic shared memory of a launch (as flash_fwd_mma)."""
        return self.tile.smem_bytes()

    def is_legal(self, smem_limit: int = _cfg.SMEM_LIMIT_SM90) -> Tuple[bool, str]:
        """(True, "") or (False, reason): STITCH_MODE, then flash_fwd_mma's rules."""
        if self.mode not in MODES:
            return False, f"STITCH_MODE must be one of {MODES} (got {self.mode})"
        return self.tile.is_legal(smem_limit)

    def check(self, smem_limit: int = _cfg.SMEM_LIMIT_SM90) -> "StitchConfig":
        ok, why = self.is_legal(smem_limit)
        if not ok:
            raise ValueError(f"config: {self.label()} is illegal: {why}")
        return self

    def constants(self) -> Dict[str, int]:
        return {**self.tile.constants(), "STITCH_MODE": self.mode}

    def grid(self, batch: int, num_heads: int, seq_q: int) -> Tuple[int, int, int]:
        return self.tile.grid(batch, num_heads, seq_q)

    def with_mode(self, mode: int) -> "StitchConfig":
        return StitchConfig(self.tile, mode)

    def label(self) -> str:
        return f"{self.tile.label()}_mode{self.mode}"


def bench_config(batch: int, num_heads: int, seq_len: int, head_dim: int, causal: bool, mode: int,
                 dtype: str = BENCH_DTYPE) -> StitchConfig:
    """The chooser's (configs.choose_config) tiles for a benchmark problem, with ``mode``."""
    del batch, num_heads  # the chooser keys on head dim, query length and mask only
    return StitchConfig(_cfg.choose_config(head_dim, seq_len, causal, dtype), mode)


def stitch_specialisations() -> List[Tuple[str, Dict[str, int]]]:
    """Cubin specialisations of the Prototype 2 benchmark (modes 0-2 of BENCH_PROBLEMS; mode 3
    exists only as LTO-IR linked at load time, which tests/test_proto2_4.py covers)."""
    seen, out = set(), []
    for problem in BENCH_PROBLEMS:
        for mode in MODES:
            if mode == LINKED_MODE:
                continue
            consts = bench_config(*problem, mode).check().constants()
            key = tuple(sorted(consts.items()))
            if key not in seen:
                seen.add(key)
                out.append((KERNEL_NAME, consts))
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


def ptxas_report(log: str, entry: str = KERNEL_NAME) -> Dict[str, float]:
    """Registers of the entry, its stack frame, the total spill bytes (all functions) and the
    number of functions ptxas compiled separately, from a ``ptxas -v`` (or nvJitLink
    -verbose) log."""
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


# --------------------------------------------------------------------------- call counts
def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return int(value)


def warp_tiles(seq_q: int, seq_kv: int, tile: _cfg.FlashConfig) -> np.ndarray:
    """K/V tiles each warp of one (batch, head) processes, shape (query tiles, warps).

    Mirrors fa_mma_kernel_body.cuh: a CTA visits ``n_tiles`` tiles (all of them, or
    causal: up to the last key its last valid row sees) and a warp runs the stages of
    tile j iff ``warp_sees_tile`` (non-causal: always; causal: col0 <= warp_q0 +
    rows_per_warp - 1 + Nkv - Nq). Warps whose rows are all past Nq still run them.
    """
    seq_q, seq_kv = _check_count(seq_q, "seq_q"), _check_count(seq_kv, "seq_kv")
    if not isinstance(tile, _cfg.FlashConfig):
        raise TypeError(f"tile: expected a FlashConfig, got {type(tile).__name__}")
    kv_tiles = -(-seq_kv // tile.block_c)
    q_tiles = -(-seq_q // tile.block_r)
    q0 = np.arange(q_tiles, dtype=np.int64)[:, None] * tile.block_r
    warp_q0 = q0 + np.arange(tile.warps, dtype=np.int64)[None, :] * tile.rows_per_warp
    if not tile.causal:
        return np.full((q_tiles, tile.warps), kv_tiles, dtype=np.int64)
    offset = seq_kv - seq_q
    last_key = np.minimum(q0 + tile.block_r, seq_q) - 1 + offset
    n_tiles = np.where(last_key < 0, 0, np.minimum(kv_tiles, last_key // tile.block_c + 1))
    limit = warp_q0 + tile.rows_per_warp - 1 + offset           # col0 <= limit: the warp sees the tile
    seen = np.where(limit < 0, 0, limit // tile.block_c + 1)
    return np.minimum(n_tiles, seen)


def dispatched_calls(batch: int, num_heads: int, seq_q: int, seq_kv: int, tile: _cfg.FlashConfig) -> int:
    """Stage calls of one launch: per (batch, head), per CTA, per warp, STAGES_PER_TILE per
    K/V tile the warp processes (:func:`warp_tiles`)."""
    batch, num_heads = _check_count(batch, "batch"), _check_count(num_heads, "num_heads")
    return batch * num_heads * int(warp_tiles(seq_q, seq_kv, tile).sum()) * STAGES_PER_TILE


# --------------------------------------------------------------------------- launching
@dataclass
class StitchLaunch(_flash.PreparedLaunch):
    """flash.PreparedLaunch of one mode (``config`` is the StitchConfig); ``module`` holds the
    nvJitLink build of mode 3 (None for modes 0-2, which come from the kernel cache)."""

    module: Optional[BuiltModule] = None


def prepare(q: Any, k: Any, v: Any, mode: int, *, config: Optional[_cfg.FlashConfig] = None, causal: bool = False,
            scale: Optional[float] = None, backend: Any = None, cache_mode: str = "default") -> StitchLaunch:
    """Check Q/K/V exactly as flash_forward does (flash.check_flash_inputs), allocate O (input
    dtype) and LSE (float32), and obtain the kernel of ``mode`` with the tiles ``config`` (a
    FlashConfig; default: the Prototype 1 chooser's). Modes 0-2 come through the kernel cache
    with ``cache_mode``; mode 3 is compiled to LTO-IR and linked now."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    problem = _flash.check_flash_inputs(q, k, v, causal=causal, scale=scale)
    if backend is None:
        from .. import backend as _backend  # noqa: PLC0415

        backend = _backend.get("cuda")
    cfg = StitchConfig(_flash.resolve_mma_config(problem, config, backend), mode)
    module = None
    if mode == LINKED_MODE:
        from ..backend import native  # noqa: PLC0415

        module = link_linked_mode(cfg, backend.info["arch"])
        kern = native().cuda_kernel_from_cubin(KERNEL_NAME, cfg.constants(), module.cubin)
    else:
        kern = backend.kernel(KERNEL_NAME, mode=cache_mode, **cfg.constants())
    s = problem.shape
    args = [_flash.flash_params(problem), problem.q, problem.k, problem.v, problem.out, problem.lse,
            np.int32(TABLE_ROW)]
    return StitchLaunch(backend, kern, cfg.grid(s.batch, s.num_heads, s.seq_q), (cfg.threads, 1, 1), args,
                        cfg.smem_bytes(), problem, cfg, family="mma", reason=f"Prototype 2 mode {mode}",
                        module=module)
