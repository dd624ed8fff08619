"""The Prototype 7 variants in the mma.sync family (flash_fwd_mma, include/fa_mma.cuh).

CPU side (NVRTC, no GPU): the variant constants reach the kernel key, the family takes every
feature at every head dim, every shared variant specialisation compiles, illegal combinations
fail to compile with their static_assert's message, and the Prototype 2 stitch entries refuse
any variant but the base one.

GPU side (skipped without a CUDA device): every variant alone and the model combinations (Llama,
Gemma 2, everything at once) against the float64 reference attnproto.ref.attention, with fresh
random inputs (seed printed on failure), outputs poisoned with NaN, odd sizes with Nq != Nkv,
GQA groups 1/2/4 and both dtypes; O within atol/rtol of the reference and its max error at most
SDPA_FACTOR x torch's own error on the same inputs (RoPE applied in torch as Hugging Face does,
SDPA with the bias and masks materialised, or Gemma 2's eager attention for the soft cap).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

from attnproto import ref
from attnproto.ops import configs as C
from attnproto.ops import families, stitch
from attnproto.ops import variants as V
from attnproto.ops.families import mma
from attnproto.ops.problem import DeviceSpec, ProblemSpec
from sdpa_baseline import MANTISSA_BITS, SDPA_FACTOR

torch = pytest.importorskip("torch")

ARCH = "sm_90a"
FAMILY = families.get("mma")


# ================================================================== CPU: constants, support
def test_constants_carry_the_variant():
    cfg = C.FlashConfig(128, 128, 64, 4, 1, True, "bfloat16")
    assert {k: cfg.constants()[k] for k in V.BASE.constants()} == V.BASE.constants()
    for variant in V.VARIANT_SPECIALISATIONS:
        spec = ProblemSpec(1, 4, 2, 300, 300, 128, "bfloat16", True, variant)
        consts = FAMILY.constants(cfg, spec)
        assert consts == cfg.constants(variant)
        assert {k: consts[k] for k in variant.constants()} == variant.constants(), variant.label


@pytest.mark.parametrize("variant", V.VARIANT_SPECIALISATIONS, ids=lambda v: v.label)
def test_the_family_takes_every_variant_at_every_head_dim(variant):
    device = DeviceSpec.for_arch("sm_90")
    for head_dim in range(C.MMA_K, C.MAX_HEAD_DIM + 1, C.MMA_K):
        ok, why = FAMILY.supports_spec(ProblemSpec(1, 4, 2, 33, 77, head_dim, "float16", True, variant), device)
        assert ok, (head_dim, why)


def test_a_family_without_the_feature_refuses_naming_the_argument():
    class NoWindow(mma.MmaFamily):
        variant_features = frozenset(f for f in V.FEATURES if f != "window")

    spec = ProblemSpec(1, 4, 2, 33, 77, 64, "float16", True, V.Variant(window=True))
    ok, why = NoWindow().supports_spec(spec, DeviceSpec.for_arch("sm_90"))
    assert not ok and why.startswith("window: variant 'window' is not supported by mma")


def test_specialisations_include_every_shared_variant():
    listed = {tuple(sorted(c.items())) for _, c in FAMILY.specialisations()}
    for d in mma.VARIANT_HEAD_DIMS:
        cfg = C.default_entry(d, mma.VARIANT_SEQ_LEN, True, "bfloat16")[1]
        for variant in V.VARIANT_SPECIALISATIONS:
            assert tuple(sorted(cfg.constants(variant).items())) in listed, (d, variant.label)


def test_buffer_args_are_the_last_three_kernel_arguments():
    assert [int(x) for x in V.buffer_args(None)] == [0, 0, 0]
    cos, sin, slopes = object(), object(), object()
    args = V.buffer_args(V.VariantValues(rope_cos=cos, rope_sin=sin, alibi_slopes=slopes))
    assert args[0] is cos and args[1] is sin and args[2] is slopes
    assert [int(x) for x in V.buffer_args(V.VariantValues(window=8))] == [0, 0, 0]


# ================================================================== CPU: NVRTC
@pytest.mark.parametrize("variant", V.VARIANT_SPECIALISATIONS, ids=lambda v: v.label)
def test_every_variant_specialisation_compiles(nvrtc, variant):
    """Each shared variant at the family's variant head dims (swizzled and padded rows)."""
    for d in mma.VARIANT_HEAD_DIMS:
        consts = C.default_entry(d, mma.VARIANT_SEQ_LEN, True, "bfloat16")[1].constants(variant)
        cubin = nvrtc.cuda_compile(C.KERNEL_NAME, consts, ARCH)[0]
        assert C.KERNEL_NAME.encode() in cubin


