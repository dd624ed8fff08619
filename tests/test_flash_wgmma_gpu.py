"""The Hopper wgmma + TMA flash-attention forward (flash_fwd_wgmma) against the
float64 reference: fresh random inputs per test, NaN-poisoned outputs, every
head dim and dtype, causal and not, tails of any length, GQA, Nq != Nkv,
strided views, the non-default tiles, and the host's argument checks.

GPU tests need an sm_90 device (skipped elsewhere); the host-side config and
shared-memory checks and the NVRTC compile checks run on any machine.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnproto import ref
from attnproto.ops import flash_wgmma as fw
from sdpa_baseline import MANTISSA_BITS, SDPA_FACTOR, sdpa as _sdpa

ATOL, RTOL = 5e-3, 1e-2
DTYPES = ("float16", "bfloat16")
SEQ_LENS = (1, 17, 777, 4097)
HOPPER_MAJOR = 9


# ------------------------------------------------------------------ host only
def test_every_specialisation_fits_shared_memory():
    from attnproto.ops import families

    specs = families.get("wgmma").specialisations()
    assert specs and all(name == fw.KERNEL_NAME for name, _ in specs)
    for _, c in specs:
        cfg = fw.WgmmaConfig(block_c=c["BLOCK_C"], stages=c["STAGES"], consumer_wg=c["CONSUMER_WG"])
        assert c["BLOCK_R"] == cfg.block_r
        assert fw.shared_bytes(cfg, c["HEAD_DIM"]) <= fw.HOPPER_SMEM_OPTIN, c


@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_default_config_is_valid(head_dim, causal):
    cfg = fw.default_config(head_dim, causal)
    fw._check_config(cfg, head_dim)
    assert cfg.threads == (cfg.consumer_wg + 1) * fw.WARPGROUP_THREADS


@pytest.mark.parametrize("config, exc, match", [
    (fw.WgmmaConfig(block_c=72), ValueError, "block_c"),
    (fw.WgmmaConfig(block_c=208), ValueError, "block_c"),
    (fw.WgmmaConfig(stages=1), ValueError, "stages"),
    (fw.WgmmaConfig(consumer_wg=3), ValueError, "consumer_wg"),
    (fw.WgmmaConfig(block_c=128, stages=2), ValueError, "shared memory"),   # at head_dim 256
    (fw.WgmmaConfig(block_c=128.0), TypeError, "block_c"),
    ({"block_c": 64, "stagez": 2}, ValueError, "stagez"),
    ({"block_r": 64, "consumer_wg": 2}, ValueError, "block_r"),
    ("big", TypeError, "config"),
])
def test_bad_config_rejected(config, exc, match):
    with pytest.raises(exc, match=match):
        fw.as_config(config, 256, False)


def test_default_config_rejects_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        fw.default_config(96, False)


@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
def test_compiles_with_nvrtc(nvrtc, head_dim):
    for causal in (False, True):
        consts = fw.constants(fw.default_config(head_dim, causal), head_dim, causal, "bfloat16")
        nvrtc.cuda_compile(fw.KERNEL_NAME, consts, "sm_90a")


def test_illegal_tile_fails_to_compile_with_message(nvrtc):
    consts = fw.constants(fw.WgmmaConfig(block_c=128, stages=2), 256, False, "float16")
    with pytest.raises(Exception, match="227 KiB"):
        nvrtc.cuda_compile(fw.KERNEL_NAME, consts, "sm_90a")


# ------------------------------------------------------------------ GPU
@pytest.fixture
def hopper(cuda):
    if cuda.info["compute_major"] != HOPPER_MAJOR:
        pytest.skip(f"needs an sm_90 GPU, got {cuda.info['arch']}")
    return cuda


def _torch():
    return pytest.importorskip("torch")


def _inputs(torch, dtype, b, hq, hkv, nq, nkv, d, gen):
    tdt = getattr(torch, dtype)
    q = torch.randn((b, hq, nq, d), generator=gen, dtype=torch.float32).to(tdt).cuda()
    k = torch.randn((b, hkv, nkv, d), generator=gen, dtype=torch.float32).to(tdt).cuda()
    v = torch.randn((b, hkv, nkv, d), generator=gen, dtype=torch.float32).to(tdt).cuda()
    return q, k, v


def _poisoned(torch, shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _check(torch, q, k, v, causal, config=None, scale=None, label=""):
    b, hq, nq, d = q.shape
    out = _poisoned(torch, (b, hq, nq, d), q.dtype)
    lse = _poisoned(torch, (b, hq, nq), torch.float32)
    o_got, lse_got = fw.flash_forward_wgmma(q, k, v, causal=causal, scale=scale, config=config, out=out, lse=lse)
    torch.cuda.synchronize()
    assert o_got.data_ptr() == out.data_ptr() and lse_got.data_ptr() == lse.data_ptr()
    host = [x.float().cpu().numpy().astype(np.float64) for x in (q, k, v)]
    o_ref, lse_ref = ref.attention(*host, causal=causal, scale=scale, return_lse=True)
    o_np = out.float().cpu().numpy()
    lse_np = lse.cpu().numpy()
    assert not np.isnan(o_np).any(), f"{label}: unwritten (NaN) O elements"
    assert not np.isnan(lse_np).any(), f"{label}: unwritten (NaN) LSE elements"
    ref.assert_allclose(o_np, o_ref, atol=ATOL, rtol=RTOL, msg=f"{label} O")
    ref.assert_allclose(lse_np, lse_ref, atol=ATOL, rtol=RTOL, msg=f"{label} LSE")
    # The error is no larger than 2x torch SDPA's at the same precision against the same FP64
    # reference (the mma.sync kernel's tests use the same rule and helpers).
    seen = np.isfinite(lse_ref)
    if seen.any():
        eff_scale = 1.0 / math.sqrt(d) if scale is None else scale
        sdpa = _sdpa(q, k, v, causal, eff_scale).double().cpu().numpy()
        sdpa_err = np.abs(sdpa - o_ref)[seen].max()
        ours = np.abs(o_np.astype(np.float64) - o_ref)[seen].max()
        floor = 2.0 ** -MANTISSA_BITS[str(q.dtype).replace("torch.", "")] * np.abs(o_ref[seen]).max()
        assert ours <= max(SDPA_FACTOR * sdpa_err, floor), (
            f"{label}: max error {ours:.3e} > {SDPA_FACTOR} x SDPA's {sdpa_err:.3e}")
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", SEQ_LENS)
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(hopper, dtype, head_dim, n, causal):
    torch = _torch()
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    q, k, v = _inputs(torch, dtype, 2, 3, 3, n, n, head_dim, gen)
    _check(torch, q, k, v, causal, label=f"{dtype} D={head_dim} N={n} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq, nkv", [(777, 4097), (4097, 777), (1, 300), (300, 1), (129, 128)])
@pytest.mark.parametrize("heads", [(6, 2)])
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_and_unequal_lengths(hopper, dtype, head_dim, heads, nq, nkv, causal):
    torch = _torch()
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    hq, hkv = heads
    q, k, v = _inputs(torch, dtype, 2, hq, hkv, nq, nkv, head_dim, gen)
    out, lse = _check(torch, q, k, v, causal, label=f"{dtype} D={head_dim} H={heads} {nq}x{nkv} causal={causal}")
    if causal and nq > nkv:  # the first nq - nkv rows see no key: O = 0, LSE = -inf
        blind = nq - nkv
        assert torch.all(out[:, :, :blind] == 0) and torch.all(torch.isneginf(lse[:, :, :blind]))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_packed_qkv(hopper, dtype, head_dim, causal):
    torch = _torch()
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    b, n, h = 2, 555, 2
    packed = torch.randn((b, n, 3, h, head_dim), generator=gen).to(getattr(torch, dtype)).cuda()
    q, k, v = (packed[:, :, i].permute(0, 2, 1, 3) for i in range(3))  # token stride 3*h*D
    assert not q.is_contiguous()
    _check(torch, q, k, v, causal, scale=0.3, label=f"packed {dtype} D={head_dim}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
# Every fifth tile of each head dim's sweep space, both warpgroup counts among them.
@pytest.mark.parametrize("head_dim, config", [(d, c) for d in fw.HEAD_DIMS for c in fw.sweep_space(d)[::5]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_default_tiles(hopper, dtype, head_dim, config, causal):
    torch = _torch()
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    q, k, v = _inputs(torch, dtype, 2, 2, 1, 777, 1001, head_dim, gen)
    _check(torch, q, k, v, causal, config=config, label=f"{config} {dtype} D={head_dim}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
def test_bitwise_repeatable_and_no_local_memory(hopper, head_dim):
    """A race in the TMA/mbarrier ring shows up as run-to-run differences."""
    torch = _torch()
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    q, k, v = _inputs(torch, "bfloat16", 2, 4, 2, 3001, 3001, head_dim, gen)
    runs = [fw.flash_forward_wgmma(q, k, v, causal=True) for _ in range(3)]
    torch.cuda.synchronize()
    for o, lse in runs[1:]:
        assert torch.equal(o, runs[0][0]) and torch.equal(lse, runs[0][1])
    cfg = fw.default_config(head_dim, True)
    kern = hopper.kernel(fw.KERNEL_NAME, **fw.constants(cfg, head_dim, True, "bfloat16"))
    assert kern.resources["local_bytes"] == 0


@pytest.mark.gpu
def test_bad_arguments_raise(hopper):
    torch = _torch()
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    q, k, v = _inputs(torch, "float16", 1, 2, 2, 64, 64, 64, gen)
    with pytest.raises(TypeError, match="q"):
        fw.flash_forward_wgmma(q.float(), k.float(), v.float())
    with pytest.raises(TypeError, match="k"):
        fw.flash_forward_wgmma(q, k.bfloat16(), v.bfloat16())
    with pytest.raises(ValueError, match="head_dim"):
        fw.flash_forward_wgmma(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous())
    with pytest.raises(ValueError, match="k"):
        fw.flash_forward_wgmma(q, k[:, :1].expand(1, 2, 64, 64), v)  # head stride 0
    with pytest.raises(ValueError, match="v"):
        fw.flash_forward_wgmma(q, k, v[:, :, :63])
    with pytest.raises(ValueError, match="scale"):
        fw.flash_forward_wgmma(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="q"):
        fw.flash_forward_wgmma(q.cpu(), k.cpu(), v.cpu())
    wide = torch.zeros((1, 2, 64, 68), dtype=torch.float16, device="cuda")[..., :64]  # token stride 68: 136 B
    with pytest.raises(ValueError, match="16-byte"):
        fw.flash_forward_wgmma(wide, k, v)
    with pytest.raises(ValueError, match="out"):
        fw.flash_forward_wgmma(q, k, v, out=torch.empty((1, 2, 64, 65), dtype=torch.float16, device="cuda"))
    with pytest.raises(TypeError, match="lse"):
        fw.flash_forward_wgmma(q, k, v, lse=torch.empty((1, 2, 64), dtype=torch.float16, device="cuda"))
    assert math.isfinite(float(fw.flash_forward_wgmma(q, k, v)[1].max()))
