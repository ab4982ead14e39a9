"""Orchestrated-parallel rollouts over a sequential backend, driven through the native engine in sequential mode
(the same interface SGLang is driven through): request construction, joining the returned ids into a Rollout
and its graph, layout recording, and exact trainer logprobs under the recorded (orchestrated) layout."""

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import npr_env
from engine import NPREngine, SamplingParams, TrajectoryForcer
from engine.backends import NativeSequentialBackend
from engine.orchestration import (
    Completion,
    CompletionRequest,
    OrchestratedEngine,
    SequentialBackend,
)
from npr_agent.policy import build_batch, token_logprobs
from npr_agent.scoring import scored_logprobs, scoring_view, training_sample
from npr_env.schema import GUIDELINE_CLOSE, STEP_CLOSE, STEP_OPEN, TAGS, TAKEAWAY_OPEN, format_block

TOK = npr_env.load_tokenizer()
ID = {t: TOK.convert_tokens_to_ids(t) for t in TAGS}
EOS = TOK.eos_token_id


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


PROMPT = enc("What is 2+3+4+4?")
TWO_BLOCKS = (format_block(["add a b", "add c d"], ["2+3=5 ok", "4+4=8 fine"], "5+8=13 total")
              + format_block(["check one", "check two", "check three"], ["13 ok here", "yes 13 is right", "13 again"],
                             "all agree on 13") + "So \\boxed{13}<eos>")
NESTED_FIRST = ("<guideline><plan>1: split it up</plan><plan>2: other way</plan></guideline>"
                "<step>1: <guideline><plan>1: part a</plan><plan>2: part b</plan></guideline>"
                "<step>1: aaaaaaa</step><step>2: bbbbbbbbbb</step><takeaway>a and b fine</takeaway> done</step>"
                "<step>2: cccccccc</step><takeaway>all good now</takeaway>\\boxed{3}<eos>")
# a block nested in a NON-first step: its own non-first steps are copies of a copy (two hidden levels)
NESTED_SECOND = ("<guideline><plan>1: first way</plan><plan>2: split it</plan></guideline>"
                 "<step>1: aaaaaaa</step><step>2: <guideline><plan>1: part a</plan><plan>2: part b</plan>"
                 "<plan>3: part c</plan></guideline><step>1: xxxxxxx</step><step>2: yyyyyyyy</step>"
                 "<step>3: zzzzzz</step><takeaway>x y z fine</takeaway> done</step>"
                 "<takeaway>all good now</takeaway>\\boxed{3}<eos>")
TEXTS = {"two_blocks": TWO_BLOCKS, "nested_first": NESTED_FIRST, "nested_second": NESTED_SECOND}


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper, more varied logits than the default init
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


class Recording:
    """A SequentialBackend that forwards to another one and keeps every request and completion it saw."""

    def __init__(self, inner):
        self.inner = inner
        self.waves: list[list[tuple[CompletionRequest, Completion]]] = []

    def complete(self, requests, params):
        outs = self.inner.complete(requests, params)
        self.waves.append(list(zip(requests, outs)))
        return outs


@pytest.fixture(scope="module")
def model():
    return tiny()


def backend(model):
    return NativeSequentialBackend(NPREngine(model, TOK, num_blocks=1024, block_size=4))


def forced(model, text, mode="parallel", prompt=PROMPT, record=False, **kw):
    resp = enc(text)
    be = backend(model)
    if record:
        be = Recording(be)
    eng = OrchestratedEngine(be, TOK, min_fork_budget=kw.pop("min_fork_budget", 0), **kw.pop("engine", {}))
    sp = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 1000), seed=0,
                        logits_processors=[TrajectoryForcer(TOK, prompt, resp)], **kw)
    (r,) = eng.generate([prompt], sp, mode=mode)
    return eng, r, resp


def trainer_logprobs(model, rollout, temperature: float = 1.0) -> np.ndarray:
    """What the trainer computes for a rollout: build_batch(training_sample) + token_logprobs, per token."""
    s = training_sample(rollout)
    batch = build_batch([s])
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature=temperature)[0].numpy()
    if s is rollout:
        return lp[len(rollout.prompt_ids):len(rollout.prompt_ids) + len(rollout.token_ids)]
    return scored_logprobs(s, lp[:len(s.source)])


def native_layout_logprobs(model, rollout) -> np.ndarray:
    batch = build_batch([rollout])  # the graph's parallel layout
    with torch.no_grad():
        lp = token_logprobs(model, batch)[0].numpy()
    P = len(rollout.prompt_ids)
    return lp[P:P + len(rollout.token_ids)]


