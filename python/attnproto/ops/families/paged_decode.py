"""Family "paged_decode": split-KV decode over a paged KV cache (shaders/cuda/paged_decode.cu
and its log-sum-exp merge paged_decode_reduce.cu), mma.sync, sm_80+.

One CTA takes one partition of one sequence's context for ``heads`` query heads of one kv
head (the whole GQA group when it fits: each K/V row is then read once), NQ <= 8 query
tokens each. :class:`DecodeConfig` holds the tile; :func:`choose_config` packs the group and
:func:`partition_plan` picks the partition count (the rule below); :meth:`prepare` returns a
:class:`DecodePlan` whose workspace is fixed, so ``launch()`` never synchronises and a decode
step can be captured in a CUDA graph.

Partition rule (split-KV): without a split the grid has ``B * Hkv * group / heads`` CTAs. If
that fills the ``TARGET_CTAS_PER_SM`` x SMs resident slots, one partition (no reduce).
Otherwise the context is cut into the most partitions that still run in ONE wave (a second,
mostly idle wave only adds a tail: the split findings of results/nvidia-h200/proto3,
"split-kv-b*", compare every count with this rule's), but no partition gets fewer than
``MIN_PARTITION_KEYS`` keys (below that the per-CTA prologue, merge
and the reduce's extra traffic outweigh the parallelism). Prototype 3 sweeps the partition count to measure both
constants (finding "when split-KV pays").

Variants (Prototype 7, :mod:`attnproto.ops.variants`): ALiBi (standard or given slopes), a left
sliding window and a logit soft cap are compile-time constants of the partition kernel
(:data:`VARIANT_FEATURES`; RoPE is not: paged K is stored rotated). With a window only the last
``window + Nq - 1`` keys of a sequence are visible, so :func:`partition_plan` sizes the
partitions over that span instead of the whole context (the partitions left of the window load
no tile and cost one near-empty CTA each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..paged_problem import CONTIGUOUS, HEAD_DIMS, MAX_DECODE_TOKENS, PAGE_SIZES, PagedProblem
from ..variants import BASE, Variant

KERNEL = "paged_decode"
REDUCE_KERNEL = "paged_decode_reduce"
DTYPE_CODES = {"float16": 0, "bfloat16": 1}
MIN_COMPUTE = (8, 0)               # bf16 mma.sync and cp.async
WARP = 32
MMA_M = 16
MMA_N = 8
MMA_K = 16
ELEMENT_BYTES = 2
CHUNK_ELEMS = 8                    # one 16-byte cp.async
FLOAT_BYTES = 4
MAX_ACC_REGS = 192                 # the kernel's kMaxAccRegs (spill bound of include/fa_mma.cuh)
SMEM_LIMIT = 232448                # H100 / H200 opt-in shared memory per block (227 KB)
MAX_WARPS = 8
STAGE_RANGE = (2, 6)
#: CTAs per SM the split aims for: two resident CTAs of the default tile (smem ~100 KB each at
#: D = 128) keep four K/V tiles in flight per SM, enough to cover the latency of HBM.
TARGET_CTAS_PER_SM = 2
#: Fewest keys per partition (see the module doc): one default key tile. Chosen from the H200
#: split sweep at B = 1 (findings split-kv-b1-n1024/-n4096/-n32768 in results/nvidia-h200/proto3,
#: which give the best fixed count and this rule's ratio to it at each context).
MIN_PARTITION_KEYS = 64
#: Most partitions of one sequence (bounds the workspace and the reduce's loop).
MAX_PARTITIONS = 1024
#: The variant features the partition kernel takes (attnproto.ops.variants.FEATURES).
VARIANT_FEATURES = ("alibi_standard", "alibi_slopes", "window", "softcap")
#: The variants CI NVRTC-compiles beside the base kernel: each feature alone, Gemma 2's window +
#: soft cap, and all three at once with each slope source.
VARIANT_SPECIALISATIONS = (
    Variant(alibi="standard"),
    Variant(alibi="slopes"),
    Variant(window=True),
    Variant(softcap=True),
    Variant(window=True, softcap=True),
    Variant(alibi="standard", window=True, softcap=True),
    Variant(alibi="slopes", window=True, softcap=True),
)


@dataclass(frozen=True)
class DecodeConfig:
    """Tile of the partition kernel: ``heads`` query heads x NQ tokens per CTA, ``warps`` warps of
    ``keys_per_warp`` keys each per K/V tile, a ``stages``-deep cp.async ring."""

    heads: int
    warps: int = 4
    keys_per_warp: int = 16
    stages: int = 3

    @property
    def tile_keys(self) -> int:
        return self.warps * self.keys_per_warp

    def label(self) -> str:
        return f"h{self.heads} w{self.warps} k{self.keys_per_warp} s{self.stages}"


def rows_padded(config: DecodeConfig, nq: int) -> int:
    return -(-config.heads * nq // MMA_M) * MMA_M


def shared_bytes(config: DecodeConfig, head_dim: int, nq: int) -> int:
    """Mirrors kSmemBytes of paged_decode.cu."""
    rows = rows_padded(config, nq)
    q_tile = rows * head_dim * ELEMENT_BYTES
    ring = 2 * config.stages * config.tile_keys * head_dim * ELEMENT_BYTES
    merge = config.warps * rows * (head_dim + 2) * FLOAT_BYTES + config.warps * rows * FLOAT_BYTES
    return q_tile + max(ring, merge)


def legal(config: DecodeConfig, head_dim: int, nq: int, group: int) -> Tuple[bool, str]:
    """The kernel's static_asserts, as (ok, reason)."""
    threads = config.warps * WARP
    chunks = head_dim // CHUNK_ELEMS
    m_tiles = rows_padded(config, nq) // MMA_M
    acc = m_tiles * (config.keys_per_warp // MMA_N + head_dim // MMA_N) * 4
    if head_dim not in HEAD_DIMS:
        return False, f"head_dim {head_dim} not in {HEAD_DIMS}"
    if not 1 <= nq <= MAX_DECODE_TOKENS:
        return False, f"NQ {nq} not in [1, {MAX_DECODE_TOKENS}]"
    if config.heads < 1 or group % config.heads:
        return False, f"heads {config.heads} must divide the GQA group {group}"
    if not 1 <= config.warps <= MAX_WARPS:
        return False, f"warps {config.warps} not in [1, {MAX_WARPS}]"
    if config.keys_per_warp < MMA_K or config.keys_per_warp % MMA_K:
        return False, f"keys_per_warp {config.keys_per_warp} is not a positive multiple of {MMA_K}"
    if not STAGE_RANGE[0] <= config.stages <= STAGE_RANGE[1]:
        return False, f"stages {config.stages} not in {STAGE_RANGE}"
    if threads % chunks or config.tile_keys % (threads // chunks):
        return False, "copy geometry: threads must cover whole rows and the tile whole row steps"
    if acc > MAX_ACC_REGS:
        return False, f"{acc} accumulator floats per thread exceed {MAX_ACC_REGS} (fewer heads per CTA)"
    if rows_padded(config, nq) > threads:
        return False, "more query rows than threads"
    smem = shared_bytes(config, head_dim, nq)
    if smem > SMEM_LIMIT:
        return False, f"{smem} bytes of shared memory exceed {SMEM_LIMIT}"
    return True, ""


def default_stages(head_dim: int) -> int:
    """Three stages (two tiles in flight) where the ring stays near 100 KB; two at D = 256."""
    return 2 if head_dim == 256 else 3


def choose_config(head_dim: int, nq: int, group: int, *, packed: bool = True) -> Tuple[DecodeConfig, str]:
    """The default tile: the most heads of the group per CTA that stay legal (``packed``), or one
    head per CTA (``packed=False``: every query head reads its K/V on its own, the baseline of
    the GQA-packing finding)."""
    stages = default_stages(head_dim)
    candidates = [h for h in range(group, 0, -1) if group % h == 0] if packed else [1]
    for heads in candidates:
        cfg = DecodeConfig(heads=heads, stages=stages)
        if legal(cfg, head_dim, nq, group)[0]:
            why = ("the whole GQA group in one CTA" if heads == group else
                   f"{heads} of the group's {group} heads per CTA (register budget)") if packed else "one head per CTA"
            return cfg, why
    raise ValueError(f"q: no legal decode tile for head_dim {head_dim}, {nq} tokens, group {group}")


def partition_plan(problem: PagedProblem, config: DecodeConfig, num_sms: int, num_partitions: Any = "auto",
                   max_context: Optional[int] = None, window: int = 0) -> Tuple[int, int, str]:
    """(partitions in the grid, keys per partition, why). The grid always covers the table's whole
    capacity (a context may grow up to it without a new plan); ``max_context`` (the longest context
    the caller expects, default the capacity) sizes the partitions. ``window`` (0: none): the
    visible span of one step is window + Nq - 1 keys, which then sizes them (never fewer keys per
    partition than cover the capacity in MAX_PARTITIONS)."""
    capacity = problem.capacity
    tile = config.tile_keys
    hint = capacity if max_context is None else int(max_context)
    if not 1 <= hint <= capacity:
        raise ValueError(f"max_context: {max_context} out of range [1, {capacity}] (the table's capacity)")
    windowed = window > 0 and window + problem.seq_q - 1 < hint
    if windowed:
        hint = window + problem.seq_q - 1
    if num_partitions == "auto":
        ctas = problem.batch * problem.num_kv_heads * (problem.group // config.heads)
        slots = TARGET_CTAS_PER_SM * num_sms
        if ctas >= slots:
            parts, why = 1, f"{ctas} CTAs fill the {slots} slots ({TARGET_CTAS_PER_SM} per SM x {num_sms} SMs): no split"
        else:
            want = slots // ctas  # the most partitions that still run in one wave
            cap = max(1, math.ceil(hint / MIN_PARTITION_KEYS))
            parts = max(1, min(want, cap, MAX_PARTITIONS))
            why = (f"{ctas} CTAs < {slots} slots: {want} partitions fill one wave"
                   + (f", capped at {cap} (>= {MIN_PARTITION_KEYS} keys each)" if parts < want else ""))
    else:
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
            raise ValueError(f"num_partitions: expected 'auto' or a positive int, got {num_partitions!r}")
        parts, why = min(num_partitions, MAX_PARTITIONS), "given"
    size = math.ceil(math.ceil(hint / parts) / tile) * tile
    if windowed:  # the partitions of the span, repeated over the capacity: within MAX_PARTITIONS
        size = max(size, math.ceil(math.ceil(capacity / MAX_PARTITIONS) / tile) * tile)
        why += f"; sized over the window's {hint} visible keys"
    grid = math.ceil(capacity / size)
    if grid > MAX_PARTITIONS:
        raise ValueError(f"max_context: partitions of {size} keys over a capacity of {capacity} need {grid} "
                         f"partitions, over {MAX_PARTITIONS}")
    return grid, size, why


def check_variant_features(variant: Variant) -> None:
    """ValueError naming the argument of a feature the partition kernel does not take."""
    for feature in variant.features():
        if feature not in VARIANT_FEATURES:
            arg = "rope" if feature.startswith("rope") else feature.split("_")[0]
            raise ValueError(f"{arg}: the paged decode kernel takes {', '.join(VARIANT_FEATURES)}, not {feature}"
                             + (" (paged K is stored rotated; use rope_append / fused_prefill)"
                                if arg == "rope" else ""))


def constants(problem: PagedProblem, config: DecodeConfig, split: bool,
              variant: Optional[Variant] = None) -> Dict[str, int]:
    """The partition kernel's constants; ``variant`` None is the base kernel (every variant constant 0)."""
    variant = BASE if variant is None else variant
    check_variant_features(variant)
    page = 0 if problem.layout == CONTIGUOUS else problem.block_size
    return {"HEAD_DIM": problem.head_dim, "PAGE_SIZE": page, "HEADS": config.heads,
            "NQ": problem.seq_q, "WARPS": config.warps, "KEYS_PER_WARP": config.keys_per_warp,
            "STAGES": config.stages, "SPLIT": int(split), "DTYPE": DTYPE_CODES[problem.dtype],
            **variant.constants()}


def reduce_constants(problem: PagedProblem) -> Dict[str, int]:
    return {"HEAD_DIM": problem.head_dim, "NQ": problem.seq_q, "DTYPE": DTYPE_CODES[problem.dtype]}


def specialisations() -> List[Tuple[str, Dict[str, int]]]:
    """What CI compiles and the device precompiles, every constant value at least once: each page
    size (and the contiguous policy, 0) x split x dtype at D = 128, one token, the packed group of 8
    (Prototype 3's main shape); and each D x dtype x NQ in {1, 4} x heads per CTA (groups 1, 4, 8)
    at page 16, split and not; plus the reduce of every D x NQ x dtype; and each of
    :data:`VARIANT_SPECIALISATIONS` at the main shape (split, bf16; NQ 4 for the window)."""
    def spec(d: int, page: int, heads: int, nq: int, split: int, code: int,
             variant: Variant = BASE) -> Tuple[str, Dict[str, int]]:
        cfg = DecodeConfig(heads=heads, stages=default_stages(d))
        return (KERNEL, {"HEAD_DIM": d, "PAGE_SIZE": page, "HEADS": heads, "NQ": nq, "WARPS": cfg.warps,
                         "KEYS_PER_WARP": cfg.keys_per_warp, "STAGES": cfg.stages, "SPLIT": split, "DTYPE": code,
                         **variant.constants()})

    out: List[Tuple[str, Dict[str, int]]] = []
    main_heads = choose_config(128, 1, 8)[0].heads
    for code in DTYPE_CODES.values():
        for page in (0,) + PAGE_SIZES:
            for split in (0, 1):
                out.append(spec(128, page, main_heads, 1, split, code))
        for d in HEAD_DIMS:
            for nq in (1, 4):
                for h in sorted({choose_config(d, nq, g)[0].heads for g in (1, 4, 8)}):
                    for split in (0, 1):
                        out.append(spec(d, 16, h, nq, split, code))
                out.append((REDUCE_KERNEL, {"HEAD_DIM": d, "NQ": nq, "DTYPE": code}))
    bf16 = DTYPE_CODES["bfloat16"]
    for variant in VARIANT_SPECIALISATIONS:
        nq = 4 if variant.window else 1
        out.append(spec(128, 16, choose_config(128, nq, 8)[0].heads, nq, 1, bf16, variant))
    out.append(spec(64, 128, 4, 1, 0, DTYPE_CODES["float16"], VARIANT_SPECIALISATIONS[-1]))
    seen, unique = set(), []
    for name, c in out:
        key = (name, tuple(sorted(c.items())))
        if key not in seen:
            seen.add(key)
            unique.append((name, c))
    return unique
