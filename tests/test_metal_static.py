"""Static checks of the Metal backend on Linux (tools/metal_check) and proof that each check
can fail: every planted-bug test copies a real kernel / host file, plants one bug, and
asserts the check reports it.

Needs g++, clang++ >= 17 and GNUstep Foundation headers (.ci/metal_deps.sh); skips with
the list of what is missing otherwise.
"""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from attnproto import metal_specs  # noqa: E402
from attnproto.metal_specs import MetalSpec  # noqa: E402


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


check = _load("metal_check", REPO / "tools" / "metal_check" / "check.py")
gen_swizzles = _load("metal_gen_swizzles", REPO / "tools" / "metal_check" / "gen_swizzles.py")

MISSING = check.missing_tools()
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"Metal static-check tools missing: {MISSING}; "
                                                         "run .ci/metal_deps.sh")
COMPILERS = ("g++", "clang++")
SHADERS = [p.name for p in check.shader_files()]


# ---------------------------------------------------------------------------- real code passes

def test_every_shader_has_specs_in_use():
    by_kernel = metal_specs.specs_by_kernel()
    assert SHADERS, "no .metal files found"
    for name in SHADERS:
        assert by_kernel.get(pathlib.Path(name).stem), f"{name} has no specialisation in metal_specs"


@needs_tools
@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("shader", SHADERS)
def test_shader_compiles_for_every_spec_in_use(shader, compiler):
    path = check.METAL_DIR / shader
    specs = metal_specs.specs_by_kernel()[path.stem]
    problems = check.check_shader_file(path, specs, which=[compiler])
    assert not problems, "\n".join(map(str, problems))


@needs_tools
@pytest.mark.parametrize("dtype", sorted(metal_specs.DTYPE_CODES))
@pytest.mark.parametrize("head_dim", [8, 24, 72, 96, 136, 200])
def test_flash_odd_head_dims_compile_for_every_variant(dtype, head_dim):
    tile = (16, 64)
    specs = [metal_specs.flash_spec(head_dim, *tile, dtype, causal=c, rope=r, alibi=a, gqa_group=g)
             for c, r, a, g in ((False, False, False, 0), (True, False, False, 0), (False, True, False, 0),
                                (False, False, True, 0), (True, True, True, 4))]
    problems = check.check_shader_file(check.METAL_DIR / "flash_attention.metal", specs)
    assert not problems, "\n".join(map(str, problems))


@needs_tools
def test_host_passes():
    problems = check.check_host()
    assert not problems, "\n".join(map(str, problems))


def test_bindings_pass():
    problems = check.check_bindings()
    assert not problems, "\n".join(map(str, problems))


def test_cli_bindings_exit_status():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "metal_check" / "check.py"), "--bindings"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_generated_swizzles_written_to_build_folder():
    inc = check.generated_include() / gen_swizzles.OUT_NAME
    assert inc.read_text() == gen_swizzles.render()
    assert "build" in inc.parts and not (REPO / "tools" / "metal_check" / "include" / gen_swizzles.OUT_NAME).exists()


# ---------------------------------------------------------------------------- specs and formula

