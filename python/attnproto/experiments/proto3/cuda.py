"""Prototype 3 on CUDA: our paged decode against torch's decode paths on the same KV, in one run.

Per point (batch, heads, context, block size): K/V random bf16, written into a scattered pool
(NaN never: every slot a sequence uses holds its token); timings by CUDA events (the project's
timer); bandwidth = K + V bytes read / time, against a pure-read ceiling measured first."""
from __future__ import annotations

from typing import Any, Callable

from ... import lab
from ...ops import paged
from ...ops.families import paged_decode as fam
from ..registry import ExperimentContext, ExperimentError
from . import common as C


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def make_pool(k: Any, v: Any, block_size: int, scatter: bool, gen: Any):
    """Contiguous K/V [B, Hkv, N, D] -> (k_cache, v_cache [blocks, bs, Hkv, D], table [B, nblk], lens [B])."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415

    b, h, n, d = k.shape
    nblk = -(-n // block_size)
    ids = (torch.randperm(b * nblk, generator=gen, device="cpu") if scatter else torch.arange(b * nblk)).to(k.device)
    pools = []
    for x in (k, v):
        x = F.pad(x, (0, 0, 0, nblk * block_size - n))
        x = x.view(b, h, nblk, block_size, d).permute(0, 2, 3, 1, 4).reshape(b * nblk, block_size, h, d)
        pool = torch.empty_like(x)
        pool[ids] = x
        pools.append(pool)
    table = ids.view(b, nblk).to(torch.int32).contiguous()
    lens = torch.full((b,), n, dtype=torch.int32, device=k.device)
    return pools[0], pools[1], table, lens


def _sdpa(q, k, v, backend=None) -> Callable[[], Any]:
    import torch.nn.functional as F  # noqa: N812, PLC0415
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    gqa = q.shape[1] != k.shape[1]
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return run


def _gather_sdpa(q, kc, vc, table, n: int) -> Callable[[], Any]:
    """What a user without a paged kernel does each step: gather the pages, then SDPA."""
    import torch.nn.functional as F  # noqa: N812, PLC0415

    b, hkv, d = q.shape[0], kc.shape[2], kc.shape[3]

    def run():
        kg = kc[table].reshape(b, -1, hkv, d)[:, :n].transpose(1, 2)
        vg = vc[table].reshape(b, -1, hkv, d)[:, :n].transpose(1, 2)
        return F.scaled_dot_product_attention(q, kg, vg, enable_gqa=q.shape[1] != hkv)
    return run


class Runner:
    """Times things on one GPU and turns them into records."""

    def __init__(self, ctx: ExperimentContext):
        import torch  # noqa: PLC0415

        from ... import backend as backend_mod  # noqa: PLC0415

        self.ctx = ctx
        self.be = backend_mod.get("cuda")
        self.iters = C.QUICK_ITERS if ctx.quick else C.ITERS
        self.gen = torch.Generator(device="cpu").manual_seed(int(ctx.rng.integers(2**31)))
        self.records: list[dict[str, Any]] = []
        self.notes: dict[str, str] = {}
        self.ceiling_tbs = 0.0
        self.clock = lab.sm_clock_reader()

    def write_notes(self) -> None:
        """Anchors that could not run, and why: notes.json beside the records."""
        import json  # noqa: PLC0415

        (self.ctx.out_dir / "notes.json").write_text(json.dumps(self.notes, indent=1, sort_keys=True) + "\n")
        for what, why in sorted(self.notes.items()):
            print(f"proto3: {what} not measured: {why}", flush=True)

    def time(self, fn: Callable[[], Any]) -> lab.TimingStats:
        fn()
        return lab.time_device(self.be, fn, warmup=C.WARMUP, iters=self.iters)

    def record(self, kernel: str, sweep: str, b: int, hq: int, hkv: int, n: int, bs: int, timing: lab.TimingStats,
               tile: str = "", **extra: float) -> dict[str, Any]:
        sec = timing.median_ms / 1e3
        metrics = {"time_us": timing.median_ms * 1e3, "bandwidth_tbps": C.kv_bytes(b, hkv, n) / sec / 1e12}
        if self.ceiling_tbs:
            metrics["of_ceiling_ratio"] = metrics["bandwidth_tbps"] / self.ceiling_tbs
        metrics.update({k: float(v) for k, v in extra.items()})
        metrics.update(self.clock())
        config = {"kernel": kernel, "sweep": sweep, "batch": b, "num_heads": hq, "num_kv_heads": hkv,
                  "head_dim": C.HEAD_DIM, "context": n, "block_size": bs, "dtype": C.SWEEP_DTYPE}
        if tile:
            config["tile"] = tile
        rec = self.ctx.record(config, metrics, timing)
        self.records.append(rec)
        return rec

    def read_ceiling(self) -> dict[str, Any]:
        """The best pure read of CEILING_BYTES (shaders/cuda/read_ceiling.cu) over a few grids:
        what a decode step, which only reads K and V, can reach at best."""
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        buf = torch.randint(0, 2**31 - 1, (C.CEILING_BYTES // 4,), dtype=torch.int32, device="cuda")
        sink = torch.zeros(1, dtype=torch.int32, device="cuda")
        kern = self.be.kernel(paged.READ_CEILING_KERNEL, UNROLL=paged.READ_CEILING_UNROLL)
        sms = int(self.be.info.get("multiprocessors", 1))
        args = [buf, np.uint64(C.CEILING_BYTES // 16), np.uint32(C.CEILING_SENTINEL), sink]
        best = None
        for per_sm in C.CEILING_CTAS_PER_SM:
            t = lab.from_native(self.be.time_launch(kern, (sms * per_sm, 1, 1), (C.CEILING_THREADS, 1, 1), args,
                                                    warmup=C.WARMUP, iters=self.iters))
            if best is None or t.median_ms < best[0].median_ms:
                best = (t, per_sm)
        t, per_sm = best
        self.ceiling_tbs = C.CEILING_BYTES / (t.median_ms / 1e3) / 1e12
        config = {"kernel": C.CEILING, "sweep": "ceiling", "bytes": C.CEILING_BYTES}
        rec = self.ctx.record(config, {"bandwidth_tbps": self.ceiling_tbs, "time_us": t.median_ms * 1e3,
                                       "ctas_per_sm_count": per_sm}, t)
        self.records.append(rec)
        del buf
        return rec


def _inputs(run: Runner, b: int, hq: int, hkv: int, n: int):
    import torch  # noqa: PLC0415

    dt = getattr(torch, C.SWEEP_DTYPE)
    q = torch.randn(b, hq, 1, C.HEAD_DIM, device="cuda", dtype=dt)
    k = torch.randn(b, hkv, n, C.HEAD_DIM, device="cuda", dtype=dt)
    v = torch.randn(b, hkv, n, C.HEAD_DIM, device="cuda", dtype=dt)
    return q, k, v


def _check_full(o: Any, want: Any, what: str) -> float:
    diff = float((o.float() - want.float()).abs().max())
    if not diff <= C.FULL_SIZE_DIFF:
        raise ExperimentError(f"proto3 {what}: output differs from cuDNN's by {diff:.3g} (> {C.FULL_SIZE_DIFF})")
    return diff


def point(run: Runner, sweep: str, b: int, hq: int, hkv: int, n: int, bs: int, *, anchors: bool,
          identity: bool = False, unpacked: bool = False, flex: bool = False) -> None:
    """Ours (and optionally its identity-table, contiguous-policy and unpacked forms) at one point,
    with torch's anchors on the same K/V."""
    import torch  # noqa: PLC0415
    from torch.nn.attention import SDPBackend  # noqa: PLC0415

    q, k, v = _inputs(run, b, hq, hkv, n)
    kc, vc, table, lens = make_pool(k, v, bs, True, run.gen)
    plan = paged.prepare_paged_decode(q, kc, vc, table, lens)
    plan.launch()
    want = _sdpa(q, k, v)()
    diff = _check_full(plan.out, want, f"B={b} H={hq}/{hkv} N={n} bs={bs}")
    res = plan.resources
    run.record(C.OURS, sweep, b, hq, hkv, n, bs, plan.time(C.WARMUP, run.iters), max_diff_err=diff,
               partitions_count=plan.num_partitions, heads_per_cta_count=plan.config.heads, registers_regs=res["registers"],
               smem_bytes=plan.launches[0].shared_bytes)
    if identity:
        ki, vi, ti, li = make_pool(k, v, bs, False, run.gen)
        ip = paged.prepare_paged_decode(q, ki, vi, ti, li)
        run.record(C.OURS_IDENTITY, sweep, b, hq, hkv, n, bs, ip.time(C.WARMUP, run.iters))
        del ki, vi
        cp = paged.prepare_contiguous_decode(q, k, v, lens)
        run.record(C.OURS_CONTIGUOUS, sweep, b, hq, hkv, n, 0, cp.time(C.WARMUP, run.iters))
    if unpacked:
        up = paged.prepare_paged_decode(q, kc, vc, table, lens, packed=False)
        run.record(C.OURS_UNPACKED, sweep, b, hq, hkv, n, bs, up.time(C.WARMUP, run.iters),
                   partitions_count=up.num_partitions)
    if anchors:
        for name, backend in ((C.CUDNN, SDPBackend.CUDNN_ATTENTION), (C.FLASH, SDPBackend.FLASH_ATTENTION)):
            try:
                t = run.time(_sdpa(q, k, v, backend))
            except Exception as exc:  # noqa: BLE001 - reported in the notes, not hidden
                run.notes[f"{name} B={b} N={n} H={hq}/{hkv}"] = _reason(exc)
                continue
            run.record(name, sweep, b, hq, hkv, n, 0, t)
        try:
            run.record(C.GATHER, sweep, b, hq, hkv, n, bs, run.time(_gather_sdpa(q, kc, vc, table, n)))
        except Exception as exc:  # noqa: BLE001
            run.notes[f"{C.GATHER} B={b} N={n} bs={bs}"] = _reason(exc)
    if flex:
        from .flex import flex_paged  # noqa: PLC0415

        try:
            fn, choice = flex_paged(q, k, v, bs)
            run.record(C.FLEX, sweep, b, hq, hkv, n, bs, run.time(fn), tile=f"flex {choice}")
        except Exception as exc:  # noqa: BLE001
            run.notes[f"{C.FLEX} B={b} N={n} bs={bs}"] = _reason(exc)
    del q, k, v, kc, vc
    torch.cuda.empty_cache()


