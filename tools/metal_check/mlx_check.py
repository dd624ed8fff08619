#!/usr/bin/env python3
"""Static checks of attnproto.integrations.mlx on Linux: no MLX, no Mac, no Metal compiler.

  mlx_program(ks)        the Metal program MLX compiles when the kernel is called: MLX's
                         preamble (here a stand-in: the dtype names MLX's signature uses), our
                         header, the [[kernel]] signature MLX 0.32 writes (mlx/backend/common/
                         metal_kernel.cpp, write_signature: inputs then outputs at buffers
                         0, 1, ...; shape/stride/ndim buffers for names the body mentions; the
                         thread attributes the body mentions, as uint / uint3) and our body.
  check_mlx_compile()    that program through check.py's stand-in <metal_stdlib>, with g++ and
                         clang++, as the shaders are compiled; plus check.py's attribute check.
  check_mlx_bindings()   every buffer of MLX's signature against the native entry's argument of
                         the same name: the same [[buffer]] index, read-only exactly when an
                         input, nothing extra; the same thread attributes.
  check_mlx_constants()  the kernel's function constants, parsed by check.py, are exactly the
                         ones fixed in the header, with the spec's values, and none is left.
  check_mlx(specs)       all of them for each spec (default MLX_CHECK_SPECS).

The re-implemented signature writer is this check's model of MLX; a Mac run is the only test of
the model itself. CLI: python3 tools/metal_check/check.py --mlx.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import tempfile
from typing import Iterable, Sequence

TOOL_DIR = pathlib.Path(__file__).resolve().parent
if str(TOOL_DIR) not in sys.path:
    sys.path.insert(0, str(TOOL_DIR))
import check  # noqa: E402

from attnproto import metal_specs  # noqa: E402  (check.py put python/ on the path)
from attnproto.integrations import mlx as mlx_glue  # noqa: E402

# MLX's get_type_string for the dtypes this kernel's inputs and outputs have.
MLX_TYPE_NAMES = {"float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "uint8": "uint8_t"}
# MLX binds an input of fewer elements in the constant address space (max_constant_array_size).
MLX_CONSTANT_ARRAY_SIZE = 8
# Thread attributes MLX adds when their names occur in the body, with the types it gives them.
MLX_THREAD_ATTRIBUTES = {
    **{a: "uint" for a in (
        "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
        "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup", "simdgroup_index_in_threadgroup",
        "simdgroups_per_threadgroup", "thread_execution_width", "thread_index_in_quadgroup",
        "thread_index_in_simdgroup", "thread_index_in_threadgroup", "threads_per_simdgroup")},
    **{a: "uint3" for a in (
        "dispatch_threads_per_threadgroup", "grid_origin", "grid_size", "thread_position_in_grid",
        "thread_position_in_threadgroup", "threadgroup_position_in_grid", "threadgroups_per_grid",
        "threads_per_grid", "threads_per_threadgroup")},
}
# What MLX puts before the header (metal::utils()); the stand-in defines only what the generated
# signature names. MLX's preamble opens namespace metal, as its kernels' headers do.
MLX_PREAMBLE = ("#include <metal_stdlib>\ntypedef half float16_t;\ntypedef bfloat bfloat16_t;\n"
                "using namespace metal;\n")
MLX_SHAPE_SUFFIXES = ("_shape", "_strides", "_ndim")
# One fp16 spec with every variant off and one bf16 spec with every variant on (GQA fixed):
# each constant type and value kind of the rewrite, and both element types of the body.
MLX_CHECK_SPECS = (
    metal_specs.flash_spec(metal_specs.PROTO7_HEAD_DIM, metal_specs.PROTO7_BLOCK_R, metal_specs.PROTO7_BLOCK_C),
    metal_specs.flash_spec(metal_specs.PROTO7_HEAD_DIM, metal_specs.PROTO7_BLOCK_R, metal_specs.PROTO7_BLOCK_C,
                           "bfloat16", causal=True, rope=True, alibi=True, gqa_group=4, window=True,
                           softcap=True),
)
PARAMS_BYTES = 192


@dataclasses.dataclass(frozen=True)
class MlxArg:
    name: str
    dtype: str      # attnproto dtype name
    ndim: int
    size: int


def call_arguments(ks) -> tuple[list[MlxArg], list[MlxArg]]:
    """(inputs, outputs) as attnproto.integrations.mlx.flash_attention passes them, by position:
    the params bytes, then Q, K, V [B, H, N, D]; O like Q, then LSE float32 [B, Hq, Nq]. Sizes are
    the smallest a call can have (one row of D elements)."""
    constants = dict(ks.constants)
    dtype = {v: k for k, v in metal_specs.DTYPE_CODES.items()}[constants["DTYPE"]]
    rows = constants["HEAD_DIM"]
    inputs = [MlxArg(n, "uint8", 1, PARAMS_BYTES) if i == 0 else MlxArg(n, dtype, 4, rows)
              for i, n in enumerate(ks.input_names)]
    outputs = [MlxArg(n, dtype, 4, rows) if i == 0 else MlxArg(n, mlx_glue.LSE_DTYPE, 3, 1)
               for i, n in enumerate(ks.output_names)]
    return inputs, outputs


def mlx_kernel_name(ks, inputs: Sequence[MlxArg], outputs: Sequence[MlxArg]) -> str:
    name = f"custom_kernel_{ks.name}"
    for a in inputs:
        passed = "s" if a.ndim == 0 else "c" if a.size < MLX_CONSTANT_ARRAY_SIZE else ""
        name += "_" + MLX_TYPE_NAMES[a.dtype] + passed
    return name + "".join("_" + MLX_TYPE_NAMES[a.dtype] for a in outputs)


def mlx_program(ks, inputs: Sequence[MlxArg] | None = None, outputs: Sequence[MlxArg] | None = None) -> str:
    """The program MLX 0.32 builds from ``ks`` for a call with these arguments (no templates)."""
    if inputs is None or outputs is None:
        inputs, outputs = call_arguments(ks)
    params, index = [], 0
    for a in inputs:
        space = "constant" if a.size < MLX_CONSTANT_ARRAY_SIZE else "device"
        params.append(f"  const {space} {MLX_TYPE_NAMES[a.dtype]}{'&' if a.ndim == 0 else '*'} {a.name} "
                      f"[[buffer({index})]]")
        index += 1
        if a.ndim == 0:
            continue
        for suffix, decl in zip(MLX_SHAPE_SUFFIXES, ("const constant int*", "const constant int64_t*",
                                                     "const constant int&")):
            if a.name + suffix in ks.source:
                params.append(f"  {decl} {a.name}{suffix} [[buffer({index})]]")
                index += 1
    for a in outputs:
        params.append(f"  device {MLX_TYPE_NAMES[a.dtype]}* {a.name} [[buffer({index})]]")
        index += 1
    params += [f"  {t} {a} [[{a}]]" for a, t in sorted(MLX_THREAD_ATTRIBUTES.items()) if a in ks.source]
    return (MLX_PREAMBLE + ks.header + f"[[kernel]] void {mlx_kernel_name(ks, inputs, outputs)}(\n"
            + ",\n".join(params) + ") {\n" + ks.source + "\n}\n")


def _buffers(decl) -> dict[str, tuple[str, bool]]:
    """name -> (buffer index expression, read-only) of a parsed kernel's [[buffer]] arguments."""
    out = {}
    for p in decl.params:
        for a, arg in p.attrs:
            if a == "buffer":
                type_text = p.text[: len(p.text) - len(p.name)].strip()
                out[p.name] = (arg, type_text.startswith(("const ", "constant ")) or " const " in f" {type_text} ")
    return out


