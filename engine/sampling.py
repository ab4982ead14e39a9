"""Sampling parameters and the batched sampler: penalties, processors, temperature, top-k, top-p, logprobs.

Order of operations for one decode step (all rows at once, except the per-branch processors):

1. ``logprobs`` of the chosen tokens are the **policy's**: ``log_softmax(model_logits / temperature)`` of the
   model's own logits, before penalties, processors, top-k and top-p. With ``temperature == 0`` (greedy) they
   are taken at temperature 1. The trainer recomputes exactly these.
2. The logits used for *choosing* are the model's, then the repetition penalty (HF rule: divide positive
   logits, multiply negative ones, for every token the branch can already see), then each
   ``logits_processor(context_ids, logits_row)``, then temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LogitsProcessor = Callable[[list, torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How to sample. ``max_new_tokens`` bounds the critical path of a rollout (the longest chain of tokens
    that must be decoded one after another); ``max_total_tokens`` bounds the sum over all branches and
    defaults to ``4 * max_new_tokens``. In sequential mode the two coincide.

    ``temperature == 0`` is greedy; its logprobs are taken at temperature 1. ``seed`` makes a call
    reproducible: request ``i`` (prompt-major, ``n`` samples per prompt) draws from its own generator seeded
    with ``seed + i``. ``logits_processors`` are called per branch as ``proc(context_ids, logits_row)`` with
    the tokens that branch can see (prompt included, serialized order); ``context_ids`` is the engine's own
    list: read it, do not keep or modify it. The repetition penalty applies to every token the branch can
    see (HF's rule), with ``step_repetition_penalty`` inside a ``<step>`` and ``repetition_penalty`` elsewhere.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    max_total_tokens: int | None = None
    seed: int | None = None
    logits_processors: Sequence[LogitsProcessor] = ()
    step_repetition_penalty: float = 1.02  # inside <step> ... </step>
    repetition_penalty: float = 1.0  # everywhere else
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # never choose EOS (benchmarks with a fixed output length)
    n: int = 1  # samples per prompt; they share the prompt's KV blocks

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("top_k must be >= 0, max_new_tokens >= 1 and n >= 1")
        if self.step_repetition_penalty <= 0 or self.repetition_penalty <= 0:
            raise ValueError("repetition penalties must be > 0")

    @property
    def total_budget(self) -> int:
        return self.max_total_tokens if self.max_total_tokens is not None else 4 * self.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalty(self) -> bool:
        return self.step_repetition_penalty != 1.0 or self.repetition_penalty != 1.0


def policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)[token]`` per row, in fp32; T = 1 when greedy."""
    x = logits.float()
    if temperature not in (0.0, 1.0):
        x = x / temperature
    return x.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's rule on the rows of ``logits`` [B, V]: ``seen`` [B, V] bool, ``penalty`` [B] (1.0 = off)."""
    p = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, generators: list | None,
           groups: list[tuple[int, int]] | None) -> torch.Tensor:
    """Pick one token per row of already-processed ``logits`` [B, V] (greedy, or sampled).

    ``groups`` are ``(start, end)`` row ranges sharing ``generators[i]`` (one torch.Generator per request,
    so a request's draws do not depend on the other requests in the batch's RNG use).
    """
    if params.greedy:
        return logits.argmax(-1)
    x = logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    x = top_k_top_p(x, params.top_k, params.top_p)
    probs = x.softmax(-1)
    bad = ~torch.isfinite(probs).all(-1) | (probs.sum(-1) <= 0)
    if bool(bad.any()):
        raise ValueError("a logits processor or penalty left a row with no finite logit to sample from")
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return exponential_race(probs, generators, groups)


