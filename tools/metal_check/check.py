#!/usr/bin/env python3
"""Static checks for attnproto's Metal code on Linux (no Apple toolchain needed).

  check_shaders()  every shaders/metal/*.metal, once per specialisation in use
                   (attnproto.metal_specs), compiled as C++17 by g++ and by clang++
                   (-fsyntax-only) through the stand-in <metal_stdlib> in include/;
                   plus a check of the [[attribute]] names and parameter types.
  check_host()     csrc/metal/*.mm syntax-checked by clang as Objective-C++ against
                   GNUstep's Foundation headers and objc_stubs/ (the Metal API subset
                   the host uses), with -Werror so an unknown selector fails.
  check_bindings() the shaders' [[buffer(N)]] / [[function_constant(N)]] against
                   shaders/metal/metal_bindings.h and the host's binding tables.
  mlx_check.py     attnproto.integrations.mlx: the header + body it gives MLX, compiled as
                   MLX would assemble them, against the native entry's bindings (--mlx).

Each returns a list of Problem (empty = pass). CLI: python3 tools/metal_check/check.py
[--shaders] [--host] [--bindings] [--mlx] (default: all); exit status 1 on any problem.
Clean Debian 12 needs .ci/metal_deps.sh first.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Sequence

TOOL_DIR = pathlib.Path(__file__).resolve().parent
REPO = TOOL_DIR.parent.parent
STANDIN_INCLUDE = TOOL_DIR / "include"
# Generated headers (gen_swizzles.py output) live in the build folder, never in the source tree.
GENERATED_INCLUDE = REPO / "build" / "metal_check" / "include"
OBJC_STUBS = TOOL_DIR / "objc_stubs"
SHADER_ROOT = REPO / "shaders"
METAL_DIR = SHADER_ROOT / "metal"
BINDINGS_HEADER = METAL_DIR / "metal_bindings.h"
PARAMS_HEADER = SHADER_ROOT / "common" / "attn_params.h"
HOST_DIR = REPO / "csrc" / "metal"
HOST_SOURCE = HOST_DIR / "metal_backend.mm"
GNUSTEP_INCLUDE = pathlib.Path("/usr/include/GNUstep")

# clang 17+ has arithmetic __bf16 and _Float16 on x86-64 (the stand-in's bfloat / half).
MIN_CLANG_MAJOR = 17
CLANG_CANDIDATES = ("clang++-19", "clang++-18", "clang++-17", "clang++")
COMPILE_TIMEOUT_S = 600
# After a batch of specs fails, compile specs one by one and report at most this many.
MAX_ATTRIBUTED_FAILURES = 3

CXX_COMMON = ["-std=c++17", "-fsyntax-only", "-x", "c++", "-Wall", "-Werror",
              "-Wno-unused-function", "-Wno-unused-variable", "-Wno-unused-but-set-variable"]
CXX_FLAGS = {
    "g++": ["-Wno-attributes", "-Wno-unknown-pragmas"],
    "clang++": ["-Wno-unknown-attributes", "-Wno-unknown-pragmas", "-ferror-limit=50"],
}

if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))


@dataclasses.dataclass
class Problem:
    check: str      # "shaders" | "attributes" | "host" | "bindings" | "setup"
    where: str      # file (and spec / compiler)
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


# ------------------------------------------------------------------------------ compilers

def find_gxx() -> str | None:
    return shutil.which(os.environ.get("ATTNPROTO_GXX", "g++"))


def _clang_major(exe: str) -> int:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else 0


def find_clangxx() -> str | None:
    """A clang++ new enough for the stand-in; ATTNPROTO_CLANGXX overrides the search."""
    names = [os.environ["ATTNPROTO_CLANGXX"]] if "ATTNPROTO_CLANGXX" in os.environ else CLANG_CANDIDATES
    for name in names:
        exe = shutil.which(name)
        if exe and _clang_major(exe) >= MIN_CLANG_MAJOR:
            return exe
    return None


def compilers() -> dict[str, str]:
    """Available compilers by kind ("g++", "clang++")."""
    out = {}
    if (gxx := find_gxx()):
        out["g++"] = gxx
    if (clang := find_clangxx()):
        out["clang++"] = clang
    return out


def missing_tools() -> list[str]:
    """Human-readable list of what the checks need but this machine lacks."""
    missing = []
    if not find_gxx():
        missing.append("g++")
    if not find_clangxx():
        missing.append(f"clang++ >= {MIN_CLANG_MAJOR} (apt-get install clang-19)")
    if not (GNUSTEP_INCLUDE / "Foundation" / "Foundation.h").exists():
        missing.append("GNUstep Foundation headers (apt-get install libgnustep-base-dev)")
    return missing


# ------------------------------------------------------------------------------ bindings header

_DEFINE = re.compile(r"^\s*#\s*define\s+(ATTNPROTO_\w+)\s+(.+?)\s*(?://.*)?$", re.M)


def load_defines(*headers: pathlib.Path) -> dict[str, int]:
    """Integer object-like ATTNPROTO_* macros of the headers, resolved through each other."""
    raw: dict[str, str] = {}
    for header in headers:
        for name, value in _DEFINE.findall(header.read_text()):
            if "(" in name:
                continue
            raw[name] = value
    resolved: dict[str, int] = {}

    def resolve(name: str, depth: int = 0) -> int | None:
        if name in resolved:
            return resolved[name]
        if name not in raw or depth > len(raw):
            return None
        text = raw[name].strip()
        if re.fullmatch(r"-?\d+", text):
            resolved[name] = int(text)
        elif re.fullmatch(r"ATTNPROTO_\w+", text):
            value = resolve(text, depth + 1)
            if value is None:
                return None
            resolved[name] = value
        else:
            return None
        return resolved[name]

    for name in raw:
        resolve(name)
    return resolved


def bindings(metal_dir: pathlib.Path = METAL_DIR) -> dict[str, int]:
    return load_defines(metal_dir.parent / "common" / "attn_params.h", metal_dir / "metal_bindings.h")


# ------------------------------------------------------------------------------ MSL parsing

FC_DECL = re.compile(
    r"^(?P<indent>[ \t]*)constant[ \t]+(?P<type>\w+)[ \t]+(?P<name>\w+)[ \t]*"
    r"\[\[[ \t]*function_constant[ \t]*\([ \t]*(?P<index>[^)\]]+?)[ \t]*\)[ \t]*\]\][ \t]*;",
    re.M)
# `kernel void f(` or the attribute spelling `[[kernel]] void f(` (what MLX generates).
KERNEL_DECL = re.compile(r"(?:\bkernel|\[\[\s*kernel\s*\]\])\s+void\s+(\w+)\s*\(")
ATTR = re.compile(r"\[\[(.*?)\]\]", re.S)


@dataclasses.dataclass
class FunctionConstant:
    type: str
    name: str
    index_expr: str
    line: int


@dataclasses.dataclass
class KernelParam:
    text: str          # declaration without attributes
    name: str
    attrs: list[tuple[str, str]]  # (attribute name, argument text)


@dataclasses.dataclass
class KernelDecl:
    name: str
    params: list[KernelParam]
    line: int


def strip_comments(text: str) -> str:
    """Replace comments by spaces, keeping line numbers."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, text, flags=re.S)


