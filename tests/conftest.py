"""Shared test configuration.

Tests marked ``gpu`` need a CUDA GPU: they run on the device machine
(``bash tools/device_run.sh``) and are skipped elsewhere with the reason.
Set ATTNPROTO_REQUIRE_NVRTC=1 (CI does) to turn a missing NVRTC into a failure
instead of a skip.
"""
from __future__ import annotations

import os
from pathlib import Path

# Multithreaded OpenBLAS spin-waits on a busy 2-core machine: single matmuls ran ~50x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


def _cuda_status():
    try:
        from attnproto.backend import cuda_available
    except ImportError as exc:  # pragma: no cover
        return False, f"attnproto not importable: {exc}"
    return cuda_available()


def pytest_collection_modifyitems(config, items):
    ok, why = _cuda_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why.splitlines()[0] if why else 'unavailable'}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nvrtc():
    """The native module with a working NVRTC, or skip (fail when ATTNPROTO_REQUIRE_NVRTC=1)."""
    from attnproto.backend import BackendUnavailable, native

    try:
        nat = native()
    except BackendUnavailable as exc:
        pytest.fail(str(exc)) if os.environ.get("ATTNPROTO_REQUIRE_NVRTC") == "1" else pytest.skip(str(exc))
    if not hasattr(nat, "cuda_compile"):
        pytest.skip("this build has no CUDA backend (macOS)")
    try:
        nat.cuda_nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("ATTNPROTO_REQUIRE_NVRTC") == "1":
            pytest.fail(f"NVRTC required but unavailable: {exc}")
        pytest.skip(f"NVRTC unavailable: {exc}")
    return nat


@pytest.fixture
def cuda():
    """The CUDA GpuBackend (tests using it should also be marked gpu)."""
    from attnproto.backend import get

    return get("cuda")


#: The package sources, for subprocesses that import attnproto from the tree.
PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


@pytest.fixture()
def env(tmp_path):
    """Environment for `python -m attnproto` subprocesses: the tree's package first, and HOME,
    XDG dirs and the findings database inside tmp_path (nothing of the user's is touched)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + e.get("PYTHONPATH", "")
    e["HOME"] = str(tmp_path / "home")
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    e["XDG_DATA_HOME"] = str(tmp_path / "data")
    e["ATTNPROTO_KB"] = str(tmp_path / "kb.sqlite")
    e["ATTNPROTO_NO_TQDM"] = "1"
    return e
