"""Paged-KV attention on CUDA: decode (split-KV), KV append, and the plan a CUDA graph captures.

    o, lse = paged_decode(q, k_cache, v_cache, block_table, context_lens)      # q [B, Hq, D] or [B, Hq, Nq<=8, D]
    o, lse = paged_prefill(q, k_cache, v_cache, block_table, context_lens)     # a chunk of Nq new tokens (Hopper)
    append_kv(k_new, v_new, k_cache, v_cache, block_table, positions)          # vLLM's reshape_and_cache
    plan = prepare_paged_decode(...); plan.launch()                             # fixed workspace, no host sync

Layouts and checks: :mod:`attnproto.ops.paged_problem`. Kernels: :mod:`.families.paged_decode`
(partition + reduce). Every launch goes to torch's current CUDA stream, so a decode step
(append + decode) records into a CUDA graph captured on that stream.

Variants (Prototype 7, :mod:`attnproto.ops.variants`): decode and prefill take ``alibi`` (False,
True: the standard slopes of ``alibi_max_bias``, or float32 slopes ``[Hq]`` on q's device),
``window`` (a left sliding window of that many tokens) and ``softcap`` (Gemma 2's
cap * tanh(s / cap)), with the semantics of :func:`attnproto.ref.attention` at query i of
sequence b at position ctx[b] - Nq + i. ``rope`` is refused: paged K is stored rotated
(:func:`attnproto.ops.paged_rope.rope_append` / ``fused_prefill`` rotate Q and K where K is written).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np

from .. import lab as _lab
from .. import params as _params
from .. import ref as _ref
from .. import validate as _v
from . import variants as _variants
from .families import paged_decode as _fam
from .paged_problem import (DTYPES, MAX_DECODE_TOKENS, PagedProblem, check_cache, check_contiguous, check_index,
                            check_paged, check_table_values)

__all__ = ["AppendShape", "DecodePlan", "PrefillPlan", "append_kv", "check_append", "paged_decode", "paged_prefill", "prepare_append_kv",
           "prepare_contiguous_decode", "prepare_paged_decode", "prepare_paged_prefill"]

LSE_DTYPE = "float32"
#: Why the paged kernels take no RoPE variant (the message of the refusal).
ROPE_REFUSAL = ("paged K is stored rotated; use rope_append / fused_prefill (attnproto.ops.paged_rope), "
                "which rotate Q and K where K is written")


def check_paged_variant(p: PagedProblem, *, rope: Any = None, alibi: Any = False,
                        alibi_max_bias: Any = _ref.DEFAULT_ALIBI_MAX_BIAS, window: Any = None,
                        softcap: Any = None) -> Tuple[_variants.Variant, _variants.VariantValues]:
    """The variant of a paged call, checked by :func:`attnproto.ops.variants.check_variant` over the
    table's capacity (TypeError / ValueError naming the argument); any RoPE is refused."""
    if rope is not None and rope is not False:
        _ref.rope_style(rope)  # a malformed value is named as such first
        raise ValueError(f"rope: {ROPE_REFUSAL}")
    shape = _v.AttentionShape(p.batch, p.num_heads, p.num_kv_heads, p.seq_q, p.capacity, p.head_dim, p.dtype,
                              "cuda")
    return _variants.check_variant(p.q, shape, "cuda", alibi=alibi, alibi_max_bias=alibi_max_bias, window=window,
                                   softcap=softcap)


def _backend():
    from .. import backend as _b  # noqa: PLC0415

    return _b.get("cuda")


def current_stream() -> int:
    """torch's current CUDA stream as a CUstream handle (what every paged launch defaults to)."""
    import torch  # noqa: PLC0415

    return int(torch.cuda.current_stream().cuda_stream)


def _check_compute(backend: Any, minimum: Tuple[int, int] = _fam.MIN_COMPUTE, what: str = "the paged kernels",
                   name: str = "q") -> None:
    info = backend.info
    cc = (int(info.get("compute_major", 0)), int(info.get("compute_minor", 0)))
    if cc < minimum:
        raise ValueError(f"{name}: {what} need compute capability {minimum[0]}.{minimum[1]}+, "
                         f"this GPU is {cc[0]}.{cc[1]}")


