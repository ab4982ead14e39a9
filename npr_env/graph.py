"""ExecutionGraph: an NPR trajectory as a graph of traces and blocks, built token by token.

Structure. A *trace* is a run of tokens decoded by one branch: the root trace holds the prompt and the main
line of the response, and each ``<step>`` of a block is a child trace. A *block* is one map/reduce round:
its ``<guideline>`` and ``<takeaway>`` sit in the parent trace, its steps are the children. Steps may hold
blocks of their own (nesting), up to ``max_depth``.

Serialized order (what ``token_ids`` returns and what the trainer scores) is the parent's tokens up to the
fork, then child 1, child 2, ..., then the parent again from ``<takeaway>``.

Layout (the one place it is computed; the engine, the env and the trainer all use it):

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
when fork/join is orchestrated as separate requests: see :meth:`ExecutionGraph.scoring_view`).

Verdicts. The parser never raises on model output: every token sequence gives the same violations twice.
In the sequential layout the verdict is the *text's*: a response that spells its tags in ordinary pieces
(what a real model writes before stage 2 teaches it the tag tokens) is judged on its :meth:`canonical` form,
the same text re-tokenised, so tokenisation never changes a verdict. The parallel layout needs every tag as
its single token (tags drive forks and positions): a spelled tag there is the hard violation ``SPELLED_TAG``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from . import constraints as C
from .layout import Layout
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
    TAGS,
    TAKEAWAY_CLOSE,
    TAKEAWAY_OPEN,
    last_boxed,
    plan_number,
)

# Token kinds (what segment a token belongs to), for rendering and the env observation.
KIND_PROMPT, KIND_TEXT, KIND_GUIDELINE, KIND_PLAN, KIND_STEP, KIND_TAKEAWAY, KIND_EOS = range(7)
KIND_NAMES = ("prompt", "text", "guideline", "plan", "step", "takeaway", "eos")

LAYOUT_KINDS = ("parallel", "sequential", "orchestrated")

# Parser modes of a trace.
M_TEXT, M_GUIDELINE, M_PLAN, M_STEPS, M_POST_STEPS, M_TAKEAWAY, M_STEP_OPEN, M_STEP_DONE = range(8)


class Event(Enum):
    """What appending a token did, for the caller that drives branches (the engine, the env)."""

    CONTINUE = 0
    FORK = 1  # a guideline closed with 1..max_plans plans: call cursor.fork() or cursor.decline_fork()
    STEP_DONE = 2  # this branch closed its </step>: it is finished
    EOS = 3  # end of sequence


class TagVocab:
    """A tokenizer seen token by token: which ids are tags, whitespace or end of sequence."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        missing = [t for t in TAGS if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no single token for {missing}; add them with "
                "npr_env.add_npr_tokens(tokenizer, model) or use npr_env.load_tokenizer()")
        self.tokenizer = tokenizer
        self.id_of = {t: vocab[t] for t in TAGS}
        self.tag_of = {i: t for t, i in self.id_of.items()}
        self.eos_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
        self.unk_ids = frozenset(i for i in [getattr(tokenizer, "unk_token_id", None)] if i is not None)
        self._ws: dict[int, bool] = {}
        self._numbers: dict[str, tuple[int, ...]] = {}
        self.size = len(tokenizer)

    def step_number_ids(self, number: str) -> tuple[int, ...]:
        """The ids an engine forces after ``<step>`` in the branch of plan ``number``: the tokens of ``"N:"``."""
        ids = self._numbers.get(number)
        if ids is None:
            ids = self._numbers[number] = tuple(self.tokenizer.encode(f"{number}:", add_special_tokens=False))
        return ids

    def is_ws(self, tid: int) -> bool:
        ws = self._ws.get(tid)
        if ws is None:
            text = self.tokenizer.decode([tid]) if 0 <= tid < self.size else "x"
            ws = self._ws[tid] = text != "" and text.strip() == ""
        return ws

    def decode(self, ids) -> str:
        ids = [i for i in ids if 0 <= i < self.size]
        return self.tokenizer.decode(ids)

    def has_unknown(self, ids) -> bool:
        """Whether ``ids`` hold a token that stands for a character the vocabulary cannot write (or no token)."""
        return any(i in self.unk_ids or not 0 <= i < self.size for i in ids)

    def measure_text(self, ids) -> str:
        """The text of ``ids`` for length checks: each unknown token (``<unk>``, an out-of-vocabulary id) is one
        character (U+FFFD), whatever the tokenizer prints for it."""
        out, run = [], []
        for i in ids:
            if i in self.unk_ids or not 0 <= i < self.size:
                if run:
                    out.append(self.tokenizer.decode(run))
                    run = []
                out.append("\ufffd")
            else:
                run.append(i)
        if run:
            out.append(self.tokenizer.decode(run))
        return "".join(out)

    @classmethod
    def of(cls, tokenizer) -> TagVocab:
        cached = getattr(tokenizer, "_npr_tag_vocab", None)
        if cached is None or cached.size != len(tokenizer):
            cached = cls(tokenizer)
            try:
                tokenizer._npr_tag_vocab = cached
            except AttributeError:  # a tokenizer that refuses attributes: no cache, still correct
                pass
        return cached


