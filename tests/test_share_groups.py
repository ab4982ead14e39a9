"""Decode share groups: each row's view of its group's union is exactly its own table; the grouped decode
forward gives the per-row forward's logits; the grouped plan gathers each shared slot once."""

import numpy as np
import pytest
import torch
from decode_cases import decode_case, forest, release

from engine.kv_cache import BlockPool, BlockTable
from engine.runner import ATTN_PER_ROW, attn_per_row, share_groups


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
    release(live + dead)
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


@pytest.mark.parametrize("seed", range(6))
def test_grouped_decode_equals_per_row_decode(seed):
    runner, pool, live, dead, toks, pos, _ = decode_case(seed)
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
    release(live + dead)
