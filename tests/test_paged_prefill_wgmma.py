"""Paged (chunked) prefill through the Hopper wgmma kernel (flash_fwd_wgmma, PAGE_SIZE > 0;
host side attnproto.ops.paged_prefill_wgmma) against the float64 reference
ref.paged_attention (on a permuted view of the [num_blocks, block_size, Hkv, D] pool).

Host-only and NVRTC tests run anywhere: the paged specialisations are listed for CI, illegal
block sizes fail with the kernel's message, the kernels keep no stack frame, and the launch's
arguments (tensor maps over the pool, params, argument order) are built on CPU tensors with a
stand-in backend. GPU tests (marked gpu) need an sm_90 device: every block size, D, dtype and
mask over mixed context lengths, a scattered table bit-identical to an identity one, equality
with the contiguous kernel, NaN-poisoned outputs, NaN in unused slots kept out of O, and a bad
page id or context length turning rows NaN without a fault.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnproto import ref
from attnproto.ops import flash_wgmma as fw
from attnproto.ops import paged_prefill_wgmma as pp
from attnproto.ops.families import wgmma as wgmma_family

ATOL, RTOL = 5e-3, 1e-2
DTYPES = ("float16", "bfloat16")
HOPPER_MAJOR = 9
NQ = 37                                # an odd chunk: partial query tiles


def _torch():
    return pytest.importorskip("torch")


# ------------------------------------------------------------------ specialisations
def test_every_paged_specialisation_is_listed_for_ci():
    listed = wgmma_family.FAMILY.specialisations()
    variant_keys = ("ROPE", "ROPE_TABLE", "ALIBI", "WINDOW", "SOFTCAP")
    # the base variant at every block size x D x mask x dtype; the paged variant specialisations
    # (ALiBi / window / soft cap, never RoPE) come on top of them
    paged_variants = [c for _, c in listed if c["PAGE_SIZE"] and any(c[k] for k in variant_keys)]
    assert paged_variants and not any(c["ROPE"] or c["ROPE_TABLE"] for c in paged_variants)
    paged = [(n, c) for n, c in listed if c["PAGE_SIZE"] and not any(c[k] for k in variant_keys)]
    want = {(p, d, causal, dt) for p in pp.PAGE_SIZES for d in fw.HEAD_DIMS for causal in (0, 1)
            for dt in fw.DTYPE_CODES.values()}
    got = {(c["PAGE_SIZE"], c["HEAD_DIM"], c["CAUSAL"], c["DTYPE"]) for _, c in paged}
    assert got == want and len(paged) == len(want)
    for _, c in paged:  # the default tiles of their head dim
        cfg = fw.default_config(c["HEAD_DIM"], bool(c["CAUSAL"]))
        assert (c["BLOCK_C"], c["STAGES"], c["CONSUMER_WG"]) == (cfg.block_c, cfg.stages, cfg.consumer_wg)
    assert all("PAGE_SIZE" in c for _, c in listed)


@pytest.mark.parametrize("page_size", [2, 4, 512])
def test_illegal_page_size_fails_to_compile_with_message(nvrtc, page_size):
    consts = fw.constants(fw.default_config(128, True), 128, True, "bfloat16", page_size)
    with pytest.raises(Exception, match="PAGE_SIZE must be 0 \\(contiguous K/V\\) or a paged-KV block size"):
        nvrtc.cuda_compile(fw.KERNEL_NAME, consts, "sm_90a")


@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("page_size", [1, 16])   # 1: the most boxes per producer lane
def test_paged_kernel_has_no_stack_frame(nvrtc, head_dim, page_size):
    from attnproto.ops import stitch

    consts = fw.constants(fw.default_config(head_dim, True), head_dim, True, "bfloat16", page_size)
    _, log, _ = nvrtc.cuda_compile(fw.KERNEL_NAME, consts, "sm_90a", "cubin", ["--ptxas-options=-v"])
    report = stitch.ptxas_report(log, fw.KERNEL_NAME)
    assert report["stack_frame_bytes"] == 0 and report["spill_bytes"] == 0, report
    assert "C7508" not in log   # setmaxnreg honoured


# ------------------------------------------------------------------ host layout
@pytest.mark.parametrize("page_size, block_c, rows", [
    (1, 128, 1), (8, 128, 8), (16, 128, 16), (128, 128, 128), (256, 128, 128),
    (32, 80, 16), (256, 80, 16), (8, 80, 8),
])
def test_box_rows(page_size, block_c, rows):
    assert pp.box_rows(page_size, block_c) == rows


def test_box_rows_rejects_block_size():
    with pytest.raises(ValueError, match="block_size"):
        pp.box_rows(4, 128)


def _cpu_case(torch, *, b=3, hq=4, hkv=2, nq=NQ, d=128, page=16, nb=11, max_blocks=5, dtype="bfloat16"):
    tdt = getattr(torch, dtype)
    q = torch.zeros((b, hq, nq, d), dtype=tdt)
    k = torch.zeros((nb, page, hkv, d), dtype=tdt)
    v = torch.zeros((nb, page, hkv, d), dtype=tdt)
    table = torch.zeros((b, max_blocks), dtype=torch.int32)
    ctx = torch.zeros((b,), dtype=torch.int32)
    out = torch.zeros((b, hq, nq, d), dtype=tdt)
    lse = torch.zeros((b, hq, nq), dtype=torch.float32)
    return q, k, v, table, ctx, out, lse


def test_paged_layout_of_a_packed_pool():
    torch = _torch()
    q, k, v, table, _, out, lse = _cpu_case(torch)
    lay = pp.paged_layout(q, k, v, table, scale=0.125, causal=True, out=out, lse=lse)
    cfg = fw.default_config(128, True)
    assert lay.config == cfg and lay.page_size == 16 and lay.box_rows == 16
    assert lay.pool_dims == (128, 16, 2, 11)
    row = 128 * fw.ELEMENT_BYTES
    assert lay.k_strides_bytes == (2 * row, row, 16 * 2 * row) == lay.v_strides_bytes
    assert lay.capacity == 5 * 16 and lay.num_blocks == 11
    assert lay.grid == (math.ceil(NQ / cfg.block_r) * 3 * 4, 1, 1) and lay.block == (cfg.threads, 1, 1)
    assert lay.shared_bytes == fw.shared_bytes(cfg, 128)
    assert lay.constants == fw.constants(cfg, 128, True, "bfloat16", 16)
    p = lay.params
    assert (int(p["seq_kv"]), int(p["block_size"]), int(p["max_blocks_per_seq"]), int(p["num_blocks"])) == (80, 16, 5, 11)
    assert (int(p["seq_q"]), int(p["num_kv_heads"]), float(p["scale"])) == (NQ, 2, 0.125)
    assert tuple(p["k_stride"]) == (16 * 2 * 128, 128, 2 * 128)        # {block, kv head, token}
    assert tuple(p["o_stride"]) == tuple(out.stride())[:3] and tuple(p["lse_stride"]) == tuple(lse.stride())[:2]


def test_paged_layout_of_strided_views():
    torch = _torch()
    q, _, _, _, _, out, lse = _cpu_case(torch, hkv=1)
    # an HND buffer [nb, Hkv, page, D] seen as NHD
    hnd = torch.zeros((11, 1, 16, 128), dtype=torch.bfloat16)
    k = hnd.permute(0, 2, 1, 3)
    table = torch.zeros((3, 5), dtype=torch.int32)
    lay = pp.paged_layout(q, k, k, table, scale=0.1, causal=False, out=out, lse=lse)
    row = 128 * fw.ELEMENT_BYTES
    # the kv-head axis has extent 1: its packed stride stands in for torch's
    assert lay.k_strides_bytes == (row, row, 16 * row)
    assert lay.max_blocks == 5 and lay.capacity == 80


@pytest.mark.parametrize("mutate, match", [
    ("k_d_stride", "head_dim axis must be contiguous"),
    ("k_odd_stride", "16-byte"),
    ("table_cols", "block_table"),
    ("table_rows", "rows must be contiguous"),
    ("table_rank", "block_table"),
    ("v_shape", "v_cache"),
    ("page_4", "block_size"),
    ("capacity", "capacity"),
    ("heads", "kv heads"),
])
def test_paged_layout_rejects(mutate, match):
    torch = _torch()
    q, k, v, table, _, out, lse = _cpu_case(torch)
    if mutate == "k_d_stride":
        k = torch.zeros((11, 16, 2, 256), dtype=torch.bfloat16)[..., ::2]
    elif mutate == "k_odd_stride":
        k = torch.zeros((11, 16, 2, 132), dtype=torch.bfloat16)[..., :128]   # head stride 132 elements = 264 B
    elif mutate == "table_cols":
        table = torch.zeros((3, 10), dtype=torch.int32)[:, ::2]
    elif mutate == "table_rows":
        table = torch.zeros((3, 9), dtype=torch.int32)[:, 2:7]     # a column slice: row stride 9
    elif mutate == "table_rank":
        table = torch.zeros((3,), dtype=torch.int32)
    elif mutate == "v_shape":
        v = torch.zeros((12, 16, 2, 128), dtype=torch.bfloat16)
    elif mutate == "page_4":
        k = v = torch.zeros((11, 4, 2, 128), dtype=torch.bfloat16)
    elif mutate == "capacity":
        table = torch.zeros((3, pp.MAX_CAPACITY // 16), dtype=torch.int32)
    elif mutate == "heads":
        k = v = torch.zeros((11, 16, 3, 128), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        pp.paged_layout(q, k, v, table, scale=0.1, causal=True, out=out, lse=lse)


def test_index_tensors_must_be_int32():
    torch = _torch()
    q, k, v, table, ctx, out, lse = _cpu_case(torch)
    with pytest.raises(TypeError, match="block_table"):
        pp.paged_layout(q, k, v, table.long(), scale=0.1, causal=True, out=out, lse=lse)
    with pytest.raises(TypeError, match="context_lens"):
        pp.prepare_paged_prefill_wgmma(q, k, v, table, ctx.long(), out=out, lse=lse, backend=_RecordingBackend())


class _RecordingBackend:
    """Stands in for the CUDA backend: records the tensor maps and the kernel asked for."""

    def __init__(self):
        self.maps, self.kernels = [], []

    def tensor_map(self, tensor, dtype, dims, strides_bytes, box, swizzle_bytes=0, oob_nan=False):
        self.maps.append((tensor, dtype, list(dims), list(strides_bytes), list(box), swizzle_bytes, oob_nan))
        return f"map{len(self.maps) - 1}"

    def kernel(self, name, **constants):
        self.kernels.append((name, constants))
        return "kernel"


def test_prepare_argument_order_and_maps():
    torch = _torch()
    q, k, v, table, ctx, out, lse = _cpu_case(torch, page=1, nb=90, max_blocks=80)
    be = _RecordingBackend()
    launch = pp.prepare_paged_prefill_wgmma(q, k, v, table, ctx, scale=0.2, causal=True, out=out, lse=lse,
                                            backend=be)
    args = launch.args
    assert len(args) == 11
    assert args[1:4] == ["map0", "map1", "map2"]
    assert args[4] is out and args[5] is lse and args[6] is table and args[7] is ctx
    # rope_cos, rope_sin, alibi_slopes: the paged kernel is the base variant (null buffers)
    assert [type(a) for a in args[8:]] == [np.uint64] * 3 and all(int(a) == 0 for a in args[8:])
    assert int(args[0]["block_size"]) == 1 and int(args[0]["seq_kv"]) == 80
    assert int(args[0]["num_blocks"]) == 90 and int(args[0]["max_blocks_per_seq"]) == 80
    q_map, k_map, v_map = be.maps
    cfg = fw.default_config(128, True)
    assert q_map[0] is q and q_map[2] == [128, NQ, 4, 3] and q_map[4] == [fw.SWIZZLE_COLS, cfg.block_r, 1, 1]
    assert k_map[0] is k and v_map[0] is v
    assert k_map[2] == [128, 1, 2, 90] and k_map[4] == [fw.SWIZZLE_COLS, 1, 1, 1]   # one-row boxes
    assert k_map[5] == fw.SWIZZLE_BYTES and not k_map[6]                          # zero fill
    assert be.kernels == [(fw.KERNEL_NAME, fw.constants(cfg, 128, True, "bfloat16", 1))]
    assert launch.problem.out is out and launch.problem.lse is lse and launch.shared_bytes == fw.shared_bytes(cfg, 128)


def test_contiguous_launch_passes_null_pool_arguments():
    assert [type(a) for a in fw.CONTIGUOUS_POOL_ARGS] == [np.uint64, np.uint64]
    assert all(int(a) == 0 for a in fw.CONTIGUOUS_POOL_ARGS)


# ------------------------------------------------------------------ GPU
@pytest.fixture
def hopper(cuda):
    if cuda.info["compute_major"] != HOPPER_MAJOR:
        pytest.skip(f"needs an sm_90 GPU, got {cuda.info['arch']}")
    return cuda


def _gen(torch):
    return torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))


class _Case:
    """A pool whose unused slots and spare pages hold NaN, a table (scattered or identity)
    whose unused entries hold ids out of range, and Q; host copies for the reference."""

    def __init__(self, torch, dtype, ctx, nq, hq, hkv, d, page, gen, *, scatter=True, spare_pages=3):
        tdt = getattr(torch, dtype)
        self.torch, self.ctx_list, self.page = torch, list(ctx), page
        used = [-(-c // page) for c in ctx]
        self.used = used
        max_blocks = max(max(used), 1) + 1                 # one more column than any sequence needs
        nb = sum(used) + spare_pages
        data = torch.randn((nb, page, hkv, d), generator=gen).to(tdt), torch.randn((nb, page, hkv, d), generator=gen).to(tdt)
        ids = torch.randperm(nb, generator=gen) if scatter else torch.arange(nb)
        table = torch.empty((len(ctx), max_blocks), dtype=torch.int32)
        live = torch.zeros((nb, page), dtype=torch.bool)
        nxt = 0
        for b, (c, u) in enumerate(zip(ctx, used)):
            row = ids[nxt:nxt + u]
            nxt += u
            table[b, :u] = row.to(torch.int32)
            # unused entries: ids the kernel must never read (alternately negative and too large)
            for j in range(u, max_blocks):
                table[b, j] = -5 if j % 2 else nb + 1000
            for t in range(c):
                live[row[t // page], t % page] = True
        nan = float("nan")
        self.k, self.v = (x.masked_fill(~live[:, :, None, None], nan).cuda() for x in data)
        self.table = table.cuda()
        self.table_host = table
        self.ctx = torch.tensor(ctx, dtype=torch.int32).cuda()
        self.q = torch.randn((len(ctx), hq, nq, d), generator=gen).to(tdt).cuda()
        self.num_blocks = nb

    def run(self, causal, scale=None, table=None, ctx=None, k=None, v=None):
        torch = self.torch
        b, hq, nq, d = self.q.shape
        out = torch.full((b, hq, nq, d), float("nan"), dtype=self.q.dtype, device="cuda")
        lse = torch.full((b, hq, nq), float("nan"), dtype=torch.float32, device="cuda")
        launch = pp.prepare_paged_prefill_wgmma(self.q, self.k if k is None else k, self.v if v is None else v,
                                                self.table if table is None else table,
                                                self.ctx if ctx is None else ctx, scale=scale, causal=causal,
                                                out=out, lse=lse)
        o_got, lse_got = launch.launch()
        torch.cuda.synchronize()
        assert o_got is out and lse_got is lse
        return out, lse

    def reference(self, causal, scale=None):
        host = lambda x: x.float().cpu().numpy().astype(np.float64)  # noqa: E731
        kh, vh = (host(x.permute(0, 2, 1, 3)) for x in (self.k, self.v))   # [nb, Hkv, page, D]
        return ref.paged_attention(host(self.q), kh, vh, self.table_host.numpy(), np.array(self.ctx_list),
                                   scale=scale, causal=causal, return_lse=True)


def _assert_matches(case, out, lse, causal, label, scale=None):
    o_ref, lse_ref = case.reference(causal, scale)
    o_np, lse_np = out.float().cpu().numpy(), lse.cpu().numpy()
    assert not np.isnan(o_np).any(), f"{label}: NaN in O (unwritten, or garbage of unused slots reached it)"
    assert not np.isnan(lse_np).any(), f"{label}: NaN in LSE"
    ref.assert_allclose(o_np, o_ref, atol=ATOL, rtol=RTOL, msg=f"{label} O")
    ref.assert_allclose(lse_np, lse_ref, atol=ATOL, rtol=RTOL, msg=f"{label} LSE")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("page", pp.PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(hopper, dtype, page, head_dim, causal):
    """Mixed contexts in one batch: 1, 17, a multiple of the page, more than one key tile."""
    torch = _torch()
    ctx = [1, 17, 3 * page, 333]
    case = _Case(torch, dtype, ctx, NQ, 4, 2, head_dim, page, _gen(torch))
    out, lse = case.run(causal)
    _assert_matches(case, out, lse, causal, f"{dtype} page={page} D={head_dim} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 200])
@pytest.mark.parametrize("page", [1, 16, 256])
def test_empty_and_short_contexts(hopper, page, nq, causal):
    """ctx 0 gives O = 0, LSE = -inf; ctx < Nq leaves the first rows without keys (causal)."""
    torch = _torch()
    case = _Case(torch, "bfloat16", [0, 5, 1000], nq, 2, 1, 128, page, _gen(torch))
    out, lse = case.run(causal)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    _assert_matches(case, out, lse, causal, f"page={page} nq={nq} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("page", [1, 16, 128])
def test_scattered_table_bit_identical_to_identity(hopper, page, head_dim, causal):
    torch = _torch()
    gen = _gen(torch)
    ident = _Case(torch, "float16", [700, 129, 64], 300, 4, 2, head_dim, page, gen, scatter=False)
    perm = torch.randperm(ident.num_blocks, generator=gen)
    k_s, v_s = torch.empty_like(ident.k), torch.empty_like(ident.v)
    k_s[perm.cuda()], v_s[perm.cuda()] = ident.k, ident.v              # page i moves to perm[i]
    table_s = ident.table_host.clone()
    for b, u in enumerate(ident.used):
        table_s[b, :u] = perm[table_s[b, :u].long()].to(torch.int32)
    o_i, lse_i = ident.run(causal)
    o_s, lse_s = ident.run(causal, table=table_s.cuda(), k=k_s, v=v_s)
    assert torch.equal(o_i, o_s) and torch.equal(lse_i, lse_s)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", fw.HEAD_DIMS)
@pytest.mark.parametrize("page", [8, 16, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_contiguous_kernel(hopper, dtype, page, head_dim, causal):
    """Same K/V gathered contiguously through the contiguous kernel (same tiles): the visible
    keys' tiles are identical and masked keys contribute exact zeros in both, so the results
    agree bit for bit."""
    torch = _torch()
    n = 1000
    case = _Case(torch, dtype, [n, n], 300, 6, 2, head_dim, page, _gen(torch))
    out, lse = case.run(causal, scale=0.07)
    gather = lambda cache: torch.stack([  # noqa: E731
        cache[case.table[b, :case.used[b]].long()].reshape(-1, cache.shape[2], head_dim)[:n].permute(1, 0, 2)
        for b in range(2)])
    k_c, v_c = gather(case.k), gather(case.v)
    o_c, lse_c = fw.flash_forward_wgmma(case.q, k_c, v_c, causal=causal, scale=0.07,
                                        config=fw.default_config(head_dim, causal))   # the paged kernel's tiles
    torch.cuda.synchronize()
    assert torch.equal(out, o_c) and torch.equal(lse, lse_c)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page", pp.PAGE_SIZES)
def test_nan_in_unused_slots_stays_out_of_o(hopper, page, causal):
    """The last page of every sequence is mostly NaN past ctx, and so are the spare pages."""
    torch = _torch()
    case = _Case(torch, "bfloat16", [page + 1, 2 * page + 3, 1], 64, 2, 2, 64, page, _gen(torch), spare_pages=8)
    assert torch.isnan(case.v).any()
    out, lse = case.run(causal)
    _assert_matches(case, out, lse, causal, f"page={page} causal={causal}")


def _rows_seeing(key, ctx, nq, causal):
    """Query rows of one sequence whose visible keys include ``key``."""
    rows = np.arange(nq)
    last = np.minimum(rows + ctx - nq, ctx - 1) if causal else np.full(nq, ctx - 1)
    return last >= key


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad_id", ["negative", "past_pool"])
@pytest.mark.parametrize("page", [1, 16, 256])
def test_bad_page_id_gives_nan_rows(hopper, page, bad_id, causal):
    """A table entry changed after the host's check: no read outside the pool, no fault; the
    rows that would read the page are NaN, the other sequences are untouched, and no row of
    the damaged sequence is a finite wrong value."""
    torch = _torch()
    nq, ctx0 = 150, 600
    case = _Case(torch, "bfloat16", [ctx0, 400], nq, 2, 1, 128, page, _gen(torch))
    o_ref, lse_ref = case.reference(causal)
    j = case.used[0] // 2                                       # a page in the middle of sequence 0
    table = case.table_host.clone()
    table[0, j] = -1 if bad_id == "negative" else case.num_blocks + 7
    out, lse = case.run(causal, table=table.cuda())
    o_np, lse_np = out.float().cpu().numpy(), lse.cpu().numpy()
    seeing = _rows_seeing(j * page, ctx0, nq, causal)
    assert seeing.any()
    assert np.isnan(o_np[0][:, seeing]).all() and np.isnan(lse_np[0][:, seeing]).all()
    ref.assert_allclose(o_np[1], o_ref[1], atol=ATOL, rtol=RTOL, msg="undamaged sequence O")
    other = o_np[0][:, ~seeing]
    finite = np.isfinite(other).all(axis=-1)                   # rows not seeing it: exact, or NaN
    ref.assert_allclose(other[finite], o_ref[0][:, ~seeing][finite], atol=ATOL, rtol=RTOL, msg="rows not seeing it")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad_ctx", [-3, "capacity+1"])
def test_context_length_out_of_range_gives_nan_sequence(hopper, bad_ctx, causal):
    torch = _torch()
    case = _Case(torch, "float16", [300, 200], 64, 2, 2, 128, 16, _gen(torch))
    o_ref, _ = case.reference(causal)
    capacity = case.table_host.shape[1] * 16
    ctx = case.ctx.clone()
    ctx[0] = capacity + 1 if bad_ctx == "capacity+1" else bad_ctx
    out, lse = case.run(causal, ctx=ctx)
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    ref.assert_allclose(out[1].float().cpu().numpy(), o_ref[1], atol=ATOL, rtol=RTOL, msg="undamaged sequence")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_strided_pool_view(hopper, causal):
    """An HND allocation [nb, Hkv, page, D] seen through a permuted view."""
    torch = _torch()
    case = _Case(torch, "bfloat16", [500, 77], 100, 4, 2, 128, 32, _gen(torch))
    k_view = case.k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    v_view = case.v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not k_view.is_contiguous()
    out, lse = case.run(causal, k=k_view, v=v_view)
    _assert_matches(case, out, lse, causal, f"strided causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("page", [1, 16, 128])
def test_bitwise_repeatable_and_no_local_memory(hopper, page):
    """A race in the gather (per-lane boxes, the V-tail zeroing) shows up as run-to-run differences."""
    torch = _torch()
    case = _Case(torch, "bfloat16", [3001, 1777, 40], 1000, 4, 2, 128, page, _gen(torch))
    runs = [case.run(True) for _ in range(3)]
    for o, lse in runs[1:]:
        assert torch.equal(o, runs[0][0]) and torch.equal(lse, runs[0][1])
    cfg = fw.default_config(128, True)
    kern = hopper.kernel(fw.KERNEL_NAME, **fw.constants(cfg, 128, True, "bfloat16", page))
    assert kern.resources["local_bytes"] == 0
