"""Host-side logic of the paged-KV ops (no GPU): the decode tile's legality mirror, the partition
rule, the specialisations CI compiles, the input checks that run before any device work, and
Prototype 3's CPU sweep."""
from __future__ import annotations

import numpy as np
import pytest

from attnproto.ops.families import paged_decode as fam
from attnproto.ops.paged_problem import HEAD_DIMS, PAGE_SIZES, PagedProblem


def _problem(batch=32, hq=32, hkv=8, nq=1, d=128, blocks=256, bs=16):
    return PagedProblem(None, None, None, None, None, batch, hq, hkv, nq, d, batch * blocks, bs, blocks,
                        "bfloat16", "nhd", d ** -0.5, (0, 0, 0), (0, 0, 0), (0, 0, 0))


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("nq", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
def test_default_tile_is_legal_and_packs_what_fits(d, nq, group):
    cfg, why = fam.choose_config(d, nq, group)
    ok, reason = fam.legal(cfg, d, nq, group)
    assert ok, reason
    assert group % cfg.heads == 0 and why
    bigger = [h for h in range(cfg.heads + 1, group + 1) if group % h == 0]
    for h in bigger:  # every larger divisor of the group breaks a kernel limit
        assert not fam.legal(fam.DecodeConfig(heads=h, stages=cfg.stages), d, nq, group)[0]
    assert fam.shared_bytes(cfg, d, nq) <= fam.SMEM_LIMIT


@pytest.mark.parametrize("cfg, match", [
    (fam.DecodeConfig(heads=3), "divide"),
    (fam.DecodeConfig(heads=8, keys_per_warp=24), "multiple of 16"),
    (fam.DecodeConfig(heads=8, stages=1), "stages"),
    (fam.DecodeConfig(heads=8, warps=9), "warps"),
    (fam.DecodeConfig(heads=8, keys_per_warp=128), "accumulator"),
])
def test_illegal_tiles_rejected_with_reason(cfg, match):
    ok, reason = fam.legal(cfg, 128, 4, 8)
    assert not ok and match in reason


def test_partition_rule_splits_only_small_batches():
    cfg = fam.choose_config(128, 1, 4)[0]
    big = _problem(batch=256)
    assert fam.partition_plan(big, cfg, 132)[0] == 1
    small = _problem(batch=1, blocks=2048)           # 32K tokens of capacity
    parts, size, why = fam.partition_plan(small, cfg, 132)
    assert parts > 1 and size % cfg.tile_keys == 0 and parts * size >= small.capacity
    assert size >= fam.MIN_PARTITION_KEYS and "fill" in why
    # explicit counts cover the capacity too, and bad ones are named
    p, s, _ = fam.partition_plan(small, cfg, 132, 7)
    assert p * s >= small.capacity
    with pytest.raises(ValueError, match="num_partitions"):
        fam.partition_plan(small, cfg, 132, 0)
    with pytest.raises(ValueError, match="max_context"):
        fam.partition_plan(small, cfg, 132, "auto", max_context=small.capacity + 1)


def test_specialisations_cover_every_page_size_and_head_dim():
    specs = fam.specialisations()
    pages = {c["PAGE_SIZE"] for n, c in specs if n == fam.KERNEL}
    dims = {c["HEAD_DIM"] for n, c in specs if n == fam.KERNEL}
    assert pages == {0, *PAGE_SIZES} and dims == set(HEAD_DIMS)
    assert {c["SPLIT"] for n, c in specs if n == fam.KERNEL} == {0, 1}
    assert any(n == fam.REDUCE_KERNEL for n, _ in specs)
    from attnproto import kernels

    names = {n for n, _ in kernels.all_specialisations()}
    assert {fam.KERNEL, fam.REDUCE_KERNEL, "paged_append"} <= names


def test_illegal_constants_fail_to_compile(nvrtc):
    from attnproto.ops.variants import BASE

    base = dict(HEAD_DIM=128, PAGE_SIZE=16, HEADS=8, NQ=1, WARPS=4, KEYS_PER_WARP=16, STAGES=3, SPLIT=0, DTYPE=1,
                **BASE.constants())
    for bad, text in ((dict(PAGE_SIZE=12), "PAGE_SIZE"), (dict(NQ=9), "NQ"), (dict(HEADS=64, NQ=8), "register")):
        with pytest.raises(Exception, match=text):
            nvrtc.cuda_compile("paged_decode", dict(base, **bad), "sm_90a")


def test_host_tensors_are_refused_with_the_argument_named():
    torch = pytest.importorskip("torch")
    from attnproto.ops import paged_problem

    q = torch.zeros(2, 8, 1, 128, dtype=torch.bfloat16)
    kc = torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)
    t = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="q: the paged kernels take torch CUDA tensors"):
        paged_problem.check_paged(q, kc, kc, t, lens)
    with pytest.raises(ValueError, match="q: .* got a numpy"):
        paged_problem.check_paged(np.zeros(3), kc, kc, t, lens)
    with pytest.raises(TypeError, match="q: expected a numpy array or a tensor"):
        paged_problem.check_paged([1, 2], kc, kc, t, lens)