@dataclass
class Launch:
    kernel: Any
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    args: list
    shared_bytes: int


@dataclass
class DecodePlan:
    """The launches of one decode step with their workspace (kept alive here)."""

    backend: Any
    launches: List[Launch]
    problem: PagedProblem
    config: Any
    num_partitions: int
    partition_size: int
    out: Any
    lse: Any
    reason: str = ""
    workspace: Tuple[Any, ...] = field(default_factory=tuple)
    family: str = _fam.KERNEL

    def launch(self, stream: Optional[int] = None) -> Tuple[Any, Any]:
        """Enqueue on ``stream`` (default: torch's current stream); no host synchronisation."""
        s = current_stream() if stream is None else stream
        for ln in self.launches:
            self.backend.launch(ln.kernel, ln.grid, ln.block, ln.args, ln.shared_bytes, stream=s)
        return self.out, self.lse

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False) -> _lab.TimingStats:
        """The launches back to back from C++, event-timed as one sample (the project's timer)."""
        seq = [(ln.kernel, ln.grid, ln.block, ln.args, ln.shared_bytes) for ln in self.launches]
        return _lab.from_native(self.backend.time_sequence(seq, warmup=warmup, iters=iters, flush_l2=flush_l2))

    @property
    def resources(self) -> dict:
        return dict(self.launches[0].kernel.resources)


def _params_of(p: PagedProblem, *, num_partitions: int = 0, partition_size: int = 0, o_stride=(0, 0, 0),
               lse_stride=(0, 0), values: Optional[_variants.VariantValues] = None) -> np.void:
    variant_fields = (_variants.VariantValues() if values is None else values).params()
    return _params.make_params(
        batch=p.batch, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads, seq_q=p.seq_q, seq_kv=p.capacity,
        head_dim=p.head_dim, scale=p.scale, q_stride=p.q_stride, k_stride=p.k_stride, v_stride=p.v_stride,
        o_stride=o_stride, lse_stride=lse_stride, block_size=p.block_size, max_blocks_per_seq=p.max_blocks,
        num_partitions=num_partitions, partition_size=partition_size, num_blocks=p.num_blocks, **variant_fields)


def _outputs(p: PagedProblem, out: Any, lse: Any) -> Tuple[Any, Any]:
    import torch  # noqa: PLC0415

    o_shape = (p.batch, p.num_heads, p.seq_q, p.head_dim)
    if out is None:
        out = torch.empty(o_shape, dtype=p.q.dtype, device=p.device)
    if lse is None:
        lse = torch.empty(o_shape[:3], dtype=torch.float32, device=p.device)
    oi = _v.check_output(out, "out", shape=o_shape, allowed_dtypes=(p.dtype,), device="cuda")
    li = _v.check_output(lse, "lse", shape=o_shape[:3], allowed_dtypes=(LSE_DTYPE,), device="cuda")
    for x, name in ((out, "out"), (lse, "lse")):
        if x.device != p.device:
            raise ValueError(f"{name}: on {x.device}, q is on {p.device}")
    if out.data_ptr() % 4 or any(s % 2 for s, d in zip(oi.strides[:3], o_shape[:3]) if d > 1):
        raise ValueError("out: pairs of elements are stored as 4-byte words: base and strides must be even")
    if li.strides[2] != 1 and p.seq_q > 1:
        raise ValueError(f"lse: the token axis must be contiguous, got stride {li.strides[2]}")
    return out, lse


