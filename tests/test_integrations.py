"""attnproto inside frameworks: the torch custom ops (schema, fake implementations, mutations
through torch.library.opcheck; results against FP64; torch.compile with fullgraph) and the
Hugging Face transformers attention backend (a Llama-architecture model with seeded random
weights: logits and greedy generation equal to transformers' eager attention). The CPU path
runs everywhere; the CUDA path is marked gpu."""
from __future__ import annotations

import numpy as np
import pytest

from attnproto import ref

torch = pytest.importorskip("torch")
from attnproto.integrations import torch_ops  # noqa: E402, F401  (registers torch.ops.attnproto)

OPS = torch.ops.attnproto


def _qkv(seed, b=2, hq=4, hkv=2, nq=9, nkv=13, d=16, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, nkv, d), mk(b, hkv, nkv, d)


def _pool(k, v, block_size, seed=0):
    """Contiguous [B, Hkv, N, D] -> a scattered NHD pool through append_kv (the op under test)."""
    b, hkv, n, d = k.shape
    used = -(-n // block_size)
    nb = b * used + 3
    ids = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))[:b * used].to(torch.int32)
    table = ids.view(b, used).contiguous().to(k.device)
    kc = torch.full((nb, block_size, hkv, d), float("nan"), dtype=k.dtype, device=k.device)
    vc = torch.full_like(kc, float("nan"))
    OPS.append_kv(k, v, kc, vc, table, torch.zeros(b, dtype=torch.int32, device=k.device))
    return kc, vc, table, torch.full((b,), n, dtype=torch.int32, device=k.device)


# ------------------------------------------------------------------ torch ops (CPU path)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_op_matches_fp64_and_passes_opcheck(causal):
    q, k, v = _qkv(1)
    o, lse = OPS.flash_attention(q, k, v, causal, None)
    want, want_lse = ref.attention(q.numpy(), k.numpy(), v.numpy(), causal=causal, return_lse=True)
    np.testing.assert_allclose(o.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=1e-5)
    torch.library.opcheck(OPS.flash_attention.default, (q, k, v, causal, 0.3))


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("nq", [1, 3])
def test_append_then_paged_decode_ops(block_size, nq):
    q, k, v = _qkv(2, nq=nq, nkv=21)
    kc, vc, table, lens = _pool(k, v, block_size)
    o, lse = OPS.paged_decode(q, kc, vc, table, lens, None)
    want = ref.attention(q.numpy(), k.numpy(), v.numpy(), causal=nq > 1)
    np.testing.assert_allclose(o.numpy(), want, atol=1e-5)
    torch.library.opcheck(OPS.paged_decode.default, (q, kc, vc, table, lens, None))
    q3 = q[:, :, 0]
    o3, lse3 = OPS.paged_decode(q3, kc, vc, table, torch.full_like(lens, 5), None)
    assert o3.shape == q3.shape and lse3.shape == q3.shape[:2]


def test_append_kv_op_declares_its_mutations_and_checks_positions():
    _, k, v = _qkv(3, nkv=8)
    kc, vc, table, _ = _pool(k, v, 4)
    args = (k[:, :, :1], v[:, :, :1], kc.clone(), vc.clone(), table, torch.tensor([3, 5], dtype=torch.int32))
    torch.library.opcheck(OPS.append_kv.default, args)
    with pytest.raises(ValueError, match=r"positions\[1\]"):
        OPS.append_kv(k[:, :, :1], v[:, :, :1], kc, vc, table, torch.tensor([0, 8], dtype=torch.int32))


def test_torch_compile_fullgraph_has_no_graph_break():
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            o, _ = OPS.flash_attention(q, k, v, True, None)
            return o * 2.0

    q, k, v = _qkv(4)
    compiled = torch.compile(Block(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), Block()(q, k, v))


# ------------------------------------------------------------------ transformers backend
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnproto.integrations import transformers as ap_hf

    ap_hf.register()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_llama_logits_and_generation_equal_eager_attention():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    got = {}
    for impl in ("eager", "attnproto"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        got[impl] = (logits, tokens)
    torch.testing.assert_close(got["attnproto"][0], got["eager"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got["attnproto"][1], got["eager"][1])


def test_padded_batch_and_dropout_refused_with_the_argument_named():
    from attnproto.integrations.transformers import attnproto_attention

    model = _tiny_llama()
    model.set_attn_implementation("attnproto")
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask)
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="dropout"):
        attnproto_attention(model.model.layers[0].self_attn, q, k, v, None, dropout=0.1)


