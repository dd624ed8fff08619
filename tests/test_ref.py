"""FP64 references (attnproto.ref) against hand-computed cases and an independent scalar oracle."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from attnproto import ref

# float64 rounding of the vectorised formulas vs. the scalar loops below: a few
# hundred ulps of values of order 1 leave ample margin at these sizes.
FP64_ATOL = 1e-12
FP64_RTOL = 1e-12


@pytest.fixture
def rng(request):
    """Fresh generator per test, seeded by the test id (reproducible, distinct per case)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _qkv(rng, batch, hq, hkv, nq, nkv, d, dv=None):
    dv = d if dv is None else dv
    return (rng.standard_normal((batch, hq, nq, d)), rng.standard_normal((batch, hkv, nkv, d)),
            rng.standard_normal((batch, hkv, nkv, dv)))


def _naive_attention(q, k, v, scale, causal=False, alibi_max_bias=None):
    """Scalar-loop attention with math.exp: an oracle independent of the vectorised code."""
    batch, hq, nq, d = q.shape
    hkv, nkv = k.shape[1], k.shape[2]
    group = hq // hkv
    o = np.zeros(q.shape)
    lse = np.full(q.shape[:3], -math.inf)
    for b in range(batch):
        for h in range(hq):
            slope = 2.0 ** (-alibi_max_bias * (h + 1) / hq) if alibi_max_bias is not None else 0.0
            for i in range(nq):
                pos_q = i + nkv - nq
                scores = []
                for j in range(nkv):
                    if causal and j > pos_q:
                        continue
                    s = scale * sum(q[b, h, i, x] * k[b, h // group, j, x] for x in range(d))
                    scores.append((j, s - slope * abs(pos_q - j)))
                if not scores:
                    continue
                top = max(s for _, s in scores)
                weights = [(j, math.exp(s - top)) for j, s in scores]
                total = sum(w for _, w in weights)
                lse[b, h, i] = top + math.log(total)
                for j, w in weights:
                    o[b, h, i] += (w / total) * v[b, h // group, j]
    return o, lse


# ------------------------------------------------------------ softmax / lse
def test_softmax_rows_sum_to_one(rng):
    x = rng.standard_normal((3, 5, 40)) * 30.0
    x[0, 1, :7] = -np.inf
    p = ref.softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    assert np.all(p >= 0.0)
    assert np.all(p[0, 1, :7] == 0.0)


def test_softmax_and_logsumexp_of_a_fully_masked_row():
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 0.0, 0.0]])
    assert np.array_equal(ref.softmax(x)[0], np.zeros(3))
    np.testing.assert_allclose(ref.softmax(x)[1], np.full(3, 1.0 / 3.0), rtol=1e-15)
    lse = ref.logsumexp(x)
    assert lse[0] == -np.inf
    assert lse[1] == pytest.approx(math.log(3.0), rel=1e-15)


def test_softmax_and_logsumexp_never_zero_a_non_finite_row():
    x = np.array([[np.nan, 0.0, 1.0],
                  [np.inf, 0.0, 1.0],
                  [-np.inf, -np.inf, -np.inf],
                  [np.inf, np.inf, 0.0],
                  [-np.inf, 0.0, 0.0]])
    p = ref.softmax(x)
    assert np.isnan(p[0]).all()                               # a NaN poisons the row
    assert np.isnan(p[1]).all()                               # exp(inf - inf) = NaN, sum NaN
    assert np.array_equal(p[2], np.zeros(3))                  # fully masked: all 0
    assert np.isnan(p[3]).all()
    np.testing.assert_allclose(p[4], [0.0, 0.5, 0.5], rtol=1e-15)
    lse = ref.logsumexp(x)
    assert np.isnan(lse[0]) and lse[1] == np.inf and lse[2] == -np.inf and lse[3] == np.inf
    assert lse[4] == pytest.approx(math.log(2.0), rel=1e-15)


def test_logsumexp_is_stable_for_large_values():
    big = 1000.0   # exp(1000) overflows float64: a naive log(sum(exp)) gives inf
    assert ref.logsumexp(np.array([big, big])) == pytest.approx(big + math.log(2.0), rel=1e-15)
    assert ref.logsumexp(np.array([-big, -big])) == pytest.approx(-big + math.log(2.0), rel=1e-15)


