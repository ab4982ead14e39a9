"""Request and Branch: one sample the native engine decodes, and one of its branches, with what the engine
adds to ``npr_env.branches``: KV block tables, the token a branch feeds next, sampling state, KV accounting."""

from __future__ import annotations

import torch

from npr_env import branches
from npr_env.branches import Rules, Trajectory
from npr_env.graph import ExecutionGraph

from .kv_cache import BlockTable


class Branch(branches.Branch):
    """A branch with its KV block table, the token it feeds next, and its sampling state."""

    __slots__ = ("table", "pending", "pending_pos", "ctx", "row", "takeaway_lp")

    def __init__(self, req: Request, cursor, parent: Branch | None):
        super().__init__(req, cursor, parent)
        self.table: BlockTable | None = None
        self.pending = -1
        self.pending_pos = -1
        self.ctx: list[int] | None = None  # visible tokens in serialized order (only with logits processors)
        self.row = -1  # presence row of the repetition penalty (-1: penalties off)
        self.takeaway_lp = 0.0  # a child: logprob of <takeaway> after its </step>; a joined parent: the one it uses


class Request(Trajectory):
    """One sample being decoded, with its random generator and its KV accounting."""

    def __init__(self, index: int, prompt_index: int, sample_index: int, graph: ExecutionGraph, rules: Rules,
                 generator: torch.Generator | None):
        super().__init__(graph, rules)
        self.index, self.prompt_index, self.sample_index = index, prompt_index, sample_index
        self.generator = generator
        self.tables: list[BlockTable] = []
        self.decode_steps = 0
        self.last_step = -1
        self.t_end = 0.0
        self.blocks_held = self.peak_blocks = 0
