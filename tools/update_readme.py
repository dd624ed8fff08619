"""Regenerate the result tables in README.md from the committed results.

Each table sits between ``<!-- report: results/<device>/<experiment> -->`` and
``<!-- /report -->`` and is exactly the output of ``attnproto report`` on that
directory, so no figure in the README is typed by hand. ``--check`` exits 1
when README.md is out of date (tests/test_readme.py runs it).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- report: (?P<dir>\S+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def render(text: str) -> str:
    from attnproto.cli import report_text

    def fill(m: re.Match) -> str:
        table = report_text(REPO / m.group("dir"))
        return f"{m.group(1)}```text\n{table}\n```\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    text = README.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("README.md result tables are out of date: python3 tools/update_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
