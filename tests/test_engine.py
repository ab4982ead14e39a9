"""NPR Engine: exact logprobs vs a full-sequence forward with the graph's layout, greedy parity with per-branch
decoding, rollout alignment, sampling, budgets, pool pressure, stop rules, weights and model families."""

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import npr_env
from engine import NPREngine, SamplingParams, TrajectoryForcer
from npr_env.layout import attention_bias, collate, predictor_indices, to_torch
from npr_env.schema import STEP_CLOSE, STEP_OPEN, TAGS, TAKEAWAY_OPEN, format_block

TOK = npr_env.load_tokenizer()
V = len(TOK)
ID = {t: TOK.convert_tokens_to_ids(t) for t in TAGS}
EOS = TOK.eos_token_id


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def tiny(family: str = "qwen3", seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if family == "qwen3":
        cfg = Qwen3Config(head_dim=16, **common)
        cls = Qwen3ForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: sharper, more varied logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


# Two blocks (2 and 3 plans), five branches; and a trajectory with a block nested inside a step.
TWO_BLOCKS = (format_block(["add a b", "add c d"], ["2+3=5 ok", "4+4=8 fine"], "5+8=13 total")
              + format_block(["check one", "check two", "check three"], ["13 ok here", "yes 13 is right", "13 again"],
                             "all agree on 13") + "So \\boxed{13}<eos>")
NESTED = ("<guideline><plan>1: split it up</plan><plan>2: other way</plan></guideline>"
          "<step>1: <guideline><plan>1: part a</plan><plan>2: part b</plan></guideline>"
          "<step>1: aaaaaaa</step><step>2: bbbbbbbbbb</step><takeaway>a and b fine</takeaway> done</step>"
          "<step>2: cccccccc</step><takeaway>all good now</takeaway>\\boxed{3}<eos>")
PROMPT = enc("What is 2+3+4+4?")


def reference_logprobs(model, graph, temperature: float = 1.0) -> np.ndarray:
    """Full-sequence HF forward with the graph's additive mask and positions; logprob of each response token
    read at its predictor row (the latest token it may see)."""
    lay = graph.layout()
    b = to_torch(collate([lay]))
    ids = torch.tensor([graph.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_bias(b["hide_lo"], b["hide_hi"], b["valid"]),
                       position_ids=b["position_ids"]).logits[0].float()
    lp = torch.log_softmax(logits / (temperature or 1.0), -1)
    pred = predictor_indices(lay)
    t = np.arange(graph.prompt_len, len(ids[0]))
    return lp[pred[t], ids[0, t]].numpy()


def forced_run(model, text=TWO_BLOCKS, mode="parallel", prompt=PROMPT, **params):
    resp = enc(text)
    eng = NPREngine(model, TOK, num_blocks=512, block_size=4, min_fork_budget=0)
    sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, prompt, resp)], seed=0,
                        **params)
    (r,) = eng.generate([prompt], sp, mode=mode)
    return eng, r, resp


@pytest.fixture(scope="module")
def qwen3():
    return tiny("qwen3")


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("text", [TWO_BLOCKS, NESTED], ids=["two_blocks", "nested"])
def test_logprobs_exact_vs_full_forward(qwen3, mode, text):
    eng, r, resp = forced_run(qwen3, text, mode)
    assert r.finish_reason == "eos" and not r.truncated
    assert r.token_ids == resp
    g = r.graph
    assert g.is_valid, [v.code for v in g.violations]
    stats = g.stats
    assert stats.num_blocks >= 2 and sum(stats.branches_per_block) >= 3
    if mode == "parallel":
        assert r.num_forks == stats.num_blocks and g.layout_kind == "parallel"
    else:
        assert r.num_forks == 0 and np.array_equal(g.position_ids(), np.arange(len(g.token_ids)))
    ref = reference_logprobs(qwen3, g)
    got = np.asarray(r.logprobs)
    free = ~np.asarray(r.forced_mask)
    assert free.sum() > 0.8 * len(free)
    assert np.abs(got[free] - ref[free]).max() <= 1e-4
    # forced tokens carry the policy's logprob of the forced token too (same predictor rule)
    assert np.abs(got - ref).max() <= 1e-4
    eng.pool.assert_all_free()


