"""Metal specialisations in use: the function-constant combinations attnproto dispatches.

A spec is a KernelKey in all but name: kernel name (== shaders/metal/<name>.metal stem ==
the MSL entry point) plus named constants; ``canonical()`` matches
``attnproto::KernelKey::canonical()`` ("name[A=1,B=2]"). The Metal backend turns the
constants into MTLFunctionConstantValues by name. tools/metal_check/check.py and
tests/test_metal_static.py compile every shader once per spec listed here, so a
combination used by an experiment must appear in ``specs_in_use()``.

The threadgroup-memory formula mirrors ATTNPROTO_FLASH_TG_BYTES in
shaders/metal/metal_bindings.h (the test suite compares the two).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

FLASH_KERNEL = "flash_attention"
ROPE_KERNEL = "rope"
SMOKE_KERNEL = "smoke"

# Element types of Q/K/V/O: DTYPE function-constant values (ATTNPROTO_DTYPE_*).
DTYPE_CODES = {"float16": 0, "bfloat16": 1}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2}

# Seed AC-1.2 tile sweep.
SWEEP_BLOCK_R = (16, 32, 64)
SWEEP_BLOCK_C = (64, 80, 128)
SWEEP_HEAD_DIM = (64, 128, 256)

# Apple GPU family 9 threadgroup memory (seed NFR-1) and the kernel's geometry constants.
THREADGROUP_MEMORY_LIMIT = 32768
SIMD_WIDTH = 32
FRAG = 8
MAX_HEAD_DIM = 256
MAX_BLOCK_C = 128
FLOAT_BYTES = 4

# Prototype 7 (seed task 4.20): N=2048, D=128, 32 heads, GQA groups 1/2/4/8. The variants are
# compared with one another at one fixed tile, a mid-sized legal one of the sweep (17 KB of
# threadgroup memory); which tile matters less than that every variant uses the same.
PROTO7_HEAD_DIM = 128
PROTO7_BLOCK_R = 32
PROTO7_BLOCK_C = 64
PROTO7_GQA_GROUPS = (1, 2, 4, 8)

# Head dimensions the standalone RoPE kernel is specialised for (the sweep's).
ROPE_HEAD_DIMS = SWEEP_HEAD_DIM

# Prototype 4 (specialisation cost). The archive matrix is the sweep's HEAD_DIM x BLOCK_R x
# BLOCK_C x (CAUSAL x DTYPE), legal tiles only (84 specs, not the 72 of the CUDA matrix: 6 of
# the 27 sweep tiles exceed 32 KB). Cold builds draw from every other legal combination of the
# kernel's function constants over the sweep tiles: CAUSAL x ROPE x ALIBI x GQA_GROUP x DTYPE.
PROTO4_COLD_COUNTS = (1, 10, 50, 100, 500)
# N = 1 is this many specs, each built alone: a record needs at least two timing samples.
PROTO4_SINGLE_BUILDS = 3
# Built first and not timed as a variant: the process's first build also loads the library.
PROTO4_WARMUP_BUILDS = 1
# First-dispatch latency: this many never-built specs, each dispatched cold / archive / memory.
PROTO4_LAUNCH_REPEATS = 3
# First dispatches upload float16 host arrays (bfloat16 host arrays would need ml_dtypes).
PROTO4_LAUNCH_DTYPE = "float16"
# GQA_GROUP values of the cold candidates: 0 (group read from the params) and Prototype 7's.
PROTO4_GQA_GROUPS = (0, *PROTO7_GQA_GROUPS)
# Fixed shuffle of the candidates so that every prefix mixes tiles, dtypes and features.
PROTO4_ORDER_SEED = 4
# The quick archive matrix: Prototype 7's tile x the four CAUSAL x DTYPE variants.
PROTO4_QUICK_TILE = (PROTO7_HEAD_DIM, PROTO7_BLOCK_R, PROTO7_BLOCK_C)


@dataclass(frozen=True)
class MetalSpec:
    """One Metal specialisation: kernel name and named integer constants."""

    name: str
    constants: tuple[tuple[str, int], ...]

    @staticmethod
    def make(name: str, **constants: int) -> "MetalSpec":
        return MetalSpec(name, tuple(sorted((k, int(v)) for k, v in constants.items())))

    def as_dict(self) -> dict[str, int]:
        return dict(self.constants)

    def canonical(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.constants)
        return f"{self.name}[{inner}]"

    def __str__(self) -> str:
        return self.canonical()


def kv_chunk_d(head_dim: int) -> int:
    """Columns of K/V staged at a time (ATTNPROTO_FLASH_KV_CHUNK_D)."""
    if head_dim <= 64:
        return head_dim
    for chunk in (64, 32, 16, 8):
        if head_dim % chunk == 0:
            return chunk
    raise ValueError(f"head_dim must be a multiple of {FRAG}, got {head_dim}")


def flash_threadgroup_bytes(head_dim: int, block_r: int, block_c: int, dtype: str = "float16") -> int:
    """Threadgroup memory of one flash_attention threadgroup (ATTNPROTO_FLASH_TG_BYTES)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    scratch = (block_r // FRAG) * FRAG * FRAG * FLOAT_BYTES
    return block_c * kv_chunk_d(head_dim) * DTYPE_BYTES[dtype] + block_r * block_c * FLOAT_BYTES + scratch


def flash_threads(block_r: int) -> int:
    """Threads per flash_attention threadgroup (ATTNPROTO_FLASH_THREADS)."""
    return (block_r // FRAG) * SIMD_WIDTH


def flash_tile_legal(head_dim: int, block_r: int, block_c: int, dtype: str = "float16") -> bool:
    """True when the kernel's static_asserts accept this tile."""
    return (
        0 < head_dim <= MAX_HEAD_DIM and head_dim % FRAG == 0
        and block_r > 0 and block_r % FRAG == 0
        and 0 < block_c <= MAX_BLOCK_C and block_c % FRAG == 0
        and block_r <= block_c
        and flash_threadgroup_bytes(head_dim, block_r, block_c, dtype) <= THREADGROUP_MEMORY_LIMIT
    )


def flash_spec(head_dim: int, block_r: int, block_c: int, dtype: str = "float16", *,
               causal: bool = False, rope: bool = False, alibi: bool = False,
               gqa_group: int = 0, window: bool = False, softcap: bool = False) -> MetalSpec:
    """The flash_attention specialisation; raises ValueError for a tile the kernel rejects.

    ``window`` / ``softcap`` set the WINDOW / SOFTCAP constants (the window length and the cap
    are run-time values of AttentionParams)."""
    for arg, value in (("head_dim", head_dim), ("block_r", block_r), ("block_c", block_c), ("gqa_group", gqa_group)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    if gqa_group < 0:
        raise ValueError(f"gqa_group must be >= 0 (0 = from params), got {gqa_group}")
    if not flash_tile_legal(head_dim, block_r, block_c, dtype):
        raise ValueError(
            f"tile head_dim={head_dim}, block_r={block_r}, block_c={block_c} ({dtype}) is not legal: "
            f"needs {flash_threadgroup_bytes(head_dim, block_r, block_c, dtype) if head_dim % FRAG == 0 else '?'} "
            f"bytes of threadgroup memory (limit {THREADGROUP_MEMORY_LIMIT}), multiples of {FRAG}, "
            f"block_r <= block_c, head_dim <= {MAX_HEAD_DIM}, block_c <= {MAX_BLOCK_C}")
    return MetalSpec.make(
        FLASH_KERNEL, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_C=block_c,
        DTYPE=DTYPE_CODES[dtype], CAUSAL=int(causal), ROPE=int(rope), ALIBI=int(alibi),
        GQA_GROUP=gqa_group, WINDOW=int(window), SOFTCAP=int(softcap))


def sweep_tiles(dtype: str = "float16") -> list[tuple[int, int, int]]:
    """(head_dim, block_r, block_c) of the seed sweep that fit in 32 KB."""
    return [(d, r, c) for d, r, c in itertools.product(SWEEP_HEAD_DIM, SWEEP_BLOCK_R, SWEEP_BLOCK_C)
            if flash_tile_legal(d, r, c, dtype)]


def illegal_sweep_tiles(dtype: str = "float16") -> list[tuple[int, int, int]]:
    """Sweep tiles the kernel rejects at compile time (over 32 KB)."""
    return [(d, r, c) for d, r, c in itertools.product(SWEEP_HEAD_DIM, SWEEP_BLOCK_R, SWEEP_BLOCK_C)
            if not flash_tile_legal(d, r, c, dtype)]


def _check_dim(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return value


def flash_tiles(head_dim: int, dtype: str = "float16") -> list[tuple[int, int]]:
    """(block_r, block_c) of the seed sweep's sets that the kernel accepts at this head dim.

    Any head dim the kernel takes (a multiple of 8 up to 256), not only the sweep's: the same
    Br x Bc sets, filtered by the same legality (32 KB) check as the sweep.
    """
    _check_dim(head_dim, "head_dim")
    if head_dim % FRAG or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim: {head_dim} not supported by flash_attention; expected a multiple "
                         f"of {FRAG} in [{FRAG}, {MAX_HEAD_DIM}]")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return [(r, c) for r, c in itertools.product(SWEEP_BLOCK_R, SWEEP_BLOCK_C)
            if flash_tile_legal(head_dim, r, c, dtype)]


def choose_flash_tile(head_dim: int, dtype: str = "float16", seq_q: int | None = None) -> tuple[int, int]:
    """Default (block_r, block_c) for flash_attention, before any Mac has measured the sweep.

    Rule: the largest BLOCK_R among the legal sweep tiles (K/V bytes staged per query row fall
    as 1/BLOCK_R), then the largest BLOCK_C (fewer loop trips and barriers per row). When
    ``seq_q`` is given and smaller than that BLOCK_R, the smallest legal BLOCK_R covering it
    instead (a threadgroup's simdgroups past the last query row would idle). Unmeasured: the
    tile table of a Metal proto1 run is the evidence that should replace this rule.
    """
    tiles = flash_tiles(head_dim, dtype)
    if not tiles:
        raise ValueError(f"head_dim: no tile of the sweep fits {THREADGROUP_MEMORY_LIMIT} bytes of "
                         f"threadgroup memory at head_dim={head_dim}")
    block_r = max(r for r, _ in tiles)
    if seq_q is not None:
        _check_dim(seq_q, "seq_q")
        covering = [r for r, _ in tiles if r >= seq_q]
        if covering:
            block_r = min(covering)
    block_c = max(c for r, c in tiles if r == block_r)
    return block_r, block_c


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def flash_dispatch(batch: int, num_heads: int, seq_q: int, block_r: int,
                   head_dim: int, block_c: int, dtype: str = "float16"
                   ) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """(threadgroups, threads per threadgroup, threadgroup bytes) of one flash_attention launch.

    The kernel's launch contract (shaders/metal/flash_attention.metal): threadgroups
    (ceil(seq_q / BLOCK_R), num_heads, batch), ATTNPROTO_FLASH_THREADS(BLOCK_R) threads in x,
    ATTNPROTO_FLASH_TG_BYTES bytes of threadgroup memory.
    """
    for value, name in ((batch, "batch"), (num_heads, "num_heads"), (seq_q, "seq_q")):
        _check_dim(value, name)
    if not flash_tile_legal(head_dim, block_r, block_c, dtype):
        raise ValueError(f"tile: head_dim={head_dim}, block_r={block_r}, block_c={block_c} ({dtype}) "
                         "is not a legal flash_attention tile")
    grid = (ceil_div(seq_q, block_r), num_heads, batch)
    return grid, (flash_threads(block_r), 1, 1), flash_threadgroup_bytes(head_dim, block_r, block_c, dtype)


# Threads per rope threadgroup: a multiple of the SIMD width that every Apple GPU pipeline of a
# kernel this small allows (the backend checks against the pipeline's maximum as well).
ROPE_THREADGROUP_THREADS = 256


def rope_dispatch(batch: int, num_heads: int, tokens: int, head_dim: int,
                  max_threads: int = ROPE_THREADGROUP_THREADS
                  ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(threadgroups, threads per threadgroup) covering rope's thread grid (D/2, tokens, B*H).

    x spans the D/2 rotation pairs of one token (up to ``max_threads``), y as many tokens as
    fit in the rest of the threadgroup; out-of-range threads return in the kernel.
    """
    for value, name in ((batch, "batch"), (num_heads, "num_heads"), (tokens, "tokens"),
                        (head_dim, "head_dim"), (max_threads, "max_threads")):
        _check_dim(value, name)
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    tx = min(pairs, max_threads)
    ty = max(1, min(tokens, max_threads // tx))
    grid = (ceil_div(pairs, tx), ceil_div(tokens, ty), batch * num_heads)
    return grid, (tx, ty, 1)


def proto1_specs() -> list[MetalSpec]:
    """Prototype 1 / 4: every legal sweep tile x dtype x causal."""
    return [flash_spec(d, r, c, dtype, causal=causal)
            for dtype in DTYPE_CODES for d, r, c in sweep_tiles(dtype) for causal in (False, True)]


#: Prototype 7's variants as flash_spec keywords: each alone (causal, as the models run them),
#: and the two model combinations (Llama: RoPE + causal; Gemma 2: RoPE + window + soft cap +
#: causal); the GQA group is a run-time value of each (or the GQA_GROUP constant, below).
PROTO7_VARIANTS = {
    "base": dict(causal=True),
    "rope": dict(causal=True, rope=True),
    "alibi": dict(causal=True, alibi=True),
    "window": dict(causal=True, window=True),
    "softcap": dict(causal=True, softcap=True),
    "llama": dict(causal=True, rope=True),
    "gemma2": dict(causal=True, rope=True, window=True, softcap=True),
}


def proto7_specs() -> list[MetalSpec]:
    """Prototype 7: base, RoPE, ALiBi, window, soft cap, the model combinations and GQA groups
    (compile-time GQA_GROUP), fused into the flash kernel; non-causal base/RoPE/ALiBi too."""
    tile = (PROTO7_HEAD_DIM, PROTO7_BLOCK_R, PROTO7_BLOCK_C)
    specs = []
    for dtype in DTYPE_CODES:
        specs.append(flash_spec(*tile, dtype))
        specs.append(flash_spec(*tile, dtype, rope=True))
        specs.append(flash_spec(*tile, dtype, alibi=True))
        specs.append(flash_spec(*tile, dtype, causal=True, rope=True, alibi=True))
        specs.append(flash_spec(*tile, dtype, window=True, softcap=True))
        specs.extend(flash_spec(*tile, dtype, gqa_group=g) for g in PROTO7_GQA_GROUPS)
        specs.extend(flash_spec(*tile, dtype, **kw) for kw in PROTO7_VARIANTS.values())
        specs.extend(flash_spec(*tile, dtype, causal=True, gqa_group=g) for g in PROTO7_GQA_GROUPS)
    return specs


def proto4_matrix_specs(quick: bool = False) -> list[MetalSpec]:
    """Prototype 4's archive matrix: HEAD_DIM x BLOCK_R x BLOCK_C x (CAUSAL x DTYPE), legal only.

    The same specs as :func:`proto1_specs`, ordered tile-major; ``quick`` keeps PROTO4_QUICK_TILE.
    """
    if not isinstance(quick, bool):
        raise TypeError(f"quick: expected a bool, got {type(quick).__name__}")
    specs = []
    for d, r, c in itertools.product(SWEEP_HEAD_DIM, SWEEP_BLOCK_R, SWEEP_BLOCK_C):
        if quick and (d, r, c) != PROTO4_QUICK_TILE:
            continue
        for causal in (False, True):
            for dtype in DTYPE_CODES:
                if flash_tile_legal(d, r, c, dtype):
                    specs.append(flash_spec(d, r, c, dtype, causal=causal))
    return specs


def proto4_candidates() -> list[MetalSpec]:
    """Every legal flash_attention spec over the sweep tiles x DTYPE x CAUSAL x ROPE x ALIBI x
    PROTO4_GQA_GROUPS that is not in the archive matrix, in a fixed shuffled order."""
    matrix = {s.canonical() for s in proto1_specs()}
    out = [flash_spec(d, r, c, dtype, causal=causal, rope=rope, alibi=alibi, gqa_group=group)
           for dtype in DTYPE_CODES for d, r, c in sweep_tiles(dtype)
           for causal, rope, alibi in itertools.product((False, True), repeat=3)
           for group in PROTO4_GQA_GROUPS]
    out = [s for s in out if s.canonical() not in matrix]
    random.Random(PROTO4_ORDER_SEED).shuffle(out)
    return out


def proto4_cold_specs() -> list[MetalSpec]:
    """The cold-build sequence: PROTO4_WARMUP_BUILDS, then PROTO4_SINGLE_BUILDS, then the
    max(PROTO4_COLD_COUNTS) specs whose prefixes are the N-variant sets; all distinct."""
    need = PROTO4_WARMUP_BUILDS + PROTO4_SINGLE_BUILDS + max(PROTO4_COLD_COUNTS)
    candidates = proto4_candidates()
    if len(candidates) < need:
        raise ValueError(f"PROTO4_COLD_COUNTS: {need} cold specs needed, only {len(candidates)} legal "
                         "candidates exist")
    return candidates[:need]


def proto4_launch_specs() -> list[MetalSpec]:
    """PROTO4_LAUNCH_REPEATS PROTO4_LAUNCH_DTYPE specs that no earlier Prototype 4 phase builds."""
    cold = {s.canonical() for s in proto4_cold_specs()}
    code = DTYPE_CODES[PROTO4_LAUNCH_DTYPE]
    rest = [s for s in proto4_candidates() if s.canonical() not in cold and s.as_dict()["DTYPE"] == code]
    if len(rest) < PROTO4_LAUNCH_REPEATS:
        raise ValueError(f"PROTO4_LAUNCH_REPEATS: {PROTO4_LAUNCH_REPEATS} launch specs needed, only "
                         f"{len(rest)} candidates left")
    return rest[:PROTO4_LAUNCH_REPEATS]


def proto4_specs() -> list[MetalSpec]:
    """Prototype 4: the archive matrix, the cold-build sequence and the first-dispatch specs."""
    return proto4_matrix_specs() + proto4_cold_specs() + proto4_launch_specs()


def rope_spec(head_dim: int, dtype: str = "float16") -> MetalSpec:
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number for RoPE, got {head_dim}")
    return MetalSpec.make(ROPE_KERNEL, HEAD_DIM=head_dim, DTYPE=DTYPE_CODES[dtype])


def rope_specs() -> list[MetalSpec]:
    return [rope_spec(d, dtype) for dtype in DTYPE_CODES for d in ROPE_HEAD_DIMS]


def smoke_specs() -> list[MetalSpec]:
    return [MetalSpec.make(SMOKE_KERNEL)]


def specs_in_use() -> list[MetalSpec]:
    """Every Metal specialisation attnproto uses, without duplicates, in a stable order."""
    from . import metal_linear_specs, metal_paged_specs  # noqa: PLC0415  (they import this module)

    seen: dict[str, MetalSpec] = {}
    for spec in (proto1_specs() + proto7_specs() + proto4_specs() + rope_specs() + smoke_specs()
                 + metal_paged_specs.proto3_specs() + metal_linear_specs.proto6_specs()):
        seen.setdefault(spec.canonical(), spec)
    return list(seen.values())


def specs_by_kernel() -> dict[str, list[MetalSpec]]:
    out: dict[str, list[MetalSpec]] = {}
    for spec in specs_in_use():
        out.setdefault(spec.name, []).append(spec)
    return out
