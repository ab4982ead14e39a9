"""TrajectoryForcer: a logits processor that makes the engine reproduce a given NPR trajectory, in either mode.

Used to replay a known response through the engine (its logprobs under the current policy, benchmarks with
fixed work, tests of exactness). The engine passes each branch the tokens it can see, in serialized order;
the forcer looks that context up among the contexts the trajectory's layout gives each of its tokens (parallel
*and* sequential layouts) and leaves only the trajectory's next token possible. Tokens the engine forces
itself (``<step>`` + number, ``<takeaway>``) are never asked for.
"""

from __future__ import annotations

import numpy as np
import torch

from npr_env.graph import ExecutionGraph


class TrajectoryForcer:
    """``(context_ids, logits) -> logits`` with -inf everywhere except the trajectory's next token."""

    def __init__(self, tokenizer, prompt_ids: list[int], response_ids: list[int], strict: bool = True,
                 constraints="strict"):
        """``constraints`` must have the engine's limits (``max_plans``/``max_depth`` decide what forks)."""
        ids = [int(t) for t in prompt_ids] + [int(t) for t in response_ids]
        self.strict = strict
        self.table: dict[tuple[int, int], int] = {}
        arr = np.asarray(ids, dtype=np.int64)
        # Sequential contexts (prefixes) first: they are unique. Parallel contexts fill in the rest; the few
        # that collide (the number after <step> in sibling steps) are forced by the engine, never asked for.
        fixed = set()
        for layout in ("sequential", "parallel"):
            g = ExecutionGraph.from_token_ids(ids, tokenizer, prompt_len=len(prompt_ids), layout=layout,
                                              constraints=constraints)
            if g.token_ids != ids:
                raise ValueError("the trajectory does not serialize to itself (is it a valid NPR response?)")
            mask = g.layout().dense_mask()
            for t in range(len(prompt_ids), len(ids)):
                ctx = tuple(arr[:t][mask[t, :t]].tolist())
                key = (len(ctx), hash(ctx))
                if layout == "sequential":
                    self.table[key] = ids[t]
                    fixed.add(key)
                elif key not in fixed and self.table.setdefault(key, ids[t]) != ids[t]:
                    self.table[key] = -1
        self._template: torch.Tensor | None = None

    def next_token(self, context_ids: list[int]) -> int | None:
        """The trajectory's next token after this context; None if off the trajectory, -1 if ambiguous."""
        ctx = tuple(context_ids)
        return self.table.get((len(ctx), hash(ctx)))

    def __call__(self, context_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        want = self.next_token(context_ids)
        if want is None or want < 0:
            if self.strict:
                what = "is not on" if want is None else "is ambiguous in"
                raise KeyError(f"a context of length {len(context_ids)} {what} the forced trajectory")
            return logits
        t = self._template
        if t is None or t.shape != logits.shape or t.device != logits.device or t.dtype != logits.dtype:
            t = self._template = torch.full_like(logits, float("-inf"))
        out = t.clone()
        out[want] = 0.0
        return out