def test_native_backend_is_a_sequential_backend(model):
    be = backend(model)
    assert isinstance(be, SequentialBackend)
    outs = be.complete([CompletionRequest(PROMPT, 5, score_tail=2), CompletionRequest(PROMPT[:4], 3)],
                       SamplingParams(temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 3] and [o.finish_reason for o in outs] == ["length"] * 2
    assert len(outs[0].tail_logprobs) == 2 and outs[1].tail_logprobs == []
    with torch.no_grad():  # tail logprobs: the causal model's own, for the request's last ids
        lp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), -1)
    want = [lp[len(PROMPT) - 3 + i, PROMPT[len(PROMPT) - 2 + i]].item() for i in range(2)]
    assert np.allclose(outs[0].tail_logprobs, want, atol=1e-5)


def test_request_construction_follows_the_graph(model):
    eng, r, resp = forced(model, TWO_BLOCKS, record=True)
    waves = eng.backend.waves
    gl = resp.index(ID[GUIDELINE_CLOSE]) + 1
    prefix = PROMPT + resp[:gl]
    # wave 1: the root, from the prompt, until </guideline>
    (req, out), = waves[0]
    assert req.ids == PROMPT and req.score_tail == 0 and out.token_ids == resp[:gl]
    assert ID[GUIDELINE_CLOSE] in req.stop_token_ids and EOS in req.stop_token_ids
    assert ID[STEP_CLOSE] not in req.stop_token_ids
    # wave 2: one request per plan, the shared prefix then the forced "<step>N:"; each stops at </step>
    assert len(waves[1]) == 2
    steps = []
    for i, (req, out) in enumerate(waves[1], 1):
        head = [ID[STEP_OPEN], *enc(f"{i}:")]
        assert req.ids == prefix + head and req.score_tail == len(head)
        assert ID[STEP_CLOSE] in req.stop_token_ids and out.token_ids[-1] == ID[STEP_CLOSE]
        assert out.finish_reason == "stop" and len(out.tail_logprobs) == len(head)
        steps.append(head + out.token_ids)
    # wave 3: the continuation over the serialized graph (prefix + every step), with a forced <takeaway>
    (req, out), = waves[2]
    assert req.ids == prefix + steps[0] + steps[1] + [ID[TAKEAWAY_OPEN]] and req.score_tail == 1
    # the second block: three step requests, whose prefix is the whole serialized first block
    assert [len(w) for w in waves] == [1, 2, 1, 3, 1]
    second = waves[3][0][0].ids
    assert second[:len(req.ids)] == req.ids
    assert eng.last_stats["waves"] == 5 and eng.last_stats["requests"] == 8
    # re-prefilled at the joins: every non-first step (the first is a prefix the cache already holds)
    assert eng.last_stats["reprefill_tokens"] == sum(len(c.ids) for b in r.graph.blocks for c in b.children[1:])


@pytest.mark.parametrize("name", list(TEXTS))
def test_rollout_and_graph_from_returned_ids(model, name):
    _, r, resp = forced(model, TEXTS[name])
    assert r.finish_reason == "eos" and not r.truncated and r.token_ids == resp
    assert r.layout == "orchestrated"
    g = r.graph
    assert g.is_valid, [v.code for v in g.violations]
    assert g.token_ids == PROMPT + resp and r.prompt_ids == PROMPT
    assert len(r.logprobs) == len(r.forced_mask) == len(r.token_ids) == r.num_tokens
    # the same graph the serial parser builds from the same ids (structure and stats)
    ref = npr_env.ExecutionGraph.from_token_ids(PROMPT + resp, TOK, prompt_len=len(PROMPT))
    assert g.stats.as_dict() == ref.stats.as_dict() and r.num_forks == ref.stats.num_blocks
    # forced: "<step>" + "N:" in every child, "<takeaway>" at every join; nothing else
    want = np.zeros(len(resp), dtype=bool)
    for i, t in enumerate(resp):
        if t == ID[STEP_OPEN]:
            want[i:i + 3] = True
        if t == ID[TAKEAWAY_OPEN]:
            want[i] = True
    assert np.array_equal(np.asarray(r.forced_mask), want)


@pytest.mark.parametrize("name", list(TEXTS))
def test_trainer_logprobs_equal_backend_logprobs_under_recorded_layout(model, name):
    _, r, _ = forced(model, TEXTS[name])
    got = trainer_logprobs(model, r)
    assert np.abs(got - np.asarray(r.logprobs)).max() <= 1e-4  # every token, forced ones included
    # the native parallel layout is NOT what these tokens were generated under
    assert np.abs(native_layout_logprobs(model, r) - np.asarray(r.logprobs)).max() > 1e-2


