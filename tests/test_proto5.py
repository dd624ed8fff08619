"""Prototype 5 without a GPU: the SASS/PTX readers, the source-line counts, the Helion family's
generated Triton compiled for sm_90, its registry contract, and the static phase's records and
findings; on a GPU, the Helion kernel against FP64."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnproto import lab, ref
from attnproto.experiments import registry
from attnproto.experiments.proto5 import codegen, findings, static
from attnproto.ops import dsl_tiles, families
from attnproto.ops import flash as F
from attnproto.ops.families import helion as hfam
from attnproto.ops.problem import DeviceSpec, ProblemSpec

pytest.importorskip("triton", reason="triton is not installed (the test extras pin it)")
ATOL, RTOL = 5e-3, 1e-2

SASS = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0110*/              @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0120*/                   MUFU.EX2 R5, R5 ;
        /*0130*/                   FFMA R1, R2, R3, R4 ;
        /*0140*/               @P1 BRA 0x200 ;
        /*0150*/                   UTMALDG.2D [UR8], [UR10] ;
"""


def test_sass_reader_counts_opcodes_by_class():
    ops = codegen.opcode_counts(SASS)
    assert ops == {"HGMMA": 1, "LDG": 1, "MUFU": 1, "FFMA": 1, "BRA": 1, "UTMALDG": 1}
    cls = codegen.class_counts(ops)
    assert (cls["tensor_core"], cls["global_mem"], cls["special_func"], cls["fp32"], cls["control"], cls["tma"]) \
        == (1, 1, 1, 1, 1, 1)
    assert sum(cls.values()) == sum(ops.values())


def test_source_lines_follow_project_includes(tmp_path):
    (tmp_path / "cuda").mkdir()
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "h.h").write_text("// header\nint a;\n\nint b;\n")
    (tmp_path / "cuda" / "k.cu").write_text('#include "common/h.h"\n// comment\nvoid k() {}\n#include <cstdint>\n')
    assert codegen.cuda_source_lines(tmp_path / "cuda" / "k.cu", tmp_path) == 3 + 2


def _helion_or_skip():
    missing = hfam.helion_missing()
    if missing:
        pytest.skip(missing)


@pytest.mark.parametrize("head_dim", hfam.HEAD_DIMS)
def test_helion_generated_triton_compiles_to_wgmma_for_sm90(head_dim):
    """Helion's code generation then Triton's compile for cuda sm_90, no GPU: wgmma in the PTX,
    HGMMA in the SASS, for both masks."""
    _helion_or_skip()
    from attnproto.ops import helion_flash

    for causal in (False, True):
        k = helion_flash.aot_compile(dsl_tiles.default_config(head_dim), head_dim, causal, "bfloat16")
        assert ".target sm_90a" in k.asm["ptx"] and "wgmma.mma_async" in k.asm["ptx"]
        stats = codegen.cubin_stats(k.asm["cubin"])
        assert stats["hgmma_count"] > 0 and stats["hmma_count"] == 0


def test_helion_family_contract(monkeypatch):
    fam = families.get("helion")
    sm90 = DeviceSpec.for_arch("sm_90")
    spec = ProblemSpec(1, 2, 2, 64, 64, 128, "bfloat16", True)
    assert fam.dsl == "helion" and fam.specialisations() == []
    assert fam.config_label(hfam.AUTOTUNE) == "helion autotune"
    with pytest.raises(TypeError, match="kernel 'helion'"):
        fam.coerce_config("64x64", spec, sm90)
    ok, why = fam.supports_spec(ProblemSpec(1, 2, 2, 64, 64, 96, "bfloat16", False), sm90)
    assert not ok and ("head_dim 96" in why or "helion" in why)
    hfam._import_error.cache_clear()
    monkeypatch.setattr(hfam.importlib.util, "find_spec", lambda name: None)
    try:
        ok, why = fam.supports_spec(spec, sm90)
        assert not ok and "not installed" in why
    finally:
        hfam._import_error.cache_clear()


def test_static_phase_records_and_findings(tmp_path):
    ctx = registry.ExperimentContext(
        experiment="proto5", backend="cpu", device={"name": "cpu"}, device_name="cpu", driver="test",
        commit="unknown", quick=True, progress=lambda iterable=None, total=None, desc="": iterable,
        out_dir=tmp_path, rng=np.random.default_rng(0))
    records, skipped = static.static_records(ctx, (64,), 4096)
    kernels = {r["config"]["kernel"] for r in records}
    assert {"triton", "wgmma", "mma"} <= kernels, skipped
    by = {(r["config"]["kernel"], r["config"]["causal"]): r["metrics"] for r in records}
    assert by[("wgmma", True)]["hgmma_count"] > 0 and by[("mma", True)]["hmma_count"] > 0
    assert by[("triton", True)]["hgmma_count"] > 0 and by[("triton", True)]["source_lines_count"] > 0
    found = findings.static_findings(ctx, records)
    assert any(f.id.startswith("proto5/triton-codegen-d64-causal") for f in found)
    assert any(f.id.startswith("proto5/triton-source-and-compile-time") for f in found)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", (False, True))
def test_helion_kernel_matches_fp64_on_the_gpu(cuda, causal):
    import torch

    _helion_or_skip()
    if int(cuda.info["compute_major"]) < 9:
        pytest.skip("the Helion family is registered for Hopper")
    rng = np.random.default_rng()
    for d in hfam.HEAD_DIMS:
        q, k, v = lab.gate_inputs(rng, (2, 4, 2, 333, 301), d, "bfloat16")
        qt, kt, vt = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (q, k, v))
        out = torch.full_like(qt, float("nan"))
        lse = torch.full(qt.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
        launch = F.prepare_forward(qt, kt, vt, causal=causal, kernel="helion", out=out, lse=lse)
        launch.launch()
        torch.cuda.synchronize()
        exact, exact_lse = ref.attention(q, k, v, causal=causal, return_lse=True)
        ref.assert_allclose(out.double().cpu().numpy(), exact, atol=ATOL, rtol=RTOL, msg="helion O")
        ref.assert_allclose(lse.double().cpu().numpy(), exact_lse, atol=ATOL, rtol=RTOL, msg="helion LSE")
        assert launch.time(warmup=1, iters=3).median_ms > 0
        assert math.isfinite(float(out[0, 0, -1].float().sum()))
