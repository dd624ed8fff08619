"""The lab harness: one timer, one FP64 gate, one FLOP count.

Every experiment and benchmark measures through these three, so that numbers
from different prototypes mean the same thing:

* :class:`TimingStats` and :func:`time_host` / :func:`time_device` — the one
  timing summary (median, p10, p90, mean, CV of many runs after warm-up).
  Device work is timed with the backend's events (CUDA events, Metal GPU
  timestamps); host work (the numpy CPU backend, wall-clock anchors) with
  ``time.perf_counter``.
* :func:`fp64_gate` — correctness of one kernel configuration against
  :func:`attnproto.ref.attention` in float64, on fresh random inputs, with
  outputs poisoned (NaN) before the launch so an unwritten element fails.
* :func:`attention_flops` — the matrix FLOPs of an attention forward pass.
* :func:`dispatch_watch` — the watchdog (NFR-12): every device timing (the GPU
  backends' ``time_launch`` / ``time_sequence`` / ``time`` and every device-clock
  :func:`timing`) reports its samples, one timed iteration each, and the
  experiment runner fails an experiment whose longest one exceeds
  :data:`WATCHDOG_MAX_DISPATCH_MS`.

Nothing here needs a GPU or torch (capture_cuda_graph imports torch when called).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "GATE_ATOL",
    "GATE_RTOL",
    "GATE_SHAPES",
    "DispatchWatch",
    "GateResult",
    "TimingStats",
    "WATCHDOG_MAX_DISPATCH_MS",
    "attention_flops",
    "dispatch_watch",
    "fp64_gate",
    "gate_inputs",
    "time_device",
    "time_host",
    "timing",
    "watch_dispatches",
]

# ---- timing ----
MS_PER_S = 1e3
# Minimum device warm-up time, on top of the warm-up count (0: the count alone). proto1's auto
# pass (commit 037bf43) timed the sweep's own best tiles up to 12 % slower at N <= 2K; a cold
# clock was suspected, but tools/warmup_probe.py (results/nvidia-h200/warmup_probe, commit
# e66b348) found 3 calls after a 0.5 s idle gap within 0.5 % of the sweep at those points and a
# 50 ms warm-up no better (two points 4 % and 11 % slower): the count stays the warm-up.
WARMUP_MS = 0.0
# Calls of the short estimate that sizes the warm-up.
ESTIMATE_ITERS = 2
# Fewer than two samples has no spread, hence no CV and no confidence .
MIN_SAMPLES = 2
P_LOW, P_HIGH = 10.0, 90.0


@dataclass(frozen=True)
class TimingStats:
    """Per-iteration times (ms) of one measured call: the one timing type of the project."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float                      # sample std (ddof=1) / mean, a fraction
    samples_ms: tuple[float, ...] = field(repr=False)
    clock: str = "device"          # "device" (GPU events/timestamps) or "host" (perf_counter)

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def timing(samples_ms: Sequence[float], clock: str = "device", single_dispatch: bool = True) -> TimingStats:
    """TimingStats of per-iteration samples (ms). ``single_dispatch=False``: each device sample spans
    a region of many launches (a model's forward), which is not one dispatch: the watchdog does not
    count it (its launches are each far shorter)."""
    samples = tuple(float(x) for x in samples_ms)
    if len(samples) < MIN_SAMPLES:
        raise ValueError(f"samples_ms: needs at least {MIN_SAMPLES} samples, got {len(samples)}")
    if any(not math.isfinite(x) or x < 0 for x in samples):
        raise ValueError("samples_ms: every sample must be finite and >= 0")
    if clock == "device" and single_dispatch:
        _observe(samples)
    arr = np.asarray(samples, dtype=np.float64)
    mean = float(arr.mean())
    if mean <= 0:
        raise ValueError("samples_ms: zero mean; the timer is too coarse for this workload")
    return TimingStats(median_ms=float(np.median(arr)), p10_ms=float(np.percentile(arr, P_LOW)),
                       p90_ms=float(np.percentile(arr, P_HIGH)), mean_ms=mean,
                       cv=float(arr.std(ddof=1) / mean), samples_ms=samples, clock=clock)


