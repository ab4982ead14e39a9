"""The training forward under the parallel layout (npr_agent.policy)."""

from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import npr_env
from npr_agent.policy import Sample, TokenBatch, build_batch, sft_loss, token_logprobs

TWO_BLOCKS = (  # 2 blocks: 2 then 3 branches; whitespace after a </step> belongs to that step
    "<guideline><plan>1: a b c</plan><plan>2: d e f</plan></guideline><step>1: xxxxxx</step>"
    "<step>2: yyyyyy</step><takeaway>zzzzzz</takeaway>"
    "<guideline><plan>1: a b c</plan><plan>2: d e f</plan><plan>3: ghi</plan></guideline>\n<step>1: xxxxxx</step>\n"
    "<step>2: yyyyyy</step><step>3: qqqqqqq</step><takeaway>zzzzzz</takeaway>\\boxed{1}"
)
NESTED = (  # a block inside step 1: two hidden intervals per token there
    "<guideline><plan>1: a b c</plan><plan>2: d e f</plan></guideline><step>1: <guideline><plan>1: uuu</plan>"
    "<plan>2: vvv</plan></guideline><step>1: pppppp</step><step>2: qqqqqq</step><takeaway>rrrrrr</takeaway> ok"
    "</step>\n<step>2: yyyyyy</step><takeaway>zzzzzz</takeaway>\\boxed{7}"
)
SEQUENTIAL = "<guideline><plan>1: one</plan><plan>2: two</plan></guideline><step>1: aaaaaa</step><step>2: bbbb</step>"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are overhead-bound: one thread is much faster, above all on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(attn: str = "sdpa", seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(npr_env.load_tokenizer()), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024, attn_implementation=attn)
    return Qwen3ForCausalLM(cfg).eval()


def graphs():
    return [
        npr_env.ExecutionGraph.from_text(TWO_BLOCKS, prompt="What is 1?"),
        npr_env.ExecutionGraph.from_text(NESTED, prompt="Q: 7"),
        npr_env.ExecutionGraph.from_text(SEQUENTIAL, prompt="A longer prompt, sequential.", layout="sequential"),
    ]


def reference_logprobs(model, graph, temperature: float):
    """Each token scored by a forward over exactly the tokens it may see (an independent reference)."""
    lay = graph.layout()
    mask = lay.dense_mask()
    ids = torch.tensor(graph.token_ids)
    lp = np.zeros(len(ids))
    ent = np.zeros(len(ids))
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = np.nonzero(mask[t])[0][:-1]  # what token t sees, without itself
            sub = torch.from_numpy(mask[np.ix_(ctx, ctx)])
            bias = torch.zeros(1, 1, len(ctx), len(ctx)).masked_fill(~sub, torch.finfo(torch.float32).min)
            out = model(input_ids=ids[ctx][None], attention_mask=bias,
                        position_ids=torch.from_numpy(lay.position_ids[ctx])[None])
            logits = out.logits[0, -1].double() / temperature
            logp = torch.log_softmax(logits, -1)
            lp[t] = logp[ids[t]].item()
            ent[t] = -(logp.exp() * logp).sum().item()
    return lp, ent


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_logprobs_match_per_token_reference(attn):
    model = tiny_model(attn)
    gs = graphs()
    assert gs[0].stats.branches_per_block == [2, 3] and gs[1].layout().hide_lo.shape[1] == 2
    batch = build_batch([Sample.from_graph(g) for g in gs])
    assert batch.seq_len % 8 == 0 and len({len(g) for g in gs}) == 3  # padded, different lengths
    temperature = 0.7
    with torch.no_grad():
        lp, ent = token_logprobs(model, batch, temperature=temperature, return_entropy=True, all_tokens=True)
    for b, g in enumerate(gs):
        ref_lp, ref_ent = reference_logprobs(model, g, temperature)
        n = len(g)
        np.testing.assert_allclose(lp[b, :n].numpy(), ref_lp, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ent[b, 1:n].numpy(), ref_ent[1:], atol=1e-5, rtol=0)
        assert (lp[b, n:] == 0).all()
    # the default scores response tokens only, with the same values
    with torch.no_grad():
        resp = token_logprobs(model, batch, temperature=temperature)
    torch.testing.assert_close(resp, torch.where(batch.response_mask, lp, 0.0), atol=0, rtol=0)


def test_predictor_of_a_step_is_the_guideline_end():
    g = graphs()[0]
    batch = build_batch([Sample.from_graph(g)], pad_to_multiple=1)
    kinds = g.token_kinds()
    pos = batch.position_ids[0].numpy()
    ids = g.token_ids
    step_open = npr_env.load_tokenizer().convert_tokens_to_ids("<step>")
    starts = [i for i, t in enumerate(ids) if t == step_open]
    assert len(starts) == 5
    for s in starts:
        p = int(batch.predictor[0, s])
        assert kinds[p] == 2 and pos[s] == pos[p] + 1  # a guideline token, right before the shared position
    assert len({int(batch.predictor[0, s]) for s in starts[:2]}) == 1


