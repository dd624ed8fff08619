"""The flex_attention anchor over a paged cache: torch's own paged-attention helper
(torch.nn.attention.experimental._paged_attention.PagedAttention) fills its page pool, and a
compiled flex_attention runs with the logical block mask converted to physical pages.

Inductor may find no kernel for the decoding template at a shape (the first H200 runs: "No
choices exist for backend"); the anchor then retries with flex_attention's main kernel
(kernel option FORCE_USE_FLEX_ATTENTION) and says which one ran."""
from __future__ import annotations

from typing import Any, Callable

#: Kernel options tried in order: flex's default choice (its decoding kernel for one query
#: token), then its main kernel.
KERNEL_CHOICES = (("default", None), ("forced_flex", {"FORCE_USE_FLEX_ATTENTION": True}))


def flex_paged(q: Any, k: Any, v: Any, block_size: int) -> tuple[Callable[[], Any], str]:
    """q [B, Hq, 1, D], k/v [B, Hkv, N, D] -> (a callable running one paged decode step, which
    kernel choice compiled)."""
    import torch  # noqa: PLC0415
    from torch.nn.attention.experimental._paged_attention import PagedAttention  # noqa: PLC0415
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

    b, hkv, n, d = k.shape
    pages = b * -(-n // block_size)
    pa = PagedAttention(pages, block_size, b, device="cuda")
    batch_idx = torch.arange(b, device="cuda")
    for i in range(b):  # reserve() takes one sequence at a time
        pa.reserve(torch.tensor(i, device="cuda"), torch.tensor(n, device="cuda"))
    k_cache = torch.zeros(1, hkv, pages * block_size, d, device="cuda", dtype=k.dtype)
    v_cache = torch.zeros_like(k_cache)
    pos = torch.arange(n, device="cuda").expand(b, n)
    pa.assign(batch_idx, pos, k, v, k_cache, v_cache)
    logical = create_block_mask(lambda bb, h, qi, ki: ki < n, b, None, 1, n, device="cuda",
                                BLOCK_SIZE=(block_size, block_size))
    mask = pa.convert_logical_block_mask(logical, batch_idx)
    score = pa.get_score_mod(None)
    errors = []
    for name, options in KERNEL_CHOICES:
        torch._dynamo.reset()  # a fresh compile per try (past the recompile limit flex falls back to eager)
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(compiled=compiled, options=options):
            return compiled(q, k_cache, v_cache, block_mask=mask, score_mod=score,
                            enable_gqa=q.shape[1] != hkv, kernel_options=options)
        try:
            run()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - the next choice, or the caller reports all
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        return run, name
    raise RuntimeError("; ".join(errors))
