"""Rollout: what the engine returns for one sample, token in and token out."""

from __future__ import annotations

from dataclasses import dataclass

from npr_env.graph import ExecutionGraph

FINISH_REASONS = ("eos", "stop", "length", "violation", "aborted")


@dataclass
class Rollout:
    """One generated sample.

    ``token_ids`` is the response in serialized order (the parent up to a fork, then child 1, child 2, ...,
    then the parent from ``<takeaway>``); ``logprobs`` and ``forced_mask`` are aligned with it by
    construction (they are the per-token metadata the engine stored in ``graph``). ``graph`` is the
    ``npr_env`` execution graph over prompt + response, so ``graph.layout()`` gives the exact positions and
    visibility the engine decoded with.

    ``finish_reason``: ``eos``, ``stop`` (a stop token), ``length`` (budget), ``violation`` (stopped on a
    format violation), ``aborted`` (a request the KV pool cannot hold even alone; requests preempted under pressure are
    recomputed, not aborted).
    ``truncated`` is True unless the sample ended on EOS or a stop token.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    forced_mask: list[bool]
    graph: ExecutionGraph
    layout: str
    finish_reason: str
    truncated: bool
    wall_s: float = 0.0
    decode_steps: int = 0
    num_tokens: int = 0
    num_forks: int = 0
    peak_kv_blocks: int = 0
    prompt_index: int = 0
    sample_index: int = 0

    @property
    def stats(self) -> dict:
        s = self.graph.stats
        return {"wall_s": self.wall_s, "decode_steps": self.decode_steps, "num_tokens": self.num_tokens,
                "num_forks": self.num_forks, "peak_kv_blocks": self.peak_kv_blocks,
                "critical_path_tokens": s.critical_path_tokens, "ideal_speedup": s.ideal_speedup,
                "finish_reason": self.finish_reason, "truncated": self.truncated}

    @property
    def text(self) -> str:
        return self.graph.response_text()


def generate_inputs(prompt_ids, params, mode: str, vocab_rows: int | None = None):
    """What every ``generate`` checks first: the mode, and prompts as non-empty lists of ints (within the
    model's ``vocab_rows`` when known). Returns ``(params, prompts)``, ``params`` defaulted."""
    from .sampling import SamplingParams

    params = params or SamplingParams()
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: the first token needs a prompt to be predicted from")
        if vocab_rows is not None:
            bad = [t for t in p if not 0 <= t < vocab_rows]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the model's vocabulary: {bad[:5]}")
    return params, prompts


def stops_on_violation(setting: bool | None, mode: str, constraints) -> bool:
    """``stop_on_violation`` None means: on in parallel mode with strict constraints."""
    return mode == "parallel" and constraints.name == "strict" if setting is None else bool(setting)
