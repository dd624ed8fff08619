"""The native core without a GPU: parameter layout, KernelKey, timing statistics,
argument packing, NVRTC compilation and the on-disk archive."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from attnproto import params
from attnproto.backend import native, shader_dir


def test_params_layout_matches_header():
    nat = native()
    assert nat.PARAMS_SIZE == params.PARAMS_DTYPE.itemsize == 192
    assert [tuple(r) for r in nat.params_layout()] == params.layout()


def test_params_layout_mismatch_is_detected():
    rows = [tuple(r) for r in native().params_layout()]
    rows[2] = (rows[2][0], rows[2][1] + 4, rows[2][2])
    with pytest.raises(RuntimeError, match="layout mismatch"):
        params.check_layout(rows, native().PARAMS_SIZE)


def test_make_params_values_and_errors():
    p = params.make_params(batch=2, num_heads=8, num_kv_heads=2, seq_q=17, head_dim=64,
                           q_stride=(8 * 17 * 64, 17 * 64, 64))
    assert p["seq_kv"] == 17 and p["num_kv_heads"] == 2
    assert p["scale"] == np.float32(1 / 8)
    assert tuple(p["q_stride"]) == (8 * 17 * 64, 17 * 64, 64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        params.make_params(batch=1, num_heads=6, num_kv_heads=4, seq_q=1, head_dim=64)
    with pytest.raises(TypeError, match="seq_q"):
        params.make_params(batch=1, num_heads=1, seq_q=1.5, head_dim=64)
    with pytest.raises(ValueError, match="batch"):
        params.make_params(batch=-1, num_heads=1, seq_q=1, head_dim=64)
    with pytest.raises(ValueError, match="q_stride"):
        params.make_params(batch=1, num_heads=1, seq_q=1, head_dim=64, q_stride=(1, 2))


def test_kernel_key_canonical_sorted_and_validated():
    nat = native()
    assert nat.kernel_key("flash", {"B": 2, "A": 1}) == "flash[A=1,B=2]"
    assert nat.kernel_key("flash", {}) == "flash[]"
    with pytest.raises(ValueError, match="kernel name"):
        nat.kernel_key("bad name", {})
    with pytest.raises(ValueError, match="constant name"):
        nat.kernel_key("k", {"1X": 1})


def test_archive_key_covers_every_component():
    nat = native()
    base = dict(name="k", constants={"A": 1}, source_hash="s", arch="sm_90a", compiler_version="13.0")
    ref = nat.archive_key(**base)
    assert len(ref) == 64 and ref == nat.archive_key(**base)
    for field, other in (("constants", {"A": 2}), ("source_hash", "t"), ("arch", "sm_80"),
                         ("compiler_version", "13.1"), ("name", "k2")):
        assert nat.archive_key(**{**base, field: other}) != ref, field


def test_timing_stats_match_numpy():
    nat = native()
    rng = np.random.default_rng()
    s = rng.uniform(1, 2, size=37)
    t = nat.TimingStats.from_samples(list(s))
    assert t.median_ms == pytest.approx(np.median(s))
    assert t.p10_ms == pytest.approx(np.percentile(s, 10))
    assert t.p90_ms == pytest.approx(np.percentile(s, 90))
    assert t.cv == pytest.approx(np.std(s, ddof=1) / np.mean(s))
    assert list(t.samples_ms) == pytest.approx(list(s))


def test_launch_argument_packing_rejects_ambiguous_values():
    from attnproto.backend import _pack

    nat = native()
    a = _pack(0, np.float32(0.5))
    assert isinstance(a, nat.Arg) and a.size == 4 and a.align == 4
    p = _pack(1, params.make_params(batch=1, num_heads=1, seq_q=1, head_dim=64))
    assert p.size == 192 and p.align == 8
    with pytest.raises(TypeError, match=r"args\[2\].*ambiguous"):
        _pack(2, 3)
    with pytest.raises(TypeError, match=r"args\[3\].*host numpy array"):
        _pack(3, np.zeros(4, np.float32))


# ---- NVRTC and the archive (need NVRTC, not a GPU) ----

SMOKE = ("smoke_matmul", {"TILE": 16})


@pytest.fixture
def cache(tmp_path, nvrtc):
    old = nvrtc.cache_dir()
    nvrtc.set_cache_dir(str(tmp_path / "cache"))
    yield tmp_path / "cache"
    nvrtc.set_cache_dir(old)


def test_compile_error_carries_the_log(nvrtc):
    with pytest.raises(nvrtc.KernelCompileError, match=r"(?s)smoke_matmul\[TILE=64\].*static assertion"):
        nvrtc.cuda_compile("smoke_matmul", {"TILE": 64}, "sm_90a")
    assert issubclass(nvrtc.KernelCompileError, nvrtc.BackendError)


def test_missing_kernel_source_names_the_kernel(nvrtc):
    with pytest.raises(ValueError, match="no_such_kernel"):
        nvrtc.cuda_compile("no_such_kernel", {}, "sm_90a")


def test_archive_miss_hit_and_archive_only(cache, nvrtc):
    cubin, origin, _, _, key = nvrtc.cuda_obtain(*SMOKE, "sm_90a")
    assert origin == "compiled" and len(cubin) > 0
    entry = cache / "cuda" / f"{key}.entry"
    assert entry.is_file()
    cubin2, origin2, _, _, key2 = nvrtc.cuda_obtain(*SMOKE, "sm_90a")
    assert (origin2, key2, cubin2) == ("archive", key, cubin)
    # another arch is another entry; archive-only refuses to compile it
    with pytest.raises(nvrtc.BackendError, match="archive-only"):
        nvrtc.cuda_obtain(*SMOKE, "sm_80", "archive_only")
    _, origin3, _, _, key3 = nvrtc.cuda_obtain(*SMOKE, "sm_80")
    assert origin3 == "compiled" and key3 != key
    # cold / no_archive never read the archive
    assert nvrtc.cuda_obtain(*SMOKE, "sm_90a", "cold")[1] == "compiled"
    assert not list((cache / "cuda").glob("*.tmp.*"))


@pytest.mark.parametrize("damage", ["flip_payload_byte", "truncate", "garbage"])
def test_corrupt_archive_entry_is_rejected_and_rebuilt(cache, nvrtc, damage):
    cubin, _, _, _, key = nvrtc.cuda_obtain(*SMOKE, "sm_90a")
    entry = cache / "cuda" / f"{key}.entry"
    data = bytearray(entry.read_bytes())
    if damage == "flip_payload_byte":
        data[-10] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not an archive entry at all")
    entry.write_bytes(bytes(data))
    cubin2, origin, _, log, key2 = nvrtc.cuda_obtain(*SMOKE, "sm_90a")
    assert origin == "compiled" and key2 == key and cubin2 == cubin
    assert "rejected" in log
    assert nvrtc.cuda_obtain(*SMOKE, "sm_90a")[1] == "archive"


def test_source_change_changes_the_key(tmp_path, cache, nvrtc):
    shaders = tmp_path / "shaders"
    shutil.copytree(shader_dir(), shaders)
    old = nvrtc.shader_dir()
    nvrtc.set_shader_dir(str(shaders))
    try:
        key1 = nvrtc.cuda_obtain(*SMOKE, "sm_90a")[4]
        hdr = shaders / "common" / "attn_params.h"
        hdr.write_text(hdr.read_text() + "\n// touched\n")
        cubin, origin, _, _, key2 = nvrtc.cuda_obtain(*SMOKE, "sm_90a")
        assert key2 != key1 and origin == "compiled"
    finally:
        nvrtc.set_shader_dir(old)


def test_archive_reused_by_a_second_process_and_concurrent_writers(cache, nvrtc):
    script = textwrap.dedent(
        f"""
        import sys
        from attnproto.backend import native
        nat = native()
        nat.set_cache_dir({str(cache)!r})
        print(nat.cuda_obtain("smoke_matmul", {{"TILE": 8}}, "sm_90a")[1])
        """
    )
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    origins = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    # the per-entry lock lets exactly one process compile; the others read its entry
    assert origins == ["archive", "archive", "compiled"]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "archive"
    assert len(list(Path(cache, "cuda").glob("*.entry"))) == 1


def test_package_exposes_the_native_exceptions():
    import attnproto

    assert attnproto.KernelCompileError is native().KernelCompileError
    assert issubclass(attnproto.KernelCompileError, attnproto.BackendError)
    with pytest.raises(AttributeError, match="no_such_name"):
        attnproto.no_such_name  # noqa: B018
