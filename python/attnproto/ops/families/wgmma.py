"""Family "wgmma": the FA3-style Hopper kernel shaders/cuda/flash_fwd_wgmma.cu (sm_90a:
TMA loads into an mbarrier ring, a producer warpgroup, consumer warpgroups issuing wgmma).

Host code (configs, legality, TMA maps) lives in :mod:`attnproto.ops.flash_wgmma`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from .. import flash_wgmma as _fw
from .. import variants as _variants
from ..problem import CUDA, DeviceSpec, FlashProblem, ProblemSpec, Rules
from .base import Family, Spec, unique
from .cuda_host import run_cuda_host

# wgmma, setmaxnreg and the tensor-map copies need sm_90a (Hopper).
MIN_COMPUTE = (9, 0)
# The kernel stores two output elements at once: 4-byte address and strides of O.
OUT_ALIGN_BYTES = 2 * _fw.ELEMENT_BYTES
# RoPE variants at D <= 128 give the consumer warpgroups 224 registers instead of 240 (the rope
# warps take the rest, flash_fwd_wgmma.cu): key tiles wider than this spill the consumers (ptxas -v,
# NVRTC 13.0: 40-540 bytes at 128 x 176), so the chooser skips measured tiles above it for them.
ROPE_MAX_BLOCK_C = 128
ROPE_NARROW_HEAD_DIM = 128


class WgmmaFamily(Family):
    name = "wgmma"
    backend = "cuda"
    label = "wgmma + TMA, producer/consumer warpgroups (FA3-style), sm_90a"
    kernel_name = _fw.KERNEL_NAME
    rules = Rules(location=CUDA, dtypes=tuple(_fw.DTYPE_CODES), head_dims=_fw.HEAD_DIMS,
                  base_align_bytes=_fw.TMA_ALIGN_BYTES, stride_align_bytes=_fw.TMA_ALIGN_BYTES,
                  out_align_bytes=OUT_ALIGN_BYTES, out_stride_align_bytes=OUT_ALIGN_BYTES,
                  positive_strides=True, min_compute=MIN_COMPUTE, arch_prefix="sm_")
    #: Head dims the contract tests and the sanitizer exercise (an odd one where the family takes it).
    test_head_dims = _fw.HEAD_DIMS
    config_keys = ("block_r", "block_c", "consumer_wg", "stages")
    #: Every Prototype 7 variant: soft cap / ALiBi in the softmax step, the window as a mask with
    #: skipped key blocks, RoPE by the producer warpgroup's rope warps (flash_fwd_wgmma.cu).
    variant_features = frozenset(_variants.FEATURES)

    def extra_support(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[bool, str]:
        if device.compute[0] != MIN_COMPUTE[0]:
            # sm_90a code runs only on compute capability 9.0 (the "a" features are not forward-compatible).
            return False, f"wgmma needs an sm_90 device (sm_90a code), not {device.arch}"
        rows = _fw.ROWS_PER_CONSUMER
        if -(-spec.seq_q // rows) * spec.batch * spec.num_heads > _fw.MAX_GRID_X:
            return False, f"q: the grid of {spec.batch} x {spec.num_heads} x ceil(Nq/{rows}) CTAs exceeds {_fw.MAX_GRID_X}"
        return True, ""

    def sweep_space(self, head_dim: int, causal: bool, dtype: str, device: DeviceSpec) -> List[Any]:
        return _fw.sweep_space(head_dim)

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        cfg = _fw.default_config(spec.head_dim, spec.causal)
        return cfg, (f"default tiles: FlashAttention-3's published H100 "
                     f"choice for D={spec.head_dim}")

    def config_for(self, spec: ProblemSpec, values: Dict[str, Any], device: DeviceSpec) -> Any:
        cfg = _fw.WgmmaConfig(block_c=int(values["block_c"]), stages=int(values["stages"]),
                              consumer_wg=int(values["consumer_wg"]))
        _fw._check_config(cfg, spec.head_dim)
        if (spec.variant.rope is not None and spec.head_dim <= ROPE_NARROW_HEAD_DIM
                and cfg.block_c > ROPE_MAX_BLOCK_C):
            raise ValueError(f"config.block_c: {cfg.block_c} spills the consumers of a RoPE variant "
                             f"(at most {ROPE_MAX_BLOCK_C} at D <= {ROPE_NARROW_HEAD_DIM})")
        return cfg

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        return _fw.as_config(config, spec.head_dim, spec.causal)

    def config_label(self, config: Any) -> str:
        return f"wgmma {config.block_r}x{config.block_c} wg{config.consumer_wg} s{config.stages}"

    def constants(self, config: Any, spec: ProblemSpec) -> Dict[str, int]:
        return _fw.constants(config, spec.head_dim, spec.causal, spec.dtype, _fw.CONTIGUOUS, spec.variant)

    def shared_bytes(self, config: Any, spec: ProblemSpec) -> int:
        return _fw.shared_bytes(config, spec.head_dim, spec.variant)

    def specialisations(self) -> List[Spec]:
        """FA3's defaults for both dtypes and masks, the bf16 sweep, the measured table's tiles,
        paged prefill (every block size at the default tiles, both dtypes and masks) and the
        Prototype 7 variants (variants.VARIANT_SPECIALISATIONS at the default tiles, bf16, both masks)."""
        from .. import chooser  # noqa: PLC0415

        out: List[Spec] = []
        for causal in (False, True):
            for d in _fw.HEAD_DIMS:
                for dtype in _fw.DTYPE_CODES:
                    out.append((self.kernel_name, _fw.constants(_fw.default_config(d, causal), d, causal, dtype)))
                out += [(self.kernel_name, _fw.constants(c, d, causal, chooser.SWEEP_DTYPE))
                        for c in _fw.sweep_space(d)]
        out += chooser.table_specialisations(self)
        out += paged_specialisations()
        out += [(self.kernel_name, _fw.constants(_fw.default_config(d, causal), d, causal, chooser.SWEEP_DTYPE,
                                                 _fw.CONTIGUOUS, var))
                for var in _variants.VARIANT_SPECIALISATIONS for d in _fw.HEAD_DIMS for causal in (False, True)]
        return unique(out)

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> Any:
        return _fw.prepare(problem, config, backend)

    def run_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                 config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
        return run_cuda_host(self, q, k, v, causal=causal, dtype=dtype, config=config, backend=backend)


def paged_specialisations() -> List[Spec]:
    """Paged prefill (attnproto.ops.paged_prefill_wgmma): block size x head dim x mask x dtype
    at the default tiles; and its variants (paged_prefill_wgmma.VARIANT_SPECIALISATIONS) causal, bf16,
    at block size 16 and D = 128, the last (every feature at once) also at block sizes 1 and 128, D = 64."""
    from .. import chooser, paged_prefill_wgmma as _pp  # noqa: PLC0415

    out = [(_fw.KERNEL_NAME, _fw.constants(_fw.default_config(d, causal), d, causal, dtype, page))
           for page in _pp.PAGE_SIZES for d in _fw.HEAD_DIMS for causal in (False, True)
           for dtype in _fw.DTYPE_CODES]
    points = [(16, 128, var) for var in _pp.VARIANT_SPECIALISATIONS]
    points += [(page, 64, _pp.VARIANT_SPECIALISATIONS[-1]) for page in (1, 128)]
    out += [(_fw.KERNEL_NAME, _fw.constants(_fw.default_config(d, True), d, True, chooser.SWEEP_DTYPE, page, var))
            for page, d, var in points]
    return out


FAMILY = WgmmaFamily()
