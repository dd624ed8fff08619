"""``proto7``: RoPE, ALiBi, GQA, sliding window and logit soft cap as compile-time variants of the
flash kernels — what each costs over the base kernel, fused against standalone, against
compiled flex_attention and torch SDPA, and that illegal combinations fail at compile time.

Modules: ``common`` (sweep, cases, targets), ``cuda`` (the H200 sweep), ``anchors`` (torch
SDPA, torch RoPE, compiled flex_attention), ``gate`` (the FP64 gate of a slice), ``cpu`` (the
numpy path CI runs), ``metal`` (the Metal path), ``validation`` (AC-5.5), ``findings``,
``summary`` (the report table).
"""
from __future__ import annotations

from ..registry import ExperimentContext, ExperimentResult, Rederivation, experiment
from . import common as C
from .summary import summary_table

__all__ = ["rederive_findings", "run", "summary_table"]


def rederive_findings(ctx: ExperimentContext, records: list, previous: list) -> Rederivation:
    """The CUDA run's findings again from its committed records (``attnproto kb rederive``): the
    sweep's findings (:func:`findings.findings_of`) and the AC-5.5 finding from its records."""
    if ctx.backend != "cuda":
        return Rederivation(unsupported=f"proto7's {ctx.backend} findings are built in the run's loop")
    from .findings import findings_of  # noqa: PLC0415
    from .validation import ac55_finding  # noqa: PLC0415

    ac = [r for r in records if r["config"].get("sweep") == "ac55"]
    sweep = [r for r in records if r["config"].get("sweep") != "ac55"]
    return Rederivation(findings=findings_of(ctx, sweep) + ([ac55_finding(ctx, ac)] if ac else []))


@experiment("proto7", C.PROTOTYPE, "RoPE / ALiBi / GQA / window / softcap as fused variants vs base, standalone, flex, SDPA",
            backends=("cpu", "cuda", "metal"), rederive=rederive_findings)
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: a variant that is a compile-time policy of the flash kernel costs almost
    nothing beyond its arithmetic: fused ALiBi (one multiply-add per score) stays within 3 % of
    the base kernel, fused RoPE (Q rotated once per CTA, K as its tiles land, by the producer)
    within 5 % and faster than a standalone RoPE pass over Q and K + the base kernel, fused GQA
    (kv_head = q_head / group) is no slower than multi-head attention because it reads less
    K/V, a left window of W tokens skips the key tiles outside it so its time is within 1.15x of
    (W / N) x the full (non-causal) attention time, and every variant runs at least 1.3x faster
    than compiled flex_attention with the same score_mod / block mask; illegal combinations
    (ROPE_TABLE without ROPE, RoPE on paged K) fail in a static_assert and at the front door.

    Sweep (cuda): bf16, D = 128, 32 query heads, GQA groups 1/2/4/8 (Hkv 32/16/8/4), N = 2048
    and 8192 at 16384 tokens per batch (B = 8 and 2), causal. Per (N, group), on the tiles the
    chooser picks for the base kernel (every variant on the same family and tiles): the base
    kernel (causal and non-causal), each variant alone (RoPE rotate-half computed in the
    kernel and from a cos/sin table, RoPE interleaved, ALiBi standard slopes and caller slopes,
    window N/8 and N/4, softcap 50) and the model combinations (Llama: RoPE + GQA 4 + causal;
    Gemma 2: RoPE + window min(4096, N/2) + softcap 50 + GQA 2 + causal); standalone forms:
    our RoPE kernel on Q and K + the base kernel, our repeat_kv + the base kernel with Hkv = Hq.
    The wgmma family runs all; the mma family runs each variant it takes (a refusal is recorded
    with its reason). Anchors of the same run: torch SDPA with enable_gqa, SDPA with a
    materialised ALiBi bias in attn_mask, a standalone torch RoPE (eager fp32, as Hugging Face's
    apply_rotary_pos_emb) + SDPA, compiled flex_attention with the same score_mod / block mask
    (ALiBi, softcap, window, causal; RoPE: flex on pre-rotated inputs + the torch RoPE) at
    N = 8192 (both N with --full). Every point FP64-gated on the last 128 query rows of the
    first sequence and two heads (error at most 2x torch's on the same slice + one bf16
    rounding). Timer: CUDA events, 5 warm-up, median of 30. Sweep (metal): ``metal.run_metal``
    (statically checked on Linux, not run there). Sweep (cpu): the numpy loop through the front
    door, every case at N = 96, D = 32, 4 heads, groups 1/2/4, FP64-checked, and AC-5.5 (NVRTC).
    """
    if ctx.backend == "cuda":
        from .cuda import run_cuda  # noqa: PLC0415

        return run_cuda(ctx)
    if ctx.backend == "metal":
        from .metal import run_metal  # noqa: PLC0415

        return run_metal(ctx)
    from .cpu import run_cpu  # noqa: PLC0415

    return run_cpu(ctx)
