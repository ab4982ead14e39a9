"""The parallel layout in its two forms, and the device-side helpers built on the compact one.

:class:`Layout` is produced by :meth:`npr_env.graph.ExecutionGraph.layout` (the only place positions and
visibility are computed). This module only *reads* it:

* ``Layout.dense_mask()``: ``[L, L]`` bool, for tests and small inputs;
* ``collate`` + ``attention_bias``: a batch of compact layouts to an additive float mask built on the device,
  ``O(B * T * D)`` numbers on the host instead of ``B * T * T``;
* ``flex_mask_mod``: the same rule as a FlexAttention ``mask_mod``;
* ``predictor_indices``: for each token, the row whose logits predict it (the latest token it may see).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def allowed_mask(hide_lo, hide_hi, valid):
    """Torch bool ``[B, 1, T, T]`` built on the tensors' device: causal, minus hidden intervals, minus padding.

    A padding row attends to itself only, so no row is empty (an empty row gives NaN in softmax).
    """
    import torch

    B, T, D = hide_lo.shape
    idx = torch.arange(T, device=hide_lo.device)
    q, k = idx[:, None], idx[None, :]
    allowed = (k <= q).unsqueeze(0) & valid[:, None, :]
    for d in range(D):
        lo, hi = hide_lo[:, :, d, None], hide_hi[:, :, d, None]
        allowed = allowed & ~((k >= lo) & (k < hi))
    allowed = allowed | ((~valid)[:, :, None] & (q == k).unsqueeze(0))
    return allowed.unsqueeze(1)


def attention_bias(hide_lo, hide_hi, valid, dtype=None):
    """Additive float mask ``[B, 1, T, T]`` (0 where allowed, the dtype's minimum elsewhere) for SDPA / HF models.

    Never pass a boolean 4-D mask to an eager attention: it is silently misread there.
    """
    import torch

    dtype = dtype or torch.float32
    allowed = allowed_mask(hide_lo, hide_hi, valid)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def flex_mask_mod(hide_lo, hide_hi, valid):
    """A FlexAttention ``mask_mod(b, h, q, k)`` for the same rule (for long sequences on GPU)."""
    D = hide_lo.shape[-1]

    def mask_mod(b, h, q, k):
        ok = (k <= q) & valid[b, k]
        for d in range(D):
            ok = ok & ~((k >= hide_lo[b, q, d]) & (k < hide_hi[b, q, d]))
        return ok | (q == k)

    return mask_mod


def to_torch(batch: dict[str, np.ndarray], device=None) -> dict:
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