def test_logsumexp_matches_direct_formula(rng):
    x = rng.standard_normal((4, 9))
    np.testing.assert_allclose(ref.logsumexp(x, axis=0), np.log(np.exp(x).sum(axis=0)),
                               rtol=1e-14)


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [False, True])
def test_identity_queries_over_uniform_keys_give_mean_of_v(rng, causal):
    d, nkv = 8, 11
    q = np.eye(d)[None, None]                                        # Nq = D queries
    k = np.broadcast_to(rng.standard_normal(d), (1, 1, nkv, d))      # every key identical
    v = rng.standard_normal((1, 1, nkv, 5))
    v = np.concatenate([v, np.zeros((1, 1, nkv, d - 5))], axis=-1)
    o = ref.attention(q, k, v, causal=causal)
    if causal:
        visible = np.arange(d) + (nkv - d) + 1                       # keys row i sees
        expected = np.cumsum(v[0, 0], axis=0)[visible - 1] / visible[:, None]
    else:
        expected = np.broadcast_to(v[0, 0].mean(axis=0), (d, d))
    np.testing.assert_allclose(o[0, 0], expected, rtol=0, atol=1e-14)


def test_single_key_returns_its_value(rng):
    q, k, v = _qkv(rng, 2, 4, 2, 6, 1, 16)
    scale = 0.37
    o, lse = ref.attention(q, k, v, scale=scale, return_lse=True)
    np.testing.assert_array_equal(o, np.repeat(np.broadcast_to(v, (2, 2, 6, 16)), 2, axis=1))
    expected_lse = scale * np.einsum("bhnd,bhd->bhn", q, np.repeat(k[:, :, 0], 2, axis=1))
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-14, atol=1e-14)


def test_zero_keys_give_lse_log_n(rng):
    q = rng.standard_normal((1, 2, 3, 8))
    k = np.zeros((1, 2, 13, 8))
    v = rng.standard_normal((1, 2, 13, 8))
    o, lse = ref.attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(lse, math.log(13.0), rtol=1e-15)
    np.testing.assert_allclose(o, np.broadcast_to(v.mean(axis=2, keepdims=True), o.shape),
                               atol=1e-14)


def test_causal_rows_without_keys_are_zero_with_lse_minus_inf(rng):
    q, k, v = _qkv(rng, 1, 1, 1, 5, 3, 4)            # Nq > Nkv: rows 0, 1 see nothing
    o, lse = ref.attention(q, k, v, causal=True, return_lse=True)
    assert np.array_equal(o[0, 0, :2], np.zeros((2, 4)))
    assert np.all(lse[0, 0, :2] == -np.inf)
    np.testing.assert_array_equal(o[0, 0, 2], v[0, 0, 0])    # row 2 sees key 0 only
    assert np.all(np.isfinite(lse[0, 0, 2:]))


