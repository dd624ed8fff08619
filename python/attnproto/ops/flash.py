"""Flash Attention forward on CUDA: ``flash_forward`` and ``time_flash_forward``.

Kernel families plug in through :data:`KERNELS` (``register_kernel``): each
entry turns checked inputs into a :class:`PreparedLaunch` (kernel, grid, block,
arguments, shared memory), which ``flash_forward`` launches and
``time_flash_forward`` times. The input checks (:func:`check_flash_inputs`),
output allocation and AttentionParams (:func:`flash_params`) are shared by every
family; "mma" (shaders/cuda/flash_fwd_mma.cu, tiles from
:mod:`attnproto.ops.configs`) is registered here.

Tensors are torch CUDA tensors (anything with ``data_ptr()`` that the backend
takes through ``__dlpack__``): Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D] in
float16 or bfloat16, head_dim contiguous, any other non-negative strides that
are multiples of 8 elements (16 bytes: the kernels copy 16-byte chunks).
Returns O like Q and LSE float32 [B, Hq, Nq] (natural log; -inf, with an O row
of 0, for a query that sees no key under the bottom-right aligned causal mask).

torch is imported only inside the functions that allocate outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from .. import params as _params
from .. import validate as _v
from . import configs as _cfg

__all__ = [
    "FlashProblem",
    "PreparedLaunch",
    "prepare_forward",
    "KERNELS",
    "register_kernel",
    "check_flash_inputs",
    "flash_params",
    "resolve_mma_config",
    "prepare_mma",
    "flash_forward",
    "time_flash_forward",
    "attention_flops",
]

FLASH_DTYPES: Tuple[str, ...] = ("float16", "bfloat16")
# The kernels move 16-byte chunks: base addresses and strides (batch, head, token)
# must be multiples of this many bytes.
ALIGN_BYTES = 16
ELEM_BYTES = 2
LSE_ELEM_BYTES = 4
# CUDA grid limits of the y (heads) and z (batch) dimensions.
MAX_GRID_YZ = 65535
# The kernels index tokens with 32-bit ints (row + tile offsets stay below 2^31).
MAX_SEQ_LEN = 2**30
# mma.sync.m16n8k16 with bf16 and cp.async need compute capability 8.0.
MIN_COMPUTE_MAJOR = 8


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


@dataclass
class PreparedLaunch:
    """Everything one kernel launch needs; ``launch()`` runs it, ``time()`` times it."""

    backend: Any
    kernel: Any
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    args: list
    shared_bytes: int
    problem: FlashProblem
    config: Any

    def launch(self) -> Tuple[Any, Any]:
        self.backend.launch(self.kernel, grid=self.grid, block=self.block, args=self.args,
                            shared_bytes=self.shared_bytes)
        return self.problem.out, self.problem.lse

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False):
        return self.backend.time_launch(self.kernel, self.grid, self.block, self.args,
                                        shared_bytes=self.shared_bytes, warmup=warmup, iters=iters,
                                        flush_l2=flush_l2)


# prepare(problem, config, backend) -> PreparedLaunch
PrepareFn = Callable[[FlashProblem, Any, Any], PreparedLaunch]
KERNELS: Dict[str, PrepareFn] = {}


def register_kernel(name: str, prepare: PrepareFn) -> None:
    """Make ``flash_forward(..., kernel=name)`` use ``prepare`` (e.g. "wgmma")."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if not callable(prepare):
        raise TypeError(f"prepare: expected a callable, got {type(prepare).__name__}")
    KERNELS[name] = prepare


# --------------------------------------------------------------------------- checks
def _check_alignment(x: Any, info: _v.TensorInfo, elem_bytes: int, align: int) -> None:
    """Base address and the strides of every axis but the last (of extent > 1) aligned."""
    if x.data_ptr() % align:
        raise ValueError(f"{info.name}: data pointer {x.data_ptr():#x} is not {align}-byte aligned")
    for axis, (extent, stride) in enumerate(zip(info.shape[:-1], info.strides[:-1])):
        if extent > 1 and (stride * elem_bytes) % align:
            raise ValueError(f"{info.name}: stride {stride} of axis {axis} is not a multiple of "
                             f"{align // elem_bytes} elements ({align} bytes)")


def _check_same_device(x: Any, name: str, ref: Any) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: on {x.device}, q is on {ref.device}")


