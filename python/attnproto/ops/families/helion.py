"""Family "helion": the Prototype 1 forward written in Helion (:mod:`attnproto.ops.helion_flash`),
which Helion compiles to Triton; Prototype 5 compares it with the Triton family and ours.

Same tiles and rules as the Triton family (:mod:`.triton`); :data:`AUTOTUNE` lets Helion
benchmark the tile list (not its full search, minutes per shape). A DSL family: never chosen
by ``kernel="auto"``. helion is imported only when the family is used; an import that fails
(a torch or triton it does not support) is the refusal's reason.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from ... import lab as _lab
from .. import dsl_tiles as _tiles
from ..problem import DeviceSpec, FlashProblem, ProblemSpec
from .triton import AUTOTUNE, HEAD_DIMS, Autotune, TritonFamily, triton_missing

__all__ = ["AUTOTUNE", "FAMILY", "HEAD_DIMS", "HelionFamily", "helion_missing"]


@functools.lru_cache(maxsize=None)
def _import_error() -> str:
    if importlib.util.find_spec("helion") is None:
        return "helion is not installed (pip install helion; the device takes its wheel from .whl/)"
    try:
        import helion  # noqa: F401,PLC0415
    except Exception as exc:  # noqa: BLE001 - an incompatible torch/triton is a reason, not a crash
        return f"helion does not import here: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def helion_missing() -> str:
    """Why Helion cannot be used here ("" when it can)."""
    return triton_missing() or _import_error()


def _kernels():
    from .. import helion_flash  # noqa: PLC0415  (imports helion)

    return helion_flash


@dataclass
class HelionLaunch:
    """One call of the Helion kernel on checked CUDA tensors: ``launch()``, ``time()`` (the lab
    timer on the backend's stream, ordered with torch's default stream Helion launches on)."""

    backend: Any
    problem: FlashProblem
    config: Any
    kernel: Any
    family: str = "helion"
    reason: str = ""
    launched: bool = field(default=False, repr=False)

    def launch(self) -> Tuple[Any, Any]:
        p = self.problem
        _kernels().run(self.kernel, p.q, p.k, p.v, p.out, p.lse, p.scale, p.causal)
        self.launched = True
        return p.out, p.lse

    def tuned_config(self) -> Any:
        """The tile that ran: the fixed config, or the one Helion chose among the list (after a launch)."""
        if not isinstance(self.config, Autotune):
            return self.config
        p = self.problem
        bound = self.kernel.bind((p.q, p.k, p.v, p.out, p.lse, p.scale, p.causal))
        chosen = getattr(bound, "_config", None)  # Helion keeps the benchmarked winner here
        if chosen is None:
            return self.config  # not launched yet: nothing was chosen
        block_m, block_n = chosen.block_sizes
        return _tiles.TritonConfig(int(block_m), int(block_n), int(chosen.num_warps), int(chosen.num_stages))

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False,
             min_warmup_ms: float = _lab.WARMUP_MS) -> _lab.TimingStats:
        if not self.launched:
            self.launch()  # compile (and choose the tile) before timing
        return _lab.time_device(self.backend, self.launch, warmup=warmup, iters=iters, flush_l2=flush_l2,
                                min_warmup_ms=min_warmup_ms)

    @property
    def resources(self) -> Dict[str, Any]:
        """Helion does not expose the compiled kernel's registers; Prototype 5 reads them from the cubin."""
        return {}


class HelionFamily(TritonFamily):
    name = "helion"
    label = "Helion: torch code over hl.tile tiles, compiled to Triton (then wgmma on Hopper)"
    kernel_name = "attention"
    dsl = "helion"
    autotune_config = AUTOTUNE

    def extra_support(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[bool, str]:
        missing = helion_missing()
        if missing:
            return False, f"{self.name}: {missing}"
        return super().extra_support(spec, device)

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        cfg = _tiles.default_config(spec.head_dim)
        return cfg, (f"fixed tile {self.config_label(cfg)} (config=families.helion.AUTOTUNE lets Helion "
                     f"benchmark {len(self._space(spec.head_dim, self._smem(device)))} tiles)")

    def config_label(self, config: Any) -> str:
        if isinstance(config, Autotune):
            return "helion autotune"
        return f"helion {config.block_m}x{config.block_n} w{config.warps} s{config.stages}"

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        if not isinstance(config, (Autotune, _tiles.TritonConfig)):
            raise TypeError(f"config: expected a TritonConfig or families.helion.AUTOTUNE for kernel 'helion', "
                            f"got {type(config).__name__}")
        return self._check(config, spec.head_dim, self._smem(device))

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> HelionLaunch:
        hf = _kernels()
        if isinstance(config, Autotune):
            kernel = hf.tuned_kernel(tuple(self._space(problem.shape.head_dim, _tiles.SMEM_LIMIT_SM90)))
        else:
            kernel = hf.fixed_kernel(config)
        return HelionLaunch(backend, problem, config, kernel)


FAMILY = HelionFamily()