def function_constants(text: str) -> list[FunctionConstant]:
    code = strip_comments(text)
    return [FunctionConstant(m["type"], m["name"], m["index"].strip(), code.count("\n", 0, m.start()) + 1)
            for m in FC_DECL.finditer(code)]


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def _parse_attrs(body: str) -> list[tuple[str, str]]:
    out = []
    for item in _split_top(body):
        m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", item, re.S)
        out.append((m.group(1), (m.group(2) or "").strip()) if m else (item.strip(), ""))
    return out


def kernels(text: str) -> list[KernelDecl]:
    code = strip_comments(text)
    out = []
    for m in KERNEL_DECL.finditer(code):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        params = []
        for raw in _split_top(code[m.end():i - 1]):
            attrs = []
            for a in ATTR.finditer(raw):
                attrs.extend(_parse_attrs(a.group(1)))
            decl = " ".join(ATTR.sub(" ", raw).split())
            name = re.findall(r"(\w+)\s*$", decl)
            params.append(KernelParam(decl, name[0] if name else "", attrs))
        out.append(KernelDecl(m.group(1), params, code.count("\n", 0, m.start()) + 1))
    return out


# ------------------------------------------------------------------------------ attributes

POSITION_ATTRS = {  # attribute -> allowed parameter types (MSL 3.1, compute kernels)
    **{a: {"uint", "ushort", "uint2", "ushort2", "uint3", "ushort3"} for a in (
        "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
        "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
        "dispatch_threads_per_threadgroup")},
    **{a: {"uint", "ushort"} for a in (
        "thread_index_in_threadgroup", "thread_index_in_simdgroup", "thread_index_in_quadgroup",
        "simdgroup_index_in_threadgroup", "quadgroup_index_in_threadgroup", "threads_per_simdgroup",
        "simdgroups_per_threadgroup", "quadgroups_per_threadgroup", "thread_execution_width")},
}
RESOURCE_ATTRS = {"buffer", "threadgroup", "texture", "sampler", "function_constant"}
OTHER_ATTRS = {"function_constant", "max_total_threads_per_threadgroup", "host_name", "visible",
               "stitchable", "id", "kernel"}
