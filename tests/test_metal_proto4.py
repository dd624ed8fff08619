"""`attnproto run proto4 --backend metal`: specialisation cost of the Metal flash kernel.

Three kinds of test, labelled by section:

* pure Python (run everywhere): the Prototype 4 spec sets of attnproto.metal_specs (legal,
  distinct, statically checked) and the first-dispatch inputs, launched through the numpy
  harness and compared with the float64 reference over dtype x head dim x variant;
* HARNESS tests (run everywhere): the whole Metal path driven through ``ArchiveFakeMetal``,
  which implements the GpuBackend interface with deterministic fake build / archive-load /
  library-load times, origins and an archive file, and computes launches with numpy. They
  check the records, findings and error handling of the experiment. They are NOT a
  measurement or verification of Metal;
* Metal tests (``needs_metal``): the quick experiment end to end on an Apple GPU, skipped
  with the reason elsewhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_metal_ops import TOLERANCE, FakeMetalBackend, needs_metal

from attnproto import metal_specs, ref
from attnproto.experiments import proto4, registry
from attnproto.experiments.proto4 import metal as proto4_metal
from attnproto.experiments.registry import ExperimentError
from attnproto.findings import fmt_list
from attnproto.ops import metal_flash

DTYPES = tuple(metal_specs.DTYPE_CODES)
ODD_HEAD_DIMS = (24, 72, 136)
# variant -> flash_spec keyword arguments
VARIANTS = {
    "base": {},
    "causal": {"causal": True},
    "rope": {"rope": True},
    "alibi": {"alibi": True},
    "gqa_fixed": {"gqa_group": 4},
    "all": {"causal": True, "rope": True, "alibi": True, "gqa_group": 2},
}
TILE = (16, 64)  # legal at every head dim up to 256 (block_r, block_c)


def _canonical(specs) -> set[str]:
    return {s.canonical() for s in specs}


# ============================================================== pure Python: the spec sets
def test_matrix_is_the_legal_sweep_and_is_not_72():
    matrix = metal_specs.proto4_matrix_specs()
    tiles = metal_specs.sweep_tiles()
    assert len(matrix) == len(tiles) * 2 * len(DTYPES) == 84
    assert len(_canonical(matrix)) == len(matrix)
    assert _canonical(matrix) == _canonical(metal_specs.proto1_specs())
    for s in matrix:
        c = s.as_dict()
        name = {v: k for k, v in metal_specs.DTYPE_CODES.items()}[c["DTYPE"]]
        assert metal_specs.flash_tile_legal(c["HEAD_DIM"], c["BLOCK_R"], c["BLOCK_C"], name)
    quick = metal_specs.proto4_matrix_specs(quick=True)
    assert len(quick) == 2 * len(DTYPES) and _canonical(quick) <= _canonical(matrix)
    assert {(s.as_dict()["HEAD_DIM"], s.as_dict()["BLOCK_R"], s.as_dict()["BLOCK_C"]) for s in quick} == \
        {metal_specs.PROTO4_QUICK_TILE}


def test_matrix_rejects_a_non_bool_quick():
    with pytest.raises(TypeError, match="quick"):
        metal_specs.proto4_matrix_specs(quick=1)


def test_cold_and_launch_specs_are_distinct_legal_and_new():
    candidates = metal_specs.proto4_candidates()
    features = 2 ** 3 * len(metal_specs.PROTO4_GQA_GROUPS)  # CAUSAL x ROPE x ALIBI x GQA_GROUP
    assert len(candidates) == len(metal_specs.sweep_tiles()) * len(DTYPES) * features - 84
    assert len(_canonical(candidates)) == len(candidates)
    cold = metal_specs.proto4_cold_specs()
    assert len(cold) == (metal_specs.PROTO4_WARMUP_BUILDS + metal_specs.PROTO4_SINGLE_BUILDS
                         + max(metal_specs.PROTO4_COLD_COUNTS))
    launch = metal_specs.proto4_launch_specs()
    assert len(launch) == metal_specs.PROTO4_LAUNCH_REPEATS
    matrix = _canonical(metal_specs.proto4_matrix_specs())
    assert not _canonical(cold) & matrix and not _canonical(launch) & matrix
    assert not _canonical(cold) & _canonical(launch)
    assert all(s.as_dict()["DTYPE"] == metal_specs.DTYPE_CODES[metal_specs.PROTO4_LAUNCH_DTYPE] for s in launch)
    # the order is fixed: the static checks and every run see the same specs
    assert [s.canonical() for s in metal_specs.proto4_candidates()] == [s.canonical() for s in candidates]
    # any prefix of the sequence mixes features, not one variant over every tile
    first = cold[:max(proto4.METAL_QUICK_VARIANT_COUNTS)]
    assert len({(s.as_dict()["ROPE"], s.as_dict()["ALIBI"], s.as_dict()["GQA_GROUP"]) for s in first}) > 1


def test_every_proto4_spec_is_statically_checked():
    in_use = _canonical(metal_specs.specs_in_use())
    assert _canonical(metal_specs.proto4_specs()) <= in_use
    assert _canonical(metal_specs.proto4_specs()) <= _canonical(metal_specs.specs_by_kernel()[proto4.METAL_KERNEL])


# ============================================================== pure Python: first-dispatch inputs
def _ctx(tmp_path, quick=True):
    return registry.ExperimentContext(
        experiment="proto4", backend="metal", device={"name": FakeMetalBackend.info["name"]},
        device_name=FakeMetalBackend.info["name"], driver="harness", commit="unknown", quick=quick,
        progress=lambda iterable=None, total=None, desc="": iterable, out_dir=tmp_path,
        rng=np.random.default_rng(0))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("head_dim", (*ODD_HEAD_DIMS, 64, 256))
def test_dispatch_inputs_reproduce_the_reference(tmp_path, head_dim, variant):
    """HARNESS launch: the inputs, params and geometry proto4 builds for a spec are a correct problem."""
    spec = metal_specs.flash_spec(head_dim, *TILE, metal_specs.PROTO4_LAUNCH_DTYPE, **VARIANTS[variant])
    fake = FakeMetalBackend()
    ctx = _ctx(tmp_path)
    grid, block, shared, args, (o_buf, o_shape) = proto4_metal._metal_dispatch_args(ctx, fake, spec)  # noqa: SLF001
    kern = fake.kernel(spec.name, **spec.as_dict())
    fake.launch(kern, grid, block, args, shared_bytes=shared)
    c = spec.as_dict()
    assert o_shape == (1, max(c["GQA_GROUP"], 1), proto4.METAL_LAUNCH_TOKENS, head_dim)
    # regenerate the same host inputs from the same seed
    rng = np.random.default_rng(0)
    q = rng.standard_normal(o_shape, dtype=np.float32).astype(np.float16)
    k, v = (rng.standard_normal((1, 1, o_shape[2], head_dim), dtype=np.float32).astype(np.float16)
            for _ in range(2))
    exact = ref.attention(q, k, v, causal=bool(c["CAUSAL"]), rope=bool(c["ROPE"]), alibi=bool(c["ALIBI"]))
    out = metal_flash.decode_elements(fake.to_numpy(o_buf, np.uint16, o_shape), "float16")
    atol, rtol = TOLERANCE["float16"]
    ref.assert_allclose(np.asarray(out, np.float64), exact, atol=atol, rtol=rtol)


@pytest.mark.parametrize("head_dim", (24, 128))
def test_dispatch_inputs_reject_another_dtype(tmp_path, head_dim):
    other = next(d for d in DTYPES if d != metal_specs.PROTO4_LAUNCH_DTYPE)
    spec = metal_specs.flash_spec(head_dim, *TILE, other)
    with pytest.raises(ExperimentError, match=f"{other}"):
        proto4_metal._metal_dispatch_args(_ctx(tmp_path), FakeMetalBackend(), spec)  # noqa: SLF001


# ============================================================== HARNESS: proto4 --backend metal
# Deterministic fake times (ms). A build grows with the head dim so that medians differ by spec.
FAKE_BUILD_BASE_MS = 60.0
FAKE_BUILD_PER_HEAD_DIM_MS = 0.1
FAKE_STORE_MS = 7.0
FAKE_LOAD_MS = 0.5
FAKE_LIBRARY_MS = 40.0
FAKE_PROCESS_WALL_MS = 900.0
ARCHIVE_FILE = "metal/fake.mtlarchive.json"
MODES = ("default", "archive_only", "no_archive", "cold")


class FakeNative:
    """HARNESS: the native module's cache-directory functions."""

    def __init__(self, path: str):
        self._dir = path

    def cache_dir(self) -> str:
        return self._dir

    def set_cache_dir(self, path: str) -> None:
        self._dir = path


