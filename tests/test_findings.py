"""attnproto.findings: ids, confidence, validation, JSONL (the answer / superseding: test_findings_lifecycle.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attnproto import findings as fnd
from attnproto.findings import (
    Finding,
    FindingError,
    append_findings,
    confidence_from_cv,
    make_finding,
    read_findings,
    write_findings,
)

FIXED_TS = "2025-01-02T03:04:05Z"


def _finding(**overrides):
    kwargs = dict(
        prototype="flash",
        title="tile size sweep",
        claim="Br=64 Bc=64 is fastest at D=128",
        evidence={"tflops": 312.5, "median_ms": 1.25},
        config={"head_dim": 128, "block_r": 64, "block_c": 64},
        device="NVIDIA H100 80GB HBM3",
        backend="cuda",
        commit="abc123",
        cv=0.02,
        records=["flash/0123456789ab"],
        timestamp=FIXED_TS,
    )
    kwargs.update(overrides)
    return make_finding(**kwargs)


# ------------------------------------------------------------- confidence
@pytest.mark.parametrize("cv, expected", [
    (0.0, "high"),
    (math.nextafter(fnd.CONFIDENCE_HIGH_MAX_CV, 0.0), "high"),
    (fnd.CONFIDENCE_HIGH_MAX_CV, "medium"),
    (math.nextafter(fnd.CONFIDENCE_MEDIUM_MAX_CV, 0.0), "medium"),
    (fnd.CONFIDENCE_MEDIUM_MAX_CV, "low"),
    (2.5, "low"),
])
def test_confidence_boundaries(cv, expected):
    assert confidence_from_cv(cv) == expected


def test_confidence_thresholds_are_five_and_ten_percent():
    assert (fnd.CONFIDENCE_HIGH_MAX_CV, fnd.CONFIDENCE_MEDIUM_MAX_CV) == (0.05, 0.10)


@pytest.mark.parametrize("cv", [-0.01, float("nan"), float("inf")])
def test_confidence_rejects_bad_values(cv):
    with pytest.raises(ValueError, match="cv"):
        confidence_from_cv(cv)


@pytest.mark.parametrize("cv", ["0.01", None, True])
def test_confidence_rejects_non_numbers(cv):
    with pytest.raises(TypeError, match="cv"):
        confidence_from_cv(cv)


def test_finding_confidence_follows_cv():
    assert _finding(cv=0.01).confidence == "high"
    assert _finding(cv=0.07).confidence == "medium"
    assert _finding(cv=0.3).confidence == "low"


# --------------------------------------------------------------------- ids
def test_id_is_deterministic_and_ignores_time_commit_and_numbers():
    a = _finding()
    b = _finding(timestamp="2030-01-01T00:00:00Z", commit="def456", evidence={"tflops": 1.0}, cv=0.5,
                 claim="another claim")
    assert a.id == b.id
    assert a.id.startswith("flash/tile-size-sweep/")


def test_id_ignores_config_key_order():
    a = _finding(config={"head_dim": 128, "block_r": 64})
    b = _finding(config={"block_r": 64, "head_dim": 128})
    assert a.id == b.id


def test_stable_slug_keeps_id_when_title_carries_numbers():
    a = _finding(title="Br=64 reaches 312 TFLOPS", slug="best-tile")
    b = _finding(title="Br=64 reaches 298 TFLOPS", slug="best-tile")
    assert a.id == b.id
    assert _finding(title="Br=64 reaches 312 TFLOPS").id != _finding(title="Br=64 reaches 298 TFLOPS").id


@pytest.mark.parametrize("field, value", [
    ("prototype", "paged"),
    ("title", "other title"),
    ("config", {"head_dim": 64, "block_r": 64, "block_c": 64}),
    ("device", "NVIDIA H200"),
    ("backend", "metal"),
])
def test_id_changes_with_each_identity_field(field, value):
    assert _finding(**{field: value}).id != _finding().id


def test_timestamp_default_is_utc_iso8601():
    f = _finding(timestamp=None)
    assert f.timestamp.endswith("Z")
    assert "T" in f.timestamp


# -------------------------------------------------------------- validation
@pytest.mark.parametrize("evidence, message", [
    ({}, "must not be empty"),
    ({"tflops": float("nan")}, "NaN"),
    ({"tflops": float("inf")}, "NaN/inf"),
    ({"tflops": "fast"}, "must be a number"),
    ({"tflops": True}, "must be a number"),
    ({"speed": 3.0}, "does not end in a unit"),
    (None, "must be a dict"),
])
def test_bad_evidence_is_rejected(evidence, message):
    with pytest.raises(FindingError, match=message):
        _finding(evidence=evidence)


def test_numpy_scalar_evidence_is_accepted_as_python_numbers():
    f = _finding(evidence={"tflops": np.float32(1.5), "count": np.int64(3)})
    assert f.evidence == {"tflops": 1.5, "count": 3}
    json.loads(f.to_json())


@pytest.mark.parametrize("overrides, message", [
    ({"backend": "rocm"}, "backend"),
    ({"prototype": "Flash Attn"}, "prototype"),
    ({"claim": "  "}, "claim"),
    ({"device": ""}, "device"),
    ({"config": {"head_dim": float("nan")}}, "JSON"),
    ({"config": {1: 2}}, "config keys"),
    ({"timestamp": "yesterday"}, "ISO 8601"),
    ({"timestamp": "2025-01-02T03:04:05+02:00"}, "UTC"),
    ({"cv": None}, "cv"),
    ({"cv": float("nan")}, "cv"),
    ({"title": "!!!"}, "empty slug"),
    ({"records": "flash/abc"}, "records"),
])
def test_bad_fields_are_rejected(overrides, message):
    with pytest.raises(FindingError, match=message):
        _finding(**overrides)


def test_published_findings_need_citation_and_no_cv():
    pub = make_finding(prototype="flash", title="MFA on M4", claim="published number", evidence={"tflops": 2.0},
                       config={"head_dim": 64}, device="Apple M4", backend="metal", source="published",
                       citation="metal-flash-attention README", timestamp=FIXED_TS)
    assert pub.confidence == fnd.CONFIDENCE_PUBLISHED and pub.cv is None
    with pytest.raises(FindingError, match="citation"):
        make_finding(prototype="flash", title="x", claim="y", evidence={"tflops": 2.0}, config={},
                     device="Apple M4", backend="metal", source="published")
    with pytest.raises(FindingError, match="no cv"):
        make_finding(prototype="flash", title="x", claim="y", evidence={"tflops": 2.0}, config={},
                     device="Apple M4", backend="metal", source="published", citation="c", cv=0.01)
    with pytest.raises(FindingError, match="source"):
        _finding(source="rumour")


def test_from_dict_round_trip_and_tamper_checks():
    f = _finding()
    assert Finding.from_dict(json.loads(f.to_json())) == f
    tampered = f.to_dict() | {"config": {"head_dim": 64}}
    with pytest.raises(FindingError, match="does not match its content"):
        Finding.from_dict(tampered)
    wrong_conf = f.to_dict() | {"confidence": "high", "cv": 0.5}
    with pytest.raises(FindingError, match="does not match cv"):
        Finding.from_dict(wrong_conf)
    with pytest.raises(FindingError, match="unknown finding fields"):
        Finding.from_dict(f.to_dict() | {"extra": 1})
    missing = f.to_dict()
    del missing["claim"]
    with pytest.raises(FindingError, match="missing finding fields"):
        Finding.from_dict(missing)


# ------------------------------------------------------------------ JSONL
def test_append_twice_writes_one_line(tmp_path):
    path = tmp_path / "sub" / "findings.jsonl"
    f = _finding()
    assert append_findings(path, [f]) == 1
    # a re-confirmation (same content, later run) writes nothing
    assert append_findings(path, [_finding(timestamp="2030-01-01T00:00:00Z", commit="def456")]) == 0
    assert len(path.read_text().splitlines()) == 1


def test_append_refuses_a_contradicting_live_version(tmp_path):
    path = tmp_path / "findings.jsonl"
    f = _finding()
    append_findings(path, [f])
    before = path.read_bytes()
    rerun = _finding(evidence={"tflops": 999.0}, timestamp="2030-01-01T00:00:00Z")
    with pytest.raises(FindingError, match=r"different live finding .*changed: evidence.*merge_findings"):
        append_findings(path, [rerun])
    with pytest.raises(FindingError, match="different live finding"):
        append_findings(tmp_path / "new.jsonl", [f, rerun])       # within one batch too
    assert path.read_bytes() == before
    assert not (tmp_path / "new.jsonl").read_text()
    # a superseded version (a history entry) may sit beside the live one
    old = f.superseded_by(by_timestamp=rerun.timestamp, by_commit="def456", reason="re-run", at=FIXED_TS)
    assert append_findings(path, [old, old]) == 1
    assert [x.is_live for x in read_findings(path)] == [True, False]


def test_append_skips_duplicates_within_a_batch_and_keeps_new_ids(tmp_path):
    path = tmp_path / "findings.jsonl"
    a, b = _finding(), _finding(device="NVIDIA H200")
    assert append_findings(path, [a, a, b]) == 2
    assert [x.id for x in read_findings(path)] == [a.id, b.id]


def test_append_repairs_missing_trailing_newline(tmp_path):
    path = tmp_path / "findings.jsonl"
    a, b = _finding(), _finding(backend="metal", device="Apple M4")
    path.write_text(a.to_json())
    assert append_findings(path, [b]) == 1
    assert [x.id for x in read_findings(path)] == [a.id, b.id]


def test_append_refuses_a_file_with_unreadable_lines(tmp_path):
    path = tmp_path / "findings.jsonl"
    path.write_text("not json\n")
    with pytest.raises(FindingError, match=r":1: not valid JSON.*refusing to append"):
        append_findings(path, [_finding()])
    assert path.read_text() == "not json\n"


def test_append_rejects_non_findings(tmp_path):
    with pytest.raises(TypeError, match="expected Finding"):
        append_findings(tmp_path / "f.jsonl", [_finding().to_dict()])


def test_write_findings_replaces_the_file(tmp_path):
    path = tmp_path / "d" / "findings.jsonl"
    a, b = _finding(), _finding(device="NVIDIA H200")
    assert write_findings(path, [a, b]) == 2
    assert read_findings(path) == [a, b]
    assert write_findings(path, [b]) == 1
    assert read_findings(path) == [b]
    assert [p.name for p in path.parent.iterdir()] == ["findings.jsonl"]      # no temp file left
    with pytest.raises(TypeError, match="expected Finding"):
        write_findings(path, [a.to_dict()])
    assert read_findings(path) == [b]


def test_read_findings_names_the_bad_line(tmp_path):
    path = tmp_path / "findings.jsonl"
    bad = _finding().to_dict() | {"evidence": {"tflops": None}}
    path.write_text(_finding().to_json() + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(FindingError, match=r"findings.jsonl:3: .*must be a number"):
        read_findings(path)
    path.write_text("{broken\n")
    with pytest.raises(FindingError, match=r":1: not valid JSON"):
        read_findings(path)
    with pytest.raises(OSError):
        read_findings(tmp_path / "missing.jsonl")