def test_rollout_alignment_and_forced_tokens(qwen3):
    _, r, resp = forced_run(qwen3, TWO_BLOCKS, "parallel")
    assert len(r.token_ids) == len(r.logprobs) == len(r.forced_mask) == r.num_tokens
    assert r.graph.response_ids == r.token_ids and r.prompt_ids == PROMPT
    forced = [t for t, f in zip(r.token_ids, r.forced_mask) if f]
    # each of the 5 children starts with forced <step> N :, each of the 2 joins with a forced <takeaway>
    assert forced.count(ID[STEP_OPEN]) == 5 and forced.count(ID[TAKEAWAY_OPEN]) == 2 and len(forced) == 17
    assert all(not f for t, f in zip(r.token_ids, r.forced_mask) if t == ID[STEP_CLOSE])
    # the layout the engine decoded with is the one the serial parser gives for the same ids
    g2 = npr_env.ExecutionGraph.from_token_ids(PROMPT + resp, TOK, prompt_len=len(PROMPT))
    assert np.array_equal(r.graph.position_ids(), g2.position_ids())
    assert np.array_equal(r.graph.attention_mask(), g2.attention_mask())
    assert r.peak_kv_blocks > 0 and r.decode_steps > 0 and r.wall_s > 0


def test_parallel_needs_fewer_steps_and_less_kv_than_copying(qwen3):
    _, par, _ = forced_run(qwen3, TWO_BLOCKS, "parallel")
    _, seq, _ = forced_run(qwen3, TWO_BLOCKS, "sequential")
    assert par.token_ids == seq.token_ids
    assert par.decode_steps < seq.decode_steps
    crit = par.graph.stats.critical_path_tokens
    assert par.decode_steps <= crit + 2 * par.num_forks + 2  # one extra step per fork and per join
    # each child's forced "N:" is fed with its <step> in one forward: no step of its own
    assert par.decode_steps == crit - 1 - 2 * par.num_forks
    # shared prefix held once: blocks of 4 tokens, at most one partial block per branch
    total = len(PROMPT) + len(par.token_ids)
    branches = 1 + sum(par.graph.stats.branches_per_block)
    assert par.peak_kv_blocks <= -(-total // 4) + branches + 1


def test_temperature_logprobs_are_of_scaled_model_logits(qwen3):
    _, r, _ = forced_run(qwen3, TWO_BLOCKS, "parallel", temperature=0.7, top_p=0.9, top_k=20)
    ref = reference_logprobs(qwen3, r.graph, temperature=0.7)
    assert np.abs(np.asarray(r.logprobs) - ref).max() <= 1e-4


def test_batched_requests_of_different_lengths_stay_exact(qwen3):
    texts = [TWO_BLOCKS, NESTED, format_block(["only one", "two"], ["x = 1 yes", "y = 22"], "x and y") + "\\boxed{1}<eos>"]
    prompts = [enc("Q?"), enc("A longer prompt, with more tokens: what?"), enc("Mid size q")]
    forcers = [TrajectoryForcer(TOK, p, enc(t)) for p, t in zip(prompts, texts)]

    def dispatch(ctx, logits):
        for p, f in zip(prompts, forcers):
            if ctx[:len(p)] == p:
                return f(ctx, logits)
        raise KeyError("unknown prompt")

    # prefill_chunk=5: prompts are prefilled in several causal chunks, batched with different lengths
    eng = NPREngine(qwen3, TOK, num_blocks=512, block_size=4, min_fork_budget=0, prefill_chunk=5)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=1000, logits_processors=[dispatch]))
    for r, t in zip(outs, texts):
        assert r.token_ids == enc(t) and r.finish_reason == "eos"
        assert np.abs(np.asarray(r.logprobs) - reference_logprobs(qwen3, r.graph)).max() <= 1e-4
    eng.pool.assert_all_free()


