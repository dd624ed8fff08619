"""Findings: the unit of knowledge attnproto produces.

A :class:`Finding` is one claim backed by numbers: "on device X with backend Y,
for question Z the answer is W".  Findings are written as JSON lines and
ingested by the findings store (:mod:`attnproto.store`).

Question and answer
    ``config`` holds the parameters of the *question* only: what was asked,
    fixed before anything was measured (e.g. ``head_dim``, ``seq_len``,
    ``causal``, the swept shapes).  ``answer`` holds the measured *choice*:
    what the numbers picked (e.g. the winning kernel and tile, ``block_r``,
    ``block_c``; the worst shape).  Both are JSON objects and both are indexed
    for search; only ``config`` is part of the id, so a re-run that picks a
    different winner answers the *same* question and supersedes the old
    finding instead of piling up a second, contradictory one.

Identity
    ``Finding.id`` is a pure function of (prototype, slug, config, device,
    backend).  The slug defaults to a slug of the title; experiments whose
    titles contain measured numbers (or answers) must pass a stable ``slug``
    so that a re-run on the same device produces the same id.

Superseding (never first-write-wins)
    Two findings with one id are two versions of one answer.  When they say
    different things (:meth:`Finding.same_content` compares everything but
    ``timestamp``, ``commit`` and ``superseded``) the newer one is live and the
    other is kept as history, marked with :meth:`Finding.superseded_by`
    (``superseded = {"at", "by_timestamp", "by_commit", "reason"}``); a
    superseded finding is never served as live.  :func:`merge_findings` does
    this for a results directory: ``findings.jsonl`` holds the live findings
    of the latest completed run, ``findings_history.jsonl`` the superseded
    versions and the findings the latest run did not produce again ("retired":
    the records they cited were replaced).  The store does the same by
    timestamp (:meth:`attnproto.store.FindingStore.add`).

JSONL files
    :func:`read_findings` is strict (the first bad line raises, naming file and
    line); :func:`read_findings_lenient` returns the good findings and one
    :class:`LineError` per bad line (invalid JSON or finding, non-UTF-8 bytes,
    a truncated last line, a binary file, a directory, an unreadable file).
    :func:`write_findings` replaces a file atomically; :func:`append_findings`
    appends without ever leaving two different live versions of one id.

Confidence
    Measured findings carry the coefficient of variation (``cv``, a fraction:
    0.05 == 5 %) of the timing they rest on; ``confidence`` is derived from it
    (high: cv < 5 %, medium: cv < 10 %, low otherwise).  Published findings
    (``source="published"``) are cited context, never measurements: they need a
    ``citation``, have no ``cv`` and their confidence is ``"cited"``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "CONFIDENCE_HIGH_MAX_CV",
    "CONFIDENCE_LEVELS",
    "CONFIDENCE_MEDIUM_MAX_CV",
    "EVIDENCE_UNITS",
    "Finding",
    "FindingError",
    "FindingsMerge",
    "LineError",
    "MERGE_CAUSES",
    "SOURCES",
    "SUPERSEDED_KEYS",
    "append_findings",
    "atomic_write_text",
    "canonical_json",
    "confidence_from_cv",
    "finding_id",
    "fmt",
    "fmt_list",
    "fmt_pct",
    "fmt_ratio",
    "make_finding",
    "merge_findings",
    "parse_timestamp",
    "read_findings",
    "read_findings_lenient",
    "slugify",
    "utc_now_iso",
    "validate_metrics",
    "write_findings",
]

# Confidence thresholds on the coefficient of variation (std / mean) of the
# timing a finding rests on.  Strict upper bounds: cv == 0.05 is "medium".
CONFIDENCE_HIGH_MAX_CV = 0.05
CONFIDENCE_MEDIUM_MAX_CV = 0.10
CONFIDENCE_PUBLISHED = "cited"
CONFIDENCE_LEVELS = ("high", "medium", "low", CONFIDENCE_PUBLISHED)

SOURCES = ("measured", "published")
BACKENDS = ("cpu", "cuda", "metal")

# Evidence metric names must end in a unit: the last "_"-separated token (or the
# whole name) must be one of these.  Dimensionless quantities use "ratio",
# "pct", "x" (speed-up), "count", "cv" or "err" (an error in the data's units).
EVIDENCE_UNITS = frozenset({
    "s", "ms", "us", "ns",
    "tflops", "gflops",
    "gbps", "tbps",
    "bytes", "kib", "mib", "gib", "kb", "mb", "gb",
    "hz", "mhz", "ghz",
    "pct", "ratio", "x", "count", "cv", "err", "ulp",
    "regs", "threads", "tokens",
})

_SLUG_MAX_CHARS = 60
_ID_HASH_HEX_CHARS = 12
_SLUG_RE = re.compile(r"[^a-z0-9]+")
_FIELD_NAMES = (
    "id", "prototype", "title", "claim", "evidence", "config", "answer", "device",
    "backend", "commit", "timestamp", "confidence", "cv", "source",
    "citation", "records", "slug", "superseded",
)
# Present in every line written before `answer` and `superseded` existed.
_REQUIRED_FIELDS = frozenset({"id", "prototype", "title", "claim", "evidence", "config", "device",
                              "backend", "commit", "timestamp", "confidence", "cv", "slug"})
# Provenance, not content: two versions that differ only here say the same thing.
_PROVENANCE_FIELDS = ("timestamp", "commit", "superseded")
#: Keys of ``Finding.superseded``: when it was superseded, the timestamp and commit of
#: what superseded it (the newer version, or the run that retired it), and why.
SUPERSEDED_KEYS = ("at", "by_timestamp", "by_commit", "reason")
# A file with a NUL byte in its first this-many bytes is binary, not JSON lines.
_BINARY_SNIFF_BYTES = 8192
_UTF8_BOM = b"\xef\xbb\xbf"


#: What can produce the new findings of :func:`merge_findings`: a run, or re-deriving from the records.
MERGE_CAUSES = ("run", "rederive")


class FindingError(ValueError):
    """A finding (or a JSONL line holding one) is invalid."""


def slugify(text: str) -> str:
    """Lower-case ``text`` and collapse every non-alphanumeric run into ``-``."""
    if not isinstance(text, str):
        raise TypeError(f"slugify: text must be str, got {type(text).__name__}")
    slug = _SLUG_RE.sub("-", text.lower()).strip("-")
    return slug[:_SLUG_MAX_CHARS].rstrip("-")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace and no NaN/inf (raises ValueError)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with a ``Z`` suffix, second resolution."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def parse_timestamp(timestamp: str) -> _dt.datetime:
    """An ISO 8601 UTC timestamp (``Z`` or ``+00:00``) as an aware datetime, for ordering."""
    return _dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def confidence_from_cv(cv: float) -> str:
    """Map a coefficient of variation (fraction, 0.05 == 5 %) to a confidence level.

    high: cv < 5 %; medium: 5 % <= cv < 10 %; low: cv >= 10 %.
    """
    if isinstance(cv, bool) or not isinstance(cv, (int, float)):
        raise TypeError(f"cv must be a real number, got {type(cv).__name__}")
    if not math.isfinite(cv) or cv < 0:
        raise ValueError(f"cv must be finite and >= 0, got {cv!r}")
    if cv < CONFIDENCE_HIGH_MAX_CV:
        return "high"
    if cv < CONFIDENCE_MEDIUM_MAX_CV:
        return "medium"
    return "low"


#: Significant digits of every number printed in a claim.
CLAIM_DIGITS = 3
# Plain notation for magnitudes in [1e-3, 1e6); scientific outside it.
_PLAIN_MIN_EXP, _PLAIN_MAX_EXP = -3, 6


def fmt(value: float, unit: str = "", digits: int = CLAIM_DIGITS) -> str:
    """``value`` to ``digits`` significant digits, then `` unit``: 0.0123 -> "0.0123", 1234 -> "1230".

    Never "0.0" for a small non-zero number; NaN and infinities print as "nan", "inf", "-inf".
    Python ints are counts and sizes (N=16384, 26 tiles): printed exactly.
    """
    suffix = f" {unit}" if unit else ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}{suffix}"
    value = float(value)
    if not math.isfinite(value):
        return f"{value}{suffix}"
    if value == 0.0:
        return f"0{suffix}"
    exp = math.floor(math.log10(abs(value)))
    rounded = round(value, digits - 1 - exp)
    if rounded != 0.0:
        exp = math.floor(math.log10(abs(rounded)))   # 9.996 rounds to 10.0: one more integer digit
    if not _PLAIN_MIN_EXP <= exp < _PLAIN_MAX_EXP:
        return f"{value:.{digits - 1}e}{suffix}"
    decimals = max(0, digits - 1 - exp)
    return f"{round(value, digits - 1 - exp):.{decimals}f}{suffix}"


def fmt_pct(fraction: float, digits: int = CLAIM_DIGITS) -> str:
    """A fraction as a percentage: 0.0123 -> "1.23 %"."""
    return fmt(100.0 * float(fraction), "%", digits)


def fmt_ratio(ratio: float, digits: int = CLAIM_DIGITS) -> str:
    """A ratio or speed-up: 1.0534 -> "1.05x"."""
    return fmt(ratio, "", digits) + "x"


def fmt_list(values: Iterable[Any], unit: str = "", digits: int = CLAIM_DIGITS) -> str:
    """Numbers (formatted with :func:`fmt`) or other items, comma-separated, then the unit once:
    [512, 1024] -> "512, 1024"; never a Python list literal."""
    parts = [fmt(v, "", digits) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
             for v in values]
    return ", ".join(parts) + (f" {unit}" if unit and parts else "")


def finding_id(prototype: str, slug: str, config: Mapping[str, Any], device: str, backend: str) -> str:
    """Deterministic id: ``<prototype>/<slug>/<12 hex of sha256 over all five parts>``.

    The answer is deliberately not part of it: the id names the question.
    """
    key = canonical_json([prototype, slug, dict(config), device, backend])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:_ID_HASH_HEX_CHARS]
    return f"{prototype}/{slug}/{digest}"


def _require_str(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise FindingError(f"{name} must be str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FindingError(f"{name} must be a non-empty string")
    return value


def _unit_of(metric: str) -> str:
    return metric.rsplit("_", 1)[-1]


def validate_metrics(metrics: Any, *, field: str = "evidence") -> dict[str, float]:
    """Check a non-empty dict of unit-suffixed metric name -> finite number.

    Numpy scalars are converted to Python numbers.  ``field`` names the
    argument in error messages.
    """
    if not isinstance(metrics, Mapping):
        raise FindingError(f"{field} must be a dict of metric name -> number, got {type(metrics).__name__}")
    if not metrics:
        raise FindingError(f"{field} must not be empty: at least one measured or cited number is needed")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise FindingError(f"{field} metric names must be non-empty strings, got {name!r}")
        if _unit_of(name) not in EVIDENCE_UNITS:
            raise FindingError(
                f"{field} metric {name!r} does not end in a unit; end it with one of "
                f"{sorted(EVIDENCE_UNITS)} (e.g. 'median_ms', 'tflops')"
            )
        if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FindingError(f"{field} metric {name!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise FindingError(f"{field} metric {name!r} is {value!r}; NaN/inf metrics are rejected")
        checked[name] = value
    return checked


def _check_json_object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise FindingError(f"{field} must be a dict, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise FindingError(f"{field} keys must be strings, got {key!r}")
    try:
        canonical_json(dict(value))
    except (TypeError, ValueError) as exc:
        raise FindingError(f"{field} must be JSON-serialisable without NaN/inf: {exc}") from None
    return dict(value)


def _check_config(config: Any) -> dict[str, Any]:
    return _check_json_object("config", config)


def _check_timestamp(timestamp: Any, name: str = "timestamp") -> str:
    _require_str(name, timestamp)
    try:
        parsed = parse_timestamp(timestamp)
    except ValueError:
        raise FindingError(f"{name} {timestamp!r} is not ISO 8601") from None
    if parsed.utcoffset() != _dt.timedelta(0):
        raise FindingError(f"{name} {timestamp!r} must be UTC (suffix 'Z' or '+00:00')")
    return timestamp


def _check_superseded(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FindingError(f"superseded must be null or a dict with keys {list(SUPERSEDED_KEYS)}, "
                           f"got {type(value).__name__}")
    missing = set(SUPERSEDED_KEYS) - set(value)
    unknown = set(value) - set(SUPERSEDED_KEYS)
    if missing or unknown:
        raise FindingError(f"superseded keys: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}")
    _check_timestamp(value["at"], "superseded.at")
    _check_timestamp(value["by_timestamp"], "superseded.by_timestamp")
    _require_str("superseded.by_commit", value["by_commit"])
    _require_str("superseded.reason", value["reason"])
    return {key: value[key] for key in SUPERSEDED_KEYS}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One validated finding; construct with :func:`make_finding` or :meth:`from_dict`.

    ``config`` is the question (part of the id), ``answer`` the measured choice
    (not part of the id); see the module doc.  ``records`` lists the ids of the
    sweep records (see :mod:`attnproto.records`) whose numbers the finding rests
    on; the experiment runner checks that each cited record exists and was
    measured on the finding's device and backend.  ``superseded`` is None for
    a live finding and the supersede marker (:data:`SUPERSEDED_KEYS`) for a
    history entry.
    """

    id: str
    prototype: str
    title: str
    claim: str
    evidence: dict[str, float]
    config: dict[str, Any]
    device: str
    backend: str
    commit: str
    timestamp: str
    confidence: str
    cv: float | None
    source: str = "measured"
    citation: str | None = None
    records: tuple[str, ...] = ()
    slug: str = ""
    answer: dict[str, Any] = dataclasses.field(default_factory=dict)
    superseded: dict[str, str] | None = None

    def __post_init__(self) -> None:
        _require_str("prototype", self.prototype)
        if slugify(self.prototype) != self.prototype:
            raise FindingError(f"prototype {self.prototype!r} must be a slug (lower-case a-z, 0-9, '-')")
        _require_str("title", self.title)
        _require_str("claim", self.claim)
        _require_str("slug", self.slug)
        if slugify(self.slug) != self.slug:
            raise FindingError(f"slug {self.slug!r} must be a slug (lower-case a-z, 0-9, '-')")
        object.__setattr__(self, "evidence", validate_metrics(self.evidence, field="evidence"))
        object.__setattr__(self, "config", _check_config(self.config))
        object.__setattr__(self, "answer", _check_json_object("answer", self.answer))
        _require_str("device", self.device)
        if self.backend not in BACKENDS:
            raise FindingError(f"backend {self.backend!r} is not one of {BACKENDS}")
        _require_str("commit", self.commit)
        _check_timestamp(self.timestamp)
        if self.source not in SOURCES:
            raise FindingError(f"source {self.source!r} is not one of {SOURCES}")
        if isinstance(self.records, (str, bytes)) or not isinstance(self.records, Sequence):
            raise FindingError("records must be a sequence of record ids")
        object.__setattr__(self, "records", tuple(self.records))
        for rid in self.records:
            _require_str("records[]", rid)
        if self.source == "published":
            _require_str("citation (required for published findings)", self.citation)
            if self.cv is not None:
                raise FindingError("published findings carry no cv: they were not measured here")
            if self.confidence != CONFIDENCE_PUBLISHED:
                raise FindingError(f"published findings have confidence {CONFIDENCE_PUBLISHED!r}, got {self.confidence!r}")
            if self.records:
                raise FindingError("published findings cannot cite measured records")
        else:
            if self.citation is not None:
                _require_str("citation", self.citation)
            if self.cv is None:
                raise FindingError("measured findings need the cv of the timing they rest on")
            try:
                expected = confidence_from_cv(self.cv)
            except (TypeError, ValueError) as exc:
                raise FindingError(f"cv: {exc}") from None
            if self.confidence != expected:
                raise FindingError(f"confidence {self.confidence!r} does not match cv={self.cv} (expected {expected!r})")
        object.__setattr__(self, "superseded", _check_superseded(self.superseded))
        expected_id = finding_id(self.prototype, self.slug, self.config, self.device, self.backend)
        if self.id != expected_id:
            raise FindingError(f"id {self.id!r} does not match its content (expected {expected_id!r})")

    # ------------------------------------------------------------ versions
    @property
    def is_live(self) -> bool:
        """True unless this is a superseded version (a history entry)."""
        return self.superseded is None

    def content(self) -> dict[str, Any]:
        """What the finding says: every field but ``timestamp``, ``commit`` and ``superseded``."""
        out = self.to_dict()
        for name in _PROVENANCE_FIELDS:
            del out[name]
        return out

    def same_content(self, other: Finding) -> bool:
        """Whether ``other`` says exactly the same thing (it may differ in time, commit, marker)."""
        return canonical_json(self.content()) == canonical_json(other.content())

    def changed_fields(self, other: Finding) -> list[str]:
        """Names of the content fields in which ``other`` differs from this finding."""
        mine, theirs = self.content(), other.content()
        return [name for name in mine if canonical_json(mine[name]) != canonical_json(theirs[name])]

    def version_key(self) -> str:
        """sha256 of this version without its supersede marker (content, timestamp and commit)."""
        data = self.to_dict()
        del data["superseded"]
        return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()

    def superseded_by(self, *, by_timestamp: str, by_commit: str, reason: str, at: str | None = None) -> Finding:
        """This finding as a history entry: superseded at ``at`` (default now) by the version
        (or run) of ``by_timestamp`` / ``by_commit``, for ``reason``."""
        marker = {"at": utc_now_iso() if at is None else at, "by_timestamp": by_timestamp,
                  "by_commit": by_commit, "reason": reason}
        return dataclasses.replace(self, superseded=marker)

    # --------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the JSONL line), keys in a fixed order."""
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        out["records"] = list(self.records)
        out["answer"] = dict(self.answer)
        out["superseded"] = None if self.superseded is None else dict(self.superseded)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Rebuild and re-validate a finding (unknown or missing keys are errors).

        ``answer`` and ``superseded`` may be absent (lines written before they existed).
        """
        if not isinstance(data, Mapping):
            raise FindingError(f"a finding must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(_FIELD_NAMES)
        if unknown:
            raise FindingError(f"unknown finding fields: {sorted(map(str, unknown))}")
        missing = _REQUIRED_FIELDS - set(data)
        if missing:
            raise FindingError(f"missing finding fields: {sorted(missing)}")
        kwargs = {k: data[k] for k in data}
        if kwargs.get("answer") is None:
            kwargs["answer"] = {}
        return cls(**kwargs)


def make_finding(
    *,
    prototype: str,
    title: str,
    claim: str,
    evidence: Mapping[str, float],
    config: Mapping[str, Any],
    device: str,
    backend: str,
    commit: str = "unknown",
    cv: float | None = None,
    source: str = "measured",
    citation: str | None = None,
    records: Iterable[str] = (),
    slug: str | None = None,
    timestamp: str | None = None,
    answer: Mapping[str, Any] | None = None,
) -> Finding:
    """Build a validated :class:`Finding`, deriving id, confidence and timestamp.

    ``config``: the question's parameters only; ``answer``: the measured choice
    (not part of the id; see the module doc).  ``slug`` defaults to
    ``slugify(title)``; pass a stable one when the title contains measured
    numbers or the answer.  ``cv`` is required for measured findings and must
    be omitted for published ones.
    """
    _require_str("title", title)
    if isinstance(records, (str, bytes)):
        raise FindingError("records must be a sequence of record ids, not a single string")
    if cv is not None and getattr(cv, "shape", None) == () and hasattr(cv, "item"):
        cv = cv.item()
    the_slug = slugify(title) if slug is None else slug
    if not the_slug:
        raise FindingError(f"title {title!r} yields an empty slug; pass slug=")
    if source == "published":
        confidence = CONFIDENCE_PUBLISHED
    else:
        if cv is None:
            raise FindingError("measured findings need cv= (the coefficient of variation of their timing)")
        try:
            confidence = confidence_from_cv(cv)
        except (TypeError, ValueError) as exc:
            raise FindingError(f"cv: {exc}") from None
    cfg = _check_config(config)
    return Finding(
        id=finding_id(prototype, the_slug, cfg, device, backend),
        prototype=prototype,
        title=title,
        claim=claim,
        evidence=dict(evidence) if isinstance(evidence, Mapping) else evidence,
        config=cfg,
        device=device,
        backend=backend,
        commit=commit,
        timestamp=utc_now_iso() if timestamp is None else timestamp,
        confidence=confidence,
        cv=cv,
        source=source,
        citation=citation,
        records=tuple(records),
        slug=the_slug,
        answer={} if answer is None else answer,
    )


# -------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class LineError:
    """One unusable line (``line`` is 1-based) or a whole unusable file (``line`` None)."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


