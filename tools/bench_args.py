"""Print one argument line per benchmark for bench/attnproto_bench_flash: for every
registered CUDA family (attnproto.ops.families.FAMILIES), the tiles it runs at the FA3
setting (one 16K-token sequence, hidden 2048, BF16) per head dim, causal and not.
tools/device_run.sh's bench stage runs each line."""
from __future__ import annotations

from attnproto.experiments.proto1 import HEAD_DIMS, HIDDEN, TOKENS
from attnproto.ops import chooser, families
from attnproto.ops.problem import DeviceSpec, ProblemSpec

SEQ = TOKENS  # one sequence of 16K tokens
DTYPE = "bfloat16"
#: Families whose launches need TMA descriptors (the bench binary builds them with --tma).
TMA_FAMILIES = ("wgmma",)


def lines(arch: str = "sm_90") -> list[str]:
    device = DeviceSpec.for_arch(arch)
    out = []
    for fam in families.for_backend("cuda"):
        for d in HEAD_DIMS:
            heads = HIDDEN // d
            for causal in (False, True):
                spec = ProblemSpec(1, heads, heads, SEQ, SEQ, d, DTYPE, causal)
                if not fam.supports_spec(spec, device)[0]:
                    continue
                cfg, _ = chooser.family_choice(fam, spec, device)
                consts = {k: v for k, v in fam.constants(cfg, spec).items() if k not in ("CAUSAL", "DTYPE")}
                threads, smem = cfg.threads, fam.shared_bytes(cfg, spec)
                common = f"--batch 1 --heads {heads} --seq {SEQ}" + (" --causal" if causal else "")
                tma = " --tma" if fam.name in TMA_FAMILIES else ""
                out.append(f"--kernel {fam.kernel_name} " + " ".join(f"--const {k}={v}" for k, v in consts.items())
                           + f" --threads {threads} --smem {smem}{tma} {common}")
    return out


if __name__ == "__main__":
    print("\n".join(lines()))
