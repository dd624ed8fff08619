"""Experiment registry, result records / layout, and the smoke experiment."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import attnproto
from attnproto import experiments, ref
from attnproto.experiments import registry, smoke
from attnproto.findings import read_findings
from attnproto.records import (
    RecordError,
    check_findings_against_records,
    default_out_dir,
    device_slug,
    make_record,
    read_records,
    record_id,
    timing_from_samples,
    timing_to_dict,
    validate_record,
    write_experiment_results,
)

DOC = """Hypothesis: something measurable.

Sweep: one config."""
CPU_NAME = "AMD EPYC"


def _ctx(tmp_path, backend="cpu", name="exp", device_name=CPU_NAME, quick=True):
    return registry.ExperimentContext(
        experiment=name, backend=backend, device={"name": device_name}, device_name=device_name,
        driver="numpy test", commit="unknown", quick=quick,
        progress=lambda iterable=None, total=None, desc="": iterable,
        out_dir=tmp_path, rng=np.random.default_rng(0),
    )


TIMING = {"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.2, "cv": 0.03}


@pytest.fixture()
def empty_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    return registry


# ------------------------------------------------------------------ registry
def test_smoke_is_registered_on_import():
    assert "smoke" in experiments.names()
    exp = experiments.get("smoke")
    assert exp.prototype == "smoke" and exp.supports("cpu") and exp.supports("cuda")
    assert not exp.supports("metal")
    assert "hypothesis" in exp.doc.lower() and "sweep" in exp.doc.lower()
    assert exp in experiments.supporting("cpu")


def test_unknown_experiment_lists_known_names():
    with pytest.raises(experiments.UnknownExperimentError, match=r"unknown experiment 'nope'; known: .*smoke"):
        experiments.get("nope")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(name="Bad Name"), ValueError, "must match"),
    (dict(name=""), ValueError, "must match"),
    (dict(prototype="Flash Attn"), ValueError, "prototype"),
    (dict(description=" "), ValueError, "description"),
    (dict(backends=()), ValueError, "non-empty subset"),
    (dict(backends=("cpu", "rocm")), ValueError, "non-empty subset"),
    (dict(backends="cpu"), TypeError, "not a single string"),
])
def test_decorator_validates_arguments(empty_registry, kwargs, error, message):
    args = dict(name="exp", prototype="flash", description="d", backends=("cpu",)) | kwargs
    with pytest.raises(error, match=message):
        registry.experiment(args.pop("name"), args.pop("prototype"), args.pop("description"), **args)


def test_decorator_requires_hypothesis_and_sweep_in_docstring(empty_registry):
    def no_doc(ctx):
        return None

    with pytest.raises(ValueError, match="hypothesis and the sweep"):
        registry.experiment("exp", "flash", "d", backends=("cpu",))(no_doc)


def test_duplicate_names_are_rejected(empty_registry):
    def a(ctx):
        pass

    def b(ctx):
        pass

    a.__doc__ = b.__doc__ = DOC
    registry.experiment("exp", "flash", "d", backends=("cpu",))(a)
    registry.experiment("exp", "flash", "d", backends=("cpu",))(a)  # re-import of the same function is fine
    with pytest.raises(ValueError, match="already registered"):
        registry.experiment("exp", "flash", "d", backends=("cpu",))(b)


def test_supporting_filters_by_backend(empty_registry):
    for name, backends in (("a", ("cpu",)), ("b", ("cuda", "metal")), ("c", ("cpu", "cuda"))):
        def fn(ctx):
            pass
        fn.__doc__ = DOC
        registry.experiment(name, "flash", "d", backends=backends)(fn)
    assert [e.name for e in registry.supporting("cpu")] == ["a", "c"]
    assert [e.name for e in registry.supporting("metal")] == ["b"]
    with pytest.raises(ValueError, match="backend"):
        registry.supporting("rocm")


def _register(fn, backends=("cpu",)):
    fn.__doc__ = DOC
    registry.experiment("exp", "flash", "d", backends=backends)(fn)
    return registry.get("exp")


def _good(ctx):
    rec = ctx.record({"head_dim": 7}, {"median_ms": 1.0}, TIMING)
    f = ctx.finding(prototype="flash", title="ok", claim="c", evidence={"median_ms": 1.0},
                    config={"head_dim": 7}, cv=0.03, records=[rec])
    return registry.ExperimentResult(records=[rec], findings=[f])


def test_run_experiment_accepts_a_consistent_result(empty_registry, tmp_path):
    result = registry.run_experiment(_register(_good), _ctx(tmp_path))
    assert len(result.records) == 1 and result.findings[0].records == (result.records[0]["id"],)


def test_run_experiment_rejects_unsupported_backend(empty_registry, tmp_path):
    exp = _register(_good, backends=("cuda",))
    with pytest.raises(registry.ExperimentError, match="does not support backend 'cpu'"):
        registry.run_experiment(exp, _ctx(tmp_path))


def test_run_experiment_rejects_wrong_return_type(empty_registry, tmp_path):
    exp = _register(lambda ctx: {"records": []})
    with pytest.raises(registry.ExperimentError, match="expected ExperimentResult"):
        registry.run_experiment(exp, _ctx(tmp_path))


def test_cpu_records_never_back_gpu_findings(empty_registry, tmp_path):
    def mixed(ctx):
        cpu_rec = ctx.record({"head_dim": 7}, {"median_ms": 1.0}, TIMING)
        gpu_rec = make_record(experiment="exp", config={"head_dim": 7}, metrics={"median_ms": 1.0}, timing=TIMING,
                              device="NVIDIA H100", backend="cuda", driver="x", commit="unknown")
        return registry.ExperimentResult(records=[cpu_rec, gpu_rec], findings=[])

    with pytest.raises(registry.ExperimentError, match="labelled exp/cuda"):
        registry.run_experiment(_register(mixed), _ctx(tmp_path))


def test_findings_must_cite_records(empty_registry, tmp_path):
    def uncited(ctx):
        rec = ctx.record({"head_dim": 7}, {"median_ms": 1.0}, TIMING)
        f = ctx.finding(prototype="flash", title="ok", claim="c", evidence={"median_ms": 1.0},
                        config={}, cv=0.03, records=[])
        return registry.ExperimentResult(records=[rec], findings=[f])

    with pytest.raises(RecordError, match="cites no records"):
        registry.run_experiment(_register(uncited), _ctx(tmp_path))


def test_check_findings_against_records_backend_mismatch(tmp_path):
    cpu_rec = make_record(experiment="exp", config={"d": 1}, metrics={"median_ms": 1.0}, timing=TIMING,
                          device="NVIDIA H100", backend="cpu", driver="x", commit="unknown")
    ctx = _ctx(tmp_path, backend="cuda", device_name="NVIDIA H100")
    f = ctx.finding(prototype="flash", title="t", claim="c", evidence={"tflops": 1.0}, config={}, cv=0.01,
                    records=[cpu_rec])
    with pytest.raises(RecordError, match="only cite records of their own backend"):
        check_findings_against_records([f], [cpu_rec])
    with pytest.raises(RecordError, match="unknown record"):
        check_findings_against_records([f], [])


# ------------------------------------------------------------------- records
def test_timing_from_samples():
    t = timing_from_samples([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t["median_ms"] == 3.0 and t["mean_ms"] == 3.0 and t["n"] == 5
    assert t["p10_ms"] == pytest.approx(1.4) and t["p90_ms"] == pytest.approx(4.6)
    assert t["cv"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / 3.0)


@pytest.mark.parametrize("samples, message", [
    ([1.0], "at least 2"),
    ([1.0, float("nan")], "finite"),
    ([1.0, -1.0], "finite"),
    ([0.0, 0.0], "zero mean"),
])
def test_timing_from_samples_rejects(samples, message):
    with pytest.raises(RecordError, match=message):
        timing_from_samples(samples)


def test_timing_to_dict_accepts_timingstats_like_objects():
    obj = types.SimpleNamespace(median_ms=1.0, p10_ms=0.5, p90_ms=2.0, mean_ms=1.1, cv=0.2,
                                samples_ms=[0.5, 1.0, 2.0])
    assert timing_to_dict(obj) == {"median_ms": 1.0, "p10_ms": 0.5, "p90_ms": 2.0, "cv": 0.2, "mean_ms": 1.1,
                                   "samples_ms": [0.5, 1.0, 2.0], "n": 3}
    with pytest.raises(RecordError, match="missing 'cv'"):
        timing_to_dict({"median_ms": 1.0, "p10_ms": 0.5, "p90_ms": 2.0})
    with pytest.raises(RecordError, match="p10 <= median <= p90"):
        timing_to_dict({"median_ms": 3.0, "p10_ms": 0.5, "p90_ms": 2.0, "cv": 0.1})


def test_validate_record_rejects_bad_records():
    rec = make_record(experiment="exp", config={"d": 1}, metrics={"median_ms": 1.0}, timing=TIMING,
                      device="dev", backend="cpu", driver="x", commit="unknown")
    assert validate_record(rec) == rec
    assert rec["id"] == record_id("exp", {"d": 1}, "dev", "cpu")
    with pytest.raises(RecordError, match="does not match its content"):
        validate_record(rec | {"config": {"d": 2}})
    with pytest.raises(RecordError, match="NaN"):
        validate_record(rec | {"metrics": {"median_ms": float("nan")}})
    with pytest.raises(RecordError, match="unknown"):
        validate_record(rec | {"extra": 1})
    with pytest.raises(RecordError, match="backend"):
        validate_record(rec | {"backend": "gpu"})


@pytest.mark.parametrize("backend, name, slug", [
    ("cuda", "NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("metal", "Apple M4 Pro", "apple-m4-pro"),
    ("cpu", "AMD EPYC 7B13", "cpu-amd-epyc-7b13"),
    ("cpu", "cpu", "cpu"),
    ("cpu", None, "cpu"),
    ("cpu", "CPU x86_64", "cpu-x86-64"),
])
def test_device_slug(backend, name, slug):
    assert device_slug(backend, name) == slug


@pytest.mark.parametrize("backend, name", [("cuda", ""), ("cuda", "CPU emulator"), ("rocm", "x")])
def test_device_slug_rejects(backend, name):
    with pytest.raises(ValueError):
        device_slug(backend, name)


def test_default_out_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_out_dir("cuda") == Path("results")
    assert default_out_dir("cpu") == tmp_path / "attnproto" / "results"


def test_write_experiment_results_layout(empty_registry, tmp_path):
    result = registry.run_experiment(_register(_good), _ctx(tmp_path))
    run_info = {"backend": "cpu", "command_line": "attnproto run exp", "date": "2025-01-02T03:04:05Z",
                "commit": "abc"}
    (fid,) = [f.id for f in result.findings]
    for attempt in range(2):
        paths = write_experiment_results(tmp_path / "out", experiment="exp", backend="cpu", device_name=CPU_NAME,
                                         records=result.records, findings=result.findings, run_info=run_info)
        # the second write is the same run again: the finding is unchanged, nothing goes to history
        assert (paths.merge.new, paths.merge.unchanged) == (((fid,), ()) if attempt == 0 else ((), (fid,)))
        assert not paths.history.exists()
    assert paths.directory == tmp_path / "out" / "cpu-amd-epyc" / "exp"
    assert sorted(p.name for p in paths.directory.parent.iterdir()) == ["exp"]    # no staging left behind
    assert read_records(paths.records) == result.records
    assert read_findings(paths.findings) == result.findings
    assert json.loads(paths.run.read_text())["experiment"] == "exp"
    with pytest.raises(RecordError, match="this run is exp/cuda"):
        write_experiment_results(tmp_path / "out", experiment="exp", backend="cuda", device_name="NVIDIA H100",
                                 records=result.records, findings=[], run_info=run_info)


def test_finding_answer_is_not_part_of_the_id(tmp_path):
    ctx = _ctx(tmp_path)
    rec = ctx.record({"head_dim": 7}, {"median_ms": 1.0}, TIMING)

    def best(tile):
        return ctx.finding(prototype="flash", title=f"Best tile is {tile}", slug="best-tile", claim=f"{tile} wins",
                           evidence={"median_ms": 1.0}, config={"head_dim": 7}, answer={"block_r": tile},
                           cv=0.03, records=[rec])

    assert best(64).id == best(128).id and best(64).answer == {"block_r": 64}
    assert ctx.finding(prototype="flash", title="t", claim="c", evidence={"median_ms": 1.0}, config={},
                       cv=0.03, records=[rec]).answer == {}


def test_run_experiment_rejects_two_answers_to_one_question(empty_registry, tmp_path):
    def two_answers(ctx):
        rec = ctx.record({"head_dim": 7}, {"median_ms": 1.0}, TIMING)
        fs = [ctx.finding(prototype="flash", title="Best tile", claim=f"tile {t} wins", evidence={"median_ms": 1.0},
                          config={"head_dim": 7}, answer={"block_r": t}, cv=0.03, records=[rec]) for t in (64, 128)]
        return registry.ExperimentResult(records=[rec], findings=fs)

    with pytest.raises(registry.ExperimentError, match=r"two different findings with id .*claim, answer"):
        registry.run_experiment(_register(two_answers), _ctx(tmp_path))


def test_run_experiment_drops_identical_repeats(empty_registry, tmp_path):
    def repeated(ctx):
        result = _good(ctx)
        return registry.ExperimentResult(records=result.records, findings=result.findings * 2)

    assert len(registry.run_experiment(_register(repeated), _ctx(tmp_path)).findings) == 1


# --------------------------------------------------------------------- smoke
@pytest.mark.parametrize("dtype, atol, rtol", [(np.float32, smoke.ATTN_FP32_ATOL, smoke.ATTN_FP32_RTOL),
                                               (np.float64, 1e-12, 1e-10)])
@pytest.mark.parametrize("head_dim", [1, 7, 33, 64])
@pytest.mark.parametrize("seq_q, seq_kv, tile", [(5, 5, 1), (16, 37, 8), (9, 64, 64), (3, 10, 128)])
def test_tiled_attention_matches_reference(dtype, atol, rtol, head_dim, seq_q, seq_kv, tile):
    rng = np.random.default_rng(head_dim * 1000 + seq_kv)
    q = rng.standard_normal((2, 3, seq_q, head_dim)).astype(dtype)
    k = rng.standard_normal((2, 3, seq_kv, head_dim)).astype(dtype)
    v = rng.standard_normal((2, 3, seq_kv, head_dim)).astype(dtype)
    out = smoke.tiled_attention(q, k, v, tile)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref.attention(q, k, v), atol=atol, rtol=rtol)


def test_tiled_attention_rejects_bad_shapes():
    x = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="head_dim"):
        smoke.tiled_attention(x, np.zeros((1, 2, 4, 4), np.float32), np.zeros((1, 2, 4, 4), np.float32), 2)
    with pytest.raises(ValueError, match=r"\[B,H,N,D\]"):
        smoke.tiled_attention(x[0], x, x, 2)
    with pytest.raises(ValueError, match="tile"):
        smoke.tiled_attention(x, x, x, 0)


def test_matmul_error_bound_catches_a_wrong_product():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((33, 17)).astype(np.float32)
    b = rng.standard_normal((17, 9)).astype(np.float32)
    bound = smoke._matmul_error_bound(a, b, float(np.finfo(np.float32).eps))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert (np.abs((a @ b) - exact) <= bound).all()
    half = (a.astype(np.float16) @ b.astype(np.float16)).astype(np.float64)
    assert (np.abs(half - exact) > bound).any()


def test_smoke_cpu_quick(tmp_path):
    ctx = _ctx(tmp_path, name="smoke")
    result = experiments.run_experiment(experiments.get("smoke"), ctx)
    expected = len(smoke.MATMUL_SHAPES_QUICK) + len(smoke.ATTENTION_SHAPES_QUICK)
    assert len(result.records) == expected
    assert len(result.findings) == 2
    assert all(r["backend"] == "cpu" and r["timing"]["n"] == smoke.REPEATS_QUICK for r in result.records)
    assert all(r["metrics"].get("bound_ratio", r["metrics"].get("tolerance_ratio")) <= 1 for r in result.records)
    cited = {rid for f in result.findings for rid in f.records}
    assert cited == {r["id"] for r in result.records}
    matmul, attention = result.findings
    # config is the question (the shapes), the answer the measured verdict and worst shape
    assert matmul.config == {"op": "matmul", "dtype": "float32", "shapes": [list(s) for s in smoke.MATMUL_SHAPES_QUICK]}
    worst = max((r for r in result.records if r["config"]["op"] == "matmul"), key=lambda r: r["metrics"]["bound_ratio"])
    assert matmul.answer == {"within_bound": True,
                             "worst_shape": "x".join(str(worst["config"][k]) for k in ("m", "n", "k"))}
    assert set(attention.answer) == {"within_tolerance", "worst_shape"}
    for f in result.findings:
        assert "[" not in f.claim and "(1, " not in f.claim          # no Python lists or tuples
        decimals = re.findall(r"\d+\.\d+", f.claim)                   # three significant digits, not more
        assert decimals and all(len(d.replace(".", "").lstrip("0")) <= 3 for d in decimals), f.claim
    assert "64x64x64, 96x80x72, 129x65x33" in matmul.claim and " GFLOP/s " in matmul.claim


class _FakeGpuSmoke(types.ModuleType):
    def __init__(self, err, tolerance=1e-3):
        super().__init__("attnproto.gpu_smoke")
        self.err, self.tolerance, self.calls = err, tolerance, []

    def run_matmul(self, backend, m, n, k, rng):
        self.calls.append((backend.name, m, n, k))
        timing = types.SimpleNamespace(median_ms=0.5, p10_ms=0.49, p90_ms=0.52, mean_ms=0.5, cv=0.01,
                                       samples_ms=[0.49, 0.5, 0.52])
        return {"max_abs_err": self.err, "bound_ratio": self.err / self.tolerance, "timing": timing,
                "all_written": True}


@pytest.fixture()
def fake_gpu(monkeypatch):
    def install(err, tolerance=1e-3):
        mod = _FakeGpuSmoke(err, tolerance)
        monkeypatch.setitem(sys.modules, "attnproto.gpu_smoke", mod)
        monkeypatch.setattr(attnproto, "gpu_smoke", mod, raising=False)
        backend_mod = types.ModuleType("attnproto.backend")
        backend_mod.get = lambda name: types.SimpleNamespace(name=name)
        monkeypatch.setitem(sys.modules, "attnproto.backend", backend_mod)
        monkeypatch.setattr(attnproto, "backend", backend_mod, raising=False)
        return mod
    return install


def test_smoke_cuda_branch_uses_gpu_smoke(tmp_path, fake_gpu):
    mod = fake_gpu(err=1e-4)
    ctx = _ctx(tmp_path, backend="cuda", name="smoke", device_name="NVIDIA H100 80GB HBM3")
    result = experiments.run_experiment(experiments.get("smoke"), ctx)
    assert [c[1:] for c in mod.calls] == [tuple(s) for s in smoke.MATMUL_SHAPES_QUICK]
    assert all(c[0] == "cuda" for c in mod.calls)
    assert len(result.findings) == 1 and result.findings[0].backend == "cuda"
    assert result.findings[0].confidence == "high"
    assert all(r["metrics"]["bound_ratio"] == pytest.approx(0.1) for r in result.records)


def test_smoke_cuda_branch_fails_outside_tolerance(tmp_path, fake_gpu):
    fake_gpu(err=2e-3)
    ctx = _ctx(tmp_path, backend="cuda", name="smoke", device_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(registry.ExperimentError, match="exceeds the bound by 2.00x"):
        experiments.run_experiment(experiments.get("smoke"), ctx)
