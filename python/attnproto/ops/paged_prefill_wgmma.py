"""Host side of paged (chunked) prefill through the Hopper wgmma kernel
(shaders/cuda/flash_fwd_wgmma.cu compiled with PAGE_SIZE = the pool's block size).

A chunk of Nq new queries per sequence attends to that sequence's keys in a block pool:

    q             [B, Hq, Nq, D]            the last Nq tokens of every sequence
    k_cache       [num_blocks, block_size, Hkv, D]   (vLLM / FlashInfer "NHD"; any strides, D contiguous)
    v_cache       like k_cache
    block_table   int32 [B, max_blocks]     page ids of each sequence, in token order (rows contiguous)
    context_lens  int32 [B] (device)        keys of each sequence; query i of sequence b
                                            sees keys j <= i + ctx[b] - Nq when causal

    prepare_paged_prefill_wgmma(q, k_cache, v_cache, block_table, context_lens, *, scale,
                                causal, out, lse, config=None, variant=None, values=None) -> PreparedLaunch
    paged_layout(...) -> PagedLayout     the arguments of the launch, computed without a device

Variants (Prototype 7): ``variant`` / ``values`` as :func:`attnproto.ops.variants.check_variant`
returns them (ALiBi, window, soft cap; the kernel refuses RoPE with PAGE_SIZE > 0: paged K is
stored rotated). The kernel places query i of sequence b at position i + ctx[b] - Nq (its
per-sequence diagonal), which the ALiBi distances, the window and the causal mask all use.

The inputs are torch CUDA tensors that the caller (the public ``paged_prefill`` op) has
already checked: shapes, dtypes, devices and the table's values against the pool. What this
module checks is what the tensor maps and the kernel's indexing need (16-byte TMA strides,
int32 index tensors with contiguous table rows, 32-bit key indices) and raises TypeError /
ValueError naming the argument. Context lengths are read on the device; the kernel clamps them to the table's
capacity and turns rows that would read a bad page id into NaN (see the .cu).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

from .. import params as _params
from . import flash_wgmma as fw
from . import variants as _variants
from .paged_problem import INDEX_DTYPE, PAGE_SIZES

__all__ = ["PAGE_SIZES", "VARIANT_SPECIALISATIONS", "PagedLayout", "box_rows", "paged_layout",
           "prepare_paged_prefill_wgmma"]
#: The paged prefill's variants CI NVRTC-compiles (families.wgmma.paged_specialisations): each
#: non-RoPE feature of variants.VARIANT_SPECIALISATIONS alone, then all of them at once.
VARIANT_SPECIALISATIONS = tuple(v for v in _variants.VARIANT_SPECIALISATIONS if v.rope is None) + (
    _variants.Variant(alibi="slopes", window=True, softcap=True),)
#: Keys are 32-bit ints in the kernel; the capacity max_blocks * block_size stays below this.
MAX_CAPACITY = 2**30
MAX_NUM_BLOCKS = 2**31 - 1            # the page coordinate of the TMA map is a signed 32-bit int


def box_rows(page_size: int, block_c: int) -> int:
    """Keys per TMA box of a paged K/V tile: kBoxRows = gcd(PAGE_SIZE, BLOCK_C) in the kernel
    (a box stays inside one page and the boxes tile the key block). The tensor maps' box
    height must equal it: the kernel arms its barriers with kBoxRows-row boxes."""
    if page_size not in PAGE_SIZES:
        raise ValueError(f"block_size: must be one of {PAGE_SIZES}, got {page_size}")
    return math.gcd(int(page_size), int(block_c))


def _pool_strides(shape: Tuple[int, ...], strides: Tuple[int, ...], name: str) -> list:
    """Byte strides of the (D, slot, kv head, page) map's dims 1..3 over a [num_blocks,
    block_size, Hkv, D] cache; an axis of extent 1 takes its packed stride (never stepped)."""
    nb, bs, hkv, d = shape
    s_blk, s_slot, s_head, s_d = strides
    if s_d != 1 and d > 1:
        raise ValueError(f"{name}: the head_dim axis must be contiguous (stride 1), got stride {s_d}")
    packed = {"slot": hkv * d, "head": d, "block": bs * hkv * d}
    out = []
    for label, extent, stride in (("slot", bs, s_slot), ("head", hkv, s_head), ("block", nb, s_blk)):
        if extent == 1:
            stride = packed[label]
        if stride <= 0:
            raise ValueError(f"{name}: {label} stride {stride} must be positive")
        nbytes = stride * fw.ELEMENT_BYTES
        if nbytes % fw.TMA_ALIGN_BYTES:
            raise ValueError(f"{name}: {label} stride of {stride} elements is not a multiple of "
                             f"{fw.TMA_ALIGN_BYTES // fw.ELEMENT_BYTES} elements (TMA needs 16-byte strides)")
        out.append(nbytes)
    return out


def _index_tensor(x: Any, name: str) -> None:
    """int32 with a unit last stride: the kernel indexes it as ``const int*``."""
    dtype = str(x.dtype).replace("torch.", "")
    if dtype != INDEX_DTYPE:
        raise TypeError(f"{name}: dtype {dtype}; the kernel reads {INDEX_DTYPE}")
    _unit_inner_stride(x, name)


def _unit_inner_stride(x: Any, name: str) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name}: the last axis must be contiguous (stride 1), got strides {tuple(x.stride())}")


@dataclasses.dataclass(frozen=True)
class PagedLayout:
    """Everything the launch needs but the device objects (tensor maps, kernel)."""

    config: fw.WgmmaConfig
    dtype: str
    page_size: int
    box_rows: int
    num_blocks: int
    max_blocks: int
    capacity: int                     # max_blocks * page_size: params.seq_kv
    pool_dims: Tuple[int, int, int, int]       # (D, page_size, Hkv, num_blocks), innermost first
    k_strides_bytes: Tuple[int, int, int]
    v_strides_bytes: Tuple[int, int, int]
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_bytes: int
    constants: dict
    params: Any                       # np.void of PARAMS_DTYPE


def paged_layout(q: Any, k_cache: Any, v_cache: Any, block_table: Any, *, scale: float, causal: bool,
                 out: Any, lse: Any, config: Any = None, variant: Any = None, values: Any = None) -> PagedLayout:
    """The launch arguments of a paged prefill (tensors may live anywhere: no device is used);
    ``variant`` None is the base kernel."""
    from .variants import VariantValues  # noqa: PLC0415

    if variant is not None and variant.rope is not None:
        raise ValueError("rope: paged K is stored rotated; use rope_append / fused_prefill")
    b, hq, nq, d = (int(x) for x in q.shape)
    nb, page, hkv, dk = (int(x) for x in k_cache.shape)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}")
    if dk != d:
        raise ValueError(f"k_cache: head_dim {dk} does not match q head_dim {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k_cache: {hkv} kv heads do not divide the {hq} query heads")
    if not 1 <= nb <= MAX_NUM_BLOCKS:
        raise ValueError(f"k_cache: {nb} blocks; the pool needs 1 to {MAX_NUM_BLOCKS}")
    cfg = fw.as_config(config, d, causal)
    rows = box_rows(page, cfg.block_c)
    if block_table.ndim != 2 or int(block_table.shape[0]) != b:
        raise ValueError(f"block_table: expected shape [{b}, max_blocks], got {tuple(block_table.shape)}")
    max_blocks = int(block_table.shape[1])
    _index_tensor(block_table, "block_table")
    capacity = max_blocks * page
    if not 1 <= capacity < MAX_CAPACITY:
        raise ValueError(f"block_table: capacity {max_blocks} x {page} = {capacity} tokens must be in "
                         f"[1, {MAX_CAPACITY}) (32-bit key indices)")
    if b > 1 and int(block_table.stride(0)) != max_blocks:
        # the kernel steps rows by params.max_blocks_per_seq (as the decode kernels do)
        raise ValueError(f"block_table: rows must be contiguous (row stride {max_blocks}), got stride "
                         f"{int(block_table.stride(0))}")
    dtype = str(q.dtype).replace("torch.", "")
    if dtype not in fw.DTYPE_CODES:
        raise ValueError(f"q: dtype {dtype} not supported; expected one of {tuple(fw.DTYPE_CODES)}")
    k_bytes = _pool_strides(tuple(k_cache.shape), tuple(k_cache.stride()), "k_cache")
    v_bytes = _pool_strides(tuple(v_cache.shape), tuple(v_cache.stride()), "v_cache")
    grid_x = math.ceil(nq / cfg.block_r) * b * hq
    if grid_x > fw.MAX_GRID_X:
        raise ValueError(f"q: {grid_x} CTAs exceed the grid limit {fw.MAX_GRID_X}")
    ks, vs = tuple(k_cache.stride()), tuple(v_cache.stride())
    # Paged strides in the params block are {block, kv head, token} (attn_params.h); the
    # kernel addresses K/V through the tensor maps, the host records them for completeness.
    prm = _params.make_params(
        batch=b, num_heads=hq, num_kv_heads=hkv, seq_q=nq, seq_kv=capacity, head_dim=d, scale=scale,
        q_stride=tuple(q.stride())[:3], k_stride=(ks[0], ks[2], ks[1]), v_stride=(vs[0], vs[2], vs[1]),
        o_stride=tuple(out.stride())[:3], lse_stride=tuple(lse.stride())[:2],
        block_size=page, max_blocks_per_seq=max_blocks, num_blocks=nb,
        **(VariantValues() if values is None else values).params())
    return PagedLayout(cfg, dtype, page, rows, nb, max_blocks, capacity, (d, page, hkv, nb),
                       tuple(k_bytes), tuple(v_bytes), (grid_x, 1, 1), (cfg.threads, 1, 1),
                       fw.shared_bytes(cfg, d, variant), fw.constants(cfg, d, causal, dtype, page, variant), prm)


def prepare_paged_prefill_wgmma(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                                scale: Optional[float] = None, causal: bool = True, out: Any = None,
                                lse: Any = None, config: Any = None, backend: Any = None, variant: Any = None,
                                values: Any = None) -> Any:
    """The launch (a :class:`attnproto.ops.problem.PreparedLaunch`) of one paged prefill.

    ``out`` [B, Hq, Nq, D] (q's dtype) and ``lse`` float32 [B, Hq, Nq] are written in place
    (allocated when None); ``scale`` defaults to 1/sqrt(D). Tensors must already be checked
    by the caller (see the module doc); ``launch()`` is asynchronous and never synchronises.
    """
    import torch  # noqa: PLC0415  (CUDA tensors exist)

    from .. import backend as _backend  # noqa: PLC0415
    from .. import validate as _v  # noqa: PLC0415
    from .problem import CUDA, FlashProblem, PreparedLaunch  # noqa: PLC0415
    from .variants import BASE, VariantValues  # noqa: PLC0415

    b, hq, nq, d = (int(x) for x in q.shape)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if out is None:
        out = torch.empty((b, hq, nq, d), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    _index_tensor(context_lens, "context_lens")
    layout = paged_layout(q, k_cache, v_cache, block_table, scale=scale, causal=causal, out=out, lse=lse,
                          config=config, variant=variant, values=values)
    be = _backend.get("cuda") if backend is None else backend
    tdt = fw.TMA_DTYPES[layout.dtype]
    q_bytes = fw._tma_strides(tuple(q.shape), tuple(q.stride()), "q")
    tm_q = be.tensor_map(q, tdt, [d, nq, hq, b], q_bytes, [fw.SWIZZLE_COLS, layout.config.block_r, 1, 1],
                         fw.SWIZZLE_BYTES, False)
    box = [fw.SWIZZLE_COLS, layout.box_rows, 1, 1]
    tm_k = be.tensor_map(k_cache, tdt, list(layout.pool_dims), list(layout.k_strides_bytes), box,
                         fw.SWIZZLE_BYTES, False)
    tm_v = be.tensor_map(v_cache, tdt, list(layout.pool_dims), list(layout.v_strides_bytes), box,
                         fw.SWIZZLE_BYTES, False)
    kern = be.kernel(fw.KERNEL_NAME, **layout.constants)
    args = [layout.params, tm_q, tm_k, tm_v, out, lse, block_table, context_lens, *fw.variant_args(values)]
    hkv = int(k_cache.shape[2])
    shape = _v.AttentionShape(b, hq, hkv, nq, layout.capacity, d, layout.dtype, "cuda")
    problem = FlashProblem(q, k_cache, v_cache, out, lse, shape, bool(causal), scale, tuple(q.stride())[:3],
                           tuple(int(x) for x in layout.params["k_stride"]),
                           tuple(int(x) for x in layout.params["v_stride"]), tuple(out.stride())[:3],
                           tuple(lse.stride())[:2], CUDA, variant=BASE if variant is None else variant,
                           values=VariantValues() if values is None else values)
    return PreparedLaunch(be, kern, layout.grid, layout.block, args, layout.shared_bytes, problem, layout.config,
                          family="wgmma", reason=f"paged prefill, block size {layout.page_size}")
