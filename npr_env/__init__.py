"""npr_env: the NPR trajectory format, its execution graph, verifier, rewards, tasks and Gymnasium envs."""

from . import constraints, qwen_vocab, rewards, tasks
from .constraints import ConstraintSet, Violation
from .graph import Cursor, Event, ExecutionGraph
from .layout import Layout
from .prompts import PromptConfig, prompt_ids
from .rewards import (
    REWARD_PRESETS,
    RewardResult,
    accuracy_reward,
    format_score,
    papo_reward,
    score,
    stage1_reward,
    trl_accuracy_reward,
    trl_format_reward,
    trl_stage1_reward,
)
from .schema import INSTRUCTION, TAGS
from .tasks import GroupSumTasks, Problem, ProceduralTasks, TaskFormatError, load_benchmark, load_problems
from .tokenizer import add_npr_tokens, init_tag_rows, load_tokenizer
from .verify import extract_answer, verify, verify_many


def parse(text: str, tokenizer=None, constraints="strict", layout: str = "parallel") -> ExecutionGraph:
    """The execution graph of a response text (no prompt). The tokenizer defaults to the shipped one."""
    return ExecutionGraph.from_text(text, tokenizer, constraints=constraints, layout=layout)


from .envs import register_envs  # noqa: E402  (the envs use everything above)

register_envs()

__all__ = [
    "INSTRUCTION", "REWARD_PRESETS", "TAGS", "ConstraintSet", "Cursor", "Event", "ExecutionGraph", "GroupSumTasks",
    "Layout", "Problem", "PromptConfig", "ProceduralTasks", "RewardResult", "TaskFormatError", "Violation", "accuracy_reward",
    "add_npr_tokens", "constraints", "init_tag_rows", "qwen_vocab", "extract_answer", "format_score", "load_benchmark", "load_problems",
    "load_tokenizer", "papo_reward", "parse", "prompt_ids", "register_envs", "rewards", "score", "stage1_reward", "tasks",
    "trl_accuracy_reward", "trl_format_reward", "trl_stage1_reward", "verify", "verify_many",
]
