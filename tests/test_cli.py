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
from attnproto.findings import read_findings
from attnproto.records import read_records

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"
CLI_TIMEOUT_S = 120


@pytest.fixture()
def env(tmp_path):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + e.get("PYTHONPATH", "")
    e["HOME"] = str(tmp_path / "home")
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    e["XDG_DATA_HOME"] = str(tmp_path / "data")
    e["ATTNPROTO_KB"] = str(tmp_path / "kb.sqlite")
    e["ATTNPROTO_NO_TQDM"] = "1"
    return e


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
    assert f"0 added, {len(findings)} already present" in again.stdout

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
    _usage_error(attnproto_cmd(env, *args, cwd=tmp_path), message)


def test_kb_add_invalid_jsonl_names_the_line(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    _usage_error(attnproto_cmd(env, "kb", "add", bad, cwd=tmp_path), "bad.jsonl:1: missing finding fields")


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
