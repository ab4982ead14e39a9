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

Weights: :meth:`SGLangEngine.load_weights` pushes a state dict, or an iterable of buckets of one
(``npr_agent.distributed.Dist.iter_state_dict_buckets`` gathers FSDP2 shards one bucket at a time), through
``update_weights_from_tensor``, bucket by bucket; the radix cache is flushed once after the last one (cached KV
of the old weights must not be reused). :meth:`SGLangEngine.load_weights_from_disk` reloads an HF checkpoint
directory.

Memory saver: ``SGLangEngine(..., memory_saver=True)`` starts SGLang with ``enable_memory_saver=True`` (it needs
the ``torch_memory_saver`` package that ``sglang[all]`` installs); :meth:`SGLangEngine.release_memory` then calls
``release_memory_occupation(tags=["kv_cache"])`` (the KV pool's physical memory is unmapped, and its cache
flushed; the weights stay) and :meth:`SGLangEngine.resume_memory` ``resume_memory_occupation(tags=["kv_cache"])``.
The trainer does it around every policy update (``engine.memory_saver``).

Install: ``pip install ".[sglang]"`` on a CUDA machine (SGLang pins a CUDA build of torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from ..orchestration import Completion, CompletionRequest, OrchestratedEngine
from ..rollout import Rollout
from ..sampling import SamplingParams

INSTALL_HINT = "pip install '.[sglang]' on a CUDA machine (SGLang pins a CUDA build of torch)"
KV_CACHE = "kv_cache"  # sglang.srt.constants.GPU_MEMORY_TYPE_KV_CACHE ("weights", "cuda_graph" are the others)

K = TypeVar("K", bound=Hashable)


def plan_buckets(sizes: Iterable[tuple[K, int]], bucket_bytes: int) -> list[list[K]]:
    """Split ``(key, nbytes)`` pairs, in order, into consecutive buckets of at most ``bucket_bytes`` bytes; an
    item larger than the bound is a bucket of its own. Every key lands in exactly one bucket."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[K]] = []
    cur: list[K] = []
    size = 0
    for key, nbytes in sizes:
        if cur and size + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


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
    ``dtype``, ``random_seed``, ...). ``memory_saver``: start it with ``enable_memory_saver=True``, so that
    :meth:`release_memory` / :meth:`resume_memory` can free and restore its KV pool. Orchestration keywords
    (``max_plans``, ``max_depth``, ``min_fork_budget``, ``constraints``, ``stop_on_violation``) are those of the
    native engine.
    """

    def __init__(self, model_path: str | Path, tokenizer=None, *, max_plans: int = 5, max_depth: int = 5,
                 min_fork_budget: int = 32, constraints="strict", stop_on_violation: bool | None = None,
                 memory_saver: bool = False, **engine_kwargs):
        engine_kwargs = sglang_engine_kwargs(memory_saver=memory_saver, **engine_kwargs)
        self.memory_saver = bool(engine_kwargs.get("enable_memory_saver", False))
        self.weight_dtype = weight_dtype(engine_kwargs.get("dtype"))  # what load_weights should send (None: as is)
        self.released_tags: tuple[str, ...] = ()
        sgl = import_sglang()
        self.model_path = str(model_path)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        from npr_env.graph import TagVocab

        vocab = TagVocab.of(tokenizer)  # raises, naming the missing tags, if they are not single tokens
        self.tokenizer = tokenizer
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

    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
                     bucket_bytes: int = 1 << 30) -> int:
        """Push new weights (HF parameter names) through SGLang's ``update_weights_from_tensor``; returns the
        number of buckets sent.

        ``weights``: a whole state dict (split here into buckets of ``bucket_bytes``), or an iterable of
        buckets, each a dict sent as it comes (``Dist.iter_state_dict_buckets``: under FSDP2 a rank then holds
        one gathered bucket at a time). Tensors must be whole, not DTensor shards. A head tied to the embedding
        (the same tensor under ``lm_head.weight`` in the same dict) is sent once. The radix cache is flushed once,
        after the last bucket.
        """
        if isinstance(weights, Mapping):
            items = _named_tensors(weights)
            sizes = [(i, t.numel() * t.element_size()) for i, (_, t) in enumerate(items)]
            buckets: Iterable[list] = ([items[i] for i in plan] for plan in plan_buckets(sizes, bucket_bytes))
        else:
            buckets = (_named_tensors(b) for b in weights)
        n = 0
        for bucket in buckets:
            if not bucket:
                continue
            n += 1
            res = self.sgl.update_weights_from_tensor(bucket, flush_cache=False)
            _check_update(res, f"update_weights_from_tensor (bucket {n})")
        _check_update(self.sgl.flush_cache(), "flush_cache after the weight update")
        return n

    # -- memory saver ------------------------------------------------------------------------------------------
    def release_memory(self, tags: Sequence[str] = (KV_CACHE,)) -> None:
        """Free SGLang's GPU memory of ``tags`` (default: the KV cache; the weights stay) until
        :meth:`resume_memory`: ``sglang.Engine.release_memory_occupation(tags=...)``, which also flushes the radix
        cache. Only between generate calls (SGLang asserts it is idle); needs ``memory_saver=True``."""
        if not self.memory_saver:
            raise RuntimeError("SGLangEngine.release_memory needs the engine started with memory_saver=True "
                               "(sglang.Engine(enable_memory_saver=True))")
        if self.released_tags:
            return
        fn = self.sgl.release_memory_occupation
        if "tags" not in inspect.signature(fn).parameters:
            raise RuntimeError("this SGLang's release_memory_occupation() takes no tags: it would release the "
                               "weights too; upgrade SGLang or turn the memory saver off")
        _check_update(fn(tags=list(tags)), f"release_memory_occupation(tags={list(tags)})")
        self.released_tags = tuple(tags)

    def resume_memory(self) -> None:
        """Restore what :meth:`release_memory` freed (``resume_memory_occupation`` with the same tags)."""
        if not self.released_tags:
            return
        tags, self.released_tags = list(self.released_tags), ()
        _check_update(self.sgl.resume_memory_occupation(tags=tags), f"resume_memory_occupation(tags={tags})")

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


