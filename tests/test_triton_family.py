"""The Triton family (Prototype 5): its kernel compiled ahead of time for sm_90 without a GPU
(Triton's compile API), run in Triton's CPU interpreter against the FP64 reference, its
registry contract (refusals with reasons, configs, never chosen by kernel="auto"), and, on a
GPU, the autotuned kernel against FP64 and torch SDPA.

The interpreter runs float16 only: it has no bfloat16 arithmetic for TMA-descriptor loads
(numpy has no bfloat16); bfloat16 runs on the GPU (here and in tests/test_families.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnproto import lab, ref
from attnproto.ops import chooser, dsl_tiles, families
from attnproto.ops import flash as F
from attnproto.ops.families import triton as tfam
from attnproto.ops.problem import DeviceSpec, ProblemSpec

triton = pytest.importorskip("triton", reason="triton is not installed (the test extras pin it)")

ATOL, RTOL = 5e-3, 1e-2
SDPA_FACTOR = 2.0
# Interpreter tiles: small, so the odd lengths below span several query and key blocks.
INTERP_BLOCK_M, INTERP_BLOCK_N = 32, 16
# (causal, Hq, Hkv, Nq, Nkv): odd lengths, bottom-right causal with Nq < Nkv and Nq > Nkv
# (rows that see no key), GQA.
INTERP_VARIANTS = ((False, 2, 2, 77, 77), (True, 2, 2, 77, 77), (True, 2, 2, 33, 130), (True, 2, 2, 70, 45),
                   (False, 4, 2, 65, 100), (True, 4, 1, 129, 129))
INTERP_TIMEOUT_S = 600


# ------------------------------------------------------------------ ahead-of-time compile (CI)
def _check_hopper_code(k, label):
    ptx = k.asm["ptx"]
    assert ".target sm_90a" in ptx, label
    assert ptx.count("wgmma.mma_async") > 0, f"{label}: no wgmma in the PTX"
    assert ptx.count("cp.async.bulk.tensor") > 0, f"{label}: no TMA copy in the PTX"
    assert "mma.sync" not in ptx, f"{label}: fell back to mma.sync"


@pytest.mark.parametrize("head_dim", tfam.HEAD_DIMS)
def test_every_autotune_config_compiles_to_wgmma_for_sm90(head_dim):
    """Each tile triton.autotune may pick, compiled for cuda sm_90 with no GPU: PTX for sm_90a with
    wgmma and TMA (the causal kernel holds both the unmasked and the masked loop)."""
    from attnproto.ops import triton_flash

    space = dsl_tiles.configs(head_dim)
    assert len(space) > 1
    for cfg in space:
        _check_hopper_code(triton_flash.aot_compile(cfg, head_dim, True, "bfloat16"), f"{cfg} D={head_dim}")


@pytest.mark.parametrize("dtype", tfam.DTYPES)
def test_default_tile_compiles_for_both_masks_and_its_sass_has_hgmma(dtype):
    from attnproto.experiments.proto5 import codegen
    from attnproto.ops import triton_flash

    for d in tfam.HEAD_DIMS:
        for causal in (False, True):
            k = triton_flash.aot_compile(dsl_tiles.default_config(d), d, causal, dtype)
            _check_hopper_code(k, f"default D={d} causal={causal} {dtype}")
            stats = codegen.cubin_stats(k.asm["cubin"])
            assert stats["hgmma_count"] > 0 and stats["hmma_count"] == 0
            assert stats["local_bytes"] == 0, "the default tile spills"


# ------------------------------------------------------------------ the CPU interpreter
def _interpret_cases() -> list:
    """Child process (TRITON_INTERPRET=1): run every case, return the errors as JSON rows."""
    import torch

    from attnproto.ops import triton_flash as T
    from sdpa_baseline import sdpa

    rng = np.random.default_rng()
    rows = []
    for d in tfam.HEAD_DIMS:
        for causal, hq, hkv, nq, nkv in INTERP_VARIANTS:
            q, k, v = lab.gate_inputs(rng, (2, hq, hkv, nq, nkv), d, "float16")
            qt, kt, vt = (torch.from_numpy(x).to(torch.float16) for x in (q, k, v))
            out = torch.full_like(qt, float("nan"))
            lse = torch.full(qt.shape[:3], float("nan"), dtype=torch.float32)
            args, kw = T.launch_args(qt, kt, vt, out, lse, scale=1 / math.sqrt(d), causal=causal,
                                     q_stride=qt.stride()[:3], k_stride=kt.stride()[:3], v_stride=vt.stride()[:3],
                                     o_stride=out.stride()[:3], lse_stride=lse.stride()[:2],
                                     block_m=INTERP_BLOCK_M, block_n=INTERP_BLOCK_N)
            T.attn_fwd[T.grid_for(INTERP_BLOCK_M, nq, 2 * hq)](*args, **kw, BLOCK_M=INTERP_BLOCK_M,
                                                              BLOCK_N=INTERP_BLOCK_N)
            exact, exact_lse = ref.attention(q, k, v, causal=causal, return_lse=True)
            o, l = out.double().numpy(), lse.double().numpy()
            theirs = sdpa(qt, kt, vt, causal, 1 / math.sqrt(d)).double().numpy()
            seen = np.isfinite(exact_lse)[..., None] & np.ones_like(exact, bool)
            rows.append({"case": f"D={d} causal={causal} Hq={hq} Hkv={hkv} Nq={nq} Nkv={nkv}",
                         "o_ok": bool(ref.allclose(o, exact, atol=ATOL, rtol=RTOL)),
                         "lse_ok": bool(ref.allclose(l, exact_lse, atol=ATOL, rtol=RTOL)),
                         "ours_err": float(np.abs(o - exact)[seen].max(initial=0.0)),
                         "their_err": float(np.nan_to_num(np.abs(theirs - exact), nan=0.0)[seen].max(initial=0.0)),
                         "floor": 2.0 ** -11 * float(np.abs(exact).max())})
    return rows


def test_interpreter_matches_fp64_and_torch():
    """The kernel itself (not a copy) under TRITON_INTERPRET=1 on CPU tensors: fresh inputs,
    NaN-poisoned outputs, odd lengths, both masks, GQA; O and LSE within the FP64 tolerance and
    O's error at most 2x torch SDPA's (float16 on the CPU) on the same inputs."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, __file__, "--interpret"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent, timeout=INTERP_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == len(tfam.HEAD_DIMS) * len(INTERP_VARIANTS)
    for r in rows:
        assert r["o_ok"] and r["lse_ok"], r
        assert r["ours_err"] <= SDPA_FACTOR * max(r["their_err"], r["floor"]), r


