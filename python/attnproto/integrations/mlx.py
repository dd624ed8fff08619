"""attnproto's Metal flash kernel inside MLX, without a fork of MLX: Prototype 8's question asked
of Apple's framework through ``mx.fast.metal_kernel``. Statically checked on Linux
(tools/metal_check/mlx_check.py, tests/test_mlx_integration.py); NEVER RUN ON A MAC: no number,
timing or correctness result of this path exists.

MLX's contract (``mx.fast.metal_kernel``, MLX 0.32): a kernel name, input and output names, a
``source`` that is only the BODY of the kernel function and a ``header`` placed before it. MLX
writes the ``[[kernel]]`` signature itself when the kernel is called: input i becomes
``const device T* name [[buffer(n)]]`` (T from the array's dtype; the constant address space
below 8 elements), then the outputs ``device T* name``, indices counted in that order (plus
``name_shape`` / ``name_strides`` / ``name_ndim`` buffers when those words occur in the source);
a thread attribute (``thread_index_in_simdgroup``, ...) becomes a ``uint`` / ``uint3``
parameter when its name occurs in the source; ``template=[(name, int | bool | dtype)]`` become
template parameters of that generated function; the grid (in threads: MLX dispatches threads,
not threadgroups), the threadgroup and the output shapes and dtypes are call arguments.

The glue (``glue_report()`` counts each part, from this code and the strings it generates):

1. Python, this module: argument checks and the AttentionParams block are ops.metal_flash's,
   MLX arrays are described by attnproto.validate;
2. ``header``: our kernel file rewritten, mechanically, by :func:`build_kernel_source`:
   the ``#include "..."`` files inlined (MLX compiles one string: there is no include path);
   each ``constant T NAME [[function_constant(I)]];`` turned into ``constexpr constant T NAME =
   value;`` and ``is_function_constant_defined(NAME)`` into ``true``; the implementation's
   ``constant AttentionParams& p`` into ``device const AttentionParams& p``; the ``kernel void
   flash_attention(...)`` entry point dropped (MLX writes the entry); all of it after
   ``<metal_stdlib>`` in namespace ``attnproto_mlx``, away from the names of MLX's own preamble;
   then the element type and the threadgroup-memory size of the specialisation;
3. ``source``: a body that declares the threadgroup memory and calls our
   ``flash_attention_impl``, unchanged.

What MLX cannot express, and what stands in for it:

* function constants. MLX has none; its template arguments are parameters of the kernel it
  generates, visible in ``source`` only, while our device code reads its constants at program
  scope, in ``header``. Passing them as templates would mean templating the kernel's device
  code on all ten of them; so ``template`` is not used, and each specialisation is its own
  header (one MLX library each, as each template instantiation would be), under a kernel name
  that spells the specialisation, so MLX's kernel cache cannot hand one specialisation's
  library to another.
* the threadgroup-memory length. MLX sets none for a custom kernel, so the body declares a
  fixed threadgroup array of ATTNPROTO_FLASH_TG_BYTES (as float4, for 16-byte alignment): the
  size is known when the header is, the tile being a constant.
* the params buffer. Structs are not inputs, and no input of 8 elements or more is bound in
  the constant address space: the 192-byte AttentionParams travels as a uint8 array, read from
  device memory.
* the kernel's compile-time checks (ATTNPROTO_FC_STATIC_ASSERT) are static_asserts only in the
  Linux stand-in; on Metal, tile legality is checked in Python (metal_specs.flash_spec).
* strided inputs: ``ensure_row_contiguous`` makes MLX copy them, as the native op uploads
  contiguous copies. No gradient: a forward op, like the native one.
* math mode: MLX compiles in its default (``"safe"`` in 0.32: IEEE NaN / inf), the native host
  with fast math; the kernel's masking does not rely on either (a finite masked score).

Outputs are filled with NaN first (``init_value``): an element the kernel failed to write cannot
pass a comparison, as on the native path. Importing this module needs no MLX; calling
:func:`flash_attention` without it raises ImportError. ``python -m attnproto.integrations.mlx``
prints the glue counts.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import backend as _backend
from .. import metal_specs as _ms
from .. import validate as _v
from ..ops import metal_flash as _mf
from ..ref import DEFAULT_ALIBI_MAX_BIAS, DEFAULT_ROPE_THETA

__all__ = ["MLX_REQUIREMENT", "INPUT_NAMES", "OUTPUT_NAMES", "MlxKernelSource",
           "build_kernel_source", "mlx_dispatch", "flash_attention", "glue_report"]

MLX_REQUIREMENT = "needs mlx (macOS with Apple silicon)"
KERNEL_FILE = f"metal/{_ms.FLASH_KERNEL}.metal"
IMPL_FUNCTION = "flash_attention_impl"
NAMESPACE = "attnproto_mlx"
KERNEL_NAME_PREFIX = "attnproto_"
# The native entry's buffer arguments, in its [[buffer(N)]] order (the static check holds them to it).
INPUT_NAMES: Tuple[str, ...] = ("params", "q", "k", "v")
OUTPUT_NAMES: Tuple[str, ...] = ("o", "lse")
# MSL element type of each Metal dtype (DTYPE function-constant values, metal_specs.DTYPE_CODES).
MSL_ELEMENT_TYPES = {"float16": "half", "bfloat16": "bfloat"}
LSE_DTYPE = "float32"
# The threadgroup array is of float4: 16-byte aligned, Metal's threadgroup-memory granule
# (ATTNPROTO_TG_MEMORY_GRANULE), as the native host's allocation is.
TG_VECTOR_BYTES = 16
# MLX takes grid and threadgroup extents as C int.
MLX_MAX_GRID = 2**31 - 1
# Specialisations whose MLX kernel objects are kept (each holds an MLX library once called).
KERNEL_CACHE_SIZE = 64
# Filled into the outputs before the kernel runs: anything it fails to write stays NaN.
OUTPUT_POISON = float("nan")
# Our kernel's parameter block as the implementation takes it, and as it is read through MLX.
_PARAMS_REF = re.compile(r"\bconstant[ \t]+AttentionParams[ \t]*&")
_PARAMS_REF_MLX = "device const AttentionParams&"
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"(?P<path>[^"]+)"[ \t]*$', re.M)
_STDLIB_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]+<metal_stdlib>[ \t]*$", re.M)
_FC_DECL = re.compile(r"^(?P<indent>[ \t]*)constant[ \t]+(?P<type>\w+)[ \t]+(?P<name>\w+)[ \t]*"
                      r"\[\[[ \t]*function_constant[ \t]*\((?P<index>[^)\]]+)\)[ \t]*\]\][ \t]*;", re.M)
_FC_DEFINED = re.compile(r"\bis_function_constant_defined[ \t]*\([ \t]*(?P<name>\w+)[ \t]*\)")
_ENTRY = re.compile(rf"\bkernel[ \t]+void[ \t]+{_ms.FLASH_KERNEL}[ \t]*\(")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)

# The body handed to MLX as `source`: the attribute names in it make MLX add those parameters.
_BODY = """\
threadgroup float4 attnproto_smem[{ns}::kMlxTgVectors];
{ns}::{impl}(*reinterpret_cast<const device {ns}::AttentionParams*>(params),
    reinterpret_cast<const device {ns}::mlx_elem_t*>(q),
    reinterpret_cast<const device {ns}::mlx_elem_t*>(k),
    reinterpret_cast<const device {ns}::mlx_elem_t*>(v),
    reinterpret_cast<device {ns}::mlx_elem_t*>(o), lse,
    reinterpret_cast<threadgroup uchar*>(attnproto_smem), threadgroup_position_in_grid,
    ushort(thread_index_in_threadgroup), ushort(simdgroup_index_in_threadgroup),
    ushort(thread_index_in_simdgroup));
