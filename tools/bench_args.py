"""Print one argument line per benchmark for bench/attnproto_bench_flash: the best
configuration per head dim at the FA3 setting (16K tokens, hidden 2048, BF16), for
the mma.sync kernel (the chooser's measured table) and the wgmma kernel (its
defaults), causal and not. tools/device_run.sh's bench stage runs each line."""
from __future__ import annotations

from attnproto.experiments.proto1 import HEAD_DIMS, HIDDEN, TOKENS
from attnproto.ops import configs, flash_wgmma

SEQ = TOKENS  # one sequence of 16K tokens


def lines() -> list[str]:
    out = []
    for d in HEAD_DIMS:
        heads = HIDDEN // d
        for causal in (False, True):
            common = f"--batch 1 --heads {heads} --seq {SEQ}" + (" --causal" if causal else "")
            cfg = configs.choose_config(d, SEQ, causal, "bfloat16")
            consts = " ".join(f"--const {k}={v}" for k, v in cfg.constants().items() if k not in ("CAUSAL", "DTYPE"))
            out.append(f"--kernel {configs.KERNEL_NAME} {consts} --threads {cfg.threads} --smem {cfg.smem_bytes()} {common}")
            w = flash_wgmma.default_config(d, causal)
            wc = flash_wgmma.constants(w, d, causal, "bfloat16")
            consts = " ".join(f"--const {k}={v}" for k, v in wc.items() if k not in ("CAUSAL", "DTYPE"))
            out.append(f"--kernel {flash_wgmma.KERNEL_NAME} {consts} --threads {w.threads} "
                       f"--smem {flash_wgmma.shared_bytes(w, d)} --tma {common}")
    return out


if __name__ == "__main__":
    print("\n".join(lines()))
