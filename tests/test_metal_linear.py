"""Prototype 6 on Metal: the chunked linear-attention kernels (linear_chunk_h.metal,
linear_chunk_o.metal), their budgets, the op attnproto.ops.metal_linear and
`attnproto run proto6 --backend metal`.

* pure Python / static (run everywhere; compiles need .ci/metal_deps.sh): budgets against the
  header's own macros compiled by g++, illegal constants failing the kernels' static_asserts, specs,
  geometry, argument errors raised before any dispatch, planted bugs;
* HARNESS tests (run everywhere): the op and the proto6 Metal sweep through ``FakeLinearMetal``
  (tests/metal_linear_fake.py), which computes with numpy: a check of the Python plumbing, NOT of
  the Metal kernels;
* Metal tests (``needs_metal``): the real kernels, skipped with the reason without an Apple GPU.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from metal_linear_fake import FakeLinearMetal
from test_metal_ops import needs_metal
from test_metal_static import REPO, check, needs_tools, plant

from attnproto import metal_linear_specs as ls
from attnproto import metal_specs, metal_timing, ref
from attnproto.experiments import registry
from attnproto.experiments.proto6 import metal as proto6
from attnproto.experiments.registry import ExperimentError
from attnproto.metal_specs import MetalSpec
from attnproto.ops import metal_linear

CHUNK_O = check.METAL_DIR / "linear_chunk_o.metal"


# ============================================================== budgets and specs
@needs_tools
def test_budgets_are_the_headers_macros(tmp_path):
    dims = (32, 64, 96, 128)
    lines = [f'std::printf("%d %d %d\\n", int(ATTNPROTO_LINEAR_H_TG_BYTES({d}, 2)), '
             f'int(ATTNPROTO_LINEAR_O_TG_BYTES({d}, 2)), int(ATTNPROTO_LINEAR_H_THREADS({d})));' for d in dims]
    lines.append('std::printf("%d\\n", int(ATTNPROTO_LINEAR_O_THREADS));')
    src = tmp_path / "budget.cpp"
    src.write_text('#include <cstdio>\n#include "metal_bindings.h"\nint main() {\n' + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "budget"
    subprocess.run(["g++", "-std=c++17", f"-I{check.METAL_DIR}", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [[int(x) for x in line.split()] for line in out[:-1]] == [
        [ls.chunk_h_threadgroup_bytes(d), ls.chunk_o_threadgroup_bytes(d), ls.chunk_h_threads(d)] for d in dims]
    assert int(out[-1]) == ls.chunk_o_threads()


def test_header_geometry_matches_python():
    defs = check.bindings()
    assert (defs["ATTNPROTO_LINEAR_SUB"], defs["ATTNPROTO_LINEAR_H_COLS"], defs["ATTNPROTO_LINEAR_O_ROWS"],
            defs["ATTNPROTO_LINEAR_MAX_HEAD_DIM"], defs["ATTNPROTO_LINEAR_MAX_CHUNK"]) == (
        ls.SUB, ls.H_COLS, ls.O_ROWS, ls.MAX_HEAD_DIM, ls.MAX_CHUNK)


def test_every_seed_chunk_fits_and_is_statically_checked():
    assert all(row["legal"] for row in ls.budget_map())
    in_use = {s.canonical() for s in metal_specs.specs_in_use()}
    specs = ls.proto6_specs()
    assert len(specs) == 2 * len(ls.HEAD_DIMS) * len(ls.CHUNKS) * len(metal_specs.DTYPE_CODES)
    assert {s.canonical() for s in specs} <= in_use


@needs_tools
@pytest.mark.parametrize("kernel", [ls.CHUNK_H_KERNEL, ls.CHUNK_O_KERNEL])
@pytest.mark.parametrize("constants, fragment", [
    (dict(HEAD_DIM=64, CHUNK_SIZE=48), "CHUNK_SIZE"),
    (dict(HEAD_DIM=64, CHUNK_SIZE=512), "CHUNK_SIZE"),
    (dict(HEAD_DIM=256, CHUNK_SIZE=64), "HEAD_DIM"),
    (dict(HEAD_DIM=48, CHUNK_SIZE=64), "HEAD_DIM"),
], ids=["chunk48", "chunk512", "d256", "d48"])
def test_illegal_constants_fail_statically(kernel, constants, fragment):
    spec = MetalSpec.make(kernel, DTYPE=0, **constants)
    problems = check.check_shader_file(check.METAL_DIR / f"{kernel}.metal", [spec], which=["clang++"])
    assert any(fragment in p.message for p in problems), problems


@pytest.mark.parametrize("args, exc, word", [
    ((64, 48), ValueError, "chunk_size"), ((256, 64), ValueError, "head_dim"),
    ((64, 64, "float32"), ValueError, "dtype"), ((64.0, 64), TypeError, "head_dim"),
])
def test_linear_specs_reject_with_the_reason(args, exc, word):
    with pytest.raises(exc, match=word):
        ls.linear_specs(*args)


def test_dispatch_geometry():
    (gh, bh, sh), (go, bo, so) = ls.dispatch(2, 3, 100, 128)
    assert gh == (128 // ls.H_COLS, 6, 1) and bh == (ls.chunk_h_threads(128), 1, 1)
    assert go == (4, 6, 1) and bo == (ls.chunk_o_threads(), 1, 1)
    assert sh == ls.chunk_h_threadgroup_bytes(128) and so == ls.chunk_o_threadgroup_bytes(128)
    with pytest.raises(ValueError, match="seq_len"):
        ls.dispatch(1, 1, 0, 64)


# ============================================================== the op: argument checks
def _qkv(b=1, h=2, n=200, d=64, seed=0):
    return proto6._inputs(np.random.default_rng(seed), b, h, n, d)


class _NoDispatch:
    name = "metal"

    def __getattr__(self, attr):
        raise AssertionError(f"backend.{attr} used before the arguments were checked")


def _bad_cases():
    q, k, v = _qkv()
    return [
        ("q", (q.astype(np.float32), k, v), {}, TypeError),
        ("q", (q[0], k, v), {}, ValueError),
        ("k", (q, k[:, :, :100], v), {}, ValueError),
        ("v", (q, k, v.astype(np.float32)), {}, TypeError),
        ("q", (q[..., :48], k[..., :48], v[..., :48]), {}, ValueError),
        ("chunk_size", (q, k, v), {"chunk_size": 48}, ValueError),
        ("chunk_size", (q, k, v), {"chunk_size": 64.0}, TypeError),
        ("scale", (q, k, v), {"scale": float("inf")}, ValueError),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_naming_the_argument_before_dispatch(case):
    name, args, kwargs, exc = case
    kwargs = {"chunk_size": 64, **kwargs}
    with pytest.raises(exc, match=name):
        metal_linear.prepare_linear_attention(*args, backend=_NoDispatch(), **kwargs)


# ============================================================== HARNESS: numpy stand-in backend
@pytest.mark.parametrize("chunk", ls.CHUNKS)
@pytest.mark.parametrize("d", ls.HEAD_DIMS)
def test_harness_op_against_fp64(d, chunk):
    """HARNESS: params, buffers, the states layout and both passes through the op."""
    be = FakeLinearMetal()
    q, k, v = _qkv(n=300, d=d, seed=d + chunk)
    launch = metal_linear.prepare_linear_attention(q, k, v, chunk_size=chunk, scale=0.5, backend=be)
    o, states = launch.launch().result()
    atol, rtol = proto6.TOLERANCES[proto6.METAL_DTYPE]
    np.testing.assert_allclose(np.asarray(o, np.float64), ref.linear_attention_recurrent(q, k, v, scale=0.5),
                               atol=atol, rtol=rtol)
    np.testing.assert_allclose(states, ref.linear_chunk_h(k, v, min(chunk, 300)), atol=1e-3, rtol=1e-3)
    assert [x[0] for x in be.launches] == [ls.CHUNK_H_KERNEL, ls.CHUNK_O_KERNEL]


def test_harness_outputs_are_poisoned_until_written(monkeypatch):
    be = FakeLinearMetal()
    launch = metal_linear.prepare_linear_attention(*_qkv(), chunk_size=64, backend=be)
    o, states = launch.result()
    assert np.isnan(np.asarray(o, np.float64)).all() and np.isnan(states).all()


@pytest.fixture
def small_proto6(monkeypatch):
    fake = FakeLinearMetal()
    monkeypatch.setattr(proto6, "_metal_backend", lambda: fake)
    monkeypatch.setattr(metal_timing, "stage_samples", lambda: [])
    monkeypatch.setattr(proto6, "METAL_HEADS", 2)
    monkeypatch.setattr(proto6, "QUICK", {"seq_lens": (64, 128), "head_dims": (64,), "chunks": (32, 64)})
    monkeypatch.setattr(proto6, "SOFTMAX_MAX_N", 64)
    monkeypatch.setattr(proto6, "QUICK_ITERS", 3)
    monkeypatch.setattr(proto6, "WARMUP", 1)
    return fake


def _ctx(tmp_path):
    return registry.ExperimentContext(
        experiment="proto6", backend="metal", device={"name": FakeLinearMetal.info["name"]},
        device_name=FakeLinearMetal.info["name"], driver="harness", commit="unknown", quick=True,
        progress=lambda iterable=None, total=None, desc="": iterable, out_dir=tmp_path, rng=np.random.default_rng(0))


def test_harness_proto6_metal_sweep(small_proto6, tmp_path):
    """HARNESS: gates, records, findings and summary of the Metal sweep, computed by numpy."""
    result = registry.run_experiment(registry.get("proto6"), _ctx(tmp_path))
    linear = [r for r in result.records if r["config"]["kernel"] == "linear_chunked"]
    assert len(linear) == 2 * 2 and {r["config"]["chunk"] for r in linear} == {32, 64}
    flash = [r for r in result.records if r["config"]["kernel"] == metal_specs.FLASH_KERNEL]
    assert [r["config"]["seq_len"] for r in flash] == [64]  # only up to SOFTMAX_MAX_N
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["rejected"] and summary["timer"] == metal_timing.TIMER_COMMAND_BUFFER
    assert {"metal-linear-d64-n64", "metal-linear-d64-n128"} <= {f.slug for f in result.findings}
    assert all(metal_timing.TIMER_COMMAND_BUFFER in f.claim for f in result.findings if f.slug.startswith("metal-linear-d"))


def test_harness_a_wrong_kernel_is_gated_out(small_proto6, tmp_path, monkeypatch):
    real = small_proto6.launch

    def broken(kernel, grid, block, args, shared_bytes=0):
        real(kernel, grid, block, args, shared_bytes)
        if kernel.name == ls.CHUNK_O_KERNEL and kernel.constants["CHUNK_SIZE"] == 32:
            args[5].data[-64:] = 0
    monkeypatch.setattr(small_proto6, "launch", broken)
    result = registry.run_experiment(registry.get("proto6"), _ctx(tmp_path))
    assert {r["config"].get("chunk") for r in result.records if r["config"]["kernel"] == "linear_chunked"} == {64}
    assert [r["chunk"] for r in json.loads((tmp_path / "summary.json").read_text())["rejected"]] == [32]


def test_without_metal_the_experiment_says_so(tmp_path, monkeypatch):
    from attnproto import backend as backend_mod  # noqa: PLC0415

    def unavailable(name="auto"):
        raise backend_mod.BackendUnavailable("metal backend unavailable: not compiled into this build")
    monkeypatch.setattr(backend_mod, "get", unavailable)
    with pytest.raises(ExperimentError, match="needs an Apple GPU family 9 Metal device"):
        proto6.run_metal(_ctx(tmp_path))
    assert not list(tmp_path.iterdir())


def test_proto6_supports_metal_and_keeps_cpu_cuda():
    assert set(registry.get("proto6").backends) == {"cpu", "cuda", "metal"}


# ============================================================== planted bugs
@pytest.fixture
def tree(tmp_path):
    """A copy of shaders/ and csrc/metal/ to plant bugs in."""
    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    shutil.copytree(REPO / "csrc" / "metal", tmp_path / "csrc" / "metal")
    return tmp_path


SPECS = dict(zip((ls.CHUNK_H_KERNEL, ls.CHUNK_O_KERNEL), ls.linear_specs(128, 64)))
SHADER_BUGS = [
    ("float_times_half", ls.CHUNK_O_KERNEL, "linear_chunk_o.metal", "simdgroup_matrix<T, 8, 8> hf;",
     "simdgroup_float8x8 hf;", "simdgroup_multiply_accumulate"),
    ("store_float_into_half_tile", ls.CHUNK_O_KERNEL, "linear_chunk_o.metal",
     "simdgroup_store(s_acc[jj], s_tile + sg", "simdgroup_store(s_acc[jj], p_tile + sg", "simdgroup_store"),
    ("h_stage_over_32kb", ls.CHUNK_O_KERNEL, "metal_bindings.h", "((D) <= 64 ? (D) : 64)", "(D)", "32 KB"),
    ("state_in_threadgroup", ls.CHUNK_H_KERNEL, "linear_chunk_h.metal",
     "simdgroup_store(acc[f], s_chunk + f * kFrag, HEAD_DIM);", "simdgroup_store(acc[f], k_tile + f * kFrag, HEAD_DIM);",
     "simdgroup_store"),
]


@needs_tools
@pytest.mark.parametrize("bug", SHADER_BUGS, ids=[b[0] for b in SHADER_BUGS])
def test_planted_linear_shader_bug_is_caught(tree, bug):
    _, kernel, name, old, new, fragment = bug
    plant(tree / "shaders" / "metal" / name, old, new)
    for compiler in ("g++", "clang++"):
        problems = check.check_shader_file(tree / "shaders" / "metal" / f"{kernel}.metal", [SPECS[kernel]],
                                           which=[compiler])
        assert any(fragment in p.message for p in problems), f"{compiler}: {problems}"


BINDING_BUGS = [
    ("states_index_clash", "shaders/metal/metal_bindings.h", "#define ATTNPROTO_BUF_LINEAR_O_STATES 4",
     "#define ATTNPROTO_BUF_LINEAR_O_STATES 5", "buffer index used twice"),
    ("host_missing_constant", "csrc/metal/metal_backend.mm",
     '    {"CHUNK_SIZE", ATTNPROTO_FC_CHUNK_SIZE, MTLDataTypeInt},\n', "",
     "host does not know function constant CHUNK_SIZE"),
    ("host_states_kind", "csrc/metal/metal_backend.mm", '{"states", ATTNPROTO_BUF_LINEAR_H_STATES, ArgKind::Pointer}',
     '{"states", ATTNPROTO_BUF_LINEAR_H_STATES, ArgKind::Bytes}', "(Bytes)"),
]


@pytest.mark.parametrize("bug", BINDING_BUGS, ids=[b[0] for b in BINDING_BUGS])
def test_planted_linear_binding_bug_is_caught(tree, bug):
    _, rel, old, new, fragment = bug
    plant(tree / rel, old, new)
    problems = check.check_bindings(metal_dir=tree / "shaders" / "metal",
                                    host_source=tree / "csrc" / "metal" / "metal_backend.mm")
    assert any(fragment in p.message for p in problems), "\n".join(map(str, problems))


# ============================================================== Metal device (Apple GPU family 9)
@needs_metal
@pytest.mark.parametrize("chunk", ls.CHUNKS)
@pytest.mark.parametrize("d", ls.HEAD_DIMS)
def test_metal_linear_gate(d, chunk):
    from attnproto.backend import get  # noqa: PLC0415

    ok, err, why = proto6.gate(get("metal"), np.random.default_rng(chunk), d, chunk)
    assert ok, f"D={d} chunk {chunk}: {why} (max err {err})"


@needs_metal
def test_metal_proto6_quick_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, "-m", "attnproto", "run", "proto6", "--backend", "metal", "--quick",
                          "--no-kb", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(tmp_path.rglob("summary.json")), res.stdout
