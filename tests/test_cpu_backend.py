"""CPU backend (attnproto.cpu, float32 tiled algorithms) against the FP64 references."""
from __future__ import annotations

import math
import sys
import zlib

import numpy as np
import pytest

from attnproto import cpu, ref

DTYPES = ["float16", "bfloat16", "float32"]
HEAD_DIMS = [64, 72, 80, 128]
# (Nq, Nkv): single token, odd sizes that leave partial tiles, decode and Nq > Nkv.
SEQ_SHAPES = [(1, 1), (17, 17), (77, 77), (1, 77), (17, 77), (77, 17)]
# (Hq, Hkv): MHA and GQA.
HEADS = [(4, 4), (4, 1)]

# The reference evaluates the SAME rounded inputs in float64, so the input dtype
# changes the values but not the arithmetic: what remains is float32 rounding of
# dot products over D <= 128 and sums over N <= 2048 of terms of order 1, a few
# 1e-7 in practice (see test_large_problem). 2e-5 keeps >10x margin.
FP32_ATOL = 2e-5
FP32_RTOL = 2e-5
# Unit roundoff of the dtype P is rounded to before P @ V. Rounding each
# p_j in [0, 1] to relative error u moves O = sum(p_j v_j) / l by at most
# u * sum(p_j |v_j|) / l <= u * max|v| (l keeps the float32 p).
P_UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# Ulps of the largest logit that float32 dot products of D <= 128 terms may be off by.
LOGIT_ULPS = 4
# Linear attention outputs grow with N (no normalisation): compare relative to
# the largest output; chunked float32 sums of <= 77 terms stay far below this.
LINEAR_RTOL = 1e-5


