"""Sweep records and the on-disk results layout.

Layout (``out`` defaults to ``results/`` for GPU backends, see
:func:`default_out_dir` for CPU runs)::

    <out>/<device-slug>/<experiment>/records.jsonl           one record per swept config
    <out>/<device-slug>/<experiment>/findings.jsonl          the live findings of the latest run
    <out>/<device-slug>/<experiment>/findings_history.jsonl  superseded and retired findings
    <out>/<device-slug>/<experiment>/run.json                device, driver, commit, date, command line

plus whatever artefacts the experiment writes (``ctx.out_dir``).  The whole
directory describes the latest *completed* run: a run writes into a staging
directory beside it (``<experiment>.staging-<random>``) and
:func:`staged_results_dir` swaps it in only when everything succeeded; a failed
or interrupted run leaves the previous directory untouched.  Findings are merged
with :func:`attnproto.findings.merge_findings`: a re-run supersedes the previous
version of each finding (never first-write-wins), and findings the run did not
produce again are retired to the history, so every live finding cites records in
the ``records.jsonl`` beside it.

The device slug of a GPU is the slug of its name (``"NVIDIA H100 80GB HBM3"`` ->
``"nvidia-h100-80gb-hbm3"``).  CPU runs always get a slug that starts with
``cpu`` (``"cpu-<cpu model slug>"``, or ``"cpu"`` when the model is unknown;
never the host name), so CPU timings can never land in a GPU directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import lab as _lab
from .findings import (
    BACKENDS,
    Finding,
    FindingError,
    FindingsMerge,
    atomic_write_text,
    canonical_json,
    merge_findings,
    read_findings,
    slugify,
    utc_now_iso,
    validate_metrics,
    write_findings,
)

__all__ = [
    "CPU_SLUG",
    "EXPERIMENT_NAME_RE",
    "FINDINGS_FILE",
    "GPU_KEY",
    "HISTORY_FILE",
    "MIN_TIMING_SAMPLES",
    "RECORDS_FILE",
    "RUN_FILE",
    "RecordError",
    "ResultPaths",
    "StagedResults",
    "check_findings_against_records",
    "default_out_dir",
    "device_slug",
    "git_commit",
    "git_dirty",
    "leftover_result_dirs",
    "make_record",
    "make_run_info",
    "read_previous_findings",
    "read_records",
    "record_id",
    "results_dir",
    "results_lock",
    "staged_results_dir",
    "timing_from_samples",
    "timing_to_dict",
    "validate_record",
    "write_experiment_results",
    "write_merged_findings",
    "write_results",
]

RECORDS_FILE = "records.jsonl"
FINDINGS_FILE = "findings.jsonl"
HISTORY_FILE = "findings_history.jsonl"
RUN_FILE = "run.json"
# Sibling directories of a results directory: a run's staging area, and the previous
# results while they are being replaced (see staged_results_dir).
STAGING_INFIX = ".staging-"
OLD_INFIX = ".old-"
_TOKEN_BYTES = 4

CPU_SLUG = "cpu"
# Fewer than two samples has no spread, hence no CV and no confidence (attnproto.lab's rule).
MIN_TIMING_SAMPLES = _lab.MIN_SAMPLES
_RECORD_ID_HASH_HEX_CHARS = 12
_GIT_TIMEOUT_S = 5.0
EXPERIMENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_TIMING_REQUIRED = ("median_ms", "p10_ms", "p90_ms", "cv")
_RECORD_KEYS = ("id", "experiment", "config", "metrics", "timing", "device",
                "backend", "driver", "commit", "date")
# Which device of the machine measured the record: {"index": the GPU's index on its host (None
# on the CPU backend), "uuid": the GPU's UUID ("cpu" on the CPU backend)}. Written by every run
# (serial or sharded over GPUs, attnproto.shard); records written before it existed lack it.
GPU_KEY = "gpu"
_GPU_FIELDS = ("index", "uuid")


class RecordError(ValueError):
    """A sweep record, or the relation between records and findings, is invalid."""


def timing_from_samples(samples_ms: Sequence[float], clock: str = "host") -> dict[str, Any]:
    """Per-iteration times (ms) as a record's timing dict: :func:`attnproto.lab.timing`'s
    median, p10, p90, mean and cv (sample std, ddof=1, over the mean), plus n and the samples.

    ``clock``: "host" (perf_counter samples) or "device" (GPU timestamps: the lab's
    watchdog sees them)."""
    try:
        stats = _lab.timing(samples_ms, clock=clock)
    except ValueError as exc:
        raise RecordError(str(exc).replace("samples_ms: ", "samples_ms ")) from None
    return {"median_ms": stats.median_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms, "mean_ms": stats.mean_ms,
            "cv": stats.cv, "n": stats.n, "samples_ms": list(stats.samples_ms)}


def timing_to_dict(stats: Any) -> dict[str, Any]:
    """Normalise a TimingStats-like object or a dict to the record's timing dict.

    Required fields: median_ms, p10_ms, p90_ms, cv; optional: mean_ms,
    samples_ms (``n`` is derived from it).
    """
    def get(name: str) -> Any:
        if isinstance(stats, Mapping):
            return stats.get(name)
        return getattr(stats, name, None)

    out: dict[str, Any] = {}
    for name in _TIMING_REQUIRED:
        value = get(name)
        if value is None:
            raise RecordError(f"timing is missing {name!r} (got {type(stats).__name__})")
        out[name] = float(value)
    mean = get("mean_ms")
    if mean is not None:
        out["mean_ms"] = float(mean)
    samples = get("samples_ms")
    if samples is not None:
        out["samples_ms"] = [float(x) for x in samples]
        out["n"] = len(out["samples_ms"])
    elif get("n") is not None:
        out["n"] = int(get("n"))
    for name, value in out.items():
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise RecordError(f"timing {name} must be finite and >= 0, got {value!r}")
    if not out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]:
        raise RecordError(f"timing must satisfy p10 <= median <= p90, got {out['p10_ms']}, {out['median_ms']}, {out['p90_ms']}")
    return out


def record_id(experiment: str, config: Mapping[str, Any], device: str, backend: str) -> str:
    """Deterministic record id from (experiment, config, device, backend)."""
    key = canonical_json([experiment, dict(config), device, backend])
    return f"{experiment}/{hashlib.sha256(key.encode('utf-8')).hexdigest()[:_RECORD_ID_HASH_HEX_CHARS]}"


def make_record(
    *,
    experiment: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
    timing: Any,
    device: str,
    backend: str,
    driver: str,
    commit: str,
    date: str | None = None,
    gpu: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one validated sweep record (see module doc); ``timing`` is TimingStats-like;
    ``gpu``: which device measured it (:data:`GPU_KEY`)."""
    record = {
        "id": record_id(experiment, config, device, backend),
        "experiment": experiment,
        "config": dict(config),
        "metrics": dict(metrics),
        "timing": timing_to_dict(timing),
        "device": device,
        "backend": backend,
        "driver": driver,
        "commit": commit,
        "date": utc_now_iso() if date is None else date,
    }
    if gpu is not None:
        record[GPU_KEY] = dict(gpu)
    return validate_record(record)


