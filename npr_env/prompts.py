"""The one prompt builder: a problem plus the prompt settings to the prompt's token ids.

Training (every stage, rejection sampling), evaluation, ``npr rollout``, the envs and the benchmarks all call
:func:`prompt_ids`, so a model is scored on exactly the prompt it was trained on. The settings are a
:class:`PromptConfig`: whether the NPR instruction is appended to the user turn, and the keyword arguments of
the tokenizer's chat template (``{"enable_thinking": False}`` is Qwen3's non-thinking mode, as in the paper).
Each checkpoint the trainer writes carries its settings in ``npr_prompt.json`` (:func:`save_prompt_config`),
and the eval and rollout commands read them back (:func:`load_prompt_config`)::

    cfg = PromptConfig(instruction=True, chat_kwargs={"enable_thinking": False})
    ids = prompt_ids(tokenizer, problem, cfg)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .schema import build_prompt

PROMPT_FILE = "npr_prompt.json"


@dataclass(frozen=True)
class PromptConfig:
    instruction: bool = False  # append npr_env.INSTRUCTION to the question (for instruct models)
    chat_kwargs: dict = field(default_factory=dict)  # passed to tokenizer.apply_chat_template

    def as_dict(self) -> dict:
        return asdict(self)


def _question(problem: Any) -> str:
    if isinstance(problem, str):
        return problem
    q = problem.get("question") if isinstance(problem, dict) else getattr(problem, "question", None)
    if not isinstance(q, str):
        raise TypeError(f"a problem is a question string or has a str `question`, got {type(problem).__name__}")
    return q


def user_turn(problem: Any, config: PromptConfig | None = None) -> str:
    """The user turn's text: the question, then the NPR instruction when ``config.instruction``."""
    return build_prompt(_question(problem), (config or PromptConfig()).instruction)


def prompt_ids(tokenizer, problem: Any, config: PromptConfig | None = None) -> list[int]:
    """Token ids of the prompt: the user turn through the chat template, ending with the assistant header.

    ``problem`` is a :class:`npr_env.Problem`, a mapping or object with a ``question``, or the question itself.
    A tokenizer without a chat template encodes the user turn as is.
    """
    config = config or PromptConfig()
    text = user_turn(problem, config)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, **config.chat_kwargs)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def save_prompt_config(config: PromptConfig, directory: str | Path) -> Path:
    path = Path(directory) / PROMPT_FILE
    path.write_text(json.dumps(config.as_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_prompt_config(directory: str | Path) -> PromptConfig | None:
    """The prompt settings a checkpoint was trained with (None when it has no ``npr_prompt.json``)."""
    path = Path(directory) / PROMPT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return PromptConfig(instruction=bool(data.get("instruction", False)),
                            chat_kwargs=dict(data.get("chat_kwargs") or {}))
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a prompt settings file ({e})") from None


__all__ = ["PROMPT_FILE", "PromptConfig", "load_prompt_config", "prompt_ids", "save_prompt_config", "user_turn"]
