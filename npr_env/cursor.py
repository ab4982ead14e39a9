"""Cursor: appends tokens to one branch of an execution graph, running the NPR state machine.

The machine has one mode per trace (``npr_env.trace.M_*``) and one small transition per mode
(:meth:`Cursor._feed` dispatches on the mode). A cursor changes the graph only through the graph's building
API (``new_trace``, ``open_block``, ``push``, ``flag``, ``changed``, ``finish``); the records it fills in
(traces, blocks, segments) are the plain ones of :mod:`npr_env.trace`.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from .constraints import (
    DEPTH_EXCEEDED,
    EMPTY_PLAN,
    EMPTY_STEP,
    EMPTY_TAKEAWAY,
    MISPLACED_TAG,
    MISSING_TAKEAWAY,
    NESTED_STEP,
    NO_PLANS,
    PLAN_STEP_COUNT_MISMATCH,
    STEP_NUMBER_MISMATCH,
    STEP_OUTSIDE_BLOCK,
    STRAY_CLOSING_TAG,
    TEXT_AFTER_EOS,
    TEXT_BETWEEN_TAGS,
    TOO_MANY_PLANS,
    UNCLOSED_TAG,
    UNNUMBERED_PLAN,
    Constraint,
)
from .schema import (
    CLOSE_TAGS,
    GUIDELINE_CLOSE,
    GUIDELINE_OPEN,
    MIN_PLAN_CHARS,
    MIN_STEP_CHARS,
    PLAN_CLOSE,
    PLAN_OPEN,
    STEP_CLOSE,
    STEP_OPEN,
    TAKEAWAY_CLOSE,
    TAKEAWAY_OPEN,
    plan_number,
)
from .trace import (
    KIND_EOS,
    KIND_GUIDELINE,
    KIND_PLAN,
    KIND_STEP,
    KIND_TAKEAWAY,
    KIND_TEXT,
    M_GUIDELINE,
    M_PLAN,
    M_POST_STEPS,
    M_STEP_DONE,
    M_STEP_OPEN,
    M_STEPS,
    M_TAKEAWAY,
    M_TEXT,
    Block,
    Segment,
    Trace,
)

if TYPE_CHECKING:
    from .graph import ExecutionGraph


class Event(Enum):
    """What appending a token did, for the caller that drives branches (the engine, the env)."""

    CONTINUE = 0
    FORK = 1  # a guideline closed with 1..max_plans plans: call cursor.fork() or cursor.decline_fork()
    STEP_DONE = 2  # this branch closed its </step>: it is finished
    EOS = 3  # end of sequence


def _unexpected(tag: str) -> Constraint:
    """A tag inside a segment that is still open: a closing tag closes nothing, an opening one opens too early."""
    return STRAY_CLOSING_TAG if tag in CLOSE_TAGS else UNCLOSED_TAG


class Cursor:
    """Appends tokens to one branch of a graph, running the NPR state machine.

    The serial parser (``from_token_ids``) uses one cursor for the whole sequence: it routes the tokens of
    each ``<step>`` into a child trace itself. The engine and the token-level env hold one cursor per live
    branch: with ``auto_fork=False`` a closing ``</guideline>`` returns ``Event.FORK`` and the caller either
    forks (``fork()``: one child cursor per plan, decoded side by side) or declines (``decline_fork()``: the
    steps then follow each other in this branch, with a sequential layout).
    """

    def __init__(self, graph: ExecutionGraph, trace: Trace, auto_fork: bool = True):
        self.graph, self.trace, self.auto_fork = graph, trace, auto_fork
        self.home = trace  # the trace this cursor was created for; it never climbs above it

    @property
    def next_position(self) -> int:
        """Position id of the next token this branch will append (from the layout rule)."""
        return self.trace.next_pos

    @property
    def depth(self) -> int:
        return self.trace.depth

    @property
    def in_open_step(self) -> bool:
        """True while this branch is inside a ``<step>`` that has not closed yet."""
        t = self.trace
        return t.is_step and t.mode != M_STEP_DONE

    def pending_block(self) -> Block | None:
        t = self.trace
        return t.open_block if t.mode == M_STEPS else None

    # -- driving a fork by hand (engine, env) ------------------------------------------------------------
    def fork(self, numbers: list[str] | None = None) -> list[Cursor]:
        """Open one child branch per plan of the guideline that just closed; children share its position."""
        t = self.trace
        b = t.open_block
        if t.mode != M_STEPS or b is None or b.children:
            raise RuntimeError("fork() is only valid right after append() returned Event.FORK")
        b.routed, b.parallel = False, True
        b.offset, b.fork_pos = len(t.ids), t.next_pos
        g = self.graph
        for i in range(len(b.plans)):
            b.children.append(g.new_trace(b, i, b.depth, b.fork_pos))
        g.changed()
        return [Cursor(g, c, self.auto_fork) for c in b.children]

    def decline_fork(self) -> None:
        """Keep decoding this branch; the block's steps follow each other (sequential layout)."""
        b = self.trace.open_block
        if self.trace.mode == M_STEPS and b is not None:
            b.routed, b.parallel = True, False

    def join(self) -> None:
        """Close the forked block once every child finished; the parent continues after the longest step."""
        t = self.trace
        if t.mode != M_STEPS or t.open_block is None:
            raise RuntimeError("join() is only valid on a cursor whose block was forked")
        self._join(t)

    def step_numbers(self) -> list[str]:
        """The numbers to force after ``<step>`` in each child: the plans' own numbers, else 1..n."""
        b = self.trace.open_block
        return [p.number or str(i + 1) for i, p in enumerate(b.plans)] if b else []

    # -- appending: routing, then the state machine -------------------------------------------------------
    def append(self, tid: int, meta=None) -> Event:
        tid = int(tid)
        g = self.graph
        if g.finished:
            g.flag(TEXT_AFTER_EOS, g.root)
            g.push(g.root, tid, KIND_TEXT, meta)
            return Event.EOS
        t = self._leave_finished_steps(tid)
        if t.mode == M_STEPS and t.open_block.routed:
            event = self._route(t, tid, meta)
            if event is not None:
                return event
        return self._feed(self.trace, tid, meta)

    def _leave_finished_steps(self, tid: int) -> Trace:
        """Serial routing: a finished step is left on a tag (or EOS) for its parent. Whitespace after a
        ``</step>`` stays in that step, and so does other text (``TEXT_BETWEEN_TAGS``, soft): ``</step>x<step>``
        is one word too many between two steps, not a broken block; the step's siblings never see it."""
        v = self.graph.vocab
        t = self.trace
        if v.is_tag(tid) or v.is_eos(tid):
            while t is not self.home and t.mode == M_STEP_DONE and t.parent.routed:
                t = self.trace = t.parent.parent
        return t

    def _route(self, t: Trace, tid: int, meta) -> Event | None:
        """A token after the ``</guideline>`` of a block whose steps come through this cursor: a ``<step>``
        opens the next child, text before the first step stays with the guideline, anything else joins the
        block. Returns the event, or None when the token goes on to the state machine (after the join)."""
        g, v = self.graph, self.graph.vocab
        b = t.open_block
        if v.tag_of.get(tid) == STEP_OPEN:
            child = self.trace = self._add_child(t, b)
            return self._feed(child, tid, meta)
        if not b.children and not v.is_tag(tid):
            if v.is_ws(tid):  # whitespace after </guideline> belongs to the guideline
                g.push(t, tid, KIND_GUIDELINE, meta)
                return Event.CONTINUE
            if not v.is_eos(tid):
                g.flag(TEXT_BETWEEN_TAGS, t, "between </guideline> and the first <step>")
                g.push(t, tid, KIND_GUIDELINE, meta)
                return Event.CONTINUE
        self._join(t)
        return None

    def _add_child(self, t: Trace, b: Block) -> Trace:
        g = self.graph
        if not b.children:
            b.offset, b.fork_pos = len(t.ids), t.next_pos
        start = b.fork_pos if b.parallel else (b.children[-1].next_pos if b.children else t.next_pos)
        child = g.new_trace(b, len(b.children), b.depth, start)
        b.children.append(child)
        if b.plans and len(b.children) == len(b.plans) + 1:
            g.flag(PLAN_STEP_COUNT_MISMATCH, child, f"more steps than the {len(b.plans)} plans")
        return child

    def _join(self, t: Trace) -> None:
        b = t.open_block
        if b.offset < 0:
            b.offset = len(t.ids)
        if b.children:
            t.next_pos = max(c.next_pos for c in b.children)
        if b.plans and len(b.children) < len(b.plans):
            self.graph.flag(PLAN_STEP_COUNT_MISMATCH, t, f"{len(b.plans)} plans, {len(b.children)} steps")
        b.joined = True
        t.mode = M_POST_STEPS
        self.trace = t
        self.graph.changed()

    def _feed(self, t: Trace, tid: int, meta) -> Event:
        """One token into trace ``t``: an EOS ends the sequence, anything else is the transition of ``t``'s mode."""
        v = self.graph.vocab
        tag = v.tag_of.get(tid)
        if tag is None and v.is_eos(tid):
            self.graph.push(t, tid, KIND_EOS, meta)
            self.graph.finish()
            return Event.EOS
        return _TRANSITIONS[t.mode](self, t, tid, tag, meta)

    # -- one transition per mode: (trace, token id, its tag or None, meta) -> Event -------------------------
    def _in_text(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        """Free text (the root's main line, or a step's body): a guideline opens a block, ``</step>`` ends a step."""
        g = self.graph
        body_kind = KIND_STEP if t.is_step else KIND_TEXT
        if tag is None:
            g.push(t, tid, body_kind, meta)
        elif tag == GUIDELINE_OPEN:
            b = g.open_block(t)
            if b.depth > g.constraints.max_depth:
                g.flag(DEPTH_EXCEEDED, t, f"depth {b.depth} > {g.constraints.max_depth}")
            t.mode = M_GUIDELINE
            g.push(t, tid, KIND_GUIDELINE, meta)
        elif tag == STEP_CLOSE and t.is_step:
            self._close_step(t)
            g.push(t, tid, KIND_STEP, meta)
            t.mode = M_STEP_DONE
            return Event.STEP_DONE
        else:
            if tag == STEP_OPEN:
                g.flag(NESTED_STEP if t.is_step else STEP_OUTSIDE_BLOCK, t)
            elif tag in CLOSE_TAGS:
                g.flag(STRAY_CLOSING_TAG, t, tag)
            else:
                g.flag(MISPLACED_TAG, t, tag)
            g.push(t, tid, body_kind, meta)
        return Event.CONTINUE

    def _in_guideline(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        """Inside ``<guideline>``, between plans: a plan opens, or the guideline closes."""
        g = self.graph
        b = t.open_block
        if tag == PLAN_OPEN:
            b.plans.append(Segment(start=len(t.ids) + 1))
            t.mode = M_PLAN
            g.push(t, tid, KIND_PLAN, meta)
            return Event.CONTINUE
        if tag == GUIDELINE_CLOSE:
            g.push(t, tid, KIND_GUIDELINE, meta)
            return self._close_guideline(t, b)
        if tag is None:
            if not g.vocab.is_ws(tid):
                g.flag(TEXT_BETWEEN_TAGS, t, "inside <guideline>, outside a plan")
        else:
            g.flag(_unexpected(tag), t, tag)
        g.push(t, tid, KIND_GUIDELINE, meta)
        return Event.CONTINUE

    def _in_plan(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        if tag == PLAN_CLOSE:
            p = t.open_block.plans[-1]
            p.end = len(t.ids)
            self._check_content(t, p, EMPTY_PLAN, MIN_PLAN_CHARS, numbered=UNNUMBERED_PLAN)
            t.mode = M_GUIDELINE
        elif tag is not None:
            self.graph.flag(_unexpected(tag), t, tag)
        self.graph.push(t, tid, KIND_PLAN, meta)
        return Event.CONTINUE

    def _in_steps(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        """A forked block whose parent received a token before ``join()``: treat it as the join."""
        self._join(t)
        return self._feed(t, tid, meta)

    def _after_steps(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        """After the join: the takeaway opens, or the block ends without one."""
        if tag == TAKEAWAY_OPEN:
            t.open_block.takeaway = Segment(start=len(t.ids) + 1)
            t.mode = M_TAKEAWAY
            self.graph.push(t, tid, KIND_TAKEAWAY, meta)
            return Event.CONTINUE
        self.graph.flag(MISSING_TAKEAWAY, t)
        self._close_block(t)
        return self._feed(t, tid, meta)

    def _in_takeaway(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        g = self.graph
        if tag == TAKEAWAY_CLOSE:
            seg = t.open_block.takeaway
            seg.end = len(t.ids)
            self._check_content(t, seg, EMPTY_TAKEAWAY, MIN_STEP_CHARS)
            g.push(t, tid, KIND_TAKEAWAY, meta)
            self._close_block(t)
        else:
            if tag is not None:
                g.flag(_unexpected(tag), t, tag)
            g.push(t, tid, KIND_TAKEAWAY, meta)
        return Event.CONTINUE

    def _at_step_open(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        """The first token of a step: ``<step>``; anything else is flagged and read as the step's body."""
        if tag != STEP_OPEN:
            self.graph.flag(MISPLACED_TAG, t, "a step must start with <step>")
        t.segment = Segment(start=len(t.ids) + (1 if tag == STEP_OPEN else 0))
        t.mode = M_TEXT
        if tag != STEP_OPEN:
            return self._feed(t, tid, meta)
        self.graph.push(t, tid, KIND_STEP, meta)
        return Event.CONTINUE

    def _after_step(self, t: Trace, tid: int, tag: str | None, meta) -> Event:
        """After ``</step>``: whitespace, or text that stays with the step (flagged once per run of text)."""
        g, v = self.graph, self.graph.vocab
        if not (tag is None and v.is_ws(tid)):
            prev = t.ids[-1] if t.ids else None
            if prev is None or v.is_tag(prev) or v.is_ws(prev):
                g.flag(TEXT_BETWEEN_TAGS, t, "after </step>")
        g.push(t, tid, KIND_STEP, meta)
        return Event.CONTINUE

    # -- closing segments ---------------------------------------------------------------------------------
    def _close_guideline(self, t: Trace, b: Block) -> Event:
        g = self.graph
        cs = g.constraints
        n = len(b.plans)
        if n == 0:
            g.flag(NO_PLANS, t)
        elif n > cs.max_plans:
            g.flag(TOO_MANY_PLANS, t, f"{n} > {cs.max_plans}")
        b.forkable = 1 <= n <= cs.max_plans and b.depth <= cs.max_depth
        t.mode = M_STEPS
        b.parallel = b.forkable and g.layout_kind != "sequential"
        b.routed = True
        if b.forkable and not self.auto_fork:
            return Event.FORK
        return Event.CONTINUE

    def _close_block(self, t: Trace) -> None:
        t.open_block.closed = True
        t.open_block = None
        t.mode = M_TEXT
        if not t.is_step:
            t.final_start = len(t.ids)

    def _close_step(self, t: Trace) -> None:
        seg = t.segment or Segment(start=0)
        seg.end = len(t.ids)
        self._check_content(t, seg, EMPTY_STEP, MIN_STEP_CHARS)
        b = t.parent
        if b.plans and t.index < len(b.plans):
            want = b.plans[t.index].number or str(t.index + 1)
            if seg.number != want:
                self.graph.flag(STEP_NUMBER_MISMATCH, t, f"step {t.index + 1} is numbered {seg.number!r}, "
                                f"plan {t.index + 1} is {want!r}")

    def _check_content(self, t: Trace, seg: Segment, empty: Constraint, min_chars: int,
                       numbered: Constraint | None = None) -> None:
        v = self.graph.vocab
        ids = t.ids[seg.start:seg.end]
        text = v.decode(ids)
        seg.text = text
        seg.number = plan_number(text)
        # Length is counted on what the tokens say, not on how the tokenizer prints them: an unknown or
        # unrepresentable token (``<unk>``, an id outside the vocabulary) is one character, not five.
        measured = v.measure_text(ids) if v.has_unknown(ids) else text
        body = measured.split(":", 1)[1] if plan_number(measured) is not None else measured
        if seg.number is None and numbered:
            self.graph.flag(numbered, t)
        n = len(body.strip())
        if n < min_chars:
            self.graph.flag(empty, t, f"{n} < {min_chars} characters")


_TRANSITIONS = {
    M_TEXT: Cursor._in_text,
    M_GUIDELINE: Cursor._in_guideline,
    M_PLAN: Cursor._in_plan,
    M_STEPS: Cursor._in_steps,
    M_POST_STEPS: Cursor._after_steps,
    M_TAKEAWAY: Cursor._in_takeaway,
    M_STEP_OPEN: Cursor._at_step_open,
    M_STEP_DONE: Cursor._after_step,
}
