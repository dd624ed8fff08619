"""Chunked causal linear attention on CUDA: host side of linear_chunk_h / linear_chunk_o.

Math (per batch and head; scale s; optional per-head decay gamma in (0, 1],
RetNet-style, a constant per head):

    S_t = gamma S_{t-1} + k_t^T v_t,    o_t = s q_t S_t = s sum_{j<=t} gamma^(t-j) (q_t . k_j) v_j

Two launches (shaders/cuda/linear_chunk_h.cu, linear_chunk_o.cu; math and
fragment layouts in shaders/cuda/include/linear.cuh):

* ``linear_chunk_h``: the state before every chunk, H_c = S_{cC-1}, kept in
  FP32 registers across the whole sequence and written once per chunk in the
  element type (the operand type chunk_o's tensor cores read; FP32 inputs keep
  FP32 states). Grid (state tiles, batch * heads), sequential over chunks.
* ``linear_chunk_o``: O_c = s (diag(gamma^(i+1)) Q_c H_c + (causal(Q_c K_c^T) * gamma^(i-j)) V_c),
  all chunks in parallel.

Every product runs on tensor cores: mma.sync m16n8k16 for float16/bfloat16;
for float32, m16n8k8 tf32 in the 3xTF32 split (hi + lo operands, three MMAs)
so that FP32 inputs keep FP32 accuracy.

FLOPs counted for the chunked algorithm (:func:`linear_attention_flops`), per
(batch, head), chunk c of length L_c (the last may be short), C = chunk size,
D = head dim (= value dim):

* chunk_h, every chunk but the last: K_c^T V_c = 2 C D^2, plus the prefix
  update H += ... = D^2 (additions; the decay scaling of H is not counted);
* chunk_o, every chunk: Q_c H_c = 2 L_c D^2 (not for c = 0, where H_0 = 0 is
  skipped), Q_c K_c^T and P V_c each the CAUSAL HALF including the diagonal,
  L_c (L_c + 1) / 2 * 2 D = L_c (L_c + 1) D.

So for N a multiple of C, about 4 N D^2 + N D^2 / C + 2 N (C + 1) D per head. The kernels
round the causal half up to whole 16 x 8 MMA tiles; that extra work is not
counted (it is not the algorithm's).

Bytes counted (:func:`linear_attention_bytes`): what the two passes must move
through device memory at the least: chunk_h reads K and V of the full chunks
and writes NC states (D^2 each); chunk_o reads Q, K, V, the states of chunks
1.. and writes O.

Nothing here needs a GPU until a launch; :func:`linear_specialisations` and
the config functions run anywhere (CI compiles every listed specialisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import validate as _v

__all__ = [
    "KERNEL_H",
    "KERNEL_O",
    "DTYPE_CODES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_CHUNKS",
    "LinearConfig",
    "LinearPlan",
    "choose_config",
    "check_inputs",
    "linear_attention",
    "plan_linear_attention",
    "time_linear_attention",
    "linear_attention_flops",
    "linear_attention_bytes",
    "gflops",
    "linear_specialisations",
    "specialisations",
]

KERNEL_H = "linear_chunk_h"
KERNEL_O = "linear_chunk_o"

# DTYPE named constant (shaders/cuda/include/linear.cuh: kF16, kBF16, kF32).
DTYPE_CODES: Dict[str, int] = {"float16": 0, "bfloat16": 1, "float32": 2}
SUPPORTED_DTYPES: Tuple[str, ...] = tuple(DTYPE_CODES)
ELEM_BYTES: Dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
# The kernels' static_asserts: 64-row state tiles and 16-row warp tiles.
SUPPORTED_HEAD_DIMS: Tuple[int, ...] = (64, 128)
SUPPORTED_CHUNKS: Tuple[int, ...] = (32, 64, 128, 256)

# ---- linear_chunk_h geometry (mirrors linear_chunk_h.cu) ----
H_WARPS = 4
H_THREADS = H_WARPS * 32
H_BLOCK_DK = H_WARPS * 16
H_MAX_TILE_T = 64
H_STAGES = 3
# State-tile widths the kernel accepts, widest first (fewest K re-reads).
H_BLOCK_DV_CHOICES: Tuple[int, ...] = (64, 32, 16)
# chunk_h is sequential over chunks, so its only parallelism is
# (state tiles x batch x heads): narrow the tile until there are at least this
# many blocks per SM (two keeps every SM busy while one block waits on loads).
H_MIN_BLOCKS_PER_SM = 2

# ---- linear_chunk_o geometry (mirrors linear_chunk_o.cu) ----
O_MAX_BLOCK_Q = 64          # four warps of 16 query rows
O_ROWS_PER_WARP = 16
# A second K/V stage only pays off with two resident blocks per SM; if the
# doubled ring would leave one block per SM, the single-stage kernel is used.
O_TARGET_BLOCKS_PER_SM = 2

# Shared-memory row padding in elements (linear.cuh kPad16, kPad32Row, kPad32Col).
PAD_16 = 8
PAD_32_ROW = 8
PAD_32_COL = 4

# Hopper: 227 KB per block after opt-in, 228 KB per SM.
SMEM_OPTIN_LIMIT = 227 * 1024
SMEM_PER_SM = 228 * 1024
# Default SM count for configs chosen without a device (H100 SXM).
DEFAULT_SM_COUNT = 132

# Every cp.async / 16-byte access needs this alignment of base pointers and rows.
VEC_BYTES = 16
FLOPS_PER_MAC = 2


def _pad_row(dtype: str) -> int:
    return PAD_32_ROW if dtype == "float32" else PAD_16


def _pad_col(dtype: str) -> int:
    return PAD_32_COL if dtype == "float32" else PAD_16


@dataclass(frozen=True)
class LinearConfig:
    """One (chunk_h, chunk_o) specialisation pair."""

    dtype: str
    head_dim: int
    chunk: int
    block_dv: int
    block_q: int
    stages: int
    has_decay: bool

    @property
    def tile_t(self) -> int:
        return min(self.chunk, H_MAX_TILE_T)

    @property
    def h_threads(self) -> int:
        return H_THREADS

    @property
    def o_threads(self) -> int:
        return (self.block_q // O_ROWS_PER_WARP) * 32

    def h_smem_bytes(self) -> int:
        eb = ELEM_BYTES[self.dtype]
        t = self.tile_t
        stage = t * (H_BLOCK_DK + _pad_col(self.dtype)) + t * (self.block_dv + _pad_col(self.dtype))
        return H_STAGES * stage * eb + (t * 4 if self.has_decay else 0)

    def o_smem_bytes(self, stages: Optional[int] = None) -> int:
        stages = self.stages if stages is None else stages
        eb = ELEM_BYTES[self.dtype]
        ldq = self.head_dim + _pad_row(self.dtype)
        ldh = self.head_dim + _pad_col(self.dtype)
        q_elems = self.block_q * ldq
        h_elems = self.head_dim * ldh
        stage = self.block_q * ldq + self.block_q * ldh
        return (q_elems + h_elems + stages * stage) * eb

    def problems(self) -> List[str]:
        """Why this combination is illegal (mirrors the kernels' static_asserts); empty if legal."""
        out = []
        if self.dtype not in DTYPE_CODES:
            out.append(f"dtype {self.dtype!r} not in {SUPPORTED_DTYPES}")
            return out
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            out.append(f"head_dim {self.head_dim} not in {SUPPORTED_HEAD_DIMS}")
        if self.chunk not in SUPPORTED_CHUNKS:
            out.append(f"chunk {self.chunk} not in {SUPPORTED_CHUNKS}")
        if self.block_dv not in H_BLOCK_DV_CHOICES or self.head_dim % self.block_dv:
            out.append(f"block_dv {self.block_dv} must be one of {H_BLOCK_DV_CHOICES} and divide head_dim")
        if self.block_q not in (32, O_MAX_BLOCK_Q) or self.chunk % self.block_q:
            out.append(f"block_q {self.block_q} must be 32 or 64 and divide chunk {self.chunk}")
        if self.stages not in (1, 2):
            out.append(f"stages {self.stages} must be 1 or 2")
        if not out:
            if self.h_smem_bytes() > SMEM_OPTIN_LIMIT:
                out.append(f"chunk_h shared memory {self.h_smem_bytes()} B over {SMEM_OPTIN_LIMIT} B")
            if self.o_smem_bytes() > SMEM_OPTIN_LIMIT:
                out.append(f"chunk_o shared memory {self.o_smem_bytes()} B over {SMEM_OPTIN_LIMIT} B")
        return out

    def h_constants(self) -> Dict[str, int]:
        return {"DTYPE": DTYPE_CODES[self.dtype], "HEAD_DIM": self.head_dim, "CHUNK": self.chunk,
                "BLOCK_DV": self.block_dv, "HAS_DECAY": int(self.has_decay)}

    def o_constants(self) -> Dict[str, int]:
        return {"DTYPE": DTYPE_CODES[self.dtype], "HEAD_DIM": self.head_dim, "CHUNK": self.chunk,
                "BLOCK_Q": self.block_q, "STAGES": self.stages, "HAS_DECAY": int(self.has_decay)}


def choose_config(dtype: str, head_dim: int, chunk: int, has_decay: bool, *,
                  num_state_heads: int, sm_count: int = DEFAULT_SM_COUNT) -> LinearConfig:
    """The specialisation pair used for a problem (see the H_/O_ constants for the reasons)."""
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype: {dtype} not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim: {head_dim} not supported; the kernels take {SUPPORTED_HEAD_DIMS}")
    if chunk not in SUPPORTED_CHUNKS:
        raise ValueError(f"chunk_size: {chunk} not supported; expected one of {SUPPORTED_CHUNKS}")
    want_blocks = H_MIN_BLOCKS_PER_SM * sm_count
    block_dv = H_BLOCK_DV_CHOICES[-1]
    for dv in H_BLOCK_DV_CHOICES:
        if (head_dim // H_BLOCK_DK) * (head_dim // dv) * num_state_heads >= want_blocks:
            block_dv = dv
            break
    block_q = min(chunk, O_MAX_BLOCK_Q)
    single = LinearConfig(dtype, head_dim, chunk, block_dv, block_q, 1, bool(has_decay))
    double = LinearConfig(dtype, head_dim, chunk, block_dv, block_q, 2, bool(has_decay))
    use_double = (chunk > block_q and not double.problems()
                  and O_TARGET_BLOCKS_PER_SM * double.o_smem_bytes() <= SMEM_PER_SM)
    cfg = double if use_double else single
    bad = cfg.problems()
    if bad:
        raise ValueError(f"no legal linear-attention config for {dtype} D={head_dim} C={chunk}: {'; '.join(bad)}")
    return cfg


def linear_specialisations() -> List[Tuple[str, Dict[str, int]]]:
    """Every (kernel, constants) the project launches: chunk_h at each state-tile
    width the chooser can pick, chunk_o as chosen, for every dtype, head dim,
    chunk and decay switch."""
    out: List[Tuple[str, Dict[str, int]]] = []
    seen = set()

    def add(name: str, consts: Dict[str, int]) -> None:
        key = (name, tuple(sorted(consts.items())))
        if key not in seen:
            seen.add(key)
            out.append((name, consts))

    for dtype in SUPPORTED_DTYPES:
        for d in SUPPORTED_HEAD_DIMS:
            for c in SUPPORTED_CHUNKS:
                for decay in (False, True):
                    cfg = choose_config(dtype, d, c, decay, num_state_heads=1)
                    for dv in H_BLOCK_DV_CHOICES:
                        if d % dv == 0:
                            h_cfg = LinearConfig(dtype, d, c, dv, cfg.block_q, cfg.stages, decay)
                            add(KERNEL_H, h_cfg.h_constants())
                    add(KERNEL_O, cfg.o_constants())
    return out


#: The name attnproto.kernels looks for.
specialisations = linear_specialisations


# ------------------------------------------------------------------ cost model
def _chunk_lengths(seq_len: int, chunk: int) -> List[int]:
    return [min(chunk, seq_len - s) for s in range(0, seq_len, chunk)]


def linear_attention_flops(batch: int, num_heads: int, seq_len: int, head_dim: int, chunk: int) -> int:
    """FLOPs of the chunked algorithm (module docstring: causal half counted)."""
    for name, val in (("batch", batch), ("num_heads", num_heads), ("seq_len", seq_len),
                      ("head_dim", head_dim), ("chunk", chunk)):
        _v.check_positive_int(val, name)
    d = head_dim
    lengths = _chunk_lengths(seq_len, chunk)
    per_head = 0
    for c, length in enumerate(lengths):
        if c < len(lengths) - 1:
            per_head += FLOPS_PER_MAC * chunk * d * d + d * d       # K^T V + prefix add
        if c > 0:
            per_head += FLOPS_PER_MAC * length * d * d              # Q H
        per_head += 2 * length * (length + 1) * d                   # causal Q K^T and P V
    return batch * num_heads * per_head


def linear_attention_bytes(batch: int, num_heads: int, seq_len: int, head_dim: int, chunk: int,
                           dtype: str) -> int:
    """Least device-memory bytes of the two-pass algorithm (module docstring)."""
    if dtype not in ELEM_BYTES:
        raise TypeError(f"dtype: {dtype} not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    eb = ELEM_BYTES[dtype]
    d = head_dim
    num_chunks = -(-seq_len // chunk)
    full_tokens = (num_chunks - 1) * chunk
    state = d * d * eb
    h_pass = 2 * full_tokens * d * eb + num_chunks * state
    o_pass = 4 * seq_len * d * eb + (num_chunks - 1) * state
    return batch * num_heads * (h_pass + o_pass)


# ------------------------------------------------------------------ validation
@dataclass(frozen=True)
class _Problem:
    batch: int
    num_heads: int
    seq_len: int
    head_dim: int
    dtype: str
    chunk: int
    scale: float
    gamma: Optional[np.ndarray]


def _data_ptr(x: Any, name: str) -> int:
    """Device address of a torch CUDA tensor or a __cuda_array_interface__ object."""
    if hasattr(x, "data_ptr"):
        return int(x.data_ptr())
    interface = getattr(x, "__cuda_array_interface__", None)
    if isinstance(interface, dict) and "data" in interface:
        return int(interface["data"][0])
    raise TypeError(f"{name}: expected a CUDA tensor (torch or __cuda_array_interface__), got {type(x).__name__}")


def _check_alignment(x: Any, info: Any, dtype: str) -> None:
    vec = VEC_BYTES // ELEM_BYTES[dtype]
    ptr = _data_ptr(x, info.name)
    if ptr % VEC_BYTES:
        raise ValueError(f"{info.name}: data pointer must be {VEC_BYTES}-byte aligned for the kernels' "
                         f"16-byte loads (got address % {VEC_BYTES} = {ptr % VEC_BYTES})")
    for axis, s in zip(("batch", "head", "token"), info.strides[:3]):
        if s % vec:
            raise ValueError(f"{info.name}: {axis} stride {s} must be a multiple of {vec} elements "
                             f"({VEC_BYTES} bytes) for 16-byte loads; pass a contiguous tensor")


def check_inputs(q: Any, k: Any, v: Any, *, chunk_size: Any, scale: Any = 1.0, decay: Any = None) -> _Problem:
    """Validate CUDA q, k, v [B, H, N, D] and the options; TypeError/ValueError naming the argument.

    Accepts torch CUDA tensors and __cuda_array_interface__ objects (so the
    checks run without torch or a GPU); launches need torch tensors.
    """
    shape, gamma = _v.check_linear_attention_inputs(q, k, v, allowed_dtypes=SUPPORTED_DTYPES,
                                                    decay=decay, device="cuda")
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size: expected an int, got {type(chunk_size).__name__}")
    if int(chunk_size) not in SUPPORTED_CHUNKS:
        raise ValueError(f"chunk_size: {chunk_size} not supported; expected one of {SUPPORTED_CHUNKS}")
    if shape.value_dim != shape.key_dim:
        raise ValueError(f"v: head dim {shape.value_dim} must equal the q/k head dim {shape.key_dim}")
    if shape.key_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {shape.key_dim} not supported; the kernels take {SUPPORTED_HEAD_DIMS}")
    if scale is None:
        raise TypeError("scale: expected a float (linear attention has no implicit 1/sqrt(D))")
    scale = _v.check_scale(scale, shape.key_dim)
    devices = {str(x.device) for x in (q, k, v) if hasattr(x, "device")}
    if len(devices) > 1:
        raise ValueError(f"q, k, v: must be on one device, got {sorted(devices)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_alignment(x, _v.tensor_info(x, name), shape.dtype)
    return _Problem(shape.batch, shape.num_heads, shape.seq_len, shape.key_dim, shape.dtype,
                    int(chunk_size), scale, gamma)


# ------------------------------------------------------------------ launches
class LinearPlan:
    """Kernels, grids and arguments of one linear-attention call; run() or time() it."""

    def __init__(self, q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                 decay: Any = None, backend: Any = None, out: Any = None) -> None:
        import torch  # noqa: PLC0415

        from .. import backend as _backend  # noqa: PLC0415
        from .. import params as _params  # noqa: PLC0415

        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch CUDA tensor, got {type(x).__name__}")
        prob = check_inputs(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay)
        self.problem = prob
        self.be = backend if backend is not None else _backend.get("cuda")
        sm_count = int(self.be.info.get("multiprocessors", DEFAULT_SM_COUNT) or DEFAULT_SM_COUNT)
        self.config = choose_config(prob.dtype, prob.head_dim, prob.chunk, prob.gamma is not None,
                                    num_state_heads=prob.batch * prob.num_heads, sm_count=sm_count)
        cfg = self.config
        b, h, n, d = prob.batch, prob.num_heads, prob.seq_len, prob.head_dim
        num_chunks = -(-n // prob.chunk)
        if out is None:
            out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
        else:
            oi = _v.check_output(out, "out", shape=(b, h, n, d), allowed_dtypes=(prob.dtype,), device="cuda")
            _check_alignment(out, oi, prob.dtype)
        self.out = out
        self.states = torch.empty((b, h, num_chunks, d, d), dtype=q.dtype, device=q.device)
        log2_gamma = np.zeros(h) if prob.gamma is None else np.log2(prob.gamma)
        self.log2_decay = torch.tensor(log2_gamma, dtype=torch.float32, device=q.device)
        self.params = _params.make_params(
            batch=b, num_heads=h, num_kv_heads=h, seq_q=n, seq_kv=n, head_dim=d, scale=prob.scale,
            q_stride=tuple(q.stride()[:3]), k_stride=tuple(k.stride()[:3]), v_stride=tuple(v.stride()[:3]),
            o_stride=tuple(out.stride()[:3]), chunk_size=prob.chunk)
        self.kernel_h = self.be.kernel(KERNEL_H, **cfg.h_constants())
        self.kernel_o = self.be.kernel(KERNEL_O, **cfg.o_constants())
        self.grid_h = ((d // H_BLOCK_DK) * (d // cfg.block_dv), b * h, 1)
        self.grid_o = (-(-n // cfg.block_q), b * h, 1)
        self.args_h = [self.params, k, v, self.states, self.log2_decay]
        self.args_o = [self.params, q, k, v, self.states, out, self.log2_decay]
        self._keep = (q, k, v)

    def launch_h(self) -> None:
        self.be.launch(self.kernel_h, self.grid_h, (self.config.h_threads, 1, 1), self.args_h,
                       self.config.h_smem_bytes())

    def launch_o(self) -> None:
        self.be.launch(self.kernel_o, self.grid_o, (self.config.o_threads, 1, 1), self.args_o,
                       self.config.o_smem_bytes())

    def run(self) -> Any:
        self.launch_h()
        self.launch_o()
        return self.out

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False) -> Dict[str, Any]:
        """Device-side timings: the pair back to back ("total", both launched from C++ with no
        Python between them) and each kernel alone."""
        total = self.be.time_sequence(
            [(self.kernel_h, self.grid_h, (self.config.h_threads, 1, 1), self.args_h, self.config.h_smem_bytes()),
             (self.kernel_o, self.grid_o, (self.config.o_threads, 1, 1), self.args_o, self.config.o_smem_bytes())],
            warmup=warmup, iters=iters, flush_l2=flush_l2)
        h = self.be.time_launch(self.kernel_h, self.grid_h, (self.config.h_threads, 1, 1), self.args_h,
                                self.config.h_smem_bytes(), warmup=warmup, iters=iters, flush_l2=flush_l2)
        o = self.be.time_launch(self.kernel_o, self.grid_o, (self.config.o_threads, 1, 1), self.args_o,
                                self.config.o_smem_bytes(), warmup=warmup, iters=iters, flush_l2=flush_l2)
        return {"total": total, "chunk_h": h, "chunk_o": o}


def plan_linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                          decay: Any = None, backend: Any = None, out: Any = None) -> LinearPlan:
    return LinearPlan(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay, backend=backend, out=out)


def linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                     decay: Any = None) -> Any:
    """Chunked causal linear attention on torch CUDA tensors q, k, v [B, H, N, D].

    dtype float16, bfloat16 or float32 (all three alike); D in SUPPORTED_HEAD_DIMS;
    chunk_size in SUPPORTED_CHUNKS (N need not be a multiple); ``scale``
    multiplies q.k (no implicit 1/sqrt(D)); ``decay``: None, a float, or one
    gamma in (0, 1] per head. Returns O [B, H, N, D] in the input dtype.
    """
    return LinearPlan(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay).run()


def time_linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                          decay: Any = None, warmup: int = 4, iters: int = 50) -> Dict[str, Any]:
    """Timing helper: {"total", "chunk_h", "chunk_o"} TimingStats (device events)."""
    return LinearPlan(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay).time(warmup=warmup, iters=iters)


def gflops(flops: int, ms: float) -> float:
    """Throughput in GFLOP/s of `flops` done in `ms` milliseconds."""
    if not ms > 0 or not math.isfinite(ms):
        raise ValueError(f"ms: {ms} must be a positive finite time")
    return flops / (ms * 1e-3) / 1e9
