"""The Prototype 7 report table: per (N, group, case) our fused time, its cost over the base
kernel of the same run, and how it compares with its standalone form and with flex_attention."""
from __future__ import annotations

from typing import Any, Sequence

from . import common as C

#: Metrics copied into the table when a record has them.
COLUMNS = (("over_base_pct", "over_base_%"), ("vs_standalone_x", "vs_standalone"), ("flex_over_ours_x", "flex/ours"),
           ("window_vs_full_ratio", "window/(W/N full)"))


def summary_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        c = r["config"]
        if c.get("kernel") not in (C.OURS, C.OURS_BASE) or c.get("sweep") == "ac55":
            continue
        row = {"family": c.get("family", "cpu"), "N": c["seq_len"], "group": c["group"], "case": c["case"],
               "us": r["metrics"]["time_us"], "cv": r["timing"]["cv"]}
        for key, label in COLUMNS:
            if key in r["metrics"]:
                row[label] = r["metrics"][key]
        rows.append(row)
    return rows
