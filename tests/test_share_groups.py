"""Decode share groups: each row's view of its group's union is exactly its own table; the grouped decode
forward gives the per-row forward's logits; the grouped plan gathers each shared slot once."""

import random

import numpy as np
import pytest
import torch

from engine.kv_cache import BlockPool, BlockTable
from engine.runner import ATTN_PER_ROW, ModelRunner, attn_per_row, share_groups


def forest(seed: int, pool: BlockPool) -> list[BlockTable]:
    """Prompt tables forked into samples, samples forked into siblings (nested too), some joined back."""
    rng = random.Random(seed)
    live: list[BlockTable] = []
    dead: list[BlockTable] = []
    for _ in range(rng.randint(1, 4)):
        prompt = BlockTable(pool)
        for _ in range(rng.randint(1, 13)):
            prompt.append_slot()
        for _ in range(rng.randint(1, 4)):
            s = prompt.fork()
            for _ in range(rng.randint(0, 9)):
                s.append_slot()
            live.append(s)
        dead.append(prompt)
    for _ in range(rng.randint(0, 6)):  # forks, growth and joins among the live tables
        t = rng.choice(live)
        op = rng.random()
        if op < 0.5:
            kids = [t.fork() for _ in range(rng.randint(2, 4))]
            for k in kids:
                for _ in range(rng.randint(1, 7)):
                    k.append_slot()
            if rng.random() < 0.4:
                t.join(kids)
                dead.extend(kids)
            else:
                live.remove(t)
                dead.append(t)
                live.extend(kids)
        else:
            for _ in range(rng.randint(1, 5)):
                t.append_slot()
    for t in live:
        t.append_slot()  # each decode row's new token
    return live, dead


def filled_slots(pool: BlockPool, blocks) -> np.ndarray:
    """The filled slots of ``blocks``: what a decode row that references them sees."""
    bs = pool.block_size
    return np.array(sorted(b * bs + o for b in blocks for o in range(pool.fill[b])), dtype=np.int64)


@pytest.mark.parametrize("seed", range(40))
def test_each_row_sees_exactly_its_own_slots(seed):
    pool = BlockPool(512, block_size=4)
    live, dead = forest(seed, pool)
    views = [t.slot_view() for t in live]
    groups = share_groups(live)
    seen = sorted(r for rows, _, _ in groups for r in rows)
    assert seen == list(range(len(live)))
    # the rule the block plan relies on: a row's slots are the filled slots of the blocks it references
    for t, view in zip(live, views):
        assert np.array_equal(filled_slots(pool, t.blocks), np.sort(view))
    for rows, union, cols in groups:
        assert len(set(union)) == len(union)  # each block once
        for r, c in zip(rows, cols):
            assert len(np.unique(c)) == len(c)
            assert [union[j] for j in c] == live[r].blocks
            assert np.array_equal(filled_slots(pool, [union[j] for j in c]), np.sort(views[r]))
        # the blocks every row shares come first, in order
        n_pre = next((i for i in range(len(union)) if any(i >= len(live[x].blocks) or live[x].blocks[i] != union[i]
                                                          for x in rows)), len(union))
        for c in cols:
            assert np.array_equal(c[:n_pre], np.arange(n_pre))
    for t in live + dead:
        if not t.released:
            t.release()
    pool.assert_all_free()


def test_siblings_of_one_prompt_share_one_union():
    pool = BlockPool(64, block_size=4)
    prompt = BlockTable(pool)
    for _ in range(10):
        prompt.append_slot()
    kids = [prompt.fork() for _ in range(4)]
    for k in kids:
        k.append_slot()
    (rows, union, cols), = share_groups(kids)
    # the prompt's 3 blocks once (its half-full last one is shared, read-only), then one own block per row
    assert rows == [0, 1, 2, 3] and len(union) == 7 and union[:3] == prompt.blocks
    assert len(filled_slots(pool, union)) == 14