"""

# Added after the kernel's code, inside the namespace: the specialisation's element type and
# threadgroup memory, which the native host sets from outside (pipeline, setThreadgroupMemoryLength).
_HEADER_TAIL = """\
typedef {elem} mlx_elem_t;
constexpr constant int kMlxTgBytes = ATTNPROTO_FLASH_TG_BYTES(HEAD_DIM, BLOCK_R, BLOCK_C, sizeof(mlx_elem_t));
constexpr constant int kMlxTgVectors = (kMlxTgBytes + {vec} - 1) / {vec};
"""


def _require_mlx() -> Any:
    try:
        import mlx.core as mx  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(f"attnproto.integrations.mlx.flash_attention {MLX_REQUIREMENT}; "
                          f"importing mlx.core failed: {err}") from err
    return mx


@dataclass(frozen=True)
class MlxKernelSource:
    """What :func:`mx.fast.metal_kernel` is given for one specialisation, and how it was made."""

    spec: _ms.MetalSpec
    name: str
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    source: str
    header: str
    constants: Tuple[Tuple[str, int], ...]     # the function constants fixed in the header
    inlined_files: Tuple[str, ...]              # shader files whose text the header holds
    rewritten_lines: int                        # kernel lines the rewrite changed
    dropped_lines: int                          # kernel lines dropped (the entry point)
    added_header_lines: int                     # header lines that come from no kernel file


def _blank_comments(text: str) -> str:
    return _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _sub_code(pattern: re.Pattern, repl: Any, text: str) -> Tuple[str, List[int]]:
    """``pattern.sub(repl, text)`` outside comments; also the (0-based) lines it changed."""
    code = _blank_comments(text)
    out, last, lines = [], 0, []
    for m in pattern.finditer(code):
        out += [text[last:m.start()], repl(m)]
        last = m.end()
        lines.append(code.count("\n", 0, m.start()))
    return "".join(out + [text[last:]]), lines


def _inline(path: Path, seen: set) -> Tuple[str, list]:
    """The file with its quoted includes replaced by their text (each file once)."""
    files = [path]
    seen.add(path.resolve())

    def expand(m: re.Match) -> str:
        target = (path.parent / m["path"]).resolve()
        if target in seen:
            return f"// (already inlined: {m['path']})"
        text, sub = _inline(target, seen)
        files.extend(sub)
        return text

    return _sub_code(_LOCAL_INCLUDE, expand, path.read_text())[0], files


def _matching(code: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket closing the one opened before ``i``."""
    depth = 1
    while depth:
        if i >= len(code):
            raise ValueError(f"{KERNEL_FILE}: unbalanced '{open_ch}' in the entry point {_ms.FLASH_KERNEL}")
        depth += {open_ch: 1, close_ch: -1}.get(code[i], 0)
        i += 1
    return i