def _tile_constants():
    return C.FlashConfig(64, 64, 64, 4, 2, True, "float16").constants()


@pytest.mark.parametrize("consts, message", [
    ({"ROPE": 3}, r"ROPE must be 0 \(none\), 1 \(rotate-half\) or 2 \(interleaved\)"),
    ({"ROPE_TABLE": 1}, "ROPE_TABLE=1 without ROPE"),
    ({"ROPE": 1, "ROPE_TABLE": 2}, r"ROPE_TABLE must be 0 \(computed\) or 1 \(table\)"),
    ({"ALIBI": 3}, r"ALIBI must be 0 \(none\), 1 \(standard slopes\) or 2 \(slopes buffer\)"),
    ({"WINDOW": 2}, "WINDOW must be 0 or 1"),
    ({"SOFTCAP": -1}, "SOFTCAP must be 0 or 1"),
])
def test_illegal_variant_constants_fail_with_the_static_assert(nvrtc, consts, message):
    with pytest.raises(RuntimeError, match=message):
        nvrtc.cuda_compile(C.KERNEL_NAME, {**_tile_constants(), **consts}, ARCH)


@pytest.mark.parametrize("name", ["ROPE", "ROPE_TABLE", "ALIBI", "WINDOW", "SOFTCAP"])
def test_every_variant_constant_is_required(nvrtc, name):
    consts = {k: v for k, v in _tile_constants().items() if k != name}
    with pytest.raises(RuntimeError, match=f"{name} must be defined"):
        nvrtc.cuda_compile(C.KERNEL_NAME, consts, ARCH)


@pytest.mark.parametrize("consts", [{"ROPE": 1}, {"ALIBI": 1}, {"WINDOW": 1}, {"SOFTCAP": 1}])
def test_the_stitch_entries_take_the_base_variant_only(nvrtc, consts):
    tile = C.FlashConfig(64, 64, 64, 4, 2, True, "float16")
    for mode in (0, 1):
        with pytest.raises(RuntimeError, match="flash_fwd_mma_stitch takes the base variant only"):
            nvrtc.cuda_compile(stitch.KERNEL_NAME, {**stitch.StitchConfig(tile, mode).constants(), **consts}, ARCH)


# ================================================================== GPU
@pytest.fixture
def gpu(cuda):
    """The CUDA backend, with torch seeing the device too."""
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return cuda


DTYPES = ("float16", "bfloat16")
ATOL, RTOL = 5e-3, 1e-2                # as tests/test_flash_gpu.py
LSE_ATOL, LSE_RTOL = 2e-3, 1e-3
# Inputs are N(0, 1): scores scale * q.k are about N(0, 1), so a cap of 1.5 bends them (Gemma 2's
# 50 would leave random scores untouched).
SOFTCAP = 1.5
WINDOW = 37                             # odd, below one key tile
THETA = 10000.0
# ALiBi slopes of the "slopes" variant: uniform in [SLOPE_MIN, SLOPE_MIN + SLOPE_SPAN).
SLOPE_MIN, SLOPE_SPAN = 0.01, 0.5
# Table RoPE: rows beyond the positions the call reads (the table may be longer).
TABLE_EXTRA_ROWS = 19


