#!/usr/bin/env python3
"""Issue 19's measurement: one experiment's full sweep on one GPU and sharded over N, timed and compared.

    python3 tools/shard_speedup.py run DIR [--gpus N|all | --scheduler ADDRESS] [--backend cuda]
                                           [--experiment proto1] [--quick]
    python3 tools/shard_speedup.py compare DIR_ONE DIR_N

``run`` runs ``attnproto run EXP --backend cuda --no-kb --out DIR`` (with ``--gpus`` when given)
and writes ``DIR/wall.json``: the wall time of the whole command and the GPUs it used. Run it
once without ``--gpus`` and once with (each run fits in one device call).
``compare`` says whether the two runs' records are equal in content (attnproto.shard.record_content:
everything but the timing fields), how many paired timings differ by no more than the sum of the
two records' CVs (|median_a - median_b| / mean of the two <= cv_a + cv_b), whether the findings
have the same ids and answers, and the speed-up against the target (>= 0.8 x N on N GPUs).
Prints JSON; exit status 1 when the contents differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from attnproto import shard
from attnproto.findings import canonical_json, read_findings
from attnproto.records import read_records

TARGET_EFFICIENCY = 0.8       # the target: >= 0.8 x N speed-up on N GPUs
WALL_FILE = "wall.json"


def _result_dir(root: Path, experiment: str) -> Path:
    found = sorted(root.glob(f"*/{experiment}/records.jsonl"))
    if len(found) != 1:
        raise SystemExit(f"{root}: expected one */{experiment}/records.jsonl, found {len(found)}")
    return found[0].parent


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    cmd = [sys.executable, "-m", "attnproto", "run", args.experiment, "--backend", args.backend, "--no-kb",
           "--out", str(out)]
    if args.gpus:
        cmd += ["--gpus", args.gpus]
    if args.scheduler:
        cmd += ["--scheduler", args.scheduler]
    if args.quick:
        cmd.append("--quick")
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    if rc == 0:
        run = json.loads((_result_dir(out, args.experiment) / "run.json").read_text())
        workers = run.get("shard", {}).get("workers", 1)      # one worker per GPU under --gpus
        (out / WALL_FILE).write_text(json.dumps({"argv": cmd, "wall_s": wall, "workers": workers,
                                                 "experiment": args.experiment}, indent=1) + "\n")
    print(json.dumps({"rc": rc, "wall_s": wall}))
    return rc


def _content_key(rec: dict) -> str:
    return canonical_json(shard.record_content(rec))


def cmd_compare(args: argparse.Namespace) -> int:
    walls = [json.loads((Path(d) / WALL_FILE).read_text()) for d in (args.one, args.many)]
    exp = walls[0]["experiment"]
    dirs = [_result_dir(Path(d), exp) for d in (args.one, args.many)]
    recs = [read_records(d / "records.jsonl") for d in dirs]
    keys = [Counter(_content_key(r) for r in rs) for rs in recs]
    by_key = [{_content_key(r): r for r in rs} for rs in recs]
    paired = [(by_key[0][k], by_key[1][k]) for k in keys[0] if k in keys[1]]
    within = 0
    for a, b in paired:
        ma, mb = a["timing"]["median_ms"], b["timing"]["median_ms"]
        within += abs(ma - mb) / ((ma + mb) / 2) <= a["timing"]["cv"] + b["timing"]["cv"]
    finds = [[(f.id, canonical_json(f.answer)) for f in read_findings(d / "findings.jsonl")] for d in dirs]
    n = walls[1]["workers"]
    speedup = walls[0]["wall_s"] / walls[1]["wall_s"]
    report = {
        "experiment": exp, "records": [len(r) for r in recs], "content_equal": keys[0] == keys[1],
        "only_in_one": sum((keys[0] - keys[1]).values()), "only_in_many": sum((keys[1] - keys[0]).values()),
        "timings_paired": len(paired), "timings_within_cv": within,
        "finding_ids_equal": sorted(i for i, _ in finds[0]) == sorted(i for i, _ in finds[1]),
        "finding_answers_differ": sorted({i for i, _ in set(finds[0]) ^ set(finds[1])}),
        "wall_s": [walls[0]["wall_s"], walls[1]["wall_s"]], "workers": [walls[0]["workers"], n], "speedup": speedup,
        "target_speedup": TARGET_EFFICIENCY * n, "meets_target": speedup >= TARGET_EFFICIENCY * n,
    }
    print(json.dumps(report, indent=1))
    return 0 if report["content_equal"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("dir")
    p.add_argument("--gpus", default=None, help="N or all (default: the serial run on one GPU)")
    p.add_argument("--scheduler", default=None, help="an existing Dask cluster instead of --gpus")
    p.add_argument("--backend", default="cuda")
    p.add_argument("--experiment", default="proto1")
    p.add_argument("--quick", action="store_true")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare")
    p.add_argument("one", help="the run directory without --gpus")
    p.add_argument("many", help="the run directory with --gpus")
    p.set_defaults(func=cmd_compare)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
