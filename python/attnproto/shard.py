"""Sharded runs: an experiment's independent points on the workers of a Dask cluster.

``attnproto run EXP --gpus N|all`` starts one Dask worker per GPU of this host (dask-cuda's
``LocalCUDACluster`` when it is installed, else a Dask ``SpecCluster`` of the same shape:
one single-threaded worker process per GPU, each pinned to its GPU with
``CUDA_VISIBLE_DEVICES``); ``--scheduler ADDRESS`` uses the workers of an existing cluster.
Scheduling, retries and worker restarts are Dask's; this module only turns an experiment's
:class:`~attnproto.experiments.registry.PointsProtocol` into Dask tasks and back:

- every point is one task (its anchors inside it, so they are timed on the same GPU as what
  they are compared with), run by the experiment's own ``run_point`` in a worker context
  that is the run's context but for ``gpu`` (the worker's GPU: index and UUID, stamped on
  each record it measures);
- results are gathered as they complete (a completed point's result lives in this process,
  so a worker that dies loses only the points it was running) and merged in ``points(ctx)``
  order, then the experiment's ``finish`` computes the findings from the merged set, as in
  a serial run;
- a point whose worker died is re-run by Dask on another worker (up to Dask's
  ``distributed.scheduler.allowed-failures``); one that raised is retried ``retries`` times.
  Each attempt logs a start event to the scheduler, and before a task is released its
  scheduler state says how often its worker was lost and how many retries it used: the run
  reports every point that was started more than once (:attr:`ShardedRun.retried`) and every
  point a dying worker held before it started (:attr:`ShardedRun.reassigned`).

Dask is optional (``pip install attnproto[dask]``); importing this module never needs it.
"""
from __future__ import annotations

import os
import secrets
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CPU_GPU",
    "DEFAULT_RETRIES",
    "DaskUnavailable",
    "ShardError",
    "ShardedRun",
    "cuda_cluster",
    "gpu_count",
    "gpu_identity",
    "process_cluster",
    "record_content",
    "require_dask",
    "run_sharded",
]

#: The ``gpu`` field of records measured on the CPU backend.
CPU_GPU = {"index": None, "uuid": "cpu"}
#: Retries of a point that raised (a worker that dies is Dask's allowed-failures instead).
DEFAULT_RETRIES = 1
#: Threads per worker: one point at a time, so points on one GPU never overlap in time.
THREADS_PER_WORKER = 1
#: Dask's scheduler assigns a worker at most this many tasks per thread (worker-saturation):
#: 1.0 keeps queued points on the scheduler, so a dying worker holds only the point it runs.
WORKER_SATURATION = 1.0
_EVENT_PREFIX = "attnproto-points-"
# The scheduler's HTTP server (Dask always starts one) on a free port: never 8787 taken from a user's cluster.
_ANY_PORT = ":0"
_UUID_PREFIX = "GPU-"
INSTALL_HINT = "pip install attnproto[dask]"


# What differs between two runs of the same points, and only that (record_content):
#   record keys: the timing (samples and statistics), the date, the gpu that ran it, and the id
#     (it hashes the config, which for a default call holds its timed choice, below);
#   metrics computed from the measured time, and the clocks read after each timing;
#   a default call's (config kernel="auto") choice, "the fastest measured" tile of its point, and
#     the metrics of the kernel it chose (its error against the reference, its resources).
TIMING_RECORD_KEYS = ("timing", "date", "gpu", "id")
TIMING_METRICS = ("tflops", "gbps", "median_ms", "sm_clock_mhz", "mem_clock_mhz")
AUTO_KERNEL = "auto"
AUTO_CHOICE_FIELDS = ("family", "chose", "reason")
AUTO_CHOICE_METRICS = ("vs_reference_max_abs_err", "registers_regs", "local_bytes", "smem_bytes")


def record_content(rec: dict[str, Any]) -> dict[str, Any]:
    """A record without what differs between two runs of its point (the constants above): two runs'
    records of the same points are equal in content when these are equal."""
    out = {k: v for k, v in rec.items() if k not in TIMING_RECORD_KEYS}
    out["metrics"] = {k: v for k, v in rec["metrics"].items() if k not in TIMING_METRICS}
    if rec["config"].get("kernel") == AUTO_KERNEL:
        out["config"] = {k: v for k, v in rec["config"].items() if k not in AUTO_CHOICE_FIELDS}
        out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in AUTO_CHOICE_METRICS}
    return out


