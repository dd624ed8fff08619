"""CPU-only tests of the linear-attention host layer: configs, specialisations,
cost model, input validation, and the proto6 experiment's reduced CPU sweep."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from attnproto.ops import linear as lin

SHADERS = Path(__file__).resolve().parents[1] / "shaders" / "cuda"


# ------------------------------------------------------------------ fake CUDA tensors
class FakeCudaTensor:
    """A __cuda_array_interface__ object: what the checks see of a CUDA tensor, no GPU needed."""

    def __init__(self, shape, dtype="float16", strides=None, ptr=1 << 20):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        if strides is None:
            strides, acc = [], 1
            for d in reversed(self.shape):
                strides.append(acc)
                acc *= d
            strides = tuple(reversed(strides))
        self.strides_elems = tuple(strides)
        self.ptr = ptr

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str,
                "strides": tuple(s * self.dtype.itemsize for s in self.strides_elems),
                "data": (self.ptr, False), "version": 3}


def qkv(shape=(2, 3, 100, 64), dtype="float16", **kw):
    return tuple(FakeCudaTensor(shape, dtype, **kw) for _ in range(3))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("chunk", lin.SUPPORTED_CHUNKS)
def test_check_inputs_accepts_supported(dtype, head_dim, chunk):
    q, k, v = qkv((1, 2, 257, head_dim), dtype)
    prob = lin.check_inputs(q, k, v, chunk_size=chunk, scale=0.5, decay=0.9)
    assert (prob.batch, prob.num_heads, prob.seq_len, prob.head_dim) == (1, 2, 257, head_dim)
    assert prob.chunk == chunk and prob.scale == 0.5 and prob.dtype == dtype
    np.testing.assert_allclose(prob.gamma, [0.9, 0.9])


@pytest.mark.parametrize("head_dim", [32, 63, 65, 96, 127, 256])
def test_unsupported_head_dim_names_q(head_dim):
    q, k, v = qkv((1, 1, 64, head_dim))
    with pytest.raises(ValueError, match=r"^q: head dim"):
        lin.check_inputs(q, k, v, chunk_size=64)


@pytest.mark.parametrize("chunk", [16, 48, 100, 512])
def test_unsupported_chunk(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        lin.check_inputs(*qkv(), chunk_size=chunk)


@pytest.mark.parametrize("chunk", [64.0, "64", True, None])
def test_chunk_wrong_type(chunk):
    with pytest.raises(TypeError, match="chunk_size"):
        lin.check_inputs(*qkv(), chunk_size=chunk)


def test_wrong_dtype():
    q, k, v = qkv(dtype="float64")
    with pytest.raises(TypeError, match="q: dtype float64"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_int_dtype():
    q, k, v = qkv(dtype="int16")
    with pytest.raises(TypeError, match="q: dtype"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_mixed_dtypes():
    q, k, _ = qkv(dtype="float16")
    v = FakeCudaTensor((2, 3, 100, 64), "float32")
    with pytest.raises(TypeError):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_wrong_rank():
    q = FakeCudaTensor((3, 100, 64))
    _, k, v = qkv()
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_shape_mismatch_k():
    q, _, v = qkv()
    k = FakeCudaTensor((2, 3, 99, 64))
    with pytest.raises(ValueError, match="^k:"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_value_dim_mismatch():
    q, k, _ = qkv((1, 2, 64, 64))
    v = FakeCudaTensor((1, 2, 64, 128))
    with pytest.raises(ValueError, match="^v: head dim 128"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_noncontiguous_head_dim():
    q, k, _ = qkv((1, 2, 64, 64))
    v = FakeCudaTensor((1, 2, 64, 64), strides=(8192, 4096, 1, 64))
    with pytest.raises(ValueError, match="v: last dimension must be contiguous"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_token_stride_not_vector_multiple():
    q, k, _ = qkv((1, 2, 64, 64))
    v = FakeCudaTensor((1, 2, 64, 64), strides=(2 * 64 * 68, 64 * 68, 68 + 1, 1))
    with pytest.raises(ValueError, match="v: token stride 69"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_strided_view_with_aligned_strides_is_accepted():
    # [B, T, H, D] memory seen as [B, H, T, D]: token stride H*D, head stride D.
    shape = (2, 4, 100, 64)
    strides = (100 * 4 * 64, 64, 4 * 64, 1)
    q, k, v = qkv(shape, strides=strides)
    assert lin.check_inputs(q, k, v, chunk_size=32).seq_len == 100


def test_misaligned_pointer():
    q, k, _ = qkv()
    v = FakeCudaTensor((2, 3, 100, 64), ptr=(1 << 20) + 2)
    with pytest.raises(ValueError, match="v: data pointer must be 16-byte aligned"):
        lin.check_inputs(q, k, v, chunk_size=64)


def test_host_array_rejected():
    q = np.zeros((1, 2, 64, 64), np.float16)
    _, k, v = qkv((1, 2, 64, 64))
    with pytest.raises(ValueError, match="q: expected a tensor on device 'cuda'"):
        lin.check_inputs(q, k, v, chunk_size=64)


@pytest.mark.parametrize("decay", [0.0, 1.5, -0.1, [0.9, 0.9], float("nan")])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        lin.check_inputs(*qkv(), chunk_size=64, decay=decay)


def test_scale_checks():
    with pytest.raises(TypeError, match="scale"):
        lin.check_inputs(*qkv(), chunk_size=64, scale=None)
    with pytest.raises(TypeError, match="scale"):
        lin.check_inputs(*qkv(), chunk_size=64, scale="1")
    with pytest.raises(ValueError, match="scale"):
        lin.check_inputs(*qkv(), chunk_size=64, scale=float("inf"))


# ------------------------------------------------------------------ configs and specialisations
def _kernel_constant_names(kernel: str) -> set:
    src = (SHADERS / f"{kernel}.cu").read_text()
    return set(re.findall(r"#ifndef (\w+)\n#error", src))


def test_specialisations_name_exactly_the_kernels_constants():
    expected = {lin.KERNEL_H: _kernel_constant_names(lin.KERNEL_H),
                lin.KERNEL_O: _kernel_constant_names(lin.KERNEL_O),
                lin.KERNEL_FUSED: _kernel_constant_names(lin.KERNEL_FUSED)}
    specs = lin.linear_specialisations()
    assert {name for name, _ in specs} == set(expected)
    for name, consts in specs:
        assert set(consts) == expected[name], (name, consts)
    assert len({(n, tuple(sorted(c.items()))) for n, c in specs}) == len(specs)
    assert lin.specialisations is lin.linear_specialisations


def test_specialisations_cover_every_supported_problem():
    specs = {(n, tuple(sorted(c.items()))) for n, c in lin.linear_specialisations()}
    for dtype in lin.SUPPORTED_DTYPES:
        for d in lin.SUPPORTED_HEAD_DIMS:
            for c in lin.SUPPORTED_CHUNKS:
                for decay in (False, True):
                    for heads in (1, 8, 64, 1024):
                        cfg = lin.choose_config(dtype, d, c, decay, num_state_heads=heads)
                        assert not cfg.problems()
                        assert (lin.KERNEL_H, tuple(sorted(cfg.h_constants().items()))) in specs
                        assert (lin.KERNEL_O, tuple(sorted(cfg.o_constants().items()))) in specs
                        fused = lin.choose_fused_config(dtype, d, c, decay, num_heads_total=heads, seq_len=16384)
                        exists = dtype in lin.FUSED_DTYPES and c in lin.FUSED_CHUNKS
                        assert (fused is not None) == exists
                        if fused is not None:
                            assert not fused.problems()
                            assert (lin.KERNEL_FUSED, tuple(sorted(fused.constants().items()))) in specs


def _fused_kernel_limits():
    """Numbers the fused kernel's static_asserts use, read from its source."""
    src = (SHADERS / f"{lin.KERNEL_FUSED}.cu").read_text()
    acc = int(re.search(r"constexpr int kMaxAccRegs = (\d+);", src).group(1))
    return acc


