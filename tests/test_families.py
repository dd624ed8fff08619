"""The kernel-family registry: the contract every family keeps, and one correctness test
over families x dtypes x head dims x variants through the front door.

Host families (cpu) run everywhere; CUDA families are marked gpu (they run on the device
machine and skip elsewhere with the reason); the Metal family runs where a Metal device is
present. Every check draws fresh random inputs and pre-fills the outputs with NaN, so an
element the kernel did not write fails."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnproto import kernels, lab, ref
from attnproto.findings import BACKENDS
from attnproto.ops import chooser, families
from attnproto.ops import flash as F
from attnproto.ops.problem import DeviceSpec, ProblemSpec
from sdpa_baseline import SDPA_FACTOR, sdpa

ATOL, RTOL = 5e-3, 1e-2
# (name, causal, Hq, Hkv, Nq, Nkv): odd lengths, bottom-right causal with Nq < Nkv and
# Nq > Nkv (rows that see no key), GQA.
VARIANTS = (
    ("plain", False, 2, 2, 77, 77),
    ("causal", True, 2, 2, 77, 77),
    ("causal-nq-lt-nkv", True, 2, 2, 33, 130),
    ("causal-nq-gt-nkv", True, 2, 2, 70, 45),
    ("gqa", False, 4, 2, 65, 100),
    ("gqa-causal", True, 4, 1, 129, 129),
)


def _cases():
    for fam in families.FAMILIES:
        marks = [pytest.mark.gpu] if fam.backend == "cuda" else ([pytest.mark.metal] if fam.backend == "metal" else [])
        for dtype in fam.rules.dtypes:
            for d in fam.test_head_dims:
                for variant in VARIANTS:
                    yield pytest.param(fam.name, dtype, d, variant, marks=marks,
                                       id=f"{fam.name}-{dtype}-d{d}-{variant[0]}")


# ------------------------------------------------------------------ the registry itself
def test_names_are_unique_and_every_family_is_complete():
    names = families.names()
    assert len(names) == len(set(names)) and "auto" not in names
    for fam in families.FAMILIES:
        assert fam.backend in BACKENDS and fam.label and fam.kernel_name and fam.config_keys
        assert fam.test_head_dims and all(fam.rules.head_dim_ok(d) for d in fam.test_head_dims)
        assert families.get(fam.name) is fam
    assert [f.name for f in families.for_backend("cuda")] == ["wgmma", "mma", "triton", "helion"]
    assert [f.name for f in families.FAMILIES if f.dsl] == ["triton", "helion"]


def test_unknown_family_names_the_argument():
    with pytest.raises(ValueError, match="kernel: 'nope' is not a registered family; available: auto, wgmma"):
        families.get("nope")


@pytest.mark.parametrize("fam", families.FAMILIES, ids=lambda f: f.name)
def test_sweep_space_round_trips_through_records(fam):
    """What the sweep records (config_dict) rebuilds the same config (config_for): the table works."""
    device = DeviceSpec.for_arch("sm_90") if fam.backend == "cuda" else DeviceSpec(fam.backend, fam.backend)
    for d in fam.test_head_dims:
        for causal in (False, True):
            spec = ProblemSpec(1, 1, 1, 64, 64, d, fam.rules.dtypes[0], causal)
            space = fam.sweep_space(d, causal, spec.dtype, device)
            assert space, (fam.name, d)
            for cfg in space:
                assert fam.config_for(spec, fam.config_dict(cfg), device) == cfg
                assert fam.config_label(cfg).startswith(fam.name)


@pytest.mark.parametrize("fam", [f for f in families.for_backend("cuda") if not f.dsl], ids=lambda f: f.name)
def test_every_cuda_specialisation_is_compiled_by_ci(fam):
    """`kernels compile` (CI) and `kernels precompile` cover each family's list, which covers its
    sweep, its defaults and the shipped table's tiles."""
    every = {(n, tuple(sorted(c.items()))) for n, c in kernels.all_specialisations()}
    mine = fam.specialisations()
    assert mine and all(n == fam.kernel_name for n, _ in mine)
    assert {(n, tuple(sorted(c.items()))) for n, c in mine} <= every
    table = {(n, tuple(sorted(c.items()))) for n, c in chooser.table_specialisations(fam)}
    assert table <= every


def test_a_family_refuses_with_the_argument_named():
    device = DeviceSpec.for_arch("sm_90")
    spec = ProblemSpec(1, 2, 2, 64, 64, 80, "bfloat16", False)
    ok, why = families.get("wgmma").supports_spec(spec, device)
    assert not ok and why.startswith("q: head_dim 80 not supported by wgmma")
    ok, why = families.get("mma").supports_spec(ProblemSpec(1, 2, 2, 64, 64, 64, "float32", False), device)
    assert not ok and why.startswith("q: dtype float32")
    ok, why = families.get("wgmma").supports_spec(spec, DeviceSpec.for_arch("sm_80"))
    assert not ok and "compute capability 9.0" in why


