"""Rewards: format score, accuracy, and the stage presets. Small pure functions of (response, gold).

A response is either text or an :class:`~npr_env.graph.ExecutionGraph` (what the engine returns); a graph in
the sequential layout is judged on its text, so tags spelled in ordinary pieces score as tag tokens do. Accuracy
is *gated* on validity rather than topped up by a format bonus, so format can never pay for a wrong answer:

* ``stage1`` (NPR-Zero, format discovery, relaxed constraints): a valid response earns ``+1``/``-1`` for
  accuracy; an invalid one earns ``-1 + format_score / 2``, which lies in ``[-2, -1)``. The paper gives the raw
  format score (in ``[-2, 0)``) instead, but then a slightly malformed response (``-0.4``) would outrank a
  valid wrong one (``-1``): the affine map keeps the paper's order among invalid responses and puts all of
  them below every valid one. ``stage1_reward(..., ordered=False)`` gives the paper's raw value.
* ``papo`` (stage 3, strict constraints): ``+1``/``-1`` accuracy, ``0`` for an empty response; a response that
  is invalid or truncated is *dropped* from the batch (``RewardResult.dropped``), never penalised.
* ``accuracy``: plain ``+1``/``-1`` (``0`` empty) with no format gate, for the sequential-RL baseline.

Order guaranteed by ``stage1``: correct valid (+1) > wrong valid (-1) > any invalid (< -1).

TRL-style wrappers (``trl_*_reward(completions, **kwargs) -> list[float]``) read the gold from the ``answer``
column and accept plain strings or chat-format completions (lists of ``{"role", "content"}`` dicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .constraints import ConstraintSet
from .graph import ExecutionGraph
from .verify import verify, verify_many


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one rollout. ``reward`` is what the algorithm uses unless ``dropped``."""

    reward: float
    valid: bool  # format-valid under the preset's constraints
    dropped: bool  # the trainer removes it from the batch (PAPO: invalid or truncated)
    format_score: float  # 0 when valid, in [-2, 0) otherwise
    correct: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _text(response: str | ExecutionGraph) -> str:
    if isinstance(response, ExecutionGraph):
        return response.response_text()
    if isinstance(response, str):
        return response
    raise TypeError(f"a response is text or an ExecutionGraph, got {type(response).__name__}")


def _is_empty(response: str | ExecutionGraph) -> bool:
    if isinstance(response, ExecutionGraph):
        eos = response.vocab.eos_ids
        return not any(t not in eos for t in response.response_ids) or not response.response_text().strip()
    return not _text(response).strip()


def _graph(response: str | ExecutionGraph, constraints: str | ConstraintSet, tokenizer=None) -> ExecutionGraph:
    """The response's graph under ``constraints`` (a graph built with other constraints is re-read)."""
    if isinstance(response, ExecutionGraph):
        cs = response.constraints
        same = cs is constraints or (isinstance(constraints, str) and cs.name == constraints)
        if same:
            return response
        return ExecutionGraph.from_token_ids(response.token_ids, response.vocab.tokenizer,
                                             prompt_len=response.prompt_len, constraints=constraints,
                                             layout=response.layout_kind)
    return ExecutionGraph.from_text(_text(response), tokenizer, constraints=constraints)


def format_score(response: str | ExecutionGraph, constraints: str | ConstraintSet = "relaxed", tokenizer=None) -> float:
    """0 when the response is valid under ``constraints``, else the (negative) format score in [-2, 0)."""
    return _graph(response, constraints, tokenizer).format_score()


def accuracy_reward(response: str | ExecutionGraph, gold: str, timeout: float = 5.0) -> float:
    """+1 when the last ``\\boxed{}`` equals the gold, -1 otherwise, 0 for an empty response."""
    if _is_empty(response):
        return 0.0
    return 1.0 if verify(_text(response), gold, timeout=timeout) else -1.0


def _invalid_reward(fs: float, ordered: bool) -> float:
    # fs in [-2, -0.1]; -1 + fs/2 in [-2, -1.05]: below every valid response, same order as fs.
    return -1.0 + fs / 2.0 if ordered else fs


def stage1_reward(response: str | ExecutionGraph, gold: str, constraints: str | ConstraintSet = "relaxed", tokenizer=None,
                  ordered: bool = True, timeout: float = 5.0) -> float:
    """NPR-Zero: accuracy (+/-1) when the format is valid, else a penalty below -1 (see module docstring)."""
    fs = format_score(response, constraints, tokenizer)
    if fs < 0:
        return _invalid_reward(fs, ordered)
    return 1.0 if verify(_text(response), gold, timeout=timeout) else -1.0


def _verdict(response, gold, timeout: float, correct: bool | None) -> bool:
    """``correct`` when the caller already has the verifier's verdict (:func:`score_many`), else ``verify``."""
    return bool(correct) if correct is not None else verify(_text(response), gold, timeout=timeout)


def stage1_result(response: str | ExecutionGraph, gold: str, truncated: bool = False, tokenizer=None,
                  timeout: float = 5.0, correct: bool | None = None) -> RewardResult:
    """The ``stage1`` preset as a :class:`RewardResult`. Stage 1 penalises, it never drops (truncated too).

    ``correct``: the verifier's verdict on ``(response, gold)`` when the caller has it (the same for every preset)."""
    g = _graph(response, "relaxed", tokenizer)
    fs = g.format_score()
    correct = _verdict(response, gold, timeout, correct)
    reward = _invalid_reward(fs, True) if fs < 0 else (1.0 if correct else -1.0)
    return RewardResult(reward=reward, valid=fs == 0, dropped=False, format_score=fs, correct=correct)