def test_proto3_cpu_quick_runs(env, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "attnproto", "run", "proto3", "--backend", "cpu", "--quick",
                        "--out", str(tmp_path / "res"), "--no-kb"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paging cost of the numpy reference path" in r.stdout


def test_proto3_findings_from_synthetic_records(tmp_path):
    """The CUDA findings code on records shaped like the sweep's (timings made up here, so the
    test checks the plumbing: units, citations, answers), without a GPU."""
    from attnproto import lab
    from attnproto.experiments.proto3 import common as C
    from attnproto.experiments.proto3.findings import findings_of
    from attnproto.experiments.registry import ExperimentContext

    ctx = ExperimentContext("proto3", "cuda", {}, "test-gpu", "0", "abc", True, lambda it=None, **k: it,
                            tmp_path, np.random.default_rng(0))
    recs = []

    def rec(kernel, sweep, b, hq, hkv, n, bs, ms, **extra):
        cfg = {"kernel": kernel, "sweep": sweep, "batch": b, "num_heads": hq, "num_kv_heads": hkv,
               "head_dim": 128, "context": n, "block_size": bs, "dtype": "bfloat16"}
        metrics = {"time_us": ms * 1e3, "bandwidth_tbps": 1.0, "of_ceiling_ratio": 0.5, **extra}
        recs.append(ctx.record(cfg, metrics, lab.timing([ms, ms * 1.01, ms * 0.99])))

    for n in C.BLOCK_SWEEP_CONTEXTS:
        for bs in C.BLOCK_SIZES:
            rec(C.OURS, "block", 32, 32, 8, n, bs, 1.0 + 0.01 * bs, smem_bytes=1.0, registers_regs=1.0)
        rec(C.OURS_IDENTITY, "block", 32, 32, 8, n, 16, 1.1)
        rec(C.OURS_CONTIGUOUS, "block", 32, 32, 8, n, 0, 1.1)
        rec(C.CUDNN, "block", 32, 32, 8, n, 0, 1.2)
    for p in (1, 2, 4):
        rec(f"{C.OURS}_p{p}", "split", 1, 32, 8, 32768, 16, 1.0 / p, partitions_count=p)
    rec(C.OURS, "split", 1, 32, 8, 32768, 16, 0.3, partitions_count=4)
    rec(C.OURS, "pack", 32, 32, 8, 4096, 16, 1.0)
    rec(C.OURS_UNPACKED, "pack", 32, 32, 8, 4096, 16, 2.0)
    rows = [{"head_dim": d, "block_size": bs, "smem_bytes": 1000 * d, "registers": 100, "heads": 4}
            for d in (64, 128, 256) for bs in C.BLOCK_SIZES]
    found = findings_of(ctx, recs, rows)
    from attnproto.experiments.proto3.findings import budget_table
    from attnproto.report import format_table

    table = budget_table(rows)
    assert len(table) == len(rows) and "fits_m4_32kb" in format_table(table)
    titles = " | ".join(f.title for f in found)
    assert len(found) >= 5, titles
    for word in ("Best KV block size", "budget", "What paging costs", "split-KV", "GQA group", "recommendation"):
        assert word in titles, (word, titles)