def prepare_paged_decode(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                         scale: Optional[float] = None, num_partitions: Any = "auto",
                         max_context: Optional[int] = None, layout: str = "nhd", packed: bool = True,
                         config: Optional[_fam.DecodeConfig] = None, out: Any = None, lse: Any = None,
                         check: bool = True, rope: Any = None, alibi: Any = False,
                         alibi_max_bias: float = _ref.DEFAULT_ALIBI_MAX_BIAS, window: Optional[int] = None,
                         softcap: Optional[float] = None) -> DecodePlan:
    """Check the inputs, choose the tile and the partitions, allocate the workspace: a plan whose
    ``launch()`` runs the step (and may be replayed, or captured, as often as wanted). Variants:
    the module doc (``rope`` is refused)."""
    backend = _backend()
    _check_compute(backend)
    p = check_paged(q, k_cache, v_cache, block_table, context_lens, layout=layout, scale=scale,
                    max_q_tokens=MAX_DECODE_TOKENS, check=check)
    variant, values = check_paged_variant(p, rope=rope, alibi=alibi, alibi_max_bias=alibi_max_bias, window=window,
                                          softcap=softcap)
    return _plan(backend, p, num_partitions, max_context, packed, config, out, lse, variant, values)


def prepare_contiguous_decode(q: Any, k: Any, v: Any, context_lens: Any, *, scale: Optional[float] = None,
                              num_partitions: Any = "auto", packed: bool = True,
                              config: Optional[_fam.DecodeConfig] = None, out: Any = None,
                              lse: Any = None) -> DecodePlan:
    """The same decode kernel over contiguous K/V ``[B, Hkv, N, D]``, sequence b using its first
    ``context_lens[b]`` (<= N) keys: the baseline of the paging overhead."""
    backend = _backend()
    _check_compute(backend)
    p = check_contiguous(q, k, v, context_lens, scale=scale, max_q_tokens=MAX_DECODE_TOKENS)
    return _plan(backend, p, num_partitions, None, packed, config, out, lse)


