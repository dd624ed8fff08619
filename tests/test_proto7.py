"""Prototype 7: the quick CPU run (records and findings that validate), AC-5.5 (illegal constant
sets fail NVRTC with their static_assert; front doors refuse naming the argument), the torch
anchors' math against FP64 (on the CPU), the Metal WINDOW / SOFTCAP constants (static checks,
planted bugs) and the Metal path through the numpy harness, and argument errors."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

from attnproto import metal_specs, ref
from attnproto.experiments import registry
from attnproto.experiments.proto7 import common as C
from attnproto.experiments.proto7 import validation
from attnproto.ops import metal_flash
from attnproto.records import validate_record

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ctx(tmp_path, backend="cpu", quick=True, name="cpu-test"):
    return registry.ExperimentContext(experiment="proto7", backend=backend, device={}, device_name=name, driver="test",
                                      commit="test", quick=quick, progress=lambda it=None, total=None, desc="": it,
                                      out_dir=tmp_path, rng=np.random.default_rng(7))


# ============================================================== the quick CPU run
def test_quick_cpu_run_produces_valid_records_and_findings(tmp_path, nvrtc):
    exp = registry.get("proto7")
    result = registry.run_experiment(exp, _ctx(tmp_path))
    assert result.records and result.findings
    for rec in result.records:
        validate_record(rec)
    cases = {r["config"]["case"] for r in result.records if r["config"].get("kernel") == C.OURS}
    assert {c.name for c in C.SINGLE_CASES} <= cases and "llama" in cases
    assert any(r["config"].get("kernel") == C.STANDALONE_ROPE for r in result.records)
    assert any(r["config"].get("kernel") == C.MATERIALISED_GQA for r in result.records)
    ac = [f for f in result.findings if f.slug == "ac55-illegal-combinations"]
    assert len(ac) == 1 and ac[0].answer["all_rejected"], ac[0].claim if ac else result.findings
    assert ac[0].evidence["static_assert_failures_count"] == len(validation.ILLEGAL_CONSTANTS)


def test_experiment_is_registered_for_every_backend():
    exp = registry.get("proto7")
    assert set(exp.backends) == {"cpu", "cuda", "metal"}
    assert "hypothesis" in exp.doc.lower() and "sweep" in exp.doc.lower()


# ============================================================== AC-5.5
@pytest.mark.parametrize("case, change, message", validation.ILLEGAL_CONSTANTS, ids=[c[0] for c in validation.ILLEGAL_CONSTANTS])
def test_illegal_constant_set_fails_with_its_static_assert(nvrtc, case, change, message):
    from attnproto.ops import flash_wgmma as fw

    with pytest.raises(Exception, match="static assertion failed") as info:
        nvrtc.cuda_compile(fw.KERNEL_NAME, {**validation._base_constants(), **change}, validation.ARCH)
    assert message in str(info.value)


def test_base_constants_compile(nvrtc):
    """The illegal sets differ from a legal one only in what they change."""
    from attnproto.ops import flash_wgmma as fw

    nvrtc.cuda_compile(fw.KERNEL_NAME, validation._base_constants(), validation.ARCH)


@pytest.mark.parametrize("case, arg, call", validation._refusals(), ids=[c[0] for c in validation._refusals()])
def test_front_door_refuses_naming_the_argument(case, arg, call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert validation._named(f"{type(info.value).__name__}: {info.value}", arg), str(info.value)


def test_named_checker_can_fail():
    assert not validation._named("ValueError: q: bad shape", "window")
    assert validation._named("ValueError: window: must be positive", "window")


# ============================================================== cases and the anchors' math
def test_case_arguments():
    n = 8192
    assert C.by_name("window-n8").kwargs(n) == {"window": 1024}
    assert C.by_name("gemma2").kwargs(n) == {"rope": "half", "window": 4096, "softcap": C.SOFTCAP}
    assert C.by_name("gemma2").kwargs(2048)["window"] == 1024
    assert C.by_name("rope-half-table").kwargs(n, table="T") == {"rope": "half", "rope_table": "T"}
    assert C.by_name("alibi-slopes").kwargs(n, slopes="S") == {"alibi": "S"}
    assert C.batch_of(2048) == 8 and C.batch_of(8192) == 2
    with pytest.raises(KeyError):
        C.by_name("no-such-case")


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_torch_rope_matches_fp64(style):
    torch = pytest.importorskip("torch")
    from attnproto.experiments.proto7 import anchors as A

    x = torch.randn(1, 2, 40, 16, dtype=torch.float32)
    cos, sin = A.rope_cos_sin(40, 16, device="cpu")
    got = A.torch_rope(x, cos, sin, style).double().numpy()
    np.testing.assert_allclose(got, ref.rope(x.numpy(), style=style), atol=1e-5)


@pytest.mark.parametrize("window, softcap", [(None, None), (9, None), (None, 3.0), (9, 3.0)])
def test_bias_mask_sdpa_and_eager_softcap_match_fp64(window, softcap):
    torch = pytest.importorskip("torch")
    from attnproto.experiments.proto7 import anchors as A

    q, k, v = (torch.randn(1, 3, 33, 16, dtype=torch.float32) for _ in range(3))
    rows = 11
    slopes = torch.tensor([0.5, 0.25, 0.125])
    bias = A.bias_mask(3, rows, 33, slopes=slopes, window=window, device="cpu")
    qs = q[:, :, -rows:]
    got = (A.eager_softcap(qs, k, v, softcap=softcap, bias=bias) if softcap
           else A.sdpa(qs, k, v, attn_mask=bias)())
    want = ref.attention(qs.numpy(), k.numpy(), v.numpy(), causal=True, alibi=True, alibi_slopes=slopes.numpy(),
                         window=window, softcap=softcap)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)


# ============================================================== Metal: constants and static checks
def _check_module():
    spec = importlib.util.spec_from_file_location("metal_check_p7", REPO / "tools" / "metal_check" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["metal_check_p7"] = module
    spec.loader.exec_module(module)
    return module


check = _check_module()
needs_tools = pytest.mark.skipif(bool(check.missing_tools()), reason=f"Metal static-check tools missing: "
                                                                        f"{check.missing_tools()}")
FLASH = check.METAL_DIR / "flash_attention.metal"


def test_window_and_softcap_are_function_constants_of_the_flash_kernel():
    fcs = {fc.name for fc in check.function_constants(FLASH.read_text())}
    assert {"WINDOW", "SOFTCAP"} <= fcs
    spec = metal_specs.flash_spec(128, 32, 64, window=True, softcap=True)
    assert spec.as_dict()["WINDOW"] == 1 and spec.as_dict()["SOFTCAP"] == 1
    assert spec.canonical() in {s.canonical() for s in metal_specs.specs_in_use()}
    assert not check.check_bindings()


@needs_tools
@pytest.mark.parametrize("compiler", ["g++", "clang++"])
def test_every_proto7_metal_spec_compiles(compiler):
    problems = check.check_shader_file(FLASH, metal_specs.proto7_specs(), which=[compiler])
    assert not problems, "\n".join(map(str, problems))


@needs_tools
@pytest.mark.parametrize("head_dim", [8, 72, 200])
def test_window_softcap_odd_head_dims_compile(head_dim):
    specs = [metal_specs.flash_spec(head_dim, 16, 64, causal=c, window=w, softcap=s, alibi=True, gqa_group=2)
             for c, w, s in ((True, True, False), (False, True, True), (True, False, True))]
    problems = check.check_shader_file(FLASH, specs, which=["g++"])
    assert not problems, "\n".join(map(str, problems))


@pytest.fixture
def tree(tmp_path):
    import shutil

    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    shutil.copytree(REPO / "csrc" / "metal", tmp_path / "csrc" / "metal")
    return tmp_path


def _plant(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("rel, old, new, fragment", [
    ("csrc/metal/metal_backend.mm", '{"SOFTCAP", ATTNPROTO_FC_SOFTCAP, MTLDataTypeBool}',
     '{"SOFTCAP", ATTNPROTO_FC_SOFTCAP, MTLDataTypeInt}', "SOFTCAP is 'bool'"),
    ("shaders/metal/flash_attention.metal", "WINDOW    [[function_constant(ATTNPROTO_FC_WINDOW)]]",
     "WINDOW    [[function_constant(ATTNPROTO_FC_SOFTCAP)]]", "must use ATTNPROTO_FC_WINDOW"),
], ids=["softcap_host_type", "window_index"])
def test_planted_binding_bug_in_new_constants_is_caught(tree, rel, old, new, fragment):
    _plant(tree / rel, old, new)
    problems = check.check_bindings(metal_dir=tree / "shaders" / "metal",
                                    host_source=tree / "csrc" / "metal" / "metal_backend.mm")
    assert any(fragment in p.message for p in problems), "\n".join(map(str, problems))


@needs_tools
def test_planted_window_bug_is_caught(tree):
    path = tree / "shaders" / "metal" / "flash_attention.metal"
    _plant(path, "int(p.window)", "int(p.windw)")
    problems = check.check_shader_file(path, [metal_specs.flash_spec(128, 32, 64, window=True)], which=["g++"])
    assert any("windw" in p.message for p in problems), problems


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(window=0), ValueError, "window"),
    (dict(window=2.5), TypeError, "window"),
    (dict(window=2**31), ValueError, "window"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=math.inf), ValueError, "softcap"),
    (dict(softcap="50"), TypeError, "softcap"),
])
def test_metal_flash_rejects_bad_window_and_softcap(kwargs, exc, word):
    q = np.zeros((1, 2, 8, 64), np.float16)
    with pytest.raises(exc, match=word):
        metal_flash.check_metal_flash_inputs(q, q, q, **kwargs)


def test_metal_params_carry_window_and_softcap():
    q = np.zeros((1, 2, 8, 64), np.float16)
    prob = metal_flash.check_metal_flash_inputs(q, q, q, causal=True, window=5, softcap=30.0)
    p = metal_flash.metal_flash_params(prob)
    assert int(p["window"]) == 5 and float(p["softcap"]) == 30.0
    consts = metal_flash.flash_launch_spec(prob).as_dict()
    assert consts["WINDOW"] == 1 and consts["SOFTCAP"] == 1
    plain = metal_flash.flash_launch_spec(metal_flash.check_metal_flash_inputs(q, q, q)).as_dict()
    assert plain["WINDOW"] == 0 and plain["SOFTCAP"] == 0


# ============================================================== Metal path (HARNESS, not Metal)
def test_metal_run_refused_without_a_metal_device(tmp_path):
    from attnproto.experiments.proto7 import metal as m7

    try:
        m7._metal_backend()
    except registry.ExperimentError as exc:
        assert "statically checked on Linux" in str(exc)
    else:
        pytest.skip("a Metal device is present")


def test_metal_path_through_the_numpy_harness(tmp_path, monkeypatch):
    from test_metal_ops import FakeMetalBackend

    from attnproto import metal_timing
    from attnproto.experiments.proto7 import metal as m7

    fake = FakeMetalBackend()
    monkeypatch.setattr(m7, "_metal_backend", lambda: fake)
    monkeypatch.setattr(metal_timing, "stage_samples", lambda: [])
    monkeypatch.setattr(m7, "QUICK", {"seq_len": 64, "heads": 4, "groups": (2,)})
    monkeypatch.setattr(m7, "GATE_SEQ", 37)
    result = m7.run_metal(_ctx(tmp_path, backend="metal", name="fake metal"))
    cases = {r["config"]["case"] for r in result.records}
    assert {"base", "rope", "alibi", "window-n8", "window-n4", "softcap", "gemma2"} <= cases
    used = {(name, tuple(sorted(c.items()))) for name, c, *_ in fake.launches if name == metal_specs.FLASH_KERNEL}
    in_use = {(s.name, s.constants) for s in metal_specs.specs_in_use()}
    assert used <= in_use, used - in_use
    assert len(result.findings) == 1
