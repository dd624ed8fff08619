"""Prototype 3 on Metal: the paged decode kernels (paged_attention.metal, paged_reduce.metal), their
budgets, the op attnproto.ops.metal_paged and `attnproto run proto3 --backend metal`.

* pure Python / static (run everywhere; compiles need .ci/metal_deps.sh): the budget map against
  the header's own macros compiled by g++, illegal combinations failing the kernel's static_assert,
  specs, dispatch geometry, params, argument errors raised before any dispatch, planted bugs;
* HARNESS tests (run everywhere): the op and the proto3 Metal sweep through ``FakePagedMetal``
  (tests/metal_paged_fake.py), which computes with numpy: a check of the Python plumbing, NOT of
  the Metal kernels;
* Metal tests (``needs_metal``): the real kernels, skipped with the reason without an Apple GPU.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from metal_paged_fake import FakePagedMetal
from test_metal_ops import needs_metal
from test_metal_static import REPO, check, needs_tools, plant

from attnproto import metal_paged_specs as ps
from attnproto import metal_specs, metal_timing
from attnproto.experiments import registry
from attnproto.experiments.proto3 import metal as proto3
from attnproto.experiments.registry import ExperimentError
from attnproto.metal_specs import MetalSpec
from attnproto.ops import metal_paged

PAGED = check.METAL_DIR / "paged_attention.metal"
REDUCE = check.METAL_DIR / "paged_reduce.metal"


# ============================================================== budgets and specs
@needs_tools
def test_budget_is_the_headers_macros(tmp_path):
    """Python's budget (and each region) equals ATTNPROTO_PAGED_* compiled from metal_bindings.h."""
    cases = [(d, bs, g) for d in (8, 64, 72, 128, 256) for bs in range(8, 129, 8) for g in range(1, 9)]
    lines = []
    for d, bs, g in cases:
        lines.append(f'std::printf("%d %d %d %d %d\\n", int(ATTNPROTO_PAGED_TG_BYTES({d}, {bs}, {g}, 2)), '
                     f'int(ATTNPROTO_PAGED_TG_Q_BYTES({d}, {g})), int(ATTNPROTO_PAGED_TG_S_BYTES({bs}, {g})), '
                     f'int(ATTNPROTO_PAGED_TG_STATS_BYTES({g})), int(ATTNPROTO_PAGED_TG_KV_BYTES({d}, {bs}, 2)));')
    lines += [f'std::printf("%d\\n", int(ATTNPROTO_PAGED_REDUCE_TG_BYTES({n})));' for n in (1, 7, 2048)]
    src = tmp_path / "budget.cpp"
    src.write_text('#include <cstdio>\n#include "metal_bindings.h"\nint main() {\n' + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "budget"
    subprocess.run(["g++", "-std=c++17", f"-I{check.METAL_DIR}", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    for (d, bs, g), line in zip(cases, out):
        regions = ps.paged_threadgroup_regions(d, bs, g)
        assert [int(x) for x in line.split()] == [ps.paged_threadgroup_bytes(d, bs, g), *regions.values()]
    assert [int(x) for x in out[len(cases):]] == [ps.reduce_threadgroup_bytes(n) for n in (1, 7, 2048)]


def test_header_geometry_matches_python():
    defs = check.bindings()
    assert defs["ATTNPROTO_PAGED_THREADS"] == ps.PAGED_THREADS
    assert defs["ATTNPROTO_PAGED_MAX_HEAD_DIM"] == ps.PAGED_MAX_HEAD_DIM
    assert defs["ATTNPROTO_PAGED_MAX_GROUP"] == ps.PAGED_MAX_GROUP
    assert defs["ATTNPROTO_PAGED_MAX_BLOCK_SIZE"] == ps.PAGED_MAX_BLOCK_SIZE
    assert defs["ATTNPROTO_PAGED_STATS"] == ps.PAGED_STATS
    assert defs["ATTNPROTO_PAGED_MAX_PARTITIONS"] == ps.PAGED_MAX_PARTITIONS
    assert defs["ATTNPROTO_PAGED_REDUCE_THREADS"] == ps.REDUCE_THREADS


def test_budget_map_covers_the_seed_block_sizes():
    rows = ps.budget_map()
    assert {r["block_size"] for r in rows} == {8, 16, 32, 64, 128}
    for r in rows:
        assert r["legal"] == (r["total_bytes"] <= metal_specs.THREADGROUP_MEMORY_LIMIT)
        assert r["total_bytes"] == r["q_bytes"] + r["scores_bytes"] + r["stats_bytes"] + r["kv_block_bytes"]
        assert r["legal"] or "32768" in r["reason"]
    # One 128-token FP16 block of K at D=128 is 32 KiB on its own.
    assert ps.illegal_budget_entries() == [(128, 128, g) for g in ps.GQA_GROUPS]


@needs_tools
@pytest.mark.parametrize("entry", ps.illegal_budget_entries(), ids=str)
def test_over_32kb_fails_the_kernels_static_assert(entry):
    d, bs, g = entry
    spec = MetalSpec.make(ps.PAGED_KERNEL, HEAD_DIM=d, BLOCK_SIZE=bs, GQA_GROUP=g,
                          PARTITION_SIZE=ps.PARTITION_SIZE, DTYPE=0)
    for compiler in ("g++", "clang++"):
        problems = check.check_shader_file(PAGED, [spec], which=[compiler])
        assert any("32 KB" in p.message for p in problems), f"{compiler}: {problems}"


@needs_tools
@pytest.mark.parametrize("constants, fragment", [
    (dict(HEAD_DIM=64, BLOCK_SIZE=24, GQA_GROUP=1, PARTITION_SIZE=512), "multiple of BLOCK_SIZE"),
    (dict(HEAD_DIM=64, BLOCK_SIZE=16, GQA_GROUP=9, PARTITION_SIZE=512), "GQA_GROUP"),
    (dict(HEAD_DIM=60, BLOCK_SIZE=16, GQA_GROUP=1, PARTITION_SIZE=512), "HEAD_DIM"),
    (dict(HEAD_DIM=64, BLOCK_SIZE=136, GQA_GROUP=1, PARTITION_SIZE=544), "BLOCK_SIZE"),
    (dict(HEAD_DIM=64, BLOCK_SIZE=16, GQA_GROUP=1, PARTITION_SIZE=512, DTYPE=2), "DTYPE"),
], ids=["partition", "group", "head_dim", "block_size", "dtype"])
def test_illegal_constants_fail_statically_with_a_reason(constants, fragment):
    spec = MetalSpec.make(ps.PAGED_KERNEL, **{"DTYPE": 0, **constants})
    problems = check.check_shader_file(PAGED, [spec], which=["clang++"])
    assert any(fragment in p.message for p in problems), problems


def test_every_proto3_spec_is_statically_checked():
    in_use = {s.canonical() for s in metal_specs.specs_in_use()}
    specs = ps.proto3_specs()
    assert specs and {s.canonical() for s in specs} <= in_use
    names = {s.name for s in specs}
    assert names == {ps.PAGED_KERNEL, ps.REDUCE_KERNEL}
    # every combination the sweep and the gates dispatch
    for d in ps.HEAD_DIMS:
        for part in ps.PARTITION_SIZES:
            for dtype in metal_specs.DTYPE_CODES:
                assert ps.reduce_spec(d, dtype, part).canonical() in in_use
                for bs in ps.BLOCK_SIZES:
                    for g in ps.GQA_GROUPS:
                        if ps.paged_illegal_reason(d, bs, g, dtype, part) is None:
                            assert ps.paged_spec(d, bs, g, dtype, part).canonical() in in_use


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(head_dim=128, block_size=128, group=4), ValueError, "threadgroup memory"),
    (dict(head_dim=64, block_size=12, group=4), ValueError, "block_size"),
    (dict(head_dim=64, block_size=16, group=0), ValueError, "GQA group"),
    (dict(head_dim=64, block_size=16, group=4, partition_size=24), ValueError, "partition_size"),
    (dict(head_dim=64, block_size=16, group=4, dtype="float32"), ValueError, "dtype"),
    (dict(head_dim=64.0, block_size=16, group=4), TypeError, "head_dim"),
])
def test_paged_spec_rejects_with_the_reason(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ps.paged_spec(**kwargs)


def test_dispatch_geometry():
    grid, block, smem = ps.paged_dispatch(3, 4, 5, 128, 16, 8)
    assert grid == (5, 4, 3) and block == (ps.PAGED_THREADS, 1, 1)
    assert smem == ps.paged_threadgroup_bytes(128, 16, 8)
    grid, block, smem = ps.reduce_dispatch(3, 32, 5)
    assert grid == (32, 3, 1) and block == (ps.REDUCE_THREADS, 1, 1) and smem == ps.reduce_threadgroup_bytes(5)
    with pytest.raises(ValueError, match="num_partitions"):
        ps.reduce_dispatch(1, 1, ps.PAGED_MAX_PARTITIONS + 1)
    with pytest.raises(ValueError, match="32768"):
        ps.paged_dispatch(1, 1, 1, 128, 128, 1)
    assert ps.num_partitions(0) == 1 and ps.num_partitions(513) == 2


# ============================================================== the op: params and argument checks
def _inputs(layout="scattered", contexts=(5, 40, 0), heads=8, group=4, d=64, bs=16, seed=0):
    return proto3.paged_inputs(np.random.default_rng(seed), contexts, heads, group, d, bs, layout)


def test_params_describe_the_uploaded_buffers():
    q, kc, vc, table, lens = _inputs()
    prob = metal_paged.check_metal_paged_inputs(q, kc, vc, table, lens)
    p = metal_paged.paged_params(prob)
    nb, bs, hkv, d = kc.shape
    assert list(p["k_stride"]) == [bs * hkv * d, d, hkv * d] == list(p["v_stride"])
    assert list(p["q_stride"])[:2] == [q.shape[1] * d, d] and list(p["o_stride"])[:2] == [q.shape[1] * d, d]
    assert int(p["block_size"]) == bs and int(p["max_blocks_per_seq"]) == table.shape[1]
    assert int(p["num_partitions"]) == 1 and int(p["partition_size"]) == ps.PARTITION_SIZE
    assert int(p["num_blocks"]) == nb
    assert math.isclose(float(p["scale"]), 1 / math.sqrt(d), rel_tol=1e-6)


class _NoDispatch:
    """A metal backend that fails any use: argument errors must come before."""

    name = "metal"

    def __getattr__(self, attr):
        raise AssertionError(f"backend.{attr} used before the arguments were checked")


def _bad_cases():
    q, kc, vc, table, lens = _inputs()
    bad_table = table.copy()
    bad_table[1, 2] = kc.shape[0]
    long_lens = lens.copy()
    long_lens[0] = table.shape[1] * kc.shape[1] + 1
    big = proto3.paged_inputs(np.random.default_rng(0), (5,), 8, 4, 128, 128, "scattered")
    return [
        ("q", (q.astype(np.float32), kc, vc, table, lens), {}, TypeError),
        ("q", (q[None], kc, vc, table, lens), {}, ValueError),
        ("v_cache", (q, kc, vc[:, :8], table, lens), {}, ValueError),
        ("k_cache", (q, kc.astype(np.float32), vc, table, lens), {}, TypeError),
        ("k_cache", (q, kc[..., :32], vc[..., :32], table, lens), {}, ValueError),
        ("q", (q[:, :5], kc, vc, table, lens), {}, ValueError),
        ("q", (np.repeat(q, 2, axis=1), kc[:, :, :1], vc[:, :, :1], table, lens), {}, ValueError),
        ("k_cache", big, {}, ValueError),
        ("block_table", (q, kc, vc, table.astype(np.int64), lens), {}, TypeError),
        ("block_table", (q, kc, vc, table[:2], lens), {}, ValueError),
        ("block_table", (q, kc, vc, bad_table, lens), {}, ValueError),
        ("context_lens", (q, kc, vc, table, lens.astype(np.float32)), {}, TypeError),
        ("context_lens", (q, kc, vc, table, long_lens), {}, ValueError),
        ("context_lens", (q, kc, vc, table, lens - 6), {}, ValueError),
        ("partition_size", (q, kc, vc, table, lens), {"partition_size": 24}, ValueError),
        ("partition_size", (q, kc, vc, table, lens), {"partition_size": 512.0}, TypeError),
        ("scale", (q, kc, vc, table, lens), {"scale": float("nan")}, ValueError),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_naming_the_argument_before_dispatch(case):
    name, args, kwargs, exc = case
    with pytest.raises(exc, match=name):
        metal_paged.prepare_paged_decode(*args, backend=_NoDispatch(), **kwargs)


# ============================================================== HARNESS: numpy stand-in backend
@pytest.mark.parametrize("d, bs, group, part", [(64, 8, 1, 128), (64, 16, 8, 128), (128, 32, 4, 512),
                                                (128, 64, 8, 128), (64, 128, 4, 128)])
def test_harness_op_against_fp64(d, bs, group, part):
    """HARNESS: shapes, strides, the block table, partitions and the reduce through the op."""
    be = FakePagedMetal()
    args = _inputs(contexts=(0, 37, 2 * part + 5, bs), heads=8, group=group, d=d, bs=bs, seed=d + bs)
    o, lse = metal_paged.paged_decode(*args, partition_size=part, backend=be)
    exact_o, exact_lse = proto3.fp64_reference(*args, 1 / math.sqrt(d))
    np.testing.assert_allclose(np.asarray(o, np.float64), exact_o, atol=proto3.ATOL, rtol=proto3.RTOL)
    np.testing.assert_allclose(lse, exact_lse, atol=proto3.ATOL, rtol=proto3.RTOL)
    assert np.isneginf(lse[0]).all() and not np.asarray(o[0], np.float64).any()
    names = [x[0] for x in be.launches]
    assert names == [ps.PAGED_KERNEL, ps.REDUCE_KERNEL]


def test_harness_outputs_are_poisoned_until_written(monkeypatch):
    be = FakePagedMetal()
    monkeypatch.setattr(be, "_reduce", lambda *a: None)
    o, lse = metal_paged.paged_decode(*_inputs(), backend=be)
    assert np.isnan(np.asarray(o, np.float64)).all() and np.isnan(lse).all()


@pytest.fixture
def small_proto3(monkeypatch):
    fake = FakePagedMetal()
    monkeypatch.setattr(proto3, "_metal_backend", lambda: fake)
    monkeypatch.setattr(metal_timing, "stage_samples", lambda: [])
    monkeypatch.setattr(proto3, "BATCH", 2)
    monkeypatch.setattr(proto3, "NUM_HEADS", 8)
    monkeypatch.setattr(proto3, "QUICK", {"contexts": (40, 200), "head_dims": (64,), "groups": (4,),
                                          "partitions": (128,)})
    monkeypatch.setattr(proto3, "QUICK_ITERS", 3)
    monkeypatch.setattr(proto3, "WARMUP", 1)
    return fake


def _ctx(tmp_path, backend="metal"):
    return registry.ExperimentContext(
        experiment="proto3", backend=backend, device={"name": FakePagedMetal.info["name"]},
        device_name=FakePagedMetal.info["name"], driver="harness", commit="unknown", quick=True,
        progress=lambda iterable=None, total=None, desc="": iterable, out_dir=tmp_path, rng=np.random.default_rng(0))


def test_harness_proto3_metal_sweep(small_proto3, tmp_path):
    """HARNESS: gates, records, findings and summary of the Metal sweep, computed by numpy."""
    result = registry.run_experiment(registry.get("proto3"), _ctx(tmp_path))
    paged = [r for r in result.records if r["config"]["kernel"] == ps.PAGED_KERNEL]
    assert len(paged) == len(ps.BLOCK_SIZES) * 2 * 2  # block sizes x contexts x layouts (all legal at D=64)
    assert {r["config"]["layout"] for r in paged} == set(proto3.LAYOUTS)
    assert all(r["metrics"]["smem_bytes"] <= metal_specs.THREADGROUP_MEMORY_LIMIT for r in paged)
    assert all(r["metrics"]["vs_reference_max_abs_err"] < proto3.ATOL for r in paged)
    flash = [r for r in result.records if r["config"]["kernel"] == metal_specs.FLASH_KERNEL]
    assert len(flash) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timer"] == metal_timing.TIMER_COMMAND_BUFFER and not summary["rejected"]
    assert len(summary["budget_map"]) == len(ps.budget_map())
    slugs = {f.slug for f in result.findings}
    assert {"metal-paged-d64-g4-n40", "metal-paged-d64-g4-n200", "metal-paged-budget-d64"} <= slugs
    assert all(metal_timing.TIMER_COMMAND_BUFFER in f.claim for f in result.findings if f.slug.startswith("metal-paged-d"))
    row = summary["table"][0]
    assert row["scattered_over_contiguous_ratio"] > 0 and row["paged_over_flash_ratio"] > 0


def test_harness_stage_samples_are_used_when_present(small_proto3, tmp_path, monkeypatch):
    monkeypatch.setattr(metal_timing, "stage_samples", lambda: [0.5, 0.6, 0.7])
    registry.run_experiment(registry.get("proto3"), _ctx(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timer"] == metal_timing.TIMER_COUNTERS


def test_harness_a_wrong_kernel_is_gated_out(small_proto3, tmp_path, monkeypatch):
    real = small_proto3._paged

    def broken(p, c, grid, block, shared, bufs):
        real(p, c, grid, block, shared, bufs)
        if c["BLOCK_SIZE"] == 16:
            bufs[5].data[-64:] = 0  # corrupt the last sequence's O parts
    monkeypatch.setattr(small_proto3, "_paged", broken)
    result = registry.run_experiment(registry.get("proto3"), _ctx(tmp_path))
    assert 16 not in {r["config"].get("block_size") for r in result.records}
    rejected = json.loads((tmp_path / "summary.json").read_text())["rejected"]
    assert [r["block_size"] for r in rejected] == [16] and "FP64" in rejected[0]["why"]


def test_harness_table_dependent_result_fails_bit_exactness(small_proto3, tmp_path, monkeypatch):
    """AC-3.2: an output that depends on where blocks sit (not only on the tokens) is rejected."""
    real = small_proto3._paged

    def layout_dependent(p, c, grid, block, shared, bufs):
        real(p, c, grid, block, shared, bufs)
        table = bufs[3].data.view(np.int32)
        if c["BLOCK_SIZE"] == 8 and table[0] != 0:
            parts = bufs[5].data.view(np.float32)
            parts[:] = np.nextafter(parts, np.float32(np.inf))  # one ulp: within tolerance, not bit-exact
    monkeypatch.setattr(small_proto3, "_paged", layout_dependent)
    registry.run_experiment(registry.get("proto3"), _ctx(tmp_path))
    rejected = json.loads((tmp_path / "summary.json").read_text())["rejected"]
    assert [r["block_size"] for r in rejected] == [8] and "AC-3.2" in rejected[0]["why"]


def test_without_metal_the_experiment_says_so(tmp_path, monkeypatch):
    from attnproto import backend as backend_mod  # noqa: PLC0415

    def unavailable(name="auto"):
        raise backend_mod.BackendUnavailable("metal backend unavailable: not compiled into this build")
    monkeypatch.setattr(backend_mod, "get", unavailable)
    with pytest.raises(ExperimentError, match="needs an Apple GPU family 9 Metal device"):
        proto3.run_metal(_ctx(tmp_path))
    assert not list(tmp_path.iterdir())


def test_proto3_supports_metal():
    assert registry.get("proto3").supports("metal")


# ============================================================== planted bugs in the paged code
@pytest.fixture
def tree(tmp_path):
    """A copy of shaders/ and csrc/metal/ to plant bugs in."""
    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    shutil.copytree(REPO / "csrc" / "metal", tmp_path / "csrc" / "metal")
    return tmp_path


PAGED_SPEC = [ps.paged_spec(64, 16, 4)]
REDUCE_SPEC = [ps.reduce_spec(64)]
SHADER_BUGS = [
    ("device_as_threadgroup", "paged_reduce.metal", "m = threadgroup_combine(m, true, scratch, sg, lane);",
     "m = threadgroup_combine(m, true, lse_out, sg, lane);", REDUCE_SPEC, ("clang++",), "address space '3'"),
    ("half_tile_as_float", "paged_attention.metal", "threadgroup T* kv_tile = reinterpret_cast<threadgroup T*>(",
     "threadgroup float* kv_tile = reinterpret_cast<threadgroup T*>(", PAGED_SPEC, ("g++", "clang++"), "error"),
    ("simd_sum_on_bool", "paged_attention.metal", "const float s = simd_sum(partial);",
     "const float s = simd_sum(partial > 0.0f);", PAGED_SPEC, ("g++", "clang++"), "simd_sum"),
    ("missing_barrier_flags", "paged_reduce.metal", "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    float out",
     "    threadgroup_barrier();\n    float out", REDUCE_SPEC, ("g++", "clang++"), "threadgroup_barrier"),
    ("reduce_over_32kb", "metal_bindings.h", "#define ATTNPROTO_PAGED_MAX_PARTITIONS 2048",
     "#define ATTNPROTO_PAGED_MAX_PARTITIONS 16384", REDUCE_SPEC, ("g++", "clang++"), "32 KB"),
]


@needs_tools
@pytest.mark.parametrize("bug", SHADER_BUGS, ids=[b[0] for b in SHADER_BUGS])
def test_planted_paged_shader_bug_is_caught(tree, bug):
    _, name, old, new, specs, compilers, fragment = bug
    plant(tree / "shaders" / "metal" / name, old, new)
    path = tree / "shaders" / "metal" / (specs[0].name + ".metal")
    for compiler in compilers:
        problems = check.check_shader_file(path, specs, which=[compiler])
        assert any(fragment in p.message for p in problems), f"{compiler}: {problems}"


BINDING_BUGS = [
    ("table_index_clash", "shaders/metal/metal_bindings.h", "#define ATTNPROTO_BUF_PAGED_BLOCK_TABLE  4",
     "#define ATTNPROTO_BUF_PAGED_BLOCK_TABLE  5", "buffer index used twice"),
    ("host_slot_order", "csrc/metal/metal_backend.mm",
     '{"block_table", ATTNPROTO_BUF_PAGED_BLOCK_TABLE, ArgKind::Pointer},',
     '{"block_table", ATTNPROTO_BUF_PAGED_CONTEXT_LENS, ArgKind::Pointer},', "host binds 'block_table'"),
    ("host_missing_constant", "csrc/metal/metal_backend.mm",
     '    {"BLOCK_SIZE", ATTNPROTO_FC_BLOCK_SIZE, MTLDataTypeInt},\n', "", "host does not know function constant BLOCK_SIZE"),
    ("fc_index", "shaders/metal/paged_reduce.metal", "PARTITION_SIZE [[function_constant(ATTNPROTO_FC_PARTITION_SIZE)]]",
     "PARTITION_SIZE [[function_constant(ATTNPROTO_FC_BLOCK_SIZE)]]", "must use ATTNPROTO_FC_PARTITION_SIZE"),
    ("reduce_arg_count", "csrc/metal/metal_backend.mm", '        {"lse", ATTNPROTO_BUF_REDUCE_LSE, ArgKind::Pointer},\n',
     "", "host binds 5"),
]


@pytest.mark.parametrize("bug", BINDING_BUGS, ids=[b[0] for b in BINDING_BUGS])
def test_planted_paged_binding_bug_is_caught(tree, bug):
    _, rel, old, new, fragment = bug
    plant(tree / rel, old, new)
    problems = check.check_bindings(metal_dir=tree / "shaders" / "metal",
                                    host_source=tree / "csrc" / "metal" / "metal_backend.mm")
    assert any(fragment in p.message for p in problems), "\n".join(map(str, problems))


# ============================================================== Metal device (Apple GPU family 9)
@needs_metal
@pytest.mark.parametrize("part", ps.PARTITION_SIZES)
@pytest.mark.parametrize("d", ps.HEAD_DIMS)
def test_metal_paged_gates(d, part):
    from attnproto.backend import get  # noqa: PLC0415

    for bs in ps.BLOCK_SIZES:
        for g in ps.GQA_GROUPS:
            if ps.paged_illegal_reason(d, bs, g, "float16", part) is None:
                ok, err, why = proto3.gate(get("metal"), np.random.default_rng(bs), d, bs, g, part)
                assert ok, f"D={d} block {bs} group {g} partition {part}: {why} (max err {err})"


@needs_metal
def test_metal_proto3_quick_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, "-m", "attnproto", "run", "proto3", "--backend", "metal", "--quick",
                          "--no-kb", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(tmp_path.rglob("summary.json")), res.stdout