def _plan(backend: Any, p: PagedProblem, num_partitions: Any, max_context: Optional[int], packed: bool,
          config: Optional[_fam.DecodeConfig], out: Any, lse: Any, variant: Optional[_variants.Variant] = None,
          values: Optional[_variants.VariantValues] = None) -> DecodePlan:
    if config is None:
        config, why = _fam.choose_config(p.head_dim, p.seq_q, p.group, packed=packed)
    else:
        if not isinstance(config, _fam.DecodeConfig):
            raise TypeError(f"config: expected a DecodeConfig, got {type(config).__name__}")
        why = "given"
    ok, reason = _fam.legal(config, p.head_dim, p.seq_q, p.group)
    if not ok:
        raise ValueError(f"config: {config.label()} is illegal: {reason}")
    parts, size, part_why = _fam.partition_plan(p, config, int(backend.info.get("multiprocessors", 1)),
                                                num_partitions, max_context,
                                                window=0 if values is None else values.window)
    out, lse = _outputs(p, out, lse)
    o_stride = tuple(int(s) for s in out.stride()[:3])
    lse_stride = tuple(int(s) for s in lse.stride()[:2])
    params = _params_of(p, num_partitions=parts, partition_size=size, o_stride=o_stride, lse_stride=lse_stride,
                        values=values)
    split = parts > 1
    kern = backend.kernel(_fam.KERNEL, **_fam.constants(p, config, split, variant))
    grid = (parts, p.num_heads // config.heads, p.batch)
    block = (config.warps * _fam.WARP, 1, 1)
    smem = _fam.shared_bytes(config, p.head_dim, p.seq_q)
    import torch  # noqa: PLC0415

    if split:
        part_o = torch.empty((p.batch, p.num_heads, p.seq_q, parts, p.head_dim), dtype=torch.float32, device=p.device)
        part_lse = torch.empty((p.batch, p.num_heads, p.seq_q, parts), dtype=torch.float32, device=p.device)
    else:  # not read: any mapped address
        part_o = part_lse = lse
    # the partition kernel's last argument: the ALiBi slopes buffer (variants.buffer_args; null without one)
    slopes = _variants.buffer_args(values)[_variants.BUFFER_ALIBI_SLOPES]
    args = [params, p.q, p.k_cache, p.v_cache, p.block_table, p.context_lens, out, lse, part_o, part_lse, slopes]
    launches = [Launch(kern, grid, block, args, smem)]
    if split:
        red = backend.kernel(_fam.REDUCE_KERNEL, **_fam.reduce_constants(p))
        launches.append(Launch(red, (p.num_heads * p.seq_q, p.batch, 1), (p.head_dim // 2, 1, 1),
                               [params, p.context_lens, part_o, part_lse, out, lse], 0))
    return DecodePlan(backend, launches, p, config, parts, size, out, lse, f"{why}; {part_why}",
                      (part_o, part_lse))


def paged_decode(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                 scale: Optional[float] = None, num_partitions: Any = "auto", max_context: Optional[int] = None,
                 layout: str = "nhd", out: Any = None, lse: Any = None, check: bool = True, rope: Any = None,
                 alibi: Any = False, alibi_max_bias: float = _ref.DEFAULT_ALIBI_MAX_BIAS,
                 window: Optional[int] = None, softcap: Optional[float] = None) -> Tuple[Any, Any]:
    """Decode attention of q ``[B, Hq, D]`` (or ``[B, Hq, Nq, D]``, Nq <= 8, causal among the new
    tokens) over the paged cache; returns (O like q, LSE float32 ``[B, Hq(, Nq)]``). Variants:
    the module doc."""
    squeeze = _v.tensor_info(q, "q").ndim == 3
    if squeeze:  # [B, Hq, D] outputs are views of the [B, Hq, 1, D] ones the kernels write
        out = None if out is None else out.unsqueeze(2)
        lse = None if lse is None else lse.unsqueeze(2)
    plan = prepare_paged_decode(q, k_cache, v_cache, block_table, context_lens, scale=scale,
                                num_partitions=num_partitions, max_context=max_context, layout=layout,
                                out=out, lse=lse, check=check, rope=rope, alibi=alibi,
                                alibi_max_bias=alibi_max_bias, window=window, softcap=softcap)
    o, l = plan.launch()
    return (o.squeeze(2), l.squeeze(2)) if squeeze else (o, l)


# ----------------------------------------------------------------------------- prefill
#: The paged prefill runs the Hopper wgmma kernel (TMA boxes per page, wgmma).
PREFILL_MIN_COMPUTE = (9, 0)


@dataclass
class PrefillPlan:
    """One paged prefill launch (shaders/cuda/flash_fwd_wgmma.cu with PAGE_SIZE = the block size)."""

    prepared: Any
    problem: PagedProblem

    def launch(self, stream: Optional[int] = None) -> Tuple[Any, Any]:
        """Enqueue on ``stream`` (default: torch's current stream); no host synchronisation."""
        pl = self.prepared
        pl.backend.launch(pl.kernel, pl.grid, pl.block, pl.args, pl.shared_bytes,
                          stream=current_stream() if stream is None else stream)
        return pl.problem.out, pl.problem.lse

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False) -> _lab.TimingStats:
        return self.prepared.time(warmup=warmup, iters=iters, flush_l2=flush_l2)

    @property
    def config(self) -> Any:
        return self.prepared.config

    @property
    def reason(self) -> str:
        return self.prepared.reason


def prepare_paged_prefill(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                          scale: Optional[float] = None, causal: bool = True, layout: str = "nhd",
                          config: Any = None, out: Any = None, lse: Any = None, check: bool = True,
                          rope: Any = None, alibi: Any = False,
                          alibi_max_bias: float = _ref.DEFAULT_ALIBI_MAX_BIAS, window: Optional[int] = None,
                          softcap: Optional[float] = None) -> PrefillPlan:
    """Chunked prefill: q ``[B, Hq, Nq, D]`` holds the last Nq tokens of every sequence (query i of
    sequence b at position ctx[b] - Nq + i; causal bottom-right by default) attending to the
    sequence's ``context_lens[b]`` keys in the paged cache. Variants: the module doc."""
    from .paged_prefill_wgmma import prepare_paged_prefill_wgmma  # noqa: PLC0415

    _v.check_bool(causal, "causal")
    backend = _backend()
    _check_compute(backend, PREFILL_MIN_COMPUTE, "paged prefill (the Hopper wgmma kernel) and its TMA boxes")
    p = check_paged(q, k_cache, v_cache, block_table, context_lens, layout=layout, scale=scale, check=check)
    variant, values = check_paged_variant(p, rope=rope, alibi=alibi, alibi_max_bias=alibi_max_bias, window=window,
                                          softcap=softcap)
    out, lse = _outputs(p, out, lse)
    # The kernel's tensor maps walk [num_blocks, block_size, Hkv, D]: an "hnd" pool as that view.
    kc, vc = (x.permute(0, 2, 1, 3) if layout == "hnd" else x for x in (p.k_cache, p.v_cache))
    prepared = prepare_paged_prefill_wgmma(p.q, kc, vc, p.block_table, p.context_lens, scale=p.scale, causal=causal,
                                           out=out, lse=lse, config=config, backend=backend, variant=variant,
                                           values=values)
    return PrefillPlan(prepared, p)


def paged_prefill(q: Any, k_cache: Any, v_cache: Any, block_table: Any, context_lens: Any, *,
                  scale: Optional[float] = None, causal: bool = True, layout: str = "nhd", config: Any = None,
                  out: Any = None, lse: Any = None, check: bool = True, rope: Any = None, alibi: Any = False,
                  alibi_max_bias: float = _ref.DEFAULT_ALIBI_MAX_BIAS, window: Optional[int] = None,
                  softcap: Optional[float] = None) -> Tuple[Any, Any]:
    """Paged (chunked) prefill; returns (O like q, LSE float32 ``[B, Hq, Nq]``). Variants: the module doc."""
    return prepare_paged_prefill(q, k_cache, v_cache, block_table, context_lens, scale=scale, causal=causal,
                                 layout=layout, config=config, out=out, lse=lse, check=check, rope=rope,
                                 alibi=alibi, alibi_max_bias=alibi_max_bias, window=window,
                                 softcap=softcap).launch()


# ----------------------------------------------------------------------------- append
APPEND_KERNEL = "paged_append"


@dataclass
class AppendPlan:
    backend: Any
    launch_: Launch

    def launch(self, stream: Optional[int] = None) -> None:
        ln = self.launch_
        self.backend.launch(ln.kernel, ln.grid, ln.block, ln.args, ln.shared_bytes,
                            stream=current_stream() if stream is None else stream)

    def time(self, warmup: int = 4, iters: int = 50, flush_l2: bool = False) -> _lab.TimingStats:
        ln = self.launch_
        return _lab.from_native(self.backend.time_launch(ln.kernel, ln.grid, ln.block, ln.args, ln.shared_bytes,
                                                         warmup=warmup, iters=iters, flush_l2=flush_l2))


@dataclass(frozen=True)
class AppendShape:
    """What the append kernels need of checked new tokens and their pool."""

    k_new: Any
    v_new: Any
    strides: Tuple[int, ...]          # {k batch, head, token}, {v batch, head, token} (elements)
    batch: int
    kv_heads: int
    tokens: int
    dim: int
    block_size: int
    params: np.void


def check_append(k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, block_table: Any, positions: Any, *,
                 layout: str = "nhd", check: bool = True) -> AppendShape:
    """The checks of every append (plain or with RoPE): shapes, dtypes, devices, alignment, and with
    ``check`` the positions and the table entries the new tokens use."""
    _v.check_bool(check, "check")
    ki = _v.tensor_info(k_new, "k_new")
    if ki.kind != "torch" or ki.device != "cuda":
        raise ValueError(f"k_new: expected a torch CUDA tensor, got a {ki.kind} on {ki.device}")
    if ki.ndim == 3:
        _v.tensor_info(v_new, "v_new")
        k_new, v_new = k_new.unsqueeze(2), v_new.unsqueeze(2)
    infos = [_v.check_tensor(x, n, ndim=4, allowed_dtypes=DTYPES) for x, n in ((k_new, "k_new"), (v_new, "v_new"))]
    if infos[1].shape != infos[0].shape:
        raise ValueError(f"v_new: shape {infos[1].shape} does not match k_new shape {infos[0].shape}")
    if infos[1].dtype != infos[0].dtype:
        raise TypeError(f"v_new: dtype {infos[1].dtype} does not match k_new dtype {infos[0].dtype}")
    batch, kv_heads, tokens, dim = infos[0].shape
    num_blocks, block_size, c_heads, c_dim, ks, vs = check_cache(k_cache, v_cache, layout, k_new)
    if _v.dtype_name(k_cache.dtype) != infos[0].dtype:
        raise TypeError(f"k_cache: dtype {_v.dtype_name(k_cache.dtype)} does not match k_new dtype {infos[0].dtype}")
    if (c_heads, c_dim) != (kv_heads, dim):
        raise ValueError(f"k_new: {kv_heads} heads x head_dim {dim} do not match the cache's {c_heads} x {c_dim}")
    for x, info in zip((k_new, v_new), infos):
        if x.device != k_cache.device:
            raise ValueError(f"{info.name}: on {x.device}, k_cache is on {k_cache.device}")
        if x.data_ptr() % 16 or any((s * 2) % 16 for s, d in zip(info.strides[:3], info.shape[:3]) if d > 1):
            raise ValueError(f"{info.name}: base and outer strides must be 16-byte aligned")
    bt = _v.tensor_info(block_table, "block_table")
    if bt.ndim != 2:
        raise ValueError(f"block_table: expected 2 dimensions [B, max_blocks], got shape {bt.shape}")
    check_index(block_table, "block_table", (batch, bt.shape[1]), k_new)
    check_index(positions, "positions", (batch,), k_new)
    capacity = bt.shape[1] * block_size
    if check:
        check_table_values(block_table, None, capacity, num_blocks, block_size, positions=positions,
                           new_tokens=tokens)
    params = _params.make_params(batch=batch, num_heads=kv_heads, num_kv_heads=kv_heads, seq_q=tokens,
                                 seq_kv=capacity, head_dim=dim, k_stride=ks, v_stride=vs, block_size=block_size,
                                 max_blocks_per_seq=bt.shape[1], num_blocks=num_blocks)
    strides = tuple(int(s) for s in list(infos[0].strides[:3]) + list(infos[1].strides[:3]))
    return AppendShape(k_new, v_new, strides, batch, kv_heads, tokens, dim, block_size, params)


def prepare_append_kv(k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, block_table: Any, positions: Any, *,
                      layout: str = "nhd", check: bool = True) -> AppendPlan:
    """k_new/v_new ``[B, Hkv, T, D]`` (or ``[B, Hkv, D]``, T = 1): token i of sequence b goes to
    position ``positions[b] + i`` (int32 ``[B]``, on the device)."""
    backend = _backend()
    _check_compute(backend, name="k_new")
    a = check_append(k_new, v_new, k_cache, v_cache, block_table, positions, layout=layout, check=check)
    from ..backend import native  # noqa: PLC0415

    # NewStrides of paged_append.cu: {k batch, head, token}, {v batch, head, token} as int64.
    strides = native().Arg.raw(np.array(a.strides, dtype=np.int64).tobytes(), 8)
    kern = backend.kernel(APPEND_KERNEL, HEAD_DIM=a.dim, PAGE_SIZE=a.block_size)
    args = [a.params, strides, a.k_new, a.v_new, k_cache, v_cache, block_table, positions]
    return AppendPlan(backend, Launch(kern, (a.tokens, a.kv_heads, a.batch), (a.dim // 8, 1, 1), args, 0))


def append_kv(k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, block_table: Any, positions: Any, *,
              layout: str = "nhd", check: bool = True) -> None:
    """Write the new tokens' K/V into their pages (in place, on torch's current stream)."""
    prepare_append_kv(k_new, v_new, k_cache, v_cache, block_table, positions, layout=layout, check=check).launch()


#: The pure-read kernel Prototype 3 measures its bandwidth ceiling with, and its unroll.
READ_CEILING_KERNEL = "read_ceiling"
READ_CEILING_UNROLL = 4


def append_specialisations() -> List[Tuple[str, dict]]:
    """append_kv at every D x block size, and the read-ceiling kernel."""
    from .paged_problem import HEAD_DIMS, PAGE_SIZES  # noqa: PLC0415

    return ([(APPEND_KERNEL, {"HEAD_DIM": d, "PAGE_SIZE": b}) for d in HEAD_DIMS for b in PAGE_SIZES]
            + [(READ_CEILING_KERNEL, {"UNROLL": READ_CEILING_UNROLL})])
