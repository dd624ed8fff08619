"""The Prototype 3 report table (README): decode at block 16 per shape, ours against torch's
decode paths of the same run, with bandwidth as a share of the measured read ceiling."""
from __future__ import annotations

from typing import Any, Sequence

from . import common as C


def summary_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    ceiling = next((r["metrics"]["bandwidth_tbps"] for r in records if r["config"]["kernel"] == C.CEILING), None)
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        c = r["config"]
        if c.get("sweep") not in ("block", "scale"):
            continue
        key = (c["batch"], c["num_heads"], c["num_kv_heads"], c["context"])
        if c["kernel"] == C.OURS and c["block_size"] != C.MAIN_BLOCK:
            continue
        by_key.setdefault(key, {})[c["kernel"]] = r
    rows = []
    for (b, hq, hkv, n), got in sorted(by_key.items()):
        ours = got.get(C.OURS)
        if ours is None:
            continue
        t = ours["timing"]["median_ms"]
        row = {"B": b, "Hq/Hkv": f"{hq}/{hkv}", "context": n, "ours_us": ours["metrics"]["time_us"],
               "cv": ours["timing"]["cv"], "TB/s": ours["metrics"]["bandwidth_tbps"]}
        if ceiling:
            row["of_ceiling"] = ours["metrics"]["bandwidth_tbps"] / ceiling
        for name, label in ((C.CUDNN, "vs_cudnn"), (C.FLASH, "vs_flash"), (C.GATHER, "vs_gather_sdpa")):
            if name in got:
                row[label] = got[name]["timing"]["median_ms"] / t
        rows.append(row)
    return rows
