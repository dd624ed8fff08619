"""What each compiler generated, read without a GPU: SASS instruction counts by class
(cuobjdump), registers, stack and spills (cuobjdump -res-usage), shared memory, the PTX
target and matrix instructions, lines of kernel source, and cold compile times.

The SASS tools are cuobjdump/nvdisasm on PATH, else those Triton's wheel ships
(triton/backends/nvidia/bin). Nothing here needs a GPU.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

#: SASS opcode -> class (the first matching prefix wins; "other" when none matches).
SASS_CLASSES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("tensor_core", ("HGMMA", "HMMA", "IMMA")),
    ("tma", ("UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UTMACCTL")),
    ("shared_mem", ("LDS", "STS", "LDSM", "STSM", "ATOMS")),
    ("global_mem", ("LDG", "STG", "LDGSTS", "RED", "ATOMG", "LD", "ST")),
    ("special_func", ("MUFU",)),
    ("fp32", ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "FSET")),
    ("convert", ("F2FP", "F2F", "I2F", "F2I", "I2FP", "FRND")),
    ("sync", ("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "MEMBAR", "WARPSYNC", "ERRBAR", "CCTL", "FENCE")),
    ("control", ("BRA", "EXIT", "BSSY", "BSYNC", "RET", "CALL", "NOP", "YIELD", "BREAK", "JMP", "ELECT", "VOTE")),
    ("uniform", ("U",)),
    ("integer", ("IMAD", "IADD", "LOP", "SHF", "LEA", "ISETP", "IABS", "IMNMX", "SEL", "PRMT", "VIADD", "MOV",
                 "CS2R", "S2R", "S2UR", "R2UR", "PLOP", "P2R", "R2P", "FLO", "POPC", "SHFL", "BMSK", "SGXT")),
)
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTX_TARGET = re.compile(r"^\.target\s+(\S+)", re.M)
#: Cold compiles per kernel (two: a spread, hence a CV, for the record's timing).
COMPILE_REPEATS = 2
TOOL_TIMEOUT_S = 120


def tool(name: str) -> Optional[str]:
    """Path of a CUDA binary tool: on PATH, in $CUDA_HOME/bin, or shipped in Triton's wheel."""
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / name).is_file():
        return str(Path(home) / "bin" / name)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    return None


def _cuobjdump(cubin: bytes, flag: str) -> str:
    exe = tool("cuobjdump")
    if exe is None:
        raise FileNotFoundError("cuobjdump: not on PATH, not in $CUDA_HOME/bin and not shipped by triton")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([exe, flag, str(path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {res.stderr.strip()[:500]}")
    return res.stdout


def opcode_counts(sass: str) -> Counter:
    """Static count of each SASS opcode (modifiers dropped: HGMMA.64x128x16.F32.BF16 -> HGMMA)."""
    return Counter(m.group(1) for m in _SASS_LINE.finditer(sass))


def classify(opcode: str) -> str:
    for cls, prefixes in SASS_CLASSES:
        if any(opcode.startswith(p) for p in prefixes):
            return cls
    return "other"


def class_counts(ops: Counter) -> Dict[str, int]:
    out = {cls: 0 for cls, _ in SASS_CLASSES}
    out["other"] = 0
    for op, n in ops.items():
        out[classify(op)] += n
    return out


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack, static shared and local (spill) bytes of the cubin's kernel."""
    m = _RES_USAGE.search(_cuobjdump(cubin, "-res-usage"))
    if m is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK/SHARED/LOCAL line")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def ptx_stats(ptx: str) -> Dict[str, Any]:
    m = _PTX_TARGET.search(ptx)
    return {"ptx_target": m.group(1) if m else "unknown", "ptx_wgmma": ptx.count("wgmma.mma_async"),
            "ptx_mma_sync": ptx.count("mma.sync"), "ptx_tma": ptx.count("cp.async.bulk.tensor")}


def cubin_stats(cubin: bytes) -> Dict[str, float]:
    """The SASS metrics of one cubin: instructions, per-class counts, HGMMA/HMMA, resources."""
    ops = opcode_counts(_cuobjdump(cubin, "-sass"))
    stats: Dict[str, float] = {"sass_instructions_count": float(sum(ops.values())),
                               "hgmma_count": float(ops.get("HGMMA", 0)), "hmma_count": float(ops.get("HMMA", 0))}
    stats.update({f"sass_{cls}_count": float(n) for cls, n in class_counts(ops).items()})
    stats.update({metric_name(k): float(v) for k, v in resource_usage(cubin).items()})
    return stats


#: Units of resource names that carry none (record metrics end in a unit).
_RESOURCE_UNITS = {"registers": "registers_regs", "max_threads_per_block": "max_threads_per_block_threads"}


def metric_name(key: str) -> str:
    """A resource key as a record metric name ending in its unit (registers -> registers_regs)."""
    return _RESOURCE_UNITS.get(key, key)


# ------------------------------------------------------------------ lines of source
def _code_lines(text: str, comment: str) -> int:
    """Lines that are not blank and not only a comment (``comment``: "#" or "//")."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith(comment))


def python_source_lines(*functions: Any) -> int:
    """Code lines of DSL kernel functions (jit objects unwrapped), docstrings excluded."""
    total = 0
    for fn in functions:
        raw = getattr(fn, "fn", fn)
        raw = getattr(raw, "fn", raw)
        src = inspect.getsource(raw)
        doc = inspect.getdoc(raw)
        n = _code_lines(src, "#")
        if doc:
            n -= len(doc.splitlines()) + 1  # the docstring's lines and its closing quotes
        total += n
    return total


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def cuda_source_lines(path: Path, root: Path) -> int:
    """Code lines of a .cu kernel and every project header it includes (``#include "x"`` resolved
    against the shader root ``root``), each file counted once."""
    seen, todo, total = set(), [Path(path).resolve()], 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        text = p.read_text()
        total += _code_lines(text, "//")
        todo += [(Path(root) / inc).resolve() for inc in _INCLUDE.findall(text) if (Path(root) / inc).is_file()]
    return total


# ------------------------------------------------------------------ compile
def timed_compiles(compile_once: Callable[[], Tuple[bytes, str]], repeats: int = COMPILE_REPEATS
                   ) -> Tuple[bytes, str, List[float]]:
    """(cubin, ptx, wall ms of each cold compile); ``compile_once`` must bypass every cache."""
    ms, cubin, ptx = [], b"", ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        cubin, ptx = compile_once()
        ms.append((time.perf_counter() - t0) * 1e3)
    return cubin, ptx, ms


def cold_triton_cache() -> "tempfile.TemporaryDirectory[str]":
    """A fresh, empty TRITON_CACHE_DIR (Triton's on-disk cache would turn a compile into a load)."""
    return tempfile.TemporaryDirectory(prefix="attnproto-triton-cache-")
