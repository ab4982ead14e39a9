"""SGLang as the rollout backend: the same ``generate(...) -> list[Rollout]`` on stock SGLang, for GPU scale.

    from engine.backends.sglang import SGLangEngine
    eng = SGLangEngine("runs/q4b/stage2", tokenizer=tok, mem_fraction_static=0.5)
    rollouts = eng.generate(prompt_ids, SamplingParams(max_new_tokens=30000), mode="parallel")
    eng.load_weights(model.state_dict())            # after each optimizer step

It uses the offline ``sglang.Engine`` with ``skip_tokenizer_init=True``: requests go in as ``input_ids`` and
come back as ``output_ids`` with ``return_logprob=True`` (ids and logprobs, never text). Sequential mode is
one request per sample; parallel mode is :class:`engine.orchestration.OrchestratedEngine` over this backend,
so rollouts record ``layout == "orchestrated"`` (what that means for training is in engine/orchestration.py
and docs/scaling.md).

Logprobs. The trainer recomputes ``log_softmax(logits / T)``. Recent SGLang returns output logprobs after
temperature scaling unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set, which this backend refuses when
``T != 1``; greedy requests are scored at T = 1 on both sides. SGLang's logprobs are taken after its own
penalties, so with ``repetition_penalty != 1`` they may differ from the policy's; the trainer logs the gap as
``policy/logprob_mismatch`` (PAPO's loss does not use them). The forced tokens' logprobs come from SGLang's
input logprobs (``logprob_start_len``), which are temperature-scaled only where SGLang is configured so; forced
tokens never enter the loss.

Weights: :meth:`SGLangEngine.load_weights` pushes a state dict through ``update_weights_from_tensor`` in
buckets (the radix cache is flushed with the last one: cached KV of the old weights must not be reused);
:meth:`SGLangEngine.load_weights_from_disk` reloads an HF checkpoint directory.

Install: ``pip install ".[sglang]"`` on a CUDA machine (SGLang pins a CUDA build of torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..orchestration import Completion, CompletionRequest, OrchestratedEngine
from ..rollout import Rollout
from ..sampling import SamplingParams

INSTALL_HINT = "pip install '.[sglang]' on a CUDA machine (SGLang pins a CUDA build of torch)"


def import_sglang():
    """``import sglang``, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("sglang")
    except ImportError as e:
        raise ImportError(f"the SGLang backend needs the `sglang` package, which is not installed: {INSTALL_HINT} "
                          f"({e})") from e


def sglang_unavailable_reason() -> str | None:
    """Why the SGLang backend cannot run here (None when it can): for tests and friendly errors."""
    if importlib.util.find_spec("sglang") is None:
        return f"sglang is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "CUDA is not available (SGLang serves on GPUs only)"
    return None


def parse_output(out: dict, request: CompletionRequest, eos_ids: Iterable[int]) -> Completion:
    """One ``sglang.Engine.generate`` result (``skip_tokenizer_init=True``, ``return_logprob=True``) to a Completion.

    ``meta_info.output_token_logprobs`` holds ``(logprob, token_id, text)`` per generated token, the stop token
    included; ``meta_info.finish_reason`` is ``{"type": "stop", "matched": id}``, ``{"type": "length", ...}`` or
    ``{"type": "abort", ...}``; ``meta_info.input_token_logprobs`` starts at ``logprob_start_len`` with a None pad.
    """
    meta = out.get("meta_info") or {}
    entries = meta.get("output_token_logprobs") or []
    ids = [int(e[1]) for e in entries]
    lps = [float(e[0]) for e in entries]
    if "output_ids" in out and list(out["output_ids"]) != ids:
        raise RuntimeError("SGLang returned output_ids that differ from its output_token_logprobs ids")
    fin = meta.get("finish_reason")
    kind = fin.get("type") if isinstance(fin, dict) else fin
    if kind == "stop":
        matched = fin.get("matched") if isinstance(fin, dict) else None
        reason = "eos" if matched in set(eos_ids) else "stop"
        if isinstance(matched, int) and (not ids or ids[-1] != matched):
            raise RuntimeError(f"SGLang stopped on token {matched} but did not return it; this backend needs "
                               "stop tokens in the output (token in, token out)")
    elif kind == "length":
        reason = "length"
    else:
        reason = "aborted"
    tail: list[float] = []
    m = request.score_tail
    if m:
        inp = meta.get("input_token_logprobs") or []
        got = inp[-m:]
        if len(got) != m or [int(e[1]) for e in got] != list(request.ids[-m:]) or any(e[0] is None for e in got):
            raise RuntimeError(f"SGLang input logprobs do not cover the {m} forced tokens of the request")
        tail = [float(e[0]) for e in got]
    return Completion(ids, lps, reason, tail)