class ShardError(RuntimeError):
    """A sharded run cannot start or cannot complete (bad request, worker mismatch, a point failed)."""


class DaskUnavailable(ShardError):
    """Dask distributed is not installed."""


def require_dask() -> Any:
    """The ``distributed`` module, or :class:`DaskUnavailable` saying how to install it."""
    try:
        import distributed  # noqa: PLC0415
    except ImportError as exc:
        raise DaskUnavailable(f"sharded runs need Dask distributed ({exc}): {INSTALL_HINT}") from None
    return distributed


# ------------------------------------------------------------------ GPU identity
def _visible_devices() -> list[str] | None:
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    return [d.strip() for d in text.split(",") if d.strip()]


def gpu_count() -> int:
    """CUDA GPUs this process may use (torch's count; 0 without torch or without CUDA)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def gpu_identity(backend: str) -> dict[str, Any]:
    """Which device this process measures on, for the records' ``gpu`` field.

    cpu: :data:`CPU_GPU`. cuda: the device attnproto launches on (``$ATTNPROTO_CUDA_DEVICE``,
    default 0, among the visible ones): ``index`` is its index on the host (the entry of
    ``CUDA_VISIBLE_DEVICES`` it is, when that lists indices), ``uuid`` its UUID as NVML and
    nvidia-smi spell it (``GPU-...``, from torch's device properties; "unknown" without torch).
    metal: index 0 (one GPU per Mac) and uuid "metal".
    """
    if backend == "cpu":
        return dict(CPU_GPU)
    if backend == "metal":
        return {"index": 0, "uuid": "metal"}
    if backend != "cuda":
        raise ValueError(f"backend {backend!r} is not one of cpu, cuda, metal")
    ordinal = int(os.environ.get("ATTNPROTO_CUDA_DEVICE", "0"))
    visible = _visible_devices()
    index: int | None = ordinal
    if visible is not None:
        entry = visible[ordinal] if ordinal < len(visible) else ""
        index = int(entry) if entry.isdigit() else None
    uuid = "unknown"
    try:
        import torch  # noqa: PLC0415

        props = torch.cuda.get_device_properties(ordinal)
        raw = getattr(props, "uuid", None)
        if raw is not None:
            text = str(raw)
            uuid = text if text.startswith(_UUID_PREFIX) else _UUID_PREFIX + text
    except (ImportError, RuntimeError, AssertionError):
        pass                    # no torch, or no CUDA device for it: the UUID stays "unknown"
    return {"index": index, "uuid": uuid}


# ------------------------------------------------------------------ clusters
def _set_saturation() -> None:
    import dask  # noqa: PLC0415

    dask.config.set({"distributed.scheduler.worker-saturation": WORKER_SATURATION})


def cuda_cluster(gpus: list[int]) -> tuple[Any, str]:
    """(cluster, description): one single-threaded worker per GPU index in ``gpus``, pinned
    with CUDA_VISIBLE_DEVICES (that GPU first). dask-cuda's LocalCUDACluster when importable."""
    distributed = require_dask()
    _set_saturation()
    try:
        from dask_cuda import LocalCUDACluster  # noqa: PLC0415
    except ImportError:
        LocalCUDACluster = None  # noqa: N806
    if LocalCUDACluster is not None:
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(gpus), threads_per_worker=THREADS_PER_WORKER,
                                   dashboard_address=_ANY_PORT)
        return cluster, f"dask_cuda.LocalCUDACluster, {len(gpus)} workers (GPUs {gpus})"
    workers = {}
    for gpu in gpus:
        order = [gpu] + [g for g in gpus if g != gpu]
        workers[f"gpu{gpu}"] = {"cls": distributed.Nanny, "options": {
            "nthreads": THREADS_PER_WORKER, "env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, order))},
            "name": f"gpu{gpu}"}}
    scheduler = {"cls": distributed.Scheduler, "options": {"dashboard": False, "dashboard_address": _ANY_PORT}}
    cluster = distributed.SpecCluster(workers=workers, scheduler=scheduler)
    return cluster, (f"Dask SpecCluster, {len(gpus)} workers (GPUs {gpus}, one pinned per worker with "
                     "CUDA_VISIBLE_DEVICES; dask-cuda not installed)")


