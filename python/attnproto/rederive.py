"""``attnproto kb rederive``: findings computed again from committed records, nothing measured.

Findings are functions of records. When a finding generator changes (a claim prints a
number its evidence lacked, a new finding is added), the committed results must follow
without a GPU: for every results directory (``<root>/<device>/<experiment>/`` holding a
``records.jsonl``) :func:`rederive_dir` reads the records and the run's ``run.json``,
builds the run's :class:`~attnproto.experiments.registry.ExperimentContext` from them,
and calls the experiment's ``rederive`` hook (``@experiment(..., rederive=fn)``), which
runs the experiment's own generators over the records.

The new findings go through the results directory's supersede path
(:func:`attnproto.findings.merge_findings`, as ``attnproto run`` writes them, with
``cause="rederive"``): a finding whose content is unchanged stays byte for byte as it
was (its timestamp and commit too); one whose claim, evidence or answer changed is
superseded, the old version kept in ``findings_history.jsonl``; one the generators no
longer produce is retired there. Findings the hook names as needing data that is not in
the records (:attr:`Rederivation.kept`) are left as they are. Only ``findings.jsonl``
and ``findings_history.jsonl`` are written, and only when something changed; the
records, ``run.json`` and the run's artefacts are never touched.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .findings import Finding, FindingsMerge, merge_findings, utc_now_iso
from .records import (
    OLD_INFIX,
    RECORDS_FILE,
    RUN_FILE,
    STAGING_INFIX,
    RecordError,
    check_findings_against_records,
    git_commit,
    read_previous_findings,
    read_records,
    results_lock,
    write_merged_findings,
)

__all__ = ["DirOutcome", "RederiveError", "default_dirs", "find_result_dirs", "rederive", "rederive_dir"]


class RederiveError(RuntimeError):
    """A results directory cannot be re-derived (inconsistent records, a hook that broke its contract)."""


@dataclasses.dataclass(frozen=True)
class DirOutcome:
    """What re-deriving one results directory did.

    ``merge``: the supersede merge (None when the directory was skipped); ``kept``: ids of the
    findings left as they are because they need data not in the records, with the reason;
    ``skipped``: why nothing was derived (no hook, a backend the hook cannot derive); ``changed``:
    whether the findings files differ from the merge's; ``written``: whether they were rewritten
    (False when nothing changed, and for a dry run).
    """

    directory: Path
    experiment: str
    merge: FindingsMerge | None = None
    kept: tuple[tuple[str, str], ...] = ()
    skipped: str = ""
    changed: bool = False
    written: bool = False

    def row(self) -> dict[str, Any]:
        """The table row: findings kept (unchanged), superseded, added, retired."""
        m = self.merge
        counts = {"kept": None, "superseded": None, "added": None, "retired": None} if m is None else {
            "kept": len(m.unchanged), "superseded": len(m.changed), "added": len(m.new), "retired": len(m.retired)}
        return {"directory": str(self.directory), "experiment": self.experiment, **counts,
                "as_is": len(self.kept),
                "note": self.skipped or ("written" if self.written else "would write" if self.changed else "unchanged")}


def find_result_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every results directory (one holding records.jsonl) under ``paths``, sorted; a staging or
    old directory of an interrupted run is left out. A missing path raises FileNotFoundError."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise FileNotFoundError(f"DIR: no such results directory: {p}")
        for rec in p.rglob(RECORDS_FILE):
            if not any(STAGING_INFIX in part or OLD_INFIX in part for part in rec.parent.parts):
                found.add(rec.parent)
    return sorted(found)


def _context(experiment: str, records: list[dict[str, Any]], run_info: dict[str, Any], commit: str, out_dir: Path):
    from .experiments import ExperimentContext  # noqa: PLC0415

    first = records[0]
    seed = int(run_info.get("seed", 0))
    return ExperimentContext(
        experiment=experiment, backend=first["backend"], device=dict(run_info.get("device") or {}),
        device_name=first["device"], driver=str(first["driver"]), commit=commit, quick=bool(run_info.get("quick")),
        progress=lambda iterable=None, total=None, desc="": iterable, out_dir=out_dir,
        rng=np.random.default_rng(seed), seed=seed)


def _run_info(directory: Path) -> dict[str, Any]:
    path = directory / RUN_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RederiveError(f"{path}: not valid JSON ({exc})") from None
    return info if isinstance(info, dict) else {}


def _experiment_of(directory: Path, records: list[dict[str, Any]]) -> str:
    names = {r["experiment"] for r in records}
    if len(names) != 1:
        raise RederiveError(f"{directory / RECORDS_FILE}: records of several experiments ({', '.join(sorted(names))})")
    (name,) = names
    for key in ("backend", "device"):
        values = {r[key] for r in records}
        if len(values) != 1:
            raise RederiveError(f"{directory / RECORDS_FILE}: records of several {key}s ({', '.join(sorted(values))})")
    return name


def _stable(previous: Sequence[Finding], new: Sequence[Finding]) -> list[Finding]:
    """``new`` in the previous file's order (new ids after, in generator order), each finding whose
    content did not change replaced by its previous version (timestamp and commit kept)."""
    old = {f.id: f for f in previous if f.is_live}
    order = {fid: i for i, fid in enumerate(old)}
    out = [old[f.id] if f.id in old and old[f.id].same_content(f) else f for f in new]
    return sorted(out, key=lambda f: order.get(f.id, len(order)))     # stable: new ids keep their order


def rederive_dir(directory: str | Path, *, commit: str | None = None, write: bool = True) -> DirOutcome:
    """Re-derive one results directory's findings from its records (module doc); ``write=False``: a dry run."""
    from .experiments import UnknownExperimentError, get  # noqa: PLC0415

    directory = Path(directory)
    try:
        records = read_records(directory / RECORDS_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(f"DIR: {directory} holds no {RECORDS_FILE}") from None
    if not records:
        return DirOutcome(directory, directory.name, skipped="no records")
    name = _experiment_of(directory, records)
    try:
        exp = get(name)
    except UnknownExperimentError:
        return DirOutcome(directory, name, skipped=f"experiment {name!r} is not registered")
    if exp.rederive is None:
        return DirOutcome(directory, name, skipped=f"{name} has no rederive hook")
    commit = git_commit() if commit is None else commit
    with results_lock(directory):
        previous, history = read_previous_findings(directory)
        with tempfile.TemporaryDirectory(prefix="attnproto-rederive-") as tmp:
            ctx = _context(name, records, _run_info(directory), commit, Path(tmp))
            result = exp.rederive(ctx, records, list(previous))
        if result.unsupported:
            return DirOutcome(directory, name, skipped=result.unsupported,
                              kept=tuple((f.id, result.unsupported) for f in previous if f.is_live))
        for f in result.findings:
            if not isinstance(f, Finding) or not f.is_live:
                raise RederiveError(f"{name}: the rederive hook returned {f!r}, not a live Finding")
        produced = {f.id for f in result.findings}
        kept = [(f, result.kept[f.slug]) for f in previous
                if f.is_live and f.slug in result.kept and f.id not in produced]
        new = _stable(previous, [*result.findings, *(f for f, _ in kept)])
        try:
            check_findings_against_records(new, records)
        except RecordError as exc:
            raise RederiveError(f"{directory}: {exc}") from None
        merge = merge_findings(previous, new, history=history, timestamp=utc_now_iso(), commit=commit,
                               cause="rederive")
        changed = bool(merge.changed or merge.new or merge.retired) or [f.id for f in previous] != [f.id for f in new]
        if write and changed:
            write_merged_findings(directory, merge)
    return DirOutcome(directory, name, merge=merge, kept=tuple((f.id, why) for f, why in kept),
                      changed=changed, written=write and changed)


def rederive(paths: Sequence[str | Path], *, commit: str | None = None, write: bool = True) -> list[DirOutcome]:
    """:func:`rederive_dir` for every results directory under ``paths`` (:func:`find_result_dirs`)."""
    return [rederive_dir(d, commit=commit, write=write) for d in find_result_dirs(paths)]


def default_dirs() -> list[Path]:
    """The committed ``results/`` of this checkout (beside ``python/``), else ``./results``."""
    committed = Path(__file__).resolve().parents[2] / "results"
    return [committed if committed.is_dir() else Path("results")]