def _check_counts(warmup: int, iters: int) -> None:
    for value, name in ((warmup, "warmup"), (iters, "iters")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if warmup < 0:
        raise ValueError(f"warmup: must be >= 0, got {warmup}")
    if iters < MIN_SAMPLES:
        raise ValueError(f"iters: must be >= {MIN_SAMPLES}, got {iters}")


def time_host(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> TimingStats:
    """Wall-clock timing of ``fn()``, which must return once its work is complete."""
    _check_counts(warmup, iters)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * MS_PER_S)
    return timing(samples, clock="host")


def warmup_count(estimate_ms: float, warmup: int, min_ms: float = WARMUP_MS) -> int:
    """Warm-up calls: ``warmup``, or more, so that warm-up lasts at least ``min_ms``."""
    return max(int(warmup), math.ceil(min_ms / max(float(estimate_ms), 1e-3)))


def time_device(backend: Any, enqueue: Callable[[], Any], *, warmup: int = 4, iters: int = 50,
                flush_l2: bool = False, min_warmup_ms: float = WARMUP_MS) -> TimingStats:
    """Device-event timing of ``enqueue()`` (work on ``backend``'s stream) as TimingStats, after a
    warm-up of ``warmup`` calls, extended to last ``min_warmup_ms`` when that is positive."""
    _check_counts(warmup, iters)
    if min_warmup_ms > 0:
        estimate = backend.time(enqueue, warmup=1, iters=ESTIMATE_ITERS, flush_l2=flush_l2).median_ms
        warmup = warmup_count(estimate, warmup, min_warmup_ms)
    return from_native(backend.time(enqueue, warmup=warmup, iters=iters, flush_l2=flush_l2))


def from_native(stats: Any) -> TimingStats:
    """The native module's TimingStats (GPU backends' time_launch / time / time_sequence);
    its samples reach the watchdog here too (:func:`timing`, device clock)."""
    return timing(list(stats.samples_ms), clock="device")


def capture_cuda_graph(fn: Callable[[], Any]) -> Any:
    """``fn`` run once on a side stream (its lazy work done: kernels compiled, workspaces sized),
    then captured into a torch CUDA graph, which is returned (``.replay()`` runs it). Imports torch
    only when called; capture errors propagate to the caller."""
    import torch  # noqa: PLC0415

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# ---- the watchdog (NFR-12) ----
#: Longest single timed dispatch an experiment may contain. Display GPUs are reset by the OS
#: after about 2 s of one dispatch (Windows TDR, macOS's GPU watchdog); a quarter of that
#: leaves headroom on slower parts of a family. Work that would exceed it must be split.
WATCHDOG_MAX_DISPATCH_MS = 500.0


@dataclass(eq=False)                    # identity: nested watches with equal figures are distinct
class DispatchWatch:
    """The longest timed iteration (ms) seen while the watch was open (0 when none was)."""

    longest_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.longest_ms <= WATCHDOG_MAX_DISPATCH_MS


_WATCHES: list[DispatchWatch] = []


def _observe(samples_ms: Iterable[float]) -> None:
    samples = [float(x) for x in samples_ms]
    if not samples or not _WATCHES:
        return
    longest = max(samples)
    for watch in _WATCHES:
        watch.longest_ms = max(watch.longest_ms, longest)


def watch_dispatches(stats: Any) -> Any:
    """Report the per-iteration samples of a device timing (anything with ``samples_ms``) to
    the open watches; return ``stats`` unchanged."""
    _observe(getattr(stats, "samples_ms", ()))
    return stats


@contextlib.contextmanager
def dispatch_watch() -> Iterator[DispatchWatch]:
    """Watch every device timing inside the block (nested watches all see them)."""
    watch = DispatchWatch()
    _WATCHES.append(watch)
    try:
        yield watch
    finally:
        _WATCHES.remove(watch)


# ---- clocks ----
def sm_clock_reader(uuid: str | None = None) -> Callable[[], dict[str, float]]:
    """The SM and memory clocks (NVML, read-only) after each timing, so drift within a run shows
    in the records; nothing where NVML (nvidia-ml-py) is not installed.

    ``uuid``: the GPU's UUID ("GPU-..."), to read the GPU that runs the kernels: NVML numbers
    the host's GPUs ignoring CUDA_VISIBLE_DEVICES, so under a worker pinned to one GPU
    (attnproto.shard) the index would read another GPU's clocks. Without it, the index
    ``$ATTNPROTO_CUDA_DEVICE`` (default 0)."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        if uuid:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("ATTNPROTO_CUDA_DEVICE", "0")))
        pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    except Exception:  # noqa: BLE001 - no NVML: the records simply carry no clock
        return lambda: {}
    return lambda: {"sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                    "mem_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))}


# ---- FLOPs ----
FLOPS_PER_MAC = 2
MATMULS = 2                      # S = Q K^T and O = P V


def _check_size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return int(value)


def attention_flops(batch: int, num_heads: int, seq_q: int, seq_kv: int, head_dim: int,
                    causal: bool) -> int:
    """Matrix FLOPs of the forward pass: 2 matmuls x 2 FLOPs per MAC x D per visible (query, key) pair.

    Causal convention (the one used everywhere in attnproto): only the pairs the
    bottom-right aligned mask keeps are counted — query i sees
    ``max(0, min(Nkv, i + Nkv - Nq + 1))`` keys. At Nq = Nkv = N that is
    N (N + 1) / 2 pairs, (1 + 1/N) / 2 of the non-causal count: within 0.1 % of the
    FlashAttention papers' "half the FLOPs" convention for N >= 512.
    """
    batch, num_heads, seq_q, seq_kv, head_dim = (
        _check_size(v, n) for v, n in ((batch, "batch"), (num_heads, "num_heads"), (seq_q, "seq_q"),
                                       (seq_kv, "seq_kv"), (head_dim, "head_dim")))
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if causal:
        offset = seq_kv - seq_q
        first = max(0, -offset)               # first query that sees a key
        rows = max(0, seq_q - first)
        lo = first + offset + 1               # keys of that query; the last sees Nkv
        pairs = (lo + seq_kv) * rows // 2 if rows else 0
    else:
        pairs = seq_q * seq_kv
    return MATMULS * FLOPS_PER_MAC * batch * num_heads * pairs * head_dim


# ---- the FP64 gate ----
#: (batch, q heads, kv heads, seq_q, seq_kv): odd, non-tile-multiple lengths; the second
#: has Nq < Nkv (bottom-right causal alignment) and GQA.
GATE_SHAPES = ((1, 2, 2, 333, 333), (1, 4, 2, 77, 333))
GATE_ATOL, GATE_RTOL = 5e-3, 1e-2


@dataclass(frozen=True)
class GateResult:
    ok: bool
    max_abs_err: float
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


def gate_inputs(rng: np.random.Generator, shape: Sequence[int], head_dim: int,
                dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh standard-normal Q, K, V (float32 arrays holding values exact in ``dtype``)."""
    from .cpu import quantize  # noqa: PLC0415

    b, hq, hkv, nq, nkv = shape
    draw = lambda *s: np.asarray(quantize(rng.standard_normal(s, dtype=np.float32), dtype),  # noqa: E731
                                 dtype=np.float32)
    return draw(b, hq, nq, head_dim), draw(b, hkv, nkv, head_dim), draw(b, hkv, nkv, head_dim)


def fp64_gate(run: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, Any]], *, head_dim: int,
              causal: bool, dtype: str, rng: np.random.Generator,
              shapes: Sequence[Sequence[int]] = GATE_SHAPES, atol: float = GATE_ATOL,
              rtol: float = GATE_RTOL) -> GateResult:
    """Check ``run(q, k, v) -> (O, LSE)`` against the FP64 reference on every gate shape.

    ``run`` receives float32 numpy arrays (values exact in ``dtype``), moves them to
    its device in ``dtype``, launches with outputs poisoned by NaN, and returns host
    arrays. An exception, a non-finite output or an element outside
    ``atol + rtol * |ref|`` fails the gate with the reason.
    """
    from . import ref  # noqa: PLC0415

    worst = 0.0
    for shape in shapes:
        q, k, v = gate_inputs(rng, shape, head_dim, dtype)
        try:
            o, lse = run(q, k, v)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails is excluded with the reason
            return GateResult(False, math.inf, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        exact, exact_lse = ref.attention(q, k, v, causal=causal, return_lse=True)
        o = np.asarray(o, dtype=np.float64)
        lse = np.asarray(lse, dtype=np.float64)
        check = ref.allclose(o, exact, atol=atol, rtol=rtol)
        lse_check = ref.allclose(lse, exact_lse, atol=atol, rtol=rtol)
        err = float(np.nan_to_num(np.abs(o - exact), nan=math.inf).max()) if o.size else 0.0
        worst = max(worst, err)
        if not check or not lse_check:
            bad = check if not check else lse_check
            what = "O" if not check else "LSE"
            return GateResult(False, err, f"shape {tuple(shape)}: {what} outside atol {atol}/rtol {rtol}: "
                                          f"{bad.report()}")
    return GateResult(True, worst)
