"""What the two NPR envs share: drawing a problem and scoring a finished graph (prompts: ``npr_env.prompts``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..constraints import ConstraintSet, resolve
from ..graph import ExecutionGraph
from ..schema import last_boxed


def question_and_answer(problem: Any) -> tuple[str, str, str]:
    """``(id, question, gold answer)`` of a Problem, or of any object or mapping with those fields."""
    get = problem.get if isinstance(problem, dict) else lambda k, d=None: getattr(problem, k, d)
    question, answer = get("question"), get("answer")
    if not isinstance(question, str) or answer is None:
        raise ValueError(f"a problem needs a str `question` and an `answer`, got {type(problem).__name__}: "
                         f"question={question!r:.80}, answer={answer!r:.80}")
    return str(get("id", "") or ""), question, str(answer)


class ProblemSource:
    """Draws one problem per episode with the env's RNG, so that ``reset(seed=s)`` fixes the problem.

    ``tasks`` may be:

    * None: procedural arithmetic, ``npr_env.tasks.ProceduralTasks(**task_kwargs)`` (the tiny preset's
      ``num_subproblems=(2, 4), digits=(2, 1)`` by default);
    * a sized, indexable collection of problems (a list, an HF dataset): drawn uniformly;
    * an indexable endless source such as ``ProceduralTasks``: ``tasks[i]`` with ``i`` drawn from the RNG;
    * any object with ``sample(n) -> list[Problem]``: called as is (its own RNG decides, so seed it).
    """

    def __init__(self, tasks: Any = None, task_kwargs: dict | None = None):
        if tasks is not None and not hasattr(tasks, "__getitem__") and not hasattr(tasks, "sample"):
            raise TypeError(f"tasks must be None, a list of problems, an indexable source or an object with "
                            f"sample(n); got {type(tasks).__name__}")
        if hasattr(tasks, "__len__") and len(tasks) == 0:
            raise ValueError("tasks is empty")
        if task_kwargs and tasks is not None:
            raise ValueError("task_kwargs configure the default procedural tasks, not a source you pass")
        self.tasks = tasks
        self.task_kwargs = dict(task_kwargs or {})

    def draw(self, rng: np.random.Generator) -> Any:
        if self.tasks is None:
            from ..tasks import ProceduralTasks  # lazy: the env module stays light to import

            self.tasks = ProceduralTasks(**self.task_kwargs)
        t = self.tasks
        if hasattr(t, "__getitem__") and hasattr(t, "__len__"):
            return t[int(rng.integers(len(t)))]
        if hasattr(t, "__getitem__"):
            return t[int(rng.integers(2**31 - 1))]
        return t.sample(1)[0]


# The constraint set each reward preset grades with (npr_env.rewards); the env stops early under the same one.
PRESET_CONSTRAINTS = {"stage1": "relaxed", "papo": "strict", "accuracy": "relaxed"}


def constraints_for(reward: str, constraints: str | ConstraintSet | None) -> ConstraintSet:
    """The env's constraint set: the one given, else the one the reward preset grades with."""
    if constraints is None:
        constraints = PRESET_CONSTRAINTS.get(reward, "strict")
    return resolve(constraints)


def score(preset: str, graph: ExecutionGraph, gold: str, truncated: bool = False) -> tuple[float, dict]:
    """Terminal reward of ``graph`` under a reward preset, and the info fields that explain it."""
    from .. import rewards  # lazy: rewards imports the verifier

    r = rewards.score(preset, graph, gold, truncated=truncated)
    answer = last_boxed(graph.final_text())
    return float(r.reward), {
        "answer": answer, "correct": bool(r.correct), "valid": bool(r.valid), "dropped": bool(r.dropped),
        "format_score": float(r.format_score), "violations": tuple(v.code for v in graph.violations),
    }


def render_env(env, cls_name: str, env_id: str):
    """``render()`` of both NPR envs: an ANSI tree or a picture of the episode's graph."""
    import gymnasium as gym

    if env.render_mode is None:
        gym.logger.warn(f"render() needs a render_mode: {cls_name}(render_mode='ansi' | 'rgb_array')")
        return None
    if env.graph is None:
        raise RuntimeError("call reset() before render()")
    from .. import render

    partial = not env._done  # mid-episode: only the violations already certain
    if env.render_mode == "ansi":
        return render.render_ansi(env.graph, partial=partial)
    return render.render_rgb(env.graph, partial=partial, title=f"{env_id} {env.problem_id}".strip())

