"""The NaN / inf policy (attnproto.ref, module doc) on every backend.

A NaN or inf in Q, K or V reaches exactly the outputs the plain formula says it reaches,
never a silent zero: the float64 references against a scalar oracle that spells the policy
out, the float32 CPU backend (flash with several tilings, paged KV, two-phase) against the
references, torch's math SDPA on the CPU where its convention is the same (and the cases
where it is not, pinned down), and the CUDA kernels (mma.sync, wgmma) against the
reference on the same inputs. Patterns of non-finite elements are compared element for
element (np.isfinite of O and of LSE, plus where LSE is NaN or -inf); finite elements
within the usual tolerances. Rows that see no key (causal, Nq > Nkv) stay O = 0, LSE = -inf.

Placements: which tensor gets the bad value (q, k, v), the value (NaN, +inf), and where:
"visible" (q: a row that has keys; k/v: a key every row with keys sees under causal, a
random key otherwise) or "masked" (causal only; q: a row that sees no key; k/v: the last
key, hidden from every row but the last few). GQA everywhere (Hq = 4, Hkv = 2), Nq == Nkv
and Nq != Nkv.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from attnproto import cpu, ref

NAN, INF = math.nan, math.inf
B, HQ, HKV, D = 2, 4, 2, 8
GROUP = HQ // HKV
CPU_SHAPES = ((13, 13), (6, 19), (19, 6))
# float32 arithmetic against float64 on O(1) values.
F32_ATOL, F32_RTOL = 2e-5, 1e-4


@pytest.fixture
def rng(request):
    """Fresh generator per test, seeded by the test id (reproducible, distinct per case)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ------------------------------------------------------------------ placements
@dataclass(frozen=True)
class Case:
    tensor: str     # "q" | "k" | "v"
    where: str      # "visible" | "masked"
    value: float    # NaN or +inf
    causal: bool
    nq: int
    nkv: int

    def __str__(self) -> str:
        value = "nan" if math.isnan(self.value) else "inf"
        return (f"{self.tensor}-{self.where}-{value}-{'causal' if self.causal else 'full'}-"
                f"{self.nq}x{self.nkv}")


def make_cases(shapes):
    cases = []
    for causal in (False, True):
        for nq, nkv in shapes:
            for tensor in "qkv":
                for where in (("visible", "masked") if causal else ("visible",)):
                    if tensor == "q" and where == "masked" and nq <= nkv:
                        continue            # every query row sees a key
                    for value in (NAN, INF):
                        cases.append(Case(tensor, where, value, causal, nq, nkv))
    return cases


def first_row_with_keys(case: Case) -> int:
    return max(0, case.nq - case.nkv) if case.causal else 0


def poison(q, k, v, case: Case, rng):
    """Copies of q, k, v with case.value at one element of batch 0; returns them and where."""
    q, k, v = q.copy(), k.copy(), v.copy()
    d = int(rng.integers(0, q.shape[-1]))
    if case.tensor == "q":
        head = int(rng.integers(0, HQ))
        if case.where == "visible":
            index = int(rng.integers(first_row_with_keys(case), case.nq))
        else:
            index = int(rng.integers(0, case.nq - case.nkv))
        q[0, head, index, d] = case.value
    else:
        head = int(rng.integers(0, HKV))
        if case.where == "visible":
            index = 0 if case.causal else int(rng.integers(0, case.nkv))
        else:
            index = case.nkv - 1
        (k if case.tensor == "k" else v)[0, head, index, d] = case.value
    return q, k, v, dict(head=head, index=index, d=d)


def inputs(rng, nq, nkv, dtype=np.float32, batch=B):
    q = rng.standard_normal((batch, HQ, nq, D)).astype(dtype)
    k = rng.standard_normal((batch, HKV, nkv, D)).astype(dtype)
    v = rng.standard_normal((batch, HKV, nkv, D)).astype(dtype)
    return q, k, v


# ------------------------------------------------------------------ comparisons
def _first_difference(a: np.ndarray, b: np.ndarray):
    idx = np.argwhere(a != b)
    return tuple(int(i) for i in idx[0]) if idx.size else None


