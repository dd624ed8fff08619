"""The mma.sync Flash Attention forward (flash_fwd_mma through attnproto.ops.flash_forward)
on a CUDA GPU, against the float64 reference and against torch SDPA's error.

Fresh random inputs for every test (a seed from os.urandom, printed on failure),
outputs poisoned with NaN before the launch and checked fully written; O within
atol 5e-3 / rtol 1e-2 of the float64 reference and its max error at most twice SDPA's
on the same inputs; LSE checked too (-inf and O = 0 for rows that see no key).
"""
from __future__ import annotations

import math
import os

import pytest

from attnproto import ref
from attnproto.ops import configs as C
from attnproto.ops import flash as F
from attnproto.ops.variants import BASE
from sdpa_baseline import MANTISSA_BITS, SDPA_FACTOR, sdpa

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

DTYPES = ("float16", "bfloat16")
ATOL, RTOL = 5e-3, 1e-2
# LSE is float32 math on the same 16-bit inputs: only accumulation order and the
# MUFU ex2/lg2 approximations (~2^-22) separate it from the float64 value.
LSE_ATOL, LSE_RTOL = 2e-3, 1e-3
B, H = 2, 3


def _torch_dtype(name):
    return getattr(torch, name)


@pytest.fixture(autouse=True)
def _torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(_torch_dtype(dtype))


def _inputs(batch, hq, hkv, nq, nkv, d, dtype, *, token_major=False):
    """Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D]; token_major: views of [B, N, H, D] buffers."""
    seed = int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tensors = []
    for heads, n in ((hq, nq), (hkv, nkv), (hkv, nkv)):
        if token_major:
            tensors.append(_randn((batch, n, heads, d), dtype, gen).transpose(1, 2))
        else:
            tensors.append(_randn((batch, heads, n, d), dtype, gen))
    return (*tensors, seed)





def _run_and_check(cuda, q, k, v, seed, *, causal, config=None, scale=None, out=None, lse=None):
    d = q.shape[-1]
    dtype = str(q.dtype).replace("torch.", "")
    if out is None:
        out = torch.empty(q.shape[:3] + (d,), dtype=q.dtype, device="cuda")
    if lse is None:
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    o_ret, lse_ret = F.flash_forward(q, k, v, kernel="mma", causal=causal, scale=scale, config=config, out=out,
                                     lse=lse, backend=cuda)
    assert o_ret is out and lse_ret is lse
    used = config or C.choose_config(d, q.shape[2], causal, dtype)
    where = (f"seed={seed} shape q={tuple(q.shape)} k={tuple(k.shape)} causal={causal} "
             f"config={used.label()}")

    o = out.double().cpu()
    lse_c = lse.double().cpu()
    assert not torch.isnan(o).any(), f"O not fully written ({where})"
    assert not torch.isnan(lse_c).any(), f"LSE not fully written ({where})"

    eff_scale = 1.0 / math.sqrt(d) if scale is None else scale
    ro, rl = ref.attention(q, k, v, scale=eff_scale, causal=causal, return_lse=True)
    ro, rl = torch.from_numpy(ro), torch.from_numpy(rl)
    seen = torch.isfinite(rl)

    # Rows that see no key: O = 0 exactly, LSE = -inf.
    assert torch.equal(torch.isfinite(lse_c), seen), f"LSE -inf pattern differs ({where})"
    assert torch.all(lse_c[~seen] == -math.inf), where
    assert torch.all(o[~seen] == 0), f"O of rows without keys is not 0 ({where})"

    err = (o - ro).abs()
    bound = ATOL + RTOL * ro.abs()
    assert torch.all(err <= bound), (
        f"O off by {err.max().item():.3e} (worst excess {(err - bound).max().item():.3e}) ({where})")

    if seen.any():
        lse_err = (lse_c[seen] - rl[seen]).abs()
        assert torch.all(lse_err <= LSE_ATOL + LSE_RTOL * rl[seen].abs()), (
            f"LSE off by {lse_err.max().item():.3e} ({where})")
        sdpa_out = sdpa(q, k, v, causal, eff_scale).double().cpu()
        sdpa_err = (sdpa_out - ro).abs()[seen].max().item()
        ours = err[seen].max().item()
        rounding_floor = 2.0 ** -MANTISSA_BITS[dtype] * ro[seen].abs().max().item()
        assert ours <= max(SDPA_FACTOR * sdpa_err, rounding_floor), (
            f"max error {ours:.3e} > {SDPA_FACTOR} x SDPA's {sdpa_err:.3e} ({where})")
    return out, lse


# ------------------------------------------------------------------ correctness
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", C.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [1, 17, 777])
def test_matches_reference(cuda, dtype, head_dim, causal, seq):
    q, k, v, seed = _inputs(B, H, H, seq, seq, head_dim, dtype)
    _run_and_check(cuda, q, k, v, seed, causal=causal)


@pytest.mark.parametrize("dtype, head_dim, causal", [
    ("bfloat16", 64, False), ("bfloat16", 64, True), ("bfloat16", 128, False),
    ("bfloat16", 128, True), ("float16", 128, True), ("float16", 256, False),
])
def test_long_sequence(cuda, dtype, head_dim, causal):
    q, k, v, seed = _inputs(1, 2, 2, 4097, 4097, head_dim, dtype)
    _run_and_check(cuda, q, k, v, seed, causal=causal)


