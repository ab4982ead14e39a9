"""Named graph constraints and the two presets.

Each constraint is a small object with a ``code``, a ``message`` and the format-score ``penalty`` it costs.
The parser (:mod:`npr_env.cursor`, :mod:`npr_env.verdicts`) reports what it sees with these objects, imported by
name (a misspelled one fails at import time); a :class:`ConstraintSet` decides which count. Codes given as
strings (``ConstraintSet(["EMPTY_STEP", ...])``, ``strict(disable=["EMPTY_STEP"])``) are checked: an unknown one
raises a ValueError naming it and listing the valid codes. Violations carry the code string (``v.code``). A user can compose a set from the built-ins, or add a constraint with a ``check(graph)`` function of
their own::

    from npr_env import constraints as C
    mine = C.ConstraintSet([C.UNCLOSED_TAG, C.EMPTY_STEP, C.Constraint("SHORT", "too short", 1.0, True,
                                                                       check=lambda g: g.stats.total_tokens < 8)])

Penalties follow the reference checker: a *hard* failure costs its own penalty, *soft* ones add up; the format
score is ``-(max hard) - (sum soft)``, clipped to ``[-2, 0)``, and exactly 0 when nothing is violated.

The ``relaxed`` preset (stage 1) is the reference checker's rules, read over the execution graph rather than by
a regex over the text; where the two differ, it is on purpose. Ours vs the reference checker, and why:

======================================  ==================================  ===================================  ==========================================
case                                    reference checker                   ours (relaxed)                       why
======================================  ==================================  ===================================  ==========================================
a block nested in a step                its flat regex does not nest: the   a nested block, valid up to          the layout rule nests (DESIGN.md), and the
(``<step>1: <guideline>...</step>``)    inner tags are tags inside a step,  ``max_depth`` (5) levels; deeper is  engine forks inside a step
                                        scored as a malformed block         ``DEPTH_EXCEEDED`` (hard, -1.0)
plan length (< 3 characters)            counts the whole plan, number       counts after the number:             the number is format, not content: else
                                        included: ``<plan>1: a</plan>``     ``<plan>1: a</plan>`` is             ``<plan>12:</plan>`` passes and
                                        passes                              ``EMPTY_PLAN`` (-0.4); steps         ``<plan>1:</plan>`` fails; the reference's
                                                                            likewise (< 6), takeaways whole      step/takeaway checks test the plan
                                                                                                                 variable (a bug), ours test the step
no ``\\boxed{}`` after the last block   -1.0 only when there is trailing    ``MISSING_ANSWER`` (-1.0) whenever   the answer is graded on the text after the
                                        text without a non-empty box; a     the text after the last block has    last block; a response with no answer
                                        response ending at its last         no non-empty box, empty text         there cannot be right, so it must not be
                                        ``</takeaway>`` passes              included (a box inside a takeaway    valid
                                                                            does not count)
6 (or more) plans in a guideline        no limit: valid                     ``TOO_MANY_PLANS`` (hard, -1.0),     the engine forks 1-5 plans and ends the
                                                                            ``max_plans`` = 5                    request otherwise: stage 1 must not teach
                                                                                                                 a format stage 3 cannot run
text between steps                      non-adjacent steps: -0.2            ``TEXT_BETWEEN_TAGS`` (soft, -0.4),  one rule for all stray text (inside a
(``</step>x<step>``, ``</step>x         (non-adjacent plans: -0.2)          the text stays in the step before    guideline, between plans, before the first
<takeaway>``)                                                               it (its siblings never see it) and   step, after a step), at the reference's
                                                                            the block is still recognised        price for non-plan text in a guideline
text between plans                      non-plan content in a guideline     ``TEXT_BETWEEN_TAGS`` (-0.4), once   each soft code counts once: a run of stray
(``</plan>x<plan>``)                    (-0.4) and non-adjacent plans       per response                         text costs what one word does, however
                                        (-0.2)                                                                   many checks it trips
======================================  ==================================  ===================================  ==========================================
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .schema import MAX_DEPTH, MAX_PLANS


@dataclass(frozen=True)
class Constraint:
    code: str
    message: str
    penalty: float
    hard: bool
    # Optional whole-graph check for user constraints: returns True when the graph violates it.
    check: Callable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Violation:
    code: str
    message: str
    index: int  # serialized token index where it was seen; -1 when seen at the end of the sequence
    penalty: float
    hard: bool


def _c(code: str, message: str, penalty: float, hard: bool = True) -> Constraint:
    return Constraint(code, message, penalty, hard)


# Structure (hard failures).
NO_BLOCK = _c("NO_BLOCK", "the response has no <guideline>/<step>/<takeaway> block", 1.5)
NO_PARALLEL_BLOCK = _c("NO_PARALLEL_BLOCK", "no block branches into two or more steps", 1.0)
NO_PLANS = _c("NO_PLANS", "a <guideline> closes without any <plan>", 1.0)
PLAN_STEP_COUNT_MISMATCH = _c("PLAN_STEP_COUNT_MISMATCH", "the number of steps differs from the number of plans", 1.0)
NESTED_STEP = _c("NESTED_STEP", "<step> opened inside an open <step>", 1.5)
STEP_OUTSIDE_BLOCK = _c("STEP_OUTSIDE_BLOCK", "<step> outside a block (not after a </guideline>)", 1.5)
MISPLACED_TAG = _c("MISPLACED_TAG", "an opening tag where it is not allowed", 1.5)
UNCLOSED_TAG = _c("UNCLOSED_TAG", "a tag is still open (or a new one opened before it closed)", 1.5)
STRAY_CLOSING_TAG = _c("STRAY_CLOSING_TAG", "a closing tag that closes nothing open", 1.5)
MISSING_TAKEAWAY = _c("MISSING_TAKEAWAY", "the steps of a block are not followed by a <takeaway>", 1.0)
TOO_MANY_PLANS = _c("TOO_MANY_PLANS", "a <guideline> has more plans than allowed", 1.0)
DEPTH_EXCEEDED = _c("DEPTH_EXCEEDED", "blocks are nested deeper than allowed", 1.0)
MISSING_ANSWER = _c("MISSING_ANSWER", "the text after the last block has no non-empty \\boxed{}", 1.0)
TEXT_AFTER_EOS = _c("TEXT_AFTER_EOS", "tokens after the end-of-sequence token", 1.0)
SPELLED_TAG = _c("SPELLED_TAG", "a tag written as ordinary text pieces; the parallel layout needs every tag as its "
                 "single tag token (npr_env.add_npr_tokens, stage 2)", 1.5)
# Content (soft penalties).
EMPTY_PLAN = _c("EMPTY_PLAN", "a plan has fewer than 3 characters after its number", 0.4, hard=False)
EMPTY_STEP = _c("EMPTY_STEP", "a step has fewer than 6 characters after its number", 0.4, hard=False)
EMPTY_TAKEAWAY = _c("EMPTY_TAKEAWAY", "a takeaway has fewer than 6 characters", 0.4, hard=False)
TEXT_BETWEEN_TAGS = _c("TEXT_BETWEEN_TAGS", "text where only tags may stand (inside a guideline, between plans, "
                       "between steps or before the takeaway); it counts as part of the segment before it", 0.4,
                       hard=False)
UNNUMBERED_PLAN = _c("UNNUMBERED_PLAN", "a plan does not start with its number, as in '<plan>1: ...'", 0.4, hard=False)
STEP_NUMBER_MISMATCH = _c("STEP_NUMBER_MISMATCH", "step i does not carry the number of plan i", 0.2, hard=False)

ALL: tuple[Constraint, ...] = (
    NO_BLOCK, NO_PARALLEL_BLOCK, NO_PLANS, PLAN_STEP_COUNT_MISMATCH, NESTED_STEP, STEP_OUTSIDE_BLOCK,
    MISPLACED_TAG, UNCLOSED_TAG, STRAY_CLOSING_TAG, MISSING_TAKEAWAY, TOO_MANY_PLANS, DEPTH_EXCEEDED,
    MISSING_ANSWER, TEXT_AFTER_EOS, SPELLED_TAG, EMPTY_PLAN, EMPTY_STEP, EMPTY_TAKEAWAY, TEXT_BETWEEN_TAGS, UNNUMBERED_PLAN,
    STEP_NUMBER_MISMATCH,
)
BY_CODE = {c.code: c for c in ALL}
_ORDER = {c.code: i for i, c in enumerate(ALL)}


def unknown_code(code) -> ValueError:
    """The error for a code that names no constraint: it names the bad code and lists the valid ones."""
    near = difflib.get_close_matches(str(code), BY_CODE, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ValueError(f"unknown constraint code {code!r}{hint}; valid codes: {', '.join(sorted(BY_CODE))}")


def lookup(code: str | Constraint) -> Constraint:
    """The built-in constraint of ``code`` (a code string or a constraint); a ValueError for an unknown code."""
    if isinstance(code, Constraint):
        code = code.code
    c = BY_CODE.get(code) if isinstance(code, str) else None
    if c is None:
        raise unknown_code(code)
    return c


def _codes(items: Iterable[str | Constraint] | str | None, what: str) -> set[str]:
    if items is None:
        return set()
    if isinstance(items, (str, Constraint)):
        items = [items]
    try:
        return {lookup(x).code for x in items}
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


class ConstraintSet:
    """The constraints that count for one graph, with the limits that the parser enforces.

    ``constraints`` holds :class:`Constraint` objects or built-in codes (``"EMPTY_STEP"``). A code that names
    no built-in constraint raises a ValueError listing the valid ones, and so does a constraint of an unknown
    code without a ``check`` (the parser would never report it). Lookups (``in``, :meth:`get`) take a
    constraint or a code, and an unknown code there raises too: a typo never silently disables a rule.
    """

    def __init__(self, constraints: Iterable[Constraint | str], name: str = "custom", max_plans: int = MAX_PLANS,
                 max_depth: int = MAX_DEPTH):
        items = []
        for c in constraints:
            if isinstance(c, str):
                c = lookup(c)
            elif not isinstance(c, Constraint):
                raise TypeError(f"a ConstraintSet holds Constraint objects or codes, got {type(c).__name__}")
            elif c.code not in BY_CODE and c.check is None:
                raise ValueError(f"constraint {c.code!r} has no check() and is not a built-in code, so nothing "
                                 f"would ever report it; valid codes: {', '.join(sorted(BY_CODE))}")
            items.append(c)
        self.constraints = tuple(items)
        self.name = name
        self.max_plans = max_plans
        self.max_depth = max_depth
        self._by_code = {c.code: c for c in self.constraints}

    def _key(self, code: str | Constraint) -> str:
        key = code.code if isinstance(code, Constraint) else code
        if key not in self._by_code and key not in BY_CODE:
            raise unknown_code(key)
        return key

    def __contains__(self, code: str | Constraint) -> bool:
        return self._key(code) in self._by_code

    def get(self, code: str | Constraint) -> Constraint | None:
        """This set's constraint of ``code`` (None when the set leaves that built-in out)."""
        return self._by_code.get(self._key(code))

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(self._by_code)

    def custom(self) -> tuple[Constraint, ...]:
        return tuple(c for c in self.constraints if c.check is not None)

    def __repr__(self) -> str:
        return f"ConstraintSet({self.name!r}, {len(self.constraints)} constraints, max_plans={self.max_plans})"


