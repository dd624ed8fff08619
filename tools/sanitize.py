"""compute-sanitizer memcheck, racecheck, synccheck and initcheck on small shapes of every
kernel version: every registered CUDA flash family (attnproto.ops.families.FAMILIES) at its
test head dims, and the other ops' kernels.

    python3 tools/sanitize.py            # runs itself under each sanitizer tool, prints a table
    python3 tools/sanitize.py --child    # the workload (what the sanitizer watches)

Exit status 0 only if every tool reports no error. Shapes are small and not
tile multiples so that masked tails are exercised.
"""
from __future__ import annotations

import re
from collections import Counter
import subprocess
import sys

# $SANITIZE_TOOLS (comma-separated) narrows the list, e.g. to fit a short device lease.
TOOLS = tuple(t for t in __import__("os").environ.get("SANITIZE_TOOLS", "memcheck,racecheck,synccheck,initcheck")
              .split(",") if t)
# Per-tool wall-clock limit (seconds): the sanitizer slows kernels down by 10-100x.
TOOL_TIMEOUT_S = int(__import__("os").environ.get("SANITIZE_TIMEOUT_S", "900"))
SMALL_N = 77        # not a multiple of any tile
SMALL_NKV = 45      # Nq != Nkv, with causal: some query rows see no key


def workload() -> None:
    import torch

    from attnproto import backend, gpu_smoke
    from attnproto.ops import families, flash, linear, stitch
    from attnproto.ops.problem import DeviceSpec, ProblemSpec
    import numpy as np

    be = backend.get("cuda")
    gpu_smoke.run_matmul(be, 33, 17, 21, np.random.default_rng(), iters=1)
    for fam in families.for_backend("cuda"):
        if fam.dsl:
            spec = ProblemSpec(1, 4, 2, SMALL_N, SMALL_N, fam.test_head_dims[0], "bfloat16", False)
            ok, why = fam.supports_spec(spec, DeviceSpec.from_backend(be))
            if not ok:  # a DSL the machine lacks (its wheel not carried): said, not hidden
                print(f"skipped {fam.name}: {why}", flush=True)
                continue
        for d in fam.test_head_dims:
            for causal in (False, True):
                for nq, nkv in ((SMALL_N, SMALL_N), (SMALL_N, SMALL_NKV)):
                    # GQA (4 query heads on 2 KV heads), odd lengths, some causal rows with no key.
                    q = torch.randn(1, 4, nq, d, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(1, 2, nkv, d, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn_like(k)
                    launch = flash.prepare_forward(q, k, v, causal=causal, kernel=fam.name)
                    launch.launch()
                    torch.cuda.synchronize()
                    print(f"ran {fam.name} {fam.config_label(launch.config)} D={d} causal={causal} "
                          f"Nq={nq} Nkv={nkv}", flush=True)
    q = torch.randn(1, 2, SMALL_N, 128, device="cuda", dtype=torch.bfloat16)
    flash.flash_forward(q, q, q, causal=True)
    torch.cuda.synchronize()
    print("ran auto D=128 causal=True", flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        for d in (64, 128):
            q, k, v = (torch.randn(1, 2, 100, d, device="cuda", dtype=dtype) for _ in range(3))
            for algorithm in ("auto", "two_pass"):
                linear.linear_attention(q, k, v, chunk_size=32, scale=0.05, algorithm=algorithm)
                linear.linear_attention(q, k, v, chunk_size=64, scale=0.05, decay=0.9, algorithm=algorithm)
            torch.cuda.synchronize()
            print(f"ran linear D={d} dtype={dtype}", flush=True)
    # Every value-column split and warp layout of the fused kernel, ragged length, with decay.
    for d in (64, 128):
        q, k, v = (torch.randn(1, 2, SMALL_N + 100, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for c in linear.FUSED_CHUNKS:
            for cfg in linear.all_fused_variants("bfloat16", d, c, True):
                for segments in (1, 2):
                    linear.LinearPlan(q, k, v, chunk_size=c, scale=0.05, decay=0.9, algorithm="fused",
                                      fused_config=cfg.with_segments(segments)).run()
        torch.cuda.synchronize()
        print(f"ran linear_fused D={d} (every chunk, block_dv, state warps; 1 and 2 segments)", flush=True)
    # Prototype 2: every dispatch mode of the stitched tensor-core kernel.
    for causal in (False, True):
        q = torch.randn(1, 2, SMALL_N, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 2, SMALL_NKV, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for mode in stitch.MODES:
            stitch.prepare(q, k, v, mode, causal=causal).launch()
        torch.cuda.synchronize()
        print(f"ran stitch modes {stitch.MODES} causal={causal}", flush=True)


def main() -> int:
    if "--child" in sys.argv:
        workload()
        return 0
    rows, ok = [], True
    for tool in TOOLS:
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99", sys.executable, __file__, "--child"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
            out = res.stdout + res.stderr
            m = re.search(r"ERROR SUMMARY: (\d+) error", out) or re.search(
                r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", out)
            errors = int(m.group(1)) if m else -1
            launched = out.count("\nran ")
            passed = res.returncode == 0 and errors == 0
        except subprocess.TimeoutExpired as exc:
            out, errors, launched, passed = str(exc), -1, 0, False
        ok &= passed
        rows.append((tool, errors, launched, "clean" if passed else "FAILED"))
        if not passed:
            # Which kernels the reported errors are in (the tail below shows only the last few).
            where = Counter(re.findall(r"^=+\s+at (\w+)\+0x", out, re.M))
            print(f"{tool}: errors reported in " + (", ".join(f"{k} x{n}" for k, n in where.most_common()) or "no kernel"))
            print(out[-6000:])
    print(f"{'tool':<10} {'errors':>6} {'workloads':>9}  verdict")
    for tool, errors, launched, verdict in rows:
        print(f"{tool:<10} {errors:>6} {launched:>9}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
