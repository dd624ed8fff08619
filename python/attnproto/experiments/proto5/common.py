"""Prototype 5's constants: what is compared, on which shapes, and the bars."""
from __future__ import annotations

from ..proto1.common import HIDDEN, TOKENS  # the same token budget as Prototype 1 (batch x N = 16K)

PROTOTYPE = "proto5"
DTYPE = "bfloat16"
HEAD_DIMS = (64, 128)
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQ_LENS = (1024, 4096)
#: The quick static phase (CI's `attnproto run all --quick`): one head dim, causal only (its
#: kernels hold both the unmasked and the masked loop): every compile is a second or more.
QUICK_STATIC_HEAD_DIMS, QUICK_STATIC_MASKS = (128,), (True,)
#: The arch every static compile targets (what the H200 runs: wgmma needs the "a" features).
ARCH = "sm_90a"
#: The hand-written families the DSL kernels are measured against.
HAND_WRITTEN = ("wgmma", "mma")
#: DSL families, in report order (those registered and supported on the machine take part).
DSL_FAMILIES = ("triton", "helion")
#: Kernel sources of the hand-written families, relative to the shader root.
SOURCES = {"wgmma": "cuda/flash_fwd_wgmma.cu", "mma": "cuda/flash_fwd_mma.cu"}
STATIC_PHASE, MEASURED_PHASE = "static", "measured"
WARMUP, ITERS, QUICK_ITERS = 3, 30, 5
#: A DSL kernel is "good enough" where it keeps this share of our best hand-written kernel's
#: TFLOPS: the same 10 % band Prototype 1 allows causal masking to cost.
GOOD_ENOUGH_RATIO = 0.9
TERA, MS = 1e12, 1e-3

__all__ = ["ARCH", "DSL_FAMILIES", "DTYPE", "GOOD_ENOUGH_RATIO", "HAND_WRITTEN", "HEAD_DIMS", "HIDDEN", "ITERS",
           "MEASURED_PHASE", "MS", "PROTOTYPE", "QUICK_ITERS", "QUICK_SEQ_LENS", "QUICK_STATIC_HEAD_DIMS",
           "QUICK_STATIC_MASKS", "SEQ_LENS", "SOURCES", "STATIC_PHASE", "TERA", "TOKENS", "WARMUP"]