class StepsFree:
    """Forces a guideline with k plans and the text after the join; step bodies are the model's own (greedy),
    tags and EOS banned inside, ``</step>`` forced after ``lengths[i]`` body tokens."""

    def __init__(self, prompt, k, lengths):
        self.prompt, self.lengths = prompt, lengths
        self.head = enc(format_block([f"plan {i}" for i in range(1, k + 1)], ["x" * 6] * k, "t")
                        .split("<step>")[0])
        self.tail = enc("summary ok</takeaway>\\boxed{1}<eos>")
        self.ban = torch.tensor([ID[t] for t in TAGS] + [EOS])

    def want(self, ctx):
        body = ctx[len(self.prompt):]
        if ID[TAKEAWAY_OPEN] in body:
            return self.tail[len(body) - body.index(ID[TAKEAWAY_OPEN]) - 1]
        if ID[STEP_OPEN] in body:
            i = len(body) - 1 - body[::-1].index(ID[STEP_OPEN])
            n = int(TOK.decode(body[i + 1:i + 2])) - 1
            return ID[STEP_CLOSE] if len(body) - (i + 3) >= self.lengths[n] else None
        return self.head[len(body)]

    def __call__(self, ctx, logits):
        w = self.want(list(ctx))
        if w is None:
            return logits.index_fill(0, self.ban.to(logits.device), float("-inf"))
        out = torch.full_like(logits, float("-inf"))
        out[w] = 0.0
        return out


def test_greedy_parallel_equals_each_branch_alone(qwen3):
    lengths = [9, 14, 6]
    proc = StepsFree(PROMPT, 3, lengths)
    eng = NPREngine(qwen3, TOK, num_blocks=256, block_size=4, min_fork_budget=0)
    params = SamplingParams(temperature=0, max_new_tokens=500, logits_processors=[proc])
    (r,) = eng.generate([PROMPT], params, mode="parallel")
    assert r.finish_reason == "eos" and r.num_forks == 1
    block = r.graph.blocks[0]
    prefix = PROMPT + enc(TOK.decode(proc.head))

    class HFProc:
        def __call__(self, input_ids, scores):
            return torch.stack([proc(row.tolist(), s) for row, s in zip(input_ids, scores)])

    bodies = []
    for i, child in enumerate(block.children):
        start = prefix + [ID[STEP_OPEN]] + enc(f"{i + 1}:")
        assert child.ids[:3] == start[-3:]
        with torch.no_grad():
            alone = qwen3.generate(torch.tensor([start]), max_new_tokens=lengths[i] + 1, do_sample=False,
                                   logits_processor=[HFProc()], repetition_penalty=1.02,
                                   eos_token_id=ID[STEP_CLOSE], pad_token_id=0)[0, len(start):].tolist()
        assert child.ids[3:] == alone, i
        bodies.append(alone)
    assert len({tuple(b) for b in bodies}) > 1  # the branches really differ


def test_sequential_greedy_equals_hf_generate(qwen3):
    prompts = [enc("hello there"), enc("a different, longer prompt")]
    eng = NPREngine(qwen3, TOK, num_blocks=256, block_size=4)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, step_repetition_penalty=1.0)
    outs = eng.generate(prompts, params, mode="sequential")
    for p, r in zip(prompts, outs):
        with torch.no_grad():
            hf = qwen3.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                pad_token_id=0, suppress_tokens=[EOS])[0, len(p):].tolist()
        assert r.token_ids == hf and r.finish_reason == "length" and r.truncated


