"""The training forward under the parallel layout: per-token logprobs of many trajectories in one forward.

A trajectory is scored with the positions and visibility of its :class:`npr_env.layout.Layout` (the graph's
``layout()``, the one place they are computed). The host only ships the compact layout (``O(B * T * D)``
integers); the attention mask is built on the device, in one of three forms (:func:`resolve_attn`):

* ``"bias"``: one additive ``[B, 1, T, T]`` float mask (eager / SDPA); short sequences and tests;
* ``"chunked"``: query chunks, each with only its ``[B, 1, rows, k]`` mask (``k``: the chunk's last row + 1), each
  checkpointed (an HF attention function registered as ``npr_chunked``); memory grows linearly with ``T``, on any
  device. Under ``"auto"`` (the trainer's default) a batch whose dense mask would be small keeps its chunk masks
  (built once, shared by the layers; no recompute), and a layout that hides nothing (sequential rows) is one
  ``is_causal`` SDPA call with no mask at all;
* ``"flex"``: a FlexAttention block mask (``attn_implementation="flex_attention"``; CUDA, long sequences).

Token ``t`` is predicted by the logits of row ``predictor[t]``: the latest token it may see. That is ``t - 1``,
except for the first token of a sibling step, whose predictor is the end of the guideline segment (the step
cannot see its earlier siblings). So logprobs are taken from gathered rows, never from a plain shift.

Pitfall this module avoids: transformers infers "packed sequences" from non-monotonic ``position_ids`` when
no 4-D mask is given, which silently changes attention. We always pass an explicit 4-D mask with the
positions, and never a boolean 4-D mask (an eager attention misreads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from npr_env.layout import (
    Layout,
    attention_bias,
    attention_bias_rows,
    collate,
    flex_block_mask,
    predictor_indices,
)


@dataclass
class Sample:
    """One trajectory to score: prompt + serialized response ids and the layout over both.

    The engine's ``Rollout`` has the same fields (``graph`` instead of ``layout``) and can be passed as is.
    """

    prompt_ids: list[int]
    token_ids: list[int]  # the response, serialized
    layout: Layout  # over prompt + response
    logprobs: list[float] | None = None  # engine logprobs of the response tokens
    forced_mask: list[bool] | None = None  # response tokens the engine forced (not sampled)

    @classmethod
    def from_graph(cls, graph, forced_mask: list[bool] | None = None) -> Sample:
        """A sample from an :class:`npr_env.ExecutionGraph` (SFT data): prompt, response and layout."""
        ids = graph.token_ids
        p = graph.prompt_len
        return cls(list(ids[:p]), list(ids[p:]), graph.layout(), forced_mask=forced_mask)


@dataclass
class TokenBatch:
    """A right-padded batch of trajectories, as tensors on one device. Every field is ``[B, T]`` unless noted.

    ``loss_mask`` marks the tokens that are trained: response tokens, not padding, not forced (unless
    ``train_forced``), and with a predictor. ``response_mask`` marks every scored response token.
    ``index`` ``[B]`` is each row's position in the list given to :func:`build_batch` (micro-batches keep it).
    """

    input_ids: torch.Tensor  # int64
    position_ids: torch.Tensor  # int64
    hide_lo: torch.Tensor  # [B, T, D] int64
    hide_hi: torch.Tensor  # [B, T, D] int64
    valid: torch.Tensor  # bool, False on padding
    predictor: torch.Tensor  # int64, row whose logits predict the token; 0 where it has none (masked)
    loss_mask: torch.Tensor  # bool
    response_mask: torch.Tensor  # bool
    old_logprobs: torch.Tensor  # float32, engine logprobs on response tokens, 0 elsewhere
    index: torch.Tensor  # [B] int64

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def num_loss_tokens(self) -> int:
        """Σ|y| over this batch: the token normaliser of the policy losses."""
        return int(self.loss_mask.sum().item())

    def to(self, device) -> TokenBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows, trim: int | None = 8) -> TokenBatch:
        """The rows ``rows`` (slice, index list or tensor), with trailing all-padding columns cut off.

        ``trim`` rounds the kept length up to a multiple of it (``None`` keeps every column).
        """
        if isinstance(rows, slice):
            sub = {f.name: getattr(self, f.name)[rows] for f in fields(self)}
        else:
            idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
            sub = {f.name: getattr(self, f.name).index_select(0, idx) for f in fields(self)}
        if trim is not None and sub["valid"].numel():
            n = int(sub["valid"].sum(1).max().item())
            t = min(self.seq_len, -(-max(n, 1) // trim) * trim)
            for k, v in sub.items():
                if k != "index":
                    sub[k] = v[:, :t]
        return TokenBatch(**sub)

    def by_length(self) -> TokenBatch:
        """The rows shortest first (stable); ``index`` keeps each row's place, so per-row data can follow it.

        Split after this and every micro-batch is padded only to its own longest row.
        """
        return self.select(torch.argsort(self.valid.sum(1), stable=True), trim=None)

    def split(self, micro_batch_size: int, trim: int | None = 8) -> list[TokenBatch]:
        """Consecutive micro-batches of at most ``micro_batch_size`` rows (see :meth:`select`)."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        return [self.select(slice(i, i + micro_batch_size), trim)
                for i in range(0, self.batch_size, micro_batch_size)]

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The additive ``[B, 1, T, T]`` mask, built on the batch's device from the compact layout."""
        return attention_bias(self.hide_lo, self.hide_hi, self.valid, dtype=dtype)


