"""Prototype 2 on the GPU: every dispatch mode of flash_fwd_mma_stitch (inline, noinline,
function table, nvJitLink-linked LTO-IR) gives O and LSE bit-identical to mode 0 and to the
production flash_fwd_mma, mode 0 matches a float64 reference, outputs are fully written
(NaN-poisoned beforehand), and bad inputs raise errors naming the argument."""
from __future__ import annotations

import math

import pytest

from attnproto.ops import configs, flash, stitch

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Head dims: swizzled (64, 128) and padded-row (80) layouts.
HEAD_DIMS = (64, 128, 80)
# (batch, heads, kv heads, seq_q, seq_kv): odd lengths leave partial tiles and CTAs; GQA;
# Nq > Nkv makes causal rows that see no key (O = 0, LSE = -inf).
SHAPES = ((1, 2, 2, 77, 133), (2, 4, 2, 130, 64), (1, 4, 1, 133, 77))
# O rounded to 16 bits from fp32 accumulation with MUFU exp2: a few 16-bit ulps.
ATOL, RTOL = 2e-2, 2e-2
LSE_ATOL = 1e-3


def _inputs(shape, head_dim, dtype, seed):
    b, h, hkv, nq, nkv = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = TORCH_DTYPES[dtype]
    q = torch.randn(b, h, nq, head_dim, device="cuda", dtype=dt, generator=g)
    k = torch.randn(b, hkv, nkv, head_dim, device="cuda", dtype=dt, generator=g)
    v = torch.randn(b, hkv, nkv, head_dim, device="cuda", dtype=dt, generator=g)
    return q, k, v


def _reference(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    s = (q.double() @ kd.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    nq, nkv = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nkv, device=q.device)[None, :]
        s = s.masked_fill(j > i + nkv - nq, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ vd, lse


def _run(launch):
    launch.problem.out.fill_(float("nan"))
    launch.problem.lse.fill_(float("nan"))
    o, lse = launch.launch()
    torch.cuda.synchronize()
    return o.clone(), lse.clone()


@pytest.mark.parametrize("dtype", tuple(TORCH_DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("shape", SHAPES)
def test_all_modes_bit_identical_to_mode0_and_production(cuda, dtype, head_dim, causal, shape):
    q, k, v = _inputs(shape, head_dim, dtype, seed=head_dim + shape[3])
    o0, lse0 = _run(stitch.prepare(q, k, v, 0, causal=causal, backend=cuda))
    prod_o, prod_lse = _run(flash.prepare_forward(q, k, v, causal=causal, kernel="mma", backend=cuda))
    assert torch.equal(o0, prod_o) and torch.equal(lse0, prod_lse), "mode 0 differs from flash_fwd_mma"
    exact_o, exact_lse = _reference(q, k, v, causal)
    assert torch.allclose(o0.double(), exact_o, atol=ATOL, rtol=RTOL), float((o0.double() - exact_o).abs().max())
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse0), finite)
    assert torch.allclose(lse0.double()[finite], exact_lse[finite], atol=LSE_ATOL, rtol=0)
    for mode in stitch.MODES[1:]:
        o, lse = _run(stitch.prepare(q, k, v, mode, causal=causal, backend=cuda))
        assert torch.equal(o, o0), f"mode {mode}: {int((o != o0).sum())} O elements differ from mode 0"
        assert torch.equal(lse, lse0), f"mode {mode}: LSE differs from mode 0"


@pytest.mark.parametrize("mode", stitch.MODES)
def test_explicit_config_and_launch_shape(cuda, mode):
    q, k, v = _inputs((1, 2, 2, 200, 200), 128, "bfloat16", seed=3)
    tile = configs.FlashConfig(128, 64, 64, 4, 2, False, "bfloat16")
    launch = stitch.prepare(q, k, v, mode, config=tile, backend=cuda)
    assert launch.config == stitch.StitchConfig(tile, mode)
    assert launch.grid == (4, 2, 1) and launch.block == (128, 1, 1) and launch.shared_bytes == tile.smem_bytes()
    assert (launch.module is not None) == (mode == stitch.LINKED_MODE)
    o, _ = _run(launch)
    prod_o, _ = _run(flash.prepare_forward(q, k, v, kernel="mma", config=tile, backend=cuda))
    assert torch.equal(o, prod_o)


def test_linked_kernel_loads_from_cubin(cuda):
    from attnproto.backend import native

    cfg = stitch.StitchConfig(configs.choose_config(128, 2048, False, "bfloat16"), stitch.LINKED_MODE)
    built = stitch.link_linked_mode(cfg, cuda.info["arch"])
    kern = native().cuda_kernel_from_cubin(stitch.KERNEL_NAME, cfg.constants(), built.cubin)
    assert kern.resources["registers"] > 0
    with pytest.raises(RuntimeError, match="no extern"):
        native().cuda_kernel_from_cubin("not_an_entry", cfg.constants(), built.cubin)
    with pytest.raises(ValueError, match="empty cubin"):
        native().cuda_kernel_from_cubin(stitch.KERNEL_NAME, cfg.constants(), b"")


def test_bad_inputs_raise(cuda):
    q, k, v = _inputs((1, 2, 2, 16, 16), 128, "bfloat16", seed=1)
    with pytest.raises(ValueError, match="mode"):
        stitch.prepare(q, k, v, 5, backend=cuda)
    with pytest.raises(ValueError, match="mode"):
        stitch.prepare(q, k, v, True, backend=cuda)
    with pytest.raises(TypeError, match="q"):
        stitch.prepare(q.float(), k.float(), v.float(), 0, backend=cuda)
    with pytest.raises(ValueError, match="head_dim"):
        stitch.prepare(q[..., :72].contiguous(), k[..., :72].contiguous(), v[..., :72].contiguous(), 0,
                       backend=cuda)
    with pytest.raises(ValueError, match="k"):
        stitch.prepare(q, k[:, :, :, :64], v, 0, backend=cuda)
    with pytest.raises(ValueError, match="scale"):
        stitch.prepare(q, k, v, 0, scale=-1.0, backend=cuda)
    with pytest.raises(ValueError, match="config"):
        stitch.prepare(q, k, v, 1, config=configs.FlashConfig(64, 64, 64, 4, 1, False, "bfloat16"), backend=cuda)
    with pytest.raises(TypeError, match="config"):
        stitch.prepare(q, k, v, 2, config="d128", backend=cuda)