def _parse_findings(data: bytes, name: str) -> tuple[list[Finding], list[LineError]]:
    """Findings of JSON-lines ``data`` and one error per bad line (blank lines are skipped)."""
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        return [], [LineError(name, None, "binary file (NUL bytes), not JSON lines; nothing read from it")]
    findings: list[Finding] = []
    errors: list[LineError] = []
    lines = data.split(b"\n")
    last = len(lines)
    if lines and lines[-1] == b"":
        lines.pop()                       # the file ends with a newline
        last = 0                          # so no line is unterminated
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM):]
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(LineError(name, lineno, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                                  f"{exc.start + 1})"))
            continue
        try:
            data_obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if lineno == last:
                message = f"truncated last line (no newline at the end, and not valid JSON: {exc.msg})"
            else:
                message = f"not valid JSON: {exc.msg} (column {exc.colno})"
            errors.append(LineError(name, lineno, message))
            continue
        except RecursionError:
            errors.append(LineError(name, lineno, "not valid JSON: nested too deeply"))
            continue
        try:
            findings.append(Finding.from_dict(data_obj))
        except (FindingError, TypeError, ValueError) as exc:
            errors.append(LineError(name, lineno, str(exc)))
    return findings, errors


def read_findings(path: str | os.PathLike[str]) -> list[Finding]:
    """Read and validate every finding of a JSONL file (blank lines are skipped).

    Raises :class:`FindingError` naming the file and line of the first bad line
    (OSError when the file cannot be read).
    """
    path = Path(path)
    findings, errors = _parse_findings(path.read_bytes(), str(path))
    if errors:
        raise FindingError(str(errors[0]))
    return findings


