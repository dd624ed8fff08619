"""Prototype 4's condensed summary rows (summary.json and the run's printed table): per record its
phase, what it varies, and the phase's key metrics (every metric is in records.jsonl)."""
from __future__ import annotations

from typing import Any

SUMMARY_METRICS = {
    "cold_compile": ("per_variant_median_ms", "per_variant_p90_ms", "batch_wall_ms", "wall_per_variant_ms"),
    "split": ("ptx_median_ms", "cubin_median_ms", "ptxas_median_ms", "frontend_median_ms", "ptxas_share_pct"),
    "pch": ("pch_create_ms", "pch_use_median_ms", "no_pch_median_ms", "pch_speedup_x"),
    "multi_entry": ("multi_entry_median_ms", "four_singles_median_ms", "multi_over_singles_ratio"),
    "archive": ("build_wall_ms", "compile_median_ms", "load_median_ms", "load_speedup_x", "total_speedup_x",
                "kernel_load_median_ms"),
    "first_launch": ("first_launch_median_ms",),
}

METAL_SUMMARY_METRICS = {
    "metal_cold_build": ("per_variant_median_ms", "per_variant_p90_ms", "build_sum_ms"),
    "metal_rebuild": ("first_build_ms", "rebuild_median_ms", "first_over_rebuild_ratio"),
    "metal_archive_build": ("build_wall_ms", "build_median_ms", "store_overhead_median_ms", "archive_bytes"),
    "metal_archive_load": ("load_median_ms", "load_total_ms", "library_load_ms", "load_speedup_x", "total_speedup_x"),
    "metal_first_dispatch": ("first_dispatch_median_ms", "kernel_median_ms", "dispatch_median_ms"),
}


def _metrics_text(met: dict[str, float], names: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={met[k]:.4g}" for k in names if k in met)


def summary_row(r: dict) -> dict[str, Any]:
    """NVRTC / CUDA record -> {phase, what (variants, head dim or origin), metrics}."""
    cfg = r["config"]
    what = cfg.get("variants", cfg.get("head_dim", cfg.get("origin", "")))
    return {"phase": cfg["phase"], "what": what, "metrics": _metrics_text(r["metrics"], SUMMARY_METRICS[cfg["phase"]])}


def metal_summary_row(r: dict) -> dict[str, Any]:
    """Metal record -> {phase, what (variants, origin or spec), metrics}."""
    cfg = r["config"]
    what = cfg.get("variants", cfg.get("origin", cfg.get("spec", "")))
    return {"phase": cfg["phase"], "what": what,
            "metrics": _metrics_text(r["metrics"], METAL_SUMMARY_METRICS[cfg["phase"]])}
