"""The native engine's KV pool sized from memory, the too-small-pool error, releasing the pool, and the buckets
of the weight sync (planning, the plain and the FSDP2 state dict). CPU only; the free-memory figure is injected."""

import os
import pickle
import random
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Qwen3Config, Qwen3ForCausalLM

import engine.npr_engine as npr_engine
import npr_env
from engine import NPREngine, SamplingParams
from engine.backends import NativeSequentialBackend
from engine.backends.sglang import plan_buckets
from engine.npr_engine import DEFAULT_CPU_KV_BYTES, DEFAULT_CUDA_KV_FRACTION, size_kv_pool
from engine.orchestration import CompletionRequest
from npr_agent.distributed import LOCAL, Dist

TOK = npr_env.load_tokenizer()
GiB = 2**30


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def tiny(seed: int = 0, tie: bool = True) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=tie)
    cfg._attn_implementation = "eager"
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def per_block(block_size: int = 16) -> int:  # the tiny model: 2 layers x 2 KV heads x 16 dims, fp32
    return 2 * 2 * block_size * 2 * 16 * 4


# -- sizing ---------------------------------------------------------------------------------------------------

def test_pool_is_a_fraction_of_the_free_memory():
    bpb = 147_456 * 16  # Qwen3-4B, bf16, 16-token blocks: 2.25 MiB
    info = size_kv_pool(bpb, 16, "cuda", kv_mem_fraction=0.3, free_bytes=70 * GiB)
    assert info.source == "kv_mem_fraction" and info.fraction == 0.3 and info.free_bytes == 70 * GiB
    assert info.num_blocks == int(70 * GiB * 0.3) // bpb == 9557
    assert info.num_tokens == 9557 * 16 and info.num_bytes <= 0.3 * 70 * GiB < info.num_bytes + bpb
    # on CUDA, nothing given: the default fraction
    dflt = size_kv_pool(bpb, 16, "cuda", free_bytes=70 * GiB)
    assert dflt.fraction == DEFAULT_CUDA_KV_FRACTION and dflt.num_blocks == int(70 * GiB * 0.3) // bpb
    # on the CPU, nothing given: 256 MiB, never a share of the host's RAM
    cpu = size_kv_pool(bpb, 16, "cpu", free_bytes=70 * GiB)
    assert cpu.source == "default_cpu_bytes" and cpu.num_blocks == DEFAULT_CPU_KV_BYTES // bpb
    # on the CPU, a fraction given: of the available RAM
    assert size_kv_pool(bpb, 16, "cpu", kv_mem_fraction=0.5, free_bytes=GiB).num_blocks == (GiB // 2) // bpb


def test_explicit_sizes_override_the_fraction():
    bpb = per_block()
    a = size_kv_pool(bpb, 16, "cuda", num_blocks=123, kv_cache_bytes=10**9, kv_mem_fraction=0.9, free_bytes=GiB)
    assert (a.num_blocks, a.source, a.fraction) == (123, "num_blocks", None)
    b = size_kv_pool(bpb, 16, "cuda", kv_cache_bytes=100 * bpb, kv_mem_fraction=0.9, free_bytes=GiB)
    assert (b.num_blocks, b.source) == (100, "kv_cache_bytes")


def test_bad_fractions_and_tiny_memory_are_errors():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="kv_mem_fraction must be in"):
            size_kv_pool(1024, 16, "cpu", kv_mem_fraction=bad, free_bytes=GiB)
    with pytest.raises(ValueError, match="less than one KV block"):
        size_kv_pool(1024, 16, "cuda", kv_mem_fraction=0.5, free_bytes=1000)
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        size_kv_pool(1024, 16, "cpu", num_blocks=0)


