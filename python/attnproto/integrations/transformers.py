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

With a :class:`.paged_cache.PagedKVCache` as ``past_key_values`` the attention runs paged
decode (up to 8 new tokens) or paged prefill over the cache's block table instead.

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
    layer = _paged_layer(key)
    if layer is not None:  # the pools of a PagedKVCache: attend through its block table
        if not causal:
            raise ValueError("is_causal: a PagedKVCache serves causal decoder attention only")
        from ..ops.paged_problem import MAX_DECODE_TOKENS  # noqa: PLC0415

        table, lens = layer._cache.table(key.device), layer.context_lens()
        op = (torch.ops.attnproto.paged_decode if query.shape[2] <= MAX_DECODE_TOKENS
              else torch.ops.attnproto.paged_prefill)
        out, _ = op(query, layer.keys, layer.values, table, lens, scaling)
    else:
        out, _ = torch.ops.attnproto.flash_attention(query, key, value, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def _paged_layer(key: Any) -> Any:
    from .paged_cache import paged_layer_of  # noqa: PLC0415

    return paged_layer_of(key)


def register() -> None:
    """Make ``attn_implementation="attnproto"`` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: PLC0415

    AttentionInterface.register(NAME, attnproto_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


__all__ = ["NAME", "attnproto_attention", "register"]