def read_findings_lenient(path: str | os.PathLike[str]) -> tuple[list[Finding], list[LineError]]:
    """The good findings of a JSONL file and one :class:`LineError` per bad line.

    Never raises for bad input: a directory, an unreadable or missing file and a
    binary file are one error each (with ``line`` None); an invalid line (JSON,
    finding, UTF-8, a truncated last line) is one error naming its line.
    """
    path = Path(path)
    name = str(path)
    if path.is_dir():
        return [], [LineError(name, None, "is a directory, not a findings JSONL file")]
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [LineError(name, None, f"cannot read: {exc.strerror or exc}")]
    return _parse_findings(data, name)


# -------------------------------------------------------------------- writing
def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temp file in the same directory, fsync, rename).

    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_findings(items: Iterable[Any], who: str) -> list[Finding]:
    out = list(items)
    for f in out:
        if not isinstance(f, Finding):
            raise TypeError(f"{who}: expected Finding, got {type(f).__name__}")
    return out


def write_findings(path: str | os.PathLike[str], findings: Iterable[Finding]) -> int:
    """Replace ``path`` atomically with one JSON line per finding; return how many."""
    items = _check_findings(findings, "write_findings")
    atomic_write_text(path, "".join(f.to_json() + "\n" for f in items))
    return len(items)