def test_default_scale_is_inverse_sqrt_head_dim(rng):
    q, k, v = _qkv(rng, 1, 2, 2, 4, 6, 32)
    np.testing.assert_array_equal(ref.attention(q, k, v),
                                  ref.attention(q, k, v, scale=1.0 / math.sqrt(32)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("nq,nkv", [(1, 1), (1, 7), (5, 5), (6, 4), (4, 9)])
def test_attention_matches_scalar_oracle(rng, causal, alibi, hq, hkv, nq, nkv):
    d = 6
    q, k, v = _qkv(rng, 2, hq, hkv, nq, nkv, d)
    scale = 0.5
    o, lse = ref.attention(q, k, v, scale=scale, causal=causal, alibi=alibi, return_lse=True)
    o_naive, lse_naive = _naive_attention(q, k, v, scale, causal,
                                          ref.DEFAULT_ALIBI_MAX_BIAS if alibi else None)
    ref.assert_allclose(o, o_naive, atol=FP64_ATOL, rtol=FP64_RTOL, msg="O")
    ref.assert_allclose(lse, lse_naive, atol=FP64_ATOL, rtol=FP64_RTOL, msg="LSE")


def test_attention_accepts_low_precision_and_lists(rng):
    q, k, v = _qkv(rng, 1, 2, 1, 3, 4, 8)
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    o = ref.attention(q16, k16, v16)
    assert o.dtype == np.float64
    np.testing.assert_array_equal(o, ref.attention(q16.astype(np.float64), k16.astype(np.float64),
                                                   v16.astype(np.float64)))
    np.testing.assert_array_equal(ref.attention(q.tolist(), k.tolist(), v.tolist()),
                                  ref.attention(q, k, v))


NON_FLOAT = [np.array([[[[1]]]], dtype=np.int32), np.array([[[[1]]]], dtype=np.int64),
             np.array([[[[True]]]]), np.array([[[[1 + 2j]]]]), np.array([[[[1.0]]]], dtype=object)]


@pytest.mark.parametrize("bad", NON_FLOAT, ids=lambda a: str(a.dtype))
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_attention_rejects_non_float_dtypes(bad, which):
    args = dict(q=np.ones((1, 1, 1, 1)), k=np.ones((1, 1, 1, 1)), v=np.ones((1, 1, 1, 1)))
    args[which] = bad
    with pytest.raises(TypeError, match=f"^{which}: "):
        ref.attention(**args)
    with pytest.raises(TypeError, match=f"^{which}: "):
        ref.partition_parts(args["q"], args["k"], args["v"], 1)


@pytest.mark.parametrize("bad", NON_FLOAT, ids=lambda a: str(a.dtype))
def test_other_references_reject_non_float_dtypes(bad):
    ones = np.ones((1, 1, 1, 1))
    table, lens = np.zeros((1, 1), np.int32), np.ones(1, np.int32)
    calls = [
        ("k_cache", lambda: ref.paged_attention(ones, bad, ones, table, lens)),
        ("q", lambda: ref.paged_attention(bad, ones, ones, table, lens)),
        ("lse_parts", lambda: ref.reduce_partitions(np.ones((1, 1, 1)), bad[0, 0])),
        ("o_parts", lambda: ref.reduce_partitions(bad[0], np.ones((1, 1)))),
        ("x", lambda: ref.softmax(bad)),
        ("x", lambda: ref.logsumexp(bad)),
        ("x", lambda: ref.rope(np.broadcast_to(bad, (1, 1, 1, 2)).copy())),
        ("q", lambda: ref.linear_attention_recurrent(bad, ones, ones)),
        ("v", lambda: ref.linear_attention_chunked(ones, ones, bad, 1)),
        ("k", lambda: ref.linear_chunk_h(bad, ones, 1)),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=f"^{name}: "):
            call()


def test_integer_arrays_are_taken_only_as_positions_and_in_allclose():
    pos = ref.rope(np.ones((1, 3, 2)), positions=np.array([0, 1, 2]))
    np.testing.assert_array_equal(pos, ref.rope(np.ones((1, 3, 2)), positions=np.arange(3.0)))
    with pytest.raises(TypeError, match="positions"):
        ref.rope(np.ones((1, 3, 2)), positions=np.array([True, False, True]))
    assert ref.allclose(np.array([1, 2]), np.array([1.0, 2.0]), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("call, name, exc", [
    (lambda: ref.causal_mask(-1, 3), "seq_q", ValueError),
    (lambda: ref.causal_mask(2, -3), "seq_kv", ValueError),
    (lambda: ref.causal_mask(2.0, 3), "seq_q", TypeError),
    (lambda: ref.alibi_bias(2, 3, -1), "seq_kv", ValueError),
    (lambda: ref.alibi_bias(-2, 3, 1), "num_heads", ValueError),
    (lambda: ref.alibi_slopes(0), "num_heads", ValueError),
    (lambda: ref.rope_frequencies(-2), "head_dim", ValueError),
    (lambda: ref.partition_parts(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)),
                                 np.ones((1, 1, 2, 2)), -4), "partition_size", ValueError),
    (lambda: ref.paged_gather(np.ones((2, 1, 4, 2)), np.zeros((1, 1), np.int32),
                              np.ones(1, np.int32), -4), "block_size", ValueError),
    (lambda: ref.linear_attention_chunked(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)),
                                          np.ones((1, 1, 2, 2)), -3), "chunk_size", ValueError),
])
def test_references_reject_negative_and_non_integer_sizes(call, name, exc):
    with pytest.raises(exc, match=f"^{name}: "):
        call()