def process_cluster(n_workers: int) -> Any:
    """A local cluster of ``n_workers`` single-threaded worker processes (CPU-backend runs, tests)."""
    distributed = require_dask()
    _set_saturation()
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=THREADS_PER_WORKER, processes=True,
                                    dashboard_address=_ANY_PORT)


# ------------------------------------------------------------------ worker side
@dataclass(frozen=True)
class _RunSpec:
    """The run's context, as sent to workers (everything but the process-local parts)."""

    run_id: str
    experiment: str
    backend: str
    device: dict[str, Any]
    device_name: str
    driver: str
    commit: str
    quick: bool
    seed: int


_WORKER_CONTEXTS: dict[str, Any] = {}


def _worker_context(spec: _RunSpec) -> Any:
    """This worker process's context for the run (built once per run: the experiment keeps its
    per-context state, e.g. a bench or gate verdicts, in ``ctx.extras``)."""
    ctx = _WORKER_CONTEXTS.get(spec.run_id)
    if ctx is not None:
        return ctx
    from .cli import CLIError, device_name, resolve_backend  # noqa: PLC0415
    from .experiments.registry import ExperimentContext  # noqa: PLC0415

    try:
        status = resolve_backend(spec.backend)
    except CLIError as exc:
        raise ShardError(f"worker cannot run backend {spec.backend}: {exc}") from None
    name = device_name(status)
    if name != spec.device_name:
        raise ShardError(f"worker's {spec.backend} device is {name!r}, but the run is on {spec.device_name!r}: "
                         "records of one run must come from one kind of device")
    out_dir = Path(tempfile.mkdtemp(prefix=f"attnproto-{spec.experiment}-point-"))
    ctx = ExperimentContext(
        experiment=spec.experiment, backend=spec.backend, device=dict(spec.device), device_name=spec.device_name,
        driver=spec.driver, commit=spec.commit, quick=spec.quick,
        progress=lambda iterable=None, total=None, desc="": iterable, out_dir=out_dir,
        rng=np.random.default_rng([spec.seed, zlib.crc32(spec.experiment.encode("utf-8"))]),
        seed=spec.seed, gpu=gpu_identity(spec.backend))
    _WORKER_CONTEXTS.clear()        # one run at a time per worker: drop an earlier run's state
    _WORKER_CONTEXTS[spec.run_id] = ctx
    return ctx


def _point_task(spec: _RunSpec, run_point: Callable, point: Any) -> dict[str, Any]:
    """One point on a Dask worker: log the attempt, run it, return its result and where it ran."""
    from distributed import get_worker  # noqa: PLC0415

    worker = get_worker()
    worker.log_event(_EVENT_PREFIX + spec.run_id, {"key": point.key, "worker": worker.address})
    ctx = _worker_context(spec)
    result = run_point(ctx, point)
    return {"result": result, "worker": worker.address, "gpu": ctx.gpu}


def _scheduler_attempts(keys: list[str], dask_scheduler: Any = None) -> dict[str, tuple[int, int]]:
    """Per task key: (times its worker was lost while it was assigned, retries left); run on the
    scheduler by ``Client.run_on_scheduler``, which passes the scheduler as ``dask_scheduler``."""
    out = {}
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        if ts is not None:
            out[key] = (int(ts.suspicious), int(ts.retries))
    return out


# ------------------------------------------------------------------ driver side
@dataclass
class ShardedRun:
    """What a sharded run did besides its result: where each point ran and which were retried.

    placement: point key -> {"worker", "gpu"}; retried: one dict per point started more than
    once ({"key", "attempts", "workers": where each attempt started, "workers_lost": how often a
    worker holding it died, "error_retries"}), in point order; reassigned: the same for points
    that a dying worker held (queued, not yet started) and that then ran once elsewhere.
    """

    cluster: str
    workers: int
    placement: dict[str, dict[str, Any]] = field(default_factory=dict)
    retried: list[dict[str, Any]] = field(default_factory=list)
    reassigned: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        gpus = sorted({(p["gpu"]["index"] if p["gpu"]["index"] is not None else -1, p["gpu"]["uuid"])
                       for p in self.placement.values()})
        return {"cluster": self.cluster, "workers": self.workers, "points": len(self.placement),
                "gpus": [{"index": i if i >= 0 else None, "uuid": u} for i, u in gpus], "retried": self.retried,
                "reassigned": self.reassigned}


