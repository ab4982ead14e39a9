"""Model runner: an HF causal LM's own weights, applied in our attention over the paged KV cache.

The runner does not call the HF model's forward. It reads the live module's parameters (embedding, per layer
``input_layernorm``, ``q/k/v/o_proj``, ``q_norm/k_norm`` when present (Qwen3), ``post_attention_layernorm``,
the gated MLP, the final norm and ``lm_head``), and the module's own ``rotary_emb`` for cos/sin, and applies
them with the same arithmetic as HF: RMSNorm in fp32, RoPE by ``rotate_half`` (bit for bit), softmax attention
with scale ``head_dim ** -0.5``. Keys are written to the cache already rotated, at the positions the graph gave.

Because it holds references to the module's parameter tensors, never copies (re-read by
:meth:`ModelRunner.bind` at every ``generate``), a trainer that updates the module in place (optimizer steps,
fused or not, ``load_state_dict``) is seen by the next rollout with nothing to synchronise.

One call (:meth:`ModelRunner.forward`) runs ``B`` rows of ``Q`` new tokens each (decode: ``Q == 1``; prefill
or forced chunks: ``Q > 1``, right-padded). The linear layers (QKV, O, MLP) run on the packed rows. The pool is
KV-head-major (:mod:`engine.kv_cache`), and attention reads K/V through a gather from it (``index_select`` per
layer: a copy, not a view), already laid out ``[KV, rows, keys, D]``:

* prefill and forced runs (:meth:`ModelRunner.prepare_extend`): each row gathers its own table's slots
  (``key_index [B, Lk]``), with an additive float bias for padding and causality;
* decode (:meth:`ModelRunner.prepare_decode`) gathers whole blocks, ``block_size`` keys per gathered row: a row
  sees every filled slot of the blocks its table references and nothing else (the pool's write rule), so the
  block table is the key index and each block's fill level its mask. Rows are put in *share groups*
  (:func:`share_groups`: the samples of one prompt, the siblings of one request), and each group gathers the
  union of its rows' blocks, each block once (``key_index [G, NBu]``): a block shared by k rows is copied once
  per step and per layer, not k times. The group's queries are scattered into ``[G, Qmax]`` for attention
  only, each row masked by a 0 / -inf bias to the filled slots of its own blocks, and gathered back. When
  grouping would gather no fewer blocks (independent prompts: one row per group), each row gathers its own.
  A lone decode row whose slots are one run of the pool (the pool hands out its lowest free block first)
  reads them as a view: nothing is copied.
  A gather of each distinct visible block remains, once per group and per step; so do the unfilled tails of
  partial blocks and the padding (scratch) of groups shorter than the longest, all masked.

GQA is handled by folding the query heads of one KV group into the query-length axis, so K/V are never repeated.
On the CPU, attention with few queries per KV head (decode, short forced runs) runs as two batched GEMMs over the
gathered K/V (:func:`_gemm_attention`), the rest through SDPA. The runner counts what its decode forwards gather
(:attr:`ModelRunner.decode_kv_slots`: slots, whole blocks counted whole).

The scheduler reserves the KV slots of the new tokens in each row's block table; :meth:`ModelRunner.prepare_decode`
(one token per row) and :meth:`ModelRunner.prepare_extend` (several: a prefill chunk, a forced run) turn those
tables into the tensors of one forward (:class:`StepInput`), which :meth:`ModelRunner.run` executes.

Supported families: Qwen3, Qwen2 and Llama (full attention; sliding windows are refused, not ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from .paged_attention import PagedDecode

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
NEG_INF = float("-inf")


@dataclass
class StepInput:
    """The tensors of one forward (see :meth:`ModelRunner.forward`)."""

    input_ids: torch.Tensor  # [B, Q]
    positions: torch.Tensor  # [B, Q]
    write_slots: torch.Tensor  # [B * Q]
    key_index: torch.Tensor  # [B, Lk] slots, or [B, Lk / block_size] blocks with key_blocks
    attn_bias: torch.Tensor | None  # [B, 1, Q, Lk] or None
    out_index: torch.Tensor | None = None  # [B] or [B, K]
    q_index: torch.Tensor | None = None  # [B]: a decode row's place in the [G * Qmax] share-group queries
    block_mask: object | None = None  # paged decode (engine.paged_attention): the step's BlockMask ...
    n_slots: int = 0  # ... over the pool's first n_slots slots (key_index is then empty)
    key_blocks: bool = False  # key_index lists whole blocks (decode), each gathered as block_size keys
    key_run: int = -1  # one decode row whose slots are the run [key_run, key_run + Lk): read in place, no gather


DECODE_ATTENTION = ("auto", "paged", "gather")  # "auto": paged on CUDA, gather on the CPU (see NPREngine)

# A share group's union costs (1 + attn_per_row * rows) per union slot (one gather; the scores of every row, the
# masked ones included), against (1 + attn_per_row) per slot that each row gathers for itself. attn_per_row is
# the cost of scoring a slot for one more row over the cost of copying it out of the pool, and it depends on how
# wide a slot is: copying has a cost per slot whatever its width, so narrow slots are cheap to copy. Measured on
# a 2-core CPU (index_select of K and V against masked SDPA, GQA folded): 0.39-0.45 at 64 floats per K slot
# (KV heads x head dim: the tiny preset), 0.14-0.21 at 256, 0.04-0.07 at 1024 (Qwen3-4B). 16 / width fits the
# narrow end, and the floor keeps 1/16 from 256 floats up (an order of magnitude: the grouped plan pays there).
ATTN_PER_ROW = 1 / 16


def attn_per_row(kv_width: int) -> float:
    """:data:`ATTN_PER_ROW` for K slots of ``kv_width`` floats (KV heads x head dim): 16 / width in [1/16, 1/2].
    The tiny preset's 2 x 32 gives 1/4, where 1/16 grouped the samples of a prompt whose rows each see a small
    part of the union: parallel rollouts of its stage-3 model took 1.27-1.45x as long (docs/results.md)."""
    return min(0.5, max(ATTN_PER_ROW, 16 / max(1, kv_width)))


def share_groups(tables: list, per_row: float = ATTN_PER_ROW
                 ) -> list[tuple[list[int], list[int], list[np.ndarray]]]:
    """Group decode rows by the KV blocks their tables share. ``tables[r]``: row ``r``'s
    :class:`~engine.kv_cache.BlockTable`.

    Returns ``(rows, union, cols)`` per group: ``union`` holds each block that a row of the group references,
    once (the blocks all its rows share first, in order, then the others in order of first reference);
    ``cols[j]`` are the positions in ``union`` of the blocks of row ``rows[j]``. A row sees every filled slot of
    the blocks it references and nothing else (the pool's write rule, :meth:`engine.paged_attention.PagedDecode.check`),
    which is exactly the slots its own table lists, so a group's plan is its blocks.

    Rows start in one group per first block (the samples of one prompt share it). A group pays when gathering
    its union once and scoring every union slot for every row costs no more than each row gathering and scoring
    its own blocks: ``|union| * (1 + per_row * rows) <= sum(|blocks_r|) * (1 + per_row)`` (``per_row``: scoring a
    slot for one more row over copying it, :func:`attn_per_row`). A group that does not pay is split by the
    first block after the blocks all its rows share (a request's siblings share their parent's blocks), down to
    single rows."""
    first: dict[int, list[int]] = {}
    for r, t in enumerate(tables):
        first.setdefault(t.blocks[0], []).append(r)
    out: list = []
    for rows in first.values():
        _split(tables, rows, 1, out, per_row)
    return out


def _alone(tables, r: int) -> tuple[list[int], list[int], list[np.ndarray]]:
    blocks = tables[r].blocks
    return [r], list(blocks), [np.arange(len(blocks))]


def _split(tables, rows: list[int], start: int, out: list, per_row: float) -> None:
    """``rows`` share (at least) their first ``start`` blocks."""
    ref = tables[rows[0]].blocks
    if len(rows) == 1:
        out.append(_alone(tables, rows[0]))
        return
    k = len(ref)  # the blocks every row shares
    for r in rows[1:]:
        blocks = tables[r].blocks
        m, i = min(k, len(blocks)), start
        while i < m and blocks[i] == ref[i]:
            i += 1
        k = i
    union = dict.fromkeys(chain(ref[:k], *(tables[r].blocks[k:] for r in rows)))
    total = sum(len(tables[r].blocks) for r in rows)
    by: dict[int, list[int]] = {}
    for r in rows:
        blocks = tables[r].blocks
        by.setdefault(blocks[k] if len(blocks) > k else -1, []).append(r)
    if len(union) * (1 + per_row * len(rows)) <= total * (1 + per_row) or len(by) == 1:
        at = {b: i for i, b in enumerate(union)}
        out.append((rows, list(union), [np.fromiter((at[b] for b in tables[r].blocks), np.int64,
                                                    len(tables[r].blocks)) for r in rows]))
        return
    if len(by) == len(rows):  # no two rows share a block after the common ones (a prompt's samples)
        out.extend(_alone(tables, r) for r in rows)
        return
    for sub in by.values():
        _split(tables, sub, k, out, per_row)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF's RMSNorm (Qwen3/Qwen2/Llama): normalise in fp32, cast back, then scale (one fused op in fp32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.to(torch.float32)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin``, bit for bit, in fewer ops: ``rotate_half(x)`` is ``roll(x, D / 2)``
    with its first half negated, and the sign is folded into ``signed_sin`` (:func:`_signed_sin`) once per
    forward instead of once per layer and tensor."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _bias(linear):
    return linear.bias if getattr(linear, "bias", None) is not None else None


def _gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Softmax attention as two batched GEMMs, for few queries per row on the CPU (decode, short forced runs).

    ``q`` ``[Bk, Qm, KV, g, D]``; ``k``, ``v`` the gathered keys and values, ``[KV, Bk, Lk, D]`` and contiguous
    (the pool is KV-head-major), so every GEMM runs on plain strides. The CPU's fused SDPA kernel splits its
    work by (row, head, query block), which for one or two queries per head leaves each task too small (~2x
    slower at 64 decode rows). ``bias`` is ``[Bk, 1, Qm * g or 1, Lk]``. The scores, ``[KV, Bk, Qm * g, Lk]``,
    are ``Qm * g / D`` of the gathered keys' size. Returns ``[Bk * Qm, KV * g * D]``."""
    Bk, Qm, KV, g, D = q.shape
    s = torch.matmul(q.permute(2, 0, 1, 3, 4).reshape(KV, Bk, Qm * g, D), k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s.add_(bias.view(1, Bk, bias.shape[2], bias.shape[3]))
    o = torch.matmul(torch.softmax(s, dim=-1), v)  # [KV, Bk, Qm * g, D]
    return o.view(KV, Bk, Qm, g, D).permute(1, 2, 0, 3, 4).reshape(Bk * Qm, KV * g * D)


class _Layer:
    """References to one decoder layer's parameters (the live tensors, never copies)."""

    __slots__ = ("ln1", "e1", "q", "k", "v", "q_b", "k_b", "v_b", "o", "o_b", "q_norm", "k_norm", "q_eps", "k_eps",
                 "ln2", "e2", "gate", "up", "down", "gate_b", "up_b", "down_b", "act")


class ModelRunner:
    """Applies an HF Qwen3/Qwen2/Llama ``*ForCausalLM`` module over a :class:`~engine.kv_cache.BlockPool`."""

    def __init__(self, model: torch.nn.Module, decode_attention: str = "auto", gemm_attention: bool = True):
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        cfg = model.config
        model_type = getattr(cfg, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"NPREngine supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) and "sliding_attention" in layer_types:
            raise NotImplementedError("sliding-window attention layers are not supported by the NPR engine")
        self.model = model
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.kv_heads
        self.attn_per_row = attn_per_row(self.kv_heads * self.head_dim)  # share groups' cost model
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        # position-independent rotary types: cos/sin are read from a table built by the module itself
        self._rope_table_ok = rope.get("rope_type", rope.get("type", "default")) in (
            "default", "linear", "llama3", "yarn")
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decode_attention = decode_attention
        self.gemm_attention = gemm_attention  # False: every gathered attention through SDPA (as before the GEMM path)
        self._paged: PagedDecode | None = None
        self._gather_bufs: list[torch.Tensor | None] = [None, None]  # decode's K and V gathers (see _gather)
        self.reset_counters()
        self.bind()

    def reset_counters(self) -> None:
        """Zero the decode counters: forwards prepared by :meth:`prepare_decode`, the KV slots their key index
        gathers (each layer gathers that many K and V rows; padding and repeats included), the forwards
        that read the pool in place instead (paged: nothing gathered), and the forwards (decode or extend) whose
        attention ran as batched GEMMs (:func:`_gemm_attention`)."""
        self.decode_forwards = 0
        self.decode_kv_slots = 0
        self.paged_forwards = 0
        self.gemm_forwards = 0

    def _use_paged(self, pool, tables) -> bool:
        """Whether this decode step reads the pool in place (see ``decode_attention`` in :class:`NPREngine`)."""
        mode = self.decode_attention
        if mode == "gather" or not pool.k_flat:  # a bookkeeping-only pool (tests) has no tensors
            return False
        if mode == "auto" and self.device.type != "cuda":
            return False
        if self._paged is None:
            self._paged = PagedDecode(pool.block_size, self.device)
        ok, why = self._paged.available()
        if not ok and mode == "paged":
            raise RuntimeError(f"decode_attention='paged' needs compiled FlexAttention, which failed here: {why}")
        return ok

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def vocab_size(self) -> int:
        """Width of the logits (rows of ``lm_head``)."""
        return self.head_w.shape[0]

    @property
    def embed_rows(self) -> int:
        """Token ids the embedding accepts."""
        return self.embed.shape[0]

    # -- batches ---------------------------------------------------------------------------------------------
    def prepare_decode(self, pool, tables, tokens: list[int], positions: list[int], share: bool = True) -> StepInput:
        """One new token per row; each table already holds its slot (the last one).

        A single row reads its table's slots: in place when they are one run of the pool, else gathered. Several
        rows gather whole blocks (``key_blocks``): a row sees
        every filled slot of the blocks it references and nothing else (the pool's write rule), so its mask is
        each block's fill level, and the copy is ``block_size`` keys per gathered row instead of one. Rows whose
        tables share blocks (the samples of one prompt, the sibling branches of one request) are put in one
        *share group* (:func:`share_groups`): the group's key index is the union of its rows' blocks, each block
        once, and each row's view of it an additive bias (0 / -inf) from its own blocks. The grouped plan is
        used only when it gathers fewer blocks than one key row per table (``B x max blocks``); otherwise
        (independent prompts, one row per group), or with ``share=False``, each row gathers its own blocks."""
        dev = self.device
        B = len(tables)
        slots = [int(t.slots[t.n - 1]) for t in tables]
        ids = torch.tensor(tokens, device=dev).view(B, 1)
        pos = torch.tensor(positions, device=dev).view(B, 1)
        write = torch.tensor(slots, device=dev)
        if self._use_paged(pool, tables):
            mask, n_slots = self._paged.plan(pool, tables)
            self.decode_forwards += 1
            self.paged_forwards += 1
            return StepInput(ids, pos, write, torch.empty((B, 0), dtype=torch.int64, device=dev), None,
                             block_mask=mask, n_slots=n_slots)
        self.decode_forwards += 1
        if B == 1:  # its own slots: nothing to mask, and when they are one run of the pool, nothing to copy
            L = tables[0].n
            s = tables[0].slots[:L]
            lo = int(s.min())
            if int(s.max()) - lo == L - 1:  # L distinct slots spanning L: exactly [lo, lo + L)
                return StepInput(ids, pos, write, torch.empty((1, L), dtype=torch.int64, device=dev), None,
                                 key_run=lo)
            self.decode_kv_slots += L
            return StepInput(ids, pos, write, torch.from_numpy(s).view(1, L).to(dev), None)
        bs, fill = pool.block_size, pool.fill
        NB = max(len(t.blocks) for t in tables)
        groups = share_groups(tables, self.attn_per_row) if share else None
        if groups is not None and len(groups) < B:
            G, Qm, NBu = len(groups), max(len(g[0]) for g in groups), max(len(g[1]) for g in groups)
            if G * NBu < B * NB:
                idx = np.full((G, NBu), pool.scratch_block, dtype=np.int64)
                vis = np.zeros((G, Qm, NBu), dtype=bool)
                q_index = np.empty(B, dtype=np.int64)
                for gi, (rows, union, cols) in enumerate(groups):
                    idx[gi, :len(union)] = union
                    for j, (r, c) in enumerate(zip(rows, cols)):
                        vis[gi, j, c] = True
                        q_index[r] = gi * Qm + j
                    vis[gi, len(rows):, :] = True  # padding queries: any finite row (their output is dropped)
                seen = vis[:, :, :, None] & (np.arange(bs) < fill[idx][:, None, :, None])
                self.decode_kv_slots += idx.size * bs
                return StepInput(ids, pos, write, torch.from_numpy(idx).to(dev), self._mask(seen, (G, 1, Qm, -1)),
                                 q_index=torch.from_numpy(q_index).to(dev), key_blocks=True)
        idx = np.full((B, NB), pool.scratch_block, dtype=np.int64)
        for i, t in enumerate(tables):
            idx[i, :len(t.blocks)] = t.blocks
        seen = np.arange(bs) < fill[idx][:, :, None]
        self.decode_kv_slots += idx.size * bs
        return StepInput(ids, pos, write, torch.from_numpy(idx).to(dev), self._mask(seen, (B, 1, 1, -1)),
                         key_blocks=True)

    def _mask(self, seen: np.ndarray | torch.Tensor, shape: tuple) -> torch.Tensor:
        """An additive bias (0 where ``seen``, -inf elsewhere) of ``shape`` in the model's dtype."""
        seen = torch.as_tensor(seen, device=self.device)
        bias = torch.zeros(seen.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill_(~seen, NEG_INF).view(shape)

    def prepare_extend(self, pool, tables, tokens: list[list[int]], positions: list[list[int]],
                       every: bool = False) -> StepInput:
        """Several new tokens per row (causal among themselves, after everything the table held before them);
        each table already holds their slots (its last ``len(tokens[r])``). Logits at each row's last token, or
        at every one of its tokens with ``every`` (``[B, Q, V]``, padding repeats the last)."""
        dev = self.device
        qlens = [len(t) for t in tokens]
        R, Q = len(tables), max(qlens)
        lens = [t.n for t in tables]
        Lk = max(lens)
        ids = np.zeros((R, Q), dtype=np.int64)
        pos = np.zeros((R, Q), dtype=np.int64)
        slots = np.full((R, Q), pool.scratch_slot, dtype=np.int64)
        keys = np.full((R, Lk), pool.scratch_slot, dtype=np.int64)
        for r, (t, q) in enumerate(zip(tables, qlens)):
            ids[r, :q] = tokens[r]
            pos[r, :q] = positions[r]
            slots[r, :q] = t.slots[t.n - q:t.n]
            keys[r, :t.n] = t.slots[:t.n]
        kpos = torch.arange(Lk, device=dev)
        qabs = torch.tensor([n - q for n, q in zip(lens, qlens)], device=dev)[:, None] + torch.arange(Q, device=dev)
        klen = torch.tensor(lens, device=dev)
        allowed = (kpos[None, None, :] <= qabs[:, :, None]) & (kpos[None, None, :] < klen[:, None, None])
        bias = self._mask(allowed[:, None], (R, 1, Q, Lk))
        last = torch.tensor([q - 1 for q in qlens], device=dev)
        out = torch.minimum(torch.arange(Q, device=dev)[None, :], last[:, None]) if every else last
        return StepInput(torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev),
                         torch.from_numpy(slots.reshape(-1)).to(dev), torch.from_numpy(keys).to(dev), bias, out)

    def run(self, pool, inp: StepInput) -> torch.Tensor:
        return self.forward(pool, inp.input_ids, inp.positions, inp.write_slots, inp.key_index, inp.attn_bias,
                            inp.out_index, inp.q_index, inp.block_mask, inp.n_slots, inp.key_blocks, inp.key_run)

    def bind(self) -> None:
        """(Re)read references to the live module's parameters; called at the start of every generate."""
        base = self.model.model
        self._rope_table = None
        self.embed = base.embed_tokens.weight
        self.rotary = base.rotary_emb
        layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            L = _Layer()
            L.ln1, L.e1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
            L.ln2, L.e2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
            L.q, L.k, L.v = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight
            L.q_b, L.k_b, L.v_b = _bias(att.q_proj), _bias(att.k_proj), _bias(att.v_proj)
            L.o, L.o_b = att.o_proj.weight, _bias(att.o_proj)
            L.gate, L.up, L.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            L.gate_b, L.up_b, L.down_b = _bias(mlp.gate_proj), _bias(mlp.up_proj), _bias(mlp.down_proj)
            L.act = F.silu if getattr(self.config, "hidden_act", "silu") == "silu" else mlp.act_fn
            qn, kn = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
            L.q_norm = qn.weight if qn is not None else None
            L.k_norm = kn.weight if kn is not None else None
            L.q_eps = qn.variance_epsilon if qn is not None else 0.0
            L.k_eps = kn.variance_epsilon if kn is not None else 0.0
            layers.append(L)
        self.layers = layers
        self.scale = float(getattr(base.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        head = self.model.get_output_embeddings()
        self.head_w, self.head_b = head.weight, _bias(head)

    def _gather(self, which: int, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``src.index_select(0, index)`` into buffer ``which`` (0: keys, 1: values), reused by every layer and
        step: a layer's gathered K/V are dead once its attention ran. A fresh multi-MB output per call would be
        a new mapping whose pages fault in on every write (glibc returns large blocks to the system)."""
        n = index.numel() * src.shape[1]
        buf = self._gather_bufs[which]
        if buf is None or buf.numel() < n or buf.dtype != src.dtype or buf.device != src.device:
            buf = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0)), dtype=src.dtype, device=src.device)
            self._gather_bufs[which] = buf
        return torch.index_select(src, 0, index, out=buf[:n].view(index.numel(), src.shape[1]))

    @property
    def gather_buffer_bytes(self) -> int:
        """Bytes held by the reused K/V gather buffers (:meth:`_gather`); 0 after :meth:`release_buffers`."""
        return sum(b.numel() * b.element_size() for b in self._gather_bufs if b is not None)

    def release_buffers(self) -> None:
        """Drop the gather buffers (the engine's ``release_memory``); the next gather allocates them again."""
        self._gather_bufs = [None, None]

    def rotary_cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, Q, D]`` for the positions, from the model's own rotary module (or its cached table)."""
        if not self._rope_table_ok:
            return self.rotary(x, positions)
        need = int(positions.max()) + 1
        t = self._rope_table
        if t is None or t[0].shape[0] < need:
            n = max(need, 2 * (t[0].shape[0] if t is not None else 1024))
            cos, sin = self.rotary(x, torch.arange(n, device=x.device)[None])
            t = self._rope_table = (cos[0], sin[0])
        return F.embedding(positions, t[0]), F.embedding(positions, t[1])

    @torch.inference_mode()
    def forward(self, pool, input_ids: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                key_index: torch.Tensor, attn_bias: torch.Tensor | None,
                out_index: torch.Tensor | None = None, q_index: torch.Tensor | None = None,
                block_mask=None, n_slots: int = 0, key_blocks: bool = False, key_run: int = -1) -> torch.Tensor:
        """Run ``B`` rows of ``Q`` new tokens; return logits ``[B, V]`` at query ``out_index[b]`` (default: last),
        or ``[B, K, V]`` at queries ``out_index[b, :]`` when it is ``[B, K]``.

        input_ids, positions: ``[B, Q]``. write_slots: ``[B * Q]`` flat cache slots for the new tokens
        (padding writes to the pool's scratch slot). key_index: ``[B, Lk]`` slots each row attends to, the
        new tokens included. attn_bias: ``[B, 1, Q, Lk]`` additive float (0 / -inf), or None when nothing needs
        masking (a lone decode row, which sees exactly its keys).

        Share-group decode (``Q == 1``, ``q_index`` given): key_index is ``[G, Lk]``, one union of keys per
        group, attn_bias ``[G, 1, Qmax, Lk]`` (query ``j`` of group ``i``: what its row sees), and
        ``q_index[b] = i * Qmax + j`` places row ``b``; the output is back in row order.

        With ``key_blocks``, key_index lists pool blocks (``[Bk, Lk / block_size]``), each gathered whole. With
        ``key_run >= 0`` (one row), its keys are the pool's slots ``[key_run, key_run + Lk)``, read as a view.

        Paged decode (``Q == 1``, ``block_mask`` given, :mod:`engine.paged_attention`): attention reads the
        pool's first ``n_slots`` slots in place, each row the blocks its table lists; key_index is unused.
        """
        B, Q = input_ids.shape
        H, KV, D, g = self.num_heads, self.kv_heads, self.head_dim, self.group
        Bk = key_index.shape[0]  # B, or G share groups of Qm queries (decode with q_index)
        unit = pool.block_size if key_blocks else 1  # keys per gathered row of each head
        Lk = key_index.shape[1] * unit
        Qm = attn_bias.shape[2] if q_index is not None else Q
        heads = torch.arange(KV, device=input_ids.device)[:, None]
        # the storage is [KV, slots, D]: head h's copy of slot s (block b) is row h * slots + s (h * blocks + b)
        write_rows = (write_slots[None, :] + pool.head_slots * heads).reshape(-1)
        kv_rows = (key_index.reshape(-1)[None, :] + (pool.head_slots // unit) * heads).reshape(-1) if key_run < 0 else None
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary_cos_sin(x, positions)
        cos, sin = cos.unsqueeze(2), _signed_sin(sin).unsqueeze(2)  # [B, Q, 1, D]: broadcast over heads
        if attn_bias is not None and Qm > 1 and g > 1:  # query row q*g + j is head j of query q
            attn_bias = attn_bias.repeat_interleave(g, dim=2)
        gemm = (self.gemm_attention and Bk > 1 and Qm * g <= D and block_mask is None and x.device.type == "cpu"
                and x.dtype == torch.float32)  # batched-GEMM attention (see _gemm_attention)
        if gemm:
            self.gemm_forwards += 1
        hidden = x.shape[-1]
        for i, L in enumerate(self.layers):
            h = _rms(x, L.ln1, L.e1)
            q = F.linear(h, L.q, L.q_b).view(B, Q, H, D)
            k = F.linear(h, L.k, L.k_b).view(B, Q, KV, D)
            v = F.linear(h, L.v, L.v_b).view(B, Q, KV, D)
            # q and k normalised (Qwen3) and rotated as one tensor: bit for bit the per-tensor ops, in fewer
            together = L.q_norm is not None and L.q_eps == L.k_eps
            if L.q_norm is not None and not together:
                q, k = _rms(q, L.q_norm, L.q_eps), _rms(k, L.k_norm, L.k_eps)
            qk = torch.cat((q, k), dim=2)
            if together:
                qk = _rms(qk, None, L.q_eps) * torch.cat((L.q_norm.expand(H, D), L.k_norm.expand(KV, D)))
            qk = _rope(qk, cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
            kf, vf = pool.k_flat[i], pool.v_flat[i]
            kf.index_copy_(0, write_rows, k.flatten(0, 1).transpose(0, 1).reshape(-1, D))
            vf.index_copy_(0, write_rows, v.flatten(0, 1).transpose(0, 1).reshape(-1, D))
            if block_mask is not None:  # paged decode: the pool read in place
                o = self._paged.attend(q.transpose(1, 2), pool.k[i], pool.v[i], block_mask, n_slots, self.scale)
                o = o.reshape(B * Q, H * D)
            else:
                if q_index is not None:  # scatter the rows' queries into their groups (padding queries: zeros)
                    q = q.new_zeros((Bk * Qm, H, D)).index_copy_(0, q_index, q.reshape(B, H, D))
                q = q.reshape(Bk, Qm, KV, g, D)
                if key_run >= 0:
                    keys = kf.view(KV, -1, D)[:, None, key_run:key_run + Lk]
                    vals = vf.view(KV, -1, D)[:, None, key_run:key_run + Lk]
                else:
                    keys = self._gather(0, kf.view(-1, unit * D), kv_rows).view(KV, Bk, Lk, D)
                    vals = self._gather(1, vf.view(-1, unit * D), kv_rows).view(KV, Bk, Lk, D)
                if gemm:
                    o = _gemm_attention(q, keys, vals, attn_bias, self.scale)
                else:
                    keys, vals = keys.transpose(0, 1), vals.transpose(0, 1)  # [Bk, KV, Lk, D]
                    qg = q.permute(0, 2, 1, 3, 4).reshape(Bk, KV, Qm * g, D)
                    o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=attn_bias, scale=self.scale)
                    o = o.view(Bk, KV, Qm, g, D).permute(0, 2, 1, 3, 4).reshape(Bk * Qm, H * D)
                if q_index is not None:  # back to the packed rows
                    o = o.index_select(0, q_index)
            # residual adds fused into the projections' GEMMs (x + o @ W^T)
            x = torch.addmm(x.view(B * Q, hidden), o, L.o.t())
            if L.o_b is not None:
                x = x + L.o_b
            h = _rms(x, L.ln2, L.e2)
            a = L.act(F.linear(h, L.gate, L.gate_b)) * F.linear(h, L.up, L.up_b)
            x = torch.addmm(x, a, L.down.t())
            if L.down_b is not None:
                x = x + L.down_b
            x = x.view(B, Q, hidden)
        if Q == 1:
            x = x[:, 0]
        elif out_index is None:
            x = x[:, -1]
        elif out_index.dim() == 2:
            x = x[torch.arange(B, device=x.device)[:, None], out_index]
        else:
            x = x[torch.arange(B, device=x.device), out_index]
        x = _rms(x, self.norm_w, self.norm_eps)
        return F.linear(x, self.head_w, self.head_b)