def test_scoring_view_structure(model):
    _, r, resp = forced(model, NESTED_SECOND)
    v = scoring_view(r.graph, "orchestrated")
    L = len(PROMPT) + len(resp)
    # the serialized sequence first, causal, position = serialized index
    assert np.array_equal(v.source[:L], np.arange(L)) and np.array_equal(v.layout.position_ids[:L], np.arange(L))
    assert not v.layout.hide_hi[:L].any()
    # every token scored exactly once
    assert np.array_equal(np.bincount(v.source[v.scored], minlength=L), np.ones(L, dtype=np.int64))
    # copies: outer step 2, and inner steps 2 and 3 of the block nested in it (two hidden levels)
    g = r.graph
    outer = g.blocks[0]
    step2 = outer.children[1]
    inner = [b for b in g.blocks if b.parent is step2][0]
    extra = len(v.source) - L
    sizes = [len(step2.ids) + sum(len(c.ids) for c in inner.children)] + [len(c.ids) for c in inner.children[1:]]
    assert extra == sum(sizes) and v.layout.hide_lo.shape[1] == 2
    # the outer copy starts at the fork position, holds step 2, and is predicted from the end of the guideline
    fork = len(PROMPT) + resp.index(ID[STEP_OPEN])
    assert v.layout.position_ids[L] == fork and v.source[L] == fork + len(outer.children[0].ids)
    from npr_env.layout import predictor_indices

    assert predictor_indices(v.layout)[L] == fork - 1


def test_sequential_mode_is_plain_decoding(model):
    prompts = [enc("hello there"), enc("a different, longer prompt")]
    eng = OrchestratedEngine(backend(model), TOK)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, step_repetition_penalty=1.0)
    outs = eng.generate(prompts, params, mode="sequential")
    native = NPREngine(model, TOK, num_blocks=256, block_size=4).generate(prompts, params, mode="sequential")
    for o, n in zip(outs, native):
        assert o.layout == "sequential" and o.graph.layout_kind == "sequential"
        assert o.token_ids == n.token_ids and o.finish_reason == n.finish_reason == "length" and o.truncated
        assert np.abs(np.asarray(o.logprobs) - np.asarray(n.logprobs)).max() <= 1e-5
        assert training_sample(o) is o
        assert np.abs(trainer_logprobs(model, o) - np.asarray(o.logprobs)).max() <= 1e-4
    # a parallel trajectory decoded sequentially: one request, no fork, the causal layout
    _, r, resp = forced(model, TWO_BLOCKS, mode="sequential", record=True)
    assert r.token_ids == resp and r.num_forks == 0 and r.layout == "sequential"


def test_declined_forks_decode_steps_in_the_branch(model):
    # too little budget to fork: the root decodes the steps one after another (like the native engine)
    eng, r, resp = forced(model, TWO_BLOCKS, min_fork_budget=10_000, record=True)
    assert r.token_ids == resp and r.num_forks == 0 and r.finish_reason == "eos" and not any(r.forced_mask)
    assert all(len(w) == 1 for w in eng.backend.waves)  # never more than one request at a time
    assert np.abs(trainer_logprobs(model, r) - np.asarray(r.logprobs)).max() <= 1e-4
    # depth limit: the block nested in step 1 is not forked, the outer one is
    strict = npr_env.constraints.PRESETS["strict"](max_plans=5, max_depth=5)
    _, r2, resp2 = forced(model, NESTED_FIRST, engine={"max_depth": 1, "constraints": strict})
    assert r2.token_ids == resp2 and r2.num_forks == 1 and r2.graph.is_valid
    assert np.abs(trainer_logprobs(model, r2) - np.asarray(r2.logprobs)).max() <= 1e-4


def test_budgets_stops_and_violations(model):
    _, full, resp = forced(model, TWO_BLOCKS)
    crit = full.graph.stats.critical_path_tokens
    for kw in (dict(max_new_tokens=crit // 2), dict(max_new_tokens=1000, max_total_tokens=len(resp) // 2)):
        _, r, _ = forced(model, TWO_BLOCKS, **kw)
        assert r.finish_reason == "length" and r.truncated
        assert r.num_tokens <= kw.get("max_total_tokens", 10**9)
        assert r.token_ids == r.graph.response_ids and len(r.logprobs) == len(r.token_ids)
        assert np.abs(trainer_logprobs(model, r) - np.asarray(r.logprobs)).max() <= 1e-4
    _, r, _ = forced(model, TWO_BLOCKS, max_new_tokens=crit)  # the critical path, not the total, is bounded
    assert r.finish_reason == "eos" and len(r.token_ids) > crit
    # a user stop token ends the rollout on it
    stop = enc("=")[0]
    _, r, _ = forced(model, TWO_BLOCKS, stop_token_ids=[stop])
    assert r.finish_reason == "stop" and r.token_ids[-1] == stop and not r.truncated
    # strict constraints stop a rollout at its first violation
    bad = "<step>1: no block here</step>" + TWO_BLOCKS
    eng = OrchestratedEngine(backend(model), TOK)
    sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, enc(bad), strict=False)])
    (r,) = eng.generate([PROMPT], sp)
    assert r.finish_reason == "violation" and r.truncated and len(r.token_ids) == 1


