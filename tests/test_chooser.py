"""kernel="auto": the shipped table equals what the committed results imply, and the
chooser picks the fastest measured family x tile with its reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnproto.ops import chooser, families
from attnproto.ops.problem import DeviceSpec, ProblemSpec

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_table_matches_the_committed_results():
    shipped = chooser.load_table()
    generated = chooser.generate_table(ROOT / "results")
    assert shipped == json.loads(json.dumps(generated)), (
        "python/attnproto/ops/tile_table.json disagrees with results/*/proto1: run python3 tools/update_tile_table.py")
    assert shipped["entries"], "the table is empty: no committed proto1 results?"


def test_every_entry_is_legal_and_in_its_family_sweep():
    for e in chooser.load_table()["entries"]:
        fam = families.get(e["family"])
        device = DeviceSpec.for_arch(e["arch"])
        spec = ProblemSpec(1, 1, 1, e["seq_len"], e["seq_len"], e["head_dim"], e["dtype"], e["causal"])
        cfg = fam.config_for(spec, e["config"], device)
        assert cfg in fam.sweep_space(e["head_dim"], e["causal"], e["dtype"], device), e
        assert "TFLOPS" in e["reason"] and e["tflops"] > 0


def _fake_entries():
    def entry(family, config, tflops, n=4096, d=128, causal=False, dtype="bfloat16"):
        return {"arch": "sm_90", "family": family, "dtype": dtype, "head_dim": d, "causal": causal, "seq_len": n,
                "config": config, "tflops": tflops, "cv": 0.01, "device": "test GPU", "reason": "test"}
    mma = {"block_r": 128, "block_c": 64, "warps": 4, "stages": 1}
    wg = {"block_r": 128, "block_c": 128, "consumer_wg": 2, "stages": 2}
    return [entry("mma", mma, 400.0), entry("wgmma", wg, 600.0), entry("mma", mma, 300.0, n=1024),
            entry("wgmma", wg, 250.0, n=1024)]


def test_auto_picks_the_fastest_measured_family_per_band():
    device = DeviceSpec.for_arch("sm_90")
    with chooser.use_entries(_fake_entries()):
        long = chooser.choose(ProblemSpec(1, 8, 8, 4096, 4096, 128, "bfloat16", False), device)
        short = chooser.choose(ProblemSpec(1, 8, 8, 1000, 1000, 128, "bfloat16", False), device)
        beyond = chooser.choose(ProblemSpec(1, 8, 8, 10**6, 10**6, 128, "bfloat16", False), device)
    assert long.family.name == "wgmma" and "600 TFLOPS" in long.reason and "next mma" in long.reason
    assert short.family.name == "mma" and "Nq=1000 falls in the N=1024 band" in short.reason
    assert beyond.family.name == "wgmma"


def test_auto_borrows_dtype_and_head_dim_and_says_so():
    device = DeviceSpec.for_arch("sm_90")
    with chooser.use_entries(_fake_entries()):
        half = chooser.choose(ProblemSpec(1, 8, 8, 4096, 4096, 128, "float16", False), device)
        odd = chooser.choose(ProblemSpec(1, 8, 8, 4096, 4096, 80, "bfloat16", False), device)
    assert half.family.name == "wgmma" and "float16 borrows bfloat16" in half.reason
    # wgmma does not take D=80: mma's D=128 entry, its tile re-specialised for D=80.
    assert odd.family.name == "mma" and odd.config.head_dim == 80 and "D=80 uses the D=128" in odd.reason
    assert "not eligible: wgmma: q: head_dim 80" in odd.reason


def test_without_entries_the_first_family_defaults_with_a_reason():
    with chooser.use_entries([]):
        c = chooser.choose(ProblemSpec(1, 8, 8, 4096, 4096, 128, "bfloat16", True), DeviceSpec.for_arch("sm_90"))
    assert c.family.name == "wgmma" and "FlashAttention-3" in c.reason and "no measured table entry" in c.reason
    c = chooser.choose(ProblemSpec(1, 8, 8, 4096, 4096, 128, "bfloat16", True), DeviceSpec.for_arch("sm_80"))
    assert c.family.name == "mma" and "wgmma needs compute capability 9.0" in c.reason


def test_no_family_takes_the_call_names_the_argument():
    with pytest.raises(TypeError, match="q: dtype float32 not supported by wgmma"):
        chooser.choose(ProblemSpec(1, 8, 8, 64, 64, 128, "float32", False), DeviceSpec.for_arch("sm_90"))
    with pytest.raises(ValueError, match="q: head_dim 72 not supported by wgmma.*mma: q: head_dim 72"):
        chooser.choose(ProblemSpec(1, 8, 8, 64, 64, 72, "bfloat16", False), DeviceSpec.for_arch("sm_90"))


def test_build_entries_takes_the_best_tile_per_family_and_point():
    def rec(family, kernel, cfg, tflops, cv=0.01):
        return {"config": {"kernel": kernel, "family": family, "head_dim": 64, "seq_len": 512, "causal": False,
                           "dtype": "bfloat16", "batch": 32, "num_heads": 32, **cfg},
                "metrics": {"tflops": tflops}, "timing": {"cv": cv}}
    a = {"block_r": 64, "block_c": 64, "warps": 4, "stages": 2}
    b = {"block_r": 128, "block_c": 64, "warps": 4, "stages": 2}
    records = [rec("mma", "flash_fwd_mma", a, 100.0), rec("mma", "flash_fwd_mma", b, 120.0),
               {"config": {"kernel": "sdpa_cudnn", "head_dim": 64, "seq_len": 512, "causal": False},
                "metrics": {"tflops": 500.0}, "timing": {"cv": 0.0}},
               {"config": {"kernel": "auto", "family": "mma", "head_dim": 64, "seq_len": 512, "causal": False,
                           "dtype": "bfloat16"}, "metrics": {"tflops": 999.0}, "timing": {"cv": 0.0}}]
    (entry,) = chooser.build_entries(records, "sm_90", "test GPU")
    assert entry["config"] == b and entry["tflops"] == 120.0
    assert "fastest of 2 mma tiles" in entry["reason"] and "next mma 64x64 w4 s2" in entry["reason"]
