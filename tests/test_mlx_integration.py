"""attnproto.integrations.mlx: our Metal flash kernel through MLX's mx.fast.metal_kernel.

* static (Linux, no MLX): the header + body the module hands to MLX compile as the program MLX
  would assemble (tools/metal_check/mlx_check.py, through the stand-in <metal_stdlib>), their
  buffers match the native entry's bindings, every function constant is fixed; each check is
  shown to fail on a planted error;
* the Python glue against a recording stand-in for ``mlx.core`` (what is passed to MLX, not
  what MLX does with it), and its argument checks;
* ``mlx`` installed without Metal (its Linux wheels): the real binding accepts every argument
  and stops at its missing Metal back-end;
* a Mac with MLX: the kernel against the FP64 reference. Skips everywhere else: this path has
  never run on a Mac.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from attnproto import metal_specs, ref  # noqa: E402
from attnproto.integrations import mlx as mlx_glue  # noqa: E402
from attnproto.metal_specs import MetalSpec  # noqa: E402
from attnproto.ops import metal_flash  # noqa: E402


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mc = _load("mlx_check", REPO / "tools" / "metal_check" / "mlx_check.py")
check = mc.check
MISSING = check.missing_tools()
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"Metal static-check tools missing: {MISSING}; "
                                                         "run .ci/metal_deps.sh")
SPECS = {("fp16-plain", "bf16-all-variants")[i]: s for i, s in enumerate(mc.MLX_CHECK_SPECS)}
FP16, BF16 = mc.MLX_CHECK_SPECS


def _real_mlx():
    try:
        import mlx.core as mx  # noqa: PLC0415
    except ImportError:
        return None
    return mx


MX = _real_mlx()
ON_MAC = MX is not None and bool(MX.metal.is_available())


def _problems(problems) -> str:
    return "\n".join(map(str, problems))


# ---------------------------------------------------------------------------- import guard

def test_import_needs_no_mlx_and_the_call_names_the_requirement():
    code = ("import sys; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
            "import attnproto.integrations.mlx as m\n"
            "try:\n    m.flash_attention(None, None, None)\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "ImportError: attnproto.integrations.mlx.flash_attention needs mlx (macOS with Apple silicon)" in res.stdout


# ---------------------------------------------------------------------------- static: real code passes

@needs_tools
@pytest.mark.parametrize("compiler", ("g++", "clang++"))
@pytest.mark.parametrize("case", sorted(SPECS))
def test_mlx_program_compiles(case, compiler):
    ks = mlx_glue.build_kernel_source(SPECS[case])
    assert not (problems := mc.check_mlx_compile(ks, which=[compiler])), _problems(problems)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_mlx_buffers_and_constants_match_the_native_kernel(case):
    ks = mlx_glue.build_kernel_source(SPECS[case])
    assert not (problems := mc.check_mlx_bindings(ks) + mc.check_mlx_constants(ks)), _problems(problems)


def test_mlx_signature_model_binds_inputs_then_outputs():
    program = mc.mlx_program(mlx_glue.build_kernel_source(FP16))
    for index, name in enumerate(mlx_glue.INPUT_NAMES + mlx_glue.OUTPUT_NAMES):
        assert re.search(rf"\b{name} \[\[buffer\({index}\)\]\]", program), name
    assert "const device uint8_t* params" in program and "device float* lse" in program


def test_header_is_self_contained_and_fixes_every_constant():
    ks = mlx_glue.build_kernel_source(BF16)
    declared = [fc.name for fc in check.function_constants((check.METAL_DIR / "flash_attention.metal").read_text())]
    assert sorted(dict(ks.constants)) == sorted(declared) == sorted(BF16.as_dict())
    code = check.strip_comments(ks.header)
    assert '#include "' not in code and code.count("#include <metal_stdlib>") == 1
    assert "[[" not in code, "the native entry point (and its attributes) must be gone"
    assert "typedef bfloat mlx_elem_t;" in code and "constexpr constant int GQA_GROUP = 4;" in code


def test_glue_report_counts_match_the_kernel_file():
    text = (check.METAL_DIR / "flash_attention.metal").read_text()
    code = check.strip_comments(text)
    entry = next(k for k in check.kernels(text) if k.name == metal_specs.FLASH_KERNEL)
    assert text.rstrip().endswith("}"), "the entry point is the file's last definition"
    entry_lines = len(text.rstrip().splitlines()) - entry.line + 1
    params_lines = len(re.findall(r"\bconstant\s+AttentionParams\s*&", code)) - 1  # the entry's goes with it
    fc_lines = {i for i, ln in enumerate(code.splitlines()) if "function_constant" in ln}
    report = mlx_glue.glue_report(FP16)
    assert report["header_dropped_lines"] == entry_lines
    assert report["header_rewritten_lines"] == len(fc_lines) + params_lines
    assert report["function_constants_fixed"] == len(FP16.as_dict())
    assert report["template_arguments"] == 0 and report["mlx_run_on_a_mac"] is False
    assert report["python_code_lines"] > 0 and report["source_lines"] == len(
        [ln for ln in mlx_glue.build_kernel_source(FP16).source.splitlines() if ln.strip()])


# ---------------------------------------------------------------------------- static: planted errors

@needs_tools
def test_planted_body_error_is_caught_by_both_compilers():
    ks = mlx_glue.build_kernel_source(FP16)
    bad = dataclasses.replace(ks, source=ks.source.replace("lse,", "lse + 1.0f,"))
    problems = mc.check_mlx_compile(bad)
    assert {p.where.rsplit("[", 1)[1] for p in problems} == {"g++]", "clang++]"}, _problems(problems)


@needs_tools
def test_planted_address_space_error_is_caught_by_clang():
    ks = mlx_glue.build_kernel_source(FP16)
    bad = dataclasses.replace(ks, source=ks.source.replace("reinterpret_cast<threadgroup uchar*>",
                                                           "reinterpret_cast<device uchar*>"))
    assert mc.check_mlx_compile(bad, which=["clang++"]), "a device pointer passed as threadgroup memory"


@needs_tools
def test_illegal_tile_fails_the_kernels_static_asserts():
    illegal = MetalSpec.make(metal_specs.FLASH_KERNEL, **{**FP16.as_dict(), "BLOCK_C": 2 * metal_specs.MAX_BLOCK_C})
    problems = mc.check_mlx_compile(mlx_glue.build_kernel_source(illegal), which=["clang++"])
    assert problems and "BLOCK_C must be a multiple of 8" in _problems(problems)


@needs_tools
def test_planted_kernel_signature_change_breaks_the_mlx_body(tmp_path):
    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    kernel = tmp_path / "shaders" / "metal" / "flash_attention.metal"
    kernel.write_text(kernel.read_text().replace("device T* o, device float* lse, threadgroup uchar* smem",
                                                 "device T* o, device half* lse, threadgroup uchar* smem"))
    ks = mlx_glue.build_kernel_source(FP16, tmp_path / "shaders")
    assert mc.check_mlx_compile(ks, which=["clang++"])


@pytest.mark.parametrize("names, word", [
    (dict(input_names=("params", "k", "q", "v")), "'q' is MLX buffer 2"),
    (dict(output_names=("out", "lse")), "native argument 'o'"),
    (dict(input_names=("params", "q", "k", "v", "o"), output_names=("lse",)), "'o' is an input to MLX but written"),
])
def test_planted_name_errors_are_caught(names, word):
    bad = dataclasses.replace(mlx_glue.build_kernel_source(FP16), **names)
    assert word in _problems(mc.check_mlx_bindings(bad))


def test_body_word_that_makes_mlx_add_a_buffer_is_caught():
    ks = mlx_glue.build_kernel_source(FP16)
    bad = dataclasses.replace(ks, source="// q_shape\n" + ks.source)
    text = _problems(mc.check_mlx_bindings(bad))
    assert "'q_shape' has no native counterpart" in text and "'k' is MLX buffer 3" in text


def test_body_without_a_thread_attribute_is_caught():
    ks = mlx_glue.build_kernel_source(FP16)
    bad = dataclasses.replace(ks, source=ks.source.replace("ushort(thread_index_in_simdgroup)", "ushort(0)"))
    assert "thread attributes" in _problems(mc.check_mlx_bindings(bad))


def test_planted_constant_errors_are_caught():
    ks = mlx_glue.build_kernel_source(FP16)
    wrong_value = dataclasses.replace(ks, header=ks.header.replace("HEAD_DIM = 128;", "HEAD_DIM = 64;"))
    assert "does not define HEAD_DIM = 128" in _problems(mc.check_mlx_constants(wrong_value))
    leftover = dataclasses.replace(ks, header=ks.header.replace(
        "constexpr constant bool ROPE = false;", "constant bool ROPE [[function_constant(5)]];"))
    assert "still uses function_constant" in _problems(mc.check_mlx_constants(leftover))


def test_spec_must_set_exactly_the_kernels_constants():
    partial = MetalSpec.make(metal_specs.FLASH_KERNEL, **{k: v for k, v in FP16.as_dict().items() if k != "WINDOW"})
    with pytest.raises(ValueError, match="WINDOW"):
        mlx_glue.build_kernel_source(partial)
    assert "header not built" in _problems(mc.check_mlx([partial]))
    with pytest.raises(ValueError, match="spec: expected a flash_attention"):
        mlx_glue.build_kernel_source(metal_specs.rope_spec(64, "float16"))


def test_new_function_constant_in_the_kernel_is_caught(tmp_path):
    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    kernel = tmp_path / "shaders" / "metal" / "flash_attention.metal"
    kernel.write_text(kernel.read_text().replace(
        "constant bool SOFTCAP   [[function_constant(ATTNPROTO_FC_SOFTCAP)]];",
        "constant bool SOFTCAP   [[function_constant(ATTNPROTO_FC_SOFTCAP)]];\n"
        "constant bool EXTRA [[function_constant(13)]];"))
    with pytest.raises(ValueError, match="EXTRA"):
        mlx_glue.build_kernel_source(FP16, tmp_path / "shaders")


def test_changed_params_parameter_is_caught(tmp_path):
    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    kernel = tmp_path / "shaders" / "metal" / "flash_attention.metal"
    kernel.write_text(kernel.read_text().replace("flash_attention_impl(constant AttentionParams& p,",
                                                 "flash_attention_impl(constant AttentionParams* p,"))
    with pytest.raises(ValueError, match="one 'constant AttentionParams&'"):
        mlx_glue.build_kernel_source(FP16, tmp_path / "shaders")


# ---------------------------------------------------------------------------- Python glue (recording stand-in)

class _Dtype:
    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return f"mlx.core.{self.name}"


class _Array:
    def __init__(self, data, dtype=None):
        self.data = np.asarray(data)
        self.shape = tuple(self.data.shape)
        self.dtype = dtype or _Dtype(self.data.dtype.name)


@pytest.fixture
def fake_mx(monkeypatch):
    """A recording stand-in for mlx.core: what the glue hands MLX, nothing MLX does."""
    calls = {}

    def metal_kernel(**kwargs):
        calls["make"] = kwargs

        def launch(**call):
            calls["call"] = call
            return [_Array(np.zeros(s), d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]
        return launch

    core = types.ModuleType("mlx.core")
    core.array = _Array
    for name in ("float16", "bfloat16", "float32", "uint8"):
        setattr(core, name, _Dtype(name))
    core.fast = types.SimpleNamespace(metal_kernel=metal_kernel)
    package = types.ModuleType("mlx")
    package.core = core
    monkeypatch.setitem(sys.modules, "mlx", package)
    monkeypatch.setitem(sys.modules, "mlx.core", core)
    mlx_glue._kernel.cache_clear()
    yield core, calls
    mlx_glue._kernel.cache_clear()


def _fake_qkv(core, b=2, hq=4, hkv=2, nq=40, nkv=72, d=64, dtype="float16"):
    return tuple(_Array(np.zeros((b, h, n, d), np.float32), getattr(core, dtype))
                 for h, n in ((hq, nq), (hkv, nkv), (hkv, nkv)))


def test_glue_hands_mlx_our_strings_and_the_native_launch_geometry(fake_mx):
    core, calls = fake_mx
    q, k, v = _fake_qkv(core, dtype="bfloat16")
    o, lse = mlx_glue.flash_attention(q, k, v, causal=True, window=16, fixed_gqa_group=True, return_lse=True)
    problem = metal_flash.check_metal_flash_inputs(q, k, v, causal=True, window=16, fixed_gqa_group=True,
                                                   input_devices=("mlx",))
    ks = mlx_glue.build_kernel_source(metal_flash.flash_launch_spec(problem))
    assert calls["make"] == dict(name=ks.name, input_names=list(ks.input_names), output_names=list(ks.output_names),
                                 source=ks.source, header=ks.header, ensure_row_contiguous=True)
    call = calls["call"]
    assert call["inputs"][1:] == [q, k, v] and call["inputs"][0].data.dtype == np.uint8
    assert call["inputs"][0].data.tobytes() == metal_flash.metal_flash_params(problem).tobytes()
    groups, threads, _ = metal_specs.flash_dispatch(2, 4, 40, problem.block_r, 64, problem.block_c, "bfloat16")
    assert call["grid"] == (groups[0] * threads[0], 4, 2) and call["threadgroup"] == threads
    assert call["output_shapes"] == [(2, 4, 40, 64), (2, 4, 40)]
    assert [str(d) for d in call["output_dtypes"]] == ["mlx.core.bfloat16", "mlx.core.float32"]
    assert math.isnan(call["init_value"]) and "template" not in call
    assert o.shape == (2, 4, 40, 64) and lse.shape == (2, 4, 40)
    assert "GQA_GROUP2" in ks.name and "WINDOW1" in ks.name


def test_glue_builds_each_specialisation_once(fake_mx):
    core, calls = fake_mx
    q, k, v = _fake_qkv(core)
    mlx_glue.flash_attention(q, k, v)
    first = calls.pop("make")
    mlx_glue.flash_attention(q, k, v)
    assert "make" not in calls and first["name"].startswith(mlx_glue.KERNEL_NAME_PREFIX)


@pytest.mark.parametrize("change, exc, word", [
    (dict(dtype="float32"), TypeError, "q: dtype float32"),
    (dict(d=12), ValueError, "head_dim 12"),
    (dict(hkv=3), ValueError, "GQA"),
])
def test_glue_rejects_bad_arrays_naming_them(fake_mx, change, exc, word):
    core, _ = fake_mx
    with pytest.raises(exc, match=word):
        mlx_glue.flash_attention(*_fake_qkv(core, **change))


def test_glue_rejects_non_mlx_arrays_and_bad_flags(fake_mx):
    core, _ = fake_mx
    q, k, v = _fake_qkv(core)
    with pytest.raises(ValueError, match="q: on device 'cpu'; this Metal path takes arrays on mlx"):
        mlx_glue.flash_attention(*(np.zeros(x.shape, np.float16) for x in (q, k, v)))
    with pytest.raises(ValueError, match="k: on device 'mlx' but q is on 'cpu'"):
        mlx_glue.flash_attention(np.zeros(q.shape, np.float16), k, v)
    with pytest.raises(TypeError, match="return_lse"):
        mlx_glue.flash_attention(q, k, v, return_lse="yes")
    with pytest.raises(ValueError, match="block_c"):
        mlx_glue.flash_attention(q, k, v, block_r=16)


# ---------------------------------------------------------------------------- real MLX

@pytest.mark.skipif(MX is None or ON_MAC, reason="needs mlx installed without Metal (e.g. its Linux CPU wheel)")
def test_real_mlx_binding_accepts_every_argument_and_stops_at_metal():
    q = MX.zeros((1, 2, 16, 64), dtype=MX.float16)
    with pytest.raises(RuntimeError, match="No Metal back-end"):
        mlx_glue.flash_attention(q, q, q, causal=True, return_lse=True)


MAC_CASES = [  # (dtype, Hq, Hkv, Nq, Nkv, kwargs): masked tails, GQA, variants
    ("float16", 4, 4, 40, 72, dict()),
    ("float16", 4, 2, 33, 97, dict(causal=True, fixed_gqa_group=True)),
    ("bfloat16", 4, 1, 24, 64, dict(rope=True, alibi=True, window=20, softcap=30.0)),
]


@pytest.mark.skipif(not ON_MAC, reason="needs mlx with Metal (macOS with Apple silicon); this path has "
                                       "never run on a Mac")
@pytest.mark.parametrize("dtype, hq, hkv, nq, nkv, kw", MAC_CASES)
def test_on_mac_matches_the_fp64_reference(dtype, hq, hkv, nq, nkv, kw):
    rng = np.random.default_rng(hq * 1000 + nq)
    arrays = [MX.array(rng.standard_normal((2, h, n, 64)).astype(np.float32)).astype(getattr(MX, dtype))
              for h, n in ((hq, nq), (hkv, nkv), (hkv, nkv))]
    o, lse = mlx_glue.flash_attention(*arrays, return_lse=True, **kw)
    host = [np.array(a.astype(MX.float32)) for a in arrays]
    exact, exact_lse = ref.attention(*host, return_lse=True,
                                     **{k: v for k, v in kw.items() if k != "fixed_gqa_group"})
    atol, rtol = {"float16": (5e-3, 1e-2), "bfloat16": (3e-2, 3e-2)}[dtype]
    ref.assert_allclose(np.array(o.astype(MX.float32), dtype=np.float64), exact, atol=atol, rtol=rtol)
    finite = np.isfinite(exact_lse)
    ref.assert_allclose(np.array(lse)[finite], exact_lse[finite], atol=atol, rtol=rtol)