def _thread_attrs(decl) -> set[str]:
    return {a for p in decl.params for a, _ in p.attrs if a in check.POSITION_ATTRS}


def _native_entry(shaders: pathlib.Path):
    path = shaders / mlx_glue.KERNEL_FILE
    entries = [k for k in check.kernels(path.read_text()) if k.name == metal_specs.FLASH_KERNEL]
    return path, entries[0] if entries else None


def check_mlx_bindings(ks, shaders: pathlib.Path = check.SHADER_ROOT) -> list[check.Problem]:
    where = f"mlx:{ks.name}"
    path, native = _native_entry(shaders)
    if native is None:
        return [check.Problem("mlx", str(path), f"no kernel {metal_specs.FLASH_KERNEL} to compare against")]
    defs = check.bindings(shaders / "metal")
    generated = [k for k in check.kernels(mlx_program(ks)) if k.name.startswith("custom_kernel_")]
    mine = _buffers(generated[0])
    problems = []
    for name, (expr, read_only) in _buffers(native).items():
        if name not in mine:
            problems.append(check.Problem("mlx", where, f"native argument '{name}' [[buffer({expr})]] is none of "
                                          f"MLX's inputs {list(ks.input_names)} / outputs {list(ks.output_names)}"))
            continue
        got, got_ro = mine.pop(name)
        if int(got) != defs.get(expr):
            problems.append(check.Problem("mlx", where, f"'{name}' is MLX buffer {got}, the native entry binds "
                                          f"it at {expr} = {defs.get(expr)}"))
        if got_ro != read_only:
            problems.append(check.Problem("mlx", where, f"'{name}' is {'an input' if got_ro else 'an output'} "
                                          f"to MLX but {'read-only' if read_only else 'written'} in the native entry"))
    for name, (got, _) in mine.items():
        problems.append(check.Problem("mlx", where, f"MLX buffer {got} '{name}' has no native counterpart "
                                      "(a name in the body made MLX add it?)"))
    if _thread_attrs(generated[0]) != _thread_attrs(native):
        problems.append(check.Problem("mlx", where, f"thread attributes {sorted(_thread_attrs(generated[0]))} "
                                      f"differ from the native entry's {sorted(_thread_attrs(native))}"))
    return problems