def test_fused_limits_mirror_the_kernel():
    assert _fused_kernel_limits() == lin.FUSED_MAX_ACC_FLOATS


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk", lin.FUSED_CHUNKS)
@pytest.mark.parametrize("head_dim", lin.SUPPORTED_HEAD_DIMS)
def test_fused_smem_and_registers_mirror_kernel_formula(head_dim, chunk, decay):
    for dv in lin.FUSED_BLOCK_DV_CHOICES:
        cfg = lin.FusedConfig("bfloat16", head_dim, chunk, dv, 3, decay)
        stage = 2 * chunk * (head_dim + 8) + chunk * (dv + 8)
        assert cfg.smem_bytes() == (3 * stage + 2 * head_dim * (dv + 8)) * 2 + (4 * chunk if decay else 0)
        warps = chunk // 16
        assert cfg.threads == 32 * warps and cfg.with_state_warps(1).threads == 64 * warps
        warps_dk = min(warps, head_dim // 16)
        if head_dim % dv == 0 and (dv // (warps // warps_dk)) % 16 == 0:
            state_tiles = (head_dim // warps_dk // 16) * (dv // (warps // warps_dk) // 8)
            assert cfg.acc_floats() == 4 * (chunk // 8 + dv // 8 + state_tiles)


def test_fused_illegal_configs_are_refused():
    assert lin.FusedConfig("float32", 64, 64, 32, 3, False).problems()          # no FP32 fused kernel
    assert lin.FusedConfig("bfloat16", 64, 256, 32, 3, False).problems()        # chunk 256
    assert lin.FusedConfig("bfloat16", 64, 128, 16, 3, False).problems()        # 2 warps over 16 state columns
    assert not lin.FusedConfig("bfloat16", 64, 128, 32, 3, False).problems()
    assert lin.FusedConfig("bfloat16", 128, 64, 128, 3, False).problems()       # register budget
    assert lin.FusedConfig("bfloat16", 128, 64, 48, 3, False).problems()        # block_dv
    assert lin.FusedConfig("bfloat16", 128, 64, 64, 5, False).problems()        # stages
    assert not lin.FusedConfig("bfloat16", 128, 64, 64, 3, True).problems()
    assert lin.choose_fused_config("float32", 64, 64, False, num_heads_total=64, seq_len=4096) is None
    assert lin.choose_fused_config("float16", 64, 256, False, num_heads_total=64, seq_len=4096) is None


def test_choose_fused_config_fills_a_wave():
    n = 16384
    few = lin.choose_fused_config("bfloat16", 64, 64, False, num_heads_total=64, seq_len=n, sm_count=132)
    many = lin.choose_fused_config("bfloat16", 64, 64, False, num_heads_total=4096, seq_len=n, sm_count=132)
    for cfg in (few, many):
        assert not cfg.problems() and cfg.stages == lin.FUSED_STAGES
        assert 1 <= cfg.segments <= lin.FUSED_MAX_SEGMENTS
    assert few.grid(1, 64)[0] * 64 >= lin.FUSED_MIN_WAVES * 132
    # Many heads: the widest split, no segments (nothing to gain, the prefix walk to pay).
    widest = lin.fused_variants("bfloat16", 64, 64, False, lin.FUSED_STATE_WARPS)[0]
    assert (many.block_dv, many.state_warps, many.segments) == (widest.block_dv, widest.state_warps, 1)
    # Where the state group would make the block too large, the chooser falls back to none.
    c128 = lin.choose_fused_config("bfloat16", 64, 128, False, num_heads_total=64, seq_len=n)
    assert c128.state_warps == 0 and not c128.problems()
    assert lin.FusedConfig("bfloat16", 64, 128, 64, 3, False, 1, 1).problems()     # 512 threads
    # Segments fit in the resident blocks and leave each at least the minimum of chunks.
    assert few.grid(1, 64)[0] * 64 <= few.resident_blocks_per_sm() * 132
    short = lin.choose_fused_config("bfloat16", 64, 64, False, num_heads_total=64, seq_len=200, sm_count=132)
    assert short.segments <= max(1, -(-200 // 64) // lin.FUSED_MIN_CHUNKS_PER_SEGMENT)
    # D=128, chunk 128: three stages exceed shared memory, two fit.
    big = lin.choose_fused_config("bfloat16", 128, 128, False, num_heads_total=64, seq_len=n)
    assert big.stages == 2 and lin.FusedConfig("bfloat16", 128, 128, big.block_dv, 3, False).problems()
    assert lin.FusedConfig("bfloat16", 64, 64, 32, 3, False, 0).problems()


@pytest.mark.parametrize("dtype", lin.SUPPORTED_DTYPES)
@pytest.mark.parametrize("head_dim", lin.SUPPORTED_HEAD_DIMS)
def test_smem_mirrors_kernel_formula(dtype, head_dim):
    eb = lin.ELEM_BYTES[dtype]
    pr, pc = (8, 4) if dtype == "float32" else (8, 8)
    cfg = lin.LinearConfig(dtype, head_dim, 128, 32, 64, 1, True)
    t = 64
    assert cfg.h_smem_bytes() == 3 * (t * (64 + pc) + t * (32 + pc)) * eb + 4 * t
    assert cfg.o_smem_bytes() == (64 * (head_dim + pr) + head_dim * (head_dim + pc)
                                  + 64 * (head_dim + pr) + 64 * (head_dim + pc)) * eb


def test_illegal_configs_are_refused():
    # float32, D=128, two stages: 240 KB > 227 KB (the kernel's static_assert too).
    assert lin.LinearConfig("float32", 128, 128, 64, 64, 2, False).problems()
    assert lin.LinearConfig("float16", 128, 32, 64, 64, 1, False).problems()   # BLOCK_Q > chunk
    assert lin.LinearConfig("float16", 96, 64, 32, 64, 1, False).problems()
    assert lin.LinearConfig("float16", 64, 64, 128, 64, 1, False).problems()
    with pytest.raises(ValueError, match="head_dim"):
        lin.choose_config("float16", 80, 64, False, num_state_heads=8)
    with pytest.raises(ValueError, match="chunk_size"):
        lin.choose_config("float16", 64, 100, False, num_state_heads=8)
    with pytest.raises(TypeError, match="dtype"):
        lin.choose_config("float64", 64, 64, False, num_state_heads=8)


def test_choose_config_narrows_state_tiles_for_parallelism():
    few = lin.choose_config("bfloat16", 128, 64, False, num_state_heads=4, sm_count=132)
    many = lin.choose_config("bfloat16", 128, 64, False, num_state_heads=4096, sm_count=132)
    assert few.block_dv == min(lin.H_BLOCK_DV_CHOICES)
    assert many.block_dv == max(lin.H_BLOCK_DV_CHOICES)
    assert lin.choose_config("bfloat16", 64, 32, False, num_state_heads=8).block_q == 32
    # Two stages only where two blocks still fit on an SM.
    for cfg in (lin.choose_config(dt, d, c, False, num_state_heads=64)
                for dt in lin.SUPPORTED_DTYPES for d in lin.SUPPORTED_HEAD_DIMS for c in lin.SUPPORTED_CHUNKS):
        if cfg.stages == 2:
            assert cfg.chunk > cfg.block_q and 2 * cfg.o_smem_bytes() <= lin.SMEM_PER_SM


# ------------------------------------------------------------------ cost model
def _brute_flops(b, h, n, d, c):
    total = 0
    starts = list(range(0, n, c))
    for idx, s in enumerate(starts):
        length = min(c, n - s)
        if idx < len(starts) - 1:
            total += sum(2 * d * d for _ in range(c)) + d * d
        if idx > 0:
            total += 2 * length * d * d
        for i in range(length):
            total += 2 * 2 * (i + 1) * d          # q_i . k_j and p_ij v_j for j <= i
    return b * h * total


@pytest.mark.parametrize("n", [1, 31, 64, 100, 257])
@pytest.mark.parametrize("c", [32, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_flops_match_brute_force(n, c, d):
    assert lin.linear_attention_flops(2, 3, n, d, c) == _brute_flops(2, 3, n, d, c)


def test_flops_asymptotics():
    n, d, c = 65536, 128, 64
    per_head = lin.linear_attention_flops(1, 1, n, d, c)
    # 4 N D^2 (K^T V, Q H) + N D^2 / C (prefix) + 2 N (C + 1) D (causal halves), less the
    # first chunk's Q H and the last chunk's K^T V (2 C D^2 each): 2 * 2 C D^2 / total < 1e-3.
    assert per_head == pytest.approx(4 * n * d * d + n * d * d // c + 2 * n * (c + 1) * d, rel=1e-3)


@pytest.mark.parametrize("dtype,eb", [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_bytes(dtype, eb):
    b, h, n, d, c = 2, 3, 1000, 64, 64
    nc = math.ceil(n / c)
    expected = b * h * (2 * (nc - 1) * c * d * eb + nc * d * d * eb + 4 * n * d * eb + (nc - 1) * d * d * eb)
    assert lin.linear_attention_bytes(b, h, n, d, c, dtype) == expected
    with pytest.raises(TypeError, match="dtype"):
        lin.linear_attention_bytes(b, h, n, d, c, "int8")
    assert lin.linear_attention_bytes(b, h, n, d, c, dtype, "fused") == b * h * 4 * n * d * eb
    with pytest.raises(ValueError, match="algorithm"):
        lin.linear_attention_bytes(b, h, n, d, c, dtype, "three_pass")


def test_cost_model_rejects_bad_sizes():
    with pytest.raises((TypeError, ValueError), match="seq_len"):
        lin.linear_attention_flops(1, 1, 0, 64, 64)


def test_gflops():
    assert lin.gflops(2_000_000_000, 1000.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ms"):
        lin.gflops(1, 0.0)


# ------------------------------------------------------------------ proto6 helpers and CPU sweep
def test_crossover_interpolation():
    from attnproto.experiments.proto6 import common as proto6

    ns = [1024, 2048, 4096, 8192]
    n_star, how = proto6._crossover(ns, [2.0, 2.0, 2.0, 2.0], [1.0, 2.0 * 2 ** -1, 8.0, 32.0])
    assert how == "interpolated" and 2048 < n_star < 4096
    assert proto6._crossover(ns, [1, 1, 1, 1], [2, 2, 2, 2]) == (1024.0, "below")
    assert proto6._crossover(ns, [3, 3, 3, 3], [2, 2, 2, 2]) == (None, "never")
    # A win that is lost again at larger N does not count.
    assert proto6._crossover(ns, [1, 3, 3, 3], [2, 2, 2, 2]) == (None, "never")


def test_tolerance_ratio_fails_nan():
    from attnproto.experiments.proto6 import common as proto6

    exact = np.ones((2, 2))
    assert proto6._tolerance_ratio(np.full((2, 2), np.nan), exact, "float32") == math.inf
    assert proto6._tolerance_ratio(exact + 5e-4, exact, "float32") == pytest.approx(5e-4 / (1e-4 + 1e-3))


def test_proto6_cpu_quick_run(tmp_path):
    from attnproto.experiments import proto6
    from attnproto.experiments.registry import ExperimentContext, get, run_experiment

    ctx = ExperimentContext(experiment="proto6", backend="cpu", device={"device_name": "cpu"},
                            device_name="cpu", driver="numpy", commit="test", quick=True,
                            progress=lambda it=None, total=None, desc="": it, out_dir=tmp_path,
                            rng=np.random.default_rng(6))
    exp = get("proto6")
    assert exp.func is proto6.run
    result = run_experiment(exp, ctx)
    impls = {r["config"]["impl"] for r in result.records}
    assert impls == {"cpu_numpy", "cpu_flash"}
    n_lin = len(proto6.CPU_SEQ_LENS_QUICK) * len(proto6.CPU_CHUNKS_QUICK) * len(proto6.CPU_HEAD_DIMS_QUICK)
    assert sum(r["config"]["impl"] == "cpu_numpy" for r in result.records) == n_lin
    assert len(result.findings) >= 5
    for r in result.records:
        if r["config"]["impl"] == "cpu_numpy":
            assert 0 <= r["metrics"]["tolerance_ratio"] <= 1
            assert r["metrics"]["tflops"] > 0
