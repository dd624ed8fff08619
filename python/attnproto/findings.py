"""Findings: the unit of knowledge attnproto produces.

A :class:`Finding` is one claim backed by numbers: "on device X with backend Y,
config Z gives W".  Findings are written as JSON lines and ingested by the
findings store (:mod:`attnproto.store`).

Identity
    ``Finding.id`` is a pure function of (prototype, slug, config, device,
    backend).  The slug defaults to a slug of the title; experiments whose
    titles contain measured numbers must pass a stable ``slug`` so that a re-run
    on the same device produces the same id.

Idempotent JSONL
    :func:`append_findings` never writes an id that is already in the file
    (nor the same id twice in one call): the **first write wins**.  A re-run
    that measures different numbers for the same id leaves the old line in
    place; to re-record, delete the line (or the file) first.

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
    "SOURCES",
    "append_findings",
    "canonical_json",
    "confidence_from_cv",
    "finding_id",
    "make_finding",
    "read_findings",
    "slugify",
    "utc_now_iso",
    "validate_metrics",
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
    "id", "prototype", "title", "claim", "evidence", "config", "device",
    "backend", "commit", "timestamp", "confidence", "cv", "source",
    "citation", "records", "slug",
)


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


def finding_id(prototype: str, slug: str, config: Mapping[str, Any], device: str, backend: str) -> str:
    """Deterministic id: ``<prototype>/<slug>/<12 hex of sha256 over all five parts>``."""
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


def _check_config(config: Any) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise FindingError(f"config must be a dict, got {type(config).__name__}")
    for key in config:
        if not isinstance(key, str):
            raise FindingError(f"config keys must be strings, got {key!r}")
    try:
        canonical_json(dict(config))
    except (TypeError, ValueError) as exc:
        raise FindingError(f"config must be JSON-serialisable without NaN/inf: {exc}") from None
    return dict(config)


def _check_timestamp(timestamp: Any) -> str:
    _require_str("timestamp", timestamp)
    try:
        parsed = _dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        raise FindingError(f"timestamp {timestamp!r} is not ISO 8601") from None
    if parsed.utcoffset() != _dt.timedelta(0):
        raise FindingError(f"timestamp {timestamp!r} must be UTC (suffix 'Z' or '+00:00')")
    return timestamp


@dataclasses.dataclass(frozen=True)
class Finding:
    """One validated finding; construct with :func:`make_finding` or :meth:`from_dict`.

    ``records`` lists the ids of the sweep records (see :mod:`attnproto.records`)
    whose numbers the finding rests on; the experiment runner checks that each
    cited record exists and was measured on the finding's device and backend.
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
        expected_id = finding_id(self.prototype, self.slug, self.config, self.device, self.backend)
        if self.id != expected_id:
            raise FindingError(f"id {self.id!r} does not match its content (expected {expected_id!r})")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the JSONL line), keys in a fixed order."""
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        out["records"] = list(self.records)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Rebuild and re-validate a finding (unknown or missing keys are errors)."""
        if not isinstance(data, Mapping):
            raise FindingError(f"a finding must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(_FIELD_NAMES)
        if unknown:
            raise FindingError(f"unknown finding fields: {sorted(unknown)}")
        required = {"id", "prototype", "title", "claim", "evidence", "config", "device",
                    "backend", "commit", "timestamp", "confidence", "cv", "slug"}
        missing = required - set(data)
        if missing:
            raise FindingError(f"missing finding fields: {sorted(missing)}")
        return cls(**{k: data[k] for k in data})


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
) -> Finding:
    """Build a validated :class:`Finding`, deriving id, confidence and timestamp.

    ``slug`` defaults to ``slugify(title)``; pass a stable one when the title
    contains measured numbers.  ``cv`` is required for measured findings and
    must be omitted for published ones.
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
    )


def read_findings(path: str | os.PathLike[str]) -> list[Finding]:
    """Read and validate every finding of a JSONL file (blank lines are skipped).

    Raises :class:`FindingError` naming the file and line of the first bad line.
    """
    path = Path(path)
    findings: list[Finding] = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                findings.append(Finding.from_dict(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FindingError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
            except (FindingError, TypeError) as exc:
                raise FindingError(f"{path}:{lineno}: {exc}") from None
    return findings


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


def _ids_in(text: str, name: str) -> set[str]:
    ids: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FindingError(f"{name}:{lineno}: existing line has no readable 'id'; refusing to append") from None
    return ids


def append_findings(path: str | os.PathLike[str], findings: Iterable[Finding]) -> int:
    """Append findings whose id is not yet in ``path``; return how many were written.

    First write wins: an id already present is skipped even if its content
    differs.  The file (and its parent directory) is created if needed; on
    POSIX the append holds an exclusive ``flock`` so concurrent writers do not
    duplicate ids.
    """
    items = list(findings)
    for f in items:
        if not isinstance(f, Finding):
            raise TypeError(f"append_findings: expected Finding, got {type(f).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("a+", encoding="utf-8") as fh, _locked(fh):
        fh.seek(0)
        existing = fh.read()
        seen = _ids_in(existing, str(path))
        if existing and not existing.endswith("\n"):
            fh.write("\n")
        for f in items:
            if f.id in seen:
                continue
            fh.write(f.to_json() + "\n")
            seen.add(f.id)
            written += 1
    return written
