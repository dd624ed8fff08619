"""README result tables are generated from committed results (no hand-typed numbers)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_tables_match_committed_results():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "tools" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.README.read_text()
    assert mod.render(text) == text, "run python3 tools/update_readme.py"
