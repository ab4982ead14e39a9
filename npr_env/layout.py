"""The parallel layout: where it is computed from a graph, its two forms, and the device-side helpers.

This module is the one place positions and visibility are computed. :func:`serialize` walks an execution
graph's traces (:mod:`npr_env.trace`) into serialized order with the position and the hidden intervals of every
token (:meth:`npr_env.graph.ExecutionGraph.layout` returns it as a :class:`Layout`), and
:func:`orchestrated_view` packs the rows that score an orchestrated rollout (what ``npr_agent.scoring`` hands
the trainer). Everything else here only *reads* a :class:`Layout`:

* ``Layout.dense_mask()``: ``[L, L]`` bool, for tests and small inputs;
* ``collate`` + ``attention_bias``: a batch of compact layouts to an additive float mask built on the device,
  ``O(B * T * D)`` numbers on the host instead of ``B * T * T``;
* ``allowed_rows`` / ``attention_bias_rows``: one query chunk ``[rows, T]`` of that mask (the chunked
  attention of ``npr_agent.policy`` builds only these, so its memory grows linearly with ``T``);
* ``flex_mask_mod`` / ``flex_block_mask``: the same rule as a FlexAttention ``mask_mod`` and ``BlockMask``;
* ``predictor_indices``: for each token, the row whose logits predict it (the latest token it may see).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from .trace import Trace


@dataclass
class Layout:
    """Positions and compact visibility of one serialized sequence.

    ``hide_lo/hide_hi`` are ``[L, D]``: token q may not see serialized indices in ``[hide_lo[q,d], hide_hi[q,d])``
    (one interval per nesting level: the earlier sibling steps of each parallel block q lies in). Otherwise
    visibility is causal in serialized order.
    """

    position_ids: np.ndarray  # [L] int64
    hide_lo: np.ndarray  # [L, D] int64
    hide_hi: np.ndarray  # [L, D] int64

    def __len__(self) -> int:
        return len(self.position_ids)

    def dense_mask(self) -> np.ndarray:
        """[L, L] bool, True where row q may attend to column k."""
        L = len(self.position_ids)
        k = np.arange(L)
        mask = k[None, :] <= k[:, None]
        for d in range(self.hide_lo.shape[1]):
            mask &= ~((k[None, :] >= self.hide_lo[:, d, None]) & (k[None, :] < self.hide_hi[:, d, None]))
        return mask

    def can_see(self, q: int, k: int) -> bool:
        if k > q:
            return False
        return not bool(np.any((self.hide_lo[q] <= k) & (k < self.hide_hi[q])))

    @staticmethod
    def sequential(length: int) -> Layout:
        z = np.zeros((length, 1), dtype=np.int64)
        return Layout(np.arange(length, dtype=np.int64), z, z.copy())



def _hide_arrays(hides: list[tuple], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``[L, depth]`` lo/hi arrays from per-token tuples of hidden ``(lo, hi)`` intervals, one per level."""
    lo = np.zeros((len(hides), depth), dtype=np.int64)
    hi = np.zeros((len(hides), depth), dtype=np.int64)
    for q, h in enumerate(hides):
        for d, (a, b) in enumerate(h):
            lo[q, d], hi[q, d] = a, b
    return lo, hi


# -- computing the layout of a graph -----------------------------------------------------------------------------
class Serialized(NamedTuple):
    """A graph's tokens in serialized order, with their layout (what :func:`serialize` returns)."""

    ids: list[int]
    position_ids: np.ndarray  # [L] int64
    kinds: np.ndarray  # [L] int64 (npr_env.trace.KIND_*)
    meta: list
    hide_lo: np.ndarray  # [L, D] int64
    hide_hi: np.ndarray  # [L, D] int64
    start_of: dict[int, int]  # trace uid -> serialized index of the trace's first token

    def layout(self) -> Layout:
        return Layout(self.position_ids.copy(), self.hide_lo.copy(), self.hide_hi.copy())