@dataclass
class Segment:
    """A plan, step body or takeaway: local token span [start, end) of a trace, and its decoded text."""

    start: int
    end: int = -1
    text: str = ""
    number: str | None = None


class Trace:
    __slots__ = ("ids", "pos", "kinds", "meta", "blocks", "parent", "index", "depth", "next_pos", "mode",
                 "open_block", "segment", "is_step", "final_start", "uid")

    def __init__(self, parent: Block | None, index: int, depth: int, start_pos: int, uid: int):
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.kinds: list[int] = []
        self.meta: list = []
        self.blocks: list[Block] = []  # blocks whose children are serialized inside this trace
        self.parent, self.index, self.depth, self.uid = parent, index, depth, uid
        self.next_pos = start_pos
        self.is_step = parent is not None
        self.mode = M_STEP_OPEN if self.is_step else M_TEXT
        self.open_block: Block | None = None
        self.segment: Segment | None = None  # the step body's segment, for a step trace
        self.final_start = 0  # local index where the text after the last block begins


@dataclass
class Block:
    depth: int
    parent: Trace
    guideline_start: int
    plans: list[Segment] = field(default_factory=list)
    children: list[Trace] = field(default_factory=list)
    takeaway: Segment | None = None
    offset: int = -1  # local index in the parent where the children are serialized
    fork_pos: int = -1  # position of every step's first token (parallel blocks)
    parallel: bool = False
    routed: bool = True  # children arrive serialized through the parent's cursor (False: forked by the caller)
    forkable: bool = False
    joined: bool = False
    closed: bool = False


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


