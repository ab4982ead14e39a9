"""The NPR trajectory format: tags, plan numbering, the instruction prompt and boxed answers.

A response is a sequence of rounds. One round (a *block*) is::

    <guideline><plan>1: ...</plan><plan>2: ...</plan></guideline>   map: one plan per branch
    <step>1: ...</step><step>2: ...</step>                           branches, decoded in parallel
    <takeaway>...</takeaway>                                         reduce: sees every step

After the last block comes the conclusion, which holds the final answer in ``\\boxed{...}``.
"""

from __future__ import annotations

import re

GUIDELINE_OPEN, GUIDELINE_CLOSE = "<guideline>", "</guideline>"
PLAN_OPEN, PLAN_CLOSE = "<plan>", "</plan>"
STEP_OPEN, STEP_CLOSE = "<step>", "</step>"
TAKEAWAY_OPEN, TAKEAWAY_CLOSE = "<takeaway>", "</takeaway>"

TAGS: tuple[str, ...] = (
    GUIDELINE_OPEN,
    GUIDELINE_CLOSE,
    PLAN_OPEN,
    PLAN_CLOSE,
    STEP_OPEN,
    STEP_CLOSE,
    TAKEAWAY_OPEN,
    TAKEAWAY_CLOSE,
)
OPEN_TAGS = (GUIDELINE_OPEN, PLAN_OPEN, STEP_OPEN, TAKEAWAY_OPEN)
CLOSE_TAGS = (GUIDELINE_CLOSE, PLAN_CLOSE, STEP_CLOSE, TAKEAWAY_CLOSE)
TAG_NAMES = {t: t.strip("<>") for t in TAGS}  # "<plan>" -> "plan", "</plan>" -> "/plan"

# `<plan>1: ...`, `<plan> 2.1 : ...`; the number is N or N.N.N (hierarchical numbering is accepted).
NUMBER_PREFIX = re.compile(r"^\s*(\d+(?:\.\d+)*)\s*:")

# Defaults shared by the constraints, the env and the engine.
MAX_PLANS = 5
MAX_DEPTH = 5
MIN_PLAN_CHARS = 3
MIN_STEP_CHARS = 6

INSTRUCTION = """\
Answer in the parallel reasoning format below and in nothing else.
1. Open a round with <guideline>, list numbered plans as <plan>1: ...</plan><plan>2: ...</plan>, close it with </guideline>.
2. Then write one <step>N: ...</step> per plan, with the same numbers. Each step carries out only its own plan, \
as if it could not read the other steps: never write "then", "next" or refer to another step.
3. Use several plans for independent sub-problems, alternative methods or competing hypotheses; one plan is fine \
when nothing can be split.
4. Close the round with <takeaway>...</takeaway>: compare and combine what the steps found, without new computation.
5. Start another round if more work is needed. Put nothing between tags and use no other tags.
6. After the last round, state the final answer as \\boxed{answer}."""


def plan_number(content: str) -> str | None:
    """The number of a plan or step from its content (the text after the tag), or None."""
    m = NUMBER_PREFIX.match(content)
    return m.group(1) if m else None


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def format_block(plans: list[str], steps: list[str], takeaway: str) -> str:
    """Render one round of the NPR format; plans and steps are numbered from 1."""
    if len(plans) != len(steps):
        raise ValueError(f"a block needs as many steps as plans, got {len(plans)} plans and {len(steps)} steps")
    g = "".join(f"{PLAN_OPEN}{i}: {p}{PLAN_CLOSE}" for i, p in enumerate(plans, 1))
    s = "".join(f"{STEP_OPEN}{i}: {t}{STEP_CLOSE}" for i, t in enumerate(steps, 1))
    return f"{GUIDELINE_OPEN}{g}{GUIDELINE_CLOSE}{s}{TAKEAWAY_OPEN}{takeaway}{TAKEAWAY_CLOSE}"


def build_prompt(problem: str, instruction: bool = True) -> str:
    """The user turn: the problem, then the NPR instruction (appended, as in the paper)."""
    return f"{problem}\n\n{INSTRUCTION}" if instruction else problem


_BOX_OPEN = re.compile(r"\\(?:boxed|fbox|framebox) *\{")
_BRACE = re.compile(r"[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (``\\fbox``, ``\\framebox``) in ``text``, nested braces included.

    None if absent. "Last" is the complete box whose macro starts last (a box nested in a box is therefore
    the inner one); a box is complete when its ``{`` has a matching ``}`` (spaces may stand between the macro
    and the brace). An unbalanced last box falls back to the one before it.

    One pass, linear time and memory whatever the input (a response of 30k unterminated ``\\boxed{`` costs
    milliseconds), and never raises: the matching ``}`` of every ``{`` comes from one stack scan, then each
    box macro is looked up once.
    """
    spans = _box_spans(text)
    if not spans:
        return None
    i, j = spans[-1]  # spans go left to right by macro: the last complete one wins
    return text[i + 1:j]


def boxed_answers(text: str) -> list[str]:
    """The contents of every outermost complete box of ``text``, left to right (a box inside a box is part of
    the outer one's content). Linear time, like :func:`last_boxed`; ``[]`` when there is none."""
    out, end = [], -1
    for i, j in _box_spans(text):
        if i > end:
            out.append(text[i + 1:j])
            end = j
    return out


def _box_spans(text: str) -> list[tuple[int, int]]:
    """``(open, close)`` brace indices of every complete box, in the order of the macros."""
    if not isinstance(text, str) or "box" not in text:
        return []
    close: dict[int, int] = {}  # index of "{" -> index of its matching "}"
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    spans = []
    for m in _BOX_OPEN.finditer(text):
        i = m.end() - 1
        j = close.get(i)
        if j is not None:
            spans.append((i, j))
    return spans

