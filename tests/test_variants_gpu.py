"""Prototype 7 variants on the GPU, against the FP64 reference: every CUDA flash family that takes
a variant (``variant_features``), every variant of variants.VARIANT_SPECIALISATIONS plus GQA,
head dims 64/128/256, both masks, odd lengths with Nq != Nkv, NaN-poisoned outputs, fresh random
inputs per test, and an error no larger than 2x torch's own implementation of the same variant
on the same inputs (or the output's rounding). Also the standalone RoPE / repeat_kv kernels.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnproto import ref
from attnproto.ops import families, flash_forward, variants
from sdpa_baseline import MANTISSA_BITS, SDPA_FACTOR

ATOL, RTOL = 5e-3, 1e-2
HOPPER_MAJOR = 9
# Gemma 2's attention soft cap; windows well inside the test lengths.
SOFTCAP = 50.0
WINDOW = 200
CUDA_FAMILIES = [f for f in families.FAMILIES if f.backend == "cuda" and f.variant_features and not f.dsl]


def _torch():
    return pytest.importorskip("torch")


def _seed():
    return int.from_bytes(np.random.bytes(4), "little")


def _kwargs(variant, torch, hq, npos, d, softcap=SOFTCAP, window=WINDOW):
    """Front-door keywords for a Variant (tables and slopes built on the device)."""
    kw = {}
    if variant.rope is not None:
        kw.update(rope=variant.rope, rope_offset=5)
        if variant.rope_source == "table":
            kw["rope_table"] = variants.rope_tables(npos + 5, d)
    if variant.alibi == "standard":
        kw["alibi"] = True
    elif variant.alibi == "slopes":
        kw["alibi"] = torch.rand(hq, device="cuda", dtype=torch.float32) * 0.5 + 0.01
    if variant.window:
        kw["window"] = window
    if variant.softcap:
        kw["softcap"] = softcap
    return kw


def _ref_kwargs(kw):
    out = {k: v for k, v in kw.items() if k not in ("rope_table", "alibi")}
    if "alibi" in kw:
        out["alibi"] = True
        if not isinstance(kw["alibi"], bool):
            out["alibi_slopes"] = kw["alibi"].double().cpu().numpy()
    return out


def torch_variant(q, k, v, causal, scale, kw):
    """torch's own implementation in the inputs' precision (HF-eager style): RoPE in float32 then
    rounded, scores of 16-bit matmuls, cap/bias/mask and softmax in float32, P rounded, P V."""
    import torch  # noqa: PLC0415

    nq, nkv, d = q.shape[2], k.shape[2], q.shape[3]
    if "rope" in kw:
        r = ref.rope_style(kw["rope"])
        off = kw.get("rope_offset", 0)
        theta = kw.get("rope_theta", ref.DEFAULT_ROPE_THETA)

        def rot(x, pos):
            inv = 1.0 / theta ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)
            ang = pos.float()[:, None] * inv[None]
            c, s = ang.cos(), ang.sin()
            xf = x.float()
            if r == "half":
                x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
                return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2).to(x.dtype)
        q = rot(q, torch.arange(nq, device="cuda") + off + nkv - nq)
        k = rot(k, torch.arange(nkv, device="cuda") + off)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)).float() * scale
    if "softcap" in kw:
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    pos_q = torch.arange(nq, device="cuda")[:, None] + nkv - nq
    key = torch.arange(nkv, device="cuda")[None, :]
    if "alibi" in kw:
        slopes = (torch.as_tensor(ref.alibi_slopes(q.shape[1], kw.get("alibi_max_bias", 8.0)), device="cuda")
                  if isinstance(kw["alibi"], bool) else kw["alibi"]).float()
        s = s - slopes[:, None, None] * (pos_q - key).abs().float()
    visible = torch.ones(nq, nkv, dtype=torch.bool, device="cuda")
    if causal:
        visible &= key <= pos_q
    if "window" in kw:
        visible &= key > pos_q - kw["window"]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def _default_config(fam, b, hq, hkv, nq, nkv, d, dtype, causal, variant):
    """The family's default tiles for the call: what `attnproto kernels precompile` compiled ahead
    (the variant specialisations), so the test run does not compile each one on its own."""
    from attnproto.backend import get
    from attnproto.ops.problem import DeviceSpec, ProblemSpec

    spec = ProblemSpec(b, hq, hkv, nq, nkv, d, dtype, causal, variant)
    return fam.default_config(spec, DeviceSpec.from_backend(get("cuda")))[0]


def _check(fam, torch, variant, dtype, d, causal, b=1, hq=4, hkv=2, nq=333, nkv=517, label=""):
    gen = torch.Generator().manual_seed(_seed())
    tdt = getattr(torch, dtype)
    q = torch.randn((b, hq, nq, d), generator=gen).to(tdt).cuda()
    k = torch.randn((b, hkv, nkv, d), generator=gen).to(tdt).cuda()
    v = torch.randn((b, hkv, nkv, d), generator=gen).to(tdt).cuda()
    kw = _kwargs(variant, torch, hq, max(nq, nkv), d)
    out = torch.full((b, hq, nq, d), float("nan"), dtype=tdt, device="cuda")
    lse = torch.full((b, hq, nq), float("nan"), dtype=torch.float32, device="cuda")
    cfg = _default_config(fam, b, hq, hkv, nq, nkv, d, dtype, causal, variant)
    flash_forward(q, k, v, causal=causal, kernel=fam.name, config=cfg, out=out, lse=lse, **kw)
    torch.cuda.synchronize()
    host = [x.double().cpu().numpy() for x in (q, k, v)]
    rkw = _ref_kwargs(kw)
    o_ref, lse_ref = ref.attention(*host, causal=causal, return_lse=True, **rkw)
    o_np, lse_np = out.double().cpu().numpy(), lse.double().cpu().numpy()
    seen = np.isfinite(lse_ref)
    assert not np.isnan(o_np).any(), f"{label}: unwritten (NaN) O"
    assert np.array_equal(np.isfinite(lse_np), seen), f"{label}: rows with/without keys differ"
    # The tolerance check is against the exact attention of what the tensor cores multiply: with
    # RoPE the rotated Q and K rounded to the input dtype (as torch's rotated tensors are); the
    # 2x-torch check below is against the unrounded FP64 reference.
    o_tol, lse_tol = (o_ref, lse_ref) if "rope" not in kw else _rounded_rope_reference(torch, q, k, v, causal, rkw)
    ref.assert_allclose(o_np, o_tol, atol=ATOL, rtol=RTOL, msg=f"{label} O")
    ref.assert_allclose(lse_np[seen], lse_tol[seen], atol=ATOL, rtol=RTOL, msg=f"{label} LSE")
    if seen.any():
        theirs = torch_variant(q, k, v, causal, 1.0 / math.sqrt(d), kw).double().cpu().numpy()
        err_t = np.abs(theirs - o_ref)[seen].max()
        ours = np.abs(o_np - o_ref)[seen].max()
        floor = 2.0 ** -MANTISSA_BITS[dtype] * np.abs(o_ref[seen]).max()
        assert ours <= max(SDPA_FACTOR * err_t, floor), f"{label}: error {ours:.3e} > 2 x torch's {err_t:.3e}"
    assert not (o_np[~seen] != 0).any(), f"{label}: rows without keys must be exact zeros"


def _rounded_rope_reference(torch, q, k, v, causal, rkw):
    """FP64 attention of rope(q), rope(k) rounded to the inputs' dtype (RoPE keywords consumed)."""
    nq, nkv = q.shape[2], k.shape[2]
    off, theta, style = rkw.get("rope_offset", 0), rkw.get("rope_theta", ref.DEFAULT_ROPE_THETA), rkw["rope"]
    rest = {key: val for key, val in rkw.items() if key not in ("rope", "rope_offset", "rope_theta")}

    def rounded(x, pos):
        rot = ref.rope(x.double().cpu().numpy(), theta, pos, style)
        return torch.from_numpy(rot).to(x.dtype).double().numpy()
    qr = rounded(q, np.arange(nq) + off + nkv - nq)
    kr = rounded(k, np.arange(nkv) + off)
    return ref.attention(qr, kr, v.double().cpu().numpy(), causal=causal, return_lse=True, **rest)


