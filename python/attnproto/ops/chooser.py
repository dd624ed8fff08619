"""``kernel="auto"``: which family and tiles run a call, from one measured table.

The table (``tile_table.json`` beside this module, shipped with the package) holds, per
(arch, family, dtype, head dim, causal, N), the fastest tile of that family that the
Prototype 1 sweep measured at that point, with its throughput and CV. It is generated
from the committed results (``results/<device>/proto1/records.jsonl``) by
``python3 tools/update_tile_table.py``; a test fails when the shipped table and the
committed results disagree. Where two committed devices share an arch, the newest run
(its run.json date) provides that arch's entries.

Choosing for a call with head dim D, query length Nq, on a device of arch A:

1. the families of the device's backend that support the call (``supports()``), DSL
   families (``Family.dsl``) excluded: they run by name only;
2. the table's head dim: D if tabulated, else the next larger one (its tiles hold at
   least as much), else the largest; its length band: the smallest tabulated N >= Nq,
   else the largest; its dtype: the call's, else the other 16-bit type (same element
   size, same tensor-core rate; the reason says it was borrowed);
3. among the supporting families' entries at that point whose tiles are legal for the
   call, the highest measured TFLOPS wins; the reason names the runner-up;
4. no entry (an arch or backend never swept): the first supporting family in
   :data:`attnproto.ops.families.FAMILIES` order, with its default tiles and why.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..findings import fmt, fmt_pct
from .problem import AUTO, DeviceSpec, FlashProblem, ProblemSpec

__all__ = [
    "Choice",
    "SWEEP_DTYPE",
    "TABLE_FILE",
    "build_entries",
    "choose",
    "generate_table",
    "load_table",
    "mma_choice",
    "table_specialisations",
    "use_entries",
]

TABLE_FILE = Path(__file__).with_name("tile_table.json")
TABLE_FORMAT = 1
#: The dtype the Prototype 1 sweep measures (FA3's setting); float16 borrows its entries.
SWEEP_DTYPE = "bfloat16"
_SIXTEEN_BIT = ("bfloat16", "float16")


@dataclass(frozen=True)
class Choice:
    family: Any
    config: Any
    reason: str
    entry: Optional[Dict[str, Any]] = None

    @property
    def label(self) -> str:
        return self.family.config_label(self.config)


# ------------------------------------------------------------------ the table
def _read(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {"format": TABLE_FORMAT, "sources": {}, "entries": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a format-{TABLE_FORMAT} tile table; regenerate it with "
                         "python3 tools/update_tile_table.py")
    return data


def load_table(path: Union[str, Path] = TABLE_FILE) -> Dict[str, Any]:
    """The table file as a dict (``sources``, ``entries``); an empty table when absent."""
    return _read(Path(path))


_SHIPPED: Optional[List[Dict[str, Any]]] = None
_OVERRIDE: Optional[List[Dict[str, Any]]] = None


def entries() -> List[Dict[str, Any]]:
    """The entries in force: those of :func:`use_entries` inside it, else the shipped table's."""
    global _SHIPPED
    if _OVERRIDE is not None:
        return _OVERRIDE
    if _SHIPPED is None:
        _SHIPPED = list(load_table()["entries"])
    return _SHIPPED


@contextlib.contextmanager
def use_entries(table_entries: Sequence[Dict[str, Any]]) -> Iterator[None]:
    """Choose from ``table_entries`` (e.g. those a sweep just measured) inside the block."""
    global _OVERRIDE
    saved, _OVERRIDE = _OVERRIDE, list(table_entries)
    try:
        yield
    finally:
        _OVERRIDE = saved


# ------------------------------------------------------------------ building it
def record_family(record: Dict[str, Any]) -> Optional[str]:
    """The family of a Prototype 1 record of one of our tiles (None: an anchor or the auto call).

    Records from before the registry name only the kernel; its family is the one whose
    ``kernel_name`` it is."""
    from . import families  # noqa: PLC0415

    c = record["config"]
    if c.get("kernel") == AUTO:
        return None
    if "family" in c:
        return c["family"]
    return next((f.name for f in families.FAMILIES if f.kernel_name == c.get("kernel")), None)


def _ours(record: Dict[str, Any]) -> bool:
    return record_family(record) is not None


