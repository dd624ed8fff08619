"""Input checks shared by every attnproto backend (references, CPU, CUDA, Metal).

Every check names the offending argument in its message and raises

* ``TypeError``  for the wrong kind of object or a dtype that is not accepted;
* ``ValueError`` for a wrong rank, shape, stride, head count, size or value.

The checks work on numpy arrays, on torch tensors (recognised only when torch is
already imported by the caller: this module never imports torch), on MLX arrays (likewise
only when ``mlx.core`` is already imported; device ``"mlx"``, row-major strides: MLX does not
expose strides, and its custom kernels see row-contiguous copies) and on objects
exposing ``__cuda_array_interface__`` (CuPy, Numba). Strides are reported in
ELEMENTS, like the strides of :mod:`attnproto.params`.
"""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "KERNEL_DTYPES",
    "INDEX_DTYPES",
    "TensorInfo",
    "AttentionShape",
    "PagedShape",
    "LinearShape",
    "tensor_info",
    "dtype_name",
    "is_host",
    "to_host_numpy",
    "check_dtype",
    "check_tensor",
    "check_bool",
    "check_positive_int",
    "check_nonnegative_int",
    "MAX_CHUNK_SIZE",
    "check_chunk_size",
    "check_scale",
    "check_attention_inputs",
    "check_block_table",
    "check_paged_inputs",
    "check_partition_size",
    "check_decay",
    "check_linear_attention_inputs",
    "check_state",
    "check_output",
]

# Canonical dtype names (numpy spelling; torch's "torch.float16" maps to "float16").
FLOAT_DTYPES: Tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
HALF_DTYPES: Tuple[str, ...] = ("float16", "bfloat16")
# What the GPU kernels take as Q/K/V.
KERNEL_DTYPES: Tuple[str, ...] = ("float16", "bfloat16", "float32")
INDEX_DTYPES: Tuple[str, ...] = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")

# Rank of every attention tensor: [batch, heads, tokens, head_dim].
ATTENTION_RANK = 4
# Largest linear-attention chunk_size accepted anywhere: the largest token count the 32-bit
# fields of AttentionParams (seq_kv, chunk_size) and the kernels' int token indices hold.
# Larger values are not sequence lengths (a chunk_size above N itself is fine: the CPU
# backend clamps it to N, the references treat it as one chunk).
MAX_CHUNK_SIZE = 2**31 - 1
# DLPack device type codes (dlpack.h, DLDeviceType) that the host can read directly.
_DLPACK_HOST_DEVICES = {1: "cpu", 3: "cuda_host"}
_DLPACK_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 8: "metal", 13: "cuda_managed"}
# Device name of an MLX array: unified memory, run on whichever stream MLX picks.
MLX_DEVICE = "mlx"
_MLX_DTYPE_PREFIX = "mlx.core."


# --------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorInfo:
    """What the checks need to know about one array or tensor."""

    name: str
    kind: str                   # "numpy" | "torch" | "mlx" | "cuda_array_interface"
    shape: Tuple[int, ...]
    dtype: str                  # canonical name, e.g. "float16", "bfloat16", "int32"
    strides: Tuple[int, ...]    # in elements
    device: str                 # "cpu", "cuda", "mps", ...

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


def _torch_tensor_type() -> Optional[type]:
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _is_torch(x: Any) -> bool:
    tensor_type = _torch_tensor_type()
    return tensor_type is not None and isinstance(x, tensor_type)


def _is_mlx(x: Any) -> bool:
    array_type = getattr(sys.modules.get("mlx.core"), "array", None)
    return isinstance(array_type, type) and isinstance(x, array_type)


