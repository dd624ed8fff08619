"""The CUDA backend on a real GPU: the smoke kernel through the cache, launch
checks, timing, DLPack exchange and archive reuse by a second process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attnproto import gpu_smoke

pytestmark = pytest.mark.gpu


@pytest.fixture
def fresh_cache(tmp_path):
    from attnproto.backend import native

    nat = native()
    old = nat.cache_dir()
    nat.set_cache_dir(str(tmp_path / "cache"))
    yield tmp_path / "cache"
    nat.set_cache_dir(old)


def test_device_info(cuda):
    info = cuda.info
    assert info["backend"] == "cuda" and info["multiprocessors"] > 0
    assert info["shared_mem_per_block_optin"] >= info["shared_mem_per_block"] > 0
    assert info["arch"].startswith("sm_") and info["l2_bytes"] > 0


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 33, 5), (128, 96, 64), (257, 129, 300)])
def test_smoke_matmul_correct_and_timed(cuda, shape):
    r = gpu_smoke.run_matmul(cuda, *shape, np.random.default_rng(), iters=10)
    assert r["all_written"]
    assert r["rel_err"] < 1e-5, r
    t = r["timing"]
    assert len(t.samples_ms) == 10 and t.p10_ms <= t.median_ms <= t.p90_ms and t.median_ms > 0


def test_cache_origins_memory_archive_compiled(cuda, fresh_cache):
    cuda.clear_memory_cache()
    k1 = cuda.kernel("smoke_matmul", TILE=8)
    assert k1.origin == "compiled" and k1.compile_ms > 0
    k2 = cuda.kernel("smoke_matmul", TILE=8)
    assert k2.origin == "memory" and k2.compile_ms == 0
    cuda.clear_memory_cache()
    k3 = cuda.kernel("smoke_matmul", TILE=8)
    assert k3.origin == "archive" and k3.archive_key == k1.archive_key
    assert k3.resources["registers"] > 0 and k3.resources["local_bytes"] == 0
    with pytest.raises(RuntimeError, match="archive-only"):
        cuda.kernel("smoke_matmul", TILE=12, mode="archive_only")


def test_second_process_loads_from_archive(cuda, fresh_cache):
    cuda.kernel("smoke_matmul", TILE=4)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from attnproto.backend import get, native
        native().set_cache_dir({str(fresh_cache)!r})
        be = get("cuda")
        k = be.kernel("smoke_matmul", TILE=4)
        print(k.origin)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env={**os.environ})
    assert out.stdout.strip() == "archive"


def test_dlpack_exchange_with_torch(cuda):
    torch = pytest.importorskip("torch")
    m = n = k = 48
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(k, n, device="cuda")
    c = torch.full((m, n), float("nan"), device="cuda")
    kern = cuda.kernel("smoke_matmul", TILE=16)
    cuda.launch(kern, (3, 3), (16, 16), [a, b, c, np.int32(m), np.int32(n), np.int32(k)])
    cuda.synchronize()
    ref = (a.double() @ b.double()).float()
    assert torch.allclose(c, ref, atol=1e-4, rtol=1e-4)
    # a Buffer seen by torch without a copy
    buf = cuda.alloc(4 * 10)
    cuda.fill(buf, 0)
    view = torch.from_dlpack(buf.view("float32", [10]))
    view += 2.5
    torch.cuda.synchronize()
    assert np.all(cuda.to_numpy(buf, np.float32, (10,)) == 2.5)


def test_bad_launches_raise_clear_errors(cuda):
    torch = pytest.importorskip("torch")
    kern = cuda.kernel("smoke_matmul", TILE=16)
    with pytest.raises(TypeError, match=r"args\[0\].*not on a CUDA device"):
        cuda.launch(kern, (1,), (16, 16), [torch.zeros(4), torch.zeros(4, device="cuda")])
    with pytest.raises(TypeError, match=r"args\[1\].*ambiguous"):
        cuda.launch(kern, (1,), (16, 16), [torch.zeros(4, device="cuda"), 5])
    with pytest.raises(ValueError, match="block"):
        cuda.launch(kern, (1,), (0,), [])
    with pytest.raises(ValueError, match="exceeds the kernel's limit"):
        cuda.launch(kern, (1,), (1024, 2), [])
    with pytest.raises(ValueError, match="dynamic shared memory"):
        cuda.launch(kern, (1,), (16, 16), [], shared_bytes=10 * 1024 * 1024)


def test_timing_flush_l2_and_callable(cuda):
    kern = cuda.kernel("smoke_matmul", TILE=16)
    rng = np.random.default_rng()
    a = cuda.from_numpy(rng.standard_normal((256, 256), dtype=np.float32))
    c = cuda.alloc(256 * 256 * 4)
    args = [a, a, c, np.int32(256), np.int32(256), np.int32(256)]
    s1 = cuda.time_launch(kern, (16, 16), (16, 16), args, iters=20, flush_l2=True)
    s2 = cuda.time(lambda: cuda.launch(kern, (16, 16), (16, 16), args), warmup=2, iters=20)
    assert s1.median_ms > 0 and s2.median_ms > 0 and len(s2.samples_ms) == 20


def test_tensor_map_encodes(cuda):
    torch = pytest.importorskip("torch")
    if cuda.info["compute_capability"][0] < 9:
        pytest.skip("TMA needs sm_90+")
    t = torch.zeros(4, 130, 64, dtype=torch.bfloat16, device="cuda")
    arg = cuda.tensor_map(t, "bf16", dims=[64, 130, 4], strides_bytes=[64 * 2, 130 * 64 * 2], box=[64, 64, 1],
                          swizzle_bytes=128)
    assert arg.size == 128 and arg.align == 64
    with pytest.raises(ValueError, match="swizzle"):
        cuda.tensor_map(t, "bf16", dims=[64, 130, 4], strides_bytes=[128, 16640], box=[64, 64, 1], swizzle_bytes=3)


def test_timing_guard_hides_host_dispatch(cuda):
    import time

    kern = cuda.kernel("smoke_matmul", TILE=16)
    c = cuda.alloc(16 * 16 * 4)
    a = cuda.from_numpy(np.ones((16, 16), np.float32))
    args = [a, a, c, np.int32(16), np.int32(16), np.int32(16)]
    host_delay_s = 300e-6

    def slow_enqueue():
        time.sleep(host_delay_s)  # stands in for Python dispatch of a framework op
        cuda.launch(kern, (1, 1), (16, 16), args)

    unguarded = cuda.time(slow_enqueue, warmup=2, iters=10, guard_us=0)
    guarded = cuda.time(slow_enqueue, warmup=2, iters=10, guard_us=5000)
    assert unguarded.median_ms >= 0.8 * host_delay_s * 1e3
    assert guarded.median_ms < 0.5 * host_delay_s * 1e3
    with pytest.raises(ValueError, match="guard_us"):
        cuda.time(slow_enqueue, iters=1, guard_us=-1)
