"""attnproto as a Hugging Face transformers attention backend, without a fork of transformers
and without patching model code.

    from attnproto.integrations import transformers as ap_hf
    ap_hf.register()
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="attnproto")
    model.generate(...)

``register()`` adds ``"attnproto"`` to transformers' ``AttentionInterface`` (the attention
function every model calls) and ``AttentionMaskInterface`` (so the model builds no dense
mask for purely causal batches: transformers' own FlashAttention mask function, which returns
None when nothing is padded). The attention function hands Q, K, V to
``torch.ops.attnproto.flash_attention`` (:mod:`attnproto.integrations.torch_ops`) with the
key/value heads as they are: GQA is mapped in the kernel, no ``repeat_kv``; the causal mask is
bottom-right aligned, which is the right one for a query chunk after cached keys.

What it does not do, and says so with a ValueError naming the argument: dropout (inference
kernels), padded batches (an ``attention_mask`` with zeros), logit soft caps and sliding
windows (not yet in the CUDA kernels).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

NAME = "attnproto"


def attnproto_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Optional[Any],
                        dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                        **kwargs: Any) -> Tuple[Any, None]:
    """transformers' attention-function signature: query [B, Hq, Nq, D], key/value [B, Hkv, Nkv, D];
    returns (output [B, Nq, Hq, D], None: no attention weights)."""
    import torch  # noqa: PLC0415

    from . import torch_ops  # noqa: F401, PLC0415  (registers torch.ops.attnproto)

    if dropout:
        raise ValueError(f"dropout: {dropout} is not supported by attnproto's inference kernels "
                         "(use attn_implementation='sdpa' for training with dropout)")
    for name in ("softcap", "sliding_window"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: {kwargs[name]!r} is not supported by attnproto's CUDA kernels yet")
    if attention_mask is not None:
        raise ValueError("attention_mask: padded batches are not supported by attnproto attention yet "
                         "(every sequence of a batch must be unpadded; use attn_implementation='sdpa')")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    out, _ = torch.ops.attnproto.flash_attention(query, key, value, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="attnproto"`` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: PLC0415

    AttentionInterface.register(NAME, attnproto_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


__all__ = ["NAME", "attnproto_attention", "register"]
