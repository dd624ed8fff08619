"""Models that need no download, and a decode step one CUDA graph replays.

    model = build_model(shape="tinyllama", dtype=torch.bfloat16, device="cuda", attn="attnproto")
    model = build_model(path="/models/TinyLlama-1.1B", ...)        # a local checkpoint instead
    dec = GraphDecoder(model, cache, first_tokens)                # our decode step, captured once
    tokens = dec.run(steps)                                       # replayed, greedy, no host sync

``SHAPES["tinyllama"]`` is TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads on 4 KV heads,
head dim 64, intermediate 5632, vocab 32000) with seeded random weights: what every Prototype 8
number is measured on unless a checkpoint is given. ``SHAPES["tiny"]`` is the CI model.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

#: LlamaConfig fields of the models built without a download.
SHAPES: Dict[str, Dict[str, Any]] = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, rope_theta=10000.0,
                      max_position_embeddings=32768),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512),
}
#: The attention implementations Prototype 8 compares ("attnproto" registers on first use).
ATTN_IMPLS = ("attnproto", "sdpa", "eager", "flex_attention")
DEFAULT_SEED = 0


def config_of(shape: str) -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415

    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
    return LlamaConfig(**SHAPES[shape])


def build_model(*, shape: str = "tinyllama", path: Optional[str] = None, dtype: Any = torch.bfloat16,
                device: Any = "cpu", attn: str = "attnproto", seed: int = DEFAULT_SEED) -> Any:
    """LlamaForCausalLM in ``shape`` with weights drawn from ``seed`` (or the checkpoint at
    ``path``), in eval mode, with ``attn`` as its attention implementation."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: PLC0415

    from . import transformers as ap_hf  # noqa: PLC0415

    if attn not in ATTN_IMPLS:
        raise ValueError(f"attn: expected one of {', '.join(ATTN_IMPLS)}, got {attn!r}")
    ap_hf.register()
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
        return model.eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config_of(shape))
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def weight_bytes(model: Any) -> int:
    """Bytes of the parameters a decode step reads (embedding rows aside: one per token)."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - emb.numel() * emb.element_size()


def kv_bytes(config: Any, batch: int, context: int, element_bytes: int) -> int:
    """K and V bytes of ``batch`` sequences of ``context`` tokens over every layer."""
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 2 * config.num_hidden_layers * batch * context * config.num_key_value_heads * head_dim * element_bytes


class GraphDecoder:
    """Greedy decode through a PagedKVCache: one step is ``model(token, positions = the cache's
    device lengths)`` then argmax into the same token buffer, so the step reads and writes only
    device state and replays from one CUDA graph (``graph=True``, CUDA only) or runs eagerly."""

    def __init__(self, model: Any, cache: Any, tokens: torch.Tensor, *, graph: bool = False):
        if tokens.dim() != 1 or tokens.shape[0] != cache.num_seqs:
            raise ValueError(f"tokens: expected [batch={cache.num_seqs}], got shape {tuple(tokens.shape)}")
        self.model, self.cache = model, cache
        self.ids = tokens.to(torch.long).clone()[:, None]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._ready: List[torch.Tensor] = []   # the capture's warm-up step's token, handed out first
        if graph:
            if not self.ids.is_cuda:
                raise ValueError("graph: CUDA-graph capture needs the model on a CUDA device")
            self._capture()

    def _step(self) -> None:
        pos = self.cache.context_lens().to(torch.long)[:, None]
        logits = self.model(input_ids=self.ids, position_ids=pos, past_key_values=self.cache, use_cache=True).logits
        self.ids.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self._step()                  # warm-up: a real step (kernels compiled, workspaces sized)
        torch.cuda.current_stream().wait_stream(side)
        self._ready.append(self.ids.clone())
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._step()                  # recorded, not run: its host-side count is undone below
        self.cache.advance(-1)

    def step(self) -> torch.Tensor:
        """One decode step; returns the token buffer [B, 1] (the next input)."""
        if self._ready:
            return self._ready.pop()
        if self.cache.layers[0].length + 1 > self.cache.max_cache_len:
            raise ValueError(f"steps: the cache is full (max_cache_len {self.cache.max_cache_len})")
        if self.graph is not None:
            self.graph.replay()
            self.cache.advance(1)
        else:
            with torch.no_grad():
                self._step()
        return self.ids

    def run(self, steps: int) -> torch.Tensor:
        """``steps`` greedy steps; the tokens [B, steps]."""
        out: List[torch.Tensor] = []
        for _ in range(steps):
            out.append(self.step().clone())
        return torch.cat(out, dim=1)


__all__ = ["ATTN_IMPLS", "GraphDecoder", "SHAPES", "build_model", "config_of", "kv_bytes", "weight_bytes"]
