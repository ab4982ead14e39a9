"""Verdicts: the violations of an execution graph under its constraint set, cached per graph version.

The cursor flags what it sees while it parses (:class:`Flag`: a constraint, the trace and local index where it
was seen, a detail); :func:`violations` adds the checks that need the whole sequence (:func:`end_checks`), keeps
the flags whose constraint the graph's :class:`~npr_env.constraints.ConstraintSet` counts, maps each to its
serialized index and runs the user's whole-graph checks. In the sequential layout a graph that spells its tags
is judged on its canonical form (invariant 8), with the indices mapped back to its own tokens.

Every token sequence gives a deterministic verdict and nothing here raises on model output (invariant 6).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from . import constraints as C
from .constraints import (
    MISSING_ANSWER,
    MISSING_TAKEAWAY,
    NO_BLOCK,
    NO_PARALLEL_BLOCK,
    PLAN_STEP_COUNT_MISMATCH,
    SPELLED_TAG,
    UNCLOSED_TAG,
)
from .schema import last_boxed
from .trace import (
    KIND_EOS,
    M_GUIDELINE,
    M_PLAN,
    M_POST_STEPS,
    M_STEP_DONE,
    M_STEPS,
    M_TAKEAWAY,
    M_TEXT,
    Trace,
)

if TYPE_CHECKING:
    from .graph import ExecutionGraph

_OPEN_NAMES = {M_GUIDELINE: "guideline", M_PLAN: "plan", M_TAKEAWAY: "takeaway"}


class Flag(NamedTuple):
    """A possible violation seen by the parser: ``local`` is the trace's local index, -1 for the sequence's end."""

    constraint: C.Constraint
    trace: Trace
    local: int
    detail: str = ""


def violations(graph: ExecutionGraph, at_end: bool) -> list[C.Violation]:
    """The graph's violations; ``at_end=False`` leaves out the checks that need the end of the sequence."""
    return list(graph.cached("violations", (graph.version, at_end), lambda: _compute(graph, at_end)))


def _compute(graph: ExecutionGraph, at_end: bool) -> list[C.Violation]:
    if graph.text_decides():
        canon = graph.canonical(partial=not at_end)
        return [v if v.index < 0 else replace(v, index=index_from_canonical(graph, canon, v.index))
                for v in violations(canon, at_end)]
    return own_violations(graph, at_end)


def own_violations(graph: ExecutionGraph, at_end: bool) -> list[C.Violation]:
    """The violations of the graph's own tokens (no canonical re-reading)."""
    cs = graph.constraints
    found = list(graph.flags)
    if at_end:
        found += end_checks(graph)
    if graph.layout_kind != "sequential" and not graph.is_canonical and graph.spelled_tags > 0:
        found.append(Flag(SPELLED_TAG, graph.root, -1, f"{graph.spelled_tags} tag(s) spelled in text pieces"))
    out, seen = [], set()
    for f in found:
        c = cs.get(f.constraint)
        if c is None:  # a built-in constraint this set leaves out
            continue
        idx = -1 if f.local < 0 else graph.serial_index(f.trace, min(f.local, len(f.trace.ids)))
        key = (c.code, idx)
        if key in seen:
            continue
        seen.add(key)
        out.append(C.Violation(c.code, c.message + (f" ({f.detail})" if f.detail else ""), idx, c.penalty, c.hard))
    for c in cs.custom() if at_end else ():  # user checks judge whole sequences, not prefixes
        try:
            bad = bool(c.check(graph))
        except Exception as e:  # a user check must not turn a verdict into a crash
            bad, c = True, C.Constraint(c.code, f"{c.message} (check raised {type(e).__name__}: {e})",
                                        c.penalty, c.hard)
        if bad:
            out.append(C.Violation(c.code, c.message, -1, c.penalty, c.hard))
    return out


def end_checks(graph: ExecutionGraph) -> list[Flag]:
    """What is wrong once the sequence ended: open segments, missing blocks, no answer after the last block."""
    found = []
    for t in graph.traces:
        if t.mode in _OPEN_NAMES:
            found.append(Flag(UNCLOSED_TAG, t, -1, f"{_OPEN_NAMES[t.mode]} never closed"))
        elif t.mode in (M_STEPS, M_POST_STEPS):
            found.append(Flag(MISSING_TAKEAWAY, t, -1, "the sequence ends before the takeaway"))
            b = t.open_block
            if t.mode == M_STEPS and b.plans and len(b.children) != len(b.plans):
                found.append(Flag(PLAN_STEP_COUNT_MISMATCH, t, -1, f"{len(b.plans)} plans, {len(b.children)} steps"))
        if t.is_step and t.mode != M_STEP_DONE:
            found.append(Flag(UNCLOSED_TAG, t, -1, "step never closed"))
    if not graph.blocks:
        found.append(Flag(NO_BLOCK, graph.root, -1))
    elif not any(len(b.children) >= 2 for b in graph.blocks):
        found.append(Flag(NO_PARALLEL_BLOCK, graph.root, -1))
    r = graph.root
    if r.mode != M_TEXT or not (last_boxed(graph.vocab.decode(root_tail(r))) or "").strip():
        found.append(Flag(MISSING_ANSWER, r, -1))
    return found


def root_tail(r: Trace) -> list[int]:
    """The root's ids after the last block (where the answer is), without the EOS token."""
    return [i for i, k in zip(r.ids[r.final_start:], r.kinds[r.final_start:]) if k != KIND_EOS]


def index_from_canonical(graph: ExecutionGraph, canon: ExecutionGraph, index: int) -> int:
    """The serialized index in ``graph`` of the token at ``index`` in ``canon`` (matched by characters)."""
    if index < graph.prompt_len:
        return index
    ids = canon.response_ids
    k = index - graph.prompt_len
    char = len(canon.vocab.decode(ids[:k]))
    own = graph.response_ids
    seen = 0
    for j, t in enumerate(own):
        seen += len(graph.vocab.decode([t]))
        if seen > char:
            return graph.prompt_len + j
    return graph.prompt_len + max(0, len(own) - 1)
