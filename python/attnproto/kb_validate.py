"""``attnproto kb validate``: the quality gates of the committed findings (the seeds' 6.3, stricter).

Rules, each with a name that its violations carry:

``readable``
    Every line of every ``findings.jsonl`` is a valid finding (:meth:`Finding.from_dict`).
``total``
    At least :data:`MIN_LIVE_FINDINGS` live findings over all the directories.
``per-prototype``
    At least :data:`MIN_FINDINGS_PER_PROTOTYPE` live findings per prototype (the
    labels in :data:`PROTOTYPE_LABELS` count for their prototype).
``confidence``
    ``high`` only with a measured CV below :data:`HIGH_CONFIDENCE_MAX_CV`, and the
    confidence is the one the CV implies (:func:`attnproto.findings.confidence_from_cv`).
``evidence``
    A measured finding cites at least one record, and every record it cites is in
    the ``records.jsonl`` beside it, measured on the finding's device and backend.
``conflict``
    No two live findings answer one question (one id: prototype, slug, config,
    device, backend) differently.
``claim-numbers``
    Every number in a claim is one of the finding's own numbers: its evidence
    metrics, its CV, its question (``config``) and answer, the number of records it
    cites, or the config, metrics and timing of those records; shown to the precision the claim prints
    it with, as itself, a percentage, or in another unit of time, size or rate
    (:data:`CLAIM_SCALES`).  Numbers inside names (``sm_90a``, ``128x64``,
    ``bfloat16``) are not quantities and are not checked.

Only ``findings.jsonl`` (the live findings) is checked; ``findings_history.jsonl``
holds superseded versions, whose records are gone by design.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .findings import CLAIM_DIGITS, CONFIDENCE_HIGH_MAX_CV, Finding, FindingError, confidence_from_cv
from .records import FINDINGS_FILE, RECORDS_FILE, RecordError, read_records

__all__ = [
    "CLAIM_SCALES",
    "HIGH_CONFIDENCE_MAX_CV",
    "MIN_FINDINGS_PER_PROTOTYPE",
    "MIN_LIVE_FINDINGS",
    "PROTOTYPE_LABELS",
    "RULES",
    "ValidationReport",
    "Violation",
    "claim_numbers",
    "validate",
]

#: The issue-18 floor: live findings over all committed results.
MIN_LIVE_FINDINGS = 60
#: The issue-18 floor per prototype (P1 tiles, P2 stitching, P3 paged KV, P4 variants,
#: P5 DSLs, P6 linear attention, P7 RoPE/ALiBi/window/softcap, P8 model integration).
MIN_FINDINGS_PER_PROTOTYPE = {"proto1": 5, "proto2": 3, "proto3": 5, "proto4": 3, "proto5": 3,
                              "proto6": 5, "proto7": 4, "proto8": 2}
#: Finding ``prototype`` labels that count for a prototype: Prototype 3's CUDA findings
#: are labelled "paged" (experiments/proto3/common.py), its Metal ones "proto3"; Prototype 7 and
#: 8 findings are labelled "variants" and "framework" (their common.py PROTOTYPE).
PROTOTYPE_LABELS = {"paged": "proto3", "variants": "proto7", "framework": "proto8"}
#: "high" confidence needs a CV strictly below this (the findings module's own threshold).
HIGH_CONFIDENCE_MAX_CV = CONFIDENCE_HIGH_MAX_CV
#: Factors a claim may show a stored number in: itself, a percentage of a fraction, and
#: the unit steps of time (ms <-> s, us, ns), rates (GB/s <-> TB/s) and binary sizes (bytes -> KiB, MiB, GiB).
CLAIM_SCALES = (1.0, 100.0, 1e3, 1e-3, 1e6, 1e-6, 1e9, 1e-9,
                1.0 / 1024, 1.0 / 1024 ** 2, 1.0 / 1024 ** 3)
#: A claim's "16K" is 16 * 1024 tokens.
_KILO = 1024
#: Slack on the printed precision: 0.5 units in the last printed digit, plus float noise.
_ROUNDING_SLACK = 1e-9

RULES = ("readable", "total", "per-prototype", "confidence", "evidence", "conflict", "claim-numbers")

# A number that stands alone: not inside a name (letters, '_' or digits on either side, or a
# label's "AC-" before it), optionally a speed-up ("1.37x") or a thousand tokens ("16K") when
# nothing alphanumeric follows.
_NUMBER_RE = re.compile(r"(?<![A-Za-z_0-9.])(?<![A-Za-z]-)(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)([xK])?(?![A-Za-z_0-9])")


@dataclass(frozen=True)
class Violation:
    rule: str
    where: str          # a file, a file:line, or a finding id
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.where}: {self.message}"


@dataclass
class ValidationReport:
    directories: list[str]
    live: list[Finding] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def counts(self) -> dict[str, int]:
        """Live findings per prototype (aliases folded in), every floor's prototype listed."""
        out = dict.fromkeys(MIN_FINDINGS_PER_PROTOTYPE, 0)
        for f in self.live:
            key = PROTOTYPE_LABELS.get(f.prototype, f.prototype)
            out[key] = out.get(key, 0) + 1
        return out

    def by_rule(self) -> dict[str, list[Violation]]:
        return {rule: [v for v in self.violations if v.rule == rule] for rule in RULES}


