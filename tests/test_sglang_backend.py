"""SGLang rollout backend.

The backend tests need the `sglang` package and CUDA; elsewhere they skip, saying which is missing. They serve a
tiny Qwen3 built from a config (no download) and check it against the native engine and the trainer: greedy
sequential decoding, orchestrated-parallel rollouts whose trainer logprobs (under the recorded layout) equal
SGLang's, and weight sync. The error-message and output-format tests run everywhere.
"""

import importlib.util

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import npr_env
from engine import NPREngine, SamplingParams, TrajectoryForcer
from engine.backends import NativeSequentialBackend
from engine.backends.sglang import (
    SGLangEngine,
    parse_output,
    sglang_engine_kwargs,
    sglang_unavailable_reason,
    weight_dtype,
)
from engine.orchestration import CompletionRequest, OrchestratedEngine
from npr_agent.policy import build_batch, token_logprobs
from npr_agent.scoring import scored_logprobs, training_sample
from npr_env.schema import format_block

TOK = npr_env.load_tokenizer()
REASON = sglang_unavailable_reason()


def needs_sglang(test):
    """A GPU test (the `gpu` marker) that also needs the sglang package; skipped, with the reason, elsewhere."""
    skip = pytest.mark.skipif(REASON is not None, reason=f"SGLang backend not runnable here: {REASON}")
    return pytest.mark.gpu(skip(test))


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


PROMPT = enc("What is 3+4+5+6?")
TRAJECTORY = (format_block(["add 3 4", "add 5 6"], ["3+4=7 ok", "5+6=11 ok"], "7+11=18 total")
              + "So \\boxed{18}<eos>")


# -- everywhere -------------------------------------------------------------------------------------------------

def test_missing_sglang_error_names_the_install_command():
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    with pytest.raises(ImportError, match=r"pip install '\.\[sglang\]' on a CUDA machine"):
        SGLangEngine("/nonexistent/model", tokenizer=TOK)


def test_parse_output_of_sglang_token_results():
    """The documented result of ``sglang.Engine.generate(input_ids=..., return_logprob=True)`` with
    ``skip_tokenizer_init=True``: (logprob, id, text) tuples, a None-padded input side, a finish dict."""
    req = CompletionRequest(ids=[5, 6, 7, 8], max_new_tokens=4, stop_token_ids=(9, 1), score_tail=2)
    out = {"output_ids": [10, 9],
           "meta_info": {"output_token_logprobs": [(-0.5, 10, None), (-0.25, 9, None)],
                         "input_token_logprobs": [(None, 6, None), (-1.0, 7, None), (-2.0, 8, None)],
                         "finish_reason": {"type": "stop", "matched": 9}}}
    c = parse_output(out, req, eos_ids={1})
    assert (c.token_ids, c.logprobs, c.finish_reason, c.tail_logprobs) == ([10, 9], [-0.5, -0.25], "stop", [-1.0, -2.0])
    out["meta_info"]["finish_reason"] = {"type": "stop", "matched": 1}
    out["meta_info"]["output_token_logprobs"][-1] = (-0.25, 1, None)
    out["output_ids"] = [10, 1]
    assert parse_output(out, req, eos_ids={1}).finish_reason == "eos"
    out["meta_info"]["finish_reason"] = {"type": "length", "length": 2}
    assert parse_output(out, req, eos_ids={1}).finish_reason == "length"
    out["meta_info"]["finish_reason"] = {"type": "abort", "message": "preempted"}
    assert parse_output(out, req, eos_ids={1}).finish_reason == "aborted"
    out["meta_info"]["finish_reason"] = {"type": "stop", "matched": 9}  # stop token missing from the ids
    with pytest.raises(RuntimeError, match="did not return it"):
        parse_output(out, req, eos_ids={1})
    out["meta_info"]["finish_reason"] = {"type": "stop", "matched": 1}
    out["meta_info"]["input_token_logprobs"] = [(None, 7, None), (-2.0, 8, None)]  # not the forced tail
    with pytest.raises(RuntimeError, match="forced tokens"):
        parse_output(out, req, eos_ids={1})


class FakeSGL:
    """Records the calls SGLangEngine makes on its ``sglang.Engine`` (the documented signatures)."""

    def __init__(self):
        self.calls = []

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", [n for n, _ in named_tensors], flush_cache))
        return True, "Success"

    def flush_cache(self):
        self.calls.append(("flush",))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


