"""Prototypes 2 and 4 without a GPU: NVRTC compiles (cubin, PTX, LTO-IR, extra options),
nvJitLink links of the stitched kernel, the stitch and proto4 variant specs, and both
experiments end to end on the cpu backend (NVRTC/nvJitLink measurements only)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from attnproto import kernels
from attnproto.experiments import proto2, proto4
from attnproto.experiments.registry import ExperimentContext, get, run_experiment
from attnproto.ops import configs, stitch

ARCH = kernels.DEFAULT_ARCH
ELF_MAGIC = b"\x7fELF"
DTYPES = tuple(configs.DTYPE_CODES)
# (head_dim, block_c) pairs inside 48 KiB of static shared memory with 4 warps.
LEGAL_TILES = ((64, 64), (128, 64), (256, 32))


@pytest.fixture
def nvjitlink(nvrtc):
    """The native module with NVRTC and nvJitLink, or skip (fail when ATTNPROTO_REQUIRE_NVRTC=1)."""
    try:
        nvrtc.cuda_nvjitlink_version()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("ATTNPROTO_REQUIRE_NVRTC") == "1":
            pytest.fail(f"nvJitLink required but unavailable: {exc}")
        pytest.skip(f"nvJitLink unavailable: {exc}")
    return nvrtc


def _ctx(name, tmp_path, seed=0):
    return ExperimentContext(experiment=name, backend="cpu", device={"name": "cpu"}, device_name="cpu",
                             driver="test", commit="test", quick=True,
                             progress=lambda it=None, total=None, desc="": it, out_dir=tmp_path,
                             rng=np.random.default_rng(seed))


# ---------------------------------------------------------------- StitchConfig
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,block_c", LEGAL_TILES)
@pytest.mark.parametrize("mode", stitch.MODES)
def test_stitch_config_legal(dtype, head_dim, block_c, mode):
    cfg = stitch.StitchConfig(head_dim, block_c, stitch.BENCH_WARPS, dtype, mode)
    assert cfg.is_legal() == (True, "")
    assert cfg.smem_bytes() <= stitch.STATIC_SMEM_LIMIT
    assert cfg.constants() == {"HEAD_DIM": head_dim, "BLOCK_C": block_c, "WARPS": stitch.BENCH_WARPS,
                               "DTYPE": configs.DTYPE_CODES[dtype], "STITCH_MODE": mode}


@pytest.mark.parametrize("head_dim,block_c,warps,mode,word", [
    (96, 64, 4, 0, "HEAD_DIM"), (65, 64, 4, 1, "HEAD_DIM"), (128, 48, 4, 2, "BLOCK_C"),
    (128, 64, 0, 0, "WARPS"), (128, 64, 4, 4, "STITCH_MODE"), (256, 64, 4, 0, "shared memory"),
])
def test_stitch_config_illegal(head_dim, block_c, warps, mode, word):
    cfg = stitch.StitchConfig(head_dim, block_c, warps, "bfloat16", mode)
    ok, why = cfg.is_legal()
    assert not ok and word in why
    with pytest.raises(ValueError, match="config"):
        cfg.check()


def test_stitch_config_type_errors():
    with pytest.raises(TypeError, match="head_dim"):
        stitch.StitchConfig(128.0, 64, 4, "bfloat16", 0)
    with pytest.raises(TypeError, match="mode"):
        stitch.StitchConfig(128, 64, 4, "bfloat16", True)
    with pytest.raises(TypeError, match="dtype"):
        stitch.StitchConfig(128, 64, 4, "float32", 0)


def test_dispatched_calls():
    # 2 x 3 rows x 100 queries, ceil(130 / 64) = 3 tiles, 3 stages per tile
    assert stitch.dispatched_calls(2, 3, 100, 130, 64) == 2 * 3 * 100 * 3 * stitch.STAGES_PER_TILE
    assert stitch.dispatched_calls(1, 1, 1, 64, 64) == stitch.STAGES_PER_TILE


def test_stitch_specs_registered_and_exclude_linked_mode():
    specs = stitch.stitch_specialisations()
    assert specs and all(n == stitch.KERNEL_NAME for n, _ in specs)
    assert {c["STITCH_MODE"] for _, c in specs} == {0, 1, 2}
    every = {(n, tuple(sorted(c.items()))) for n, c in kernels.all_specialisations()}
    assert all((n, tuple(sorted(c.items()))) in every for n, c in specs)


# ---------------------------------------------------------------- compile and link
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,block_c", LEGAL_TILES)
def test_linked_mode_links_with_nvjitlink(nvjitlink, dtype, head_dim, block_c):
    cfg = stitch.StitchConfig(head_dim, block_c, stitch.BENCH_WARPS, dtype, stitch.LINKED_MODE)
    built = stitch.link_linked_mode(cfg, ARCH, verbose=True)
    assert built.cubin[:4] == ELF_MAGIC
    assert set(built.compile_ms) == {stitch.KERNEL_NAME, *stitch.STAGE_SOURCES}
    assert built.link_ms > 0 and built.build_ms > built.link_ms
    report = stitch.ptxas_report(built.log)
    assert report["registers_regs"] > 0
    assert report["spill_bytes"] == 0


@pytest.mark.parametrize("mode", (0, 1, 2))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cubin_modes_compile_with_resource_report(nvrtc, mode, dtype):
    cfg = stitch.StitchConfig(128, 64, stitch.BENCH_WARPS, dtype, mode)
    built = stitch.compile_mode(cfg, ARCH, verbose=True)
    assert built.cubin[:4] == ELF_MAGIC and built.link_ms == 0
    report = stitch.ptxas_report(built.log)
    # Modes 1 and 2 keep three real stage functions; mode 0 inlines them.
    assert report["device_functions_count"] == (0 if mode == 0 else len(stitch.STAGE_SOURCES))
    if mode:
        assert report["stack_frame_bytes"] > 0  # arguments passed through the call ABI's stack


def test_compile_mode_refuses_linked_mode(nvrtc):
    with pytest.raises(ValueError, match="link_linked_mode"):
        stitch.compile_mode(stitch.StitchConfig(128, 64, 4, "float16", stitch.LINKED_MODE), ARCH)
    with pytest.raises(ValueError, match="linked mode"):
        stitch.link_linked_mode(stitch.StitchConfig(128, 64, 4, "float16", 0), ARCH)


def test_linked_mode_needs_cubin_free_ltoir(nvrtc):
    """Mode 3 has unresolved stage calls: a plain cubin compile must fail in ptxas."""
    consts = stitch.StitchConfig(128, 64, 4, "bfloat16", stitch.LINKED_MODE).constants()
    with pytest.raises(RuntimeError, match="stitch_score|unresolved|undefined"):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "cubin")


def test_link_without_stages_fails_with_log(nvjitlink):
    consts = stitch.StitchConfig(128, 64, 4, "bfloat16", stitch.LINKED_MODE).constants()
    blob, _, _ = nvjitlink.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "ltoir")
    with pytest.raises(RuntimeError, match="stitch_"):
        nvjitlink.cuda_link([(blob, "ltoir", "stitch_attn")], ARCH)


def test_link_input_validation(nvjitlink):
    with pytest.raises(ValueError, match="no inputs"):
        nvjitlink.cuda_link([], ARCH)
    with pytest.raises(ValueError, match="kind"):
        nvjitlink.cuda_link([(b"x", "elf", "a")], ARCH)
    with pytest.raises(ValueError, match="empty"):
        nvjitlink.cuda_link([(b"", "ltoir", "a")], ARCH)


def test_illegal_stitch_constants_fail_with_static_assert(nvrtc):
    bad = {"HEAD_DIM": 96, "BLOCK_C": 64, "WARPS": 4, "DTYPE": 1, "STITCH_MODE": 0}
    with pytest.raises(RuntimeError, match="HEAD_DIM must be a positive multiple of 64"):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, bad, ARCH)


def test_extra_options_reach_nvrtc(nvrtc):
    consts = {"HEAD_DIM": 64, "BLOCK_C": 64, "WARPS": 4, "DTYPE": 0, "STITCH_MODE": 0}
    with pytest.raises(RuntimeError, match="--no-such-option"):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "cubin", ["--no-such-option"])
    _, log, _ = nvrtc.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "cubin", ["--ptxas-options=-v"])
    assert "Used" in log and "registers" in log


def test_ptxas_report_rejects_logs_without_report():
    with pytest.raises(ValueError, match="ptxas"):
        stitch.ptxas_report("warning: nothing here")


# ---------------------------------------------------------------- proto4 variant sets
def test_salted_variants_distinct_and_legal():
    n = 2 * len(proto4._base_configs()) + 3  # noqa: SLF001 - wraps around twice
    variants = proto4.salted_variants(n)
    keys = {tuple(sorted(v.items())) for v in variants}
    assert len(keys) == n
    assert {v[proto4.SALT] for v in variants} == {0, 1, 2}
    for v in variants[: len(proto4._base_configs())]:  # noqa: SLF001
        cfg = configs.FlashConfig(v["HEAD_DIM"], v["BLOCK_R"], v["BLOCK_C"], v["WARPS"], v["STAGES"],
                                  bool(v["CAUSAL"]), v["DTYPE"])
        assert cfg.is_legal()[0]
    later = proto4.salted_variants(5, offset=n)
    assert not keys & {tuple(sorted(v.items())) for v in later}
    with pytest.raises(ValueError, match="count"):
        proto4.salted_variants(0)


def test_matrix_has_72_unique_legal_variants():
    specs = proto4.matrix_specs()
    assert len(specs) == 72
    assert len({tuple(sorted(c.items())) for _, c in specs}) == 72
    assert {c["HEAD_DIM"] for _, c in specs} == set(proto4.MATRIX_HEAD_DIMS)
    assert len(proto4.matrix_specs(quick=True)) == len(proto4.QUICK_MATRIX) * len(proto4.MATRIX_VARIANTS)


def test_salt_is_ignored_by_the_kernel(nvrtc):
    """Same tiles, different VARIANT_SALT: byte-identical cubins (the salt only changes the key)."""
    base = configs.choose_config(64, 4096, False, "float16").constants()
    a = nvrtc.cuda_compile("flash_fwd_mma", {**base, proto4.SALT: 0}, ARCH)[0]
    b = nvrtc.cuda_compile("flash_fwd_mma", {**base, proto4.SALT: 7}, ARCH)[0]
    assert a == b


def test_multi_entry_unit_has_four_entries(nvrtc):
    tiles = {k: v for k, v in configs.choose_config(64, 4096, False, "float16").constants().items()
             if k not in ("CAUSAL", "DTYPE")}
    cubin = nvrtc.cuda_compile(proto4.MULTI_ENTRY_KERNEL, tiles, ARCH)[0]
    for entry in ("flash_fwd_mma_nc_f16", "flash_fwd_mma_nc_bf16", "flash_fwd_mma_c_f16", "flash_fwd_mma_c_bf16"):
        assert entry.encode() in cubin
    with pytest.raises(RuntimeError, match="sets CAUSAL and DTYPE"):
        nvrtc.cuda_compile(proto4.MULTI_ENTRY_KERNEL, {**tiles, "CAUSAL": 0}, ARCH)


# ---------------------------------------------------------------- experiments on cpu
def test_both_experiments_registered():
    for name in ("proto2", "proto4"):
        exp = get(name)
        assert exp.supports("cpu") and exp.supports("cuda")


def test_proto2_runs_on_cpu(nvjitlink, tmp_path):
    result = run_experiment(get("proto2"), _ctx("proto2", tmp_path))
    modes = {r["config"]["mode"] for r in result.records}
    assert modes == set(stitch.MODES)
    assert all(r["config"]["phase"] == "build" for r in result.records)
    linked = next(r for r in result.records if r["config"]["mode"] == stitch.LINKED_MODE)
    assert linked["metrics"]["link_median_ms"] > 0
    assert len(result.findings) >= 2
    assert (tmp_path / "summary.json").is_file()


def test_proto4_runs_on_cpu(nvjitlink, tmp_path, monkeypatch):
    # The cheapest head dim and tiles keep this under a few seconds on 2 cores.
    monkeypatch.setattr(proto4, "QUICK_PHASE_HEAD_DIMS", (64,))
    monkeypatch.setattr(proto4, "QUICK_MATRIX", ((64, 64, 64),))
    monkeypatch.setattr(proto4, "QUICK_VARIANT_COUNTS", (1, 3))
    monkeypatch.setattr(proto4, "SINGLE_REPEATS", 2)
    result = run_experiment(get("proto4"), _ctx("proto4", tmp_path))
    phases = [r["config"]["phase"] for r in result.records]
    assert phases.count("cold_compile") == 2
    assert {"split", "pch", "multi_entry", "archive"} <= set(phases)
    assert "first_launch" not in phases
    arch = next(r for r in result.records if r["config"]["phase"] == "archive")
    assert arch["metrics"]["variants_count"] == len(proto4.MATRIX_VARIANTS)
    assert arch["metrics"]["load_speedup_x"] > 1.0  # reading a cubin beats compiling it
    assert len(result.findings) >= 3
    titles = " ".join(f.title for f in result.findings)
    assert "AC-2.6" in titles


@pytest.mark.parametrize("name", ["proto2", "proto4"])
def test_cpu_run_without_compiler_reports_why(name, tmp_path, monkeypatch):
    monkeypatch.setattr(proto4, "compiler_or_reason", lambda need_nvjitlink: (None, "NVRTC not found (test)"))
    monkeypatch.setattr(proto2, "compiler_or_reason", lambda need_nvjitlink: (None, "NVRTC not found (test)"))
    result = run_experiment(get(name), _ctx(name, tmp_path))
    assert result.records == [] and result.findings == []
    assert result.summary == [{"not_measured": "NVRTC not found (test)"}]