@needs_tools
def test_threadgroup_formula_matches_header(tmp_path):
    cases = [(d, r, c) for d in (8, 24, 64, 72, 96, 128, 136, 200, 256)
             for r in metal_specs.SWEEP_BLOCK_R for c in metal_specs.SWEEP_BLOCK_C]
    body = "\n".join(f'std::printf("%d\\n", int(ATTNPROTO_FLASH_TG_BYTES({d}, {r}, {c}, 2)));' for d, r, c in cases)
    src = tmp_path / "formula.cpp"
    src.write_text(f'#include <cstdio>\n#include "metal_bindings.h"\nint main() {{\n{body}\nreturn 0;\n}}\n')
    exe = tmp_path / "formula"
    subprocess.run(["g++", "-std=c++17", f"-I{check.METAL_DIR}", str(src), "-o", str(exe)], check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [metal_specs.flash_threadgroup_bytes(d, r, c) for d, r, c in cases]


def test_sweep_partition():
    legal, illegal = metal_specs.sweep_tiles(), metal_specs.illegal_sweep_tiles()
    assert len(legal) + len(illegal) == 27
    assert (64, 64, 128) in illegal and (256, 16, 64) in legal
    for d, r, c in legal:
        assert metal_specs.flash_threadgroup_bytes(d, r, c) <= metal_specs.THREADGROUP_MEMORY_LIMIT


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(head_dim=65, block_r=16, block_c=64), ValueError, "head_dim"),
    (dict(head_dim=64, block_r=64, block_c=128), ValueError, "threadgroup memory"),
    (dict(head_dim=64, block_r=16, block_c=64, dtype="float32"), ValueError, "dtype"),
    (dict(head_dim=64.0, block_r=16, block_c=64), TypeError, "head_dim"),
    (dict(head_dim=64, block_r=16, block_c=64, gqa_group=-1), ValueError, "gqa_group"),
])
def test_flash_spec_rejects_bad_input(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        metal_specs.flash_spec(**kwargs)


def test_spec_canonical_matches_kernel_key_format():
    spec = metal_specs.flash_spec(64, 16, 64, causal=True)
    assert spec.canonical() == ("flash_attention[ALIBI=0,BLOCK_C=64,BLOCK_R=16,CAUSAL=1,DTYPE=0,"
                                "GQA_GROUP=0,HEAD_DIM=64,ROPE=0,SOFTCAP=0,WINDOW=0]")


# ---------------------------------------------------------------------------- planted bugs

@pytest.fixture
def tree(tmp_path):
    """A copy of shaders/ and csrc/metal/ to plant bugs in."""
    shutil.copytree(REPO / "shaders", tmp_path / "shaders")
    shutil.copytree(REPO / "csrc" / "metal", tmp_path / "csrc" / "metal")
    return tmp_path


def plant(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"planting site {old!r} not found in {path.name}"
    path.write_text(text.replace(old, new, 1))


FLASH_SPEC = [metal_specs.flash_spec(64, 16, 64)]
ROPE_SPEC = [metal_specs.rope_spec(64)]
SMOKE_SPEC = metal_specs.smoke_specs()

# (id, file, old, new, specs, compilers that must report it, expected message fragment)
SHADER_BUGS = [
    ("matrix_8x4", "flash_attention.metal", "simdgroup_matrix<T, 8, 8> k_frag;",
     "simdgroup_matrix<T, 8, 4> k_frag;", FLASH_SPEC, COMPILERS, "8x8"),
    ("device_ptr_as_threadgroup", "flash_attention.metal", "stage_chunk(kv_tile, q_base,",
     "stage_chunk(o_base, q_base,", FLASH_SPEC, ("clang++",), "'threadgroup _Float16 *'"),
    ("bad_swizzle", "flash_attention.metal", "const int b = int(tgid.z);",
     "const int b = int(tgid.w);", FLASH_SPEC, COMPILERS, ("component access", "no member named")),
    ("simd_sum_on_bool", "rope.metal", "const float lo = float(x_row[pair]);",
     "const float lo = float(simd_sum(x_row[pair] > T(0)));", ROPE_SPEC, COMPILERS, "simd_sum"),
    ("matrix_elem_mismatch", "flash_attention.metal", "simdgroup_float8x8 rescale;",
     "simdgroup_half8x8 rescale;", FLASH_SPEC, COMPILERS, "simdgroup"),
    ("vector_ctor_count", "smoke.metal", "y[i] = fma(alpha, x[i], y[i]);",
     "y[i] = float2(alpha, x[i], y[i]).x;", SMOKE_SPEC, COMPILERS, "make_vec"),
    ("missing_barrier_flags", "flash_attention.metal",
     "threadgroup_barrier(mem_flags::mem_threadgroup);\n        stage_chunk(kv_tile, q_base",
     "threadgroup_barrier();\n        stage_chunk(kv_tile, q_base", FLASH_SPEC, COMPILERS, "threadgroup_barrier"),
]


@needs_tools
@pytest.mark.parametrize("bug", SHADER_BUGS, ids=[b[0] for b in SHADER_BUGS])
def test_planted_shader_bug_is_caught(tree, bug):
    _, name, old, new, specs, must_catch, fragment = bug
    path = tree / "shaders" / "metal" / name
    plant(path, old, new)
    for compiler in must_catch:
        problems = check.check_shader_file(path, specs, which=[compiler])
        assert problems, f"{compiler} missed planted bug {bug[0]}"
        fragments = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(f in p.message for p in problems for f in fragments), "\n".join(map(str, problems))


@needs_tools
@pytest.mark.parametrize("tile", metal_specs.illegal_sweep_tiles(), ids=str)
def test_tile_over_32kb_fails_static_assert(tile):
    d, r, c = tile
    spec = MetalSpec.make("flash_attention", HEAD_DIM=d, BLOCK_R=r, BLOCK_C=c, DTYPE=0)
    for compiler in COMPILERS:
        problems = check.check_shader_file(check.METAL_DIR / "flash_attention.metal", [spec], which=[compiler])
        assert any("32 KB" in p.message for p in problems), f"{compiler}: {problems}"


@pytest.mark.parametrize("old, new, fragment", [
    ("uint i [[thread_position_in_grid]]", "uint i [[thread_position_in_grd]]", "unknown MSL attribute"),
    ("uint i [[thread_position_in_grid]]", "float i [[thread_position_in_grid]]", "has type 'float'"),
    ("device float* y [[buffer(ATTNPROTO_BUF_SMOKE_Y)]]", "float y [[buffer(ATTNPROTO_BUF_SMOKE_Y)]]",
     "must be a device/constant"),
], ids=["misspelt_attribute", "position_type", "buffer_not_pointer"])
def test_planted_attribute_bug_is_caught(tree, old, new, fragment):
    path = tree / "shaders" / "metal" / "smoke.metal"
    plant(path, old, new)
    problems = check.check_attributes(path)
    assert any(fragment in p.message for p in problems), problems


@needs_tools
def test_unknown_constant_in_spec_is_caught():
    spec = MetalSpec.make("rope", HEAD_DIMM=64, DTYPE=0)
    problems = check.check_shader_file(check.METAL_DIR / "rope.metal", [spec], which=["g++"])
    assert any("HEAD_DIMM" in p.message for p in problems), problems


HOST_BUGS = [
    ("misspelt_selector", "[enc setBuffer:buffer offset:offset atIndex:slot.index];",
     "[enc setBufer:buffer offset:offset atIndex:slot.index];", "setBufer"),
    ("wrong_argument_type", "[enc dispatchThreadgroups:MTLSizeMake(cfg.grid[0], cfg.grid[1], cfg.grid[2])",
     "[enc dispatchThreadgroups:cfg.grid[0]", "MTLSize"),
    ("missing_argument", "[blit fillBuffer:b.buffer range:NSMakeRange(0, b.bytes) value:value];",
     "[blit fillBuffer:b.buffer range:NSMakeRange(0, b.bytes)];", "fillBuffer"),
    ("unknown_property", "d.max_threads_per_block = int(device_.maxThreadsPerThreadgroup.width);",
     "d.max_threads_per_block = int(device_.maxThreadsPerGroup.width);", "maxThreadsPerGroup"),
]


@needs_tools
@pytest.mark.parametrize("bug", HOST_BUGS, ids=[b[0] for b in HOST_BUGS])
def test_planted_host_bug_is_caught(tree, bug):
    _, old, new, fragment = bug
    mm = tree / "csrc" / "metal" / "metal_backend.mm"
    plant(mm, old, new)
    problems = check.check_host([mm], metal_dir=tree / "shaders" / "metal")
    assert problems, f"host check missed planted bug {bug[0]}"
    assert any(fragment in p.message for p in problems), "\n".join(map(str, problems))


BINDING_BUGS = [
    ("shader_buffer_index", "shaders/metal/flash_attention.metal", "v [[buffer(ATTNPROTO_BUF_V)]]",
     "v [[buffer(ATTNPROTO_BUF_O)]]", "buffer index used twice"),
    ("host_buffer_index", "csrc/metal/metal_backend.mm", '{"k", ATTNPROTO_BUF_K, ArgKind::Pointer}',
     '{"k", ATTNPROTO_BUF_V, ArgKind::Pointer}', "host binds 'k'"),
    ("host_arg_kind", "csrc/metal/metal_backend.mm", '{"lse", ATTNPROTO_BUF_LSE, ArgKind::Pointer}',
     '{"lse", ATTNPROTO_BUF_LSE, ArgKind::Bytes}', "(Bytes)"),
    ("fc_index", "shaders/metal/flash_attention.metal", "BLOCK_C   [[function_constant(ATTNPROTO_FC_BLOCK_C)]]",
     "BLOCK_C   [[function_constant(ATTNPROTO_FC_BLOCK_R)]]", "must use ATTNPROTO_FC_BLOCK_C"),
    ("fc_type", "csrc/metal/metal_backend.mm", '{"CAUSAL", ATTNPROTO_FC_CAUSAL, MTLDataTypeBool}',
     '{"CAUSAL", ATTNPROTO_FC_CAUSAL, MTLDataTypeInt}', "CAUSAL is 'bool'"),
    ("header_index_clash", "shaders/metal/metal_bindings.h", "#define ATTNPROTO_BUF_LSE    5",
     "#define ATTNPROTO_BUF_LSE    4", "buffer index used twice"),
    ("literal_host_index", "csrc/metal/metal_backend.mm", "atIndex:slot.index];\n            } else if",
     "atIndex:3];\n            } else if", "literal index"),
    ("missing_host_signature", "csrc/metal/metal_backend.mm", '{"rope", {', '{"rope_v2", {',
     "host has no signature"),
]


@pytest.mark.parametrize("bug", BINDING_BUGS, ids=[b[0] for b in BINDING_BUGS])
def test_planted_binding_bug_is_caught(tree, bug):
    _, rel, old, new, fragment = bug
    plant(tree / rel, old, new)
    problems = check.check_bindings(metal_dir=tree / "shaders" / "metal",
                                    host_source=tree / "csrc" / "metal" / "metal_backend.mm")
    assert any(fragment in p.message for p in problems), "\n".join(map(str, problems))