def fake_engine(memory_saver: bool = True) -> SGLangEngine:
    eng = object.__new__(SGLangEngine)  # no server: only the weight-sync and memory plumbing
    eng.sgl, eng.memory_saver, eng.released_tags, eng.weight_dtype = FakeSGL(), memory_saver, (), None
    return eng


def test_engine_kwargs_plumbing():
    kw = sglang_engine_kwargs(memory_saver=True, mem_fraction_static=0.45, dtype="bfloat16")
    assert kw == {"skip_tokenizer_init": True, "enable_memory_saver": True, "mem_fraction_static": 0.45,
                  "dtype": "bfloat16"}
    assert "enable_memory_saver" not in sglang_engine_kwargs()
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        sglang_engine_kwargs(skip_tokenizer_init=False)
    with pytest.raises(ValueError, match="contradicts"):
        sglang_engine_kwargs(memory_saver=True, enable_memory_saver=False)
    assert weight_dtype("bfloat16") is torch.bfloat16 and weight_dtype("auto") is None and weight_dtype(None) is None


def test_load_weights_sends_buckets_and_flushes_once():
    model = tiny()
    sd = model.state_dict()
    eng = fake_engine()
    n = eng.load_weights(sd, bucket_bytes=100_000)  # a whole state dict, bucketed here
    updates = [c for c in eng.sgl.calls if c[0] == "update"]
    sent = [k for c in updates for k in c[1]]
    assert n == len(updates) > 1 and all(not c[2] for c in updates) and eng.sgl.calls[-1] == ("flush",)
    assert sorted(sent) == sorted(k for k in sd if k != "lm_head.weight")  # the tied head is sent once
    eng = fake_engine()
    buckets = [dict(list(sd.items())[:3]), {}, dict(list(sd.items())[3:])]  # an iterable of buckets, sent as is
    assert eng.load_weights(iter(buckets)) == 2
    assert [c[0] for c in eng.sgl.calls] == ["update", "update", "flush"]
    assert eng.sgl.calls[0][1] == list(sd)[:3]


def test_load_weights_refuses_sharded_tensors():
    class Shard(torch.Tensor):
        def full_tensor(self):
            return self

    with pytest.raises(TypeError, match="sharded DTensor"):
        fake_engine().load_weights({"w": torch.zeros(2).as_subclass(Shard)})


def test_memory_saver_releases_and_resumes_the_kv_cache():
    eng = fake_engine()
    eng.release_memory()
    eng.release_memory()  # already released: nothing more
    eng.resume_memory()
    eng.resume_memory()
    assert eng.sgl.calls == [("release", ["kv_cache"]), ("resume", ["kv_cache"])]
    with pytest.raises(RuntimeError, match="memory_saver=True"):
        fake_engine(memory_saver=False).release_memory()


# -- on a CUDA machine with sglang ---------------------------------------------------------------------------------

def tiny(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(TOK), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=TOK.eos_token_id, bos_token_id=None,
                      pad_token_id=TOK.pad_token_id)
    cfg._attn_implementation = "eager"
    return Qwen3ForCausalLM(cfg).eval()


def overfit(model: Qwen3ForCausalLM, steps: int = 400) -> Qwen3ForCausalLM:
    """Teach the model TRAJECTORY under the orchestrated layout (the views each token is generated under), so
    greedy orchestrated decoding reproduces it with 2 forks, whatever the backend."""
    forced = OrchestratedEngine(NativeSequentialBackend(NPREngine(model, TOK, num_blocks=512, block_size=4)), TOK,
                                min_fork_budget=0)
    sp = SamplingParams(max_new_tokens=400, logits_processors=[TrajectoryForcer(TOK, PROMPT, enc(TRAJECTORY))])
    (r,) = forced.generate([PROMPT], sp)
    batch = build_batch([training_sample(r)], device="cuda", train_forced=False)
    model.cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        lp = token_logprobs(model, batch)
        loss = -(lp * batch.loss_mask).sum() / batch.num_loss_tokens
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval().cpu()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("sglang") / "tiny"
    model = overfit(tiny())
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    eng = SGLangEngine(path, tokenizer=TOK, min_fork_budget=0, dtype="float32", attention_backend="torch_native",
                       disable_cuda_graph=True, mem_fraction_static=0.2, random_seed=0)
    yield eng, model
    eng.shutdown()