def _sample_layout(s) -> Layout:
    lay = getattr(s, "layout", None)
    if isinstance(lay, Layout):
        return lay
    graph = getattr(s, "graph", None)
    if graph is None:
        raise TypeError(f"{type(s).__name__} has neither a Layout `layout` nor a `graph`")
    return graph.layout()


def build_batch(samples: Sequence, device=None, train_forced: bool = False,
                pad_to_multiple: int = 8) -> TokenBatch:
    """Collate samples (:class:`Sample`, engine ``Rollout`` or anything with the same fields) into a batch.

    Each sample has ``prompt_ids``, ``token_ids`` (the serialized response), ``layout`` or ``graph``
    (``graph.layout()`` is used), and optionally ``logprobs`` and ``forced_mask`` (per response token).
    Host work is ``O(B * T * D)``: no ``T x T`` mask is built here.
    """
    if not samples:
        raise ValueError("build_batch needs at least one sample")
    layouts, ids, prompt_lens = [], [], []
    for i, s in enumerate(samples):
        prompt, resp = list(s.prompt_ids), list(s.token_ids)
        lay = _sample_layout(s)
        if len(prompt) + len(resp) != len(lay):
            raise ValueError(f"sample {i}: {len(prompt)} prompt + {len(resp)} response ids, but its layout "
                             f"covers {len(lay)} tokens")
        graph = getattr(s, "graph", None)
        if graph is not None and graph.token_ids != prompt + resp:  # token in, token out: no drift allowed
            raise ValueError(f"sample {i}: prompt_ids + token_ids differ from its graph's serialized ids")
        for name in ("logprobs", "forced_mask"):
            v = getattr(s, name, None)
            if v is not None and len(v) != len(resp):
                raise ValueError(f"sample {i}: {name} has {len(v)} entries for {len(resp)} response tokens")
        layouts.append(lay)
        ids.append(prompt + resp)
        prompt_lens.append(len(prompt))

    longest = max(len(x) for x in ids)
    pad_to = -(-max(longest, 1) // pad_to_multiple) * pad_to_multiple if pad_to_multiple else longest
    c = collate(layouts, pad_to=pad_to)
    B, T = c["valid"].shape
    input_ids = np.zeros((B, T), dtype=np.int64)
    predictor = np.full((B, T), -1, dtype=np.int64)
    response = np.zeros((B, T), dtype=bool)
    forced = np.zeros((B, T), dtype=bool)
    old = np.zeros((B, T), dtype=np.float32)
    for b, s in enumerate(samples):
        n, p = len(ids[b]), prompt_lens[b]
        input_ids[b, :n] = ids[b]
        predictor[b, :n] = predictor_indices(layouts[b])
        response[b, p:n] = True
        scored = getattr(s, "scored", None)  # orchestrated rollouts: context-only rows are never scored
        if scored is not None:
            response[b, :n] &= np.asarray(scored, dtype=bool)
        if getattr(s, "forced_mask", None) is not None:
            forced[b, p:n] = np.asarray(s.forced_mask, dtype=bool)
        if getattr(s, "logprobs", None) is not None:
            old[b, p:n] = np.asarray(s.logprobs, dtype=np.float32)
    response &= predictor >= 0  # a token with nothing before it cannot be scored
    loss_mask = response if train_forced else response & ~forced
    out = TokenBatch(
        input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(c["position_ids"]),
        hide_lo=torch.from_numpy(c["hide_lo"]), hide_hi=torch.from_numpy(c["hide_hi"]),
        valid=torch.from_numpy(c["valid"]), predictor=torch.from_numpy(np.maximum(predictor, 0)),
        loss_mask=torch.from_numpy(loss_mask), response_mask=torch.from_numpy(response),
        old_logprobs=torch.from_numpy(old), index=torch.arange(B),
    )
    return out.to(device) if device is not None else out


# -- forward ------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DDP / compile wrapper (for its config and output head)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# -- attention under the layout: three paths ---------------------------------------------------------------------
#
# "bias"    one additive [B, 1, T, T] float mask (eager / SDPA). Quadratic: short sequences and tests only.
# "chunked" query chunks of ``rows`` rows, each with only its [B, 1, rows, k] mask built on the device from
#           hide_lo / hide_hi / valid (k = the chunk's last row + 1: no row sees later keys), each chunk checkpointed,
#           so the backward keeps no [H, T, T] scores and no mask. Memory grows linearly with T. Any device.
#           "auto" keeps the chunk masks when the dense mask would fit MASK_BUDGET (no recompute), and runs a layout
#           that hides nothing as plain is_causal attention (no mask).
# "flex"    a FlexAttention BlockMask built on the device from the compact layout (CUDA; the model must use
#           attn_implementation="flex_attention").

MASK_BUDGET = 1 << 24  # elements of one chunk's additive mask [B, 1, rows, T]: 64 MiB in fp32
LOGIT_BUDGET = 1 << 25  # elements of one chunk's logits [rows, V]: 128 MiB in fp32
ATTN_MODES = ("auto", "bias", "chunked", "flex")
CHUNKED_IMPL = "npr_chunked"  # our registered attention implementation (sdpa for every call without a layout)
_DENSE_IMPLS = (None, "eager", "sdpa", CHUNKED_IMPL, CHUNKED_IMPL + "_eager")


def logprob_chunk_rows(vocab_size: int, budget: int = LOGIT_BUDGET, max_rows: int = 1024) -> int:
    """Rows of one ``[rows, V]`` logits chunk: ``budget // V`` (at least 16, at most ``max_rows``), so a chunk
    stays ~128 MiB in fp32 whatever the vocabulary (220 rows at Qwen3's 151,936). Small vocabularies keep
    1024-row chunks: the same GEMM shapes, so the same rounding, as before the bound existed."""
    return max(16, min(max_rows, budget // max(1, int(vocab_size))))


def attention_chunk_rows(batch_size: int, seq_len: int, budget: int = MASK_BUDGET) -> int:
    """Query rows per chunk of the chunked attention: one chunk's ``[B, 1, rows, T]`` mask holds at most
    ``budget`` elements (a multiple of 64, at least 64)."""
    rows = budget // max(1, batch_size * seq_len) // 64 * 64
    return max(64, min(rows, -(-seq_len // 64) * 64))


@dataclass
class ChunkedLayout:
    """What the chunked attention reads (passed to the model's forward as ``npr_layout``; HF forwards it to the
    attention function of every layer): the compact layout on the device and the rows per query chunk.

    ``checkpoint``: recompute each chunk's mask and scores in backward (memory linear in ``T``). Without it, the
    chunks' masks are built once, by the first layer, and reused by every later layer (and by an activation
    checkpoint's recompute): about half the ``[B, 1, T, T]`` mask in all, for batches whose whole mask fits.
    ``causal``: the layout hides nothing and padding is on the right, so the layout is plain causal attention for
    every real token: one SDPA call with ``is_causal`` (no mask at all; linear memory).
    """

    hide_lo: torch.Tensor  # [B, T, D]
    hide_hi: torch.Tensor  # [B, T, D]
    valid: torch.Tensor  # [B, T]
    rows: int
    checkpoint: bool = True
    causal: bool = False
    masks: dict = field(default_factory=dict)  # (q0, dtype) -> the chunk's mask, when not checkpointing


def _attend_rows(query, key, value, layout: ChunkedLayout, q0: int, scaling, dropout: float, gqa: bool):
    """Attention of query rows ``q0 : q0 + C`` over keys ``0 : q0 + C``, under the layout. The mask is built here,
    so under a checkpoint it is rebuilt in backward rather than kept."""
    q1 = q0 + query.shape[2]
    key_ = (q0, query.dtype)
    bias = None if layout.checkpoint else layout.masks.get(key_)
    if bias is None:
        bias = attention_bias_rows(layout.hide_lo, layout.hide_hi, layout.valid, q0, q1, q1, dtype=query.dtype)
        if not layout.checkpoint:
            layout.masks[key_] = bias
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling,
                                          enable_gqa=gqa)


def chunked_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                              npr_layout: ChunkedLayout | None = None, **kwargs):
    """An HF attention function (``AttentionInterface``): query-chunked attention under ``npr_layout``.

    ``query`` ``[B, H, T, d]``, ``key`` / ``value`` ``[B, Hkv, T, d]`` (GQA), returns ``([B, T, H, d], None)`` like
    ``sdpa_attention_forward``. Without ``npr_layout`` (any ordinary call: generate, a plain forward) it is
    ``sdpa_attention_forward`` itself, so a model switched to this implementation behaves as an SDPA model.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if npr_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"the chunked NPR attention does not support {name!r}")
    B, H, T, _ = query.shape
    groups = H // key.shape[1]
    gqa = groups > 1 and query.device.type == "cpu"  # CPU flash kernel: masked GQA without repeating keys
    if groups > 1 and not gqa:  # elsewhere a masked GQA falls back to the math kernel: repeat once per layer
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if npr_layout.causal:  # every real token sees exactly its predecessors: the kernel's own causal mask
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    rows = max(1, int(npr_layout.rows))
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    outs = []
    for q0 in range(0, T, rows):
        q1 = min(T, q0 + rows)
        args = (query[:, :, q0:q1], key[:, :, :q1], value[:, :, :q1], npr_layout, q0, scaling, dropout, gqa)
        if grad and T > rows and npr_layout.checkpoint:  # keep no chunk's mask or scores for backward: recompute them chunk by chunk
            outs.append(torch.utils.checkpoint.checkpoint(_attend_rows, *args, use_reentrant=False,
                                                          preserve_rng_state=dropout > 0))
        else:
            outs.append(_attend_rows(*args))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _chunked_eager_forward(module, query, key, value, attention_mask, npr_layout=None, **kwargs):
    if npr_layout is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return chunked_attention_forward(module, query, key, value, attention_mask, npr_layout=npr_layout, **kwargs)


_REGISTERED = False


def register_chunked_attention() -> None:
    """Register ``npr_chunked`` (and ``npr_chunked_eager``, for eager models) with transformers' attention and
    mask interfaces: ordinary calls get the sdpa (eager) mask and attention, calls with ``npr_layout`` the
    chunked attention. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(CHUNKED_IMPL, chunked_attention_forward)
    AttentionInterface.register(CHUNKED_IMPL + "_eager", _chunked_eager_forward)
    AttentionMaskInterface.register(CHUNKED_IMPL, sdpa_mask)
    AttentionMaskInterface.register(CHUNKED_IMPL + "_eager", eager_mask)
    _REGISTERED = True


def use_chunked_attention(model: nn.Module) -> nn.Module:
    """Switch an eager / SDPA model to the chunked implementation (in place; the model is returned).

    The attention function is looked up from the config in every forward, gradient-checkpointing recomputes
    included, so the switch is kept: every call without ``npr_layout`` still runs the model's own sdpa (eager)
    attention and masks, and the implementation is not saved with the model (``save_pretrained`` drops it).
    """
    register_chunked_attention()
    inner = _unwrap(model)
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl in (CHUNKED_IMPL, CHUNKED_IMPL + "_eager"):
        return model
    if impl not in (None, "eager", "sdpa"):
        raise ValueError(f"attn='chunked' needs an eager or sdpa model, not {impl!r}")
    inner.config._attn_implementation = CHUNKED_IMPL + "_eager" if impl == "eager" else CHUNKED_IMPL
    return model


def resolve_attn(model: nn.Module, batch: TokenBatch, attn: str = "auto") -> str:
    """The attention path ``attn`` stands for: ``"auto"`` is ``"flex"`` for a flex_attention model, else
    ``"chunked"``, which picks its own form (:func:`_chunked_layout`): plain causal attention when the layout
    hides nothing (sequential rollouts), reused row-chunk masks without recomputation when the whole
    ``[B, 1, T, T]`` mask would fit one chunk's budget (:data:`MASK_BUDGET`), checkpointed row chunks otherwise.
    Every path gives the same logprobs and gradients (to float rounding)."""
    if attn not in ATTN_MODES:
        raise ValueError(f"attn must be one of {', '.join(map(repr, ATTN_MODES))}, got {attn!r}")
    impl = getattr(_unwrap(model).config, "_attn_implementation", None)
    if attn == "auto":
        return "flex" if impl == "flex_attention" else "chunked"
    return attn


FAST_CHUNK_ROWS = 64  # query rows per chunk when the masks are kept (the keys of a chunk stop at its last row)


def layout_is_causal(batch: TokenBatch) -> bool:
    """The layout hides no key from any token and every row's padding is on the right: for the real tokens the
    layout is plain causal attention (a sequential rollout, an SFT text)."""
    if bool((batch.hide_hi > batch.hide_lo).any()):
        return False
    T = batch.seq_len
    n = batch.valid.sum(1, keepdim=True)
    return bool((batch.valid == (torch.arange(T, device=batch.device)[None, :] < n)).all())


def _chunked_layout(batch: TokenBatch, attn: str, attn_chunk: int | None) -> ChunkedLayout:
    """The chunked path's form. ``attn="auto"``: causal when the layout hides nothing; masks kept (each chunk's
    keys end at its last row, so roughly half the dense mask's scores, built once for all layers) when the
    dense mask would fit :data:`MASK_BUDGET`; else (and always for an explicit ``attn="chunked"``, the memory
    path) each chunk checkpointed with :func:`attention_chunk_rows` rows."""
    B, T = batch.input_ids.shape
    causal = layout_is_causal(batch)
    keep = attn == "auto" and B * T * T <= MASK_BUDGET
    rows = attn_chunk or (FAST_CHUNK_ROWS if keep else attention_chunk_rows(B, T))
    return ChunkedLayout(batch.hide_lo, batch.hide_hi, batch.valid, rows, checkpoint=not keep, causal=causal)


def _mask_for(model: nn.Module, batch: TokenBatch, attn: str, attn_chunk: int | None = None):
    """The ``attention_mask`` and extra forward kwargs of one path (see :func:`resolve_attn`)."""
    inner = _unwrap(model)
    impl = getattr(inner.config, "_attn_implementation", None)
    mode = resolve_attn(model, batch, attn)
    dtype = next(inner.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    B, T = batch.input_ids.shape
    if mode == "flex":
        if impl != "flex_attention":
            raise ValueError(f"attn='flex' needs a model loaded with attn_implementation='flex_attention' "
                             f"(it has {impl!r})")
        return flex_block_mask(batch.hide_lo, batch.hide_hi, batch.valid), {}
    if impl not in _DENSE_IMPLS:
        raise ValueError(f"attn={mode!r} (an additive mask) needs an eager or sdpa model, not {impl!r}; "
                         "use attn='flex' with attn_implementation='flex_attention'")
    if mode == "bias":
        return batch.attention_mask(dtype), {}
    use_chunked_attention(model)
    # A 4-D mask makes HF skip its own mask creation (and its packed-sequence guess from the positions). This
    # one is a zero-stride view (no memory) of NaN: the chunked attention never reads it, and any attention that
    # did would give NaN, never a silently wrong result.
    placeholder = torch.full((1, 1, 1, 1), float("nan"), dtype=dtype, device=batch.device).expand(B, 1, T, T)
    return placeholder, {"npr_layout": _chunked_layout(batch, attn, attn_chunk)}


def hidden_states(model: nn.Module, batch: TokenBatch, attn: str = "auto",
                  attn_chunk: int | None = None) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, H]`` under the batch's layout.

    A plain HF model runs its backbone only (no ``[B, T, V]`` logits). A wrapped one (DDP) is called through
    its own forward, so the wrapper's hooks run; it then computes the logits of one position only.
    ``attn``: see :func:`resolve_attn`; ``attn_chunk``: query rows per chunk of the chunked path.
    """
    mask, extra = _mask_for(model, batch, attn, attn_chunk)
    kw = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False,
              **extra)
    if isinstance(model, PreTrainedModel) and model.base_model is not model:
        return model.base_model(**kw).last_hidden_state
    out = model(**kw, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def _rows_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                   want_entropy: bool):
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not want_entropy:
        return lp, lp.new_zeros(())
    ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return lp, ent


def _head_vocab(head: nn.Module) -> int:
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if w is not None else int(getattr(head, "out_features", 0) or 1)


def logprobs_from_hidden(model: nn.Module, batch: TokenBatch, h: torch.Tensor, temperature: float = 1.0,
                         return_entropy: bool = False, all_tokens: bool = False, chunk_tokens: int | None = None):
    """Logprobs (and entropies) ``[B, T]`` from final hidden states ``h`` ``[B, T, H]``, through the output head in
    chunks of ``chunk_tokens`` rows (default :func:`logprob_chunk_rows`): no ``[T, V]`` float tensor is ever
    whole, and with grad on each chunk's logits are recomputed in backward instead of kept."""
    B, T = batch.input_ids.shape
    sel = (batch.valid & (torch.arange(T, device=batch.device) > 0)) if all_tokens else batch.response_mask
    b_idx, t_idx = sel.nonzero(as_tuple=True)
    rows = h[b_idx, batch.predictor[b_idx, t_idx]]  # only the rows that predict a scored token
    targets = batch.input_ids[b_idx, t_idx]
    head = _unwrap(model).get_output_embeddings()
    chunk_tokens = chunk_tokens or logprob_chunk_rows(_head_vocab(head))
    lps, ents = [], []
    n = rows.shape[0]
    for i in range(0, max(n, 1), chunk_tokens):
        args = (head, rows[i:i + chunk_tokens], targets[i:i + chunk_tokens], temperature, return_entropy)
        if torch.is_grad_enabled() and n > chunk_tokens:
            # recompute each chunk's [chunk, V] logits in backward instead of keeping all of them alive
            lp, ent = torch.utils.checkpoint.checkpoint(_rows_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _rows_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    logp = torch.zeros(B, T, dtype=torch.float32, device=batch.device)
    logp = logp.index_put((b_idx, t_idx), torch.cat(lps)[:n])
    if not return_entropy:
        return logp, None
    ent = torch.zeros(B, T, dtype=torch.float32, device=batch.device)
    return logp, ent.index_put((b_idx, t_idx), torch.cat(ents)[:n])


def _token_logprobs_one(model, batch, temperature, return_entropy, all_tokens, attn, chunk_tokens, attn_chunk):
    h = hidden_states(model, batch, attn, attn_chunk)
    return logprobs_from_hidden(model, batch, h, temperature, return_entropy, all_tokens, chunk_tokens)


def token_logprobs(model: nn.Module, batch: TokenBatch, temperature: float = 1.0, return_entropy: bool = False,
                   micro_batch_size: int | None = None, all_tokens: bool = False, attn: str = "auto",
                   chunk_tokens: int | None = None, attn_chunk: int | None = None):
    """Logprobs ``[B, T]`` (float32) of the batch's tokens under ``model``, with the parallel layout.

    ``logprob[b, t] = log_softmax(logits[b, predictor[b, t]] / temperature)[input_ids[b, t]]``, for every
    scored response token (``all_tokens=True``: every token with a predictor, prompt included); 0 elsewhere.
    With ``return_entropy`` it returns ``(logprobs, entropy)``, the entropy of the same distributions.

    ``micro_batch_size`` runs the rows in chunks (for no-grad scoring of big batches); ``chunk_tokens``
    bounds the ``[tokens, vocab]`` logits held at once (default :func:`logprob_chunk_rows`: ~128 MiB of fp32;
    chunks are recomputed in backward when grad is on).
    ``attn``: ``"bias"`` (one additive ``[B, 1, T, T]`` float mask, eager/SDPA; short sequences), ``"chunked"``
    (query chunks of ``attn_chunk`` rows, each with its own ``[rows, T]`` mask, checkpointed: memory linear in
    ``T``, any device), ``"flex"`` (a FlexAttention block mask; the model must use ``flex_attention``), or
    ``"auto"`` (:func:`resolve_attn`: flex for a flex model, else chunked in its fastest form for the batch).
    """
    parts = batch.split(micro_batch_size, trim=8) if micro_batch_size else [batch]
    outs = [_token_logprobs_one(model, mb, temperature, return_entropy, all_tokens, attn, chunk_tokens, attn_chunk)
            for mb in parts]
    if len(outs) == 1:
        lp, ent = outs[0]
    else:
        T = batch.seq_len
        lp = torch.cat([F.pad(o[0], (0, T - o[0].shape[1])) for o in outs])
        ent = torch.cat([F.pad(o[1], (0, T - o[1].shape[1])) for o in outs]) if return_entropy else None
    return (lp, ent) if return_entropy else lp


def sft_loss(model: nn.Module, batch: TokenBatch, num_tokens: int | None = None, **kw) -> torch.Tensor:
    """Mean NLL over ``loss_mask`` tokens (stage-0 / stage-2 SFT).

    ``num_tokens``: the loss-token count of the whole batch, when ``batch`` is one of its micro-batches; the
    sum of the micro-batch losses (and of their gradients) then equals the full-batch mean.
    """
    lp = token_logprobs(model, batch, **kw)
    n = batch.num_loss_tokens if num_tokens is None else num_tokens
    return -(lp * batch.loss_mask).sum() / max(n, 1)


__all__ = ["ChunkedLayout", "Sample", "TokenBatch", "attention_chunk_rows", "build_batch", "chunked_attention_forward",
           "hidden_states", "layout_is_causal", "logprob_chunk_rows", "logprobs_from_hidden",
           "register_chunked_attention", "resolve_attn", "sft_loss", "token_logprobs", "use_chunked_attention"]