class SGLangBackend:
    """A :class:`~engine.orchestration.SequentialBackend` over an offline ``sglang.Engine``."""

    def __init__(self, engine, eos_ids: Iterable[int], per_request_seed: bool | None = None):
        self.engine = engine
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        # `sampling_seed` is a recent SGLang sampling parameter; older releases reject unknown keys
        self.per_request_seed = _has_sampling_field("sampling_seed") if per_request_seed is None else per_request_seed

    def complete(self, requests: Sequence[CompletionRequest], params: SamplingParams) -> list[Completion]:
        if params.logits_processors:
            raise ValueError("the SGLang backend cannot run Python logits processors (use the native engine)")
        if params.temperature not in (0.0, 1.0) and os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in (
                "1", "true"):
            raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would return logprobs before "
                             f"temperature {params.temperature}, which the trainer does not score")
        if not requests:
            return []
        sps, starts = [], []
        for r in requests:
            sp = {"max_new_tokens": int(r.max_new_tokens), "temperature": float(params.temperature),
                  "top_p": float(params.top_p), "top_k": int(params.top_k) if params.top_k else -1,
                  "stop_token_ids": [int(t) for t in r.stop_token_ids], "ignore_eos": bool(params.ignore_eos),
                  "repetition_penalty": float(r.repetition_penalty), "skip_special_tokens": False,
                  "no_stop_trim": True}
            if params.seed is not None and self.per_request_seed:
                sp["sampling_seed"] = int(params.seed) + len(sps)
            sps.append(sp)
            # one token before the forced tail: SGLang pads the first input logprob with None
            starts.append(len(r.ids) - r.score_tail - 1 if r.score_tail else -1)
        outs = self.engine.generate(input_ids=[list(r.ids) for r in requests], sampling_params=sps,
                                    return_logprob=True, logprob_start_len=starts)
        if isinstance(outs, dict):
            outs = [outs]
        return [parse_output(o, r, self.eos_ids) for o, r in zip(outs, requests)]


class SGLangEngine:
    """Rollouts on stock SGLang: ``generate(prompt_ids, params, mode)`` like :class:`engine.NPREngine`.

    ``model_path``: an HF checkpoint directory whose vocabulary already holds the 8 NPR tags as single tokens
    (every stage from stage 2 on saves one). ``tokenizer``: an HF tokenizer with the tags; default: the
    checkpoint's own. ``engine_kwargs`` go to ``sglang.Engine`` (``mem_fraction_static``, ``tp_size``,
    ``dtype``, ``random_seed``, ``enable_memory_saver``, ...). Orchestration keywords (``max_plans``,
    ``max_depth``, ``min_fork_budget``, ``constraints``, ``stop_on_violation``) are those of the native engine.
    """

    def __init__(self, model_path: str | Path, tokenizer=None, *, max_plans: int = 5, max_depth: int = 5,
                 min_fork_budget: int = 32, constraints="strict", stop_on_violation: bool | None = None,
                 **engine_kwargs):
        sgl = import_sglang()
        self.model_path = str(model_path)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        from npr_env.graph import TagVocab

        vocab = TagVocab.of(tokenizer)  # raises, naming the missing tags, if they are not single tokens
        self.tokenizer = tokenizer
        engine_kwargs.setdefault("skip_tokenizer_init", True)
        if not engine_kwargs["skip_tokenizer_init"]:
            raise ValueError("SGLangEngine needs skip_tokenizer_init=True (token ids in and out, never text)")
        self.sgl = sgl.Engine(model_path=self.model_path, **engine_kwargs)
        self.backend = SGLangBackend(self.sgl, vocab.eos_ids)
        self.orchestrator = OrchestratedEngine(self.backend, tokenizer, max_plans=max_plans, max_depth=max_depth,
                                               min_fork_budget=min_fork_budget, constraints=constraints,
                                               stop_on_violation=stop_on_violation)

    @property
    def last_stats(self) -> dict:
        return self.orchestrator.last_stats

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams | None = None,
                 mode: str = "parallel") -> list[Rollout]:
        """``sequential``: plain requests; ``parallel``: fork/join by orchestration (layout ``orchestrated``)."""
        return self.orchestrator.generate(prompt_ids, params, mode=mode)

    def load_weights(self, state_dict: dict[str, torch.Tensor], bucket_bytes: int = 1 << 30) -> None:
        """Push new weights (HF parameter names) through SGLang's ``update_weights_from_tensor``.

        Tensors must be whole (gather FSDP2 shards first: ``npr_agent.distributed.full_state_dict``). A head
        tied to the embedding is sent once. The radix cache is flushed with the last bucket.
        """
        items, seen = [], set()
        for name, t in state_dict.items():
            if hasattr(t, "full_tensor"):
                raise TypeError(f"{name} is a sharded DTensor; gather a full state dict first "
                                "(npr_agent.distributed.full_state_dict)")
            key = (t.data_ptr(), tuple(t.shape))
            if name == "lm_head.weight" and key in seen:
                continue  # tied to the embedding
            seen.add(key)
            items.append((name, t.detach()))
        buckets, cur, size = [], [], 0
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
            cur.append((name, t))
            size += nbytes
        if cur:
            buckets.append(cur)
        for i, bucket in enumerate(buckets):
            res = self.sgl.update_weights_from_tensor(bucket, flush_cache=i == len(buckets) - 1)
            _check_update(res, f"update_weights_from_tensor (bucket {i + 1}/{len(buckets)})")

    def load_weights_from_disk(self, model_path: str | Path) -> None:
        """Reload weights from an HF checkpoint directory (e.g. the one a stage just saved)."""
        res = self.sgl.update_weights_from_disk(str(model_path))
        _check_update(res, f"update_weights_from_disk({model_path})")
        self.sgl.flush_cache()

    def shutdown(self) -> None:
        self.sgl.shutdown()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _has_sampling_field(name: str) -> bool:
    try:
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams
    except ImportError:
        return False
    fields = getattr(SGLangSamplingParams, "__struct_fields__", None)
    if fields is None:
        import inspect

        fields = inspect.signature(SGLangSamplingParams).parameters
    return name in fields


def _check_update(res, what: str) -> None:
    """SGLang answers ``(success, message)`` (or a dict with ``success``); raise on failure."""
    ok, msg = True, ""
    if isinstance(res, tuple) and res:
        ok, msg = bool(res[0]), str(res[1]) if len(res) > 1 else ""
    elif isinstance(res, dict):
        ok, msg = bool(res.get("success", True)), str(res.get("message", ""))
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {msg}")