def test_samples_order_and_seeded_sampling(model):
    eng = OrchestratedEngine(backend(model), TOK, min_fork_budget=0, stop_on_violation=False)
    prompts = [enc("abc"), enc("defgh")]
    params = SamplingParams(max_new_tokens=12, seed=5, n=3, top_k=20)
    a = eng.generate(prompts, params)
    b = eng.generate(prompts, params)
    assert [(r.prompt_index, r.sample_index) for r in a] == [(p, s) for p in range(2) for s in range(3)]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) > 1


def test_untrusted_output_any_sequence_gives_a_rollout(model):
    """Random token streams (tags included) through the orchestrator: never an exception, exact logprobs."""
    rng = np.random.default_rng(0)
    tags = [ID[t] for t in TAGS]

    def chaos(ctx, logits):
        out = torch.full_like(logits, float("-inf"))
        pick = int(rng.choice(tags)) if rng.random() < 0.35 else int(rng.integers(5, len(TOK)))
        out[pick] = 0.0
        return out

    eng = OrchestratedEngine(backend(model), TOK, min_fork_budget=0, stop_on_violation=False)
    outs = eng.generate([PROMPT] * 6, SamplingParams(max_new_tokens=40, max_total_tokens=90, seed=1,
                                                     logits_processors=[chaos]))
    assert any(r.num_forks for r in outs)
    for r in outs:
        assert r.finish_reason in ("eos", "length", "stop") and r.token_ids == r.graph.response_ids
        _ = r.graph.violations  # a deterministic verdict
        assert np.abs(trainer_logprobs(model, r) - np.asarray(r.logprobs)).max() <= 1e-4


def test_training_samples_mix_in_one_batch(model):
    _, orch, _ = forced(model, TWO_BLOCKS)
    native = NPREngine(model, TOK, num_blocks=512, block_size=4, min_fork_budget=0).generate(
        [PROMPT], SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, enc(
            TWO_BLOCKS))]))[0]
    samples = [training_sample(native), training_sample(orch)]
    assert samples[0] is native
    batch = build_batch(samples)
    # one loss token per sampled (not forced) response token, whatever the layout
    free = sum(not f for f in orch.forced_mask)
    assert int(batch.loss_mask[1].sum()) == free == sum(not f for f in native.forced_mask)
    with torch.no_grad():
        lp = token_logprobs(model, batch)
    assert torch.allclose(lp[1][batch.loss_mask[1]], batch.old_logprobs[1][batch.loss_mask[1]], atol=1e-4)
    assert torch.allclose(lp[0][batch.loss_mask[0]], batch.old_logprobs[0][batch.loss_mask[0]], atol=1e-4)


def test_errors_are_clear(model):
    eng = OrchestratedEngine(backend(model), TOK)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]])
    with pytest.raises(ValueError, match="mode"):
        eng.generate([PROMPT], mode="tree")
    with pytest.raises(TypeError, match="SequentialBackend"):
        OrchestratedEngine(object(), TOK)


def test_context_rows_are_never_trained(model):
    """The S-view rows of non-first steps are context only: out of the loss, even with train_forced=True
    (build_batch honours ScoredSample.scored, or the update refuses to run)."""
    from npr_agent.algorithms import make_algorithm
    from npr_agent.updates import policy_update

    _, r, _ = forced(model, TWO_BLOCKS)
    s = training_sample(r)
    context = ~torch.as_tensor(s.scored)
    assert context.sum() == sum(len(c.ids) for b in r.graph.blocks for c in b.children[1:])
    assert not build_batch([s]).loss_mask[0, :len(s.scored)][context].any()
    algo = make_algorithm("papo", train_forced=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        m = policy_update(model, algo, [r], torch.tensor([1.0]), opt, micro_batch_size=4, grad_clip=1.0)
    except ValueError as e:
        assert "context-only" in str(e)
    else:
        assert m["batch/updated"] == 1.0
        assert not build_batch([s], train_forced=True).loss_mask[0, :len(s.scored)][context].any()