@pytest.mark.parametrize("seq_q, seq_kv", [(17, 777), (777, 17), (1, 777), (300, 1), (130, 4097)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype, head_dim", [("bfloat16", 128), ("float16", 64)])
def test_query_and_key_lengths_differ(cuda, seq_q, seq_kv, causal, dtype, head_dim):
    q, k, v, seed = _inputs(B, H, H, seq_q, seq_kv, head_dim, dtype)
    _run_and_check(cuda, q, k, v, seed, causal=causal)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", C.SUPPORTED_HEAD_DIMS)
def test_gqa(cuda, hq, hkv, causal, head_dim):
    q, k, v, seed = _inputs(B, hq, hkv, 333, 401, head_dim, "bfloat16")
    _run_and_check(cuda, q, k, v, seed, causal=causal)


# Tile shapes beyond the chooser's: 1 and 2 stages, 4 and 8 warps, 16 and 32 rows per
# warp (Q in registers or re-read from shared memory), narrow and wide key tiles.
TILE_CONFIGS = [
    (64, 64, 32, 4, 1), (64, 128, 128, 8, 2), (64, 256, 64, 8, 2), (64, 128, 64, 4, 2),
    (128, 128, 64, 8, 2), (128, 128, 32, 4, 2), (128, 64, 128, 4, 1), (128, 256, 32, 8, 1),
    (256, 64, 32, 4, 2), (256, 128, 64, 8, 2),
]


@pytest.mark.parametrize("head_dim, block_r, block_c, warps, stages", TILE_CONFIGS)
@pytest.mark.parametrize("causal", [False, True])
def test_tile_configs(cuda, head_dim, block_r, block_c, warps, stages, causal):
    dtype = DTYPES[(block_r // 64 + stages) % 2]
    cfg = C.FlashConfig(head_dim, block_r, block_c, warps, stages, causal, dtype)
    assert cfg.is_legal()[0], cfg.is_legal()
    for seq_q, seq_kv in ((777, 777), (200, 531)):
        q, k, v, seed = _inputs(B, H, H, seq_q, seq_kv, head_dim, dtype)
        _run_and_check(cuda, q, k, v, seed, causal=causal, config=cfg)


@pytest.mark.parametrize("head_dim", [16, 32, 80, 96, 112, 160])
@pytest.mark.parametrize("causal", [False, True])
def test_other_head_dims(cuda, head_dim, causal):
    dtype = DTYPES[head_dim // 16 % 2]
    q, k, v, seed = _inputs(B, H, H, 300, 517, head_dim, dtype)
    _run_and_check(cuda, q, k, v, seed, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_views_and_outputs(cuda, causal):
    d = 128
    q, k, v, seed = _inputs(B, H, 1, 259, 300, d, "bfloat16", token_major=True)
    assert not q.is_contiguous()
    # O as a view of a wider buffer ([B, N, H, D + 8], transposed); LSE with a padded head stride.
    out = torch.empty((B, 259, H, d + 8), dtype=q.dtype, device="cuda")[..., :d].transpose(1, 2)
    lse = torch.empty((B, H, 259 + 5), dtype=torch.float32, device="cuda")[..., :259]
    _run_and_check(cuda, q, k, v, seed, causal=causal, out=out, lse=lse)


def test_non_default_scale(cuda):
    q, k, v, seed = _inputs(B, H, H, 129, 129, 64, "float16")
    _run_and_check(cuda, q, k, v, seed, causal=True, scale=0.3)


def test_results_do_not_depend_on_the_run(cuda):
    """Two launches on the same inputs agree bit for bit (a race would move the error)."""
    q, k, v, _ = _inputs(B, H, H, 1000, 1000, 128, "bfloat16")
    o1, l1 = F.flash_forward(q, k, v, kernel="mma", causal=True, backend=cuda)
    o2, l2 = F.flash_forward(q, k, v, kernel="mma", causal=True, backend=cuda)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_time_flash_forward(cuda):
    q, k, v, _ = _inputs(1, 4, 4, 1024, 1024, 128, "bfloat16")
    stats = F.time_flash_forward(q, k, v, kernel="mma", causal=False, backend=cuda, warmup=2, iters=5)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert len(stats.samples_ms) == 5


# ------------------------------------------------------------------ rejected requests
def test_illegal_combination_fails_to_compile_with_the_message(cuda):
    from attnproto.backend import native

    compile_error = native().KernelCompileError
    base = BASE.constants()
    with pytest.raises(compile_error, match="shared memory"):
        cuda.kernel(C.KERNEL_NAME, HEAD_DIM=256, BLOCK_R=256, BLOCK_C=128, WARPS=16, STAGES=2,
                    CAUSAL=0, DTYPE=1, **base)
    with pytest.raises(compile_error, match=r"BLOCK_R must be a positive multiple of 16\*WARPS"):
        cuda.kernel(C.KERNEL_NAME, HEAD_DIM=64, BLOCK_R=96, BLOCK_C=64, WARPS=4, STAGES=2,
                    CAUSAL=0, DTYPE=0, **base)
    assert issubclass(compile_error, RuntimeError)


def test_illegal_config_refused_before_compiling(cuda):
    q, k, v, _ = _inputs(1, 1, 1, 64, 64, 256, "bfloat16")
    cfg = C.FlashConfig(256, 256, 128, 16, 2, False, "bfloat16")
    with pytest.raises(ValueError, match="config.*shared memory"):
        F.flash_forward(q, k, v, kernel="mma", config=cfg, backend=cuda)


@pytest.mark.parametrize("field, value", [("causal", True), ("dtype", "float16"), ("head_dim", 128)])
def test_config_must_match_the_inputs(cuda, field, value):
    q, k, v, _ = _inputs(1, 1, 1, 64, 64, 64, "bfloat16")
    cfg = C.choose_config(64, 64, False, "bfloat16").with_(**{field: value})
    with pytest.raises(ValueError, match=f"config: {field}"):
        F.flash_forward(q, k, v, kernel="mma", config=cfg, backend=cuda)


def _bad_input_cases():
    def make(**kw):
        base = dict(b=1, hq=2, hkv=2, nq=16, nkv=16, d=64, dtype="bfloat16")
        base.update(kw)
        q, k, v, _ = _inputs(base["b"], base["hq"], base["hkv"], base["nq"], base["nkv"],
                             base["d"], base["dtype"])
        return q, k, v

    def f32():
        q, k, v = make()
        return q.float(), k.float(), v.float()

    def mixed():
        q, k, v = make()
        return q, k.half(), v

    def rank3():
        q, k, v = make()
        return q[0], k, v

    def head_dim_mismatch():
        q, _, _ = make()
        _, k, v = make(d=128)
        return q, k, v

    def gqa():
        return make(hq=3, hkv=2)

    def odd_head_dim():
        return make(d=72)

    def last_dim_strided():
        q, k, v = make()
        wide = torch.empty(q.shape[:3] + (128,), dtype=q.dtype, device="cuda")
        return wide[..., ::2], k, v

    def token_stride_unaligned():
        q, k, v = make()
        wide = torch.zeros(q.shape[:3] + (68,), dtype=q.dtype, device="cuda")
        return q, wide[..., :64], v

    def base_unaligned():
        q, k, v = make()
        flat = torch.zeros(v.numel() + 1, dtype=v.dtype, device="cuda")
        return q, k, flat[1:].view(v.shape)

    def on_cpu():
        q, k, v = make()
        return q.cpu(), k, v

    def shape_mismatch_v():
        q, k, _ = make()
        _, _, v = make(nkv=17)
        return q, k, v

    return [
        (f32, TypeError, "q: dtype float32"),
        (mixed, TypeError, "k: dtype float16"),
        (rank3, ValueError, "q: expected 4 dimensions"),
        (head_dim_mismatch, ValueError, "k: head_dim 128"),
        (gqa, ValueError, "k: 2 kv heads"),
        (odd_head_dim, ValueError, "q: head_dim 72"),
        (last_dim_strided, ValueError, "q: last dimension must be contiguous"),
        (token_stride_unaligned, ValueError, "k: stride 68"),
        (base_unaligned, ValueError, "v: data pointer"),
        (on_cpu, ValueError, "k: on device 'cuda' but q is on 'cpu'"),
        (shape_mismatch_v, ValueError, "v: shape"),
    ]


@pytest.mark.parametrize("case, exc, match", _bad_input_cases(), ids=lambda x: getattr(x, "__name__", None))
def test_bad_inputs_rejected(cuda, case, exc, match):
    q, k, v = case()
    with pytest.raises(exc, match=match):
        F.flash_forward(q, k, v, kernel="mma", backend=cuda)


@pytest.mark.parametrize("what", ["out_shape", "out_dtype", "lse_dtype", "lse_shape", "scale"])
def test_bad_outputs_and_scale_rejected(cuda, what):
    q, k, v, _ = _inputs(1, 2, 2, 16, 16, 64, "float16")
    kwargs = {}
    if what == "out_shape":
        kwargs["out"], exc, match = torch.empty((1, 2, 15, 64), dtype=q.dtype, device="cuda"), ValueError, "out: expected shape"
    elif what == "out_dtype":
        kwargs["out"], exc, match = torch.empty(q.shape, dtype=torch.bfloat16, device="cuda"), TypeError, "out: dtype"
    elif what == "lse_dtype":
        kwargs["lse"], exc, match = torch.empty(q.shape[:3], dtype=q.dtype, device="cuda"), TypeError, "lse: dtype"
    elif what == "lse_shape":
        kwargs["lse"], exc, match = torch.empty((1, 2, 17), dtype=torch.float32, device="cuda"), ValueError, "lse: expected shape"
    else:
        kwargs["scale"], exc, match = -0.125, ValueError, "scale: must be positive"
    with pytest.raises(exc, match=match):
        F.flash_forward(q, k, v, kernel="mma", backend=cuda, **kwargs)
