"""Multi-process training on CPU (gloo): 2 ranks x half batch give the same loss and the same updated weights
as 1 rank x the full batch, for a PAPO update on fixed rollouts of a tiny Qwen3 (DDP and FSDP2)."""

import copy
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import Qwen3Config, Qwen3ForCausalLM

import npr_env
from engine import NPREngine, SamplingParams, TrajectoryForcer
from engine.backends import NativeSequentialBackend
from engine.orchestration import OrchestratedEngine
from npr_agent.algorithms import RolloutInfo, make_algorithm
from npr_agent.distributed import LOCAL, Dist
from npr_agent.updates import policy_update
from npr_env.schema import format_block

TOK = npr_env.load_tokenizer()
ROOT = Path(__file__).resolve().parents[1]


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def tiny():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trajectory(i: int, good: bool = True) -> str:
    a, b = 10 + i, 20 + 2 * i
    if not good:  # a broken structure: PAPO drops it (one rank ends up with fewer kept rollouts)
        return f"<step>1: no block {a}</step>\\boxed{{{a}}}<eos>"
    return (format_block([f"take {a}", f"take {b}"], [f"{a} is fine", f"{b} is also ok"], f"sum {a + b} ok")
            + f"\\boxed{{{a + b}}}<eos>")


def build_rollouts(model):
    """8 rollouts: 4 prompts x 2 samples, forced through the native engine (6) and the orchestrator (2)."""
    native = NPREngine(model, TOK, num_blocks=512, block_size=4, min_fork_budget=0)
    orch = OrchestratedEngine(NativeSequentialBackend(NPREngine(model, TOK, num_blocks=512, block_size=4)), TOK,
                              min_fork_budget=0)
    rollouts, rewards = [], []
    for p in range(4):
        prompt = enc(f"Q{p}: add things")
        for s in range(2):
            k = 2 * p + s
            text = trajectory(k, good=k != 6)
            sp = SamplingParams(max_new_tokens=400, logits_processors=[TrajectoryForcer(TOK, prompt, enc(text),
                                                                                        strict=False)])
            eng = orch if k in (1, 4) else native
            (r,) = eng.generate([prompt], sp, mode="parallel")
            rollouts.append(r)
            rewards.append(1.0 if k % 3 == 0 else -1.0)
    return rollouts, rewards


def infos_of(rollouts, rewards, groups):
    return [RolloutInfo(reward=w, group_id=g, length=len(r.token_ids), truncated=r.truncated,
                        dropped=not r.graph.is_valid) for r, w, g in zip(rollouts, rewards, groups)]


def one_update(model, rollouts, rewards, groups, dist, strategy_model=None):
    """prepare (global) -> policy_update; returns reduced metrics and the kept mask of this rank."""
    algo = make_algorithm("papo")
    train = strategy_model if strategy_model is not None else model
    # SGD: the first update is proportional to the gradient itself (momentum only gives the optimizer a state)
    opt = torch.optim.SGD(train.parameters(), lr=0.5, momentum=0.9)
    prep = dist.prepare(algo, infos_of(rollouts, rewards, groups))
    kept = [r for r, k in zip(rollouts, prep.keep) if k]
    adv = torch.tensor(prep.advantages[prep.keep], dtype=torch.float32)
    m = policy_update(train, algo, kept, adv, opt, micro_batch_size=2, grad_clip=1e9, dist=dist)
    return dist.reduce_metrics(m, weight=len(rollouts)), prep, opt


def full_optim_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from npr_agent.distributed import unwrap

    osd = get_optimizer_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True))
    return {k: v["momentum_buffer"].detach().clone() for k, v in osd["state"].items()}


