"""The torch SDPA baseline of the flash-attention GPU tests: "our error is no larger
than SDPA_FACTOR x SDPA's error at the same precision against the same FP64 reference".
Shared by tests/test_flash_gpu.py (mma.sync) and tests/test_flash_wgmma_gpu.py (wgmma);
importing it needs no torch."""
from __future__ import annotations

# Our max |O - ref| may be at most this multiple of torch SDPA's on the same inputs.
SDPA_FACTOR = 2.0
# Mantissa bits (with the implicit one) of the output dtypes: rounding the exact O to the
# output dtype alone costs up to half an ulp, 2^-bits * |O|, which no kernel can beat.
MANTISSA_BITS = {"float16": 11, "bfloat16": 8}


def sdpa(q, k, v, causal, scale):
    """torch SDPA (default backend) with GQA expanded and a bottom-right causal mask."""
    import torch  # noqa: PLC0415  (GPU tests only)

    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    nq, nkv = q.shape[2], k.shape[2]
    if not causal:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if nq == nkv:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(nq, nkv, dtype=torch.bool, device=q.device).tril(diagonal=nkv - nq)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