class ArchiveFakeMetal(FakeMetalBackend):
    """HARNESS, not Metal: the kernel cache of csrc/metal/metal_backend.mm with fake times.

    Modes as the host: "cold" builds and caches nothing; "default" tries memory, then the
    archive file under the cache dir, else builds and adds to it; "archive_only" fails
    (RuntimeError, as the native BackendError) on a miss. The first request loads the
    "library". Every requested spec must be one the static checks compile.
    """

    def __init__(self, nat: FakeNative, build_base_ms: float = FAKE_BUILD_BASE_MS):
        super().__init__()
        self.nat = nat
        self.build_base_ms = build_base_ms
        self.memory: dict[str, SimpleNamespace] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.library_loaded = False
        self.in_use = _canonical(metal_specs.specs_in_use())

    def build_ms(self, constants) -> float:
        return self.build_base_ms + FAKE_BUILD_PER_HEAD_DIM_MS * constants["HEAD_DIM"]

    def _archive_path(self) -> Path:
        return Path(self.nat.cache_dir()) / ARCHIVE_FILE

    def _archive(self) -> list[str]:
        path = self._archive_path()
        return json.loads(path.read_text()) if path.is_file() else []

    def kernel(self, name, mode="default", **constants):
        assert mode in MODES, mode
        spec = metal_specs.MetalSpec.make(name, **constants)
        canon = spec.canonical()
        assert canon in self.in_use, f"{canon} is not statically checked"
        if mode != "cold" and canon in self.memory:
            hit = SimpleNamespace(**{**vars(self.memory[canon]), "origin": "memory", "compile_ms": 0.0,
                                     "load_ms": 0.0})
            self.requests.append((canon, mode, "memory"))
            return hit
        load_ms = 0.0 if self.library_loaded else FAKE_LIBRARY_MS
        self.library_loaded = True
        archive = self._archive() if mode in ("default", "archive_only") else []
        if canon in archive:
            origin, ms = "archive", FAKE_LOAD_MS
        elif mode == "archive_only":
            raise RuntimeError(f"metal: {canon} is not in the binary archive: (harness) missing entry")
        else:
            origin, ms = "compiled", self.build_ms(spec.as_dict())
            if mode == "default":
                path = self._archive_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(archive + [canon]))
                ms += FAKE_STORE_MS
        kern = SimpleNamespace(name=name, constants=dict(constants), origin=origin, compile_ms=ms, load_ms=load_ms,
                               resources={"max_threads_per_block": 1024, "static_shared_bytes": 0, "registers": 0,
                                          "local_bytes": 0})
        if mode != "cold":
            self.memory[canon] = kern
        self.requests.append((canon, mode, origin))
        return kern

    def clear_memory_cache(self):
        self.memory.clear()