def check_flash_inputs(q: Any, k: Any, v: Any, *, causal: bool = False,
                       scale: Optional[float] = None, out: Any = None,
                       lse: Any = None) -> FlashProblem:
    """Check Q/K/V (and the optional outputs), allocate missing outputs.

    TypeError for a non-tensor, a dtype other than float16/bfloat16 or mixed
    dtypes; ValueError for rank, shape, head count (Hq % Hkv), head_dim (a
    multiple of 16 up to 256), device, stride or alignment problems, a
    non-positive scale, or sizes beyond the grid; each message names the argument.
    """
    shape = _v.check_attention_inputs(q, k, v, causal=causal, allowed_dtypes=FLASH_DTYPES,
                                      device="cuda")
    d = shape.head_dim
    if d % _cfg.MMA_K or not _cfg.MMA_K <= d <= _cfg.MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {d} not supported; expected a multiple of {_cfg.MMA_K} "
                         f"in [{_cfg.MMA_K}, {_cfg.MAX_HEAD_DIM}]")
    scale = _v.check_scale(scale, d)
    if scale <= 0.0:
        raise ValueError(f"scale: must be positive (the kernels keep the running max of "
                         f"unscaled scores), got {scale}")
    if shape.num_heads > MAX_GRID_YZ:
        raise ValueError(f"q: {shape.num_heads} heads exceed the grid limit {MAX_GRID_YZ}")
    if shape.batch > MAX_GRID_YZ:
        raise ValueError(f"q: batch {shape.batch} exceeds the grid limit {MAX_GRID_YZ}")
    for n, name in ((shape.seq_q, "q"), (shape.seq_kv, "k")):
        if n >= MAX_SEQ_LEN:
            raise ValueError(f"{name}: sequence length {n} exceeds {MAX_SEQ_LEN - 1}")
    infos = {}
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        infos[name] = _v.tensor_info(x, name)
        _check_alignment(x, infos[name], ELEM_BYTES, ALIGN_BYTES)
    _check_same_device(k, "k", q)
    _check_same_device(v, "v", q)

    import torch  # noqa: PLC0415  (only where CUDA tensors exist)

    o_shape = (shape.batch, shape.num_heads, shape.seq_q, d)
    lse_shape = o_shape[:3]
    if out is None:
        out = torch.empty(o_shape, dtype=q.dtype, device=q.device)
    o_info = _v.check_output(out, "out", shape=o_shape, allowed_dtypes=(shape.dtype,), device="cuda")
    _check_same_device(out, "out", q)
    _check_alignment(out, o_info, ELEM_BYTES, ALIGN_BYTES)
    if lse is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    lse_info = _v.check_output(lse, "lse", shape=lse_shape, allowed_dtypes=("float32",),
                               device="cuda")
    _check_same_device(lse, "lse", q)
    if lse.data_ptr() % LSE_ELEM_BYTES:
        raise ValueError(f"lse: data pointer {lse.data_ptr():#x} is not {LSE_ELEM_BYTES}-byte aligned")
    return FlashProblem(q, k, v, out, lse, shape, bool(causal), scale,
                        infos["q"].strides[:3], infos["k"].strides[:3], infos["v"].strides[:3],
                        o_info.strides[:3], lse_info.strides[:2])


def flash_params(problem: FlashProblem):
    """The AttentionParams block of a checked problem."""
    s = problem.shape
    return _params.make_params(
        batch=s.batch, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, seq_q=s.seq_q,
        seq_kv=s.seq_kv, head_dim=s.head_dim, scale=problem.scale, q_stride=problem.q_stride,
        k_stride=problem.k_stride, v_stride=problem.v_stride, o_stride=problem.o_stride,
        lse_stride=problem.lse_stride)


# ------------------------------------------------------------------------ mma.sync
def _mma_config(config: Any, problem: FlashProblem, smem_limit: int) -> _cfg.FlashConfig:
    s = problem.shape
    if config is None:
        config = _cfg.choose_config(s.head_dim, s.seq_q, problem.causal, s.dtype, smem_limit)
    elif not isinstance(config, _cfg.FlashConfig):
        raise TypeError(f"config: expected a FlashConfig or None, got {type(config).__name__}")
    for field, want in (("head_dim", s.head_dim), ("causal", problem.causal), ("dtype", s.dtype)):
        if getattr(config, field) != want:
            raise ValueError(f"config: {field} {getattr(config, field)!r} does not match the "
                             f"inputs ({want!r})")
    ok, reason = config.is_legal(smem_limit)
    if not ok:
        raise ValueError(f"config: {config.label()} is illegal: {reason}")
    return config


