"""Prototype 8 constants: the sweeps, the timing counts, the budgets."""
from __future__ import annotations

PROTOTYPE = "framework"
#: The integration's source: what "lines of glue" counts (code lines: no blanks, comments, docstrings).
GLUE_MODULES = ("torch_ops", "transformers", "paged_cache")
E2E_IMPLS = ("eager", "sdpa", "flex_attention", "attnproto")
#: flex_attention compiles a kernel per shape (tens of seconds each): only in --full.
COMPILING_IMPLS = ("flex_attention",)
PREFILL_LENS = (512, 2048, 8192)
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (1024, 4096, 16384)
#: The default GPU sweep's decode points (batch, context): the issue's targets (32 x 4K, 64 x 16K) and
#: one latency-bound point; --full runs DECODE_BATCHES x DECODE_CONTEXTS.
DEFAULT_DECODE_POINTS = ((1, 1024), (32, 4096), (64, 16384))
BLOCK_SIZE = 16
DTYPE = "bfloat16"
PREFILL_WARMUP, PREFILL_ITERS = 1, 3
DECODE_WARMUP, DECODE_ITERS = 2, 6
FULL_DECODE_ITERS = 16
#: Wall-clock budget of the whole GPU run (the default mode must end within 7 minutes on an H200),
#: and what a point may take at most; a point whose estimate exceeds what is left is skipped, recorded.
GPU_BUDGET_S = 330.0
#: Environment variable that lowers (or raises) GPU_BUDGET_S for one run, e.g. to fit a device lease.
BUDGET_ENV = "ATTNPROTO_PROTO8_BUDGET_S"
FULL_GPU_BUDGET_S = 3600.0
#: Points whose KV (one copy per implementation, HF's cat needs a second) exceed this are skipped.
MAX_KV_BYTES = 40 * 2**30
#: Dispatch micro-benchmark: calls per sample, samples; the shape (TinyLlama's heads, one sequence).
DISPATCH_CALLS, DISPATCH_SAMPLES = 200, 5
DISPATCH_SHAPE = dict(batch=1, num_heads=32, num_kv_heads=4, head_dim=64, context=1024)
#: Bytes of the copy that measures the read bandwidth (far past the 50 MB L2).
COPY_BYTES = 4 * 2**30
US_PER_MS = 1e3
# quick / cpu
CPU_SHAPE = "tiny"
CPU_PROMPT, CPU_BATCH, CPU_CONTEXT, CPU_STEPS = 32, 2, 48, 4
CPU_ITERS = 3
CPU_DISPATCH_SHAPE = dict(batch=1, num_heads=4, num_kv_heads=2, head_dim=16, context=64)
CPU_DISPATCH_CALLS = 20