def _drop_entry(text: str) -> Tuple[str, int]:
    """The text without the `kernel void flash_attention(...) { ... }` definition, and its lines."""
    code = _blank_comments(text)
    m = _ENTRY.search(code)
    if m is None:
        raise ValueError(f"{KERNEL_FILE}: no 'kernel void {_ms.FLASH_KERNEL}(' entry point to replace")
    body = code.find("{", _matching(code, m.end(), "(", ")"))
    if body < 0:
        raise ValueError(f"{KERNEL_FILE}: the entry point {_ms.FLASH_KERNEL} has no body")
    end = _matching(code, body + 1, "{", "}")
    marker = f"// kernel void {_ms.FLASH_KERNEL}(...): the entry point is MLX's (attnproto.integrations.mlx)"
    return text[:m.start()] + marker + text[end:], text.count("\n", m.start(), end) + 1


def _literal(fc_type: str, value: int) -> str:
    return ("true" if value else "false") if fc_type == "bool" else str(int(value))


def build_kernel_source(spec: _ms.MetalSpec, shaders: Optional[Path] = None) -> MlxKernelSource:
    """``name``, ``source`` and ``header`` for ``mx.fast.metal_kernel`` of one flash_attention spec.

    ``shaders``: the shader tree (default :func:`attnproto.backend.shader_dir`). ValueError when
    the spec does not set exactly the kernel's function constants, or when the kernel no longer
    has the shape this glue rewrites (one entry point, one ``constant AttentionParams&``).
    """
    if spec.name != _ms.FLASH_KERNEL:
        raise ValueError(f"spec: expected a {_ms.FLASH_KERNEL} specialisation, got {spec.name!r}")
    root = Path(shaders) if shaders is not None else _backend.shader_dir()
    text, files = _inline(root / KERNEL_FILE, set())
    values = spec.as_dict()
    declared = {m["name"]: m["type"] for m in _FC_DECL.finditer(_blank_comments(text))}
    if set(declared) != set(values):
        raise ValueError(f"spec: {spec} sets {sorted(values)}, the kernel declares function constants "
                         f"{sorted(declared)}: every one must be fixed in the MLX header")
    text, dropped = _drop_entry(text)
    # Each rewrite keeps the line count, so the lines each reports are the same text's lines.
    text, fc_lines = _sub_code(_FC_DECL, lambda m: (
        f"{m['indent']}constexpr constant {m['type']} {m['name']} = "
        f"{_literal(m['type'], values[m['name']])};  // function constant {m['index'].strip()}"), text)
    text, defined_lines = _sub_code(_FC_DEFINED, lambda m: "true", text)
    text, ref_lines = _sub_code(_PARAMS_REF, lambda m: _PARAMS_REF_MLX, text)
    if len(ref_lines) != 1:
        raise ValueError(f"{KERNEL_FILE}: expected one 'constant AttentionParams&' parameter (the "
                         f"implementation's) after dropping the entry point, found {len(ref_lines)}")
    text, _ = _sub_code(_STDLIB_INCLUDE, lambda m: "// <metal_stdlib>: included above the namespace", text)
    rewritten = set(fc_lines) | set(defined_lines) | set(ref_lines)
    dtype = {code: name for name, code in _ms.DTYPE_CODES.items()}.get(values["DTYPE"])
    if dtype is None:
        raise ValueError(f"spec: DTYPE {values['DTYPE']} is none of {_ms.DTYPE_CODES}")
    head = [f"// {spec} for mx.fast.metal_kernel: {KERNEL_FILE} rewritten by attnproto.integrations.mlx",
            "#include <metal_stdlib>", f"namespace {NAMESPACE} {{"]
    tail = _HEADER_TAIL.format(elem=MSL_ELEMENT_TYPES[dtype], vec=TG_VECTOR_BYTES).splitlines()
    tail.append(f"}}  // namespace {NAMESPACE}")
    header = "\n".join([*head, text.rstrip("\n"), *tail]) + "\n"
    suffix = "_".join(f"{k}{v}" for k, v in spec.constants)
    return MlxKernelSource(
        spec=spec, name=f"{KERNEL_NAME_PREFIX}{spec.name}_{suffix}", input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES, source=_BODY.format(ns=NAMESPACE, impl=IMPL_FUNCTION), header=header,
        constants=tuple(sorted(values.items())),
        inlined_files=tuple(str(f.resolve().relative_to(root.resolve())) for f in files),
        rewritten_lines=len(rewritten), dropped_lines=dropped, added_header_lines=len(head) + len(tail))