@pytest.fixture
def hopper(cuda):
    if cuda.info["compute_major"] != HOPPER_MAJOR:
        pytest.skip(f"needs an sm_90 GPU, got {cuda.info['arch']}")
    return cuda


def _fams(variant):
    return [f for f in CUDA_FAMILIES if set(variant.features()) <= f.variant_features]


CASES = [(f, v) for v in variants.VARIANT_SPECIALISATIONS for f in _fams(v)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("fam, variant", CASES, ids=[f"{f.name}-{v.label}" for f, v in CASES])
def test_variant_matches_reference(hopper, fam, variant, d, causal):
    torch = _torch()
    _check(fam, torch, variant, "bfloat16", d, causal, label=f"{fam.name} {variant.label} D={d} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("fam, variant", CASES, ids=[f"{f.name}-{v.label}" for f, v in CASES])
def test_variant_float16(hopper, fam, variant):
    torch = _torch()
    _check(fam, torch, variant, "float16", 128, True, label=f"{fam.name} {variant.label} fp16")


LLAMA = variants.Variant(rope="half")
GEMMA2 = variants.Variant(rope="half", rope_source="table", window=True, softcap=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8, 1, 1, 300), (1, 8, 8, 17, 17), (2, 32, 4, 129, 128), (1, 4, 4, 300, 40),
                                   (3, 6, 3, 1000, 1000)], ids=str)