def test_seeded_sampling_is_reproducible(qwen3):
    eng = NPREngine(qwen3, TOK, num_blocks=256, block_size=4)
    prompts = [enc("abc"), enc("defgh")]
    params = SamplingParams(max_new_tokens=30, seed=123, n=2, temperature=1.0, top_k=50)
    a = [r.token_ids for r in eng.generate(prompts, params, mode="sequential")]
    b = [r.token_ids for r in eng.generate(prompts, params, mode="sequential")]
    c = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_new_tokens=30, seed=7, n=2, top_k=50),
                                           mode="sequential")]
    assert a == b and a != c
    assert len(a) == 4 and a[0] != a[1]  # the n samples of a prompt differ
    eng.pool.assert_all_free()


@pytest.mark.parametrize("trial", range(40))
def test_the_batched_draw_is_torch_multinomials_draw(trial):
    """``exponential_race`` replaces one ``torch.multinomial`` call per request: same tokens, and each request's
    generator ends in the same state (its next draw agrees too), for any split of the rows into requests."""
    from engine.sampling import exponential_race

    g = torch.Generator().manual_seed(trial)
    B, V = int(torch.randint(1, 12, (), generator=g)), int(torch.randint(2, 3000, (), generator=g))
    logits = torch.randn(B, V, generator=g) * 4
    if trial % 3 == 0:  # rows with impossible tokens (top-k / top-p / processors leave -inf)
        logits[:, torch.randint(0, V, (V // 2,), generator=g)] = float("-inf")
    probs = logits.softmax(-1)
    cuts = sorted(set(torch.randint(1, B, (2,), generator=g).tolist())) if B > 1 else []
    bounds = [0, *cuts, B]
    groups = list(zip(bounds[:-1], bounds[1:]))
    ours = [torch.Generator().manual_seed(1000 * trial + i) for i in range(len(groups))]
    ref = [torch.Generator().manual_seed(1000 * trial + i) for i in range(len(groups))]
    want = torch.cat([torch.multinomial(probs[a:b], 1, generator=r).squeeze(1) for (a, b), r in zip(groups, ref)])
    assert torch.equal(exponential_race(probs, ours, groups), want)
    for (a, b), o, r in zip(groups, ours, ref):
        assert torch.equal(exponential_race(probs[a:b], [o], [(0, b - a)]),
                           torch.multinomial(probs[a:b], 1, generator=r).squeeze(1))


def test_samples_share_prompt_blocks(qwen3):
    eng = NPREngine(qwen3, TOK, num_blocks=256, block_size=4)
    prompt = enc("x" * 40)  # 10 full blocks
    outs = eng.generate([prompt], SamplingParams(max_new_tokens=8, n=6, seed=0, ignore_eos=True),
                        mode="sequential")
    assert len(outs) == 6 and all(r.num_tokens == 8 for r in outs)
    # prompt once (10 blocks) + 6 samples x 2 blocks of 4 tokens
    assert eng.last_stats["peak_kv_blocks"] == 10 + 6 * 2


def test_budget_exhaustion_truncates_cleanly(qwen3):
    eng, r, resp = forced_run(qwen3, TWO_BLOCKS, "parallel")
    crit = r.graph.stats.critical_path_tokens
    for kw in (dict(max_new_tokens=crit // 2), dict(max_new_tokens=1000, max_total_tokens=len(resp) // 2)):
        sp = SamplingParams(logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)], **kw)
        (t,) = eng.generate([PROMPT], sp, mode="parallel")
        assert t.finish_reason == "length" and t.truncated
        assert t.token_ids == t.graph.response_ids and len(t.logprobs) == len(t.token_ids)
        eng.pool.assert_all_free()
    # the critical path, not the total, is what max_new_tokens bounds
    sp = SamplingParams(max_new_tokens=crit, logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)])
    (full,) = eng.generate([PROMPT], sp, mode="parallel")
    assert full.finish_reason == "eos" and len(full.token_ids) > crit


def test_low_budget_declines_fork_and_decodes_steps_sequentially(qwen3):
    resp = enc(TWO_BLOCKS)
    eng = NPREngine(qwen3, TOK, num_blocks=512, block_size=4, min_fork_budget=10_000)
    sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)])
    (r,) = eng.generate([PROMPT], sp, mode="parallel")
    assert r.num_forks == 0 and r.token_ids == resp and r.finish_reason == "eos"
    assert not any(r.forced_mask)
    assert np.abs(np.asarray(r.logprobs) - reference_logprobs(qwen3, r.graph)).max() <= 1e-4


