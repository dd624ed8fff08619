"""attnproto.validate: every bad input raises TypeError/ValueError naming the argument."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from attnproto import validate as v


def _qkv(dtype=np.float16, b=2, hq=4, hkv=2, nq=5, nkv=7, d=64):
    return (np.zeros((b, hq, nq, d), dtype), np.zeros((b, hkv, nkv, d), dtype),
            np.zeros((b, hkv, nkv, d), dtype))


class _FakeDeviceArray:
    """Minimal __cuda_array_interface__ producer (what CuPy/Numba expose)."""

    def __init__(self, shape, typestr, strides=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "strides": strides,
                                         "data": (0, False), "version": 3}


# ------------------------------------------------------------------- tensors
def test_tensor_info_numpy_strides_in_elements():
    x = np.zeros((2, 3, 8), np.float32)[:, ::2]
    info = v.tensor_info(x, "x")
    assert info.shape == (2, 2, 8) and info.strides == (24, 16, 1)
    assert info.dtype == "float32" and info.device == "cpu" and info.kind == "numpy"


def test_tensor_info_cuda_array_interface():
    info = v.tensor_info(_FakeDeviceArray((2, 3, 4), "<f2"), "q")
    assert info.dtype == "float16" and info.strides == (12, 4, 1) and info.device == "cuda"
    info = v.tensor_info(_FakeDeviceArray((2, 3), "<f4", strides=(32, 4)), "q")
    assert info.strides == (8, 1)


def test_tensor_info_rejects_non_arrays():
    with pytest.raises(TypeError, match="q: expected a numpy array or a tensor, got list"):
        v.tensor_info([1.0, 2.0], "q")


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64", "int32"])
def test_dtype_name_canonical(name):
    assert v.dtype_name(name) == name
    assert v.dtype_name(f"torch.{name}") == name


def test_dtype_name_of_numpy_dtypes():
    assert v.dtype_name(np.dtype(np.float16)) == "float16"
    assert v.dtype_name(np.float32) == "float32"


# ---------------------------------------------------------------- attention
def test_check_attention_inputs_returns_shape():
    shape = v.check_attention_inputs(*_qkv(b=3, hq=6, hkv=2, nq=17, nkv=77, d=72))
    assert (shape.batch, shape.num_heads, shape.num_kv_heads, shape.seq_q, shape.seq_kv,
            shape.head_dim, shape.dtype, shape.device) == (3, 6, 2, 17, 77, 72, "float16", "cpu")
    assert shape.group == 3


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_wrong_dtype_names_the_argument(arg):
    tensors = dict(zip("qkv", _qkv(np.float16)))
    tensors[arg] = tensors[arg].astype(np.float64)
    with pytest.raises(TypeError, match=rf"^{arg}: dtype float64 not supported; expected one of "
                                        r"float16, bfloat16$"):
        v.check_attention_inputs(tensors["q"], tensors["k"], tensors["v"],
                                 allowed_dtypes=("float16", "bfloat16"))


@pytest.mark.parametrize("arg", ["k", "v"])
def test_mixed_dtypes_rejected(arg):
    tensors = dict(zip("qkv", _qkv(np.float16)))
    tensors[arg] = tensors[arg].astype(np.float32)
    with pytest.raises(TypeError, match=rf"{arg}: dtype float32 does not match q dtype float16"):
        v.check_attention_inputs(tensors["q"], tensors["k"], tensors["v"])


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_wrong_rank(arg):
    tensors = dict(zip("qkv", _qkv()))
    tensors[arg] = tensors[arg][0]
    with pytest.raises(ValueError, match=rf"{arg}: expected 4 dimensions, got 3"):
        v.check_attention_inputs(tensors["q"], tensors["k"], tensors["v"])


@pytest.mark.parametrize("arg", ["k", "v"])
def test_head_dim_mismatch(arg):
    tensors = dict(zip("qkv", _qkv(d=72)))
    tensors[arg] = np.zeros(tensors[arg].shape[:3] + (64,), np.float16)
    with pytest.raises(ValueError, match=rf"{arg}: head_dim 64 does not match q head_dim 72"):
        v.check_attention_inputs(tensors["q"], tensors["k"], tensors["v"])


def test_batch_mismatch():
    q, k, vv = _qkv()
    with pytest.raises(ValueError, match="k: batch 1 does not match q batch 2"):
        v.check_attention_inputs(q, k[:1], vv)


def test_kv_shape_mismatch():
    q, k, vv = _qkv()
    with pytest.raises(ValueError, match=r"v: shape \(2, 2, 6, 64\) does not match k shape"):
        v.check_attention_inputs(q, k, vv[:, :, :6])


def test_gqa_heads_must_divide():
    q, _, _ = _qkv(hq=4)
    k = np.zeros((2, 3, 7, 64), np.float16)
    with pytest.raises(ValueError, match="k: 3 kv heads do not divide the 4 query heads of q"):
        v.check_attention_inputs(q, k, k)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_non_contiguous_last_dim(arg):
    tensors = dict(zip("qkv", _qkv(d=128)))
    tensors[arg] = tensors[arg][..., ::2]
    if arg == "q":
        tensors["k"], tensors["v"] = tensors["k"][..., :64], tensors["v"][..., :64]
    else:
        tensors["q"] = tensors["q"][..., :64]
        other = "v" if arg == "k" else "k"
        tensors[other] = tensors[other][..., :64]
    with pytest.raises(ValueError, match=rf"{arg}: last dimension must be contiguous \(stride 1\), "
                                        r"got stride 2"):
        v.check_attention_inputs(tensors["q"], tensors["k"], tensors["v"])


def test_non_contiguous_last_dim_allowed_when_not_required():
    q, k, vv = (x[..., ::2] for x in _qkv(d=128))
    assert v.check_attention_inputs(q, k, vv, contiguous_last_dim=False).head_dim == 64


def test_strided_token_axis_is_fine():
    q, k, vv = _qkv(nq=10)
    assert v.check_attention_inputs(q[:, :, ::2], k, vv).seq_q == 5


def test_negative_strides_rejected():
    q, k, vv = _qkv()
    with pytest.raises(ValueError, match="q: negative strides"):
        v.check_attention_inputs(q[:, :, ::-1], k, vv)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_zero_size_rejected(arg):
    tensors = dict(zip("qkv", _qkv()))
    tensors[arg] = tensors[arg][:, :, :0]
    if arg != "q":
        tensors["k"], tensors["v"] = tensors["k"][:, :, :0], tensors["v"][:, :, :0]
    with pytest.raises(ValueError, match=rf"{'q' if arg == 'q' else 'k'}: zero-size tensor"):
        v.check_attention_inputs(tensors["q"], tensors["k"], tensors["v"])


def test_supported_head_dims():
    with pytest.raises(ValueError, match="q: head_dim 72 not supported; expected one of 64, 128"):
        v.check_attention_inputs(*_qkv(d=72), head_dims=(64, 128))
    assert v.check_attention_inputs(*_qkv(d=128), head_dims=(64, 128)).head_dim == 128


def test_causal_must_be_bool():
    with pytest.raises(TypeError, match="causal: expected a bool, got int"):
        v.check_attention_inputs(*_qkv(), causal=1)


def test_device_requirement():
    with pytest.raises(ValueError, match="q: expected a tensor on device 'cuda', got 'cpu'"):
        v.check_attention_inputs(*_qkv(), device="cuda")


def test_mixed_devices_rejected():
    q, k, vv = _qkv()
    fake_k = _FakeDeviceArray(k.shape, "<f2")
    with pytest.raises(ValueError, match="k: on device 'cuda' but q is on 'cpu'"):
        v.check_attention_inputs(q, fake_k, _FakeDeviceArray(k.shape, "<f2"))


# ------------------------------------------------------------------- scalars
def test_scale():
    assert v.check_scale(None, 64) == 0.125
    assert v.check_scale(2, 64) == 2.0
    with pytest.raises(ValueError, match="scale: must be finite"):
        v.check_scale(float("nan"), 64)
    with pytest.raises(TypeError, match="scale: expected a float or None, got str"):
        v.check_scale("0.1", 64)
    with pytest.raises(TypeError, match="scale"):
        v.check_scale(True, 64)


def test_positive_int():
    assert v.check_positive_int(np.int64(3), "block_r") == 3
    with pytest.raises(ValueError, match="block_r: must be positive, got 0"):
        v.check_positive_int(0, "block_r")
    with pytest.raises(TypeError, match="block_c: expected an int, got float"):
        v.check_positive_int(2.0, "block_c")
    with pytest.raises(TypeError, match="block_c: expected an int, got bool"):
        v.check_positive_int(True, "block_c")
    with pytest.raises(ValueError, match="partition_size"):
        v.check_partition_size(-4)


def test_nonnegative_int():
    assert v.check_nonnegative_int(0, "seq_q") == 0
    assert v.check_nonnegative_int(np.int32(7), "seq_q") == 7
    with pytest.raises(ValueError, match="seq_kv: must be >= 0, got -1"):
        v.check_nonnegative_int(-1, "seq_kv")
    with pytest.raises(TypeError, match="seq_q: expected an int, got float"):
        v.check_nonnegative_int(1.0, "seq_q")
    with pytest.raises(TypeError, match="seq_q: expected an int, got bool"):
        v.check_nonnegative_int(False, "seq_q")


def test_chunk_size_limit():
    assert v.check_chunk_size(v.MAX_CHUNK_SIZE) == 2**31 - 1
    assert v.check_chunk_size(np.int64(10**5)) == 10**5
    with pytest.raises(ValueError, match="chunk_size: 2147483648 is above the maximum 2147483647"):
        v.check_chunk_size(2**31)
    with pytest.raises(ValueError, match="chunk_size: must be positive"):
        v.check_chunk_size(0)
    q = np.zeros((1, 2, 4, 8), np.float16)
    with pytest.raises(ValueError, match="chunk_size: .* above the maximum"):
        v.check_linear_attention_inputs(q, q, q, chunk_size=10**12)
    v.check_linear_attention_inputs(q, q, q, chunk_size=10**5)     # above N is fine here


# ------------------------------------------------------------------ paged KV
def _paged(num_blocks=8, block_size=4, batch=2, max_blocks=3, d=64):
    q = np.zeros((batch, 4, 1, d), np.float16)
    cache = np.zeros((num_blocks, 2, block_size, d), np.float16)
    table = np.arange(batch * max_blocks, dtype=np.int32).reshape(batch, max_blocks) % num_blocks
    seq_lens = np.full(batch, block_size * max_blocks, np.int32)
    return q, cache, table, seq_lens


def test_check_paged_inputs_returns_shape():
    q, cache, table, lens = _paged()
    shape = v.check_paged_inputs(q, cache, cache, table, lens)
    assert (shape.batch, shape.num_heads, shape.num_kv_heads, shape.seq_q, shape.head_dim,
            shape.num_blocks, shape.block_size, shape.max_blocks_per_seq) == (2, 4, 2, 1, 64,
                                                                              8, 4, 3)
    assert shape.group == 2 and shape.max_seq_kv == 12


def test_block_table_dtype_and_rank():
    q, cache, table, lens = _paged()
    with pytest.raises(TypeError, match="block_table: dtype int64 not supported; expected one "
                                        "of int32"):
        v.check_paged_inputs(q, cache, cache, table.astype(np.int64), lens)
    with pytest.raises(ValueError, match="block_table: expected 2 dimensions"):
        v.check_paged_inputs(q, cache, cache, table[0], lens)
    with pytest.raises(TypeError, match="seq_lens: dtype float32"):
        v.check_paged_inputs(q, cache, cache, table, lens.astype(np.float32))
    with pytest.raises(ValueError, match="block_table: 1 rows do not match batch 2"):
        v.check_paged_inputs(q, cache, cache, table[:1], lens)
    with pytest.raises(ValueError, match="seq_lens: 1 entries do not match batch 2"):
        v.check_paged_inputs(q, cache, cache, table, lens[:1])


def test_block_table_values():
    q, cache, table, lens = _paged()
    bad = table.copy()
    bad[1, 2] = 8
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = 8 out of range \[0, 8\)"):
        v.check_paged_inputs(q, cache, cache, bad, lens)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = -3"):
        v.check_paged_inputs(q, cache, cache, bad, lens)
    short = lens.copy()
    short[1] = 8                     # only two blocks used: the bad third entry is never read
    assert v.check_paged_inputs(q, cache, cache, bad, short).max_blocks_per_seq == 3
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 13 out of range \[0, 12\]"):
        v.check_paged_inputs(q, cache, cache, table, np.array([13, 4], np.int32))
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = -1"):
        v.check_paged_inputs(q, cache, cache, table, np.array([4, -1], np.int32))
    assert v.check_paged_inputs(q, cache, cache, bad, lens, check_values=False)


def test_paged_cache_shapes():
    q, cache, table, lens = _paged()
    with pytest.raises(ValueError, match="k_cache: head_dim 32 does not match q head_dim 64"):
        v.check_paged_inputs(q, cache[..., :32], cache[..., :32], table, lens)
    with pytest.raises(ValueError, match="v_cache: shape"):
        v.check_paged_inputs(q, cache, cache[:4], table, lens)
    with pytest.raises(ValueError, match="k_cache: 3 kv heads do not divide"):
        c3 = np.zeros((8, 3, 4, 64), np.float16)
        v.check_paged_inputs(q, c3, c3, table, lens)
    with pytest.raises(TypeError, match="v_cache: dtype float32 does not match q dtype float16"):
        v.check_paged_inputs(q, cache, cache.astype(np.float32), table, lens)


# ----------------------------------------------------------- linear attention
def test_linear_inputs():
    q = np.zeros((2, 3, 10, 16), np.float32)
    vv = np.zeros((2, 3, 10, 8), np.float32)
    shape, gamma = v.check_linear_attention_inputs(q, q, vv, decay=0.5)
    assert (shape.key_dim, shape.value_dim, shape.seq_len) == (16, 8, 10)
    np.testing.assert_array_equal(gamma, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="k: shape"):
        v.check_linear_attention_inputs(q, q[..., :8], vv)
    with pytest.raises(ValueError, match=r"v: leading shape \(2, 3, 9\)"):
        v.check_linear_attention_inputs(q, q, vv[:, :, :9])
    with pytest.raises(ValueError, match="chunk_size: must be positive"):
        v.check_linear_attention_inputs(q, q, vv, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size: expected an int"):
        v.check_linear_attention_inputs(q, q, vv, chunk_size=2.5)


def test_decay():
    assert v.check_decay(None, 4) is None
    np.testing.assert_array_equal(v.check_decay([1.0, 0.25], 2), [1.0, 0.25])
    with pytest.raises(ValueError, match=r"decay: expected shape \(3,\)"):
        v.check_decay([0.5, 0.5], 3)
    for bad in (0.0, 1.01, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"decay: every value must lie in \(0, 1\]"):
            v.check_decay(bad, 2)
    with pytest.raises(TypeError, match="decay"):
        v.check_decay(True, 2)


def test_state():
    shape = v.LinearShape(2, 3, 10, 16, 8, "float32", "cpu")
    v.check_state(np.zeros((2, 3, 16, 8)), shape)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 3, 16, 8\)"):
        v.check_state(np.zeros((2, 3, 8, 16)), shape)
    with pytest.raises(TypeError, match="initial_state: dtype float16"):
        v.check_state(np.zeros((2, 3, 16, 8), np.float16), shape)


# -------------------------------------------------------------------- outputs
def test_check_output():
    out = np.zeros((2, 4, 5), np.float32)
    assert v.check_output(out, "lse", shape=(2, 4, 5), allowed_dtypes=("float32",)).size == 40
    with pytest.raises(ValueError, match=r"lse: expected shape \(2, 4, 6\)"):
        v.check_output(out, "lse", shape=(2, 4, 6), allowed_dtypes=("float32",))
    with pytest.raises(TypeError, match="lse: dtype float32 not supported"):
        v.check_output(out, "lse", shape=(2, 4, 5), allowed_dtypes=("float16",))
    aliased = np.broadcast_to(np.zeros((1, 1, 5), np.float32), (2, 4, 5))
    with pytest.raises(ValueError, match="lse: zero strides"):
        v.check_output(aliased, "lse", shape=(2, 4, 5), allowed_dtypes=("float32",))


# ---------------------------------------------------------------------- torch
def test_modules_do_not_import_torch():
    code = ("import sys, numpy as np; import attnproto.validate as v, attnproto.ref, attnproto.cpu; "
            "x = np.zeros((1, 1, 2, 8), np.float16); v.check_attention_inputs(x, x, x); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    q = torch.zeros((1, 2, 3, 64), dtype=torch.bfloat16)
    k = torch.zeros((1, 1, 5, 64), dtype=torch.bfloat16)
    shape = v.check_attention_inputs(q, k, k)
    assert shape.dtype == "bfloat16" and shape.group == 2 and shape.device == "cpu"
    with pytest.raises(TypeError, match="k: dtype float32 does not match q dtype bfloat16"):
        v.check_attention_inputs(q, k.float(), k)
    with pytest.raises(ValueError, match="q: last dimension must be contiguous"):
        v.check_attention_inputs(torch.zeros((1, 2, 3, 128), dtype=torch.bfloat16)[..., ::2],
                                 k, k)
    np.testing.assert_array_equal(v.to_host_numpy(q, "q"), np.zeros((1, 2, 3, 64), np.float32))
