"""``attnproto`` command line: info, list, run, report [--html], synthesize, leakcheck, kernels,
explain-kernel, kb add|query|stats|list|show|validate|rederive|rm.

Exit status: 0 success; 1 an experiment or the store failed, or ``kb add`` met
bad lines (it still imports the good ones); 2 bad usage (unknown experiment or
backend, unavailable backend, a missing input file or findings database, an
unknown finding id).  Errors are one line on stderr, never a traceback, unless
the failure is a bug.

``run`` writes each experiment's results into a staging directory and swaps it
in for the previous results only when the experiment completed
(:func:`attnproto.records.staged_results_dir`); ``run --gpus N|all`` / ``--scheduler ADDRESS``
runs an experiment's independent points on Dask workers (:mod:`attnproto.shard`); only ``run`` and ``kb add``
create a findings database, the other ``kb`` commands never do.
"""
from __future__ import annotations

import argparse
import json
import re
import platform
import sys
import time
import traceback
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from . import backend as _backend
from . import lab
from .findings import BACKENDS, Finding, FindingError, FindingsMerge, fmt_pct, read_findings_lenient
from .records import (
    HISTORY_FILE,
    STAGING_INFIX,
    RecordError,
    default_out_dir,
    git_commit,
    leftover_result_dirs,
    make_run_info,
    read_previous_findings,
    results_dir,
    staged_results_dir,
)
from .report import format_table, progress_bar
from .store import DEFAULT_QUERY_LIMIT, FindingStore, MissingDatabaseError, StoreError, default_db_path

