"""Prototype 7 constants: the sweep, the variant cases, the targets, the names of what is timed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

PROTOTYPE = "variants"
SWEEP_DTYPE = "bfloat16"
HEAD_DIM = 128
NUM_HEADS = 32
#: Query heads per KV head: multi-head, Gemma 2's 2, Llama 3's 4, a 70B-like 8.
GROUPS = (1, 2, 4, 8)
SEQ_LENS = (2048, 8192)
#: Tokens per batch, fixed: B = TOKENS // N (8 sequences of 2K, 2 of 8K).
TOKENS = 16384
WARMUP = 5
ITERS = 30
#: Gemma 2's logit soft cap of the attention scores.
SOFTCAP = 50.0
#: Gemma 2's sliding window (4096), at most half the sequence (so it skips tiles at N = 2K too).
GEMMA_WINDOW = 4096
LLAMA_GROUP = 4
GEMMA_GROUP = 2

# ---- the targets (same run, same family and tiles) ----
ALIBI_TARGET = 0.03        # fused ALiBi at most 3 % over the base kernel
ROPE_TARGET = 0.05         # fused RoPE at most 5 % over the base kernel (and faster than standalone)
GQA_TARGET = 1.0           # fused GQA no slower than the base (time ratio at most 1)
WINDOW_TARGET = 1.15       # time(W) at most 1.15 x (W / N) x the full (non-causal) time
FLEX_TARGET = 1.3          # every variant at least 1.3x faster than compiled flex_attention

# ---- the FP64 gate slice: first sequence, a few heads, the last query rows ----
#: Query rows checked: the LAST rows of the sequence, so that the FP64 reference (bottom-right
#: aligned) puts them at their true positions for causal, window and RoPE.
GATE_ROWS = 128
#: Ours may err at most this many times torch's own error on the same slice, plus one output
#: rounding (bf16 unit roundoff 2^-8 of the largest |O|).
GATE_TORCH_FACTOR = 2.0
BF16_ROUNDOFF = 2.0 ** -8

# ---- names of what is timed (config "kernel") ----
OURS = "ours_fused"
OURS_BASE = "ours_base"
OURS_BASE_FULL = "ours_base_noncausal"
STANDALONE_ROPE = "ours_rope_kernel+base"
MATERIALISED_GQA = "ours_repeat_kv+base"
ROPE_KERNEL_ONLY = "ours_rope_kernel"
FLEX = "flex_attention"
FLEX_PREROTATED = "torch_rope+flex"
SDPA_GQA = "sdpa_enable_gqa"
SDPA_ALIBI = "sdpa_alibi_mask"
TORCH_ROPE = "torch_rope"
TORCH_ROPE_SDPA = "torch_rope+sdpa"

#: The numpy path (CI): tiny shapes, every case.
CPU_SEQ_LEN = 96
CPU_HEAD_DIM = 32
CPU_HEADS = 4
CPU_GROUPS = (1, 2, 4)
CPU_GROUPS_QUICK = (1, 4)
CPU_BLOCK = 32
CPU_WARMUP, CPU_ITERS = 1, 3
#: numpy float32 (P in float32) against float64: well inside this.
CPU_ATOL = 1e-4


@dataclass(frozen=True)
class Case:
    """One variant point: front-door arguments as a function of N (see :meth:`kwargs`)."""

    name: str
    feature: str                        # "rope", "alibi", "window", "softcap", "model"
    rope: Optional[str] = None          # "half" / "interleaved"
    rope_table: bool = False
    alibi: Optional[str] = None         # "standard" / "slopes"
    window_div: int = 0                 # W = N / window_div
    window_cap: int = 0                 # W = min(window_cap, N / 2)
    softcap: Optional[float] = None
    group: Optional[int] = None         # model cases fix the GQA group

    def window(self, n: int) -> Optional[int]:
        if self.window_div:
            return n // self.window_div
        if self.window_cap:
            return min(self.window_cap, n // 2)
        return None

    def kwargs(self, n: int, table: Any = None, slopes: Any = None) -> Dict[str, Any]:
        """Keyword arguments of attnproto.ops.flash_forward (tables / slopes on the device)."""
        kw: Dict[str, Any] = {}
        if self.rope:
            kw["rope"] = self.rope
            if self.rope_table:
                kw["rope_table"] = table
        if self.alibi == "standard":
            kw["alibi"] = True
        elif self.alibi == "slopes":
            kw["alibi"] = slopes
        if self.window(n):
            kw["window"] = self.window(n)
        if self.softcap:
            kw["softcap"] = self.softcap
        return kw


SINGLE_CASES = (
    Case("rope-half", "rope", rope="half"),
    Case("rope-half-table", "rope", rope="half", rope_table=True),
    Case("rope-interleaved", "rope", rope="interleaved"),
    Case("alibi", "alibi", alibi="standard"),
    Case("alibi-slopes", "alibi", alibi="slopes"),
    Case("window-n8", "window", window_div=8),
    Case("window-n4", "window", window_div=4),
    Case("softcap", "softcap", softcap=SOFTCAP),
)
MODEL_CASES = (
    Case("llama", "model", rope="half", group=LLAMA_GROUP),
    Case("gemma2", "model", rope="half", window_cap=GEMMA_WINDOW, softcap=SOFTCAP, group=GEMMA_GROUP),
)
CASES = SINGLE_CASES + MODEL_CASES
#: The quick GPU sweep (CI on a GPU machine): one length, two groups, one case per feature.
QUICK_SEQ_LENS = (2048,)
QUICK_GROUPS = (1, 4)
QUICK_CASES = ("rope-half", "alibi", "window-n8", "softcap", "llama")


def batch_of(n: int) -> int:
    return max(1, TOKENS // n)


def by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(name)