@contextlib.contextmanager
def _locked(fh: Any):
    try:
        import fcntl  # noqa: PLC0415  (POSIX only)
    except ImportError:
        yield
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def append_findings(path: str | os.PathLike[str], findings: Iterable[Finding]) -> int:
    """Append findings to a JSONL file; return how many lines were written.

    Skipped: a line identical to one in the file, and a live finding whose id is
    live in the file with the same content (a re-confirmation).  Refused
    (:class:`FindingError`, nothing written): a live finding whose id is live in
    the file with *different* content, or twice in ``findings`` with different
    content -- appending it would leave two contradictory live versions; supersede
    with :func:`merge_findings` (results directories) or
    :meth:`attnproto.store.FindingStore.add` instead.  History entries
    (``superseded`` set) are appended unless identical.  The file and its parent
    are created if needed; on POSIX the append holds an exclusive ``flock``.
    """
    items = _check_findings(findings, "append_findings")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh, _locked(fh):
        fh.seek(0)
        existing_bytes = fh.read()
        existing, errors = _parse_findings(existing_bytes, str(path))
        if errors:
            raise FindingError(f"{errors[0]}; refusing to append to a file with unreadable lines")
        lines = {f.to_json() for f in existing}
        live = {f.id: f for f in existing if f.is_live}
        out: list[str] = []
        for f in items:
            line = f.to_json()
            if line in lines:
                continue
            if f.is_live and f.id in live:
                if live[f.id].same_content(f):
                    continue
                raise FindingError(
                    f"{path} already holds a different live finding with id {f.id!r} "
                    f"(changed: {', '.join(live[f.id].changed_fields(f))}); appending would leave two "
                    "contradictory live versions: supersede it with merge_findings or FindingStore.add")
            if f.is_live:
                live[f.id] = f
            lines.add(line)
            out.append(line + "\n")
        if out:
            prefix = b"\n" if existing_bytes and not existing_bytes.endswith(b"\n") else b""
            fh.write(prefix + "".join(out).encode("utf-8"))
    return len(out)


