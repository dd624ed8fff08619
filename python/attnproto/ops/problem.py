"""What every flash-attention kernel family shares: the problem, the one input check,
the device description and the launch objects.

* :class:`ProblemSpec` — the shape, dtype and mask of a call, without tensors: what a
  chooser needs (``attnproto explain-kernel`` builds one from flags).
* :class:`DeviceSpec` — the backend, architecture and limits a family is chosen for.
* :func:`check_flash_inputs` — the one input check (shape, dtype, device, strides),
  run once per call; it returns a :class:`FlashProblem`. Each family's own rules
  (dtypes, head dims, alignment) are data (:class:`Rules`) evaluated by the family's
  ``supports()``.
* :class:`PreparedLaunch` (a CUDA kernel launch) and :class:`HostLaunch` (a call that
  runs on the host or through a host-array API such as the Metal op): both have
  ``launch()``, ``time()`` (a :class:`attnproto.lab.TimingStats`), ``family``,
  ``config`` and ``reason``.

torch is imported only where CUDA tensors already exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .. import lab as _lab
from .. import params as _params
from .. import validate as _v
from . import variants as _variants

__all__ = [
    "AUTO",
    "DeviceSpec",
    "FlashProblem",
    "HostLaunch",
    "PreparedLaunch",
    "ProblemSpec",
    "Rules",
    "check_flash_inputs",
    "flash_params",
]

#: The kernel name of the default call: the chooser picks family and tiles (also the record kernel
#: of that call in the Prototype 1 sweep).
AUTO = "auto"
#: Locations of the tensors of a call: CUDA device memory, or host arrays (numpy, torch CPU/MPS).
CUDA, HOST = "cuda", "host"
#: dtypes any family takes; each family narrows this in its Rules.
FRONT_DOOR_DTYPES: Tuple[str, ...] = ("float16", "bfloat16", "float32")
LSE_DTYPE = "float32"
LSE_ELEM_BYTES = 4
# The kernels index tokens with 32-bit ints (row + tile offsets stay below 2^31).
MAX_SEQ_LEN = 2**30


@dataclass(frozen=True)
class ProblemSpec:
    """Shape, dtype and mask of one forward call (Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D])."""

    batch: int
    num_heads: int
    num_kv_heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: str
    causal: bool
    #: The compile-time variant (RoPE, ALiBi, window, softcap); the base kernel by default.
    variant: _variants.Variant = _variants.BASE

    @classmethod
    def from_shape(cls, shape: _v.AttentionShape, causal: bool,
                   variant: _variants.Variant = _variants.BASE) -> "ProblemSpec":
        return cls(shape.batch, shape.num_heads, shape.num_kv_heads, shape.seq_q, shape.seq_kv,
                   shape.head_dim, shape.dtype, bool(causal), variant)


@dataclass(frozen=True)
class DeviceSpec:
    """The device a family is chosen for. ``arch``: "sm_90" (CUDA compute capability),
    "apple9" (Metal GPU family) or "cpu"; ``smem_limit``: per-block shared memory in bytes."""

    backend: str
    arch: str
    name: str = ""
    smem_limit: int = 0
    compute: Tuple[int, int] = (0, 0)

    @classmethod
    def from_backend(cls, backend: Any) -> "DeviceSpec":
        """The DeviceSpec of a GpuBackend (its info dict) or of the CPU (``backend`` None or "cpu")."""
        if backend is None or backend == "cpu":
            return cls("cpu", "cpu", "cpu")
        info = dict(backend.info)
        name = str(info.get("name") or info.get("device_name") or backend.name)
        if backend.name == "cuda":
            major, minor = int(info.get("compute_major", 0)), int(info.get("compute_minor", 0))
            return cls("cuda", f"sm_{major}{minor}", name,
                       int(info.get("shared_mem_per_block_optin") or 0), (major, minor))
        return cls(backend.name, str(info.get("arch") or backend.name), name,
                   int(info.get("shared_mem_per_block_optin") or 0))

    @classmethod
    def for_arch(cls, arch: str) -> "DeviceSpec":
        """A CUDA device of ``arch`` ("sm_90", "sm_90a", "sm_80") with that arch's shared-memory limit."""
        from .configs import SMEM_OPTIN_LIMIT_BY_ARCH  # noqa: PLC0415

        text = str(arch).lower().rstrip("a")
        if not text.startswith("sm_") or not text[3:].isdigit() or len(text) < 5:
            raise ValueError(f"arch: expected e.g. 'sm_90' or 'sm_80', got {arch!r}")
        cc = int(text[3:])
        limit = SMEM_OPTIN_LIMIT_BY_ARCH.get(cc)
        if limit is None:
            raise ValueError(f"arch: {arch!r} has no known shared-memory limit; known: "
                             f"{', '.join(f'sm_{c}' for c in sorted(SMEM_OPTIN_LIMIT_BY_ARCH))}")
        return cls("cuda", f"sm_{cc}", f"any sm_{cc} device", limit, (cc // 10, cc % 10))


@dataclass(frozen=True)
class Rules:
    """A family's input rules, as data (``supports()`` evaluates them, naming the argument).

    ``head_dims``: the head dims allowed, or None with ``head_dim_multiple`` and
    ``head_dim_range`` describing them. Alignments are in bytes: of the base address
    of Q/K/V/out, and of every stride but the last axis (extent > 1) of Q/K/V/out.
    """

    location: str
    dtypes: Tuple[str, ...]
    head_dims: Optional[Tuple[int, ...]] = None
    head_dim_multiple: int = 1
    head_dim_range: Tuple[int, int] = (1, 1 << 30)
    base_align_bytes: int = 1
    stride_align_bytes: int = 1
    out_align_bytes: int = 1
    out_stride_align_bytes: int = 1
    positive_strides: bool = False      # TMA cannot step a broadcast (stride 0) axis
    min_compute: Tuple[int, int] = (0, 0)
    arch_prefix: str = ""                # "sm_" for CUDA families; "" accepts any arch of the backend

    def head_dim_text(self) -> str:
        if self.head_dims is not None:
            return "one of " + ", ".join(map(str, self.head_dims))
        lo, hi = self.head_dim_range
        return f"a multiple of {self.head_dim_multiple} in [{lo}, {hi}]"

    def head_dim_ok(self, d: int) -> bool:
        if self.head_dims is not None:
            return d in self.head_dims
        lo, hi = self.head_dim_range
        return d % self.head_dim_multiple == 0 and lo <= d <= hi


@dataclass(frozen=True)
class FlashProblem:
    """Checked inputs and outputs of one forward call; strides in elements."""

    q: Any
    k: Any
    v: Any
    out: Any
    lse: Any
    shape: _v.AttentionShape
    causal: bool
    scale: float
    q_stride: Tuple[int, int, int]
    k_stride: Tuple[int, int, int]
    v_stride: Tuple[int, int, int]
    o_stride: Tuple[int, int, int]
    lse_stride: Tuple[int, int]
    location: str = CUDA
    infos: Dict[str, _v.TensorInfo] = field(default_factory=dict, compare=False, repr=False)
    variant: _variants.Variant = _variants.BASE
    values: _variants.VariantValues = field(default_factory=_variants.VariantValues, compare=False, repr=False)

    @property
    def spec(self) -> ProblemSpec:
        return ProblemSpec.from_shape(self.shape, self.causal, self.variant)

    def pointer(self, name: str) -> int:
        """Device address of q/k/v/out/lse (CUDA problems only)."""
        return int(getattr(self, name).data_ptr())


def _check_same_device(x: Any, name: str, ref: Any) -> None:
    if getattr(x, "device", None) != getattr(ref, "device", None):
        raise ValueError(f"{name}: on {getattr(x, 'device', 'the host')}, q is on "
                         f"{getattr(ref, 'device', 'the host')}")


def _location(q: Any) -> str:
    return HOST if _v.is_host(q) or _v.tensor_info(q, "q").device != "cuda" else CUDA


def _v_first_tensor(q: Any) -> Any:
    """``q`` once it is known to be an array or tensor (TypeError naming q otherwise)."""
    _v.tensor_info(q, "q")
    return q


def check_flash_inputs(q: Any, k: Any, v: Any, *, causal: bool = False,
                       scale: Optional[float] = None, out: Any = None,
                       lse: Any = None, **variant: Any) -> FlashProblem:
    """The one input check of the flash front door; allocates missing CUDA outputs.

    ``variant``: the keywords of :func:`attnproto.ops.variants.check_variant` (rope, rope_theta,
    rope_offset, rope_table, alibi, alibi_max_bias, window, softcap); any other name is a
    TypeError.

    TypeError for a non-tensor, a dtype no family takes or mixed dtypes; ValueError for
    rank, shape, head count (Hq % Hkv), head_dim mismatch, device, stride, a
    non-positive scale or a sequence too long for 32-bit indexing; each message names
    the argument. Family-specific rules (dtype subset, head dims, alignment, arch) are
    checked by the family's ``supports()``.
    """
    unknown = sorted(set(variant) - set(_variants.KEYWORDS))
    if unknown:
        raise TypeError(f"{unknown[0]}: not an argument of the flash front door (variant arguments: "
                        f"{', '.join(_variants.KEYWORDS)})")
    location = _location(_v_first_tensor(q))
    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=FRONT_DOOR_DTYPES,
                                      contiguous_last_dim=location == CUDA)
    var, values = _variants.check_variant(q, shape, location, **variant)
    scale = _v.check_scale(scale, shape.head_dim)
    if scale <= 0.0:
        raise ValueError(f"scale: must be positive (the kernels keep the running max of unscaled "
                         f"scores), got {scale}")
    for n, name in ((shape.seq_q, "q"), (shape.seq_kv, "k")):
        if n >= MAX_SEQ_LEN:
            raise ValueError(f"{name}: sequence length {n} exceeds {MAX_SEQ_LEN - 1}")
    infos = {name: _v.tensor_info(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))}
    for name, info in infos.items():
        if any(s < 0 for s in info.strides):
            raise ValueError(f"{name}: negative strides {info.strides} are not supported")
    o_shape = (shape.batch, shape.num_heads, shape.seq_q, shape.head_dim)
    lse_shape = o_shape[:3]
    if location == CUDA:
        _check_same_device(k, "k", q)
        _check_same_device(v, "v", q)
        import torch  # noqa: PLC0415  (only where CUDA tensors exist)

        if out is None:
            out = torch.empty(o_shape, dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
        o_info = _v.check_output(out, "out", shape=o_shape, allowed_dtypes=(shape.dtype,), device="cuda")
        lse_info = _v.check_output(lse, "lse", shape=lse_shape, allowed_dtypes=(LSE_DTYPE,), device="cuda")
        _check_same_device(out, "out", q)
        _check_same_device(lse, "lse", q)
        if lse.data_ptr() % LSE_ELEM_BYTES:
            raise ValueError(f"lse: data pointer {lse.data_ptr():#x} is not {LSE_ELEM_BYTES}-byte aligned")
        o_strides, lse_strides = o_info.strides[:3], lse_info.strides[:2]
        infos.update(out=o_info, lse=lse_info)
    else:
        # Host families return new arrays; given outputs are checked here and filled after the call.
        o_strides = tuple(int(np.prod(o_shape[i + 1:])) for i in range(3))
        lse_strides = (shape.num_heads * shape.seq_q, shape.seq_q)
        if out is not None:
            infos["out"] = _v.check_output(out, "out", shape=o_shape, allowed_dtypes=(shape.dtype, "float32"),
                                           contiguous_last_dim=False)
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out: host calls write into numpy arrays, got {type(out).__name__}")
        if lse is not None:
            infos["lse"] = _v.check_output(lse, "lse", shape=lse_shape, allowed_dtypes=(LSE_DTYPE,),
                                           contiguous_last_dim=False)
            if not isinstance(lse, np.ndarray):
                raise TypeError(f"lse: host calls write into numpy arrays, got {type(lse).__name__}")
    return FlashProblem(q, k, v, out, lse, shape, bool(causal), scale, infos["q"].strides[:3],
                        infos["k"].strides[:3], infos["v"].strides[:3], tuple(o_strides), tuple(lse_strides),
                        location, infos, var, values)


def flash_params(problem: FlashProblem):
    """The AttentionParams block of a checked problem."""
    s = problem.shape
    return _params.make_params(
        batch=s.batch, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, seq_q=s.seq_q,
        seq_kv=s.seq_kv, head_dim=s.head_dim, scale=problem.scale, q_stride=problem.q_stride,
        k_stride=problem.k_stride, v_stride=problem.v_stride, o_stride=problem.o_stride,
        lse_stride=problem.lse_stride, **problem.values.params())


@dataclass
class PreparedLaunch:
    """One CUDA kernel launch; ``launch()`` runs it (asynchronously), ``time()`` times it."""

    backend: Any
    kernel: Any
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    args: list
    shared_bytes: int
    problem: FlashProblem
    config: Any
    family: str = ""
    reason: str = ""

    def launch(self, stream: int = 0) -> Tuple[Any, Any]:
        """Enqueue on ``stream`` (a CUstream handle; 0: the backend's legacy default stream)."""
        self.backend.launch(self.kernel, grid=self.grid, block=self.block, args=self.args,
                            shared_bytes=self.shared_bytes, stream=stream)
        return self.problem.out, self.problem.lse

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False,
             min_warmup_ms: float = _lab.WARMUP_MS) -> _lab.TimingStats:
        """Event timing of ``iters`` launches after ``warmup`` launches and at least ``min_warmup_ms``
        of them (attnproto.lab.WARMUP_MS: the clocks come up before the first timed launch)."""
        def run(warm: int, n: int):
            return self.backend.time_launch(self.kernel, self.grid, self.block, self.args,
                                            shared_bytes=self.shared_bytes, warmup=warm, iters=n, flush_l2=flush_l2)
        if min_warmup_ms > 0:
            warmup = _lab.warmup_count(run(1, _lab.ESTIMATE_ITERS).median_ms, warmup, min_warmup_ms)
        return _lab.from_native(run(warmup, iters))

    @property
    def resources(self) -> Dict[str, Any]:
        return dict(self.kernel.resources)