def mlx_dispatch(problem: _mf.MetalFlashProblem) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """(grid in threads, threadgroup) of one launch: the native threadgroup grid
    (ceil(Nq / Br), Hq, B) with x scaled by the threads of a group, as MLX dispatches threads."""
    s = problem.shape
    groups, threads, _ = _ms.flash_dispatch(s.batch, s.num_heads, s.seq_q, problem.block_r,
                                            s.head_dim, problem.block_c, s.dtype)
    grid = (groups[0] * threads[0], groups[1], groups[2])
    for extent, what in zip(grid, ("q: query tiles x threads", "q: heads", "q: batch")):
        if extent > MLX_MAX_GRID:
            raise ValueError(f"{what} = {extent} exceeds MLX's grid limit {MLX_MAX_GRID}")
    return grid, threads


@functools.lru_cache(maxsize=KERNEL_CACHE_SIZE)
def _kernel(spec: _ms.MetalSpec) -> Any:
    mx = _require_mlx()
    ks = build_kernel_source(spec)
    return mx.fast.metal_kernel(name=ks.name, input_names=list(ks.input_names),
                                output_names=list(ks.output_names), source=ks.source,
                                header=ks.header, ensure_row_contiguous=True)


def flash_attention(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
                    rope: bool = False, rope_theta: float = DEFAULT_ROPE_THETA, alibi: bool = False,
                    alibi_max_bias: float = DEFAULT_ALIBI_MAX_BIAS, window: Optional[int] = None,
                    softcap: Optional[float] = None, fixed_gqa_group: bool = False,
                    block_r: Optional[int] = None, block_c: Optional[int] = None,
                    return_lse: bool = False, stream: Any = None) -> Any:
    """Our Metal flash forward on MLX arrays Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D] (float16 or
    bfloat16): O (an ``mx.array`` like q), or (O, LSE float32 [B, Hq, Nq]) with ``return_lse``.

    Arguments and conventions are :func:`attnproto.ops.metal_flash.prepare_flash_forward`'s
    (bottom-right causal mask, RoPE, ALiBi, GQA, left window, soft cap); ``stream`` is MLX's.
    Lazy, as MLX is: the kernel runs when the result is evaluated. Never run on a Mac.
    """
    mx = _require_mlx()
    _v.check_bool(return_lse, "return_lse")
    problem = _mf.check_metal_flash_inputs(
        q, k, v, causal=causal, scale=scale, rope=rope, rope_theta=rope_theta, alibi=alibi,
        alibi_max_bias=alibi_max_bias, fixed_gqa_group=fixed_gqa_group, block_r=block_r,
        block_c=block_c, window=window, softcap=softcap, input_devices=(_v.MLX_DEVICE,))
    grid, threads = mlx_dispatch(problem)
    kernel = _kernel(_mf.flash_launch_spec(problem))
    s = problem.shape
    params = mx.array(np.frombuffer(_mf.metal_flash_params(problem).tobytes(), dtype=np.uint8))
    o_shape = (s.batch, s.num_heads, s.seq_q, s.head_dim)
    o, lse = kernel(inputs=[params, q, k, v], output_shapes=[o_shape, o_shape[:3]],
                    output_dtypes=[q.dtype, getattr(mx, LSE_DTYPE)], grid=grid, threadgroup=threads,
                    init_value=OUTPUT_POISON, stream=stream)
    return (o, lse) if return_lse else o