def build_entries(records: Sequence[Dict[str, Any]], arch: str, device_name: str) -> List[Dict[str, Any]]:
    """Per (family, dtype, D, causal, N) the fastest measured tile of that family."""
    from . import families  # noqa: PLC0415

    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in records:
        fam = record_family(r)
        if fam is not None:
            c = r["config"]
            groups.setdefault((fam, c["dtype"], c["head_dim"], c["causal"], c["seq_len"]), []).append(r)
    out = []
    for (fam, dtype, d, causal, n) in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        rows = sorted(groups[(fam, dtype, d, causal, n)], key=lambda r: -r["metrics"]["tflops"])
        best, family = rows[0], families.get(fam)
        cfg = {k: best["config"][k] for k in family.config_keys}
        reason = (f"fastest of {len(rows)} {fam} tiles measured at N={n}: {fmt(best['metrics']['tflops'], 'TFLOPS')} "
                  f"(CV {fmt_pct(best['timing']['cv'])})")
        if len(rows) > 1:
            nxt = rows[1]
            reason += (f"; next {family.config_label(ConfigView(nxt['config']))} at "
                       f"{fmt(nxt['metrics']['tflops'], 'TFLOPS')}")
        out.append({"arch": arch, "family": fam, "dtype": dtype, "head_dim": d, "causal": causal, "seq_len": n,
                    "config": cfg, "tflops": best["metrics"]["tflops"], "cv": best["timing"]["cv"],
                    "device": device_name, "reason": reason})
    return out


class ConfigView:
    """Attribute access to a record's or table entry's config dict (for a family's config_label)."""

    def __init__(self, values: Dict[str, Any]):
        self.__dict__.update(values)


def arch_of(device_info: Dict[str, Any], backend: str) -> Optional[str]:
    """The table arch of a run's device info (run.json "device"), or None for the CPU."""
    if backend == "cuda" and "compute_major" in device_info:
        return f"sm_{int(device_info['compute_major'])}{int(device_info.get('compute_minor', 0))}"
    if backend == "metal" and device_info.get("arch"):
        return str(device_info["arch"])
    return None


def generate_table(results_root: Union[str, Path]) -> Dict[str, Any]:
    """The table the committed Prototype 1 results imply (what tile_table.json must equal)."""
    from ..records import read_records  # noqa: PLC0415

    root = Path(results_root)
    newest: Dict[str, Tuple[str, Path, Dict[str, Any]]] = {}
    for run_file in sorted(root.glob("*/proto1/run.json")):
        run = json.loads(run_file.read_text())
        arch = arch_of(run.get("device", {}), run.get("backend", ""))
        records_file = run_file.with_name("records.jsonl")
        if arch is None or not records_file.is_file():
            continue
        if arch not in newest or run["date"] > newest[arch][0]:
            newest[arch] = (run["date"], records_file, run)
    sources, table_entries = {}, []
    for arch in sorted(newest):
        date, records_file, run = newest[arch]
        records = read_records(records_file)
        device = records[0]["device"]
        sources[arch] = {"device": device, "results": records_file.parent.relative_to(root).as_posix(),
                         "commit": run.get("commit", "unknown"), "date": date}
        table_entries += build_entries(records, arch, device)
    return {"format": TABLE_FORMAT, "generated_by": "python3 tools/update_tile_table.py (attnproto.ops.chooser)",
            "sources": sources, "entries": table_entries}


# ------------------------------------------------------------------ choosing
def _nearest(values: Sequence[int], want: int) -> int:
    up = [v for v in values if v >= want]
    return min(up) if up else max(values)


def _point(spec: ProblemSpec, arch: str, fams: Sequence[str]) -> Optional[Tuple[int, int, str, List[str]]]:
    """(table head dim, table N, table dtype, notes) for a call, or None without entries."""
    rows = [e for e in entries() if e["arch"] == arch and e["family"] in fams and e["causal"] == spec.causal]
    if not rows:
        return None
    notes = []
    dtypes = {e["dtype"] for e in rows}
    dtype = spec.dtype
    if dtype not in dtypes:
        borrowed = next((t for t in _SIXTEEN_BIT if t in dtypes), None) if dtype in _SIXTEEN_BIT else None
        if borrowed is None:
            return None
        notes.append(f"{dtype} borrows {borrowed}'s measurements (same element size and tensor-core rate)")
        dtype = borrowed
    rows = [e for e in rows if e["dtype"] == dtype]
    d = _nearest(sorted({e["head_dim"] for e in rows}), spec.head_dim)
    if d != spec.head_dim:
        notes.append(f"D={spec.head_dim} uses the D={d} measurements")
    n = _nearest(sorted({e["seq_len"] for e in rows if e["head_dim"] == d}), spec.seq_q)
    if n != spec.seq_q:
        notes.append(f"Nq={spec.seq_q} falls in the N={n} band")
    return d, n, dtype, notes


def _candidates(problem: Union[FlashProblem, ProblemSpec], device: DeviceSpec) -> Tuple[List[Any], List[str], List[str]]:
    from . import families  # noqa: PLC0415

    ok, refused, reasons = [], [], []
    for fam in families.for_backend(device.backend):
        if fam.dsl:
            continue  # DSL families run by name only (Family.dsl); Prototype 5 measures them
        good, why = (fam.supports(problem, device) if isinstance(problem, FlashProblem)
                     else fam.supports_spec(problem, device))
        if good:
            ok.append(fam)
        else:
            refused.append(f"{fam.name}: {why}")
            reasons.append(why)
    return ok, refused, reasons


