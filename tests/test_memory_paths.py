"""Training memory paths (npr_agent.policy): chunked attention, FlexAttention block masks, activation checkpointing,
and the chunked logprob head. Every path gives the dense path's logprobs and gradients; none builds a T x T mask.

Memory and timing figures are not tested here: ``python -m benchmarks.memory`` measures them.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_policy import NESTED, SEQUENTIAL, TWO_BLOCKS  # the same trajectories as the dense-path tests
from transformers import Qwen3Config, Qwen3ForCausalLM

import npr_agent.policy as policy
import npr_env
from npr_agent.checkpoint import build_model, enable_checkpointing
from npr_agent.config import ModelConfig, preset
from npr_agent.policy import (
    Sample,
    build_batch,
    logprob_chunk_rows,
    resolve_attn,
    token_logprobs,
    use_chunked_attention,
)
from npr_env import layout as L

CUDA = torch.cuda.is_available()
NO_CUDA = "needs CUDA: FlexAttention has no backward on CPU (and its kernels are compiled for the GPU)"


def tiny_model(attn: str = "sdpa", seed: int = 0, vocab: int | None = None, device="cpu") -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab or len(npr_env.load_tokenizer()), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=4096, attn_implementation=attn)
    return Qwen3ForCausalLM(cfg).to(device).train()


def batch_of_three(device=None):
    """Nested blocks (two hidden intervals per token), two blocks, a sequential row; padded to one length."""
    gs = [npr_env.ExecutionGraph.from_text(TWO_BLOCKS, prompt="What is 1?"),
          npr_env.ExecutionGraph.from_text(NESTED, prompt="Q: 7"),
          npr_env.ExecutionGraph.from_text(SEQUENTIAL, prompt="A longer prompt.", layout="sequential")]
    batch = build_batch([Sample.from_graph(g) for g in gs], device=device)
    assert batch.hide_lo.shape[2] == 2 and not batch.valid.all()  # nested, and padding in the batch
    return batch


def step(model, batch, **kw):
    """Logprobs, entropies and the parameter gradients of a loss that uses both."""
    model.zero_grad(set_to_none=True)
    lp, ent = token_logprobs(model, batch, return_entropy=True, all_tokens=True, **kw)
    n = batch.valid.sum()
    (-(lp.sum() / n) + 0.1 * ent.sum() / n).backward()
    return lp.detach(), ent.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=0)
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", [16, 48, 4096])  # several chunks, a chunk that does not divide T, one chunk
def test_chunked_attention_equals_the_dense_mask(impl, rows):
    batch = batch_of_three()
    dense = step(tiny_model(impl), batch, attn="bias")
    model = tiny_model(impl)
    chunked = step(model, batch, attn="chunked", attn_chunk=rows)
    assert_same(chunked, dense)
    assert model.config._attn_implementation == policy.CHUNKED_IMPL + ("_eager" if impl == "eager" else "")


def test_chunked_path_builds_row_masks_only(monkeypatch):
    """Only [B, 1, rows, <= q1] masks, from the compact layout; the dense [T, T] builder is never called; the
    4-D mask HF sees is a zero-stride placeholder (no memory)."""
    batch = batch_of_three()
    shapes, seen = [], []
    real_mark = L._mark_hidden

    def spy(out, *a, **k):
        shapes.append(tuple(out.shape))
        return real_mark(out, *a, **k)

    def no_dense(*a, **k):
        raise AssertionError("the chunked path built a dense T x T mask")

    monkeypatch.setattr(L, "_mark_hidden", spy)
    monkeypatch.setattr(policy.TokenBatch, "attention_mask", no_dense)
    real_fwd = policy.chunked_attention_forward

    def fwd(module, q, k, v, mask, **kw):
        seen.append(mask.untyped_storage().nbytes())
        return real_fwd(module, q, k, v, mask, **kw)

    from transformers import AttentionInterface

    policy.register_chunked_attention()
    monkeypatch.setitem(AttentionInterface._global_mapping, policy.CHUNKED_IMPL, fwd)
    step(tiny_model(), batch, attn="chunked", attn_chunk=32)
    B, T = batch.input_ids.shape
    assert shapes and all(s[0] == B and s[1] <= 32 and s[2] <= T for s in shapes)  # [B, rows, keys]
    assert max(s[1] * s[2] for s in shapes) < T * T / 2
    assert seen and max(seen) <= 8  # one element, whatever T


def test_auto_picks_the_path_by_size(monkeypatch):
    batch = batch_of_three()
    B, T = batch.input_ids.shape
    model = tiny_model()
    assert resolve_attn(model, batch, "auto") == "chunked"
    assert not policy._chunked_layout(batch, "auto", None).checkpoint  # the whole mask fits: masks kept
    assert policy._chunked_layout(batch, "chunked", None).checkpoint  # the explicit memory path
    dense = step(tiny_model(), batch, attn="bias")
    assert_same(step(model, batch), dense)  # auto, masks kept
    monkeypatch.setattr(policy, "MASK_BUDGET", B * T * T - 1)
    assert policy._chunked_layout(batch, "auto", None).checkpoint  # too big: checkpointed chunks
    assert_same(step(tiny_model(), batch), dense)
    monkeypatch.undo()
    flex = tiny_model("flex_attention")
    assert resolve_attn(flex, batch, "auto") == "flex"
    with pytest.raises(ValueError, match="attn must be one of"):
        token_logprobs(model, batch, attn="dense")
    with pytest.raises(ValueError, match="eager or sdpa"):
        token_logprobs(flex, batch, attn="chunked")
    with pytest.raises(ValueError, match="flex_attention"):
        token_logprobs(tiny_model(), batch, attn="flex")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("attn", ["auto", "chunked"])
def test_a_causal_layout_runs_without_a_mask(monkeypatch, impl, attn):
    """A batch whose layout hides nothing (sequential rows, right padding) is plain causal attention: no mask is
    built, and logprobs and gradients are the dense mask's."""
    gs = [npr_env.ExecutionGraph.from_text(SEQUENTIAL, prompt="A longer prompt.", layout="sequential"),
          npr_env.ExecutionGraph.from_text(SEQUENTIAL[: len(SEQUENTIAL) // 2], prompt="Q", layout="sequential")]
    batch = build_batch([Sample.from_graph(g) for g in gs])
    assert policy.layout_is_causal(batch) and not batch.valid.all()
    assert not policy.layout_is_causal(batch_of_three())
    dense = step(tiny_model(impl), batch, attn="bias")

    def no_mask(*a, **k):
        raise AssertionError("a causal layout built a mask")

    monkeypatch.setattr(L, "_mark_hidden", no_mask)
    assert_same(step(tiny_model(impl), batch, attn=attn, attn_chunk=16), dense)


def test_a_switched_model_is_an_sdpa_model_for_every_other_call(tmp_path):
    """Ordinary forwards (padding mask, generate) are unchanged, and the switch is not saved."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    ref = tiny_model().eval()
    model = use_chunked_attention(tiny_model().eval())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=pad).logits,
                                   ref(input_ids=ids, attention_mask=pad).logits, atol=1e-6, rtol=0)
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0))
    model.save_pretrained(tmp_path)
    assert "npr_chunked" not in (tmp_path / "config.json").read_text()


def test_chunked_path_through_a_wrapper_forward():
    """A wrapped model (DDP's shape: ``.module``) goes through its own forward; npr_layout reaches every layer."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    batch = batch_of_three()
    plain = step(tiny_model(), batch, attn="chunked", attn_chunk=32)
    inner = tiny_model()
    model = Wrapper(inner)
    model.zero_grad()
    lp, ent = token_logprobs(model, batch, return_entropy=True, all_tokens=True, attn="chunked", attn_chunk=32)
    n = batch.valid.sum()
    (-(lp.sum() / n) + 0.1 * ent.sum() / n).backward()
    assert_same((lp.detach(), ent.detach(), {k: p.grad for k, p in inner.named_parameters()}), plain)


@pytest.mark.parametrize("attn", ["bias", "chunked"])
def test_activation_checkpointing_gives_the_same_gradients(attn, monkeypatch):
    batch = batch_of_three()
    ref = step(tiny_model(), batch, attn=attn, attn_chunk=32)
    model = enable_checkpointing(tiny_model())
    assert model.is_activation_checkpointing and model.training
    calls = []
    real = model.model.layers[0].self_attn.forward

    def counted(*a, **k):
        calls.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(model.model.layers[0].self_attn, "forward", counted)
    assert_same(step(model, batch, attn=attn, attn_chunk=32), ref)
    assert len(calls) == 2  # the layer ran again in backward: it was checkpointed


def test_gradient_checkpointing_is_a_model_setting():
    tok = npr_env.load_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
    assert not build_model(cfg, tok, torch.device("cpu")).is_activation_checkpointing
    cfg.gradient_checkpointing = True
    assert build_model(cfg, tok, torch.device("cpu")).is_activation_checkpointing
    assert preset("qwen3-4b").model.gradient_checkpointing and not preset("tiny").model.gradient_checkpointing


def test_logprob_chunks_are_bounded_at_qwen3_vocab(monkeypatch):
    V = 151936
    rows = logprob_chunk_rows(V)
    assert 16 <= rows and rows * V * 4 <= 2 ** 27  # one chunk's fp32 logits: at most 128 MiB (rows = 220)
    assert logprob_chunk_rows(10 ** 9) == 16 and logprob_chunk_rows(100) == 1024
    seen = []
    real = policy._rows_logprobs

    def spy(head, h, *a):
        seen.append(h.shape[0])
        return real(head, h, *a)

    monkeypatch.setattr(policy, "_rows_logprobs", spy)
    batch = batch_of_three()
    model = tiny_model(vocab=V)
    lp = token_logprobs(model, batch, all_tokens=True)  # default chunk size, derived from the head
    n = int((batch.valid[:, 1:]).sum())
    assert max(seen) == rows and sum(seen) >= n > rows  # several chunks, none larger than the bound
    seen.clear()
    lp.sum().backward()  # each chunk recomputed in backward, still chunk by chunk
    assert seen and max(seen) == rows


def test_flex_block_mask_is_built_without_a_dense_mask():
    """The BlockMask from the compact layout equals create_block_mask's, and (CPU, forward only, unfused)
    FlexAttention under it equals SDPA under the additive mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch = batch_of_three()
    B, T = batch.input_ids.shape
    for bs in (16, 128):
        ours = L.flex_block_mask(batch.hide_lo, batch.hide_hi, batch.valid, block_size=bs, budget=4096)
        ref = create_block_mask(L.flex_mask_mod(batch.hide_lo, batch.hide_hi, batch.valid), B, None, T, T,
                                device="cpu", BLOCK_SIZE=bs)
        assert torch.equal(ours.to_dense(), ref.to_dense()) and ours.seq_lengths == (T, T)
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    torch.manual_seed(0)
    q, k, v = torch.randn(B, 4, T, 16), torch.randn(B, 2, T, 16), torch.randn(B, 2, T, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=L.flex_block_mask(batch.hide_lo, batch.hide_hi, batch.valid,
                                                                   block_size=32), enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=batch.attention_mask(),
                                                            enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_row_masks_are_rows_of_the_dense_mask():
    batch = batch_of_three()
    lo, hi, ok = batch.hide_lo, batch.hide_hi, batch.valid
    full = L.attention_bias(lo, hi, ok)
    T = lo.shape[1]
    for q0, q1 in ((0, 7), (7, 64), (100, T)):
        torch.testing.assert_close(L.attention_bias_rows(lo, hi, ok, q0, q1), full[:, :, q0:q1, :q1], atol=0, rtol=0)
        assert not full[:, :, q0:q1, q1:].eq(0).any()  # no row sees a later column
    with pytest.raises(ValueError):
        L.allowed_rows(lo, hi, ok, 0, T + 1)


# -- CUDA: FlexAttention with backward -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_flex_attention_equals_the_dense_mask_on_cuda():
    batch = batch_of_three(device="cuda")
    dense = step(tiny_model(device="cuda"), batch, attn="bias")
    flex = step(tiny_model("flex_attention", device="cuda"), batch)  # auto: flex for a flex model
    assert_same(flex, dense, atol=1e-4)  # TF32 / fused-kernel rounding on the GPU
    chunked = step(tiny_model(device="cuda"), batch, attn="chunked", attn_chunk=32)
    assert_same(chunked, dense, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_flex_and_chunked_agree_on_a_long_cuda_batch():
    from benchmarks.memory import npr_sample

    samples = [npr_sample(3000)[0], npr_sample(1700)[0]]
    batch = build_batch(samples, device="cuda")
    flex = step(tiny_model("flex_attention", device="cuda"), batch)
    chunked = step(tiny_model(device="cuda"), batch, attn="chunked")
    assert_same(flex, chunked, atol=1e-4)


def test_benchmark_layout_comes_from_the_graph():
    """benchmarks.memory scores a real graph's layout (nested blocks), cut at exactly T tokens."""
    from benchmarks.memory import npr_sample

    s, g = npr_sample(700)
    assert len(g) == 700 and len(s.prompt_ids) + len(s.token_ids) == 700
    lay = g.layout()
    assert lay.hide_lo.shape[1] == 2 and (lay.hide_hi > lay.hide_lo).any()
    assert len(g.stats.branches_per_block) >= 2
    json.dumps(g.stats.as_dict())