def _fake_fresh_process(specs, cache_dir):
    """HARNESS stand-in for the subprocess: a new fake (empty memory, no library) on the same archive."""
    out = proto4.metal_archive_load(ArchiveFakeMetal(FakeNative(cache_dir)), specs)
    return {**out, "process_wall_ms": FAKE_PROCESS_WALL_MS}


@pytest.fixture
def fake_metal(monkeypatch, tmp_path):
    fake = ArchiveFakeMetal(FakeNative(str(tmp_path / "user-cache")))
    monkeypatch.setattr(proto4_metal, "_metal_host", lambda: (fake, fake.nat))
    monkeypatch.setattr(proto4_metal, "_fresh_process_load_metal", _fake_fresh_process)
    return fake


def _phase(records, phase):
    return [r for r in records if r["config"]["phase"] == phase]


def _run(tmp_path, quick):
    out = tmp_path / "out"
    return registry.run_experiment(registry.get("proto4"), _ctx(out, quick)), out


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_harness_metal_path_records_and_findings(fake_metal, tmp_path, quick):
    """HARNESS: every phase, its counts and its numbers, derived from the fake's deterministic times."""
    result, out = _run(tmp_path, quick)
    records = result.records
    assert {r["backend"] for r in records} == {"metal"}
    counts = proto4.METAL_QUICK_VARIANT_COUNTS if quick else proto4.METAL_VARIANT_COUNTS

    # every spec the experiment asked for is statically checked, and none outside Prototype 4's sets
    asked = {canon for canon, _, _ in fake_metal.requests}
    assert asked <= _canonical(metal_specs.proto4_specs())

    cold = sorted(_phase(records, "metal_cold_build"), key=lambda r: r["config"]["variants"])
    assert [r["config"]["variants"] for r in cold] == list(counts)
    pool = metal_specs.proto4_cold_specs()
    first = metal_specs.PROTO4_WARMUP_BUILDS + metal_specs.PROTO4_SINGLE_BUILDS
    for r in cold:
        n = r["config"]["variants"]
        specs = pool[metal_specs.PROTO4_WARMUP_BUILDS:first] if n == 1 else pool[first:first + n]
        expect = [fake_metal.build_ms(s.as_dict()) for s in specs]
        assert r["timing"]["samples_ms"] == expect
        assert r["metrics"]["per_variant_median_ms"] == pytest.approx(float(np.median(expect)))
        assert r["metrics"]["build_sum_ms"] == pytest.approx(sum(expect))
    cold_modes = {mode for canon, mode, _ in fake_metal.requests if canon in _canonical(pool)}
    assert cold_modes == {"cold"}

    build, = _phase(records, "metal_archive_build")
    load, = _phase(records, "metal_archive_load")
    matrix = metal_specs.proto4_matrix_specs(quick)
    assert build["metrics"]["variants_count"] == load["metrics"]["variants_count"] == len(matrix)
    assert len(matrix) == (4 if quick else 84)
    build_expect = [fake_metal.build_ms(s.as_dict()) + FAKE_STORE_MS for s in matrix]
    assert build["timing"]["samples_ms"] == build_expect
    assert build["metrics"]["archive_bytes"] > 0
    cold_median = cold[-1]["metrics"]["per_variant_median_ms"]
    assert build["metrics"]["store_overhead_median_ms"] == pytest.approx(float(np.median(build_expect)) - cold_median)
    assert load["timing"]["samples_ms"] == [FAKE_LOAD_MS] * len(matrix)
    assert load["metrics"]["library_load_ms"] == FAKE_LIBRARY_MS
    assert load["metrics"]["process_wall_ms"] == FAKE_PROCESS_WALL_MS
    assert load["metrics"]["load_speedup_x"] == pytest.approx(cold_median / FAKE_LOAD_MS)
    assert load["metrics"]["total_speedup_x"] == pytest.approx(sum(build_expect) / load["metrics"]["load_total_ms"])
    # the user's archive directory was restored and never written
    assert fake_metal.nat.cache_dir() == str(tmp_path / "user-cache")
    assert not (tmp_path / "user-cache").exists()

    rebuild, = _phase(records, "metal_rebuild")
    assert rebuild["config"]["spec"] == pool[metal_specs.PROTO4_WARMUP_BUILDS].canonical()
    assert rebuild["metrics"]["first_over_rebuild_ratio"] == pytest.approx(1.0)  # the fake has no OS cache

    launch = {r["config"]["origin"]: r for r in _phase(records, "metal_first_dispatch")}
    assert set(launch) == {"cold", "archive", "memory"}
    kernel_ms = {o: r["metrics"]["kernel_median_ms"] for o, r in launch.items()}
    launch_specs = metal_specs.proto4_launch_specs()
    assert kernel_ms["cold"] == pytest.approx(float(np.median([fake_metal.build_ms(s.as_dict()) for s in launch_specs])))
    assert kernel_ms["archive"] == FAKE_LOAD_MS and kernel_ms["memory"] == 0.0
    assert launch["cold"]["config"]["specs"] == [s.canonical() for s in launch_specs]
    origins = [(mode, origin) for canon, mode, origin in fake_metal.requests if canon == launch_specs[0].canonical()]
    assert origins == [("cold", "compiled"), ("default", "compiled"), ("archive_only", "archive"),
                       ("default", "memory")]
    assert len(fake_metal.launches) == 4 * len(launch_specs)

    slugs = {f.slug for f in result.findings}
    assert {"cold-build-per-variant-metal", f"archive-{len(matrix)}-variants-metal", "first-dispatch-latency-metal",
            "build-phases-metal", "recommendation-metal"} == slugs
    by_slug = {f.slug: f for f in result.findings}
    assert f"not {proto4.CUDA_MATRIX_VARIANTS}" in by_slug[f"archive-{len(matrix)}-variants-metal"].claim
    assert f"all requested counts {fmt_list(counts)} were measured" in by_slug["cold-build-per-variant-metal"].claim
    assert "cannot be split" in by_slug["build-phases-metal"].claim
    # fake builds cost >= 60 ms > the 50 ms budget: pre-build the archive
    assert "ship the binary archive" in by_slug["recommendation-metal"].claim
    assert "OS Metal shader cache" in by_slug["recommendation-metal"].claim  # rebuild == build: flagged
    for f in result.findings:
        assert all(math.isfinite(v) for v in f.evidence.values())
    summary = json.loads((out / "summary.json").read_text())
    assert [row["phase"] for row in summary] == [r["config"]["phase"] for r in records]


