"""Prototype 6's report table (``attnproto report``, README): per (D, N) our fastest chunk, FLA,
causal softmax (SDPA cuDNN, Prototype 1, the CPU baseline), and the time ratios."""
from __future__ import annotations

from typing import Any


def summary_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (D, N): our fastest chunk, FLA, causal softmax (SDPA cuDNN, Prototype 1), and ratios."""
    def med(r: dict[str, Any]) -> float:
        return float(r["timing"]["median_ms"])

    ours: dict[tuple[int, int], dict[str, Any]] = {}
    other: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in records:
        c = r["config"]
        if "seq_len" not in c:
            continue
        key = (c["head_dim"], c["seq_len"])
        if c["impl"] == "ours" and c["op"] == "linear_attention":
            if key not in ours or med(r) < med(ours[key]):
                ours[key] = r
        elif c["impl"] != "ours":
            other[(c["impl"], *key)] = r
    rows = []
    for (d, n), r in sorted(ours.items()):
        row = {"D": d, "N": n, "chunk": r["config"]["chunk_size"],
               "algorithm": r["config"].get("algorithm", "two_pass"), "ours_ms": float(f"{med(r):.4g}"),
               "ours_tflops": float(f"{r['metrics']['tflops']:.4g}")}
        for impl, col in (("fla_chunk_simple_gla", "fla"), ("sdpa_cudnn", "sdpa_cudnn"), ("proto1", "proto1"),
                          ("cpu_flash", "cpu_softmax")):
            o = other.get((impl, d, n))
            if o is not None:
                row[f"{col}_ms"] = float(f"{med(o):.4g}")
                row[f"x_{col}"] = round(med(o) / med(r), 3)   # > 1: ours (linear) faster
        rows.append(row)
    return rows