@dataclass(frozen=True)
class Case:
    label: str
    rope: Optional[str] = None          # "half" | "interleaved"
    table: bool = False                 # cos/sin from variants.rope_tables
    alibi: Optional[str] = None         # "standard" | "slopes"
    window: Optional[int] = None
    softcap: Optional[float] = None


SINGLES = (
    Case("rope-half", rope="half"), Case("rope-interleaved", rope="interleaved"),
    Case("rope-half-table", rope="half", table=True), Case("rope-interleaved-table", rope="interleaved", table=True),
    Case("alibi", alibi="standard"), Case("alibi-slopes", alibi="slopes"),
    Case("window", window=WINDOW), Case("softcap", softcap=SOFTCAP),
)
COMBINATIONS = (
    Case("llama", rope="half"),
    Case("gemma2", rope="half", window=WINDOW, softcap=SOFTCAP),
    Case("all-table-slopes", rope="half", table=True, alibi="slopes", window=WINDOW, softcap=SOFTCAP),
    Case("all-interleaved", rope="interleaved", alibi="standard", window=WINDOW, softcap=SOFTCAP),
)
# (Nq, Nkv): neither a tile multiple, Nq < Nkv, Nq > Nkv (causal rows without keys), one query.
SHAPES = ((130, 301), (301, 130), (1, 257))


def _inputs(batch, hq, hkv, nq, nkv, d, dtype):
    seed = int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(getattr(torch, dtype))

    slopes = SLOPE_MIN + SLOPE_SPAN * torch.rand(hq, generator=gen, device="cuda", dtype=torch.float32)
    return randn(batch, hq, nq, d), randn(batch, hkv, nkv, d), randn(batch, hkv, nkv, d), slopes, seed


