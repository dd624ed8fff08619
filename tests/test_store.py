"""attnproto.store: add (superseding) / query / history / remove / stats, FTS5 and the LIKE fallback, schema."""
from __future__ import annotations

import json
import sqlite3

import pytest

from attnproto.findings import append_findings, make_finding, slugify
from attnproto.store import (
    SCHEMA_VERSION,
    FindingStore,
    MissingDatabaseError,
    StoreError,
    config_search_text,
    default_db_path,
    fts5_available,
    tokenize,
)

HAVE_FTS5, _ = fts5_available()
# Run every search test on both engines (the fallback must match the same way).
ENGINES = [pytest.param(None, id="fts5", marks=pytest.mark.skipif(not HAVE_FTS5, reason="SQLite lacks FTS5")),
           pytest.param(False, id="like")]


def _f(title, config, *, prototype="flash", device="NVIDIA H100 80GB HBM3", backend="cuda", cv=0.02,
       claim="measured on the sweep", answer=None, timestamp=None, tflops=100.0, commit="unknown"):
    return make_finding(prototype=prototype, title=title, claim=claim, evidence={"tflops": tflops},
                        config=config, device=device, backend=backend, cv=cv, records=["x/0"], answer=answer,
                        timestamp=timestamp, commit=commit, slug=slugify(title))


@pytest.fixture()
def corpus():
    return {
        "tile128": _f("tile size sweep", {"head_dim": 128, "block_r": 64, "block_c": 64}),
        "tile64": _f("tile size sweep", {"head_dim": 64, "seq_len": 128, "block_r": 64}),
        "paged128": _f("paged decode page size", {"head_dim": 128, "block_size": 16}, prototype="paged"),
        "text128": _f("tile size on Apple", {"variant": "base"}, device="Apple M4", backend="metal",
                      claim="D=128 prefers 32x32 tiles", cv=0.07),
        "cpu": _f("tiles on the host", {"head_dim": 1280}, device="cpu", backend="cpu", cv=0.2),
    }


@pytest.mark.parametrize("fts", ENGINES)
def test_tile_size_d128_example(tmp_path, corpus, fts):
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        assert store.add(corpus.values()) == (len(corpus), 0, 0)
        hits = {f.id for f in store.query("tile size D=128")}
    # head_dim 128 via the D alias, or "D=128" in the claim; not D=64 with N=128,
    # not a paged finding without "tile", not head_dim=1280.
    assert hits == {corpus["tile128"].id, corpus["text128"].id}


@pytest.mark.parametrize("fts", ENGINES)
@pytest.mark.parametrize("query, expected", [
    ("head_dim=128", {"tile128", "paged128"}),
    ("D=64", {"tile64"}),
    ("N=128", {"tile64"}),
    ("Br=64 Bc=64", {"tile128"}),
    ("block=16", {"paged128"}),
    ("apple m4", {"text128"}),
    ("H100 paged", {"paged128"}),
    ("cuda D=1280", set()),
    ("cpu", {"cpu"}),
    ("SIZE", {"tile128", "tile64", "paged128", "text128"}),
    ("nothing-like-this", set()),
])
def test_query_terms(tmp_path, corpus, fts, query, expected):
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        store.add(corpus.values())
        hits = {f.id for f in store.query(query)}
    assert hits == {corpus[k].id for k in expected}


@pytest.mark.skipif(not HAVE_FTS5, reason="SQLite lacks FTS5")
def test_fts_stems_words(tmp_path, corpus):
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add(corpus.values())
        assert corpus["cpu"].id in {f.id for f in store.query("tile host")}


def test_add_is_idempotent_by_id(tmp_path, corpus):
    path = tmp_path / "kb.sqlite"
    with FindingStore(path) as store:
        assert store.add([corpus["tile128"]]) == (1, 0, 0)
        assert store.add([corpus["tile128"], corpus["tile64"]]) == (1, 0, 1)
    with FindingStore(path) as store:
        assert len(store) == 2
        res = store.add(corpus.values())
        assert (res.added, res.superseded, res.unchanged) == (3, 0, 2)
        assert store.get(corpus["tile64"].id) == corpus["tile64"]
        assert store.get("missing/id/000") is None
        assert len(store.query("tile size D=128")) == 2


def test_add_file_validates_and_is_idempotent(tmp_path, corpus):
    jsonl = tmp_path / "findings.jsonl"
    append_findings(jsonl, corpus.values())
    with FindingStore(tmp_path / "kb.sqlite") as store:
        assert store.add_file(jsonl) == (len(corpus), 0, 0)
        assert store.add_file(jsonl) == (0, 0, len(corpus))