def test_explicit_family_errors_are_typed():
    x = np.zeros((1, 1, 8, 64), np.float32)
    with pytest.raises(ValueError, match="q: mma takes CUDA tensors"):
        F.flash_forward(x, x, x, kernel="mma")
    with pytest.raises(ValueError, match="config: tiles belong to a family"):
        F.flash_forward(x, x, x, config=(64, 64))
    with pytest.raises(TypeError, match="kernel"):
        F.flash_forward(x, x, x, kernel=3)
    with pytest.raises(TypeError, match="config"):
        F.flash_forward(x, x, x, kernel="cpu", config="64x64")


# ------------------------------------------------------------------ correctness, every family
def _host_run(fam, q, k, v, causal, dtype):
    out = np.full(q.shape, np.nan, np.float32)
    lse = np.full(q.shape[:3], np.nan, np.float32)
    launch = F.prepare_forward(q, k, v, causal=causal, kernel=fam.name, out=out, lse=lse, backend=fam.backend)
    o, l = launch.launch()
    assert o is out and l is lse
    return launch, np.asarray(o, np.float64), np.asarray(l, np.float64), None


def _cuda_run(fam, q, k, v, causal, dtype):
    import torch

    tdt = getattr(torch, dtype)
    qt, kt, vt = (torch.from_numpy(x).to("cuda", tdt) for x in (q, k, v))
    out = torch.full_like(qt, float("nan"))
    lse = torch.full(qt.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
    launch = F.prepare_forward(qt, kt, vt, causal=causal, kernel=fam.name, out=out, lse=lse)
    launch.launch()
    theirs = sdpa(qt, kt, vt, causal, 1.0 / math.sqrt(q.shape[-1]))
    torch.cuda.synchronize()
    return (launch, out.double().cpu().numpy(), lse.double().cpu().numpy(), theirs.double().cpu().numpy())


@pytest.mark.parametrize("name, dtype, head_dim, variant", list(_cases()))
def test_family_matches_fp64(name, dtype, head_dim, variant):
    fam = families.get(name)
    if fam.backend == "metal":
        from attnproto.backend import list_backends

        if not any(b.name == "metal" and b.available for b in list_backends()):
            pytest.skip("needs an Apple GPU family 9 Metal device (statically checked elsewhere)")
    _, causal, hq, hkv, nq, nkv = variant
    rng = np.random.default_rng()
    q, k, v = lab.gate_inputs(rng, (2, hq, hkv, nq, nkv), head_dim, dtype)
    run = _cuda_run if fam.backend == "cuda" else _host_run
    launch, o, lse, theirs = run(fam, q, k, v, causal, dtype)
    assert launch.family == name and launch.reason
    exact, exact_lse = ref.attention(q, k, v, causal=causal, return_lse=True)
    ref.assert_allclose(o, exact, atol=ATOL, rtol=RTOL, msg=f"{name} O")
    ref.assert_allclose(lse, exact_lse, atol=ATOL, rtol=RTOL, msg=f"{name} LSE")
    if theirs is not None:
        # torch gives NaN rows where no key is visible; ours are the documented 0 — compare elsewhere.
        seen = np.isfinite(exact_lse)[..., None] & np.ones_like(exact, bool)
        ours_err = float(np.abs(o - exact)[seen].max(initial=0.0))
        their_err = float(np.nan_to_num(np.abs(theirs - exact), nan=0.0)[seen].max(initial=0.0))
        floor = 2.0 ** -(11 if dtype == "float16" else 8) * float(np.abs(exact).max())
        assert ours_err <= SDPA_FACTOR * max(their_err, floor), (ours_err, their_err)


# ------------------------------------------------------------------ kernel="auto"
def test_auto_is_the_default_and_says_why():
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 2, 40, 64)).astype(np.float32) for _ in range(3))
    launch = F.prepare_forward(q, k, v, backend="cpu")
    assert launch.family == "cpu" and "cpu" in launch.reason
    o, lse = launch.launch()
    ref.assert_allclose(np.asarray(o, np.float64), ref.attention(q, k, v), atol=1e-4, rtol=1e-3)
    stats = F.time_flash_forward(q, k, v, backend="cpu", warmup=1, iters=3)
    assert stats.median_ms > 0 and stats.clock == "host"


def test_host_arrays_with_the_cuda_backend_name_q():
    x = np.zeros((1, 1, 8, 64), np.float32)
    with pytest.raises(ValueError, match="q: expected a tensor on device 'cuda'"):
        F.flash_forward(x, x, x, backend="cuda")


@pytest.mark.gpu
def test_auto_runs_wgmma_on_hopper(cuda):
    import torch

    if int(cuda.info["compute_major"]) != 9:
        pytest.skip("not a Hopper GPU")
    q = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    launch = F.prepare_forward(q, q, q, causal=True)
    assert launch.family == "wgmma", launch.reason
    assert "fastest measured" in launch.reason
