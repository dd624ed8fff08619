"""SYNTHESIS.md: generated from the committed findings (drift-tested), every answer cites a live finding."""
from __future__ import annotations

import re
from pathlib import Path

from attnproto import cli, synthesis
from attnproto.findings import read_findings

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[([a-z0-9-]+/[a-z0-9-]+/[0-9a-f]{12})\]\(([^)]+)\)$")


def test_committed_synthesis_is_current():
    """Regenerate with: attnproto synthesize results (from the repository root)."""
    expected = synthesis.synthesize(ROOT / "results", base=ROOT)
    assert (ROOT / synthesis.SYNTHESIS_FILE).read_text(encoding="utf-8") == expected, \
        "SYNTHESIS.md is out of date: run `attnproto synthesize results` from the repository root"


def test_every_answer_cites_a_live_finding_where_it_says():
    text = synthesis.synthesize(ROOT / "results", base=ROOT)
    cited = 0
    for line in text.splitlines():
        if not line.startswith("- ") or line.startswith(("- No live finding", "- None found")):
            continue
        m = LINK.search(line)
        assert m, f"an answer without its finding id: {line[:120]}"
        ids = {f.id for f in read_findings(ROOT / m.group(2))}
        assert m.group(1) in ids, f"{m.group(1)} is not live in {m.group(2)}"
        cited += 1
    assert cited > 0


def test_questions_and_devices(tmp_path):
    text = synthesis.synthesize(ROOT / "results", base=ROOT)
    for i, q in enumerate(synthesis.QUESTIONS, start=1):
        assert text.count(f"### {i}. {q.title}") == len(synthesis.collect(ROOT / "results"))
    assert "### Design-breaking constraint" in text


def test_cli_check_and_write(tmp_path):
    out = tmp_path / "S.md"
    assert cli.main(["synthesize", str(ROOT / "results"), "--out", str(out), "--check"]) == cli.EXIT_FAILED
    assert cli.main(["synthesize", str(ROOT / "results"), "--out", str(out)]) == cli.EXIT_OK
    assert cli.main(["synthesize", str(ROOT / "results"), "--out", str(out), "--check"]) == cli.EXIT_OK
    assert cli.main(["synthesize", str(tmp_path / "absent")]) == cli.EXIT_USAGE
