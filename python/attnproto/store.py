"""SQLite findings store with full-text search.

Search model
    Each finding is indexed over its title, claim, config, device, prototype
    and backend.  The config is rendered as ``key=value`` pairs plus short
    aliases for the usual attention symbols (``head_dim=128`` also appears as
    ``D=128``, see :data:`CONFIG_ALIASES`).  A query is split on whitespace;
    each whitespace-separated term must match, and a term made of several
    words (``D=128`` -> ``d``, ``128``) must match them as an adjacent phrase.
    So ``tile size D=128`` finds findings mentioning "tile" and "size" whose
    config (or text) has ``D=128`` -- and not a finding with ``D=64`` and
    ``N=128``.

Engines
    With FTS5 (the normal case) matching is done by an FTS5 table with the
    ``porter unicode61`` tokenizer (stemmed: "tiles" matches "tile"), ranked
    by bm25.  Where the SQLite build lacks FTS5 the store falls back to
    whole-word ``LIKE`` matching over a normalised text column (no stemming,
    newest first) and :meth:`FindingStore.stats` says so.

Adding is idempotent by finding id: an id already stored is skipped.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .findings import Finding, read_findings

__all__ = [
    "CONFIG_ALIASES",
    "DEFAULT_QUERY_LIMIT",
    "FindingStore",
    "StoreError",
    "config_search_text",
    "default_db_path",
    "fts5_available",
    "tokenize",
]

SCHEMA_VERSION = "1"
DEFAULT_QUERY_LIMIT = 20
ENV_DB = "ATTNPROTO_KB"

# Config keys (case-insensitive) that are also indexed under the symbol the
# attention literature uses for them.
CONFIG_ALIASES = {
    "batch": "B",
    "num_heads": "H",
    "num_kv_heads": "Hkv",
    "seq_len": "N",
    "seq_q": "Nq",
    "seq_kv": "Nkv",
    "head_dim": "D",
    "block_r": "Br",
    "block_c": "Bc",
    "block_size": "block",
}

# Same word definition as FTS5's unicode61 tokenizer: letters and digits;
# "_" and punctuation separate words.
_WORD_RE = re.compile(r"[^\W_]+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS findings (
    id TEXT PRIMARY KEY,
    prototype TEXT NOT NULL,
    title TEXT NOT NULL,
    claim TEXT NOT NULL,
    device TEXT NOT NULL,
    backend TEXT NOT NULL,
    confidence TEXT NOT NULL,
    source TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    config_text TEXT NOT NULL,
    finding_json TEXT NOT NULL,
    search_text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_prototype ON findings(prototype);
"""
_FTS_SCHEMA = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS findings_fts USING fts5("
    "id UNINDEXED, title, claim, config, device, prototype, backend, "
    "tokenize = 'porter unicode61')"
)
_STATS_COLUMNS = ("prototype", "device", "backend", "confidence", "source")


class StoreError(RuntimeError):
    """The store cannot be opened or used (bad path, incompatible schema, bad query)."""


def default_db_path() -> Path:
    """``$ATTNPROTO_KB``, else ``$XDG_DATA_HOME/attnproto/kb.sqlite`` (``~/.local/share/...``)."""
    env = os.environ.get(ENV_DB)
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "attnproto" / "kb.sqlite"


def fts5_available() -> tuple[bool, str]:
    """Whether this SQLite build has FTS5, and the reason when it has not."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.OperationalError as exc:
        return False, str(exc)
    finally:
        conn.close()
    return True, ""


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters/digits; everything else separates)."""
    return _WORD_RE.findall(text.lower())


def _format_config_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_format_config_value(v) for v in value)
    return str(value)


#: Words a config implies without spelling them: a config with tile dimensions is about "tile size".
CONFIG_TOPICS = {"block_r": "tile size", "block_c": "tile size", "chunk_size": "chunk size",
                 "block_size": "page block size"}


def config_search_text(config: Mapping[str, Any], _prefix: str = "") -> str:
    """Render a config as searchable ``key=value`` pairs, with symbol aliases and the
    topic words of :data:`CONFIG_TOPICS` (once each).

    Nested dicts become ``outer.inner=value``.
    """
    parts: list[str] = []
    if not _prefix:
        topics = dict.fromkeys(CONFIG_TOPICS[k] for k in map(str, config) if k in CONFIG_TOPICS)
        parts.extend(topics)
    for key in sorted(config):
        value = config[key]
        name = f"{_prefix}{key}"
        if isinstance(value, Mapping):
            parts.append(config_search_text(value, _prefix=f"{name}."))
            continue
        rendered = _format_config_value(value)
        parts.append(f"{name}={rendered}")
        alias = CONFIG_ALIASES.get(str(key).lower()) if not _prefix else None
        if alias is not None:
            parts.append(f"{alias}={rendered}")
    return " ".join(p for p in parts if p)


def _query_terms(query: str) -> list[list[str]]:
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__}")
    terms = [tokenize(term) for term in query.split()]
    terms = [t for t in terms if t]
    if not terms:
        raise StoreError(f"query {query!r} has no searchable words (letters or digits)")
    return terms


