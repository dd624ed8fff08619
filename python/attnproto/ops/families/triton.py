"""Family "triton": the Prototype 1 forward written in Triton (:mod:`attnproto.ops.triton_flash`),
compiled by Triton's JIT; Prototype 5 compares it with the hand-written families.

Configs are :class:`~attnproto.ops.triton_flash.TritonConfig` (BLOCK_M x BLOCK_N, warps,
stages); :data:`AUTOTUNE` hands the choice to ``triton.autotune`` (one tuning per Nq, Nkv,
D, causal and dtype). The family is a DSL family (``dsl = "triton"``): never chosen by
``kernel="auto"``, no NVRTC specialisations. triton is imported only when the family is used.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ... import lab as _lab
from .. import dsl_tiles as _tiles
from ..problem import CUDA, DeviceSpec, FlashProblem, ProblemSpec, Rules
from .base import Family
from .cuda_host import run_cuda_host

# Triton's TMA descriptors (the kernel's loads and stores) need Hopper.
MIN_COMPUTE = (9, 0)
# TMA: 16-byte aligned base addresses and strides.
TMA_ALIGN_BYTES = 16
HEAD_DIMS = (64, 128)
DTYPES = ("float16", "bfloat16")
# The grid's second axis (batch x query heads) is a CUDA y dimension.
MAX_GRID_Y = 65535
#: Block sizes Triton's tl.dot tiles take (powers of two; wgmma's M is 64 per warpgroup).
BLOCK_RANGE = (16, 256)
WARPS_ALLOWED = (4, 8)
STAGES_RANGE = (1, 6)


@dataclass(frozen=True)
class Autotune:
    """The config that lets ``triton.autotune`` pick the tile (its zeros: no fixed tile)."""

    block_m: int = 0
    block_n: int = 0
    warps: int = 0
    stages: int = 0


#: Pass as ``config=`` to autotune (``flash_forward(q, k, v, kernel="triton", config=AUTOTUNE)``).
AUTOTUNE = Autotune()


def triton_missing() -> str:
    """Why Triton cannot be used here ("" when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return ""


def _kernels():
    from .. import triton_flash  # noqa: PLC0415  (imports triton)

    return triton_flash


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass
class TritonLaunch:
    """One call of the Triton kernel on checked CUDA tensors: ``launch()``, ``time()`` (the lab
    timer on the backend's stream, which is ordered with torch's default stream Triton launches on)."""

    backend: Any
    problem: FlashProblem
    config: Any
    args: tuple
    constexprs: Dict[str, Any]
    family: str = "triton"
    reason: str = ""
    compiled: Any = field(default=None, repr=False)

    @property
    def autotuned(self) -> bool:
        return isinstance(self.config, Autotune)

    def launch(self) -> Tuple[Any, Any]:
        tf = _kernels()
        p = self.problem
        s = p.shape
        if self.autotuned:
            grid = lambda meta: tf.grid_for(meta["BLOCK_M"], s.seq_q, s.batch * s.num_heads)  # noqa: E731
            self.compiled = tf.attn_fwd_autotuned[grid](*self.args, **self.constexprs)
        else:
            c = self.config
            self.compiled = tf.attn_fwd[tf.grid_for(c.block_m, s.seq_q, s.batch * s.num_heads)](
                *self.args, **self.constexprs, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                num_warps=c.warps, num_stages=c.stages)
        return p.out, p.lse

    def tuned_config(self) -> Any:
        """The tile that ran: the fixed config, or the one the autotuner chose (after a launch)."""
        if not self.autotuned:
            return self.config
        best = _kernels().attn_fwd_autotuned.best_config
        return _kernels().TritonConfig(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps,
                                       best.num_stages)

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False,
             min_warmup_ms: float = _lab.WARMUP_MS) -> _lab.TimingStats:
        if self.compiled is None:
            self.launch()  # compile (and autotune) before timing
        return _lab.time_device(self.backend, self.launch, warmup=warmup, iters=iters, flush_l2=flush_l2,
                                min_warmup_ms=min_warmup_ms)

    @property
    def resources(self) -> Dict[str, Any]:
        """Registers, spilled (local) bytes and shared memory of the compiled kernel (after a launch)."""
        k = self.compiled
        if k is None:
            return {}
        if getattr(k, "n_regs", None) is None and hasattr(k, "_init_handles"):
            k._init_handles()  # noqa: SLF001 - Triton loads the module (and reads its registers) lazily
        return {"registers": int(k.n_regs), "local_bytes": int(k.n_spills), "shared_bytes": int(k.metadata.shared)}