@pytest.fixture
def rng(request):
    """Fresh generator per test, seeded by the test id (reproducible, distinct per case)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _dtype(name):
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 inputs need the optional ml_dtypes")
    return cpu.numpy_dtype(name)


def _randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(_dtype(dtype))


def _qkv(rng, dtype, batch, hq, hkv, nq, nkv, d, dv=None):
    return (_randn(rng, (batch, hq, nq, d), dtype), _randn(rng, (batch, hkv, nkv, d), dtype),
            _randn(rng, (batch, hkv, nkv, d if dv is None else dv), dtype))


def _check(o, lse, o_ref, lse_ref, *, o_atol=FP32_ATOL):
    assert o.dtype == np.float32 and lse.dtype == np.float32
    ref.assert_allclose(o, o_ref, atol=o_atol, rtol=FP32_RTOL, msg="O")
    ref.assert_allclose(lse, lse_ref, atol=FP32_ATOL, rtol=FP32_RTOL, msg="LSE")


# -------------------------------------------------------------- flash forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv", SEQ_SHAPES)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_flash_forward_matches_reference(rng, dtype, head_dim, causal, nq, nkv, hq, hkv):
    q, k, v = _qkv(rng, dtype, 2, hq, hkv, nq, nkv, head_dim)
    o, lse = cpu.flash_forward(q, k, v, block_r=16, block_c=16, causal=causal)
    _check(o, lse, *ref.attention(q, k, v, causal=causal, return_lse=True))


@pytest.mark.parametrize("block_r,block_c", [(1, 1), (7, 5), (16, 64), (64, 16), (128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_forward_tile_shapes(rng, block_r, block_c, causal):
    q, k, v = _qkv(rng, "float16", 1, 4, 2, 45, 61, 80)
    o, lse = cpu.flash_forward(q, k, v, block_r=block_r, block_c=block_c, causal=causal)
    _check(o, lse, *ref.attention(q, k, v, causal=causal, return_lse=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["alibi", "rope", "alibi+rope"])
def test_flash_forward_position_variants(rng, dtype, head_dim, causal, variant):
    q, k, v = _qkv(rng, dtype, 2, 4, 2, 33, 50, head_dim)
    kwargs = dict(alibi="alibi" in variant, rope="rope" in variant, alibi_max_bias=4.0,
                  rope_theta=500.0, causal=causal)
    o, lse = cpu.flash_forward(q, k, v, block_r=16, block_c=32, **kwargs)
    _check(o, lse, *ref.attention(q, k, v, return_lse=True, **kwargs))


@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_flash_forward_rounds_p_within_bound(rng, p_dtype, head_dim):
    q, k, v = _qkv(rng, "float16", 1, 2, 2, 40, 90, head_dim)
    o_ref, lse_ref = ref.attention(q, k, v, return_lse=True)
    o, lse = cpu.flash_forward(q, k, v, block_r=16, block_c=32, p_dtype=p_dtype)
    bound = P_UNIT_ROUNDOFF[p_dtype] * float(np.abs(v.astype(np.float64)).max())
    _check(o, lse, o_ref, lse_ref, o_atol=bound + FP32_ATOL)
    o_exact, _ = cpu.flash_forward(q, k, v, block_r=16, block_c=32)
    assert np.abs(o - o_exact).max() > FP32_ATOL      # the rounding really happened


def test_flash_forward_fully_masked_rows(rng):
    q, k, v = _qkv(rng, "float32", 1, 2, 2, 20, 6, 64)    # rows 0..13 see no key
    o, lse = cpu.flash_forward(q, k, v, block_r=8, block_c=4, causal=True)
    assert np.array_equal(o[:, :, :14], np.zeros_like(o[:, :, :14]))
    assert np.all(lse[:, :, :14] == -np.inf)
    _check(o, lse, *ref.attention(q, k, v, causal=True, return_lse=True))


@pytest.mark.parametrize("order", ["increasing", "decreasing"])
def test_flash_forward_running_max_rescaling(rng, order):
    """Logits that move by tens per key tile: every tile changes (or never changes) the max."""
    nkv, d, block_c = 96, 64, 16
    q = np.ones((1, 1, 3, d), np.float32)
    ramp = np.linspace(-40.0, 40.0, nkv) if order == "increasing" else np.linspace(40.0, -40.0, nkv)
    k = (np.broadcast_to(ramp[:, None], (nkv, d)) / d + rng.standard_normal((nkv, d)) * 0.01)
    k = k[None, None].astype(np.float32)
    v = _randn(rng, (1, 1, nkv, d), "float32")
    o, lse = cpu.flash_forward(q, k, v, block_r=16, block_c=block_c, scale=1.0)
    _check(o, lse, *ref.attention(q, k, v, scale=1.0, return_lse=True))


def test_flash_forward_huge_logits_do_not_overflow(rng):
    q, k, v = _qkv(rng, "float16", 1, 2, 2, 17, 77, 64)
    scale = 50.0   # logits of ~1e3: exp() overflows float32 without the running-max shift
    o, lse = cpu.flash_forward(q, k, v, block_r=16, block_c=16, scale=scale, causal=True)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(lse))
    o_ref, lse_ref = ref.attention(q, k, v, scale=scale, causal=True, return_lse=True)
    # float32 logits this large are only good to a few ulps of their magnitude,
    # and an error ds in the logits moves O by about ds * max|v|.
    logit_ulp = float(np.spacing(np.float32(np.abs(lse_ref).max())))
    o_atol = LOGIT_ULPS * logit_ulp * float(np.abs(v.astype(np.float64)).max())
    _check(o, lse, o_ref, lse_ref, o_atol=o_atol)


@pytest.mark.parametrize("causal", [False, True])
def test_large_problem(rng, causal):
    """N=2048, D=128, B*H=4: the size the experiments use; runs in about a second."""
    q, k, v = _qkv(rng, "float16", 1, 4, 4, 2048, 2048, 128)
    o, lse = cpu.flash_forward(q, k, v, block_r=64, block_c=64, causal=causal)
    _check(o, lse, *ref.attention(q, k, v, causal=causal, return_lse=True))


# ------------------------------------------------------------------ partitioned
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("partition_size", [16, 33, 512])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 17])
def test_partitioned_forward_matches_reference(rng, dtype, head_dim, partition_size, causal, nq):
    q, k, v = _qkv(rng, dtype, 2, 4, 2, nq, 100, head_dim)
    o, lse = cpu.partitioned_forward(q, k, v, partition_size=partition_size, block_c=8,
                                     causal=causal)
    _check(o, lse, *ref.attention(q, k, v, causal=causal, return_lse=True))


def test_partitioned_phases_match_reference_phases(rng):
    q, k, v = _qkv(rng, "float16", 1, 2, 1, 30, 20, 64)      # causal rows 0..9 see nothing
    o_parts, lse_parts = cpu.partitioned_phase1(q, k, v, partition_size=8, block_c=3,
                                                causal=True, alibi=True)
    o_parts_ref, lse_parts_ref = ref.partition_parts(q, k, v, 8, causal=True, alibi=True)
    assert o_parts.shape == o_parts_ref.shape == (1, 2, 30, 3, 64)
    ref.assert_allclose(o_parts, o_parts_ref, atol=FP32_ATOL, rtol=FP32_RTOL, msg="o_parts")
    ref.assert_allclose(lse_parts, lse_parts_ref, atol=FP32_ATOL, rtol=FP32_RTOL, msg="lse_parts")
    o, lse = cpu.reduce_partitions(o_parts, lse_parts)
    _check(o, lse, *ref.reduce_partitions(o_parts_ref, lse_parts_ref))
    assert np.all(lse[:, :, :10] == -np.inf) and not np.any(o[:, :, :10])


# --------------------------------------------------------------------- paged
def _paged(rng, k, v, seq_lens, block_size):
    """Scatter K/V into a shuffled cache with garbage in unused slots; unused table entries -1."""
    batch, hkv, _, d = k.shape
    used = [-(-int(n) // block_size) for n in seq_lens]
    num_blocks = sum(used) + 2                       # two blocks no sequence uses
    order = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((batch, max(used) + 1), -1, dtype=np.int32)    # one spare column
    k_cache = rng.standard_normal((num_blocks, hkv, block_size, d)).astype(k.dtype)
    v_cache = rng.standard_normal((num_blocks, hkv, block_size, d)).astype(v.dtype)
    nxt = 0
    for b, n in enumerate(seq_lens):
        table[b, :used[b]] = order[nxt:nxt + used[b]]
        nxt += used[b]
        for t in range(int(n)):
            k_cache[table[b, t // block_size], :, t % block_size] = k[b, :, t]
            v_cache[table[b, t // block_size], :, t % block_size] = v[b, :, t]
    return k_cache, v_cache, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("block_size,block_c", [(16, None), (4, 3), (8, 20)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 5])
def test_paged_forward_matches_reference(rng, dtype, head_dim, block_size, block_c, causal, nq):
    seq_lens = np.array([37, 1, 64, 0], dtype=np.int32)
    q, k, v = _qkv(rng, dtype, 4, 4, 2, nq, 64, head_dim)
    k_cache, v_cache, table = _paged(rng, k, v, seq_lens, block_size)
    o, lse = cpu.paged_forward(q, k_cache, v_cache, table, seq_lens, block_c=block_c,
                               causal=causal, alibi=True)
    o_ref, lse_ref = ref.paged_attention(q, k_cache, v_cache, table, seq_lens, causal=causal,
                                         alibi=True, return_lse=True)
    _check(o, lse, o_ref, lse_ref)
    assert not np.any(o[3]) and np.all(lse[3] == -np.inf)


# ----------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dk,dv", [(64, 64), (72, 80), (128, 64)])
@pytest.mark.parametrize("n", [1, 17, 77])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("decay", [None, "per_head"])
def test_linear_attention_matches_recurrence(rng, dtype, dk, dv, n, chunk_size, decay):
    heads = 3
    q, k, v = _qkv(rng, dtype, 2, heads, heads, n, n, dk, dv=dv)
    gamma = None if decay is None else np.array([1.0, 0.95, 0.5])
    scale = 1.0 / math.sqrt(dk)
    o, state = cpu.linear_attention(q, k, v, chunk_size=chunk_size, scale=scale, decay=gamma,
                                    output_final_state=True)
    o_ref, state_ref = ref.linear_attention_recurrent(q, k, v, scale=scale, decay=gamma,
                                                      output_final_state=True)
    assert o.dtype == np.float32 and o.shape == (2, heads, n, dv)
    ref.assert_allclose(o, o_ref, atol=LINEAR_RTOL * np.abs(o_ref).max(), rtol=LINEAR_RTOL,
                        msg="O")
    ref.assert_allclose(state, state_ref, atol=LINEAR_RTOL * np.abs(state_ref).max(),
                        rtol=LINEAR_RTOL, msg="final state")


@pytest.mark.parametrize("decay", [None, 0.8])
def test_linear_chunk_kernels_match_reference_kernels(rng, decay):
    q, k, v = _qkv(rng, "float16", 1, 2, 2, 45, 45, 64, dv=32)
    init = rng.standard_normal((1, 2, 64, 32)).astype(np.float32)
    states, final = cpu.linear_chunk_h(k, v, chunk_size=16, decay=decay, initial_state=init,
                                       output_final_state=True)
    states_ref, final_ref = ref.linear_chunk_h(k, v, 16, decay=decay, initial_state=init,
                                               output_final_state=True)
    assert states.shape == (1, 2, 3, 64, 32)
    np.testing.assert_array_equal(states[:, :, 0], init)
    ref.assert_allclose(states, states_ref, atol=LINEAR_RTOL * np.abs(states_ref).max(),
                        rtol=LINEAR_RTOL, msg="states")
    ref.assert_allclose(final, final_ref, atol=LINEAR_RTOL * np.abs(final_ref).max(),
                        rtol=LINEAR_RTOL, msg="final")
    o = cpu.linear_chunk_o(q, k, v, states_ref, chunk_size=16, scale=0.5, decay=decay)
    o_ref = ref.linear_chunk_o(q, k, v, states_ref, 16, scale=0.5, decay=decay)
    ref.assert_allclose(o, o_ref, atol=LINEAR_RTOL * np.abs(o_ref).max(), rtol=LINEAR_RTOL,
                        msg="O")


# ------------------------------------------------------------ bad inputs
def test_flash_forward_rejects_bad_inputs(rng):
    q, k, v = _qkv(rng, "float16", 1, 4, 2, 8, 8, 64)
    with pytest.raises(TypeError, match="q: dtype float64 not supported; expected one of "
                                        "float16, bfloat16, float32"):
        cpu.flash_forward(q.astype(np.float64), k, v, block_r=16, block_c=16)
    with pytest.raises(ValueError, match="block_r: must be positive"):
        cpu.flash_forward(q, k, v, block_r=0, block_c=16)
    with pytest.raises(TypeError, match="block_c: expected an int"):
        cpu.flash_forward(q, k, v, block_r=16, block_c=16.0)
    with pytest.raises(ValueError, match="v: head_dim 72 does not match q head_dim 64"):
        cpu.flash_forward(q, k, np.zeros((1, 2, 8, 72), np.float16), block_r=16, block_c=16)
    with pytest.raises(ValueError, match="k: 3 kv heads do not divide"):
        k3 = np.zeros((1, 3, 8, 64), np.float16)
        cpu.flash_forward(q, k3, k3, block_r=16, block_c=16)
    with pytest.raises(TypeError, match="p_dtype: float32 not supported"):
        cpu.flash_forward(q, k, v, block_r=16, block_c=16, p_dtype="float32")
    with pytest.raises(TypeError, match="alibi: expected a bool"):
        cpu.flash_forward(q, k, v, block_r=16, block_c=16, alibi="yes")
    with pytest.raises(ValueError, match="rope_theta"):
        cpu.flash_forward(q, k, v, block_r=16, block_c=16, rope=True, rope_theta=0.0)
    with pytest.raises(ValueError, match="q: RoPE needs an even head_dim"):
        q63, k63 = np.zeros((1, 4, 8, 63), np.float16), np.zeros((1, 2, 8, 63), np.float16)
        cpu.flash_forward(q63, k63, k63, block_r=16, block_c=16, rope=True)
    with pytest.raises(ValueError, match="q: last dimension must be contiguous"):
        wide = np.zeros((1, 4, 8, 128), np.float16)
        cpu.flash_forward(wide[..., ::2], k, v, block_r=16, block_c=16)


def test_other_entry_points_reject_bad_inputs(rng):
    q, k, v = _qkv(rng, "float16", 1, 2, 2, 4, 16, 64)
    with pytest.raises(ValueError, match="partition_size: must be positive"):
        cpu.partitioned_forward(q, k, v, partition_size=0)
    with pytest.raises(ValueError, match="lse_parts"):
        cpu.reduce_partitions(np.zeros((1, 3, 4), np.float32), np.zeros((1, 2), np.float32))
    seq_lens = np.array([16], dtype=np.int32)
    k_cache, v_cache, table = _paged(rng, k, v, seq_lens, 4)
    with pytest.raises(TypeError, match="block_table: dtype int64"):
        cpu.paged_forward(q, k_cache, v_cache, table.astype(np.int64), seq_lens)
    bad = table.copy()
    bad[0, 1] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        cpu.paged_forward(q, k_cache, v_cache, bad, seq_lens)
    with pytest.raises(ValueError, match="decay"):
        cpu.linear_attention(q, q, q, chunk_size=4, decay=[0.5, 2.0])
    with pytest.raises(ValueError, match="chunk_size: must be positive"):
        cpu.linear_attention(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="states: expected shape"):
        cpu.linear_chunk_o(q, q, q, np.zeros((1, 2, 2, 64, 64), np.float32), chunk_size=16)
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        cpu.linear_chunk_h(q, q, chunk_size=2, initial_state=np.zeros((1, 2, 64, 8)))


def test_linear_oversized_chunk_is_clamped_to_the_sequence(rng):
    """chunk_size = 10**5 on N = 50 once tried to build 10**5 x 10**5 float32 matrices
    (74 GiB); clamped to N it is one chunk, the same result as chunk_size = N."""
    import time
    import tracemalloc

    q, k, v = _qkv(rng, "float32", 1, 2, 2, 50, 50, 16)
    gamma = np.array([0.9, 1.0])
    tracemalloc.start()
    start = time.perf_counter()
    try:
        o, state = cpu.linear_attention(q, k, v, chunk_size=10**5, scale=0.25, decay=gamma,
                                        output_final_state=True)
        states = cpu.linear_chunk_h(k, v, chunk_size=10**5, decay=gamma)
        o_split = cpu.linear_chunk_o(q, k, v, states, chunk_size=10**5, scale=0.25, decay=gamma)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5.0
    assert peak < 16 * 2**20, f"peak allocation {peak / 2**20:.1f} MiB"
    assert states.shape == (1, 2, 1, 16, 16)
    o_n, state_n = cpu.linear_attention(q, k, v, chunk_size=50, scale=0.25, decay=gamma,
                                        output_final_state=True)
    np.testing.assert_array_equal(o, o_n)
    np.testing.assert_array_equal(state, state_n)
    np.testing.assert_array_equal(o_split, o_n)
    o_ref, s_ref = ref.linear_attention_recurrent(q, k, v, scale=0.25, decay=gamma,
                                                  output_final_state=True)
    ref.assert_allclose(o, o_ref, atol=LINEAR_RTOL * np.abs(o_ref).max(), rtol=LINEAR_RTOL)
    ref.assert_allclose(state, s_ref, atol=LINEAR_RTOL * np.abs(s_ref).max(), rtol=LINEAR_RTOL)


def test_linear_absurd_chunk_size_is_rejected(rng):
    q, k, v = _qkv(rng, "float32", 1, 2, 2, 8, 8, 16)
    for call in (lambda c: cpu.linear_attention(q, k, v, chunk_size=c),
                 lambda c: cpu.linear_chunk_h(k, v, chunk_size=c),
                 lambda c: cpu.linear_chunk_o(q, k, v, np.zeros((1, 2, 1, 16, 16), np.float32),
                                              chunk_size=c)):
        with pytest.raises(ValueError, match=r"chunk_size: 2147483648 is above the maximum"):
            call(2**31)
        with pytest.raises(TypeError, match="chunk_size: expected an int"):
            call(16.0)


# ------------------------------------------------------------ dtypes, torch
def test_bfloat16_without_ml_dtypes_is_a_clear_type_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)       # import now raises ImportError
    with pytest.raises(TypeError, match="bfloat16 .* needs the optional 'ml_dtypes' package"):
        cpu.numpy_dtype("bfloat16")
    with pytest.raises(TypeError, match="bfloat16"):
        cpu.quantize(np.ones(3), "bfloat16")
    assert cpu.numpy_dtype("float16") == np.float16
    with pytest.raises(TypeError, match="dtype: 'int8' not supported"):
        cpu.numpy_dtype("int8")


def test_round_to_bfloat16_ties_to_even():
    ulp_at_one = 2.0 ** -7                  # bfloat16 keeps 7 explicit mantissa bits
    x = np.array([1.0 + ulp_at_one / 2,     # tie between 1 and 1 + ulp: even is 1
                  1.0 + 3 * ulp_at_one / 2,  # tie between 1 + ulp and 1 + 2 ulp: even is 1 + 2 ulp
                  1.0 + ulp_at_one * 0.51, -3.0, np.nan], dtype=np.float32)
    out = cpu.round_to_bfloat16(x)
    np.testing.assert_array_equal(out[:4], [1.0, 1.0 + 2 * ulp_at_one, 1.0 + ulp_at_one, -3.0])
    assert np.isnan(out[4])


def test_round_to_bfloat16_matches_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = (rng.standard_normal(10000) * np.exp(rng.uniform(-20, 20, 10000))).astype(np.float32)
    np.testing.assert_array_equal(cpu.round_to_bfloat16(x),
                                  x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_torch_cpu_tensors_are_accepted(rng):
    torch = pytest.importorskip("torch")
    q, k, v = _qkv(rng, "float32", 1, 2, 1, 9, 13, 64)
    tq, tk, tv = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
    o, lse = cpu.flash_forward(tq, tk, tv, block_r=4, block_c=4, causal=True)
    _check(o, lse, *ref.attention(tq, tk, tv, causal=True, return_lse=True))


# ------------------------------------------------------------ sliding window and soft cap
@pytest.mark.parametrize("nq, nkv", [(37, 37), (13, 50), (50, 50)])
@pytest.mark.parametrize("window", [1, 7, 16, 33, 200])
@pytest.mark.parametrize("block_r, block_c", [(8, 16), (16, 5), (64, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_forward_window_matches_reference(nq, nkv, window, block_r, block_c, causal):
    rng = np.random.default_rng(hash((nq, nkv, window, block_r, block_c, causal)) % 2**32)
    q = rng.standard_normal((2, 4, nq, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, nkv, 16)).astype(np.float32) for _ in range(2))
    o, lse = cpu.flash_forward(q, k, v, block_r=block_r, block_c=block_c, causal=causal, window=window)
    o_ref, lse_ref = ref.attention(q, k, v, causal=causal, window=window, return_lse=True)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", [1.0, 30.0])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("alibi", [False, True])
def test_flash_forward_softcap_composes(cap, window, alibi):
    rng = np.random.default_rng(7)
    q = 2 * rng.standard_normal((1, 4, 40, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 1, 40, 32)).astype(np.float32) for _ in range(2))
    o, lse = cpu.flash_forward(q, k, v, block_r=16, block_c=16, causal=True, softcap=cap, window=window,
                               alibi=alibi)
    o_ref, lse_ref = ref.attention(q, k, v, causal=True, softcap=cap, window=window, alibi=alibi,
                                   return_lse=True)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5, rtol=1e-5)


def test_window_skips_tiles_left_of_every_window(monkeypatch):
    """Work scales with the window: key tiles wholly left of the rows' windows are never loaded."""
    rng = np.random.default_rng(3)
    n, w, bc = 256, 32, 16
    q, k, v = (rng.standard_normal((1, 1, n, 8)).astype(np.float32) for _ in range(3))
    loads = []
    real = cpu._contiguous_loader

    def counting(k_, v_):
        inner = real(k_, v_)
        return lambda j0, j1: loads.append((j0, j1)) or inner(j0, j1)
    monkeypatch.setattr(cpu, "_contiguous_loader", counting)
    cpu.flash_forward(q, k, v, block_r=n, block_c=bc, causal=True, window=w)
    full = len(loads)
    loads.clear()
    cpu.flash_forward(q, k, v, block_r=16, block_c=bc, causal=True, window=w)
    assert len(loads) == full == n // bc   # one query tile of all rows sees every key tile
    loads.clear()
    q1 = q[:, :, -16:]   # the last 16 rows (positions 240..255) see keys 209..255: key tiles 13, 14, 15
    cpu.flash_forward(q1, k, v, block_r=16, block_c=bc, causal=True, window=w)
    assert [j0 // bc for j0, _ in loads] == [13, 14, 15]


@pytest.mark.parametrize("kwargs, exc", [({"window": 0}, ValueError), ({"softcap": -2.0}, ValueError),
                                         ({"window": "x"}, TypeError)])
def test_flash_forward_window_softcap_checked(kwargs, exc):
    x = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(exc, match=next(iter(kwargs))):
        cpu.flash_forward(x, x, x, block_r=4, block_c=4, causal=True, **kwargs)