def test_add_rejects_non_findings(tmp_path, corpus):
    with FindingStore(tmp_path / "kb.sqlite") as store:
        with pytest.raises(TypeError, match="expected Finding"):
            store.add([corpus["cpu"].to_dict()])


def test_stats_counts(tmp_path, corpus):
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add(corpus.values())
        stats = store.stats()
    assert stats["total"] == 5
    assert stats["by_prototype"] == {"flash": 4, "paged": 1}
    assert stats["by_backend"] == {"cuda": 3, "cpu": 1, "metal": 1}
    assert stats["by_device"] == {"NVIDIA H100 80GB HBM3": 3, "Apple M4": 1, "cpu": 1}
    assert stats["by_confidence"] == {"high": 3, "low": 1, "medium": 1}
    assert stats["by_source"] == {"measured": 5}
    assert stats["search"] == ("fts5" if HAVE_FTS5 else stats["search"])


def test_stats_say_when_fts_is_not_used(tmp_path):
    with FindingStore(tmp_path / "kb.sqlite", fts=False) as store:
        assert store.stats()["search"].startswith("like (")


@pytest.mark.skipif(not HAVE_FTS5, reason="SQLite lacks FTS5")
def test_rows_added_without_fts_are_indexed_when_fts_returns(tmp_path, corpus):
    path = tmp_path / "kb.sqlite"
    with FindingStore(path) as store:
        store.add([corpus["tile64"]])
    with FindingStore(path, fts=False) as store:
        store.add([corpus["tile128"]])
    with FindingStore(path) as store:
        assert {f.id for f in store.query("D=128")} == {corpus["tile128"].id}


@pytest.mark.parametrize("query", ["", "   ", "= - ?", "__"])
def test_query_without_words_is_an_error(tmp_path, query):
    with FindingStore(tmp_path / "kb.sqlite") as store, pytest.raises(StoreError, match="no searchable words"):
        store.query(query)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_query_limit_validated(tmp_path, limit):
    with FindingStore(tmp_path / "kb.sqlite") as store, pytest.raises(ValueError, match="limit"):
        store.query("tile", limit=limit)


def test_query_limit_caps_results(tmp_path, corpus):
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add(corpus.values())
        assert len(store.query("tile", limit=2)) == 2


@pytest.mark.parametrize("fts", ENGINES)
def test_query_syntax_characters_are_plain_text(tmp_path, corpus, fts):
    # FTS5 operators and quotes in user input are words/separators, not syntax.
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        store.add(corpus.values())
        assert {f.id for f in store.query('"tile" size* (D=128')} == {corpus["tile128"].id, corpus["text128"].id}
        assert store.query('tile OR paged') == []


def test_bad_paths_and_schema(tmp_path):
    with pytest.raises(StoreError, match="is a directory"):
        FindingStore(tmp_path)
    not_db = tmp_path / "junk.sqlite"
    not_db.write_bytes(b"this is not a database at all, not even close" * 10)
    with pytest.raises(StoreError, match="cannot open"):
        FindingStore(not_db)
    path = tmp_path / "kb.sqlite"
    FindingStore(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreError, match="schema version 999"):
        FindingStore(path)


def test_config_search_text_aliases():
    text = config_search_text({"HEAD_DIM": 64, "block_r": 32, "causal": True, "shape": [2, 3], "nested": {"x": 1}})
    assert "HEAD_DIM=64" in text and "D=64" in text and "Br=32" in text
    assert "causal=true" in text and "shape=2 3" in text and "nested.x=1" in text