def _check_gpu(gpu: Any) -> dict[str, Any]:
    if not isinstance(gpu, Mapping) or set(gpu) != set(_GPU_FIELDS):
        raise RecordError(f"record gpu must be a dict with exactly {list(_GPU_FIELDS)}, got {gpu!r}")
    index, uuid = gpu["index"], gpu["uuid"]
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise RecordError(f"record gpu index must be a non-negative int or None, got {index!r}")
    if not isinstance(uuid, str) or not uuid:
        raise RecordError(f"record gpu uuid must be a non-empty string, got {uuid!r}")
    return {"index": index, "uuid": uuid}


def validate_record(record: Any) -> dict[str, Any]:
    """Validate a record dict (keys, types, finite metrics, id); return it normalised."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a dict, got {type(record).__name__}")
    missing = set(_RECORD_KEYS) - set(record)
    unknown = set(record) - set(_RECORD_KEYS) - {GPU_KEY}
    if missing or unknown:
        raise RecordError(f"record keys: missing {sorted(missing)}, unknown {sorted(unknown)}")
    for key in ("experiment", "device", "backend", "driver", "commit", "date"):
        if not isinstance(record[key], str) or not record[key]:
            raise RecordError(f"record {key} must be a non-empty string, got {record[key]!r}")
    if record["backend"] not in BACKENDS:
        raise RecordError(f"record backend {record['backend']!r} is not one of {BACKENDS}")
    if not isinstance(record["config"], Mapping):
        raise RecordError("record config must be a dict")
    try:
        canonical_json(dict(record["config"]))
        metrics = validate_metrics(record["metrics"], field="metrics")
    except FindingError as exc:
        raise RecordError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise RecordError(f"record config must be JSON-serialisable without NaN/inf: {exc}") from None
    out = dict(record)
    out["config"] = dict(record["config"])
    out["metrics"] = metrics
    out["timing"] = timing_to_dict(record["timing"])
    expected = record_id(out["experiment"], out["config"], out["device"], out["backend"])
    if out["id"] != expected:
        raise RecordError(f"record id {out['id']!r} does not match its content (expected {expected!r})")
    checked = {key: out[key] for key in _RECORD_KEYS}
    if GPU_KEY in record:
        checked[GPU_KEY] = _check_gpu(record[GPU_KEY])
    return checked


def check_findings_against_records(findings: Iterable[Finding], records: Iterable[Mapping[str, Any]]) -> None:
    """Enforce that measured findings rest on records of their own device and backend.

    Every measured finding must cite at least one record; every cited record
    must be present and share the finding's device and backend (so CPU timings
    never back a GPU finding).  Raises :class:`RecordError`.
    """
    by_id = {rec["id"]: rec for rec in records}
    for f in findings:
        if f.source != "measured":
            continue
        if not f.records:
            raise RecordError(f"measured finding {f.id!r} cites no records")
        for rid in f.records:
            rec = by_id.get(rid)
            if rec is None:
                raise RecordError(f"finding {f.id!r} cites unknown record {rid!r}")
            if rec["backend"] != f.backend or rec["device"] != f.device:
                raise RecordError(
                    f"finding {f.id!r} ({f.backend} on {f.device!r}) cites record {rid!r} "
                    f"measured with {rec['backend']} on {rec['device']!r}; findings may only cite "
                    "records of their own backend and device"
                )


def device_slug(backend: str, device_name: str | None) -> str:
    """Directory name of a device: GPU name slug, or ``cpu[-<model slug>]`` for CPU runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    name_slug = slugify(device_name or "")
    if backend == "cpu":
        if not name_slug or name_slug == CPU_SLUG:
            return CPU_SLUG
        return name_slug if name_slug.startswith(CPU_SLUG + "-") else f"{CPU_SLUG}-{name_slug}"
    if not name_slug:
        raise ValueError(f"a {backend} result needs a device name to name its directory")
    if name_slug == CPU_SLUG or name_slug.startswith(CPU_SLUG + "-"):
        raise ValueError(f"{backend} device name {device_name!r} would collide with CPU result directories")
    return name_slug