# ------------------------------------------------------------------ the registry contract
def test_triton_is_a_dsl_family_with_no_nvrtc_specialisations():
    fam = families.get("triton")
    assert fam.dsl == "triton" and fam.specialisations() == [] and fam.backend == "cuda"


def test_refusals_name_the_reason(monkeypatch):
    fam = families.get("triton")
    sm90 = DeviceSpec.for_arch("sm_90")
    spec = ProblemSpec(1, 2, 2, 64, 64, 128, "bfloat16", False)
    assert fam.supports_spec(spec, sm90) == (True, "")
    ok, why = fam.supports_spec(spec, DeviceSpec("cpu", "cpu"))
    assert not ok and "runs on the cuda backend, not cpu" in why
    ok, why = fam.supports_spec(ProblemSpec(1, 2, 2, 64, 64, 128, "float32", False), sm90)
    assert not ok and why.startswith("q: dtype float32 not supported by triton")
    ok, why = fam.supports_spec(ProblemSpec(1, 2, 2, 64, 64, 80, "bfloat16", False), sm90)
    assert not ok and why.startswith("q: head_dim 80 not supported by triton")
    ok, why = fam.supports_spec(spec, DeviceSpec.for_arch("sm_80"))
    assert not ok and "compute capability 9.0" in why
    ok, why = fam.supports_spec(ProblemSpec(70000, 1, 1, 64, 64, 128, "bfloat16", False), sm90)
    assert not ok and "grid limit" in why
    monkeypatch.setattr(tfam.importlib.util, "find_spec", lambda name: None)
    ok, why = fam.supports_spec(spec, sm90)
    assert not ok and "triton is not installed" in why