def _worker(rank: int, world: int, port: int, data_path: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    data = pickle.loads(Path(data_path).read_bytes())
    results = {}
    for strategy in ("ddp", "fsdp2"):
        dist = Dist.from_env(device="cpu", strategy=strategy)
        model = tiny()
        model.load_state_dict(data["state"])
        a, b = dist.shard_range(len(data["prompts"]))  # this rank's prompts, and their samples
        idx = [i for i, g in enumerate(data["groups"]) if a <= g < b]
        rollouts = [data["rollouts"][i] for i in idx]
        rewards = [data["rewards"][i] for i in idx]
        groups = [data["groups"][i] - a for i in idx]  # rank-local group ids, as the trainer makes them
        wrapped = dist.wrap(model)
        m, prep, opt = one_update(model, rollouts, rewards, groups, dist, strategy_model=wrapped)
        state = {k: v.detach().clone() for k, v in dist.full_state_dict(wrapped, rank0_only=False).items()}
        # the training state survives a restart: rank 0 writes it, every rank restores it
        path = Path(out_path).with_name(f"{strategy}.state.pt")
        dist.save_train_state(path, wrapped, opt, None, step=1, data_pos=1)
        fresh = dist.wrap(tiny())
        opt2 = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
        step = dist.load_train_state(path, fresh, opt2, None)["step"]
        restored = dist.full_state_dict(fresh, rank0_only=False)
        same_model = all(torch.equal(restored[k], v) for k, v in state.items())
        a, b = full_optim_state(wrapped, opt), full_optim_state(fresh, opt2)
        same_opt = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        results[strategy] = {"metrics": m, "state": state, "adv": dist.all_gather_object(prep.advantages.tolist()),
                             "shard": dist.all_gather_object(idx), "resumed": (step, same_model, same_opt)}
    if rank == 0:
        Path(out_path).write_bytes(pickle.dumps(results))
    dist.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny()
    rollouts, rewards = build_rollouts(model)
    groups = [i // 2 for i in range(len(rollouts))]
    data = {"state": copy.deepcopy(model.state_dict()), "rollouts": rollouts, "rewards": rewards, "groups": groups,
            "prompts": sorted(set(groups))}
    m, prep, _ = one_update(model, rollouts, rewards, groups, LOCAL)
    path = tmp_path_factory.mktemp("dist") / "data.pkl"
    path.write_bytes(pickle.dumps(data))
    return data, m, prep, model.state_dict(), path


def test_fixed_rollouts_are_a_real_papo_batch(reference):
    data, m, prep, _, _ = reference
    assert [r.layout for r in data["rollouts"]].count("orchestrated") == 2
    assert prep.keep.sum() == 7 and not prep.keep[6]  # the broken one is dropped
    assert m["batch/updated"] == 1.0 and m["loss/policy"] != 0.0 and m["policy/logprob_mismatch"] <= 1e-4


@pytest.mark.parametrize("algorithm", ["papo", "dapo"])
def test_zero_advantage_rows_are_skipped_and_the_step_is_the_same(reference, algorithm):
    """Rows with A = 0 are not forwarded, yet the weights move exactly as when every kept row is scored."""
    data = reference[0]
    algo = make_algorithm(algorithm, {"dynamic_sampling": False} if algorithm == "dapo" else {})
    assert algo.zero_advantage_is_inert()
    prep = algo.prepare(infos_of(data["rollouts"], data["rewards"], data["groups"]))
    kept = [r for r, k in zip(data["rollouts"], prep.keep) if k]
    adv = torch.tensor(prep.advantages[prep.keep], dtype=torch.float32)
    assert 0 < int((adv != 0).sum()) < len(kept)  # the batch has both kinds of rows
    states, metrics = [], []
    for skip in (True, False):
        model = tiny()
        model.load_state_dict(data["state"])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        metrics.append(policy_update(model, algo, kept, adv, opt, micro_batch_size=2, grad_clip=1e9,
                                     skip_inert=skip))
        states.append(model.state_dict())
    assert metrics[0]["batch/update_rows"] == int((adv != 0).sum()) and metrics[1]["batch/update_rows"] == len(kept)
    assert metrics[0]["loss/policy"] == pytest.approx(metrics[1]["loss/policy"], rel=1e-5, abs=1e-7)
    moved = max(float((states[1][k] - data["state"][k]).abs().max()) for k in states[1])
    assert moved > 1e-3
    for k, v in states[1].items():
        assert torch.allclose(states[0][k], v, atol=1e-6, rtol=1e-5), k
    assert not make_algorithm("papo", {"entropy_coef": 0.01}).zero_advantage_is_inert()
    assert not make_algorithm("grpo", {"kl_coef": 0.1}).zero_advantage_is_inert()


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(reference, tmp_path):
    data, ref_m, ref_prep, ref_state, path = reference
    out = tmp_path / "out.pkl"
    mp.spawn(_worker, args=(2, free_port(), str(path), str(out)), nprocs=2, join=True)
    res = pickle.loads(out.read_bytes())
    before = data["state"]
    for strategy in ("ddp", "fsdp2"):
        r = res[strategy]
        assert r["shard"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # rank 1 holds the dropped rollout: fewer micro-batches
        assert np.allclose(sum(r["adv"], []), ref_prep.advantages, atol=1e-12), strategy
        m = r["metrics"]
        assert m["loss/policy"] == pytest.approx(ref_m["loss/policy"], abs=1e-6), strategy
        assert m["tokens"] == ref_m["tokens"] and m["batch/updated"] == 1.0
        assert m["policy/grad_norm"] == pytest.approx(ref_m["policy/grad_norm"], rel=1e-5), strategy
        assert m["policy/entropy"] == pytest.approx(ref_m["policy/entropy"], rel=1e-5), strategy
        assert m["policy/logprob_mismatch"] <= 1e-4
        moved = 0.0
        for k, v in ref_state.items():
            got = r["state"][k]
            assert torch.allclose(got, v, atol=1e-6, rtol=1e-5), (strategy, k, (got - v).abs().max())
            moved = max(moved, float((v - before[k]).abs().max()))
        assert moved > 1e-3  # the update did change the weights (the comparison is not vacuous)
        assert r["resumed"] == (1, True, True), strategy


def test_world_size_one_is_the_plain_loop(reference):
    """Without torchrun every collective is the identity and the update is the trainer's single-process loop."""
    d = Dist()
    assert not d.enabled and d.is_main and d.shard([1, 2, 3]) == [1, 2, 3] and d.sum(5) == 5 and d.any(True)
    assert d.reduce_metrics({"a": 1.0}) == {"a": 1.0}
    model = tiny()
    assert d.wrap(model) is model
    with d.full_weights(model), d.grad_sync(model, enabled=False):
        pass
    algo = make_algorithm("papo")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = policy_update(model, algo, [], torch.zeros(0), opt, micro_batch_size=2, grad_clip=1.0)
    assert m == {"loss/policy": 0.0, "policy/grad_norm": 0.0, "batch/updated": 0.0}


def test_shard_ranges_cover_everything_once():
    for n in range(0, 13):
        for world in (1, 2, 3, 8):
            parts = [Dist(rank=r, world_size=world).shard_range(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_qwen3_4b_config_mirrors_the_preset():
    from npr_agent.config import load_file, preset

    assert load_file(ROOT / "configs" / "qwen3-4b.toml").to_dict() == preset("qwen3-4b").to_dict()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_trains_tiny_preset(tmp_path, strategy):
    """`torchrun --nproc_per_node 2 -m npr_agent.train`: a few SFT and RL steps, rank 0 logging and saving."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "npr_agent.train", "--strategy", strategy, "--preset", "tiny",
           "--out", str(out),
           "--quiet", "--stage", "stage0,stage1",
           "--set", "stage0.steps=4", "--set", "stage0.check_every=0", "--set", "stage0.batch_size=8",
           "--set", "tasks.eval_size=4",
           "--set", "stage1.steps=2", "--set", "stage1.prompts_per_step=2", "--set", "stage1.group_size=2",
           "--set", "stage1.max_new_tokens=24", "--set", "stage1.eval_every=0", "--set", "eval.max_new_tokens=24",
           "--set", "checkpoint_every=1", "--set", "threads=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} >= {"stage0", "stage1"}
    rl = [r for r in rows if r["stage"] == "stage1" and "batch/kept" in r]
    assert rl and all(r["batch/kept"] <= 4 for r in rl)  # counts over both ranks' rollouts (2 prompts x 2)
    assert (out / "stage0" / "DONE").exists() and (out / "stage1" / "DONE").exists()
    assert not list(out.glob("*.tmp"))