def sglang_engine_kwargs(memory_saver: bool = False, **engine_kwargs) -> dict:
    """The keyword arguments :class:`SGLangEngine` gives ``sglang.Engine`` (checked without SGLang)."""
    kw = dict(engine_kwargs)
    kw.setdefault("skip_tokenizer_init", True)
    if not kw["skip_tokenizer_init"]:
        raise ValueError("SGLangEngine needs skip_tokenizer_init=True (token ids in and out, never text)")
    if memory_saver:
        if kw.get("enable_memory_saver") is False:
            raise ValueError("memory_saver=True contradicts enable_memory_saver=False")
        kw["enable_memory_saver"] = True
    return kw


def weight_dtype(dtype) -> torch.dtype | None:
    """The torch dtype SGLang serves in for its ``dtype`` argument (None for "auto" or unset: send as is)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32}
    return names.get(str(dtype).lower())


def _named_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs to send; whole tensors only; a tied head (the same storage) is dropped."""
    items, seen = [], set()
    for name, t in state_dict.items():
        if hasattr(t, "full_tensor"):
            raise TypeError(f"{name} is a sharded DTensor; send whole tensors "
                            "(npr_agent.distributed.Dist.iter_state_dict_buckets gathers them)")
        key = (t.data_ptr(), tuple(t.shape))
        if name == "lm_head.weight" and key in seen:
            continue  # tied to the embedding
        seen.add(key)
        items.append((name, t.detach()))
    return items


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
    elif hasattr(res, "success"):  # an io_struct output (FlushCacheReqOutput, ...)
        ok, msg = bool(res.success), str(getattr(res, "message", ""))
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {msg}")
