"""The attnproto command line, end to end through subprocesses, plus backend resolution."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import attnproto
from attnproto import cli
from attnproto.findings import make_finding, read_findings, write_findings
from attnproto.records import read_records
from attnproto.store import FindingStore

# Wall-clock bound of one CLI call (a hang fails, not stalls CI): `run all --quick` now also
# compiles Prototype 5's Triton and Helion kernels for sm_90 (85 s on a shared 2-core machine).
CLI_TIMEOUT_S = 300



def attnproto_cmd(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "attnproto", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def _usage_error(proc, message):
    assert proc.returncode == cli.EXIT_USAGE, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    return proc


def test_info_lists_cpu(env, tmp_path):
    out = _ok(attnproto_cmd(env, "info", cwd=tmp_path)).stdout
    assert "cpu" in out and "attnproto" in out


def test_list_shows_smoke(env, tmp_path):
    out = _ok(attnproto_cmd(env, "list", "--verbose", cwd=tmp_path)).stdout
    assert "smoke" in out and "Hypothesis" in out


def test_run_smoke_then_kb_add_and_query(env, tmp_path):
    out_dir = tmp_path / "tmp"
    proc = _ok(attnproto_cmd(env, "run", "smoke", "--backend", "cpu", "--quick", "--out", out_dir, cwd=tmp_path))
    assert "smoke" in proc.stdout and "median_ms" in proc.stdout
    assert "2 added" in proc.stdout  # run adds to $ATTNPROTO_KB by default
    (result_dir,) = list(out_dir.glob("cpu*/smoke"))
    records = read_records(result_dir / "records.jsonl")
    findings = read_findings(result_dir / "findings.jsonl")
    assert records and all(r["backend"] == "cpu" for r in records)
    assert len(findings) >= 1 and all(f.backend == "cpu" for f in findings)
    run = json.loads((result_dir / "run.json").read_text())
    assert run["backend"] == "cpu" and run["quick"] is True and "smoke" in run["command_line"]

    # re-running does not duplicate findings
    _ok(attnproto_cmd(env, "run", "smoke", "--backend", "cpu", "--quick", "--out", out_dir, "--no-kb", cwd=tmp_path))
    assert len((result_dir / "findings.jsonl").read_text().splitlines()) == len(findings)

    db = tmp_path / "other.sqlite"
    add = _ok(attnproto_cmd(env, "kb", "add", result_dir / "findings.jsonl", "--db", db, cwd=tmp_path))
    assert f"{len(findings)} added" in add.stdout
    again = _ok(attnproto_cmd(env, "kb", "add", result_dir / "findings.jsonl", "--db", db, cwd=tmp_path))
    assert f"0 added, 0 superseded, {len(findings)} unchanged" in again.stdout

    query = _ok(attnproto_cmd(env, "kb", "query", "tiled attention", "--json", "--db", db, cwd=tmp_path))
    hits = [json.loads(line) for line in query.stdout.splitlines()]
    attn_ids = {f.id for f in findings if "attention" in f.title}
    assert {h["id"] for h in hits} == attn_ids
    table = _ok(attnproto_cmd(env, "kb", "query", "matmul", "cpu", "--long", "--db", db, cwd=tmp_path)).stdout
    assert "gamma_k" in table and "worst_bound_ratio" in table

    stats = json.loads(_ok(attnproto_cmd(env, "kb", "stats", "--json", "--db", db, cwd=tmp_path)).stdout)
    assert stats["total"] == len(findings) and stats["by_backend"] == {"cpu": len(findings)}
    assert "findings: 2" in _ok(attnproto_cmd(env, "kb", "stats", "--db", db, cwd=tmp_path)).stdout


def test_cpu_run_defaults_to_user_state_dir(env, tmp_path):
    _ok(attnproto_cmd(env, "run", "all", "--backend", "cpu", "--quick", "--no-kb", cwd=tmp_path))
    assert list((tmp_path / "state" / "attnproto" / "results").glob("cpu*/smoke/records.jsonl"))
    assert not (tmp_path / "results").exists()


def test_unknown_experiment(env, tmp_path):
    _usage_error(attnproto_cmd(env, "run", "nope", "--backend", "cpu", cwd=tmp_path), "unknown experiment 'nope'")


def test_unknown_backend(env, tmp_path):
    _usage_error(attnproto_cmd(env, "run", "smoke", "--backend", "rocm", cwd=tmp_path), "invalid choice: 'rocm'")


def test_unavailable_backend(env, tmp_path):
    statuses, _ = cli.backend_statuses()
    if any(s.name == "metal" and s.available for s in statuses):
        pytest.skip("metal is available here")
    _usage_error(attnproto_cmd(env, "run", "smoke", "--backend", "metal", cwd=tmp_path), "backend metal is not available")


def test_experiment_without_backend_support(env, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "resolve_backend", lambda name: cli.BackendStatus("metal", True, "", {"name": "Apple M4"}))
    assert cli.main(["run", "smoke", "--backend", "metal", "--no-kb", "--out", str(tmp_path)]) == cli.EXIT_USAGE


@pytest.mark.parametrize("args, message", [
    (("kb", "add", "missing.jsonl"), "no such findings file"),
    (("kb", "query", "==="), "no searchable words"),
    (("kb", "query", "tile", "--limit", "0"), "expected a positive integer"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_kb_inputs(env, tmp_path, args, message):
    FindingStore(env["ATTNPROTO_KB"]).close()
    _usage_error(attnproto_cmd(env, *args, cwd=tmp_path), message)


def test_kb_add_of_a_missing_file_adds_nothing(env, tmp_path):
    good = tmp_path / "good.jsonl"
    write_findings(good, [_finding("a")])
    _usage_error(attnproto_cmd(env, "kb", "add", good, tmp_path / "missing.jsonl", cwd=tmp_path),
                 "no such findings file")
    assert not Path(env["ATTNPROTO_KB"]).exists()


def test_kb_add_invalid_jsonl_names_the_line(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    proc = attnproto_cmd(env, "kb", "add", bad, cwd=tmp_path)
    assert proc.returncode == cli.EXIT_FAILED and "Traceback" not in proc.stderr
    assert proc.stderr == f"attnproto: error: {bad}:1: missing finding fields: " + str(sorted(
        {"backend", "claim", "commit", "confidence", "config", "cv", "device", "evidence", "prototype", "slug",
         "timestamp", "title"})) + "\n"
    assert f"{bad}: 0 added, 0 superseded, 0 unchanged; 1 bad line skipped" in proc.stdout


# ------------------------------------------------------------ kb: bad input
def _finding(name, *, prototype="flash", claim="measured", timestamp="2025-01-01T00:00:00Z"):
    return make_finding(prototype=prototype, title=f"finding {name}", claim=claim, evidence={"tflops": 1.0},
                        config={"head_dim": 64, "name": name}, answer={"block_r": 64}, device="NVIDIA H100",
                        backend="cuda", cv=0.01, records=["flash/0"], timestamp=timestamp)


def test_kb_add_imports_the_good_lines_and_names_every_bad_one(env, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    good = [_finding(str(i)) for i in range(3)]
    mixed.write_bytes(b"\n".join([
        good[0].to_json().encode(),
        b"{not json",                                               # 2: invalid JSON
        json.dumps(good[1].to_dict() | {"cv": None}).encode(),       # 3: invalid finding
        b"\xff\xfeutf-16 perhaps",                                   # 4: not UTF-8
        good[1].to_json().encode(),
        b"",
        good[2].to_json().encode()[:50],                            # 7: truncated last line
    ]))
    binary = tmp_path / "kernel.cubin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    directory = tmp_path / "results"
    directory.mkdir()
    proc = attnproto_cmd(env, "kb", "add", mixed, binary, directory, cwd=tmp_path)
    assert proc.returncode == cli.EXIT_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.removeprefix("attnproto: error: ").split(": ", 1)[0] for line in lines] == [
        f"{mixed}:2", f"{mixed}:3", f"{mixed}:4", f"{mixed}:7", str(binary), str(directory)]
    assert "not valid JSON" in lines[0] and "measured findings need the cv" in lines[1]
    assert "not UTF-8 text (byte 0xff" in lines[2] and "truncated last line" in lines[3]
    assert "binary file" in lines[4] and "is a directory" in lines[5]
    assert f"{mixed}: 2 added, 0 superseded, 0 unchanged; 4 bad lines skipped" in proc.stdout
    assert f"{binary}: not imported" in proc.stdout and f"{directory}: not imported" in proc.stdout
    listed = _ok(attnproto_cmd(env, "kb", "list", "--json", cwd=tmp_path)).stdout.splitlines()
    assert sorted(json.loads(x)["id"] for x in listed) == sorted(f.id for f in good[:2])
    # only good files: exit 0
    clean = tmp_path / "clean.jsonl"
    write_findings(clean, good)
    assert "1 added, 0 superseded, 2 unchanged" in _ok(attnproto_cmd(env, "kb", "add", clean, cwd=tmp_path)).stdout


def test_kb_add_reports_an_unreadable_file(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked.jsonl"
    write_findings(locked, [_finding("x")])
    ok = tmp_path / "ok.jsonl"
    write_findings(ok, [_finding("y")])
    real = Path.read_bytes

    def read_bytes(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    db = tmp_path / "kb.sqlite"
    assert cli.main(["kb", "add", str(locked), str(ok), "--db", str(db)]) == cli.EXIT_FAILED
    out, err = capsys.readouterr()
    assert err == f"attnproto: error: {locked}: cannot read: Permission denied\n"
    assert f"{locked}: not imported" in out and f"{ok}: 1 added" in out
    with FindingStore(db, create=False) as store:
        assert [f.id for f in store.list()] == [_finding("y").id]


# -------------------------------------------------- kb: a missing database
@pytest.mark.parametrize("args", [("query", "tile"), ("stats",), ("stats", "--json"), ("list",),
                                  ("show", "flash/x/0"), ("rm", "flash/x/0")])
@pytest.mark.parametrize("via_env", [False, True])
def test_kb_reads_on_a_missing_database_create_nothing(env, tmp_path, args, via_env):
    db = tmp_path / "nowhere" / "kb.sqlite"
    if via_env:
        env["ATTNPROTO_KB"] = str(db)
        proc = attnproto_cmd(env, "kb", *args, cwd=tmp_path)
    else:
        proc = attnproto_cmd(env, "kb", *args, "--db", db, cwd=tmp_path)
    _usage_error(proc, f"no findings database at {db}; add findings with `attnproto kb add`")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert not db.parent.exists() and not Path(env["ATTNPROTO_KB"]).exists()


# --------------------------------------------------------- kb list/show/rm
@pytest.fixture()
def kb_with_history(env, tmp_path):
    v1 = _finding("best", claim="Br=64 is fastest")
    v2 = make_finding(prototype="flash", title="finding best", claim="Br=128 is fastest", evidence={"tflops": 2.0},
                      config=v1.config, answer={"block_r": 128}, device=v1.device, backend="cuda", cv=0.07,
                      records=["flash/1"], commit="cafe" * 10, timestamp="2025-02-01T00:00:00Z")
    other = _finding("other", prototype="paged")
    path = tmp_path / "f.jsonl"
    write_findings(path, [v1, other])
    _ok(attnproto_cmd(env, "kb", "add", path, cwd=tmp_path))
    write_findings(path, [v2])
    assert "0 added, 1 superseded, 0 unchanged" in _ok(attnproto_cmd(env, "kb", "add", path, cwd=tmp_path)).stdout
    return v1, v2, other


def test_kb_list(env, tmp_path, kb_with_history):
    v1, v2, other = kb_with_history
    out = _ok(attnproto_cmd(env, "kb", "list", cwd=tmp_path)).stdout.splitlines()
    assert out[0].split() == ["confidence", "prototype", "backend", "device", "title", "id"]
    assert [line.split()[-1] for line in out[2:-1]] == [v2.id, other.id] and out[-1] == "2 findings"
    assert "medium" in out[2] and "NVIDIA H100" in out[2]
    only = _ok(attnproto_cmd(env, "kb", "list", "--prototype", "paged", "--json", cwd=tmp_path)).stdout
    assert [json.loads(x)["id"] for x in only.splitlines()] == [other.id]
    none = _ok(attnproto_cmd(env, "kb", "list", "--prototype", "nope", cwd=tmp_path)).stdout
    assert none == f"no findings of prototype 'nope' in {env['ATTNPROTO_KB']}\n"


def test_kb_show(env, tmp_path, kb_with_history):
    v1, v2, _ = kb_with_history
    out = _ok(attnproto_cmd(env, "kb", "show", v2.id, cwd=tmp_path)).stdout
    for text in (f"id:         {v2.id}", "claim:      Br=128 is fastest", "config:\n  head_dim = 64\n  name = best",
                 "answer:\n  block_r = 128", "evidence:\n  tflops = 2.0", "records:    flash/1",
                 f"commit:     {'cafe' * 10}", "confidence: medium (cv 7.00 %)", "history: 1 superseded version",
                 "  claim:      Br=64 is fastest", "  answer:\n    block_r = 64",
                 "  superseded: ", "(changed claim, evidence, answer, confidence, cv, records)"):
        assert text in out, text
    lines = _ok(attnproto_cmd(env, "kb", "show", v2.id, "--json", cwd=tmp_path)).stdout.splitlines()
    assert [json.loads(x)["claim"] for x in lines] == [v2.claim, v1.claim]
    _usage_error(attnproto_cmd(env, "kb", "show", "flash/nope/000", cwd=tmp_path), "no finding with id 'flash/nope/000'")


def test_kb_rm(env, tmp_path, kb_with_history):
    v1, v2, other = kb_with_history
    out = _ok(attnproto_cmd(env, "kb", "rm", v2.id, cwd=tmp_path)).stdout
    assert out == f"removed {v2.id}: 1 live finding, 1 superseded version ({env['ATTNPROTO_KB']})\n"
    _usage_error(attnproto_cmd(env, "kb", "show", v2.id, cwd=tmp_path), f"no finding with id {v2.id!r}")
    _usage_error(attnproto_cmd(env, "kb", "rm", v2.id, cwd=tmp_path), f"no finding with id {v2.id!r}")
    assert _ok(attnproto_cmd(env, "kb", "query", "fastest", cwd=tmp_path)).stdout == "no findings match 'fastest'\n"
    stats = json.loads(_ok(attnproto_cmd(env, "kb", "stats", "--json", cwd=tmp_path)).stdout)
    assert (stats["total"], stats["history"]) == (1, 0)


# ------------------------------------------------------- backend resolution
def _fake_backend_module(monkeypatch, backends, best=None, raises=None):
    mod = types.ModuleType("attnproto.backend")

    def list_backends():
        if raises:
            raise raises
        return backends

    mod.list_backends = list_backends
    def best_backend():
        if raises:
            raise raises
        return best

    mod.best_backend = best_backend
    monkeypatch.setitem(sys.modules, "attnproto.backend", mod)
    monkeypatch.setattr(attnproto, "backend", mod, raising=False)
    return mod


def _b(backend, available, reason="", **info):
    return types.SimpleNamespace(name=backend, available=available, reason=reason, info=info)


def test_native_core_missing_still_lists_cpu(monkeypatch, capsys):
    _fake_backend_module(monkeypatch, [], raises=ImportError("no _attnproto"))
    statuses, note = cli.backend_statuses()
    assert [s.name for s in statuses] == ["cpu"] and "native core not built" in note
    assert cli.resolve_backend("auto").name == "cpu"
    assert cli.main(["info"]) == 0
    assert "native core not built" in capsys.readouterr().out


def test_auto_uses_best_backend(monkeypatch):
    _fake_backend_module(monkeypatch, [_b("cpu", True), _b("cuda", True, name="NVIDIA H100", driver="13.0"),
                                       _b("metal", False, "not macOS")], best="cuda")
    status = cli.resolve_backend("auto")
    assert status.name == "cuda" and cli.device_name(status) == "NVIDIA H100" and cli.driver_of(status) == "13.0"


def test_unavailable_backend_reports_reason(monkeypatch):
    _fake_backend_module(monkeypatch, [_b("cuda", False, "no CUDA driver")], best="cpu")
    with pytest.raises(cli.CLIError, match="backend cuda is not available: no CUDA driver"):
        cli.resolve_backend("cuda")
    assert cli.resolve_backend("cpu").info["cores"] == os.cpu_count()  # cpu added when not listed


def test_best_backend_must_be_listed(monkeypatch):
    _fake_backend_module(monkeypatch, [_b("cpu", True)], best="rocm")
    with pytest.raises(cli.CLIError, match="best_backend"):
        cli.resolve_backend("auto")


# ------------------------------------------------------------------ report
def _tables(text):
    """The tables of a report (after its header line): each has a header, a rule and >= 1 row."""
    return [block.splitlines() for block in text.split("\n", 1)[1].split("\n\n")]


@pytest.mark.parametrize("experiment", ["smoke", "proto1", "proto6"])
def test_report_of_a_cpu_run_prints_tables_with_rows(env, tmp_path, experiment):
    out = tmp_path / "out"
    _ok(attnproto_cmd(env, "run", experiment, "--backend", "cpu", "--quick", "--out", out, "--no-kb", cwd=tmp_path))
    (directory,) = out.glob(f"cpu*/{experiment}")
    n = len(read_records(directory / "records.jsonl"))
    report = _ok(attnproto_cmd(env, "report", directory, cwd=tmp_path)).stdout.rstrip("\n")
    assert report.splitlines()[0].startswith(f"{experiment} on ") and f"; {n} records" in report.splitlines()[0]
    tables = _tables(report)
    assert tables and all(len(t) >= 3 and set(t[1]) <= {"-", " "} for t in tables), report
    assert report == cli.report_text(directory)


def test_report_falls_back_to_record_tables_when_the_summary_is_empty(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _ok(attnproto_cmd(env, "run", "proto1", "--backend", "cpu", "--quick", "--out", out, "--no-kb", cwd=tmp_path))
    (directory,) = out.glob("cpu*/proto1")
    module = cli._experiment_module("proto1")
    records = read_records(directory / "records.jsonl")
    summary = cli.report_text(directory)
    if module.summary_table(records):
        assert _tables(summary)[0][0].split()[0] == "D"                 # the experiment's own summary
    monkeypatch.setattr(module, "summary_table", lambda recs: [])
    fallback = cli.report_text(directory)
    assert fallback.splitlines()[0] == summary.splitlines()[0]
    assert sum(len(t) - 2 for t in _tables(fallback)) == len(records)   # one row per record
    assert "median_ms" in _tables(fallback)[0][0]

    def broken(recs):
        return [{"x": recs[0]["config"]["no_such_key"]}]

    monkeypatch.setattr(module, "summary_table", broken)
    text = cli.report_text(directory)
    assert "proto1.summary_table failed on these records: KeyError: 'no_such_key'" in text.splitlines()[1]
    assert text.splitlines()[2:] == fallback.splitlines()[1:]


def test_format_table_never_prints_zero_for_small_nonzero_floats():
    from attnproto.report import format_value

    for exp in range(-30, 12):
        for mantissa in (1.0, 1.2345, 4.9999, 9.9996):
            value = mantissa * 10.0 ** exp
            for v in (value, -value):
                text = format_value(v)
                assert float(text) != 0 and text not in ("0.0", "-0.0"), (v, text)
                assert float(text) == pytest.approx(v, rel=5e-4), (v, text)


def test_format_table_aligns_numbers_right_and_text_left():
    from attnproto.report import format_table

    table = format_table([{"op": "matmul", "ms": 1.5, "n": 7}, {"op": "attention", "ms": 12.25, "n": None}])
    lines = table.splitlines()
    assert lines[0].split() == ["op", "ms", "n"]
    assert lines[2].startswith("matmul   ") and lines[2].endswith("  1.5  7")
    assert lines[3].endswith("12.25  -")
    assert format_table([{"title": "x" * 10}], max_width=5).splitlines()[2] == "xxxx…"


@pytest.mark.parametrize("value, text", [
    (None, "-"), (True, "yes"), (0.0, "0"), (1234.5678, "1235"), (2.5e-5, "2.500e-05"), (3e7, "3.000e+07"),
    (float("nan"), "nan"), ([2, 3], "2x3"), (17, "17"),
])
def test_format_value(value, text):
    from attnproto.report import format_value

    assert format_value(value) == text


def test_builtin_progress_bar_prints_once_when_not_a_tty():
    import io

    from attnproto.report import ProgressBar

    stream = io.StringIO()
    assert list(ProgressBar(range(4), desc="sweep", stream=stream)) == [0, 1, 2, 3]
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("sweep: [") and "4/4" in line
    with pytest.raises(ValueError, match="total"):
        ProgressBar(total=-1, stream=stream)


def test_plot_metric(tmp_path):
    from attnproto.report import plot_metric

    records = [{"id": f"r{i}", "config": {"n": n, "d": d}, "metrics": {"gflops": float(n * d)},
                "timing": {"median_ms": 1.0}} for i, (n, d) in enumerate([(1, 2), (2, 2), (1, 4), (2, 4)])]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs matplotlib"):
            plot_metric(records, "n", "gflops", tmp_path / "p.png")
        return
    out = plot_metric(records, "n", "gflops", tmp_path / "p.png", series="d")
    assert out.stat().st_size > 0
    with pytest.raises(KeyError, match="missing_field"):
        plot_metric(records, "n", "missing_field", tmp_path / "q.png")
