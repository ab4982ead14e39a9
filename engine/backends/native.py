"""The native engine as a plain sequential backend: what the orchestrator's CPU tests (and a CPU user) drive.

``NativeSequentialBackend(NPREngine(model, tokenizer))`` answers :class:`~engine.orchestration.CompletionRequest`
s with ``NPREngine.generate(..., mode="sequential")``: each request's ids are the prompt, decoding is causal
with sequential positions, and it stops on EOS or on the request's stop ids, which is exactly the contract a
stock server (SGLang) offers. Requests that share a budget, stop set and penalty go in one ``generate`` call.

Forced tail tokens (``score_tail``) are part of the request's ids, like a server's prompt; their logprobs come
from one causal forward of the same HF module (what a server's "input logprobs" are).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import torch

from ..npr_engine import NPREngine
from ..orchestration import Completion, CompletionRequest
from ..sampling import SamplingParams


class NativeSequentialBackend:
    """A :class:`~engine.orchestration.SequentialBackend` over :class:`engine.NPREngine` (sequential mode)."""

    def __init__(self, engine: NPREngine):
        self.engine = engine

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, **engine_kwargs) -> NativeSequentialBackend:
        return cls(NPREngine(model, tokenizer, **engine_kwargs))

    def load_weights(self, state_dict: dict, strict: bool = True) -> None:
        self.engine.load_weights(state_dict, strict=strict)

    def complete(self, requests: Sequence[CompletionRequest], params: SamplingParams) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if r.max_new_tokens < 1:
                raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
            groups[(r.max_new_tokens, tuple(r.stop_token_ids), r.repetition_penalty)].append(i)
        for g, ((cap, stops, pen), idx) in enumerate(groups.items()):
            # reproducible: a function of the caller's seed and of the group (requests are in a fixed order)
            seed = None if params.seed is None else int(params.seed) + 7919 * g
            # one sample per request; the request's penalty everywhere (a server knows nothing of steps)
            sp = replace(params, n=1, max_new_tokens=cap, max_total_tokens=cap, stop_token_ids=stops, seed=seed,
                         repetition_penalty=pen, step_repetition_penalty=pen)
            # a request the pool can never hold (its ids grew from the model's own output) ends "aborted",
            # as on a server, instead of failing the whole wave (NPREngine.generate raises for it)
            for i in idx:
                if not self.engine.fits(len(requests[i].ids)):
                    out[i] = Completion([], [], "aborted")
            idx = [i for i in idx if out[i] is None]
            if not idx:
                continue
            rolls = self.engine.generate([requests[i].ids for i in idx], sp, mode="sequential")
            for i, r in zip(idx, rolls):
                reason = r.finish_reason if r.finish_reason in ("eos", "stop", "length") else "aborted"
                out[i] = Completion(list(r.token_ids), [float(x) for x in r.logprobs], reason)
        tails = [i for i, r in enumerate(requests) if r.score_tail]
        if tails:
            for i, lps in zip(tails, self._tail_logprobs([requests[i] for i in tails], params.temperature)):
                out[i].tail_logprobs = lps
        return out

    @torch.inference_mode()
    def _tail_logprobs(self, requests: list[CompletionRequest], temperature: float) -> list[list[float]]:
        """``log_softmax(logits / T)`` of each request's last ``score_tail`` ids, causal, sequential positions."""
        model = self.engine.model
        dev = self.engine.runner.device
        t = temperature if temperature not in (0.0, 1.0) else 1.0
        res = []
        for r in requests:
            m = r.score_tail
            if m >= len(r.ids):
                raise ValueError(f"score_tail={m} leaves no context in a request of {len(r.ids)} ids")
            ids = torch.tensor([r.ids], device=dev)
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=m + 1).logits[0, :-1].float() / t
            tgt = ids[0, -m:]
            lp = logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
            res.append(lp.tolist())
        return res