def test_empty_causal_mask_is_fine():
    assert ref.causal_mask(0, 3).shape == (0, 3) and ref.causal_mask(2, 0).shape == (2, 0)


# ---------------------------------------------------------------- RoPE/ALiBi
def test_rope_rotates_pairs_by_position_times_frequency():
    theta = 10000.0
    x = np.zeros((3, 4))
    x[:, 0] = 1.0        # pair (0, 2): frequency theta^0 = 1
    x[:, 1] = 1.0        # pair (1, 3): frequency theta^(-2/4) = 1/100
    out = ref.rope(x, theta)
    for p in range(3):
        np.testing.assert_allclose(out[p], [math.cos(p), math.cos(p / 100.0), math.sin(p),
                                            math.sin(p / 100.0)], rtol=0, atol=1e-15)


def test_rope_keeps_norms_and_depends_on_relative_position(rng):
    d, theta = 16, 500.0
    q, k = rng.standard_normal(d), rng.standard_normal(d)
    rq = ref.rope(np.broadcast_to(q, (9, d)), theta)
    rk = ref.rope(np.broadcast_to(k, (9, d)), theta)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-14)
    dots = rq @ rk.T
    for lag in range(-3, 4):
        diagonal = np.diagonal(dots, offset=lag)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-12, atol=1e-12)


