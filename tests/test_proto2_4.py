"""Prototypes 2 and 4 without a GPU: NVRTC compiles (cubin, PTX, LTO-IR, extra options),
nvJitLink links of the stitched kernel, the stitch and proto4 variant specs, and both
experiments end to end on the cpu backend (NVRTC/nvJitLink measurements only)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from attnproto import kernels
from attnproto.experiments import proto2, proto4
from attnproto.experiments.proto4 import nvrtc as proto4_nvrtc
from attnproto.experiments.proto4 import variants as proto4_variants
from attnproto.experiments.registry import ExperimentContext, get, run_experiment
from attnproto.ops import configs, stitch

ARCH = kernels.DEFAULT_ARCH
ELF_MAGIC = b"\x7fELF"
DTYPES = tuple(configs.DTYPE_CODES)
# Head dims: the two swizzled benchmark dims and two padded-row (non-multiple-of-64) ones.
HEAD_DIMS = (64, 128, 80, 96)


def _tile(head_dim=128, causal=False, dtype="bfloat16", block_r=64, block_c=64, warps=4, stages=1):
    """A Prototype 1 tile; the default (64-row CTAs, 1 stage) compiles in about a second."""
    return configs.FlashConfig(head_dim, block_r, block_c, warps, stages, causal, dtype)


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
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("mode", stitch.MODES)
def test_stitch_config_legal(dtype, head_dim, causal, mode):
    tile = _tile(head_dim, causal, dtype, block_r=128)
    cfg = stitch.StitchConfig(tile, mode)
    assert cfg.is_legal() == (True, "")
    assert cfg.smem_bytes() == tile.smem_bytes() and cfg.threads == tile.threads
    assert cfg.constants() == {**tile.constants(), "STITCH_MODE": mode}
    assert cfg.grid(2, 3, 200) == tile.grid(2, 3, 200) == (2, 3, 2)
    assert cfg.with_mode(0).tile is tile and f"mode{mode}" in cfg.label()


@pytest.mark.parametrize("tile,mode,word", [
    (_tile(128), 4, "STITCH_MODE"), (_tile(128), -1, "STITCH_MODE"),
    (_tile(128, block_r=48), 0, "BLOCK_R"), (_tile(256, block_r=256, block_c=128, stages=2), 1, "shared memory"),
    (_tile(128, block_r=256, block_c=128), 2, "register budget"), (_tile(72), 3, "HEAD_DIM"),
])
def test_stitch_config_illegal(tile, mode, word):
    cfg = stitch.StitchConfig(tile, mode)
    ok, why = cfg.is_legal()
    assert not ok and word in why
    with pytest.raises(ValueError, match="config"):
        cfg.check()


def test_stitch_config_type_errors():
    with pytest.raises(TypeError, match="tile"):
        stitch.StitchConfig({"head_dim": 128}, 0)
    with pytest.raises(TypeError, match="mode"):
        stitch.StitchConfig(_tile(), True)
    with pytest.raises(TypeError, match="mode"):
        stitch.StitchConfig(_tile(), 1.0)


def _calls_by_loop(batch, heads, seq_q, seq_kv, tile):
    """The kernel's loops written out: per CTA, warp and tile, warp_sees_tile."""
    kv_tiles = -(-seq_kv // tile.block_c)
    offset = seq_kv - seq_q
    total = 0
    for cta in range(-(-seq_q // tile.block_r)):
        q0 = cta * tile.block_r
        n_tiles = kv_tiles
        if tile.causal:
            last_key = min(q0 + tile.block_r, seq_q) - 1 + offset
            n_tiles = 0 if last_key < 0 else min(kv_tiles, last_key // tile.block_c + 1)
        for w in range(tile.warps):
            warp_q0 = q0 + w * tile.rows_per_warp
            for j in range(n_tiles):
                if not tile.causal or j * tile.block_c <= warp_q0 + tile.rows_per_warp - 1 + offset:
                    total += 1
    return batch * heads * total * stitch.STAGES_PER_TILE


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("seq_q,seq_kv", [(77, 133), (133, 77), (300, 300), (1, 1), (64, 0), (2048, 2048)])
def test_dispatched_calls_follow_the_kernel(causal, seq_q, seq_kv):
    for tile in (_tile(128, causal, block_r=128), _tile(64, causal, block_r=64, block_c=128, stages=2)):
        assert stitch.dispatched_calls(2, 3, seq_q, seq_kv, tile) == _calls_by_loop(2, 3, seq_q, seq_kv, tile)


def test_dispatched_calls_values():
    # Non-causal: 2 x 3 heads x ceil(100/64) = 2 CTAs x 4 warps x ceil(130/64) = 3 tiles x 3 stages.
    assert stitch.dispatched_calls(2, 3, 100, 130, _tile(128)) == 2 * 3 * 2 * 4 * 3 * stitch.STAGES_PER_TILE
    # Causal, one 64-row CTA of 4 warps x 16 rows, Nq = Nkv = 64, BLOCK_C 64: every warp sees tile 0.
    assert stitch.dispatched_calls(1, 1, 64, 64, _tile(128, True)) == 4 * stitch.STAGES_PER_TILE
    # Causal with Nkv < Nq: the first 64 - 16 = 48 queries see no key; warps 0-2 skip the tile.
    assert stitch.dispatched_calls(1, 1, 64, 16, _tile(128, True)) == 1 * stitch.STAGES_PER_TILE
    with pytest.raises(ValueError, match="seq_q"):
        stitch.dispatched_calls(1, 1, -1, 4, _tile())
    with pytest.raises(TypeError, match="tile"):
        stitch.dispatched_calls(1, 1, 4, 4, 64)


def test_stitch_specs_registered_and_exclude_linked_mode():
    specs = stitch.stitch_specialisations()
    assert specs and all(n == stitch.KERNEL_NAME for n, _ in specs)
    assert {c["STITCH_MODE"] for _, c in specs} == {0, 1, 2}
    assert {(c["HEAD_DIM"], c["CAUSAL"]) for _, c in specs} == {(d, int(c)) for _, _, _, d, c in stitch.BENCH_PROBLEMS}
    every = {(n, tuple(sorted(c.items()))) for n, c in kernels.all_specialisations()}
    assert all((n, tuple(sorted(c.items()))) in every for n, c in specs)


# ---------------------------------------------------------------- compile and link
@pytest.mark.parametrize("dtype,head_dim,causal", [("bfloat16", 128, False), ("float16", 80, True)])
def test_linked_mode_links_with_nvjitlink(nvjitlink, dtype, head_dim, causal):
    cfg = stitch.StitchConfig(_tile(head_dim, causal, dtype), stitch.LINKED_MODE)
    built = stitch.link_linked_mode(cfg, ARCH, verbose=True)
    assert built.cubin[:4] == ELF_MAGIC
    assert stitch.KERNEL_NAME.encode() in built.cubin
    assert set(built.compile_ms) == {stitch.KERNEL_NAME, *stitch.STAGE_SOURCES}
    assert built.link_ms > 0 and built.build_ms > built.link_ms
    report = stitch.ptxas_report(built.log)
    assert report["registers_regs"] > 0


@pytest.mark.parametrize("mode", (0, 1, 2))
@pytest.mark.parametrize("dtype,head_dim,causal", [("bfloat16", 128, False), ("float16", 96, True)])
def test_cubin_modes_compile_with_resource_report(nvrtc, mode, dtype, head_dim, causal):
    cfg = stitch.StitchConfig(_tile(head_dim, causal, dtype), mode)
    built = stitch.compile_mode(cfg, ARCH, verbose=True)
    assert built.cubin[:4] == ELF_MAGIC and built.link_ms == 0
    report = stitch.ptxas_report(built.log)
    # Modes 1 and 2 keep three real stage functions; mode 0 inlines them.
    assert report["device_functions_count"] == (0 if mode == 0 else len(stitch.STAGE_FUNCTIONS))
    for fn in stitch.STAGE_FUNCTIONS:
        assert (f"Function properties for {fn}" in built.log) == (mode != 0)
    if mode:
        # The register tiles behind the stage pointers live in the kernel's stack frame.
        assert report["stack_frame_bytes"] > 0


def test_mode0_is_the_production_kernel(nvrtc):
    """Mode 0 compiles the code of flash_fwd_mma: same registers and stack as the production kernel."""
    tile = _tile(128)
    mode0 = stitch.ptxas_report(stitch.compile_mode(stitch.StitchConfig(tile, 0), ARCH, verbose=True).log)
    _, log, _ = nvrtc.cuda_compile(configs.KERNEL_NAME, tile.constants(), ARCH, "cubin", ["--ptxas-options=-v"])
    prod = stitch.ptxas_report(log, entry=configs.KERNEL_NAME)
    assert mode0 == prod


def test_compile_mode_refuses_linked_mode(nvrtc):
    with pytest.raises(ValueError, match="link_linked_mode"):
        stitch.compile_mode(stitch.StitchConfig(_tile(), stitch.LINKED_MODE), ARCH)
    with pytest.raises(ValueError, match="linked mode"):
        stitch.link_linked_mode(stitch.StitchConfig(_tile(), 0), ARCH)


def test_linked_mode_needs_cubin_free_ltoir(nvrtc):
    """Mode 3 has unresolved stage calls: a plain cubin compile must fail in ptxas."""
    consts = stitch.StitchConfig(_tile(), stitch.LINKED_MODE).constants()
    with pytest.raises(RuntimeError, match="fa_mma_stage|unresolved|undefined"):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "cubin")


def test_link_without_stages_fails_with_log(nvjitlink):
    consts = stitch.StitchConfig(_tile(), stitch.LINKED_MODE).constants()
    blob, _, _ = nvjitlink.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "ltoir")
    with pytest.raises(RuntimeError, match="fa_mma_stage_"):
        nvjitlink.cuda_link([(blob, "ltoir", stitch.KERNEL_NAME)], ARCH)


def test_link_input_validation(nvjitlink):
    with pytest.raises(ValueError, match="no inputs"):
        nvjitlink.cuda_link([], ARCH)
    with pytest.raises(ValueError, match="kind"):
        nvjitlink.cuda_link([(b"x", "elf", "a")], ARCH)
    with pytest.raises(ValueError, match="empty"):
        nvjitlink.cuda_link([(b"", "ltoir", "a")], ARCH)


@pytest.mark.parametrize("consts,message", [
    ({"STITCH_MODE": 4}, "STITCH_MODE must be 0"),
    ({"HEAD_DIM": 72}, "HEAD_DIM must be a multiple of 16"),
    ({"BLOCK_R": 48}, "BLOCK_R must be a positive multiple of 16\\*WARPS"),
])
def test_illegal_stitch_constants_fail_with_static_assert(nvrtc, consts, message):
    bad = {**stitch.StitchConfig(_tile(), 0).constants(), **consts}
    with pytest.raises(RuntimeError, match=message):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, bad, ARCH)


def test_missing_stitch_mode_fails(nvrtc):
    with pytest.raises(RuntimeError, match="STITCH_MODE must be defined"):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, _tile().constants(), ARCH)


