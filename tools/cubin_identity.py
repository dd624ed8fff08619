"""Are a family's base-variant cubins unchanged by a shader edit? Compiles the same
specialisations (NVRTC, sm_90a, cubin) from an older shader tree and from this one and prints the
sha256 of each whole cubin and of its code: the .text sections together (the SASS). Used for the
Prototype 7 variants (include/variants.cuh): the base variant of flash_fwd_mma and of the
Prototype 2/4 entries that share include/fa_mma.cuh (family "mma"), and of the paged kernels
(family "paged": paged_decode, and flash_fwd_wgmma with PAGE_SIZE 16 / 128, the paged prefill)
must compile to the code it compiled to.

    git archive 91fdd39 shaders | tar -x -C /tmp/before
    python tools/cubin_identity.py /tmp/before/shaders          # family mma
    python tools/cubin_identity.py /tmp/before/shaders paged

Exit status 1 when the code of any specialisation differs; the sections whose bytes differ are
listed. Two things change a cubin without changing its code: a kernel that gains arguments
(.nv.info.<name>, .nv.constant0.<name>: the parameter bank grows), and every namespace-scope
constexpr of an included header, which NVRTC emits as a global symbol (.symtab, .strtab,
.nv.global[.init], .nv.constant4). So the tool also builds a CONTROL tree: the older tree with
exactly those two edits made to it (mma: include/variants.cuh included by include/fa_mma.cuh, the
three variant buffer arguments appended to flash_fwd_mma; paged: variants.cuh included by
paged_decode.cu with variant::ScoreMod<false> instantiated, its alibi_slopes argument appended),
and compares whole cubins against it: equal sha256 there means the variant code adds nothing else
to the base variant's cubins.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from attnproto.backend import native
from attnproto.ops import configs, flash_wgmma, stitch
from attnproto.ops.families import paged_decode
from attnproto.ops.variants import BASE

ARCH = "sm_90a"
# ELF64 header fields: section header table offset, entry size, count, name-table index.
_SHOFF, _SHENTSIZE, _SHNUM, _SHSTRNDX = 0x28, 0x3A, 0x3C, 0x3E
# Section header: name offset (u32) at 0, file offset (u64) at 0x18, size (u64) at 0x20.
_SH_NAME, _SH_OFFSET, _SH_SIZE = 0x00, 0x18, 0x20


def sections(elf: bytes) -> Dict[str, bytes]:
    """name -> bytes of every section of a little-endian ELF64 image (a cubin)."""
    shoff = struct.unpack_from("<Q", elf, _SHOFF)[0]
    entsize, count, strndx = (struct.unpack_from("<H", elf, o)[0] for o in (_SHENTSIZE, _SHNUM, _SHSTRNDX))

    def header(i: int) -> Tuple[int, int, int]:
        base = shoff + i * entsize
        return (struct.unpack_from("<I", elf, base + _SH_NAME)[0], struct.unpack_from("<Q", elf, base + _SH_OFFSET)[0],
                struct.unpack_from("<Q", elf, base + _SH_SIZE)[0])

    _, str_off, str_size = header(strndx)
    names = elf[str_off:str_off + str_size]
    out = {}
    for i in range(1, count):
        name_off, off, size = header(i)
        name = names[name_off:names.index(b"\0", name_off)].decode()
        out[name] = elf[off:off + size]
    return out


def code_digest(elf: bytes) -> str:
    """sha256 of the .text sections (name and bytes, in name order)."""
    h = hashlib.sha256()
    for name, data in sorted(sections(elf).items()):
        if name.startswith(".text"):
            h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


def specs() -> List[Tuple[str, Dict[str, int]]]:
    """Base-variant specialisations of every entry on include/fa_mma.cuh: flash_fwd_mma (swizzled
    and padded rows, both masks and dtypes, 1 and 2 stages, Q in registers and not), Prototype 4's
    salted and multi-entry units, Prototype 2's stitch modes 0-2 (mode 3's LTO-IR is no cubin)."""
    tiles = [configs.FlashConfig(128, 128, 64, 4, 1, False, "bfloat16"),
             configs.FlashConfig(128, 64, 64, 4, 2, True, "float16"),
             configs.FlashConfig(64, 128, 64, 4, 2, True, "bfloat16"),
             configs.FlashConfig(80, 64, 64, 4, 2, True, "float16"),
             configs.FlashConfig(256, 128, 64, 8, 1, True, "bfloat16"),
             configs.FlashConfig(64, 64, 128, 4, 1, False, "float16")]
    out = [(configs.KERNEL_NAME, t.constants()) for t in tiles]
    first = tiles[0].constants()
    out.append(("flash_fwd_mma_salted", {**first, "VARIANT_SALT": 1}))
    out.append(("stitch_multi_entry", {k: v for k, v in first.items() if k not in ("CAUSAL", "DTYPE")}))
    out += [(stitch.KERNEL_NAME, stitch.StitchConfig(tiles[1], mode).constants()) for mode in (0, 1, 2)]
    return out


def paged_specs() -> List[Tuple[str, Dict[str, int]]]:
    """Base-variant specialisations of the paged kernels: paged_decode over page sizes 0 (contiguous),
    1, 16, 128, split and not, NQ 1 and 4, D 64 / 128 / 256, both dtypes; flash_fwd_wgmma (the paged
    prefill) with PAGE_SIZE 16 and 128, causal and not, D 64 / 128, both dtypes."""
    def decode(d: int, page: int, heads: int, nq: int, split: int, dtype: str) -> Tuple[str, Dict[str, int]]:
        cfg = paged_decode.DecodeConfig(heads=heads, stages=paged_decode.default_stages(d))
        return (paged_decode.KERNEL, {"HEAD_DIM": d, "PAGE_SIZE": page, "HEADS": heads, "NQ": nq,
                                      "WARPS": cfg.warps, "KEYS_PER_WARP": cfg.keys_per_warp, "STAGES": cfg.stages,
                                      "SPLIT": split, "DTYPE": paged_decode.DTYPE_CODES[dtype], **BASE.constants()})

    def prefill(d: int, page: int, causal: bool, dtype: str) -> Tuple[str, Dict[str, int]]:
        cfg = flash_wgmma.default_config(d, causal)
        return (flash_wgmma.KERNEL_NAME, flash_wgmma.constants(cfg, d, causal, dtype, page))

    return [decode(128, 16, 8, 1, 1, "bfloat16"), decode(128, 16, 8, 1, 0, "float16"),
            decode(128, 0, 8, 1, 1, "bfloat16"), decode(128, 1, 8, 1, 1, "float16"),
            decode(128, 128, 4, 4, 0, "bfloat16"), decode(64, 16, 1, 1, 1, "float16"),
            decode(256, 128, 2, 4, 1, "bfloat16"), decode(64, 256, 8, 4, 0, "bfloat16"),
            prefill(128, 16, True, "bfloat16"), prefill(128, 128, True, "float16"),
            prefill(64, 16, False, "float16"), prefill(64, 128, True, "bfloat16")]


# The two edits of the control tree: (file, anchor, replacement).
CONTROL_EDITS = (
    ("cuda/include/fa_mma.cuh", '#include "cuda/include/common.cuh"\n',
     '#include "cuda/include/common.cuh"\n#include "cuda/include/variants.cuh"\n'),
    ("cuda/flash_fwd_mma.cu", "float* __restrict__ lse) {",
     "float* __restrict__ lse,\n              const float* __restrict__ rope_cos, const float* __restrict__ rope_sin,\n"
     "              const float* __restrict__ alibi_slopes) {"),
)


# The paged family's control edits (paged_decode.cu; flash_fwd_wgmma.cu already takes the variants):
# the include, the ScoreMod<false> class the kernel declares (an implicit instantiation, whose static
# constexpr kLinearAlibi NVRTC emits as one more global symbol), the alibi_slopes argument.
PAGED_CONTROL_EDITS = (
    ("cuda/paged_decode.cu", '#include "cuda/include/paged_kv.cuh"\n',
     '#include "cuda/include/paged_kv.cuh"\n#include "cuda/include/variants.cuh"\n'
     'static_assert(sizeof(variant::ScoreMod<false>) > 0, "instantiated");\n'),
    ("cuda/paged_decode.cu", "float* __restrict__ part_lse) {",
     "float* __restrict__ part_lse, const float* __restrict__ alibi_slopes) {"),
)

#: family -> (its specialisations, its control edits)
FAMILIES = {"mma": (specs, CONTROL_EDITS), "paged": (paged_specs, PAGED_CONTROL_EDITS)}


def control_tree(before: str, dest: str, edits: Tuple[Tuple[str, str, str], ...] = CONTROL_EDITS) -> str:
    """A copy of the shader tree `before` with `edits` made (each anchor must occur once)."""
    root = Path(dest) / "shaders"
    shutil.copytree(before, root)
    for rel, anchor, replacement in edits:
        path = root / rel
        text = path.read_text()
        if text.count(anchor) != 1:
            raise SystemExit(f"control tree: {rel} does not contain {anchor!r} exactly once")
        path.write_text(text.replace(anchor, replacement))
    return str(root)


def main(argv: List[str]) -> int:
    if len(argv) not in (2, 3) or not Path(argv[1]).is_dir() or (len(argv) == 3 and argv[2] not in FAMILIES):
        print(__doc__)
        return 2
    family_specs, edits = FAMILIES[argv[2] if len(argv) == 3 else "mma"]
    nat = native()
    current = nat.shader_dir()
    differs = False
    print(f"nvrtc {nat.cuda_nvrtc_version()}, {ARCH}; before: {argv[1]}, after: {current}")
    tmp = tempfile.mkdtemp(prefix="cubin_identity_")
    control = control_tree(argv[1], tmp, edits)
    for name, consts in family_specs():
        blobs = []
        for tree in (argv[1], current, control):
            nat.set_shader_dir(tree)
            blobs.append(nat.cuda_compile(name, consts, ARCH, "cubin", [])[0])
        nat.set_shader_dir(current)
        before, after, ctrl = blobs
        differs |= ctrl != after
        same_code = code_digest(before) == code_digest(after)
        differs |= not same_code
        label = " ".join(f"{k}={v}" for k, v in sorted(consts.items()))
        print(f"{name} {label}\n  cubin  {hashlib.sha256(before).hexdigest()} -> {hashlib.sha256(after).hexdigest()}"
              f"  {'identical' if before == after else 'differs'}\n  .text  {code_digest(before)} -> "
              f"{code_digest(after)}  {'identical' if same_code else 'DIFFERS'}\n  control {hashlib.sha256(ctrl).hexdigest()}"
              f"  {'identical to after' if ctrl == after else 'DIFFERS from after'}")
        if before != after:
            sb, sa = sections(before), sections(after)
            changed = sorted(n for n in set(sb) | set(sa) if sb.get(n) != sa.get(n))
            print("  sections that differ: " + ", ".join(
                f"{n} ({len(sb.get(n, b''))} -> {len(sa.get(n, b''))} bytes)" for n in changed))
    shutil.rmtree(tmp)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