# -------------------------------------------------------------------- merging
@dataclasses.dataclass(frozen=True)
class FindingsMerge:
    """The outcome of :func:`merge_findings`.

    ``live``: the new run's findings (what ``findings.jsonl`` holds).
    ``history``: the previous history, then the versions this merge superseded
    or retired (what ``findings_history.jsonl`` holds), oldest first.
    ``new`` / ``changed`` / ``unchanged``: ids of live findings with no previous
    version, with a different previous version (now in history), with an equal
    one.  ``retired``: ids of previous live findings the new run did not
    produce again (now in history); ``retired_entries``: those history entries
    (to retire them in a findings database too).
    """

    live: tuple[Finding, ...]
    history: tuple[Finding, ...]
    new: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    retired: tuple[str, ...]
    retired_entries: tuple[Finding, ...] = ()


def _unique_live(findings: Iterable[Finding], who: str) -> list[Finding]:
    """``findings`` with identical repeats dropped; two different versions of one id are an error."""
    by_id: dict[str, Finding] = {}
    out = []
    for f in _check_findings(findings, who):
        if not f.is_live:
            raise FindingError(f"{who}: finding {f.id!r} is a superseded version, not a live finding")
        seen = by_id.get(f.id)
        if seen is None:
            by_id[f.id] = f
            out.append(f)
        elif not seen.same_content(f):
            raise FindingError(
                f"two different findings with id {f.id!r} in one run (changed: {', '.join(seen.changed_fields(f))}); "
                "an id names a question: put the measured choice in answer=, not in config= or the slug")
    return out