def test_pool_pressure_preempts_and_recomputes_without_leak(qwen3):
    """A pool too small for every request at once: the newest ones are preempted, then run again to the end."""
    resp = enc(TWO_BLOCKS)
    prompts = [enc(f"q{i}?") for i in range(5)]
    forcers = {tuple(p): TrajectoryForcer(TOK, p, resp) for p in prompts}

    def dispatch(ctx, logits):
        return forcers[tuple(ctx[:3])](ctx, logits)

    need = -(-(len(resp) + 3) // 4) + 8  # one trajectory, blocks of 4, plus partial blocks
    eng = NPREngine(qwen3, TOK, num_blocks=need + need // 2, block_size=4, min_fork_budget=0, reserve_tokens=4)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=1000, logits_processors=[dispatch]))
    assert eng.last_stats["preemptions"] > 0
    for r in outs:
        assert r.finish_reason == "eos" and not r.truncated and r.token_ids == resp
        assert len(r.logprobs) == len(r.token_ids) == len(r.forced_mask)
        assert np.abs(np.asarray(r.logprobs) - reference_logprobs(qwen3, r.graph)).max() <= 1e-4
    eng.pool.assert_all_free()


def test_preempted_samples_are_the_ones_an_ample_pool_draws(qwen3):
    """Recompute preemption re-seeds the request's generator: the same seed gives the same samples."""
    prompts = [enc(f"q{i}?") for i in range(6)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=40, seed=7, ignore_eos=True)
    ample = NPREngine(qwen3, TOK, block_size=4, num_blocks=512).generate(prompts, sp, mode="sequential")
    small = NPREngine(qwen3, TOK, block_size=4, num_blocks=40, reserve_tokens=4)
    tight = small.generate(prompts, sp, mode="sequential")
    assert small.last_stats["preemptions"] > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in ample]
    assert all(r.finish_reason == "length" for r in tight)
    small.pool.assert_all_free()


def test_admission_waits_instead_of_overflowing(qwen3):
    resp = enc(TWO_BLOCKS)
    prompts = [enc(f"q{i}?") for i in range(3)]
    forcers = {tuple(p): TrajectoryForcer(TOK, p, resp) for p in prompts}
    need = -(-(len(resp) + 3) // 4) + 8
    eng = NPREngine(qwen3, TOK, num_blocks=need + 4, block_size=4, min_fork_budget=0, max_running_requests=1)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=1000,
                                                logits_processors=[lambda c, x: forcers[tuple(c[:3])](c, x)]))
    assert [r.finish_reason for r in outs] == ["eos"] * 3
    eng.pool.assert_all_free()


def test_prompt_larger_than_pool_is_refused_before_any_work(qwen3):
    eng = NPREngine(qwen3, TOK, num_blocks=4, block_size=4, reserve_tokens=4)
    with pytest.raises(ValueError, match="needs 26 blocks.*4 blocks"):
        eng.generate([enc("y" * 100), enc("ok")], SamplingParams(max_new_tokens=5, ignore_eos=True))
    eng.pool.assert_all_free()


def test_stop_on_violation_and_stop_tokens(qwen3):
    bad = enc("<step>1: no block here</step>" + TWO_BLOCKS)
    sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, bad, strict=False)])
    eng = NPREngine(qwen3, TOK, num_blocks=256, block_size=4)
    (r,) = eng.generate([PROMPT], sp, mode="parallel")
    assert r.finish_reason == "violation" and r.truncated and len(r.token_ids) == 1
    eng2 = NPREngine(qwen3, TOK, num_blocks=256, block_size=4, stop_on_violation=False)
    (r2,) = eng2.generate([PROMPT], sp, mode="parallel")
    assert r2.finish_reason == "eos" and not r2.graph.is_valid
    stop = enc("=")[0]
    resp = enc(TWO_BLOCKS)
    sp = SamplingParams(max_new_tokens=1000, stop_token_ids=[stop],
                        logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)])
    (r3,) = eng.generate([PROMPT], sp, mode="sequential")
    assert r3.finish_reason == "stop" and r3.token_ids == resp[:resp.index(stop) + 1]
    eng.pool.assert_all_free()