KNOWN_ATTRS = set(POSITION_ATTRS) | RESOURCE_ATTRS | OTHER_ATTRS


def check_attributes(path: pathlib.Path) -> list[Problem]:
    """Attribute names must be MSL's; position/index attributes need the right parameter types;
    [[buffer]] parameters must be device/constant pointers or constant references."""
    text = path.read_text()
    problems = []
    code = strip_comments(text)
    for m in ATTR.finditer(code):
        for name, _ in _parse_attrs(m.group(1)):
            if name not in KNOWN_ATTRS:
                line = code.count("\n", 0, m.start()) + 1
                problems.append(Problem("attributes", f"{path}:{line}", f"unknown MSL attribute [[{name}]]"))
    for k in kernels(text):
        for p in k.params:
            names = [a for a, _ in p.attrs]
            type_text = p.text[: len(p.text) - len(p.name)].strip()
            for a in names:
                if a in POSITION_ATTRS and type_text not in POSITION_ATTRS[a]:
                    problems.append(Problem("attributes", f"{path}:{k.line} {k.name}",
                                            f"[[{a}]] parameter '{p.name}' has type '{type_text}'; "
                                            f"MSL allows {sorted(POSITION_ATTRS[a])}"))
            if "buffer" in names and not re.match(r"^(const\s+)?(device|constant)\b.*[*&]$", type_text):
                problems.append(Problem("attributes", f"{path}:{k.line} {k.name}",
                                        f"[[buffer]] parameter '{p.name}' must be a device/constant "
                                        f"pointer or constant reference, got '{type_text}'"))
            if "threadgroup" in names and not re.match(r"^threadgroup\b.*\*$", type_text):
                problems.append(Problem("attributes", f"{path}:{k.line} {k.name}",
                                        f"[[threadgroup]] parameter '{p.name}' must be a threadgroup pointer"))
            if not names:
                problems.append(Problem("attributes", f"{path}:{k.line} {k.name}",
                                        f"kernel parameter '{p.name}' has no binding attribute"))
    return problems


# ------------------------------------------------------------------------------ shader compiles

# A threadgroup array declared inside a kernel (MLX's custom kernels must declare their
# threadgroup memory so: MLX sets no threadgroup allocation). clang refuses an automatic
# variable in a non-default address space; `static` gives the stand-in MSL's meaning, one
# instance shared by the threads of a group.
TG_ARRAY_DECL = re.compile(r"^(?P<indent>[ \t]*)(?=threadgroup[ \t]+[\w:<>, ]+?[ \t]+\w+[ \t]*\[[^\]\n]+\][ \t]*;)",
                           re.M)


