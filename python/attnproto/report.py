"""Terminal output: aligned tables, a progress bar, optional matplotlib plots.

No hard dependencies: :func:`progress_bar` uses ``tqdm`` when it is installed
and a small built-in bar on stderr otherwise; :func:`plot_metric` needs
``matplotlib`` and says so when it is missing.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ProgressBar", "format_table", "format_value", "plot_metric", "progress_bar"]

# Significant digits shown for floats in tables: enough to compare timings whose
# CV is around 1 %, few enough to keep columns narrow.
TABLE_SIGNIFICANT_DIGITS = 4
# Floats outside [1e-3, 1e6) are shown in scientific notation.
_SCI_LOW = 1e-3
_SCI_HIGH = 1e6
_BAR_WIDTH = 30
# Minimum seconds between redraws of the built-in bar (avoid flooding a tty).
_REDRAW_INTERVAL_S = 0.1
_MISSING = "-"


def format_value(value: Any) -> str:
    """Render one table cell: floats to TABLE_SIGNIFICANT_DIGITS, None as '-'."""
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and not (_SCI_LOW <= abs(value) < _SCI_HIGH):
            return f"{value:.{TABLE_SIGNIFICANT_DIGITS - 1}e}"
        return f"{value:.{TABLE_SIGNIFICANT_DIGITS}g}"
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 *, max_width: int | None = None) -> str:
    """Format dict rows as an aligned text table (numbers right-aligned).

    ``columns`` defaults to the union of keys in first-seen order.  Cells wider
    than ``max_width`` characters are truncated with an ellipsis.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        columns = list(seen)
    if not columns:
        return ""
    cells = [[format_value(row.get(col)) for col in columns] for row in rows]
    if max_width is not None:
        if max_width < 2:
            raise ValueError(f"max_width must be >= 2, got {max_width}")
        cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in r] for r in cells]
    numeric = [all(_is_number(row.get(col)) or row.get(col) is None for row in rows) for col in columns]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


class ProgressBar:
    """Minimal stderr progress bar with the subset of the tqdm API attnproto uses.

    Iterate over it, or call :meth:`update` inside ``with``.  On a terminal it
    redraws in place; otherwise it prints one line when closed.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str = "", stream: TextIO | None = None, disable: bool = False) -> None:
        self._iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = total
        self.desc = desc
        self.n = 0
        self._stream = sys.stderr if stream is None else stream
        self._disable = disable
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError("ProgressBar was created without an iterable")
        try:
            for item in self._iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self) -> str:
        elapsed = time.perf_counter() - self._start
        prefix = f"{self.desc}: " if self.desc else ""
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(round(frac * _BAR_WIDTH))
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            return f"{prefix}[{bar}] {self.n}/{self.total} {elapsed:.1f}s"
        return f"{prefix}{self.n} it {elapsed:.1f}s"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._disable or not self._tty:
            return
        now = time.perf_counter()
        if now - self._last_draw >= _REDRAW_INTERVAL_S or (self.total is not None and self.n >= self.total):
            self._stream.write("\r" + self.render())
            self._stream.flush()
            self._last_draw = now

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._disable:
            return
        self._stream.write(("\r" if self._tty else "") + self.render() + "\n")
        self._stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str = "", disable: bool = False) -> Any:
    """tqdm bar on stderr when tqdm is installed, else :class:`ProgressBar`.

    ``ATTNPROTO_NO_TQDM=1`` forces the built-in bar.
    """
    if not os.environ.get("ATTNPROTO_NO_TQDM"):
        try:
            from tqdm import tqdm  # noqa: PLC0415  (optional dependency)
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, leave=True)
    return ProgressBar(iterable, total=total, desc=desc, disable=disable)


def plot_metric(records: Sequence[Mapping[str, Any]], x: str, y: str, path: str | os.PathLike[str],
                *, series: str | None = None, title: str | None = None) -> Path:
    """Plot ``y`` (a metric or timing field) against ``x`` (a config key) to ``path``.

    ``series`` optionally names a config key that splits the points into lines.
    Raises RuntimeError when matplotlib is not installed, KeyError naming the
    missing field otherwise.
    """
    try:
        import matplotlib  # noqa: PLC0415  (optional dependency)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None

    def field(rec: Mapping[str, Any], name: str) -> Any:
        for part in ("config", "metrics", "timing"):
            if name in rec.get(part, {}):
                return rec[part][name]
        raise KeyError(f"record {rec.get('id', '?')} has no config/metric/timing field {name!r}")

    groups: dict[Any, list[tuple[Any, Any]]] = {}
    for rec in records:
        key = field(rec, series) if series else None
        groups.setdefault(key, []).append((field(rec, x), field(rec, y)))
    fig, ax = plt.subplots()
    for key, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=None if series is None else f"{series}={key}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title)
    if series is not None:
        ax.legend()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
