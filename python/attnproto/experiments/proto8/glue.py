"""Prototype 8's framework-extension measures: lines of glue, graph breaks, opcheck, dispatch
overhead of the op against a direct kernel call and an eager SDPA call, CUDA-graph replay cost."""
from __future__ import annotations

import ast
import importlib
import inspect
import io
import time
import tokenize
from typing import Any, Callable, Dict, List

from ... import lab
from ..registry import ExperimentContext, ExperimentError
from . import common as C


def code_lines(source: str) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    doc_lines = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - doc_lines)


def glue_lines() -> Dict[str, int]:
    out = {}
    for name in C.GLUE_MODULES:
        mod = importlib.import_module(f"attnproto.integrations.{name}")
        out[name] = code_lines(inspect.getsource(mod))
    return out


def graph_breaks(model: Any, ids: Any) -> int:
    """torch._dynamo.explain of the model's forward (our attention, no cache): graph breaks."""
    import torch  # noqa: PLC0415

    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda x: model(input_ids=x, use_cache=False).logits)(ids)
    return int(ex.graph_break_count)


def opcheck_all(device: str, dtype: Any) -> Dict[str, bool]:
    """torch.library.opcheck of every attnproto op on small inputs; op -> passed."""
    import torch  # noqa: PLC0415

    from ...integrations import torch_ops  # noqa: F401, PLC0415
    from ...ops.paged_rope import rope_tables  # noqa: PLC0415

    ops = torch.ops.attnproto
    g = torch.Generator().manual_seed(0)
    d = 64 if device == "cuda" else 16
    b, hq, hkv, t, bs, nb = 2, 4, 2, 12, 16, 8
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(b, hq, t, d), mk(b, hkv, t, d), mk(b, hkv, t, d)
    table = torch.randperm(nb, generator=g)[:b * 2].view(b, 2).to(torch.int32).contiguous().to(device)
    pool = lambda: torch.zeros(nb, bs, hkv, d, dtype=dtype, device=device)  # noqa: E731
    zeros = torch.zeros(b, dtype=torch.int32, device=device)
    cos, sin = rope_tables(64, d, device=device)
    kc, vc = pool(), pool()
    ops.append_kv(k, v, kc, vc, table, zeros)
    lens = torch.full((b,), t, dtype=torch.int32, device=device)
    cases = {
        "flash_attention": (ops.flash_attention.default, (q, k, v, True, None)),
        "append_kv": (ops.append_kv.default, (k[:, :, :1], v[:, :, :1], pool(), pool(), table, lens)),
        "paged_decode": (ops.paged_decode.default, (q[:, :, :1], kc, vc, table, lens, None)),
        "paged_prefill": (ops.paged_prefill.default, (q, kc, vc, table, lens, None)),
        "rope_append": (ops.rope_append.default, (q, k, v, pool(), pool(), table, zeros, cos, sin)),
        "fused_prefill": (ops.fused_prefill.default, (q, k, v, pool(), pool(), table, zeros, cos, sin, None)),
    }
    out = {}
    for name, (op, args) in cases.items():
        try:
            torch.library.opcheck(op, args)
            out[name] = True
        except Exception as exc:  # noqa: BLE001 - a failing check is the measurement
            out[name] = False
            print(f"proto8: opcheck {name} failed: {exc}")
    return out


def per_call_us(fn: Callable[[], Any], sync: Callable[[], None], calls: int, samples: int) -> lab.TimingStats:
    """Host time per call of ``calls`` back-to-back calls (synchronised at the end), in ms per call."""
    per = []
    fn()
    sync()
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per.append((time.perf_counter() - t0) * 1e3 / calls)
    return lab.timing(per, clock="host")


def dispatch(ctx: ExperimentContext, device: str, dtype: Any) -> List[dict]:
    """The op, our kernel called directly, eager SDPA; on CUDA also the op replayed from a CUDA graph."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from ... import cpu as _cpu  # noqa: PLC0415
    from ...integrations import torch_ops  # noqa: F401, PLC0415

    s = C.DISPATCH_SHAPE if device == "cuda" else C.CPU_DISPATCH_SHAPE
    calls = C.DISPATCH_CALLS if device == "cuda" else C.CPU_DISPATCH_CALLS
    b, hq, hkv, d, n = s["batch"], s["num_heads"], s["num_kv_heads"], s["head_dim"], s["context"]
    g = torch.Generator().manual_seed(1)
    mk = lambda *sh: torch.randn(*sh, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(b, hq, 1, d), mk(b, hkv, n, d), mk(b, hkv, n, d)
    bs = C.BLOCK_SIZE
    nb = b * (n // bs)
    table = torch.arange(nb, dtype=torch.int32, device=device).view(b, -1).contiguous()
    kc, vc = (x.view(b, hkv, n // bs, bs, d).permute(0, 2, 3, 1, 4).reshape(nb, bs, hkv, d).contiguous() for x in (k, v))
    lens = torch.full((b,), n, dtype=torch.int32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    op = lambda: torch.ops.attnproto.paged_decode(q, kc, vc, table, lens, None)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    if device == "cuda":
        from ...ops import paged  # noqa: PLC0415

        plan = paged.prepare_paged_decode(q, kc, vc, table, lens)
        direct = plan.launch
    else:
        kp, vp = kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3)
        direct = lambda: _cpu.paged_forward(q, kp, vp, table, lens)  # noqa: E731
    ref_out = sdpa()
    got, _ = op()
    err = float((got.float() - ref_out.float()).abs().max())
    if not err <= (2e-2 if device == "cuda" else 1e-4):
        raise ExperimentError(f"proto8 dispatch: the op differs from SDPA by {err:.3g}")
    rows = []
    base = {"sweep": "dispatch", "batch": b, "num_heads": hq, "num_kv_heads": hkv, "head_dim": d, "context": n,
            "dtype": str(dtype).replace("torch.", ""), "calls": calls}
    paths = {"op": op, "direct": direct, "sdpa": sdpa}
    if device == "cuda":
        paths["graph_replay"] = lab.capture_cuda_graph(op).replay
    for name, fn in paths.items():
        t = per_call_us(fn, sync, calls, C.DISPATCH_SAMPLES)
        rows.append(ctx.record({**base, "path": name}, {"per_call_us": t.median_ms * C.US_PER_MS}, t))
    if device == "cuda":
        kt = plan.time()
        rows.append(ctx.record({**base, "path": "kernel_device"}, {"per_call_us": kt.median_ms * C.US_PER_MS}, kt))
    return rows


def framework_records(ctx: ExperimentContext, model: Any, ids: Any, device: str, dtype: Any) -> List[dict]:
    stage_ms = []

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        stage_ms.append((time.perf_counter() - t0) * 1e3)
        return out
    lines = timed(glue_lines)
    breaks = timed(graph_breaks, model, ids)
    checks = timed(opcheck_all, device, dtype)
    # The record's figures are counts; its timing holds the three stages' wall times (one sample each).
    took = lab.timing(stage_ms, clock="host")
    base = {"sweep": "framework", "modules": ",".join(C.GLUE_MODULES), "timing": "stage wall times"}
    rec = ctx.record(base, {"glue_lines_count": float(sum(lines.values())),
                            **{f"glue_lines_{k}_count": float(v) for k, v in lines.items()},
                            "graph_breaks_count": float(breaks), "opcheck_passed_count": float(sum(checks.values())),
                            "opcheck_total_count": float(len(checks))}, took)
    return [rec] + dispatch(ctx, device, dtype)
