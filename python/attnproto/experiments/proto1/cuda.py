"""Prototype 1 on CUDA: the FA3 setting, torch SDPA (flash, cuDNN) and compiled
flex_attention as anchors on the same inputs, full-size outputs compared with cuDNN's."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ... import lab
from ...ops.problem import DeviceSpec
from ..registry import ExperimentContext
from . import common as C
from .sweep import Bench

# torch.Generator.manual_seed takes a 64-bit seed; a point's seed is drawn below 2**63.
TORCH_SEED_BOUND = 2**63
# NVML's and nvidia-smi's spelling of a GPU UUID (attnproto.shard.gpu_identity writes it so).
GPU_UUID_PREFIX = "GPU-"


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _sdpa(q, k, v, causal: bool, backend) -> Callable[[], Any]:
    import torch.nn.functional as F  # noqa: PLC0415, N812
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def _anchor_fns(be: Any, iters: int):
    def anchors(q, k, v, causal: bool, head_dim: int, seq: int) -> dict[str, Any]:
        """name -> time() -> TimingStats, or a string saying why it is unavailable."""
        import torch  # noqa: PLC0415

        try:
            from torch.nn.attention import SDPBackend  # noqa: PLC0415
        except ImportError as exc:
            return {name: str(exc) for name in ("sdpa_flash", "sdpa_cudnn", "flex")}
        out: dict[str, Any] = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            fn = _sdpa(q, k, v, causal, backend)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - reported as unavailable in the table
                out[name] = _reason(exc)
                continue
            out[name] = lambda fn=fn: lab.time_device(be, fn, warmup=C.WARMUP, iters=iters, flush_l2=C.FLUSH_L2)
        if seq in C.FLEX_SEQ_LENS and head_dim in C.FLEX_HEAD_DIMS:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

                # A fresh compile cache per shape: past torch._dynamo's recompile limit, flex_attention
                # silently falls back to its unfused eager path, which is not the anchor we mean.
                torch._dynamo.reset()
                compiled = torch.compile(flex_attention, dynamic=False)
                mask = None
                if causal:
                    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device="cuda")
                compiled(q, k, v, block_mask=mask)
                torch.cuda.synchronize()
                out["flex"] = lambda: lab.time_device(be, lambda: compiled(q, k, v, block_mask=mask),
                                                      warmup=C.WARMUP, iters=iters, flush_l2=C.FLUSH_L2)
            except Exception as exc:  # noqa: BLE001
                out["flex"] = _reason(exc)
        else:
            out["flex"] = f"not run at N={seq}, D={head_dim} (compiles per shape; run at N in {C.FLEX_SEQ_LENS})"
        return out
    return anchors


def _reference(q, k, v, causal: bool):
    """cuDNN's output, else SDPA flash's (the full-size check's reference)."""
    from torch.nn.attention import SDPBackend  # noqa: PLC0415

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            return _sdpa(q, k, v, causal, backend)()
        except Exception:  # noqa: BLE001, S112 - try the next backend
            continue
    return None


def _full_check(o, reference) -> tuple[bool, float, str]:
    if reference is None:
        return True, float("nan"), ""
    diff = float((o.float() - reference.float()).abs().max())
    if not diff <= C.FULL_SIZE_DIFF:
        return False, diff, f"full-size output differs from SDPA's by {diff:.3g} (> {C.FULL_SIZE_DIFF})"
    return True, diff, ""


def _resources(launch: Any) -> dict[str, float]:
    res = launch.kernel.resources
    return {"registers_regs": float(res["registers"]), "local_bytes": float(res["local_bytes"]),
            "smem_bytes": float(launch.shared_bytes + res["static_shared_bytes"])}


def bench(ctx: ExperimentContext) -> Bench:
    import torch  # noqa: PLC0415

    from ... import backend as backend_mod  # noqa: PLC0415

    be = backend_mod.get("cuda")
    iters = C.QUICK_ITERS if ctx.quick else C.ITERS
    gpu_uuid = (ctx.gpu or {}).get("uuid", "")

    def inputs(rng, batch: int, heads: int, seq: int, head_dim: int):
        """Drawn by a torch generator seeded from the point's numpy generator: the same inputs
        for the point on whichever GPU it runs."""
        gen = torch.Generator(device="cuda").manual_seed(int(rng.integers(TORCH_SEED_BOUND)))
        return tuple(torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(3))

    return Bench(backend="cuda", device=DeviceSpec.from_backend(be), backend_obj=be, dtype=C.DTYPE,
                 head_dims=C.QUICK_HEAD_DIMS if ctx.quick else C.HEAD_DIMS,
                 seq_lens=C.QUICK_SEQ_LENS if ctx.quick else C.SEQ_LENS, iters=iters, problem=C.problem,
                 inputs=inputs, anchors=_anchor_fns(be, iters), reference=_reference, full_check=_full_check,
                 extra_metrics=_resources, release=torch.cuda.empty_cache,
                 clocks=lab.sm_clock_reader(gpu_uuid if gpu_uuid.startswith(GPU_UUID_PREFIX) else None))
