"""Branches: the life cycle of the branches of one NPR trajectory, shared by every driver.

The native engine's scheduler, the orchestrator (fork/join over a sequential server) and the token-level env
all decode a trajectory as a set of branches, one ``npr_env`` cursor each. This module is the one place that
says what happens to them:

* :meth:`Trajectory.append` appends a token to a branch, then checks, in this order: EOS, a stop token the
  policy chose (forced tokens never stop), a format violation (when ``stop_on_violation``), the budget (the
  branch's critical path and the trajectory's total); the first that holds ends the trajectory. Only then the
  structure: a guideline that closed with plans makes the branch ``FORKING`` if the driver's fork rule agrees
  (else the steps follow each other in the branch), and a child that closed its own ``</step>`` is
  ``FINISHING``.
* The driver carries these out when it is ready (the engine after one more forward, which gives the forced
  token's logprob; the orchestrator and the env at once): :meth:`Trajectory.fork` opens one child per plan
  with ``<step>N:`` queued in ``forced``; :meth:`Trajectory.finish_child` retires a child, and the last one
  joins the parent, which gets ``<takeaway>`` queued.
* :meth:`Trajectory.rollout` turns the graph into the fields of a rollout.

A driver supplies how it obtains next tokens (its own loop), its fork rule (``Rules.may_fork``) and
:class:`Hooks` for what a fork, a finished child, a join and the end mean for its resources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .graph import Event, ExecutionGraph
from .schema import STEP_OPEN, TAKEAWAY_OPEN

# Branch states. A WAITING branch holds a fork whose children are running.
ACTIVE, FORKING, FINISHING, WAITING, DONE = range(5)


class Branch:
    """One line of decoding: a cursor, its place in the fork tree, and its critical-path length."""

    __slots__ = ("traj", "cursor", "parent", "children", "n_done", "path_len", "state", "forced")

    def __init__(self, traj: Trajectory, cursor, parent: Branch | None = None):
        self.traj, self.cursor, self.parent = traj, cursor, parent
        self.children: list[Branch] = []
        self.n_done = 0  # children that finished
        self.path_len = parent.path_len if parent is not None else 0  # the prefix counts for every child
        self.state = ACTIVE
        self.forced: list[int] = []  # tokens the driver must append next, in order (forced=True)

    @property
    def is_step(self) -> bool:
        return self.parent is not None


class Hooks:
    """What the life cycle means for a driver's resources. Every method is a no-op here; override some."""

    def new_branch(self, traj: Trajectory, cursor, parent: Branch | None) -> Branch:
        """Make the root (``parent`` None) or a child branch; a driver may return a subclass."""
        return Branch(traj, cursor, parent)

    def forked(self, parent: Branch, children: list[Branch]) -> None:
        """The children exist; their ``forced`` holds ``<step>N:``."""

    def child_done(self, child: Branch) -> None:
        """A child closed its step (before the join, if it was the last)."""

    def joined(self, parent: Branch, children: list[Branch]) -> None:
        """Every child finished and the parent's cursor joined them; ``<takeaway>`` is queued."""

    def ended(self, traj: Trajectory) -> None:
        """The trajectory ended (any reason): release what it holds. Called once."""


def never(branch: Branch) -> bool:
    return False


def fork_within(max_depth: int, min_budget: int) -> Callable[[Branch], bool]:
    """The engines' fork rule: fork above ``max_depth`` only, with at least ``min_budget`` tokens left."""

    def may_fork(b: Branch) -> bool:
        return b.cursor.depth < max_depth and b.traj.remaining(b) >= min_budget

    return may_fork


@dataclass(frozen=True)
class Rules:
    """The limits every trajectory of one call shares, and the driver's fork rule."""

    max_path: int  # tokens on one branch's critical path (the parent's tokens count for every child)
    max_total: int  # tokens over all branches
    stop_ids: frozenset[int] = frozenset()
    stop_on_violation: bool = False
    may_fork: Callable[[Branch], bool] = never
    hooks: Hooks = Hooks()


