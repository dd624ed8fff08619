"""``attnproto generate``: greedy generation with one attention implementation, a progress bar,
and the prefill time and decode tokens/s at the end.

attnproto: the prompt through the model into a :class:`.paged_cache.PagedKVCache`, then the
decode step of :class:`.models.GraphDecoder` (captured in a CUDA graph on CUDA, eager on CPU).
Every other implementation: transformers' ``generate`` (its own cache), the bar moved by a
stopping criterion that never stops.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import models as M

MS_PER_S = 1e3


@dataclass(frozen=True)
class GenerateResult:
    tokens: Any                 # [B, new_tokens]
    prefill_ms: float
    decode_ms: float            # the steps after the first token
    batch: int
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return self.batch * steps / (self.decode_ms / MS_PER_S) if steps > 0 and self.decode_ms > 0 else 0.0


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generate(model: Any, ids: torch.Tensor, new_tokens: int, attn: str, *, graph: Optional[bool] = None,
             block_size: int = 16, on_token: Callable[[], None] = lambda: None) -> GenerateResult:
    """Greedy ``new_tokens`` tokens after ``ids`` [B, N] (timed on the host, device-synchronised)."""
    from .paged_cache import PagedKVCache  # noqa: PLC0415

    if new_tokens < 1:
        raise ValueError(f"new_tokens: expected >= 1, got {new_tokens}")
    batch, n = ids.shape
    model.set_attn_implementation(attn)
    _sync(ids.device)
    t0 = time.perf_counter()
    if attn == "attnproto":
        cache = PagedKVCache(model.config, batch_size=batch, max_cache_len=n + new_tokens, block_size=block_size)
        with torch.no_grad():
            first = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(dim=-1)
        _sync(ids.device)
        t1 = time.perf_counter()
        on_token()
        dec = M.GraphDecoder(model, cache, first, graph=ids.is_cuda if graph is None else graph)
        out = [first[:, None]]
        for _ in range(new_tokens - 1):
            out.append(dec.step().clone())
            on_token()
        _sync(ids.device)
        t2 = time.perf_counter()
        return GenerateResult(torch.cat(out, dim=1), (t1 - t0) * MS_PER_S, (t2 - t1) * MS_PER_S, batch, new_tokens)
    from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: PLC0415

    marks = []

    class _Tick(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            _sync(ids.device)
            marks.append(time.perf_counter())
            on_token()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    mask = torch.ones_like(ids)
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, stopping_criteria=StoppingCriteriaList([_Tick()]))
    _sync(ids.device)
    t2 = time.perf_counter()
    first = marks[0] if marks else t2
    return GenerateResult(seq[:, n:], (first - t0) * MS_PER_S, (t2 - first) * MS_PER_S, batch, new_tokens)


def main(args: Any) -> int:
    """The CLI command (arguments: model, shape, prompt_len, new_tokens, batch, attn, device, dtype, seed)."""
    from ..report import progress_bar  # noqa: PLC0415

    dtype = getattr(torch, args.dtype)
    model = M.build_model(shape=args.shape, path=args.model, dtype=dtype, device=args.device, attn=args.attn,
                          seed=args.seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(args.device)
    bar = progress_bar(total=args.new_tokens, desc=f"generate[{args.attn}]")
    res = generate(model, ids, args.new_tokens, args.attn, on_token=lambda: bar.update(1))
    bar.close()
    print(f"prefill {res.prefill_ms:.1f} ms (batch {res.batch}, prompt {args.prompt_len}); decode "
          f"{res.decode_ms / max(res.new_tokens - 1, 1):.2f} ms/step, {res.tokens_per_s:.0f} tokens/s "
          f"({args.attn}, {args.device}, {args.dtype})")
    return 0


__all__ = ["GenerateResult", "generate", "main"]
