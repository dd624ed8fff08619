"""The FP64 gate of a Prototype 7 point, on a slice of the full-size launch: the first sequence,
the first and last query heads (with their KV heads), the last GATE_ROWS query rows (bottom-right
aligned, so causal / window / RoPE positions are the true ones in attnproto.ref.attention).

Ours passes when its max error against FP64 is at most GATE_TORCH_FACTOR x torch's own error on
the same slice (SDPA with the variant as a float attn_mask on torch-RoPE'd inputs; for a soft
cap, which SDPA cannot express, the eager fp32-scores recipe) plus one bf16 rounding of the
largest |O|. The output is poisoned (NaN) before the launch, so a row never written fails; the
whole output must be finite."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from ... import ref
from ..registry import ExperimentError
from . import anchors as A
from . import common as C


@dataclass(frozen=True)
class GateResult:
    err: float
    torch_err: float
    tol: float


def poison(launch: Any) -> None:
    """NaN into the launch's outputs (attnproto.lab's gate does the same before every launch)."""
    launch.problem.out.fill_(float("nan"))
    launch.problem.lse.fill_(float("nan"))


def _heads(hq: int, hkv: int):
    group = hq // hkv
    qh = [0, hq - 1]
    return qh, [h // group for h in qh]


def check(launch: Any, q: Any, k: Any, v: Any, kw: Dict[str, Any], slopes_all: Optional[np.ndarray],
          what: str, causal: bool = True) -> GateResult:
    """Poison, launch, and check the slice of ``launch``'s output (``kw``: the front-door variant
    arguments; ``slopes_all``: every head's ALiBi slopes when ALiBi is on)."""
    import torch  # noqa: PLC0415

    poison(launch)
    launch.launch()
    torch.cuda.synchronize()
    out = launch.problem.out
    if not bool(torch.isfinite(out).all()):
        raise ExperimentError(f"proto7 {what}: non-finite output (an element never written, or NaN)")
    hq, hkv, n, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    rows = min(C.GATE_ROWS, n)
    qh, kh = _heads(hq, hkv)
    qs, ks, vs = q[:1, qh, n - rows:], k[:1, kh], v[:1, kh]
    slopes = None if slopes_all is None else np.asarray(slopes_all, np.float64)[qh]
    style, window, cap = kw.get("rope"), kw.get("window"), kw.get("softcap")
    to64 = lambda x: x.float().cpu().numpy().astype(np.float64)  # noqa: E731
    want = ref.attention(to64(qs), to64(ks), to64(vs), causal=causal, rope=style or False, alibi=slopes is not None,
                         alibi_slopes=slopes, window=window, softcap=cap)
    got = to64(out[:1, qh, n - rows:])
    err = float(np.abs(got - want).max())
    # torch on the same slice
    if style:
        cos, sin = A.rope_cos_sin(n, d)
        pos = torch.arange(n - rows, n, device=q.device)
        qt = A.torch_rope_at(qs, cos[pos], sin[pos], style)
        kt = A.torch_rope(ks, cos, sin, style)
    else:
        qt, kt = qs, ks
    sl = None if slopes is None else torch.from_numpy(slopes).to(q.device)
    bias = A.bias_mask(len(qh), rows, n, slopes=sl, window=window, causal=causal)
    if cap:
        theirs = A.eager_softcap(qt, kt, vs, softcap=cap, bias=bias)
    else:
        theirs = A.sdpa(qt, kt, vs, attn_mask=bias.to(q.dtype))()
    torch_err = float(np.abs(to64(theirs) - want).max())
    tol = C.GATE_TORCH_FACTOR * torch_err + C.BF16_ROUNDOFF * float(np.abs(want).max())
    if not err <= tol or not math.isfinite(err):
        raise ExperimentError(f"proto7 {what}: max |ours - FP64| = {err:.3g} on the gate slice, over "
                              f"{C.GATE_TORCH_FACTOR}x torch's {torch_err:.3g} + one bf16 rounding (tolerance {tol:.3g})")
    return GateResult(err, torch_err, tol)