@dataclass
class ScoringView:
    """Rows that score a trajectory (see :meth:`ExecutionGraph.scoring_view`): ``source[i]`` is the serialized
    index row ``i`` holds, ``layout`` is over the rows, ``scored[i]`` marks the row that scores its token."""

    source: np.ndarray  # [R] int64
    layout: Layout
    scored: np.ndarray  # [R] bool


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
        self.root = self._new_trace(None, 0, 0, 0)
        self._found: list[tuple[str, Trace, int, str]] = []  # (code, trace, local index, detail)
        self.finished = False
        self.prompt_len = 0
        self._version = 0
        self._cache: dict = {}
        self._is_canonical = False  # built by canonical(): its text is its tokens
        for t in prompt_ids:
            self._push(self.root, int(t), KIND_PROMPT)
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

    def _new_trace(self, parent, index, depth, start_pos) -> Trace:
        t = Trace(parent, index, depth, start_pos, len(self.traces))
        self.traces.append(t)
        return t

    def _push(self, t: Trace, tid: int, kind: int, meta=None) -> None:
        t.ids.append(tid)
        t.pos.append(t.next_pos)
        t.kinds.append(kind)
        t.meta.append(meta)
        t.next_pos += 1
        self._version += 1

    def _flag(self, code: str, t: Trace, detail: str = "") -> None:
        self._found.append((code, t, len(t.ids), detail))

    # -- serialized views -----------------------------------------------------------------------------
    def _flat(self):
        key = ("flat", self._version, len(self.traces))
        hit = self._cache.get("flat")
        if hit is not None and hit[0] == key:
            return hit[1]
        ids, pos, kinds, meta, hides, where = [], [], [], [], [], {}
        max_d = 1

        def walk(t: Trace, hide: tuple):
            nonlocal max_d
            start = 0
            for b in t.blocks:
                if b.offset < 0:  # guideline still open, no step yet: its tokens come with the trace's tail
                    continue
                emit(t, start, b.offset, hide)
                start = b.offset
                first = len(ids)
                for c in b.children:
                    h = hide + ((first, len(ids)),) if b.parallel else hide
                    max_d = max(max_d, len(h))
                    walk(c, h)
            emit(t, start, len(t.ids), hide)

        def emit(t: Trace, a: int, b: int, hide: tuple):
            if a == 0:
                where[t.uid] = len(ids)
            ids.extend(t.ids[a:b])
            pos.extend(t.pos[a:b])
            kinds.extend(t.kinds[a:b])
            meta.extend(t.meta[a:b])
            hides.extend([hide] * (b - a))

        walk(self.root, ())
        L = len(ids)
        lo = np.zeros((L, max_d), dtype=np.int64)
        hi = np.zeros((L, max_d), dtype=np.int64)
        for q, h in enumerate(hides):
            for d, (a, b) in enumerate(h):
                lo[q, d], hi[q, d] = a, b
        flat = (ids, np.asarray(pos, dtype=np.int64), np.asarray(kinds, dtype=np.int64), meta, lo, hi, where)
        self._cache["flat"] = (key, flat)
        return flat

    @property
    def token_ids(self) -> list[int]:
        """Prompt + response ids in serialized order."""
        return list(self._flat()[0])

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def __len__(self) -> int:
        return sum(len(t.ids) for t in self.traces)

    def token_kinds(self) -> np.ndarray:
        return self._flat()[2].copy()

    def token_meta(self) -> list:
        """Per-token objects given to ``Cursor.append(meta=...)``, in serialized order."""
        return list(self._flat()[3])

    def serial_index(self, trace: Trace, local: int) -> int:
        """Serialized index of a trace's local token ``local`` (for local < offset of its first block)."""
        _, _, _, _, _, _, where = self._flat()
        base = where.get(trace.uid, 0)
        extra = 0
        for b in trace.blocks:
            if 0 <= b.offset <= local:
                extra += sum(_subtree_len(c) for c in b.children)
        return base + local + extra

    def layout(self) -> Layout:
        """Positions and compact visibility; sequential graphs give plain causal positions.

        An orchestrated graph gives the parallel layout of its structure here; what it was generated under,
        and what the trainer scores, is :meth:`scoring_view`.
        """
        _, pos, _, _, lo, hi, _ = self._flat()
        return Layout(pos.copy(), lo.copy(), hi.copy())

    def scoring_view(self) -> ScoringView:
        """The rows that score every token under the layout the graph was generated under.

        Parallel and sequential graphs: the serialized sequence and :meth:`layout`, one row per token.

        Orchestrated graphs (fork/join as separate causal requests on a stock server): a token of a *first*
        sibling step, and every token after a join, was generated with the serialized sequence before it as
        context, causal, at position = serialized index (at a join the server re-prefills every step causally:
        the takeaway reads step 2's KV computed *after* step 1). A token of a *non-first* step j was generated
        by its own request: the prefix before the fork, then step j, positions continuing the prefix. One
        token cannot carry both KVs in one forward, so the view packs: the serialized sequence (causal), then
        one re-encoded copy of each non-first step's subtree, seeing the rows before its fork and itself
        (hidden interval ``[fork_row, copy_start)``, nested per level). ``scored[i]`` marks the row that gives
        the logprob of token ``source[i]``; each token is scored exactly once, the other rows are context.
        """
        key = ("scoring", self._version, len(self.traces), self.layout_kind)
        hit = self._cache.get("scoring")
        if hit is not None and hit[0] == key:
            return hit[1]
        if self.layout_kind != "orchestrated":
            L = len(self.token_ids)
            view = ScoringView(np.arange(L, dtype=np.int64), self.layout(), np.ones(L, dtype=bool))
        else:
            view = self._orchestrated_view()
        self._cache["scoring"] = (key, view)
        return view

    def _subtree_spans(self) -> tuple[dict[int, int], dict[int, int]]:
        """Serialized start and length of every trace's subtree (the walk of :meth:`_flat`)."""
        start: dict[int, int] = {}
        size: dict[int, int] = {}
        pos = 0

        def walk(t: Trace):
            nonlocal pos
            start[t.uid] = pos
            cut = 0
            for b in t.blocks:
                if b.offset < 0:
                    continue
                pos += b.offset - cut
                cut = b.offset
                for c in b.children:
                    walk(c)
            pos += len(t.ids) - cut
            size[t.uid] = pos - start[t.uid]

        walk(self.root)
        return start, size

    def _orchestrated_view(self) -> ScoringView:
        start, size = self._subtree_spans()
        src: list[int] = []
        pos: list[int] = []
        hides: list[tuple] = []
        scored: list[bool] = []

        def lay(t: Trace, hide: tuple, p0: int):
            """One region: the serialized subtree of ``t``, causal, positions from ``p0``, hiding ``hide``."""
            a, n, r0 = start[t.uid], size[t.uid], len(src)
            src.extend(range(a, a + n))
            pos.extend(range(p0, p0 + n))
            hides.extend([hide] * n)
            scored.extend([True] * n)
            copies = []

            def scope(u: Trace):  # blocks whose first step is generated inside this region
                for b in u.blocks:
                    if b.offset < 0 or not b.children:
                        continue
                    if not b.parallel:  # a declined fork: its steps follow each other in this region
                        for c in b.children:
                            scope(c)
                        continue
                    scope(b.children[0])
                    fork_row = r0 + start[b.children[0].uid] - a
                    for c in b.children[1:]:
                        s = r0 + start[c.uid] - a
                        scored[s:s + size[c.uid]] = [False] * size[c.uid]
                        copies.append((c, fork_row))

            scope(t)
            for c, fork_row in copies:  # each non-first step again, seeing this region up to its fork
                lay(c, hide + ((fork_row, len(src)),), p0 + fork_row - r0)

        lay(self.root, (), 0)
        R = len(src)
        D = max([len(h) for h in hides] + [1])
        lo = np.zeros((R, D), dtype=np.int64)
        hi = np.zeros((R, D), dtype=np.int64)
        for q, h in enumerate(hides):
            for d, (x, y) in enumerate(h):
                lo[q, d], hi[q, d] = x, y
        return ScoringView(np.asarray(src, dtype=np.int64), Layout(np.asarray(pos, dtype=np.int64), lo, hi),
                           np.asarray(scored, dtype=bool))

    def position_ids(self) -> np.ndarray:
        return self._flat()[1].copy()

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
        hit = self._cache.get("spelled")
        if hit is not None and hit[0] == self._version:
            return hit[1]
        text = self.response_text()
        n = sum(text.count(t) for t in TAGS) - sum(1 for i in self.response_ids if i in self.vocab.tag_of)
        self._cache["spelled"] = (self._version, n)
        return n

    def canonical(self, partial: bool = False) -> ExecutionGraph:
        """This graph re-read from its response text: the text tokenised afresh, so every tag is its tag token.

        It is what stage 2 trains on (the kept trajectories converted to the tag tokens) and what decides the
        verdict of a sequential graph that spells its tags. ``partial``: the response is a prefix still being
        decoded, so a trailing piece that may still grow into a tag (``<gui``) is left out.
        """
        key = (self._version, partial)
        hit = self._cache.get("canonical")
        if hit is not None and hit[0] == key:
            return hit[1]
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
        self._cache["canonical"] = (key, g)
        return g

    def _text_decides(self) -> bool:
        """Invariant 8: in the sequential layout the verdict is the text's, however it was tokenised."""
        return self.layout_kind == "sequential" and not self._is_canonical and self.spelled_tags > 0

    def _index_from_canonical(self, canon: ExecutionGraph, index: int) -> int:
        """The serialized index in this graph of the token at ``index`` in ``canon`` (matched by characters)."""
        if index < self.prompt_len:
            return index
        ids = canon.response_ids
        k = index - self.prompt_len
        char = len(canon.vocab.decode(ids[:k]))
        own = self.response_ids
        seen = 0
        for j, t in enumerate(own):
            seen += len(self.vocab.decode([t]))
            if seen > char:
                return self.prompt_len + j
        return self.prompt_len + max(0, len(own) - 1)

    # -- verdict ----------------------------------------------------------------------------------------
    def _violations(self, at_end: bool) -> list[C.Violation]:
        key = (self._version, at_end)
        hit = self._cache.get("violations")
        if hit is not None and hit[0] == key:
            return list(hit[1])
        if self._text_decides():
            canon = self.canonical(partial=not at_end)
            out = [v if v.index < 0 else replace(v, index=self._index_from_canonical(canon, v.index))
                   for v in canon._violations(at_end)]
        else:
            out = self._own_violations(at_end)
        self._cache["violations"] = (key, out)
        return list(out)

    def _own_violations(self, at_end: bool) -> list[C.Violation]:
        cs = self.constraints
        found = list(self._found)
        if at_end:
            found += self._end_checks()
        if self.layout_kind != "sequential" and not self._is_canonical and self.spelled_tags > 0:
            found.append(("SPELLED_TAG", self.root, -1, f"{self.spelled_tags} tag(s) spelled in text pieces"))
        out, seen = [], set()
        for code, t, local, detail in found:
            c = cs.get(code)
            if c is None:
                continue
            idx = -1 if local < 0 else self.serial_index(t, min(local, len(t.ids)))
            key = (code, idx)
            if key in seen:
                continue
            seen.add(key)
            out.append(C.Violation(code, c.message + (f" ({detail})" if detail else ""), idx, c.penalty, c.hard))
        for c in cs.custom() if at_end else ():  # user checks judge whole sequences, not prefixes
            try:
                bad = bool(c.check(self))
            except Exception as e:  # a user check must not turn a verdict into a crash
                bad, c = True, C.Constraint(c.code, f"{c.message} (check raised {type(e).__name__}: {e})",
                                            c.penalty, c.hard)
            if bad:
                out.append(C.Violation(c.code, c.message, -1, c.penalty, c.hard))
        return out

    def _end_checks(self) -> list[tuple[str, Trace, int, str]]:
        found = []
        open_names = {M_GUIDELINE: "guideline", M_PLAN: "plan", M_TAKEAWAY: "takeaway"}
        for t in self.traces:
            if t.mode in open_names:
                found.append(("UNCLOSED_TAG", t, -1, f"{open_names[t.mode]} never closed"))
            elif t.mode in (M_STEPS, M_POST_STEPS):
                found.append(("MISSING_TAKEAWAY", t, -1, "the sequence ends before the takeaway"))
                b = t.open_block
                if t.mode == M_STEPS and b.plans and len(b.children) != len(b.plans):
                    found.append(("PLAN_STEP_COUNT_MISMATCH", t, -1, f"{len(b.plans)} plans, {len(b.children)} steps"))
            if t.is_step and t.mode != M_STEP_DONE:
                found.append(("UNCLOSED_TAG", t, -1, "step never closed"))
        if not self.blocks:
            found.append(("NO_BLOCK", self.root, -1, ""))
        elif not any(len(b.children) >= 2 for b in self.blocks):
            found.append(("NO_PARALLEL_BLOCK", self.root, -1, ""))
        r = self.root
        tail = [i for i, k in zip(r.ids[r.final_start:], r.kinds[r.final_start:]) if k != KIND_EOS]
        if r.mode != M_TEXT or not (last_boxed(self.vocab.decode(tail)) or "").strip():
            found.append(("MISSING_ANSWER", r, -1, ""))
        return found

    @property
    def violations(self) -> list[C.Violation]:
        """Every violation of the graph's constraint set, treating the sequence as complete."""
        return self._violations(at_end=True)

    def violations_so_far(self) -> list[C.Violation]:
        """Violations already certain from the prefix (no end-of-sequence checks): for early stopping."""
        return self._violations(at_end=False)

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
        if self._text_decides():
            return self.canonical().final_text()
        r = self.root
        tail = [i for i, k in zip(r.ids[r.final_start:], r.kinds[r.final_start:]) if k != KIND_EOS]
        return self.vocab.decode(tail)

    @property
    def stats(self) -> GraphStats:
        """Blocks, branches and token counts; a sequential graph that spells its tags is counted on its text
        (:meth:`canonical`: every tag one token), like its verdict."""
        if self._text_decides():
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
        if self._text_decides():
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
                               "tokens": _subtree_len(c), "items": trace_items(c, 0)} for c in b.children],
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


