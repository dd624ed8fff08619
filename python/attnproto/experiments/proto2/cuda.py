"""Prototype 2 on cuda: kernel time of every dispatch mode against mode 0, calls dispatched,
resident warps, and element-wise equality with mode 0 and with flash_fwd_mma."""
from __future__ import annotations

from ...ops import occupancy, stitch
from ..registry import ExperimentContext, ExperimentError
from .common import DTYPE, ITERS, QUICK_ITERS, WARMUP

NS_PER_MS = 1e6


def resident_warps(info: dict, resources: dict, warps_per_block: int, dynamic_smem: int) -> int:
    """Warps resident on the whole device: blocks per SM from the compiled kernel's registers,
    static + dynamic shared memory and the SM's limits (attnproto.ops.occupancy)."""
    smem = int(resources["static_shared_bytes"]) + int(dynamic_smem)
    blocks = occupancy.resident_blocks_per_sm(warps_per_block * occupancy.WARP_SIZE, int(resources["registers"]),
                                              smem, int(info.get("shared_mem_per_sm") or 0))
    return blocks * warps_per_block * int(info["multiprocessors"])


def measure_runs(ctx: ExperimentContext, shapes) -> list[dict]:
    """One record per (shape, mode), timed with the backend's device events."""
    import torch  # noqa: PLC0415

    from ... import backend as backend_mod  # noqa: PLC0415
    from ...ops import flash  # noqa: PLC0415

    be = backend_mod.get("cuda")
    iters = QUICK_ITERS if ctx.quick else ITERS
    torch.manual_seed(int(ctx.rng.integers(2**31)))
    records = []
    for b, h, n, d, causal in ctx.progress(shapes, desc="proto2[cuda]"):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        # The production kernel on the same inputs and tiles: mode 0 must equal it bit for bit.
        tile = stitch.bench_config(b, h, n, d, causal, 0, dtype=DTYPE).tile
        prod_o, prod_lse = (x.clone() for x in flash.prepare_forward(q, k, v, causal=causal, kernel="mma",
                                                                       config=tile, backend=be).launch())
        calls = stitch.dispatched_calls(b, h, n, n, tile)
        ref_o = ref_lse = None
        base_ms = None
        for mode in stitch.MODES:
            launch = stitch.prepare(q, k, v, mode, config=tile, causal=causal, backend=be)
            launch.problem.out.fill_(float("nan"))
            o, lse = launch.launch()
            torch.cuda.synchronize()
            if mode == 0:
                ref_o, ref_lse = o.clone(), lse.clone()
            if not torch.isfinite(o).all():
                raise ExperimentError(f"mode {mode} D={d} N={n} causal={causal}: non-finite output")
            differing = int((o != ref_o).sum()) + int((lse != ref_lse).sum())
            differing_prod = int((o != prod_o).sum()) + int((lse != prod_lse).sum())
            max_diff = float((o.float() - ref_o.float()).abs().max())
            stats = launch.time(warmup=WARMUP, iters=iters)
            if mode == 0:
                base_ms = stats.median_ms
            res = launch.kernel.resources
            resident = resident_warps(be.info, res, tile.warps, launch.shared_bytes)
            delta_ns = (stats.median_ms - base_ms) * NS_PER_MS
            metrics = {"median_ms": stats.median_ms, "overhead_pct": 100.0 * (stats.median_ms / base_ms - 1.0),
                       "delta_ns": delta_ns, "calls_count": float(calls),
                       "amortised_ns_per_call_ns": delta_ns / calls,
                       "serial_ns_per_call_ns": delta_ns * resident / calls,
                       "resident_warps_count": float(resident),
                       "differing_elements_count": float(differing),
                       "differing_from_production_count": float(differing_prod),
                       "max_abs_diff_err": max_diff,
                       "registers_regs": float(res["registers"]), "local_bytes": float(res["local_bytes"])}
            records.append(ctx.record({"phase": "run", "mode": mode, "mode_name": stitch.MODE_NAMES[mode],
                                       "batch": b, "num_heads": h, "seq_len": n, "head_dim": d, "causal": causal,
                                       "dtype": DTYPE, "tile": tile.label(), "block_r": tile.block_r,
                                       "block_c": tile.block_c, "warps": tile.warps, "stages": tile.stages},
                                      metrics, stats))
        del q, k, v
        torch.cuda.empty_cache()
    return records