def _row_major_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def dtype_name(dtype: Any) -> str:
    """Canonical name of a numpy dtype, torch dtype, MLX dtype or dtype string."""
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch."):]
    if text.startswith(_MLX_DTYPE_PREFIX):
        return text[len(_MLX_DTYPE_PREFIX):]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def tensor_info(x: Any, name: str) -> TensorInfo:
    """Describe ``x``; TypeError naming ``name`` when it is not an array or tensor."""
    if isinstance(x, np.ndarray):
        itemsize = x.dtype.itemsize
        if any(s % itemsize for s in x.strides):
            raise ValueError(f"{name}: strides {x.strides} (bytes) are not multiples of the "
                             f"element size {itemsize}")
        return TensorInfo(name, "numpy", tuple(int(d) for d in x.shape), dtype_name(x.dtype),
                          tuple(int(s) // itemsize for s in x.strides), "cpu")
    if _is_torch(x):
        return TensorInfo(name, "torch", tuple(int(d) for d in x.shape), dtype_name(x.dtype),
                          tuple(int(s) for s in x.stride()), str(x.device.type))
    if _is_mlx(x):
        shape = tuple(int(d) for d in x.shape)
        return TensorInfo(name, "mlx", shape, dtype_name(x.dtype), _row_major_strides(shape), MLX_DEVICE)
    interface = getattr(x, "__cuda_array_interface__", None)
    if isinstance(interface, dict):
        dtype = np.dtype(interface["typestr"])
        shape = tuple(int(d) for d in interface["shape"])
        byte_strides = interface.get("strides")
        if byte_strides is None:
            elems, strides_list = 1, []
            for dim in reversed(shape):
                strides_list.append(elems)
                elems *= dim
            strides = tuple(reversed(strides_list))
        else:
            strides = tuple(int(s) // dtype.itemsize for s in byte_strides)
        return TensorInfo(name, "cuda_array_interface", shape, dtype_name(dtype), strides, "cuda")
    raise TypeError(f"{name}: expected a numpy array or a tensor, got {type(x).__name__}")


def is_host(x: Any) -> bool:
    """True when the host can read ``x`` without a device copy."""
    if isinstance(x, np.ndarray):
        return True
    if _is_torch(x):
        return x.device.type == "cpu"
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if callable(dlpack_device):
        return int(dlpack_device()[0]) in _DLPACK_HOST_DEVICES
    return False


def to_host_numpy(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """Return ``x`` as a numpy array on the host (copies device tensors).

    Torch tensors of dtypes numpy lacks (bfloat16) are widened to float32 first,
    which is exact. ``dtype`` converts the result.
    """
    if _is_torch(x):
        t = x.detach()
        if dtype_name(t.dtype) == "bfloat16":
            t = t.float()
        arr = t.cpu().numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (numbers.Number, list, tuple)):
        arr = np.asarray(x)
    elif hasattr(x, "__cuda_array_interface__") and callable(getattr(x, "get", None)):
        arr = np.asarray(x.get())              # CuPy-style device array: explicit copy
    elif hasattr(x, "__array__") or hasattr(x, "__array_interface__"):
        arr = np.asarray(x)
    else:
        raise TypeError(f"{name}: expected an array, tensor or number, got {type(x).__name__}")
    if arr.dtype == object:
        raise TypeError(f"{name}: cannot be converted to a numeric array")
    return arr.astype(dtype, copy=False) if dtype is not None else arr


# ----------------------------------------------------------------------- scalars
def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_real(value: Any, name: str, *, positive: bool = False) -> float:
    """A finite real number (and > 0 with ``positive``); TypeError for bools and non-numbers."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0.0):
        raise ValueError(f"{name}: must be finite{' and positive' if positive else ''}, got {value}")
    return value


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return int(value)


def check_nonnegative_int(value: Any, name: str) -> int:
    """An int >= 0 (a size that may be zero, e.g. a sequence length)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return int(value)


def check_chunk_size(chunk_size: Any, name: str = "chunk_size") -> int:
    """A positive int no larger than :data:`MAX_CHUNK_SIZE`."""
    chunk_size = check_positive_int(chunk_size, name)
    if chunk_size > MAX_CHUNK_SIZE:
        raise ValueError(f"{name}: {chunk_size} is above the maximum {MAX_CHUNK_SIZE} (2^31 - 1, "
                         f"the largest token count of the kernels' 32-bit indices)")
    return chunk_size


def check_partition_size(partition_size: Any, name: str = "partition_size") -> int:
    return check_positive_int(partition_size, name)


def check_scale(scale: Any, head_dim: int, name: str = "scale") -> float:
    """``None`` -> 1/sqrt(head_dim); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name}: must be finite, got {scale}")
    return float(scale)


# ----------------------------------------------------------------------- tensors
def _fmt_dtypes(dtypes: Iterable[str]) -> str:
    return ", ".join(dtypes)


def check_dtype(info: TensorInfo, allowed: Sequence[str]) -> None:
    if info.dtype not in allowed:
        raise TypeError(f"{info.name}: dtype {info.dtype} not supported; expected one of "
                        f"{_fmt_dtypes(allowed)}")


def check_tensor(x: Any, name: str, *, ndim: Optional[int] = None,
                 allowed_dtypes: Optional[Sequence[str]] = None,
                 contiguous_last_dim: bool = True, allow_empty: bool = False,
                 device: Optional[str] = None) -> TensorInfo:
    """Generic per-tensor checks; returns the :class:`TensorInfo`.

    ``contiguous_last_dim`` requires stride 1 on the last axis (the head_dim axis
    of every kernel); negative strides are always rejected because the kernels
    address memory with the given strides from the first element.
    """
    info = tensor_info(x, name)
    if ndim is not None and info.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {info.ndim} (shape {info.shape})")
    if allowed_dtypes is not None:
        check_dtype(info, allowed_dtypes)
    if not allow_empty and info.size == 0:
        raise ValueError(f"{name}: zero-size tensor (shape {info.shape})")
    if any(s < 0 for s in info.strides):
        raise ValueError(f"{name}: negative strides {info.strides} are not supported")
    if contiguous_last_dim and info.ndim and info.shape[-1] > 1 and info.strides[-1] != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got stride "
                         f"{info.strides[-1]}")
    if device is not None and info.device != device:
        raise ValueError(f"{name}: expected a tensor on device '{device}', got '{info.device}'")
    return info


def _check_same_dtype(infos: Sequence[TensorInfo]) -> None:
    first = infos[0]
    for other in infos[1:]:
        if other.dtype != first.dtype:
            raise TypeError(f"{other.name}: dtype {other.dtype} does not match {first.name} "
                            f"dtype {first.dtype}")


def _check_same_device(infos: Sequence[TensorInfo]) -> None:
    first = infos[0]
    for other in infos[1:]:
        if other.device != first.device:
            raise ValueError(f"{other.name}: on device '{other.device}' but {first.name} is on "
                             f"'{first.device}'")


def _check_head_dim(head_dim: int, head_dims: Optional[Iterable[int]], name: str) -> None:
    if head_dims is None:
        return
    supported = tuple(int(d) for d in head_dims)
    if head_dim not in supported:
        raise ValueError(f"{name}: head_dim {head_dim} not supported; expected one of "
                         f"{', '.join(str(d) for d in supported)}")


def _check_gqa(num_heads: int, num_kv_heads: int, q_name: str, k_name: str) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"{k_name}: {num_kv_heads} kv heads do not divide the {num_heads} "
                         f"query heads of {q_name} (GQA needs Hq % Hkv == 0)")


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    num_heads: int
    num_kv_heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: str
    device: str

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.num_heads // self.num_kv_heads


def check_attention_inputs(q: Any, k: Any, v: Any, *, causal: bool = False,
                           allowed_dtypes: Sequence[str] = KERNEL_DTYPES,
                           head_dims: Optional[Iterable[int]] = None,
                           contiguous_last_dim: bool = True,
                           device: Optional[str] = None,
                           names: Tuple[str, str, str] = ("q", "k", "v")) -> AttentionShape:
    """Check Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D] and return the problem shape.

    One dtype and one device for all three; Hq % Hkv == 0; one head_dim for
    q, k and v (and in ``head_dims`` when given).
    """
    check_bool(causal, "causal")
    qn, kn, vn = names
    infos = [check_tensor(x, n, ndim=ATTENTION_RANK, allowed_dtypes=allowed_dtypes,
                          contiguous_last_dim=contiguous_last_dim, device=device)
             for x, n in ((q, qn), (k, kn), (v, vn))]
    qi, ki, vi = infos
    _check_same_dtype(infos)
    _check_same_device(infos)
    batch, num_heads, seq_q, head_dim = qi.shape
    for info in (ki, vi):
        if info.shape[0] != batch:
            raise ValueError(f"{info.name}: batch {info.shape[0]} does not match {qn} batch {batch}")
        if info.shape[3] != head_dim:
            raise ValueError(f"{info.name}: head_dim {info.shape[3]} does not match {qn} "
                             f"head_dim {head_dim}")
    if vi.shape != ki.shape:
        raise ValueError(f"{vn}: shape {vi.shape} does not match {kn} shape {ki.shape}")
    num_kv_heads, seq_kv = ki.shape[1], ki.shape[2]
    _check_gqa(num_heads, num_kv_heads, qn, kn)
    _check_head_dim(head_dim, head_dims, qn)
    return AttentionShape(batch, num_heads, num_kv_heads, seq_q, seq_kv, head_dim, qi.dtype,
                          qi.device)


# ------------------------------------------------------------------------- paged KV
def check_block_table(block_table: Any, seq_lens: Any, *, batch: int, num_blocks: int,
                      block_size: int, index_dtypes: Sequence[str] = ("int32",),
                      check_values: bool = True) -> int:
    """Check the block table [B, max_blocks_per_seq] and seq_lens [B]; return max_blocks_per_seq.

    Values are checked when ``check_values`` and both arrays are readable by the
    host (device tensors would need a synchronising copy: pass host copies to
    check them). Sequence b uses the first ceil(seq_lens[b] / block_size) entries
    of its row; each must lie in [0, num_blocks). Unused entries are not read.
    """
    bt = check_tensor(block_table, "block_table", ndim=2, allowed_dtypes=index_dtypes,
                      allow_empty=False)
    sl = check_tensor(seq_lens, "seq_lens", ndim=1, allowed_dtypes=index_dtypes,
                      contiguous_last_dim=False)
    if bt.shape[0] != batch:
        raise ValueError(f"block_table: {bt.shape[0]} rows do not match batch {batch}")
    if sl.shape[0] != batch:
        raise ValueError(f"seq_lens: {sl.shape[0]} entries do not match batch {batch}")
    max_blocks = bt.shape[1]
    if not (check_values and is_host(block_table) and is_host(seq_lens)):
        return max_blocks
    table = to_host_numpy(block_table, "block_table").astype(np.int64)
    lens = to_host_numpy(seq_lens, "seq_lens").astype(np.int64)
    capacity = max_blocks * block_size
    for b in range(batch):
        if lens[b] < 0 or lens[b] > capacity:
            raise ValueError(f"seq_lens[{b}] = {lens[b]} out of range [0, {capacity}] "
                             f"(max_blocks_per_seq {max_blocks} x block_size {block_size})")
        used = -(-int(lens[b]) // block_size)
        row = table[b, :used]
        bad = np.nonzero((row < 0) | (row >= num_blocks))[0]
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"block_table[{b}, {j}] = {row[j]} out of range [0, {num_blocks}) "
                             f"(num_blocks of the cache)")
    return max_blocks


@dataclass(frozen=True)
class PagedShape:
    batch: int
    num_heads: int
    num_kv_heads: int
    seq_q: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks_per_seq: int
    dtype: str
    device: str

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def max_seq_kv(self) -> int:
        """Most tokens a sequence can address through its block-table row."""
        return self.max_blocks_per_seq * self.block_size


def check_paged_inputs(q: Any, k_cache: Any, v_cache: Any, block_table: Any, seq_lens: Any, *,
                       allowed_dtypes: Sequence[str] = KERNEL_DTYPES,
                       head_dims: Optional[Iterable[int]] = None,
                       index_dtypes: Sequence[str] = ("int32",),
                       contiguous_last_dim: bool = True, check_values: bool = True,
                       device: Optional[str] = None) -> PagedShape:
    """Check Q [B, Hq, Nq, D], caches [num_blocks, Hkv, block_size, D] and the block table."""
    infos = [check_tensor(x, n, ndim=ATTENTION_RANK, allowed_dtypes=allowed_dtypes,
                          contiguous_last_dim=contiguous_last_dim, device=device)
             for x, n in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"))]
    qi, ki, vi = infos
    _check_same_dtype(infos)
    _check_same_device(infos)
    if vi.shape != ki.shape:
        raise ValueError(f"v_cache: shape {vi.shape} does not match k_cache shape {ki.shape}")
    batch, num_heads, seq_q, head_dim = qi.shape
    num_blocks, num_kv_heads, block_size, cache_dim = ki.shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache: head_dim {cache_dim} does not match q head_dim {head_dim}")
    _check_gqa(num_heads, num_kv_heads, "q", "k_cache")
    _check_head_dim(head_dim, head_dims, "q")
    max_blocks = check_block_table(block_table, seq_lens, batch=batch, num_blocks=num_blocks,
                                   block_size=block_size, index_dtypes=index_dtypes,
                                   check_values=check_values)
    return PagedShape(batch, num_heads, num_kv_heads, seq_q, head_dim, num_blocks, block_size,
                      max_blocks, qi.dtype, qi.device)


# ---------------------------------------------------------------- linear attention
@dataclass(frozen=True)
class LinearShape:
    batch: int
    num_heads: int
    seq_len: int
    key_dim: int
    value_dim: int
    dtype: str
    device: str


def check_decay(decay: Any, num_heads: int, name: str = "decay") -> Optional[np.ndarray]:
    """``None`` or per-head decay gamma_h in (0, 1]; a scalar applies to every head.

    Zero is excluded so kernels may work with log(gamma) (decay powers as
    exp(n * log gamma)). Returns a float64 host array [num_heads] or None.
    """
    if decay is None:
        return None
    if isinstance(decay, (bool, np.bool_)):
        raise TypeError(f"{name}: expected None, a float or a [num_heads] array, got bool")
    arr = to_host_numpy(decay, name)
    if arr.dtype.kind not in "fiu" and dtype_name(arr.dtype) != "bfloat16":
        raise TypeError(f"{name}: dtype {dtype_name(arr.dtype)} is not a real number type")
    arr = arr.astype(np.float64)
    if arr.ndim == 0:
        arr = np.full(num_heads, float(arr))
    if arr.shape != (num_heads,):
        raise ValueError(f"{name}: expected shape ({num_heads},) (one value per head), got "
                         f"{arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0.0) or np.any(arr > 1.0):
        raise ValueError(f"{name}: every value must lie in (0, 1], got {arr.tolist()}")
    return arr


def check_linear_attention_inputs(q: Any, k: Any, v: Any, *,
                                  allowed_dtypes: Sequence[str] = KERNEL_DTYPES,
                                  chunk_size: Any = None, decay: Any = None,
                                  contiguous_last_dim: bool = True,
                                  device: Optional[str] = None,
                                  names: Tuple[str, str, str] = ("q", "k", "v"),
                                  ) -> Tuple[LinearShape, Optional[np.ndarray]]:
    """Check Q/K [B, H, N, Dk], V [B, H, N, Dv] (+ chunk_size, decay); return (shape, decay).

    ``names`` are the argument names used in messages (a state-only kernel
    passes ("k", "k", "v")).
    """
    qn, kn, vn = names
    infos = [check_tensor(x, n, ndim=ATTENTION_RANK, allowed_dtypes=allowed_dtypes,
                          contiguous_last_dim=contiguous_last_dim, device=device)
             for x, n in ((q, qn), (k, kn), (v, vn))]
    qi, ki, vi = infos
    _check_same_dtype(infos)
    _check_same_device(infos)
    if ki.shape != qi.shape:
        raise ValueError(f"{kn}: shape {ki.shape} does not match {qn} shape {qi.shape} "
                         f"(linear attention needs equal [B, H, N, Dk])")
    if vi.shape[:3] != qi.shape[:3]:
        raise ValueError(f"{vn}: leading shape {vi.shape[:3]} does not match {qn} "
                         f"{qi.shape[:3]} ([B, H, N])")
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    batch, heads, seq, key_dim = qi.shape
    gamma = check_decay(decay, heads)
    return LinearShape(batch, heads, seq, key_dim, vi.shape[3], qi.dtype, qi.device), gamma


def check_state(state: Any, shape: LinearShape, name: str = "initial_state") -> None:
    """A recurrent state [B, H, Dk, Dv] (float32 or float64)."""
    if state is None:
        return
    info = check_tensor(state, name, ndim=ATTENTION_RANK, allowed_dtypes=("float32", "float64"),
                        contiguous_last_dim=False)
    expected = (shape.batch, shape.num_heads, shape.key_dim, shape.value_dim)
    if info.shape != expected:
        raise ValueError(f"{name}: expected shape {expected} ([B, H, Dk, Dv]), got {info.shape}")


# ------------------------------------------------------------------------- outputs
def check_output(x: Any, name: str, *, shape: Sequence[int], allowed_dtypes: Sequence[str],
                 device: Optional[str] = None, contiguous_last_dim: bool = True) -> TensorInfo:
    """A caller-provided output buffer of an exact shape; no zero strides (writes would alias)."""
    info = check_tensor(x, name, ndim=len(shape), allowed_dtypes=allowed_dtypes,
                        contiguous_last_dim=contiguous_last_dim, device=device)
    if info.shape != tuple(int(d) for d in shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {info.shape}")
    if any(s == 0 and d > 1 for s, d in zip(info.strides, info.shape)):
        raise ValueError(f"{name}: zero strides {info.strides} would make writes alias")
    return info
