"""NPR-MathText-v0: one step is a whole response text (for API models and text-level agents)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..constraints import ConstraintSet
from ..graph import ExecutionGraph
from ..prompts import PromptConfig, prompt_ids, user_turn
from ..schema import TAGS
from .common import ProblemSource, constraints_for, question_and_answer, render_env, score

# What AnyText.sample draws from: printable ASCII, whitespace, the tags and a few non-ASCII characters.
_SAMPLE_PIECES = (*(chr(c) for c in range(32, 127)), "\n", "\t", "é", "π", "∑", "√", "中", "🙂", *TAGS)


class AnyText(spaces.Text):
    """A ``Text`` space that contains every ``str`` of ``min_length..max_length`` characters.

    ``spaces.Text`` only contains strings over its charset, but model output can hold any character (LaTeX,
    Unicode, emoji, tags), so membership here checks the type and length only. ``sample()`` mixes printable
    ASCII, whitespace, non-ASCII characters and whole NPR tags, capped at ``sample_max_length`` pieces so
    that a large ``max_length`` does not make samples huge.
    """

    def __init__(self, max_length: int, min_length: int = 0, sample_max_length: int = 64,
                 seed: int | np.random.Generator | None = None):
        super().__init__(max_length=max_length, min_length=min_length, seed=seed)
        self.sample_max_length = sample_max_length

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        if mask is not None or probability is not None:
            return super().sample(mask=mask, probability=probability)
        hi = min(self.max_length, self.sample_max_length)
        n = int(self.np_random.integers(self.min_length, max(self.min_length, hi) + 1))
        picks = self.np_random.integers(len(_SAMPLE_PIECES), size=n)
        text = "".join(_SAMPLE_PIECES[i] for i in picks)
        return text[: self.max_length] if len(text) >= self.min_length else text.ljust(self.min_length)

    def __repr__(self) -> str:
        return f"AnyText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, AnyText) and self.min_length == other.min_length
                and self.max_length == other.max_length)


class NPRMathTextEnv(gym.Env):
    """
    ## Description

    The text-level view of NPR-Math: one episode is one problem and one step, whose action is the whole
    response text. The env tokenizes it, builds the execution graph (prompt + response) and scores it, like a
    single-turn math env, but with NPR's structure checks and graph statistics.

    ## Action Space

    :class:`AnyText` with ``max_length=max_chars``: any ``str`` (Unicode and tags included). Text past
    ``max_chars`` is cut off and the episode is truncated.

    ## Observation Space

    :class:`AnyText`: the user turn, i.e. the question followed by ``npr_env.INSTRUCTION`` when
    ``instruction=True`` (the default here, since this env is meant for instruct models that must be told the
    format). Apply your own chat template.

    ## Rewards

    ``npr_env.rewards.score(reward, graph, gold, truncated)`` for the preset ``reward``, as in
    :class:`NPRMathEnv`: ``"stage1"`` (default: +-1 accuracy when valid, ``-1 + format_score / 2`` when not),
    ``"papo"`` (+-1 accuracy; invalid or truncated responses are marked ``dropped``) or ``"accuracy"``.

    ## Starting State

    ``reset`` draws a problem with the env RNG (``options={"problem": p}`` pins one).

    ## Episode End

    After one step: terminated, or truncated when the response was longer than ``max_chars``. ``info`` has
    the graph ``stats``, ``violations``, ``format_score``, ``answer``, ``correct``, ``valid`` and ``dropped``.

    ## Arguments

    ``tasks``, ``task_kwargs``, ``tokenizer``, ``chat_kwargs``, ``constraints`` and ``reward`` as in
    :class:`NPRMathEnv`; ``instruction`` (True); ``max_chars`` (100_000); ``render_mode`` ``"ansi"`` or
    ``"rgb_array"``. With the shipped char tokenizer, characters outside printable ASCII become ``<unk>`` in
    the graph, so an answer that needs them can only be verified with a real tokenizer.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 1}

    def __init__(self, tasks: Any = None, tokenizer=None, *, max_chars: int = 100_000,
                 constraints: str | ConstraintSet | None = None, reward: str = "stage1",
                 instruction: bool = True, chat_kwargs: dict | None = None, task_kwargs: dict | None = None,
                 render_mode: str | None = None):
        if tokenizer is None:
            from ..tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            modes = self.metadata["render_modes"]
            raise ValueError(f"render_mode must be one of {modes}, not {render_mode!r}")
        self.tokenizer, self.constraints = tokenizer, constraints_for(reward, constraints)
        from ..rewards import REWARD_PRESETS

        if reward not in REWARD_PRESETS:
            raise ValueError(f"unknown reward preset {reward!r}; choose one of {sorted(REWARD_PRESETS)}")
        self.max_chars, self.reward_preset, self.instruction = int(max_chars), reward, instruction
        self.chat_kwargs, self.render_mode = chat_kwargs, render_mode
        self.source = ProblemSource(tasks, task_kwargs)
        self.action_space = AnyText(max_length=self.max_chars)
        self.observation_space = AnyText(max_length=1 << 20)
        self.graph: ExecutionGraph | None = None
        self.problem: Any = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.problem = options["problem"] if "problem" in options else self.source.draw(self.np_random)
        self.problem_id, question, self.gold = question_and_answer(self.problem)
        prompt_cfg = PromptConfig(self.instruction, dict(self.chat_kwargs or {}))
        self.prompt = user_turn(question, prompt_cfg)
        self._prompt_ids = prompt_ids(self.tokenizer, question, prompt_cfg)
        self.graph = ExecutionGraph(self.tokenizer, self._prompt_ids, constraints=self.constraints)
        self._done = False
        return self.prompt, {"problem_id": self.problem_id}

    def step(self, action: str):
        if self.graph is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset()")
        if not isinstance(action, str):
            raise TypeError(f"the action is the response text (str), got {type(action).__name__}")
        truncated = len(action) > self.max_chars
        text = action[: self.max_chars]
        ids = self._prompt_ids + [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        self.graph = ExecutionGraph.from_token_ids(ids, self.tokenizer, prompt_len=len(self._prompt_ids),
                                                   constraints=self.constraints)
        reward, extra = score(self.reward_preset, self.graph, self.gold, truncated=truncated)
        self._done = True
        info = {"problem_id": self.problem_id, "stats": self.graph.stats.as_dict(), **extra}
        return self.prompt, reward, not truncated, truncated, info

    def render(self):
        return render_env(self, "NPRMathTextEnv", "NPR-MathText-v0")