def _subtree_len(t: Trace) -> int:
    return len(t.ids) + sum(_subtree_len(c) for b in t.blocks for c in b.children)


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
            b.children.append(g._new_trace(b, i, b.depth, b.fork_pos))
        g._version += 1
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

    # -- the state machine ------------------------------------------------------------------------------
    def append(self, tid: int, meta=None) -> Event:
        tid = int(tid)
        g = self.graph
        if g.finished:
            g._flag("TEXT_AFTER_EOS", g.root)
            g._push(g.root, tid, KIND_TEXT, meta)
            return Event.EOS
        v = g.vocab
        t = self.trace
        # Serial routing: leave a finished step on a tag (or EOS), then hand it to the parent. Whitespace after a
        # </step> stays in that step, and so does other text (TEXT_BETWEEN_TAGS, soft): `</step>x<step>` is one
        # word too many between two steps, not a broken block; the step's siblings never see it.
        leaves = tid in v.tag_of or tid in v.eos_ids
        while t is not self.home and t.mode == M_STEP_DONE and leaves and t.parent.routed:
            t = self.trace = t.parent.parent
        if t.mode == M_STEPS and t.open_block.routed:
            b = t.open_block
            if v.tag_of.get(tid) == STEP_OPEN:
                child = self._add_child(t, b)
                self.trace = child
                return self._feed(child, tid, meta)
            if not b.children:
                if tid not in v.tag_of and v.is_ws(tid):  # whitespace after </guideline> belongs to the guideline
                    g._push(t, tid, KIND_GUIDELINE, meta)
                    return Event.CONTINUE
                if tid not in v.tag_of and tid not in v.eos_ids:
                    g._flag("TEXT_BETWEEN_TAGS", t, "between </guideline> and the first <step>")
                    g._push(t, tid, KIND_GUIDELINE, meta)
                    return Event.CONTINUE
            self._join(t)
        return self._feed(t, tid, meta)

    def _add_child(self, t: Trace, b: Block) -> Trace:
        g = self.graph
        if not b.children:
            b.offset, b.fork_pos = len(t.ids), t.next_pos
        start = b.fork_pos if b.parallel else (b.children[-1].next_pos if b.children else t.next_pos)
        child = g._new_trace(b, len(b.children), b.depth, start)
        b.children.append(child)
        if b.plans and len(b.children) == len(b.plans) + 1:
            g._flag("PLAN_STEP_COUNT_MISMATCH", child, f"more steps than the {len(b.plans)} plans")
        return child

    def _join(self, t: Trace) -> None:
        b = t.open_block
        if b.offset < 0:
            b.offset = len(t.ids)
        if b.children:
            t.next_pos = max(c.next_pos for c in b.children)
        if b.plans and len(b.children) < len(b.plans):
            self.graph._flag("PLAN_STEP_COUNT_MISMATCH", t, f"{len(b.plans)} plans, {len(b.children)} steps")
        b.joined = True
        t.mode = M_POST_STEPS
        self.trace = t
        self.graph._version += 1

    def _feed(self, t: Trace, tid: int, meta) -> Event:
        g, v = self.graph, self.graph.vocab
        tag = v.tag_of.get(tid)
        mode = t.mode
        if tid in v.eos_ids and tag is None:
            g._push(t, tid, KIND_EOS, meta)
            g.finished = True
            return Event.EOS
        body_kind = KIND_STEP if t.is_step else KIND_TEXT

        if mode == M_TEXT:
            if tag is None:
                g._push(t, tid, body_kind, meta)
            elif tag == GUIDELINE_OPEN:
                b = Block(depth=t.depth + 1, parent=t, guideline_start=len(t.ids))
                g.blocks.append(b)
                t.blocks.append(b)
                t.open_block = b
                if b.depth > g.constraints.max_depth:
                    g._flag("DEPTH_EXCEEDED", t, f"depth {b.depth} > {g.constraints.max_depth}")
                t.mode = M_GUIDELINE
                g._push(t, tid, KIND_GUIDELINE, meta)
            elif tag == STEP_CLOSE and t.is_step:
                self._close_step(t)
                g._push(t, tid, KIND_STEP, meta)
                t.mode = M_STEP_DONE
                return Event.STEP_DONE
            else:
                if tag == STEP_OPEN:
                    g._flag("NESTED_STEP" if t.is_step else "STEP_OUTSIDE_BLOCK", t)
                elif tag in CLOSE_TAGS:
                    g._flag("STRAY_CLOSING_TAG", t, tag)
                else:
                    g._flag("MISPLACED_TAG", t, tag)
                g._push(t, tid, body_kind, meta)
        elif mode == M_GUIDELINE:
            b = t.open_block
            if tag == PLAN_OPEN:
                b.plans.append(Segment(start=len(t.ids) + 1))
                t.mode = M_PLAN
                g._push(t, tid, KIND_PLAN, meta)
            elif tag == GUIDELINE_CLOSE:
                g._push(t, tid, KIND_GUIDELINE, meta)
                return self._close_guideline(t, b)
            else:
                if tag is None:
                    if not v.is_ws(tid):
                        g._flag("TEXT_BETWEEN_TAGS", t, "inside <guideline>, outside a plan")
                else:
                    g._flag("STRAY_CLOSING_TAG" if tag in CLOSE_TAGS else "UNCLOSED_TAG", t, tag)
                g._push(t, tid, KIND_GUIDELINE, meta)
        elif mode == M_PLAN:
            if tag == PLAN_CLOSE:
                p = t.open_block.plans[-1]
                p.end = len(t.ids)
                self._check_content(t, p, "EMPTY_PLAN", MIN_PLAN_CHARS, numbered="UNNUMBERED_PLAN")
                t.mode = M_GUIDELINE
            elif tag is not None:
                g._flag("STRAY_CLOSING_TAG" if tag in CLOSE_TAGS else "UNCLOSED_TAG", t, tag)
            g._push(t, tid, KIND_PLAN, meta)
        elif mode == M_STEPS:  # a forked block whose parent received a token before join(): treat as join
            self._join(t)
            return self._feed(t, tid, meta)
        elif mode == M_POST_STEPS:
            b = t.open_block
            if tag == TAKEAWAY_OPEN:
                b.takeaway = Segment(start=len(t.ids) + 1)
                t.mode = M_TAKEAWAY
                g._push(t, tid, KIND_TAKEAWAY, meta)
            else:
                g._flag("MISSING_TAKEAWAY", t)
                self._close_block(t)
                return self._feed(t, tid, meta)
        elif mode == M_TAKEAWAY:
            if tag == TAKEAWAY_CLOSE:
                seg = t.open_block.takeaway
                seg.end = len(t.ids)
                self._check_content(t, seg, "EMPTY_TAKEAWAY", MIN_STEP_CHARS)
                g._push(t, tid, KIND_TAKEAWAY, meta)
                self._close_block(t)
            else:
                if tag is not None:
                    g._flag("STRAY_CLOSING_TAG" if tag in CLOSE_TAGS else "UNCLOSED_TAG", t, tag)
                g._push(t, tid, KIND_TAKEAWAY, meta)
        elif mode == M_STEP_OPEN:
            if tag != STEP_OPEN:
                g._flag("MISPLACED_TAG", t, "a step must start with <step>")
            t.segment = Segment(start=len(t.ids) + (1 if tag == STEP_OPEN else 0))
            t.mode = M_TEXT
            if tag == STEP_OPEN:
                g._push(t, tid, KIND_STEP, meta)
            else:
                return self._feed(t, tid, meta)
        elif mode == M_STEP_DONE:  # after </step>: whitespace, or text that stays with the step (flagged once a run)
            if not (tag is None and v.is_ws(tid)):
                prev = t.ids[-1] if t.ids else None
                if prev is None or prev in v.tag_of or v.is_ws(prev):
                    g._flag("TEXT_BETWEEN_TAGS", t, "after </step>")
            g._push(t, tid, KIND_STEP, meta)
        return Event.CONTINUE

    def _close_guideline(self, t: Trace, b: Block) -> Event:
        g = self.graph
        n = len(b.plans)
        if n == 0:
            g._flag("NO_PLANS", t)
        elif n > g.constraints.max_plans:
            g._flag("TOO_MANY_PLANS", t, f"{n} > {g.constraints.max_plans}")
        b.forkable = 1 <= n <= g.constraints.max_plans and b.depth <= g.constraints.max_depth
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
        self._check_content(t, seg, "EMPTY_STEP", MIN_STEP_CHARS)
        b = t.parent
        if b.plans and t.index < len(b.plans):
            want = b.plans[t.index].number or str(t.index + 1)
            if seg.number != want:
                self.graph._flag("STEP_NUMBER_MISMATCH", t, f"step {t.index + 1} is numbered {seg.number!r}, "
                                 f"plan {t.index + 1} is {want!r}")

    def _check_content(self, t: Trace, seg: Segment, code: str, min_chars: int, numbered: str | None = None):
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
            self.graph._flag(numbered, t)
        n = len(body.strip())
        if n < min_chars:
            self.graph._flag(code, t, f"{n} < {min_chars} characters")
