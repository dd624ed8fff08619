"""The constant sets Prototype 4 compiles: salted variants of the legal flash_fwd_mma tiles
(cold compiles) and the 72-variant archive matrix (seed FR-5)."""
from __future__ import annotations

from ..registry import ExperimentError
from .common import KERNEL

# What timed cold compiles compile: flash_fwd_mma's translation unit plus a kernel storing the
# salt, so each measured compile has distinct PTX and no code-keyed compile cache can serve it
# (on the H100 machine a repeated compile of identical PTX took ~30 ms instead of ~450 ms).
SALTED_KERNEL = "flash_fwd_mma_salted"
MULTI_ENTRY_KERNEL = "stitch_multi_entry"   # four CAUSAL x DTYPE entries of flash_fwd_mma in one TU
MULTI_ENTRIES = 4
SALT = "VARIANT_SALT"
WARMUP_SALT = -1                            # the untimed first compile's salt (never a measured key)

# ---- the 72-variant matrix (seed FR-5): HEAD_DIM x BLOCK_R x BLOCK_C x VARIANT ----
MATRIX_HEAD_DIMS = (64, 128, 256)
MATRIX_BLOCK_R = (64, 128)
MATRIX_BLOCK_C = (32, 64, 128)
MATRIX_VARIANTS = tuple((causal, dtype) for causal in (False, True) for dtype in ("float16", "bfloat16"))
MATRIX_ROWS_PER_WARP = 16                   # one 16-row MMA tile per warp: WARPS = BLOCK_R / 16
MATRIX_STAGES = 1                           # fits D=256 x BLOCK_C=128 in 227 KB
QUICK_MATRIX = ((128, 64, 64),)             # (head_dim, block_r, block_c) x the 4 variants


def _base_configs() -> list[dict[str, int]]:
    """Every legal flash_fwd_mma tile configuration (proto1's sweep space), as constants."""
    from ...ops import configs  # noqa: PLC0415

    out = []
    for d in configs.SUPPORTED_HEAD_DIMS:
        for causal in (False, True):
            for dtype in configs.DTYPE_CODES:
                out += [c.constants() for c in configs.sweep_space(d, causal, dtype)]
    return out


def salted_variants(count: int, offset: int = 0) -> list[dict[str, int]]:
    """`count` distinct constant sets: legal tile configurations in turn, VARIANT_SALT = round."""
    if count < 1:
        raise ValueError(f"count: must be >= 1, got {count}")
    bases = _base_configs()
    return [{**bases[(offset + i) % len(bases)], SALT: (offset + i) // len(bases)} for i in range(count)]


def matrix_specs(quick: bool = False) -> list[tuple[str, dict[str, int]]]:
    """The 72-variant archive matrix (4 in quick mode); every entry legal on sm_90."""
    from ...ops import configs  # noqa: PLC0415

    tiles = QUICK_MATRIX if quick else [(d, r, c) for d in MATRIX_HEAD_DIMS for r in MATRIX_BLOCK_R
                                        for c in MATRIX_BLOCK_C]
    out = []
    for d, r, c in tiles:
        for causal, dtype in MATRIX_VARIANTS:
            cfg = configs.FlashConfig(d, r, c, r // MATRIX_ROWS_PER_WARP, MATRIX_STAGES, causal, dtype)
            ok, why = cfg.is_legal()
            if not ok:
                raise ExperimentError(f"matrix entry {cfg.label()} is illegal: {why}")
            out.append((KERNEL, cfg.constants()))
    return out


_SALTS = iter(range(1, 2**31))


def fresh_salt() -> int:
    """A salt no earlier compile of this process used."""
    return next(_SALTS)
