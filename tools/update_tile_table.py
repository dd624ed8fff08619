"""Regenerate python/attnproto/ops/tile_table.json (the table ``kernel="auto"`` chooses from)
from the committed Prototype 1 results under results/.

    python3 tools/update_tile_table.py          # write the table
    python3 tools/update_tile_table.py --check  # exit 1 if the shipped table is stale

tests/test_chooser.py fails when the shipped table and the committed results disagree.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attnproto.ops import chooser

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
TABLE = ROOT / "python" / "attnproto" / "ops" / "tile_table.json"


def render() -> str:
    return json.dumps(chooser.generate_table(RESULTS), indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TABLE.is_file() or TABLE.read_text() != text:
            print(f"{TABLE} is stale: run python3 tools/update_tile_table.py", file=sys.stderr)
            return 1
        return 0
    TABLE.write_text(text)
    table = json.loads(text)
    print(f"{TABLE}: {len(table['entries'])} entries from {', '.join(sorted(table['sources'])) or 'no results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