def test_rope_explicit_positions_and_odd_head_dim(rng):
    x = rng.standard_normal((2, 5, 8))
    np.testing.assert_allclose(ref.rope(x, positions=np.arange(5) + 3),
                               ref.rope(np.concatenate([np.zeros((2, 3, 8)), x], axis=1))[:, 3:],
                               rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="head_dim"):
        ref.rope(rng.standard_normal((4, 7)))
    with pytest.raises(ValueError, match="positions"):
        ref.rope(x, positions=np.arange(4))
    with pytest.raises(ValueError, match="rope_theta"):
        ref.rope(x, theta=-1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_rope_rotates_q_at_bottom_right_positions(rng, causal):
    q, k, v = _qkv(rng, 1, 2, 2, 3, 7, 8)
    theta = 50.0
    expected = ref.attention(ref.rope(q, theta, positions=np.arange(3) + 4), ref.rope(k, theta),
                             v, causal=causal)
    np.testing.assert_array_equal(ref.attention(q, k, v, causal=causal, rope=True,
                                                rope_theta=theta), expected)


def test_alibi_slopes_and_bias():
    np.testing.assert_array_equal(ref.alibi_slopes(8), 2.0 ** -np.arange(1.0, 9.0))
    np.testing.assert_allclose(ref.alibi_slopes(4, max_bias=4.0), [0.5, 0.25, 0.125, 0.0625])
    bias = ref.alibi_bias(2, 2, 3)       # query rows at positions 1, 2; slopes 2^-4, 2^-8
    np.testing.assert_array_equal(bias[0], -(2.0 ** -4) * np.array([[1, 0, 1], [2, 1, 0]]))
    np.testing.assert_array_equal(bias[1], -(2.0 ** -8) * np.array([[1, 0, 1], [2, 1, 0]]))


def test_causal_mask_is_bottom_right():
    np.testing.assert_array_equal(ref.causal_mask(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(ref.causal_mask(3, 1), [[0], [0], [1]])


# ------------------------------------------------------------------- paged
def _paged_from_contiguous(rng, k, v, seq_lens, block_size, spare_blocks=3):
    """Scatter K/V [B, Hkv, Nmax, D] into a shuffled paged cache; unused table slots are -1."""
    batch, hkv, _, d = k.shape
    used = [-(-int(n) // block_size) for n in seq_lens]
    num_blocks = sum(used) + spare_blocks
    order = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((batch, max(max(used), 1) + 1), -1, dtype=np.int32)
    k_cache = rng.standard_normal((num_blocks, hkv, block_size, d))    # garbage in unused slots
    v_cache = rng.standard_normal((num_blocks, hkv, block_size, d))
    nxt = 0
    for b, n in enumerate(seq_lens):
        for logical in range(used[b]):
            table[b, logical] = order[nxt]
            nxt += 1
        for t in range(int(n)):
            blk, slot = table[b, t // block_size], t % block_size
            k_cache[blk, :, slot] = k[b, :, t]
            v_cache[blk, :, slot] = v[b, :, t]
    return k_cache, v_cache, table


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_paged_gather_is_bit_exact(rng, block_size, dtype):
    seq_lens = np.array([13, 1, 32, 0], dtype=np.int32)
    k = rng.standard_normal((4, 2, 32, 8)).astype(dtype)
    k_cache, _, table = _paged_from_contiguous(rng, k, k, seq_lens, block_size)
    k_cache = k_cache.astype(dtype)
    gathered = ref.paged_gather(k_cache, table, seq_lens, block_size)
    for b, n in enumerate(seq_lens):
        assert gathered[b].dtype == dtype
        np.testing.assert_array_equal(gathered[b], k[b, :, :n])
    padded = ref.paged_gather(k_cache, table, seq_lens, block_size, padded=True)
    assert padded.shape == (4, 2, 32, 8)
    for b, n in enumerate(seq_lens):
        np.testing.assert_array_equal(padded[b, :, :n], k[b, :, :n])
        assert not np.any(padded[b, :, n:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 4])
def test_paged_attention_equals_attention_per_sequence(rng, causal, nq):
    block_size = 4
    seq_lens = np.array([9, 16, 5], dtype=np.int32)
    q, k, v = _qkv(rng, 3, 4, 2, nq, 16, 8)
    k_cache, v_cache, table = _paged_from_contiguous(rng, k, v, seq_lens, block_size)
    o, lse = ref.paged_attention(q, k_cache, v_cache, table, seq_lens, causal=causal, alibi=True,
                                 return_lse=True)
    for b, n in enumerate(seq_lens):
        o_b, lse_b = ref.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                   causal=causal, alibi=True, return_lse=True)
        np.testing.assert_array_equal(o[b], o_b[0])
        np.testing.assert_array_equal(lse[b], lse_b[0])


def test_paged_attention_empty_sequence(rng):
    q, k, v = _qkv(rng, 2, 2, 2, 1, 8, 4)
    seq_lens = np.array([0, 8], dtype=np.int32)
    k_cache, v_cache, table = _paged_from_contiguous(rng, k, v, seq_lens, 4)
    o, lse = ref.paged_attention(q, k_cache, v_cache, table, seq_lens, return_lse=True)
    assert np.array_equal(o[0], np.zeros_like(o[0])) and np.all(lse[0] == -np.inf)
    assert np.all(np.isfinite(lse[1]))


def test_paged_rejects_bad_block_tables(rng):
    cache = rng.standard_normal((6, 1, 4, 8))
    seq_lens = np.array([5], dtype=np.int32)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 6 out of range \[0, 6\)"):
        ref.paged_gather(cache, np.array([[2, 6]], dtype=np.int32), seq_lens, 4)
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1"):
        ref.paged_gather(cache, np.array([[-1, 0]], dtype=np.int32), seq_lens, 4)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 9"):
        ref.paged_gather(cache, np.array([[0, 1]], dtype=np.int32), np.array([9]), 4)
    with pytest.raises(ValueError, match="block_size"):
        ref.paged_gather(cache, np.array([[0, 1]], dtype=np.int32), seq_lens, 8)
    with pytest.raises(TypeError, match="block_table"):
        ref.paged_gather(cache, np.array([[0.0, 1.0]]), seq_lens, 4)
    q = rng.standard_normal((1, 1, 1, 8))
    with pytest.raises(ValueError, match="block_table"):
        ref.paged_attention(q, cache, cache, np.array([[0, 7]], dtype=np.int32), seq_lens)


# -------------------------------------------------------------- partitioned
@pytest.mark.parametrize("partition_size", [1, 3, 8, 16, 100])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv", [(1, 16), (5, 16), (16, 16), (20, 16)])
def test_partitioned_equals_plain(rng, partition_size, causal, nq, nkv):
    q, k, v = _qkv(rng, 2, 4, 2, nq, nkv, 8)
    o, lse = ref.attention(q, k, v, causal=causal, alibi=True, return_lse=True)
    o_p, lse_p = ref.partitioned_attention(q, k, v, partition_size, causal=causal, alibi=True,
                                           return_lse=True)
    ref.assert_allclose(o_p, o, atol=FP64_ATOL, rtol=FP64_RTOL, msg="O")
    ref.assert_allclose(lse_p, lse, atol=FP64_ATOL, rtol=FP64_RTOL, msg="LSE")


def test_partition_parts_layout_and_masked_partitions(rng):
    q, k, v = _qkv(rng, 1, 1, 1, 2, 10, 4)
    o_parts, lse_parts = ref.partition_parts(q, k, v, 4, causal=True)
    assert o_parts.shape == (1, 1, 2, 3, 4) and lse_parts.shape == (1, 1, 2, 3)
    # row 0 sits at position 8: sees partitions 0, 1 and key 8 of partition 2
    np.testing.assert_array_equal(o_parts[0, 0, 0, 2], v[0, 0, 8])
    o_p0 = ref.attention(q[..., :1, :], k[:, :, :4], v[:, :, :4])
    np.testing.assert_allclose(o_parts[0, 0, 0, 0], o_p0[0, 0, 0], rtol=1e-14)


def test_reduce_partitions_hand_case():
    o_parts = np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])           # [1, P=3, D=2]
    lse_parts = np.array([[math.log(1.0), math.log(3.0), -math.inf]])
    o, lse = ref.reduce_partitions(o_parts, lse_parts)
    np.testing.assert_allclose(o, [[0.25, 0.75]], rtol=1e-15)
    np.testing.assert_allclose(lse, [math.log(4.0)], rtol=1e-15)
    o, lse = ref.reduce_partitions(np.ones((1, 2, 2)), np.full((1, 2), -math.inf))
    assert np.array_equal(o, np.zeros((1, 2))) and lse[0] == -math.inf
    with pytest.raises(ValueError, match="lse_parts"):
        ref.reduce_partitions(np.ones((1, 2, 2)), np.ones((1, 3)))


# ------------------------------------------------------------ linear attention
def test_linear_recurrent_hand_case():
    q = np.array([[1.0, 2.0], [3.0, -1.0]])[None, None]
    k = np.array([[0.5, 1.0], [2.0, 0.0]])[None, None]
    v = np.array([[1.0, -1.0, 2.0], [0.0, 4.0, 1.0]])[None, None]
    gamma, scale = 0.5, 2.0
    o = ref.linear_attention_recurrent(q, k, v, scale=scale, decay=np.array([gamma]))
    qk = q[0, 0] @ k[0, 0].T                  # qk[t, s] = q_t . k_s
    expected0 = scale * qk[0, 0] * v[0, 0, 0]
    expected1 = scale * (gamma * qk[1, 0] * v[0, 0, 0] + qk[1, 1] * v[0, 0, 1])
    np.testing.assert_allclose(o[0, 0], [expected0, expected1], rtol=1e-15)


def test_linear_recurrent_without_decay_is_masked_quadratic_form(rng):
    q, k, v = _qkv(rng, 2, 3, 3, 11, 11, 5, dv=7)
    o = ref.linear_attention_recurrent(q, k, v, scale=0.25)
    scores = np.tril(q @ np.swapaxes(k, -1, -2))
    np.testing.assert_allclose(o, 0.25 * scores @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("decay", [None, "per_head"])
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_chunked_equals_recurrent(rng, chunk_size, decay, with_state):
    n, dk, dv, heads = 37, 6, 5, 3
    q, k, v = _qkv(rng, 2, heads, heads, n, n, dk, dv=dv)
    gamma = None if decay is None else np.array([1.0, 0.9, 0.3])
    state = rng.standard_normal((2, heads, dk, dv)) if with_state else None
    o_r, s_r = ref.linear_attention_recurrent(q, k, v, scale=0.3, decay=gamma,
                                              initial_state=state, output_final_state=True)
    o_c, s_c = ref.linear_attention_chunked(q, k, v, chunk_size, scale=0.3, decay=gamma,
                                            initial_state=state, output_final_state=True)
    ref.assert_allclose(o_c, o_r, atol=FP64_ATOL, rtol=FP64_RTOL, msg="O")
    ref.assert_allclose(s_c, s_r, atol=FP64_ATOL, rtol=FP64_RTOL, msg="final state")


def test_linear_chunk_h_states_are_prefix_states(rng):
    q, k, v = _qkv(rng, 1, 2, 2, 10, 10, 3, dv=4)
    gamma = np.array([0.8, 0.5])
    states = ref.linear_chunk_h(k, v, 4, decay=gamma)
    assert states.shape == (1, 2, 3, 3, 4)
    assert not np.any(states[:, :, 0])
    for c, end in enumerate([4, 8], start=1):       # state entering chunk c = after token end-1
        _, s_end = ref.linear_attention_recurrent(q[:, :, :end], k[:, :, :end], v[:, :, :end],
                                                  decay=gamma, output_final_state=True)
        np.testing.assert_allclose(states[:, :, c], s_end, rtol=1e-13, atol=1e-13)


def test_linear_rejects_bad_inputs(rng):
    q, k, v = _qkv(rng, 1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="decay"):
        ref.linear_attention_recurrent(q, k, v, decay=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="decay"):
        ref.linear_attention_recurrent(q, k, v, decay=np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="chunk_size"):
        ref.linear_attention_chunked(q, k, v, 0)
    with pytest.raises(ValueError, match="initial_state"):
        ref.linear_attention_recurrent(q, k, v, initial_state=np.zeros((1, 2, 4, 3)))
    with pytest.raises(ValueError, match="states"):
        ref.linear_chunk_o(q, k, v, np.zeros((1, 2, 3, 4, 4)), 4)
    with pytest.raises(ValueError, match="k: shape"):
        ref.linear_attention_recurrent(q, k[:, :, :5], v)


def test_linear_chunk_size_above_n_is_one_chunk_and_huge_ones_are_rejected(rng):
    q, k, v = _qkv(rng, 1, 2, 2, 9, 9, 3, dv=4)
    one_chunk = ref.linear_attention_chunked(q, k, v, 9)
    np.testing.assert_array_equal(ref.linear_attention_chunked(q, k, v, 10**5), one_chunk)
    assert ref.linear_chunk_h(k, v, 10**5).shape == (1, 2, 1, 3, 4)
    np.testing.assert_allclose(one_chunk, ref.linear_attention_recurrent(q, k, v), rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size: .* above the maximum"):
        ref.linear_attention_chunked(q, k, v, 2**31)


# ---------------------------------------------------------------- allclose
def test_allclose_boundary_is_inclusive():
    assert ref.allclose(np.array([1.5]), np.array([1.0]), atol=0.5, rtol=0.0)
    assert ref.allclose(np.array([2.5]), np.array([2.0]), atol=0.0, rtol=0.25)
    assert not ref.allclose(np.array([2.51]), np.array([2.0]), atol=0.0, rtol=0.25)
    assert not ref.allclose(np.array([1.0]), np.array([-1.0]), atol=1.0, rtol=0.5)


def test_allclose_nan_and_inf_semantics():
    nan, inf = math.nan, math.inf
    assert not ref.allclose(np.array([nan]), np.array([nan]), atol=1.0, rtol=1.0)
    assert not ref.allclose(np.array([nan]), np.array([0.0]), atol=1.0, rtol=1.0)
    assert not ref.allclose(np.array([0.0]), np.array([nan]), atol=1.0, rtol=1.0)
    assert ref.allclose(np.array([-inf, inf]), np.array([-inf, inf]), atol=0.0, rtol=0.0)
    assert not ref.allclose(np.array([inf]), np.array([-inf]), atol=1.0, rtol=1.0)
    assert not ref.allclose(np.array([inf]), np.array([1.0]), atol=1.0, rtol=1.0)


def test_allclose_reports_worst_element_and_counts():
    expected = np.zeros((2, 3))
    actual = expected.copy()
    actual[0, 2] = 0.3
    actual[1, 1] = 0.9
    result = ref.allclose(actual, expected, atol=0.1, rtol=0.0)
    assert not result
    assert result.num_violations == 2 and result.num_elements == 6
    assert result.worst_index == (1, 1)
    assert result.actual == 0.9 and result.expected == 0.0
    assert result.abs_err == pytest.approx(0.9) and result.rel_err == math.inf
    assert "2 of 6" in str(result) and "(1, 1)" in str(result)


def test_allclose_worst_is_relative_to_tolerance():
    expected = np.array([100.0, 1.0])
    actual = np.array([103.0, 1.5])   # abs errors 3 and 0.5; tolerances 1.1 and 0.11
    assert ref.allclose(actual, expected, atol=0.1, rtol=0.01).worst_index == (1,)


def test_allclose_shape_mismatch_fails():
    result = ref.allclose(np.zeros((2, 3)), np.zeros((3, 2)), atol=1.0, rtol=1.0)
    assert not result and result.shape_mismatch
    assert "(2, 3)" in result.report() and "(3, 2)" in result.report()
    assert not ref.allclose(np.zeros(3), np.zeros((1, 3)), atol=1.0, rtol=1.0)


def test_assert_allclose_raises_with_report():
    with pytest.raises(AssertionError, match=r"LSE: allclose FAILED: 1 of 3 elements.*at \(2,\)"):
        ref.assert_allclose(np.array([0.0, 0.0, 1.0]), np.zeros(3), atol=0.5, rtol=0.0, msg="LSE")
    assert ref.assert_allclose(np.ones(3), np.ones(3), atol=0.0, rtol=0.0).ok


def test_allclose_rejects_bad_tolerances():
    with pytest.raises(ValueError, match="atol"):
        ref.allclose(np.ones(1), np.ones(1), atol=-1.0, rtol=0.0)
    with pytest.raises(TypeError, match="rtol"):
        ref.allclose(np.ones(1), np.ones(1), atol=0.0, rtol="1e-3")


# ------------------------------------------------------------ sliding window and soft cap
def _brute(q, k, v, scale, allowed, cap=None):
    """Row by row, the definition: softmax over the allowed keys of (capped) scaled scores."""
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros(q.shape)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                keys = [j for j in range(k.shape[2]) if allowed(i, j)]
                s = np.array([scale * q[bi, h, i] @ k[bi, h // group, j] for j in keys])
                if cap is not None:
                    s = cap * np.tanh(s / cap)
                p = np.exp(s - s.max())
                out[bi, h, i] = (p / p.sum()) @ v[bi, h // group, keys]
    return out


@pytest.mark.parametrize("nq, nkv, window", [(9, 9, 3), (5, 12, 4), (7, 7, 1), (6, 6, 100)])
def test_window_matches_definition(rng, nq, nkv, window):
    q = rng.standard_normal((1, 4, nq, 8))
    k, v = (rng.standard_normal((1, 2, nkv, 8)) for _ in range(2))
    off = nkv - nq
    got = ref.attention(q, k, v, causal=True, window=window)
    want = _brute(q, k, v, 8 ** -0.5, lambda i, j: i + off - window < j <= i + off)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if window >= nkv:
        np.testing.assert_allclose(got, ref.attention(q, k, v, causal=True), rtol=1e-13, atol=1e-13)


def test_window_one_sees_only_itself(rng):
    q, k, v = (rng.standard_normal((1, 2, 6, 8)) for _ in range(3))
    np.testing.assert_allclose(ref.attention(q, k, v, causal=True, window=1), v, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("cap", [0.5, 5.0, 50.0])
def test_softcap_matches_definition(rng, cap):
    q = 3 * rng.standard_normal((1, 2, 7, 16))
    k, v = (rng.standard_normal((1, 2, 9, 16)) for _ in range(2))
    got = ref.attention(q, k, v, softcap=cap)
    np.testing.assert_allclose(got, _brute(q, k, v, 0.25, lambda i, j: True, cap), rtol=1e-12, atol=1e-12)
    assert np.all(np.abs(ref.softcap_scores(np.array([-1e9, 1e9, 0.0]), cap)) <= cap)


def test_softcap_and_window_compose(rng):
    q, k, v = (rng.standard_normal((1, 2, 10, 8)) for _ in range(3))
    got = ref.attention(q, k, v, causal=True, window=4, softcap=2.0)
    want = _brute(q, k, v, 8 ** -0.5, lambda i, j: i - 4 < j <= i, cap=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"window": 0}, ValueError, "window"), ({"window": 2.5}, TypeError, "window"),
    ({"softcap": -1.0}, ValueError, "softcap"), ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"softcap": "big"}, TypeError, "softcap"), ({"softcap": True}, TypeError, "softcap"),
])
def test_window_softcap_bad_arguments(rng, kwargs, exc, match):
    q = rng.standard_normal((1, 1, 4, 8))
    with pytest.raises(exc, match=match):
        ref.attention(q, q, q, causal=True, **kwargs)
