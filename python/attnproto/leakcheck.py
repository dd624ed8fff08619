"""The leak check (NFR-11): every GPU op, many times, with memory measured before and after.

Every op of :func:`ops_for` runs :data:`WARMUP_CALLS` times (compiles, kernel caches and
torch's allocator pools fill), then memory is read, then it runs ``iterations`` times
(default :data:`ITERATIONS`), then memory is read again. An op passes when each reading
grew by less than :data:`MAX_GROWTH` (a fraction of its first value):

* ``torch_allocated_bytes``: ``torch.cuda.memory_allocated`` (the tensors torch holds);
* ``device_used_bytes``: the driver's view through the backend (``memory_usage()``:
  cuMemGetInfo's total - free on CUDA, ``MTLDevice.currentAllocatedSize`` on Metal);
* ``host_rss_bytes``: the process's resident set (``/proc/self/statm``; peak RSS from
  ``getrusage`` where there is no /proc).

The ops, per backend: every flash family of :data:`attnproto.ops.families.FAMILIES` for
it (the front door with ``kernel=NAME``), paged decode / prefill / append, linear
attention (both algorithms), and the torch custom ops of
:mod:`attnproto.integrations.torch_ops`. The CPU backend runs the CPU family, the numpy
paged and linear paths and the torch ops on CPU tensors (so CI exercises the harness);
Metal runs its family and ops on a Mac (not yet run: no Mac).  An op the device cannot
run (a DSL whose wheel is absent, the Hopper-only paged prefill elsewhere) is listed as
skipped with the reason.

``attnproto leakcheck`` writes ``<out>/<device>/leakcheck/leakcheck.json``.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ITERATIONS", "LEAKCHECK_DIR", "LEAKCHECK_FILE", "MAX_GROWTH", "LeakOp", "check_op", "ops_for",
           "run_leakcheck"]

#: The issue's count of calls per op.
ITERATIONS = 1000
#: Calls before the first reading: the first call compiles and fills the caches.
WARMUP_CALLS = 10
#: Allowed growth of every reading over the timed calls: < 1 % (NFR-11).
MAX_GROWTH = 0.01
#: Synchronise every this many calls so the device queue never holds more than that.
SYNC_EVERY = 100
LEAKCHECK_DIR = "leakcheck"
LEAKCHECK_FILE = "leakcheck.json"

# Small, odd shapes (not tile multiples), GQA 4 query heads on 2 KV heads.
_B, _HQ, _HKV, _N, _D = 2, 4, 2, 77, 128
_PAGE = 16
_CONTEXTS = (45, 77)
_LINEAR_CHUNK = 64
_LINEAR_SCALE = 0.05


class Skip(Exception):
    """This op cannot run on this device; the message says why."""


@dataclass(frozen=True)
class LeakOp:
    name: str
    #: build(backend) -> the zero-argument call to repeat; raises Skip with the reason.
    build: Callable[[str], Callable[[], Any]]


# ----------------------------------------------------------------- inputs
def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise Skip("torch is not installed") from None
    return torch


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _qkv_torch(backend: str, n: int = _N):
    torch = _torch()
    dev = _device(backend)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(_B, _HQ, n, _D, generator=g).to(dev, dtype)
    k = torch.randn(_B, _HKV, n, _D, generator=g).to(dev, dtype)
    v = torch.randn(_B, _HKV, n, _D, generator=g).to(dev, dtype)
    return q, k, v


def _qkv_numpy(heads_kv: int = _HKV):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((_B, _HQ, _N, _D), dtype=np.float32),
            rng.standard_normal((_B, heads_kv, _N, _D), dtype=np.float32),
            rng.standard_normal((_B, heads_kv, _N, _D), dtype=np.float32))


def _pool(backend: str):
    """(k_cache, v_cache [blocks, page, Hkv, D], block_table int32 [B, max], context_lens int32 [B])."""
    torch = _torch()
    dev = _device(backend)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    used = [-(-c // _PAGE) for c in _CONTEXTS]
    blocks = sum(used)
    g = torch.Generator(device="cpu").manual_seed(1)
    k = torch.randn(blocks, _PAGE, _HKV, _D, generator=g).to(dev, dtype)
    v = torch.randn(blocks, _PAGE, _HKV, _D, generator=g).to(dev, dtype)
    table = torch.zeros(len(_CONTEXTS), max(used), dtype=torch.int32)
    ids = torch.randperm(blocks, generator=g).to(torch.int32)
    start = 0
    for b, u in enumerate(used):
        table[b, :u] = ids[start:start + u]
        start += u
    lens = torch.tensor(_CONTEXTS, dtype=torch.int32)
    return k, v, table.to(dev), lens.to(dev)


# ----------------------------------------------------------------- the ops
def _flash_op(family: Any) -> LeakOp:
    def build(backend: str) -> Callable[[], Any]:
        from .ops import flash as flash_ops  # noqa: PLC0415

        if family.backend != backend:
            raise Skip(f"family {family.name} runs on {family.backend}")
        if backend == "cuda":
            q, k, v = _qkv_torch(backend)
        else:
            q, k, v = _qkv_numpy()
        try:
            flash_ops.prepare_forward(q, k, v, causal=True, kernel=family.name)
        except (TypeError, ValueError, RuntimeError, ImportError) as exc:
            raise Skip(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return lambda: flash_ops.flash_forward(q, k, v, causal=True, kernel=family.name)
    return LeakOp(f"flash:{family.name}", build)


def _needs(backend: str, *allowed: str) -> None:
    if backend not in allowed:
        raise Skip(f"runs on {', '.join(allowed)}, not {backend}")


def _paged_decode(backend: str):
    _needs(backend, "cuda")
    from .ops import paged  # noqa: PLC0415

    k, v, table, lens = _pool(backend)
    q = _qkv_torch(backend, 1)[0][:, :, 0, :].contiguous()
    return lambda: paged.paged_decode(q, k, v, table, lens)


def _paged_prefill(backend: str):
    _needs(backend, "cuda")
    from .ops import paged  # noqa: PLC0415

    k, v, table, lens = _pool(backend)
    q = _qkv_torch(backend, min(_CONTEXTS))[0]
    try:
        paged.prepare_paged_prefill(q, k, v, table, lens)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise Skip(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return lambda: paged.paged_prefill(q, k, v, table, lens)


def _append_kv(backend: str):
    _needs(backend, "cuda")
    from .ops import paged  # noqa: PLC0415

    k, v, table, lens = _pool(backend)
    new = _qkv_torch(backend, 1)[1]
    return lambda: paged.append_kv(new, new, k, v, table, lens - 1)


def _linear(algorithm: str) -> Callable[[str], Callable[[], Any]]:
    def build(backend: str) -> Callable[[], Any]:
        if backend == "cpu":
            from . import cpu  # noqa: PLC0415

            q, k, v = _qkv_numpy(_HQ)
            return lambda: cpu.linear_attention(q, k, v, chunk_size=_LINEAR_CHUNK, scale=_LINEAR_SCALE)
        _needs(backend, "cuda")
        from .ops import linear  # noqa: PLC0415

        torch = _torch()
        q, k, v = (torch.randn(_B, _HQ, _N + 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        return lambda: linear.linear_attention(q, k, v, chunk_size=_LINEAR_CHUNK, scale=_LINEAR_SCALE,
                                               algorithm=algorithm)
    return build


def _cpu_paged(backend: str):
    _needs(backend, "cpu")
    from . import cpu  # noqa: PLC0415

    k, v, table, lens = _pool(backend)
    q = _qkv_numpy()[0][:, :, :1, :]
    kn, vn = k.permute(0, 2, 1, 3).numpy(), v.permute(0, 2, 1, 3).numpy()
    return lambda: cpu.paged_forward(q, kn, vn, table.numpy(), lens.numpy())


def _torch_op(name: str) -> Callable[[str], Callable[[], Any]]:
    def build(backend: str) -> Callable[[], Any]:
        _needs(backend, "cuda", "cpu")
        torch = _torch()
        from .integrations import torch_ops  # noqa: F401, PLC0415  (registers torch.ops.attnproto)

        op = getattr(torch.ops.attnproto, name)
        if name == "flash_attention":
            q, k, v = _qkv_torch(backend)
            return lambda: op(q, k, v, True)
        k, v, table, lens = _pool(backend)
        if name == "paged_decode":
            q = _qkv_torch(backend, 1)[0][:, :, 0, :].contiguous()
            return lambda: op(q, k, v, table, lens)
        if name == "paged_prefill":
            q = _qkv_torch(backend, min(_CONTEXTS))[0]
            if backend == "cuda":
                _paged_prefill(backend)       # the same Hopper check, same skip
            return lambda: op(q, k, v, table, lens)
        new = _qkv_torch(backend, 1)[1]
        return lambda: op(new, new, k, v, table, lens - 1)
    return build


def ops_for(backend: str) -> list[LeakOp]:
    """Every op the leak check repeats (the flash families first, in registry order)."""
    from .ops import families  # noqa: PLC0415

    if backend not in ("cpu", "cuda", "metal"):
        raise ValueError(f"backend: {backend!r} is not one of cpu, cuda, metal")
    out = [_flash_op(f) for f in families.FAMILIES if f.backend == backend]
    out += [LeakOp("paged_decode", _paged_decode), LeakOp("paged_prefill", _paged_prefill),
            LeakOp("append_kv", _append_kv), LeakOp("cpu_paged_forward", _cpu_paged),
            LeakOp("linear_attention:auto", _linear("auto")), LeakOp("linear_attention:two_pass", _linear("two_pass"))]
    out += [LeakOp(f"torch.ops.attnproto.{n}", _torch_op(n))
            for n in ("flash_attention", "paged_decode", "paged_prefill", "append_kv")]
    if backend == "cpu":
        out = [o for o in out if o.name not in ("paged_decode", "paged_prefill", "append_kv",
                                                 "linear_attention:two_pass")]
    else:
        out = [o for o in out if o.name != "cpu_paged_forward"]
    return out


# ----------------------------------------------------------------- readings
def host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # noqa: PLC0415

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)   # bytes on macOS, KiB on Linux


def readings(backend: str) -> dict[str, int]:
    out = {"host_rss_bytes": host_rss_bytes()}
    if backend == "cuda":
        torch = _torch()
        torch.cuda.synchronize()
        out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated())
    if backend in ("cuda", "metal"):
        from . import backend as backend_mod  # noqa: PLC0415

        be = backend_mod.get(backend)
        be.synchronize()
        out["device_used_bytes"] = int(be.memory_usage()["allocated_bytes"])
    return out


def _sync(backend: str) -> None:
    if backend == "cuda":
        _torch().cuda.synchronize()
    elif backend == "metal":
        from . import backend as backend_mod  # noqa: PLC0415

        backend_mod.get("metal").synchronize()


def check_op(op: LeakOp, backend: str, iterations: int = ITERATIONS, *,
             progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run one op ``iterations`` times after the warm-up; its row of the log."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations: expected a positive int, got {iterations!r}")
    row: dict[str, Any] = {"op": op.name, "iterations": iterations}
    try:
        call = op.build(backend)
    except Skip as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    try:
        for _ in range(WARMUP_CALLS):
            call()
        steps = range(iterations)
        bar = progress(steps, desc=op.name) if progress is not None else steps   # made before the reading
        _sync(backend)
        gc.collect()
        before = readings(backend)
        for i in bar:
            call()
            if (i + 1) % SYNC_EVERY == 0:
                _sync(backend)
        _sync(backend)
        gc.collect()
        after = readings(backend)
    except Exception as exc:  # noqa: BLE001 - an op that fails is reported with the reason, not hidden
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    growth = {k: (after[k] - before[k]) / before[k] if before[k] else float(after[k] > 0) for k in before}
    row.update(before=before, after=after, growth=growth,
               status="ok" if all(g < MAX_GROWTH for g in growth.values()) else "leak")
    return row


def run_leakcheck(backend: str, device: str, *, iterations: int = ITERATIONS, commit: str = "unknown",
                  only: Iterable[str] | None = None, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The leak-check log of every op (or those named in ``only``) on ``backend``."""
    from .findings import utc_now_iso  # noqa: PLC0415

    ops = ops_for(backend)
    if only is not None:
        wanted = set(only)
        unknown = wanted - {o.name for o in ops}
        if unknown:
            raise ValueError(f"only: unknown ops {sorted(unknown)}; known: {', '.join(o.name for o in ops)}")
        ops = [o for o in ops if o.name in wanted]
    rows = [check_op(o, backend, iterations, progress=progress) for o in ops]
    return {"backend": backend, "device": device, "commit": commit, "date": utc_now_iso(),
            "iterations": iterations, "warmup_calls": WARMUP_CALLS, "max_growth": MAX_GROWTH,
            "ok": all(r["status"] in ("ok", "skipped") for r in rows), "ops": rows}


def write_log(log: dict[str, Any], out: str | os.PathLike[str], device_slug: str) -> Path:
    from .findings import atomic_write_text  # noqa: PLC0415

    path = Path(out) / device_slug / LEAKCHECK_DIR / LEAKCHECK_FILE
    atomic_write_text(path, json.dumps(log, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path
