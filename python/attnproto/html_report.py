"""``attnproto report --html DIR``: one self-contained HTML page of the results under DIR.

Per device: the plots the issue asks for, each drawn from that device's records when
they exist (matplotlib, PNG, embedded as base64 data: the page needs no other file),
and beside each plot the live findings of the experiment it comes from.

* TFLOPS against N per kernel, the anchors (SDPA flash, cuDNN, flex) beside ours (proto1);
* a tile heatmap per head dim D: the best TFLOPS of each (Br, Bc) at the longest N (proto1);
* the linear/softmax crossover: time against N (proto6);
* paged overhead against block size: paged decode over the same kernel on contiguous K/V (proto3);
* variant overhead bars: the dispatch modes' overhead (proto2);
* decode tokens/s per attention implementation (proto3's decode sweep: sequences decoded per
  second by the attention op alone, not an end-to-end model).

A plot whose records are absent is left out with a line saying so.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .findings import Finding, read_findings
from .records import FINDINGS_FILE, RECORDS_FILE, read_records

__all__ = ["PLOTS", "REPORT_FILE", "render_html", "write_html"]

REPORT_FILE = "report.html"
#: One subplot's size (inches) and the resolution: readable beside a findings column on a laptop screen.
SUBPLOT_SIZE = (5.0, 3.8)
FIG_DPI = 100
US_PER_S = 1e6
PERCENT = 100.0
_ANCHORS = ("sdpa_flash", "sdpa_cudnn", "flex")

Records = Sequence[Mapping[str, Any]]


def _plt():
    try:
        import matplotlib  # noqa: PLC0415  (optional dependency: the plot / test extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("report --html needs matplotlib: pip install 'attnproto[plot]'") from None
    return plt


def _png(fig: Any) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int) -> tuple[Any, list[Any]]:
    plt = _plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(SUBPLOT_SIZE[0] * cols, SUBPLOT_SIZE[1] * rows), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _label(cfg: Mapping[str, Any]) -> str:
    if cfg.get("kernel") == "auto":
        return "auto"
    return str(cfg.get("family") or cfg.get("kernel"))


def plot_tflops_vs_n(records: Records) -> str | None:
    recs = [r for r in records if "seq_len" in r["config"] and "tflops" in r["metrics"]
            and not r["config"].get("causal") and "head_dim" in r["config"]]
    if not recs:
        return None
    by_d: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in recs:
        c = r["config"]
        series = by_d[c["head_dim"]][_label(c)]
        series[c["seq_len"]] = max(series.get(c["seq_len"], 0.0), r["metrics"]["tflops"])
    fig, axes = _grid(len(by_d))
    for ax, d in zip(axes, sorted(by_d)):
        for name, points in sorted(by_d[d].items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", linestyle="--" if name in _ANCHORS else "-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={d}, non-causal (best tile per kernel)")
        ax.set_xlabel("N")
        ax.set_ylabel("TFLOPS")
        ax.legend(fontsize="small")
    return _png(fig)


def plot_tile_heatmaps(records: Records) -> str | None:
    recs = [r for r in records if "block_r" in r["config"] and "block_c" in r["config"] and "tflops" in r["metrics"]
            and not r["config"].get("causal") and r["config"].get("kernel") != "auto"]
    if not recs:
        return None
    by_d: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in recs:
        by_d[r["config"]["head_dim"]].append(r)
    fig, axes = _grid(len(by_d))
    for ax, d in zip(axes, sorted(by_d)):
        longest = max(r["config"]["seq_len"] for r in by_d[d])
        best: dict[tuple[int, int], float] = {}
        for r in by_d[d]:
            if r["config"]["seq_len"] == longest:
                key = (r["config"]["block_r"], r["config"]["block_c"])
                best[key] = max(best.get(key, 0.0), r["metrics"]["tflops"])
        rows = sorted({k[0] for k in best})
        cols = sorted({k[1] for k in best})
        grid = [[best.get((br, bc), math.nan) for bc in cols] for br in rows]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize="x-small", rotation=90)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize="small")
        ax.set_xlabel("Bc")
        ax.set_ylabel("Br")
        ax.set_title(f"D={d}, N={longest}: best TFLOPS per tile")
        fig.colorbar(im, ax=ax)
    return _png(fig)


def plot_crossover(records: Records) -> str | None:
    recs = [r for r in records if r["config"].get("op") in ("linear_attention", "softmax_attention_causal")
            and "seq_len" in r["config"]]
    if not recs:
        return None
    by_d: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in recs:
        c = r["config"]
        name = ("linear " if c["op"] == "linear_attention" else "softmax ") + str(c["impl"])
        series = by_d[c["head_dim"]][name]
        ms = r["timing"]["median_ms"]
        series[c["seq_len"]] = min(series.get(c["seq_len"], math.inf), ms)
    fig, axes = _grid(len(by_d))
    for ax, d in zip(axes, sorted(by_d)):
        for name, points in sorted(by_d[d].items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", linestyle="-" if name.startswith("linear") else "--",
                    label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"D={d}: causal softmax vs linear (fastest chunk)")
        ax.set_xlabel("N")
        ax.set_ylabel("median ms")
        ax.legend(fontsize="small")
    return _png(fig)


def _decode_block_records(records: Records) -> list[Mapping[str, Any]]:
    return [r for r in records if r["config"].get("sweep") == "block" and "time_us" in r["metrics"]]


def plot_paged_overhead(records: Records) -> str | None:
    recs = _decode_block_records(records)
    contiguous = {r["config"]["context"]: r["metrics"]["time_us"] for r in recs
                  if r["config"]["kernel"] == "attnproto_contiguous"}
    paged = [r for r in recs if r["config"]["kernel"] == "attnproto_paged" and r["config"]["context"] in contiguous]
    if not paged:
        return None
    fig, (ax,) = _grid(1)
    by_ctx: dict[int, dict[int, float]] = defaultdict(dict)
    for r in paged:
        c = r["config"]
        by_ctx[c["context"]][c["block_size"]] = PERCENT * (r["metrics"]["time_us"] / contiguous[c["context"]] - 1)
    for ctx, points in sorted(by_ctx.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=f"context {ctx}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("paged over contiguous (%)")
    ax.set_title("Paged decode overhead against block size")
    ax.legend(fontsize="small")
    return _png(fig)


def plot_variant_overhead(records: Records) -> str | None:
    recs = [r for r in records if r["config"].get("phase") == "run" and "overhead_pct" in r["metrics"]]
    if not recs:
        return None
    fig, (ax,) = _grid(1)
    shapes = sorted({(r["config"]["seq_len"], r["config"]["head_dim"], bool(r["config"]["causal"])) for r in recs})
    modes = sorted({(r["config"]["mode"], r["config"]["mode_name"]) for r in recs})
    width = 1.0 / (len(modes) + 1)
    for i, (mode, name) in enumerate(modes):
        values = []
        for n, d, causal in shapes:
            hit = [r["metrics"]["overhead_pct"] for r in recs if r["config"]["mode"] == mode
                   and (r["config"]["seq_len"], r["config"]["head_dim"], bool(r["config"]["causal"])) == (n, d, causal)]
            values.append(hit[0] if hit else math.nan)
        ax.bar([j + i * width for j in range(len(shapes))], values, width, label=f"mode {mode} ({name})")
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(shapes))],
                  [f"N={n} D={d}{' causal' if c else ''}" for n, d, c in shapes], fontsize="small")
    ax.set_yscale("symlog")
    ax.set_ylabel("overhead over inline (%)")
    ax.set_title("Variant dispatch overhead per mode")
    ax.legend(fontsize="small")
    return _png(fig)


def plot_decode_tokens(records: Records) -> str | None:
    recs = _decode_block_records(records)
    if not recs:
        return None
    best: dict[int, dict[str, float]] = defaultdict(dict)
    for r in recs:
        c = r["config"]
        rate = c["batch"] * US_PER_S / r["metrics"]["time_us"]
        name = str(c["kernel"])
        best[c["context"]][name] = max(best[c["context"]].get(name, 0.0), rate)
    fig, (ax,) = _grid(1)
    contexts = sorted(best)
    impls = sorted({k for v in best.values() for k in v})
    width = 1.0 / (len(impls) + 1)
    for i, name in enumerate(impls):
        ax.bar([j + i * width for j in range(len(contexts))], [best[c].get(name, math.nan) for c in contexts], width,
               label=name)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(contexts))],
                  [f"context {c}" for c in contexts])
    ax.set_ylabel("decoded tokens/s (attention op, best block)")
    ax.set_title("Decode tokens/s per attention implementation")
    ax.legend(fontsize="x-small")
    return _png(fig)


#: (title, experiment whose records it plots, plot function), in page order.
PLOTS: tuple[tuple[str, str, Callable[[Records], str | None]], ...] = (
    ("TFLOPS against N per kernel, with the anchors", "proto1", plot_tflops_vs_n),
    ("Tile heatmaps per head dim", "proto1", plot_tile_heatmaps),
    ("Linear / softmax crossover", "proto6", plot_crossover),
    ("Paged overhead against block size", "proto3", plot_paged_overhead),
    ("Variant overhead", "proto2", plot_variant_overhead),
    ("Decode tokens/s per attention implementation", "proto3", plot_decode_tokens),
)

_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1600px; }
section.plot { display: flex; gap: 1.5em; align-items: flex-start; margin-bottom: 2em; }
section.plot figure { margin: 0; flex: 0 0 auto; }
section.plot img { max-width: 1000px; }
section.plot .findings { flex: 1 1 auto; font-size: 0.85em; max-height: 600px; overflow-y: auto; }
.findings li { margin-bottom: 0.6em; }
.id { color: #555; font-family: monospace; }
.missing { color: #a00; }
"""