def claim_numbers(claim: str) -> list[tuple[str, float]]:
    """The quantities of a claim: (as printed, value), names' digits left out."""
    out = []
    for m in _NUMBER_RE.finditer(claim):
        text, suffix = m.group(1), m.group(2)
        value = float(text) * (_KILO if suffix == "K" else 1)
        out.append((m.group(0), value))
    return out


def _printed_decimals(text: str) -> int:
    mantissa = text.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def _matches(printed: str, value: float, candidates: Sequence[float]) -> bool:
    """Whether ``printed`` (a claim token with value ``value``) shows one of ``candidates``
    at its precision, in one of :data:`CLAIM_SCALES`."""
    token = printed.rstrip("xK")
    if "e" in token.lower():
        mantissa, exponent = token.lower().split("e")
        half = 0.5 * 10.0 ** (int(exponent) - _printed_decimals(mantissa))
    elif "." in token:
        half = 0.5 * 10.0 ** (-_printed_decimals(token))
    else:   # an integer: past CLAIM_DIGITS digits its trailing zeros may be rounding (1488.02 -> "1490")
        zeros = len(token) - len(token.rstrip("0")) if token.rstrip("0") else 0
        half = 0.5 * 10.0 ** min(zeros, max(0, len(token) - CLAIM_DIGITS))
    if printed.endswith("K"):
        half *= _KILO
    for c in candidates:
        for scale in CLAIM_SCALES:
            if abs(abs(c) * scale - value) <= half * (1 + _ROUNDING_SLACK) + _ROUNDING_SLACK:
                return True
    return False


