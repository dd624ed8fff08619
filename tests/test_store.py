"""attnproto.store: add / query / stats, FTS5 and the LIKE fallback."""
from __future__ import annotations

import sqlite3

import pytest

from attnproto.findings import append_findings, make_finding
from attnproto.store import (
    FindingStore,
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
       claim="measured on the sweep"):
    return make_finding(prototype=prototype, title=title, claim=claim, evidence={"tflops": 100.0},
                        config=config, device=device, backend=backend, cv=cv, records=["x/0"])


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
        assert store.add(corpus.values()) == (len(corpus), 0)
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
        assert store.add([corpus["tile128"]]) == (1, 0)
        assert store.add([corpus["tile128"], corpus["tile64"]]) == (1, 1)
    with FindingStore(path) as store:
        assert len(store) == 2
        assert store.add(corpus.values()) == (3, 2)
        assert store.get(corpus["tile64"].id) == corpus["tile64"]
        assert store.get("missing/id/000") is None
        assert len(store.query("tile size D=128")) == 2


def test_add_file_validates_and_is_idempotent(tmp_path, corpus):
    jsonl = tmp_path / "findings.jsonl"
    append_findings(jsonl, corpus.values())
    with FindingStore(tmp_path / "kb.sqlite") as store:
        assert store.add_file(jsonl) == (len(corpus), 0)
        assert store.add_file(jsonl) == (0, len(corpus))


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
