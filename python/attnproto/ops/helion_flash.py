"""The Prototype 1 flash-attention forward written in Helion (Prototype 5's second DSL kernel).

Helion is PyTorch-embedded: the kernel below is plain torch code over tiles (``hl.tile``),
which Helion's compiler turns into a Triton kernel (and Triton into wgmma on Hopper). The
conventions are :mod:`attnproto.ops.flash`'s: Q [B, Hq, Nq, D], K/V [B, Hkv, Nkv, D], GQA by
head mapping, O like Q, LSE float32 natural log, bottom-right causal alignment, rows with no
key O = 0 and LSE = -inf, NaN where the policy of :mod:`attnproto.ref` says.

The same algorithm as the Triton kernel: online softmax in base 2 (log2(e) folded into the
scale), causal key loops that stop at the block's last visible key. The tile (BLOCK_M,
BLOCK_N, warps, stages) is a Helion config; Helion picks the memory access (TMA descriptors
where legal). This module imports helion; :mod:`attnproto.ops.families.helion` imports it only
when the family is used.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import helion
import helion.language as hl
import torch

from .dsl_tiles import TritonConfig

#: log2(e): exp(x) = exp2(x log2 e); the host folds it into the scale.
LOG2E = math.log2(math.e)
#: ln(2): the base-2 LSE back to natural log.
LN2 = math.log(2.0)
#: Helion's memory-access mode of every config: TMA descriptors (Helion falls back to pointers
#: where a descriptor is not legal).
INDEXING = "tensor_descriptor"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              qk_scale: float, causal: hl.constexpr) -> None:
    b, hq, n_q, d = q.shape
    hkv, n_kv = k.size(1), k.size(2)
    d = hl.specialize(d)
    group = hq // hkv
    offset = n_kv - n_q
    ln2 = LN2
    for tile_b, tile_h, tile_m in hl.tile([b, hq, n_q], block_size=[1, 1, None]):
        m_i = hl.full([tile_m], float("-inf"), dtype=torch.float32)
        l_i = hl.zeros([tile_m], dtype=torch.float32)
        acc = hl.zeros([tile_m, d], dtype=torch.float32)
        kvh = tile_h.begin // group
        qt = q[tile_b.begin, tile_h.begin, tile_m, :]
        # Causal: keys right of the block's last row are never visible.
        hi = min(tile_m.end + offset, n_kv) if causal else n_kv
        for tile_n in hl.tile(0, hi):
            kt = k[tile_b.begin, kvh, tile_n, :]
            s = hl.dot(qt, kt.T) * qk_scale
            # Keys past Nkv load as 0 (Helion masks the tail): mask their scores to -inf.
            keep = (tile_m.index[:, None] >= 0) & (tile_n.index[None, :] < n_kv)
            if causal:
                keep = keep & (tile_n.index[None, :] <= tile_m.index[:, None] + offset)
            s = torch.where(keep, s, float("-inf"))
            m_new = torch.maximum(m_i, torch.amax(s, -1))
            # A row with no visible key so far keeps m = -inf: subtract 0 there (p = 0, alpha = 0).
            m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp2(s - m_use[:, None])
            alpha = torch.exp2(m_i - m_use)
            l_i = l_i * alpha + torch.sum(p, -1)
            vt = v[tile_b.begin, kvh, tile_n, :]
            acc = hl.dot(p.to(vt.dtype), vt, acc=acc * alpha[:, None])
            m_i = m_new
        # Rows with no visible key: O = 0, LSE = -inf; rows with keys whose every score is -inf
        # (an inf in q or k) have l = 0: O = 0/0 = NaN and LSE NaN (attnproto.ref's policy).
        has_keys = (tile_m.index + offset >= 0) if causal else (tile_m.index >= 0)
        o = torch.where(has_keys[:, None], acc / l_i[:, None], 0.0)
        row_lse = torch.where(l_i == 0.0, float("nan"), (m_i + torch.log2(l_i)) * ln2)
        out[tile_b.begin, tile_h.begin, tile_m, :] = o.to(out.dtype)
        lse[tile_b.begin, tile_h.begin, tile_m] = torch.where(has_keys, row_lse, float("-inf"))


def helion_config(cfg: TritonConfig) -> "helion.Config":
    return helion.Config(block_sizes=[cfg.block_m, cfg.block_n], num_warps=cfg.warps, num_stages=cfg.stages,
                         indexing=INDEXING)


@functools.lru_cache(maxsize=None)
def fixed_kernel(cfg: TritonConfig) -> Any:
    """The Helion kernel compiled with one tile (cached per tile)."""
    return helion.kernel(attention, config=helion_config(cfg), static_shapes=False)


@functools.lru_cache(maxsize=None)
def tuned_kernel(tiles: Sequence[TritonConfig]) -> Any:
    """The Helion kernel choosing among ``tiles`` by benchmarking them (Helion's autotuner over a
    given config list: its full search takes minutes per shape)."""
    return helion.kernel(attention, configs=[helion_config(c) for c in tiles], static_shapes=False)


def run(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        scale: float, causal: bool) -> None:
    kernel(q, k, v, out, lse, float(scale) * LOG2E, bool(causal))


def triton_source(cfg: TritonConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float, causal: bool) -> str:
    """The Triton code Helion generates for ``cfg`` on these inputs (no GPU needed)."""
    bound = fixed_kernel(cfg).bind((q, k, v, out, lse, float(scale) * LOG2E, bool(causal)))
    return bound.to_triton_code(helion_config(cfg))


#: Triton's element-type names of the kernel's tensor arguments.
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Compute capability and warp size of the ahead-of-time target: Hopper.
SM90 = (90, 32)


def generated_jit(cfg: TritonConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool) -> Any:
    """The Triton JIT function Helion generates for ``cfg`` on these inputs (no GPU needed)."""
    import sys  # noqa: PLC0415

    import triton  # noqa: PLC0415

    bound = fixed_kernel(cfg).bind((q, k, v, out, lse, 1.0, bool(causal)))
    host = bound.compile_config(helion_config(cfg))
    module = sys.modules[host.__module__]
    jits = [obj for obj in vars(module).values() if isinstance(obj, triton.runtime.jit.JITFunction)]
    if len(jits) != 1:
        raise RuntimeError(f"Helion generated {len(jits)} Triton kernels, expected 1")
    return jits[0]


def aot_compile(cfg: TritonConfig, head_dim: int, causal: bool, dtype: str, target: tuple = SM90) -> Any:
    """Helion's generated Triton kernel compiled ahead of time for a CUDA target without a GPU.

    Argument types: the five tensors by name, ``qk_scale`` and ``ln2`` float, every other runtime
    argument (sizes, strides) i32; the one constexpr Helion adds, the padded head dim
    (``_RDIM_SIZE_*``), is D (64 and 128 are powers of two)."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    tdt = getattr(torch, dtype)
    q = torch.empty(1, 2, 128, head_dim, dtype=tdt)
    kv = torch.empty(1, 1, 128, head_dim, dtype=tdt)
    lse = torch.empty(1, 2, 128, dtype=torch.float32)
    fn = generated_jit(cfg, q, kv, kv, torch.empty_like(q), lse, causal)
    tensors = {"q": tdt, "k": tdt, "v": tdt, "out": tdt, "lse": torch.float32}
    floats = ("qk_scale", "ln2")
    sig, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            if not name.startswith("_RDIM_SIZE"):
                raise RuntimeError(f"Helion's kernel has an unexpected constexpr {name!r}")
            sig[name], constexprs[name] = "constexpr", head_dim
        elif name in tensors:
            sig[name] = "*" + _TRITON_DTYPE[tensors[name]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    cc, warp = target
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", cc, warp),
                          options={"num_warps": cfg.warps, "num_stages": cfg.stages})
