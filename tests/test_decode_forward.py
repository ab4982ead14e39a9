"""The decode forward's paths give the same logits: batched GEMM attention and SDPA (decode and forced runs), whole
blocks masked by fill level and each row's own slots, a lone row read in place and gathered, and q and k
normalised and rotated as one tensor or one at a time (bit for bit)."""

import pytest
import torch
from decode_cases import decode_case, release, tiny_runner

from engine.kv_cache import BlockPool, BlockTable


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_gemm_attention_equals_sdpa_for_decode_and_forced_runs(seed):
    """The CPU's batched-GEMM attention (few queries per KV head) gives SDPA's logits: grouped and per-row decode,
    and a forced run of three tokens per row."""
    runner, pool, live, dead, toks, pos, rng = decode_case(seed)
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
    release(live + dead)


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_block_gather_equals_each_row_decoded_alone(seed):
    """A batch's decode gathers whole blocks and masks them by fill level; one row alone gathers exactly its
    table's slots. Both give the same logits, so the mask is the table."""
    runner, pool, live, dead, toks, pos, _ = decode_case(seed)
    k0 = [k.clone() for k in pool.k]
    batched = runner.run(pool, runner.prepare_decode(pool, live, toks, pos, share=False))
    for r, t in enumerate(live):
        for k, k_ in zip(pool.k, k0):
            k.copy_(k_)
        inp = runner.prepare_decode(pool, [t], [toks[r]], [pos[r]])
        assert not inp.key_blocks and inp.key_index.shape[1] == t.n
        assert torch.allclose(runner.run(pool, inp)[0], batched[r], atol=1e-5, rtol=0)
    release(live + dead)


def test_gathers_write_into_one_reused_buffer_per_k_and_v():
    """Every layer and step gathers into the same two buffers (no fresh multi-MB tensor per call, whose pages would
    fault in again), which grow only when a step needs more; the logits are the same from fresh buffers."""
    runner, pool, live, dead, toks, pos, _ = decode_case(0)
    inp = runner.prepare_decode(pool, live, toks, pos, share=False)
    first = runner.run(pool, inp)
    held = runner.gather_buffer_bytes
    assert held >= 2 * inp.key_index.numel() * pool.block_size * runner.head_dim * runner.kv_heads * 4
    ptrs = [b.data_ptr() for b in runner._gather_bufs]
    assert len(live) > 2
    two = runner.prepare_decode(pool, live[:2], toks[:2], pos[:2], share=False)  # a smaller gather: same buffers
    assert two.key_blocks and two.key_index.numel() < inp.key_index.numel()
    runner.run(pool, two)
    assert [b.data_ptr() for b in runner._gather_bufs] == ptrs and runner.gather_buffer_bytes == held
    runner.release_buffers()
    assert runner.gather_buffer_bytes == 0
    assert torch.equal(runner.run(pool, inp), first)  # the same step again (it rewrites the same K/V)
    release(live + dead)


def test_a_lone_row_in_one_run_of_the_pool_is_read_in_place():
    """A lone decode row whose slots are one run of the pool (a fresh pool hands out the lowest block first)
    reads K/V as a view; its logits equal those of gathering the same slots, and nothing is counted as gathered."""
    from dataclasses import replace

    runner = tiny_runner()
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
    runner, pool, live, dead, toks, pos, _ = decode_case(seed)
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
    release(live + dead)
