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

With a :class:`.paged_cache.PagedKVCache` as ``past_key_values`` the attention function also
stores the new K/V (the cache defers its store here) and runs paged decode (up to 8 new tokens)
or paged prefill over the cache's block table; a left-padded batch (``attention_mask`` with
leading zeros) is stored without its padding, each sequence with its own context length.
transformers' Llama applies RoPE itself before this call, so what is ours on this path is the
K/V store and the attention; RoPE fused into the store (``torch.ops.attnproto.fused_prefill``,
``rope_append``) serves a model loop that hands over unrotated Q/K
(:mod:`attnproto.integrations.models`).

What it does not do, and says so naming the argument: dropout (inference kernels), padded
batches without a PagedKVCache, right padding, logit soft caps and sliding windows (not yet in
the CUDA kernels), dtypes and head dims the kernels lack.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

NAME = "attnproto"


#: What the CUDA kernels take (the CPU backend computes in float32 for any of its dtypes).
CUDA_DTYPES = ("float16", "bfloat16")


def check_supported(device_type: str, dtype: Any, head_dim: int) -> None:
    """Refuse, naming the argument, what the kernels of ``device_type`` cannot run."""
    from .. import cpu as _cpu  # noqa: PLC0415
    from ..ops.paged_problem import HEAD_DIMS  # noqa: PLC0415

    name = str(dtype).replace("torch.", "")
    allowed = CUDA_DTYPES if device_type == "cuda" else _cpu.CPU_DTYPES
    if name not in allowed:
        raise TypeError(f"query: dtype {name} is not supported by attnproto's {device_type} kernels "
                        f"(expected one of {', '.join(allowed)}; load the model with torch_dtype=torch.bfloat16)")
    if device_type == "cuda" and head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: {head_dim} is not supported by attnproto's CUDA kernels "
                         f"(supported: {', '.join(map(str, HEAD_DIMS))})")


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
    check_supported(query.device.type, query.dtype, query.shape[-1])
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    layer = _pending_layer(key)
    if layer is None:
        if attention_mask is not None:
            raise ValueError("attention_mask: padded batches need a PagedKVCache (past_key_values=PagedKVCache(...), "
                             "which stores each sequence without its padding); without one every sequence of a "
                             "batch must be unpadded")
        out, _ = torch.ops.attnproto.flash_attention(query, key, value, causal, scaling)
        return out.transpose(1, 2).contiguous(), None
    if not causal:
        raise ValueError("is_causal: a PagedKVCache serves causal decoder attention only")
    from ..ops.paged_problem import MAX_DECODE_TOKENS  # noqa: PLC0415

    new = query.shape[2]
    first = layer.length == 0
    if attention_mask is not None and not first and not capturing(attention_mask):
        if not bool(attention_mask[:, -new:].all()):
            raise ValueError("attention_mask: the new tokens of a step after the prompt must all be real "
                             "(only the prompt may be left-padded)")
    padded = layer.store(key, value, attention_mask)
    if first and not padded:  # nothing else is cached: attention over the new tokens themselves
        out, _ = torch.ops.attnproto.flash_attention(query, key, value, causal, scaling)
        return out.transpose(1, 2).contiguous(), None
    table, lens = layer._cache.table(key.device), layer.lens
    op = torch.ops.attnproto.paged_decode if new <= MAX_DECODE_TOKENS else torch.ops.attnproto.paged_prefill
    out, _ = op(query, layer.keys, layer.values, table, lens, scaling, False)   # the cache's own table (store())
    if padded:  # padding queries attend to nothing: zero rows, not whatever an empty softmax gives
        real = attention_mask[:, -new:].bool()[:, None, :, None]
        out = torch.where(real, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2).contiguous(), None


def _pending_layer(key: Any) -> Any:
    from .paged_cache import pending_layer_of  # noqa: PLC0415

    return pending_layer_of(key)


def capturing(x: Any) -> bool:
    from .paged_cache import capturing as _capturing  # noqa: PLC0415

    return _capturing(x)


def register() -> None:
    """Make ``attn_implementation="attnproto"`` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: PLC0415

    AttentionInterface.register(NAME, attnproto_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


__all__ = ["CUDA_DTYPES", "NAME", "attnproto_attention", "check_supported", "register"]
