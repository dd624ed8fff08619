"""Paged-KV decode and append on CUDA (shaders/cuda/paged_decode*.cu, paged_append.cu) against the
FP64 reference: fresh random inputs, NaN-poisoned outputs and NaN in every unused pool slot,
scattered tables bit-identical to identity tables, mixed context lengths (1, 17, a multiple of
the block size, 100K), every block size, D 64/128/256, both dtypes, GQA groups, speculative
decode (Nq > 1), split and unsplit, decode after append, a CUDA graph, and the input checks.

Our max error may be at most SDPA_FACTOR x torch SDPA's on the same (contiguous) K/V, plus the
output rounding no kernel can beat."""
from __future__ import annotations

import numpy as np
import pytest

from attnproto import ref
from paged_cases import build_pool, hnd, host_table
from sdpa_baseline import MANTISSA_BITS, SDPA_FACTOR, sdpa

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

TDT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _inputs(rng_seed, b, hq, hkv, nq, n, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(rng_seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(TDT[dtype])  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, n, d), mk(b, hkv, n, d)


def _check(o, lse, q, k, v, lens, dtype, scale=None):
    """Compare with FP64 per sequence; bound by 2x SDPA's error on the same inputs."""
    d = q.shape[-1]
    scale = scale or d ** -0.5
    ours_err = ref_err = 0.0
    for i, n in enumerate(lens):
        qi, ki, vi = q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n]
        want, want_lse = ref.attention(qi.double().cpu().numpy(), ki.double().cpu().numpy(),
                                       vi.double().cpu().numpy(), scale=scale, causal=q.shape[2] > 1,
                                       return_lse=True)
        got = o[i:i + 1].double().cpu().numpy()
        assert np.isfinite(got).all(), f"sequence {i}: non-finite output"
        ours_err = max(ours_err, float(np.abs(got - want).max()))
        peer = sdpa(qi, ki, vi, q.shape[2] > 1, scale).double().cpu().numpy()
        ref_err = max(ref_err, float(np.abs(peer - want).max()))
        np.testing.assert_allclose(lse[i].cpu().numpy(), want_lse[0], atol=2e-3, rtol=1e-3)
    floor = 2.0 ** -MANTISSA_BITS[dtype] * float(v.abs().max())
    assert ours_err <= SDPA_FACTOR * ref_err + floor, (ours_err, ref_err)


def _poisoned(q):
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    return o, lse


CASES = [  # (dtype, D, block_size, Hq, Hkv, Nq, partitions)
    ("bfloat16", 128, 16, 32, 8, 1, "auto"),
    ("float16", 128, 16, 32, 8, 1, 3),
    ("bfloat16", 128, 1, 8, 2, 1, "auto"),
    ("bfloat16", 128, 8, 4, 4, 1, 2),
    ("float16", 64, 32, 16, 2, 1, "auto"),
    ("bfloat16", 64, 256, 8, 1, 4, 1),
    ("float16", 256, 64, 8, 8, 1, 4),
    ("bfloat16", 256, 128, 16, 2, 3, "auto"),
    ("bfloat16", 128, 16, 32, 8, 8, 2),
    ("float16", 128, 256, 4, 1, 1, 1),
]


@pytest.mark.parametrize("dtype, d, bs, hq, hkv, nq, parts", CASES)
@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_decode_matches_fp64(dtype, d, bs, hq, hkv, nq, parts, layout):
    from attnproto.ops import paged

    lens = [1 + (nq - 1), 17, 3 * bs, 300]
    q, k, v = _inputs(hash((dtype, d, bs, hq, nq)) % 2**31, len(lens), hq, hkv, nq, max(lens), d, dtype)
    kc, vc, table, lens_t = build_pool(k, v, lens, bs, layout=layout)
    o, lse = _poisoned(q)
    paged.paged_decode(q, kc, vc, table, lens_t, num_partitions=parts, layout=layout, out=o, lse=lse)
    _check(o, lse, q, k, v, lens, dtype)