def assert_same_pattern(actual, expected, what: str, *, exact_kind: bool = False):
    """np.isfinite masks equal element for element (and NaN / +inf / -inf with exact_kind)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tests = [("finite", np.isfinite)]
    if exact_kind:
        tests += [("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)]
    for label, fn in tests:
        a, e = fn(actual), fn(expected)
        where = _first_difference(a, e)
        assert where is None, (f"{what}: {label} pattern differs at {where}: actual "
                               f"{actual[where]!r}, expected {expected[where]!r} "
                               f"({int(np.count_nonzero(a != e))} elements differ)")


def assert_outputs_match(o, lse, ro, rl, what, *, atol, rtol, exact_kind=False):
    """Same non-finite patterns (LSE: NaN and -inf exactly), finite values within tolerance."""
    assert_same_pattern(o, ro, f"{what} O", exact_kind=exact_kind)
    assert_same_pattern(lse, rl, f"{what} LSE", exact_kind=True)
    o, ro, lse, rl = (np.asarray(x, np.float64) for x in (o, ro, lse, rl))
    fin = np.isfinite(ro)
    ref.assert_allclose(o[fin], ro[fin], atol=atol, rtol=rtol, msg=f"{what} finite O")
    fin = np.isfinite(rl)
    ref.assert_allclose(lse[fin], rl[fin], atol=atol, rtol=rtol, msg=f"{what} finite LSE")


def assert_poison_reached(ro, rl, case: Case, info):
    """The reference really propagates the poisoned element where the policy says it must
    (so that comparing other backends' patterns with it is not vacuous)."""
    h, i, d = info["head"], info["index"], info["d"]
    pos = np.arange(case.nq) + case.nkv - case.nq
    if case.tensor == "q":
        if case.where == "visible":       # NaN, or +inf (every score then +-inf or NaN)
            assert np.isnan(ro[0, h, i]).all() and np.isnan(rl[0, h, i])
        else:                              # a row without keys: untouched
            assert not ro[0, h, i].any() and rl[0, h, i] == -INF
    else:
        heads = slice(h * GROUP, (h + 1) * GROUP)
        sees = (pos >= i) if case.causal else np.ones(case.nq, bool)
        sees = np.broadcast_to(sees, (GROUP, case.nq))
        if case.tensor == "k" and math.isnan(case.value):
            assert np.array_equal(np.isnan(ro[0, heads]).all(-1), sees)
            assert np.array_equal(np.isnan(rl[0, heads]), sees)
            assert np.isfinite(ro[0, heads][~sees]).all()
        elif case.tensor == "v":           # column d of the rows that see the key, only
            assert np.array_equal(~np.isfinite(ro[0, heads, :, d]), sees)
            assert np.isfinite(np.delete(ro[0, heads], d, axis=-1)).all()
            assert not np.isnan(rl[0, heads]).any()
    assert np.isfinite(ro[1:]).all() and not np.isnan(rl[1:]).any(), "batch 1 was never poisoned"


# ------------------------------------------------------------------ the policy, spelt out
def oracle(q, k, v, scale, causal):
    """Scalar loops over Python floats (IEEE) following the module doc of attnproto.ref
    literally: visible keys only, NaN-propagating max, p = exp(s - m), O = sum p v / l,
    LSE = m + log l; no visible key: (0, -inf)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, hq, nq, d = q.shape
    nkv, group = k.shape[2], q.shape[1] // k.shape[1]
    o = np.zeros((batch, hq, nq, v.shape[-1]))
    lse = np.full((batch, hq, nq), -INF)
    for b in range(batch):
        for h in range(hq):
            kh, vh = k[b, h // group].tolist(), v[b, h // group].tolist()
            for i, qi in enumerate(q[b, h].tolist()):
                keys = [j for j in range(nkv) if not causal or j <= i + nkv - nq]
                if not keys:
                    continue
                s = [scale * sum(a * c for a, c in zip(qi, kh[j])) for j in keys]
                m = NAN if any(math.isnan(x) for x in s) else max(s)
                p = [math.exp(x - m) for x in s]          # x - m <= 0, or NaN
                total = sum(p)
                lse[b, h, i] = m + math.log(total) if total > 0 else NAN
                for e in range(v.shape[-1]):
                    o[b, h, i, e] = sum(pj * vh[j][e] for pj, j in zip(p, keys)) / total
    return o, lse


def test_oracle_agrees_with_plain_numpy_on_finite_inputs(rng):
    q, k, v = inputs(rng, 7, 9, np.float64)
    for causal in (False, True):
        o, lse = oracle(q, k, v, 0.4, causal)
        ro, rl = ref.attention(q, k, v, scale=0.4, causal=causal, return_lse=True)
        np.testing.assert_allclose(o, ro, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse, rl, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", make_cases(CPU_SHAPES), ids=str)
def test_reference_follows_the_written_policy(rng, case):
    q, k, v = inputs(rng, case.nq, case.nkv, np.float64)
    q, k, v, info = poison(q, k, v, case, rng)
    ro, rl = ref.attention(q, k, v, scale=0.35, causal=case.causal, return_lse=True)
    oo, ol = oracle(q, k, v, 0.35, case.causal)
    assert_outputs_match(ro, rl, oo, ol, f"ref vs oracle [{case}]", atol=1e-12, rtol=1e-12,
                         exact_kind=True)
    assert_poison_reached(ro, rl, case, info)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_reference_v_special_values(value):
    """v_jd NaN: NaN; +-inf: +-inf where p_ij > 0 and NaN where p_ij underflowed to 0."""
    q = np.zeros((1, 1, 2, 2))
    q[0, 0, 1] = [800.0, 0.0]        # row 1: key 0 gets p = exp(-800 * 1) = 0 in float64
    k = np.array([[[[-1.0, 0.0], [0.0, 0.0]]]])
    v = np.array([[[[value, 1.0], [2.0, 3.0]]]])
    o, lse = ref.attention(q, k, v, scale=1.0, return_lse=True)
    assert np.isfinite(lse).all() and np.isfinite(o[..., 1]).all()
    if math.isnan(value):
        assert np.isnan(o[0, 0, :, 0]).all()
    else:
        assert o[0, 0, 0, 0] == value            # p = 1/2 > 0: inf / l = inf
        assert np.isnan(o[0, 0, 1, 0])           # p = 0: 0 * inf = NaN
    oo, ol = oracle(q, k, v, 1.0, False)
    assert_same_pattern(o, oo, "oracle", exact_kind=True)


def test_reference_row_of_only_minus_inf_scores_is_nan_not_empty():
    """+inf in q against negative keys: every visible score is -inf, m = -inf, so
    p = exp(-inf + inf) = NaN; only a row with no visible key is (0, -inf)."""
    q = np.array([[[[INF, 0.0], [1.0, 0.0]]]])
    k = np.array([[[[-1.0, 1.0], [-2.0, 1.0]]]])
    v = np.ones((1, 1, 2, 2))
    o, lse = ref.attention(q, k, v, scale=1.0, return_lse=True)
    assert np.isnan(o[0, 0, 0]).all() and np.isnan(lse[0, 0, 0])
    assert np.isfinite(o[0, 0, 1]).all() and np.isfinite(lse[0, 0, 1])
    o, lse = cpu.flash_forward(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                               block_r=1, block_c=1, scale=1.0)
    assert np.isnan(o[0, 0, 0]).all() and np.isnan(lse[0, 0, 0]) and np.isfinite(o[0, 0, 1]).all()


def test_alibi_and_rope_keep_the_policy(rng):
    q, k, v = inputs(rng, 9, 9, np.float64)
    k[0, 1, 4, 3] = NAN
    for kwargs in (dict(alibi=True), dict(rope=True)):
        ro, rl = ref.attention(q, k, v, causal=True, return_lse=True, **kwargs)
        sees = np.arange(9) >= 4
        for h in (2, 3):                                   # the query heads of kv head 1
            assert np.array_equal(np.isnan(rl[0, h]), sees)
            assert np.array_equal(np.isnan(ro[0, h]).all(axis=-1), sees)
        assert np.isfinite(ro[0, :2]).all() and np.isfinite(ro[1]).all()


# ------------------------------------------------------------------ CPU backend
TILES = ((1, 1), (4, 3), (8, 16), (32, 32))


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", make_cases(CPU_SHAPES), ids=str)
def test_cpu_flash_forward_matches_reference(rng, case, tile):
    q, k, v, info = poison(*inputs(rng, case.nq, case.nkv), case, rng)
    o, lse = cpu.flash_forward(q, k, v, block_r=tile[0], block_c=tile[1], causal=case.causal)
    ro, rl = ref.attention(q, k, v, causal=case.causal, return_lse=True)
    assert_poison_reached(ro, rl, case, info)
    assert_outputs_match(o, lse, ro, rl, f"cpu.flash_forward {tile} [{case}]",
                         atol=F32_ATOL, rtol=F32_RTOL)


@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", [c for c in make_cases(CPU_SHAPES[:2]) if c.causal], ids=str)
def test_cpu_flash_forward_half_inputs_and_p(rng, case, p_dtype):
    dtype = cpu.numpy_dtype(p_dtype)
    q, k, v = (x.astype(dtype) for x in inputs(rng, case.nq, case.nkv))
    q, k, v, _ = poison(q, k, v, case, rng)
    o, lse = cpu.flash_forward(q, k, v, block_r=4, block_c=8, causal=case.causal, p_dtype=p_dtype)
    ro, rl = ref.attention(q, k, v, causal=case.causal, return_lse=True)
    assert_outputs_match(o, lse, ro, rl, f"cpu {p_dtype} [{case}]", atol=1e-2, rtol=2e-2)


def paged_from(k, v, block_size, rng, fill=NAN):
    """k/v [B, Hkv, N, D] as a shuffled paged cache; every slot not holding a token (tail
    slots, spare blocks) is ``fill``, which the backends must never read."""
    batch, hkv, n, d = k.shape
    per_seq = -(-n // block_size)
    num_blocks = batch * per_seq + 3
    order = rng.permutation(num_blocks)
    k_cache = np.full((num_blocks, hkv, block_size, d), fill, dtype=k.dtype)
    v_cache = np.full_like(k_cache, fill)
    table = np.zeros((batch, per_seq), dtype=np.int32)
    for b in range(batch):
        for c in range(per_seq):
            blk = int(order[b * per_seq + c])
            table[b, c] = blk
            t0, t1 = c * block_size, min((c + 1) * block_size, n)
            k_cache[blk, :, :t1 - t0] = k[b, :, t0:t1]
            v_cache[blk, :, :t1 - t0] = v[b, :, t0:t1]
    return k_cache, v_cache, table, np.full(batch, n, dtype=np.int32)


@pytest.mark.parametrize("block_c", [None, 3])
@pytest.mark.parametrize("case", make_cases(CPU_SHAPES), ids=str)
def test_cpu_paged_forward_matches_reference(rng, case, block_c):
    q, k, v, info = poison(*inputs(rng, case.nq, case.nkv), case, rng)
    k_cache, v_cache, table, lens = paged_from(k, v, 4, rng)
    o, lse = cpu.paged_forward(q, k_cache, v_cache, table, lens, causal=case.causal,
                               block_c=block_c, block_r=4)
    ro, rl = ref.attention(q, k, v, causal=case.causal, return_lse=True)
    assert_outputs_match(o, lse, ro, rl, f"cpu.paged_forward [{case}]", atol=F32_ATOL,
                         rtol=F32_RTOL)
    po, pl = ref.paged_attention(q, k_cache, v_cache, table, lens, causal=case.causal,
                                 return_lse=True)
    assert_outputs_match(po, pl, ro, rl, f"ref.paged_attention [{case}]", atol=1e-12,
                         rtol=1e-12, exact_kind=True)


def test_paged_never_reads_unused_slots(rng):
    """The cache's spare blocks and tail slots are NaN and +inf: nothing of them shows."""
    q, k, v = inputs(rng, 5, 10)
    for fill in (NAN, INF):
        k_cache, v_cache, table, lens = paged_from(k, v, 4, rng, fill=fill)
        o, lse = cpu.paged_forward(q, k_cache, v_cache, table, lens, causal=True)
        assert np.isfinite(o).all() and np.isfinite(lse).all()
        po = ref.paged_attention(q, k_cache, v_cache, table, lens, causal=True)
        assert np.isfinite(po).all()


@pytest.mark.parametrize("partition_size", [4, 7])
@pytest.mark.parametrize("case", make_cases(CPU_SHAPES), ids=str)
def test_cpu_partitioned_matches_reference(rng, case, partition_size):
    q, k, v, _ = poison(*inputs(rng, case.nq, case.nkv), case, rng)
    o, lse = cpu.partitioned_forward(q, k, v, partition_size=partition_size, block_c=3,
                                     block_r=4, causal=case.causal)
    po, pl = ref.partitioned_attention(q, k, v, partition_size, causal=case.causal,
                                       return_lse=True)
    assert_outputs_match(o, lse, po, pl, f"cpu.partitioned_forward [{case}]", atol=F32_ATOL,
                         rtol=F32_RTOL)
    if math.isnan(case.value):
        # NaN reaches the same outputs as the one-pass formula (inf may not: see below).
        ro, rl = ref.attention(q, k, v, causal=case.causal, return_lse=True)
        assert_outputs_match(po, pl, ro, rl, f"partitioned vs attention [{case}]", atol=1e-12,
                             rtol=1e-12, exact_kind=True)


def test_partitioned_deviation_partition_of_only_minus_inf_scores():
    """The documented two-phase deviation: key 4 is the only key row 4 sees in partition 1
    (keys 4..7) and its score is -inf (k = -inf against q > 0). One pass gives it weight 0
    (finite row); the two-phase reduction sees a partition with m = -inf: NaN."""
    nq = nkv = 8
    q = np.full((1, 1, nq, 2), 0.5)
    k = np.full((1, 1, nkv, 2), 0.25)
    k[0, 0, 4, 0] = -INF
    v = np.ones((1, 1, nkv, 2))
    ro, rl = ref.attention(q, k, v, causal=True, return_lse=True)
    assert np.isfinite(ro).all() and np.isfinite(rl).all()
    po, pl = ref.partitioned_attention(q, k, v, 4, causal=True, return_lse=True)
    co, cl = cpu.partitioned_forward(q.astype(np.float32), k.astype(np.float32),
                                     v.astype(np.float32), partition_size=4, causal=True)
    for o, lse, name in ((po, pl, "ref"), (co, cl, "cpu")):
        assert np.isnan(o[0, 0, 4]).all() and np.isnan(lse[0, 0, 4]), name
        others = np.arange(nq) != 4
        assert np.isfinite(o[0, 0, others]).all() and np.isfinite(lse[0, 0, others]).all(), name


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_reduce_partitions_policy(backend):
    reduce = ref.reduce_partitions if backend == "ref" else cpu.reduce_partitions
    o_parts = np.ones((4, 3, 2))
    lse_parts = np.array([[0.0, 1.0, -INF],        # partition 2 saw no key: its o_p unread
                          [0.0, NAN, 1.0],         # a NaN lse: the row is NaN
                          [-INF, -INF, -INF],      # no partition saw a key: (0, -inf)
                          [0.0, -800.0, 1.0]])     # weight 0 but o_p NaN in column 1
    o_parts[0, 2] = NAN
    o_parts[2] = NAN
    o_parts[3, 1, 1] = NAN
    o, lse = reduce(o_parts.astype(np.float32) if backend == "cpu" else o_parts,
                    lse_parts.astype(np.float32) if backend == "cpu" else lse_parts)
    assert np.allclose(o[0], 1.0) and np.isclose(lse[0], np.log(1 + np.e))
    assert np.isnan(o[1]).all() and np.isnan(lse[1])
    assert np.array_equal(o[2], [0.0, 0.0]) and lse[2] == -INF
    assert np.isfinite(o[3, 0]) and np.isnan(o[3, 1]) and np.isfinite(lse[3])


# ------------------------------------------------------------------ all-masked rows
def _no_key_rows_poisoned(rng, nq=9, nkv=4, dtype=np.float32):
    q, k, v = inputs(rng, nq, nkv, dtype)
    q[:, :, :nq - nkv] = NAN                     # rows that see no key: NaN queries
    k[:, :, -1, 0] = INF                         # bad keys / values the rows cannot see
    v[:, :, -1, 1] = NAN
    return q, k, v, nq - nkv


def _assert_no_key_rows_empty(o, lse, rows, what):
    assert np.array_equal(np.asarray(o)[:, :, :rows], np.zeros_like(np.asarray(o)[:, :, :rows])), \
        f"{what}: O of rows without keys is not exactly 0"
    assert np.all(np.asarray(lse)[:, :, :rows] == -INF), f"{what}: LSE of rows without keys is not -inf"


def test_rows_without_keys_stay_zero_and_minus_inf(rng):
    q, k, v, rows = _no_key_rows_poisoned(rng)
    ro, rl = ref.attention(q, k, v, causal=True, return_lse=True)
    _assert_no_key_rows_empty(ro, rl, rows, "ref.attention")
    assert not np.isfinite(ro[:, :, -1]).all()          # the last row does see the bad key
    for tile in TILES:
        o, lse = cpu.flash_forward(q, k, v, block_r=tile[0], block_c=tile[1], causal=True)
        _assert_no_key_rows_empty(o, lse, rows, f"cpu.flash_forward {tile}")
        assert_outputs_match(o, lse, ro, rl, f"cpu {tile}", atol=F32_ATOL, rtol=F32_RTOL)
    k_cache, v_cache, table, lens = paged_from(k, v, 2, rng)
    o, lse = cpu.paged_forward(q, k_cache, v_cache, table, lens, causal=True)
    _assert_no_key_rows_empty(o, lse, rows, "cpu.paged_forward")
    o, lse = ref.paged_attention(q, k_cache, v_cache, table, lens, causal=True, return_lse=True)
    _assert_no_key_rows_empty(o, lse, rows, "ref.paged_attention")
    o, lse = cpu.partitioned_forward(q, k, v, partition_size=2, causal=True)
    _assert_no_key_rows_empty(o, lse, rows, "cpu.partitioned_forward")
    o, lse = ref.partitioned_attention(q, k, v, 2, causal=True, return_lse=True)
    _assert_no_key_rows_empty(o, lse, rows, "ref.partitioned_attention")


def test_no_key_rows_of_paged_sequences_of_length_zero(rng):
    q, k, v = inputs(rng, 3, 8)
    k_cache, v_cache, table, lens = paged_from(k, v, 4, rng)
    lens[1] = 0
    q[1] = NAN
    o, lse = cpu.paged_forward(q, k_cache, v_cache, table, lens, causal=True)
    _assert_no_key_rows_empty(o[1:], lse[1:], 3, "cpu.paged_forward, empty sequence")
    o, lse = ref.paged_attention(q, k_cache, v_cache, table, lens, causal=True, return_lse=True)
    _assert_no_key_rows_empty(o[1:], lse[1:], 3, "ref.paged_attention, empty sequence")


# ------------------------------------------------------------------ torch's math SDPA
def _torch_math_sdpa(torch, q, k, v, causal):
    """torch.nn.functional.scaled_dot_product_attention, math backend, GQA expanded,
    bottom-right causal mask as a bool attn_mask (torch's is_causal is top-left)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    tq, tk, tv = (torch.from_numpy(np.asarray(x, np.float64)) for x in (q, k, v))
    tk, tv = tk.repeat_interleave(GROUP, dim=1), tv.repeat_interleave(GROUP, dim=1)
    nq, nkv = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = torch.ones(nq, nkv, dtype=torch.bool).tril(diagonal=nkv - nq)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    return out.numpy()


def _visible_scores_all_minus_inf(q, k, causal):
    """Rows that have keys but whose every visible score is -inf (an inf input)."""
    with np.errstate(invalid="ignore"):
        s = np.asarray(q, np.float64) @ np.swapaxes(np.repeat(np.asarray(k, np.float64), GROUP, 1), -1, -2)
    nq, nkv = q.shape[2], k.shape[2]
    vis = ref.causal_mask(nq, nkv) if causal else np.ones((nq, nkv), bool)
    return vis.any(-1) & np.all(np.where(vis, s == -INF, True), axis=-1)


def _torch_convention_matches(case: Case) -> bool:
    """Where torch's math SDPA and this policy agree on which O elements are non-finite:
    without a mask; under causal, a bad q in a row that has keys, and a bad k or v at key 0
    when every query row sees it (Nq <= Nkv). torch masks additively (-inf + NaN = NaN) and
    multiplies masked p = 0 into V (0 * NaN = NaN), so elsewhere a bad value reaches rows
    that cannot see it: test_torch_math_sdpa_documented_differences pins that down."""
    if not case.causal:
        return True
    if case.tensor == "q":
        return case.where == "visible"
    return case.where == "visible" and case.nq <= case.nkv


TORCH_SHAPES = ((13, 13), (6, 19), (19, 6))


@pytest.mark.parametrize("case", [c for c in make_cases(TORCH_SHAPES) if _torch_convention_matches(c)],
                         ids=str)
def test_torch_math_sdpa_pattern(rng, case):
    torch = pytest.importorskip("torch")
    q, k, v, _ = poison(*inputs(rng, case.nq, case.nkv, np.float64), case, rng)
    ro = ref.attention(q, k, v, causal=case.causal)
    to = _torch_math_sdpa(torch, q, k, v, case.causal)
    # torch's safe softmax treats a row whose every score is -inf as fully masked (0); the
    # policy makes it NaN (the row has keys; m = -inf). Only an inf input makes such rows.
    expected = ro.copy()
    expected[_visible_scores_all_minus_inf(q, k, case.causal)] = 0.0
    assert_same_pattern(to, expected, f"torch math SDPA [{case}]")
    fin = np.isfinite(expected)
    np.testing.assert_allclose(to[fin], expected[fin], rtol=1e-10, atol=1e-10)


def test_torch_math_sdpa_documented_differences(rng):
    """Where torch's convention differs, the difference is exactly the documented one.

    * rows without keys: torch (safe softmax) gives O = 0, like this policy, but a NaN
      query there gives NaN in torch (NaN + the -inf mask is NaN) and 0 here;
    * a NaN in k at a key masked out for some rows: EVERY row of those heads is NaN in
      torch (additive mask), only the rows that see the key here;
    * a NaN in v at a masked key: column d of EVERY row is NaN in torch (p = 0 times NaN),
      rows without keys included; here only the rows that see the key;
    * a row with keys whose every score is -inf (+inf in q): 0 in torch, NaN here.
    """
    torch = pytest.importorskip("torch")
    nq, nkv, j, d = 9, 6, 5, 2
    rows = nq - nkv
    q, k, v = inputs(rng, nq, nkv, np.float64)
    to = _torch_math_sdpa(torch, q, k, v, True)
    assert np.array_equal(to[:, :, :rows], np.zeros_like(to[:, :, :rows]))
    sees = np.broadcast_to(np.arange(nq) + nkv - nq >= j, (GROUP, nq))
    heads = slice(0, GROUP)                                  # query heads of kv head 0

    qq = q.copy()
    qq[0, 1, 0, d] = NAN                                     # row 0 sees no key
    assert not ref.attention(qq, k, v, causal=True)[0, 1, 0].any()
    assert np.isnan(_torch_math_sdpa(torch, qq, k, v, True)[0, 1, 0]).all()

    kk = k.copy()
    kk[0, 0, j, d] = NAN
    ours = ref.attention(q, kk, v, causal=True)
    theirs = _torch_math_sdpa(torch, q, kk, v, True)
    assert np.array_equal(np.isnan(ours[0, heads]).all(-1), sees)
    assert np.isfinite(ours[0, heads][~sees]).all()
    assert np.isnan(theirs[0, heads]).all()
    assert np.isfinite(theirs[0, GROUP:]).all() and np.isfinite(theirs[1]).all()

    vv = v.copy()
    vv[0, 0, j, d] = NAN
    ours = ref.attention(q, k, vv, causal=True)
    theirs = _torch_math_sdpa(torch, q, k, vv, True)
    assert np.array_equal(np.isnan(ours[0, heads, :, d]), sees)
    assert np.isnan(theirs[0, heads, :, d]).all()
    assert np.isfinite(np.delete(theirs[0, heads], d, axis=-1)).all()
    assert np.isfinite(theirs[0, GROUP:]).all()

    qi = np.array([[[[INF, 0.0], [1.0, 0.0]]]])              # row 0: scores -inf, -inf
    ki = np.array([[[[-1.0, 1.0], [-2.0, 1.0]]]])
    vi = np.ones((1, 1, 2, 2))
    ours = ref.attention(qi, ki, vi)
    with_torch = _torch_math_sdpa(torch, qi, np.repeat(ki, GROUP, 1)[:, :1], vi, False)
    assert np.isnan(ours[0, 0, 0]).all() and np.array_equal(with_torch[0, 0, 0], [0.0, 0.0])
    np.testing.assert_allclose(with_torch[0, 0, 1], ours[0, 0, 1], rtol=1e-12)


# ------------------------------------------------------------------ CUDA kernels
GPU_SHAPES = ((700, 700), (300, 700), (700, 300))
GPU_HEAD_DIMS = (64, 128, 256)
GPU_ATOL, GPU_RTOL = 5e-3, 1e-2
# Outputs are pre-filled with these finite values, so an element the kernel never writes
# shows (a NaN pre-fill would hide exactly what these tests look for). O is a convex
# combination of N(0, 1) values (|O| < 7 by far); LSE is at most log(Nkv) + max|s| << 1e4.
O_SENTINEL, LSE_SENTINEL = 7.0, 12345.0
# A non-finite V at a key masked out for row i can reach O[i, d] through 0 * NaN in the
# tensor-core P V (documented in attnproto.ref) only if row i's CTA visits the key's tile:
# the key lies fewer than BLOCK_R + BLOCK_C positions right of row i (<= 128 + 192 for
# every config of both kernels). Rows further left must stay clean.
TILE_REACH = 512


def allow_masked_v_reach(o, ro, poisoned, nq, nkv, what):
    """The documented kernel deviation for a non-finite v[b, kv_head, key, d] at a key some
    rows cannot see: O[b, h, i, d] may be non-finite beyond the reference only for the
    query heads h of that kv head, in column d, in rows that have keys and lie within
    TILE_REACH positions left of the key. Checks that, and that no element the reference
    makes non-finite came out finite; returns the reference with those elements taken
    from ``o`` (so the pattern comparison can then be exact)."""
    extra = ~np.isfinite(o) & np.isfinite(ro)
    pos = np.arange(nq) + nkv - nq
    allowed = np.zeros_like(extra)
    for b, kv_head, key, d in poisoned:
        allowed[b, kv_head * GROUP:(kv_head + 1) * GROUP, :, d] |= (pos >= key - TILE_REACH) & (pos >= 0)
    assert not (extra & ~allowed).any(), \
        f"{what}: non-finite O outside the documented tile reach at {np.argwhere(extra & ~allowed)[0]}"
    assert not (np.isfinite(o) & ~np.isfinite(ro)).any(), f"{what}: a non-finite O came out finite"
    return np.where(extra, o, ro)


def _gpu_case_list():
    return make_cases(GPU_SHAPES)


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_case_list(), ids=str)
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
def test_cuda_kernels_follow_the_policy(torch_cuda, kernel, dtype, head_dim, case):
    torch = torch_cuda
    if kernel == "wgmma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"wgmma needs an sm_90 GPU, got sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    from attnproto.ops import flash_forward  # noqa: PLC0415

    seed = int.from_bytes(os.urandom(8), "little") >> 1
    rng = np.random.default_rng(seed)
    tdt = getattr(torch, dtype)
    host = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(tdt)
            for shape in ((1, HQ, case.nq, head_dim), (1, HKV, case.nkv, head_dim),
                          (1, HKV, case.nkv, head_dim))]
    d = int(rng.integers(0, head_dim))
    tensor = dict(q=0, k=1, v=2)[case.tensor]
    if case.tensor == "q":
        head = int(rng.integers(0, HQ))
        lo, hi = (first_row_with_keys(case), case.nq) if case.where == "visible" else (0, case.nq - case.nkv)
        index = int(rng.integers(lo, hi))
    else:
        head = int(rng.integers(0, HKV))
        index = (0 if case.causal else int(rng.integers(0, case.nkv))) if case.where == "visible" \
            else case.nkv - 1
    host[tensor][0, head, index, d] = case.value
    q, k, v = (x.cuda() for x in host)
    out = torch.full(q.shape, O_SENTINEL, dtype=tdt, device="cuda")
    lse = torch.full(q.shape[:3], LSE_SENTINEL, dtype=torch.float32, device="cuda")
    o_ret, lse_ret = flash_forward(q, k, v, causal=case.causal, kernel=kernel, out=out, lse=lse)
    torch.cuda.synchronize()
    assert o_ret.data_ptr() == out.data_ptr() and lse_ret.data_ptr() == lse.data_ptr()
    what = f"{kernel} {dtype} D={head_dim} [{case}] seed={seed} at {case.tensor}[0,{head},{index},{d}]"

    o = out.float().cpu().numpy().astype(np.float64)
    lse_np = lse.cpu().numpy().astype(np.float64)
    ro, rl = ref.attention(*host, causal=case.causal, return_lse=True)
    if case.tensor == "v" and case.where == "masked":
        ro = allow_masked_v_reach(o, ro, [(0, head, index, d)], case.nq, case.nkv, what)
    assert not np.any(lse_np == LSE_SENTINEL), f"{what}: LSE elements left unwritten"
    assert not np.any(o == O_SENTINEL), f"{what}: O elements left unwritten"
    assert_outputs_match(o, lse_np, ro, rl, what, atol=GPU_ATOL, rtol=GPU_RTOL)
    rows = max(0, case.nq - case.nkv) if case.causal else 0
    if rows:
        _assert_no_key_rows_empty(o, lse_np, rows, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
def test_cuda_rows_without_keys_stay_zero(torch_cuda, kernel, dtype):
    """Causal Nq > Nkv: NaN queries in the rows that see no key, NaN / inf in V and K at a
    key those rows cannot see (in a tile the CTA does process): O = 0 exactly, LSE = -inf."""
    torch = torch_cuda
    if kernel == "wgmma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("wgmma needs an sm_90 GPU")
    from attnproto.ops import flash_forward  # noqa: PLC0415

    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little") >> 1)
    nq, nkv, head_dim = 200, 40, 128
    q = rng.standard_normal((1, HQ, nq, head_dim)).astype(np.float32)
    k = rng.standard_normal((1, HKV, nkv, head_dim)).astype(np.float32)
    v = rng.standard_normal((1, HKV, nkv, head_dim)).astype(np.float32)
    rows = nq - nkv
    q[:, :, :rows] = NAN
    k[:, :, 3, 5] = INF
    v[:, :, 3, 7] = NAN
    tdt = getattr(torch, dtype)
    tq, tk, tv = (torch.from_numpy(x).to(tdt).cuda() for x in (q, k, v))
    out = torch.full(tq.shape, O_SENTINEL, dtype=tdt, device="cuda")
    lse = torch.full(tq.shape[:3], LSE_SENTINEL, dtype=torch.float32, device="cuda")
    flash_forward(tq, tk, tv, causal=True, kernel=kernel, out=out, lse=lse)
    torch.cuda.synchronize()
    o, lse_np = out.float().cpu().numpy(), lse.cpu().numpy()
    assert not np.any(o == O_SENTINEL) and not np.any(lse_np == LSE_SENTINEL), "unwritten outputs"
    _assert_no_key_rows_empty(o, lse_np, rows, f"{kernel} {dtype}")
    ro, rl = ref.attention(tq.cpu(), tk.cpu(), tv.cpu(), causal=True, return_lse=True)
    ro = allow_masked_v_reach(o, ro, [(0, h, 3, 7) for h in range(HKV)], nq, nkv, f"{kernel} {dtype}")
    assert_outputs_match(o, lse_np, ro, rl, f"{kernel} {dtype}", atol=GPU_ATOL, rtol=GPU_RTOL)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stitch_modes_bit_identical_to_mma_on_non_finite_inputs(torch_cuda, cuda, dtype, causal):
    """Prototype 2's stitched kernel stays the same computation as flash_fwd_mma with NaN /
    inf inputs too: every dispatch mode writes the same bits (NaN payloads included)."""
    torch = torch_cuda
    from attnproto.ops import flash, stitch  # noqa: PLC0415

    seed = int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)
    nq, nkv, head_dim = 333, 200, 128
    q = torch.randn(1, HQ, nq, head_dim, generator=gen).to(tdt)
    k = torch.randn(1, HKV, nkv, head_dim, generator=gen).to(tdt)
    v = torch.randn(1, HKV, nkv, head_dim, generator=gen).to(tdt)
    q[0, 0, 250, 3], q[0, 1, 300, 0] = NAN, INF
    k[0, 1, 100, 2], k[0, 0, 30, 4] = NAN, -INF
    v[0, 0, 150, 9], v[0, 1, 20, 1] = NAN, INF
    q, k, v = q.cuda(), k.cuda(), v.cuda()

    def bits(launch):
        o, lse = launch.launch()
        torch.cuda.synchronize()
        return o.view(torch.int16).clone(), lse.view(torch.int32).clone()

    prod_o, prod_lse = bits(flash.prepare_forward(q, k, v, causal=causal, kernel="mma", backend=cuda))
    assert not torch.isfinite(prod_o.view(tdt)).all(), "the poison did not reach O"
    for mode in stitch.MODES:
        o, lse = bits(stitch.prepare(q, k, v, mode, causal=causal, backend=cuda))
        assert torch.equal(o, prod_o), f"seed={seed} mode {mode}: {int((o != prod_o).sum())} O bits differ"
        assert torch.equal(lse, prod_lse), f"seed={seed} mode {mode}: LSE bits differ"
