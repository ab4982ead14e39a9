"""Replay of mixed groups: the problems whose rollout group carried an advantage come back in a later RL step.

Past stage 2 most groups are all right and carry no advantage; the mixed ones (some rollouts right, some wrong)
are the problems the policy is learning on. A step's prompts are up to ``k`` problems taken from this buffer,
newest first, then fresh problems. A replayed problem gets a fresh group of rollouts from the current policy,
so the update stays on-policy; it returns to the buffer only if that group is mixed again::

    replay = MixedGroupReplay(capacity=32)
    taken = replay.take(4)
    prompts = taken + fresh[: n - len(taken)]
    ...                                            # roll out, score, advantages
    replay.add([p for p, mixed in zip(prompts, mixed_flags) if mixed])

The buffer is part of the training state (:meth:`state_dict`), so a resumed run replays what it would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from npr_env.tasks import Problem


class MixedGroupReplay:
    """A bounded buffer of problems, newest last; :meth:`take` pops the newest, :meth:`add` drops the oldest."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.problems: list[Problem] = []

    def __len__(self) -> int:
        return len(self.problems)

    def take(self, k: int) -> list[Problem]:
        """Up to ``k`` problems, newest first; they leave the buffer."""
        k = min(k, len(self.problems))
        taken = self.problems[len(self.problems) - k:][::-1]
        del self.problems[len(self.problems) - k:]
        return taken

    def add(self, problems: Sequence[Problem]) -> None:
        """Append ``problems`` (a repeat of one already held moves to the newest end); keep the newest ``capacity``."""
        ids = {p.id for p in problems}
        self.problems = [p for p in self.problems if p.id not in ids] + list(problems)
        del self.problems[: max(0, len(self.problems) - self.capacity)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "problems": [asdict(p) for p in self.problems]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.problems = [Problem(**p) for p in state["problems"]]


def mixed_groups(advantages: Sequence[float], group_size: int) -> list[bool]:
    """Per group of ``group_size`` consecutive rollouts: whether any of them has a nonzero advantage."""
    return [any(a != 0 for a in advantages[i:i + group_size]) for i in range(0, len(advantages), group_size)]
