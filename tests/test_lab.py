"""The lab harness: one timer, one FP64 gate, one FLOP count."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnproto import cpu, lab, ref


def test_timing_summarises_samples():
    t = lab.timing([1.0, 2.0, 3.0, 4.0])
    assert t.median_ms == 2.5 and t.n == 4 and t.min_ms == 1.0 and t.clock == "device"
    assert t.cv == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2.5)
    assert t.p10_ms <= t.median_ms <= t.p90_ms


@pytest.mark.parametrize("samples, match", [([1.0], "at least 2"), ([1.0, math.nan], "finite"),
                                            ([1.0, -1.0], "finite"), ([0.0, 0.0], "zero mean")])
def test_timing_rejects_bad_samples(samples, match):
    with pytest.raises(ValueError, match=match):
        lab.timing(samples)


def test_time_host_counts_iterations():
    calls = []
    t = lab.time_host(lambda: calls.append(1) or sum(range(1000)), warmup=2, iters=5)
    assert len(calls) == 7 and t.n == 5 and t.clock == "host" and t.median_ms > 0
    with pytest.raises(ValueError, match="iters"):
        lab.time_host(lambda: None, iters=1)
    with pytest.raises(TypeError, match="warmup"):
        lab.time_host(lambda: None, warmup=1.5)


@pytest.mark.parametrize("seq_q, seq_kv", [(1, 1), (7, 7), (5, 9), (9, 5), (3, 0), (0, 4), (64, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_flops_counts_visible_pairs(seq_q, seq_kv, causal):
    pairs = int(ref.causal_mask(seq_q, seq_kv).sum()) if causal else seq_q * seq_kv
    assert lab.attention_flops(2, 3, seq_q, seq_kv, 64, causal) == 4 * 2 * 3 * pairs * 64


def test_causal_convention_is_within_a_thousandth_of_half_at_n512():
    full = lab.attention_flops(1, 1, 512, 512, 64, False)
    assert abs(lab.attention_flops(1, 1, 512, 512, 64, True) / full - 0.5) < 1e-3


@pytest.mark.parametrize("args, exc, match", [
    ((-1, 1, 1, 1, 1, False), ValueError, "batch"),
    ((1, 1, 1, -5, 1, False), ValueError, "seq_kv"),
    ((1, 1, 1.5, 1, 1, False), TypeError, "seq_q"),
    ((1, 1, 1, 1, 1, "yes"), TypeError, "causal"),
])
def test_attention_flops_rejects_bad_sizes(args, exc, match):
    with pytest.raises(exc, match=match):
        lab.attention_flops(*args)


def _cpu_run(q, k, v, causal=False):
    return cpu.flash_forward(q, k, v, block_r=32, block_c=64, causal=causal)


def test_gate_passes_a_correct_kernel_and_fails_wrong_ones():
    rng = np.random.default_rng()
    good = lab.fp64_gate(lambda q, k, v: _cpu_run(q, k, v, True), head_dim=64, causal=True, dtype="bfloat16", rng=rng)
    assert good and good.max_abs_err < 1e-4
    # A causal kernel is wrong as a non-causal one.
    assert not lab.fp64_gate(lambda q, k, v: _cpu_run(q, k, v, True), head_dim=64, causal=False, dtype="bfloat16",
                             rng=rng)

    def unwritten(q, k, v):
        o, lse = _cpu_run(q, k, v)
        o[0, 0, -1] = np.nan  # an element the "kernel" left poisoned
        return o, lse
    bad = lab.fp64_gate(unwritten, head_dim=64, causal=False, dtype="bfloat16", rng=rng)
    assert not bad and "O outside" in bad.why

    def crashes(q, k, v):
        raise RuntimeError("launch failed")
    bad = lab.fp64_gate(crashes, head_dim=64, causal=False, dtype="bfloat16", rng=rng)
    assert not bad and bad.why == "RuntimeError: launch failed" and bad.max_abs_err == math.inf


def test_gate_inputs_are_fresh_and_exact_in_the_dtype():
    rng = np.random.default_rng(1)
    a = lab.gate_inputs(rng, (1, 2, 2, 5, 7), 16, "bfloat16")
    b = lab.gate_inputs(rng, (1, 2, 2, 5, 7), 16, "bfloat16")
    assert not np.array_equal(a[0], b[0])
    assert np.array_equal(cpu.quantize(a[0], "bfloat16"), a[0])
    assert a[0].shape == (1, 2, 5, 16) and a[1].shape == (1, 2, 7, 16)


def test_warmup_count_extends_short_kernels_only():
    assert lab.warmup_count(0.1, 3, 50.0) == 500
    assert lab.warmup_count(40.0, 3, 50.0) == 3
    assert lab.warmup_count(0.1, 3, 0.0) == 3


class _FakeBackend:
    def __init__(self):
        self.calls = []

    def time(self, enqueue, warmup, iters, flush_l2):
        self.calls.append((warmup, iters))
        return lab.timing([0.5] * max(iters, 2))


def test_time_device_sizes_the_warmup_from_an_estimate():
    be = _FakeBackend()
    lab.time_device(be, lambda: None, warmup=3, iters=10, min_warmup_ms=50.0)
    assert be.calls == [(1, lab.ESTIMATE_ITERS), (100, 10)]
    be = _FakeBackend()
    lab.time_device(be, lambda: None, warmup=3, iters=10, min_warmup_ms=0.0)
    assert be.calls == [(3, 10)]
