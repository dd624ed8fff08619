"""Prototype 7 variants on any machine: the front door's checks (each error names its argument),
families refusing what they do not take (AC-5.5), the CPU family against the FP64 reference for
every variant and combination, and the illegal combinations failing to compile with their
static_assert message (NVRTC, no GPU needed)."""
from __future__ import annotations

import numpy as np
import pytest

from attnproto import ref
from attnproto.ops import families, flash_forward, flash_wgmma as fw, variants
from attnproto.ops.problem import DeviceSpec, ProblemSpec

HOPPER = DeviceSpec.for_arch("sm_90")

# (front-door keywords, the reference's keywords); slopes are drawn per test.
CASES = [
    ({}, {}),
    ({"rope": "half"}, {"rope": "half"}),
    ({"rope": "interleaved", "rope_offset": 7}, {"rope": "interleaved", "rope_offset": 7}),
    ({"alibi": True}, {"alibi": True}),
    ({"alibi": "slopes"}, {"alibi": True}),
    ({"window": 9}, {"window": 9}),
    ({"softcap": 2.5}, {"softcap": 2.5}),
    ({"rope": "half", "window": 13, "softcap": 3.0}, {"rope": "half", "window": 13, "softcap": 3.0}),
    ({"rope": True, "alibi": True, "window": 5, "softcap": 1.5, "rope_theta": 500.0},
     {"rope": True, "alibi": True, "window": 5, "softcap": 1.5, "rope_theta": 500.0}),
]


def _inputs(rng, hq=6, hkv=2, nq=37, nkv=53, d=32):
    q = rng.standard_normal((2, hq, nq, d)).astype(np.float32)
    k = rng.standard_normal((2, hkv, nkv, d)).astype(np.float32)
    v = rng.standard_normal((2, hkv, nkv, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ours, theirs", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("nq, nkv", [(37, 53), (53, 53), (1, 40)])
def test_cpu_family_matches_reference(ours, theirs, causal, nq, nkv):
    rng = np.random.default_rng()
    q, k, v = _inputs(rng, nq=nq, nkv=nkv)
    ours, theirs = dict(ours), dict(theirs)
    if ours.get("alibi") == "slopes":
        slopes = rng.uniform(0.05, 1.0, q.shape[1]).astype(np.float32)
        ours["alibi"], theirs["alibi_slopes"] = slopes, slopes
    o, lse = flash_forward(q, k, v, causal=causal, backend="cpu", **ours)
    o_ref, lse_ref = ref.attention(q, k, v, causal=causal, return_lse=True, **theirs)
    ref.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4, msg="O")
    seen = np.isfinite(lse_ref)
    assert np.array_equal(np.isfinite(lse), seen)
    ref.assert_allclose(lse[seen], lse_ref[seen], atol=2e-5, rtol=1e-4, msg="LSE")


def test_window_of_one_sees_only_the_diagonal():
    rng = np.random.default_rng()
    q, k, v = _inputs(rng, nq=20, nkv=20)
    o, _ = flash_forward(q, k, v, causal=True, window=1, backend="cpu")
    np.testing.assert_allclose(o, np.repeat(v, 3, axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"window": 0}, ValueError, "window"),
    ({"window": 2.5}, TypeError, "window"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"rope": "neox"}, ValueError, "rope"),
    ({"rope_table": (np.zeros((99, 16), np.float32),) * 2}, ValueError, "rope_table"),   # no rope
    ({"rope": "half", "rope_table": (np.zeros((10, 16), np.float32),) * 2}, ValueError, "rope_table"),
    ({"rope": "half", "rope_table": (np.zeros((99, 15), np.float32),) * 2}, ValueError, "rope_table"),
    ({"rope": "half", "rope_table": (np.zeros((99, 16), np.float64),) * 2}, TypeError, "rope_table"),
    ({"rope": "half", "rope_table": np.zeros((99, 16), np.float32)}, TypeError, "rope_table"),
    ({"rope": "half", "rope_offset": -1}, ValueError, "rope_offset"),
    ({"rope": "half", "rope_theta": 0.0}, ValueError, "rope_theta"),
    ({"alibi": np.ones(5, np.float32)}, ValueError, "alibi"),
    ({"alibi": np.ones(6, np.int32)}, TypeError, "alibi"),
    ({"alibi": True, "alibi_max_bias": float("nan")}, ValueError, "alibi_max_bias"),
    ({"windw": 3}, TypeError, "windw"),
])
def test_bad_variant_arguments_name_the_argument(kwargs, exc, match):
    q, k, v = _inputs(np.random.default_rng(0))
    with pytest.raises(exc, match=match):
        flash_forward(q, k, v, backend="cpu", **kwargs)


