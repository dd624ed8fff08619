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

    A finding's ``answer`` (the measured choice, see :mod:`attnproto.findings`)
    is indexed like its config (``key=value`` pairs, aliases, topic words).

Live findings and history (never first-write-wins)
    The ``findings`` table holds one *live* finding per id; :meth:`query`,
    :meth:`get`, :meth:`list` and :meth:`stats` serve only those.  Adding a
    finding whose id is stored with identical content (timestamp and commit
    aside) changes nothing; with different content the newer one (by
    timestamp; on a tie the one being added) is live and the other goes to the
    ``history`` table, marked superseded (when, by which timestamp and commit,
    why).  Superseded findings (history entries, e.g. from a results directory's
    ``findings_history.jsonl``) go straight to the history and are never served
    as live.  :meth:`history` returns an id's superseded versions;
    :meth:`remove` deletes an id's live finding and history.

Schema
    Version 2 (live + history tables, the answer indexed).  A version-1
    database is migrated in place when opened; a newer version is refused.
    Readers open with ``create=False``, which never creates a database (nor its
    directory) and raises :class:`MissingDatabaseError` instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .findings import Finding, parse_timestamp, read_findings, utc_now_iso

__all__ = [
    "AddResult",
    "CONFIG_ALIASES",
    "DEFAULT_QUERY_LIMIT",
    "FindingStore",
    "MissingDatabaseError",
    "SCHEMA_VERSION",
    "StoreError",
    "config_search_text",
    "default_db_path",
    "fts5_available",
    "tokenize",
]