class Trajectory:
    """One rollout being decoded: its graph, its branches, and the end conditions they share."""

    def __init__(self, graph: ExecutionGraph, rules: Rules):
        self.graph, self.rules = graph, rules
        self.prompt_ids: list[int] = list(graph.token_ids[:graph.prompt_len])
        vocab = graph.vocab
        self.vocab = vocab
        self.step_open, self.takeaway_open = vocab.id_of[STEP_OPEN], vocab.id_of[TAKEAWAY_OPEN]
        self.branches: list[Branch] = []
        self.active: list[Branch] = []
        self.total = self.num_forks = 0
        self.n_found = 0  # parser flags seen by the last violation check
        self.done = False
        self.finish_reason = ""

    def start(self, auto_fork: bool = False) -> Branch:
        """The root branch, at the end of the prompt (``auto_fork``: the cursor routes steps itself)."""
        root = self._new(self.graph.cursor(auto_fork=auto_fork), None)
        self.active = [root]
        return root

    def _new(self, cursor, parent: Branch | None) -> Branch:
        b = self.rules.hooks.new_branch(self, cursor, parent)
        self.branches.append(b)
        return b

    def remaining(self, b: Branch) -> int:
        """Tokens ``b`` may still append before the budget ends the trajectory."""
        return min(self.rules.max_path - b.path_len, self.rules.max_total - self.total)

    # -- one token -------------------------------------------------------------------------------------------
    def append(self, b: Branch, tok: int, lp: float | None = None, forced: bool = False) -> Event:
        """Append ``tok`` to ``b`` (meta ``(lp, forced)``), then apply the end checks and the structure rules."""
        cur, rules = b.cursor, self.rules
        ev = cur.append(tok, (lp, forced))
        b.path_len += 1
        self.total += 1
        if ev is Event.EOS:
            self.end("eos")
        elif not forced and tok in rules.stop_ids:
            self.end("stop")
        elif rules.stop_on_violation and self._violated():
            self.end("violation")
        elif b.path_len >= rules.max_path or self.total >= rules.max_total:
            self.end("length")
        elif ev is Event.FORK:
            if rules.may_fork(b):
                b.state = FORKING
            else:
                cur.decline_fork()  # the steps follow each other in this branch
        elif ev is Event.STEP_DONE and b.parent is not None and cur.trace is cur.home:
            b.state = FINISHING
        return ev

    def append_forced(self, b: Branch, lp: float | None = None) -> Event:
        """Append the next of ``b.forced``."""
        return self.append(b, b.forced.pop(0), lp, True)

    def _violated(self) -> bool:
        g = self.graph
        found = g.num_flags  # cheap: the full check only runs when the parser flagged something new
        if found == self.n_found:
            return False
        self.n_found = found
        return bool(g.violations_so_far())

    # -- structure -------------------------------------------------------------------------------------------
    def fork(self, b: Branch) -> list[Branch]:
        """Open one child per plan of ``b``'s guideline (``b`` must be FORKING); each gets ``<step>N:`` queued."""
        cur = b.cursor
        numbers = cur.step_numbers()
        children = [self._new(cc, b) for cc in cur.fork()]
        for num, c in zip(numbers, children):
            c.forced = [self.step_open, *self.vocab.step_number_ids(num)]
        b.state, b.children, b.n_done = WAITING, children, 0
        i = self.active.index(b)
        self.active[i:i + 1] = children
        self.num_forks += 1
        self.rules.hooks.forked(b, children)
        return children

    def finish_child(self, c: Branch) -> Branch | None:
        """Retire a child that closed its step; when it is the last, join and return the parent."""
        c.state = DONE
        self.active.remove(c)
        hooks = self.rules.hooks
        hooks.child_done(c)
        p = c.parent
        p.n_done += 1
        if p.n_done < len(p.children):
            return None
        children = p.children
        p.cursor.join()
        p.path_len = max(ch.path_len for ch in children)  # the parent continues after the longest step
        p.children = []
        p.state = ACTIVE
        p.forced = [self.takeaway_open]
        self.active.append(p)
        hooks.joined(p, children)
        return p

    def end(self, reason: str) -> None:
        """End the trajectory (``reason`` "" for one the driver restarts); the hooks release it once."""
        if self.done:
            return
        self.done = True
        self.finish_reason = reason
        self.active = []
        self.rules.hooks.ended(self)

    # -- the result ------------------------------------------------------------------------------------------
    def rollout(self, factory: Callable, **fields):
        """``factory(**rollout fields, **fields)``: token ids, per-token logprobs (NaN where none was given) and
        forced marks, finish."""
        g = self.graph
        meta = g.token_meta()[g.prompt_len:]
        reason = self.finish_reason or "aborted"
        return factory(prompt_ids=self.prompt_ids, token_ids=g.response_ids,
                       logprobs=[float("nan") if m[0] is None else float(m[0]) for m in meta], forced_mask=[bool(m[1]) for m in meta], graph=g,
                       layout=g.layout_kind, finish_reason=reason, truncated=reason not in ("eos", "stop"),
                       num_tokens=len(meta), num_forks=self.num_forks, **fields)