__all__ = ["BackendStatus", "CLIError", "backend_statuses", "build_parser", "main", "resolve_backend"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
AUTO = "auto"
PROG = "attnproto"
DEFAULT_SEED = 0
# Backends tried by --backend auto when attnproto.backend.best_backend cannot say, best first.
AUTO_ORDER = _backend.PREFERENCE
# The reason column of explain-kernel's family table is cut to this many characters.
EXPLAIN_CELL_WIDTH = 110
# Title/claim columns are cut to this many characters in kb query tables.
QUERY_CELL_WIDTH = 72


class CLIError(Exception):
    """A usage error: reported as one line, exit status 2."""


BackendStatus = _backend.BackendStatus
cpu_status = _backend.cpu_status


def _to_status(obj: Any) -> BackendStatus:
    try:
        name = obj.name
        available = bool(obj.available)
    except AttributeError as exc:
        raise CLIError(f"attnproto.backend.list_backends() returned an object without {exc.name!r}") from None
    info = getattr(obj, "info", None) or {}
    return BackendStatus(str(name), available, str(getattr(obj, "reason", "") or ""), dict(info))


def backend_statuses() -> tuple[list[BackendStatus], str | None]:
    """All backends with availability; the note says why the native core is missing, if it is."""
    try:
        from . import backend as backend_mod  # noqa: PLC0415  (native core may be absent)

        statuses = [_to_status(b) for b in backend_mod.list_backends()]
    except ImportError as exc:
        return [cpu_status()], f"native core not built ({exc})"
    by_name = {s.name: s for s in statuses}
    if "cpu" not in by_name:
        statuses.insert(0, cpu_status())
    elif not by_name["cpu"].info:
        by_name["cpu"].info = cpu_status().info
    return statuses, None


def device_name(status: BackendStatus) -> str:
    for key in ("name", "device_name", "device"):
        value = status.info.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    if status.name == "cpu":
        return "cpu"
    raise CLIError(f"backend {status.name} reports no device name in its info {sorted(status.info)}")


def driver_of(status: BackendStatus) -> str:
    for key in ("driver", "driver_version"):
        value = status.info.get(key)
        if value not in (None, ""):
            return str(value)
    if status.name == "cpu":
        import numpy as np  # noqa: PLC0415

        return f"numpy {np.__version__}"
    return "unknown"


def resolve_backend(requested: str) -> BackendStatus:
    """The status of the backend to run on; ``auto`` = best available (cuda, metal, cpu)."""
    if requested != AUTO and requested not in BACKENDS:
        raise CLIError(f"unknown backend {requested!r}; choose from {', '.join(BACKENDS + (AUTO,))}")
    statuses, note = backend_statuses()
    by_name = {s.name: s for s in statuses}
    if requested == AUTO:
        fallback = next((n for n in AUTO_ORDER if n in by_name and by_name[n].available), "cpu")
        chosen: str | None = fallback
        if note is None:
            try:
                from . import backend as backend_mod  # noqa: PLC0415

                best = backend_mod.best_backend()
                chosen = best if isinstance(best, str) else getattr(best, "name", None)
            except ImportError:
                chosen = fallback
        if chosen not in by_name:
            raise CLIError(f"attnproto.backend.best_backend() chose {chosen!r}, which list_backends() does not list")
        return by_name[chosen]
    status = by_name.get(requested)
    if status is None:
        raise CLIError(f"backend {requested} is not available: {note or 'not listed by attnproto.backend'}")
    if not status.available:
        raise CLIError(f"backend {requested} is not available: {status.reason or 'no reason given'}")
    return status


# ----------------------------------------------------------------- commands
def _print_info_dict(info: Mapping[str, Any], indent: str = "    ") -> None:
    for key in sorted(info):
        value = info[key]
        if isinstance(value, Mapping):
            print(f"{indent}{key}:")
            _print_info_dict(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def cmd_info(args: argparse.Namespace) -> int:
    statuses, note = backend_statuses()
    print(f"attnproto {__version__} (python {platform.python_version()})")
    if note:
        print(note)
    rows = [{"backend": s.name, "available": s.available, "reason": s.reason or "-"} for s in statuses]
    print(format_table(rows, ["backend", "available", "reason"]))
    for s in statuses:
        if s.available and s.info:
            print(f"\n{s.name}:")
            _print_info_dict(s.info)
    return EXIT_OK


def _experiments_module():
    from . import experiments  # noqa: PLC0415  (imports every experiment module)

    return experiments


def cmd_list(args: argparse.Namespace) -> int:
    exps = _experiments_module().all_experiments()
    rows = [{"experiment": e.name, "prototype": e.prototype, "backends": ",".join(e.backends),
             "description": e.description} for e in exps]
    print(format_table(rows, ["experiment", "prototype", "backends", "description"]))
    if args.verbose:
        for e in exps:
            print(f"\n{e.name}:\n{e.doc}")
    return EXIT_OK


def _record_tables(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One table per distinct set of config keys (e.g. per op), timing columns last."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for rec in records:
        groups.setdefault(tuple(rec["config"]), []).append(rec)
    tables = []
    timing_columns = ["median_ms", "p10_ms", "p90_ms", "cv"]
    for config_keys, recs in groups.items():
        metric_keys: dict[str, None] = {}
        rows = []
        for rec in recs:
            row = dict(rec["config"])
            row.update(rec["metrics"])
            metric_keys.update(dict.fromkeys(rec["metrics"]))
            row.update({key: rec["timing"][key] for key in timing_columns})
            rows.append(row)
        tables.append(format_table(rows, list(config_keys) + list(metric_keys) + timing_columns))
    return tables


ALL_GPUS = "all"
# Seconds to wait for an existing Dask scheduler (--scheduler) to answer.
SCHEDULER_CONNECT_TIMEOUT_S = 30


def _gpus_arg(text: str) -> str | int:
    if text == ALL_GPUS:
        return ALL_GPUS
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{ALL_GPUS}', got {text!r}") from exc


class _Shards:
    """The Dask client of a sharded run (--gpus / --scheduler) and what it runs on."""

    def __init__(self, client: Any, cluster: Any, description: str) -> None:
        self.client, self.cluster, self.description = client, cluster, description

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _check_shard_args(args: argparse.Namespace) -> None:
    """Usage errors of --gpus / --scheduler that need no backend (before anything is started)."""
    if args.gpus is None and args.scheduler is None:
        return
    if args.gpus is not None and args.scheduler is not None:
        raise CLIError("--gpus and --scheduler exclude each other: --gpus starts workers on this host's GPUs, "
                       "--scheduler uses the workers of an existing Dask cluster")
    from . import shard  # noqa: PLC0415

    flag = "--gpus" if args.gpus is not None else "--scheduler"
    try:
        shard.require_dask()
    except shard.DaskUnavailable as exc:
        raise CLIError(f"{flag}: {exc}") from None


def _start_shards(args: argparse.Namespace, backend: str) -> _Shards | None:
    """The Dask client for --gpus N|all (a local cluster, one worker per GPU) or --scheduler ADDRESS."""
    if args.gpus is None and args.scheduler is None:
        return None
    from distributed import Client  # noqa: PLC0415

    from . import shard  # noqa: PLC0415

    if args.scheduler is not None:
        try:
            client = Client(args.scheduler, timeout=SCHEDULER_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise CLIError(f"--scheduler {args.scheduler}: cannot connect: {exc}") from None
        return _Shards(client, None, f"Dask scheduler {args.scheduler}")
    if backend != "cuda":
        raise CLIError(f"--gpus shards over CUDA GPUs, but the backend is {backend}; to shard a {backend} run, "
                       "start a Dask cluster and pass --scheduler ADDRESS")
    count = shard.gpu_count()
    wanted = count if args.gpus == ALL_GPUS else args.gpus
    if wanted > count or wanted < 1:
        raise CLIError(f"--gpus {args.gpus}: this host has {_plural(count, 'CUDA GPU')} visible to torch")
    cluster, description = shard.cuda_cluster(list(range(wanted)))
    return _Shards(Client(cluster), cluster, description)


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415

    _check_shard_args(args)
    experiments = _experiments_module()
    status = resolve_backend(args.backend)
    backend = status.name
    if args.experiment == "all":
        exps = experiments.supporting(backend)
        if not exps:
            raise CLIError(f"no registered experiment supports backend {backend}")
    else:
        try:
            exp = experiments.get(args.experiment)
        except experiments.UnknownExperimentError as exc:
            raise CLIError(str(exc)) from None
        if not exp.supports(backend):
            raise CLIError(f"experiment {exp.name!r} does not support backend {backend} "
                           f"(supports: {', '.join(exp.backends)})")
        exps = [exp]

    name = device_name(status)
    driver = driver_of(status)
    commit = git_commit()
    out_root = Path(args.out) if args.out is not None else default_out_dir(backend)
    run_info = make_run_info(backend=backend, device=status.info, driver=driver, commit=commit,
                             argv=[PROG, *args.argv], quick=args.quick, seed=args.seed)
    from . import shard  # noqa: PLC0415

    shards = _start_shards(args, backend)
    store = None if args.no_kb else FindingStore(args.db)
    print(f"backend {backend} on {name} (driver {driver}, commit {commit[:12]})")
    if shards is not None:
        print(f"sharded over {shards.description}")
    failures = []
    summary_rows: list[dict[str, Any]] = []
    try:
        for exp in exps:
            started = time.perf_counter()
            row: dict[str, Any] = {"experiment": exp.name, "status": "failed", "records": None, "added": None,
                                   "superseded": None, "retired": None, "longest_dispatch_ms": None,
                                   "wall_s": None}
            summary_rows.append(row)
            runner, sharded = None, []
            if shards is not None and exp.points is None:
                print(f"attnproto: note: {exp.name} has no independent points (no points protocol): it runs "
                      "serially in this process, on one device, not on the Dask workers", file=sys.stderr)
            elif shards is not None:
                def runner(exp, ctx, sharded=sharded):
                    result, info = shard.run_sharded(exp, ctx, shards.client, cluster=shards.description,
                                                     progress=progress_bar)
                    sharded.append(info)
                    return result
            final = results_dir(out_root, backend, name, exp.name)
            for leftover in leftover_result_dirs(final):
                what = ("new results of a run that never completed" if STAGING_INFIX in leftover.name
                        else "previous results that were being replaced")
                print(f"attnproto: warning: {leftover} is left over from an interrupted or concurrent run "
                      f"({what}); check it and delete it", file=sys.stderr)
            try:
                # Check the previous findings before measuring: they are merged at the end,
                # and a file that cannot be read must not be replaced (nor an hour's run lost).
                read_previous_findings(final)
                with staged_results_dir(final) as stage:
                    ctx = experiments.ExperimentContext(
                        experiment=exp.name, backend=backend, device=dict(status.info), device_name=name,
                        driver=driver, commit=commit, quick=args.quick,
                        progress=lambda iterable=None, total=None, desc="": progress_bar(iterable, total=total,
                                                                                          desc=desc),
                        out_dir=stage.path,
                        rng=np.random.default_rng([args.seed, zlib.crc32(exp.name.encode("utf-8"))]),
                        extras={"full": bool(getattr(args, "full", False))},
                        seed=args.seed, gpu=shard.gpu_identity(backend),
                    )
                    result = experiments.run_experiment(exp, ctx, runner)
                    info = {**run_info, "longest_dispatch_ms": result.longest_dispatch_ms,
                            "watchdog_limit_ms": lab.WATCHDOG_MAX_DISPATCH_MS}
                    if sharded:
                        info["shard"] = sharded[0].summary()
                    merge = stage.write_results(experiment=exp.name, backend=backend, records=result.records,
                                                findings=result.findings, run_info=info)
                # Only here, with everything written, did the staging directory replace `final`.
            except (experiments.ExperimentError, RecordError, FindingError, OSError, shard.ShardError) as exc:
                kept = f"{final} is unchanged" if final.exists() else "no results written"
                print(f"attnproto: error: experiment {exp.name} failed: {exc} ({kept})", file=sys.stderr)
                failures.append(exp.name)
                row["wall_s"] = time.perf_counter() - started
                continue
            except Exception as exc:  # noqa: BLE001 - a bug in an experiment: one line, the results kept
                kept = f"{final} is unchanged" if final.exists() else "no results written"
                where = traceback.extract_tb(exc.__traceback__)[-1]
                print(f"attnproto: error: experiment {exp.name} failed: {type(exc).__name__}: {exc} "
                      f"(at {Path(where.filename).name}:{where.lineno}; {kept})", file=sys.stderr)
                failures.append(exp.name)
                row["wall_s"] = time.perf_counter() - started
                continue
            row.update(status="ok", records=len(result.records), added=len(merge.new), superseded=len(merge.changed),
                       retired=len(merge.retired), longest_dispatch_ms=result.longest_dispatch_ms,
                       wall_s=time.perf_counter() - started)
            print(f"\n== {exp.name} ({exp.prototype}) on {backend}: {len(result.records)} records")
            if result.summary:
                print(format_table(result.summary))
                print()
            else:
                for table in _record_tables(result.records):
                    print(table)
                    print()
            print(_findings_table(merge.live))
            if sharded:
                print(_shard_text(sharded[0]))
            print(f"results: {final}")
            print(f"findings: {_merge_summary(merge)}")
            if store is not None:
                res = store.add([*merge.live, *merge.retired_entries])
                print(f"kb: {_add_summary(res)} ({store.path})")
    finally:
        if store is not None:
            store.close()
        if shards is not None:
            shards.close()
    if len(exps) > 1:
        print(f"\n== run {args.experiment}: {len(exps)} experiments on {backend}")
        print(format_table(summary_rows, list(summary_rows[0]) if summary_rows else None))
    if failures:
        print(f"attnproto: {len(failures)} experiment(s) failed: {', '.join(failures)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _shard_text(info: Any) -> str:
    """Where a sharded run's points ran, and every point that was attempted more than once."""
    summary = info.summary()
    gpus = ", ".join(f"{g['index'] if g['index'] is not None else '-'} ({g['uuid']})" for g in summary["gpus"])
    lines = [f"sharded: {summary['points']} points on {summary['workers']} workers ({info.cluster}); devices: {gpus}"]
    if not info.retried:
        lines.append("retried: none")
    for r in info.retried:
        lines.append(f"retried: {r['key']}: {r['attempts']} attempts (started on {', '.join(r['workers']) or '?'}; "
                     f"workers lost while it was assigned: {r['workers_lost']}, retries after an error: "
                     f"{r['error_retries']})")
    for r in info.reassigned:
        lines.append(f"reassigned: {r['key']}: held by a worker that died before it started; ran once, on "
                     f"{', '.join(r['workers']) or '?'}")
    return "\n".join(lines)


def _findings_table(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no findings"
    return format_table([{"confidence": f.confidence, "title": f.title, "id": f.id} for f in findings],
                        ["confidence", "title", "id"])


def _merge_summary(merge: FindingsMerge) -> str:
    text = (f"{len(merge.live)} live in findings.jsonl ({len(merge.new)} new, {len(merge.changed)} superseding "
            f"an earlier version, {len(merge.unchanged)} unchanged)")
    if merge.retired:
        text += f"; {len(merge.retired)} retired (not produced again)"
    if merge.history:
        text += f"; {_plural(len(merge.history), 'earlier version')} in {HISTORY_FILE}"
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _add_summary(res: Any) -> str:
    return f"{res.added} added, {res.superseded} superseded, {res.unchanged} unchanged"


def _existing_store(db: Path | None) -> FindingStore:
    """The findings database for a read (or rm): never created; missing -> usage error."""
    try:
        return FindingStore(db, create=False)
    except MissingDatabaseError as exc:
        raise CLIError(str(exc)) from None


def cmd_kb_add(args: argparse.Namespace) -> int:
    for path in args.files:
        if not Path(path).exists():
            raise CLIError(f"no such findings file: {path}")
    read = []
    bad = 0
    for path in args.files:
        findings, errors = read_findings_lenient(path)
        for err in errors:
            print(f"attnproto: error: {err}", file=sys.stderr)
        bad += len(errors)
        read.append((path, findings, errors))
    with FindingStore(args.db) as store:
        for path, findings, errors in read:
            if any(err.line is None for err in errors):
                print(f"{path}: not imported")
                continue
            text = f"{path}: {_add_summary(store.add(findings))}"
            if errors:
                text += f"; {_plural(len(errors), 'bad line')} skipped"
            print(text)
        print(f"kb: {_plural(len(store), 'live finding')}, {_plural(store.history_count(), 'superseded version')} "
              f"in {store.path}")
    return EXIT_FAILED if bad else EXIT_OK


_LIST_COLUMNS = ["confidence", "prototype", "backend", "device", "title", "id"]


def _list_rows(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [{"confidence": f.confidence, "prototype": f.prototype, "backend": f.backend, "device": f.device,
             "title": f.title, "id": f.id} for f in findings]


def _pairs(mapping: Mapping[str, Any]) -> list[str]:
    """``key = value`` per entry, values exact (strings bare, everything else as JSON)."""
    return [f"{key} = {value if isinstance(value, str) else json.dumps(value)}" for key, value in mapping.items()]


def cmd_kb_query(args: argparse.Namespace) -> int:
    text = " ".join(args.text)
    with _existing_store(args.db) as store:
        try:
            hits = store.query(text, limit=args.limit)
        except StoreError as exc:
            raise CLIError(str(exc)) from None
    if args.json:
        for f in hits:
            print(f.to_json())
        return EXIT_OK
    if not hits:
        print(f"no findings match {text!r}")
        return EXIT_OK
    print(format_table(_list_rows(hits), _LIST_COLUMNS, max_width=QUERY_CELL_WIDTH))
    if args.long:
        for f in hits:
            print(f"\n{f.id}\n  {f.claim}")
            for line in _pairs(f.evidence):
                print(f"  {line}")
            if f.answer:
                print(f"  answer: {'; '.join(_pairs(f.answer))}")
            if f.citation:
                print(f"  citation: {f.citation}")
    return EXIT_OK


def cmd_kb_stats(args: argparse.Namespace) -> int:
    with _existing_store(args.db) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"database: {stats['path']} (SQLite {stats['sqlite_version']}, schema {stats['schema_version']})")
    print(f"search:   {stats['search']}")
    print(f"findings: {stats['total']}")
    print(f"history:  {stats['history']} superseded versions")
    for key in ("prototype", "device", "backend", "confidence", "source"):
        counts = stats[f"by_{key}"]
        if counts:
            print()
            print(format_table([{key: k, "count": v} for k, v in counts.items()], [key, "count"]))
    return EXIT_OK


def cmd_kb_list(args: argparse.Namespace) -> int:
    with _existing_store(args.db) as store:
        found = store.list(prototype=args.prototype)
        path = store.path
    if args.json:
        for f in found:
            print(f.to_json())
        return EXIT_OK
    if not found:
        of = f" of prototype {args.prototype!r}" if args.prototype else ""
        print(f"no findings{of} in {path}")
        return EXIT_OK
    print(format_table(_list_rows(found), _LIST_COLUMNS, max_width=QUERY_CELL_WIDTH))
    print(_plural(len(found), "finding"))
    return EXIT_OK


def _finding_text(f: Finding, indent: str = "") -> list[str]:
    lines = [f"id:         {f.id}",
             f"title:      {f.title}",
             f"claim:      {f.claim}",
             f"prototype:  {f.prototype}",
             f"device:     {f.device} ({f.backend})",
             f"confidence: {f.confidence}" + (f" (cv {fmt_pct(f.cv)})" if f.cv is not None else ""),
             f"source:     {f.source}"]
    if f.citation:
        lines.append(f"citation:   {f.citation}")
    for label, mapping in (("config", f.config), ("answer", f.answer), ("evidence", f.evidence)):
        lines.append(f"{label}:" + ("" if mapping else "     -"))
        lines.extend(f"  {pair}" for pair in _pairs(mapping))
    lines.append(f"records:    {', '.join(f.records) if f.records else '-'}")
    lines.append(f"commit:     {f.commit}")
    lines.append(f"timestamp:  {f.timestamp}")
    if f.superseded is not None:
        m = f.superseded
        lines.append(f"superseded: {m['at']} by the version/run of {m['by_timestamp']} (commit {m['by_commit'][:12]})")
        lines.append(f"  reason:   {m['reason']}")
    return [indent + line for line in lines]


def cmd_kb_show(args: argparse.Namespace) -> int:
    with _existing_store(args.db) as store:
        live = store.get(args.id)
        history = store.history(args.id)
        path = store.path
    if live is None and not history:
        raise CLIError(f"no finding with id {args.id!r} in {path}")
    if args.json:
        for f in ([live] if live is not None else []) + history:
            print(f.to_json())
        return EXIT_OK
    if live is not None:
        print("\n".join(_finding_text(live)))
    else:
        print(f"{args.id}: no live finding (every stored version is superseded)")
    print(f"\nhistory: {_plural(len(history), 'superseded version')}")
    for i, f in enumerate(history, start=1):
        print(f"\n[{i}]")
        print("\n".join(_finding_text(f, indent="  ")))
    return EXIT_OK


def cmd_kb_rm(args: argparse.Namespace) -> int:
    with _existing_store(args.db) as store:
        live, history = store.remove(args.id)
        path = store.path
    if not live and not history:
        raise CLIError(f"no finding with id {args.id!r} in {path}")
    print(f"removed {args.id}: {_plural(live, 'live finding')}, {_plural(history, 'superseded version')} ({path})")
    return EXIT_OK


def cmd_kernels(args: argparse.Namespace) -> int:
    """List, compile (check) or precompile (fill the archive) every CUDA specialisation."""
    from . import kernels  # noqa: PLC0415

    specs = kernels.all_specialisations()
    if args.match:
        from .backend import native  # noqa: PLC0415

        try:
            pattern = re.compile(args.match)
        except re.error as exc:
            raise CLIError(f"--match: not a regular expression: {exc}") from None
        specs = [(n, c) for n, c in specs if pattern.search(native().kernel_key(n, c))]
        if not specs:
            raise CLIError(f"--match: no specialisation's kernel key matches {args.match!r}")
    if args.action == "list":
        from .backend import native  # noqa: PLC0415

        nat = native()
        for name, consts in specs:
            print(nat.kernel_key(name, consts))
        return EXIT_OK
    fn = kernels.precompile if args.action == "precompile" else kernels.compile_all
    with progress_bar(None, total=len(specs), desc=f"{args.action} ({args.arch})") as bar:
        rows = fn(arch=args.arch, specs=specs, jobs=args.jobs, progress=lambda done, total: bar.update(1))
    failed = [r for r in rows if not r["ok"]]
    table = [{"kernel": r["kernel"], "ok": r["ok"], "origin": r["origin"], "ms": r["ms"]} for r in rows]
    print(format_table(table, ["kernel", "ok", "origin", "ms"]))
    for r in failed:
        print(f"\nFAILED {r['kernel']}:\n{r['log']}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} compiled, {len(failed)} failed ({args.arch})")
    return EXIT_FAILED if failed else EXIT_OK


def report_text(directory: Path) -> str:
    """The summary table of one result directory (results/<device>/<experiment>).

    Built only from its records.jsonl: by the experiment's own ``summary_table``
    when it has one and it yields rows for these records, otherwise (e.g. a CPU
    run the summary does not cover) one table per config shape of the records;
    never a table without rows.  README tables are this text (tools/update_readme.py).
    """
    from .records import read_records  # noqa: PLC0415

    directory = Path(directory)
    path = directory / "records.jsonl"
    if not path.is_file():
        raise CLIError(f"{path}: no records (expected results/<device>/<experiment>/records.jsonl)")
    records = read_records(path)
    if not records:
        raise CLIError(f"{path}: empty")
    exp = records[0]["experiment"]
    header = (f"{exp} on {records[0]['device']} ({records[0]['backend']}, driver {records[0]['driver']}), "
              f"commit {records[0]['commit'][:12]}, {records[0]['date'][:10]}; {len(records)} records")
    summary_table = getattr(_experiment_module(exp), "summary_table", None)
    rows, note = [], ""
    if summary_table is not None:
        try:
            rows = summary_table(records)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
            # A summary written for other records (another backend's): show the records instead, and say so.
            note = f"\n({exp}.summary_table failed on these records: {type(exc).__name__}: {exc}; the records:)"
    if rows:
        return header + "\n" + format_table(rows)
    return header + note + "\n" + "\n\n".join(_record_tables(records))


def _experiment_module(name: str) -> Any:
    """The module holding experiment ``name``'s ``summary_table``: ``attnproto.experiments.<name>``
    (a module or a package) when it exists, else the module that registered it; None if neither."""
    import importlib  # noqa: PLC0415

    experiments = _experiments_module()
    try:
        exp = experiments.get(name)
    except experiments.UnknownExperimentError:
        return None
    candidates = []
    full = f"{experiments.__name__}.{name}"
    try:
        candidates.append(importlib.import_module(full))
    except ModuleNotFoundError as exc:
        if exc.name != full:
            raise
    candidates.append(sys.modules.get(exp.func.__module__))
    return next((m for m in candidates if m is not None and hasattr(m, "summary_table")), candidates[-1])


def cmd_generate(args: argparse.Namespace) -> int:
    from .integrations.generate import main as generate_main  # noqa: PLC0415

    return generate_main(args)


def cmd_report(args: argparse.Namespace) -> int:
    if args.html:
        from . import html_report  # noqa: PLC0415

        try:
            path = html_report.write_html(args.directory, args.out)
        except (FileNotFoundError, RuntimeError) as exc:
            raise CLIError(str(exc)) from None
        print(f"wrote {path}")
        return EXIT_OK
    if args.out is not None:
        raise CLIError("--out: only with --html (the text report goes to stdout)")
    print(report_text(Path(args.directory)))
    return EXIT_OK


def cmd_kb_validate(args: argparse.Namespace) -> int:
    from . import kb_validate  # noqa: PLC0415

    try:
        report = kb_validate.validate(args.dirs or ["results"])
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    print(kb_validate.format_report(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_kb_rederive(args: argparse.Namespace) -> int:
    """The findings of committed results computed again from their records (attnproto.rederive)."""
    from . import rederive  # noqa: PLC0415

    try:
        outcomes = rederive.rederive(args.dirs or rederive.default_dirs(), write=not args.dry_run)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except rederive.RederiveError as exc:
        print(f"attnproto: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not outcomes:
        raise CLIError(f"no results directory (one holding records.jsonl) under {' '.join(map(str, args.dirs))}")
    for out in outcomes:
        print(f"== {out.directory} ({out.experiment})")
        rows = []
        if out.merge is not None:
            m = out.merge
            rows += [{"finding": fid, "status": status} for status, ids in
                     (("superseded", m.changed), ("added", m.new), ("retired", m.retired)) for fid in ids]
        rows += [{"finding": fid, "status": f"kept as is: {why}"} for fid, why in out.kept]
        if out.skipped:
            print(f"skipped: {out.skipped}")
        if rows:
            print(format_table(rows, ["finding", "status"], max_width=QUERY_CELL_WIDTH * 2))
        elif out.merge is not None:
            print(f"{_plural(len(out.merge.unchanged), 'finding')} unchanged")
        print()
    print(format_table([o.row() for o in outcomes], max_width=QUERY_CELL_WIDTH))
    if args.dry_run or args.no_kb:
        return EXIT_OK
    try:
        store = FindingStore(args.db, create=False)
    except MissingDatabaseError:
        print("kb: no findings database; none created (attnproto kb add creates one)")
        return EXIT_OK
    try:
        entries = [f for o in outcomes if o.written and o.merge is not None
                   for f in (*o.merge.live, *o.merge.retired_entries)]
        print(f"kb: {_add_summary(store.add(entries))} ({store.path})")
    finally:
        store.close()
    return EXIT_OK


def cmd_synthesize(args: argparse.Namespace) -> int:
    from . import synthesis  # noqa: PLC0415
    from .findings import atomic_write_text  # noqa: PLC0415

    out = Path(args.out) if args.out is not None else Path(args.results).resolve().parent / synthesis.SYNTHESIS_FILE
    try:
        text = synthesis.synthesize(args.results, base=out.resolve().parent)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != text:
            print(f"attnproto: error: {out} is out of date; run: attnproto synthesize {args.results}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{out} is up to date")
        return EXIT_OK
    atomic_write_text(out, text)
    print(f"wrote {out}")
    return EXIT_OK


def cmd_leakcheck(args: argparse.Namespace) -> int:
    from . import leakcheck  # noqa: PLC0415
    from .records import device_slug  # noqa: PLC0415

    status = resolve_backend(args.backend)
    name = device_name(status)
    iterations = args.iterations or leakcheck.ITERATIONS
    try:
        log = leakcheck.run_leakcheck(status.name, name, iterations=iterations, commit=git_commit(),
                                      only=args.op or None,
                                      progress=lambda it, desc="": progress_bar(it, desc=desc))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    rows = []
    for r in log["ops"]:
        growth = r.get("growth", {})
        rows.append({"op": r["op"], "status": r["status"],
                     **{k.removesuffix("_bytes"): fmt_pct(growth[k]) if k in growth else None
                        for k in ("torch_allocated_bytes", "device_used_bytes", "host_rss_bytes")},
                     "reason": r.get("reason")})
    print(format_table(rows, max_width=QUERY_CELL_WIDTH))
    out_root = Path(args.out) if args.out is not None else default_out_dir(status.name)
    path = leakcheck.write_log(log, out_root, device_slug(status.name, name))
    print(f"{'ok' if log['ok'] else 'FAILED'}: {len(rows)} ops x {iterations} calls, growth limit "
          f"{fmt_pct(leakcheck.MAX_GROWTH)}; log: {path}")
    return EXIT_OK if log["ok"] else EXIT_FAILED


def _explain_device(args: argparse.Namespace):
    """The DeviceSpec to explain for: --arch (no device needed), else the --backend's device."""
    from .ops.problem import DeviceSpec  # noqa: PLC0415

    if args.arch is not None:
        try:
            return DeviceSpec.for_arch(args.arch)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    status = resolve_backend(args.backend)
    if status.name == "cpu":
        return DeviceSpec.from_backend(None)
    return DeviceSpec.from_backend(_backend.get(status.name))


def cmd_explain_kernel(args: argparse.Namespace) -> int:
    """What flash_forward(q, k, v) (kernel="auto") runs for a shape, and why; every family's verdict."""
    from .ops import flash  # noqa: PLC0415
    from .ops.problem import ProblemSpec  # noqa: PLC0415

    device = _explain_device(args)
    heads = args.heads
    kv_heads = args.kv_heads if args.kv_heads is not None else heads
    if heads % kv_heads:
        raise CLIError(f"--kv-heads: {kv_heads} does not divide --heads {heads}")
    spec = ProblemSpec(args.batch, heads, kv_heads, args.n, args.nkv if args.nkv is not None else args.n, args.d,
                       args.dtype, bool(args.causal))
    try:
        verdict = flash.explain(spec, device)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps({"device": device.__dict__ | {"compute": list(device.compute)}, "problem": spec.__dict__ | {"variant": spec.variant.label},
                          **verdict}, indent=2))
        return EXIT_OK
    mask = "causal" if spec.causal else "non-causal"
    print(f"D={spec.head_dim}, Nq={spec.seq_q}, Nkv={spec.seq_kv}, {mask}, {spec.dtype}, B={spec.batch}, "
          f"Hq={spec.num_heads}, Hkv={spec.num_kv_heads} on {device.name or device.arch} ({device.backend}, "
          f"{device.arch})")
    print(f"kernel='auto' runs: {verdict['family']} {verdict['config']}")
    print(f"why: {verdict['reason']}")
    rows = [{"family": r["family"], "supported": r["supported"], "tiles": r.get("config", "-"),
             "why": r.get("reason") or r["why"]} for r in verdict["families"]]
    print()
    print(format_table(rows, ["family", "supported", "tiles", "why"], max_width=EXPLAIN_CELL_WIDTH))
    return EXIT_OK


# ------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, default=None,
                   help=f"findings database (default: $ATTNPROTO_KB or {default_db_path()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="attention kernel prototypes and their findings")
    parser.add_argument("--version", action="version", version=f"attnproto {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="backends, availability, device, limits")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("list", help="registered experiments")
    p.add_argument("-v", "--verbose", action="store_true", help="print each experiment's hypothesis and sweep")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run an experiment (or all) and record its results")
    p.add_argument("experiment", help="experiment name, or 'all' (every experiment supporting the backend)")
    p.add_argument("--backend", default=AUTO, choices=BACKENDS + (AUTO,),
                   help="backend to run on; auto = best available (cuda, then metal, then cpu)")
    p.add_argument("--quick", action="store_true", help="small sweep (CI)")
    p.add_argument("--full", action="store_true",
                   help="the larger sweep where an experiment has one (proto7: flex at every N, every mma point; "
                        "proto8: the whole decode grid)")
    p.add_argument("--out", default=None,
                   help="results root (default: results/ for GPU backends, "
                        "$XDG_STATE_HOME/attnproto/results for cpu)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="RNG seed for inputs")
    p.add_argument("--no-kb", action="store_true", help="do not add the findings to the findings database")
    p.add_argument("--gpus", type=_gpus_arg, default=None, metavar="N|all",
                   help="shard the experiment's independent points over N (or all) CUDA GPUs of this host, "
                        "one Dask worker per GPU (needs attnproto[dask])")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="shard the points over the workers of an existing Dask cluster, e.g. tcp://host:8786")
    _add_db_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("generate", help="greedy generation with one attention implementation; tokens/s at the end")
    p.add_argument("--model", default=None, help="a local checkpoint (default: random weights in --shape)")
    p.add_argument("--shape", default="tinyllama", help="model shape without a checkpoint: tinyllama | tiny")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attn", default="attnproto", choices=("attnproto", "sdpa", "eager", "flex_attention"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("kernels", help="CUDA kernel specialisations: list, compile (check) or precompile")
    p.add_argument("action", choices=("list", "compile", "precompile"),
                   help="compile: NVRTC-compile each (no GPU needed); precompile: also store in the archive")
    p.add_argument("--arch", default="sm_90a", help="target, e.g. sm_90a, sm_80")
    p.add_argument("--jobs", type=_positive_int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--match", default=None, metavar="REGEX",
                   help="only the specialisations whose kernel key (`kernels list`) matches, e.g. 'ROPE=[12]'")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("explain-kernel", help="which kernel family and tiles kernel='auto' runs for a shape, and why")
    p.add_argument("--d", type=_positive_int, required=True, help="head dim")
    p.add_argument("--n", type=_positive_int, required=True, help="query length Nq")
    p.add_argument("--nkv", type=_positive_int, default=None, help="key/value length (default: --n)")
    p.add_argument("--causal", action="store_true", help="bottom-right aligned causal mask")
    p.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--heads", type=_positive_int, default=16, help="query heads Hq")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads Hkv (default: --heads)")
    p.add_argument("--backend", default=AUTO, choices=BACKENDS + (AUTO,),
                   help="whose device to explain for (default: the best available)")
    p.add_argument("--arch", default=None, help="explain for a CUDA arch without its device, e.g. sm_90, sm_80")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=cmd_explain_kernel)

    p = sub.add_parser("report", help="summary table of a result directory (results/<device>/<experiment>), "
                                      "or with --html one self-contained page of plots and findings")
    p.add_argument("directory", help="e.g. results/nvidia-h100-80gb-hbm3/proto1; with --html a results root")
    p.add_argument("--html", action="store_true", help="write the HTML page of every device under DIRECTORY")
    p.add_argument("--out", default=None, help="with --html: the page to write (default DIRECTORY/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("synthesize", help="write SYNTHESIS.md (the six questions answered from the findings)")
    p.add_argument("results", nargs="?", default="results", help="results root (default: results)")
    p.add_argument("--out", default=None, help="the file to write (default: SYNTHESIS.md beside RESULTS)")
    p.add_argument("--check", action="store_true", help="only check that the file is up to date (exit 1 if not)")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("leakcheck", help="repeat every GPU op and check device memory and host RSS for growth")
    p.add_argument("--backend", default=AUTO, choices=BACKENDS + (AUTO,), help="backend (default: the best)")
    p.add_argument("--iterations", type=_positive_int, default=None, help="calls per op (default: 1000)")
    p.add_argument("--op", action="append", default=[], help="only this op (repeatable), e.g. flash:wgmma")
    p.add_argument("--out", default=None, help="results root (default: results/ for GPU backends)")
    p.set_defaults(func=cmd_leakcheck)

    kb = sub.add_parser("kb", help="findings database")
    kb_sub = kb.add_subparsers(dest="kb_command", required=True, metavar="KB_COMMAND")
    p = kb_sub.add_parser("add", help="add findings JSONL file(s): a newer version of a stored id supersedes it; "
                                      "bad lines are reported and skipped (exit 1)")
    p.add_argument("files", nargs="+", help="findings .jsonl files (findings.jsonl; findings_history.jsonl "
                                            "entries go to the history)")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_add)
    p = kb_sub.add_parser("query", help="full-text search, e.g. kb query tile size D=128")
    p.add_argument("text", nargs="+", help="search terms; every term must match, 'D=128' matches as a phrase")
    p.add_argument("--limit", type=_positive_int, default=DEFAULT_QUERY_LIMIT, help="maximum results")
    p.add_argument("--json", action="store_true", help="print matching findings as JSON lines")
    p.add_argument("--long", action="store_true", help="also print claims and evidence")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_query)
    p = kb_sub.add_parser("stats", help="counts per prototype/device/backend/confidence/source")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_stats)
    p = kb_sub.add_parser("list", help="table of the live findings")
    p.add_argument("--prototype", default=None, help="only this prototype's findings")
    p.add_argument("--json", action="store_true", help="print the findings as JSON lines")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_list)
    p = kb_sub.add_parser("show", help="one finding in full (claim, config, answer, evidence, records) and its history")
    p.add_argument("id", help="finding id, e.g. smoke/fp32-matmul-error-bound-cpu/0b5c44f4a125")
    p.add_argument("--json", action="store_true", help="print the live finding, then its history, as JSON lines")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_show)
    p = kb_sub.add_parser("validate", help="the quality gates of the committed findings (counts, confidence, "
                                           "evidence, conflicts, claim numbers); exit 1 on a violation")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="results roots or directories (default: results)")
    p.set_defaults(func=cmd_kb_validate)
    p = kb_sub.add_parser("rederive", help="compute the findings of results directories again from their records "
                                           "(nothing measured): changed ones supersede, vanished ones retire")
    p.add_argument("dirs", nargs="*", metavar="DIR",
                   help="results roots or directories (default: the committed results/)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument("--no-kb", action="store_true", help="do not update the findings database")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_rederive)
    p = kb_sub.add_parser("rm", help="remove a live finding and its history")
    p.add_argument("id", help="finding id")
    _add_db_option(p)
    p.set_defaults(func=cmd_kb_rm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"attnproto: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, FindingError, RecordError, OSError) as exc:
        print(f"attnproto: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("attnproto: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