def run_sharded(exp: Any, ctx: Any, client: Any, *, cluster: str = "", retries: int = DEFAULT_RETRIES,
                progress: Callable[..., Any] | None = None) -> tuple[Any, ShardedRun]:
    """Run experiment ``exp`` (with a points protocol) on ``client``'s workers; returns
    (the ExperimentResult of its ``finish`` over the merged points, a :class:`ShardedRun`)."""
    from .experiments.registry import PointResult, checked_points  # noqa: PLC0415

    distributed = require_dask()
    protocol = exp.points
    if protocol is None:
        raise ShardError(f"experiment {exp.name!r} has no independent points to shard (no points protocol)")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    info = client.scheduler_info().get("workers", {})
    workers = len(info)
    if workers < 1:
        raise ShardError("the Dask cluster has no workers")
    threaded = sorted(addr for addr, w in info.items() if w.get("nthreads", 1) > THREADS_PER_WORKER)
    if threaded:
        raise ShardError(f"workers {', '.join(threaded)} run more than {THREADS_PER_WORKER} task at a time: two "
                         "points on one device would time each other; start one single-threaded worker per device "
                         "(dask worker ADDRESS --nthreads 1)")
    pts = checked_points(protocol, ctx)
    spec = _RunSpec(secrets.token_hex(8), ctx.experiment, ctx.backend, dict(ctx.device), ctx.device_name,
                    ctx.driver, ctx.commit, bool(ctx.quick), int(ctx.seed))
    task_keys = {p.key: f"{ctx.experiment}-{spec.run_id}-{i:05d}" for i, p in enumerate(pts)}
    futures = {client.submit(_point_task, spec, protocol.run_point, p, key=task_keys[p.key], retries=retries,
                             pure=False): p for p in pts}
    run = ShardedRun(cluster=cluster, workers=workers)
    results: dict[str, PointResult] = {}
    lost: dict[str, tuple[int, int]] = {}
    bar = progress(None, total=len(pts), desc=f"{ctx.experiment}[{ctx.backend}] x{workers}") if progress else None
    try:
        for future in distributed.as_completed(list(futures)):
            point = futures[future]
            try:
                out = future.result()
            except Exception as exc:  # noqa: BLE001 - reported with the point that failed
                for other in futures:
                    other.cancel()
                raise ShardError(f"point {point.key!r} failed: {type(exc).__name__}: {exc}") from exc
            lost.update(client.run_on_scheduler(_scheduler_attempts, [future.key]))
            future.release()
            if not isinstance(out.get("result"), PointResult) or out["result"].key != point.key:
                raise ShardError(f"point {point.key!r}: run_point returned {type(out.get('result')).__name__}, "
                                 "not its PointResult")
            results[point.key] = out["result"]
            run.placement[point.key] = {"worker": out["worker"], "gpu": out["gpu"]}
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    starts: dict[str, list[str]] = {}
    for _, msg in client.get_events(_EVENT_PREFIX + spec.run_id):
        starts.setdefault(msg["key"], []).append(msg["worker"])
    for p in pts:
        workers_lost, retries_left = lost.get(task_keys[p.key], (0, retries))
        error_retries = retries - retries_left
        attempts = max(len(starts.get(p.key, [])), 1 + error_retries)
        row = {"key": p.key, "attempts": attempts, "workers": starts.get(p.key, []), "workers_lost": workers_lost,
               "error_retries": error_retries}
        if attempts > 1:
            run.retried.append(row)
        elif workers_lost:
            run.reassigned.append(row)
    # finish measures nothing: the records keep the gpu of the worker that measured them.
    return protocol.finish(ctx, [results[p.key] for p in pts]), run
