"""HARNESS, not Metal: the numpy stand-in of the linear-attention kernels for the Linux tests.

``FakeLinearMetal`` extends the paged harness (flash, rope, paged kernels) with linear_chunk_h and
linear_chunk_o: each launch checks the kernels' launch contract (grid, threads, threadgroup
memory, params against the function constants), reads its buffers through the AttentionParams
strides and the contiguous states layout, and computes with attnproto.cpu (float32). It exercises
the Python plumbing of attnproto.ops.metal_linear and the proto6 Metal sweep, not the MSL.
"""
from __future__ import annotations

import math

import numpy as np
from metal_paged_fake import FakePagedMetal

from attnproto import cpu, metal_linear_specs, metal_specs

_DTYPE_NAMES = {v: k for k, v in metal_specs.DTYPE_CODES.items()}


class FakeLinearMetal(FakePagedMetal):
    """HARNESS: every Metal kernel attnproto dispatches, computed on the CPU."""

    def launch(self, kernel, grid, block, args, shared_bytes=0):
        if kernel.name not in (metal_linear_specs.CHUNK_H_KERNEL, metal_linear_specs.CHUNK_O_KERNEL):
            return super().launch(kernel, grid, block, args, shared_bytes)
        self.launches.append((kernel.name, dict(kernel.constants), tuple(grid), tuple(block), shared_bytes))
        p, c = args[0], kernel.constants
        b, h, n, d = (int(p[f]) for f in ("batch", "num_heads", "seq_q", "head_dim"))
        chunk, name = c["CHUNK_SIZE"], _DTYPE_NAMES[c["DTYPE"]]
        assert c["HEAD_DIM"] == d and int(p["chunk_size"]) == chunk
        states_shape = (b, h, math.ceil(n / chunk), d, d)
        if kernel.name == metal_linear_specs.CHUNK_H_KERNEL:
            assert tuple(grid) == (d // metal_linear_specs.H_COLS, b * h, 1)
            assert tuple(block) == (metal_linear_specs.chunk_h_threads(d), 1, 1)
            assert shared_bytes >= metal_linear_specs.chunk_h_threadgroup_bytes(d, name)
            k, _ = self._elements(args[1], c["DTYPE"], (b, h, n, d), list(p["k_stride"]) + [1])
            v, _ = self._elements(args[2], c["DTYPE"], (b, h, n, d), list(p["v_stride"]) + [1])
            states = cpu.linear_chunk_h(k, v, chunk_size=chunk)
            args[3].data[:states.nbytes] = np.ascontiguousarray(states, np.float32).reshape(-1).view(np.uint8)
            return None
        assert tuple(grid) == (math.ceil(n / metal_linear_specs.O_ROWS), b * h, 1)
        assert tuple(block) == (metal_linear_specs.chunk_o_threads(), 1, 1)
        assert shared_bytes >= metal_linear_specs.chunk_o_threadgroup_bytes(d, name)
        q, _ = self._elements(args[1], c["DTYPE"], (b, h, n, d), list(p["q_stride"]) + [1])
        k, _ = self._elements(args[2], c["DTYPE"], (b, h, n, d), list(p["k_stride"]) + [1])
        v, _ = self._elements(args[3], c["DTYPE"], (b, h, n, d), list(p["v_stride"]) + [1])
        states = args[4].data.view(np.float32)[:math.prod(states_shape)].reshape(states_shape)
        o = cpu.linear_chunk_o(q, k, v, states, chunk_size=chunk, scale=float(p["scale"]))
        self._store(args[5], o, name, (b, h, n, d), list(p["o_stride"]) + [1])
        return None
