"""Standalone RoPE and GQA expansion kernels: what the fused variants of Prototype 7 are compared
with (shaders/cuda/rope_apply.cu, shaders/cuda/repeat_kv.cu).

    out = rope(x, style="half", theta=10000.0, offset=0)       # out of place
    rope(x, out=x)                                               # in place
    plan = prepare_rope(x, table=rope_tables(4096, 128)); plan.time()
    kv = repeat_kv(k, group=4)                                   # [B, Hkv * 4, N, D]

x [B, H, N, D] torch CUDA float16/bfloat16 with D contiguous; row n of every head sits at
position ``offset + n``. ``table``: None (cos/sin computed in the kernel) or (cos, sin) float32
[L, D/2] with L >= offset + N (:func:`attnproto.ops.variants.rope_tables`). Launches run on
torch's current stream. Bad input raises TypeError/ValueError naming the argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from .. import lab as _lab
from .. import params as _params
from .. import ref as _ref
from .. import validate as _v
from . import variants as _variants

__all__ = ["ROPE_KERNEL", "REPEAT_KV_KERNEL", "prepare_rope", "rope", "prepare_repeat_kv", "repeat_kv",
           "specialisations"]

ROPE_KERNEL = "rope_apply"
REPEAT_KV_KERNEL = "repeat_kv"
DTYPE_CODES = {"float16": 0, "bfloat16": 1}
#: Threads per block of both kernels (kThreads in the .cu files).
THREADS = 128
CHUNK_ELEMS = 8                     # 16 bytes of 16-bit elements: one thread's load
ALIGN_BYTES = 16
#: Head dims the kernels are compiled for ahead (CI, precompile); any multiple of 16 up to 512 works.
HEAD_DIMS = (64, 128, 256)


@dataclass
class KernelPlan:
    """One prepared launch; ``launch()`` enqueues on torch's current stream and returns ``out``."""

    backend: Any
    kernel: Any
    grid: Tuple[int, int, int]
    args: list
    out: Any

    def launch(self, stream: Optional[int] = None) -> Any:
        from .paged import current_stream  # noqa: PLC0415

        self.backend.launch(self.kernel, self.grid, (THREADS, 1, 1), self.args, 0,
                            stream=current_stream() if stream is None else stream)
        return self.out

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False) -> _lab.TimingStats:
        return _lab.from_native(self.backend.time_launch(self.kernel, self.grid, (THREADS, 1, 1), self.args, 0,
                                                         warmup=warmup, iters=iters, flush_l2=flush_l2))

    @property
    def resources(self) -> dict:
        return dict(self.kernel.resources)


def _check_x(x: Any, name: str) -> _v.TensorInfo:
    info = _v.check_tensor(x, name, ndim=4, allowed_dtypes=tuple(DTYPE_CODES))
    if info.kind != "torch" or info.device != "cuda":
        raise ValueError(f"{name}: expected a torch CUDA tensor, got a {info.kind} on {info.device}")
    elem = int(x.element_size())
    if x.data_ptr() % ALIGN_BYTES or any((s * elem) % ALIGN_BYTES for s, d in zip(info.strides[:3], info.shape[:3])
                                         if d > 1):
        raise ValueError(f"{name}: base and outer strides must be {ALIGN_BYTES}-byte aligned")
    if info.shape[3] % (2 * CHUNK_ELEMS):
        raise ValueError(f"{name}: head_dim {info.shape[3]} must be a multiple of {2 * CHUNK_ELEMS}")
    return info