def _preset(name: str, base: Iterable[Constraint], enable, disable, limits: dict) -> ConstraintSet:
    on, off = _codes(enable, f"{name}(enable=...)"), _codes(disable, f"{name}(disable=...)")
    if on & off:
        raise ValueError(f"{name}(): {sorted(on & off)} both enabled and disabled")
    base = list(base)
    have = {c.code for c in base}
    chosen = [c for c in base if c.code not in off] + [c for c in ALL if c.code in on and c.code not in have]
    chosen.sort(key=lambda c: _ORDER[c.code])
    return ConstraintSet(chosen, name=name, **limits)


def relaxed(enable: Iterable[str | Constraint] | None = None, disable: Iterable[str | Constraint] | None = None,
            **limits) -> ConstraintSet:
    """Stage 1 (format discovery): the reference checker's rules. One plan per block is fine, plans need not
    be numbered, and a parallel block is not required; a response without any block still fails.

    ``enable``/``disable``: codes (or constraints) to add to / leave out of the preset; an unknown code raises.
    """
    skip = {NO_PARALLEL_BLOCK.code, UNNUMBERED_PLAN.code, STEP_NUMBER_MISMATCH.code}
    return _preset("relaxed", [c for c in ALL if c.code not in skip], enable, disable, limits)


def strict(enable: Iterable[str | Constraint] | None = None, disable: Iterable[str | Constraint] | None = None,
           **limits) -> ConstraintSet:
    """Stages 2-3: every rule, numbered plans and steps, and at least one block with two or more branches.

    ``disable``: codes (or constraints) to leave out; an unknown code raises (``enable`` is accepted for
    symmetry: every built-in is already on).
    """
    return _preset("strict", ALL, enable, disable, limits)


PRESETS = {"relaxed": relaxed, "strict": strict}


def resolve(constraints: str | ConstraintSet | None, **limits) -> ConstraintSet:
    """A preset name (built with ``limits``, e.g. ``max_plans``, ``disable``), a ready set (returned as is), or
    None (strict)."""
    if constraints is None:
        return strict(**limits)
    if isinstance(constraints, ConstraintSet):
        return constraints
    if constraints not in PRESETS:
        raise ValueError(f"unknown constraint preset {constraints!r}; choose one of {sorted(PRESETS)} "
                         "or pass a ConstraintSet")
    return PRESETS[constraints](**limits)


def format_score(violations: Iterable[Violation]) -> float:
    """0 when valid; otherwise ``-(max hard penalty) - (sum of soft penalties, once per code)``, in ``[-2, 0)``."""
    violations = list(violations)
    hard = [v.penalty for v in violations if v.hard]
    soft = {v.code: v.penalty for v in violations if not v.hard}.values()  # each soft rule costs once
    if not hard and not soft:
        return 0.0
    score = -(max(hard) if hard else 0.0) - sum(soft)
    return max(-2.0, min(score, -0.1))