def serialize(root: Trace) -> Serialized:
    """The serialized order of the graph under ``root`` and its layout.

    Order: a trace's tokens up to a block's fork, then child 1, child 2, ..., then the trace again from where
    the children were serialized. Positions are the ones the tokens got when appended (the cursor gives a
    parallel block's steps the same start position and continues after the longest). Visibility: a token of a
    parallel block's step hides the earlier sibling steps of that block, one ``[lo, hi)`` per nesting level.
    """
    ids, pos, kinds, meta, hides, where = [], [], [], [], [], {}
    max_d = 1

    def walk(t: Trace, hide: tuple):
        nonlocal max_d
        start = 0
        for b in t.blocks:
            if b.offset < 0:  # guideline still open, no step yet: its tokens come with the trace's tail
                continue
            emit(t, start, b.offset, hide)
            start = b.offset
            first = len(ids)
            for c in b.children:
                h = hide + ((first, len(ids)),) if b.parallel else hide
                max_d = max(max_d, len(h))
                walk(c, h)
        emit(t, start, len(t.ids), hide)

    def emit(t: Trace, a: int, b: int, hide: tuple):
        if a == 0:
            where[t.uid] = len(ids)
        ids.extend(t.ids[a:b])
        pos.extend(t.pos[a:b])
        kinds.extend(t.kinds[a:b])
        meta.extend(t.meta[a:b])
        hides.extend([hide] * (b - a))

    walk(root, ())
    lo, hi = _hide_arrays(hides, max_d)
    return Serialized(ids, np.asarray(pos, dtype=np.int64), np.asarray(kinds, dtype=np.int64), meta, lo, hi, where)


def subtree_spans(root: Trace) -> tuple[dict[int, int], dict[int, int]]:
    """Serialized start and length of every trace's subtree (the walk of :func:`serialize`)."""
    start: dict[int, int] = {}
    size: dict[int, int] = {}
    pos = 0

    def walk(t: Trace):
        nonlocal pos
        start[t.uid] = pos
        cut = 0
        for b in t.blocks:
            if b.offset < 0:
                continue
            pos += b.offset - cut
            cut = b.offset
            for c in b.children:
                walk(c)
        pos += len(t.ids) - cut
        size[t.uid] = pos - start[t.uid]

    walk(root)
    return start, size


@dataclass
class ScoringView:
    """Rows that score a trajectory (see ``npr_agent.scoring.scoring_view``): ``source[i]`` is the serialized
    index row ``i`` holds, ``layout`` is over the rows, ``scored[i]`` marks the row that scores its token."""

    source: np.ndarray  # [R] int64
    layout: Layout
    scored: np.ndarray  # [R] bool