def test_engine_sizes_its_pool_from_the_free_memory(model, monkeypatch):
    monkeypatch.setattr(npr_engine, "free_memory", lambda device: 64 * 2**20)
    eng = NPREngine(model, TOK, kv_mem_fraction=0.25)
    assert eng.pool_info.source == "kv_mem_fraction" and eng.pool_info.free_bytes == 64 * 2**20
    assert eng.pool.num_blocks == eng.pool_info.num_blocks == (16 * 2**20) // per_block()
    assert eng.pool.bytes_per_block == per_block()
    eng.generate([enc("hi")], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert eng.last_stats["kv_pool_blocks"] == eng.pool.num_blocks
    assert eng.last_stats["kv_pool_source"] == "kv_mem_fraction"
    fixed = NPREngine(model, TOK, num_blocks=77, kv_mem_fraction=0.25)  # an explicit count still wins
    assert fixed.pool.num_blocks == 77 and fixed.pool_info.source == "num_blocks"
    cpu = NPREngine(model, TOK)  # CPU default: unchanged, 256 MiB
    assert cpu.pool_info.source == "default_cpu_bytes" and cpu.pool.num_blocks == DEFAULT_CPU_KV_BYTES // per_block()


# -- a pool too small for one request ---------------------------------------------------------------------------

def test_too_small_pool_fails_at_once_naming_both_numbers(model, monkeypatch):
    eng = NPREngine(model, TOK, num_blocks=4, block_size=4, reserve_tokens=4)
    calls = []
    monkeypatch.setattr(eng.runner, "forward", lambda *a, **k: calls.append(1))
    prompt = enc("y" * 100)  # 100 tokens: 25 blocks + 1 of reserve
    with pytest.raises(ValueError) as e:
        eng.generate([enc("ok"), prompt], SamplingParams(max_new_tokens=5))
    msg = str(e.value)
    assert "needs 26 blocks" in msg and "has 4 blocks" in msg and "16 tokens" in msg and "prompt 1" in msg
    assert not calls and eng.pool.num_used == 0  # nothing ran


def test_a_group_too_big_for_the_pool_is_admitted_in_parts(model):
    """n samples of one prompt whose prompt + n reserves exceed the pool: admitted a few at a time (once, all
    of them were aborted), and every sample is the one an ample pool draws."""
    prompt = enc("q?")
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, ignore_eos=True, n=6)
    ample = NPREngine(model, TOK, block_size=4, num_blocks=512).generate([prompt], sp, mode="sequential")
    small = NPREngine(model, TOK, block_size=4, num_blocks=12, reserve_tokens=8)  # 1 + 6 x 2 = 13 > 12 blocks
    tight = small.generate([prompt], sp, mode="sequential")
    assert [r.finish_reason for r in tight] == ["length"] * 6
    assert [r.token_ids for r in tight] == [r.token_ids for r in ample]
    small.pool.assert_all_free()


def test_native_backend_aborts_a_request_the_pool_cannot_hold(model):
    """Orchestrated prompts grow from the model's own output: the backend answers 'aborted' for one that can
    never fit (as a server would) and still serves the rest."""
    backend = NativeSequentialBackend(NPREngine(model, TOK, num_blocks=8, block_size=4, reserve_tokens=4))
    reqs = [CompletionRequest(ids=enc("y" * 60), max_new_tokens=3), CompletionRequest(ids=enc("ok"), max_new_tokens=3)]
    big, ok = backend.complete(reqs, SamplingParams(ignore_eos=True))
    assert big.finish_reason == "aborted" and big.token_ids == []
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3


# -- releasing the pool -----------------------------------------------------------------------------------------

def test_release_memory_drops_the_pool_and_generate_restores_it(model):
    sp = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    prompts = [enc("abc"), enc("de")]
    eng = NPREngine(model, TOK, num_blocks=64, block_size=4)
    before = eng.generate(prompts, sp)
    assert eng.runner.gather_buffer_bytes == eng.last_stats["gather_buffer_bytes"] > 0  # two rows gathered K/V
    eng.release_memory()
    assert eng.memory_released and eng.pool.k == [] and eng.pool.v == [] and eng.pool.num_blocks == 64
    assert eng.runner.gather_buffer_bytes == 0  # the gather buffers go with the pool
    after = eng.generate(prompts, sp)  # allocates the tensors again
    assert not eng.memory_released and len(eng.pool.k) == 2
    assert [r.token_ids for r in after] == [r.token_ids for r in before]
    assert [r.logprobs for r in after] == [r.logprobs for r in before]
    eng.release_memory()
    eng.resume_memory()
    assert not eng.memory_released and eng.pool.k[0].abs().sum() == 0  # zeros, as at construction


def test_trainer_memory_context_releases_and_resumes():
    from npr_agent.trainer import NPRTrainer

    class FakeEngine:
        def __init__(self):
            self.calls = []

        def release_memory(self):
            self.calls.append("release")

        def resume_memory(self):
            self.calls.append("resume")

    for saver, want in ((True, ["release", "update", "resume"]), (False, ["update"])):
        fake = SimpleNamespace(cfg=SimpleNamespace(engine=SimpleNamespace(memory_saver=saver)))
        eng = FakeEngine()
        with NPRTrainer.engine_memory_released(fake, eng):
            eng.calls.append("update")
        assert eng.calls == want
    eng = FakeEngine()  # resumed even when the update raises
    fake = SimpleNamespace(cfg=SimpleNamespace(engine=SimpleNamespace(memory_saver=True)))
    with pytest.raises(RuntimeError), NPRTrainer.engine_memory_released(fake, eng):
        raise RuntimeError("boom")
    assert eng.calls == ["release", "resume"]


def test_config_num_blocks_none_means_sized_from_memory():
    from npr_agent.config import apply_overrides, preset

    tiny_cfg = preset("tiny").engine
    assert tiny_cfg.num_blocks == 4096 and not tiny_cfg.memory_saver  # the tiny preset is unchanged
    q = preset("qwen3-4b").engine
    assert q.num_blocks is None and q.kv_mem_fraction == 0.3 and q.memory_saver
    cfg = apply_overrides(preset("qwen3-4b"), ["engine.num_blocks=1000", "engine.kv_mem_fraction=0.5"])
    assert cfg.engine.num_blocks == 1000 and isinstance(cfg.engine.num_blocks, int) and cfg.engine.kv_mem_fraction == 0.5
    assert apply_overrides(preset("tiny"), ["engine.num_blocks=none"]).engine.num_blocks is None


