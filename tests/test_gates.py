"""The watchdog (NFR-12) and the leak check (NFR-11), on the CPU backend with fake ops."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from attnproto import backend, cli, lab, leakcheck
from attnproto.experiments import registry


# ----------------------------------------------------------------- watchdog
class _FakeNative:
    """What GpuBackend wraps: a timing whose samples are given (a fake slow op)."""

    def __init__(self, samples_ms):
        self.samples_ms = samples_ms

    def time(self, enqueue, warmup, iters, flush_l2, guard_us):
        enqueue()
        return SimpleNamespace(samples_ms=list(self.samples_ms))


def _fake_backend(samples_ms) -> backend.GpuBackend:
    be = object.__new__(backend.GpuBackend)      # no device: only the wrapper's timing path is exercised
    be._b = _FakeNative(samples_ms)
    be.name = "fake"
    return be


def test_watchdog_sees_backend_and_device_clock_timings():
    with lab.dispatch_watch() as outer:
        with lab.dispatch_watch() as inner:
            _fake_backend([3.0, 120.0, 4.0]).time(lambda: None)
        lab.timing([1.0, 250.0], clock="device")
        lab.timing([1.0, 9000.0], clock="host")       # host work (a compile, numpy) is not a GPU dispatch
    assert inner.longest_ms == 120.0
    assert outer.longest_ms == 250.0 and outer.ok
    lab.timing([1.0, 2.0])                             # no watch open: nothing recorded, nothing raised


def _exp(samples_ms):
    def run(ctx):
        """Hypothesis: a fake op. Sweep: one timing."""
        stats = lab.from_native(_fake_backend(samples_ms).time(lambda: None))
        rec = ctx.record({"n": 1}, {"median_ms": stats.median_ms}, stats)
        return registry.ExperimentResult(records=[rec], findings=[])
    return registry.Experiment("fake", "fake", "fake", ("cpu",), run)


def _ctx(tmp_path):
    return registry.ExperimentContext(experiment="fake", backend="cpu", device={}, device_name="cpu", driver="x",
                                      commit="abc", quick=True, progress=lambda it=None, total=None, desc="": it,
                                      out_dir=tmp_path, rng=np.random.default_rng(0))


def test_experiment_records_longest_dispatch(tmp_path):
    result = registry.run_experiment(_exp([1.0, 2.0, 3.5]), _ctx(tmp_path))
    assert result.longest_dispatch_ms == 3.5


def test_experiment_over_the_limit_fails_its_gate(tmp_path):
    slow = lab.WATCHDOG_MAX_DISPATCH_MS + 100.0
    with pytest.raises(registry.ExperimentError, match="watchdog.*500 ms"):
        registry.run_experiment(_exp([1.0, slow]), _ctx(tmp_path))


def test_run_json_records_the_longest_dispatch(tmp_path):
    assert cli.main(["run", "smoke", "--backend", "cpu", "--quick", "--out", str(tmp_path), "--no-kb"]) == 0
    (run_json,) = tmp_path.glob("*/smoke/run.json")
    info = json.loads(run_json.read_text())
    assert info["watchdog_limit_ms"] == lab.WATCHDOG_MAX_DISPATCH_MS
    assert info["longest_dispatch_ms"] == 0.0       # the CPU backend times on the host clock only


# ----------------------------------------------------------------- leak check
def test_leakcheck_cpu_ops_pass(tmp_path):
    log = leakcheck.run_leakcheck("cpu", "cpu", iterations=20)
    names = [r["op"] for r in log["ops"]]
    assert "flash:cpu" in names and "torch.ops.attnproto.paged_decode" in names
    assert log["ok"], log
    assert all(set(r["growth"]) == {"host_rss_bytes"} for r in log["ops"] if r["status"] == "ok")


def test_leakcheck_catches_a_leak():
    hoard = []
    op = leakcheck.LeakOp("hoarder", lambda backend: lambda: hoard.append(bytearray(1 << 20)))
    row = leakcheck.check_op(op, "cpu", 50)
    assert row["status"] == "leak" and row["growth"]["host_rss_bytes"] >= leakcheck.MAX_GROWTH


def test_leakcheck_skips_and_errors_are_reported():
    def skip(backend):
        raise leakcheck.Skip("needs a Hopper GPU")

    def boom():
        raise RuntimeError("kernel failed")

    assert leakcheck.check_op(leakcheck.LeakOp("s", skip), "cpu", 5)["reason"] == "needs a Hopper GPU"
    row = leakcheck.check_op(leakcheck.LeakOp("e", lambda b: boom), "cpu", 5)
    assert row["status"] == "error" and "kernel failed" in row["reason"]
    with pytest.raises(ValueError, match="iterations"):
        leakcheck.check_op(leakcheck.LeakOp("s", skip), "cpu", 0)


def test_leakcheck_covers_the_registry_on_gpus():
    from attnproto.ops import families

    for be in ("cuda", "metal"):
        names = {o.name for o in leakcheck.ops_for(be)}
        assert {f"flash:{f.name}" for f in families.for_backend(be)} <= names
    assert {"paged_decode", "paged_prefill", "append_kv", "linear_attention:auto",
            "torch.ops.attnproto.flash_attention"} <= {o.name for o in leakcheck.ops_for("cuda")}


def test_leakcheck_cli_writes_the_log(tmp_path):
    rc = cli.main(["leakcheck", "--backend", "cpu", "--iterations", "5", "--op", "flash:cpu", "--out", str(tmp_path)])
    assert rc == cli.EXIT_OK
    (path,) = tmp_path.glob(f"*/{leakcheck.LEAKCHECK_DIR}/{leakcheck.LEAKCHECK_FILE}")
    log = json.loads(path.read_text())
    assert log["iterations"] == 5 and [r["op"] for r in log["ops"]] == ["flash:cpu"]
    assert cli.main(["leakcheck", "--backend", "cpu", "--op", "nope"]) == cli.EXIT_USAGE