def orchestrated_view(root: Trace) -> ScoringView:
    """The packed rows that score a graph generated with fork/join orchestrated as separate causal requests.

    A token of a *first* sibling step, and every token after a join, was generated with the serialized
    sequence before it as context, causal, at position = serialized index (at a join the server re-prefills
    every step causally: the takeaway reads step 2's KV computed *after* step 1). A token of a *non-first* step
    j was generated by its own request: the prefix before the fork, then step j, positions continuing the
    prefix. One token cannot carry both KVs in one forward, so the view packs: the serialized sequence
    (causal), then one re-encoded copy of each non-first step's subtree, seeing the rows before its fork and
    itself (hidden interval ``[fork_row, copy_start)``, nested per level). ``scored[i]`` marks the row that
    gives the logprob of token ``source[i]``; each token is scored exactly once, the other rows are context.
    """
    start, size = subtree_spans(root)
    src: list[int] = []
    pos: list[int] = []
    hides: list[tuple] = []
    scored: list[bool] = []

    def lay(t: Trace, hide: tuple, p0: int):
        """One region: the serialized subtree of ``t``, causal, positions from ``p0``, hiding ``hide``."""
        a, n, r0 = start[t.uid], size[t.uid], len(src)
        src.extend(range(a, a + n))
        pos.extend(range(p0, p0 + n))
        hides.extend([hide] * n)
        scored.extend([True] * n)
        copies = []

        def scope(u: Trace):  # blocks whose first step is generated inside this region
            for b in u.blocks:
                if b.offset < 0 or not b.children:
                    continue
                if not b.parallel:  # a declined fork: its steps follow each other in this region
                    for c in b.children:
                        scope(c)
                    continue
                scope(b.children[0])
                fork_row = r0 + start[b.children[0].uid] - a
                for c in b.children[1:]:
                    s = r0 + start[c.uid] - a
                    scored[s:s + size[c.uid]] = [False] * size[c.uid]
                    copies.append((c, fork_row))

        scope(t)
        for c, fork_row in copies:  # each non-first step again, seeing this region up to its fork
            lay(c, hide + ((fork_row, len(src)),), p0 + fork_row - r0)

    lay(root, (), 0)
    lo, hi = _hide_arrays(hides, max([len(h) for h in hides] + [1]))
    return ScoringView(np.asarray(src, dtype=np.int64), Layout(np.asarray(pos, dtype=np.int64), lo, hi),
                       np.asarray(scored, dtype=bool))


def predictor_indices(layout: Layout) -> np.ndarray:
    """For each serialized index t, the index whose logits predict token t: the latest k < t that t may see.

    That is t - 1, except for the first token of a sibling step, whose predictor is the last token before the
    block's first step (the end of the guideline segment). -1 for t = 0.
    """
    L = len(layout)
    k = np.arange(L, dtype=np.int64) - 1
    for d in range(layout.hide_lo.shape[1]):
        lo, hi = layout.hide_lo[:, d], layout.hide_hi[:, d]
        inside = (k >= lo) & (k < hi)
        k = np.where(inside, lo - 1, k)
    return k


