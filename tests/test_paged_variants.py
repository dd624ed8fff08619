"""The Prototype 7 variants (ALiBi with standard or given slopes, a left sliding window, a logit
soft cap, and their combinations) on the paged kernels (issue 12).

CPU (always): attnproto.cpu.paged_forward, ref.paged_attention and the torch ops' CPU path against
the FP64 reference of each sequence's contiguous K/V (odd context lengths, block sizes 1 / 16 / 128,
GQA, decode and prefill query counts, windows of 1 token / one page / longer than the context); the
argument errors, each naming its argument; RoPE refused with the reason; the windowed partition
rule; NVRTC compiles of every new specialisation (and the static_assert refusing RoPE).

GPU (marked gpu; paged prefill needs sm_90): paged_prefill and paged_decode with each variant and
combinations against FP64, NaN-poisoned outputs, NaN in every unused pool slot, scattered tables,
split and unsplit decode; our error at most SDPA_FACTOR x torch's own implementation of the same
variant on the same inputs (tests/test_variants_gpu.py torch_variant), plus the output rounding.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from attnproto import cpu, ref
from attnproto.ops import variants
from attnproto.ops.families import paged_decode as fam
from attnproto.ops.paged_problem import PagedProblem

# float32 arithmetic against FP64 (the CPU backend's bound, tests/test_cpu_backend.py)
FP32_ATOL, FP32_RTOL = 2e-5, 2e-5
SOFTCAP = 5.0                 # small enough that the cap changes the scores of unit-variance inputs
# GPU: a cap the scores of unit-variance inputs approach (the kernels' tanh.approx error grows with
# |logit|; tests/test_variants_gpu.py gates the flash kernels at 50)
GPU_SOFTCAP = 10.0
ALIBI_MAX_BIAS = 8.0
HUGE_WINDOW = 10**6           # longer than every context here: hides nothing
SPARE = 3                     # NaN-filled spare blocks: unused table entries point at them

# (label, cpu/ref keywords without the slopes; "slopes" marks given slopes)
CPU_VARIANTS = [
    ("alibi", dict(alibi=True)),
    ("alibi-bias4", dict(alibi=True, alibi_max_bias=4.0)),
    ("alibi-slopes", dict(alibi=True, slopes=True)),
    ("window1", dict(window=1)),
    ("window-page", dict(window="page")),
    ("window-huge", dict(window=HUGE_WINDOW)),
    ("window7", dict(window=7)),
    ("softcap", dict(softcap=SOFTCAP)),
    ("alibi+window+softcap", dict(alibi=True, window=9, softcap=SOFTCAP)),
    ("slopes+window-page+softcap", dict(alibi=True, slopes=True, window="page", softcap=SOFTCAP)),
]


def _resolve(kw, hq, block_size, rng):
    """Host keywords of a CPU_VARIANTS entry: the slopes drawn, "page" as the block size."""
    out = {k: v for k, v in kw.items() if k != "slopes"}
    if out.get("window") == "page":
        out["window"] = block_size
    if kw.get("slopes"):
        out["alibi_slopes"] = (rng.random(hq) * 0.5 + 0.01).astype(np.float32)
    return out


def _host_pool(rng, k, v, lens, block_size):
    """Contiguous float32 [B, Hkv, N, D] -> scattered [num_blocks, Hkv, block_size, D] pools (unused
    slots and spare blocks NaN) and the int32 table (unused entries on a NaN spare block)."""
    b, hkv, _, d = k.shape
    used = [-(-int(n) // block_size) for n in lens]
    nb = sum(used) + SPARE
    ids = rng.permutation(nb)
    width = max(1, max(used))
    table = np.full((b, width), ids[-1], dtype=np.int32)
    pools = [np.full((nb, hkv, block_size, d), np.nan, dtype=np.float32) for _ in range(2)]
    pos = 0
    for i, n in enumerate(lens):
        for j in range(used[i]):
            blk = int(ids[pos])
            table[i, j] = blk
            pos += 1
            t0, t1 = j * block_size, min(int(n), (j + 1) * block_size)
            for pool, src in zip(pools, (k, v)):
                pool[blk, :, :t1 - t0] = src[i, :, t0:t1]
    return pools[0], pools[1], table


def _per_sequence_ref(q, k, v, lens, *, causal, **kw):
    """FP64 attention of every sequence's contiguous keys (its queries bottom-right aligned)."""
    o = np.zeros(q.shape)
    lse = np.full(q.shape[:3], -np.inf)
    for i, n in enumerate(lens):
        if n:
            o_b, l_b = ref.attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], causal=causal,
                                     return_lse=True, **kw)
            o[i], lse[i] = o_b[0], l_b[0]
    return o, lse