# ------------------------------------------------------------------ CUDA path
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_ops_opcheck_and_graph_capture(dtype):
    q, k, v = _qkv(7, hq=8, hkv=2, nq=1, nkv=300, d=128, device="cuda", dtype=dtype)
    torch.library.opcheck(OPS.flash_attention.default, (q, k, v, True, None))
    kc, vc, table, lens = _pool(k, v, 16)
    torch.library.opcheck(OPS.paged_decode.default, (q, kc, vc, table, lens, None))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.paged_decode(q, kc, vc, table, lens, None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        o, _ = OPS.paged_decode(q, kc, vc, table, lens, None)
    graph.replay()
    torch.cuda.synchronize()
    want = ref.attention(q.double().cpu().numpy(), k.double().cpu().numpy(), v.double().cpu().numpy())
    np.testing.assert_allclose(o.double().cpu().numpy(), want, atol=2e-2)


# ------------------------------------------------------------------ paged KV cache
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("block_size", [1, 8])
def test_generate_with_paged_cache_equals_eager(block_size):
    from attnproto.integrations.paged_cache import PagedKVCache

    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(8))
    model.set_attn_implementation("eager")
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("attnproto")
    cache = PagedKVCache(model.config, batch_size=2, max_cache_len=64, block_size=block_size)
    got = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + 8 - 1


