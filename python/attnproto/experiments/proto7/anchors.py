"""Prototype 7 anchors in torch: a standalone RoPE (eager fp32 math, as Hugging Face's
apply_rotary_pos_emb), ALiBi / window / causal as a materialised float bias for SDPA's
attn_mask, and compiled flex_attention with the same score_mod / block mask.

flex_attention compiles per score_mod and shape: :class:`Flex` compiles flex_attention once,
keeps one score_mod object per modification and one block mask per (mask, N), so each distinct
modification is compiled once per shape and reused."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

from ... import ref


def rope_cos_sin(n: int, d: int, device: str = "cuda"):
    """float32 cos, sin [N, D/2] at positions 0..N-1 (the angles of attnproto.ref.rope)."""
    import torch  # noqa: PLC0415

    freqs = torch.from_numpy(ref.rope_frequencies(d)).to(device=device, dtype=torch.float64)
    angle = torch.arange(n, device=device, dtype=torch.float64)[:, None] * freqs[None, :]
    return torch.cos(angle).float(), torch.sin(angle).float()


def torch_rope(x: Any, cos: Any, sin: Any, style: str) -> Any:
    """RoPE of x [B, H, N, D] at positions 0..N-1 (cos/sin [>= N, D/2])."""
    n = x.shape[-2]
    return torch_rope_at(x, cos[:n], sin[:n], style)


def torch_rope_at(x: Any, c: Any, s: Any, style: str) -> Any:
    """RoPE of x [B, H, N, D] with the cos/sin rows [N, D/2] of its positions, in fp32 eager
    math, cast back to x's dtype (HF's recipe for "half": x * cos + rotate_half(x) * sin,
    cos/sin repeated over both halves)."""
    import torch  # noqa: PLC0415

    xf = x.float()
    if style == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * torch.cat((c, c), -1) + rotated * torch.cat((s, s), -1)).to(x.dtype)


def bias_mask(num_heads: int, rows: int, seq_kv: int, *, slopes: Any = None, window: Optional[int] = None,
              causal: bool = True, dtype: Any = None, device: str = "cuda") -> Any:
    """Float bias [1, H, rows, Nkv] for SDPA's attn_mask: -slope_h |p - j| (ALiBi, when
    ``slopes`` [H] is given), -inf outside the causal mask / the left window; the rows are the
    LAST ``rows`` queries (bottom-right aligned positions p = Nkv - rows + i)."""
    import torch  # noqa: PLC0415

    pos_q = torch.arange(seq_kv - rows, seq_kv, device=device)[:, None]
    pos_k = torch.arange(seq_kv, device=device)[None, :]
    visible = torch.ones(rows, seq_kv, dtype=torch.bool, device=device)
    if causal:
        visible &= pos_k <= pos_q
    if window is not None:
        visible &= pos_k > pos_q - window
    bias = torch.zeros(1, num_heads, rows, seq_kv, device=device, dtype=torch.float32)
    if slopes is not None:
        bias = bias - slopes.float().view(1, -1, 1, 1) * (pos_q - pos_k).abs().float()
    bias = bias.masked_fill(~visible, -math.inf)
    return bias.to(dtype) if dtype is not None else bias


def sdpa(q: Any, k: Any, v: Any, *, causal: bool = True, attn_mask: Any = None) -> Callable[[], Any]:
    import torch.nn.functional as F  # noqa: N812, PLC0415

    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


def eager_softcap(q: Any, k: Any, v: Any, *, softcap: float, bias: Any) -> Any:
    """What torch users run for a soft cap SDPA cannot express: scores in fp32, cap, bias,
    softmax in fp32, P in the inputs' dtype times V (q, k already rotated; k/v per q head)."""
    import torch  # noqa: PLC0415

    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = softcap * torch.tanh(s / softcap) + bias
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v)


class Flex:
    """Compiled flex_attention with the project's variants as score_mod / mask_mod."""

    def __init__(self):
        import torch  # noqa: PLC0415
        from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

        self.compiled = torch.compile(flex_attention, dynamic=False)
        self.mods: Dict[Tuple, Any] = {}
        self.masks: Dict[Tuple, Any] = {}

    def score_mod(self, slopes: Any = None, softcap: Optional[float] = None):
        key = (id(slopes) if slopes is not None else None, softcap)
        if key in self.mods:
            return self.mods[key]
        mod = None
        if slopes is not None and softcap is not None:
            def mod(score, b, h, qi, ki):
                return softcap * (score / softcap).tanh() - slopes[h] * (qi - ki).abs()
        elif slopes is not None:
            def mod(score, b, h, qi, ki):
                return score - slopes[h] * (qi - ki).abs()
        elif softcap is not None:
            def mod(score, b, h, qi, ki):
                return softcap * (score / softcap).tanh()
        self.mods[key] = mod
        return mod

    def block_mask(self, n: int, window: Optional[int] = None):
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

        key = (n, window)
        if key not in self.masks:
            if window is None:
                def mask(b, h, qi, ki):
                    return qi >= ki
            else:
                def mask(b, h, qi, ki):
                    return (qi >= ki) & (qi - ki < window)
            self.masks[key] = create_block_mask(mask, None, None, n, n, device="cuda")
        return self.masks[key]

    def call(self, q: Any, k: Any, v: Any, *, slopes: Any = None, softcap: Optional[float] = None,
             window: Optional[int] = None) -> Callable[[], Any]:
        """One flex_attention call (compiled on first use) with the modification (causal always)."""
        mod = self.score_mod(slopes, softcap)
        mask = self.block_mask(q.shape[2], window)
        gqa = q.shape[1] != k.shape[1]
        return lambda: self.compiled(q, k, v, score_mod=mod, block_mask=mask, enable_gqa=gqa)