class FindingStore:
    """A findings database.  Use as a context manager or call :meth:`close`.

    ``fts``: None = use FTS5 when this SQLite has it; False = force the LIKE
    fallback (also what happens without FTS5); True = require FTS5.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, fts: bool | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"database path {self.path} is a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        have_fts, reason = fts5_available()
        if fts is True and not have_fts:
            raise StoreError(f"FTS5 requested but this SQLite ({sqlite3.sqlite_version}) lacks it: {reason}")
        self.uses_fts = have_fts and fts is not False
        if self.uses_fts:
            self.search_engine = "fts5"
        elif not have_fts:
            self.search_engine = f"like (FTS5 not available in SQLite {sqlite3.sqlite_version}: {reason})"
        else:
            self.search_engine = "like (FTS5 disabled by caller)"
        try:
            self._conn = sqlite3.connect(str(self.path))
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open findings database {self.path}: {exc}") from None

    def __enter__(self) -> FindingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _init_schema(self) -> None:
        with self._conn:
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {row[0]}, this attnproto reads {SCHEMA_VERSION}")
            if self.uses_fts:
                self._conn.execute(_FTS_SCHEMA)
                self._resync_fts()

    def _resync_fts(self) -> None:
        """Rebuild the FTS index if rows were added while FTS5 was not in use."""
        (n_rows,) = self._conn.execute("SELECT count(*) FROM findings").fetchone()
        (n_fts,) = self._conn.execute("SELECT count(*) FROM findings_fts").fetchone()
        if n_rows == n_fts:
            return
        self._conn.execute("DELETE FROM findings_fts")
        self._conn.execute(
            "INSERT INTO findings_fts(id, title, claim, config, device, prototype, backend) "
            "SELECT id, title, claim, config_text, device, prototype, backend FROM findings"
        )

    def add(self, findings: Iterable[Finding]) -> tuple[int, int]:
        """Insert findings; return (added, skipped because the id is already stored)."""
        added = skipped = 0
        with self._conn:
            for f in findings:
                if not isinstance(f, Finding):
                    raise TypeError(f"FindingStore.add: expected Finding, got {type(f).__name__}")
                config_text = config_search_text(f.config)
                search_text = " " + " ".join(
                    tokenize(" ".join((f.title, f.claim, config_text, f.device, f.prototype, f.backend)))
                ) + " "
                cur = self._conn.execute(
                    "INSERT OR IGNORE INTO findings(id, prototype, title, claim, device, backend, confidence, "
                    "source, commit_sha, timestamp, config_text, finding_json, search_text) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.id, f.prototype, f.title, f.claim, f.device, f.backend, f.confidence, f.source,
                     f.commit, f.timestamp, config_text, f.to_json(), search_text),
                )
                if cur.rowcount == 0:
                    skipped += 1
                    continue
                added += 1
                if self.uses_fts:
                    self._conn.execute(
                        "INSERT INTO findings_fts(id, title, claim, config, device, prototype, backend) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (f.id, f.title, f.claim, config_text, f.device, f.prototype, f.backend),
                    )
        return added, skipped

    def add_file(self, path: str | os.PathLike[str]) -> tuple[int, int]:
        """Validate every line of a findings JSONL file, then add them all (one transaction)."""
        return self.add(read_findings(path))

    def get(self, finding_id: str) -> Finding | None:
        row = self._conn.execute("SELECT finding_json FROM findings WHERE id = ?", (finding_id,)).fetchone()
        return None if row is None else Finding.from_dict(json.loads(row[0]))

    def __len__(self) -> int:
        return self._conn.execute("SELECT count(*) FROM findings").fetchone()[0]

    def query(self, text: str, *, limit: int = DEFAULT_QUERY_LIMIT) -> list[Finding]:
        """Findings matching every term of ``text`` (see module doc), best first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        terms = _query_terms(text)
        if self.uses_fts:
            # Each term becomes an FTS5 phrase of its words; words are [^\W_]+ so
            # they need no escaping inside the double quotes.
            match = " AND ".join('"' + " ".join(words) + '"' for words in terms)
            rows = self._conn.execute(
                "SELECT f.finding_json FROM findings_fts JOIN findings f ON f.id = findings_fts.id "
                "WHERE findings_fts MATCH ? ORDER BY bm25(findings_fts), f.id LIMIT ?",
                (match, limit),
            ).fetchall()
        else:
            clauses = " AND ".join("search_text LIKE ?" for _ in terms)
            params = [f"% {' '.join(words)} %" for words in terms]
            rows = self._conn.execute(
                f"SELECT finding_json FROM findings WHERE {clauses} ORDER BY timestamp DESC, id LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [Finding.from_dict(json.loads(r[0])) for r in rows]

    def stats(self) -> dict[str, Any]:
        """Totals and counts per prototype/device/backend/confidence/source, plus engine info."""
        out: dict[str, Any] = {
            "path": str(self.path),
            "sqlite_version": sqlite3.sqlite_version,
            "search": self.search_engine,
            "total": len(self),
        }
        for column in _STATS_COLUMNS:
            rows = self._conn.execute(
                f"SELECT {column}, count(*) FROM findings GROUP BY {column} ORDER BY count(*) DESC, {column}"
            ).fetchall()
            out[f"by_{column}"] = dict(rows)
        return out