def rewrite_for_cxx(text: str) -> str:
    """The shader as the stand-in compiles it: `constant T NAME [[function_constant(I)]];`
    becomes ATTNPROTO_FUNCTION_CONSTANT(T, NAME, I); a kernel-scope `threadgroup T name[N];`
    becomes `static` (TG_ARRAY_DECL); and the remaining [[attribute]] lists are blanked (their
    names would otherwise meet the address-space macros, e.g. threadgroup(0);
    check_attributes() validates them). Line numbers are kept."""
    text = FC_DECL.sub(lambda m: f"{m['indent']}ATTNPROTO_FUNCTION_CONSTANT({m['type']}, {m['name']}, {m['index']});",
                       text)
    text = TG_ARRAY_DECL.sub(lambda m: f"{m['indent']}static ", text)
    return ATTR.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _quoted_includes(text: str) -> list[str]:
    return re.findall(r'^\s*#\s*include\s+"([^"]+)"', strip_comments(text), re.M)


def build_translation_unit(path: pathlib.Path, specs: Sequence) -> str:
    """One C++ TU holding the shader once per spec, each in its own namespace with the
    spec's function-constant values; shared headers are included once at global scope."""
    text = path.read_text()
    fcs = function_constants(text)
    lines = ["#include <metal_stdlib>"]
    lines += [f'#include "{inc}"' for inc in _quoted_includes(text)]
    body = rewrite_for_cxx(text)
    for n, spec in enumerate(specs):
        values = spec.as_dict()
        lines.append(f"namespace attnproto_spec_{n} {{  // {spec.canonical()}")
        for fc in fcs:
            lines.append(f"constexpr long long {fc.name}__attnproto_fc_value = {int(values.get(fc.name, 0))};")
            lines.append(f"constexpr bool {fc.name}__attnproto_fc_is_defined = {'true' if fc.name in values else 'false'};")
        lines.append(f'#line 1 "{path}"')
        lines.append(body)
        lines.append(f"}}  // namespace attnproto_spec_{n}")
    return "\n".join(lines) + "\n"


def generated_include() -> pathlib.Path:
    """Write the generated swizzle header into the build folder (only when it changed)."""
    sys.path.insert(0, str(TOOL_DIR))
    try:
        import gen_swizzles  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    out = GENERATED_INCLUDE / gen_swizzles.OUT_NAME
    text = gen_swizzles.render()
    if not out.exists() or out.read_text() != text:
        GENERATED_INCLUDE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, out)
    return GENERATED_INCLUDE


def compile_tu(source: str, kind: str, exe: str, include_dirs: Sequence[pathlib.Path]) -> tuple[bool, str]:
    generated = generated_include()
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as f:
        f.write(source)
        tu = f.name
    try:
        cmd = [exe, *CXX_COMMON, *CXX_FLAGS[kind], f"-I{STANDIN_INCLUDE}", f"-I{generated}"]
        cmd += [f"-I{d}" for d in include_dirs] + [tu]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        return res.returncode == 0, res.stderr
    finally:
        os.unlink(tu)


def _first_errors(log: str, limit: int = 8) -> str:
    keep = [ln for ln in log.splitlines()
            if "error" in ln or "note: candidate" in ln or "static assertion" in ln or "static_assert" in ln]
    return "\n".join((keep or log.splitlines())[:limit])


