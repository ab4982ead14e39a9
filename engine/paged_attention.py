"""Decode attention over the block tables: each row reads the paged KV pool where it lies, nothing is copied.

The gather path of :mod:`engine.runner` copies every visible K/V slot out of the pool at every decode step
(``index_select``, once per share group and per layer). This module instead runs FlexAttention with the whole
used part of the pool as the key sequence and a :class:`~torch.nn.attention.flex_attention.BlockMask` built from
the rows' block tables: row ``r`` attends to exactly the KV blocks its table references, as PagedAttention does.

Which slots of a referenced block a row sees follows from the pool's write rule (:mod:`engine.kv_cache`): a block
is written only by the one table that references it, so every filled slot of a block a row references was
written by that row or by an ancestor before the row forked. A row therefore sees *all* filled slots of its
blocks; a full block needs no mask, a partly filled one is masked by its fill level. (Checked by
:meth:`PagedDecode.check`, which the tests call after every step.)

FlexAttention runs compiled (:func:`torch.compile`, dynamic shapes: one compilation for every batch and pool
size) on CUDA and on the CPU (forward only, which is all decoding needs; Inductor needs a C++ compiler there).
:meth:`PagedDecode.available` compiles once and reports why it cannot, so the runner can fall back to the gather.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# The mask's tile on the query axis: one tile holds a decode row's single query. 128 (FlexAttention's default)
# is a multiple of the Triton decoding kernel's BLOCK_M (16 and up), which the pool's block size need not be.
Q_TILE = 128
_COMPILED = None  # the compiled flex_attention, shared by every runner in the process
_FAILED: str | None = None  # why compiling it failed, if it did


def _paged_flex(q, k, v, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _flex():
    """The compiled kernel. Compiled through a function of our own, not ``flex_attention`` itself: Dynamo keeps
    its cache (and its dynamic-shape decisions) per code object, so a dynamic compile of ``flex_attention``
    would change how other callers' compiles of it (transformers' ``flex_attention`` models) are built."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_paged_flex, dynamic=True)
    return _COMPILED


class PagedDecode:
    """Builds one step's block mask from the block tables and runs each layer's attention over the pool."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = torch.device(device)

    # -- availability --------------------------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """Whether compiled FlexAttention runs here; on the first call it compiles a small probe (seconds)."""
        global _FAILED
        if _FAILED is None and _COMPILED is None:
            try:
                from engine.kv_cache import BlockPool, BlockTable

                pool = BlockPool(4, self.block_size, 1, 1, 8, torch.float32, self.device)
                tables = []
                for n in (3, self.block_size + 1):
                    t = BlockTable(pool)
                    for _ in range(n):
                        t.append_slot()
                    tables.append(t)
                mask, n_slots = self.plan(pool, tables)
                q = torch.zeros((2, 2, 1, 8), device=self.device)
                with torch.inference_mode():
                    self.attend(q, pool.k[0], pool.v[0], mask, n_slots, 1.0)
            except Exception as e:  # noqa: BLE001  (no compiler, an unsupported device: say why, fall back)
                _FAILED = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.warning("NPREngine: paged decode attention (compiled FlexAttention) is unavailable on %s (%s); "
                            "decode steps gather K/V instead", self.device, _FAILED)
        return _FAILED is None, _FAILED or ""

    # -- one step --------------------------------------------------------------------------------------------
    def plan(self, pool, tables) -> tuple[object, int]:
        """The block mask of one decode step (shared by every layer) and the number of pool slots it spans.

        Row ``r`` lists the blocks of ``tables[r]``: those filled to the brim as *full* blocks (no mask), the
        others as partial blocks, masked by the block's fill level."""
        from torch.nn.attention.flex_attention import BlockMask

        bs = pool.block_size
        B = len(tables)
        top = max(max(t.blocks) for t in tables) + 1  # the keys span blocks [0, top) of the pool
        fill = np.asarray(pool.fill[:top], dtype=np.int32)
        full_idx = np.zeros((B, 1, 1, top), dtype=np.int32)
        part_idx = np.zeros((B, 1, 1, top), dtype=np.int32)
        full_n = np.zeros((B, 1, 1), dtype=np.int32)
        part_n = np.zeros((B, 1, 1), dtype=np.int32)
        for r, t in enumerate(tables):
            blocks = np.asarray(t.blocks, dtype=np.int32)
            brim = fill[blocks] == bs
            whole, part = blocks[brim], blocks[~brim]
            full_idx[r, 0, 0, :len(whole)] = whole
            part_idx[r, 0, 0, :len(part)] = part
            full_n[r], part_n[r] = len(whole), len(part)
        dev = self.device
        fill_t = torch.from_numpy(fill).to(dev)

        def filled(b, h, q_idx, kv_idx):  # a partial block: only its filled slots
            return (kv_idx % bs) < fill_t[kv_idx // bs]

        mask = BlockMask.from_kv_blocks(
            torch.from_numpy(part_n).to(dev), torch.from_numpy(part_idx).to(dev),
            torch.from_numpy(full_n).to(dev), torch.from_numpy(full_idx).to(dev),
            BLOCK_SIZE=(Q_TILE, bs), mask_mod=filled, seq_lengths=(1, top * bs), compute_q_blocks=False)
        return mask, top * bs

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, mask, n_slots: int,
               scale: float) -> torch.Tensor:
        """``q`` ``[B, H, 1, D]`` against the pool's first ``n_slots`` slots of one layer (its storage
        ``[KV, blocks, block_size, D]``, read in place: a view, broadcast over the rows); returns ``[B, H, 1, D]``."""
        B, H = q.shape[0], q.shape[1]
        KV, D = k_pool.shape[0], k_pool.shape[-1]
        k = k_pool.view(KV, -1, D)[:, :n_slots].unsqueeze(0).expand(B, -1, -1, -1)
        v = v_pool.view(KV, -1, D)[:, :n_slots].unsqueeze(0).expand(B, -1, -1, -1)
        return _flex()(q, k, v, mask, scale, k.shape[1] != H)

    # -- invariants (tests) ------------------------------------------------------------------------------------
    @staticmethod
    def check(pool, tables) -> None:
        """Raise AssertionError unless each table sees exactly the filled slots of the blocks it references (the
        visibility rule that :meth:`plan` relies on)."""
        bs = pool.block_size
        for t in tables:
            want = sorted(b * bs + o for b in t.blocks for o in range(pool.fill[b]))
            have = sorted(t.slot_view().tolist())
            assert have == want, f"table sees {len(have)} slots, its blocks hold {len(want)} filled slots"