def collate(layouts: list[Layout], pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad a batch of layouts: ``position_ids [B,T]``, ``hide_lo/hide_hi [B,T,D]``, ``valid [B,T]``."""
    B = len(layouts)
    T = max([len(x) for x in layouts] + [pad_to or 0])
    D = max([x.hide_lo.shape[1] for x in layouts] + [1])
    pos = np.zeros((B, T), dtype=np.int64)
    lo = np.zeros((B, T, D), dtype=np.int64)
    hi = np.zeros((B, T, D), dtype=np.int64)
    valid = np.zeros((B, T), dtype=bool)
    for b, x in enumerate(layouts):
        n, d = len(x), x.hide_lo.shape[1]
        pos[b, :n] = x.position_ids
        lo[b, :n, :d] = x.hide_lo
        hi[b, :n, :d] = x.hide_hi
        valid[b, :n] = True
    return {"position_ids": pos, "hide_lo": lo, "hide_hi": hi, "valid": valid}


def _mark_hidden(out, hide_lo, hide_hi, valid, q0: int, mark, unmark) -> None:
    """Mark, in ``out`` ``[B, rows, k_len]`` (rows ``q0 : q0 + rows``), every column its row may not see:
    ``mark(view, where)`` hides the ``where`` entries of a view, ``unmark(view, where)`` shows them again.

    Only the regions that can hold hidden columns are touched: the chunk's own upper triangle (later tokens),
    the columns past it, padding columns, and per nesting level the span of columns some row hides.
    """
    import torch

    B, C, k_len = out.shape
    q1 = q0 + C
    T, D = hide_lo.shape[1], hide_lo.shape[2]
    if not (0 <= q0 <= q1 <= T and 0 < k_len <= T):
        raise ValueError(f"rows {q0}:{q1} / {k_len} columns outside a layout of {T} tokens")
    dev, cpu = hide_lo.device, hide_lo.device.type == "cpu"
    if k_len > q0 and C:  # later tokens inside the chunk's own columns: k > q
        w = min(q1, k_len) - q0
        mark(out[:, :, q0:q0 + w], torch.ones(C, w, dtype=torch.bool, device=dev).triu_(1))
    if k_len > q1:  # columns past the chunk: later than every row
        mark(out[:, :, q1:], None)
    if not cpu or not bool(valid[:, :k_len].all()):  # padding columns (a sync is free on CPU only)
        mark(out, ~valid[:, None, :k_len])
    k = torch.arange(k_len, device=dev)[None, :]
    for d in range(D):
        lo, hi = hide_lo[:, q0:q1, d, None], hide_hi[:, q0:q1, d, None]
        a, b = 0, k_len
        if cpu:  # only the columns some row of this chunk hides at this level
            nonempty = hi > lo
            if not bool(nonempty.any()):
                continue
            a, b = int(lo[nonempty].min()), min(k_len, int(hi[nonempty].max()))
            if a >= b:
                continue
        kk = k[:, a:b]
        inside = kk >= lo
        inside &= kk < hi
        mark(out[:, :, a:b], inside)
    # a padding row sees itself, so no row is empty (an empty row gives NaN in softmax); a valid row always does
    n = max(0, min(q1, k_len) - q0)
    if n:
        unmark(out.diagonal(offset=q0, dim1=1, dim2=2), ~valid[:, q0:q0 + n])


def _hidden_rows(hide_lo, hide_hi, valid, q0: int = 0, q1: int | None = None, k_len: int | None = None):
    """Torch bool ``[B, q1 - q0, k_len]``, True where row q may *not* see column k."""
    import torch

    q1 = hide_lo.shape[1] if q1 is None else q1
    k_len = q1 if k_len is None else k_len
    out = torch.zeros(hide_lo.shape[0], max(0, q1 - q0), max(0, k_len), dtype=torch.bool, device=hide_lo.device)

    def mark(view, where):
        view.fill_(True) if where is None else view.logical_or_(where)

    _mark_hidden(out, hide_lo, hide_hi, valid, q0, mark, lambda view, where: view.logical_and_(~where))
    return out


def allowed_rows(hide_lo, hide_hi, valid, q0: int = 0, q1: int | None = None, k_len: int | None = None):
    """Rows ``q0:q1`` of :func:`allowed_mask`, columns ``0:k_len``: torch bool ``[B, 1, q1 - q0, k_len]``.

    Built on the tensors' device from the compact layout only, so a query chunk costs ``O(B * rows * k_len)``.
    ``k_len`` defaults to ``q1``: no row sees a later column, so the columns past the chunk are never needed.
    """
    return (~_hidden_rows(hide_lo, hide_hi, valid, q0, q1, k_len)).unsqueeze(1)


def allowed_mask(hide_lo, hide_hi, valid):
    """Torch bool ``[B, 1, T, T]`` built on the tensors' device: causal, minus hidden intervals, minus padding.

    A padding row sees itself (and the valid tokens before it), so no row is empty (an empty row gives NaN in
    softmax). Dense: for tests and short sequences; :func:`allowed_rows` builds one query chunk of it.
    """
    T = hide_lo.shape[1]
    return allowed_rows(hide_lo, hide_hi, valid, 0, T, T)


def attention_bias_rows(hide_lo, hide_hi, valid, q0: int = 0, q1: int | None = None, k_len: int | None = None,
                        dtype=None):
    """Additive float mask ``[B, 1, q1 - q0, k_len]`` of rows ``q0:q1`` (0 where allowed, the dtype's minimum
    elsewhere): one query chunk of :func:`attention_bias`, built on the device from the compact layout."""
    import torch

    dtype = dtype or torch.float32
    q1 = hide_lo.shape[1] if q1 is None else q1
    k_len = q1 if k_len is None else k_len
    bias = torch.zeros(hide_lo.shape[0], 1, max(0, q1 - q0), max(0, k_len), dtype=dtype, device=hide_lo.device)
    low = torch.finfo(dtype).min

    def mark(view, where):  # written straight into the float mask: no [rows, T] boolean is built
        view.fill_(low) if where is None else view.masked_fill_(where, low)

    _mark_hidden(bias[:, 0], hide_lo, hide_hi, valid, q0, mark, lambda view, where: view.masked_fill_(where, 0.0))
    return bias


def attention_bias(hide_lo, hide_hi, valid, dtype=None):
    """Additive float mask ``[B, 1, T, T]`` (0 where allowed, the dtype's minimum elsewhere) for SDPA / HF models.

    Never pass a boolean 4-D mask to an eager attention: it is silently misread there.
    """
    T = hide_lo.shape[1]
    return attention_bias_rows(hide_lo, hide_hi, valid, 0, T, T, dtype=dtype)


def flex_mask_mod(hide_lo, hide_hi, valid):
    """A FlexAttention ``mask_mod(b, h, q, k)`` for the same rule (for long sequences on GPU).

    It indexes the tensors at ``q`` and ``k``: give it tensors that cover every index the kernel may evaluate
    (:func:`flex_block_mask` pads them to a whole number of blocks).
    """
    D = hide_lo.shape[-1]

    def mask_mod(b, h, q, k):
        ok = (k <= q) & valid[b, k]
        for d in range(D):
            ok = ok & ~((k >= hide_lo[b, q, d]) & (k < hide_hi[b, q, d]))
        return ok | (q == k)

    return mask_mod


def flex_block_mask(hide_lo, hide_hi, valid, block_size: int = 128, budget: int = 1 << 24):
    """A FlexAttention ``BlockMask`` for the layout, built on the tensors' device with no ``T x T`` mask.

    The block structure (empty, partial or full ``block_size`` tiles) is reduced from query chunks of
    :func:`allowed_rows`, at most ``budget`` booleans at a time; partial tiles keep :func:`flex_mask_mod`. The
    compact tensors are padded to a whole number of blocks, so the kernel never indexes past them, and a tile
    that holds any position past ``T`` is never "full" (the kernel then bound-checks it), as in
    ``create_block_mask``. Host and device memory: ``O(B * T * D + B * (T / block_size) ** 2)``.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask

    B, T, D = hide_lo.shape
    nb = -(-T // block_size)
    Tp = nb * block_size
    lo = F.pad(hide_lo, (0, 0, 0, Tp - T))
    hi = F.pad(hide_hi, (0, 0, 0, Tp - T))
    ok = F.pad(valid, (0, Tp - T), value=False)
    in_range = torch.arange(Tp, device=hide_lo.device) < T
    partial = torch.zeros(B, nb, nb, dtype=torch.bool, device=hide_lo.device)
    full = torch.zeros_like(partial)
    step = max(1, budget // max(1, B * Tp * block_size)) * block_size  # query rows per reduction
    for r0 in range(0, Tp, step):
        r1 = min(Tp, r0 + step)
        a = allowed_rows(lo, hi, ok, r0, r1, Tp)[:, 0]
        a = a & in_range[r0:r1, None] & in_range[None, :]
        a = a.view(B, (r1 - r0) // block_size, block_size, nb, block_size)
        some, every = a.any(dim=4).any(dim=2), a.all(dim=4).all(dim=2)
        full[:, r0 // block_size:r1 // block_size] = every
        partial[:, r0 // block_size:r1 // block_size] = some & ~every

    def blocks(m):  # per query tile: how many kv tiles, and which (ascending, then the unused ones)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
        return m.sum(-1).to(torch.int32)[:, None], idx.to(torch.int32)[:, None]

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=flex_mask_mod(lo, hi, ok), seq_lengths=(T, T))


def to_torch(batch: dict[str, np.ndarray], device=None) -> dict:
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