def results_dir(out: str | os.PathLike[str], backend: str, device_name: str | None, experiment: str) -> Path:
    """``<out>/<device-slug>/<experiment>``."""
    if not isinstance(experiment, str) or not EXPERIMENT_NAME_RE.fullmatch(experiment):
        raise ValueError(f"experiment name {experiment!r} must match {EXPERIMENT_NAME_RE.pattern}")
    return Path(out) / device_slug(backend, device_name) / experiment


def default_out_dir(backend: str) -> Path:
    """Default results root: ``results/`` (cwd) for GPU backends.

    CPU runs are not committed results, so by default they go to
    ``$XDG_STATE_HOME/attnproto/results`` (``~/.local/state/attnproto/results``);
    pass ``--out results`` to put them under ``results/cpu-*/`` on purpose.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend != "cpu":
        return Path("results")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "attnproto" / "results"


def git_commit(start: str | os.PathLike[str] | None = None) -> str:
    """Git sha of the code that runs, or "unknown".

    ``$ATTNPROTO_COMMIT`` wins (a GPU machine that receives a copy of the tree without
    its .git is told the sha by the command that ships it: tools/device_run.sh);
    otherwise the repository holding ``start`` (default: this package's source, then
    the current directory).
    """
    env = os.environ.get("ATTNPROTO_COMMIT", "").strip()
    if env:
        return env
    if start is None:
        sha = git_commit(Path(__file__).resolve().parent)
        return sha if sha != "unknown" else git_commit(Path.cwd())
    where = Path(start)
    try:
        proc = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--verify", "HEAD"],
            capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and sha else "unknown"


def git_dirty(start: str | os.PathLike[str] | None = None) -> bool | None:
    """Whether the work tree differs from HEAD, untracked files included (None when git cannot tell).

    ``$ATTNPROTO_DIRTY`` ("0"/"1") wins, for the same reason as ``$ATTNPROTO_COMMIT``.
    """
    env = os.environ.get("ATTNPROTO_DIRTY", "").strip()
    if env in ("0", "1"):
        return env == "1"
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain"],
            capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(proc.stdout.strip()) if proc.returncode == 0 else None


def make_run_info(
    *,
    backend: str,
    device: Mapping[str, Any],
    driver: str,
    commit: str,
    argv: Sequence[str] | None = None,
    quick: bool,
    seed: int,
    date: str | None = None,
) -> dict[str, Any]:
    """The ``run.json`` payload."""
    import platform  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    args = list(sys.argv if argv is None else argv)
    return {
        "backend": backend,
        "device": dict(device),
        "driver": driver,
        "commit": commit,
        "commit_dirty": git_dirty() if commit != "unknown" else None,
        "date": utc_now_iso() if date is None else date,
        "command_line": shlex.join(args),
        "argv": args,
        "quick": bool(quick),
        "seed": int(seed),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class ResultPaths:
    """Where one experiment's results live once committed, and how its findings merged."""

    directory: Path
    records: Path
    findings: Path
    history: Path
    run: Path
    merge: FindingsMerge


