"""Every CUDA kernel specialisation the project uses compiles with NVRTC for
Hopper (sm_90a) and, for the mma.sync family, Ampere (sm_80). Needs NVRTC, no GPU."""
from __future__ import annotations

import pytest

from attnproto import kernels


def test_specialisation_list_is_unique_and_nonempty():
    specs = kernels.all_specialisations()
    keys = [(n, tuple(sorted(c.items()))) for n, c in specs]
    assert specs and len(keys) == len(set(keys))
    names = {n for n, _ in specs}
    assert "smoke_matmul" in names and "flash_fwd_mma" in names


@pytest.mark.parametrize("arch", [kernels.DEFAULT_ARCH])
def test_every_specialisation_compiles(nvrtc, arch):
    rows = kernels.compile_all(arch=arch)
    failed = [f"{r['kernel']}:\n{r['log']}" for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(failed)


def test_mma_family_compiles_for_ampere(nvrtc):
    from attnproto import gpu_smoke
    from attnproto.ops import configs

    def fits_sm80(consts):
        cfg = configs.FlashConfig(consts["HEAD_DIM"], consts["BLOCK_R"], consts["BLOCK_C"], consts["WARPS"],
                                  consts["STAGES"], bool(consts["CAUSAL"]), consts["DTYPE"])
        return cfg.is_legal(configs.SMEM_LIMIT_SM80)[0]

    specs = [s for s in configs.all_specialisations() if fits_sm80(s[1])] + gpu_smoke.specialisations()
    assert len(specs) > len(gpu_smoke.specialisations())
    rows = kernels.compile_all(arch="sm_80", specs=specs)
    failed = [f"{r['kernel']}:\n{r['log']}" for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(failed)