def test_harness_recommends_function_constants_when_builds_are_cheap(monkeypatch, tmp_path):
    """HARNESS: the verdict follows the measured single-build time, not a fixed text."""
    cheap = proto4.CONSTANTS_BUDGET_MS / 2 - FAKE_BUILD_PER_HEAD_DIM_MS * max(metal_specs.SWEEP_HEAD_DIM)
    fake = ArchiveFakeMetal(FakeNative(str(tmp_path / "user-cache")), build_base_ms=cheap)
    monkeypatch.setattr(proto4_metal, "_metal_host", lambda: (fake, fake.nat))
    monkeypatch.setattr(proto4_metal, "_fresh_process_load_metal", _fake_fresh_process)
    result, _ = _run(tmp_path, quick=True)
    rec = next(f for f in result.findings if f.slug == "recommendation-metal")
    assert "specialise with function constants on demand" in rec.claim
    assert rec.evidence["single_build_ms"] < proto4.CONSTANTS_BUDGET_MS


def test_harness_archive_miss_is_a_clear_error(fake_metal, monkeypatch, tmp_path):
    """HARNESS: an archive-only load that misses stops the run and names the missing spec."""
    dropped = metal_specs.proto4_matrix_specs(quick=True)[-1].canonical()

    def fresh_process_with_a_lost_entry(specs, cache_dir):
        path = Path(cache_dir) / ARCHIVE_FILE
        path.write_text(json.dumps([c for c in json.loads(path.read_text()) if c != dropped]))
        return _fake_fresh_process(specs, cache_dir)

    monkeypatch.setattr(proto4_metal, "_fresh_process_load_metal", fresh_process_with_a_lost_entry)
    with pytest.raises(ExperimentError, match=r"not in the binary archive \(archive_only load missed\)") as err:
        _run(tmp_path, quick=True)
    assert dropped in str(err.value)