class TritonFamily(Family):
    name = "triton"
    backend = "cuda"
    label = "Triton: TMA descriptors + tl.dot, online softmax in exp2, autotuned (Triton's compiler)"
    kernel_name = "attn_fwd"
    dsl = "triton"
    rules = Rules(location=CUDA, dtypes=DTYPES, head_dims=HEAD_DIMS, base_align_bytes=TMA_ALIGN_BYTES,
                  stride_align_bytes=TMA_ALIGN_BYTES, out_align_bytes=TMA_ALIGN_BYTES,
                  out_stride_align_bytes=TMA_ALIGN_BYTES, positive_strides=True, min_compute=MIN_COMPUTE,
                  arch_prefix="sm_")
    test_head_dims = HEAD_DIMS
    config_keys = ("block_m", "block_n", "warps", "stages")
    #: The config that hands the tile to the DSL's autotuner (what Prototype 5 measures).
    autotune_config = AUTOTUNE

    def extra_support(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[bool, str]:
        missing = triton_missing()
        if missing:
            return False, f"{self.name}: {missing}"
        if spec.batch * spec.num_heads > MAX_GRID_Y:
            return False, f"q: batch x heads {spec.batch * spec.num_heads} exceed the grid limit {MAX_GRID_Y} (triton)"
        return True, ""

    @staticmethod
    def _smem(device: Optional[DeviceSpec]) -> int:
        return (device.smem_limit if device is not None and device.smem_limit else _tiles.SMEM_LIMIT_SM90)

    def _space(self, head_dim: int, smem: int) -> List[Any]:
        return _tiles.configs(head_dim, min(smem, _tiles.SMEM_LIMIT_SM90))

    def sweep_space(self, head_dim: int, causal: bool, dtype: str, device: DeviceSpec) -> List[Any]:
        return self._space(head_dim, self._smem(device))

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        cfg = _tiles.default_config(spec.head_dim)
        return cfg, (f"fixed tile {self.config_label(cfg)} (config=families.triton.AUTOTUNE hands the "
                     f"choice to triton.autotune over {len(self._space(spec.head_dim, self._smem(device)))} tiles)")

    def _check(self, cfg: Any, head_dim: int, smem: int) -> Any:
        if isinstance(cfg, Autotune):
            return cfg
        for value, name in ((cfg.block_m, "block_m"), (cfg.block_n, "block_n")):
            if not _pow2(value) or not BLOCK_RANGE[0] <= value <= BLOCK_RANGE[1]:
                raise ValueError(f"config.{name}: {value} is not a power of two in {list(BLOCK_RANGE)}")
        if cfg.warps not in WARPS_ALLOWED:
            raise ValueError(f"config.warps: {cfg.warps} is not one of {WARPS_ALLOWED}")
        if not STAGES_RANGE[0] <= cfg.stages <= STAGES_RANGE[1]:
            raise ValueError(f"config.stages: {cfg.stages} is not in {list(STAGES_RANGE)}")
        need = _tiles.shared_bytes_estimate(cfg, head_dim)
        if need > smem:
            raise ValueError(f"config: {self.config_label(cfg)} needs about {need} bytes of shared memory "
                             f"at D={head_dim}, more than the {smem} available")
        return cfg

    def config_for(self, spec: ProblemSpec, values: Dict[str, Any], device: DeviceSpec) -> Any:
        vals = [int(values[k]) for k in self.config_keys]
        if not any(vals):
            return AUTOTUNE
        return self._check(_tiles.TritonConfig(*vals), spec.head_dim, self._smem(device))

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        if not isinstance(config, (Autotune, _tiles.TritonConfig)):
            raise TypeError(f"config: expected a TritonConfig or families.triton.AUTOTUNE for kernel 'triton', "
                            f"got {type(config).__name__}")
        return self._check(config, spec.head_dim, self._smem(device))

    def config_label(self, config: Any) -> str:
        if isinstance(config, Autotune):
            return "triton autotune"
        return f"triton {config.block_m}x{config.block_n} w{config.warps} s{config.stages}"

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> TritonLaunch:
        tf = _kernels()
        tile = (0, 0) if isinstance(config, Autotune) else (config.block_m, config.block_n)
        args, constexprs = tf.launch_args(problem.q, problem.k, problem.v, problem.out, problem.lse,
                                          scale=problem.scale, causal=problem.causal, q_stride=problem.q_stride,
                                          k_stride=problem.k_stride, v_stride=problem.v_stride,
                                          o_stride=problem.o_stride, lse_stride=problem.lse_stride,
                                          block_m=tile[0], block_n=tile[1])
        return TritonLaunch(backend, problem, config, args, constexprs)

    def run_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                 config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
        return run_cuda_host(self, q, k, v, causal=causal, dtype=dtype, config=config, backend=backend)


FAMILY = TritonFamily()
