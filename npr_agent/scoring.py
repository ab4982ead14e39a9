"""What the trainer scores for a rollout: the rows, their layout, and which row gives each token's logprob.

A rollout decoded by the native engine (parallel or sequential layout) is scored as it was generated: its
serialized sequence under ``graph.layout()``, one row per token. A rollout whose fork/join was *orchestrated*
as separate causal requests on a stock server (``engine.orchestration``, ``rollout.layout == "orchestrated"``)
was generated under two views at once, so it is scored as a packed sequence: the causal serialized sequence,
then one re-encoded copy of each non-first sibling step; each token is scored once, in the view it was
generated under (see :func:`npr_env.layout.orchestrated_view`).

Positions and visibility come from ``npr_env`` only (invariant 1): this module picks rows, it never computes
a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npr_env.graph import ExecutionGraph
from npr_env.layout import Layout, ScoringView, orchestrated_view

__all__ = ["ScoredSample", "ScoringView", "scored_logprobs", "scoring_view", "training_sample"]


@dataclass
class ScoredSample:
    """A rollout in the form ``npr_agent.policy.build_batch`` takes (the fields of ``policy.Sample``).

    Context-only rows are marked in ``forced_mask``, so they never enter a loss that leaves forced tokens out
    (every RL algorithm here by default); ``scored`` says the same thing explicitly.
    """

    prompt_ids: list[int]
    token_ids: list[int]  # rows after the prompt (the serialized response, then the copies)
    layout: Layout
    logprobs: list[float] | None
    forced_mask: list[bool]
    source: np.ndarray  # serialized index of each row (prompt included)
    scored: np.ndarray  # [rows] bool


def scoring_view(graph: ExecutionGraph, layout_kind: str | None = None) -> ScoringView:
    """The rows the trainer scores for ``graph`` under ``layout_kind`` (default: the graph's own kind).

    ``"parallel"`` / ``"sequential"``: the serialized sequence with ``graph.layout()``, one row per token.
    ``"orchestrated"``: the packed rows of :func:`npr_env.layout.orchestrated_view`.
    """
    kind = layout_kind or graph.layout_kind
    if kind != graph.layout_kind:
        raise ValueError(f"the graph was built with layout {graph.layout_kind!r}, not {kind!r}: rebuild it with "
                         f"ExecutionGraph.from_token_ids(..., layout={kind!r})")
    if kind == "orchestrated":
        return orchestrated_view(graph.root)
    n = len(graph.token_ids)
    return ScoringView(np.arange(n, dtype=np.int64), graph.layout(), np.ones(n, dtype=bool))


def training_sample(rollout):
    """What to hand ``build_batch`` for a rollout: the rollout itself, or a :class:`ScoredSample` when it was
    generated under the orchestrated layout. Anything else (a ``policy.Sample``) passes through."""
    if getattr(rollout, "layout", None) != "orchestrated":
        return rollout
    view = scoring_view(rollout.graph, "orchestrated")
    ids = rollout.graph.token_ids
    P = rollout.graph.prompt_len
    if list(ids[:P]) != list(rollout.prompt_ids) or list(ids[P:]) != list(rollout.token_ids):
        raise ValueError("rollout token ids differ from its graph's serialized ids (token in, token out)")
    src = view.source
    rows = [ids[s] for s in src]
    resp = src[P:] - P
    forced = np.asarray(rollout.forced_mask, dtype=bool)[resp] | ~view.scored[P:]
    lps = None if rollout.logprobs is None else [float(rollout.logprobs[i]) for i in resp]
    return ScoredSample(prompt_ids=rows[:P], token_ids=rows[P:], layout=view.layout, logprobs=lps,
                        forced_mask=forced.tolist(), source=src, scored=view.scored)


def scored_logprobs(sample: ScoredSample, row_logprobs) -> np.ndarray:
    """Per response token (serialized order), the logprob of the row that scores it, from ``[rows]`` values
    (e.g. a row of ``token_logprobs`` output, prompt rows included)."""
    row_logprobs = np.asarray(row_logprobs)
    P = len(sample.prompt_ids)
    n = int(sample.source.max()) + 1 - P if len(sample.source) else 0
    out = np.zeros(max(n, 0), dtype=np.float64)
    for r in np.nonzero(sample.scored)[0]:
        s = int(sample.source[r])
        if s >= P:
            out[s - P] = row_logprobs[r]
    return out
