"""Family "mma": the FA2-style mma.sync kernel shaders/cuda/flash_fwd_mma.cu (sm_80+).

Tiles are :class:`~attnproto.ops.configs.FlashConfig` (BLOCK_R x BLOCK_C x WARPS x STAGES);
their legality mirrors the kernel's ``static_assert`` s (``FlashConfig.is_legal``). Every
Prototype 7 variant (:mod:`attnproto.ops.variants`) at every head dim the family takes: the
variant constants join the tile constants, the cos/sin tables and ALiBi slopes are the
kernel's last three arguments.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from .. import configs as _cfg
from .. import variants as _variants
from ..problem import CUDA, DeviceSpec, FlashProblem, PreparedLaunch, ProblemSpec, Rules, flash_params
from .base import Family, Spec, unique
from .cuda_host import run_cuda_host

# CUDA grid limits of the y (heads) and z (batch) dimensions of this kernel's grid.
MAX_GRID_YZ = 65535
# mma.sync.m16n8k16 with bf16 and cp.async need compute capability 8.0.
MIN_COMPUTE = (8, 0)
# The kernels move 16-byte chunks (cp.async, ldmatrix rows, 16-byte stores).
ALIGN_BYTES = _cfg.CHUNK_BYTES


class MmaFamily(Family):
    name = "mma"
    backend = "cuda"
    label = "mma.sync + cp.async (FA2-style), sm_80+"
    kernel_name = _cfg.KERNEL_NAME
    rules = Rules(location=CUDA, dtypes=tuple(_cfg.DTYPE_CODES), head_dim_multiple=_cfg.MMA_K,
                  head_dim_range=(_cfg.MMA_K, _cfg.MAX_HEAD_DIM), base_align_bytes=ALIGN_BYTES,
                  stride_align_bytes=ALIGN_BYTES, out_align_bytes=ALIGN_BYTES,
                  out_stride_align_bytes=ALIGN_BYTES, min_compute=MIN_COMPUTE, arch_prefix="sm_")
    #: Head dims the contract tests and the sanitizer exercise (an odd one where the family takes it).
    test_head_dims = (64, 80, 128, 256)
    config_keys = ("block_r", "block_c", "warps", "stages")
    #: Every Prototype 7 variant, at every head dim (all are multiples of 16, so RoPE's pairs are
    #: whole 16-byte chunks in both row layouts): soft cap / ALiBi between score and mask, the
    #: window as a mask with skipped key tiles, RoPE in shared memory (include/fa_mma.cuh).
    variant_features = frozenset(_variants.FEATURES)

    def extra_support(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[bool, str]:
        if spec.num_heads > MAX_GRID_YZ:
            return False, f"q: {spec.num_heads} heads exceed the grid limit {MAX_GRID_YZ} (mma)"
        if spec.batch > MAX_GRID_YZ:
            return False, f"q: batch {spec.batch} exceeds the grid limit {MAX_GRID_YZ} (mma)"
        return True, ""

    @staticmethod
    def _smem(device: DeviceSpec) -> int:
        return device.smem_limit or _cfg.SMEM_LIMIT_SM90

    def sweep_space(self, head_dim: int, causal: bool, dtype: str, device: DeviceSpec) -> List[Any]:
        return _cfg.sweep_space(head_dim, causal, dtype, self._smem(device))

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        entry, cfg = _cfg.default_entry(spec.head_dim, spec.seq_q, spec.causal, spec.dtype, self._smem(device))
        return cfg, entry.reason

    def config_for(self, spec: ProblemSpec, values: Dict[str, Any], device: DeviceSpec) -> Any:
        cfg = _cfg.FlashConfig(spec.head_dim, int(values["block_r"]), int(values["block_c"]),
                               int(values["warps"]), int(values["stages"]), spec.causal, spec.dtype)
        ok, why = cfg.is_legal(self._smem(device))
        if not ok:
            raise ValueError(f"config: {cfg.label()} is illegal: {why}")
        return cfg

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        if not isinstance(config, _cfg.FlashConfig):
            raise TypeError(f"config: expected a FlashConfig for kernel 'mma', got {type(config).__name__}")
        for field, want in (("head_dim", spec.head_dim), ("causal", spec.causal), ("dtype", spec.dtype)):
            if getattr(config, field) != want:
                raise ValueError(f"config: {field} {getattr(config, field)!r} does not match the inputs ({want!r})")
        ok, why = config.is_legal(self._smem(device))
        if not ok:
            raise ValueError(f"config: {config.label()} is illegal: {why}")
        return config

    def config_label(self, config: Any) -> str:
        return f"mma {config.block_r}x{config.block_c} w{config.warps} s{config.stages}"

    def constants(self, config: Any, spec: ProblemSpec) -> Dict[str, int]:
        return config.constants(spec.variant)

    def shared_bytes(self, config: Any, spec: ProblemSpec) -> int:
        return config.smem_bytes()

    def specialisations(self) -> List[Spec]:
        """The default tiles and every table entry at sm_90 and sm_80 limits, both dtypes and
        masks (CI compiles each), plus the bf16 sweep (what proto1 launches), plus every
        :data:`~attnproto.ops.variants.VARIANT_SPECIALISATIONS` variant at the default tiles of
        each tabulated head dim and of a padded-row one (causal bf16, long sequences)."""
        from .. import chooser  # noqa: PLC0415  (the measured table names tiles too)

        out: List[Spec] = list(_cfg.all_specialisations())
        for d in _cfg.SUPPORTED_HEAD_DIMS:
            for causal in (False, True):
                out += [(self.kernel_name, c.constants())
                        for c in _cfg.sweep_space(d, causal, chooser.SWEEP_DTYPE, _cfg.SMEM_LIMIT_SM90)]
        out += chooser.table_specialisations(self)
        out += variant_specialisations()
        return unique(out)

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> PreparedLaunch:
        s = problem.shape
        kern = backend.kernel(self.kernel_name, **config.constants(problem.variant))
        args = [flash_params(problem), problem.q, problem.k, problem.v, problem.out, problem.lse,
                *_variants.buffer_args(problem.values)]
        return PreparedLaunch(backend, kern, config.grid(s.batch, s.num_heads, s.seq_q), (config.threads, 1, 1),
                              args, config.smem_bytes(), problem, config, family=self.name)

    def run_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                 config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
        return run_cuda_host(self, q, k, v, causal=causal, dtype=dtype, config=config, backend=backend)


#: Head dims the variant specialisations compile at: the tabulated ones (XOR-swizzled rows) and
#: one whose rows are padded (80: RoPE's chunk pairs in the other layout).
VARIANT_HEAD_DIMS = _cfg.SUPPORTED_HEAD_DIMS + (80,)
#: The query length their default tiles are chosen for (past the short-sequence entries).
VARIANT_SEQ_LEN = 2 * _cfg.SHORT_SEQ


def variant_specialisations() -> List[Spec]:
    """(kernel, constants) of every shared variant at the default tiles of each
    :data:`VARIANT_HEAD_DIMS` head dim, causal bf16 (Llama's and Gemma's setting)."""
    out: List[Spec] = []
    for d in VARIANT_HEAD_DIMS:
        cfg = _cfg.default_entry(d, VARIANT_SEQ_LEN, True, "bfloat16")[1]
        out += [(_cfg.KERNEL_NAME, cfg.constants(v)) for v in _variants.VARIANT_SPECIALISATIONS]
    return out


FAMILY = MmaFamily()
