"""HARNESS, not Metal: the numpy stand-in of the paged decode kernels for the Linux tests.

``FakePagedMetal`` extends the flash harness (test_metal_ops.FakeMetalBackend) with
paged_attention and paged_reduce: each launch checks the kernels' launch contract (grid,
threads, threadgroup memory, params against the function constants), reads its buffers the
way the MSL addresses them (AttentionParams strides, block table, context lengths, the
contiguous parts layout) and computes in float32 with numpy. It exercises the Python plumbing
of attnproto.ops.metal_paged and the proto3 Metal sweep; it verifies nothing about the MSL.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
from test_metal_ops import FakeMetalBackend

from attnproto import cpu, metal_paged_specs, metal_specs
from attnproto.ops import metal_flash

_DTYPE_NAMES = {v: k for k, v in metal_specs.DTYPE_CODES.items()}


def _decode(buf, index, dtype_name):
    return np.asarray(metal_flash.decode_elements(buf.data.view(np.uint16)[index], dtype_name), np.float32)


class FakePagedMetal(FakeMetalBackend):
    """HARNESS: flash, rope, paged_attention and paged_reduce computed on the CPU."""

    def launch(self, kernel, grid, block, args, shared_bytes=0):
        if kernel.name == metal_paged_specs.PAGED_KERNEL:
            self.launches.append((kernel.name, dict(kernel.constants), tuple(grid), tuple(block), shared_bytes))
            self._paged(args[0], kernel.constants, grid, block, shared_bytes, args[1:])
        elif kernel.name == metal_paged_specs.REDUCE_KERNEL:
            self.launches.append((kernel.name, dict(kernel.constants), tuple(grid), tuple(block), shared_bytes))
            self._reduce(args[0], kernel.constants, grid, block, shared_bytes, args[1:])
        else:
            super().launch(kernel, grid, block, args, shared_bytes)

    def _paged(self, p, c, grid, block, shared_bytes, bufs):
        b_n, hq_n, hkv_n, d = (int(p[f]) for f in ("batch", "num_heads", "num_kv_heads", "head_dim"))
        bs, part_size, group, parts = c["BLOCK_SIZE"], c["PARTITION_SIZE"], c["GQA_GROUP"], int(p["num_partitions"])
        name = _DTYPE_NAMES[c["DTYPE"]]
        assert c["HEAD_DIM"] == d and int(p["block_size"]) == bs and int(p["partition_size"]) == part_size
        assert group == hq_n // hkv_n
        assert tuple(grid) == (parts, hkv_n, b_n) and tuple(block) == (metal_paged_specs.PAGED_THREADS, 1, 1)
        assert shared_bytes >= metal_paged_specs.paged_threadgroup_bytes(d, bs, group, name)
        assert shared_bytes <= metal_specs.THREADGROUP_MEMORY_LIMIT
        qb, kb, vb, tb, lb, ob, lpb = bufs
        table = tb.data.view(np.int32).reshape(b_n, int(p["max_blocks_per_seq"]))
        assert int(p["num_blocks"]) * bs * hkv_n * d * 2 == kb.nbytes  # the pool the kernel bounds entries by
        lens = lb.data.view(np.int32)[:b_n]
        qs, ks, vs = (list(p[f]) for f in ("q_stride", "k_stride", "v_stride"))
        o_parts = ob.data.view(np.float32).reshape(b_n, hq_n, parts, d)
        lse_parts = lpb.data.view(np.float32).reshape(b_n, hq_n, parts)
        cols = np.arange(d)
        for b in range(b_n):
            for part in range(parts):
                start, end = part * part_size, min((part + 1) * part_size, int(lens[b]))
                heads = slice(0, hq_n)
                if start >= end:
                    o_parts[b, heads, part] = 0.0
                    lse_parts[b, heads, part] = -np.inf
                    continue
                tokens = np.arange(start, end)
                blocks = table[b, tokens // bs].astype(np.int64)[:, None]
                slots = (tokens % bs)[:, None]
                for kvh in range(hkv_n):
                    k = _decode(kb, blocks * ks[0] + kvh * ks[1] + slots * ks[2] + cols, name)
                    v = _decode(vb, blocks * vs[0] + kvh * vs[1] + slots * vs[2] + cols, name)
                    hs = np.arange(kvh * group, (kvh + 1) * group)
                    q = _decode(qb, b * qs[0] + hs[:, None] * qs[1] + cols, name)
                    s = (q @ k.T) * np.float32(p["scale"])
                    m = s.max(axis=1, keepdims=True)
                    w = np.exp(s - m)
                    lsum = w.sum(axis=1, keepdims=True)
                    o_parts[b, hs, part] = (w @ v) / lsum
                    lse_parts[b, hs, part] = (m + np.log(lsum))[:, 0]

    def _reduce(self, p, c, grid, block, shared_bytes, bufs):
        b_n, hq_n, d, parts = (int(p[f]) for f in ("batch", "num_heads", "head_dim", "num_partitions"))
        name = _DTYPE_NAMES[c["DTYPE"]]
        assert c["HEAD_DIM"] == d and int(p["partition_size"]) == c["PARTITION_SIZE"]
        assert tuple(grid) == (hq_n, b_n, 1) and tuple(block) == (metal_paged_specs.REDUCE_THREADS, 1, 1)
        assert shared_bytes >= metal_paged_specs.reduce_threadgroup_bytes(parts)
        ob, lpb, lb, out_b, lse_b = bufs
        o_parts = ob.data.view(np.float32).reshape(b_n, hq_n, parts, d)
        lse_parts = lpb.data.view(np.float32).reshape(b_n, hq_n, parts)
        lens = lb.data.view(np.int32)[:b_n]
        o = np.zeros((b_n, hq_n, d), np.float32)
        lse = np.full((b_n, hq_n), -np.inf, np.float32)
        for b in range(b_n):
            used = math.ceil(int(lens[b]) / c["PARTITION_SIZE"])
            if used:
                o[b], lse[b] = cpu.reduce_partitions(o_parts[b, :, :used], lse_parts[b, :, :used])
        os_, ls = list(p["o_stride"]), list(p["lse_stride"])
        self._store(out_b, o, name, (b_n, hq_n, d), [os_[0], os_[1], 1])
        lse_view = np.lib.stride_tricks.as_strided(lse_b.data.view(np.float32), shape=(b_n, hq_n),
                                                   strides=[s * 4 for s in ls])
        lse_view[...] = lse

    def time_sequence(self, launches, warmup=4, iters=50, flush_l2=False):
        for _ in range(warmup):
            for kernel, grid, block, args, shared in launches:
                self.launch(kernel, grid, block, args, shared)
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            for kernel, grid, block, args, shared in launches:
                self.launch(kernel, grid, block, args, shared)
            samples.append((time.perf_counter() - t0) * 1e3)
        arr = np.asarray(samples)
        return SimpleNamespace(median_ms=float(np.median(arr)), p10_ms=float(np.percentile(arr, 10)),
                               p90_ms=float(np.percentile(arr, 90)), mean_ms=float(arr.mean()),
                               min_ms=float(arr.min()), cv=float(arr.std(ddof=1) / arr.mean()),
                               samples_ms=samples)
