"""Does the warm-up length explain why proto1's auto pass timed the sweep's own best tiles
slower at short N? For each point: the default call (kernel="auto", the shipped table), timed
after a host-side gap with the old count-only warm-up (3 calls) and with the time-based one
(WARM_MS of warm-up calls), next to the sweep's committed best median for that point.

    python3 tools/warmup_probe.py [RESULTS_DIR] [--json OUT.json]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from attnproto.experiments.proto1.common import best, problem
from attnproto.ops import flash
from attnproto.records import read_records

POINTS = ((256, False, 512), (128, True, 512), (256, False, 1024), (128, False, 512), (128, True, 2048),
          (128, False, 16384))
GAP_S = 0.5          # host-side idle time before each timing, like the auto pass's Python work
WARMUP, ITERS = 3, 30
WARM_MS = 50.0       # the time-based warm-up under test


def main(argv: list[str]) -> int:
    import torch

    results = Path(argv[0]) if argv and not argv[0].startswith("--") else Path("results/nvidia-h200/proto1")
    records = read_records(results / "records.jsonl")
    rows = []
    for d, causal, n in POINTS:
        b, h = problem(d, n)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        launch = flash.prepare_forward(q, k, v, causal=causal)
        launch.launch()
        torch.cuda.synchronize()
        time.sleep(GAP_S)
        cold = launch.time(warmup=WARMUP, iters=ITERS, flush_l2=True, min_warmup_ms=0.0)
        time.sleep(GAP_S)
        warm = launch.time(warmup=WARMUP, iters=ITERS, flush_l2=True, min_warmup_ms=WARM_MS)
        ref = best(records, head_dim=d, seq_len=n, causal=causal)
        rows.append({"D": d, "causal": causal, "N": n, "chose": launch.family + " " + str(launch.config),
                     "sweep_best_ms": ref["timing"]["median_ms"], "cold_ms": cold.median_ms, "cold_cv": cold.cv,
                     "warm_ms": warm.median_ms, "warm_cv": warm.cv,
                     "cold_over_best": ref["timing"]["median_ms"] / cold.median_ms,
                     "warm_over_best": ref["timing"]["median_ms"] / warm.median_ms,
                     "warmup_ms": WARM_MS})
    print(f"{'D':>4} {'causal':>6} {'N':>6} {'best_ms':>9} {'cold_ms':>9} {'warm_ms':>9} {'best/cold':>9} {'best/warm':>9}")
    for r in rows:
        print(f"{r['D']:>4} {str(r['causal']):>6} {r['N']:>6} {r['sweep_best_ms']:>9.4f} {r['cold_ms']:>9.4f} "
              f"{r['warm_ms']:>9.4f} {r['cold_over_best']:>9.3f} {r['warm_over_best']:>9.3f}")
    if "--json" in argv:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
