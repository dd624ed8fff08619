"""``proto8``: the kernels in a real model — can a framework take a custom attention kernel
without a fork, and what do fusion and paging buy end to end in a Llama?

Modules: ``common`` (sweeps, budgets), ``glue`` (lines of glue, graph breaks, opcheck, dispatch
overhead, CUDA-graph replay), ``e2e`` (prefill and decode per attention implementation),
``findings``.
"""
from __future__ import annotations

import os

from ..registry import ExperimentContext, ExperimentResult, Rederivation, experiment
from . import common as C

__all__ = ["run"]


def rederive_findings(ctx: ExperimentContext, records: list, previous: list) -> Rederivation:
    """The run's findings again from its committed records (``attnproto kb rederive``)."""
    from .findings import e2e_findings, framework_findings  # noqa: PLC0415

    return Rederivation(findings=framework_findings(ctx, records) + e2e_findings(ctx, records))


@experiment("proto8", C.PROTOTYPE, "attnproto in PyTorch + transformers: glue, graph breaks, dispatch, end-to-end Llama",
            backends=("cpu", "cuda"), rederive=rederive_findings)
def run(ctx: ExperimentContext) -> ExperimentResult:
    """Hypothesis: torch.library custom ops with fake implementations and transformers' attention
    interface take our kernels with a few hundred lines of glue, zero graph breaks and a dispatch
    overhead of a few microseconds; end to end, eager HF decode is bound by Python and launches (flat
    in batch), so the attention kernel shows only under CUDA graphs, where our captured decode step
    (paged cache, GQA in the kernel, no repeat_kv) beats HF's static-cache step at batch 32 / 4K and
    nears the step's floor (weights + KV bytes over the measured bandwidth) when attention-bound.

    Sweep (cuda, TinyLlama-1.1B shape, random bf16 weights): framework measures (glue lines,
    dynamo explain, opcheck of the six ops, per-call host time of the op / our plan / eager SDPA /
    a CUDA-graph replay at B=1, 32/4 heads, D=64, context 1K); prefill at batch 1, prompts 512, 2K,
    8K; decode at (1, 1K), (32, 4K), (64, 16K) (``--full``: batch 1/8/32/64 x context 1K/4K/16K)
    for eager, sdpa, flex_attention (``--full`` only: it compiles per shape) and attnproto, each in
    eager mode and under CUDA graphs (ours: GraphDecoder; HF: a StaticCache step captured), caches
    filled with random K/V; the copy bandwidth and our attention kernels' device time at every
    point; a run budget (GPU_BUDGET_S) bounds every point (skips recorded in notes.json).
    Sweep (cpu, quick): the tiny model in float32: the framework measures, prefill of 32 tokens,
    decode at batch 2 / context 48 in eager mode, greedy tokens checked against eager attention.
    """
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ...integrations import models as M  # noqa: PLC0415
    from . import e2e, glue  # noqa: PLC0415
    from .findings import e2e_findings, framework_findings  # noqa: PLC0415

    device = "cuda" if ctx.backend == "cuda" else "cpu"
    full = bool(ctx.extras.get("full"))
    if device == "cuda":
        dtype, shape = getattr(torch, C.DTYPE), "tinyllama"
    else:
        dtype, shape = torch.float32, C.CPU_SHAPE
    model = M.build_model(shape=shape, dtype=dtype, device=device, attn="attnproto")
    ids = torch.randint(0, model.config.vocab_size, (1, C.CPU_PROMPT), generator=torch.Generator().manual_seed(0))
    records = glue.framework_records(ctx, model, ids.to(device), device, dtype)
    if device == "cuda":
        budget = e2e.Budget(C.FULL_GPU_BUDGET_S if full else float(os.environ.get(C.BUDGET_ENV, C.GPU_BUDGET_S)))
        points = ([(b, n) for n in C.DECODE_CONTEXTS for b in C.DECODE_BATCHES] if full
                  else list(C.DEFAULT_DECODE_POINTS))
        records += e2e.decode_points(ctx, model, C.E2E_IMPLS, points, device, budget, graphs=True)
        records += e2e.prefill_points(ctx, model, C.E2E_IMPLS, C.PREFILL_LENS, device, budget)
    else:
        budget = e2e.Budget(float("inf"))
        e2e.check_tokens(model, device, C.CPU_STEPS)
        impls = ("eager", "sdpa", "attnproto")
        records += e2e.prefill_points(ctx, model, impls, (C.CPU_PROMPT,), device, budget)
        records += e2e.decode_points(ctx, model, impls, [(C.CPU_BATCH, C.CPU_CONTEXT)], device, budget, graphs=False)
    (ctx.out_dir / "notes.json").write_text(json.dumps({"skipped": ctx.extras.get("skipped", [])}, indent=1))
    findings = framework_findings(ctx, records) + e2e_findings(ctx, records)
    return ExperimentResult(records, findings)
