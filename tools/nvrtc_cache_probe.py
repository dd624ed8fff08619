"""Does anything on this machine cache NVRTC compiles? Compiles one flash_fwd_mma
configuration repeatedly: plain (identical PTX every time) and salted (distinct PTX),
and prints the wall ms of each and the NVRTC library in use. Used once on the H100
machine, where repeated identical compiles came back ~15x faster (tools/device_run.sh
runs it before proto4 so the log shows the effect next to the measurement)."""
from __future__ import annotations

import os

from attnproto.backend import native
from attnproto.ops import configs

CONFIG = configs.FlashConfig(128, 128, 64, 4, 1, False, "bfloat16").constants()
REPEATS = 3


def main() -> None:
    nat = native()
    print("nvrtc:", nat.cuda_nvrtc_library(), nat.cuda_nvrtc_version(),
          "CUDA_CACHE_DISABLE =", os.environ.get("CUDA_CACHE_DISABLE"))
    same = [round(nat.cuda_compile("flash_fwd_mma", CONFIG, "sm_90a")[2]) for _ in range(REPEATS)]
    salted = [round(nat.cuda_compile("flash_fwd_mma_salted", {**CONFIG, "VARIANT_SALT": 1000 + i}, "sm_90a")[2])
              for i in range(REPEATS)]
    print("identical PTX, ms:", same)
    print("distinct PTX (salted), ms:", salted)


if __name__ == "__main__":
    main()