def _validated_run(experiment: str, backend: str, records: Sequence[Mapping[str, Any]],
                   findings: Sequence[Finding]) -> list[dict[str, Any]]:
    checked = [validate_record(rec) for rec in records]
    for rec in checked:
        if rec["backend"] != backend or rec["experiment"] != experiment:
            raise RecordError(
                f"record {rec['id']!r} is {rec['experiment']}/{rec['backend']}, "
                f"but this run is {experiment}/{backend}"
            )
    check_findings_against_records(findings, checked)
    return checked


def read_previous_findings(directory: str | os.PathLike[str]) -> tuple[list[Finding], list[Finding]]:
    """The live findings and the history of an existing results directory ([] for absent files).

    Strict: a bad line raises :class:`RecordError` naming file and line (the run
    must not replace a file it cannot read: its content would be lost).
    """
    directory = Path(directory)
    out: list[list[Finding]] = []
    for name in (FINDINGS_FILE, HISTORY_FILE):
        path = directory / name
        if not path.exists():
            out.append([])
            continue
        try:
            out.append(read_findings(path))
        except (FindingError, OSError) as exc:
            raise RecordError(f"previous results cannot be merged: {exc}; fix or delete that line "
                              f"(or move {directory} away) and run again") from None
    return out[0], out[1]


def write_results(
    directory: str | os.PathLike[str],
    *,
    experiment: str,
    backend: str,
    records: Sequence[Mapping[str, Any]],
    findings: Sequence[Finding],
    run_info: Mapping[str, Any],
    previous: str | os.PathLike[str] | None = None,
) -> FindingsMerge:
    """Validate one run and write records.jsonl, findings.jsonl, findings_history.jsonl
    (when there is history) and run.json into ``directory`` (normally a staging directory).

    ``previous`` is the results directory this run replaces: its findings are merged
    (:func:`attnproto.findings.merge_findings`) by the run's date and commit.
    """
    checked = _validated_run(experiment, backend, records, findings)
    old_live, old_history = read_previous_findings(previous) if previous is not None else ([], [])
    try:
        merge = merge_findings(old_live, findings, history=old_history, timestamp=run_info.get("date"),
                               commit=str(run_info.get("commit") or "unknown"))
    except FindingError as exc:
        raise RecordError(str(exc)) from None
    directory = Path(directory)
    lines = "".join(json.dumps(rec, allow_nan=False, separators=(",", ":")) + "\n" for rec in checked)
    atomic_write_text(directory / RECORDS_FILE, lines)
    write_merged_findings(directory, merge)
    info = dict(run_info)
    info["experiment"] = experiment
    atomic_write_text(directory / RUN_FILE, json.dumps(info, indent=2, allow_nan=False, sort_keys=True) + "\n")
    return merge


def write_merged_findings(directory: str | os.PathLike[str], merge: FindingsMerge) -> None:
    """Write a merge's live findings to ``findings.jsonl`` and its history to ``findings_history.jsonl``
    (removed when there is none), each atomically; nothing else in ``directory`` is touched."""
    directory = Path(directory)
    write_findings(directory / FINDINGS_FILE, merge.live)
    history = directory / HISTORY_FILE
    if merge.history:
        write_findings(history, merge.history)
    else:
        history.unlink(missing_ok=True)


