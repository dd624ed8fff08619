"""Prototype 7 on CUDA: every variant of our flash kernels against the base kernel of the same run
(same family and tiles), their standalone forms, and torch's anchors on the same inputs.

Per (N, group): random bf16 Q/K/V; per family (wgmma, then mma where it takes the variant) the
base kernel's tiles, chosen once and passed as config= to every variant; every specialisation
NVRTC-compiled up front in parallel (the device has 16 cores; compiles, not launches, dominate
a run this size); every point FP64-gated (gate.check) before it is timed with CUDA events."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional

from ... import lab, ref
from ...ops import prepare_forward
from ..registry import ExperimentContext, ExperimentError, ExperimentResult
from . import anchors as A
from . import common as C
from . import gate as G

FAMILIES = ("wgmma", "mma")
#: The mma family's default sweep (every case and group with --full): compiles cost more than
#: the launches, and the wgmma family carries the issue's targets.
MMA_GROUPS = (1, 4)
MMA_CASES = ("rope-half", "alibi", "window-n8", "softcap", "llama")
#: flex_attention compiles per modification and shape: the default run measures it at one N.
FLEX_SEQ_LENS = (8192,)
#: Caller ALiBi slopes (ALIBI = slopes): the standard slopes of a smaller max bias.
CALLER_ALIBI_MAX_BIAS = 4.0


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _rope_ops():
    try:
        from ...ops import rope as rope_ops  # noqa: PLC0415
    except ImportError as exc:
        raise ExperimentError("proto7 --backend cuda needs attnproto.ops.rope (prepare_rope, prepare_repeat_kv: the "
                              f"standalone RoPE and GQA kernels the fused variants are compared with): {exc}") from exc
    return rope_ops


class Runner:
    def __init__(self, ctx: ExperimentContext):
        import torch  # noqa: PLC0415

        from ... import backend as backend_mod  # noqa: PLC0415

        self.ctx = ctx
        self.full = bool(ctx.extras.get("full"))
        self.be = backend_mod.get("cuda")
        self.iters = C.ITERS
        self.records: List[dict] = []
        self.notes: Dict[str, str] = {}
        self.clock = lab.sm_clock_reader()
        self.gen = torch.Generator(device="cuda").manual_seed(int(ctx.rng.integers(2**31)))
        self.rope = _rope_ops()
        self.flex: Optional[A.Flex] = None

    def time(self, fn: Callable[[], Any]) -> lab.TimingStats:
        fn()
        return lab.time_device(self.be, fn, warmup=C.WARMUP, iters=self.iters)

    def record(self, kernel: str, n: int, g: int, case: str, t: lab.TimingStats, family: str = "torch",
               tile: str = "", causal: bool = True, **metrics: float) -> dict:
        config = {"kernel": kernel, "family": family, "case": case, "seq_len": n, "group": g,
                  "batch": C.batch_of(n), "num_heads": C.NUM_HEADS, "num_kv_heads": C.NUM_HEADS // g,
                  "head_dim": C.HEAD_DIM, "dtype": C.SWEEP_DTYPE, "causal": causal}
        if tile:
            config["tile"] = tile
        m = {"time_us": t.median_ms * 1e3, **{k: float(v) for k, v in metrics.items()}, **self.clock()}
        rec = self.ctx.record(config, m, t)
        self.records.append(rec)
        return rec

    def write_notes(self) -> None:
        (self.ctx.out_dir / "notes.json").write_text(json.dumps(self.notes, indent=1, sort_keys=True) + "\n")
        for what, why in sorted(self.notes.items()):
            print(f"proto7: {what}: {why}", flush=True)


def _resources(launch: Any) -> Dict[str, float]:
    res = getattr(launch, "resources", None) or {}
    return {"registers_regs": res.get("registers", 0), "local_bytes": res.get("local_bytes", 0),
            "smem_bytes": getattr(launch, "shared_bytes", 0)}


def _precompile(q, k, v, cfg, cases, n, table, slopes) -> None:
    """Every wgmma specialisation of this N, compiled in parallel into the archive."""
    from ... import kernels  # noqa: PLC0415
    from ...ops import families as fams  # noqa: PLC0415
    from ...ops import flash_wgmma as fw  # noqa: PLC0415
    from ...ops.problem import check_flash_inputs  # noqa: PLC0415

    fam = fams.get("wgmma")
    specs = []
    for causal, kw in [(True, {}), (False, {})] + [(True, c.kwargs(n, table, slopes)) for c in cases]:
        spec = check_flash_inputs(q, k, v, causal=causal, **kw).spec
        specs.append((fw.KERNEL_NAME, fam.constants(cfg, spec)))
    rows = kernels.precompile(specs, jobs=os.cpu_count())
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise ExperimentError(f"proto7: {len(bad)} wgmma specialisations failed to compile: {bad[0]['log'][:300]}")


def _window_metrics(case: C.Case, n: int, t: lab.TimingStats, base: dict, full: dict) -> Dict[str, float]:
    w = case.window(n)
    if not w or case.feature != "window":
        return {}
    pairs_causal = n * (n + 1) / 2
    pairs_window = w * (w + 1) / 2 + (n - w) * w
    return {"window_tokens": w,
            "window_vs_full_ratio": t.median_ms / (w / n * full["timing"]["median_ms"]),
            "window_vs_causal_pairs_ratio": t.median_ms / (pairs_window / pairs_causal * base["timing"]["median_ms"])}


def _family_point(run: Runner, fam: str, n: int, g: int, q, k, v, cases, table, slopes, slopes_np) -> Dict[str, dict]:
    """Base, non-causal base and each case on one family; {case name: record} of what ran."""
    try:
        base_l = prepare_forward(q, k, v, causal=True, kernel=fam)
    except (ValueError, TypeError) as exc:
        run.notes[f"{fam} N={n} g={g} base"] = _reason(exc)
        return {}
    from ...ops import families as fams  # noqa: PLC0415

    cfg = base_l.config
    tile = fams.get(fam).config_label(cfg)
    if fam == "wgmma":
        _precompile(q, k, v, cfg, cases, n, table, slopes)
    G.check(base_l, q, k, v, {}, None, f"{fam} base N={n} g={g}")
    base = run.record(C.OURS_BASE, n, g, "base", base_l.time(C.WARMUP, run.iters), fam, tile, **_resources(base_l))
    # the same tiles without the mask (families whose config carries the mask get it switched off)
    full_cfg = dataclasses.replace(cfg, causal=False) if hasattr(cfg, "causal") else cfg
    full_l = prepare_forward(q, k, v, causal=False, kernel=fam, config=full_cfg)
    G.check(full_l, q, k, v, {}, None, f"{fam} base non-causal N={n} g={g}", causal=False)
    full = run.record(C.OURS_BASE_FULL, n, g, "base-noncausal", full_l.time(C.WARMUP, run.iters), fam, tile,
                      causal=False, **_resources(full_l))
    out = {"base": base}
    bases = {cfg: base}   # the base kernel at each tile a case runs on
    for case in cases:
        kw = case.kwargs(n, table, slopes)
        try:
            case_cfg = _case_config(fam, cfg, q, k, v, kw)
            launch = prepare_forward(q, k, v, causal=True, kernel=fam, config=case_cfg, **kw)
        except (ValueError, TypeError) as exc:
            run.notes[f"{fam} N={n} g={g} {case.name}"] = f"refused: {_reason(exc)}"
            continue
        case_tile = fams.get(fam).config_label(case_cfg)
        if case_cfg not in bases:
            # the variant cannot hold the base's tiles (e.g. RoPE's register budget): its base is
            # the same kernel without the variant at the variant's tiles
            other = prepare_forward(q, k, v, causal=True, kernel=fam, config=case_cfg)
            bases[case_cfg] = run.record(C.OURS_BASE, n, g, "base", other.time(C.WARMUP, run.iters), fam, case_tile,
                                         **_resources(other))
            run.notes[f"{fam} N={n} g={g} {case.name}"] = (f"runs at {case_tile}, not the base's {tile}: "
                                                            f"{fams.get(fam).name} refuses those tiles for it")
        case_base = bases[case_cfg]
        alibi_slopes = None if not case.alibi else (slopes_np if case.alibi == "slopes" else ref.alibi_slopes(C.NUM_HEADS))
        gate = G.check(launch, q, k, v, kw, alibi_slopes, f"{fam} {case.name} N={n} g={g}")
        t = launch.time(C.WARMUP, run.iters)
        metrics = {"over_base_pct": 100.0 * (t.median_ms / case_base["timing"]["median_ms"] - 1.0),
                   "max_abs_err": gate.err, "torch_abs_err": gate.torch_err, **_resources(launch),
                   **_window_metrics(case, n, t, case_base, full)}
        out[case.name] = run.record(C.OURS, n, g, case.name, t, fam, case_tile, **metrics)
        if fam == "wgmma" and case.rope:
            _standalone_rope(run, n, g, q, k, v, case, kw, case_cfg, case_tile, out[case.name])
    if fam == "wgmma" and g > 1:
        _materialised_gqa(run, n, g, q, k, v, cfg, tile, base)
    return out


def _case_config(fam: str, cfg: Any, q, k, v, kw) -> Any:
    """The base's tiles when the family takes them for this variant, else the front door's choice
    for the variant call (e.g. wgmma RoPE: at most ROPE_MAX_BLOCK_C keys per tile)."""
    from ... import backend as _backend  # noqa: PLC0415
    from ...ops import families as fams  # noqa: PLC0415
    from ...ops.problem import DeviceSpec, check_flash_inputs  # noqa: PLC0415

    family = fams.get(fam)
    spec = check_flash_inputs(q, k, v, causal=True, **kw).spec
    try:
        family.config_for(spec, family.config_dict(cfg), DeviceSpec.from_backend(_backend.get("cuda")))
        return cfg
    except ValueError:
        return prepare_forward(q, k, v, causal=True, kernel=fam, **kw).config


def _standalone_rope(run: Runner, n, g, q, k, v, case: C.Case, kw, cfg, tile, fused: dict) -> None:
    """Our RoPE kernel on Q and K (out of place) + the same kernel without RoPE."""
    import torch  # noqa: PLC0415

    rest = {key: val for key, val in kw.items() if key not in ("rope", "rope_table")}
    qr, kr = torch.empty_like(q), torch.empty_like(k)
    rope_kw = dict(style=case.rope, table=kw.get("rope_table"))
    rq = run.rope.prepare_rope(q, out=qr, **rope_kw)
    rk = run.rope.prepare_rope(k, out=kr, **rope_kw)
    plain = prepare_forward(qr, kr, v, causal=True, kernel="wgmma", config=cfg, **rest)

    def both():
        rq.launch()
        rk.launch()
        plain.launch()
    t = run.time(both)
    run.record(C.ROPE_KERNEL_ONLY, n, g, case.name, run.time(lambda: (rq.launch(), rk.launch())), "wgmma", tile)
    run.record(C.STANDALONE_ROPE, n, g, case.name, t, "wgmma", tile,
               fused_over_standalone_ratio=fused["timing"]["median_ms"] / t.median_ms)
    fused["metrics"]["vs_standalone_x"] = t.median_ms / fused["timing"]["median_ms"]


def _materialised_gqa(run: Runner, n, g, q, k, v, cfg, tile, base: dict) -> None:
    """Our repeat_kv on K and V + the base kernel with Hkv = Hq."""
    import torch  # noqa: PLC0415

    shape = (k.shape[0], k.shape[1] * g, k.shape[2], k.shape[3])
    kx, vx = torch.empty(shape, dtype=k.dtype, device=k.device), torch.empty(shape, dtype=v.dtype, device=v.device)
    rk, rv = run.rope.prepare_repeat_kv(k, g, out=kx), run.rope.prepare_repeat_kv(v, g, out=vx)
    mha = prepare_forward(q, kx, vx, causal=True, kernel="wgmma", config=cfg)

    def both():
        rk.launch()
        rv.launch()
        mha.launch()
    t = run.time(both)
    run.record(C.MATERIALISED_GQA, n, g, "gqa", t, "wgmma", tile,
               fused_over_materialised_ratio=base["timing"]["median_ms"] / t.median_ms)


def _torch_anchors(run: Runner, n, g, q, k, v, cases, slopes, ours: Dict[str, dict]) -> None:
    import torch  # noqa: PLC0415

    run.record(C.SDPA_GQA, n, g, "base", run.time(A.sdpa(q, k, v)))
    cos, sin = A.rope_cos_sin(n, C.HEAD_DIM)
    for style in sorted({c.rope for c in cases if c.rope}):
        rot = lambda style=style: (A.torch_rope(q, cos, sin, style), A.torch_rope(k, cos, sin, style))  # noqa: E731
        run.record(C.TORCH_ROPE, n, g, f"rope-{style}", run.time(rot))
        run.record(C.TORCH_ROPE_SDPA, n, g, f"rope-{style}",
                   run.time(lambda rot=rot: A.sdpa(*rot(), v)()))
    if g == 1:
        for name, sl in (("alibi", torch.from_numpy(ref.alibi_slopes(C.NUM_HEADS)).float().cuda()), ("alibi-slopes", slopes)):
            try:
                mask = A.bias_mask(C.NUM_HEADS, n, n, slopes=sl, dtype=q.dtype)
                rec = run.record(C.SDPA_ALIBI, n, g, name, run.time(A.sdpa(q, k, v, attn_mask=mask)))
                if name in ours:
                    ours[name]["metrics"]["sdpa_over_ours_x"] = rec["timing"]["median_ms"] / ours[name]["timing"]["median_ms"]
                del mask
            except Exception as exc:  # noqa: BLE001 - reported in the notes
                run.notes[f"{C.SDPA_ALIBI} N={n} {name}"] = _reason(exc)
    if n in (C.SEQ_LENS if run.full else FLEX_SEQ_LENS):
        _flex(run, n, g, q, k, v, cases, ours, cos, sin)


def _flex(run: Runner, n, g, q, k, v, cases, ours, cos, sin) -> None:
    import torch  # noqa: PLC0415

    if run.flex is None:
        run.flex = A.Flex()
    std = torch.from_numpy(ref.alibi_slopes(C.NUM_HEADS)).float().cuda()
    for case in cases:
        if case.name not in ours or (g != 1 and case.feature != "model" and not run.full):
            continue
        w = case.window(n)
        mods = dict(slopes=std if case.alibi == "standard" else None, softcap=case.softcap, window=w)
        if case.alibi == "slopes":
            continue  # the same score_mod as standard ALiBi with other numbers
        try:
            if case.rope:
                call = run.flex.call(q, k, v, **mods)
                fn = lambda call=call, style=case.rope: (A.torch_rope(q, cos, sin, style),  # noqa: E731
                                                         A.torch_rope(k, cos, sin, style), call())
                name = C.FLEX_PREROTATED
            else:
                fn, name = run.flex.call(q, k, v, **mods), C.FLEX
            rec = run.record(name, n, g, case.name, run.time(fn))
        except Exception as exc:  # noqa: BLE001 - reported in the notes
            run.notes[f"flex N={n} g={g} {case.name}"] = _reason(exc)
            continue
        ours[case.name]["metrics"]["flex_over_ours_x"] = rec["timing"]["median_ms"] / ours[case.name]["timing"]["median_ms"]


def run_points(run: Runner) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ...ops.variants import rope_tables  # noqa: PLC0415

    quick = run.ctx.quick
    seq_lens = C.QUICK_SEQ_LENS if quick else C.SEQ_LENS
    groups = C.QUICK_GROUPS if quick else C.GROUPS
    slopes_np = ref.alibi_slopes(C.NUM_HEADS, CALLER_ALIBI_MAX_BIAS).astype(np.float32)
    slopes = torch.from_numpy(slopes_np).cuda()
    jobs = [(n, g) for n in seq_lens for g in groups]
    for n, g in run.ctx.progress(jobs, desc="proto7[cuda]"):
        table = rope_tables(n, C.HEAD_DIM)
        b, hkv = C.batch_of(n), C.NUM_HEADS // g
        dt = getattr(torch, C.SWEEP_DTYPE)
        q = torch.randn(b, C.NUM_HEADS, n, C.HEAD_DIM, device="cuda", dtype=dt, generator=run.gen)
        k, v = (torch.randn(b, hkv, n, C.HEAD_DIM, device="cuda", dtype=dt, generator=run.gen) for _ in range(2))
        cases = [c for c in C.CASES if c.group in (None, g) and (not quick or c.name in C.QUICK_CASES)]
        ours = _family_point(run, "wgmma", n, g, q, k, v, cases, table, slopes, slopes_np)
        if run.full or g in MMA_GROUPS:
            mma_cases = [c for c in cases if run.full or c.name in MMA_CASES]
            _family_point(run, "mma", n, g, q, k, v, mma_cases, table, slopes, slopes_np)
        _torch_anchors(run, n, g, q, k, v, cases, slopes, ours)
        del q, k, v
        torch.cuda.empty_cache()


def run_cuda(ctx: ExperimentContext) -> ExperimentResult:
    from .findings import findings_of  # noqa: PLC0415
    from .summary import summary_table  # noqa: PLC0415
    from .validation import run_validation  # noqa: PLC0415

    run = Runner(ctx)
    ac_records, ac = run_validation(ctx)
    run_points(run)
    run.write_notes()
    records = run.records + ac_records
    return ExperimentResult(records, findings_of(ctx, run.records) + [ac], summary=summary_table(records))
