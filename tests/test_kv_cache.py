"""Paged KV cache: refcounts, fork shares, join transfers, release returns every block once; fuzzed."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import BlockPool, BlockTable, KVCacheError, PoolExhausted


def fill(t: BlockTable, n: int) -> list[int]:
    return [t.append_slot() for _ in range(n)]


def test_append_fills_blocks_in_order():
    pool = BlockPool(8, block_size=4)
    t = BlockTable(pool)
    assert fill(t, 10) == list(range(10))  # blocks 0, 1, 2 handed out in order, filled in order
    assert t.blocks == [0, 1, 2] and pool.num_used == 3
    t.check()
    t.release()
    pool.assert_all_free()


def test_fork_shares_without_copy_and_child_writes_fresh_blocks():
    pool = BlockPool(16, block_size=4)
    parent = BlockTable(pool)
    fill(parent, 6)  # blocks [a (4 tokens), b (2 tokens)]: b is partial
    a, b = parent.blocks
    kids = [parent.fork() for _ in range(3)]
    assert pool.num_used == 2  # nothing copied
    assert pool.refcount[a] == pool.refcount[b] == 4
    own = []
    for i, k in enumerate(kids):
        slots = fill(k, i + 1)
        assert all(s // 4 not in (a, b) for s in slots)  # the shared partial block is never written
        assert k.blocks[:2] == [a, b] and len(k.blocks) == 3
        assert np.array_equal(k.slot_view()[:6], parent.slot_view())
        own.append(slots)
    assert pool.num_used == 5
    parent.join(kids)
    assert pool.refcount[a] == pool.refcount[b] == 1
    assert parent.slot_view().tolist() == list(range(6)) + own[0] + own[1] + own[2]
    assert all(k.released for k in kids)
    parent.check()
    # the holes (b's tail, the children's half-empty blocks) are the parent's alone now: filled before a new block
    holes = 2 + 3 + 2 + 1
    new = fill(parent, holes)
    assert pool.num_used == 5 and len(set(new)) == holes
    fill(parent, 1)
    assert pool.num_used == 6
    parent.check()
    parent.release()
    pool.assert_all_free()


def test_nested_fork_join():
    pool = BlockPool(32, block_size=2)
    root = BlockTable(pool)
    fill(root, 3)
    c1, c2 = root.fork(), root.fork()
    fill(c1, 2)
    g1, g2 = c1.fork(), c1.fork()
    fill(g1, 3)
    fill(g2, 1)
    c1.join([g1, g2])
    fill(c1, 1)
    fill(c2, 5)
    root.join([c1, c2])
    assert len(root) == 3 + 2 + 3 + 1 + 1 + 5
    root.check()
    root.release()
    pool.assert_all_free()


def test_double_free_and_leak_fail_loudly():
    pool = BlockPool(4, block_size=4)
    t = BlockTable(pool)
    fill(t, 1)
    bid = t.blocks[0]
    with pytest.raises(KVCacheError):
        pool.assert_all_free()  # a leak
    t.release()
    with pytest.raises(KVCacheError):
        t.release()  # releasing twice
    with pytest.raises(KVCacheError):
        pool.decref(bid)  # freeing an unowned block
    with pytest.raises(KVCacheError):
        pool.incref(bid)
    pool.assert_all_free()


def test_join_refuses_a_foreign_child():
    pool = BlockPool(8, block_size=2)
    a, b = BlockTable(pool), BlockTable(pool)
    fill(a, 3)
    fill(b, 3)
    with pytest.raises(KVCacheError):
        a.join([b])
    a.release()
    b.release()
    pool.assert_all_free()


def test_exhaustion_raises_and_leaves_pool_consistent():
    pool = BlockPool(2, block_size=2)
    t = BlockTable(pool)
    fill(t, 4)
    with pytest.raises(PoolExhausted):
        t.append_slot()
    assert len(t) == 4
    t.release()
    pool.assert_all_free()


def test_storage_shapes_and_scratch_block():
    import torch

    pool = BlockPool(3, block_size=4, num_layers=2, kv_heads=2, head_dim=8)
    assert pool.k[0].shape == (2, 4, 4, 8) and pool.k_flat[1].shape == (32, 8) and pool.head_slots == 16
    assert pool.scratch_slot == 12 and torch.count_nonzero(pool.v[1]) == 0
    assert pool.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 4


def run_ops(seed: int, n_ops: int, num_blocks: int = 24, block_size: int = 3) -> None:
    """Random fork / append / join / abort sequences, like the scheduler's; everything ends free."""
    rng = random.Random(seed)
    pool = BlockPool(num_blocks, block_size=block_size)
    live: list[dict] = []  # nodes: {"t": table, "kids": [...], "parent": node or None}
    def new_root():
        node = {"t": BlockTable(pool), "kids": [], "parent": None}
        live.append(node)
        return node

    def write(node, n):
        visible = {s for x in live for s in x["t"].slot_view().tolist()}
        new = fill(node["t"], n)
        assert not visible & set(new), "a slot some live table can see was written again"

    def release_subtree(node):
        for k in node["kids"]:
            release_subtree(k)
        node["t"].release()
        if node in live:
            live.remove(node)

    for _ in range(n_ops):
        leaves = [x for x in live if not x["kids"]]
        op = rng.random()
        try:
            if not leaves or op < 0.1:
                write(new_root(), rng.randint(1, 5))
            elif op < 0.5:
                write(rng.choice(leaves), rng.randint(1, 4))
            elif op < 0.7:
                p = rng.choice(leaves)
                for _ in range(rng.randint(1, 4)):
                    kid = {"t": p["t"].fork(), "kids": [], "parent": p}
                    p["kids"].append(kid)
                    live.append(kid)
            elif op < 0.9:  # join a parent whose children are all leaves
                parents = [x for x in live if x["kids"] and all(not k["kids"] for k in x["kids"])]
                if parents:
                    p = rng.choice(parents)
                    p["t"].join([k["t"] for k in p["kids"]])
                    for k in p["kids"]:
                        live.remove(k)
                    p["kids"] = []
            else:  # finish or abort a whole request (a root and everything under it)
                roots = [x for x in live if x["parent"] is None]
                release_subtree(rng.choice(roots))
        except PoolExhausted:  # pressure: abort the newest request, as the scheduler does
            roots = [x for x in live if x["parent"] is None]
            release_subtree(roots[-1])
        for x in live:
            x["t"].check()
            if x["parent"] is not None:  # a child sees its parent's tokens, then its own
                pn = x["parent"]["t"].n
                assert np.array_equal(x["t"].slot_view()[:pn], x["parent"]["t"].slot_view())
        held = sum(len(x["t"].blocks) for x in live)
        assert sum(pool.refcount) == held  # every reference is held by exactly one table
    for root in [x for x in live if x["parent"] is None]:
        release_subtree(root)
    pool.assert_all_free()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 200))
def test_fuzz_fork_join_finish_abort(seed, n_ops):
    run_ops(seed, n_ops)


def test_fuzz_tiny_pool_many_ops():
    for seed in range(20):
        run_ops(seed, 400, num_blocks=6, block_size=2)
