"""Chunked causal linear attention on CUDA: host side of linear_chunk_h / linear_chunk_o.

Math (per batch and head; scale s; optional per-head decay gamma in (0, 1],
RetNet-style, a constant per head):

    S_t = gamma S_{t-1} + k_t^T v_t,    o_t = s q_t S_t = s sum_{j<=t} gamma^(t-j) (q_t . k_j) v_j

Two algorithms (math and fragment layouts in shaders/cuda/include/linear.cuh).
float16/bfloat16 with chunk 32/64/128 run the one-pass kernel by default:

* ``linear_fused`` (shaders/cuda/linear_fused.cu): one block per (value-column
  slice, batch, head) walks the chunks in order with the running state in FP32
  registers; Q, K, V read once, O written once, no states in device memory.

Everything else (float32, chunk 256, or ``algorithm="two_pass"``) runs two
launches (shaders/cuda/linear_chunk_h.cu, linear_chunk_o.cu):

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

Bytes counted (:func:`linear_attention_bytes`): what the algorithm must move
through device memory at the least. Two-pass: chunk_h reads K and V of the full
chunks and writes NC states (D^2 each); chunk_o reads Q, K, V, the states of
chunks 1.. and writes O. Fused: Q, K, V read and O written once.

Nothing here needs a GPU until a launch; :func:`linear_specialisations` and
the config functions run anywhere (CI compiles every listed specialisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import validate as _v
from . import occupancy as _occ

__all__ = [
    "KERNEL_H",
    "KERNEL_O",
    "KERNEL_FUSED",
    "ALGORITHMS",
    "FUSED_CHUNKS",
    "FusedConfig",
    "choose_fused_config",
    "fused_variants",
    "all_fused_variants",
    "fused_segments",
    "device_sm_count",
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
KERNEL_FUSED = "linear_fused"
#: LinearPlan(algorithm=...): "auto" = fused where it exists (16-bit, FUSED_CHUNKS), else two-pass.
ALGORITHMS: Tuple[str, ...] = ("auto", "fused", "two_pass")

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

# ---- linear_fused geometry (mirrors linear_fused.cu) ----
FUSED_DTYPES: Tuple[str, ...] = ("float16", "bfloat16")
FUSED_CHUNKS: Tuple[int, ...] = (32, 64, 128)      # CHUNK / 16 warps of 16 query rows
FUSED_ROWS_PER_WARP = 16
FUSED_BLOCK_DV_CHOICES: Tuple[int, ...] = (128, 64, 32, 16)   # widest first: least Q K^T recomputed
FUSED_STAGE_CHOICES: Tuple[int, ...] = (2, 3, 4)
# STATE_WARPS: 0 = the output warps also update the state, 1 = a second warp group does.
FUSED_STATE_WARPS_CHOICES: Tuple[int, ...] = (0, 1)
# 64K registers per SM / 255 per thread: larger blocks spill (linear_fused.cu kMaxThreads).
FUSED_MAX_THREADS = 256
# The STATE_WARPS the chooser prefers (falls back to 0 where the block would be too large):
# a separate state group measured faster wherever it is legal (tools/linear_probe.py --grid
# on the H100, bfloat16, 4 x 16 heads: D=128 C=64 block_dv 64 0.754 vs 0.897 ms at N=16K,
# 0.200 vs 0.231 ms at 4K; D=64 C=64 block_dv 64, 2 segments, 0.362 vs 0.388 ms at 16K).
# attnproto run proto6 re-times both at every point (finding fused-block-dv-choice).
FUSED_STATE_WARPS = 1
# Chunks in flight: chunk c + 2 loads while c is computed and c + 1 has landed.
FUSED_STAGES = 3
# Accumulator floats per thread the kernel allows (kMaxAccRegs): S, O and the state.
FUSED_MAX_ACC_FLOATS = 160
# The fused kernel's parallelism is (value-column slices x chunk segments x batch x
# heads), each block sequential over its chunks. FUSED_MIN_WAVES = 0.75: measured on the
# H100 (proto6 at commit 877ad34, 4 x 16 heads, N=16K): D=128 C=64, 128 blocks of block_dv
# 64 (0.97 waves) 1.5x faster than 256 blocks of 32; D=64 C=64, 64 blocks of 64 (0.48
# waves) 1.24x slower than 128 of 32. A narrower slice recomputes Q K^T once
# more per slice; a further segment re-walks the chunks before it for the state (K, V
# loads and K^T V, no outputs). The chooser takes the widest slice, then adds segments
# while they fit in the blocks the SMs can keep resident, up to FUSED_MAX_SEGMENTS and
# no shorter than FUSED_MIN_CHUNKS_PER_SEGMENT chunks; it narrows the slice only when
# that grid is still below FUSED_MIN_WAVES waves of one block per SM.
FUSED_MIN_WAVES = 0.75
FUSED_MAX_SEGMENTS = 4
FUSED_MIN_CHUNKS_PER_SEGMENT = 4
# Registers per thread assumed for the resident-block count before compiling: the most
# __launch_bounds__(threads, 1) lets the kernel use.
FUSED_ASSUMED_REGS = 255

# Shared-memory row padding in elements (linear.cuh kPad16, kPad32Row, kPad32Col).
PAD_16 = 8
PAD_32_ROW = 8
PAD_32_COL = 4

# Hopper: 227 KB per block after opt-in, 228 KB per SM.
SMEM_OPTIN_LIMIT = 227 * 1024
SMEM_PER_SM = _occ.SMEM_PER_SM
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


@dataclass(frozen=True)
class FusedConfig:
    """One linear_fused specialisation."""

    dtype: str
    head_dim: int
    chunk: int
    block_dv: int
    stages: int
    has_decay: bool
    #: Chunk segments per (slice, head): a launch argument, not a named constant.
    segments: int = 1
    #: STATE_WARPS (FUSED_STATE_WARPS_CHOICES).
    state_warps: int = 0

    @property
    def threads(self) -> int:
        return (self.chunk // FUSED_ROWS_PER_WARP) * (1 + self.state_warps) * 32

    def resident_blocks_per_sm(self) -> int:
        """Blocks an SM can hold, by shared memory and by the registers the kernel may use."""
        return _occ.resident_blocks_per_sm(self.threads, FUSED_ASSUMED_REGS, self.smem_bytes())

    @property
    def warps(self) -> int:
        """Warps that tile the state (either warp group): chunk / 16."""
        return self.chunk // FUSED_ROWS_PER_WARP

    def smem_bytes(self) -> int:
        eb = ELEM_BYTES.get(self.dtype, 2)
        ld_qk = self.head_dim + PAD_16
        ld_v = self.block_dv + PAD_16
        stage = 2 * self.chunk * ld_qk + self.chunk * ld_v
        h_tile = self.head_dim * ld_v
        return (self.stages * stage + 2 * h_tile) * eb + (self.chunk * 4 if self.has_decay else 0)

    @property
    def warps_dk(self) -> int:
        """Warps along the state rows (16-row tiles); the rest split its columns."""
        return min(self.warps, self.head_dim // 16)

    def acc_floats(self) -> int:
        """Accumulator floats per thread: S (chunk/8 tiles), O (block_dv/8) and the warp's state tile."""
        state_rows = self.head_dim // self.warps_dk
        state_cols = self.block_dv // (self.warps // self.warps_dk)
        return 4 * (self.chunk // 8 + self.block_dv // 8 + (state_rows // 16) * (state_cols // 8))

    def problems(self) -> List[str]:
        """Why this combination is illegal (mirrors linear_fused.cu's static_asserts); empty if legal."""
        out = []
        if self.dtype not in FUSED_DTYPES:
            out.append(f"dtype {self.dtype!r} not in {FUSED_DTYPES} (float32 runs the two-pass kernels)")
            return out
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            out.append(f"head_dim {self.head_dim} not in {SUPPORTED_HEAD_DIMS}")
        if self.chunk not in FUSED_CHUNKS:
            out.append(f"chunk {self.chunk} not in {FUSED_CHUNKS}")
        if self.block_dv not in FUSED_BLOCK_DV_CHOICES or self.head_dim % self.block_dv:
            out.append(f"block_dv {self.block_dv} must be one of {FUSED_BLOCK_DV_CHOICES} and divide head_dim")
        if self.stages not in FUSED_STAGE_CHOICES:
            out.append(f"stages {self.stages} not in {FUSED_STAGE_CHOICES}")
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            out.append(f"segments {self.segments!r} must be a positive int")
        if self.state_warps not in FUSED_STATE_WARPS_CHOICES:
            out.append(f"state_warps {self.state_warps!r} not in {FUSED_STATE_WARPS_CHOICES}")
        if out:
            return out
        if (self.block_dv // (self.warps // self.warps_dk)) % 16:
            out.append(f"block_dv {self.block_dv} over {self.warps // self.warps_dk} warps along the state columns "
                       "is not a multiple of 16")
        elif self.acc_floats() > FUSED_MAX_ACC_FLOATS:
            out.append(f"{self.acc_floats()} accumulator floats per thread over {FUSED_MAX_ACC_FLOATS}")
        if self.smem_bytes() > SMEM_OPTIN_LIMIT:
            out.append(f"shared memory {self.smem_bytes()} B over {SMEM_OPTIN_LIMIT} B")
        if self.state_warps in FUSED_STATE_WARPS_CHOICES and self.threads > FUSED_MAX_THREADS:
            out.append(f"{self.threads} threads over {FUSED_MAX_THREADS} (registers would spill)")
        return out

    def constants(self) -> Dict[str, int]:
        return {"DTYPE": DTYPE_CODES[self.dtype], "HEAD_DIM": self.head_dim, "CHUNK": self.chunk,
                "BLOCK_DV": self.block_dv, "STAGES": self.stages, "STATE_WARPS": self.state_warps,
                "HAS_DECAY": int(self.has_decay)}

    def grid(self, batch: int, num_heads: int) -> Tuple[int, int, int]:
        return ((self.head_dim // self.block_dv) * self.segments, batch * num_heads, 1)

    def with_segments(self, segments: int) -> "FusedConfig":
        return FusedConfig(self.dtype, self.head_dim, self.chunk, self.block_dv, self.stages, self.has_decay,
                           segments, self.state_warps)

    def with_state_warps(self, state_warps: int) -> "FusedConfig":
        return FusedConfig(self.dtype, self.head_dim, self.chunk, self.block_dv, self.stages, self.has_decay,
                           self.segments, state_warps)


def fused_segments(cfg: FusedConfig, num_heads_total: int, seq_len: int, sm_count: int = DEFAULT_SM_COUNT) -> int:
    """Segments for cfg's slice: fill the resident blocks (see FUSED_MAX_SEGMENTS)."""
    base = (cfg.head_dim // cfg.block_dv) * num_heads_total
    num_chunks = -(-seq_len // cfg.chunk)
    room = (cfg.resident_blocks_per_sm() * sm_count) // base
    return max(1, min(room, FUSED_MAX_SEGMENTS, num_chunks // FUSED_MIN_CHUNKS_PER_SEGMENT))


def fused_variants(dtype: str, head_dim: int, chunk: int, has_decay: bool,
                   state_warps: int = 0) -> List[FusedConfig]:
    """The legal linear_fused configs of a problem with ``state_warps``, widest block_dv first,
    each at FUSED_STAGES or, where that ring does not fit in shared memory, the deepest ring
    that does (one segment)."""
    out = []
    stage_order = [FUSED_STAGES] + sorted((s for s in FUSED_STAGE_CHOICES if s < FUSED_STAGES), reverse=True)
    for dv in FUSED_BLOCK_DV_CHOICES:
        for stages in stage_order:
            cfg = FusedConfig(dtype, head_dim, chunk, dv, stages, bool(has_decay), 1, state_warps)
            if not cfg.problems():
                out.append(cfg)
                break
    return out


def all_fused_variants(dtype: str, head_dim: int, chunk: int, has_decay: bool) -> List[FusedConfig]:
    """fused_variants for every STATE_WARPS choice."""
    return [cfg for sw in FUSED_STATE_WARPS_CHOICES for cfg in fused_variants(dtype, head_dim, chunk, has_decay, sw)]


def device_sm_count(backend: Any) -> int:
    """Streaming multiprocessors of a backend's device (DEFAULT_SM_COUNT if it does not say)."""
    return int(backend.info.get("multiprocessors") or DEFAULT_SM_COUNT)


def choose_fused_config(dtype: str, head_dim: int, chunk: int, has_decay: bool, *,
                        num_heads_total: int, seq_len: int, sm_count: int = DEFAULT_SM_COUNT) -> Optional[FusedConfig]:
    """The linear_fused config for a problem, or None where the kernel does not exist
    (float32, chunk 256): the widest legal block_dv whose grid, with the segments of
    :func:`fused_segments`, fills FUSED_MIN_WAVES; else the narrowest."""
    if dtype not in FUSED_DTYPES:
        return None
    variants = (fused_variants(dtype, head_dim, chunk, has_decay, FUSED_STATE_WARPS)
                or fused_variants(dtype, head_dim, chunk, has_decay, 0))
    if not variants:
        return None
    for cfg in variants:
        cfg = cfg.with_segments(fused_segments(cfg, num_heads_total, seq_len, sm_count))
        if cfg.grid(1, num_heads_total)[0] * num_heads_total >= FUSED_MIN_WAVES * sm_count:
            return cfg
    last = variants[-1]
    return last.with_segments(fused_segments(last, num_heads_total, seq_len, sm_count))


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
    width the chooser can pick, chunk_o as chosen, linear_fused at every legal
    block_dv, for every dtype, head dim, chunk and decay switch."""
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
                    for fcfg in (all_fused_variants(dtype, d, c, decay) if dtype in FUSED_DTYPES else []):
                        add(KERNEL_FUSED, fcfg.constants())
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
                           dtype: str, algorithm: str = "two_pass") -> int:
    """Least device-memory bytes of the two-pass or the fused algorithm (module docstring)."""
    if dtype not in ELEM_BYTES:
        raise TypeError(f"dtype: {dtype} not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    if algorithm not in ("fused", "two_pass"):
        raise ValueError(f"algorithm: expected 'fused' or 'two_pass', got {algorithm!r}")
    eb = ELEM_BYTES[dtype]
    d = head_dim
    if algorithm == "fused":
        return batch * num_heads * 4 * seq_len * d * eb
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
    """Kernels, grids and arguments of one linear-attention call; run() or time() it.

    ``algorithm``: "auto" (the fused kernel where it exists, else two-pass), "fused"
    (ValueError where it does not exist) or "two_pass". ``fused_config`` overrides the
    chooser's FusedConfig (sweeps); it must match the problem. Of ``fused_config`` and
    ``config`` (the two-pass LinearConfig) only the one of the algorithm that runs is set.
    """

    def __init__(self, q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                 decay: Any = None, backend: Any = None, out: Any = None, algorithm: str = "auto",
                 fused_config: Optional[FusedConfig] = None) -> None:
        import torch  # noqa: PLC0415

        from .. import backend as _backend  # noqa: PLC0415
        from .. import params as _params  # noqa: PLC0415

        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch CUDA tensor, got {type(x).__name__}")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
        prob = check_inputs(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay)
        self.problem = prob
        self.be = backend if backend is not None else _backend.get("cuda")
        sms = device_sm_count(self.be)
        b, h, n, d = prob.batch, prob.num_heads, prob.seq_len, prob.head_dim
        has_decay = prob.gamma is not None
        fused = None
        if algorithm != "two_pass":
            fused = fused_config if fused_config is not None else choose_fused_config(
                prob.dtype, d, prob.chunk, has_decay, num_heads_total=b * h, seq_len=n, sm_count=sms)
            if fused is None and algorithm == "fused":
                raise ValueError(f"algorithm: no fused kernel for {prob.dtype} with chunk_size {prob.chunk} "
                                 f"(it takes {FUSED_DTYPES} and chunks {FUSED_CHUNKS})")
            if fused is not None:
                want = (prob.dtype, d, prob.chunk, has_decay)
                got = (fused.dtype, fused.head_dim, fused.chunk, fused.has_decay)
                if got != want:
                    raise ValueError(f"fused_config: made for (dtype, head_dim, chunk, decay) = {got}, "
                                     f"the problem is {want}")
                bad = fused.problems()
                if bad:
                    raise ValueError(f"fused_config: illegal: {'; '.join(bad)}")
        self.algorithm = "fused" if fused is not None else "two_pass"
        self.fused_config = fused
        num_chunks = -(-n // prob.chunk)
        if out is None:
            out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
        else:
            oi = _v.check_output(out, "out", shape=(b, h, n, d), allowed_dtypes=(prob.dtype,), device="cuda")
            _check_alignment(out, oi, prob.dtype)
        self.out = out
        log2_gamma = np.zeros(h) if prob.gamma is None else np.log2(prob.gamma)
        self.log2_decay = torch.tensor(log2_gamma, dtype=torch.float32, device=q.device)
        self.params = _params.make_params(
            batch=b, num_heads=h, num_kv_heads=h, seq_q=n, seq_kv=n, head_dim=d, scale=prob.scale,
            q_stride=tuple(q.stride()[:3]), k_stride=tuple(k.stride()[:3]), v_stride=tuple(v.stride()[:3]),
            o_stride=tuple(out.stride()[:3]), chunk_size=prob.chunk)
        self._keep = (q, k, v)
        if fused is not None:
            self.states = None
            self.config = None
            self.kernel_f = self.be.kernel(KERNEL_FUSED, **fused.constants())
            self.launches = [(self.kernel_f, fused.grid(b, h), (fused.threads, 1, 1),
                              [self.params, q, k, v, out, self.log2_decay, np.int32(fused.segments)],
                              fused.smem_bytes())]
            self.names = ["fused"]
            return
        self.config = cfg = choose_config(prob.dtype, d, prob.chunk, has_decay, num_state_heads=b * h, sm_count=sms)
        self.states = torch.empty((b, h, num_chunks, d, d), dtype=q.dtype, device=q.device)
        self.kernel_h = self.be.kernel(KERNEL_H, **cfg.h_constants())
        self.kernel_o = self.be.kernel(KERNEL_O, **cfg.o_constants())
        grid_h = ((d // H_BLOCK_DK) * (d // cfg.block_dv), b * h, 1)
        grid_o = (-(-n // cfg.block_q), b * h, 1)
        self.launches = [
            (self.kernel_h, grid_h, (cfg.h_threads, 1, 1), [self.params, k, v, self.states, self.log2_decay],
             cfg.h_smem_bytes()),
            (self.kernel_o, grid_o, (cfg.o_threads, 1, 1),
             [self.params, q, k, v, self.states, out, self.log2_decay], cfg.o_smem_bytes()),
        ]
        self.names = ["chunk_h", "chunk_o"]

    def run(self) -> Any:
        for kern, grid, block, args, smem in self.launches:
            self.be.launch(kern, grid, block, args, smem)
        return self.out

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False) -> Dict[str, Any]:
        """Device-side timings: "total" (all launches back to back, issued from C++ with no
        Python between them) and, for the two-pass algorithm, "chunk_h" and "chunk_o" alone."""
        out = {"total": self.be.time_sequence(self.launches, warmup=warmup, iters=iters, flush_l2=flush_l2)}
        if len(self.launches) > 1:
            for name, (kern, grid, block, args, smem) in zip(self.names, self.launches):
                out[name] = self.be.time_launch(kern, grid, block, args, smem, warmup=warmup, iters=iters,
                                                flush_l2=flush_l2)
        return out


def plan_linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                          decay: Any = None, backend: Any = None, out: Any = None,
                          algorithm: str = "auto") -> LinearPlan:
    return LinearPlan(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay, backend=backend, out=out,
                      algorithm=algorithm)


def linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                     decay: Any = None, algorithm: str = "auto") -> Any:
    """Chunked causal linear attention on torch CUDA tensors q, k, v [B, H, N, D].

    dtype float16, bfloat16 or float32 (all three alike); D in SUPPORTED_HEAD_DIMS;
    chunk_size in SUPPORTED_CHUNKS (N need not be a multiple); ``scale``
    multiplies q.k (no implicit 1/sqrt(D)); ``decay``: None, a float, or one
    gamma in (0, 1] per head; ``algorithm`` "auto", "fused" or "two_pass" (LinearPlan).
    Returns O [B, H, N, D] in the input dtype.
    """
    return LinearPlan(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay, algorithm=algorithm).run()


def time_linear_attention(q: Any, k: Any, v: Any, *, chunk_size: int, scale: float = 1.0,
                          decay: Any = None, warmup: int = 4, iters: int = 50) -> Dict[str, Any]:
    """Timing helper: TimingStats (device events) of LinearPlan.time: "total" (+ per pass for two-pass)."""
    return LinearPlan(q, k, v, chunk_size=chunk_size, scale=scale, decay=decay).time(warmup=warmup, iters=iters)


def gflops(flops: int, ms: float) -> float:
    """Throughput in GFLOP/s of `flops` done in `ms` milliseconds."""
    if not ms > 0 or not math.isfinite(ms):
        raise ValueError(f"ms: {ms} must be a positive finite time")
    return flops / (ms * 1e-3) / 1e9
