"""NPR-Math-v0: token-level, natively parallel math reasoning."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..branches import ACTIVE, FINISHING, FORKING, Branch, Hooks, Rules, Trajectory
from ..constraints import ConstraintSet
from ..graph import ExecutionGraph, Trace
from ..prompts import PromptConfig, prompt_ids
from ..schema import MAX_DEPTH
from .common import ProblemSource, constraints_for, question_and_answer, render_env, score


class _SlotBranch(Branch):
    __slots__ = ("slot",)


class _Slots(Hooks):
    """Branch slots: a branch keeps its slot while it lives (a parent too, until the join); a fork gives its
    children the lowest free slots, in plan order."""

    def __init__(self, n: int):
        self.branch: list[_SlotBranch | None] = [None] * n

    def free(self) -> list[int]:
        return [s for s, b in enumerate(self.branch) if b is None]

    def new_branch(self, traj, cursor, parent) -> _SlotBranch:
        b = _SlotBranch(traj, cursor, parent)
        b.slot = self.free()[0]
        self.branch[b.slot] = b
        return b

    def child_done(self, child: _SlotBranch) -> None:
        self.branch[child.slot] = None


class NPRMathEnv(gym.Env):
    """
    ## Description

    One episode is one math problem answered in the NPR format. The response is an execution graph
    (:class:`npr_env.ExecutionGraph`) decoded token by token, with parallel branches side by side: when a
    ``</guideline>`` closes with ``n`` numbered plans, the branch forks into ``n`` step branches that the
    agent then decodes in lockstep, one token per branch per step, as the NPR engine does. The env owns the
    structure: it forks, forces each child's ``<step>N:`` prefix, joins the children once all of them closed
    their ``</step>``, and forces ``<takeaway>`` into the parent. Positions and visibility always come from
    the graph (the project's single layout), never from the env.

    ## Action Space

    ``MultiDiscrete([vocab_size] * num_slots)``: one token id per branch *slot*. Only the active slots
    (``obs["active"]``) are read; the others are ignored. A branch keeps its slot for as long as it lives:
    the root is slot 0, and a fork gives its children the lowest free slots in plan order (the parent keeps
    its own slot, inactive, until the join). Ids in ``[len(tokenizer), vocab_size)`` (a model's padded
    vocabulary) are accepted and count as plain text.

    ## Observation Space

    A ``Dict`` of fixed-shape arrays (so vector envs can stack them); the first ``L = obs["length"]``
    entries are valid:

    * ``tokens`` ``[max_len]`` int64: prompt + response ids in serialized order, padded with the pad id;
    * ``positions`` ``[max_len]`` int64: position id of each token (``graph.position_ids()``), 0 when padded;
    * ``hide_lo``, ``hide_hi`` ``[max_len, max_depth]`` int64: compact visibility from ``graph.layout()``:
      token ``q`` may not see serialized indices in ``[hide_lo[q, d], hide_hi[q, d])`` (``[0, 0)`` = unused);
    * ``forced`` ``[max_len]`` int8: 1 for tokens the env forced (``<step>``, ``N``, ``:``, ``<takeaway>``);
    * ``length`` ``()`` int64: ``L``;
    * ``frontier`` ``[num_slots]`` int64: serialized index of each active slot's last token (its logits
      give the slot's next token), -1 when inactive;
    * ``active`` ``[num_slots]`` int8: 1 where the slot's token is read this step.

    The serialized order is the graph's (parent up to a fork, child 1, child 2, ..., the parent again), so
    the indices of later tokens shift as earlier branches grow: every observation is a fresh snapshot.

    ## Rewards

    0 on every step but the last. The terminal reward is ``npr_env.rewards.score(reward, graph, gold,
    truncated)`` for the preset ``reward``:

    * ``"stage1"`` (default; relaxed rules): +1 / -1 for a right / wrong answer when the structure is valid,
      else ``-1 + format_score / 2`` in ``[-2, -1)``, below every valid response;
    * ``"papo"`` (strict rules): +1 / -1 accuracy (0 when empty); an invalid or truncated episode is marked
      ``info["dropped"]`` (PAPO removes it from the batch instead of penalising it);
    * ``"accuracy"``: +1 / -1 with no format gate.

    With ``early_stop`` (on by default, except for ``"accuracy"``) the episode ends at the first token that
    makes a violation of the env's constraint set certain, and that prefix is scored as the whole response:
    under ``"stage1"`` the reward is then ``-1 + graph.format_score() / 2``. The constraint set defaults to
    the one the preset grades with, so an early stop never contradicts the final verdict.

    ## Starting State

    ``reset`` draws a problem from ``tasks`` with the env RNG (``options={"problem": p}`` pins one), builds
    the prompt through the tokenizer's chat template (the user turn is the question, plus
    ``npr_env.INSTRUCTION`` when ``instruction=True``) and starts the graph with the root active in slot 0.

    ## Episode End

    Terminated: ``<eos>`` in the root; ``<eos>`` inside a step (invalid: the step never closes); or, with
    ``early_stop``, the first certain violation. Truncated: the token buffer (``max_len``, prompt included)
    is full, or ``max_steps`` steps were taken; the reward is then ``rewards.score(..., truncated=True)``.

    ``info`` always has the graph ``stats``, the ``violations`` codes so far, ``forced_tokens``,
    ``sampled_tokens``, ``forks``, ``declined_forks``, and each slot's branch: ``slot_paths`` (``()`` for
    the root, ``parent_path + (k, i)`` for step ``i`` of the ``k``-th block of its parent, None for a free
    slot) and ``slot_lengths`` (tokens in that branch's own trace). At the end it also has ``answer``,
    ``correct``, ``valid``, ``dropped`` and ``format_score``.

    ## Arguments

    * ``tasks``: None (procedural arithmetic; ``task_kwargs`` go to ``ProceduralTasks``), a list of problems
      (objects or dicts with ``question`` and ``answer``), an indexable source, or an object with
      ``sample(n)``; see :class:`~npr_env.envs.common.ProblemSource`.
    * ``tokenizer``: default ``npr_env.load_tokenizer()`` (the shipped char tokenizer); any HF tokenizer
      whose 8 tags are single tokens (``npr_env.add_npr_tokens``). ``chat_kwargs`` go to
      ``apply_chat_template`` (e.g. ``{"enable_thinking": False}`` for Qwen3).
    * ``instruction`` (False): append the NPR instruction to the question. Off by default because the
      shipped tiny models learn the format from data and the instruction costs ~750 char tokens; turn it on
      for real instruct models.
    * ``max_len`` (512): token buffer, prompt included. ``num_slots`` (8): most branches alive at once.
      ``max_depth`` (the constraint set's, 5): deepest parallel nesting, and the width of ``hide_lo/hi``.
      A fork that finds too few free slots, is deeper than ``max_depth``, or has no room left for its forced
      tokens is declined: its steps then follow each other in the same branch (sequential layout).
    * ``reward``: ``"stage1"`` (default), ``"papo"`` or ``"accuracy"``. ``constraints``: ``"strict"``,
      ``"relaxed"`` or a ``ConstraintSet`` (default: the preset's). ``early_stop`` (default: on, except for
      ``"accuracy"``). ``max_steps``: optional step limit. ``vocab_size``: action range (default
      ``len(tokenizer)``).
    * ``render_mode``: ``"ansi"`` (text tree) or ``"rgb_array"`` (lanes picture).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, tasks: Any = None, tokenizer=None, *, max_len: int = 512, num_slots: int = 8,
                 max_depth: int | None = None, max_steps: int | None = None,
                 constraints: str | ConstraintSet | None = None, reward: str = "stage1",
                 instruction: bool = False, early_stop: bool | None = None, vocab_size: int | None = None,
                 chat_kwargs: dict | None = None,
                 task_kwargs: dict | None = None, render_mode: str | None = None):
        if tokenizer is None:
            from ..tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            modes = self.metadata["render_modes"]
            raise ValueError(f"render_mode must be one of {modes}, not {render_mode!r}")
        if num_slots < 2:
            raise ValueError(f"num_slots must be at least 2 (a root and one step), got {num_slots}")
        self.tokenizer = tokenizer
        self.constraints = constraints_for(reward, constraints)
        self.max_len, self.num_slots = int(max_len), int(num_slots)
        default_depth = min(self.constraints.max_depth, MAX_DEPTH)
        self.max_depth = int(max_depth if max_depth is not None else default_depth)
        self.max_steps = max_steps
        from ..rewards import REWARD_PRESETS

        if reward not in REWARD_PRESETS:
            raise ValueError(f"unknown reward preset {reward!r}; choose one of {sorted(REWARD_PRESETS)}")
        self.reward_preset, self.instruction = reward, instruction
        # Stopping at a format violation is a format gate, so the ungated "accuracy" preset does not stop.
        self.early_stop = reward != "accuracy" if early_stop is None else bool(early_stop)
        self.chat_kwargs = chat_kwargs
        self.render_mode = render_mode
        self.source = ProblemSource(tasks, task_kwargs)
        self.vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        L, D, S = self.max_len, self.max_depth, self.num_slots
        self.action_space = spaces.MultiDiscrete([self.vocab_size] * S)
        self.observation_space = spaces.Dict({
            "tokens": spaces.Box(0, self.vocab_size - 1, (L,), np.int64),
            "positions": spaces.Box(0, L - 1, (L,), np.int64),
            "hide_lo": spaces.Box(0, L, (L, D), np.int64),
            "hide_hi": spaces.Box(0, L, (L, D), np.int64),
            "forced": spaces.MultiBinary(L),
            "length": spaces.Box(0, L, (), np.int64),
            "frontier": spaces.Box(-1, L - 1, (S,), np.int64),
            "active": spaces.MultiBinary(S),
        })
        self.graph: ExecutionGraph | None = None
        self.problem: Any = None

    # -- episode ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.problem = options["problem"] if "problem" in options else self.source.draw(self.np_random)
        self.problem_id, question, self.gold = question_and_answer(self.problem)

        ids = prompt_ids(self.tokenizer, question, PromptConfig(self.instruction, dict(self.chat_kwargs or {})))
        if len(ids) >= self.max_len:
            name = self.problem_id or question[:40]
            raise ValueError(f"the prompt of problem {name!r} has {len(ids)} tokens, "
                             f"which does not fit max_len={self.max_len}")
        self.graph = ExecutionGraph(self.tokenizer, ids, constraints=self.constraints, layout="parallel")
        self._slots = _Slots(self.num_slots)
        # the buffer is the budget: the episode is truncated once prompt + response fill max_len
        rules = Rules(max_path=self.max_len, max_total=self.max_len - len(ids), stop_on_violation=self.early_stop,
                      may_fork=self._may_fork, hooks=self._slots)
        self._traj = Trajectory(self.graph, rules)
        self._traj.start()
        self._forced = self._sampled = self._steps = self._forks = self._declined = 0
        self._done = False
        return self._obs(), self._info()

    def step(self, action):
        if self.graph is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset()")
        action = np.asarray(action).reshape(-1)
        if action.shape != (self.num_slots,):
            raise ValueError(f"expected {self.num_slots} token ids (one per slot), got shape {action.shape}")
        slots, traj = self._slots.branch, self._traj
        live = [s for s in range(self.num_slots) if self._active(s)]  # snapshot: new slots wait
        bad = [int(action[s]) for s in live if not 0 <= int(action[s]) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad} are outside the action space [0, {self.vocab_size})")
        self._steps += 1
        for s in live:
            if not self._active(s):
                continue
            b = slots[s]
            traj.append(b, int(action[s]))
            self._sampled += 1
            if b.state == FORKING:
                self._forks += 1
                for c in traj.fork(b):
                    self._force(c)
            elif b.state == FINISHING:  # this branch closed its own </step>; the last one joins the parent
                parent = traj.finish_child(b)
                if parent is not None:
                    self._force(parent)
            if traj.done:
                break
        # EOS (in the root: done; inside a step: done and invalid, the step never closed) or a certain
        # violation terminate; a full buffer truncates
        ended = traj.done and traj.finish_reason != "length"
        full = traj.done and not ended
        truncated = not ended and (full or (self.max_steps is not None and self._steps >= self.max_steps))
        reward, info = 0.0, self._info()
        if ended or truncated:
            self._done = True
            reward, extra = score(self.reward_preset, self.graph, self.gold, truncated=truncated)
            info.update(extra)
        return self._obs(), reward, ended, truncated, info

    # -- branch bookkeeping -------------------------------------------------------------------------------
    def _active(self, slot: int) -> bool:
        b = self._slots.branch[slot]
        return b is not None and b.state == ACTIVE

    def _force(self, b: Branch) -> None:
        """Append the tokens the life cycle queued for ``b`` (a child's ``<step>N:``, a parent's ``<takeaway>``)."""
        while b.forced and not self._traj.done:
            self._traj.append_forced(b)
            self._forced += 1

    def _may_fork(self, b: Branch) -> bool:
        """Fork only with a free slot per plan, within max_depth, and room for every forced prefix plus one
        token each; else the steps follow each other in this branch."""
        cur = b.cursor
        numbers = cur.step_numbers()
        need = sum(len(self.graph.vocab.step_number_ids(n)) + 2 for n in numbers) + 1  # <step>, N:, one more
        block = cur.pending_block()
        if (len(self._slots.free()) < len(numbers) or block is None or block.depth > self.max_depth
                or self.max_len - len(self.graph) < need):
            self._declined += 1
            return False
        return True

    # -- views --------------------------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        g, L, D, S = self.graph, self.max_len, self.max_depth, self.num_slots
        ids = g.token_ids
        n = min(len(ids), L)
        lay = g.layout()
        tokens = np.full(L, self.pad_id, dtype=np.int64)
        tokens[:n] = ids[:n]
        positions = np.zeros(L, dtype=np.int64)
        positions[:n] = lay.position_ids[:n]
        lo, hi = np.zeros((L, D), dtype=np.int64), np.zeros((L, D), dtype=np.int64)
        d = min(D, lay.hide_lo.shape[1])  # fork depth <= max_depth, so nothing is cut here
        lo[:n, :d], hi[:n, :d] = lay.hide_lo[:n, :d], lay.hide_hi[:n, :d]
        forced = np.zeros(L, dtype=np.int8)
        forced[:n] = [m is not None and m[1] for m in g.token_meta()[:n]]
        frontier = np.full(S, -1, dtype=np.int64)
        active = np.zeros(S, dtype=np.int8)
        if not self._done:
            for s in range(S):
                cur = self._slots.branch[s].cursor if self._active(s) else None
                if cur is not None and cur.trace.ids:
                    frontier[s] = g.serial_index(cur.trace, len(cur.trace.ids) - 1)
                    active[s] = 1
        return {"tokens": tokens, "positions": positions, "hide_lo": lo, "hide_hi": hi, "forced": forced,
                "length": np.array(n, dtype=np.int64), "frontier": frontier, "active": active}

    def _info(self) -> dict:
        paths, lengths = [], np.zeros(self.num_slots, dtype=np.int64)
        for s in range(self.num_slots):
            b = self._slots.branch[s]
            cur = b.cursor if b is not None else None
            paths.append(branch_path(cur.trace) if cur is not None else None)
            lengths[s] = len(cur.trace.ids) if cur is not None else 0
        return {"problem_id": self.problem_id, "stats": self.graph.stats.as_dict(),
                "violations": tuple(v.code for v in self.graph.violations_so_far()),
                "forced_tokens": self._forced, "sampled_tokens": self._sampled, "forks": self._forks,
                "declined_forks": self._declined,
                "slot_paths": tuple(paths), "slot_lengths": lengths}

    def render(self):
        return render_env(self, "NPRMathEnv", "NPR-Math-v0")


def branch_path(trace: Trace) -> tuple[int, ...]:
    """Where a trace sits in its graph: ``()`` for the root, ``parent_path + (k, i)`` for step ``i`` of the
    ``k``-th block of its parent trace. The same structure parsed serially gives the same paths."""
    path: list[int] = []
    while trace.parent is not None:
        block = trace.parent
        path[:0] = [block.parent.blocks.index(block), trace.index]
        trace = block.parent
    return tuple(path)