def test_extra_options_reach_nvrtc(nvrtc):
    consts = stitch.StitchConfig(_tile(64), 0).constants()
    with pytest.raises(RuntimeError, match="--no-such-option"):
        nvrtc.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "cubin", ["--no-such-option"])
    _, log, _ = nvrtc.cuda_compile(stitch.KERNEL_NAME, consts, ARCH, "cubin", ["--ptxas-options=-v"])
    assert "Used" in log and "registers" in log


PTXAS_LOG = """ptxas info    : Compiling entry function 'flash_fwd_mma_stitch' for 'sm_90a'
ptxas info    : Function properties for flash_fwd_mma_stitch
    800 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 230 registers, used 1 barriers, 800 bytes cumulative stack size
ptxas info    : Function properties for fa_mma_stage_score
    144 bytes stack frame, 140 bytes spill stores, 140 bytes spill loads
ptxas info    : Function properties for fa_mma_stage_softmax
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_ptxas_report_parses_entry_and_stage_functions():
    report = stitch.ptxas_report(PTXAS_LOG)
    assert report == {"registers_regs": 230.0, "stack_frame_bytes": 800.0, "spill_bytes": 8.0 + 280.0,
                      "device_functions_count": 2.0}
    with pytest.raises(ValueError, match="flash_fwd_mma"):
        stitch.ptxas_report(PTXAS_LOG, entry="flash_fwd_mma")


def test_ptxas_report_rejects_logs_without_report():
    with pytest.raises(ValueError, match="ptxas"):
        stitch.ptxas_report("warning: nothing here")


# ---------------------------------------------------------------- proto4 variant sets
def test_salted_variants_distinct_and_legal():
    n = 2 * len(proto4_variants._base_configs()) + 3  # noqa: SLF001 - wraps around twice
    variants = proto4.salted_variants(n)
    keys = {tuple(sorted(v.items())) for v in variants}
    assert len(keys) == n
    assert {v[proto4.SALT] for v in variants} == {0, 1, 2}
    for v in variants[: len(proto4_variants._base_configs())]:  # noqa: SLF001
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
    monkeypatch.setattr(proto4_nvrtc, "QUICK_PHASE_HEAD_DIMS", (64,))
    monkeypatch.setattr(proto4_variants, "QUICK_MATRIX", ((64, 64, 64),))
    monkeypatch.setattr(proto4_nvrtc, "QUICK_VARIANT_COUNTS", (1, 3))
    monkeypatch.setattr(proto4_nvrtc, "SINGLE_REPEATS", 2)
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