def check_mlx_constants(ks, shaders: pathlib.Path = check.SHADER_ROOT) -> list[check.Problem]:
    where = f"mlx:{ks.name}"
    problems = []
    declared = {fc.name for fc in check.function_constants((shaders / mlx_glue.KERNEL_FILE).read_text())}
    fixed = dict(ks.constants)
    if set(fixed) != declared:
        problems.append(check.Problem("mlx", where, f"header fixes {sorted(fixed)}, the kernel declares "
                                      f"{sorted(declared)}"))
    if fixed != ks.spec.as_dict():
        problems.append(check.Problem("mlx", where, f"header constants {fixed} are not the spec's {ks.spec}"))
    code = check.strip_comments(ks.header)
    for name, value in fixed.items():
        m = re.search(rf"\bconstexpr\s+constant\s+\w+\s+{name}\s*=\s*(\w+)\s*;", code)
        literal = None if m is None else {"true": 1, "false": 0}.get(m.group(1), m.group(1))
        if m is None or int(literal) != value:
            problems.append(check.Problem("mlx", where, f"header does not define {name} = {value}"))
    for leftover in ("function_constant", "is_function_constant_defined"):
        if re.search(rf"\b{leftover}\b", code):
            problems.append(check.Problem("mlx", where, f"header still uses {leftover}"))
    return problems


def check_mlx_compile(ks, which: Iterable[str] | None = None) -> list[check.Problem]:
    program = mlx_program(ks)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / f"{ks.name}.metal"
        path.write_text(program)
        problems = check.check_attributes(path)
    avail = check.compilers()
    for kind in (list(which) if which is not None else list(avail)):
        if kind not in avail:
            problems.append(check.Problem("setup", ks.name, f"compiler {kind} not found: {check.missing_tools()}"))
            continue
        ok, log = check.compile_tu(check.rewrite_for_cxx(program), kind, avail[kind], [])
        if not ok:
            problems.append(check.Problem("mlx", f"mlx:{ks.name} [{kind}]", check._first_errors(log)))
    return problems


def check_mlx(specs: Sequence = MLX_CHECK_SPECS, which: Iterable[str] | None = None,
              shaders: pathlib.Path = check.SHADER_ROOT) -> list[check.Problem]:
    problems = []
    for spec in specs:
        try:
            ks = mlx_glue.build_kernel_source(spec, shaders)
        except ValueError as err:
            problems.append(check.Problem("mlx", str(spec), f"header not built: {err}"))
            continue
        problems += check_mlx_constants(ks, shaders) + check_mlx_bindings(ks, shaders) + check_mlx_compile(ks, which)
    return problems


if __name__ == "__main__":
    found = check_mlx()
    for problem in found:
        print(problem)
    print("mlx_check: OK" if not found else f"mlx_check: {len(found)} problems")
    sys.exit(1 if found else 0)