def test_masks_prompt_padding_and_forced_tokens():
    g = graphs()[0]
    s = Sample.from_graph(g)
    n = len(s.token_ids)
    forced = [i % 5 == 0 for i in range(n)]
    logprobs = [-0.1 * (i + 1) for i in range(n)]
    s = dataclasses.replace(s, forced_mask=forced, logprobs=logprobs)
    short = Sample.from_graph(graphs()[2])
    batch = build_batch([s, short])
    p = len(s.prompt_ids)
    resp = np.zeros(batch.seq_len, dtype=bool)
    resp[p:p + n] = True
    assert (batch.response_mask[0].numpy() == resp).all()
    assert (batch.loss_mask[0].numpy() == resp & ~np.pad(np.array([False] * p + forced),
                                                         (0, batch.seq_len - p - n))).all()
    np.testing.assert_allclose(batch.old_logprobs[0, p:p + n].numpy(), logprobs, rtol=1e-6)
    assert (batch.old_logprobs[0, :p] == 0).all() and (batch.old_logprobs[1] == 0).all()
    assert not batch.valid[1, len(graphs()[2]):].any() and not batch.loss_mask[1, len(graphs()[2]):].any()
    trained = build_batch([s], train_forced=True)
    assert int(trained.loss_mask.sum()) == n and build_batch([s]).num_loss_tokens == n - sum(forced)


class FakeRollout:
    """What the engine returns, by duck typing: ids, engine logprobs, forced mask and the graph."""

    def __init__(self, graph, token_ids=None):
        self.graph = graph
        self.prompt_ids = graph.token_ids[:graph.prompt_len]
        self.token_ids = token_ids if token_ids is not None else graph.response_ids
        self.logprobs = [-1.0] * len(self.token_ids)
        self.forced_mask = [False] * len(self.token_ids)


def test_rollout_objects_are_accepted_and_checked():
    g = graphs()[1]
    a = build_batch([FakeRollout(g)])
    b = build_batch([Sample.from_graph(g)])
    for f in ("input_ids", "position_ids", "hide_lo", "hide_hi", "predictor", "loss_mask"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    bad = g.response_ids
    bad[3] = bad[4]  # same length, different ids: re-tokenisation drift must not pass silently
    with pytest.raises(ValueError, match="sample 0: prompt_ids"):
        build_batch([FakeRollout(g, bad)])
    with pytest.raises(ValueError, match="sample 1: .* layout covers"):
        build_batch([Sample.from_graph(g), Sample([1, 2], [3], g.layout())])
    with pytest.raises(ValueError, match="logprobs has 1 entries"):
        s = Sample.from_graph(g)
        build_batch([dataclasses.replace(s, logprobs=[0.0])])


def test_micro_batches_match_the_full_batch():
    model = tiny_model()
    batch = build_batch([Sample.from_graph(g) for g in graphs()])
    with torch.no_grad():
        full = token_logprobs(model, batch)
        chunked = token_logprobs(model, batch, micro_batch_size=1, chunk_tokens=16)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    parts = batch.split(2)
    assert [p.batch_size for p in parts] == [2, 1] and parts[1].index.tolist() == [2]
    assert parts[1].seq_len < batch.seq_len  # trimmed to its own length


def test_sft_loss_is_mean_nll_and_accumulates_exactly():
    model = tiny_model()
    model.train()
    batch = build_batch([Sample.from_graph(g) for g in graphs()])
    loss = sft_loss(model, batch)
    with torch.no_grad():
        lp = token_logprobs(model, batch)
    torch.testing.assert_close(loss.detach(), -lp[batch.loss_mask].mean(), atol=1e-6, rtol=0)
    loss.backward()
    full = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    n = batch.num_loss_tokens
    for mb in batch.split(1):
        sft_loss(model, mb, num_tokens=n, chunk_tokens=32).backward()  # chunked + recomputed logits too
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[k], atol=1e-6, rtol=1e-4, msg=k)


def test_sft_update_length_sorted_micro_batches_give_the_full_batch_step():
    """sft_update sorts by length and trims each micro-batch: the loss and the updated weights are the same."""
    from npr_agent.updates import sft_update

    samples = [Sample.from_graph(g) for g in graphs()] * 2
    after = []
    for mbs in (0, 2):
        model = tiny_model(seed=3)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = sft_update(model, samples, opt, micro_batch_size=mbs, grad_clip=1e9)
        after.append((m["loss/sft"], [p.detach().clone() for p in model.parameters()]))
    assert abs(after[0][0] - after[1][0]) < 1e-5
    for a, b in zip(after[0][1], after[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrapped_model_goes_through_its_own_forward():
    """A DDP-wrapped model (gloo, world size 1) gives the same logprobs and gradients as the plain one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model()
    batch = build_batch([Sample.from_graph(g) for g in graphs()[:2]])
    plain = token_logprobs(model, batch)
    plain.sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        wrapped = token_logprobs(ddp, batch)
        wrapped.sum().backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(wrapped, plain, atol=1e-6, rtol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_token_batch_moves_and_selects():
    batch = build_batch([Sample.from_graph(g) for g in graphs()])
    assert isinstance(batch.to("cpu"), TokenBatch)
    sub = batch.select([2, 0], trim=None)
    assert sub.index.tolist() == [2, 0] and sub.seq_len == batch.seq_len
    assert torch.equal(sub.input_ids[1], batch.input_ids[0])
    with pytest.raises(ValueError):
        build_batch([])


@pytest.mark.slow
def test_flex_attention_block_mask_matches_the_additive_mask():
    """FlexAttention (compiled; about 30 s on CPU) with the layout's mask_mod gives the same logprobs."""
    batch = build_batch([Sample.from_graph(g) for g in graphs()])
    with torch.no_grad():
        flex = token_logprobs(tiny_model("flex_attention"), batch, all_tokens=True)
        sdpa = token_logprobs(tiny_model("sdpa"), batch, all_tokens=True)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="flex_attention"):
        token_logprobs(tiny_model("sdpa"), batch, attn="flex")
