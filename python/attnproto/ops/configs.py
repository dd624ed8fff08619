"""Tile configurations of the mma.sync Flash Attention forward kernel (flash_fwd_mma).

:class:`FlashConfig` names one specialisation (the named constants of
``shaders/cuda/flash_fwd_mma.cu``, defined in ``include/fa_mma.cuh``); :meth:`FlashConfig.is_legal` mirrors the
kernel's ``static_assert`` s so that an illegal combination is refused before it
reaches NVRTC. :data:`DEFAULT_TABLE` holds its starting tiles, each with its reason (the
measured choice is :mod:`attnproto.ops.chooser`'s, and :func:`choose_config`
asks it); :func:`sweep_space` lists what the proto1 sweep measures, and
:func:`all_specialisations` the default tiles (CI compiles each; the family
adds the sweep and the measured table).

Nothing here needs a GPU or torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import variants as _variants

__all__ = [
    "KERNEL_NAME",
    "DTYPE_CODES",
    "SUPPORTED_HEAD_DIMS",
    "SMEM_LIMIT_SM90",
    "SMEM_OPTIN_LIMIT_BY_ARCH",
    "FlashConfig",
    "TableEntry",
    "DEFAULT_TABLE",
    "dtype_code",
    "sweep_space",
    "choose_config",
    "default_entry",
    "all_specialisations",
]

KERNEL_NAME = "flash_fwd_mma"

# DTYPE named constant of the kernel (shaders/cuda/include/common.cuh: kDtypeF16, kDtypeBF16).
DTYPE_CODES: Dict[str, int] = {"float16": 0, "bfloat16": 1}

# Head dims the chooser's table is tuned for; any multiple of MMA_K in
# [MMA_K, MAX_HEAD_DIM] is legal and borrows the tiles of the next larger one.
SUPPORTED_HEAD_DIMS: Tuple[int, ...] = (64, 128, 256)

# ---- mirrors of the kernel's constants (shaders/cuda/include/fa_mma.cuh, namespace fa_mma) ----
MMA_M = 16                  # rows of one mma.sync.m16n8k16 tile
MMA_N = 8                   # columns of one accumulator tile
MMA_K = 16                  # k depth of one mma.sync
ACC_PER_TILE = 4            # accumulator floats per thread of one m16n8 tile
WARP_SIZE = 32
ELEM_BYTES = 2              # f16 / bf16
CHUNK_BYTES = 16            # one cp.async / one ldmatrix row
CHUNK_ELEMS = CHUNK_BYTES // ELEM_BYTES
SWIZZLE_GROUP = 8           # 16-byte chunks per 128-byte XOR-swizzle group
MAX_HEAD_DIM = 256          # O accumulators alone take HEAD_DIM / 2 floats per 16-row tile
MAX_WARPS = 16              # 512 threads; more leaves under 64 registers per thread
# Accumulator floats per thread (S and O tiles) the kernel allows: 3/4 of the 255
# registers; up to 160 nothing in the sweep spills, at 192 some shapes spill (ptxas -v,
# sm_90a, nvcc 13.0). Same value and reason as fa_mma::kMaxAccRegs.
MAX_ACC_REGS = 192
# Q fragments stay in registers when accumulators + Q fragments fit (fa_mma::kQInRegsBudget).
Q_IN_REGS_BUDGET = 160
STAGE_CHOICES = (1, 2)

# Per-block dynamic shared memory opt-in limits (bytes), by compute capability;
# the kernel's static_assert uses the same numbers (fa_mma::kSmemLimit).
SMEM_LIMIT_SM80 = 166912    # A100, Orin (sm_87): 163 KB
SMEM_LIMIT_SM86 = 101376    # sm_86, sm_89, sm_120: 99 KB
SMEM_LIMIT_SM90 = 232448    # H100, H200, B200: 227 KB
SMEM_OPTIN_LIMIT_BY_ARCH: Dict[int, int] = {
    80: SMEM_LIMIT_SM80, 86: SMEM_LIMIT_SM86, 87: SMEM_LIMIT_SM80, 89: SMEM_LIMIT_SM86,
    90: SMEM_LIMIT_SM90, 100: SMEM_LIMIT_SM90, 120: SMEM_LIMIT_SM86,
}

# ---- the sweep grid (proto1): what is worth measuring on sm_80/sm_90 ----
SWEEP_BLOCK_R = (64, 128, 256)
SWEEP_BLOCK_C = (32, 64, 128)
SWEEP_WARPS = (4, 8)


def dtype_code(dtype: Any) -> int:
    """DTYPE constant of a dtype given as a name ("bfloat16"), a torch/numpy dtype or a code."""
    if isinstance(dtype, bool):
        raise TypeError(f"dtype: expected a dtype name or code, got {dtype!r}")
    if isinstance(dtype, int):
        if dtype not in DTYPE_CODES.values():
            raise ValueError(f"dtype: code {dtype} not supported; expected one of "
                             f"{sorted(DTYPE_CODES.values())} ({DTYPE_CODES})")
        return dtype
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    name = {"half": "float16", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if name not in DTYPE_CODES:
        raise TypeError(f"dtype: {dtype!r} not supported by {KERNEL_NAME}; expected one of "
                        f"{', '.join(DTYPE_CODES)}")
    return DTYPE_CODES[name]


def _dtype_name(code: int) -> str:
    return next(name for name, c in DTYPE_CODES.items() if c == code)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class FlashConfig:
    """One specialisation of flash_fwd_mma. ``dtype`` is stored as its name."""

    head_dim: int
    block_r: int
    block_c: int
    warps: int
    stages: int
    causal: bool
    dtype: str

    def __post_init__(self) -> None:
        for name in ("head_dim", "block_r", "block_c", "warps", "stages"):
            _check_int(getattr(self, name), name)
        if not isinstance(self.causal, (bool, int)) or self.causal not in (0, 1):
            raise TypeError(f"causal: expected a bool, got {self.causal!r}")
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "dtype", _dtype_name(dtype_code(self.dtype)))

    # ---- derived shapes (same names as the kernel's, without the k prefix) ----
    @property
    def threads(self) -> int:
        return self.warps * WARP_SIZE

    @property
    def rows_per_warp(self) -> int:
        return self.block_r // self.warps

    @property
    def m_tiles(self) -> int:
        """16-row MMA tiles per warp."""
        return self.rows_per_warp // MMA_M

    @property
    def swizzled(self) -> bool:
        """XOR-swizzled rows (HEAD_DIM % 64 == 0); otherwise rows padded by 16 bytes."""
        return (self.head_dim // CHUNK_ELEMS) % SWIZZLE_GROUP == 0

    @property
    def row_bytes(self) -> int:
        return self.head_dim * ELEM_BYTES + (0 if self.swizzled else CHUNK_BYTES)

    def smem_bytes(self) -> int:
        """Dynamic shared memory of a launch: the Q tile plus STAGES K and STAGES V tiles."""
        return (self.block_r + 2 * self.stages * self.block_c) * self.row_bytes

    @property
    def acc_regs(self) -> int:
        """Accumulator floats per thread: S (BLOCK_C wide) and O (HEAD_DIM wide) per 16-row tile."""
        return self.m_tiles * (self.block_c // MMA_N + self.head_dim // MMA_N) * ACC_PER_TILE

    @property
    def q_in_registers(self) -> bool:
        """Whether the kernel keeps Q's A fragments in registers (else re-reads shared memory)."""
        q_frag_regs = self.m_tiles * (self.head_dim // MMA_K) * 4
        return self.acc_regs + q_frag_regs <= Q_IN_REGS_BUDGET

    def constants(self, variant: Any = None) -> Dict[str, int]:
        """Named constants of the KernelKey (become -DNAME=VALUE for NVRTC): the tiles and the
        five variant constants every entry on ``include/fa_mma.cuh`` requires (``variant`` an
        :class:`attnproto.ops.variants.Variant`; None: the base kernel, all five 0)."""
        return {
            "HEAD_DIM": self.head_dim,
            "BLOCK_R": self.block_r,
            "BLOCK_C": self.block_c,
            "WARPS": self.warps,
            "STAGES": self.stages,
            "CAUSAL": int(self.causal),
            "DTYPE": DTYPE_CODES[self.dtype],
            **(variant or _variants.BASE).constants(),
        }

    def grid(self, batch: int, num_heads: int, seq_q: int) -> Tuple[int, int, int]:
        """(ceil(Nq / BLOCK_R), Hq, B)."""
        return (-(-seq_q // self.block_r), num_heads, batch)

    def is_legal(self, smem_limit: int = SMEM_LIMIT_SM90) -> Tuple[bool, str]:
        """(True, "") or (False, reason), in the order of the kernel's static_asserts."""
        d, r, c, w = self.head_dim, self.block_r, self.block_c, self.warps
        if d % MMA_K or not MMA_K <= d <= MAX_HEAD_DIM:
            return False, f"HEAD_DIM must be a multiple of 16 in [16, 256] (got {d})"
        if c % MMA_K or c < MMA_K:
            return False, f"BLOCK_C must be a positive multiple of 16 (k step of P V) (got {c})"
        if not 1 <= w <= MAX_WARPS:
            return False, f"WARPS must be in [1, 16] (got {w})"
        if r <= 0 or r % (MMA_M * w):
            return False, (f"BLOCK_R must be a positive multiple of 16*WARPS (each warp owns whole "
                           f"16-row MMA tiles) (got BLOCK_R={r}, WARPS={w})")
        if self.stages not in STAGE_CHOICES:
            return False, f"STAGES must be 1 or 2 (got {self.stages})"
        if self.smem_bytes() > smem_limit:
            return False, (f"shared memory (BLOCK_R + 2*STAGES*BLOCK_C rows of HEAD_DIM) exceeds the "
                           f"per-block opt-in limit: {self.smem_bytes()} > {smem_limit} bytes")
        if self.acc_regs > MAX_ACC_REGS:
            return False, (f"register budget: (BLOCK_R/WARPS) x (BLOCK_C + HEAD_DIM) / 32 accumulator "
                           f"floats per thread exceed {MAX_ACC_REGS} (got {self.acc_regs})")
        return True, ""

    def with_(self, **changes: Any) -> "FlashConfig":
        """A copy with some fields changed."""
        values = {f: getattr(self, f) for f in
                  ("head_dim", "block_r", "block_c", "warps", "stages", "causal", "dtype")}
        values.update(changes)
        return FlashConfig(**values)

    def label(self) -> str:
        return (f"d{self.head_dim}_r{self.block_r}_c{self.block_c}_w{self.warps}_s{self.stages}"
                f"{'_causal' if self.causal else ''}_{self.dtype}")


def _check_head_dim(head_dim: Any) -> int:
    head_dim = _check_int(head_dim, "head_dim")
    if head_dim % MMA_K or not MMA_K <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim: {head_dim} not supported by {KERNEL_NAME}; expected a "
                         f"multiple of {MMA_K} in [{MMA_K}, {MAX_HEAD_DIM}]")
    return head_dim


def sweep_space(head_dim: int, causal: bool = False, dtype: Any = "bfloat16",
                smem_limit: int = SMEM_LIMIT_SM90) -> List[FlashConfig]:
    """Every legal BLOCK_R x BLOCK_C x WARPS x STAGES combination of the proto1 sweep."""
    head_dim = _check_head_dim(head_dim)
    out = []
    for block_r in SWEEP_BLOCK_R:
        for block_c in SWEEP_BLOCK_C:
            for warps in SWEEP_WARPS:
                for stages in STAGE_CHOICES:
                    cfg = FlashConfig(head_dim, block_r, block_c, warps, stages, causal, dtype)
                    if cfg.is_legal(smem_limit)[0]:
                        out.append(cfg)
    return out


@dataclass(frozen=True)
class TableEntry:
    """Tiles for one head dim, up to a query length, for causal and/or non-causal."""

    head_dim: int
    max_seq_len: Optional[int]      # None: any length
    causal: Optional[bool]          # None: both
    block_r: int
    block_c: int
    warps: int
    stages: int
    reason: str = field(compare=False)

    def matches(self, head_dim: int, seq_len: int, causal: bool) -> bool:
        return (self.head_dim == head_dim
                and (self.max_seq_len is None or seq_len <= self.max_seq_len)
                and (self.causal is None or self.causal == causal))


# Query lengths up to this get the short-sequence tiles: ceil(1024/64) = 16 query tiles
# per (batch, head) instead of 8 keeps 132 SMs busier at small B*H.
SHORT_SEQ = 1024
_DEFAULT = "default tiles: "

# The family's starting tiles: used where the measured table has no entry (another arch).
DEFAULT_TABLE: Tuple[TableEntry, ...] = (
    TableEntry(64, SHORT_SEQ, None, 64, 64, 4, 2,
               _DEFAULT + "short sequences: 64-row CTAs double the CTAs per head; 16 rows/warp "
                          "keeps Q in registers; 2 stages hide the K/V latency"),
    TableEntry(64, None, None, 128, 64, 4, 2,
               _DEFAULT + "FA2's D=64 shape: 32 rows/warp halves ldmatrix traffic per mma, "
                          "accumulators + Q fragments fit in 160 registers; 48 KB shared, so "
                          "registers, not shared memory, bound occupancy"),
    TableEntry(128, SHORT_SEQ, None, 64, 64, 4, 2,
               _DEFAULT + "short sequences: 64-row CTAs for more CTAs per head; 16 rows/warp "
                          "keeps Q in registers (96 accumulator + 32 Q floats)"),
    TableEntry(128, None, None, 128, 64, 4, 1,
               _DEFAULT + "FA2's D=128 shape (128 x 64 tiles, 4 warps of 32 rows): 32 rows/warp "
                          "halve the ldmatrix bytes per mma that bound 16-row warps; Q re-read "
                          "from shared memory; 1 stage (64 KB) because 2 stages spill ~60 bytes "
                          "in ptxas while 1 stage spills only outside the loop"),
    TableEntry(256, None, None, 128, 64, 8, 1,
               _DEFAULT + "FA2's D=256 shape: 16 rows/warp (O alone is 128 floats/thread); "
                          "1 stage keeps shared memory at 128 KB, V_j still loads during "
                          "S_j and K_j+1 during P V_j"),
)

def default_entry(head_dim: int, seq_len: int, causal: bool, dtype: Any,
                  smem_limit: int = SMEM_LIMIT_SM90) -> Tuple[TableEntry, FlashConfig]:
    """The first :data:`DEFAULT_TABLE` entry for the problem whose tiles fit ``smem_limit``.

    A head dim without entries borrows those of the next larger tabulated one (its tiles
    hold at least as much). These are the family's starting tiles: what runs when no
    measured table entry applies (a device the Prototype 1 sweep has not run on)."""
    head_dim = _check_head_dim(head_dim)
    table_dim = next((d for d in SUPPORTED_HEAD_DIMS if d >= head_dim), SUPPORTED_HEAD_DIMS[-1])
    tried = []
    for e in DEFAULT_TABLE:
        if not e.matches(table_dim, seq_len, causal):
            continue
        cfg = FlashConfig(head_dim, e.block_r, e.block_c, e.warps, e.stages, causal, dtype)
        ok, why = cfg.is_legal(smem_limit)
        if ok:
            return e, cfg
        tried.append(f"{cfg.label()}: {why}")
    raise LookupError(f"no legal default tiles for head_dim {head_dim}, seq_len {seq_len}, causal {causal} "
                      f"within {smem_limit} bytes of shared memory: " + "; ".join(tried))


def choose_config(head_dim: int, seq_len: int, causal: bool, dtype: Any,
                  smem_limit: int = SMEM_LIMIT_SM90) -> FlashConfig:
    """The mma.sync tiles ``kernel="mma"`` runs for a problem (query length ``seq_len``).

    The measured table (:mod:`attnproto.ops.chooser`, from the Prototype 1 sweep) for a
    device with ``smem_limit`` bytes of shared memory (sm_90's by default; sm_80's and
    sm_86's pick their arch's entries), else :data:`DEFAULT_TABLE`. ValueError for an
    unsupported head dim.
    """
    head_dim = _check_head_dim(head_dim)
    seq_len = _check_int(seq_len, "seq_len")
    if seq_len < 0:
        raise ValueError(f"seq_len: must be >= 0, got {seq_len}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    dtype = _dtype_name(dtype_code(dtype))
    from . import chooser  # noqa: PLC0415  (the chooser imports the families, which import this module)

    return chooser.mma_choice(head_dim, seq_len, causal, dtype, smem_limit)[0]


def all_specialisations() -> List[Tuple[str, Dict[str, int]]]:
    """(kernel name, constants) of the default tiles: every :data:`DEFAULT_TABLE` choice for
    each tabulated head dim, both masks, both dtypes and every length band, under Hopper's
    and Ampere's shared-memory limits. Unique, each legal on sm_90 (CI compiles the ones
    that fit sm_80 for sm_80 too). The family adds its sweep and the measured table's tiles
    (:meth:`attnproto.ops.families.mma.MmaFamily.specialisations`)."""
    seen = set()
    out: List[Tuple[str, Dict[str, int]]] = []
    lengths = sorted({e.max_seq_len for e in DEFAULT_TABLE if e.max_seq_len is not None})
    probe_lengths = [0] + lengths + [lengths[-1] + 1 if lengths else 1]
    for head_dim in SUPPORTED_HEAD_DIMS:
        for causal in (False, True):
            for dtype in DTYPE_CODES:
                for seq_len in probe_lengths:
                    for limit in (SMEM_LIMIT_SM90, SMEM_LIMIT_SM80):
                        consts = default_entry(head_dim, seq_len, causal, dtype, limit)[1].constants()
                        key = tuple(sorted(consts.items()))
                        if key not in seen:
                            seen.add(key)
                            out.append((KERNEL_NAME, consts))
    return out
