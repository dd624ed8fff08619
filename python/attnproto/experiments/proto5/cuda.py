"""Prototype 5's measured phase (CUDA): the DSL families and our hand-written ones on the same
inputs, each FP64-gated first (attnproto.lab.fp64_gate on fresh inputs, poisoned outputs),
its full-size output checked against the first hand-written family's on the same inputs,
then timed with the lab timer (L2 flushed, as Prototype 1); TFLOPS from
attnproto.lab.attention_flops.

The Triton family runs autotuned (``families.triton.AUTOTUNE``: what a Triton author ships);
Helion benchmarks the same tile list (``families.helion.AUTOTUNE``); our families run the
tile ``kernel=NAME`` picks (their fastest measured Prototype 1 tile).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

from ... import lab
from ...ops import chooser, families
from ...ops import flash as _flash
from ...ops.problem import DeviceSpec, ProblemSpec
from ..registry import ExperimentContext
from . import codegen
from ..proto1.common import FLUSH_L2, FULL_SIZE_DIFF
from .common import DSL_FAMILIES, DTYPE, HAND_WRITTEN, HIDDEN, MEASURED_PHASE, MS, TERA, TOKENS, WARMUP


def _config(name: str) -> Any:
    """The config a family is measured with: its DSL's autotuner where it has one
    (``autotune_config``), else None (the family's own choice)."""
    return getattr(families.get(name), "autotune_config", None)


def _kernels(device: DeviceSpec, spec: ProblemSpec, notes: Dict[str, str]) -> List[str]:
    """The families measured at ``spec``: hand-written first (the first is the full-size anchor)."""
    out = []
    for name in HAND_WRITTEN + DSL_FAMILIES:
        if name not in families.names():
            notes[name] = "not a registered family"
            continue
        ok, why = families.get(name).supports_spec(spec, device)
        if ok:
            out.append(name)
        else:
            notes[name] = why
    return out


def _gate(ctx: ExperimentContext, be: Any, device: DeviceSpec, name: str, spec: ProblemSpec) -> lab.GateResult:
    """The FP64 gate of a family's kernel: our families at the tile they run here, DSL families at
    their default tile (their autotuned tile is checked against the anchor at full size: gating
    it would autotune again on every gate shape)."""
    fam = families.get(name)
    config = fam.default_config(spec, device)[0] if fam.dsl else chooser.family_choice(fam, spec, device)[0]
    return lab.fp64_gate(lambda q, k, v: fam.run_host(q, k, v, causal=spec.causal, dtype=DTYPE, config=config,
                                                     backend=be),
                         head_dim=spec.head_dim, causal=spec.causal, dtype=DTYPE, rng=ctx.rng)


def measured_records(ctx: ExperimentContext, head_dims: Tuple[int, ...], seq_lens: Tuple[int, ...],
                     iters: int) -> Tuple[List[dict], Dict[str, str]]:
    """One record per (kernel, D, causal, N) that passed its gate and the full-size check."""
    import torch  # noqa: PLC0415

    from ... import backend as _backend  # noqa: PLC0415

    be = _backend.get("cuda")
    device = DeviceSpec.from_backend(be)
    records, notes, gates = [], {}, {}
    for d in ctx.progress(head_dims, desc="proto5[cuda]"):
        heads = HIDDEN // d
        for causal in (False, True):
            for n in seq_lens:
                batch = max(1, TOKENS // n)
                spec = ProblemSpec(batch, heads, heads, n, n, d, DTYPE, causal)
                q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                anchor = None
                for name in _kernels(device, spec, notes):
                    key = (name, d, causal) if families.get(name).dsl else (name, d, causal, n)
                    if key not in gates:
                        gates[key] = _gate(ctx, be, device, name, spec)
                    gate = gates[key]
                    where = f"{name} D={d} causal={causal} N={n}"
                    if not gate.ok:
                        notes[where] = f"FP64 gate failed: {gate.why}"
                        continue
                    launch = _flash.prepare_forward(q, k, v, causal=causal, kernel=name, config=_config(name))
                    t0 = time.perf_counter()
                    out, _ = launch.launch()
                    torch.cuda.synchronize()
                    first_ms = (time.perf_counter() - t0) / MS
                    if anchor is None:
                        anchor = (name, out.float())
                    diff = float((out.float() - anchor[1]).abs().max())
                    if not diff <= FULL_SIZE_DIFF:
                        notes[where] = f"full-size output differs from {anchor[0]}'s by {diff:.3g} (> {FULL_SIZE_DIFF})"
                        continue
                    stats = launch.time(warmup=WARMUP, iters=iters, flush_l2=FLUSH_L2)
                    flops = lab.attention_flops(batch, heads, n, n, d, causal)
                    tuned = launch.tuned_config() if hasattr(launch, "tuned_config") else launch.config
                    res = {codegen.metric_name(k): float(v) for k, v in dict(launch.resources).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                    metrics = {"tflops": flops / (stats.median_ms * MS) / TERA, "first_call_ms": first_ms,
                               "gate_max_abs_err": gate.max_abs_err, "anchor_max_abs_err": diff, **res}
                    config = {"phase": MEASURED_PHASE, "kernel": name,
                              "tile": families.get(name).config_label(tuned),
                              "autotuned": tuned is not launch.config, "head_dim": d, "causal": causal,
                              "seq_len": n, "batch": batch, "num_heads": heads, "dtype": DTYPE}
                    records.append(ctx.record(config, metrics, stats))
                del q, k, v, anchor
                torch.cuda.empty_cache()
    return records, notes