def test_narrow_slots_split_a_prompts_samples_into_their_own_groups():
    """The cost model: where scoring a slot for one more row is dear next to copying it (narrow KV slots, the tiny
    preset), the samples of a prompt no longer share one union whose every row scores every sample's slots."""
    assert attn_per_row(2 * 32) == 0.25 and attn_per_row(4 * 64) == ATTN_PER_ROW == attn_per_row(8 * 128)
    assert attn_per_row(8) == 0.5
    pool = BlockPool(64, block_size=4)
    prompt = BlockTable(pool)
    for _ in range(4):
        prompt.append_slot()
    rows = []
    for _ in range(2):  # two samples: a guideline each, then three sibling steps
        sample = prompt.fork()
        for _ in range(8):
            sample.append_slot()
        for _ in range(3):
            k = sample.fork()
            for _ in range(10):
                k.append_slot()
            rows.append(k)
    assert [g[0] for g in share_groups(rows, ATTN_PER_ROW)] == [[0, 1, 2, 3, 4, 5]]
    assert [g[0] for g in share_groups(rows, attn_per_row(2 * 32))] == [[0, 1, 2], [3, 4, 5]]


def _tiny_runner():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return ModelRunner(Qwen3ForCausalLM(cfg).eval())


def _decode_case(seed: int):
    """A tiny runner, a pool with arbitrary cached K/V in every slot the tables list, a forest of tables, and
    each live row's new token and position."""
    runner = _tiny_runner()
    pool = BlockPool(512, block_size=4, num_layers=runner.num_layers, kv_heads=runner.kv_heads,
                     head_dim=runner.head_dim)
    for k, v in zip(pool.k, pool.v):
        k[:, :-1].normal_()  # every block but the scratch one
        v[:, :-1].normal_()
    live, dead = forest(seed, pool)
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 97, len(live)).tolist()
    pos = [int(p) for p in rng.integers(0, 200, len(live))]
    return runner, pool, live, dead, toks, pos, rng


@pytest.mark.parametrize("seed", range(6))
def test_grouped_decode_equals_per_row_decode(seed):
    runner, pool, live, dead, toks, pos, _ = _decode_case(seed)
    k0 = [kf.clone() for kf in pool.k_flat]
    per_row = runner.run(pool, runner.prepare_decode(pool, live, toks, pos, share=False))
    before = runner.decode_kv_slots
    inp = runner.prepare_decode(pool, live, toks, pos)
    grouped_slots = runner.decode_kv_slots - before
    for kf, k in zip(pool.k_flat, k0):
        kf.copy_(k)
    grouped = runner.run(pool, inp)
    assert torch.allclose(grouped, per_row, atol=1e-5, rtol=0)
    assert grouped_slots <= before  # never more gathered than one key row per table
    assert (inp.q_index is not None) == (grouped_slots < before)
    if seed in (0, 5):  # forests with several samples per prompt: the grouped plan is taken
        assert inp.q_index is not None
    for t in live + dead:
        if not t.released:
            t.release()


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_gemm_attention_equals_sdpa_for_decode_and_forced_runs(seed):
    """The CPU's batched-GEMM attention (few queries per KV head) gives SDPA's logits: grouped and per-row decode,
    and a forced run of three tokens per row."""
    runner, pool, live, dead, toks, pos, rng = _decode_case(seed)
    k0 = [kf.clone() for kf in pool.k_flat]
    outs = {}
    for gemm in (True, False):
        runner.gemm_attention = gemm
        for share in (True, False):
            for kf, k in zip(pool.k_flat, k0):
                kf.copy_(k)
            inp = runner.prepare_decode(pool, live, toks, pos, share=share)
            before = runner.gemm_forwards
            outs[gemm, share] = runner.run(pool, inp)
            assert runner.gemm_forwards - before == (gemm and inp.key_index.shape[0] > 1)  # the path was taken
    for share in (True, False):
        assert torch.allclose(outs[True, share], outs[False, share], atol=1e-5, rtol=0)
    forced = [rng.integers(0, 97, 3).tolist() for _ in live]
    for t in live:
        for _ in range(3):
            t.append_slot()
    fpos = [[p + 1 + j for j in range(3)] for p in pos]
    every = {}
    for gemm in (True, False):
        runner.gemm_attention = gemm
        for kf, k in zip(pool.k_flat, k0):
            kf.copy_(k)
        before = runner.gemm_forwards
        every[gemm] = runner.run(pool, runner.prepare_extend(pool, live, forced, fpos, every=True))
        assert runner.gemm_forwards - before == (gemm and len(live) > 1)
    assert every[True].shape == (len(live), 3, 97)
    assert torch.allclose(every[True], every[False], atol=1e-5, rtol=0)
    for t in live + dead:
        if not t.released:
            t.release()


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_block_gather_equals_each_row_decoded_alone(seed):
    """A batch's decode gathers whole blocks and masks them by fill level; one row alone gathers exactly its
    table's slots. Both give the same logits, so the mask is the table."""
    runner, pool, live, dead, toks, pos, _ = _decode_case(seed)
    k0 = [k.clone() for k in pool.k]
    batched = runner.run(pool, runner.prepare_decode(pool, live, toks, pos, share=False))
    for r, t in enumerate(live):
        for k, k_ in zip(pool.k, k0):
            k.copy_(k_)
        inp = runner.prepare_decode(pool, [t], [toks[r]], [pos[r]])
        assert not inp.key_blocks and inp.key_index.shape[1] == t.n
        assert torch.allclose(runner.run(pool, inp)[0], batched[r], atol=1e-5, rtol=0)
    for t in live + dead:
        if not t.released:
            t.release()