# -- weight-sync buckets ----------------------------------------------------------------------------------------

def test_plan_buckets_cover_every_key_once_within_the_bound():
    rng = random.Random(0)
    for _ in range(200):
        bound = rng.randint(1, 100)
        sizes = [(i, rng.choice([0, 1, rng.randint(1, 60), rng.randint(50, 300)])) for i in range(rng.randint(0, 30))]
        plan = plan_buckets(sizes, bound)
        assert [k for b in plan for k in b] == [k for k, _ in sizes]  # every key once, in order
        size = dict(sizes)
        for b in plan:
            assert b
            total = sum(size[k] for k in b)
            assert total <= bound or len(b) == 1  # a tensor larger than the bound is alone
        for a, b in zip(plan, plan[1:]):  # greedy: the next key did not fit
            assert sum(size[k] for k in a) + size[b[0]] > bound
    with pytest.raises(ValueError):
        plan_buckets([("a", 1)], 0)


def test_state_dict_buckets_without_fsdp(model):
    sd = model.state_dict()
    bound = 40_000
    buckets = list(LOCAL.iter_state_dict_buckets(model, bucket_bytes=bound))
    keys = [k for b in buckets for k in b]
    assert sorted(keys) == sorted(sd) and len(keys) == len(set(keys))  # every key exactly once
    assert len(buckets) > 3
    for b in buckets:
        distinct = {t.data_ptr(): t for t in b.values()}.values()
        assert sum(t.numel() * t.element_size() for t in distinct) <= bound or len(distinct) == 1
        for k, t in b.items():
            assert t.data_ptr() == sd[k].data_ptr()  # the module's own tensors, no copy
    emb = next(b for b in buckets if "model.embed_tokens.weight" in b)
    assert emb["lm_head.weight"] is emb["model.embed_tokens.weight"]  # tied: one tensor, one bucket
    half = list(LOCAL.iter_state_dict_buckets(model, bucket_bytes=bound, dtype=torch.bfloat16))
    got = {k: v for b in half for k, v in b.items()}
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, sd[k].to(torch.bfloat16)) for k, v in got.items())
    assert len(half) < len(buckets)  # the bound counts the cast bytes


def test_sync_engine_sends_buckets(model):
    from npr_agent.trainer import NPRTrainer

    class FakeSGLang:
        weight_dtype = torch.bfloat16

        def load_weights(self, buckets):
            self.got = [dict(b) for b in buckets]

    fake = SimpleNamespace(dist=LOCAL, cfg=SimpleNamespace(engine=SimpleNamespace(backend="sglang", sync_bucket_mb=1)))
    eng = FakeSGLang()
    NPRTrainer.sync_engine(fake, eng, model)
    sd = model.state_dict()
    assert len(eng.got) == 1 and sorted(k for b in eng.got for k in b) == sorted(sd)  # < 1 MiB: one bucket
    assert all(t.dtype == torch.bfloat16 for b in eng.got for t in b.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = Dist.from_env(device="cpu", strategy="fsdp2")
    wrapped = dist.wrap(tiny(seed=5))
    res = {}
    for dtype in (None, torch.bfloat16):
        buckets = []
        for b in dist.iter_state_dict_buckets(wrapped, bucket_bytes=50_000, dtype=dtype):
            copies: dict[int, torch.Tensor] = {}  # a tied tensor stays one tensor under both names
            buckets.append({k: copies.setdefault(id(v), v.clone()) for k, v in b.items()})
        res[str(dtype)] = buckets
    if rank == 1:
        Path(out_path).write_bytes(pickle.dumps(res))
    dist.close()


@pytest.mark.distributed
def test_state_dict_buckets_gather_fsdp2_shards(tmp_path):
    """2 gloo ranks, FSDP2: the buckets hold whole tensors equal to the unsharded model's, every key once."""
    out = tmp_path / "buckets.pkl"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = pickle.loads(out.read_bytes())
    ref = tiny(seed=5).state_dict()
    for dtype in (None, torch.bfloat16):
        buckets = res[str(dtype)]
        keys = [k for b in buckets for k in b]
        assert sorted(keys) == sorted(ref) and len(keys) == len(set(keys)) and len(buckets) > 3
        for b in buckets:
            for k, v in b.items():
                want = ref[k] if dtype is None else ref[k].to(dtype)
                assert not hasattr(v, "full_tensor") and v.shape == want.shape and torch.equal(v, want), k
            distinct = {id(t): t for t in b.values()}.values()
            assert sum(t.numel() * t.element_size() for t in distinct) <= 50_000 or len(distinct) == 1
