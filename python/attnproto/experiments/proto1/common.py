"""Prototype 1's constants and the helpers every part of it shares (labels, best-of lookups)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# AUTO: the kernel name of the default call, which is also its record kernel in this sweep.
from ...ops.problem import AUTO

PROTOTYPE = "proto1"

# ---- the GPU sweep (FA3 paper, section 4.1: 16K tokens, hidden 2048) ----
TOKENS = 16384
HIDDEN = 2048
HEAD_DIMS = (64, 128, 256)
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_HEAD_DIMS = (64, 128)
QUICK_SEQ_LENS = (1024, 4096)
DTYPE = "bfloat16"
# Anchors that compile per shape (flex_attention) run on these lengths only, to bound compile time.
FLEX_SEQ_LENS = (4096, 16384)
FLEX_HEAD_DIMS = (64, 128, 256)
# Lengths at and above which the floor (>= 1.0x SDPA flash) applies.
FLOOR_MIN_SEQ = 4096
# Causal throughput should stay within 10 % of non-causal at N = 16K.
CAUSAL_TARGET_RATIO = 0.9
# kernel="auto" must be within 3 % of the best family x tile the same sweep measured.
AUTO_BAR_RATIO = 0.97

# ---- timing: warm-up launches, then the median of ITERS (L2 flushed before each on GPUs) ----
WARMUP = 3
ITERS = 30
QUICK_ITERS = 5
FLUSH_L2 = True

# ---- correctness: the FP64 gate tolerances (attnproto.lab) and the full-size check ----
ATOL, RTOL = 5e-3, 1e-2
# Full-size outputs must agree with the reference anchor's to this max abs difference (two BF16 roundings apart).
FULL_SIZE_DIFF = 3e-2

# ---- byte count (the FLOP count is attnproto.lab.attention_flops) ----
ELEM_BYTES = 2              # bf16
LSE_BYTES = 4
TERA = 1e12
GIGA = 1e9
MS = 1e-3



def problem(head_dim: int, seq_len: int) -> tuple[int, int]:
    """(batch, heads) of the FA3 setting for a head dim and length."""
    return max(1, TOKENS // seq_len), max(1, HIDDEN // head_dim)


def min_bytes(batch: int, heads: int, seq: int, head_dim: int, elem_bytes: int = ELEM_BYTES) -> float:
    """Q, K, V read once, O and LSE written once."""
    return float(4 * batch * heads * seq * head_dim * elem_bytes + batch * heads * seq * LSE_BYTES)


def metrics(flops: float, nbytes: float, median_ms: float) -> dict[str, float]:
    return {"tflops": flops / (median_ms * MS) / TERA, "gbps": nbytes / (median_ms * MS) / GIGA,
            "median_ms": median_ms}


# ---------------------------------------------------------------- records
def family_of(record: dict) -> str | None:
    """Our family of a record (None for anchors and the auto call)."""
    from ...ops.chooser import record_family  # noqa: PLC0415

    return record_family(record)


def ours(record: dict) -> bool:
    return family_of(record) is not None


def label(config: dict[str, Any]) -> str:
    """Human label of a record's config: "wgmma 128x128 wg2 s2", "auto (mma 128x64 w4 s1)", "sdpa_cudnn"."""
    from ...ops import families  # noqa: PLC0415
    from ...ops.chooser import ConfigView  # noqa: PLC0415

    if config.get("kernel") == AUTO:
        return f"auto ({config.get('chose', '?')})"
    fam = family_of({"config": config})
    if fam is None:
        return str(config.get("kernel"))
    return families.get(fam).config_label(ConfigView(config))


def best(records: Sequence[dict], **match) -> dict | None:
    """Our fastest record matching ``match`` (config fields; ``family=`` too)."""
    rows = [r for r in records if ours(r) and all(
        (family_of(r) if k == "family" else r["config"].get(k)) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["metrics"]["tflops"], default=None)


def anchor(records: Sequence[dict], name: str, **match) -> dict | None:
    rows = [r for r in records if r["config"]["kernel"] == name and all(r["config"].get(k) == v
                                                                          for k, v in match.items())]
    return rows[0] if rows else None


def auto_record(records: Sequence[dict], **match) -> dict | None:
    return anchor(records, AUTO, **match)
