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