def test_load_weights_and_live_module_updates(qwen3):
    model = tiny("qwen3", seed=1)
    other = tiny("qwen3", seed=2)
    eng, r, _ = forced_run(model)
    eng.load_weights(other.state_dict())
    resp = enc(TWO_BLOCKS)
    sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)])
    (r2,) = eng.generate([PROMPT], sp)
    assert np.abs(np.asarray(r2.logprobs) - reference_logprobs(other, r2.graph)).max() <= 1e-4
    assert np.abs(np.asarray(r2.logprobs) - np.asarray(r.logprobs)).max() > 1e-2
    with torch.no_grad():  # an in-place update of the live module (what an optimizer step does)
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    (r3,) = eng.generate([PROMPT], sp)
    assert np.abs(np.asarray(r3.logprobs) - reference_logprobs(model, r3.graph)).max() <= 1e-4
    # a fused optimizer writes the parameters without bumping their version counters: still picked up
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.tensor([PROMPT])).logits.sum().backward()
    opt.step()
    (r4,) = eng.generate([PROMPT], sp)
    assert np.abs(np.asarray(r4.logprobs) - reference_logprobs(model, r4.graph)).max() <= 1e-4
    assert np.abs(np.asarray(r4.logprobs) - np.asarray(r3.logprobs)).max() > 1e-3
    with pytest.raises(KeyError):
        eng.load_weights({"nonsense": torch.zeros(1)})


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_other_families_exact(family):
    model = tiny(family, attn="sdpa")
    for mode in ("parallel", "sequential"):
        _, r, resp = forced_run(model, TWO_BLOCKS, mode)
        assert r.token_ids == resp
        assert np.abs(np.asarray(r.logprobs) - reference_logprobs(model, r.graph)).max() <= 1e-4


def test_sliding_window_models_are_refused_not_decoded_wrongly():
    """The runner's attention has no window: a model with sliding-window layers is refused at construction."""
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(NotImplementedError, match="sliding-window attention layers are not supported"):
        NPREngine(Qwen2ForCausalLM(cfg).eval(), TOK)


def test_bad_inputs_raise_clear_errors(qwen3):
    eng = NPREngine(qwen3, TOK, num_blocks=16)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]])
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([[V + 5]])
    with pytest.raises(ValueError, match="mode"):
        eng.generate([[1]], mode="tree")
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def mutate(ids: list[int], rng: np.random.Generator, n: int) -> list[int]:
    """Random edits with tags, EOS and characters: the kind of sequence an untrained policy produces."""
    ids = list(ids)
    alphabet = [ID[t] for t in TAGS] + [EOS] + enc("1: ab\n")
    for _ in range(n):
        i = int(rng.integers(0, len(ids) + 1))
        op = rng.integers(0, 3)
        if op == 0:
            ids.insert(i, int(rng.choice(alphabet)))
        elif op == 1 and i < len(ids):
            del ids[i]
        elif i < len(ids):
            ids[i] = int(rng.choice(alphabet))
    return ids