def papo_reward(response: str | ExecutionGraph, gold: str, truncated: bool = False, tokenizer=None,
                timeout: float = 5.0, correct: bool | None = None) -> RewardResult:
    """Stage 3 (PAPO): +/-1 accuracy (0 when empty); dropped when invalid under strict rules or truncated."""
    g = _graph(response, "strict", tokenizer)
    fs = g.format_score()
    valid = fs == 0
    empty = _is_empty(response)
    correct = (not empty) and _verdict(response, gold, timeout, correct)
    reward = 0.0 if empty else (1.0 if correct else -1.0)
    return RewardResult(reward=reward, valid=valid, dropped=(not valid) or bool(truncated), format_score=fs,
                        correct=correct)


def accuracy_result(response: str | ExecutionGraph, gold: str, truncated: bool = False, tokenizer=None,
                    timeout: float = 5.0, correct: bool | None = None) -> RewardResult:
    """Plain accuracy with no format gate (sequential baseline); validity is reported under relaxed rules."""
    fs = format_score(response, "relaxed", tokenizer)
    empty = _is_empty(response)
    correct = (not empty) and _verdict(response, gold, timeout, correct)
    reward = 0.0 if empty else (1.0 if correct else -1.0)
    return RewardResult(reward=reward, valid=fs == 0, dropped=False, format_score=fs, correct=correct)


REWARD_PRESETS: dict[str, Callable[..., RewardResult]] = {
    "stage1": stage1_result,
    "papo": papo_reward,
    "accuracy": accuracy_result,
}


def score(preset: str, graph: ExecutionGraph | str, gold: str, truncated: bool = False, **kwargs) -> RewardResult:
    """One entry point for the trainer and the env: ``score("papo", rollout.graph, problem.answer, truncated)``."""
    fn = REWARD_PRESETS.get(preset)
    if fn is None:
        raise ValueError(f"unknown reward preset {preset!r}; choose one of {sorted(REWARD_PRESETS)}")
    return fn(graph, gold, truncated=truncated, **kwargs)


def score_many(preset: str, graphs: Sequence[ExecutionGraph | str], golds: Sequence[str],
               truncated: Sequence[bool] | None = None, **kwargs) -> list[RewardResult]:
    """:func:`score` over a batch, with the same results: the verdicts the verifier's fast path cannot settle are
    judged on all its workers at once (:func:`npr_env.verify.verify_many`, each with its own CPU budget) instead of
    one after another."""
    fn = REWARD_PRESETS.get(preset)
    if fn is None:
        raise ValueError(f"unknown reward preset {preset!r}; choose one of {sorted(REWARD_PRESETS)}")
    graphs, golds = list(graphs), list(golds)
    truncated = [False] * len(graphs) if truncated is None else list(truncated)
    if not len(graphs) == len(golds) == len(truncated):
        raise ValueError(f"{len(graphs)} responses, {len(golds)} gold answers, {len(truncated)} truncated flags")
    ok = verify_many([_text(g) for g in graphs], golds, timeout=kwargs.get("timeout", 5.0))
    return [fn(g, gold, truncated=bool(t), correct=c, **kwargs) for g, gold, t, c in zip(graphs, golds, truncated, ok)]


# -- TRL-style reward functions --------------------------------------------------------------------------------
def completion_text(completion) -> str:
    """Text of a TRL completion: a string, or chat messages (the assistant turns' content, joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, Sequence):
        msgs = [m for m in completion if isinstance(m, dict)]
        chosen = [m for m in msgs if m.get("role", "assistant") == "assistant"] or msgs
        return "".join(str(m.get("content") or "") for m in chosen)
    return str(completion)


def _answers(completions, kwargs) -> list[str]:
    if "answer" not in kwargs:
        raise KeyError("the gold answers must come in a column named 'answer' (a list, one per completion)")
    answers = list(kwargs["answer"])
    if len(answers) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return [str(a) for a in answers]


def trl_format_reward(completions, **kwargs) -> list[float]:
    """Format score per completion under the relaxed rules (``constraints=`` kwarg to change)."""
    constraints = kwargs.get("constraints", "relaxed")
    return [format_score(completion_text(c), constraints) for c in completions]


def trl_accuracy_reward(completions, **kwargs) -> list[float]:
    """+1 / -1 accuracy per completion, 0 for an empty one; gold from ``answer``."""
    texts = [completion_text(c) for c in completions]
    answers = _answers(completions, kwargs)
    ok = verify_many(texts, answers, timeout=kwargs.get("timeout", 5.0))
    return [0.0 if not t.strip() else (1.0 if o else -1.0) for t, o in zip(texts, ok)]


def trl_stage1_reward(completions, **kwargs) -> list[float]:
    """The stage-1 gated reward per completion; gold from ``answer``."""
    texts = [completion_text(c) for c in completions]
    answers = _answers(completions, kwargs)
    ok = verify_many(texts, answers, timeout=kwargs.get("timeout", 5.0))
    out = []
    for t, o in zip(texts, ok):
        fs = format_score(t, "relaxed")
        out.append(_invalid_reward(fs, True) if fs < 0 else (1.0 if o else -1.0))
    return out


__all__ = [
    "REWARD_PRESETS", "RewardResult", "accuracy_result", "accuracy_reward", "completion_text", "format_score",
    "papo_reward", "score", "score_many", "stage1_result", "stage1_reward", "trl_accuracy_reward", "trl_format_reward",
    "trl_stage1_reward",
]
