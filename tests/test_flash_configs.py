"""CPU-only checks of the mma.sync flash kernel's configurations (attnproto.ops.configs):
legality mirrors the kernel's static_asserts and constants, the chooser always returns
a legal config with a reason, the specialisation list is legal and unique, and the
host-side dispatch of attnproto.ops.flash refuses bad requests before touching a GPU."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from attnproto.ops import configs as C
from attnproto.ops import flash as F

KERNEL_SOURCE = Path(__file__).resolve().parents[1] / "shaders" / "cuda" / "include" / "fa_mma.cuh"
DTYPES = ("float16", "bfloat16")
# Every legal head dim: multiples of 16 up to 256 (odd ones such as 80, 96, 112 included).
ALL_HEAD_DIMS = tuple(range(C.MMA_K, C.MAX_HEAD_DIM + 1, C.MMA_K))
SEQ_LENS = (1, 17, 777, C.SHORT_SEQ, C.SHORT_SEQ + 1, 4097, 131072)


def _kernel_constant(name: str) -> int:
    m = re.search(rf"constexpr (?:int|bool) {name} = (\d+);", KERNEL_SOURCE.read_text())
    assert m, f"{name} not found in {KERNEL_SOURCE.name}"
    return int(m.group(1))


def _kernel_assert_messages() -> list[str]:
    text = KERNEL_SOURCE.read_text()
    out = []
    for m in re.finditer(r"static_assert\((.*?)\);", text, re.S):
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1))
        out.append("".join(strings))
    return out


# ------------------------------------------------------------------ mirrors of the kernel
@pytest.mark.parametrize("py_name, kernel_name", [
    ("MAX_ACC_REGS", "kMaxAccRegs"),
    ("Q_IN_REGS_BUDGET", "kQInRegsBudget"),
    ("MAX_HEAD_DIM", "kMaxHeadDim"),
    ("MAX_WARPS", "kMaxWarps"),
    ("SWIZZLE_GROUP", "kSwizzleGroup"),
    ("SMEM_LIMIT_SM80", "kSmemOptinSm80"),
    ("SMEM_LIMIT_SM86", "kSmemOptinSm86"),
    ("SMEM_LIMIT_SM90", "kSmemOptinSm90"),
    ("MMA_M", "kMmaM"),
    ("MMA_N", "kMmaN"),
    ("MMA_K", "kMmaK"),
])
def test_constants_mirror_the_kernel(py_name, kernel_name):
    assert getattr(C, py_name) == _kernel_constant(kernel_name)


ILLEGAL = [
    (dict(head_dim=72), "HEAD_DIM must be a multiple of 16"),
    (dict(head_dim=272), "HEAD_DIM must be a multiple of 16"),
    (dict(head_dim=0), "HEAD_DIM must be a multiple of 16"),
    (dict(block_c=24), "BLOCK_C must be a positive multiple of 16"),
    (dict(block_c=0), "BLOCK_C must be a positive multiple of 16"),
    (dict(warps=0), "WARPS must be in [1, 16]"),
    (dict(warps=32, block_r=512), "WARPS must be in [1, 16]"),
    (dict(block_r=48), "BLOCK_R must be a positive multiple of 16*WARPS"),
    (dict(block_r=96, warps=4), "BLOCK_R must be a positive multiple of 16*WARPS"),
    (dict(block_r=0), "BLOCK_R must be a positive multiple of 16*WARPS"),
    (dict(stages=3), "STAGES must be 1 or 2"),
    (dict(stages=0), "STAGES must be 1 or 2"),
    (dict(head_dim=256, block_r=256, block_c=128, warps=16, stages=2), "shared memory"),
    (dict(head_dim=128, block_r=128, block_c=128, warps=4), "register budget"),
    (dict(head_dim=256, block_r=128, block_c=64, warps=4), "register budget"),
]
BASE = dict(head_dim=128, block_r=64, block_c=64, warps=4, stages=2, causal=False, dtype="bfloat16")


@pytest.mark.parametrize("changes, message", ILLEGAL)
def test_illegal_combinations_rejected_with_the_kernels_message(changes, message):
    cfg = C.FlashConfig(**{**BASE, **changes})
    ok, reason = cfg.is_legal()
    assert not ok and message in reason
    # The reason repeats a static_assert message of the kernel (up to the details in brackets).
    head = reason.split(" (got")[0].split(":")[0]
    assert any(msg.startswith(head) for msg in _kernel_assert_messages()), (head, reason)


def test_legal_base_config():
    assert C.FlashConfig(**BASE).is_legal() == (True, "")


def test_smem_limit_argument():
    cfg = C.FlashConfig(head_dim=256, block_r=128, block_c=64, warps=8, stages=1, causal=False,
                        dtype="float16")
    assert cfg.smem_bytes() == (128 + 2 * 64) * 256 * 2
    assert cfg.is_legal(C.SMEM_LIMIT_SM90)[0] and cfg.is_legal(C.SMEM_LIMIT_SM80)[0]
    ok, reason = cfg.is_legal(C.SMEM_LIMIT_SM86)
    assert not ok and "shared memory" in reason


@pytest.mark.parametrize("head_dim, row_bytes", [(64, 128), (128, 256), (256, 512),
                                                  (80, 176), (96, 208), (16, 48), (112, 240)])
def test_row_layout_swizzled_or_padded(head_dim, row_bytes):
    cfg = C.FlashConfig(head_dim, 64, 32, 4, 2, False, "float16")
    assert cfg.row_bytes == row_bytes
    assert cfg.swizzled == (head_dim % 64 == 0)
    assert cfg.smem_bytes() == (64 + 2 * 2 * 32) * row_bytes


def test_derived_shapes():
    cfg = C.FlashConfig(128, 128, 64, 4, 1, True, "bfloat16")
    assert cfg.threads == 128 and cfg.rows_per_warp == 32 and cfg.m_tiles == 2
    assert cfg.acc_regs == 2 * (64 // 8 + 128 // 8) * 4 == 192
    assert not cfg.q_in_registers
    assert C.FlashConfig(128, 64, 64, 4, 2, True, "bfloat16").q_in_registers
    assert cfg.grid(batch=2, num_heads=3, seq_q=257) == (3, 3, 2)


def test_constants_dict():
    cfg = C.FlashConfig(64, 128, 64, 4, 2, True, "float16")
    base_variant = {"ROPE": 0, "ROPE_TABLE": 0, "ALIBI": 0, "WINDOW": 0, "SOFTCAP": 0}
    assert cfg.constants() == {"HEAD_DIM": 64, "BLOCK_R": 128, "BLOCK_C": 64, "WARPS": 4,
                               "STAGES": 2, "CAUSAL": 1, "DTYPE": 0, **base_variant}


@pytest.mark.parametrize("spelling, name", [("bfloat16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
                                            (1, "bfloat16"), ("float16", "float16"),
                                            ("torch.float16", "float16"), (0, "float16"),
                                            (np.dtype("float16"), "float16")])
def test_dtype_spellings(spelling, name):
    assert C.FlashConfig(64, 64, 64, 4, 2, False, spelling).dtype == name


@pytest.mark.parametrize("field, value, exc", [
    ("dtype", "float32", TypeError), ("dtype", 2, ValueError), ("dtype", True, TypeError),
    ("block_r", 64.0, TypeError), ("warps", "4", TypeError), ("causal", 2, TypeError),
    ("causal", "yes", TypeError),
])
def test_bad_field_types(field, value, exc):
    with pytest.raises(exc, match=field):
        C.FlashConfig(**{**BASE, field: value})


# ------------------------------------------------------------------ sweep space
@pytest.mark.parametrize("head_dim", C.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_sweep_space_legal_unique(head_dim, causal):
    space = C.sweep_space(head_dim, causal, "bfloat16")
    assert space
    assert len({tuple(sorted(c.constants().items())) for c in space}) == len(space)
    for cfg in space:
        assert cfg.is_legal()[0] and cfg.head_dim == head_dim and cfg.causal == causal
        assert cfg.block_r in C.SWEEP_BLOCK_R and cfg.block_c in C.SWEEP_BLOCK_C
        assert cfg.warps in C.SWEEP_WARPS and cfg.stages in C.STAGE_CHOICES


def test_sweep_space_respects_smem_limit():
    small = C.sweep_space(256, False, "float16", smem_limit=C.SMEM_LIMIT_SM86)
    assert small and all(c.smem_bytes() <= C.SMEM_LIMIT_SM86 for c in small)
    assert len(small) < len(C.sweep_space(256, False, "float16"))


# ------------------------------------------------------------------ chooser
@pytest.mark.parametrize("head_dim", ALL_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chooser_returns_legal_configs(head_dim, causal, dtype):
    for seq_len in SEQ_LENS:
        cfg = C.choose_config(head_dim, seq_len, causal, dtype)
        assert cfg.is_legal() == (True, "")
        assert (cfg.head_dim, cfg.causal, cfg.dtype) == (head_dim, causal, dtype)
        entry, default = C.default_entry(head_dim, seq_len, causal, dtype)
        assert entry.reason and default.is_legal() == (True, "")
        # On Ampere's smaller shared memory the chooser still returns a legal config.
        small = C.choose_config(head_dim, seq_len, causal, dtype, C.SMEM_LIMIT_SM80)
        assert small.is_legal(C.SMEM_LIMIT_SM80) == (True, "")


@pytest.mark.parametrize("head_dim", C.SUPPORTED_HEAD_DIMS)
def test_chooser_picks_from_the_sweep_space(head_dim):
    for causal in (False, True):
        space = C.sweep_space(head_dim, causal, "bfloat16")
        for seq_len in SEQ_LENS:
            assert C.choose_config(head_dim, seq_len, causal, "bfloat16") in space


def test_short_sequences_get_their_own_entry():
    short = C.choose_config(128, 100, False, "bfloat16")
    long = C.choose_config(128, 100000, False, "bfloat16")
    assert short.block_r < long.block_r


@pytest.mark.parametrize("args, exc, match", [
    ((72, 100, False, "bfloat16"), ValueError, "head_dim"),
    ((0, 100, False, "bfloat16"), ValueError, "head_dim"),
    ((288, 100, False, "bfloat16"), ValueError, "head_dim"),
    ((64.0, 100, False, "bfloat16"), TypeError, "head_dim"),
    ((64, -1, False, "bfloat16"), ValueError, "seq_len"),
    ((64, 1.5, False, "bfloat16"), TypeError, "seq_len"),
    ((64, 100, 1, "bfloat16"), TypeError, "causal"),
    ((64, 100, False, "float32"), TypeError, "dtype"),
])
def test_chooser_rejects_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        C.choose_config(*args)


def test_every_default_entry_has_a_reason_and_is_legal():
    for entry in C.DEFAULT_TABLE:
        assert entry.reason.strip(), entry
        for causal in (False, True):
            cfg = C.FlashConfig(entry.head_dim, entry.block_r, entry.block_c, entry.warps,
                                entry.stages, causal, "bfloat16")
            assert cfg.is_legal() == (True, ""), (entry, cfg.is_legal())


@pytest.mark.parametrize("head_dim", C.SUPPORTED_HEAD_DIMS)
def test_default_table_covers_any_length(head_dim):
    for causal in (False, True):
        assert any(e.matches(head_dim, 10**9, causal) for e in C.DEFAULT_TABLE)
        assert any(e.matches(head_dim, 0, causal) for e in C.DEFAULT_TABLE)


# ------------------------------------------------------------------ specialisations
def test_all_specialisations_legal_and_unique():
    specs = C.all_specialisations()
    keys = [(n, tuple(sorted(c.items()))) for n, c in specs]
    assert specs and len(keys) == len(set(keys))
    seen = set()
    for name, consts in specs:
        assert name == C.KERNEL_NAME
        cfg = C.FlashConfig(consts["HEAD_DIM"], consts["BLOCK_R"], consts["BLOCK_C"],
                            consts["WARPS"], consts["STAGES"], bool(consts["CAUSAL"]),
                            consts["DTYPE"])
        assert cfg.constants() == consts
        assert cfg.is_legal() == (True, "")
        seen.add((cfg.head_dim, cfg.causal, cfg.dtype))
    assert seen == {(d, c, t) for d in C.SUPPORTED_HEAD_DIMS for c in (False, True) for t in DTYPES}


def test_family_specialisations_cover_the_chooser():
    from attnproto.ops import families

    specs = {tuple(sorted(c.items())) for _, c in families.get("mma").specialisations()}
    for head_dim in C.SUPPORTED_HEAD_DIMS:
        for causal in (False, True):
            for dtype in DTYPES:
                for seq_len in SEQ_LENS:
                    consts = C.choose_config(head_dim, seq_len, causal, dtype).constants()
                    assert tuple(sorted(consts.items())) in specs


# ------------------------------------------------------------------ host-side dispatch
def test_the_op_reexports_the_one_flop_count():
    from attnproto import lab

    assert F.attention_flops is lab.attention_flops


def test_unknown_kernel_rejected_naming_kernel():
    x = np.zeros((1, 1, 4, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="kernel"):
        F.flash_forward(x, x, x, kernel="nope")


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
def test_host_arrays_rejected_by_cuda_families_naming_q(kernel):
    x = np.zeros((1, 1, 4, 64), dtype=np.float16)
    with pytest.raises(ValueError, match="q: .*CUDA tensors"):
        F.flash_forward(x, x, x, kernel=kernel)


def test_float64_rejected_by_the_front_door_naming_q():
    x = np.zeros((1, 1, 4, 64), dtype=np.float64)
    with pytest.raises(TypeError, match="q"):
        F.check_flash_inputs(x, x, x)