def _out(x: Any, out: Any, shape: Tuple[int, ...], name: str = "out") -> Tuple[Any, _v.TensorInfo]:
    import torch  # noqa: PLC0415

    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    info = _check_x(out, name)
    if tuple(info.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(info.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{name}: must match x's dtype and device ({x.dtype} on {x.device})")
    return out, info


def _cuda():
    from .. import backend as _backend  # noqa: PLC0415

    return _backend.get("cuda")


def prepare_rope(x: Any, *, style: str = "half", theta: float = _ref.DEFAULT_ROPE_THETA, offset: int = 0,
                 table: Any = None, out: Any = None) -> KernelPlan:
    """The launch of RoPE over x (see the module doc); ``out=x`` rotates in place."""
    info = _check_x(x, "x")
    b, h, n, d = info.shape
    style = _ref.rope_style(style, "style")
    if style is None:
        raise ValueError("style: expected 'half' or 'interleaved'")
    if out is not None and out is not x and out.data_ptr() == x.data_ptr():
        raise ValueError("out: aliases x without being x (pass out=x to rotate in place)")
    out, o_info = _out(x, out, (b, h, n, d))
    shape = _v.AttentionShape(b, h, h, n, n, d, info.dtype, "cuda")   # rows at offset + n: Nq = Nkv = N
    variant, values = _variants.check_variant(x, shape, "cuda", rope=style, rope_theta=theta, rope_offset=offset,
                                              rope_table=table)
    prm = _params.make_params(batch=b, num_heads=h, seq_q=n, head_dim=d, q_stride=info.strides[:3],
                              o_stride=o_info.strides[:3], **values.params())
    kern = _cuda().kernel(ROPE_KERNEL, **rope_constants(d, variant, info.dtype))
    units = n * (d // CHUNK_ELEMS if style == "interleaved" else d // (2 * CHUNK_ELEMS))
    null = np.uint64(0)
    args = [prm, x, out, null if values.rope_cos is None else values.rope_cos,
            null if values.rope_sin is None else values.rope_sin]
    return KernelPlan(_cuda(), kern, (-(-units // THREADS), h, b), args, out)


def rope(x: Any, **kwargs: Any) -> Any:
    """RoPE of x (out of place unless ``out=x``); returns out. Keywords of :func:`prepare_rope`."""
    return prepare_rope(x, **kwargs).launch()


def rope_constants(head_dim: int, variant: _variants.Variant, dtype: str) -> dict:
    consts = variant.constants()
    return {"HEAD_DIM": int(head_dim), "ROPE": consts["ROPE"], "ROPE_TABLE": consts["ROPE_TABLE"],
            "DTYPE": DTYPE_CODES[dtype]}


def prepare_repeat_kv(x: Any, group: int, *, out: Any = None) -> KernelPlan:
    """The launch materialising x [B, Hkv, N, D] as [B, Hkv * group, N, D] (head h reads h // group)."""
    info = _check_x(x, "x")
    group = _v.check_positive_int(group, "group")
    b, hkv, n, d = info.shape
    out, o_info = _out(x, out, (b, hkv * group, n, d))
    if out.data_ptr() == x.data_ptr():
        raise ValueError("out: must not alias x")
    prm = _params.make_params(batch=b, num_heads=hkv * group, num_kv_heads=hkv, seq_q=n, head_dim=d,
                              k_stride=info.strides[:3], o_stride=o_info.strides[:3])
    kern = _cuda().kernel(REPEAT_KV_KERNEL, HEAD_DIM=d)
    chunks = n * d // CHUNK_ELEMS
    return KernelPlan(_cuda(), kern, (-(-chunks // THREADS), hkv * group, b), [prm, x, out], out)


def repeat_kv(x: Any, group: int, **kwargs: Any) -> Any:
    """x [B, Hkv, N, D] -> [B, Hkv * group, N, D] (a new tensor unless ``out`` is given)."""
    return prepare_repeat_kv(x, group, **kwargs).launch()


def specialisations() -> List[Tuple[str, dict]]:
    """Every (kernel, constants) compiled ahead: both styles and sources, both dtypes, HEAD_DIMS."""
    out: List[Tuple[str, dict]] = []
    for d in HEAD_DIMS:
        for dtype in DTYPE_CODES:
            for style in ("half", "interleaved"):
                for source in ("computed", "table"):
                    out.append((ROPE_KERNEL, rope_constants(d, _variants.Variant(rope=style, rope_source=source),
                                                            dtype)))
        out.append((REPEAT_KV_KERNEL, {"HEAD_DIM": d}))
    return out