def test_rope_needs_query_positions_at_or_after_zero():
    q, k, v = _inputs(np.random.default_rng(0), nq=60, nkv=53)
    with pytest.raises(ValueError, match="rope_offset"):
        flash_forward(q, k, v, backend="cpu", rope="half")
    flash_forward(q, k, v, backend="cpu", rope="half", rope_offset=7)


def _spec(variant, d=128):
    return ProblemSpec(1, 8, 2, 1000, 1000, d, "bfloat16", True, variant)


@pytest.mark.parametrize("variant", variants.VARIANT_SPECIALISATIONS, ids=lambda v: v.label)
def test_every_family_says_whether_it_takes_a_variant(variant):
    for fam in families.FAMILIES:
        ok, why = fam.variant_support(_spec(variant))
        if set(variant.features()) <= fam.variant_features:
            assert ok and why == ""
        else:
            missing = next(f for f in variant.features() if f not in fam.variant_features)
            assert not ok and f"'{missing}'" in why and why.split(":")[0] in ("rope", "rope_table", "alibi",
                                                                                "window", "softcap")


def test_wgmma_takes_every_variant_and_constants_name_them():
    fam = families.get("wgmma")
    for variant in variants.VARIANT_SPECIALISATIONS:
        ok, why = fam.supports_spec(_spec(variant), HOPPER)
        assert ok, why
        c = fam.constants(fw.default_config(128, True), _spec(variant))
        assert {k: c[k] for k in ("ROPE", "ROPE_TABLE", "ALIBI", "WINDOW", "SOFTCAP")} == variant.constants()
    base = fam.constants(fw.default_config(128, True), _spec(variants.BASE))
    assert all(base[k] == 0 for k in ("ROPE", "ROPE_TABLE", "ALIBI", "WINDOW", "SOFTCAP"))


def test_rope_costs_ready_barriers_in_shared_memory():
    cfg = fw.default_config(128, True)
    extra = fw.shared_bytes(cfg, 128, variants.Variant(rope="half")) - fw.shared_bytes(cfg, 128)
    assert extra == (1 + cfg.stages) * fw.BARRIER_BYTES
    assert fw.shared_bytes(cfg, 128, variants.Variant(window=True, softcap=True)) == fw.shared_bytes(cfg, 128)


def test_variant_labels_and_features_are_distinct():
    labels = {v.label for v in variants.VARIANT_SPECIALISATIONS}
    assert len(labels) == len(variants.VARIANT_SPECIALISATIONS) and "base" not in labels
    assert set().union(*(v.features() for v in variants.VARIANT_SPECIALISATIONS)) == set(variants.FEATURES)


# ---- AC-5.5: illegal combinations fail at compile time, with the reason ----
ILLEGAL = [
    ({"ROPE": 0, "ROPE_TABLE": 1}, 0, "ROPE_TABLE=1 without ROPE"),
    ({"ROPE": 1}, 16, "ROPE with PAGE_SIZE > 0"),
    ({"ROPE": 3}, 0, "ROPE must be 0"),
    ({"ALIBI": 3}, 0, "ALIBI must be 0"),
    ({"WINDOW": 2}, 0, "WINDOW must be 0 or 1"),
]


@pytest.mark.parametrize("override, page, message", ILLEGAL, ids=[m for _, _, m in ILLEGAL])
def test_illegal_variant_fails_to_compile_with_message(nvrtc, override, page, message):
    consts = fw.constants(fw.default_config(128, True), 128, True, "bfloat16", page)
    consts.update(override)
    with pytest.raises(Exception, match=message):
        nvrtc.cuda_compile(fw.KERNEL_NAME, consts, "sm_90a")


@pytest.mark.parametrize("variant", variants.VARIANT_SPECIALISATIONS, ids=lambda v: v.label)
def test_variant_specialisations_are_compiled_ahead(variant):
    specs = families.get("wgmma").specialisations()
    for d in fw.HEAD_DIMS:
        want = fw.constants(fw.default_config(d, True), d, True, "bfloat16", 0, variant)
        assert (fw.KERNEL_NAME, want) in specs


def test_standalone_kernels_are_registered_for_the_ci_compile():
    from attnproto import kernels
    from attnproto.ops import rope

    names = {name for name, _ in kernels.all_specialisations()}
    assert {rope.ROPE_KERNEL, rope.REPEAT_KV_KERNEL} <= names
