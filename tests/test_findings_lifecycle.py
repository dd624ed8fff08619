"""Findings stay true: a finding's id names its question, re-runs supersede (never first-write-wins),
a run replaces its results only when it completed, and `kb add` survives bad input.

The acceptance test of the issue is ``test_two_seeds_into_one_directory_keep_one_live_finding_per_question``;
``test_failed_run_leaves_previous_results_byte_identical`` is its failure half.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnproto import cli
from attnproto.experiments import registry
from attnproto.findings import (
    Finding,
    FindingError,
    LineError,
    make_finding,
    merge_findings,
    read_findings,
    read_findings_lenient,
    write_findings,
)
from attnproto.records import (
    HISTORY_FILE,
    RecordError,
    leftover_result_dirs,
    read_records,
    staged_results_dir,
)
from attnproto.store import FindingStore

CLI_TIMEOUT_S = 120
T1, T2, T3 = "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"


def _best_tile(tile, *, timestamp=T1, commit="c1", d=128, tflops=100.0):
    """One question (best tile at D, N=512) and its answer (the tile)."""
    return make_finding(prototype="proto1", title=f"Best tile for D={d} at N=512", slug=f"best-tile-d{d}-n512",
                        claim=f"Br={tile} is fastest at {tflops} TFLOPS", evidence={"best_tflops": tflops},
                        config={"head_dim": d, "seq_len": 512, "causal": False},
                        answer={"kernel": "flash_fwd_mma", "block_r": tile, "block_c": 64},
                        device="NVIDIA H100 80GB HBM3", backend="cuda", commit=commit, cv=0.01,
                        records=["proto1/000000000001"], timestamp=timestamp)


# --------------------------------------------------------------- the answer
def test_answer_is_not_part_of_the_id_and_round_trips():
    a, b = _best_tile(64), _best_tile(128)
    assert a.id == b.id and a.answer != b.answer
    assert Finding.from_dict(json.loads(b.to_json())) == b
    assert _best_tile(64, d=64).id != a.id                     # the question is


def test_lines_written_before_answer_existed_still_load():
    line = _best_tile(64).to_dict()
    del line["answer"], line["superseded"]
    f = Finding.from_dict(line)
    assert f.answer == {} and f.is_live
    assert Finding.from_dict(line | {"answer": None}).answer == {}


@pytest.mark.parametrize("answer, message", [
    ([64, 64], "answer must be a dict"),
    ({1: 64}, "answer keys must be strings"),
    ({"tflops": float("nan")}, "answer must be JSON-serialisable"),
    ({"tile": object()}, "answer must be JSON-serialisable"),
])
def test_bad_answers_are_rejected(answer, message):
    with pytest.raises(FindingError, match=message):
        dataclasses.replace(_best_tile(64), answer=answer)


def test_superseded_marker_is_validated():
    f = _best_tile(64)
    old = f.superseded_by(by_timestamp=T2, by_commit="c2", reason="re-run changed claim", at=T3)
    assert not old.is_live and old.superseded == {"at": T3, "by_timestamp": T2, "by_commit": "c2",
                                                  "reason": "re-run changed claim"}
    assert Finding.from_dict(json.loads(old.to_json())) == old
    assert old.same_content(f) and old.version_key() == f.version_key()
    for marker, message in [({"at": T3}, "missing"), (old.superseded | {"x": 1}, "unknown"),
                            (old.superseded | {"at": "later"}, "superseded.at"),
                            (old.superseded | {"reason": " "}, "superseded.reason"), ("yes", "null or a dict")]:
        with pytest.raises(FindingError, match=message):
            dataclasses.replace(f, superseded=marker)


def test_content_ignores_provenance_only():
    f = _best_tile(64)
    assert f.same_content(_best_tile(64, timestamp=T3, commit="other"))
    assert f.changed_fields(_best_tile(128)) == ["claim", "answer"]
    assert f.changed_fields(_best_tile(64, tflops=1.0)) == ["claim", "evidence"]
    assert f.version_key() != _best_tile(64, timestamp=T3).version_key()


# ---------------------------------------------------------------- merging
def test_merge_supersedes_changed_keeps_unchanged_and_retires_the_rest():
    changed_old, changed_new = _best_tile(64), _best_tile(128, timestamp=T2, commit="c2")
    same_old, same_new = _best_tile(64, d=64), _best_tile(64, d=64, timestamp=T2, commit="c2")
    gone = _best_tile(32, d=256)
    brand_new = _best_tile(16, d=32, timestamp=T2, commit="c2")
    old_history = changed_old.superseded_by(by_timestamp=T1, by_commit="c0", reason="earlier", at=T1)
    merge = merge_findings([changed_old, same_old, gone], [changed_new, same_new, brand_new],
                           history=[old_history], timestamp=T2, commit="c2", at=T3)
    assert merge.live == (changed_new, same_new, brand_new)
    assert (merge.changed, merge.unchanged, merge.retired, merge.new) == (
        (changed_old.id,), (same_old.id,), (gone.id,), (brand_new.id,))
    first, superseded, retired = merge.history
    assert first == old_history                                     # earlier history kept, first
    assert superseded.same_content(changed_old) and superseded.superseded == {
        "at": T3, "by_timestamp": T2, "by_commit": "c2", "reason": "re-run changed claim, answer"}
    assert retired.same_content(gone) and retired.superseded["reason"].startswith("retired: the run of " + T2)
    assert merge.retired_entries == (retired,)
    assert all(not h.is_live for h in merge.history) and all(f.is_live for f in merge.live)


def test_merge_refuses_two_answers_to_one_question_in_one_run():
    with pytest.raises(FindingError, match=r"two different findings with id .* in one run .*answer="):
        merge_findings([], [_best_tile(64), _best_tile(128)])
    assert len(merge_findings([], [_best_tile(64), _best_tile(64, timestamp=T2)]).live) == 1
    with pytest.raises(FindingError, match="superseded version, not a live finding"):
        merge_findings([], [_best_tile(64).superseded_by(by_timestamp=T2, by_commit="c", reason="r")])


def test_merge_is_idempotent_for_history():
    old, new = _best_tile(64), _best_tile(128, timestamp=T2)
    once = merge_findings([old], [new], at=T3)
    twice = merge_findings(once.live, once.live, history=once.history, at=T3)
    assert twice.history == once.history and twice.unchanged == (new.id,)


# ------------------------------------------------------- lenient reading
def _good_line(tile=64, d=128):
    return _best_tile(tile, d=d).to_json()


@pytest.mark.parametrize("bad, message", [
    (b"{broken", "not valid JSON: "),
    (b'{"id": "x"}', "missing finding fields"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe not utf-8", "not UTF-8 text (byte 0xff at column 1)"),
    (b"[" * 100000, "not valid JSON"),
    (_best_tile(64).to_json().replace('"block_r":64', '"block_r":NaN').encode(), "JSON-serialisable"),
])
def test_read_lenient_reports_each_bad_line_and_keeps_the_good(tmp_path, bad, message):
    path = tmp_path / "f.jsonl"
    path.write_bytes(_good_line().encode() + b"\n" + bad + b"\n\n" + _good_line(d=64).encode() + b"\n")
    findings, errors = read_findings_lenient(path)
    assert [f.id for f in findings] == [_best_tile(64).id, _best_tile(64, d=64).id]
    (err,) = errors
    assert err.line == 2 and message in err.message
    assert str(err).startswith(f"{path}:2: ")
    with pytest.raises(FindingError, match=f":2: .*{re.escape(message)}"):
        read_findings(path)


def test_read_lenient_reports_a_truncated_last_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(_good_line().encode() + b"\n" + _good_line(d=64).encode()[:40])
    findings, (err,) = read_findings_lenient(path)
    assert len(findings) == 1 and err.line == 2
    assert err.message.startswith("truncated last line (no newline at the end, and not valid JSON")


def test_read_lenient_whole_file_errors(tmp_path):
    binary = tmp_path / "kernel.bin"
    binary.write_bytes(b"\x7fELF\x00\x01\x02" + bytes(range(256)) * 8)
    assert read_findings_lenient(binary) == ([], [LineError(str(binary), None,
                                                            "binary file (NUL bytes), not JSON lines; nothing read from it")])
    (err,) = read_findings_lenient(tmp_path)[1]
    assert err.line is None and "is a directory" in str(err)
    (err,) = read_findings_lenient(tmp_path / "missing.jsonl")[1]
    assert err.line is None and "cannot read" in err.message


def test_read_lenient_accepts_crlf_bom_and_a_valid_unterminated_last_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _good_line().encode() + b"\r\n" + _good_line(d=64).encode())
    findings, errors = read_findings_lenient(path)
    assert errors == [] and len(findings) == 2
    assert read_findings(path) == findings


# ------------------------------------------------------- staged results
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stage_write(stage, findings=()):
    stage.write_results(experiment="exp", backend="cuda", records=[], findings=list(findings),
                        run_info={"date": T2, "commit": "c2"})


def test_staged_results_replace_the_previous_directory(tmp_path):
    final = tmp_path / "out" / "dev" / "exp"
    with staged_results_dir(final) as stage:
        assert stage.path.parent == final.parent and stage.path.name.startswith("exp.staging-")
        (stage.path / "artefact.json").write_text("{}")
        _stage_write(stage)
    assert sorted(p.name for p in final.iterdir()) == ["artefact.json", "findings.jsonl", "records.jsonl",
                                                        "run.json"]
    with staged_results_dir(final) as stage:
        _stage_write(stage)
    assert not (final / "artefact.json").exists()          # the directory is the latest run, as a whole
    assert [p.name for p in final.parent.iterdir()] == ["exp"]
    assert leftover_result_dirs(final) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_a_failing_block_leaves_the_previous_directory_untouched(tmp_path, error):
    final = tmp_path / "dev" / "exp"
    with staged_results_dir(final) as stage:
        (stage.path / "artefact.json").write_text("old")
        _stage_write(stage)
    before = _tree(tmp_path)
    with pytest.raises(type(error)):
        with staged_results_dir(final) as stage:
            (stage.path / "artefact.json").write_text("new")
            _stage_write(stage)                              # even after the results were written
            raise error
    assert _tree(tmp_path) == before
    assert [p.name for p in final.parent.iterdir()] == ["exp"]


def test_results_never_written_are_an_error_and_change_nothing(tmp_path):
    final = tmp_path / "a" / "b" / "exp"
    with pytest.raises(RecordError, match="never written"):
        with staged_results_dir(final) as stage:
            (stage.path / "partial.json").write_text("{}")
    assert not (tmp_path / "a").exists()                     # the directories made for it are gone too


def test_a_failed_swap_puts_the_previous_results_back(tmp_path, monkeypatch):
    final = tmp_path / "dev" / "exp"
    with staged_results_dir(final) as stage:
        _stage_write(stage)
    before = _tree(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if ".staging-" in str(src):
            raise OSError("disk on fire")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk on fire"):
        with staged_results_dir(final) as stage:
            _stage_write(stage)
    assert _tree(tmp_path) == before and leftover_result_dirs(final) == []


def test_leftovers_are_listed(tmp_path):
    final = tmp_path / "dev" / "exp"
    (tmp_path / "dev" / "exp.staging-1234abcd").mkdir(parents=True)
    (tmp_path / "dev" / "exp.old-1234abcd").mkdir()
    (tmp_path / "dev" / "expx.staging-0").mkdir()
    assert [p.name for p in leftover_result_dirs(final)] == ["exp.old-1234abcd", "exp.staging-1234abcd"]


def test_unreadable_previous_findings_are_not_replaced(tmp_path):
    final = tmp_path / "dev" / "exp"
    final.mkdir(parents=True)
    (final / "findings.jsonl").write_text("{broken\n")
    before = _tree(tmp_path)
    with pytest.raises(RecordError, match=r"findings.jsonl:1: not valid JSON.*fix or delete that line"):
        with staged_results_dir(final) as stage:
            _stage_write(stage)
    assert _tree(tmp_path) == before


# ------------------------------------------------------- through the CLI

def attnproto_cmd(env, *args, cwd, commit=None):
    e = dict(env)
    if commit is not None:
        e["ATTNPROTO_COMMIT"] = commit
    return subprocess.run([sys.executable, "-m", "attnproto", *map(str, args)], env=e, cwd=cwd,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def _run_smoke(env, tmp_path, out, db, seed, commit):
    return _ok(attnproto_cmd(env, "run", "smoke", "--backend", "cpu", "--quick", "--out", out, "--db", db,
                             "--seed", seed, cwd=tmp_path, commit=commit))


def test_two_seeds_into_one_directory_keep_one_live_finding_per_question(env, tmp_path):
    out, db = tmp_path / "out", tmp_path / "kb.sqlite"
    first = _run_smoke(env, tmp_path, out, db, 1, "1111111111111111111111111111111111111111")
    assert "2 live in findings.jsonl (2 new" in first.stdout and "kb: 2 added, 0 superseded" in first.stdout
    (result_dir,) = out.glob("cpu*/smoke")
    run1 = read_findings(result_dir / "findings.jsonl")
    second = _run_smoke(env, tmp_path, out, db, 2, "2222222222222222222222222222222222222222")
    assert "(0 new, 2 superseding an earlier version, 0 unchanged)" in second.stdout
    assert f"2 earlier versions in {HISTORY_FILE}" in second.stdout and "kb: 0 added, 2 superseded" in second.stdout

    live = read_findings(result_dir / "findings.jsonl")
    records = read_records(result_dir / "records.jsonl")
    run_info = json.loads((result_dir / "run.json").read_text())
    # exactly one live finding per question, the same questions as the first run
    assert sorted(f.id for f in live) == sorted(f.id for f in run1) and len({f.id for f in live}) == len(live) == 2
    by_op = {r["config"]["op"]: [x for x in records if x["config"]["op"] == r["config"]["op"]] for r in records}
    for f in live:
        # ... each the second run's: its commit, cites the second run's records, states their numbers
        assert f.is_live and f.commit == run_info["commit"] == "2" * 40 and f.timestamp >= run_info["date"]
        assert set(f.records) <= {r["id"] for r in records}
        assert all(r["commit"] == "2" * 40 for r in records)
        op = "matmul" if "matmul" in f.title else "tiled_attention"
        metric = "bound_ratio" if op == "matmul" else "tolerance_ratio"
        assert f.evidence[f"worst_{metric}"] == max(r["metrics"][metric] for r in by_op[op])
        assert f.answer and "[" not in f.claim
    assert {f.id: f.claim for f in live} != {f.id: f.claim for f in run1}

    # the first run's versions are history, marked superseded by the second run
    history = read_findings(result_dir / HISTORY_FILE)
    assert sorted(f.id for f in history) == sorted(f.id for f in run1)
    for old in history:
        (before,) = [f for f in run1 if f.id == old.id]
        (now,) = [f for f in live if f.id == old.id]
        assert old.same_content(before) and old.timestamp == before.timestamp and old.commit == "1" * 40
        assert old.superseded["by_commit"] == "2" * 40 and old.superseded["by_timestamp"] == now.timestamp
        assert old.superseded["reason"].startswith("re-run changed ")

    # the database serves only the live versions; the old ones are its history
    for text in ("gamma_k", "tiled attention", "smoke"):
        hits = [json.loads(x) for x in _ok(attnproto_cmd(env, "kb", "query", text, "--json", "--db", db,
                                                         cwd=tmp_path)).stdout.splitlines()]
        assert hits and all(Finding.from_dict(h) in live for h in hits), text
    listed = [Finding.from_dict(json.loads(x)) for x in
              _ok(attnproto_cmd(env, "kb", "list", "--json", "--db", db, cwd=tmp_path)).stdout.splitlines()]
    assert sorted(listed, key=lambda f: f.id) == sorted(live, key=lambda f: f.id)
    shown = _ok(attnproto_cmd(env, "kb", "show", live[0].id, "--json", "--db", db, cwd=tmp_path)).stdout.splitlines()
    assert Finding.from_dict(json.loads(shown[0])) == live[0]
    (old,) = [Finding.from_dict(json.loads(x)) for x in shown[1:]]
    assert not old.is_live and old.commit == "1" * 40
    stats = json.loads(_ok(attnproto_cmd(env, "kb", "stats", "--json", "--db", db, cwd=tmp_path)).stdout)
    assert (stats["total"], stats["history"]) == (2, 2)

    # `kb add` of the directory's files gives the same picture in a fresh database
    db2 = tmp_path / "kb2.sqlite"
    add = _ok(attnproto_cmd(env, "kb", "add", result_dir / "findings.jsonl", result_dir / HISTORY_FILE,
                            "--db", db2, cwd=tmp_path))
    assert "findings.jsonl: 2 added, 0 superseded, 0 unchanged" in add.stdout
    assert f"{HISTORY_FILE}: 0 added, 2 superseded, 0 unchanged" in add.stdout
    with FindingStore(db2, create=False) as store:
        assert sorted(store.list(), key=lambda f: f.id) == sorted(live, key=lambda f: f.id)
        assert sum(len(store.history(f.id)) for f in live) == 2


def test_a_run_that_no_longer_produces_a_finding_retires_it(env, tmp_path):
    out, db = tmp_path / "out", tmp_path / "kb.sqlite"
    _run_smoke(env, tmp_path, out, db, 1, "1" * 40)
    (result_dir,) = out.glob("cpu*/smoke")
    # a finding of an earlier layout (its answer in the config: another id) that no run produces any more
    (f,) = [x for x in read_findings(result_dir / "findings.jsonl") if "matmul" in x.title]
    stale = make_finding(prototype=f.prototype, title=f.title, slug=f.slug, claim="an old contradictory claim",
                         evidence=f.evidence, config=f.config | {"worst_shape": "64x64x64"}, device=f.device,
                         backend=f.backend, commit=f.commit, cv=f.cv, records=f.records, timestamp=f.timestamp)
    assert stale.id != f.id
    write_findings(result_dir / "findings.jsonl", [*read_findings(result_dir / "findings.jsonl"), stale])
    with FindingStore(db) as store:
        store.add([stale])
    proc = _run_smoke(env, tmp_path, out, db, 2, "2" * 40)
    assert "1 retired (not produced again)" in proc.stdout
    assert stale.id not in {x.id for x in read_findings(result_dir / "findings.jsonl")}
    (retired,) = [x for x in read_findings(result_dir / HISTORY_FILE) if x.id == stale.id]
    assert retired.superseded["reason"].startswith("retired") and retired.superseded["by_commit"] == "2" * 40
    with FindingStore(db, create=False) as store:
        assert store.get(stale.id) is None and store.query("contradictory") == []
        assert [x.claim for x in store.history(stale.id)] == ["an old contradictory claim"]


def _failing(exc, write_artefact=True):
    real = registry.get("smoke")

    def run(ctx):
        real.func(ctx)                                            # measure for real, then fail
        if write_artefact:
            (ctx.out_dir / "summary.json").write_text('{"partial": true}\n')
        raise exc

    run.__doc__ = real.func.__doc__
    return dataclasses.replace(real, func=run)


@pytest.mark.parametrize("exc, expected", [
    (registry.ExperimentError("result outside tolerance"), cli.EXIT_FAILED),
    (FindingError("bad finding"), cli.EXIT_FAILED),
    (OSError(28, "No space left on device"), cli.EXIT_FAILED),
    (KeyboardInterrupt(), cli.EXIT_INTERRUPTED),
    (RuntimeError("a bug"), cli.EXIT_FAILED),    # a bug in an experiment: one line naming it, no traceback
])
def test_failed_run_leaves_previous_results_byte_identical(tmp_path, monkeypatch, capsys, exc, expected):
    monkeypatch.setenv("ATTNPROTO_NO_TQDM", "1")
    out, db = tmp_path / "out", tmp_path / "kb.sqlite"
    args = ["run", "smoke", "--backend", "cpu", "--quick", "--out", str(out), "--db", str(db)]
    assert cli.main(args + ["--seed", "1"]) == cli.EXIT_OK
    before, db_before = _tree(out), db.read_bytes()
    monkeypatch.setitem(registry._REGISTRY, "smoke", _failing(exc))
    capsys.readouterr()
    if isinstance(expected, type):
        with pytest.raises(expected):
            cli.main(args + ["--seed", "2"])
    else:
        assert cli.main(args + ["--seed", "2"]) == expected
    err = capsys.readouterr().err
    assert _tree(out) == before and db.read_bytes() == db_before
    (device_dir,) = out.iterdir()
    assert [p.name for p in device_dir.iterdir()] == ["smoke"]        # no staging directory left
    if expected == cli.EXIT_FAILED:
        assert f"experiment smoke failed: " in err and str(exc) in err and "is unchanged" in err
        assert "Traceback" not in err
    if type(exc) is RuntimeError:
        assert "RuntimeError: a bug (at test_findings_lifecycle.py:" in err    # the type and where it was raised


def test_failed_first_run_creates_no_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNPROTO_NO_TQDM", "1")
    monkeypatch.setitem(registry._REGISTRY, "smoke", _failing(registry.ExperimentError("nope")))
    out = tmp_path / "out"
    assert cli.main(["run", "smoke", "--backend", "cpu", "--quick", "--out", str(out), "--no-kb"]) == cli.EXIT_FAILED
    assert "no results written" in capsys.readouterr().err
    assert not out.exists()


def test_run_refuses_to_replace_unreadable_findings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNPROTO_NO_TQDM", "1")
    out = tmp_path / "out"
    args = ["run", "smoke", "--backend", "cpu", "--quick", "--out", str(out), "--no-kb"]
    assert cli.main(args) == cli.EXIT_OK
    (path,) = out.glob("cpu*/smoke/findings.jsonl")
    path.write_text(path.read_text() + "{truncated")
    before = _tree(out)
    capsys.readouterr()
    assert cli.main(args) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "findings.jsonl:3: truncated last line" in err and "fix or delete that line" in err
    assert _tree(out) == before


def test_leftover_staging_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNPROTO_NO_TQDM", "1")
    out = tmp_path / "out"
    args = ["run", "smoke", "--backend", "cpu", "--quick", "--out", str(out), "--no-kb"]
    assert cli.main(args) == cli.EXIT_OK
    (final,) = out.glob("cpu*/smoke")
    (final.parent / "smoke.staging-deadbeef").mkdir()
    capsys.readouterr()
    assert cli.main(args) == cli.EXIT_OK
    assert "smoke.staging-deadbeef is left over from an interrupted or concurrent run" in capsys.readouterr().err