def _assert_close(o, lse, o_ref, lse_ref, label):
    ref.assert_allclose(o, o_ref, atol=FP32_ATOL, rtol=FP32_RTOL, msg=f"{label} O")
    ref.assert_allclose(lse, lse_ref, atol=FP32_ATOL, rtol=FP32_RTOL, msg=f"{label} LSE")


@pytest.fixture
def rng(request):
    """A generator seeded by the test's id: fresh inputs per case, reproducible per case."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _inputs(rng, b, hq, hkv, nq, n, d):
    mk = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, n, d), mk(b, hkv, n, d)


# ---------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("label, kw", CPU_VARIANTS, ids=[c[0] for c in CPU_VARIANTS])
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("nq", [1, 5])
def test_cpu_paged_forward_variants_match_fp64(rng, label, kw, block_size, nq):
    lens = [37, 1, 131, 0, 3]                     # odd lengths, a length below Nq, an empty sequence
    q, k, v = _inputs(rng, len(lens), 4, 2, nq, max(lens), 16)
    kc, vc, table = _host_pool(rng, k, v, lens, block_size)
    hkw = _resolve(kw, 4, block_size, rng)
    causal = nq > 1
    o, lse = cpu.paged_forward(q, kc, vc, table, np.array(lens, dtype=np.int32), causal=causal, **hkw)
    o_ref, lse_ref = _per_sequence_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), lens,
                                       causal=causal, **hkw)
    _assert_close(o, lse, o_ref, lse_ref, f"cpu.paged_forward {label}")
    po, pl = ref.paged_attention(q, kc, vc, table, np.array(lens, dtype=np.int32), causal=causal,
                                 return_lse=True, **hkw)
    np.testing.assert_allclose(po, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isfinite(pl), np.isfinite(lse_ref))
    assert not np.any(o[3]) and np.all(lse[3] == -np.inf), "an empty sequence gives (0, -inf)"


def test_cpu_window_of_one_sees_only_its_own_key(rng):
    """Decode with window 1: O is the V row at the query's position, exactly (a test the window
    cannot pass by accident)."""
    lens = [29, 64]
    q, k, v = _inputs(rng, 2, 4, 2, 1, 64, 16)
    kc, vc, table = _host_pool(rng, k, v, lens, 16)
    o, lse = cpu.paged_forward(q, kc, vc, table, np.array(lens, dtype=np.int32), window=1)
    for i, n in enumerate(lens):
        np.testing.assert_array_equal(o[i, :, 0], np.repeat(v[i, :, n - 1], 2, axis=0))
    full, _ = cpu.paged_forward(q, kc, vc, table, np.array(lens, dtype=np.int32))
    assert not np.allclose(o, full), "the window changed nothing"


def test_cpu_variants_change_the_result(rng):
    """Each variant moves the output away from the base attention (so the comparisons above test it)."""
    lens = [70, 45]
    q, k, v = _inputs(rng, 2, 4, 2, 3, 70, 16)
    q *= 3.0                                      # scores of several units: the soft cap bites
    kc, vc, table = _host_pool(rng, k, v, lens, 16)
    args = (q, kc, vc, table, np.array(lens, dtype=np.int32))
    base, _ = cpu.paged_forward(*args, causal=True)
    for kw in (dict(alibi=True), dict(window=8), dict(softcap=SOFTCAP)):
        o, _ = cpu.paged_forward(*args, causal=True, **kw)
        assert np.abs(o - base).max() > 1e-3, kw


@pytest.mark.parametrize("call", ["cpu", "ref"])
def test_argument_errors_name_the_argument(rng, call):
    lens = np.array([5, 9], dtype=np.int32)
    q, k, v = _inputs(rng, 2, 4, 2, 1, 9, 16)
    kc, vc, table = _host_pool(rng, k, v, lens, 8)
    fn = cpu.paged_forward if call == "cpu" else ref.paged_attention
    cases = [
        (dict(window=0), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap="big"), TypeError, "softcap"),
        (dict(alibi=True, alibi_slopes=np.ones(3, np.float32)), ValueError, "alibi_slopes"),
        (dict(alibi=True, alibi_slopes=np.array([1, np.nan, 1, 1], np.float32)), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=np.ones(4, np.float32)), ValueError, "alibi_slopes"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=rf"^{name}"):
            fn(q, kc, vc, table, lens, **kw)


def _torch():
    return pytest.importorskip("torch")


def _nhd_pool(rng, k, v, lens, block_size):
    t = _torch()
    kc, vc, table = _host_pool(rng, k, v, lens, block_size)
    nhd = lambda x: t.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))  # noqa: E731
    return nhd(kc), nhd(vc), t.from_numpy(table), t.tensor(lens, dtype=t.int32)


@pytest.mark.parametrize("op", ["paged_decode", "paged_prefill"])
def test_torch_ops_cpu_path_takes_the_variants(rng, op):
    t = _torch()
    from attnproto.integrations import torch_ops  # noqa: F401  (registers the ops)

    nq = 3 if op == "paged_decode" else 6
    lens = [23, 40]
    q, k, v = _inputs(rng, 2, 4, 2, nq, 40, 16)
    kc, vc, table, lens_t = _nhd_pool(rng, k, v, lens, 16)
    slopes = (rng.random(4) * 0.5 + 0.01).astype(np.float32)
    args = (t.from_numpy(q), kc, vc, table, lens_t, None, True, t.from_numpy(slopes), 5, SOFTCAP)
    o, lse = getattr(t.ops.attnproto, op)(*args)
    o_ref, lse_ref = _per_sequence_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), lens,
                                       causal=True, alibi=True, alibi_slopes=slopes, window=5, softcap=SOFTCAP)
    _assert_close(o.numpy(), lse.numpy(), o_ref, lse_ref, f"torch.ops.attnproto.{op}")
    t.library.opcheck(getattr(t.ops.attnproto, op).default, args)


def _problem(q, hq=8, hkv=2, nq=1, d=128, bs=16, blocks=64, batch=1):
    return PagedProblem(q, None, None, None, None, batch, hq, hkv, nq, d, batch * blocks, bs, blocks, "bfloat16",
                        "nhd", d ** -0.5, (0, 0, 0), (0, 0, 0), (0, 0, 0))


def test_front_door_variant_checks_run_before_any_device_work():
    t = _torch()
    from attnproto.ops import paged

    p = _problem(t.zeros(1, 8, 1, 128, dtype=t.bfloat16))
    variant, values = paged.check_paged_variant(p, alibi=True, window=3, softcap=30.0)
    assert variant == variants.Variant(alibi="standard", window=True, softcap=True)
    assert (values.window, values.softcap, values.alibi_max_bias) == (3, 30.0, ALIBI_MAX_BIAS)
    # a window past the capacity hides nothing: clamped (32-bit position arithmetic stays safe)
    assert paged.check_paged_variant(p, window=HUGE_WINDOW)[1].window == p.capacity
    prm = paged._params_of(p, values=values)
    assert (int(prm["window"]), float(prm["softcap"]), float(prm["alibi_max_bias"])) == (3, 30.0, ALIBI_MAX_BIAS)
    assert paged.check_paged_variant(p)[0].is_base
    for kw, exc, match in [
        (dict(rope=True), ValueError, "rope: paged K is stored rotated; use rope_append / fused_prefill"),
        (dict(rope="half"), ValueError, "rope: paged K is stored rotated"),
        (dict(rope="sideways"), ValueError, "^rope"),
        (dict(window=0), ValueError, "^window"),
        (dict(softcap=0.0), ValueError, "^softcap"),
        (dict(alibi=True, alibi_max_bias=float("nan")), ValueError, "^alibi_max_bias"),
        (dict(alibi=t.ones(7)), ValueError, "^alibi: expected shape"),
        (dict(alibi=t.ones(8, dtype=t.float64)), TypeError, "^alibi: expected float32"),
    ]:
        with pytest.raises(exc, match=match):
            paged.check_paged_variant(p, **kw)
    slopes = t.rand(8)
    assert paged.check_paged_variant(p, alibi=slopes)[1].alibi_slopes is slopes


def test_decode_constants_refuse_rope_and_carry_the_variant():
    cfg = fam.choose_config(128, 1, 4)[0]
    p = _problem(None, hq=8, hkv=2)
    with pytest.raises(ValueError, match="^rope: .*stored rotated"):
        fam.constants(p, cfg, True, variants.Variant(rope="half"))
    consts = fam.constants(p, cfg, True, variants.Variant(alibi="slopes", window=True))
    assert (consts["ALIBI"], consts["WINDOW"], consts["SOFTCAP"], consts["ROPE"]) == (2, 1, 0, 0)
    assert fam.constants(p, cfg, False) == fam.constants(p, cfg, False, variants.BASE)


def test_prefill_layout_refuses_rope_and_sets_the_variant_fields():
    t = _torch()
    from attnproto.ops import paged_prefill_wgmma as pp

    q = t.zeros(2, 8, 64, 128, dtype=t.bfloat16)
    k = t.zeros(8, 16, 2, 128, dtype=t.bfloat16)
    table = t.zeros(2, 4, dtype=t.int32)
    out, lse = t.empty_like(q), t.empty(2, 8, 64)
    var = variants.Variant(alibi="standard", window=True, softcap=True)
    vals = variants.VariantValues(window=17, softcap=20.0, alibi_max_bias=4.0)
    lay = pp.paged_layout(q, k, k, table, scale=0.1, causal=True, out=out, lse=lse, variant=var, values=vals)
    assert (lay.constants["ALIBI"], lay.constants["WINDOW"], lay.constants["SOFTCAP"]) == (1, 1, 1)
    assert (int(lay.params["window"]), float(lay.params["softcap"]), float(lay.params["alibi_max_bias"])) == \
        (17, 20.0, 4.0)
    base = pp.paged_layout(q, k, k, table, scale=0.1, causal=True, out=out, lse=lse)
    assert all(base.constants[c] == 0 for c in ("ROPE", "ROPE_TABLE", "ALIBI", "WINDOW", "SOFTCAP"))
    with pytest.raises(ValueError, match="^rope: paged K is stored rotated"):
        pp.paged_layout(q, k, k, table, scale=0.1, causal=True, out=out, lse=lse,
                        variant=variants.Variant(rope="half"))


def test_windowed_partition_rule_sizes_partitions_over_the_window():
    cfg = fam.choose_config(128, 1, 4)[0]
    p = _problem(None, hq=32, hkv=8, blocks=2048)            # B = 1, 32K tokens of capacity
    parts, size, _ = fam.partition_plan(p, cfg, 132)
    w_parts, w_size, why = fam.partition_plan(p, cfg, 132, window=512)
    assert w_size < size and w_size % cfg.tile_keys == 0 and "window" in why
    assert w_parts * w_size >= p.capacity and w_parts <= fam.MAX_PARTITIONS
    assert math.ceil(512 / w_size) > 1, "the window's span is split over several partitions"
    # a tiny window over a huge capacity: partitions grow so the grid stays within MAX_PARTITIONS
    huge = _problem(None, hq=32, hkv=8, blocks=2**16)
    g, s, _ = fam.partition_plan(huge, cfg, 132, window=64)
    assert g <= fam.MAX_PARTITIONS and g * s >= huge.capacity
    # a window wider than the context sizes nothing differently
    assert fam.partition_plan(p, cfg, 132, window=p.capacity)[:2] == (parts, size)


def test_new_specialisations_are_listed():
    from attnproto import kernels
    from attnproto.ops import paged_prefill_wgmma as pp

    specs = kernels.all_specialisations()
    decode = {(c["ALIBI"], c["WINDOW"], c["SOFTCAP"]) for n, c in specs if n == fam.KERNEL}
    want = {(variants.ALIBI_CODES[v.alibi], int(v.window), int(v.softcap)) for v in fam.VARIANT_SPECIALISATIONS}
    assert want <= decode and (0, 0, 0) in decode
    prefill = {(c["ALIBI"], c["WINDOW"], c["SOFTCAP"]) for n, c in specs
               if n == "flash_fwd_wgmma" and c["PAGE_SIZE"] > 0}
    assert {(variants.ALIBI_CODES[v.alibi], int(v.window), int(v.softcap))
            for v in pp.VARIANT_SPECIALISATIONS} <= prefill


def _variant_specs():
    from attnproto.ops.families import wgmma

    dec = [s for s in fam.specialisations() if s[0] == fam.KERNEL and (s[1]["ALIBI"] or s[1]["WINDOW"] or
                                                                     s[1]["SOFTCAP"])]
    pre = [s for s in wgmma.paged_specialisations() if s[1]["ALIBI"] or s[1]["WINDOW"] or s[1]["SOFTCAP"]]
    return dec + pre


@pytest.mark.parametrize("name, consts", _variant_specs(),
                         ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}{v}" for k, v in x.items()))
def test_variant_specialisations_compile(nvrtc, name, consts):
    blob, _, _ = nvrtc.cuda_compile(name, consts, "sm_90a", "cubin", [])
    assert len(blob) > 0


def test_decode_refuses_rope_at_compile_time(nvrtc):
    name, consts = next(s for s in fam.specialisations() if s[0] == fam.KERNEL)
    with pytest.raises(Exception, match="paged K is stored already rotated"):
        nvrtc.cuda_compile(name, dict(consts, ROPE=1), "sm_90a", "cubin", [])


# ---------------------------------------------------------------------------------------- GPU
GPU_DECODE = [  # (dtype, D, block size, Hq, Hkv, Nq, partitions, keywords; "slopes": drawn on the device)
    ("bfloat16", 128, 16, 32, 8, 1, "auto", dict(alibi=True)),
    ("float16", 128, 16, 32, 8, 1, 3, dict(alibi="slopes")),
    ("bfloat16", 128, 16, 32, 8, 1, "auto", dict(window=1)),
    ("bfloat16", 128, 16, 32, 8, 4, 3, dict(window="page")),
    ("float16", 64, 1, 8, 2, 1, 2, dict(window=HUGE_WINDOW)),
    ("bfloat16", 128, 128, 8, 1, 1, "auto", dict(window=100)),
    ("bfloat16", 256, 64, 8, 8, 1, 4, dict(softcap=GPU_SOFTCAP)),
    ("float16", 128, 32, 16, 2, 3, "auto", dict(alibi=True, window=37, softcap=GPU_SOFTCAP)),
    ("bfloat16", 128, 16, 32, 8, 8, 1, dict(alibi="slopes", window="page", softcap=GPU_SOFTCAP)),
    ("bfloat16", 64, 256, 8, 1, 4, 5, dict(alibi="slopes", window=300, softcap=GPU_SOFTCAP)),
]
GPU_PREFILL = [  # (dtype, D, block size, Hq, Hkv, Nq, keywords)
    ("bfloat16", 128, 16, 8, 2, 77, dict(alibi=True)),
    ("float16", 128, 16, 8, 2, 77, dict(alibi="slopes")),
    ("bfloat16", 128, 16, 8, 2, 150, dict(window=1)),
    ("bfloat16", 64, 128, 4, 4, 150, dict(window="page")),
    ("float16", 128, 1, 8, 2, 77, dict(window=HUGE_WINDOW)),
    ("bfloat16", 128, 16, 8, 2, 200, dict(softcap=GPU_SOFTCAP)),
    ("bfloat16", 128, 64, 8, 2, 200, dict(alibi=True, window=97, softcap=GPU_SOFTCAP)),
    ("float16", 64, 128, 8, 1, 130, dict(alibi="slopes", window="page", softcap=GPU_SOFTCAP)),
]


def _gpu_kwargs(t, kw, hq, block_size):
    out = dict(kw)
    if out.get("window") == "page":
        out["window"] = block_size
    if out.get("alibi") == "slopes":
        out["alibi"] = t.rand(hq, device="cuda", dtype=t.float32) * 0.5 + 0.01
    return out


def _gpu_check(t, o, lse, q, k, v, lens, dtype, causal, kw, label):
    """Per sequence: FP64 reference and torch's own implementation of the same variant on the same
    (contiguous) inputs; ours within SDPA_FACTOR x torch's error plus the output rounding."""
    from sdpa_baseline import MANTISSA_BITS, SDPA_FACTOR
    from test_variants_gpu import _ref_kwargs, torch_variant

    t.cuda.synchronize()
    d = q.shape[-1]
    rkw = _ref_kwargs(kw)
    ours = theirs = 0.0
    for i, n in enumerate(lens):
        qi, ki, vi = q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n]
        host = [x.double().cpu().numpy() for x in (qi, ki, vi)]
        want, want_lse = ref.attention(*host, causal=causal, return_lse=True, **rkw)
        got = o[i:i + 1].double().cpu().numpy()
        assert np.isfinite(got).all(), f"{label}: sequence {i}: non-finite (unwritten) output"
        ours = max(ours, float(np.abs(got - want).max()))
        peer = torch_variant(qi, ki, vi, causal, 1.0 / math.sqrt(d), kw).double().cpu().numpy()
        theirs = max(theirs, float(np.abs(peer - want).max()))
        np.testing.assert_allclose(lse[i].cpu().numpy(), want_lse[0], atol=2e-3, rtol=1e-3,
                                   err_msg=f"{label}: sequence {i} LSE")
    floor = 2.0 ** -MANTISSA_BITS[dtype] * float(v.abs().max())
    assert ours <= SDPA_FACTOR * theirs + floor, f"{label}: error {ours:.3e} > 2 x torch's {theirs:.3e}"


