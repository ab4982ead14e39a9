"""Paged decode attention (``decode_attention="paged"``): reading the KV pool in place over the block tables gives
the gather path's tokens and the full forward's logprobs, with forks, joins, nested blocks, holes filled after a
join, shared prompt blocks and preemption; the visibility rule it relies on holds at every step."""

import numpy as np
import pytest
import torch
from test_engine import (
    NESTED,
    PROMPT,
    TOK,
    TWO_BLOCKS,
    _grammar,
    enc,
    mutated_forcer,
    reference_logprobs,
    tiny,
)

from engine import NPREngine, SamplingParams, TrajectoryForcer
from engine.paged_attention import PagedDecode


@pytest.fixture(scope="module", autouse=True)
def flex_compiles():
    """Compiled FlexAttention needs Inductor's C++ toolchain on the CPU; without it the engine gathers (tested in
    test_engine.py) and these tests have nothing to run."""
    ok, why = PagedDecode(4, "cpu").available()
    if not ok:
        pytest.skip(f"compiled FlexAttention does not run here: {why}")


@pytest.fixture(scope="module")
def qwen3():
    return tiny("qwen3")


def checked(eng):
    """Assert the visibility rule (each table sees exactly its blocks' filled slots) before every decode step."""
    runner = eng.runner
    prepare = runner.prepare_decode

    def prepare_checked(pool, tables, *a, **k):
        PagedDecode.check(pool, tables)
        return prepare(pool, tables, *a, **k)

    runner.prepare_decode = prepare_checked
    return eng


@pytest.mark.parametrize("text", [TWO_BLOCKS, NESTED], ids=["two_blocks", "nested"])
def test_paged_decode_is_exact_with_forks_and_joins(qwen3, text):
    resp = enc(text)
    outs = {}
    for how in ("gather", "paged"):
        eng = checked(NPREngine(qwen3, TOK, num_blocks=512, block_size=4, min_fork_budget=0, decode_attention=how))
        sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)], seed=0)
        (r,) = eng.generate([PROMPT], sp, mode="parallel")
        eng.pool.assert_all_free()
        st = eng.last_stats
        assert st["paged_decode_forwards"] == (st["decode_forwards"] if how == "paged" else 0)
        outs[how] = r
    g, p = outs["gather"], outs["paged"]
    assert p.token_ids == g.token_ids == resp and p.num_forks == g.num_forks >= 2
    assert np.abs(np.asarray(p.logprobs) - reference_logprobs(qwen3, p.graph)).max() <= 1e-4
    assert np.abs(np.asarray(p.logprobs) - np.asarray(g.logprobs)).max() <= 1e-5


def test_paged_decode_under_pool_pressure_gives_the_same_samples(qwen3):
    """Forks the model chose itself, 64 prompts, a pool small enough to preempt: paged and gather agree."""
    prompts = [enc(f"Q{i}: {i * 7 % 13}+{i % 5}?") for i in range(64)]
    params = SamplingParams(max_new_tokens=40, seed=3, logits_processors=[_grammar])
    outs = {}
    for how, blocks in (("gather", 4096), ("paged", 4096), ("paged", 64)):
        eng = checked(NPREngine(qwen3, TOK, num_blocks=blocks, block_size=4, min_fork_budget=0,
                                stop_on_violation=False, decode_attention=how))
        outs[how, blocks] = (eng.generate(prompts, params, mode="parallel"), eng.last_stats["preemptions"])
        eng.pool.assert_all_free()
    ref, _ = outs["gather", 4096]
    assert sum(r.num_forks for r in ref) >= 10 and outs["paged", 64][1] > 0
    for key in (("paged", 4096), ("paged", 64)):
        got, _ = outs[key]
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
        for x, y in zip(got, ref):
            assert np.abs(np.asarray(x.logprobs) - np.asarray(y.logprobs)).max() <= 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_paged_decode_on_untrusted_sequences_stays_exact(qwen3, seed):
    rng, forcer = mutated_forcer(seed)
    eng = checked(NPREngine(qwen3, TOK, num_blocks=20 if seed % 3 == 0 else 512, block_size=4, min_fork_budget=0,
                            reserve_tokens=4, decode_attention="paged"))
    params = SamplingParams(max_new_tokens=int(rng.integers(20, 300)), seed=seed, temperature=1.0,
                            logits_processors=[forcer])
    for mode in ("parallel", "sequential"):
        for r in eng.generate([PROMPT, enc("another prompt")], params, mode=mode):
            if r.token_ids:
                assert np.abs(np.asarray(r.logprobs) - reference_logprobs(qwen3, r.graph)).max() <= 1e-4
        eng.pool.assert_all_free()


def test_auto_gathers_on_the_cpu_and_paged_agrees_on_long_contexts(qwen3):
    """On the CPU "auto" keeps the gather (the tiny preset's numerics); "paged" over prompts of several blocks
    gives the same greedy tokens."""
    sp = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    prompts = [enc("x" * 300 + str(i)) for i in range(4)]
    auto = NPREngine(qwen3, TOK, block_size=16, decode_attention="auto")
    want = auto.generate(prompts, sp, mode="sequential")
    assert auto.last_stats["paged_decode_forwards"] == 0
    paged = NPREngine(qwen3, TOK, block_size=16, decode_attention="paged")
    got = paged.generate(prompts, sp, mode="sequential")
    assert paged.last_stats["paged_decode_forwards"] == paged.last_stats["decode_forwards"] > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_decode_attention_must_be_a_known_name(qwen3):
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        NPREngine(qwen3, TOK, decode_attention="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: auto is paged there")
def test_auto_is_paged_on_cuda_and_exact():
    model = tiny("qwen3").cuda()
    resp = enc(TWO_BLOCKS)
    eng = checked(NPREngine(model, TOK, num_blocks=512, block_size=16, min_fork_budget=0))
    sp = SamplingParams(max_new_tokens=1000, logits_processors=[TrajectoryForcer(TOK, PROMPT, resp)], seed=0)
    (r,) = eng.generate([PROMPT], sp, mode="parallel")
    assert r.token_ids == resp and eng.last_stats["paged_decode_forwards"] == eng.last_stats["decode_forwards"] > 0
    ref = reference_logprobs(model.cpu(), r.graph)
    assert np.abs(np.asarray(r.logprobs) - ref).max() <= 1e-3  # TF32 / fused-kernel rounding on the GPU