def test_chunked_prefill_through_the_paged_cache():
    """A prompt in two chunks (the second longer than a decode step: paged prefill) gives the
    logits of one eager pass over the whole prompt."""
    from attnproto.integrations.paged_cache import PagedKVCache

    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 22), generator=torch.Generator().manual_seed(9))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(ids).logits
    model.set_attn_implementation("attnproto")
    cache = PagedKVCache(model.config, batch_size=2, max_cache_len=32, block_size=8)
    with torch.no_grad():
        first = model(ids[:, :12], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 12:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_cache_len"):
        with torch.no_grad():
            model(ids[:, :11], past_key_values=cache, use_cache=True)


def test_paged_prefill_op_opcheck():
    q, k, v = _qkv(10, nq=10, nkv=25)
    kc, vc, table, lens = _pool(k, v, 8)
    o, _ = OPS.paged_prefill(q, kc, vc, table, lens, None)
    np.testing.assert_allclose(o.numpy(), ref.attention(q.numpy(), k.numpy(), v.numpy(), causal=True), atol=1e-5)
    torch.library.opcheck(OPS.paged_prefill.default, (q, kc, vc, table, lens, None))


def test_paged_cache_arguments_checked():
    from attnproto.integrations.paged_cache import PagedKVCache

    model = _tiny_llama()
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(model.config, batch_size=1, max_cache_len=8, block_size=3)
    with pytest.raises(ValueError, match="max_cache_len"):
        PagedKVCache(model.config, batch_size=1, max_cache_len=0)


# ------------------------------------------------------------------ RoPE fused into the store
def _rope_case(seed, t=5, device="cpu", dtype=torch.float32, d=16, hq=4, hkv=2, bs=4):
    from attnproto.ops.paged_rope import rope_tables

    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(2, hq, t, d), mk(2, hkv, t, d), mk(2, hkv, t, d)
    cos, sin = rope_tables(64, d, device=device)
    per_seq = 64 // bs                      # capacity 64 tokens, the RoPE tables' rows
    nb = 2 * per_seq + 2
    table = torch.randperm(nb, generator=g)[:2 * per_seq].view(2, -1).to(torch.int32).contiguous().to(device)
    kc = torch.zeros(nb, bs, hkv, d, dtype=dtype, device=device)
    return q, k, v, kc, torch.zeros_like(kc), table, cos, sin


def test_rope_append_rotates_q_and_stores_rotated_k_and_plain_v():
    q, k, v, kc, vc, table, cos, sin = _rope_case(11)
    pos = torch.tensor([3, 9], dtype=torch.int32)
    q_rot = OPS.rope_append(q, k, v, kc, vc, table, pos, cos, sin)
    p = (pos.long()[:, None] + torch.arange(q.shape[2])).numpy()[:, None, :]
    np.testing.assert_allclose(q_rot.numpy(), ref.rope(q.numpy(), positions=p), atol=1e-5)
    bs = kc.shape[1]
    for b in range(2):
        for i in range(q.shape[2]):
            at = int(pos[b]) + i
            page, slot = int(table[b, at // bs]), at % bs
            np.testing.assert_allclose(kc[page, slot].numpy(), ref.rope(k.numpy(), positions=p)[b, :, i], atol=1e-5)
            assert torch.equal(vc[page, slot], v[b, :, i])
    torch.library.opcheck(OPS.rope_append.default, (q, k, v, kc.clone(), vc.clone(), table, pos, cos, sin))
    with pytest.raises(ValueError, match="positions"):
        OPS.rope_append(q, k, v, kc, vc, table, torch.tensor([0, 62], dtype=torch.int32), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        OPS.rope_append(q, k, v, kc, vc, table, pos, cos[:, :4].contiguous(), sin[:, :4].contiguous())


@pytest.mark.parametrize("t", [3, 12])
def test_fused_prefill_then_decode_equals_attention_over_rotated_qk(t):
    """fused_prefill of a prompt chunk (t <= 8: the decode kernel, else paged prefill), then one
    rope_append + paged_decode step: both equal FP64 attention of RoPE'd Q/K."""
    q, k, v, kc, vc, table, cos, sin = _rope_case(12, t=t)
    zero = torch.zeros(2, dtype=torch.int32)
    o, lse = OPS.fused_prefill(q, k, v, kc, vc, table, zero, cos, sin, None)
    pos = np.arange(t)
    qr, kr = ref.rope(q.numpy(), positions=pos), ref.rope(k.numpy(), positions=pos)
    np.testing.assert_allclose(o.numpy(), ref.attention(qr, kr, v.numpy(), causal=True), atol=1e-5)
    torch.library.opcheck(OPS.fused_prefill.default, (q, k, v, kc.clone(), vc.clone(), table, zero, cos, sin, 0.25))
    q1, k1, v1 = q[:, :, :1] * 0.5, k[:, :, :1] * 2.0, v[:, :, :1] + 1.0
    lens = torch.full((2,), t, dtype=torch.int32)
    q1r = OPS.rope_append(q1, k1, v1, kc, vc, table, lens, cos, sin)
    o1, _ = OPS.paged_decode(q1r, kc, vc, table, lens + 1, None)
    kall = np.concatenate([kr, ref.rope(k1.numpy(), positions=np.array([t]))], axis=2)
    vall = np.concatenate([v.numpy(), v1.numpy()], axis=2)
    want = ref.attention(ref.rope(q1.numpy(), positions=np.array([t])), kall, vall)
    np.testing.assert_allclose(o1.numpy(), want, atol=1e-5)


# ------------------------------------------------------------------ padded batches, errors, compile
def _left_padded(lens, seed=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in lens]
    t = max(lens)
    ids = torch.zeros(len(lens), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return prompts, ids, mask


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("lens", [(12, 5, 9), (4, 7)])
def test_left_padded_batch_equals_eager_per_prompt(lens):
    """A batch of prompts of different lengths (left padding, attention_mask): each sequence is
    stored without its padding (its own context length) and generates what eager attention
    generates for the prompt alone; the real positions' logits match too. (4, 7): a prompt short
    enough for the decode kernel's prefill path."""
    from attnproto.integrations.paged_cache import PagedKVCache

    model = _tiny_llama()
    prompts, ids, mask = _left_padded(lens)
    t = ids.shape[1]
    model.set_attn_implementation("eager")
    want = [model.generate(p[None], max_new_tokens=6, do_sample=False)[0, len(p):] for p in prompts]
    with torch.no_grad():
        want_logits = [model(p[None]).logits[0] for p in prompts]
    model.set_attn_implementation("attnproto")
    cache = PagedKVCache(model.config, batch_size=len(lens), max_cache_len=32, block_size=8)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)[:, t:]
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    assert cache.context_lens().tolist() == [n + 6 - 1 for n in lens]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=PagedKVCache(
            model.config, batch_size=len(lens), max_cache_len=32, block_size=8), use_cache=True).logits
    for i, n in enumerate(lens):
        torch.testing.assert_close(logits[i, t - n:], want_logits[i], atol=1e-5, rtol=1e-5)


def test_right_padding_wrong_dtype_head_dim_and_full_cache_refused():
    from attnproto.integrations.paged_cache import PagedKVCache
    from attnproto.integrations.transformers import check_supported

    model = _tiny_llama()
    model.set_attn_implementation("attnproto")
    ids = torch.randint(1, 128, (2, 6))
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=right, past_key_values=PagedKVCache(model.config, batch_size=2, max_cache_len=16),
              use_cache=True)
    with pytest.raises(TypeError, match="query: dtype float64"):
        model.double()(ids)
    with pytest.raises(ValueError, match="head_dim: 96"):
        check_supported("cuda", torch.bfloat16, 96)
    with pytest.raises(TypeError, match="float32"):
        check_supported("cuda", torch.float32, 64)
    model.float()
    cache = PagedKVCache(model.config, batch_size=2, max_cache_len=8)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="cache is full"):
            model(ids[:, :3], past_key_values=cache, use_cache=True)


def test_model_forward_compiles_fullgraph_with_no_graph_break():
    """transformers' Llama forward with attn_implementation="attnproto" under torch.compile: one
    graph (dynamo's explain counts 0 breaks) and the eager result."""
    model = _tiny_llama()
    model.set_attn_implementation("attnproto")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    fwd = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fwd)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), fwd(ids))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_graph_decoder_eager_steps_equal_generate():
    from attnproto.integrations.models import GraphDecoder, build_model
    from attnproto.integrations.paged_cache import PagedKVCache

    model = build_model(shape="tiny", dtype=torch.float32, attn="eager")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False)[:, 10:]
    model.set_attn_implementation("attnproto")
    cache = PagedKVCache(model.config, batch_size=2, max_cache_len=18, block_size=8)
    with torch.no_grad():
        first = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    dec = GraphDecoder(model, cache, first)
    assert torch.equal(torch.cat([first[:, None], dec.run(8)], dim=1), want)
    with pytest.raises(ValueError, match="cache is full"):
        dec.step()


