"""Prototype 2 on the GPU: every dispatch mode of stitch_attn (inline, noinline, function
table, nvJitLink-linked LTO-IR) gives O and LSE bit-identical to mode 0, and mode 0 matches
a float64 reference; bad inputs raise clear errors."""
from __future__ import annotations

import math

import pytest

from attnproto.ops import stitch

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# (head_dim, block_c) inside 48 KiB of static shared memory with 4 warps.
TILES = ((64, 64), (128, 64), (256, 32))
# (batch, heads, kv heads, seq_q, seq_kv): odd lengths leave a partial tile and partial CTA.
SHAPES = ((1, 2, 2, 77, 133), (2, 4, 2, 130, 64))
# O is float32 from 16-bit inputs with fp32 accumulation and MUFU exp2 (~2 ulp).
ATOL, RTOL = 2e-3, 1e-2


def _inputs(shape, head_dim, dtype, seed):
    b, h, hkv, nq, nkv = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = TORCH_DTYPES[dtype]
    q = torch.randn(b, h, nq, head_dim, device="cuda", dtype=dt, generator=g)
    k = torch.randn(b, hkv, nkv, head_dim, device="cuda", dtype=dt, generator=g)
    v = torch.randn(b, hkv, nkv, head_dim, device="cuda", dtype=dt, generator=g)
    return q, k, v


def _reference(q, k, v):
    group = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    s = (q.double() @ kd.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ vd, torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("dtype", tuple(TORCH_DTYPES))
@pytest.mark.parametrize("head_dim,block_c", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_all_modes_bit_identical_to_mode0(cuda, dtype, head_dim, block_c, shape):
    q, k, v = _inputs(shape, head_dim, dtype, seed=head_dim + shape[3])
    o0, lse0 = (x.clone() for x in stitch.prepare(q, k, v, 0, block_c=block_c, backend=cuda).launch())
    torch.cuda.synchronize()
    exact_o, exact_lse = _reference(q, k, v)
    assert torch.allclose(o0.double(), exact_o, atol=ATOL, rtol=RTOL), float((o0.double() - exact_o).abs().max())
    assert torch.allclose(lse0.double(), exact_lse, atol=ATOL, rtol=RTOL)
    for mode in stitch.MODES[1:]:
        launch = stitch.prepare(q, k, v, mode, block_c=block_c, backend=cuda)
        launch.out.fill_(float("nan"))
        o, lse = launch.launch()
        torch.cuda.synchronize()
        assert torch.equal(o, o0), f"mode {mode}: {int((o != o0).sum())} O elements differ from mode 0"
        assert torch.equal(lse, lse0), f"mode {mode}: LSE differs from mode 0"


def test_linked_kernel_loads_from_cubin(cuda):
    from attnproto.backend import native

    cfg = stitch.StitchConfig(128, 64, 4, "bfloat16", stitch.LINKED_MODE)
    built = stitch.link_linked_mode(cfg, cuda.info["arch"])
    kern = native().cuda_kernel_from_cubin(stitch.KERNEL_NAME, cfg.constants(), built.cubin)
    assert kern.origin == "compiled" and kern.load_ms > 0
    assert kern.resources["registers"] > 0
    with pytest.raises(RuntimeError, match="no extern"):
        native().cuda_kernel_from_cubin("not_an_entry", cfg.constants(), built.cubin)
    with pytest.raises(ValueError, match="empty cubin"):
        native().cuda_kernel_from_cubin(stitch.KERNEL_NAME, cfg.constants(), b"")


def test_bad_inputs_raise(cuda):
    q, k, v = _inputs((1, 2, 2, 16, 16), 128, "bfloat16", seed=1)
    with pytest.raises(ValueError, match="mode"):
        stitch.prepare(q, k, v, 5, backend=cuda)
    with pytest.raises(TypeError):
        stitch.prepare(q.float(), k.float(), v.float(), 0, backend=cuda)
    with pytest.raises(ValueError, match="head_dim"):
        stitch.prepare(q[..., :96].contiguous(), k[..., :96].contiguous(), v[..., :96].contiguous(), 0, backend=cuda)
    with pytest.raises(ValueError):
        stitch.prepare(q, k[:, :, :, :64], v, 0, backend=cuda)
    with pytest.raises(ValueError, match="scale"):
        stitch.prepare(q, k, v, 0, scale=-1.0, backend=cuda)
