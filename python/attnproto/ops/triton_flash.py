"""The Prototype 1 flash-attention forward written in Triton (Prototype 5's first DSL kernel).

Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D] (GQA: query head h reads KV head h // (Hq / Hkv)),
O like Q, LSE float32 [B, Hq, Nq] in natural log: the conventions of
:mod:`attnproto.ops.flash` and :mod:`attnproto.ref`. Causal is bottom-right aligned (query
i sees key j when j <= i + Nkv - Nq); a row that sees no key gives O = 0, LSE = -inf.

The kernel is written the way a Triton author targets Hopper: block pointers
(``tl.make_block_ptr``, zero padding past Nq/Nkv), ``tl.dot`` for both matrix products
(Triton lowers them to wgmma on sm_90, mma.sync on sm_80), the online softmax in base 2
(``exp2`` with log2(e) folded into the scale), key blocks split into an unmasked run and a
masked diagonal/tail run (two instantiations of one inner loop), and ``triton.autotune``
over BLOCK_M, BLOCK_N, num_warps and num_stages, pruned by shared memory.

This module imports triton; :mod:`attnproto.ops.families.triton` imports it only when the
family is used, so ``import attnproto`` never needs triton.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import triton
import triton.language as tl

from .dsl_tiles import SMEM_LIMIT_SM90, TritonConfig, configs, default_config, shared_bytes_estimate

__all__ = ["HEAD_DIMS", "DTYPES", "TritonConfig", "aot_compile", "attn_fwd", "attn_fwd_autotuned", "configs",
           "default_config", "descriptor", "grid_for", "launch_args", "shared_bytes_estimate"]

#: log2(e): the scores are scaled by scale * log2(e) so that exp(x) = exp2(x * log2(e)).
LOG2E = math.log2(math.e)
#: ln(2): converts the base-2 LSE back to the natural log the front door returns.
LN2 = math.log(2.0)
HEAD_DIMS: Tuple[int, ...] = (64, 128)
DTYPES: Tuple[str, ...] = ("float16", "bfloat16")
#: ln(2) inside the kernel (a jit function reads module globals only as constexprs).
_LN2 = tl.constexpr(LN2)


@triton.jit
def _inner(acc, l_i, m_i, q, k_desc, v_desc, b, kvh, rows, lo, hi, n_kv, offset, qk_scale,
           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks [lo, hi): S = Q K^T, online softmax in base 2, O += P V.

    MASKED: mask keys past Nkv and (CAUSAL) keys right of the diagonal; the unmasked run
    covers only blocks every row of the query block sees in full. Loads past Nkv are
    zero-filled by the TMA descriptor."""
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        k = k_desc.load([b, kvh, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            cols = start + tl.arange(0, BLOCK_N)
            keep = cols[None, :] < n_kv
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + offset)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 there (p = 0, alpha = 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([b, kvh, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, slb, slh, num_heads, group, n_q, n_kv,
             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_M-row query block of one (batch, query head); grid (cdiv(Nq, BLOCK_M), B * Hq).

    q/k/v/o_desc: 4-D TMA descriptors over [B, H, N, D] with blocks [1, 1, BLOCK, D]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // group
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offset = n_kv - n_q
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        # Keys every row of the block sees: j <= start_m + offset; keys any row sees: j < start_m + BLOCK_M + offset.
        full_end = tl.minimum(tl.maximum(start_m + offset + 1, 0), n_kv)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), n_kv)
    else:
        full_end = n_kv
        hi = n_kv
    full_end = (full_end // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, k_desc, v_desc, b, kvh, rows, 0, full_end, n_kv, offset, qk_scale,
                           HEAD_DIM, BLOCK_N, False, CAUSAL)
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, k_desc, v_desc, b, kvh, rows, full_end, hi, n_kv, offset, qk_scale,
                           HEAD_DIM, BLOCK_N, True, CAUSAL)
    # Rows with no visible key: O = 0, LSE = -inf. Rows with keys whose every score is -inf
    # (an inf in q or k) have l = 0: O = 0/0 = NaN and LSE NaN (attnproto.ref's NaN policy).
    if CAUSAL:
        has_keys = rows + offset >= 0
    else:
        has_keys = rows >= 0
    o = tl.where(has_keys[:, None], acc / l_i[:, None], 0.0)
    lse = tl.where(has_keys, tl.where(l_i == 0.0, float("nan"), (m_i + tl.math.log2(l_i)) * _LN2),
                   float("-inf"))
    # The TMA store clips rows past Nq.
    o_desc.store([b, h, start_m, 0], o.to(o_desc.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    tl.store(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + rows, lse, mask=rows < n_q)


def _set_blocks(nargs: Dict[str, Any]) -> None:
    """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
    m, n, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    for name, rows in (("q_desc", m), ("o_desc", m), ("k_desc", n), ("v_desc", n)):
        nargs[name].block_shape = [1, 1, rows, d]


def _prune(configs_in: List[Any], named_args: Dict[str, Any], **kwargs: Any) -> List[Any]:
    d = int(kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", max(HEAD_DIMS))))
    keep = [c for c in configs_in
            if shared_bytes_estimate(TritonConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                  c.num_stages), d) <= SMEM_LIMIT_SM90]
    return keep or configs_in


#: The autotuned kernel: one tuning per (Nq, Nkv, D, causal) key (and dtype: Triton keys on
#: argument types too), over :func:`configs`.
attn_fwd_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.warps,
                           num_stages=c.stages, pre_hook=_set_blocks) for c in configs(min(HEAD_DIMS), 1 << 62)],
    key=["n_q", "n_kv", "HEAD_DIM", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune},
)(attn_fwd)


def descriptor(x: Any, strides: Tuple[int, ...], rows: int) -> Any:
    """A 4-D TMA descriptor over [B, H, N, D] (``strides``: of B, H, N in elements; D contiguous).

    TMA wants every stride but the last 16-byte aligned; an axis of extent 1 is never
    stepped, so its stride is replaced by the span of the axes inside it."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    shape = [int(s) for s in x.shape]
    full = [int(s) for s in strides] + [1]
    for axis in (2, 1, 0):
        if shape[axis] == 1:
            full[axis] = shape[axis + 1] * full[axis + 1]
    return TensorDescriptor(x, shape, full, [1, 1, rows, shape[3]])


def launch_args(q: Any, k: Any, v: Any, out: Any, lse: Any, *, scale: float, causal: bool,
                q_stride: Tuple[int, int, int], k_stride: Tuple[int, int, int], v_stride: Tuple[int, int, int],
                o_stride: Tuple[int, int, int], lse_stride: Tuple[int, int],
                block_m: int = 0, block_n: int = 0) -> Tuple[tuple, Dict[str, Any]]:
    """(positional args, constexpr kwargs) of :func:`attn_fwd` for checked tensors (strides in
    elements). ``block_m``/``block_n``: the descriptors' blocks (0: set by the autotune pre-hook)."""
    n_q, d = int(q.shape[2]), int(q.shape[3])
    hq, hkv, n_kv = int(q.shape[1]), int(k.shape[1]), int(k.shape[2])
    rows_q, rows_kv = block_m or 1, block_n or 1
    args = (descriptor(q, q_stride, rows_q), descriptor(k, k_stride, rows_kv), descriptor(v, v_stride, rows_kv),
            descriptor(out, o_stride, rows_q), lse, float(scale) * LOG2E, *lse_stride, hq, hq // hkv, n_q, n_kv)
    return args, {"HEAD_DIM": d, "CAUSAL": bool(causal)}


def grid_for(block_m: int, n_q: int, batch_heads: int) -> Tuple[int, int, int]:
    return (triton.cdiv(n_q, block_m), batch_heads, 1)


#: Triton's names of the element types (signature strings of the compile API).
TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16"}
#: The compute capability and warp size of the CI target: Hopper.
SM90 = (90, 32)


def aot_signature(cfg: TritonConfig, head_dim: int, dtype: str) -> Dict[str, str]:
    """The argument types of :func:`attn_fwd` for the compile API (descriptors with their blocks)."""
    el = TRITON_DTYPE[dtype]
    q_desc = f"tensordesc<{el}[1, 1, {cfg.block_m}, {head_dim}]>"
    kv_desc = f"tensordesc<{el}[1, 1, {cfg.block_n}, {head_dim}]>"
    sig = {"q_desc": q_desc, "k_desc": kv_desc, "v_desc": kv_desc, "o_desc": q_desc, "LSE": "*fp32",
           "qk_scale": "fp32"}
    sig.update({name: "i32" for name in ("slb", "slh", "num_heads", "group", "n_q", "n_kv")})
    return sig


def aot_compile(cfg: TritonConfig, head_dim: int, causal: bool, dtype: str, target: Tuple[int, int] = SM90) -> Any:
    """Compile :func:`attn_fwd` ahead of time for a CUDA target without a GPU (Triton's compile
    API); the result's ``asm`` holds ttgir, llir, ptx and cubin, its ``metadata`` the shared
    memory and warps."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    constexprs = {"HEAD_DIM": head_dim, "CAUSAL": bool(causal), "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    sig = aot_signature(cfg, head_dim, dtype)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=attn_fwd, signature=sig, constexprs=constexprs)
    cc, warp = target
    return triton.compile(src, target=GPUTarget("cuda", cc, warp),
                          options={"num_warps": cfg.warps, "num_stages": cfg.stages})
