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

# Prototype 7 (seed task 4.20): N=2048, D=128, 32 heads, GQA groups 1/2/4/8. The tile is
# the largest legal D=128 tile of the sweep with Br=32 (Br=64 does not fit at D=128).
PROTO7_HEAD_DIM = 128
PROTO7_BLOCK_R = 32
PROTO7_BLOCK_C = 64
PROTO7_GQA_GROUPS = (1, 2, 4, 8)

# Head dimensions the standalone RoPE kernel is specialised for (the sweep's).
ROPE_HEAD_DIMS = SWEEP_HEAD_DIM


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
               gqa_group: int = 0) -> MetalSpec:
    """The flash_attention specialisation; raises ValueError for a tile the kernel rejects."""
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
        GQA_GROUP=gqa_group)


def sweep_tiles(dtype: str = "float16") -> list[tuple[int, int, int]]:
    """(head_dim, block_r, block_c) of the seed sweep that fit in 32 KB."""
    return [(d, r, c) for d, r, c in itertools.product(SWEEP_HEAD_DIM, SWEEP_BLOCK_R, SWEEP_BLOCK_C)
            if flash_tile_legal(d, r, c, dtype)]


def illegal_sweep_tiles(dtype: str = "float16") -> list[tuple[int, int, int]]:
    """Sweep tiles the kernel rejects at compile time (over 32 KB)."""
    return [(d, r, c) for d, r, c in itertools.product(SWEEP_HEAD_DIM, SWEEP_BLOCK_R, SWEEP_BLOCK_C)
            if not flash_tile_legal(d, r, c, dtype)]


def proto1_specs() -> list[MetalSpec]:
    """Prototype 1 / 4: every legal sweep tile x dtype x causal."""
    return [flash_spec(d, r, c, dtype, causal=causal)
            for dtype in DTYPE_CODES for d, r, c in sweep_tiles(dtype) for causal in (False, True)]


def proto7_specs() -> list[MetalSpec]:
    """Prototype 7: base, RoPE, ALiBi and GQA groups, fused into the flash kernel."""
    tile = (PROTO7_HEAD_DIM, PROTO7_BLOCK_R, PROTO7_BLOCK_C)
    specs = []
    for dtype in DTYPE_CODES:
        specs.append(flash_spec(*tile, dtype))
        specs.append(flash_spec(*tile, dtype, rope=True))
        specs.append(flash_spec(*tile, dtype, alibi=True))
        specs.append(flash_spec(*tile, dtype, causal=True, rope=True, alibi=True))
        specs.extend(flash_spec(*tile, dtype, gqa_group=g) for g in PROTO7_GQA_GROUPS)
    return specs


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
    seen: dict[str, MetalSpec] = {}
    for spec in proto1_specs() + proto7_specs() + rope_specs() + smoke_specs():
        seen.setdefault(spec.canonical(), spec)
    return list(seen.values())


def specs_by_kernel() -> dict[str, list[MetalSpec]]:
    out: dict[str, list[MetalSpec]] = {}
    for spec in specs_in_use():
        out.setdefault(spec.name, []).append(spec)
    return out
