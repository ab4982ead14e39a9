"""Paged KV cache: a pool of fixed-size blocks with refcounts, and one block table per branch.

* A **block** holds ``block_size`` token slots of K and V for every layer. Storage is one tensor per layer
  and per K/V, ``[kv_heads, num_blocks + 1, block_size, head_dim]``: KV-head-major, so that one head's slots
  of one block are contiguous and a gather of whole blocks is a copy of ``block_size * head_dim`` values per
  row, already laid out ``[kv_heads, rows, keys, head_dim]`` for attention. The extra last block is a scratch
  area that padded rows write to and padded keys read from (always finite, always masked out).
* A **block table** is a branch's view of the cache: the blocks it references (one reference each) and the
  flat slot of every token it can see, in serialized order (``block_id * block_size + offset``), kept as a
  growing numpy array so that the runner's gather index is a slice, not a Python loop.
* Writes: the pool keeps each block's fill level. A table writes only into blocks that it alone references
  (refcount 1), filling them in order, else it takes a fresh block. A shared block is therefore read-only.
* **Fork** (:meth:`BlockTable.fork`): the child's table references the parent's blocks (incref) and copies its
  slot list. Nothing is copied on the device: the parent's partially filled last block is shared read-only
  (refcount > 1), and every child writes its own tokens into fresh blocks.
* **Join** (:meth:`BlockTable.join`): the parent's table takes over each child's own blocks and appends each
  child's own slots, in child order; the children's references to the shared prefix are released. Nothing is
  recomputed. The half-empty last blocks of the children, and the parent's formerly shared last block, are
  referenced by the parent alone after the join, so the parent's next tokens fill those holes before it
  takes a fresh block: a forked trajectory holds about as many blocks as its tokens need.
* **Reads**: the runner gathers K/V from the pool (a copy per layer): by slot for prefill and forced runs, by
  whole block for decode steps. A decode step gathers each distinct block that some row of a share group
  references once for the group (the shared prefix once, not once per sibling or sample). A row sees every
  filled slot of the blocks it references and nothing else, which is exactly its table's slots (the write
  rule above; :meth:`engine.paged_attention.PagedDecode.check`), so a block's fill level is its mask.
* **Release** returns every reference once. Decref'ing a free block, or releasing a table twice, raises
  :class:`KVCacheError`; :meth:`BlockPool.assert_all_free` finds leaks.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch


class KVCacheError(RuntimeError):
    """A block-accounting bug (double free, unowned block, leak). Never silenced."""


class PoolExhausted(RuntimeError):
    """No free block left; the scheduler must preempt or wait (it checks before every step)."""


class BlockPool:
    """Fixed-size KV blocks with refcounts. ``num_layers=0`` gives bookkeeping only (for tests, fuzzing).

    The K/V tensors can be dropped and allocated again (:meth:`release_storage`, :meth:`ensure_storage`) while
    no block is referenced: the engine frees its KV memory between rollouts that way.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, num_layers: int = 0, kv_heads: int = 1,
                 head_dim: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 allocate: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        self.scratch_slot = num_blocks * block_size  # first slot of the scratch block
        self.head_slots = (num_blocks + 1) * block_size  # slots per KV head in storage (scratch included)
        self.refcount = [0] * num_blocks
        # next free offset in each block; the scratch block's entry stays 0 (masks read fill[block] for padding)
        self.fill = np.zeros(num_blocks + 1, dtype=np.int64)
        # a min-heap: the lowest free id is handed out first, so the used blocks stay packed at the start of the
        # pool (a paged read spans blocks [0, top)) and a lone request's blocks form one run (read as a view)
        self._free = list(range(num_blocks))
        self.peak_used = 0
        self._layout = (num_layers, kv_heads, head_dim, dtype, device)
        self.k: list[torch.Tensor] = []  # per layer [kv_heads, num_blocks + 1, block_size, head_dim]
        self.v: list[torch.Tensor] = []
        self.k_flat: list[torch.Tensor] = []  # per layer the same storage as [kv_heads * slots, head_dim]
        self.v_flat: list[torch.Tensor] = []
        self.has_storage = False
        if allocate:  # else: bookkeeping now, tensors at the first ensure_storage()
            self.ensure_storage()
        self.bytes_per_block = 2 * num_layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    # -- device storage ----------------------------------------------------------------------------------
    def ensure_storage(self) -> None:
        """Allocate the K/V tensors (zeros) if :meth:`release_storage` dropped them; a no-op otherwise."""
        if self.has_storage:
            return
        num_layers, kv_heads, head_dim, dtype, device = self._layout
        shape = (kv_heads, self.num_blocks + 1, self.block_size, head_dim)
        # zeros, not empty: padded keys read the scratch block, and 0 * NaN would poison a masked softmax
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_flat = [t.view(-1, head_dim) for t in self.k]
        self.v_flat = [t.view(-1, head_dim) for t in self.v]
        self.has_storage = True

    def release_storage(self) -> None:
        """Drop the K/V tensors (the block accounting stays). Only while no block is referenced: cached KV is
        never kept across a release. :meth:`ensure_storage` allocates them again."""
        if self.num_used:
            raise KVCacheError(f"release_storage with {self.num_used} KV blocks still referenced")
        self.k, self.v, self.k_flat, self.v_flat = [], [], [], []
        self.has_storage = False

    # -- accounting -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhausted(f"all {self.num_blocks} KV blocks are in use")
        bid = heapq.heappop(self._free)
        self.refcount[bid] = 1
        self.fill[bid] = 0
        used = self.num_blocks - len(self._free)
        if used > self.peak_used:
            self.peak_used = used
        return bid

    def incref(self, bid: int) -> None:
        if self.refcount[bid] <= 0:
            raise KVCacheError(f"incref of free block {bid}")
        self.refcount[bid] += 1

    def decref(self, bid: int) -> None:
        rc = self.refcount[bid]
        if rc <= 0:
            raise KVCacheError(f"double free: block {bid} is already free")
        self.refcount[bid] = rc - 1
        if rc == 1:
            heapq.heappush(self._free, bid)

    def reset_peak(self) -> None:
        self.peak_used = self.num_used

    def assert_all_free(self) -> None:
        """Raise :class:`KVCacheError` naming the leaked blocks, if any block is still referenced."""
        leaked = [b for b, rc in enumerate(self.refcount) if rc]
        if leaked or len(self._free) != self.num_blocks or len(set(self._free)) != self.num_blocks:
            raise KVCacheError(f"KV leak: {len(leaked)} blocks still referenced (first: {leaked[:8]}), "
                               f"{len(self._free)}/{self.num_blocks} on the free list")

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class BlockTable:
    """One branch's KV: the blocks it references and the flat slot of every token it sees, in order."""

    __slots__ = ("pool", "blocks", "slots", "n", "fork_len", "released", "_write")

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.slots = np.empty(64, dtype=np.int64)
        self.n = 0  # number of tokens (valid prefix of ``slots``)
        self.fork_len = 0  # blocks inherited from the parent at fork time (shared, never written here)
        self.released = False
        self._write: list[int] = []  # blocks that may still have room for this table's tokens

    def __len__(self) -> int:
        return self.n

    def slot_view(self) -> np.ndarray:
        return self.slots[:self.n]

    def _writable(self) -> int:
        """A block this table may append to (referenced by it alone, not full), or -1."""
        pool, w = self.pool, self._write
        while w:
            b = w[-1]
            if pool.refcount[b] == 1 and pool.fill[b] < pool.block_size:
                return b
            w.pop()
        return -1

    def needs_block(self) -> bool:
        """Whether appending one token takes a fresh block from the pool."""
        return self._writable() < 0

    def blocks_needed(self, n: int) -> int:
        """Fresh blocks that appending ``n`` tokens takes from the pool."""
        b = self._writable()
        room = self.pool.block_size - self.pool.fill[b] if b >= 0 else 0
        return self.pool.blocks_for(max(0, n - room))

    def append_slot(self) -> int:
        """Reserve the slot for the next token of this branch and return its flat index."""
        pool = self.pool
        bid = self._writable()
        if bid < 0:
            bid = pool.allocate()
            self.blocks.append(bid)
            self._write.append(bid)
        off = int(pool.fill[bid])
        pool.fill[bid] = off + 1
        slot = bid * pool.block_size + off
        if self.n == len(self.slots):
            self.slots = np.concatenate([self.slots, np.empty(len(self.slots), dtype=np.int64)])
        self.slots[self.n] = slot
        self.n += 1
        return slot

    def fork(self) -> BlockTable:
        """A child table sharing every block of this one (incref, no copy)."""
        self._check_live()
        child = BlockTable(self.pool)
        for b in self.blocks:
            self.pool.incref(b)
        child.blocks = list(self.blocks)
        child.slots = self.slots.copy()
        child.n = self.n
        child.fork_len = len(self.blocks)
        # the inherited partial block is read-only while shared; if it ever becomes this child's alone (a
        # prompt table released after its samples forked from it), the child fills it
        fill, bs = self.pool.fill, self.pool.block_size
        child._write = [b for b in self.blocks[-1:] if fill[b] < bs]
        return child

    def join(self, children: list[BlockTable]) -> None:
        """Take each child's own blocks and slots (ownership moves here); release the children's shared prefix."""
        self._check_live()
        k = len(self.blocks)
        for c in children:  # validate everything before touching any refcount
            c._check_live()
            if c.fork_len != k or c.blocks[:k] != self.blocks or c.n < self.n:
                raise KVCacheError("join: a child table does not extend this table")
        parts = [self.slots[:self.n]]
        for c in children:
            for b in c.blocks[:k]:
                self.pool.decref(b)
            self.blocks.extend(c.blocks[k:])
            parts.append(c.slots[self.n:c.n])
            c.blocks, c.n, c.released, c._write = [], 0, True, []
        self.slots = np.concatenate(parts + [np.empty(64, dtype=np.int64)])
        self.n = sum(len(p) for p in parts)
        # holes first: every block with room that is now ours alone (checked again at write time)
        fill, bs = self.pool.fill, self.pool.block_size
        self._write = [b for b in reversed(self.blocks) if fill[b] < bs]

    def release(self) -> None:
        """Return every reference this table holds. A second release raises."""
        self._check_live()
        for b in self.blocks:
            self.pool.decref(b)
        self.blocks, self.n, self.released, self._write = [], 0, True, []

    def _check_live(self) -> None:
        if self.released:
            raise KVCacheError("use of a released block table")

    def check(self) -> None:
        """Invariants (tests): every token has a distinct slot, inside a block this table references."""
        s = self.slot_view()
        if len(np.unique(s)) != len(s) or not set((s // self.pool.block_size).tolist()) <= set(self.blocks):
            raise KVCacheError("block table invariant broken")
