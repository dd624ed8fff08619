"""Prototype 2's constants and the record selection shared by its role modules."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...findings import fmt_pct
from ...ops import stitch

PROTOTYPE = "proto2"
ARCH_FALLBACK = "sm_90a"
# (batch, heads, seq_len, head_dim, causal), BF16: N=2048 D=128, N=4096 D=64, N=2048 D=128 causal.
SHAPES = stitch.BENCH_PROBLEMS
DTYPE = stitch.BENCH_DTYPE
QUICK_SHAPES = ((1, 8, 1024, 128, False),)
WARMUP = 4
ITERS = 30
QUICK_ITERS = 5
BUILD_REPEATS = 2   # timing records need at least 2 samples
# AC-2.4 / AC-2.6: stitching is acceptable when it costs less than this.
STITCH_BUDGET_PCT = 1.0


def rows(records: Iterable[dict[str, Any]], phase: str, **match: Any) -> list[dict[str, Any]]:
    """The records of ``phase`` whose config has every ``match`` key at that value."""
    return [r for r in records
            if r["config"]["phase"] == phase and all(r["config"].get(k) == v for k, v in match.items())]


def signed_pct(pct: float) -> str:
    """A percentage (already x100) with an explicit sign when positive: 1.234 -> "+1.23 %"."""
    return ("+" if pct > 0 else "") + fmt_pct(pct / 100.0)