def test_a_lone_row_in_one_run_of_the_pool_is_read_in_place():
    """A lone decode row whose slots are one run of the pool (a fresh pool hands out the lowest block first)
    reads K/V as a view; its logits equal those of gathering the same slots, and nothing is counted as gathered."""
    from dataclasses import replace

    runner = _tiny_runner()
    pool = BlockPool(64, block_size=4, num_layers=runner.num_layers, kv_heads=runner.kv_heads,
                     head_dim=runner.head_dim)
    for k, v in zip(pool.k, pool.v):
        k[:, :-1].normal_()
        v[:, :-1].normal_()
    other, t = BlockTable(pool), BlockTable(pool)
    other.append_slot()  # block 0 taken: the row's run starts at block 1
    for _ in range(11):
        t.append_slot()
    assert t.blocks == [1, 2, 3]
    before = runner.decode_kv_slots
    inp = runner.prepare_decode(pool, [t], [5], [11])
    assert inp.key_run == 4 and runner.decode_kv_slots == before
    gathered = replace(inp, key_run=-1, key_index=torch.from_numpy(t.slot_view().copy()).view(1, -1))
    assert torch.equal(runner.run(pool, inp), runner.run(pool, gathered))
    t.release()
    other.release()
    holey = BlockTable(pool)  # blocks 0 and 2 (block 1 is another table's): not one run, gathered
    for _ in range(4):
        holey.append_slot()
    mid = BlockTable(pool)
    mid.append_slot()
    holey.append_slot()
    assert holey.blocks == [0, 2]
    assert runner.prepare_decode(pool, [holey], [5], [4]).key_run == -1
    holey.release()
    mid.release()
    pool.assert_all_free()


@pytest.mark.parametrize("seed", [0, 3])
def test_q_and_k_normalised_and_rotated_together_equal_the_per_tensor_ops_bit_for_bit(seed):
    """Qwen3's q_norm / k_norm run on q and k as one tensor; with different epsilons (which forces one norm per
    tensor, the epsilon itself too small to move an fp32 result) the logits and the cached keys are the same
    bits."""
    runner, pool, live, dead, toks, pos, _ = _decode_case(seed)
    start = [(k.clone(), v.clone()) for k, v in zip(pool.k, pool.v)]
    out = {}
    for together in (True, False):
        for L in runner.layers:
            L.k_eps = L.q_eps if together else L.q_eps * (1 + 1e-9)
        for (k, v), (k0, v0) in zip(zip(pool.k, pool.v), start):
            k.copy_(k0)
            v.copy_(v0)
        logits = runner.run(pool, runner.prepare_decode(pool, live, toks, pos))
        out[together] = (logits, [k.clone() for k in pool.k])
    assert torch.equal(out[True][0], out[False][0])
    assert all(torch.equal(a, b) for a, b in zip(out[True][1], out[False][1]))
    for t in live + dead:
        if not t.released:
            t.release()