def glue_report(spec: Optional[_ms.MetalSpec] = None) -> Dict[str, Any]:
    """The glue of this integration, counted: Python code lines of this module (Prototype 8's
    count: no blanks, comments or docstrings), lines of the MSL body, and how the header was made
    from our kernel (lines rewritten, dropped, added; files inlined). Default spec: Prototype 7's tile."""
    import inspect  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from ..experiments.proto8.glue import code_lines  # noqa: PLC0415

    spec = spec or _ms.flash_spec(_ms.PROTO7_HEAD_DIM, _ms.PROTO7_BLOCK_R, _ms.PROTO7_BLOCK_C)
    ks = build_kernel_source(spec)
    return {"spec": str(spec), "python_code_lines": code_lines(inspect.getsource(sys.modules[__name__])),
            "source_lines": sum(1 for ln in ks.source.splitlines() if ln.strip()),
            "header_lines": ks.header.count("\n"), "header_rewritten_lines": ks.rewritten_lines,
            "header_dropped_lines": ks.dropped_lines, "header_added_lines": ks.added_header_lines,
            "inlined_files": list(ks.inlined_files), "function_constants_fixed": len(ks.constants),
            "template_arguments": 0, "mlx_run_on_a_mac": False}


if __name__ == "__main__":
    print(json.dumps(glue_report(), indent=2))