def _findings_html(findings: Sequence[Finding]) -> str:
    if not findings:
        return "<p class='missing'>No live findings.</p>"
    items = [f"<li><b>{html.escape(f.title)}</b> ({html.escape(f.confidence)}): {html.escape(f.claim)} "
             f"<span class='id'>{html.escape(f.id)}</span></li>" for f in findings]
    return "<ul>" + "".join(items) + "</ul>"


def _experiments(device_dir: Path) -> dict[str, tuple[list[dict[str, Any]], list[Finding]]]:
    out = {}
    for exp_dir in sorted(p for p in device_dir.iterdir() if p.is_dir()):
        rec, fnd = exp_dir / RECORDS_FILE, exp_dir / FINDINGS_FILE
        if rec.is_file() or fnd.is_file():
            out[exp_dir.name] = (read_records(rec) if rec.is_file() else [],
                                 read_findings(fnd) if fnd.is_file() else [])
    return out


def render_html(results: str | os.PathLike[str]) -> str:
    """The page for every device directory under ``results`` (``results/<device>/<experiment>``)."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"DIR: no such results directory: {root}")
    devices = sorted(p for p in root.iterdir() if p.is_dir() and _experiments(p))
    if not devices:
        raise FileNotFoundError(f"DIR: {root} holds no results/<device>/<experiment> directories")
    body = [f"<h1>attnproto results: {html.escape(root.name)}</h1>",
            "<p>Generated by <code>attnproto report --html</code> from the committed records and findings.</p>"]
    for dev in devices:
        exps = _experiments(dev)
        body.append(f"<h2>{html.escape(dev.name)}</h2>")
        shown: set[str] = set()
        for title, exp, fn in PLOTS:
            records, findings = exps.get(exp, ([], []))
            png = fn(records) if records else None
            body.append(f"<h3>{html.escape(title)} <small>({html.escape(exp)})</small></h3>")
            if png is None:
                body.append(f"<p class='missing'>No {html.escape(exp)} records on {html.escape(dev.name)}.</p>")
                continue
            side = "" if exp in shown else _findings_html(findings)
            shown.add(exp)
            body.append(f"<section class='plot'><figure><img alt='{html.escape(title)}' "
                        f"src='data:image/png;base64,{png}'></figure><div class='findings'>{side}</div></section>")
        rest = [e for e in exps if e not in shown and exps[e][1]]
        for exp in rest:
            body.append(f"<h3>Findings of {html.escape(exp)}</h3>{_findings_html(exps[exp][1])}")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>attnproto report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_html(results: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write :func:`render_html` to ``out`` (default ``<results>/report.html``)."""
    from .findings import atomic_write_text  # noqa: PLC0415

    path = Path(out) if out is not None else Path(results) / REPORT_FILE
    atomic_write_text(path, render_html(results))
    return path