def _gpu_inputs(t, seed, b, hq, hkv, nq, n, d, dtype):
    g = t.Generator(device="cuda").manual_seed(seed)
    tdt = getattr(t, dtype)
    mk = lambda *s: t.randn(*s, generator=g, device="cuda", dtype=t.float32).to(tdt)  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, n, d), mk(b, hkv, n, d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, d, bs, hq, hkv, nq, parts, kw", GPU_DECODE)
@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_gpu_paged_decode_variants_match_fp64(dtype, d, bs, hq, hkv, nq, parts, kw, layout):
    t = _torch()
    from paged_cases import build_pool

    from attnproto.ops import paged

    lens = [nq, 17, 3 * bs + 1, 333]
    seed = zlib.crc32(repr((dtype, d, bs, nq, kw)).encode())
    q, k, v = _gpu_inputs(t, seed, len(lens), hq, hkv, nq, max(lens), d, dtype)
    kc, vc, table, lens_t = build_pool(k, v, lens, bs, layout=layout)
    gkw = _gpu_kwargs(t, kw, hq, bs)
    o = t.full_like(q, float("nan"))
    lse = t.full(q.shape[:3], float("nan"), device="cuda")
    paged.paged_decode(q, kc, vc, table, lens_t, num_partitions=parts, layout=layout, out=o, lse=lse, **gkw)
    _gpu_check(t, o, lse, q, k, v, lens, dtype, nq > 1, gkw, f"decode {dtype} D{d} bs{bs} nq{nq} {kw}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, d, bs, hq, hkv, nq, kw", GPU_PREFILL)
def test_gpu_paged_prefill_variants_match_fp64(dtype, d, bs, hq, hkv, nq, kw):
    t = _torch()
    if t.cuda.get_device_capability()[0] < 9:
        pytest.skip("paged prefill runs the Hopper wgmma kernel")
    from paged_cases import build_pool

    from attnproto.ops import paged

    lens = [nq, nq + 37, 2 * nq + 3 * bs + 5]
    seed = zlib.crc32(repr((dtype, d, bs, nq, kw)).encode())
    q, k, v = _gpu_inputs(t, seed, len(lens), hq, hkv, nq, max(lens), d, dtype)
    kc, vc, table, lens_t = build_pool(k, v, lens, bs)
    gkw = _gpu_kwargs(t, kw, hq, bs)
    o = t.full_like(q, float("nan"))
    lse = t.full(q.shape[:3], float("nan"), device="cuda")
    paged.paged_prefill(q, kc, vc, table, lens_t, out=o, lse=lse, **gkw)
    _gpu_check(t, o, lse, q, k, v, lens, dtype, True, gkw, f"prefill {dtype} D{d} bs{bs} nq{nq} {kw}")


@pytest.mark.gpu
def test_gpu_decode_window_one_is_the_newest_value_row():
    """Window 1 over a split plan: every partition but the newest one loads no tile; O is V at the
    query's position (rounded once), LSE the scaled self-score."""
    t = _torch()
    from paged_cases import build_pool

    from attnproto.ops import paged

    lens = [1000, 77]
    q, k, v = _gpu_inputs(t, 7, 2, 8, 2, 1, 1000, 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, lens, 16)
    o, lse = paged.paged_decode(q, kc, vc, table, lens_t, num_partitions=8, window=1)
    t.cuda.synchronize()
    for i, n in enumerate(lens):
        want = v[i, :, n - 1].repeat_interleave(4, 0)
        assert t.equal(o[i, :, 0] if o.dim() == 4 else o[i], want)


@pytest.mark.gpu
def test_gpu_rope_is_refused_before_launch():
    t = _torch()
    from paged_cases import build_pool

    from attnproto.ops import paged

    q, k, v = _gpu_inputs(t, 3, 1, 4, 2, 1, 40, 128, "bfloat16")
    kc, vc, table, lens_t = build_pool(k, v, [40], 16)
    with pytest.raises(ValueError, match="^rope: paged K is stored rotated"):
        paged.paged_decode(q, kc, vc, table, lens_t, rope=True)
    with pytest.raises(ValueError, match="^rope: paged K is stored rotated"):
        paged.paged_prefill(q, kc, vc, table, lens_t, rope="half")
