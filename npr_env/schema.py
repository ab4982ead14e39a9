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


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (``\\fbox``, ``\\framebox``) in ``text``, nested braces included.

    None if absent.

    Linear time and never raises: an unbalanced last box falls back to the one before it.
    """
    best = None
    for macro in ("\\boxed", "\\fbox", "\\framebox"):
        start = text.rfind(macro)
        while start >= 0:
            i = start + len(macro)
            while i < len(text) and text[i] == " ":
                i += 1
            if i < len(text) and text[i] == "{":
                depth, j = 0, i
                while j < len(text):
                    ch = text[j]
                    if ch == "{":
                        depth += 1
                    elif ch == "}":
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                if depth == 0 and j < len(text):
                    if best is None or start > best[0]:
                        best = (start, text[i + 1:j])
                    break
            start = text.rfind(macro, 0, start)
    return best[1] if best else None