def _torch_rope(x, positions, style):
    """RoPE as Hugging Face applies it: float32 inv_freq and angles, cos/sin cast to x's dtype,
    the rotation in x's dtype."""
    d = x.shape[-1]
    inv_freq = 1.0 / (THETA ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angle = positions.float()[:, None] * inv_freq[None, :]
    if style == "half":
        angle = torch.cat([angle, angle], dim=-1)
        rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    else:
        angle = angle.repeat_interleave(2, dim=-1)
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * angle.cos().to(x.dtype) + rotated * angle.sin().to(x.dtype)


def _torch_attention(case, q, k, v, slopes, *, causal, scale, rope_offset):
    """torch's own answer at the input precision (see the module doc)."""
    nq, nkv = q.shape[2], k.shape[2]
    if case.rope:
        q = _torch_rope(q, torch.arange(nq, device="cuda") + rope_offset + nkv - nq, case.rope)
        k = _torch_rope(k, torch.arange(nkv, device="cuda") + rope_offset, case.rope)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    pos_q = torch.arange(nq, device="cuda")[:, None] + nkv - nq
    key = torch.arange(nkv, device="cuda")[None, :]
    visible = torch.ones(nq, nkv, dtype=torch.bool, device="cuda")
    if causal:
        visible &= key <= pos_q
    if case.window:
        visible &= key > pos_q - case.window
    bias = torch.zeros(q.shape[1], nq, nkv, device="cuda")
    if case.alibi:
        head_slopes = (slopes if case.alibi == "slopes"
                       else torch.from_numpy(ref.alibi_slopes(q.shape[1])).float().cuda())
        bias = bias - head_slopes[:, None, None] * (pos_q - key).abs().float()
    bias = bias.masked_fill(~visible, -math.inf)
    if not case.softcap:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale          # Gemma 2's eager attention
    scores = torch.tanh(scores / case.softcap) * case.softcap + bias.to(q.dtype)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _lse_rounding_slack(q64, k64, scale, bits, group):
    """Rotated Q and K are rounded once to `bits` mantissa bits in shared memory: each score moves
    by at most scale * sum_i |q_i k_i| (2u + u^2), u = 2^-bits, and the LSE (a softmax-weighted
    mean of the scores, soft cap and ALiBi shrinking no difference) by at most the row's worst."""
    u = 2.0 ** -bits
    mag = np.abs(q64) @ np.swapaxes(np.repeat(np.abs(k64), group, axis=1), -1, -2)
    return scale * (2 * u + u * u) * mag.max(axis=-1)


def _run_and_check(cuda, case, *, dtype, head_dim, causal, hq, hkv, nq, nkv, batch=1, rope_offset=0):
    from attnproto.ops import flash as F  # noqa: PLC0415

    if case.rope and nq > nkv:
        rope_offset = max(rope_offset, nq - nkv)          # query 0 must sit at a position >= 0
    q, k, v, slopes, seed = _inputs(batch, hq, hkv, nq, nkv, head_dim, dtype)
    kwargs = {}
    if case.rope:
        kwargs.update(rope=case.rope, rope_offset=rope_offset, rope_theta=THETA)
        if case.table:
            kwargs["rope_table"] = V.rope_tables(rope_offset + nkv + TABLE_EXTRA_ROWS, head_dim, THETA)
    if case.alibi:
        kwargs["alibi"] = slopes if case.alibi == "slopes" else True
    if case.window:
        kwargs["window"] = case.window
    if case.softcap:
        kwargs["softcap"] = case.softcap
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device="cuda")
    o_ret, lse_ret = F.flash_forward(q, k, v, kernel="mma", causal=causal, out=out, lse=lse, backend=cuda, **kwargs)
    assert o_ret is out and lse_ret is lse
    where = (f"seed={seed} case={case.label} q={tuple(q.shape)} k={tuple(k.shape)} causal={causal} "
             f"dtype={dtype} rope_offset={rope_offset}")
    o, lse_c = out.double().cpu(), lse.double().cpu()
    assert not torch.isnan(o).any(), f"O not fully written ({where})"
    assert not torch.isnan(lse_c).any(), f"LSE not fully written ({where})"

    scale = 1.0 / math.sqrt(head_dim)
    ro, rl = ref.attention(q, k, v, scale=scale, causal=causal, return_lse=True, rope=case.rope or False,
                           rope_theta=THETA, rope_offset=rope_offset, alibi=case.alibi is not None,
                           alibi_slopes=slopes.cpu().numpy() if case.alibi == "slopes" else None,
                           window=case.window, softcap=case.softcap)
    ro, rl = torch.from_numpy(ro), torch.from_numpy(rl)
    seen = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse_c), seen), f"LSE -inf pattern differs ({where})"
    assert torch.all(o[~seen] == 0), f"O of rows without keys is not 0 ({where})"

    err = (o - ro).abs()
    # Tolerance against the exact attention of what the tensor cores multiply: with RoPE the rotated
    # Q and K rounded to the input dtype (as torch's rotated tensors are); the 2x-torch check below
    # uses the unrounded FP64 reference.
    ro_tol = ro
    if case.rope:
        def rounded(x, pos):
            rot = ref.rope(x.double().cpu().numpy(), THETA, pos, case.rope)
            return torch.from_numpy(rot).to(x.dtype).double().numpy()
        ro_tol = torch.from_numpy(ref.attention(
            rounded(q, np.arange(nq) + rope_offset + nkv - nq), rounded(k, np.arange(nkv) + rope_offset),
            v.double().cpu().numpy(), scale=scale, causal=causal, alibi=case.alibi is not None,
            alibi_slopes=slopes.cpu().numpy() if case.alibi == "slopes" else None, window=case.window,
            softcap=case.softcap))
    bound = ATOL + RTOL * ro_tol.abs()
    assert torch.all((o - ro_tol).abs() <= bound), f"O off by {(o - ro_tol).abs().max().item():.3e} ({where})"
    if not seen.any():
        return
    slack = 0.0
    if case.rope:
        q64 = ref.rope(q.double().cpu().numpy(), THETA, np.arange(nq) + rope_offset + nkv - nq, case.rope)
        k64 = ref.rope(k.double().cpu().numpy(), THETA, np.arange(nkv) + rope_offset, case.rope)
        slack = torch.from_numpy(_lse_rounding_slack(q64, k64, scale, MANTISSA_BITS[dtype], hq // hkv))[seen]
    lse_err = (lse_c[seen] - rl[seen]).abs()
    assert torch.all(lse_err <= LSE_ATOL + LSE_RTOL * rl[seen].abs() + slack), (
        f"LSE off by {lse_err.max().item():.3e} ({where})")
    theirs = _torch_attention(case, q, k, v, slopes, causal=causal, scale=scale, rope_offset=rope_offset)
    torch_err = (theirs.double().cpu() - ro).abs()[seen].max().item()
    ours = err[seen].max().item()
    floor = 2.0 ** -MANTISSA_BITS[dtype] * ro[seen].abs().max().item()
    assert ours <= max(SDPA_FACTOR * torch_err, floor), (
        f"max error {ours:.3e} > {SDPA_FACTOR} x torch's {torch_err:.3e} ({where})")


HEAD_DIMS = (64, 80, 128, 256)        # swizzled rows, padded rows (80), 4 and 8 warps (256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", SINGLES, ids=lambda c: c.label)
def test_each_variant_matches_the_reference(gpu, case, head_dim, dtype):
    causal = HEAD_DIMS.index(head_dim) % 2 == 1          # each variant both masked and not
    _run_and_check(gpu, case, dtype=dtype, head_dim=head_dim, causal=causal, hq=4, hkv=2, nq=130, nkv=301)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv", [4, 2, 1])              # GQA groups 1, 2, 4 of 4 query heads
@pytest.mark.parametrize("case", COMBINATIONS, ids=lambda c: c.label)
def test_combinations_match_the_reference(gpu, case, hkv, dtype, causal):
    for nq, nkv in SHAPES:
        _run_and_check(gpu, case, dtype=dtype, head_dim=128, causal=causal, hq=4, hkv=hkv, nq=nq, nkv=nkv, batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_everything_at_once_at_other_head_dims(gpu, head_dim):
    for nq, nkv in SHAPES:
        _run_and_check(gpu, COMBINATIONS[2], dtype="bfloat16", head_dim=head_dim, causal=True, hq=4, hkv=1,
                       nq=nq, nkv=nkv)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 64, 65, 1000])   # one key, one tile, one tile + 1, all keys
@pytest.mark.parametrize("causal", [False, True])
def test_window_lengths(gpu, window, causal):
    _run_and_check(gpu, Case(f"window{window}", window=window), dtype="float16", head_dim=64, causal=causal,
                   hq=2, hkv=2, nq=300, nkv=700)


@pytest.mark.gpu
@pytest.mark.parametrize("case", SINGLES[:4], ids=lambda c: c.label)
def test_rope_offset(gpu, case):
    _run_and_check(gpu, case, dtype="bfloat16", head_dim=128, causal=True, hq=4, hkv=4, nq=77, nkv=200,
                   rope_offset=4093)


# A window of WINDOW_TIMED keys over TIMED_SEQ does about (WINDOW_TIMED + one tile) / (TIMED_SEQ / 2)
# = 1/40 of the causal work; the kernel must get at least MIN_WINDOW_SPEEDUP of that (fixed costs,
# the epilogue and the diagonal tiles take the rest).
TIMED_SEQ, WINDOW_TIMED, MIN_WINDOW_SPEEDUP = 16384, 128, 4.0


@pytest.mark.gpu
def test_the_window_skips_key_tiles(gpu):
    from attnproto.ops import flash as F  # noqa: PLC0415

    q, k, v, _, _ = _inputs(1, 8, 8, TIMED_SEQ, TIMED_SEQ, 128, "bfloat16")
    full = F.time_flash_forward(q, k, v, kernel="mma", causal=True, backend=gpu, warmup=2, iters=10)
    windowed = F.time_flash_forward(q, k, v, kernel="mma", causal=True, window=WINDOW_TIMED, backend=gpu,
                                    warmup=2, iters=10)
    assert full.median_ms >= MIN_WINDOW_SPEEDUP * windowed.median_ms, (full.median_ms, windowed.median_ms)
