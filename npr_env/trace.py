"""The parts of an execution graph: token kinds, parser modes, traces, blocks and segments.

A *trace* is a run of tokens decoded by one branch: the root trace holds the prompt and the main line of the
response, and each ``<step>`` of a block is a child trace. A *block* is one map/reduce round: its
``<guideline>`` and ``<takeaway>`` sit in the parent trace, its steps are the children. These are plain records;
:class:`npr_env.graph.ExecutionGraph` owns them and :class:`npr_env.cursor.Cursor` fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Token kinds (what segment a token belongs to), for rendering and the env observation.
KIND_PROMPT, KIND_TEXT, KIND_GUIDELINE, KIND_PLAN, KIND_STEP, KIND_TAKEAWAY, KIND_EOS = range(7)
KIND_NAMES = ("prompt", "text", "guideline", "plan", "step", "takeaway", "eos")

# Parser modes of a trace.
M_TEXT, M_GUIDELINE, M_PLAN, M_STEPS, M_POST_STEPS, M_TAKEAWAY, M_STEP_OPEN, M_STEP_DONE = range(8)


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


def subtree_len(t: Trace) -> int:
    """Tokens of ``t`` and of every step nested in it."""
    return len(t.ids) + sum(subtree_len(c) for b in t.blocks for c in b.children)