def _measured(fams: Sequence[Any], spec: ProblemSpec, device: DeviceSpec) -> List[Tuple[float, Any, Any, Dict]]:
    point = _point(spec, device.arch, [f.name for f in fams])
    if point is None:
        return []
    d, n, dtype, notes = point
    found = []
    for fam in fams:
        for e in entries():
            if (e["arch"], e["family"], e["dtype"], e["head_dim"], e["causal"], e["seq_len"]) == \
                    (device.arch, fam.name, dtype, d, spec.causal, n):
                try:
                    cfg = fam.config_for(spec, e["config"], device)
                except (TypeError, ValueError):
                    continue  # the measured tile does not hold this call (e.g. a smaller shared memory)
                found.append((float(e["tflops"]), fam, cfg, {**e, "notes": notes}))
    return sorted(found, key=lambda t: -t[0])


def choose(problem: Union[FlashProblem, ProblemSpec], device: DeviceSpec) -> Choice:
    """The family and tiles ``kernel="auto"`` runs, with the measured reason (module doc).

    ValueError naming ``kernel`` when no family of the device's backend supports the call,
    with every family's reason.
    """
    from .families import unsupported_error  # noqa: PLC0415

    spec = problem.spec if isinstance(problem, FlashProblem) else problem
    fams, refused, reasons = _candidates(problem, device)
    if not fams:
        # The first family's reason leads (it names the argument); every family's follows.
        raise unsupported_error(f"{reasons[0]} (kernel='auto': no {device.backend} family takes this call: "
                                + "; ".join(refused) + ")")
    found = _measured(fams, spec, device)
    if found:
        tflops, fam, cfg, e = found[0]
        reason = (f"{fam.config_label(cfg)}: fastest measured on {e['device']} at D={e['head_dim']}, "
                  f"N={e['seq_len']}, {'causal' if spec.causal else 'non-causal'}, {e['dtype']}: "
                  f"{fmt(tflops, 'TFLOPS')} (CV {fmt_pct(e['cv'])})")
        if len(found) > 1:
            t2, f2, c2, _ = found[1]
            reason += f"; next {f2.config_label(c2)} at {fmt(t2, 'TFLOPS')}"
        reason += "".join(f"; {note}" for note in e["notes"])
        if refused:
            reason += "; not eligible: " + "; ".join(refused)
        return Choice(fam, cfg, reason, e)
    fam = fams[0]
    cfg, why = fam.default_config(spec, device)
    reason = f"{fam.config_label(cfg)}: {why} (no measured table entry for {device.arch})"
    if refused:
        reason += "; not eligible: " + "; ".join(refused)
    return Choice(fam, cfg, reason)


def family_choice(family: Any, spec: ProblemSpec, device: DeviceSpec) -> Tuple[Any, str]:
    """The tiles ``kernel=family.name`` runs: its best measured entry, else its defaults."""
    found = _measured([family], spec, device)
    if found:
        tflops, fam, cfg, e = found[0]
        reason = (f"{fam.config_label(cfg)}: {fam.name}'s fastest tile measured on {e['device']} at "
                  f"D={e['head_dim']}, N={e['seq_len']}: {fmt(tflops, 'TFLOPS')}")
        return cfg, reason + "".join(f"; {note}" for note in e["notes"])
    cfg, why = family.default_config(spec, device)
    return cfg, f"{family.config_label(cfg)}: {why}"


def mma_choice(head_dim: int, seq_len: int, causal: bool, dtype: str, smem_limit: int) -> Tuple[Any, str]:
    """The mma family's tiles for a problem on a device with ``smem_limit`` bytes of shared memory."""
    from . import configs  # noqa: PLC0415
    from .families import mma  # noqa: PLC0415

    arch = next((f"sm_{cc}" for cc, lim in sorted(configs.SMEM_OPTIN_LIMIT_BY_ARCH.items(), reverse=True)
                 if lim == smem_limit), "sm_90")
    device = DeviceSpec("cuda", arch, "", smem_limit, (int(arch[3:]) // 10, int(arch[3:]) % 10))
    spec = ProblemSpec(1, 1, 1, seq_len, seq_len, head_dim, dtype, causal)
    return family_choice(mma.FAMILY, spec, device)


def table_specialisations(family: Any) -> List[Tuple[str, Dict[str, int]]]:
    """(kernel name, constants) of every shipped table entry of ``family``, both 16-bit dtypes."""
    out = []
    for e in load_table()["entries"]:
        if e["family"] != family.name or not e["arch"].startswith("sm_"):
            continue
        device = DeviceSpec.for_arch(e["arch"])
        for dtype in _SIXTEEN_BIT:
            spec = ProblemSpec(1, 1, 1, e["seq_len"], e["seq_len"], e["head_dim"], dtype, e["causal"])
            cfg = family.config_for(spec, e["config"], device)
            out.append((family.kernel_name, family.constants(cfg, spec)))
    return out
