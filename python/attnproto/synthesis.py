"""``attnproto synthesize``: SYNTHESIS.md, the seeds' six questions answered from the findings.

Every sentence of the answers is taken from a live finding (its claim, whole or its
first sentence) and ends with a link to that finding's id in the ``findings.jsonl``
that holds it; nothing is typed by hand.  A question no committed finding answers
on a device says so.  The file is a pure function of the committed results
(no dates, no commit): ``attnproto synthesize`` regenerates it and
``tests/test_synthesis.py`` fails when the committed file drifts.

Which findings answer which question is :data:`QUESTIONS`: per question, pairs of
(prototype, slug pattern) and whether the finding's whole claim or only its first
sentence is quoted (recommendations are quoted whole).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .findings import Finding, read_findings
from .kb_validate import PROTOTYPE_LABELS
from .records import FINDINGS_FILE

__all__ = ["DESIGN_BREAKING_SLUG", "QUESTIONS", "Question", "SYNTHESIS_FILE", "collect", "synthesize"]

SYNTHESIS_FILE = "SYNTHESIS.md"
#: A finding whose slug starts with this records a constraint that breaks the API's design.
DESIGN_BREAKING_SLUG = "design-breaking"
WHOLE, FIRST = "whole", "first"
_ANY = r".*"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


@dataclass(frozen=True)
class Question:
    title: str
    #: (prototype, slug regex (full match), WHOLE or FIRST), in the order they are quoted.
    sources: tuple[tuple[str, str, str], ...]


QUESTIONS = (
    Question("Which tile sizes, per head dim D", (
        ("proto1", r"best-tile-.*", FIRST),
        ("proto1", r"wgmma-tile-vs-fa3-default-.*", FIRST),
        ("proto1", r"tflops-surface-.*", FIRST),
        ("proto1", r"auto-vs-best-.*", FIRST),
    )),
    Question("How variants should be dispatched", (
        ("proto2", r"dispatch-recommendation.*", WHOLE),
        ("proto2", r"breakeven-.*", FIRST),
        ("proto4", r"recommendation.*", WHOLE),
        ("proto4", r"archive-.*", FIRST),
        ("proto4", r"cold-compile-.*", FIRST),
    )),
    Question("Is PagedAttention viable, and with which page size", (
        ("proto3", r".*recommendation.*", WHOLE),
        ("proto3", r"best-block-size-.*", FIRST),
        ("proto3", r"paging-overhead-.*", FIRST),
        ("proto3", r"split-kv-.*", FIRST),
    )),
    Question("Where linear attention overtakes softmax attention", (
        ("proto6", r"crossover-.*", WHOLE),
        ("proto6", r"recommendation.*", WHOLE),
        ("proto6", r"best-chunk-.*", FIRST),
    )),
    Question("What the variants cost", (
        ("proto2", r"overhead-.*", FIRST),
        ("proto1", r"causal-cost-.*", FIRST),
        ("proto4", r"first-launch-latency.*", FIRST),
        ("proto7", _ANY, FIRST),
    )),
    Question("Which DSL and which framework integration to use", (
        ("proto5", r".*recommendation.*", WHOLE),
        ("proto5", _ANY, FIRST),
        ("proto8", r".*recommendation.*", WHOLE),
        ("proto8", _ANY, FIRST),
    )),
)


def _prototype(f: Finding) -> str:
    return PROTOTYPE_LABELS.get(f.prototype, f.prototype)


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def collect(results: str | os.PathLike[str]) -> dict[str, list[tuple[Finding, Path]]]:
    """Live findings under ``results`` by device directory: (finding, its findings.jsonl)."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results: no such directory: {root}")
    out: dict[str, list[tuple[Finding, Path]]] = {}
    for path in sorted(root.glob(f"*/*/{FINDINGS_FILE}")):
        out.setdefault(path.parent.parent.name, []).extend((f, path) for f in read_findings(path))
    return out


def _link(f: Finding, path: Path, base: Path) -> str:
    return f"[{f.id}]({Path(os.path.relpath(path, base)).as_posix()})"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _answers(q: Question, findings: Sequence[tuple[Finding, Path]], base: Path) -> list[str]:
    used: set[str] = set()
    lines = []
    for proto, pattern, how in q.sources:
        rx = re.compile(pattern)
        for f, path in findings:
            if f.id in used or _prototype(f) != proto or not rx.fullmatch(f.slug):
                continue
            used.add(f.id)
            text = f.claim if how == WHOLE else first_sentence(f.claim)
            lines.append(f"- {_sentence(text)} {_link(f, path, base)}")
    return lines


def _device_section(device: str, findings: Sequence[tuple[Finding, Path]], base: Path) -> list[str]:
    protos = sorted({_prototype(f) for f, _ in findings})
    out = [f"## {device}", "", f"{len(findings)} live findings from {', '.join(protos)}.", ""]
    for i, q in enumerate(QUESTIONS, start=1):
        out.append(f"### {i}. {q.title}")
        out.append("")
        lines = _answers(q, findings, base)
        wanted = sorted({p for p, _, _ in q.sources})
        out.extend(lines or [f"- No live finding of {', '.join(wanted)} answers this on {device} yet."])
        out.append("")
    breaking = [(f, p) for f, p in findings if f.slug.startswith(DESIGN_BREAKING_SLUG)]
    out.append("### Design-breaking constraint")
    out.append("")
    if breaking:
        out.extend(f"- {_sentence(f.claim)} {_link(f, p, base)}" for f, p in breaking)
    else:
        out.append(f"- None found: no live finding on {device} has a slug starting with `{DESIGN_BREAKING_SLUG}`.")
    out.append("")
    return out


def synthesize(results: str | os.PathLike[str] = "results", *, base: str | os.PathLike[str] | None = None) -> str:
    """The text of SYNTHESIS.md from the live findings under ``results``; links are relative
    to ``base`` (default: the parent of ``results``, where SYNTHESIS.md lives)."""
    root = Path(results)
    base_dir = Path(base) if base is not None else root.resolve().parent
    by_device = collect(root)
    out = ["# Synthesis", "",
           "Generated by `attnproto synthesize` from the live findings under "
           f"`{Path(os.path.relpath(root.resolve(), base_dir.resolve())).as_posix()}/`; do not edit by hand. "
           "Every answer is a finding's claim, linked to its id in the findings file that holds it.", ""]
    for device in sorted(by_device):
        out.extend(_device_section(device, by_device[device], base_dir))
    return "\n".join(out).rstrip("\n") + "\n"