def check_shader_file(path: pathlib.Path, specs: Sequence, which: Iterable[str] | None = None) -> list[Problem]:
    """Compile one .metal file for every spec with each available compiler."""
    problems = check_attributes(path)
    fcs = {fc.name for fc in function_constants(path.read_text())}
    for spec in specs:
        unknown = sorted(set(spec.as_dict()) - fcs)
        if unknown:
            problems.append(Problem("shaders", f"{path} {spec.canonical()}",
                                    f"spec sets {unknown}, which the shader does not declare as function constants"))
    avail = compilers()
    kinds = list(which) if which is not None else list(avail)
    include_dirs = [path.parent, path.parent.parent]
    for kind in kinds:
        if kind not in avail:
            problems.append(Problem("setup", str(path), f"compiler {kind} not found: {missing_tools()}"))
            continue
        ok, log = compile_tu(build_translation_unit(path, specs), kind, avail[kind], include_dirs)
        if ok:
            continue
        if len(specs) == 1:
            problems.append(Problem("shaders", f"{path} {specs[0].canonical()} [{kind}]", _first_errors(log)))
            continue
        failed = 0
        for spec in specs:  # attribute the failure to the first specs that fail on their own
            ok1, log1 = compile_tu(build_translation_unit(path, [spec]), kind, avail[kind], include_dirs)
            if not ok1:
                problems.append(Problem("shaders", f"{path} {spec.canonical()} [{kind}]", _first_errors(log1)))
                failed += 1
                if failed == MAX_ATTRIBUTED_FAILURES:
                    break
        if failed == 0:
            problems.append(Problem("shaders", f"{path} [{kind}]",
                                    "fails only when its specs share a translation unit:\n" + _first_errors(log)))
    return problems


def shader_files(metal_dir: pathlib.Path = METAL_DIR) -> list[pathlib.Path]:
    return sorted(metal_dir.glob("*.metal"))


def check_shaders(metal_dir: pathlib.Path = METAL_DIR, specs: dict | None = None,
                  which: Iterable[str] | None = None) -> list[Problem]:
    """Every .metal file in metal_dir, once per spec of its kernel (default: specs in use)."""
    from attnproto import metal_specs
    by_kernel = specs if specs is not None else metal_specs.specs_by_kernel()
    problems = []
    for path in shader_files(metal_dir):
        file_specs = by_kernel.get(path.stem)
        if not file_specs:
            problems.append(Problem("shaders", str(path),
                                    f"no specialisation of '{path.stem}' is in use (attnproto.metal_specs)"))
            continue
        problems += check_shader_file(path, file_specs, which)
    return problems


# ------------------------------------------------------------------------------ host (ObjC++)

def gcc_include() -> str:
    """GCC's private include dir, which holds the objc/ runtime headers GNUstep uses."""
    return subprocess.run(["gcc", "-print-file-name=include"], capture_output=True, text=True).stdout.strip()


def host_command(clang: str, source: pathlib.Path, metal_dir: pathlib.Path = METAL_DIR) -> list[str]:
    # Debian's GNUstep is built on GCC's Objective-C runtime, whose headers clang accepts
    # only without ARC; the host is built with -fobjc-arc on Apple (metal.cmake). ARC does
    # not change which selectors and argument types are valid, which is what this checks.
    return [clang, "-fsyntax-only", "-x", "objective-c++", "-std=c++17", "-fobjc-runtime=gcc",
            "-Wall", "-Werror", "-Wobjc-method-access",
            "-Wno-unknown-pragmas", "-Wno-deprecated-declarations",
            f"-I{OBJC_STUBS}", f"-I{GNUSTEP_INCLUDE}", f"-I{gcc_include()}", f"-I{REPO / 'csrc'}", f"-I{source.parent}",
            f"-I{metal_dir}", f"-I{metal_dir.parent}", "-DGNUSTEP", "-DGNUSTEP_BASE_LIBRARY=1",
            "-DGNU_RUNTIME=1", "-D_NATIVE_OBJC_EXCEPTIONS", "-DATTNPROTO_METAL_HOST_CHECK=1", str(source)]


