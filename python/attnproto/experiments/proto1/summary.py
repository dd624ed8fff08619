"""Prototype 1's summary tables (``attnproto report``, the README) and its tile table."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import common as C
from .common import anchor, auto_record, best, family_of, label

CUDA_ANCHORS = ("sdpa_flash", "sdpa_cudnn", "flex")


def _tflops(x: float) -> float:
    return float(f"{x:.4g}")


def _pct(fraction: float) -> float:
    """A CV as a percentage to three significant digits (never rounded to 0)."""
    return float(f"{100 * fraction:.3g}")


def _ratio(x: float) -> float:
    return float(f"{x:.4g}")


def summary_table(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per (D, causal, N): our best, the default call (auto) and its ratio to the best, each anchor
    and our best's ratio to it."""
    if any(family_of(r) == "metal" for r in records):
        return metal_summary_table(records)
    rows = []
    anchors = [a for a in CUDA_ANCHORS if any(r["config"]["kernel"] == a for r in records)]
    has_auto = any(r["config"]["kernel"] == C.AUTO for r in records)
    keys = sorted({(r["config"]["head_dim"], r["config"]["causal"], r["config"]["seq_len"]) for r in records})
    for d, causal, n in keys:
        b = best(records, head_dim=d, seq_len=n, causal=causal)
        if b is None:
            continue
        row = {"D": d, "causal": causal, "N": n, "ours": label(b["config"]),
               "tflops": _tflops(b["metrics"]["tflops"]), "cv_pct": _pct(b["timing"]["cv"])}
        if has_auto:
            a = auto_record(records, head_dim=d, seq_len=n, causal=causal)
            row["auto"] = a["config"]["chose"] if a else "-"
            row["auto_tflops"] = _tflops(a["metrics"]["tflops"]) if a else None
            row["auto_x_best"] = _ratio(a["metrics"]["tflops"] / b["metrics"]["tflops"]) if a else None
        for name in anchors:
            a = anchor(records, name, head_dim=d, seq_len=n, causal=causal)
            row[name] = _tflops(a["metrics"]["tflops"]) if a else None
            row[f"x_{name}"] = _ratio(b["metrics"]["tflops"] / a["metrics"]["tflops"]) if a else None
        rows.append(row)
    return rows


def metal_summary_table(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per (D, causal, N): best Metal tile (GPU and wall clock) and each anchor on the wall clock."""
    from .metal import METAL_ANCHORS  # noqa: PLC0415

    rows = []
    keys = sorted({(r["config"]["head_dim"], r["config"]["causal"], r["config"]["seq_len"]) for r in records})
    for d, causal, n in keys:
        b = best(records, head_dim=d, seq_len=n, causal=causal)
        walls = [r for r in records if family_of(r) == "metal" and r["config"]["head_dim"] == d
                 and r["config"]["seq_len"] == n and r["config"]["causal"] == causal]
        w = max(walls, key=lambda r: r["metrics"]["wall_tflops"], default=None)
        if b is None or w is None:
            continue
        row = {"D": d, "causal": causal, "N": n, "ours": label(b["config"]), "tflops": _tflops(b["metrics"]["tflops"]),
               "cv_pct": _pct(b["timing"]["cv"]), "wall_tflops": _tflops(w["metrics"]["wall_tflops"])}
        for name in METAL_ANCHORS:
            a = anchor(records, name, head_dim=d, seq_len=n, causal=causal)
            row[name] = _tflops(a["metrics"]["tflops"]) if a else "not run"
            row[f"x_{name}"] = _ratio(w["metrics"]["wall_tflops"] / a["metrics"]["tflops"]) if a else None
        rows.append(row)
    return rows


def auto_bar(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per point: the default call against the best the sweep measured (the issue's 3 % bar)."""
    out = []
    for r in records:
        if r["config"]["kernel"] != C.AUTO:
            continue
        c = r["config"]
        b = best(records, head_dim=c["head_dim"], seq_len=c["seq_len"], causal=c["causal"])
        if b is not None:
            ratio = r["metrics"]["tflops"] / b["metrics"]["tflops"]
            out.append({"D": c["head_dim"], "causal": c["causal"], "N": c["seq_len"], "auto": c["chose"],
                        "best": label(b["config"]), "ratio": _ratio(ratio), "meets_bar": ratio >= C.AUTO_BAR_RATIO})
    return out