def test_configs_round_trip_and_bad_configs_name_the_field():
    fam = families.get("triton")
    sm90 = DeviceSpec.for_arch("sm_90")
    spec = ProblemSpec(1, 2, 2, 64, 64, 128, "bfloat16", True)
    assert fam.config_for(spec, fam.config_dict(tfam.AUTOTUNE), sm90) is tfam.AUTOTUNE
    assert fam.config_label(tfam.AUTOTUNE) == "triton autotune"
    cfg, why = fam.default_config(spec, sm90)
    assert fam.coerce_config(cfg, spec, sm90) == cfg and "AUTOTUNE" in why
    with pytest.raises(TypeError, match="config: expected a TritonConfig"):
        fam.coerce_config((128, 64), spec, sm90)
    with pytest.raises(ValueError, match="config.block_m: 96 is not a power of two"):
        fam.coerce_config(dsl_tiles.TritonConfig(96, 64, 8, 3), spec, sm90)
    with pytest.raises(ValueError, match="config.warps"):
        fam.coerce_config(dsl_tiles.TritonConfig(128, 64, 6, 3), spec, sm90)
    with pytest.raises(ValueError, match="shared memory"):
        fam.coerce_config(dsl_tiles.TritonConfig(128, 256, 8, 6), spec, sm90)


def test_auto_never_chooses_a_dsl_family_even_when_its_table_entry_is_fastest():
    sm90 = DeviceSpec.for_arch("sm_90")
    spec = ProblemSpec(1, 16, 16, 4096, 4096, 128, "bfloat16", False)
    fam = families.get("triton")
    fake = {"arch": "sm_90", "family": "triton", "dtype": "bfloat16", "head_dim": 128, "causal": False,
            "seq_len": 4096, "config": fam.config_dict(dsl_tiles.default_config(128)), "tflops": 1e6, "cv": 0.0,
            "device": "a table entry written by this test", "reason": "test"}
    with chooser.use_entries(list(chooser.entries()) + [fake]):
        choice = chooser.choose(spec, sm90)
        assert choice.family.name != "triton", choice.reason
        # By name, the family takes its own measured tile.
        cfg, reason = chooser.family_choice(fam, spec, sm90)
        assert cfg == dsl_tiles.default_config(128) and "triton's fastest tile" in reason


# ------------------------------------------------------------------ on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", tfam.HEAD_DIMS)
def test_autotuned_kernel_matches_fp64_on_the_gpu(cuda, head_dim):
    """Whatever tile triton.autotune picks is right (bfloat16, causal with Nq > Nkv: both loops,
    rows without keys). One autotuning compiles every tile, so one mask and dtype here; the
    default tile runs every dtype, mask and variant in tests/test_families.py."""
    import torch

    from sdpa_baseline import sdpa

    if int(cuda.info["compute_major"]) < 9:
        pytest.skip("the Triton family needs Hopper (TMA descriptors)")
    rng = np.random.default_rng()
    dtype, causal = "bfloat16", True
    for d in (head_dim,):
        q, k, v = lab.gate_inputs(rng, (2, 4, 2, 333, 301), d, dtype)
        qt, kt, vt = (torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in (q, k, v))
        out = torch.full_like(qt, float("nan"))
        lse = torch.full(qt.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
        launch = F.prepare_forward(qt, kt, vt, causal=causal, kernel="triton", config=tfam.AUTOTUNE, out=out,
                                   lse=lse)
        launch.launch()
        torch.cuda.synchronize()
        assert launch.family == "triton" and launch.resources["registers"] > 0
        tuned = launch.tuned_config()
        assert tuned in dsl_tiles.configs(d)
        exact, exact_lse = ref.attention(q, k, v, causal=causal, return_lse=True)
        o = out.double().cpu().numpy()
        ref.assert_allclose(o, exact, atol=ATOL, rtol=RTOL, msg=f"triton {tuned} O")
        ref.assert_allclose(lse.double().cpu().numpy(), exact_lse, atol=ATOL, rtol=RTOL, msg="triton LSE")
        theirs = sdpa(qt, kt, vt, causal, 1.0 / math.sqrt(d)).double().cpu().numpy()
        seen = np.isfinite(exact_lse)[..., None] & np.ones_like(exact, bool)
        floor = 2.0 ** -(11 if dtype == "float16" else 8) * float(np.abs(exact).max())
        their = float(np.nan_to_num(np.abs(theirs - exact), nan=0.0)[seen].max(initial=0.0))
        assert float(np.abs(o - exact)[seen].max(initial=0.0)) <= SDPA_FACTOR * max(their, floor)
        stats = launch.time(warmup=1, iters=3)
        assert stats.median_ms > 0 and stats.clock == "device"


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_interpret_cases()))
