"""Host arrays in, host arrays out, for the CUDA families: what the FP64 gate calls."""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from ..problem import DeviceSpec, check_flash_inputs


def run_cuda_host(family: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, dtype: str,
                  config: Any, backend: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Upload float32 arrays as ``dtype``, launch ``family`` with NaN-poisoned outputs, download."""
    import torch  # noqa: PLC0415  (GPU-only path)

    tdt = getattr(torch, dtype)
    qt, kt, vt = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to("cuda", tdt) for x in (q, k, v))
    out = torch.full_like(qt, float("nan"))
    lse = torch.full(qt.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
    problem = check_flash_inputs(qt, kt, vt, causal=causal, out=out, lse=lse)
    device = DeviceSpec.from_backend(backend)
    family.check(problem, device)
    cfg = family.coerce_config(config, problem.spec, device)
    family.prepare(problem, cfg, backend).launch()
    torch.cuda.synchronize()
    return out.float().cpu().numpy(), lse.cpu().numpy()
