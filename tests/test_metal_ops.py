"""The Metal path of the flash forward / RoPE ops and of `attnproto run proto1 --backend metal`.

Three kinds of test, labelled by section:

* pure Python (run everywhere): tile chooser vs the 32 KB limit and vs the specs the static
  checks compile, dispatch geometry, AttentionParams, element encoding, argument errors;
* HARNESS tests (run everywhere): the op and the proto1 Metal path driven through
  ``FakeMetalBackend``, which implements the GpuBackend interface but computes with the numpy
  CPU backend. They exercise the Python plumbing (params, geometry, buffers, sweep, anchors,
  findings). They are NOT a verification of the Metal kernels;
* Metal tests (``needs_metal``): the real kernels against float64 references and the quick
  experiment end to end; skipped with the reason unless an Apple GPU family 9 device is present.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from attnproto import cpu, metal_specs, params, ref
from attnproto.experiments import registry
from attnproto.experiments.proto1 import common as proto1_common
from attnproto.experiments.proto1 import metal as proto1
from attnproto.ops import metal_flash


def _metal_status() -> tuple[bool, str]:
    try:
        from attnproto.backend import BackendUnavailable, get
    except ImportError as exc:  # pragma: no cover
        return False, str(exc)
    try:
        get("metal")
        return True, ""
    except (BackendUnavailable, ImportError, ValueError) as exc:
        return False, str(exc).splitlines()[0]


METAL_OK, METAL_WHY = _metal_status()
_skip_without_metal = pytest.mark.skipif(not METAL_OK, reason=f"needs an Apple GPU family 9 Metal device: {METAL_WHY}")


def needs_metal(test):
    """Marked ``metal`` (select with -m metal) and skipped with the reason without a Metal device."""
    return pytest.mark.metal(_skip_without_metal(test))

ODD_HEAD_DIMS = (8, 24, 72, 136, 200)
ALL_HEAD_DIMS = tuple(range(metal_specs.FRAG, metal_specs.MAX_HEAD_DIM + 1, metal_specs.FRAG))
DTYPES = tuple(metal_specs.DTYPE_CODES)
# float16 / bfloat16 inputs, fp32 accumulation, P rounded to the element type.
TOLERANCE = {"float16": (5e-3, 1e-2), "bfloat16": (3e-2, 3e-2)}


def _canonical(specs) -> set[str]:
    return {s.canonical() for s in specs}


# ============================================================== pure Python: tiles and specs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
def test_chooser_picks_a_legal_sweep_tile(dtype, head_dim):
    tiles = metal_specs.flash_tiles(head_dim, dtype)
    assert tiles, head_dim
    for r, c in tiles:
        assert r in metal_specs.SWEEP_BLOCK_R and c in metal_specs.SWEEP_BLOCK_C
        assert metal_specs.flash_threadgroup_bytes(head_dim, r, c, dtype) <= metal_specs.THREADGROUP_MEMORY_LIMIT
    chosen = metal_specs.choose_flash_tile(head_dim, dtype)
    assert chosen in tiles
    assert chosen[0] == max(r for r, _ in tiles)
    assert chosen[1] == max(c for r, c in tiles if r == chosen[0])


def test_flash_tiles_excludes_exactly_the_illegal_sweep_tiles():
    for dtype in DTYPES:
        for d in metal_specs.SWEEP_HEAD_DIM:
            legal = {(r, c) for r, c in metal_specs.flash_tiles(d, dtype)}
            illegal = {(r, c) for dd, r, c in metal_specs.illegal_sweep_tiles(dtype) if dd == d}
            assert legal | illegal == set(itertools.product(metal_specs.SWEEP_BLOCK_R, metal_specs.SWEEP_BLOCK_C))
            assert not legal & illegal


@pytest.mark.parametrize("seq_q, expect_r", [(1, 16), (16, 16), (17, 32), (40, 64), (10_000, 64)])
def test_chooser_shrinks_block_r_for_short_queries(seq_q, expect_r):
    assert metal_specs.choose_flash_tile(128, "float16", seq_q)[0] == expect_r


@pytest.mark.parametrize("quick", [False, True])
def test_every_metal_sweep_spec_is_statically_checked(quick):
    """What `proto1 --backend metal` dispatches must be among the specs tools/metal_check compiles."""
    sweep = _canonical(proto1.metal_sweep_specs(quick))
    assert sweep <= _canonical(metal_specs.proto1_specs())
    assert sweep <= _canonical(metal_specs.specs_in_use())
    expected = sum(len(metal_specs.flash_tiles(d, proto1.METAL_DTYPE)) * 2
                   for d in (proto1.METAL_QUICK_HEAD_DIMS if quick else proto1.METAL_HEAD_DIMS))
    assert len(sweep) == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", metal_specs.SWEEP_HEAD_DIM)
def test_default_tile_spec_is_statically_checked(dtype, causal, head_dim):
    r, c = metal_specs.choose_flash_tile(head_dim, dtype)
    spec = metal_specs.flash_spec(head_dim, r, c, dtype, causal=causal)
    assert spec.canonical() in _canonical(metal_specs.proto1_specs())


@pytest.mark.parametrize("head_dim", (64, 72, 256))
@pytest.mark.parametrize("seq_q", (1, 8, 63, 64, 65, 333))
def test_flash_dispatch_matches_the_kernel_contract(head_dim, seq_q):
    for r, c in metal_specs.flash_tiles(head_dim):
        grid, block, tg = metal_specs.flash_dispatch(3, 5, seq_q, r, head_dim, c)
        assert grid == (math.ceil(seq_q / r), 5, 3)
        assert grid[0] * r >= seq_q > (grid[0] - 1) * r
        assert block == (r // metal_specs.FRAG * metal_specs.SIMD_WIDTH, 1, 1)
        assert tg == metal_specs.flash_threadgroup_bytes(head_dim, r, c)


def test_flash_dispatch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seq_q"):
        metal_specs.flash_dispatch(1, 1, 0, 16, 64, 64)
    with pytest.raises(TypeError, match="batch"):
        metal_specs.flash_dispatch(1.0, 1, 1, 16, 64, 64)
    with pytest.raises(ValueError, match="tile"):
        metal_specs.flash_dispatch(1, 1, 1, 64, 64, 128)


@pytest.mark.parametrize("head_dim", (2, 24, 64, 72, 136, 256))
@pytest.mark.parametrize("tokens", (1, 7, 333))
@pytest.mark.parametrize("max_threads", (32, 256))
def test_rope_dispatch_covers_every_pair(head_dim, tokens, max_threads):
    grid, block = metal_specs.rope_dispatch(2, 3, tokens, head_dim, max_threads)
    assert math.prod(block) <= max_threads
    covered = tuple(g * b for g, b in zip(grid, block))
    assert covered[0] >= head_dim // 2 and covered[1] >= tokens and covered[2] == 2 * 3
    # no threadgroup lies wholly outside the grid
    assert (grid[0] - 1) * block[0] < head_dim // 2 and (grid[1] - 1) * block[1] < tokens


def test_rope_dispatch_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        metal_specs.rope_dispatch(1, 1, 4, 7)


# ============================================================== pure Python: params, encoding, errors
def _inputs(rng, b=1, hq=2, hkv=2, nq=5, nkv=7, d=64, dtype=np.float16):
    q = rng.standard_normal((b, hq, nq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, nkv, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, nkv, d)).astype(dtype)
    return q, k, v


def test_params_describe_contiguous_buffers():
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, b=2, hq=6, hkv=3, nq=5, nkv=9, d=24)
    prob = metal_flash.check_metal_flash_inputs(q, k, v, causal=True, rope=True, rope_theta=500.0, alibi=True,
                                                alibi_max_bias=4.0, fixed_gqa_group=True)
    p = metal_flash.metal_flash_params(prob)
    assert p.dtype == params.PARAMS_DTYPE
    assert (p["batch"], p["num_heads"], p["num_kv_heads"], p["seq_q"], p["seq_kv"], p["head_dim"]) == (2, 6, 3, 5, 9, 24)
    assert tuple(p["q_stride"]) == (6 * 5 * 24, 5 * 24, 24) == tuple(p["o_stride"])
    assert tuple(p["k_stride"]) == (3 * 9 * 24, 9 * 24, 24) == tuple(p["v_stride"])
    assert tuple(p["lse_stride"]) == (6 * 5, 5)
    assert math.isclose(float(p["scale"]), 1 / math.sqrt(24), rel_tol=1e-6)
    assert float(p["rope_theta"]) == 500.0 and float(p["alibi_max_bias"]) == 4.0
    spec = metal_flash.flash_launch_spec(prob).as_dict()
    assert spec["GQA_GROUP"] == 2 and spec["ROPE"] == 1 and spec["ALIBI"] == 1 and spec["CAUSAL"] == 1


def test_encoding_round_trips():
    rng = np.random.default_rng(1)
    x16 = rng.standard_normal((2, 3, 4, 8)).astype(np.float16)
    assert np.array_equal(metal_flash.decode_elements(metal_flash.encode_elements(x16, "x", "float16"), "float16"), x16)
    xbf = cpu.round_to_bfloat16(rng.standard_normal((2, 3, 4, 8)).astype(np.float32))
    bits = metal_flash.encode_elements(xbf, "x", "bfloat16")
    assert bits.dtype == np.uint16
    assert np.array_equal(np.asarray(metal_flash.decode_elements(bits, "bfloat16"), dtype=np.float32), xbf)


def _err_cases():
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng)
    return [
        ("dtype", (q.astype(np.float32), k, v), {}, TypeError, "q: dtype float32"),
        ("mixed", (q, k.astype(np.float32), v), {}, TypeError, "k"),
        ("not_array", ([1, 2], k, v), {}, TypeError, "q"),
        ("rank", (q[0], k, v), {}, ValueError, "q: expected 4 dimensions"),
        ("head_dim_mismatch", (q, k[..., :32], v[..., :32]), {}, ValueError, "head_dim"),
        ("head_dim_odd", (q[..., :63], k[..., :63], v[..., :63]), {}, ValueError, "q: head_dim 63"),
        ("gqa", (np.concatenate([q, q[:, :1]], axis=1), k, v), {}, ValueError, "k: 2 kv heads"),
        ("v_shape", (q, k, v[:, :, :3]), {}, ValueError, "v: shape"),
        ("negative_stride", (q[:, :, ::-1], k, v), {}, ValueError, "q: negative strides"),
        ("scale", (q, k, v), {"scale": math.inf}, ValueError, "scale"),
        ("causal", (q, k, v), {"causal": 1}, TypeError, "causal"),
        ("rope_flag", (q, k, v), {"rope": "yes"}, TypeError, "rope"),
        ("theta", (q, k, v), {"rope_theta": 0.0}, ValueError, "rope_theta"),
        ("bias", (q, k, v), {"alibi_max_bias": -1.0}, ValueError, "alibi_max_bias"),
        ("only_block_r", (q, k, v), {"block_r": 16}, ValueError, "block_c"),
        ("block_type", (q, k, v), {"block_r": 16.0, "block_c": 64}, TypeError, "block_r"),
        ("tile_over_32kb", (q, k, v), {"block_r": 64, "block_c": 128}, ValueError, "threadgroup memory"),
        ("block_r_gt_c", (q, k, v), {"block_r": 64, "block_c": 32}, ValueError, "block_r <= block_c"),
    ]


@pytest.mark.parametrize("case", _err_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_naming_the_argument(case):
    _, args, kwargs, exc, fragment = case
    with pytest.raises(exc, match=fragment.replace("(", r"\(")):
        metal_flash.check_metal_flash_inputs(*args, **kwargs)


def test_wrong_backend_is_rejected():
    q, k, v = _inputs(np.random.default_rng(3))
    with pytest.raises(ValueError, match="backend: expected the metal backend"):
        metal_flash.prepare_flash_forward(q, k, v, backend=SimpleNamespace(name="cuda"))


@pytest.mark.parametrize("bad, exc, fragment", [
    (np.zeros((1, 1, 4, 7), np.float16), ValueError, "x: RoPE needs an even head_dim"),
    (np.zeros((1, 1, 4, 8), np.float32), TypeError, "x: dtype float32"),
    (np.zeros((1, 4, 8), np.float16), ValueError, "x: expected 4 dimensions"),
])
def test_rope_bad_inputs(bad, exc, fragment):
    with pytest.raises(exc, match=fragment):
        metal_flash.prepare_rope(bad, backend=FakeMetalBackend())


def test_rope_bad_theta():
    with pytest.raises(ValueError, match="theta"):
        metal_flash.prepare_rope(np.zeros((1, 1, 4, 8), np.float16), theta=-1.0, backend=FakeMetalBackend())


# ============================================================== HARNESS: fake Metal backend
class _FakeBuffer:
    def __init__(self, nbytes: int):
        self.data = np.zeros(nbytes, np.uint8)
        self.nbytes = nbytes


class FakeMetalBackend:
    """HARNESS, not Metal: the GpuBackend interface the Metal op uses, computing on the CPU.

    A launch checks the flash_attention / rope launch contract (threads, threadgroups,
    threadgroup memory), reads its inputs through the AttentionParams strides and computes
    with attnproto.cpu (float32, P rounded to the element type) or attnproto.ref (RoPE).
    """

    name = "metal"
    info = {"name": "fake metal (numpy CPU harness)", "backend": "metal"}

    def __init__(self):
        self.launches = []

    def kernel(self, name, mode="default", **constants):
        return SimpleNamespace(name=name, constants=dict(constants),
                               resources={"max_threads_per_block": 1024, "static_shared_bytes": 0,
                                          "registers": 0, "local_bytes": 0})

    def alloc(self, nbytes):
        return _FakeBuffer(int(nbytes))

    def from_numpy(self, array):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        buf = _FakeBuffer(raw.nbytes)
        buf.data[:] = raw
        return buf

    def to_numpy(self, buf, dtype, shape):
        n = math.prod(shape) * np.dtype(dtype).itemsize
        return buf.data[:n].view(dtype).reshape(shape).copy()

    def fill(self, buf, byte):
        buf.data[:] = byte

    def synchronize(self):
        pass

    @staticmethod
    def _elements(buf, dtype_code, shape, strides):
        bits = buf.data.view(np.uint16)
        view = np.lib.stride_tricks.as_strided(bits, shape=shape, strides=[s * 2 for s in strides])
        name = {v: k for k, v in metal_specs.DTYPE_CODES.items()}[dtype_code]
        return np.asarray(metal_flash.decode_elements(view, name), dtype=np.float32), name

    @staticmethod
    def _store(buf, values, dtype_name, shape, strides):
        bits = buf.data.view(np.uint16)
        out = np.lib.stride_tricks.as_strided(bits, shape=shape, strides=[s * 2 for s in strides])
        wide = np.ascontiguousarray(values, dtype=np.float32)
        out[...] = (wide.astype(np.float16).view(np.uint16) if dtype_name == "float16"
                    else cpu.round_to_bfloat16(wide).view(np.uint32) >> np.uint32(16))

    def launch(self, kernel, grid, block, args, shared_bytes=0):
        self.launches.append((kernel.name, dict(kernel.constants), tuple(grid), tuple(block), shared_bytes))
        p = args[0]
        c = kernel.constants
        if kernel.name == metal_specs.FLASH_KERNEL:
            self._flash(p, c, grid, block, shared_bytes, args[1:])
        elif kernel.name == metal_specs.ROPE_KERNEL:
            self._rope(p, c, grid, block, args[1:])
        else:
            raise AssertionError(f"unexpected kernel {kernel.name}")

    def _flash(self, p, c, grid, block, shared_bytes, bufs):
        b, hq, hkv, nq, nkv, d = (int(p[f]) for f in ("batch", "num_heads", "num_kv_heads", "seq_q", "seq_kv",
                                                       "head_dim"))
        br, bc = c["BLOCK_R"], c["BLOCK_C"]
        assert c["HEAD_DIM"] == d
        assert tuple(grid) == (math.ceil(nq / br), hq, b)
        assert tuple(block) == (metal_specs.flash_threads(br), 1, 1)
        name = {v: k for k, v in metal_specs.DTYPE_CODES.items()}[c["DTYPE"]]
        assert shared_bytes >= metal_specs.flash_threadgroup_bytes(d, br, bc, name)
        assert c["GQA_GROUP"] in (0, hq // hkv)
        qb, kb, vb, ob, lb = bufs
        q, _ = self._elements(qb, c["DTYPE"], (b, hq, nq, d), list(p["q_stride"]) + [1])
        k, _ = self._elements(kb, c["DTYPE"], (b, hkv, nkv, d), list(p["k_stride"]) + [1])
        v, _ = self._elements(vb, c["DTYPE"], (b, hkv, nkv, d), list(p["v_stride"]) + [1])
        o, lse = cpu.flash_forward(q, k, v, block_r=br, block_c=bc, causal=bool(c["CAUSAL"]),
                                   scale=float(p["scale"]), rope=bool(c["ROPE"]), rope_theta=float(p["rope_theta"]),
                                   alibi=bool(c["ALIBI"]), alibi_max_bias=float(p["alibi_max_bias"]), p_dtype=name,
                                   window=int(p["window"]) if c.get("WINDOW") else None,
                                   softcap=float(p["softcap"]) if c.get("SOFTCAP") else None)
        self._store(ob, o, name, (b, hq, nq, d), list(p["o_stride"]) + [1])
        lse_view = np.lib.stride_tricks.as_strided(lb.data.view(np.float32), shape=(b, hq, nq),
                                                   strides=[s * 4 for s in list(p["lse_stride"]) + [1]])
        lse_view[...] = lse

    def _rope(self, p, c, grid, block, bufs):
        b, h, n, d = int(p["batch"]), int(p["num_heads"]), int(p["seq_q"]), int(p["head_dim"])
        assert c["HEAD_DIM"] == d
        assert grid[0] * block[0] >= d // 2 and grid[1] * block[1] >= n and grid[2] * block[2] >= b * h
        x, name = self._elements(bufs[0], c["DTYPE"], (b, h, n, d), list(p["q_stride"]) + [1])
        self._store(bufs[1], ref.rope(x, float(p["rope_theta"])), name, (b, h, n, d), list(p["o_stride"]) + [1])

    def time_launch(self, kernel, grid, block, args, shared_bytes=0, warmup=4, iters=50, flush_l2=False):
        for _ in range(warmup):
            self.launch(kernel, grid, block, args, shared_bytes)
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.launch(kernel, grid, block, args, shared_bytes)
            samples.append((time.perf_counter() - t0) * 1e3)
        arr = np.asarray(samples)
        return SimpleNamespace(median_ms=float(np.median(arr)), p10_ms=float(np.percentile(arr, 10)),
                               p90_ms=float(np.percentile(arr, 90)), mean_ms=float(arr.mean()),
                               cv=float(arr.std(ddof=1) / arr.mean()), samples_ms=samples)


# variant -> (op kwargs, reference kwargs, (Hq, Hkv), (Nq, Nkv))
VARIANTS = {
    "base": ({}, {}, (2, 2), (37, 37)),
    "causal_nq_lt_nkv": ({"causal": True}, {"causal": True}, (2, 2), (19, 45)),
    "causal_nq_gt_nkv": ({"causal": True}, {"causal": True}, (2, 2), (45, 19)),
    "rope": ({"rope": True, "rope_theta": 500.0}, {"rope": True, "rope_theta": 500.0}, (2, 2), (21, 33)),
    "alibi": ({"alibi": True}, {"alibi": True}, (4, 4), (33, 33)),
    "gqa_runtime": ({}, {}, (4, 2), (29, 29)),
    "gqa_fixed": ({"fixed_gqa_group": True}, {}, (8, 2), (29, 29)),
    "all": ({"causal": True, "rope": True, "alibi": True, "fixed_gqa_group": True},
            {"causal": True, "rope": True, "alibi": True}, (4, 2), (17, 41)),
    "window": ({"causal": True, "window": 7}, {"causal": True, "window": 7}, (2, 2), (37, 90)),
    "window_noncausal": ({"window": 20}, {"window": 20}, (2, 2), (45, 45)),
    "softcap": ({"softcap": 2.0}, {"softcap": 2.0}, (2, 2), (33, 33)),
    "gemma2": ({"causal": True, "rope": True, "window": 16, "softcap": 3.0, "fixed_gqa_group": True},
               {"causal": True, "rope": True, "window": 16, "softcap": 3.0}, (4, 2), (70, 70)),
}


def _half(x, dtype):
    if dtype == "float16":
        return x.astype(np.float16)
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 host arrays need ml_dtypes")
    return x.astype(ml_dtypes.bfloat16)


def _run_op_case(backend, dtype, head_dim, variant, tile=None):
    op_kw, ref_kw, (hq, hkv), (nq, nkv) = VARIANTS[variant]
    rng = np.random.default_rng(zlib_seed(dtype, head_dim, variant))
    q = _half(rng.standard_normal((2, hq, nq, head_dim)).astype(np.float32), dtype)
    k = _half(rng.standard_normal((2, hkv, nkv, head_dim)).astype(np.float32), dtype)
    v = _half(rng.standard_normal((2, hkv, nkv, head_dim)).astype(np.float32), dtype)
    kw = dict(op_kw)
    if tile is not None:
        kw.update(block_r=tile[0], block_c=tile[1])
    o, lse = metal_flash.flash_forward(q, k, v, backend=backend, **kw)
    exact, exact_lse = ref.attention(q, k, v, return_lse=True, **ref_kw)
    atol, rtol = TOLERANCE[dtype]
    ref.assert_allclose(np.asarray(o, dtype=np.float64), exact, atol=atol, rtol=rtol)
    finite = np.isfinite(exact_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    ref.assert_allclose(lse[finite], exact_lse[finite], atol=atol, rtol=rtol)
    assert np.all(np.asarray(o, dtype=np.float64)[~finite] == 0.0)
    return o


def zlib_seed(*parts) -> int:
    import zlib  # noqa: PLC0415

    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("head_dim", (24, 64, 72))
@pytest.mark.parametrize("dtype", DTYPES)
def test_harness_op_against_fp64(dtype, head_dim, variant):
    """HARNESS (numpy behind the GpuBackend interface): params, geometry, buffers, decoding."""
    fake = FakeMetalBackend()
    _run_op_case(fake, dtype, head_dim, variant)
    (name, constants, grid, block, shared), = fake.launches
    assert name == metal_specs.FLASH_KERNEL and constants["HEAD_DIM"] == head_dim


def test_harness_outputs_are_poisoned_until_written():
    fake = FakeMetalBackend()
    q, k, v = _inputs(np.random.default_rng(4), d=64)
    launch = metal_flash.prepare_flash_forward(q, k, v, backend=fake)
    o, lse = launch.result()  # not launched: every element still holds the poison
    assert np.isnan(np.asarray(o, np.float32)).all() and np.isnan(lse).all()


@pytest.mark.parametrize("head_dim", (8, 24, 64, 136))
@pytest.mark.parametrize("dtype", DTYPES)
def test_harness_rope(dtype, head_dim):
    fake = FakeMetalBackend()
    x = _half(np.random.default_rng(head_dim).standard_normal((2, 3, 11, head_dim)).astype(np.float32), dtype)
    y = metal_flash.rope_forward(x, theta=1000.0, backend=fake)
    atol, rtol = TOLERANCE[dtype]
    ref.assert_allclose(np.asarray(y, np.float64), ref.rope(x, 1000.0), atol=atol, rtol=rtol)


# ============================================================== HARNESS: proto1 --backend metal
def _fake_anchor(q, k, v, causal, scale):
    """HARNESS stand-in for an installed anchor: FP64 reference, wall-clock timed."""
    def output():
        return ref.attention(q, k, v, causal=causal, scale=scale).astype(np.float32)
    return (lambda warmup, iters: proto1._wall_timing(output, warmup, iters)), output


def _not_installed(*_args):
    return "not installed (import mps failed)"


@pytest.fixture
def small_metal_sweep(monkeypatch):
    fake = FakeMetalBackend()
    monkeypatch.setattr(proto1, "_metal_backend", lambda: fake)
    monkeypatch.setattr(proto1, "METAL_TOKENS", 128)
    monkeypatch.setattr(proto1, "METAL_HIDDEN", 128)
    monkeypatch.setattr(proto1, "METAL_QUICK_HEAD_DIMS", (64,))
    monkeypatch.setattr(proto1, "METAL_QUICK_SEQ_LENS", (32, 64))
    monkeypatch.setattr(proto1, "METAL_GATE_SHAPES", ((1, 2, 21, 21), (1, 2, 7, 21)))
    monkeypatch.setattr(proto1_common, "QUICK_ITERS", 3)
    monkeypatch.setattr(proto1, "ANCHOR_QUICK_ITERS", 3)
    monkeypatch.setattr(proto1_common, "WARMUP", 1)
    return fake


def _metal_ctx(tmp_path):
    return registry.ExperimentContext(
        experiment="proto1", backend="metal", device={"name": FakeMetalBackend.info["name"]},
        device_name=FakeMetalBackend.info["name"], driver="harness", commit="unknown", quick=True,
        progress=lambda iterable=None, total=None, desc="": iterable, out_dir=tmp_path,
        rng=np.random.default_rng(0))


def test_harness_proto1_metal_sweep_with_one_anchor_missing(small_metal_sweep, tmp_path, monkeypatch):
    """HARNESS: the Metal sweep, anchor handling and findings, computed by numpy."""
    monkeypatch.setattr(proto1, "METAL_ANCHOR_FNS", {"mlx_sdpa": _fake_anchor, "mps_sdpa": _not_installed})
    result = registry.run_experiment(registry.get("proto1"), _metal_ctx(tmp_path))
    ours = [r for r in result.records if r["config"]["kernel"] == proto1.METAL_KERNEL]
    tiles = metal_specs.flash_tiles(64, proto1.METAL_DTYPE)
    assert len(ours) == len(tiles) * 2 * 2  # tiles x causal x N
    auto = [r for r in result.records if r["config"]["kernel"] == "auto"]
    assert len(auto) == 2 * 2 and all(r["config"]["family"] == "metal" for r in auto)
    assert {r["backend"] for r in result.records} == {"metal"}
    assert all(r["metrics"]["smem_bytes"] <= metal_specs.THREADGROUP_MEMORY_LIMIT for r in ours)
    assert all(r["metrics"]["vs_reference_max_abs_err"] < proto1_common.ATOL * 10 for r in ours)
    mlx = [r for r in result.records if r["config"]["kernel"] == "mlx_sdpa"]
    assert len(mlx) == 2 * 2
    assert not any(r["config"]["kernel"] == "mps_sdpa" for r in result.records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["anchors_missing"] == ["mps_sdpa"]
    assert all(v.startswith("not installed") for k, v in summary["anchors_unavailable"].items())
    assert all(row["mps_sdpa"] == "not run" and isinstance(row["mlx_sdpa"], float) for row in summary["table"])
    slugs = {f.slug for f in result.findings}
    assert "metal-anchors-d64-noncausal-n64" in slugs and "metal-threadgroup-memory-n64" in slugs
    anchor_finding = next(f for f in result.findings if f.slug == "metal-anchors-d64-noncausal-n64")
    assert "Not run: mps_sdpa" in anchor_finding.claim
    table = json.loads((tmp_path / "tile_table.json").read_text())
    assert table and {e["family"] for e in table} == {"metal"}
    assert all(set(e["config"]) == {"block_r", "block_c"} for e in table)


def test_harness_proto1_metal_rejects_a_wrong_kernel(small_metal_sweep, tmp_path, monkeypatch):
    """HARNESS: a tile whose output is wrong is gated out and reported, never timed."""
    monkeypatch.setattr(proto1, "METAL_ANCHOR_FNS", {"mlx_sdpa": _not_installed, "mps_sdpa": _not_installed})
    fake = small_metal_sweep
    real_flash = fake._flash
    bad_tile = metal_specs.flash_tiles(64)[0]

    def broken(p, c, grid, block, shared, bufs):
        real_flash(p, c, grid, block, shared, bufs)
        if (c["BLOCK_R"], c["BLOCK_C"]) == bad_tile:
            bufs[3].data[:64] = 0  # corrupt the first O elements
    monkeypatch.setattr(fake, "_flash", broken)
    result = registry.run_experiment(registry.get("proto1"), _metal_ctx(tmp_path))
    timed = {(r["config"]["block_r"], r["config"]["block_c"]) for r in result.records
             if r["config"]["kernel"] == proto1.METAL_KERNEL}
    assert bad_tile not in timed and timed
    rejected = json.loads((tmp_path / "summary.json").read_text())["rejected"]
    assert {(r["block_r"], r["block_c"]) for r in rejected} == {bad_tile}
    assert any(f.slug == "rejected-configs" for f in result.findings)


def test_real_anchor_absence_is_reported_not_faked():
    """On a machine without MLX / torch the anchor functions say so instead of timing anything."""
    q = k = v = np.zeros((1, 1, 8, 8), np.float16)
    for name, fn in proto1.METAL_ANCHOR_FNS.items():
        module = "mlx.core" if name == "mlx_sdpa" else "torch"
        try:
            __import__(module)
        except ImportError:
            assert fn(q, k, v, False, 1.0).startswith("not installed"), name
        else:
            pytest.skip(f"{module} is installed here")


def test_proto1_supports_metal():
    assert registry.get("proto1").supports("metal")


# ============================================================== Metal device (Apple GPU family 9)
@needs_metal
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("head_dim", (24, 64, 72, 128, 256))
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_op_against_fp64(dtype, head_dim, variant):
    from attnproto.backend import get  # noqa: PLC0415

    _run_op_case(get("metal"), dtype, head_dim, variant)


@needs_metal
@pytest.mark.parametrize("head_dim", metal_specs.SWEEP_HEAD_DIM)
def test_metal_every_sweep_tile_against_fp64(head_dim):
    from attnproto.backend import get  # noqa: PLC0415

    for tile in metal_specs.flash_tiles(head_dim, "float16"):
        for variant in ("base", "causal_nq_lt_nkv"):
            _run_op_case(get("metal"), "float16", head_dim, variant, tile)


@needs_metal
@pytest.mark.parametrize("head_dim", (8, 24, 64, 136, 256))
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_rope_against_fp64(dtype, head_dim):
    from attnproto.backend import get  # noqa: PLC0415

    x = _half(np.random.default_rng(head_dim).standard_normal((2, 3, 37, head_dim)).astype(np.float32), dtype)
    y = metal_flash.rope_forward(x, backend=get("metal"))
    atol, rtol = TOLERANCE[dtype]
    ref.assert_allclose(np.asarray(y, np.float64), ref.rope(x), atol=atol, rtol=rtol)


@needs_metal
def test_metal_proto1_quick_end_to_end(tmp_path):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    res = subprocess.run([sys.executable, "-m", "attnproto", "run", "proto1", "--backend", "metal", "--quick",
                          "--no-kb", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    summaries = list(tmp_path.rglob("summary.json"))
    assert summaries, res.stdout
    table = json.loads(summaries[0].read_text())["table"]
    assert table and all(row["tflops"] > 0 for row in table)