def resolve_mma_config(problem: FlashProblem, config: Any, backend: Any) -> _cfg.FlashConfig:
    """The mma.sync tiles of a launch on ``backend``: ``config`` checked against the problem
    and the device's shared memory, or the chooser's. BackendUnavailable below sm_80."""
    from ..backend import BackendUnavailable  # noqa: PLC0415

    info = backend.info
    if int(info.get("compute_major", 0)) < MIN_COMPUTE_MAJOR:
        raise BackendUnavailable(f"{_cfg.KERNEL_NAME} needs compute capability "
                                 f"{MIN_COMPUTE_MAJOR}.0 or newer, the device is "
                                 f"{info.get('compute_major')}.{info.get('compute_minor')}")
    smem_limit = int(info.get("shared_mem_per_block_optin") or _cfg.SMEM_LIMIT_SM90)
    return _mma_config(config, problem, smem_limit)


def prepare_mma(problem: FlashProblem, config: Any, backend: Any) -> PreparedLaunch:
    """PreparedLaunch of flash_fwd_mma (arguments: params, q, k, v, out, lse)."""
    cfg = resolve_mma_config(problem, config, backend)
    s = problem.shape
    kern = backend.kernel(_cfg.KERNEL_NAME, **cfg.constants())
    args = [flash_params(problem), problem.q, problem.k, problem.v, problem.out, problem.lse]
    return PreparedLaunch(backend, kern, cfg.grid(s.batch, s.num_heads, s.seq_q),
                          (cfg.threads, 1, 1), args, cfg.smem_bytes(), problem, cfg)


register_kernel("mma", prepare_mma)


# ------------------------------------------------------------------------ public API
def _prepare(q, k, v, causal, scale, config, out, lse, backend, kernel) -> PreparedLaunch:
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not registered; available: "
                         f"{', '.join(sorted(KERNELS))}")
    problem = check_flash_inputs(q, k, v, causal=causal, scale=scale, out=out, lse=lse)
    if backend is None:
        from .. import backend as _backend  # noqa: PLC0415

        backend = _backend.get("cuda")
    return KERNELS[kernel](problem, config, backend)


def prepare_forward(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                    config: Any = None, out: Any = None, lse: Any = None, backend: Any = None,
                    kernel: str = "mma") -> PreparedLaunch:
    """Check inputs, allocate outputs, compile: the launch to replay (what benchmarks time)."""
    return _prepare(q, k, v, causal, scale, config, out, lse, backend, kernel)


def flash_forward(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                  config: Any = None, out: Any = None, lse: Any = None, backend: Any = None,
                  kernel: str = "mma") -> Tuple[Any, Any]:
    """softmax(scale Q K^T, masked) V on the GPU; returns (O, LSE).

    ``scale`` defaults to 1/sqrt(D) and must be positive. ``config`` (a
    :class:`~attnproto.ops.configs.FlashConfig` for "mma") defaults to
    :func:`~attnproto.ops.configs.choose_config`. ``out``/``lse`` are written in
    place when given. ``backend`` defaults to ``attnproto.backend.get("cuda")``.
    The launch is asynchronous on the backend's stream (the legacy default stream).
    """
    return _prepare(q, k, v, causal, scale, config, out, lse, backend, kernel).launch()


def time_flash_forward(q: Any, k: Any, v: Any, *, causal: bool = False,
                       scale: Optional[float] = None, config: Any = None, out: Any = None,
                       lse: Any = None, backend: Any = None, kernel: str = "mma",
                       warmup: int = 4, iters: int = 50, flush_l2: bool = False):
    """Device-timed launches of the same call (TimingStats: median_ms, p10_ms, ...)."""
    return _prepare(q, k, v, causal, scale, config, out, lse, backend, kernel).time(
        warmup=warmup, iters=iters, flush_l2=flush_l2)


def attention_flops(batch: int, num_heads: int, seq_q: int, seq_kv: int, head_dim: int,
                    causal: bool) -> int:
    """Matrix FLOPs of the forward pass: 4 D per visible (query, key) pair (Q K^T and P V).

    Causal counts the pairs the bottom-right aligned mask keeps: query i sees
    max(0, i + Nkv - Nq + 1) keys (never more than Nkv).
    """
    if causal:
        offset = seq_kv - seq_q
        first = max(0, -offset)               # first query that sees a key
        rows = max(0, seq_q - first)
        lo = first + offset + 1               # keys of that query; the last sees Nkv
        pairs = (lo + seq_kv) * rows // 2 if rows else 0
    else:
        pairs = seq_q * seq_kv
    return 4 * batch * num_heads * pairs * head_dim


# Kernel families that register themselves in KERNELS (imported last: they import this module).
from . import flash_wgmma  # noqa: E402,F401  (registers "wgmma")
