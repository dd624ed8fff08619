"""The flash-attention front door: ``flash_forward``, ``prepare_forward``, ``time_flash_forward``.

One call for every backend::

    o, lse = flash_forward(q, k, v, causal=True)                  # kernel="auto"
    launch = prepare_forward(q, k, v, causal=True); launch.reason  # what ran, and why
    o, lse = flash_forward(q, k, v, kernel="mma", config=FlashConfig(...))

Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D] (Hq a multiple of Hkv: GQA), the head_dim axis
contiguous. CUDA tensors (torch, or anything with ``data_ptr()`` the backend takes
through ``__dlpack__``) run on the CUDA families; host arrays (numpy, torch CPU/MPS) on
the Metal family where a Metal device is present, else on the CPU family (``backend=
"cpu"`` or ``"metal"`` picks one). Returns O like Q and LSE float32 [B, Hq, Nq]
(natural log). A query row that sees no key under the bottom-right aligned causal
mask gives O = 0, LSE = -inf; a NaN or inf in an input propagates to the rows it
touches (attnproto.ref's NaN policy).

``kernel="auto"`` (the default) asks :mod:`attnproto.ops.chooser` for the family and
tiles measured fastest for the call; ``kernel=NAME`` runs that family of
:data:`attnproto.ops.families.FAMILIES` (its best measured tiles unless ``config`` is
given). Either way the inputs are checked once (:func:`check_flash_inputs`), the
family's ``supports()`` is asked, and the launch carries ``family``, ``config`` and
``reason``. Bad input raises TypeError/ValueError naming the argument.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from .. import lab as _lab
from .. import validate as _v
from . import chooser as _chooser
from . import configs as _cfg
from . import families as _families
from .problem import (
    AUTO,
    CUDA,
    DeviceSpec,
    FlashProblem,
    HostLaunch,
    PreparedLaunch,
    ProblemSpec,
    check_flash_inputs,
    flash_params,
)

__all__ = [
    "AUTO",
    "FlashProblem",
    "PreparedLaunch",
    "HostLaunch",
    "attention_flops",
    "check_flash_inputs",
    "explain",
    "flash_forward",
    "flash_params",
    "prepare_forward",
    "resolve_mma_config",
    "time_flash_forward",
]

#: The one FLOP count (attnproto.lab), re-exported for the op's users.
attention_flops = _lab.attention_flops


def _resolve_backend(problem: FlashProblem, backend: Any) -> Tuple[Any, DeviceSpec]:
    """The backend object (None for the CPU) and its DeviceSpec for a checked problem."""
    from .. import backend as _backend  # noqa: PLC0415  (the native module loads lazily)

    if problem.location == CUDA:
        if backend is None or backend == "cuda":
            backend = _backend.get("cuda")
        elif isinstance(backend, str) or getattr(backend, "name", None) != "cuda":
            raise ValueError(f"backend: CUDA tensors run on the cuda backend, got {getattr(backend, 'name', backend)!r}")
        return backend, DeviceSpec.from_backend(backend)
    if backend == "cuda" or getattr(backend, "name", None) == "cuda":
        where = _v.tensor_info(problem.q, "q").device
        raise ValueError(f"q: expected a tensor on device 'cuda' (backend cuda), got one on '{where}'")
    if backend is None or backend == AUTO:
        backend = "metal" if _metal_available() else "cpu"
    if backend == "cpu":
        return None, DeviceSpec.from_backend(None)
    if backend == "metal":
        backend = _backend.get("metal")
    if getattr(backend, "name", None) not in ("metal",):
        raise ValueError(f"backend: host arrays run on 'metal' or 'cpu', got {getattr(backend, 'name', backend)!r}")
    return backend, DeviceSpec.from_backend(backend)


@functools.lru_cache(maxsize=None)
def _metal_available() -> bool:
    """Whether a Metal device is present (asked once per process: it cannot appear later)."""
    try:
        from .. import backend as _backend  # noqa: PLC0415

        return any(s.name == "metal" and s.available for s in _backend.list_backends())
    except ImportError:
        return False


def _select(problem: FlashProblem, device: DeviceSpec, kernel: Any, config: Any):
    """(family, config, reason) for a call."""
    if not isinstance(kernel, str):
        raise TypeError(f"kernel: expected a family name or 'auto', got {type(kernel).__name__}")
    if kernel == AUTO:
        if config is not None:
            raise ValueError("config: tiles belong to a family; pass kernel=NAME with config "
                             "(kernel='auto' chooses family and tiles)")
        choice = _chooser.choose(problem, device)
        return choice.family, choice.config, choice.reason
    family = _families.get(kernel)
    family.check(problem, device)
    if config is None:
        cfg, reason = _chooser.family_choice(family, problem.spec, device)
        return family, cfg, reason
    return family, family.coerce_config(config, problem.spec, device), f"{family.config_label(config)}: given by the caller"


def prepare_forward(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                    kernel: str = AUTO, config: Any = None, out: Any = None, lse: Any = None,
                    backend: Any = None, **variant: Any):
    """Check inputs once, choose, allocate, compile: the launch to run or replay (what benchmarks time).

    The launch has ``launch()``, ``time(warmup, iters, flush_l2)`` (lab.TimingStats),
    ``family``, ``config`` and ``reason``. ``variant``: rope, rope_theta, rope_offset,
    rope_table, alibi, alibi_max_bias, window, softcap (:mod:`attnproto.ops.variants`).
    """
    problem = check_flash_inputs(q, k, v, causal=causal, scale=scale, out=out, lse=lse, **variant)
    be, device = _resolve_backend(problem, backend)
    family, cfg, reason = _select(problem, device, kernel, config)
    launch = family.prepare(problem, cfg, be)
    launch.family, launch.reason = family.name, reason
    return launch


def flash_forward(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                  kernel: str = AUTO, config: Any = None, out: Any = None, lse: Any = None,
                  backend: Any = None, **variant: Any) -> Tuple[Any, Any]:
    """softmax(scale Q K^T, masked) V; returns (O, LSE). See the module doc.

    ``scale`` defaults to 1/sqrt(D) and must be positive; ``out``/``lse`` are written in
    place when given. CUDA launches are asynchronous on the backend's stream. ``variant``:
    RoPE / ALiBi / sliding window / soft cap keywords (:func:`prepare_forward`).
    """
    return prepare_forward(q, k, v, causal=causal, scale=scale, kernel=kernel, config=config, out=out,
                           lse=lse, backend=backend, **variant).launch()


def time_flash_forward(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                       kernel: str = AUTO, config: Any = None, out: Any = None, lse: Any = None,
                       backend: Any = None, warmup: int = 4, iters: int = 50,
                       flush_l2: bool = False, **variant: Any) -> _lab.TimingStats:
    """Timed launches of the same call (device events on GPUs, wall clock on the CPU)."""
    return prepare_forward(q, k, v, causal=causal, scale=scale, kernel=kernel, config=config, out=out,
                           lse=lse, backend=backend, **variant).time(warmup=warmup, iters=iters,
                                                                     flush_l2=flush_l2)


def explain(spec: ProblemSpec, device: DeviceSpec) -> dict:
    """What ``kernel="auto"`` would run for a problem described without tensors, and why;
    plus every family of the backend with its verdict (``attnproto explain-kernel``)."""
    rows = []
    for fam in _families.for_backend(device.backend):
        ok, why = fam.supports_spec(spec, device)
        row = {"family": fam.name, "supported": ok, "why": why}
        if ok:
            cfg, reason = _chooser.family_choice(fam, spec, device)
            row.update(config=fam.config_label(cfg), reason=reason)
        rows.append(row)
    choice = _chooser.choose(spec, device)
    return {"family": choice.family.name, "config": choice.label, "reason": choice.reason, "families": rows}


def resolve_mma_config(problem: FlashProblem, config: Any, backend: Any) -> _cfg.FlashConfig:
    """The mma.sync tiles of a launch on ``backend`` (Prototype 2 stitches this family's loop):
    ``config`` checked against the problem, or the family's choice. ValueError when the
    family does not support the call (e.g. below sm_80)."""
    family = _families.get("mma")
    device = DeviceSpec.from_backend(backend)
    family.check(problem, device)
    if config is None:
        return _chooser.family_choice(family, problem.spec, device)[0]
    return family.coerce_config(config, problem.spec, device)