# ------------------------------------------------------------------ CUDA: RoPE store, captured decode step
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 40])
def test_cuda_rope_append_and_fused_prefill_match_the_cpu_ops(dtype, t):
    case = _rope_case(13, t=t, device="cuda", dtype=dtype, d=64, hq=8, hkv=2, bs=16)
    q, k, v, kc, vc, table, cos, sin = case
    pos = torch.tensor([0, 64 - t], dtype=torch.int32, device="cuda")
    hq, hk, hv, hkc, hvc = (x.cpu().float() for x in (q, k, v, kc, vc))
    htable, hpos, hcos, hsin = table.cpu(), pos.cpu(), cos.cpu(), sin.cpu()
    q_rot = OPS.rope_append(q, k, v, kc, vc, table, pos, cos, sin)
    want_q = OPS.rope_append(hq, hk, hv, hkc, hvc, htable, hpos, hcos, hsin)
    torch.testing.assert_close(q_rot.float().cpu(), want_q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kc.float().cpu(), hkc, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(vc.float().cpu(), hvc, atol=0, rtol=0)
    torch.library.opcheck(OPS.rope_append.default, (q, k, v, kc.clone(), vc.clone(), table, pos, cos, sin))
    zero = torch.zeros(2, dtype=torch.int32, device="cuda")
    o, _ = OPS.fused_prefill(q, k, v, kc, vc, table, zero, cos, sin, None)
    ho, _ = OPS.fused_prefill(hq, hk, hv, hkc.clone(), hvc.clone(), htable, zero.cpu(), hcos, hsin, None)
    torch.testing.assert_close(o.float().cpu(), ho, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cuda_decode_step_captured_in_a_graph_equals_eager_steps():
    """TinyLlama's shape in bf16: the whole decode step (22 layers, store + paged decode, argmax)
    captured once and replayed gives the tokens of the same steps run eagerly."""
    from attnproto.integrations.models import GraphDecoder, build_model
    from attnproto.integrations.paged_cache import PagedKVCache

    model = build_model(shape="tinyllama", dtype=torch.bfloat16, device="cuda", attn="attnproto")
    prompts, ids, mask = _left_padded((40, 23, 31), seed=5)
    ids, mask = ids.cuda(), mask.cuda()
    runs = []
    for graph in (False, True):
        cache = PagedKVCache(model.config, batch_size=3, max_cache_len=80, block_size=16)
        with torch.no_grad():
            first = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        runs.append(GraphDecoder(model, cache, first, graph=graph).run(16))
        assert cache.context_lens().tolist() == [40 + 16, 23 + 16, 31 + 16]
    assert torch.equal(runs[0], runs[1])
