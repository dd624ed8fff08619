"""The kernel-family interface: one object per family, listed in
:data:`attnproto.ops.families.FAMILIES`.

A family knows

* ``name`` (what ``kernel=`` takes), ``backend`` ("cuda", "metal", "cpu"), ``label``;
* ``rules`` — its input rules as data (:class:`~attnproto.ops.problem.Rules`), which
  :meth:`Family.supports` evaluates, naming the argument that breaks one;
* its configurations — :meth:`sweep_space` (what the Prototype 1 sweep measures),
  :meth:`default_config` (its tiles when no measured entry applies, with the reason),
  :meth:`config_from_dict` / :meth:`config_dict` / :meth:`config_label` (the measured
  table and the records store configs as dicts);
* :meth:`specialisations` — every (kernel name, constants) it may launch, for the
  precompile, the CI compile and the sanitizer;
* :meth:`prepare` — a launch of a checked problem with a config;
* :meth:`run_host` — one call on host arrays with NaN-poisoned outputs, for the FP64
  gate of :func:`attnproto.lab.fp64_gate`.

Which family and tiles ``kernel="auto"`` picks is :mod:`attnproto.ops.chooser`'s job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Sequence, Tuple

import numpy as np

from ..problem import CUDA, DeviceSpec, FlashProblem, ProblemSpec, Rules

Spec = Tuple[str, Dict[str, int]]

#: The front-door argument behind each variant feature (what a refusal names).
_FEATURE_ARGUMENT = {"rope_half": "rope", "rope_interleaved": "rope", "rope_table": "rope_table",
                     "rope_computed": "rope_table", "alibi_standard": "alibi", "alibi_slopes": "alibi",
                     "window": "window", "softcap": "softcap"}


@dataclass(frozen=True)
class Tile:
    """A BLOCK_R x BLOCK_C tile: the whole config of the host families (cpu, metal)."""

    block_r: int
    block_c: int


def as_tile(config: Any, family: str) -> Tile:
    """A caller's Tile or (block_r, block_c) pair, checked (TypeError/ValueError naming config)."""
    if isinstance(config, tuple) and len(config) == 2:
        config = Tile(*config)
    if not isinstance(config, Tile):
        raise TypeError(f"config: expected a Tile or (block_r, block_c) for kernel '{family}', "
                        f"got {type(config).__name__}")
    for value, name in ((config.block_r, "config.block_r"), (config.block_c, "config.block_c")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must be a positive int, got {value!r}")
    return config


class FamilyUnsupported(ValueError):
    """The family cannot run this problem on this device; the message says why."""


class FamilyDtypeUnsupported(TypeError):
    """The family does not take the inputs' dtype (a TypeError, like every dtype error)."""


def unsupported_error(reason: str) -> Exception:
    """The exception for a refusal reason: TypeError for a dtype, ValueError otherwise."""
    return (FamilyDtypeUnsupported if DTYPE_REFUSAL in reason else FamilyUnsupported)(reason)


#: The words of a dtype refusal (:func:`unsupported_error` maps it to TypeError).
DTYPE_REFUSAL = ": dtype "


class Family:
    """Base class: subclasses set the class attributes and implement the config hooks."""

    name: str = ""
    backend: str = ""
    label: str = ""
    kernel_name: str = ""
    rules: Rules
    #: Head dims the contract tests and the sanitizer exercise.
    test_head_dims: Tuple[int, ...] = ()
    #: Record/table keys of one config (besides "kernel" and "family").
    config_keys: Tuple[str, ...] = ()
    #: The DSL whose compiler generates this family's kernel ("" for the project's hand-written
    #: kernels). DSL families compile through their DSL (no NVRTC specialisations, no benchmark
    #: binary) and stay out of ``kernel="auto"`` and the Prototype 1 sweep: Prototype 5 measures them.
    dsl: str = ""
    #: The variant features (attnproto.ops.variants.FEATURES) the family's kernels take; a call
    #: asking for another is refused naming its argument.
    variant_features: FrozenSet[str] = frozenset()

    # ------------------------------------------------------------ support
    def variant_support(self, spec: ProblemSpec) -> Tuple[bool, str]:
        """(True, "") or (False, reason naming the variant argument) for ``spec.variant``."""
        for feature in spec.variant.features():
            if feature not in self.variant_features:
                arg = _FEATURE_ARGUMENT.get(feature, feature)
                takes = ", ".join(sorted(self.variant_features)) or "no variant"
                return False, f"{arg}: variant '{feature}' is not supported by {self.name} (it takes {takes})"
        return True, ""

    def supports_spec(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[bool, str]:
        """(True, "") or (False, reason) for a problem described without tensors."""
        r = self.rules
        if device.backend != self.backend:
            return False, f"{self.name} runs on the {self.backend} backend, not {device.backend}"
        if r.arch_prefix and not device.arch.startswith(r.arch_prefix):
            return False, f"{self.name} needs a {r.arch_prefix}* device, not {device.arch}"
        if tuple(device.compute) < tuple(r.min_compute):
            return False, (f"{self.name} needs compute capability {r.min_compute[0]}.{r.min_compute[1]} or "
                           f"newer; the device is {device.compute[0]}.{device.compute[1]} ({device.arch})")
        if spec.dtype not in r.dtypes:
            return False, f"q: dtype {spec.dtype} not supported by {self.name} (expected {', '.join(r.dtypes)})"
        if not r.head_dim_ok(spec.head_dim):
            return False, f"q: head_dim {spec.head_dim} not supported by {self.name} (expected {r.head_dim_text()})"
        ok, why = self.variant_support(spec)
        if not ok:
            return ok, why
        return self.extra_support(spec, device)

    def extra_support(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[bool, str]:
        """Family-specific limits beyond :attr:`rules` (grid sizes, ...)."""
        return True, ""

    def supports(self, problem: FlashProblem, device: DeviceSpec) -> Tuple[bool, str]:
        """:meth:`supports_spec` plus the rules on the tensors themselves (location, alignment)."""
        r = self.rules
        if problem.location != r.location:
            where = "CUDA tensors" if r.location == CUDA else "host arrays (numpy, torch CPU/MPS)"
            return False, f"q: {self.name} takes {where}"
        ok, why = self.supports_spec(problem.spec, device)
        if not ok:
            return ok, why
        if problem.location == CUDA:
            elem = int(problem.q.element_size())
            for name in ("q", "k", "v", "out"):
                base, stride = ((r.base_align_bytes, r.stride_align_bytes) if name != "out"
                                else (r.out_align_bytes, r.out_stride_align_bytes))
                info = problem.infos[name]
                if problem.pointer(name) % base:
                    return False, f"{name}: data pointer {problem.pointer(name):#x} is not {base}-byte aligned ({self.name})"
                for axis, (extent, s) in enumerate(zip(info.shape[:-1], info.strides[:-1])):
                    if extent > 1 and (s * elem) % stride:
                        return False, (f"{name}: stride {s} of axis {axis} is not a multiple of {stride // elem} "
                                       f"elements ({stride}-byte alignment; {self.name})")
                    if r.positive_strides and name != "out" and extent > 1 and s <= 0:
                        return False, f"{name}: stride {s} of axis {axis} must be positive ({self.name}: TMA)"
        return True, ""

    def check(self, problem: FlashProblem, device: DeviceSpec) -> None:
        """Raise the reason when unsupported: :class:`FamilyDtypeUnsupported` (a TypeError) for the
        dtype, :class:`FamilyUnsupported` (a ValueError) otherwise."""
        ok, why = self.supports(problem, device)
        if not ok:
            raise unsupported_error(why)

    # ------------------------------------------------------------ configs (subclass hooks)
    def sweep_space(self, head_dim: int, causal: bool, dtype: str, device: DeviceSpec) -> List[Any]:
        raise NotImplementedError

    def default_config(self, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
        raise NotImplementedError

    def config_for(self, spec: ProblemSpec, values: Dict[str, Any], device: DeviceSpec) -> Any:
        """A config of this family for ``spec`` from a table/record dict; ValueError when illegal."""
        raise NotImplementedError

    def coerce_config(self, config: Any, spec: ProblemSpec, device: DeviceSpec) -> Any:
        """A caller's ``config=`` argument checked against the problem (TypeError/ValueError naming it)."""
        raise NotImplementedError

    def config_dict(self, config: Any) -> Dict[str, Any]:
        return {key: getattr(config, key) for key in self.config_keys}

    def config_label(self, config: Any) -> str:
        raise NotImplementedError

    def constants(self, config: Any, spec: ProblemSpec) -> Dict[str, int]:
        """The named constants (KernelKey) of ``config`` for ``spec``; host families have none."""
        return {}

    def shared_bytes(self, config: Any, spec: ProblemSpec) -> int:
        """Dynamic shared memory of one launch of ``config`` (0 for host families)."""
        return 0

    def specialisations(self) -> List[Spec]:
        return []

    def prepare(self, problem: FlashProblem, config: Any, backend: Any) -> Any:
        raise NotImplementedError

    def run_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                 config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name} ({self.backend}): {self.label}>"


def unique(specs: Sequence[Spec]) -> List[Spec]:
    """Specialisations without repeats, order kept."""
    seen, out = set(), []
    for name, consts in specs:
        key = (name, tuple(sorted(consts.items())))
        if key not in seen:
            seen.add(key)
            out.append((name, dict(consts)))
    return out