def mutated_forcer(seed: int):
    """The fuzz tests' generator and forcer for ``seed``: a mutated trajectory (skipped when the mutation does not
    serialize to itself)."""
    rng = np.random.default_rng(seed)
    resp = mutate(enc(TWO_BLOCKS if seed % 2 else NESTED), rng, 8)
    try:
        return rng, TrajectoryForcer(TOK, PROMPT, resp, strict=False)
    except ValueError:
        pytest.skip("this mutation does not serialize to itself")


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_untrusted_sequences_no_crash_no_leak_exact(qwen3, seed):
    """Mutated trajectories steer the engine (off-trajectory it samples freely): whatever the structure, the
    rollout is aligned, the pool ends free, and the logprobs still equal the full forward with the layout."""
    rng, forcer = mutated_forcer(seed)
    small_pool = seed % 3 == 0
    eng = NPREngine(qwen3, TOK, num_blocks=20 if small_pool else 512, block_size=4, min_fork_budget=0,
                    stop_on_violation=bool(seed % 4 == 1), reserve_tokens=4)
    params = SamplingParams(max_new_tokens=int(rng.integers(20, 300)), seed=seed, temperature=1.0,
                            logits_processors=[forcer])
    for mode in ("parallel", "sequential"):
        outs = eng.generate([PROMPT, enc("another prompt")], params, mode=mode)
        eng.pool.assert_all_free()
        for r in outs:
            assert r.finish_reason in ("eos", "length", "violation", "aborted")
            assert r.token_ids == r.graph.response_ids
            assert len(r.token_ids) == len(r.logprobs) == len(r.forced_mask) == r.num_tokens
            assert isinstance(r.graph.violations, list)  # a verdict, never an exception
            if r.token_ids:
                ref = reference_logprobs(qwen3, r.graph)
                assert np.abs(np.asarray(r.logprobs) - ref).max() <= 1e-4


def _grammar(ctx, logits):
    """The model's own logits, restricted to what the NPR grammar allows next: nothing is forced, so the engine
    forks wherever the model itself closes a guideline (1-3 plans)."""
    letters = [TOK.convert_tokens_to_ids(c) for c in "abcdefgh "]
    tag_ids = set(ID.values())
    last = next((t for t in reversed(ctx) if t in tag_ids), None)
    closing = {ID["<plan>"]: ID["</plan>"], ID["<step>"]: ID["</step>"], ID["<takeaway>"]: ID["</takeaway>"]}
    if last in closing:
        allow = letters + [closing[last]]
    elif last == ID["<guideline>"]:
        allow = [ID["<plan>"]]
    elif last == ID["</plan>"]:
        plans = 0
        for t in reversed(ctx):
            if t == ID["<guideline>"]:
                break
            plans += t == ID["<plan>"]
        allow = [ID["</guideline>"]] + ([ID["<plan>"]] if plans < 3 else [])
    else:
        allow = letters + [ID["<guideline>"], EOS]
    out = torch.full_like(logits, float("-inf"))
    out[allow] = logits[allow]
    return out


def test_small_pools_give_the_ample_pools_samples_with_real_forks(qwen3):
    """The KV pool changes speed, never samples: forks the model chose itself, under pressure, are preempted
    and recomputed instead of declined."""
    prompts = [enc(f"Q{i}: {i * 7 % 13}+{i % 5}?") for i in range(64)]
    params = SamplingParams(max_new_tokens=40, seed=3, logits_processors=[_grammar])

    def run(blocks):
        eng = NPREngine(qwen3, TOK, num_blocks=blocks, block_size=4, min_fork_budget=0, stop_on_violation=False)
        out = eng.generate(prompts, params, mode="parallel")
        eng.pool.assert_all_free()
        return out, eng.last_stats["preemptions"]

    ample, none = run(4096)
    assert none == 0 and sum(r.num_forks for r in ample) >= 10
    for blocks in (25, 64):
        small, preempted = run(blocks)
        assert preempted > 0
        assert [r.token_ids for r in small] == [r.token_ids for r in ample]
        assert [r.num_forks for r in small] == [r.num_forks for r in ample]
        assert [r.finish_reason for r in small] == [r.finish_reason for r in ample]
        for x, y in zip(small, ample):  # batching differs, so only rounding separates the logprobs
            assert np.abs(np.asarray(x.logprobs) - np.asarray(y.logprobs)).max() <= 1e-4
