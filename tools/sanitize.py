"""compute-sanitizer memcheck, racecheck, synccheck and initcheck on small shapes of every
kernel version: every registered CUDA flash family (attnproto.ops.families.FAMILIES) at its
test head dims, the paged kernels (decode, append, prefill) at every block size, and the
other ops' kernels.

    python3 tools/sanitize.py            # runs itself under each sanitizer tool, prints a table
    python3 tools/sanitize.py --log results/nvidia-h200/sanitize/sanitize.log   # also the full log, to commit
    python3 tools/sanitize.py --child    # the workload (what the sanitizer watches)
    SANITIZE_WORKLOADS=paged_decode,paged_prefill python3 tools/sanitize.py   # some of them

Exit status 0 only if every tool reports no error. Shapes are small and not
tile multiples so that masked tails are exercised.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

# $SANITIZE_TOOLS (comma-separated) narrows the list, e.g. to fit a short device lease.
TOOLS = tuple(t for t in os.environ.get("SANITIZE_TOOLS", "memcheck,racecheck,synccheck,initcheck")
              .split(",") if t)
# Per-tool wall-clock limit (seconds): the sanitizer slows kernels down by 10-100x.
TOOL_TIMEOUT_S = int(os.environ.get("SANITIZE_TIMEOUT_S", "900"))
SMALL_N = 77        # not a multiple of any tile
SMALL_NKV = 45      # Nq != Nkv, with causal: some query rows see no key


#: Contexts of the paged workloads: one token, a short tail, more than one key tile.
PAGED_CTX = (1, SMALL_NKV, SMALL_N + 100)


def _small_pool(torch, page: int):
    """A bf16 pool [blocks, page, 2 kv heads, 128] for PAGED_CTX behind a scattered host table
    int32 [B, max blocks used] (one spare block); returns (k, v, table, blocks used per sequence,
    blocks in the pool)."""
    used = [-(-c // page) for c in PAGED_CTX]
    nb = sum(used) + 1
    k = torch.randn(nb, page, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ids = torch.randperm(nb)
    table = torch.zeros(len(PAGED_CTX), max(used), dtype=torch.int32)
    for b, u in enumerate(used):
        table[b, :u] = ids[sum(used[:b]):sum(used[:b]) + u].to(torch.int32)
    return k, v, table, used, nb


def paged_prefill(torch) -> None:
    """The wgmma kernel over a paged pool at every block size: mixed short contexts, a scattered
    table, and one table entry out of the pool (its rows become NaN; nothing outside is read)."""
    from attnproto.ops import paged_prefill_wgmma as pp

    for page in pp.PAGE_SIZES:
        k, v, table, used, nb = _small_pool(torch, page)
        table[2, used[2] - 1] = nb + 3
        lens = torch.tensor(PAGED_CTX, dtype=torch.int32, device="cuda")
        q = torch.randn(len(PAGED_CTX), 4, SMALL_NKV, 128, device="cuda", dtype=torch.bfloat16)
        for causal in (False, True):
            pp.prepare_paged_prefill_wgmma(q, k, v, table.cuda(), lens, causal=causal).launch()
        torch.cuda.synchronize()
        print(f"ran paged prefill wgmma block_size={page} D=128", flush=True)


def flash(torch) -> None:
    """Every registered CUDA flash family at its test head dims, and the default call."""
    from attnproto import backend, gpu_smoke
    from attnproto.ops import families, flash as flash_ops
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
                    launch = flash_ops.prepare_forward(q, k, v, causal=causal, kernel=fam.name)
                    launch.launch()
                    torch.cuda.synchronize()
                    print(f"ran {fam.name} {fam.config_label(launch.config)} D={d} causal={causal} "
                          f"Nq={nq} Nkv={nkv}", flush=True)
    q = torch.randn(1, 2, SMALL_N, 128, device="cuda", dtype=torch.bfloat16)
    flash_ops.flash_forward(q, q, q, causal=True)
    torch.cuda.synchronize()
    print("ran auto D=128 causal=True", flush=True)


def linear(torch) -> None:
    """Linear attention: both algorithms, and every variant of the fused kernel."""
    from attnproto.ops import linear as lin

    for dtype in (torch.bfloat16, torch.float32):
        for d in (64, 128):
            q, k, v = (torch.randn(1, 2, 100, d, device="cuda", dtype=dtype) for _ in range(3))
            for algorithm in ("auto", "two_pass"):
                lin.linear_attention(q, k, v, chunk_size=32, scale=0.05, algorithm=algorithm)
                lin.linear_attention(q, k, v, chunk_size=64, scale=0.05, decay=0.9, algorithm=algorithm)
            torch.cuda.synchronize()
            print(f"ran linear D={d} dtype={dtype}", flush=True)
    # Every value-column split and warp layout of the fused kernel, ragged length, with decay.
    for d in (64, 128):
        q, k, v = (torch.randn(1, 2, SMALL_N + 100, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for c in lin.FUSED_CHUNKS:
            for cfg in lin.all_fused_variants("bfloat16", d, c, True):
                for segments in (1, 2):
                    lin.LinearPlan(q, k, v, chunk_size=c, scale=0.05, decay=0.9, algorithm="fused",
                                   fused_config=cfg.with_segments(segments)).run()
        torch.cuda.synchronize()
        print(f"ran linear_fused D={d} (every chunk, block_dv, state warps; 1 and 2 segments)", flush=True)


def stitch(torch) -> None:
    """Prototype 2: every dispatch mode of the stitched tensor-core kernel."""
    from attnproto.ops import stitch as st

    for causal in (False, True):
        q = torch.randn(1, 2, SMALL_N, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 2, SMALL_NKV, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for mode in st.MODES:
            st.prepare(q, k, v, mode, causal=causal).launch()
        torch.cuda.synchronize()
        print(f"ran stitch modes {st.MODES} causal={causal}", flush=True)


def paged_decode(torch) -> None:
    """Paged decode (partition + reduce, split and not) and append_kv at every block size, the
    contiguous policy, Nq > 1, mixed short contexts, a scattered table, and one table entry that
    leaves the pool after the check (its rows become NaN; nothing outside is read)."""
    from attnproto.ops import paged
    from attnproto.ops.paged_problem import PAGE_SIZES

    ctx = PAGED_CTX
    for page in PAGE_SIZES:
        k, v, table, used, nb = _small_pool(torch, page)
        table = table.cuda()
        last = int(table[2, used[2] - 1])
        lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
        new = torch.randn(len(ctx), 2, 1, 128, device="cuda", dtype=torch.bfloat16)
        paged.append_kv(new, new, k, v, table, lens - 1)
        for nq in (1, 3):
            q = torch.randn(len(ctx), 8, nq, 128, device="cuda", dtype=torch.bfloat16)
            for parts in (1, 3):
                plan = paged.prepare_paged_decode(q, k, v, table, lens, num_partitions=parts)
                plan.launch()
                torch.cuda.synchronize()
                table[2, used[2] - 1] = nb + 3       # out of the pool after the check
                plan.launch()
                torch.cuda.synchronize()
                table[2, used[2] - 1] = last
        print(f"ran paged decode + append block_size={page} D=128", flush=True)
    kc = torch.randn(len(ctx), 2, max(ctx), 64, device="cuda", dtype=torch.float16)
    q = torch.randn(len(ctx), 4, 1, 64, device="cuda", dtype=torch.float16)
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    paged.prepare_contiguous_decode(q, kc, kc, lens, num_partitions=2).launch()
    torch.cuda.synchronize()
    print("ran contiguous decode D=64", flush=True)


def variants(torch) -> None:
    """Every Prototype 7 variant (variants.VARIANT_SPECIALISATIONS) on every CUDA flash family that
    takes it, both masks, GQA, odd lengths; and the standalone RoPE / repeat_kv kernels."""
    from attnproto.ops import families, flash as flash_ops, rope, variants as V

    for var in V.VARIANT_SPECIALISATIONS:
        for fam in families.for_backend("cuda"):
            if fam.dsl or not set(var.features()) <= fam.variant_features:
                continue
            d = 128
            for causal in (False, True):
                q = torch.randn(1, 4, SMALL_N, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(1, 2, SMALL_N + 30, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                kw = {}
                if var.rope:
                    kw.update(rope=var.rope, rope_offset=3)
                    if var.rope_source == "table":
                        kw["rope_table"] = V.rope_tables(SMALL_N + 40, d)
                if var.alibi:
                    kw["alibi"] = True if var.alibi == "standard" else torch.rand(4, device="cuda")
                if var.window:
                    kw["window"] = SMALL_NKV
                if var.softcap:
                    kw["softcap"] = 30.0
                flash_ops.flash_forward(q, k, v, causal=causal, kernel=fam.name, **kw)
                torch.cuda.synchronize()
                print(f"ran {fam.name} {var.label} causal={causal}", flush=True)
    x = torch.randn(1, 3, SMALL_N, 128, device="cuda", dtype=torch.bfloat16)
    for style in ("half", "interleaved"):
        for table in (None, V.rope_tables(SMALL_N + 5, 128)):
            rope.rope(x, style=style, offset=5, table=table)
            rope.rope(x, style=style, offset=5, table=table, out=x)
    rope.repeat_kv(x, 4)
    torch.cuda.synchronize()
    print("ran rope_apply / repeat_kv", flush=True)


def rope_append(torch) -> None:
    """RoPE fused into the paged KV store (paged_rope_append.cu) at three block sizes: the last
    token of every PAGED_CTX context, q rotated out of place."""
    from attnproto.ops import paged_rope, variants as V

    cos, sin = V.rope_tables(max(PAGED_CTX), 128)
    for page in (1, 16, 128):
        k_cache, v_cache, table, _, _ = _small_pool(torch, page)
        b, hkv, d = table.shape[0], k_cache.shape[2], k_cache.shape[3]
        positions = torch.tensor([c - 1 for c in PAGED_CTX], dtype=torch.int32, device="cuda")
        k_new = torch.randn(b, hkv, 1, d, device="cuda", dtype=k_cache.dtype)
        q_new = torch.randn(b, 2 * hkv, 1, d, device="cuda", dtype=k_cache.dtype)
        paged_rope.rope_append(q_new, k_new, torch.randn_like(k_new), k_cache, v_cache, table.cuda(), positions,
                               cos, sin)
        torch.cuda.synchronize()
        print(f"ran paged_rope_append page={page}", flush=True)


#: The workloads by name, in run order; $SANITIZE_WORKLOADS (comma-separated) narrows them.
WORKLOADS = {"flash": flash, "variants": variants, "paged_prefill": paged_prefill, "paged_decode": paged_decode,
             "rope_append": rope_append, "linear": linear, "stitch": stitch}


def workload() -> None:
    import torch

    wanted = [w for w in os.environ.get("SANITIZE_WORKLOADS", ",".join(WORKLOADS)).split(",") if w]
    unknown = [w for w in wanted if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"SANITIZE_WORKLOADS: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    for name in wanted:
        WORKLOADS[name](torch)


def _log_path() -> str | None:
    if "--log" not in sys.argv:
        return None
    i = sys.argv.index("--log")
    if i + 1 >= len(sys.argv):
        raise SystemExit("--log: needs a file, e.g. results/nvidia-h200/sanitize/sanitize.log")
    return sys.argv[i + 1]


def main() -> int:
    if "--child" in sys.argv:
        workload()
        return 0
    log_path = _log_path()
    log: list[str] = []
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
        log.append(f"==== compute-sanitizer --tool {tool} ({'clean' if passed else 'FAILED'})\n{out}")
        ok &= passed
        rows.append((tool, errors, launched, "clean" if passed else "FAILED"))
        if not passed:
            # Which kernels the reported errors are in (the tail below shows only the last few).
            where = Counter(re.findall(r"^=+\s+at (\w+)\+0x", out, re.M))
            print(f"{tool}: errors reported in " + (", ".join(f"{k} x{n}" for k, n in where.most_common()) or "no kernel"))
            print(out[-6000:])
    table = [f"{'tool':<10} {'errors':>6} {'workloads':>9}  verdict"]
    table += [f"{tool:<10} {errors:>6} {launched:>9}  {verdict}" for tool, errors, launched, verdict in rows]
    print("\n".join(table))
    if log_path is not None:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(table) + "\n\n" + "\n".join(log))
        print(f"log: {log_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
