"""A quick look at what each Prototype 7 variant costs on the wgmma kernel, before the full
``attnproto run proto7`` sweep: the base kernel and every variant at one shape, same tiles.

    python3 tools/variant_probe.py OUT.json [--n 4096] [--d 128] [--iters 30]

B = 16384 / N sequences, Hq = 32, Hkv = 8 (GQA 4), bfloat16, causal, the tiles the front door
chooses for the base call (kernel="auto"), reused for every variant so only the variant
differs. CUDA-event timing (attnproto.lab through the launch's time()); prints median, CV, the
ratio to the base and the kernel's registers / local bytes, and writes the rows to OUT.json.
Also timed: the standalone RoPE kernel over Q and K (what fused RoPE saves) and the window's
time against (W / N) x the full causal time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnproto.ops import flash, rope as _rope, variants

TOKENS = 16384
HEADS, KV_HEADS = 32, 8
SOFTCAP = 50.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    n, d, b = a.n, a.d, max(1, TOKENS // a.n)
    q = torch.randn((b, HEADS, n, d), device="cuda").bfloat16()
    k = torch.randn((b, KV_HEADS, n, d), device="cuda").bfloat16()
    v = torch.randn((b, KV_HEADS, n, d), device="cuda").bfloat16()
    base = flash.prepare_forward(q, k, v, causal=True)
    cfg = base.config
    table = variants.rope_tables(n, d)
    slopes = torch.rand(HEADS, device="cuda") * 0.5
    cases = {
        "base": {},
        "rope-half-computed": {"rope": "half"},
        "rope-half-table": {"rope": "half", "rope_table": table},
        "rope-interleaved-table": {"rope": "interleaved", "rope_table": table},
        "alibi": {"alibi": True},
        "alibi-slopes": {"alibi": slopes},
        "softcap": {"softcap": SOFTCAP},
        "window-n/8": {"window": n // 8},
        "window-n/4": {"window": n // 4},
        "gemma2": {"rope": "half", "rope_table": table, "window": n // 2, "softcap": SOFTCAP},
    }
    rows = []
    t_base = None
    for name, kw in cases.items():
        launch = flash.prepare_forward(q, k, v, causal=True, kernel=base.family, config=cfg, **kw)
        t = launch.time(warmup=5, iters=a.iters)
        t_base = t.median_ms if t_base is None else t_base
        res = launch.resources
        row = {"variant": name, "median_ms": t.median_ms, "cv": t.cv, "vs_base": t.median_ms / t_base,
               "registers": res.get("registers"), "local_bytes": res.get("local_bytes"),
               "config": str(cfg), "family": base.family}
        if "window" in kw:
            row["vs_window_fraction_of_full"] = t.median_ms / (kw["window"] / n * t_base)
        rows.append(row)
        print(f"{name:24s} {t.median_ms * 1e3:9.1f} us  cv {100 * t.cv:5.2f} %  x{row['vs_base']:.3f}  "
              f"regs {row['registers']} local {row['local_bytes']}")
    for label, x in (("rope-standalone-q", q), ("rope-standalone-k", k)):
        t = _rope.prepare_rope(x, table=table).time(warmup=5, iters=a.iters)
        rows.append({"variant": label, "median_ms": t.median_ms, "cv": t.cv, "vs_base": t.median_ms / t_base})
        print(f"{label:24s} {t.median_ms * 1e3:9.1f} us  cv {100 * t.cv:5.2f} %")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"n": n, "d": d, "batch": b, "heads": HEADS, "kv_heads": KV_HEADS,
                                 "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