def _numbers_in(value: Any) -> Iterator[float]:
    """Every number in a JSON value, and the standalone numbers inside its strings."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield float(value)
    elif isinstance(value, str):
        for _, number in claim_numbers(value):
            yield number
        for digits in re.findall(r"\d+(?:\.\d+)?", value):
            yield float(digits)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _numbers_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers_in(v)


def _finding_numbers(f: Finding, records: Mapping[str, Mapping[str, Any]]) -> list[float]:
    pool = list(_numbers_in(f.evidence)) + list(_numbers_in(f.config)) + list(_numbers_in(f.answer))
    if f.cv is not None:
        pool.append(float(f.cv))
    pool.append(float(len(f.records)))        # "the fastest of 80 configurations": the records it rests on
    for rid in f.records:
        rec = records.get(rid)
        if rec is not None:
            pool.extend(_numbers_in(rec["config"]))
            pool.extend(_numbers_in(rec["metrics"]))
            pool.extend(_numbers_in({k: v for k, v in rec["timing"].items() if k != "samples_ms"}))
    return pool


def _findings_files(directories: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for d in directories:
        d = Path(d)
        if d.is_file():
            files.append(d)
        elif d.is_dir():
            files.extend(p for p in sorted(d.rglob(FINDINGS_FILE))
                         if not any(".staging-" in part or ".old-" in part for part in p.parts))
        else:
            raise FileNotFoundError(f"DIR: no such results directory or findings file: {d}")
    return files


def _read_raw(path: Path, report: ValidationReport) -> list[tuple[int, Finding]]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            report.violations.append(Violation("readable", where, f"not valid JSON: {exc.msg}"))
            continue
        if isinstance(data, Mapping) and data.get("source", "measured") == "measured":
            conf, cv = data.get("confidence"), data.get("cv")
            if conf == "high" and not (isinstance(cv, (int, float)) and cv < HIGH_CONFIDENCE_MAX_CV):
                report.violations.append(Violation(
                    "confidence", f"{where} {data.get('id')}",
                    f"confidence 'high' needs a CV below {HIGH_CONFIDENCE_MAX_CV:.0%}, its CV is {cv!r}"))
                continue
            if isinstance(cv, (int, float)) and not isinstance(cv, bool) and math.isfinite(cv) and cv >= 0 \
                    and conf != confidence_from_cv(cv):
                report.violations.append(Violation(
                    "confidence", f"{where} {data.get('id')}",
                    f"confidence {conf!r} does not match CV {cv:.4g} (expected {confidence_from_cv(cv)!r})"))
                continue
        try:
            f = Finding.from_dict(data)
        except (FindingError, TypeError, ValueError) as exc:
            report.violations.append(Violation("readable", where, str(exc)))
            continue
        out.append((lineno, f))
    return out


def _records_beside(path: Path, report: ValidationReport) -> dict[str, dict[str, Any]] | None:
    rec_path = path.parent / RECORDS_FILE
    if not rec_path.is_file():
        return None
    try:
        return {r["id"]: r for r in read_records(rec_path)}
    except (RecordError, OSError) as exc:
        report.violations.append(Violation("evidence", str(rec_path), f"records cannot be read: {exc}"))
        return {}


def _check_evidence(f: Finding, where: str, records: dict[str, dict[str, Any]] | None,
                    report: ValidationReport) -> None:
    if f.source != "measured":
        return
    if records is None:
        report.violations.append(Violation("evidence", where, f"no {RECORDS_FILE} beside {FINDINGS_FILE}"))
        return
    if not f.records:
        report.violations.append(Violation("evidence", where, "a measured finding cites no record"))
    for rid in f.records:
        rec = records.get(rid)
        if rec is None:
            report.violations.append(Violation("evidence", where, f"cited record {rid!r} is not in {RECORDS_FILE}"))
        elif rec["device"] != f.device or rec["backend"] != f.backend:
            report.violations.append(Violation(
                "evidence", where, f"cited record {rid!r} was measured on {rec['backend']}/{rec['device']!r}, "
                                   f"the finding is {f.backend}/{f.device!r}"))


def _check_claim(f: Finding, where: str, records: Mapping[str, Mapping[str, Any]], report: ValidationReport) -> None:
    pool = _finding_numbers(f, records)
    missing = [printed for printed, value in claim_numbers(f.claim) if not _matches(printed, value, pool)]
    if missing:
        report.violations.append(Violation(
            "claim-numbers", where, f"{', '.join(dict.fromkeys(missing))} in the claim "
                                    "not found in its evidence, config, answer, CV or cited records"))


def validate(directories: Sequence[str | Path], *, rules: Iterable[str] = RULES) -> ValidationReport:
    """Check the findings under ``directories`` (results roots, result directories or
    findings files) against ``rules`` (default: all of :data:`RULES`)."""
    rules = set(rules)
    unknown = rules - set(RULES)
    if unknown:
        raise ValueError(f"rules: unknown {sorted(unknown)}; choose from {', '.join(RULES)}")
    if isinstance(directories, (str, Path)):
        raise TypeError("directories must be a sequence of paths, not a single path")
    report = ValidationReport([str(d) for d in directories])
    seen: dict[str, tuple[Finding, str]] = {}
    for path in _findings_files(directories):
        records = _records_beside(path, report)
        for lineno, f in _read_raw(path, report):
            where = f"{path}:{lineno} {f.id}"
            report.live.append(f)
            if "evidence" in rules:
                _check_evidence(f, where, records, report)
            if "claim-numbers" in rules:
                _check_claim(f, where, records or {}, report)
            prior = seen.get(f.id)
            if prior is None:
                seen[f.id] = (f, where)
            elif "conflict" in rules and not prior[0].same_content(f):
                report.violations.append(Violation(
                    "conflict", where, f"answers the question of {prior[1]} differently "
                                       f"(they differ in {', '.join(prior[0].changed_fields(f))})"))
    report.violations = [v for v in report.violations if v.rule in rules or v.rule == "readable"]
    if "total" in rules and len(report.live) < MIN_LIVE_FINDINGS:
        report.violations.append(Violation("total", ", ".join(report.directories),
                                           f"{len(report.live)} live findings, at least {MIN_LIVE_FINDINGS} needed"))
    if "per-prototype" in rules:
        counts = report.counts()
        for proto, floor in MIN_FINDINGS_PER_PROTOTYPE.items():
            if counts[proto] < floor:
                report.violations.append(Violation("per-prototype", proto,
                                                   f"{counts[proto]} live findings, at least {floor} needed"))
    return report


def format_report(report: ValidationReport) -> str:
    """The per-prototype counts, then every violation grouped by rule, then the verdict."""
    from .report import format_table  # noqa: PLC0415

    counts = report.counts()
    rows = [{"prototype": p, "live": n, "needed": MIN_FINDINGS_PER_PROTOTYPE.get(p, 0)} for p, n in counts.items()]
    lines = [format_table(rows, ["prototype", "live", "needed"]),
             f"total: {len(report.live)} live findings (needed {MIN_LIVE_FINDINGS})", ""]
    for rule, violations in report.by_rule().items():
        lines.append(f"{rule}: {'ok' if not violations else f'{len(violations)} violation(s)'}")
        lines.extend(f"  {v.where}: {v.message}" for v in violations)
    lines.append("")
    lines.append("kb validate: ok" if report.ok else f"kb validate: {len(report.violations)} violation(s)")
    return "\n".join(lines)
