"""attnproto kb rederive: findings computed again from the records beside them, nothing measured.

A directory the generators wrote is left byte for byte as it was; a stale claim is superseded
(its old version kept in the history); a finding the generators no longer produce is retired;
a finding that needs data not in the records is kept as it is; records are never touched; and
the committed results are what the current generators derive from their records.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from attnproto import cli, rederive
from attnproto.findings import Finding, make_finding, read_findings
from attnproto.records import FINDINGS_FILE, HISTORY_FILE, RECORDS_FILE

COMMITTED = Path(__file__).resolve().parent.parent / "results"
H100_PROTO1 = COMMITTED / "nvidia-h100-80gb-hbm3" / "proto1"


@pytest.fixture
def smoke_dir(tmp_path) -> Path:
    """A results directory written by `attnproto run smoke --backend cpu --quick` (the generators' own output)."""
    assert cli.main(["run", "smoke", "--backend", "cpu", "--quick", "--out", str(tmp_path / "out"), "--no-kb"]) == 0
    (directory,) = rederive.find_result_dirs([tmp_path / "out"])
    return directory


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def _another_question(f: Finding, **changes) -> Finding:
    """``f`` with some fields changed and the id of its new question."""
    fields = {k: getattr(f, k) for k in ("prototype", "title", "claim", "evidence", "config", "device", "backend",
                                         "commit", "cv", "records", "slug", "timestamp", "answer")}
    return make_finding(**{**fields, **changes})


def _rewrite(path: Path, findings: list[Finding]) -> None:
    path.write_text("".join(f.to_json() + "\n" for f in findings))


def test_untouched_directory_is_left_as_it_was(smoke_dir, capsys):
    before = _snapshot(smoke_dir)
    assert cli.main(["kb", "rederive", str(smoke_dir), "--no-kb"]) == cli.EXIT_OK
    assert _snapshot(smoke_dir) == before                 # bytes and mtimes: nothing was rewritten
    out = capsys.readouterr().out
    assert "unchanged" in out and "superseded" in out     # the table: kept, superseded, added, retired
    (outcome,) = rederive.rederive([smoke_dir])
    assert not outcome.changed and not outcome.written and outcome.merge.unchanged
    assert _snapshot(smoke_dir) == before


def test_stale_claim_is_superseded_and_kept_in_history(smoke_dir):
    path = smoke_dir / FINDINGS_FILE
    fresh = read_findings(path)
    stale = dataclasses.replace(fresh[0], claim=fresh[0].claim + " Planted: 42 x faster.")
    _rewrite(path, [stale, *fresh[1:]])
    records_before = (smoke_dir / RECORDS_FILE).read_bytes()
    run_before = (smoke_dir / "run.json").read_bytes()

    (outcome,) = rederive.rederive([smoke_dir], commit="rederive-test")
    assert outcome.written and outcome.merge.changed == (stale.id,) and not outcome.merge.retired
    live = read_findings(path)
    assert [f.id for f in live] == [f.id for f in fresh]
    assert live[0].claim == fresh[0].claim and live[0].commit == "rederive-test"
    assert live[1:] == fresh[1:]                          # unchanged findings keep their timestamp and commit
    (old,) = read_findings(smoke_dir / HISTORY_FILE)
    assert old.claim == stale.claim and old.superseded["by_commit"] == "rederive-test"
    assert old.superseded["reason"] == "re-derived from the same records changed claim"
    assert (smoke_dir / RECORDS_FILE).read_bytes() == records_before
    assert (smoke_dir / "run.json").read_bytes() == run_before


def test_finding_no_longer_produced_is_retired(smoke_dir):
    path = smoke_dir / FINDINGS_FILE
    fresh = read_findings(path)
    gone = _another_question(fresh[0], slug="a-question-nobody-asks-now")
    _rewrite(path, [*fresh, gone])
    (outcome,) = rederive.rederive([smoke_dir], commit="rederive-test")
    assert outcome.merge.retired == (gone.id,)
    assert [f.id for f in read_findings(path)] == [f.id for f in fresh]
    (retired,) = read_findings(smoke_dir / HISTORY_FILE)
    assert retired.id == gone.id and retired.superseded["reason"].startswith("retired: re-derived from the same records")


def test_dry_run_writes_nothing(smoke_dir):
    path = smoke_dir / FINDINGS_FILE
    fresh = read_findings(path)
    _rewrite(path, [dataclasses.replace(fresh[0], claim="stale"), *fresh[1:]])
    before = _snapshot(smoke_dir)
    assert cli.main(["kb", "rederive", str(smoke_dir), "--dry-run"]) == cli.EXIT_OK
    assert _snapshot(smoke_dir) == before


def test_finding_that_needs_data_not_in_the_records_is_kept(tmp_path):
    """proto1's rejected configurations were never timed: rederive keeps that finding as it is."""
    from attnproto.experiments.proto1 import REJECTED_SLUG

    directory = tmp_path / H100_PROTO1.parent.name / "proto1"
    shutil.copytree(H100_PROTO1, directory)
    path = directory / FINDINGS_FILE
    live = read_findings(path)
    rejected = _another_question(live[0], title="Kernel configurations excluded by the gates", slug=REJECTED_SLUG,
                                 claim="3 candidate configurations failed the FP64 gate.",
                                 evidence={"rejected_count": 3}, config={}, answer={})
    _rewrite(path, [*live, rejected])
    (outcome,) = rederive.rederive([directory], commit="rederive-test")
    assert [fid for fid, _ in outcome.kept] == [rejected.id] and rejected.id not in outcome.merge.retired
    assert rejected in read_findings(path)
    assert (directory / RECORDS_FILE).read_bytes() == (H100_PROTO1 / RECORDS_FILE).read_bytes()


def test_committed_results_are_what_the_generators_derive():
    """Nothing would change: the committed findings are the current generators' over the committed records."""
    outcomes = rederive.rederive([COMMITTED], write=False)
    assert outcomes
    changed = {str(o.directory): o.row() for o in outcomes if o.changed}
    assert not changed, f"run: attnproto kb rederive results ({json.dumps(changed, indent=1)})"
    skipped = {o.experiment: o.skipped for o in outcomes if o.skipped}
    assert not skipped, skipped


def test_missing_directory_is_one_line_without_traceback(tmp_path, capsys):
    assert cli.main(["kb", "rederive", str(tmp_path / "absent")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnproto: error: DIR:") and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["kb", "rederive", str(tmp_path / "empty")]) == cli.EXIT_USAGE
    assert "no results directory" in capsys.readouterr().err