def exponential_race(probs: torch.Tensor, generators: list, groups: list[tuple[int, int]]) -> torch.Tensor:
    """One token per row of ``probs`` [B, V]; rows ``a:b`` of ``groups[i]`` draw from ``generators[i]``.

    This is the draw ``torch.multinomial(probs[a:b], 1, generator=g)`` makes (its one-sample path: the argmax of
    ``p / q`` with ``q ~ Exp(1)`` drawn from ``g`` over a tensor of the rows' shape), so the tokens and each
    generator's state after it are the same, but the rows share one division and one argmax, and none of
    multinomial's per-call checks syncs (``choose`` has checked the rows already). Per request that is a few
    microseconds instead of ~50 (tests/test_engine.py pins the equality)."""
    q = torch.empty_like(probs)
    for (a, b), g in zip(groups, generators):
        q[a:b].exponential_(generator=g)
    return probs.div(q).argmax(-1)


class Sampler:
    """Chooses the next token of rows of logits (penalties, processors, temperature, top-k/p, per-request
    generators) and owns the repetition-penalty state: one presence row ``[V]`` per branch, on the device.

    A branch's row marks every token it can see: a root's starts from its prompt, a fork copies the parent's
    row into each child, a join ORs the children's rows into the parent's and frees them. Tokens a branch
    appends are recorded lazily (:meth:`saw`) and written in one scatter before the next read.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, eos_ids=()):
        self.params = params
        self.eos_ids = sorted(eos_ids)
        self.device = device
        self.presence: torch.Tensor | None = None
        self._free: list[int] = []
        self._rows: list[int] = []
        self._toks: list[int] = []
        if params.uses_penalty:
            self.presence = torch.zeros(64, vocab_size, dtype=torch.bool, device=device)
            self._free = list(range(63, -1, -1))

    # -- presence rows (-1: penalties off) -------------------------------------------------------------------
    def new_row(self, seen: list[int]) -> int:
        if self.presence is None:
            return -1
        row = self._alloc()
        self.presence[row] = False
        self.presence[row, torch.tensor(seen, device=self.device)] = True
        return row

    def copy_row(self, row: int) -> int:
        if row < 0:
            return -1
        new = self._alloc()
        self.presence[new] = self.presence[row]
        return new

    def merge_rows(self, into: int, rows: list[int]) -> None:
        """OR ``rows`` into ``into`` and free them."""
        if into < 0:
            return
        self._flush()
        self.presence[into] |= self.presence[torch.tensor(rows, device=self.device)].any(0)
        self._free.extend(rows)

    def free_row(self, row: int) -> None:
        if row >= 0:
            self._free.append(row)

    def saw(self, row: int, tok: int) -> None:
        if row >= 0:
            self._rows.append(row)
            self._toks.append(tok)

    def _alloc(self) -> int:
        self._flush()
        if not self._free:
            n = self.presence.shape[0]
            self.presence = torch.cat([self.presence, torch.zeros_like(self.presence)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()

    def _flush(self) -> None:
        if self._rows:
            dev = self.device
            self.presence[torch.tensor(self._rows, device=dev), torch.tensor(self._toks, device=dev)] = True
            self._rows, self._toks = [], []

    # -- choosing ----------------------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, rows: list[int], penalties: list[float], contexts: list | None,
               generators: list | None, groups: list[tuple[int, int]] | None, owned: bool = False) -> torch.Tensor:
        """One token per row of ``logits`` [N, V] (the model's; never modified unless ``owned``): ``rows`` are
        the presence rows, ``penalties`` the repetition penalty of each, ``contexts`` what each branch sees
        (for the logits processors), ``generators``/``groups`` as in :func:`choose`."""
        P = self.params
        x = logits
        procs = P.logits_processors
        if (P.ignore_eos or self.presence is not None or procs) and not owned:
            x = x.clone()  # the raw logits still give the logprobs
        if P.ignore_eos and self.eos_ids:
            x[:, self.eos_ids] = float("-inf")
        if self.presence is not None and any(p != 1.0 for p in penalties):
            self._flush()
            seen = self.presence[torch.tensor(rows, device=x.device)]
            x = apply_repetition_penalty(x, seen, torch.tensor(penalties, device=x.device))
        if procs:
            out = []
            for j, ctx in enumerate(contexts):
                row = x[j]
                for p in procs:
                    row = p(ctx, row)
                out.append(row)
            x = torch.stack(out)
        return choose(x, P, generators, groups)