def split_sweep(run: Runner, b: int, n: int) -> None:
    """The partition count at a batch too small to fill the GPU: auto's choice and every fixed one."""
    q, k, v = _inputs(run, b, *C.MAIN_HEADS, n)
    kc, vc, table, lens = make_pool(k, v, C.MAIN_BLOCK, True, run.gen)
    hq, hkv = C.MAIN_HEADS
    for parts in ("auto",) + C.SPLIT_PARTITIONS:
        plan = paged.prepare_paged_decode(q, kc, vc, table, lens, num_partitions=parts)
        name = C.OURS if parts == "auto" else f"{C.OURS}_p{parts}"
        run.record(name, "split", b, hq, hkv, n, C.MAIN_BLOCK, plan.time(C.WARMUP, run.iters),
                   partitions_count=plan.num_partitions)
    from torch.nn.attention import SDPBackend  # noqa: PLC0415

    run.record(C.CUDNN, "split", b, hq, hkv, n, 0, run.time(_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)))


def tile_sweep(run: Runner, n: int, b: int = C.MAIN_BATCH, blocks: tuple = C.TILE_BLOCKS) -> None:
    """Every legal decode tile of C.TILES on the same K/V, paged (block 16) and contiguous."""
    q, k, v = _inputs(run, b, *C.MAIN_HEADS, n)
    hq, hkv = C.MAIN_HEADS
    heads = fam.choose_config(C.HEAD_DIM, 1, hq // hkv)[0].heads
    pools = {bs: make_pool(k, v, bs, True, run.gen) for bs in blocks if bs}
    lens = next(iter(pools.values()))[3]
    for warps, kpw, stages in C.TILES:
        cfg = fam.DecodeConfig(heads=heads, warps=warps, keys_per_warp=kpw, stages=stages)
        if not fam.legal(cfg, C.HEAD_DIM, 1, hq // hkv)[0]:
            continue
        for bs in blocks:
            plan = (paged.prepare_contiguous_decode(q, k, v, lens, config=cfg) if bs == 0
                    else paged.prepare_paged_decode(q, *pools[bs][:3], pools[bs][3], config=cfg))
            run.record(f"{C.OURS}_tile", "tile", b, hq, hkv, n, bs, plan.time(C.WARMUP, run.iters),
                       tile=cfg.label(), warps_count=warps, keys_per_warp_count=kpw, stages_count=stages,
                       partitions_count=plan.num_partitions, registers_regs=plan.resources["registers"],
                       smem_bytes=plan.launches[0].shared_bytes)


def budget_map(run: Runner) -> list[dict[str, Any]]:
    """Shared memory and registers of the compiled decode kernel per block size x D (main shape)."""
    import torch  # noqa: PLC0415

    rows = []
    hq, hkv = C.MAIN_HEADS
    for d in (64, 128, 256):
        for bs in C.BLOCK_SIZES:
            q = torch.zeros(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            kc = torch.zeros(4, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
            table = torch.zeros(1, 4, dtype=torch.int32, device="cuda")
            lens = torch.ones(1, dtype=torch.int32, device="cuda")
            plan = paged.prepare_paged_decode(q, kc, kc, table, lens, num_partitions=1)
            res = plan.resources
            rows.append({"head_dim": d, "block_size": bs, "smem_bytes": plan.launches[0].shared_bytes
                         + res["static_shared_bytes"], "registers": res["registers"], "heads": plan.config.heads})
    return rows


def run_points(run: Runner) -> None:
    quick = run.ctx.quick
    jobs: list[tuple[str, tuple, dict]] = []
    for n in (C.QUICK_CONTEXTS[-1:] if quick else C.BLOCK_SWEEP_CONTEXTS):
        for bs in ((1, 16) if quick else C.BLOCK_SIZES):
            jobs.append(("block", (C.MAIN_BATCH, *C.MAIN_HEADS, n, bs),
                         {"anchors": bs == C.MAIN_BLOCK, "identity": True,
                          "flex": (C.MAIN_BATCH, n, bs) in C.FLEX_POINTS}))
    for hq, hkv in C.HEAD_CONFIGS:
        for n in (C.QUICK_CONTEXTS if quick else C.CONTEXTS):
            for b in (C.QUICK_BATCHES if quick else C.BATCHES):
                if C.kv_bytes(b, hkv, n) > C.MAX_KV_BYTES:
                    continue
                if (hq, hkv) == C.MAIN_HEADS and b == C.MAIN_BATCH and n in C.BLOCK_SWEEP_CONTEXTS:
                    continue  # measured in the block sweep
                jobs.append(("scale", (b, hq, hkv, n, C.MAIN_BLOCK), {"anchors": True}))
    for hq, hkv in ((32, 8), (64, 8)):
        for n in (C.QUICK_CONTEXTS[-1:] if quick else C.PACK_CONTEXTS):
            jobs.append(("pack", (C.MAIN_BATCH, hq, hkv, n, C.MAIN_BLOCK), {"anchors": False, "unpacked": True}))
    for sweep, args, kw in run.ctx.progress(jobs, desc="proto3[cuda]"):
        point(run, sweep, *args, **kw)
    for n in (C.QUICK_CONTEXTS[-1:] if quick else C.TILE_CONTEXTS):
        tile_sweep(run, n)
    if not quick:  # the split regime: one sequence, the context cut into partitions
        tile_sweep(run, C.SPLIT_CONTEXT, b=C.SPLIT_BATCHES[0], blocks=(C.MAIN_BLOCK,))
    for b, n in (((1, C.QUICK_CONTEXTS[-1]),) if quick else C.SPLIT_POINTS):
        split_sweep(run, b, n)