def test_harness_wrong_origin_is_a_clear_error(fake_metal, monkeypatch, tmp_path):
    """HARNESS: a 'cold' build that a cache served (origin memory) is refused, not timed."""
    real = fake_metal.kernel

    def served_from_memory(name, mode="default", **constants):
        kern = real(name, mode=mode, **constants)
        return SimpleNamespace(**{**vars(kern), "origin": "memory"}) if mode == "cold" else kern

    monkeypatch.setattr(fake_metal, "kernel", served_from_memory)
    with pytest.raises(ExperimentError, match="came from 'memory', expected 'compiled'"):
        _run(tmp_path, quick=True)


def test_fresh_process_failure_is_reported(tmp_path):
    """The real subprocess path (no fake): an empty archive directory cannot satisfy an
    archive-only load, and without a Metal device the backend is unavailable; both must
    surface as an ExperimentError carrying the child's error text."""
    spec = metal_specs.proto4_matrix_specs(quick=True)[0]
    with pytest.raises(ExperimentError, match="fresh process failed") as err:
        proto4_metal._fresh_process_load_metal([(spec.name, spec.as_dict())], str(tmp_path))  # noqa: SLF001
    assert "Traceback (most recent call last)" in str(err.value)  # the child's own error follows


def test_proto4_supports_metal_and_keeps_cpu_cuda():
    exp = registry.get("proto4")
    assert exp.supports("metal") and exp.supports("cpu") and exp.supports("cuda")
    assert "metal" in exp.doc.lower() and "hypothesis" in exp.doc.lower()


# ============================================================== Metal device (Apple GPU family 9)
@needs_metal
def test_metal_proto4_quick_end_to_end(tmp_path):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    res = subprocess.run([sys.executable, "-m", "attnproto", "run", "proto4", "--backend", "metal", "--quick",
                          "--no-kb", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    summaries = list(tmp_path.rglob("summary.json"))
    assert summaries, res.stdout
    rows = json.loads(summaries[0].read_text())
    phases = {row["phase"] for row in rows}
    assert phases == set(proto4.METAL_SUMMARY_METRICS)
    cold = [row for row in rows if row["phase"] == "metal_cold_build"]
    assert [row["what"] for row in cold] == list(proto4.METAL_QUICK_VARIANT_COUNTS)