def test_tokenize_matches_unicode61_word_rules():
    assert tokenize("head_dim=128, Br×Bc (64x64)") == ["head", "dim", "128", "br", "bc", "64x64"]


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNPROTO_KB", str(tmp_path / "x.sqlite"))
    assert default_db_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("ATTNPROTO_KB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_db_path() == tmp_path / "data" / "attnproto" / "kb.sqlite"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "attnproto" / "kb.sqlite"


@pytest.mark.parametrize("fts", ENGINES)
def test_config_topics_make_tile_configs_findable(tmp_path, fts):
    best = _f("Best tile for D=128", {"head_dim": 128, "block_r": 128, "block_c": 64})
    other = _f("Causal cost at D=128", {"head_dim": 128, "seq_len": 4096})
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        store.add([best, other])
        assert {f.id for f in store.query("tile size D=128")} == {best.id}


# ---------------------------------------------------------------- superseding
T1, T2, T3 = "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"


def _best_tile(tile, timestamp, *, tflops=100.0, commit="c1"):
    # one question (D=128, N=512); the answer (the tile) and the claim change between runs
    return _f("Best tile for D=128 at N=512", {"head_dim": 128, "seq_len": 512}, claim=f"Br={tile} is fastest",
              answer={"block_r": tile, "block_c": 64}, timestamp=timestamp, tflops=tflops, commit=commit)


@pytest.mark.parametrize("fts", ENGINES)
def test_a_newer_version_supersedes_and_only_it_is_served(tmp_path, fts):
    v1, v2 = _best_tile(64, T1), _best_tile(128, T2, commit="c2")
    assert v1.id == v2.id
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        assert store.add([v1]) == (1, 0, 0)
        assert store.add([v2]) == (0, 1, 0)
        assert store.get(v1.id) == v2 and len(store) == 1
        assert [f.id for f in store.query("Br=128")] == [v2.id]
        assert store.query("Br=64") == []                      # the old answer is never served
        assert [f.claim for f in store.query("best tile D=128")] == [v2.claim]
        assert store.list() == [v2]
        (old,) = store.history(v1.id)
        assert old.claim == v1.claim and old.timestamp == T1 and not old.is_live
        assert (old.superseded["by_timestamp"], old.superseded["by_commit"]) == (T2, "c2")
        assert "(changed claim, answer)" in old.superseded["reason"]
        assert store.stats()["total"] == 1 and store.stats()["history"] == 1


def test_an_older_version_goes_straight_to_history(tmp_path):
    v1, v2 = _best_tile(64, T1), _best_tile(128, T2)
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add([v2])
        assert store.add([v1]) == (0, 1, 0)
        assert store.get(v1.id) == v2
        (old,) = store.history(v1.id)
        assert old.claim == v1.claim and "older than the stored version" in old.superseded["reason"]
        # a known superseded version is never resurrected, nor stored twice
        assert store.add([v1]) == (0, 0, 1)
        assert store.get(v1.id) == v2 and len(store.history(v1.id)) == 1


def test_tie_goes_to_the_finding_being_added(tmp_path):
    a, b = _best_tile(64, T1), _best_tile(128, T1)
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add([a])
        assert store.add([b]) == (0, 1, 0)
        assert store.get(a.id) == b
        store.add([_best_tile(64, T1, tflops=1.0)])
        assert store.get(a.id).evidence == {"tflops": 1.0}
        # both versions in one call: the later one in the call wins the tie
        assert store.add([_best_tile(256, T3), _best_tile(512, T3)]) == (0, 2, 0)
        assert store.get(a.id).answer["block_r"] == 512


def test_same_content_is_unchanged_whatever_the_timestamp(tmp_path):
    v1 = _best_tile(64, T1)
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add([v1])
        assert store.add([_best_tile(64, T2, commit="c9")]) == (0, 0, 1)
        assert store.get(v1.id) == v1 and store.history(v1.id) == []


def test_history_entries_are_stored_as_history(tmp_path):
    v1, v2 = _best_tile(64, T1), _best_tile(128, T2)
    h1 = v1.superseded_by(by_timestamp=T2, by_commit="c2", reason="re-run changed claim", at=T2)
    with FindingStore(tmp_path / "kb.sqlite") as store:
        assert store.add([h1]) == (0, 1, 0)
        assert store.get(v1.id) is None and store.history(v1.id) == [h1]
        assert store.add([h1]) == (0, 0, 1)
        assert store.add([v1]) == (0, 0, 1)          # the exact superseded version: not live again
        assert store.get(v1.id) is None
        assert store.add([v2]) == (1, 0, 0)
        assert store.get(v2.id) == v2


def test_a_history_entry_retires_the_live_version_it_names(tmp_path):
    v1 = _best_tile(64, T1)
    retired = v1.superseded_by(by_timestamp=T2, by_commit="c2", reason="retired: not produced again", at=T2)
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add([v1])
        assert store.add([retired]) == (0, 1, 0)
        assert store.get(v1.id) is None and store.query("Br=64") == [] and store.list() == []
        assert store.history(v1.id) == [retired]
    # ... but not a newer live version with other content
    v3 = _best_tile(256, T3)
    with FindingStore(tmp_path / "kb2.sqlite") as store:
        store.add([v3])
        store.add([retired])
        assert store.get(v1.id) == v3


@pytest.mark.parametrize("fts", ENGINES)
def test_remove_deletes_live_and_history(tmp_path, corpus, fts):
    v1, v2 = _best_tile(64, T1), _best_tile(128, T2)
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        store.add([*corpus.values(), v1, v2])
        assert store.remove(v1.id) == (1, 1)
        assert store.get(v1.id) is None and store.history(v1.id) == []
        assert store.query("Br=128") == []
        assert store.remove(v1.id) == (0, 0)
        assert len(store) == len(corpus)


def test_list_filters_by_prototype(tmp_path, corpus):
    with FindingStore(tmp_path / "kb.sqlite") as store:
        store.add(corpus.values())
        assert [f.id for f in store.list(prototype="paged")] == [corpus["paged128"].id]
        assert [f.prototype for f in store.list()] == ["flash"] * 4 + ["paged"]
        assert store.list(prototype="nope") == []


@pytest.mark.parametrize("fts", ENGINES)
def test_answer_is_indexed_like_config(tmp_path, fts):
    f = _f("Best config at N=4096", {"head_dim": 128, "seq_len": 4096}, answer={"kernel": "flash_fwd_wgmma",
                                                                               "block_r": 128})
    with FindingStore(tmp_path / "kb.sqlite", fts=fts) as store:
        store.add([f])
        for query in ("Br=128", "block_r=128", "tile size D=128", "wgmma", "kernel=flash_fwd_wgmma"):
            assert [x.id for x in store.query(query)] == [f.id], query
        assert store.query("Br=64") == []


@pytest.mark.skipif(not HAVE_FTS5, reason="SQLite lacks FTS5")
def test_superseding_without_fts_is_reindexed_when_fts_returns(tmp_path):
    path = tmp_path / "kb.sqlite"
    v1, v2 = _best_tile(64, T1), _best_tile(128, T2)
    with FindingStore(path) as store:
        store.add([v1])
    with FindingStore(path, fts=False) as store:
        store.add([v2])                       # same row count, different content
    with FindingStore(path) as store:
        assert store.query("Br=64") == [] and [f.id for f in store.query("Br=128")] == [v2.id]


def test_readers_never_create_a_database(tmp_path):
    path = tmp_path / "nested" / "kb.sqlite"
    with pytest.raises(MissingDatabaseError, match=r"no findings database at .*kb.sqlite; add findings with"):
        FindingStore(path, create=False)
    assert not path.parent.exists()
    FindingStore(path).close()
    FindingStore(path, create=False).close()


# Version 1 of the schema, as attnproto wrote it before live/history (for the migration test).
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE findings (
    id TEXT PRIMARY KEY, prototype TEXT NOT NULL, title TEXT NOT NULL, claim TEXT NOT NULL,
    device TEXT NOT NULL, backend TEXT NOT NULL, confidence TEXT NOT NULL, source TEXT NOT NULL,
    commit_sha TEXT NOT NULL, timestamp TEXT NOT NULL, config_text TEXT NOT NULL,
    finding_json TEXT NOT NULL, search_text TEXT NOT NULL);
CREATE INDEX findings_prototype ON findings(prototype);
INSERT INTO meta VALUES ('schema_version', '1');
"""


@pytest.mark.parametrize("fts", ENGINES)
def test_version_1_database_is_migrated(tmp_path, fts):
    path = tmp_path / "kb.sqlite"
    # a version-1 finding: no answer field, the tile (its answer) still in the config
    old = _f("Best tile for D=128", {"head_dim": 128, "block_r": 64}, claim="Br=64 is fastest", timestamp=T1)
    newer = _f("Best tile for D=128", {"head_dim": 128, "block_r": 64}, claim="Br=64 is fastest again",
               timestamp=T2, tflops=200.0)
    line = old.to_dict()
    del line["answer"], line["superseded"]
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    if HAVE_FTS5:
        conn.execute("CREATE VIRTUAL TABLE findings_fts USING fts5(id UNINDEXED, title, claim, config, device, "
                     "prototype, backend, tokenize = 'porter unicode61')")
        conn.execute("INSERT INTO findings_fts VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (old.id, old.title, old.claim, "head_dim=128 D=128", old.device, old.prototype, old.backend))
    conn.execute("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (old.id, old.prototype, old.title, old.claim, old.device, old.backend, old.confidence, old.source,
                  old.commit, old.timestamp, "head_dim=128 D=128", json.dumps(line), " best tile "))
    conn.commit()
    conn.close()
    with FindingStore(path, fts=fts) as store:
        assert store.stats()["schema_version"] == SCHEMA_VERSION == "2"
        assert store.get(old.id) == old
        assert [f.id for f in store.query("tile size Br=64")] == [old.id]     # search texts re-derived
        assert store.add([newer]) == (0, 1, 0)
        assert [f.claim for f in store.history(old.id)] == [old.claim]
    with FindingStore(path) as store:                    # the FTS index (rebuilt) serves only the newer claim
        assert [f.claim for f in store.query("Br=64")] == [newer.claim]
        assert store.query("fastest") == [newer] and store.query("again") == [newer]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    conn.close()