def trainer_logprobs(model, rollout) -> np.ndarray:
    s = training_sample(rollout)
    with torch.no_grad():
        lp = token_logprobs(model, build_batch([s]))[0].numpy()
    if s is rollout:
        P = len(rollout.prompt_ids)
        return lp[P:P + len(rollout.token_ids)]
    return scored_logprobs(s, lp[:len(s.source)])


@needs_sglang
def test_sequential_greedy_matches_native_engine(served):
    eng, model = served
    prompts = [enc("hello there"), enc("a different, longer prompt")]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, step_repetition_penalty=1.0)
    outs = eng.generate(prompts, params, mode="sequential")
    native = NPREngine(model, TOK, num_blocks=256, block_size=4).generate(prompts, params, mode="sequential")
    for o, n in zip(outs, native):
        assert o.layout == "sequential" and o.finish_reason == "length" and len(o.token_ids) == 24
        assert o.token_ids == n.token_ids
        assert np.abs(np.asarray(o.logprobs) - np.asarray(n.logprobs)).max() <= 1e-3
        assert np.abs(trainer_logprobs(model, o) - np.asarray(o.logprobs)).max() <= 1e-3


@needs_sglang
def test_parallel_rollouts_are_orchestrated_and_on_policy(served):
    eng, model = served
    params = SamplingParams(temperature=0, max_new_tokens=400, step_repetition_penalty=1.0)
    (r,) = eng.generate([PROMPT], params, mode="parallel")
    assert r.token_ids == enc(TRAJECTORY) and r.finish_reason == "eos" and r.num_forks == 1
    assert r.layout == "orchestrated" and r.graph.is_valid
    assert eng.last_stats["waves"] == 3 and eng.last_stats["reprefill_tokens"] > 0
    got = trainer_logprobs(model, r)
    assert np.abs(got - np.asarray(r.logprobs)).max() <= 1e-3  # every token, the forced ones included


@needs_sglang
def test_load_weights_updates_the_served_policy(served):
    eng, model = served
    other = tiny(seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, step_repetition_penalty=1.0)
    prompts = [enc("weights?")]
    before = eng.generate(prompts, params, mode="sequential")[0]
    eng.load_weights(other.state_dict())
    after = eng.generate(prompts, params, mode="sequential")[0]
    want = NPREngine(other, TOK, num_blocks=256, block_size=4).generate(prompts, params, mode="sequential")[0]
    assert after.token_ids == want.token_ids
    assert np.abs(np.asarray(after.logprobs) - np.asarray(want.logprobs)).max() <= 1e-3
    assert np.abs(np.asarray(after.logprobs) - np.asarray(before.logprobs)).max() > 1e-2
    eng.load_weights(model.state_dict())  # leave the fixture as it was


@needs_sglang
def test_memory_saver_frees_the_kv_cache_and_bucketed_sync(tmp_path):
    """enable_memory_saver: releasing the KV cache frees GPU memory, resuming it serves again; weights sent in
    buckets (Dist.iter_state_dict_buckets) give the same policy as a whole state dict."""
    from npr_agent.distributed import LOCAL

    path = tmp_path / "tiny"
    model = tiny()
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    eng = SGLangEngine(path, tokenizer=TOK, dtype="float32", attention_backend="torch_native",
                       disable_cuda_graph=True, mem_fraction_static=0.5, random_seed=0, memory_saver=True)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, step_repetition_penalty=1.0)
        prompts = [enc("memory?")]
        before = eng.generate(prompts, params, mode="sequential")[0]
        free0 = torch.cuda.mem_get_info()[0]
        eng.release_memory()
        assert torch.cuda.mem_get_info()[0] > free0 + 2**30  # the KV pool's memory is back
        eng.resume_memory()
        other = tiny(seed=3)
        eng.load_weights(LOCAL.iter_state_dict_buckets(other, bucket_bytes=1 << 16))
        want = NPREngine(other, TOK, num_blocks=256, block_size=4).generate(prompts, params, mode="sequential")[0]
        after = eng.generate(prompts, params, mode="sequential")[0]
        assert after.token_ids == want.token_ids
        assert np.abs(np.asarray(after.logprobs) - np.asarray(want.logprobs)).max() <= 1e-3
        assert np.abs(np.asarray(after.logprobs) - np.asarray(before.logprobs)).max() > 1e-2
    finally:
        eng.shutdown()
