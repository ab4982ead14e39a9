"""ExecutionGraph: an NPR trajectory as a graph of traces and blocks, built token by token.

Structure. A *trace* is a run of tokens decoded by one branch: the root trace holds the prompt and the main
line of the response, and each ``<step>`` of a block is a child trace. A *block* is one map/reduce round:
its ``<guideline>`` and ``<takeaway>`` sit in the parent trace, its steps are the children. Steps may hold
blocks of their own (nesting), up to ``max_depth``.

Serialized order (what ``token_ids`` returns and what the trainer scores) is the parent's tokens up to the
fork, then child 1, child 2, ..., then the parent again from ``<takeaway>``.

Layout (computed in one place, :mod:`npr_env.layout`; the engine, the env and the trainer all use it):

* positions: a token gets ``trace.next_pos`` when it is appended. Every step of a *parallel* block starts at
  the position right after the guideline segment; after the join the parent continues at
  ``max(end position of each step)``. Steps of a *sequential* block follow each other.
* visibility: a token sees every earlier token in serialized order, except the earlier sibling steps of
  each parallel block it lies in. The compact form stores, per token, one hidden interval ``[lo, hi)`` of
  serialized indices per nesting level: ``visible(q, k) = k <= q and not any(lo[q, d] <= k < hi[q, d])``.
* whitespace between tags belongs to the segment before it: whitespace after ``</guideline>`` is part of the
  guideline (steps start after it), whitespace after ``</step>`` is part of that step (its siblings never
  see it). So is stray text, which is also flagged ``TEXT_BETWEEN_TAGS`` (soft): ``</step>x<step>`` keeps
  ``x`` in the first step and the block is still recognised.

Layout kinds: ``"parallel"`` (the rule above, what the native engine decodes with), ``"sequential"`` (plain
causal, blocks decoded one step after another) and ``"orchestrated"`` (what a stock causal server produces
when fork/join is orchestrated as separate requests: see ``npr_agent.scoring.scoring_view``).

Verdicts. The parser never raises on model output: every token sequence gives the same violations twice.
In the sequential layout the verdict is the *text's*: a response that spells its tags in ordinary pieces
(what a real model writes before stage 2 teaches it the tag tokens) is judged on its :meth:`canonical` form,
the same text re-tokenised, so tokenisation never changes a verdict. The parallel layout needs every tag as
its single token (tags drive forks and positions): a spelled tag there is the hard violation ``SPELLED_TAG``.


Modules. The graph is split by concept; this module keeps :class:`ExecutionGraph` and :class:`GraphStats` and
re-exports the rest, so ``from npr_env.graph import Event, ExecutionGraph, TagVocab, Cursor, ScoringView`` works:

* :mod:`npr_env.trace`: token kinds, parser modes, ``Trace``, ``Block``, ``Segment``;
* :mod:`npr_env.vocab`: ``TagVocab`` (a tokenizer seen token by token, cached per tokenizer);
* :mod:`npr_env.cursor`: ``Cursor`` (the NPR state machine) and ``Event``;
* :mod:`npr_env.layout`: serialized order, positions and visibility (``serialize``, ``orchestrated_view``);
* :mod:`npr_env.verdicts`: violations and their cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import constraints as C
from . import verdicts
from .cursor import Cursor, Event
from .layout import Layout, ScoringView, Serialized, serialize
from .schema import TAGS
from .trace import (
    KIND_EOS,
    KIND_GUIDELINE,
    KIND_NAMES,
    KIND_PLAN,
    KIND_PROMPT,
    KIND_STEP,
    KIND_TAKEAWAY,
    KIND_TEXT,
    Block,
    Segment,
    Trace,
    subtree_len,
)
from .verdicts import Flag
from .vocab import TagVocab

__all__ = [
    "KIND_EOS", "KIND_GUIDELINE", "KIND_NAMES", "KIND_PLAN", "KIND_PROMPT", "KIND_STEP", "KIND_TAKEAWAY", "KIND_TEXT",
    "LAYOUT_KINDS", "Block", "Cursor", "Event", "ExecutionGraph", "GraphStats", "ScoringView", "Segment",
    "Serialized", "TagVocab", "Trace",
]

LAYOUT_KINDS = ("parallel", "sequential", "orchestrated")


@dataclass
class GraphStats:
    num_blocks: int
    branches_per_block: list[int]
    total_tokens: int
    critical_path_tokens: int
    num_parallel_blocks: int

    @property
    def ideal_speedup(self) -> float:
        return self.total_tokens / max(1, self.critical_path_tokens)

    @property
    def is_parallel(self) -> bool:
        return self.num_parallel_blocks > 0

    @property
    def branches_mean(self) -> float:
        return float(np.mean(self.branches_per_block)) if self.branches_per_block else 0.0

    def as_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "branches_per_block": list(self.branches_per_block),
                "total_tokens": self.total_tokens, "critical_path_tokens": self.critical_path_tokens,
                "num_parallel_blocks": self.num_parallel_blocks, "ideal_speedup": self.ideal_speedup,
                "is_parallel": self.is_parallel}


class ExecutionGraph:
    """An NPR trajectory (prompt + response) as traces and blocks; see the module docstring.

    Build it from ids (``from_token_ids``), from text (``from_text`` / ``npr_env.parse``), or token by token
    through a :class:`Cursor` (``graph.cursor()``), which is what the engine and the env do.
    """

    def __init__(self, tokenizer, prompt_ids=(), constraints: str | C.ConstraintSet | None = "strict",
                 layout: str = "parallel"):
        if layout not in LAYOUT_KINDS:
            raise ValueError(f"layout must be one of {LAYOUT_KINDS}, got {layout!r}")
        self.vocab = TagVocab.of(tokenizer)
        self.constraints = C.resolve(constraints)
        self.layout_kind = layout
        self.blocks: list[Block] = []
        self.traces: list[Trace] = []
        self.root = self.new_trace(None, 0, 0, 0)
        self._found: list[Flag] = []
        self.finished = False
        self.prompt_len = 0
        self._version = 0
        self._cache: dict = {}
        self._is_canonical = False  # built by canonical(): its text is its tokens
        for t in prompt_ids:
            self.push(self.root, int(t), KIND_PROMPT)
        self.prompt_len = len(self.root.ids)
        self.root.final_start = self.prompt_len

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_token_ids(cls, ids, tokenizer, prompt_len: int = 0, constraints="strict",
                       layout: str = "parallel") -> ExecutionGraph:
        ids = [int(i) for i in ids]
        g = cls(tokenizer, ids[:prompt_len], constraints=constraints, layout=layout)
        cur = g.cursor()
        for t in ids[prompt_len:]:
            cur.append(t)
        return g

    @classmethod
    def from_text(cls, text: str, tokenizer=None, prompt: str = "", constraints="strict",
                  layout: str = "parallel") -> ExecutionGraph:
        if tokenizer is None:
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer()
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        r = tokenizer.encode(text, add_special_tokens=False)
        return cls.from_token_ids(p + r, tokenizer, prompt_len=len(p), constraints=constraints, layout=layout)

    def cursor(self, auto_fork: bool = True) -> Cursor:
        """A cursor at the end of the root trace. ``auto_fork=False`` returns ``Event.FORK`` to the caller."""
        return Cursor(self, self.root, auto_fork)

    # -- building API: how a Cursor changes the graph (nothing else writes its traces) --------------------
    def new_trace(self, parent: Block | None, index: int, depth: int, start_pos: int) -> Trace:
        """A new trace (the root, or step ``index`` of block ``parent``) whose first token gets ``start_pos``."""
        t = Trace(parent, index, depth, start_pos, len(self.traces))
        self.traces.append(t)
        return t

    def open_block(self, t: Trace) -> Block:
        """A block opening at trace ``t``'s next token (its ``<guideline>``), one level below ``t``."""
        b = Block(depth=t.depth + 1, parent=t, guideline_start=len(t.ids))
        self.blocks.append(b)
        t.blocks.append(b)
        t.open_block = b
        return b

    def push(self, t: Trace, tid: int, kind: int, meta=None) -> None:
        """Append one token to trace ``t`` at the trace's next position."""
        t.ids.append(tid)
        t.pos.append(t.next_pos)
        t.kinds.append(kind)
        t.meta.append(meta)
        t.next_pos += 1
        self._version += 1

    def flag(self, constraint: C.Constraint, t: Trace, detail: str = "") -> None:
        """Record a possible violation of ``constraint`` at trace ``t``'s next token."""
        self._found.append(Flag(constraint, t, len(t.ids), detail))

    def changed(self) -> None:
        """The structure changed without a new token (a fork, a join): cached views are stale."""
        self._version += 1

    def finish(self) -> None:
        """The end-of-sequence token was appended; later tokens are ``TEXT_AFTER_EOS``."""
        self.finished = True

    # -- reading API (verdicts, views) --------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Grows with every change of the graph: the key of every cached view."""
        return self._version

    @property
    def flags(self) -> list[Flag]:
        """What the parser flagged so far, in order (read only)."""
        return self._found

    @property
    def is_canonical(self) -> bool:
        """Built by :meth:`canonical`: its text is its tokens."""
        return self._is_canonical

    def cached(self, name: str, key, compute: Callable):
        """``compute()``, cached under ``name`` until ``key`` changes (keys hold :attr:`version`)."""
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._cache[name] = (key, value)
        return value

    # -- serialized views -----------------------------------------------------------------------------
    def serialized(self) -> Serialized:
        """Tokens in serialized order with their positions and visibility (:func:`npr_env.layout.serialize`)."""
        return self.cached("flat", ("flat", self._version, len(self.traces)), lambda: serialize(self.root))

    @property
    def token_ids(self) -> list[int]:
        """Prompt + response ids in serialized order."""
        return list(self.serialized().ids)

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def __len__(self) -> int:
        return sum(len(t.ids) for t in self.traces)

    def token_kinds(self) -> np.ndarray:
        return self.serialized().kinds.copy()

    def token_meta(self) -> list:
        """Per-token objects given to ``Cursor.append(meta=...)``, in serialized order."""
        return list(self.serialized().meta)

    def serial_index(self, trace: Trace, local: int) -> int:
        """Serialized index of a trace's local token ``local`` (for local < offset of its first block)."""
        base = self.serialized().start_of.get(trace.uid, 0)
        extra = 0
        for b in trace.blocks:
            if 0 <= b.offset <= local:
                extra += sum(subtree_len(c) for c in b.children)
        return base + local + extra

    def layout(self) -> Layout:
        """Positions and compact visibility; sequential graphs give plain causal positions.

        An orchestrated graph gives the parallel layout of its structure here; what it was generated under,
        and what the trainer scores, is ``npr_agent.scoring.scoring_view`` (rows from
        :func:`npr_env.layout.orchestrated_view`).
        """
        return self.serialized().layout()

    def position_ids(self) -> np.ndarray:
        return self.serialized().position_ids.copy()

    @property
    def num_flags(self) -> int:
        """How many possible violations the parser has flagged so far (grows only; O(1)).

        A caller that stops on violations compares it with the last value it saw and runs the full
        ``violations_so_far()`` only when it grew.
        """
        return len(self._found)

    def attention_mask(self) -> np.ndarray:
        """Dense bool [L, L]; True means "may attend". Causal in serialized order."""
        return self.layout().dense_mask()

    # -- text: what decides the verdict of a sequential graph --------------------------------------------
    @property
    def spelled_tags(self) -> int:
        """How many tags the response writes as ordinary text pieces instead of tag tokens.

        A real model spells ``<guideline>`` as ``<``, ``guid``, ``eline``, ``>\\n`` until stage 2 teaches it the
        tag tokens. Counted on the decoded text: occurrences of each tag minus the tag tokens (a tag token's
        text can never be part of another occurrence, so the difference is exactly the spelled ones).
        """
        def count() -> int:
            text = self.response_text()
            return sum(text.count(t) for t in TAGS) - sum(1 for i in self.response_ids if i in self.vocab.tag_of)

        return self.cached("spelled", self._version, count)

    def canonical(self, partial: bool = False) -> ExecutionGraph:
        """This graph re-read from its response text: the text tokenised afresh, so every tag is its tag token.

        It is what stage 2 trains on (the kept trajectories converted to the tag tokens) and what decides the
        verdict of a sequential graph that spells its tags. ``partial``: the response is a prefix still being
        decoded, so a trailing piece that may still grow into a tag (``<gui``) is left out.
        """
        return self.cached("canonical", (self._version, partial), lambda: self._reread(partial))

    def _reread(self, partial: bool) -> ExecutionGraph:
        text = self.response_text()
        if partial:
            cut = text.rfind("<")
            if cut >= 0 and any(t.startswith(text[cut:]) and t != text[cut:] for t in TAGS):
                text = text[:cut]
        tok = self.vocab.tokenizer
        g = ExecutionGraph(tok, self.root.ids[:self.prompt_len], constraints=self.constraints,
                           layout=self.layout_kind)
        g._is_canonical = True
        cur = g.cursor()
        for t in tok.encode(text, add_special_tokens=False):
            cur.append(t)
        return g

    def text_decides(self) -> bool:
        """Invariant 8: in the sequential layout the verdict is the text's, however it was tokenised."""
        return self.layout_kind == "sequential" and not self._is_canonical and self.spelled_tags > 0

    # -- verdict (npr_env.verdicts) -----------------------------------------------------------------------
    @property
    def violations(self) -> list[C.Violation]:
        """Every violation of the graph's constraint set, treating the sequence as complete."""
        return verdicts.violations(self, at_end=True)

    def violations_so_far(self) -> list[C.Violation]:
        """Violations already certain from the prefix (no end-of-sequence checks): for early stopping."""
        return verdicts.violations(self, at_end=False)

    @property
    def is_valid(self) -> bool:
        return not self.violations

    def format_score(self) -> float:
        return C.format_score(self.violations)

    # -- text and stats ---------------------------------------------------------------------------------
    def response_text(self) -> str:
        return self.vocab.decode(self.response_ids)

    def final_text(self) -> str:
        """The root's text after the last block (where the answer is), without the EOS token."""
        if self.text_decides():
            return self.canonical().final_text()
        return self.vocab.decode(verdicts.root_tail(self.root))

    @property
    def stats(self) -> GraphStats:
        """Blocks, branches and token counts; a sequential graph that spells its tags is counted on its text
        (:meth:`canonical`: every tag one token), like its verdict."""
        if self.text_decides():
            return self.canonical().stats

        def critical(t: Trace) -> int:
            n = sum(1 for k in t.kinds if k != KIND_PROMPT)
            for b in t.blocks:
                n += max((critical(c) for c in b.children), default=0)
            return n

        return GraphStats(
            num_blocks=len(self.blocks),
            branches_per_block=[len(b.children) for b in self.blocks],
            total_tokens=len(self) - self.prompt_len,
            critical_path_tokens=critical(self.root),
            num_parallel_blocks=sum(1 for b in self.blocks if len(b.children) >= 2),
        )

    def outline(self) -> dict:
        """The graph as nested dicts (for rendering, JSON and tests)."""
        if self.text_decides():
            return self.canonical().outline()
        dec = self.vocab.decode

        def trace_items(t: Trace, start: int) -> list:
            items, a = [], start
            blocks = {b.guideline_start: b for b in self._blocks_in(t)}
            i = start
            while i < len(t.ids):
                b = blocks.get(i)
                if b is None:
                    i += 1
                    continue
                if i > a:
                    items.append({"kind": "text", "text": dec(t.ids[a:i])})
                items.append({
                    "kind": "block", "depth": b.depth, "parallel": b.parallel,
                    "plans": [{"number": p.number, "text": p.text} for p in b.plans],
                    "steps": [{"number": c.segment.number if c.segment else None,
                               "tokens": subtree_len(c), "items": trace_items(c, 0)} for c in b.children],
                    "takeaway": b.takeaway.text if b.takeaway else None,
                })
                end = b.takeaway.end + 1 if b.takeaway and b.takeaway.end >= 0 else len(t.ids)
                i = a = max(end, i + 1)
            if a < len(t.ids):
                items.append({"kind": "text", "text": dec(t.ids[a:])})
            return items

        return {"prompt": dec(self.root.ids[:self.prompt_len]), "items": trace_items(self.root, self.prompt_len),
                "valid": self.is_valid, "violations": [v.code for v in self.violations],
                "stats": self.stats.as_dict()}

    def _blocks_in(self, t: Trace) -> list[Block]:
        return [b for b in self.blocks if b.parent is t]

    def __repr__(self) -> str:
        s = self.stats
        return (f"ExecutionGraph(tokens={len(self)}, prompt={self.prompt_len}, blocks={s.num_blocks}, "
                f"branches={s.branches_per_block}, valid={self.is_valid})")