def test_decode_rank3_query_and_reference_on_pool():
    from attnproto.ops import paged

    lens = [5, 64, 129]
    q, k, v = _inputs(7, 3, 8, 2, 1, 129, 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    o, lse = paged.paged_decode(q[:, :, 0], kc, vc, table, lens_t)
    assert o.shape == (3, 8, 128) and lse.shape == (3, 8)
    want = ref.paged_attention(q.double().cpu().numpy(), hnd(kc, "nhd").double().cpu().numpy(),
                               hnd(vc, "nhd").double().cpu().numpy(), host_table(table), lens_t.cpu().numpy())
    np.testing.assert_allclose(o.double().cpu().numpy(), want[:, :, 0], atol=2e-2)


@pytest.mark.parametrize("bs", [1, 16, 128])
def test_scattered_table_bit_identical_to_identity(bs):
    from attnproto.ops import paged

    lens = [1, 17, 4 * bs, 1000]
    q, k, v = _inputs(11, 4, 32, 8, 1, 1000, 128, "bfloat16")
    outs = []
    for scatter in (False, True):
        kc, vc, table, lens_t = build_pool(k, v, lens, bs, scatter=scatter)
        outs.append(paged.paged_decode(q, kc, vc, table, lens_t, num_partitions=2))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_long_context_100k_mixed_batch():
    from attnproto.ops import paged

    lens = [100_000, 1, 17, 4096]
    q, k, v = _inputs(13, 4, 8, 2, 1, max(lens), 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    o, lse = _poisoned(q)
    paged.paged_decode(q, kc, vc, table, lens_t, out=o, lse=lse)
    _check(o, lse, q, k, v, lens, "bfloat16")


def test_contiguous_policy_matches_paged():
    from attnproto.ops import paged

    lens = [33, 700, 1]
    q, k, v = _inputs(17, 3, 16, 4, 1, 700, 128, "float16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 32)
    a = paged.paged_decode(q, kc, vc, table, lens_t, num_partitions=2)
    b = paged.prepare_contiguous_decode(q, k, v, lens_t, num_partitions=2).launch()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unpacked_group_matches_packed():
    from attnproto.ops import paged

    lens = [64, 513]
    q, k, v = _inputs(19, 2, 32, 4, 1, 513, 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    a = paged.prepare_paged_decode(q, kc, vc, table, lens_t, packed=True).launch()
    b = paged.prepare_paged_decode(q, kc, vc, table, lens_t, packed=False).launch()
    torch.testing.assert_close(a[0], b[0], atol=1e-2, rtol=0)


@pytest.mark.parametrize("bs", [1, 16])
def test_decode_after_append_equals_full_attention(bs):
    from attnproto.ops import paged

    b, hkv, d, n = 2, 4, 128, 77
    q, k, v = _inputs(23, b, 16, hkv, 1, n, d, "bfloat16")
    need = -(-n // bs)  # blocks per sequence, scattered over a NaN-filled pool with 3 spare blocks
    pool_shape = (b * need + 3, bs, hkv, d)
    kc = torch.full(pool_shape, float("nan"), dtype=k.dtype, device="cuda")
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(pool_shape[0], device="cuda")[:b * need].to(torch.int32)
    table = perm.view(b, need).contiguous()
    pos = 0
    for chunk in (50, 1, 26):  # a prefill-sized chunk, one decode token, the rest
        positions = torch.full((b,), pos, dtype=torch.int32, device="cuda")
        paged.append_kv(k[:, :, pos:pos + chunk], v[:, :, pos:pos + chunk], kc, vc, table, positions)
        pos += chunk
    lens_t = torch.full((b,), n, dtype=torch.int32, device="cuda")
    o, lse = _poisoned(q)
    paged.paged_decode(q, kc, vc, table, lens_t, out=o, lse=lse)
    _check(o, lse, q, k, v, [n, n], "bfloat16")


def test_cuda_graph_replay():
    from attnproto.ops import paged

    lens = [300, 1200]
    q, k, v = _inputs(29, 2, 32, 8, 1, 1200, 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    plan = paged.prepare_paged_decode(q, kc, vc, table, lens_t, num_partitions=4)
    stream = torch.cuda.Stream()
    plan.launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        plan.launch()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    replayed = plan.out.clone()
    plan.launch()
    torch.cuda.synchronize()
    assert torch.equal(replayed, plan.out)
    _check(plan.out, plan.lse, q, k, v, lens, "bfloat16")


def test_table_changed_after_check_gives_nan_not_a_fault():
    from attnproto.ops import paged

    lens = [100, 100]
    q, k, v = _inputs(31, 2, 8, 2, 1, 100, 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    plan = paged.prepare_paged_decode(q, kc, vc, table, lens_t, num_partitions=2)
    table[1, 2] = 10**6
    o, lse = plan.launch()
    torch.cuda.synchronize()
    assert torch.isnan(o[1]).all() and torch.isnan(lse[1]).all()
    assert torch.isfinite(o[0]).all()
    lens_t[0] = 10**6  # longer than the table: clamped, rows NaN
    o, lse = plan.launch()
    torch.cuda.synchronize()
    assert torch.isnan(o[0]).all()


def _bad(args, **kw):
    from attnproto.ops import paged

    return paged.paged_decode(*args, **kw)


def test_bad_input_named_before_launch():
    lens = [20, 40]
    q, k, v = _inputs(37, 2, 8, 2, 1, 40, 128, "float16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    good = (q, kc, vc, table, lens_t)
    t = table.clone()
    t[0, 0] = -1
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1"):
        _bad((q, kc, vc, t, lens_t))
    t = table.clone()
    t[1, 2] = kc.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        _bad((q, kc, vc, t, lens_t))
    with pytest.raises(ValueError, match=r"context_lens\[1\]"):
        _bad((q, kc, vc, table, torch.tensor([20, 10**5], dtype=torch.int32, device="cuda")))
    with pytest.raises(TypeError, match="block_table"):
        _bad((q, kc, vc, table.long(), lens_t))
    with pytest.raises(TypeError, match="context_lens"):
        _bad((q, kc, vc, table, lens_t.long()))
    with pytest.raises(TypeError, match="k_cache"):
        _bad((q, kc.to(torch.bfloat16), vc.to(torch.bfloat16), table, lens_t))
    with pytest.raises(ValueError, match="head_dim"):
        _bad((q[..., :64].contiguous(), kc, vc, table, lens_t))
    with pytest.raises(ValueError, match="kv heads"):
        _bad((q[:, :3].contiguous(), kc, vc, table, lens_t))
    with pytest.raises(ValueError, match="block_table"):
        _bad((q, kc, vc, table[:1], lens_t))
    with pytest.raises(ValueError, match="q"):
        _bad((q.cpu(), kc, vc, table, lens_t))
    with pytest.raises(ValueError, match="context_lens"):
        _bad((q, kc, vc, table, lens_t.cpu()))
    with pytest.raises(ValueError, match="query tokens"):
        _bad((torch.zeros(2, 8, 9, 128, dtype=q.dtype, device="cuda"), kc, vc, table, lens_t))
    with pytest.raises(ValueError, match="num_partitions"):
        _bad(good, num_partitions=0)
    with pytest.raises(ValueError, match="layout"):
        _bad(good, layout="nope")
    with pytest.raises(ValueError, match="scale"):
        _bad(good, scale=-1.0)


def test_append_rejects_out_of_range_positions():
    from attnproto.ops import paged

    lens = [16, 16]
    q, k, v = _inputs(41, 2, 8, 2, 1, 16, 64, "float16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    with pytest.raises(ValueError, match=r"positions\[0\]"):
        paged.append_kv(k[:, :, :1], v[:, :, :1], kc, vc, table,
                        torch.tensor([16, 0], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="k_new"):
        paged.append_kv(k[:, :1, :1], v[:, :1, :1], kc, vc, table, lens_t * 0)


@pytest.mark.parametrize("layout", ["nhd", "hnd"])
@pytest.mark.parametrize("bs", [1, 16, 128])
def test_paged_prefill_front_door_matches_fp64(layout, bs):
    from attnproto.ops import paged

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("paged prefill runs the Hopper kernel")
    lens, nq = [300, 77], 77
    q, k, v = _inputs(43, 2, 8, 2, nq, max(lens), 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, bs, layout=layout)
    o, lse = _poisoned(q)
    paged.paged_prefill(q, kc, vc, table, lens_t, layout=layout, out=o, lse=lse)
    for i, n in enumerate(lens):
        want = ref.attention(q[i:i + 1].double().cpu().numpy(), k[i:i + 1, :, :n].double().cpu().numpy(),
                             v[i:i + 1, :, :n].double().cpu().numpy(), causal=True)
        np.testing.assert_allclose(o[i:i + 1].double().cpu().numpy(), want, atol=2e-2)


def test_prefill_then_decode_step_in_one_cuda_graph():
    """A serving step: append the new token, decode it; captured once, replayed."""
    from attnproto.ops import paged

    b, hq, hkv, d, n = 2, 16, 4, 128, 200
    q, k, v = _inputs(47, b, hq, hkv, 1, n + 1, d, "bfloat16")
    kc, vc, table, _ = build_pool(k, v, [n + 1, n + 1], 16)
    lens_t = torch.full((b,), n + 1, dtype=torch.int32, device="cuda")
    pos = torch.full((b,), n, dtype=torch.int32, device="cuda")
    new_k, new_v = k[:, :, n:n + 1].clone(), v[:, :, n:n + 1].clone()
    append = paged.prepare_append_kv(new_k, new_v, kc, vc, table, pos)
    plan = paged.prepare_paged_decode(q, kc, vc, table, lens_t, num_partitions=2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        append.launch()
        plan.launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        append.launch()
        plan.launch()
    graph.replay()
    torch.cuda.synchronize()
    _check(plan.out, plan.lse, q, k, v, [n + 1, n + 1], "bfloat16")


def test_paged_prefill_bad_input_named():
    from attnproto.ops import paged

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("paged prefill runs the Hopper kernel")
    q, k, v = _inputs(53, 2, 8, 2, 16, 64, 128, "float16")
    kc, vc, table, lens_t = build_pool(k, v, [64, 64], 16)
    t = table.clone()
    t[0, 1] = -5
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -5"):
        paged.paged_prefill(q, kc, vc, t, lens_t)
    with pytest.raises(TypeError, match="causal"):
        paged.paged_prefill(q, kc, vc, table, lens_t, causal="yes")
    with pytest.raises(TypeError, match="k_cache"):
        paged.paged_prefill(q, kc.to(torch.bfloat16), vc.to(torch.bfloat16), table, lens_t)
