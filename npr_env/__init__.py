"""npr_env: the NPR trajectory format, its execution graph, verifier, rewards, tasks and Gymnasium envs."""

from .constraints import ConstraintSet, Violation
from .graph import Cursor, Event, ExecutionGraph, Layout
from .schema import INSTRUCTION, TAGS
from .tokenizer import add_npr_tokens, load_tokenizer


def parse(text: str, tokenizer=None, constraints="strict", layout: str = "parallel") -> ExecutionGraph:
    """The execution graph of a response text (no prompt). The tokenizer defaults to the shipped one."""
    return ExecutionGraph.from_text(text, tokenizer, constraints=constraints, layout=layout)


__all__ = [
    "INSTRUCTION", "TAGS", "ConstraintSet", "Cursor", "Event", "ExecutionGraph", "Layout", "Violation",
    "add_npr_tokens", "load_tokenizer", "parse",
]

from .envs import register_envs  # noqa: E402

register_envs()
