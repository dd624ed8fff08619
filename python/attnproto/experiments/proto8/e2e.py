"""Prototype 8 end to end: prefill latency and decode steps of a Llama for every attention
implementation, in Python (eager) mode and under CUDA graphs, with the step's floor and the
attention's share. Every point bounds its own time: skipped, with the reason recorded, when its
estimate exceeds the run's remaining budget or its KV exceeds MAX_KV_BYTES."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from ... import lab
from ...integrations import models as M
from ..registry import ExperimentContext, ExperimentError
from . import common as C


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _timer(device: str) -> Callable[[Callable[[], Any], int, int], lab.TimingStats]:
    import torch  # noqa: PLC0415

    def run(fn: Callable[[], Any], warmup: int, iters: int) -> lab.TimingStats:
        if device != "cuda":
            return lab.time_host(fn, warmup=warmup, iters=iters)
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        # a model step or forward: hundreds of launches per sample, not one dispatch (lab.timing)
        return lab.timing(samples, clock="device", single_dispatch=False)

    return run


def _skip(ctx: ExperimentContext, config: Dict[str, Any], reason: str) -> dict:
    ctx.extras.setdefault("skipped", []).append({**config, "reason": reason})
    return {}


def prefill_points(ctx: ExperimentContext, model: Any, impls, lens, device: str, budget: Budget) -> List[dict]:
    import torch  # noqa: PLC0415

    from ...integrations.paged_cache import PagedKVCache  # noqa: PLC0415

    timer = _timer(device)
    rows = []
    vocab = model.config.vocab_size
    for n in ctx.progress(lens, desc="proto8 prefill"):
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        for impl in impls:
            cfg = {"sweep": "prefill", "impl": impl, "batch": 1, "prompt": n}
            if impl in C.COMPILING_IMPLS and not ctx.extras.get("full"):
                _skip(ctx, cfg, "compiles per shape; run with --full")
                continue
            if budget.left() <= 0:
                _skip(ctx, cfg, "run budget spent")
                continue
            model.set_attn_implementation(impl)

            def fwd() -> None:
                cache = (PagedKVCache(model.config, batch_size=1, max_cache_len=n, block_size=C.BLOCK_SIZE)
                         if impl == "attnproto" else None)
                with torch.no_grad():
                    model(ids, past_key_values=cache, use_cache=cache is not None)

            try:
                t = timer(fwd, C.PREFILL_WARMUP, C.PREFILL_ITERS)
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory: recorded, not fatal
                _skip(ctx, cfg, f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.append(ctx.record(cfg, {"prefill_ms": t.median_ms}, t))
    return rows


def _filled_hf_cache(model: Any, batch: int, context: int, kind: str, device: str) -> Any:
    import torch  # noqa: PLC0415
    from transformers import DynamicCache, StaticCache  # noqa: PLC0415

    cfg = model.config
    dtype = next(model.parameters()).dtype
    d = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    cache = (StaticCache(config=cfg, max_cache_len=context + C.FULL_DECODE_ITERS + C.DECODE_WARMUP + 2)
             if kind == "static" else DynamicCache(config=cfg))
    g = torch.Generator(device=device).manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, context, d, generator=g, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def _decode_fn(model: Any, impl: str, batch: int, context: int, device: str, graph: bool) -> Callable[[], Any]:
    """A callable running one decode step at ``context`` (the cache filled with random K/V)."""
    import torch  # noqa: PLC0415

    from ...integrations.paged_cache import PagedKVCache  # noqa: PLC0415

    model.set_attn_implementation(impl)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    d = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    steps = C.FULL_DECODE_ITERS + C.DECODE_WARMUP + 2
    if impl == "attnproto":
        cache = PagedKVCache(cfg, batch_size=batch, max_cache_len=context + steps, block_size=C.BLOCK_SIZE)
        cache.fill_random(context, dtype=dtype, device=device, head_dim=d, kv_heads=cfg.num_key_value_heads)
        dec = M.GraphDecoder(model, cache, tokens, graph=graph)
        return dec.step
    cache = _filled_hf_cache(model, batch, context, "static" if graph else "dynamic", device)
    ids = tokens[:, None].clone()
    pos = torch.full((batch, 1), context, dtype=torch.long, device=device)

    def step() -> None:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
        ids.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        pos.add_(1)

    if not graph:
        return step
    return lab.capture_cuda_graph(step).replay


def read_bandwidth(device: str) -> Optional[Dict[str, Any]]:
    """Bytes/s of a device-to-device copy (read + write counted) of COPY_BYTES."""
    if device != "cuda":
        return None
    import torch  # noqa: PLC0415

    src = torch.empty(C.COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _timer(device)(lambda: dst.copy_(src), 2, 10)
    return {"bytes_per_s": 2 * C.COPY_BYTES / (t.median_ms / 1e3), "timing": t}


def attention_ms(model: Any, batch: int, context: int, device: str) -> Optional[float]:
    """Our append + paged decode of one layer (device-timed), times the layers."""
    if device != "cuda":
        return None
    import torch  # noqa: PLC0415

    from ...ops import paged  # noqa: PLC0415

    cfg = model.config
    d = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    dtype = next(model.parameters()).dtype
    nb = batch * -(-(context + 1) // C.BLOCK_SIZE)
    kc = torch.randn(nb, C.BLOCK_SIZE, cfg.num_key_value_heads, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    table = torch.randperm(nb, device=device).to(torch.int32).view(batch, -1).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, cfg.num_attention_heads, d, device=device, dtype=dtype)
    kn = torch.randn(batch, cfg.num_key_value_heads, 1, d, device=device, dtype=dtype)
    dec = paged.prepare_paged_decode(q, kc, vc, table, lens).time().median_ms
    app = paged.prepare_append_kv(kn, kn, kc, vc, table, lens - 1).time().median_ms
    return cfg.num_hidden_layers * (dec + app)


def decode_points(ctx: ExperimentContext, model: Any, impls, points, device: str, budget: Budget,
                  graphs: bool) -> List[dict]:
    import torch  # noqa: PLC0415

    timer = _timer(device)
    bw = read_bandwidth(device)
    rows = []
    elem = next(model.parameters()).element_size()
    wbytes = M.weight_bytes(model)
    iters = C.FULL_DECODE_ITERS if ctx.extras.get("full") else C.DECODE_ITERS
    modes = (False, True) if graphs else (False,)
    for batch, context in ctx.progress(points, desc="proto8 decode"):
        kv = M.kv_bytes(model.config, batch, context, elem)
        attn_ms = attention_ms(model, batch, context, device)
        for impl in impls:
            for graph in modes:
                cfg = {"sweep": "decode", "impl": impl, "batch": batch, "context": context,
                       "cuda_graph": graph}
                if impl in C.COMPILING_IMPLS and not ctx.extras.get("full"):
                    _skip(ctx, cfg, "compiles per shape; run with --full")
                    continue
                if kv > C.MAX_KV_BYTES:
                    _skip(ctx, cfg, f"KV {kv} bytes exceed MAX_KV_BYTES")
                    continue
                if budget.left() <= 0:
                    _skip(ctx, cfg, "run budget spent")
                    continue
                fn = None
                try:
                    fn = _decode_fn(model, impl, batch, context, device, graph)
                    t = timer(fn, C.DECODE_WARMUP, iters)
                except (RuntimeError, ValueError, TypeError) as exc:  # capture refused, OOM: recorded
                    _skip(ctx, cfg, f"{type(exc).__name__}: {str(exc)[:200]}")
                    continue
                finally:
                    fn = None             # the cache (and a graph's pool) go before the next point's
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                m = {"step_ms": t.median_ms, "tokens_per_s": batch / (t.median_ms / 1e3),
                     "weight_bytes": float(wbytes), "kv_bytes": float(kv)}
                if bw is not None:
                    floor = (wbytes + kv) / bw["bytes_per_s"] * 1e3
                    m.update(floor_ms=floor, floor_ratio=floor / t.median_ms, read_bytes_per_s=bw["bytes_per_s"])
                if attn_ms is not None and impl == "attnproto":
                    m.update(attention_ms=attn_ms, attention_ratio=attn_ms / t.median_ms)
                rows.append(ctx.record(cfg, m, t))
    return rows


def check_tokens(model: Any, device: str, steps: int) -> None:
    """Our paged decode's greedy tokens equal transformers' eager attention's (float32 CPU path)."""
    import torch  # noqa: PLC0415

    from ...integrations.generate import generate  # noqa: PLC0415

    ids = torch.randint(0, model.config.vocab_size, (C.CPU_BATCH, C.CPU_PROMPT),
                        generator=torch.Generator().manual_seed(2)).to(device)
    want = generate(model, ids, steps, "eager").tokens
    got = generate(model, ids, steps, "attnproto").tokens
    if not torch.equal(want, got):
        raise ExperimentError(f"proto8: greedy tokens differ from eager attention: {got.tolist()} vs {want.tolist()}")