@contextlib.contextmanager
def results_lock(final: str | os.PathLike[str]) -> Iterator[None]:
    """The lock a run holds on ``final``'s device directory from its merge to its swap
    (:class:`StagedResults`): hold it to update ``final``'s findings in place."""
    with _dir_lock(Path(final).parent):
        yield


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive flock on a directory (POSIX; a no-op elsewhere): one merge-and-swap at a time."""
    try:
        import fcntl  # noqa: PLC0415  (POSIX only)
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)          # closing releases the lock


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                  # not every platform can fsync a directory
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class StagedResults:
    """The staging directory of one run; see :func:`staged_results_dir`."""

    def __init__(self, final: Path, path: Path) -> None:
        self.final = final
        self.path = path
        self.merge: FindingsMerge | None = None
        self._lock: contextlib.ExitStack | None = None

    def write_results(self, *, experiment: str, backend: str, records: Sequence[Mapping[str, Any]],
                      findings: Sequence[Finding], run_info: Mapping[str, Any]) -> FindingsMerge:
        """:func:`write_results` into the staging directory, merged with the current final one.

        Takes the lock of the device directory and holds it until the swap, so a
        concurrent run's results cannot be lost between the merge and the swap.
        """
        if self._lock is None:
            self._lock = contextlib.ExitStack()
            self._lock.enter_context(_dir_lock(self.final.parent))
        self.merge = write_results(self.path, experiment=experiment, backend=backend, records=records,
                                   findings=findings, run_info=run_info, previous=self.final)
        return self.merge

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def commit(self) -> None:
        """Swap the staging directory in for the final one (called by the context manager)."""
        if self.merge is None:
            raise RecordError(f"{self.path}: the run's results were never written; {self.final} left unchanged")
        final, old = self.final, None
        if final.exists() or final.is_symlink():
            old = final.with_name(final.name + OLD_INFIX + self.path.name.rsplit(STAGING_INFIX, 1)[1])
            os.rename(final, old)
            # A crash here leaves no `final`: the previous results are complete in `old`
            # (rename it back to recover them) and the new ones complete in `self.path`
            # (rename that to `final` to keep them instead); `attnproto run` warns about
            # such leftovers (leftover_result_dirs).
        try:
            os.rename(self.path, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)       # put the previous results back
            raise
        _fsync_dir(final.parent)
        if old is not None:
            _remove(old)                    # a crash here only leaves `old` behind, to delete


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            pass
    return created


@contextlib.contextmanager
def staged_results_dir(final: str | os.PathLike[str]) -> Iterator[StagedResults]:
    """Stage a run's results beside ``final`` and swap them in only if the block succeeds.

    Yields a :class:`StagedResults`: the experiment writes its artefacts into
    ``.path`` (``<final>.staging-<random>``, next to ``final``), then the block
    calls ``.write_results(...)``.  On normal exit the previous ``final`` is
    renamed aside (``<final>.old-<random>``), the staging directory renamed to
    ``final`` and the old one deleted.  On any exception (KeyboardInterrupt
    included), or if ``.write_results`` was never called, the staging directory
    is removed, directories created for it are removed again, ``final`` is left
    byte for byte as it was, and the exception propagates.
    """
    final = Path(final)
    created = _make_dirs(final.parent)
    while True:
        path = final.with_name(final.name + STAGING_INFIX + secrets.token_hex(_TOKEN_BYTES))
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
        except BaseException:
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
    stage = StagedResults(final, path)
    try:
        yield stage
        stage.commit()
    except BaseException:
        _remove(path)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()                   # only if still empty
        raise
    finally:
        stage._release()


def leftover_result_dirs(final: str | os.PathLike[str]) -> list[Path]:
    """Staging / old directories beside ``final`` left by an interrupted (or a concurrent) run."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(p for infix in (STAGING_INFIX, OLD_INFIX) for p in final.parent.glob(final.name + infix + "*"))


def write_experiment_results(
    out: str | os.PathLike[str],
    *,
    experiment: str,
    backend: str,
    device_name: str | None,
    records: Sequence[Mapping[str, Any]],
    findings: Sequence[Finding],
    run_info: Mapping[str, Any],
) -> ResultPaths:
    """Write one experiment's results to ``<out>/<device>/<experiment>``, replacing the
    previous ones as a whole (staged, merged, swapped in; see :func:`staged_results_dir`).

    Artefacts of the previous run that are not among the four files are dropped with
    it; a run whose experiment writes artefacts should use :func:`staged_results_dir`.
    """
    _validated_run(experiment, backend, records, findings)
    directory = results_dir(out, backend, device_name, experiment)
    with staged_results_dir(directory) as stage:
        merge = stage.write_results(experiment=experiment, backend=backend, records=records,
                                    findings=findings, run_info=run_info)
    return ResultPaths(directory, directory / RECORDS_FILE, directory / FINDINGS_FILE,
                       directory / HISTORY_FILE, directory / RUN_FILE, merge)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a records.jsonl file."""
    path = Path(path)
    out = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(validate_record(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
            except RecordError as exc:
                raise RecordError(f"{path}:{lineno}: {exc}") from None
    return out