@dataclass
class HostLaunch:
    """A call whose inputs and outputs are host arrays (the CPU family, the Metal op).

    ``run()`` computes and returns (O, LSE) as host arrays; ``time_fn(warmup, iters)``, when
    given, times on the device clock (Metal GPU timestamps); otherwise the wall clock is used.
    """

    run: Callable[[], Tuple[Any, Any]]
    problem: FlashProblem
    config: Any
    family: str = ""
    reason: str = ""
    time_fn: Optional[Callable[[int, int], Any]] = None
    resources: Dict[str, Any] = field(default_factory=dict)
    shared_bytes: int = 0

    def launch(self) -> Tuple[Any, Any]:
        o, lse = self.run()
        p = self.problem
        if p.out is not None:
            np.copyto(p.out, np.asarray(o, dtype=p.out.dtype))
            o = p.out
        if p.lse is not None:
            np.copyto(p.lse, np.asarray(lse, dtype=p.lse.dtype))
            lse = p.lse
        return o, lse

    def time(self, warmup: int = 2, iters: int = 10, flush_l2: bool = False) -> _lab.TimingStats:
        del flush_l2  # host arrays: no device cache between calls to flush
        if self.time_fn is not None:
            return _lab.from_native(self.time_fn(warmup, iters))
        return _lab.time_host(self.run, warmup=warmup, iters=iters)