SCHEMA_VERSION = "2"
# Versions this attnproto migrates in place when it opens them.
_MIGRATABLE = ("1",)
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
    search_text TEXT NOT NULL,
    answer_text TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS findings_prototype ON findings(prototype);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    version_key TEXT NOT NULL,
    superseded_at TEXT NOT NULL,
    by_timestamp TEXT NOT NULL,
    by_commit TEXT NOT NULL,
    reason TEXT NOT NULL,
    finding_json TEXT NOT NULL,
    UNIQUE (id, version_key)
);
CREATE INDEX IF NOT EXISTS history_id ON history(id);
"""
_FTS_COLUMNS = ("id", "title", "claim", "config", "answer", "device", "prototype", "backend")
_FTS_SCHEMA = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS findings_fts USING fts5("
    "id UNINDEXED, title, claim, config, answer, device, prototype, backend, "
    "tokenize = 'porter unicode61')"
)
_FTS_INSERT = ("INSERT INTO findings_fts(id, title, claim, config, answer, device, prototype, backend) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# Set while rows changed without the FTS index being maintained (FTS5 missing or disabled).
_META_FTS_STALE = "fts_stale"
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


class MissingDatabaseError(StoreError):
    """A reader asked for a database that does not exist (nothing was created)."""


class AddResult(NamedTuple):
    """What :meth:`FindingStore.add` did.

    added: findings that became live for an id with no live finding.
    superseded: versions that went to the history (a replaced live finding, an
    older incoming one, an incoming history entry), one per version.
    unchanged: findings already stored with the same content (or as that exact
    superseded version), so nothing changed.
    """

    added: int
    superseded: int
    unchanged: int


def _row_texts(f: Finding) -> tuple[str, str, str]:
    config_text = config_search_text(f.config)
    answer_text = config_search_text(f.answer)
    search_text = " " + " ".join(
        tokenize(" ".join((f.title, f.claim, config_text, answer_text, f.device, f.prototype, f.backend)))
    ) + " "
    return config_text, answer_text, search_text


def _changes(old: Finding, new: Finding) -> str:
    return ", ".join(old.changed_fields(new)) or "nothing"


class FindingStore:
    """A findings database.  Use as a context manager or call :meth:`close`.

    ``fts``: None = use FTS5 when this SQLite has it; False = force the LIKE
    fallback (also what happens without FTS5); True = require FTS5.
    ``create``: False for readers -- a missing database raises
    :class:`MissingDatabaseError` and nothing is created.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, fts: bool | None = None,
                 create: bool = True) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"database path {self.path} is a directory")
        if not create and not self.path.exists():
            raise MissingDatabaseError(f"no findings database at {self.path}; add findings with `attnproto kb add`")
        if create:
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
            # Autocommit mode: transactions are explicit (_transaction), DDL included.
            self._conn = sqlite3.connect(str(self.path), isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open findings database {self.path}: {exc}") from None
        try:
            self._init_schema()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot open findings database {self.path}: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> FindingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    # -------------------------------------------------------------- schema
    @contextlib.contextmanager
    def _transaction(self, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """One explicit transaction; IMMEDIATE (write lock up front) unless only reading is likely."""
        self._conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _version(self) -> str | None:
        has_meta = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            return None
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else row[0]

    def _init_schema(self) -> None:
        # Deferred: opening a current database to read it takes no write lock.
        with self._transaction(immediate=False) as conn:
            version = self._version()
            if version is None:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                             (SCHEMA_VERSION,))
            elif version in _MIGRATABLE:
                self._migrate_from_v1()
            elif version != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}, this attnproto reads "
                                 f"{SCHEMA_VERSION} (and migrates {', '.join(_MIGRATABLE)}); use a newer "
                                 "attnproto or another --db")
            if self.uses_fts:
                self._sync_fts()

    def _migrate_from_v1(self) -> None:
        """Version 1 -> 2: add the answer column and the history table, re-derive every row's
        search texts, and mark the FTS index for a rebuild (its columns changed)."""
        conn = self._conn
        conn.execute("ALTER TABLE findings ADD COLUMN answer_text TEXT NOT NULL DEFAULT ''")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        rows = conn.execute("SELECT id, finding_json FROM findings").fetchall()
        for fid, text in rows:
            config_text, answer_text, search_text = _row_texts(Finding.from_dict(json.loads(text)))
            conn.execute("UPDATE findings SET config_text = ?, answer_text = ?, search_text = ? WHERE id = ?",
                         (config_text, answer_text, search_text, fid))
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, '1')", (_META_FTS_STALE,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))

    def _sync_fts(self) -> None:
        """Create the FTS index, or rebuild it when its columns are old or rows changed without it."""
        conn = self._conn
        row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'findings_fts'").fetchone()
        if row is not None and " answer," not in row[0]:
            conn.execute("DROP TABLE findings_fts")           # version-1 columns
            row = None
        conn.execute(_FTS_SCHEMA)
        stale = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_FTS_STALE,)).fetchone()
        (n_rows,) = conn.execute("SELECT count(*) FROM findings").fetchone()
        (n_fts,) = conn.execute("SELECT count(*) FROM findings_fts").fetchone()
        if row is not None and stale is None and n_rows == n_fts:
            return
        conn.execute("DELETE FROM findings_fts")
        conn.execute(
            "INSERT INTO findings_fts(id, title, claim, config, answer, device, prototype, backend) "
            "SELECT id, title, claim, config_text, answer_text, device, prototype, backend FROM findings"
        )
        conn.execute("DELETE FROM meta WHERE key = ?", (_META_FTS_STALE,))

    # ------------------------------------------------------------- writing
    def _fts_changed(self) -> None:
        if not self.uses_fts:
            self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, '1')", (_META_FTS_STALE,))

    def _put_live(self, f: Finding, *, replace: bool) -> None:
        config_text, answer_text, search_text = _row_texts(f)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self._conn.execute(
            f"{verb} INTO findings(id, prototype, title, claim, device, backend, confidence, source, commit_sha, "
            "timestamp, config_text, answer_text, finding_json, search_text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (f.id, f.prototype, f.title, f.claim, f.device, f.backend, f.confidence, f.source,
             f.commit, f.timestamp, config_text, answer_text, f.to_json(), search_text),
        )
        if self.uses_fts:
            self._conn.execute("DELETE FROM findings_fts WHERE id = ?", (f.id,))
            self._conn.execute(_FTS_INSERT, (f.id, f.title, f.claim, config_text, answer_text, f.device,
                                             f.prototype, f.backend))
        else:
            self._fts_changed()

    def _delete_live(self, finding_id: str) -> int:
        cur = self._conn.execute("DELETE FROM findings WHERE id = ?", (finding_id,))
        if cur.rowcount:
            if self.uses_fts:
                self._conn.execute("DELETE FROM findings_fts WHERE id = ?", (finding_id,))
            else:
                self._fts_changed()
        return cur.rowcount

    def _in_history(self, f: Finding) -> bool:
        return self._conn.execute("SELECT 1 FROM history WHERE id = ? AND version_key = ?",
                                  (f.id, f.version_key())).fetchone() is not None

    def _put_history(self, f: Finding) -> int:
        """Store a superseded version (once per exact version); return 1 if it was new."""
        marker = f.superseded
        assert marker is not None
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO history(id, version_key, superseded_at, by_timestamp, by_commit, reason, "
            "finding_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (f.id, f.version_key(), marker["at"], marker["by_timestamp"], marker["by_commit"], marker["reason"],
             f.to_json()),
        )
        return cur.rowcount

    def _live(self, finding_id: str) -> Finding | None:
        row = self._conn.execute("SELECT finding_json FROM findings WHERE id = ?", (finding_id,)).fetchone()
        return None if row is None else Finding.from_dict(json.loads(row[0]))

    def add(self, findings: Iterable[Finding]) -> AddResult:
        """Add findings in one transaction, superseding by timestamp (see the module doc)."""
        items = list(findings)
        for f in items:
            if not isinstance(f, Finding):
                raise TypeError(f"FindingStore.add: expected Finding, got {type(f).__name__}")
        added = superseded = unchanged = 0
        now = utc_now_iso()
        with self._transaction():
            for f in items:
                stored = self._live(f.id)
                if not f.is_live:
                    # A history entry: it is superseded, whatever is live.  A live finding here
                    # that says the same and is no newer than what superseded the entry is
                    # superseded too (e.g. a finding a later run retired): it stops being live.
                    if (stored is not None and stored.same_content(f)
                            and parse_timestamp(stored.timestamp) <= parse_timestamp(f.superseded["by_timestamp"])):
                        self._delete_live(f.id)
                        if stored.version_key() != f.version_key():
                            marker = f.superseded
                            self._put_history(stored.superseded_by(
                                by_timestamp=marker["by_timestamp"], by_commit=marker["by_commit"], at=now,
                                reason=marker["reason"]))
                    n = self._put_history(f)
                    superseded += n
                    unchanged += 1 - n
                    continue
                if stored is None:
                    if self._in_history(f):
                        unchanged += 1          # this exact version is known to be superseded
                    else:
                        self._put_live(f, replace=False)
                        added += 1
                    continue
                if stored.same_content(f) or self._in_history(f):
                    unchanged += 1
                    continue
                if parse_timestamp(f.timestamp) >= parse_timestamp(stored.timestamp):
                    self._put_history(stored.superseded_by(
                        by_timestamp=f.timestamp, by_commit=f.commit, at=now,
                        reason=f"superseded by the version of {f.timestamp} (changed {_changes(stored, f)})"))
                    self._put_live(f, replace=True)
                else:
                    self._put_history(f.superseded_by(
                        by_timestamp=stored.timestamp, by_commit=stored.commit, at=now,
                        reason=f"older than the stored version of {stored.timestamp} "
                               f"(which changed {_changes(f, stored)})"))
                superseded += 1
        return AddResult(added, superseded, unchanged)

    def add_file(self, path: str | os.PathLike[str]) -> AddResult:
        """Validate every line of a findings JSONL file, then add them all (one transaction).

        Strict: a bad line raises FindingError and nothing is added (``attnproto kb
        add`` instead adds the good lines, see read_findings_lenient).
        """
        return self.add(read_findings(path))

    def remove(self, finding_id: str) -> tuple[int, int]:
        """Delete an id's live finding and its history; return (live removed 0/1, history entries removed)."""
        with self._transaction():
            live = self._delete_live(finding_id)
            history = self._conn.execute("DELETE FROM history WHERE id = ?", (finding_id,)).rowcount
        return live, history

    # ------------------------------------------------------------- reading
    def get(self, finding_id: str) -> Finding | None:
        """The live finding with this id (None when there is none; superseded versions: :meth:`history`)."""
        return self._live(finding_id)

    def history(self, finding_id: str) -> list[Finding]:
        """The superseded versions of an id, in the order they were superseded."""
        rows = self._conn.execute("SELECT finding_json FROM history WHERE id = ? ORDER BY superseded_at, seq",
                                  (finding_id,)).fetchall()
        return [Finding.from_dict(json.loads(r[0])) for r in rows]

    def list(self, *, prototype: str | None = None) -> list[Finding]:
        """Every live finding (of one prototype), by prototype then id."""
        if prototype is None:
            rows = self._conn.execute("SELECT finding_json FROM findings ORDER BY prototype, id").fetchall()
        else:
            rows = self._conn.execute("SELECT finding_json FROM findings WHERE prototype = ? ORDER BY id",
                                      (prototype,)).fetchall()
        return [Finding.from_dict(json.loads(r[0])) for r in rows]

    def __len__(self) -> int:
        return self._conn.execute("SELECT count(*) FROM findings").fetchone()[0]

    def history_count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM history").fetchone()[0]

    def query(self, text: str, *, limit: int = DEFAULT_QUERY_LIMIT) -> list[Finding]:
        """Live findings matching every term of ``text`` (see module doc), best first."""
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
        """Live totals and counts per prototype/device/backend/confidence/source, the number of
        superseded versions kept as history, plus engine info."""
        out: dict[str, Any] = {
            "path": str(self.path),
            "sqlite_version": sqlite3.sqlite_version,
            "schema_version": SCHEMA_VERSION,
            "search": self.search_engine,
            "total": len(self),
            "history": self.history_count(),
        }
        for column in _STATS_COLUMNS:
            rows = self._conn.execute(
                f"SELECT {column}, count(*) FROM findings GROUP BY {column} ORDER BY count(*) DESC, {column}"
            ).fetchall()
            out[f"by_{column}"] = dict(rows)
        return out
