"""AC-5.5: illegal variant combinations fail at compile time and at the front door.

Two halves, each attempt a record (timed on the host: an NVRTC compile or a refused call):

* NVRTC compiles flash_fwd_wgmma with an illegal constant set (the base kernel's constants with
  one or two changed); each must fail with its ``static_assert`` message. Needs NVRTC (no GPU).
* The front doors and the families' ``supports_spec()`` refuse the same requests before any
  compile, with an exception / reason that starts with the argument's name.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from ... import lab
from ...findings import Finding
from ..registry import ExperimentContext
from . import common as C

ARCH = "sm_90a"
#: (case, constants changed from the base kernel's, static_assert text the log must contain).
ILLEGAL_CONSTANTS = (
    ("rope-table-without-rope", {"ROPE": 0, "ROPE_TABLE": 1}, "ROPE_TABLE=1 without ROPE"),
    ("paged-with-rope", {"PAGE_SIZE": 16, "ROPE": 1}, "ROPE with PAGE_SIZE > 0"),
    ("rope-code-3", {"ROPE": 3}, "ROPE must be 0 (none), 1 (rotate-half) or 2 (interleaved)"),
    ("alibi-code-3", {"ALIBI": 3}, "ALIBI must be 0 (none), 1 (standard slopes) or 2 (slopes buffer)"),
    ("window-code-2", {"WINDOW": 2}, "WINDOW must be 0 or 1"),
)
#: Timed attempts per case (the lab timer needs two samples).
ATTEMPTS = 2


def _nvrtc():
    """(native module, "") or (None, why NVRTC is unavailable)."""
    try:
        from ...backend import native  # noqa: PLC0415

        nat = native()
        nat.cuda_nvrtc_version()
        return nat, ""
    except Exception as exc:  # noqa: BLE001 - reported in the finding, not hidden
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _base_constants() -> Dict[str, int]:
    from ...ops import flash_wgmma as fw  # noqa: PLC0415

    return fw.constants(fw.default_config(C.HEAD_DIM, True), C.HEAD_DIM, True, C.SWEEP_DTYPE)


def _refusals() -> List[Tuple[str, str, Callable[[], Any]]]:
    """(case, argument the refusal must name, call that must raise or return a refusal)."""
    from ...ops import flash_forward  # noqa: PLC0415
    from ...ops import families as fams  # noqa: PLC0415
    from ...ops.paged_prefill_wgmma import prepare_paged_prefill_wgmma  # noqa: PLC0415
    from ...ops.problem import DeviceSpec, ProblemSpec  # noqa: PLC0415
    from ...ops.variants import Variant, rope_tables  # noqa: PLC0415

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 32)).astype(np.float32) for _ in range(3))
    cos, sin = (np.asarray(t.cpu().numpy()) for t in rope_tables(16, 32, device="cpu"))
    sm90 = DeviceSpec.for_arch("sm_90")

    def family_refuses(name: str, variant: Variant):
        def call():
            spec = ProblemSpec(1, C.NUM_HEADS, C.NUM_HEADS, 256, 256, C.HEAD_DIM, C.SWEEP_DTYPE, True, variant)
            ok, why = fams.get(name).supports_spec(spec, sm90)
            if ok:
                return "supported"
            raise ValueError(why)
        return call

    out = [
        ("front-door-rope-table-without-rope", "rope_table",
         lambda: flash_forward(q, k, v, kernel="cpu", rope_table=(cos, sin))),
        ("front-door-unknown-variant-argument", "alibi_slope",
         lambda: flash_forward(q, k, v, kernel="cpu", alibi_slope=0.5)),
        ("front-door-window-zero", "window", lambda: flash_forward(q, k, v, kernel="cpu", window=0)),
        ("front-door-softcap-negative", "softcap", lambda: flash_forward(q, k, v, kernel="cpu", softcap=-1.0)),
        ("paged-prefill-rope", "rope",
         lambda: prepare_paged_prefill_wgmma(q, q, q, None, None, rope="half")),
    ]
    for fam in fams.FAMILIES:
        if fam.backend != "cuda" or fam.variant_features:
            continue  # families that take variants have no illegal single-feature request
        out.append((f"{fam.name}-refuses-rope", "rope", family_refuses(fam.name, Variant(rope="half"))))
        out.append((f"{fam.name}-refuses-window", "window", family_refuses(fam.name, Variant(window=True))))
    return out


def _attempt(fn: Callable[[], Any]) -> Tuple[lab.TimingStats, str]:
    """Time ATTEMPTS calls of ``fn``; the text of what it raised ("" when it did not)."""
    seen: List[str] = []

    def once():
        try:
            fn()
            seen.append("")
        except Exception as exc:  # noqa: BLE001 - the refusal is the result
            seen.append(f"{type(exc).__name__}: {exc}")
    t = lab.time_host(once, warmup=0, iters=ATTEMPTS)
    return t, seen[-1]


def _named(message: str, arg: str) -> bool:
    """A refusal names the argument: "arg: ..." (attnproto's style) or Python's own 'arg'."""
    text = message.split(": ", 1)[1] if ": " in message else message
    return text.startswith(f"{arg}:") or f"'{arg}'" in text


def run_validation(ctx: ExperimentContext) -> Tuple[List[dict], Finding]:
    records: List[dict] = []
    nat, why = _nvrtc()
    if nat is not None:
        from ...ops import flash_wgmma as fw  # noqa: PLC0415

        base = _base_constants()
        for case, change, message in ILLEGAL_CONSTANTS:
            consts = {**base, **change}
            t, text = _attempt(lambda consts=consts: nat.cuda_compile(fw.KERNEL_NAME, consts, ARCH))
            records.append(ctx.record({"sweep": "ac55", "case": case, "kernel": fw.KERNEL_NAME, "arch": ARCH,
                                       "constants": ",".join(f"{k}={v}" for k, v in sorted(change.items()))},
                                      {"compile_ms": t.median_ms, "rejected_count": int(bool(text)),
                                       "static_assert_matched_count": int(message in text)}, t))
    for case, arg, fn in _refusals():
        t, text = _attempt(fn)
        records.append(ctx.record({"sweep": "ac55", "case": case, "argument": arg},
                                  {"call_ms": t.median_ms, "refused_count": int(bool(text)),
                                   "named_argument_count": int(bool(text) and _named(text, arg))}, t))
    return records, ac55_finding(ctx, records, "" if nat is not None else why)


def ac55_finding(ctx: ExperimentContext, records: List[dict], nvrtc_missing: str = "") -> Finding:
    """The AC-5.5 finding from the validation's records (also what ``kb rederive`` rebuilds)."""
    compiles = [r for r in records if r["config"].get("sweep") == "ac55" and "constants" in r["config"]]
    refusals = [r for r in records if r["config"].get("sweep") == "ac55" and "argument" in r["config"]]
    messages = {case: message for case, _, message in ILLEGAL_CONSTANTS}
    failures = [f"{r['config']['case']}: " + ("compiled" if not r["metrics"]["rejected_count"]
                                             else "failed without the static_assert")
                for r in compiles if not (r["metrics"]["rejected_count"] and r["metrics"]["static_assert_matched_count"])]
    failures += [f"{r['config']['case']}: " + ("accepted" if not r["metrics"]["refused_count"]
                                              else f"refused without naming {r['config']['argument']}")
                 for r in refusals if not (r["metrics"]["refused_count"] and r["metrics"]["named_argument_count"])]
    compile_ok = sum(int(r["metrics"]["rejected_count"] and r["metrics"]["static_assert_matched_count"]) for r in compiles)
    refuse_ok = sum(int(r["metrics"]["refused_count"] and r["metrics"]["named_argument_count"]) for r in refusals)
    n_compile, n_refuse = len(compiles), len(refusals)
    evidence = {"illegal_constant_sets_count": n_compile, "static_assert_failures_count": compile_ok,
                "front_door_requests_count": n_refuse, "refused_naming_argument_count": refuse_ok}
    claim = (f"AC-5.5: {compile_ok} of {n_compile} illegal constant sets of flash_fwd_wgmma fail to compile "
             f"(NVRTC, {ARCH}) with their static_assert message ("
             + "; ".join(f"{r['config']['case']}: '{messages.get(r['config']['case'], '')}'" for r in compiles) + ")"
             + (f" [NVRTC unavailable, not attempted: {nvrtc_missing}]" if nvrtc_missing else "")
             + f"; {refuse_ok} of {n_refuse} illegal requests are refused by the front doors / the families' "
             "supports_spec() with a message naming the argument"
             + (f". Not met: {'; '.join(failures)}." if failures else "."))
    return ctx.finding(prototype=C.PROTOTYPE, title="Illegal variant combinations fail at compile time (AC-5.5)",
                       claim=claim, evidence=evidence, config={"check": "ac55"},
                       cv=max(r["timing"]["cv"] for r in records), records=records, slug="ac55-illegal-combinations",
                       answer={"all_rejected": not failures and n_compile > 0})