def check_host(sources: Sequence[pathlib.Path] | None = None, metal_dir: pathlib.Path = METAL_DIR) -> list[Problem]:
    """Syntax- and type-check the Objective-C++ host with clang (GNUstep + Metal stub)."""
    clang = find_clangxx()
    if not clang or not (GNUSTEP_INCLUDE / "Foundation" / "Foundation.h").exists():
        return [Problem("setup", "host", f"missing: {missing_tools()}")]
    problems = []
    for src in sources if sources is not None else sorted(HOST_DIR.glob("*.mm")):
        res = subprocess.run(host_command(clang, pathlib.Path(src), metal_dir), capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            problems.append(Problem("host", str(src), _first_errors(res.stderr, 10)))
    return problems


# ------------------------------------------------------------------------------ bindings cross-check

HOST_SLOT = re.compile(r'\{\s*"(\w+)"\s*,\s*(ATTNPROTO_\w+)\s*,\s*ArgKind::(\w+)\s*\}')
HOST_SIGNATURE = re.compile(r'\{\s*"(\w+)"\s*,\s*\{((?:\s*\{[^{}]*\}\s*,?)+)\s*\}\s*\}')
HOST_FC = re.compile(r'\{\s*"(\w+)"\s*,\s*(ATTNPROTO_FC_\w+)\s*,\s*(MTLDataType\w+)\s*\}')
HOST_AT_INDEX = re.compile(r"atIndex:\s*([^\]\s]+)\s*\]")
FC_TYPES = {"int": "MTLDataTypeInt", "uint": "MTLDataTypeUInt", "bool": "MTLDataTypeBool",
            "float": "MTLDataTypeFloat", "short": "MTLDataTypeShort", "ushort": "MTLDataTypeUShort",
            "half": "MTLDataTypeHalf"}


def host_tables(source_text: str) -> tuple[dict[str, list[tuple[str, str, str]]], dict[str, tuple[str, str]]]:
    """(kernel -> [(slot name, index macro, kind)], constant name -> (index macro, MTLDataType))."""
    code = strip_comments(source_text)
    sigs = {}
    for m in HOST_SIGNATURE.finditer(code):
        slots = HOST_SLOT.findall(m.group(2))
        if slots:
            sigs[m.group(1)] = slots
    fcs = {name: (index, dtype) for name, index, dtype in HOST_FC.findall(code)}
    return sigs, fcs


def check_bindings(metal_dir: pathlib.Path = METAL_DIR, host_source: pathlib.Path = HOST_SOURCE) -> list[Problem]:
    """Shader indices vs metal_bindings.h vs the host's signature and function-constant tables."""
    problems: list[Problem] = []
    defs = bindings(metal_dir)
    host_text = host_source.read_text()
    sigs, host_fcs = host_tables(host_text)
    if not sigs:
        problems.append(Problem("bindings", str(host_source), "no kernel signature table found"))
    if not host_fcs:
        problems.append(Problem("bindings", str(host_source), "no function-constant table found"))

    for m in HOST_AT_INDEX.finditer(strip_comments(host_text)):
        arg = m.group(1)
        if not (arg.startswith("ATTNPROTO_") or re.fullmatch(r"\w+(\.\w+)*", arg)) or re.fullmatch(r"\d+", arg):
            problems.append(Problem("bindings", str(host_source),
                                    f"host binds at literal index '{arg}'; use a metal_bindings.h name "
                                    f"or the kernel signature table"))

    def value(expr: str, where: str) -> int | None:
        expr = expr.strip()
        if re.fullmatch(r"\d+", expr):
            problems.append(Problem("bindings", where, f"literal index {expr}; use a metal_bindings.h name"))
            return int(expr)
        if expr not in defs:
            problems.append(Problem("bindings", where, f"'{expr}' is not defined in metal_bindings.h"))
            return None
        return defs[expr]

    seen_fc: dict[str, tuple[int | None, str]] = {}
    shader_kernels: set[str] = set()
    for path in shader_files(metal_dir):
        text = path.read_text()
        indices: dict[int, str] = {}
        for fc in function_constants(text):
            where = f"{path}:{fc.line}"
            expected_macro = f"ATTNPROTO_FC_{fc.name}"
            if fc.index_expr != expected_macro:
                problems.append(Problem("bindings", where, f"function constant {fc.name} uses index "
                                        f"{fc.index_expr}; it must use {expected_macro}"))
            idx = value(fc.index_expr, where)
            if idx is not None:
                if idx in indices:
                    problems.append(Problem("bindings", where, f"function constants {indices[idx]} and "
                                            f"{fc.name} share index {idx}"))
                indices[idx] = fc.name
            seen_fc[fc.name] = (idx, fc.type)
            host = host_fcs.get(fc.name)
            if host is None:
                problems.append(Problem("bindings", where, f"host does not know function constant {fc.name}"))
                continue
            if host[0] != expected_macro or defs.get(host[0]) != idx:
                problems.append(Problem("bindings", where, f"host binds {fc.name} at {host[0]} "
                                        f"({defs.get(host[0])}), shader at {fc.index_expr} ({idx})"))
            if FC_TYPES.get(fc.type) != host[1]:
                problems.append(Problem("bindings", where, f"{fc.name} is '{fc.type}' in the shader but "
                                        f"{host[1]} on the host"))

        for k in kernels(text):
            shader_kernels.add(k.name)
            where = f"{path}:{k.line} {k.name}"
            buffers = []
            for p in k.params:
                for a, arg in p.attrs:
                    if a == "buffer":
                        kind = "Bytes" if p.text.rstrip(p.name).strip().endswith("&") else "Pointer"
                        buffers.append((p.name, arg, value(arg, where), kind))
            dup = {i for _, _, i, _ in buffers if i is not None and sum(1 for b in buffers if b[2] == i) > 1}
            if dup:
                problems.append(Problem("bindings", where, f"buffer index used twice: {sorted(dup)}"))
            host = sigs.get(k.name)
            if host is None:
                problems.append(Problem("bindings", where, "host has no signature for this kernel"))
                continue
            if len(host) != len(buffers):
                problems.append(Problem("bindings", where, f"shader has {len(buffers)} buffer arguments, "
                                        f"host binds {len(host)}"))
            for (sname, sexpr, sidx, skind), (hname, hexpr, hkind) in zip(buffers, host):
                if sname != hname or sidx != defs.get(hexpr) or skind != hkind:
                    problems.append(Problem("bindings", where,
                                            f"argument '{sname}' [[buffer({sexpr})]]={sidx} ({skind}) but host "
                                            f"binds '{hname}' at {hexpr}={defs.get(hexpr)} ({hkind})"))
    for name in sorted(set(host_fcs) - set(seen_fc)):
        problems.append(Problem("bindings", str(host_source), f"host sets function constant {name}, "
                                "which no shader declares"))
    for name in sorted(set(sigs) - shader_kernels):
        problems.append(Problem("bindings", str(host_source), f"host has a signature for '{name}', "
                                "which no shader defines"))
    from attnproto import metal_specs
    for spec in metal_specs.specs_in_use():
        unknown = sorted(set(spec.as_dict()) - set(host_fcs))
        if unknown:
            problems.append(Problem("bindings", "attnproto.metal_specs", f"{spec.canonical()} sets {unknown}, "
                                    "unknown to the host"))
    return problems


# ------------------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shaders", action="store_true", help="compile every shader x spec")
    ap.add_argument("--host", action="store_true", help="syntax-check the Objective-C++ host")
    ap.add_argument("--bindings", action="store_true", help="cross-check binding indices")
    ap.add_argument("--mlx", action="store_true", help="check the MLX integration's kernel strings")
    args = ap.parse_args(argv)
    run_all = not (args.shaders or args.host or args.bindings or args.mlx)
    problems: list[Problem] = []
    if run_all or args.bindings:
        problems += check_bindings()
    if run_all or args.shaders:
        problems += check_shaders()
    if run_all or args.host:
        problems += check_host()
    if run_all or args.mlx:
        if str(TOOL_DIR) not in sys.path:
            sys.path.insert(0, str(TOOL_DIR))
        import mlx_check  # noqa: PLC0415  (imports this file as `check`)
        problems += mlx_check.check_mlx()
    for p in problems:
        print(p)
    if not problems:
        from attnproto import metal_specs
        print(f"metal_check: OK ({len(shader_files())} shaders, {len(metal_specs.specs_in_use())} specs, "
              f"compilers {sorted(compilers())}, host {[p.name for p in sorted(HOST_DIR.glob('*.mm'))]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