def merge_findings(
    previous: Iterable[Finding],
    new: Iterable[Finding],
    *,
    history: Iterable[Finding] = (),
    timestamp: str | None = None,
    commit: str = "unknown",
    at: str | None = None,
    cause: str = "run",
) -> FindingsMerge:
    """Merge a results directory's previous findings with a new, completed run's.

    ``previous``: the live findings of the previous run (its ``findings.jsonl``);
    ``history``: its ``findings_history.jsonl``; ``new``: the new run's findings;
    ``timestamp`` / ``commit``: the new run's (default now / "unknown"); ``at``: the
    time of superseding (default now).

    The new run's findings are all live.  A previous finding is dropped when the
    new run produced it again with the same content; superseded (into history,
    by the new version's timestamp and commit) when it says something else; and
    retired (into history, by the run) when the run did not produce its id again:
    the records it cited are gone with the previous records.jsonl, and a live
    finding must cite records beside it.  Identical history entries are kept once.

    ``cause``: what produced ``new``, for the supersede reasons: ``"run"`` (a new
    measurement) or ``"rederive"`` (the finding generators re-run over the same records,
    ``attnproto kb rederive``).
    """
    if cause not in MERGE_CAUSES:
        raise ValueError(f"cause must be one of {MERGE_CAUSES}, got {cause!r}")
    live = _unique_live(new, "merge_findings")
    by_id = {f.id: f for f in live}
    run_ts = utc_now_iso() if timestamp is None else _check_timestamp(timestamp, "timestamp")
    at = utc_now_iso() if at is None else at
    out_history: list[Finding] = []
    seen_versions: set[str] = set()

    def keep(entry: Finding) -> None:
        line = entry.to_json()
        if line not in seen_versions:
            seen_versions.add(line)
            out_history.append(entry)

    for h in _check_findings(history, "merge_findings"):
        if h.is_live:
            raise FindingError(f"history entry {h.id!r} has no superseded marker")
        keep(h)
    changed: list[str] = []
    unchanged: list[str] = []
    retired: list[Finding] = []
    for old in _check_findings(previous, "merge_findings"):
        if not old.is_live:          # a history entry that sat among the live findings
            keep(old)
            continue
        current = by_id.get(old.id)
        if current is not None and current.same_content(old):
            unchanged.append(old.id)
        elif current is not None:
            what = "re-run" if cause == "run" else "re-derived from the same records"
            keep(old.superseded_by(by_timestamp=current.timestamp, by_commit=current.commit, at=at,
                                   reason=f"{what} changed {', '.join(old.changed_fields(current))}"))
            changed.append(old.id)
        else:
            if cause == "run":
                reason = (f"retired: the run of {run_ts} (commit {commit[:12]}) did not produce this finding "
                          "again, and the records it cited were replaced")
            else:
                reason = (f"retired: re-derived from the same records at {run_ts} (commit {commit[:12]}), the "
                          "finding generators no longer produce this finding")
            entry = old.superseded_by(by_timestamp=run_ts, by_commit=commit, at=at, reason=reason)
            keep(entry)
            retired.append(entry)
    known = set(changed) | set(unchanged)
    return FindingsMerge(
        live=tuple(live),
        history=tuple(out_history),
        new=tuple(f.id for f in live if f.id not in known),
        changed=tuple(dict.fromkeys(changed)),
        unchanged=tuple(dict.fromkeys(unchanged)),
        retired=tuple(dict.fromkeys(f.id for f in retired)),
        retired_entries=tuple(retired),
    )