@pytest.mark.parametrize("variant", [LLAMA, GEMMA2, variants.Variant(alibi="slopes", window=True)],
                         ids=lambda v: v.label)
def test_odd_shapes_and_gqa(hopper, variant, shape):
    torch = _torch()
    b, hq, hkv, nq, nkv = shape
    if variant.rope is not None and nq > nkv:
        pytest.skip("rope_offset 5 < Nq - Nkv: query positions would be negative (refused by the front door)")
    for fam in _fams(variant):
        _check(fam, torch, variant, "bfloat16", 128, True, b=b, hq=hq, hkv=hkv, nq=nq, nkv=nkv,
               label=f"{fam.name} {variant.label} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 64, 127, 128, 129, 5000])
def test_window_lengths(hopper, window):
    torch = _torch()
    for fam in _fams(variants.Variant(window=True)):
        for causal in (False, True):
            gen = torch.Generator().manual_seed(_seed())
            q, k, v = (torch.randn((1, 4, 700, 64), generator=gen).bfloat16().cuda() for _ in range(3))
            o, lse = flash_forward(q, k, v, causal=causal, kernel=fam.name, window=window)
            o_ref, lse_ref = ref.attention(*(x.double().cpu().numpy() for x in (q, k, v)), causal=causal,
                                           window=window, return_lse=True)
            ref.assert_allclose(o.double().cpu().numpy(), o_ref, atol=ATOL, rtol=RTOL, msg=f"W={window}")


@pytest.mark.gpu
def test_rope_variant_is_bitwise_repeatable(hopper):
    """A race between the rope warps and the tensor cores shows up as run-to-run differences."""
    torch = _torch()
    q, k, v = (torch.randn((2, 8, 3001, 128)).bfloat16().cuda() for _ in range(3))
    runs = [flash_forward(q, k, v, causal=True, kernel="wgmma", rope="half") for _ in range(3)]
    torch.cuda.synchronize()
    for o, lse in runs[1:]:
        assert torch.equal(o, runs[0][0]) and torch.equal(lse, runs[0][1])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("source", ["computed", "table"])
@pytest.mark.parametrize("in_place", [False, True])
def test_standalone_rope(hopper, d, style, source, in_place):
    torch = _torch()
    from attnproto.ops import rope as _rope

    x = torch.randn((2, 3, 517, d)).bfloat16().cuda()
    host = x.double().cpu().numpy()
    table = variants.rope_tables(517 + 11, d) if source == "table" else None
    got = _rope.rope(x, style=style, offset=11, table=table, out=x if in_place else None)
    torch.cuda.synchronize()
    assert (got.data_ptr() == x.data_ptr()) == in_place
    want = ref.rope(host, positions=np.arange(517) + 11, style=style)
    # one rounding of the rotated value to bfloat16, plus float32 angles
    ref.assert_allclose(got.double().cpu().numpy(), want, atol=2e-2, rtol=1e-2, msg=f"rope {style} {source}")


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 8])
def test_repeat_kv(hopper, group):
    torch = _torch()
    from attnproto.ops import rope as _rope

    x = torch.randn((2, 4, 333, 128)).bfloat16().cuda()
    assert torch.equal(_rope.repeat_kv(x, group), x.repeat_interleave(group, 1))
