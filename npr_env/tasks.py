"""Problem sources: a seeded procedural arithmetic generator (the offline default) and benchmark loaders.

Procedural tasks are sums of independent products, so splitting them into parallel steps genuinely helps::

    >>> tasks = ProceduralTasks(seed=0, num_subproblems=3)
    >>> p = tasks.sample(1)[0]
    >>> p.question, p.answer                         # e.g. ('Compute 23*4 + 17*6 + 31*3.', '287')
    >>> p.solutions["parallel"]                      # one plan and one step per product, a takeaway, the box
    >>> p.solutions["sequential"]                    # the same work as plain text

Loaders read the benchmark files in their original schemas (``load_problems(path)``; ``load_benchmark(name,
data_dir)`` for the known layout) and report a malformed row with its file and line.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .schema import MAX_PLANS, boxed, build_prompt, format_block, last_boxed


@dataclass
class Problem:
    """One task: a question, its gold answer (a string), where it came from, and optional worked solutions."""

    id: str
    question: str
    answer: str
    source: str
    solutions: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def prompt(self, instruction: bool = True) -> str:
        """The user turn: the question, then the NPR instruction (see ``schema.build_prompt``)."""
        return build_prompt(self.question, instruction)


# -- procedural arithmetic --------------------------------------------------------------------------------------
def _range(x, name: str) -> tuple[int, int]:
    lo, hi = (x, x) if isinstance(x, int) else tuple(x)
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or hi < lo:
        raise ValueError(f"{name} must be a positive int or a (lo, hi) range with 1 <= lo <= hi, got {x!r}")
    return lo, hi


def _operand(rng: random.Random, digits: int) -> int:
    # 1-digit operands skip 0 and 1, which would make a product trivial.
    return rng.randint(2, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


@dataclass
class _Term:
    """A leaf sub-problem: operands joined by one operator, ``23*4`` or ``12+34+5`` (left to right)."""

    nums: list[int]
    op: str

    @property
    def value(self) -> int:
        v = self.nums[0]
        for n in self.nums[1:]:
            v = v * n if self.op == "*" else v + n if self.op == "+" else v - n
        return v

    def expr(self, spaced: bool = False) -> str:
        return self.op.join(map(str, self.nums))  # no spaces inside a term: "23*4"


@dataclass
class _Group:
    items: list  # [(op, node)]; the first op is "+"
    combine: str = "sum"  # "sum": reduce with the ops; "tuple": the answer lists the children's values

    @property
    def value(self) -> int:
        v = 0
        for op, node in self.items:
            v = v + node.value if op == "+" else v - node.value
        return v

    @property
    def answer(self) -> str:
        if self.combine == "tuple" and len(self.items) > 1:
            return "(" + ", ".join(str(node.value) for _, node in self.items) + ")"
        return str(self.value)

    def expr(self, spaced: bool = False) -> str:
        sep = " " if spaced else ""
        parts = []
        for i, (op, node) in enumerate(self.items):
            s = node.expr(spaced)
            # Sub-groups, and "a+b"/"a-b" terms next to others, get parentheses: "23-4 - 17-6" would be ambiguous.
            if isinstance(node, _Group) or (node.op != "*" and len(self.items) > 1 and self.combine == "sum"):
                s = f"({s})"
            if i == 0:
                parts.append(s)
            elif self.combine == "tuple":
                parts.append(f",{sep}{s}")
            else:
                parts.append(f"{sep}{op}{sep}{s}")
        return "".join(parts)


def _reduce(group: _Group) -> str:
    """The takeaway: ``92+102-93 = 101`` (the reduce), or ``(92, 102, 93)`` (collecting, no computation)."""
    if len(group.items) == 1:
        return f"the answer is {group.answer}"  # one sub-problem: keep the takeaway long enough to be valid
    if group.combine == "tuple":
        return group.answer
    parts = []
    for i, (op, node) in enumerate(group.items):
        v = node.value
        s = str(v) if (i == 0 or v >= 0) else f"({v})"
        parts.append(s if i == 0 else f"{op}{s}")
    return f"{''.join(parts)} = {group.value}"


def _parallel(group: _Group) -> str:
    """One NPR block per group: a plan and a step per child; a child group becomes a nested block."""
    plans, steps = [], []
    for _, node in group.items:
        plans.append(node.expr())
        steps.append(_parallel(node) if isinstance(node, _Group) else f"{node.expr()} = {node.value}")
    return format_block(plans, steps, _reduce(group))


def _sequential(group: _Group) -> list[str]:
    lines = []
    for _, node in group.items:
        if isinstance(node, _Group):
            lines += _sequential(node)
        else:
            lines.append(f"{node.expr()} = {node.value}")
    if len(group.items) > 1 and group.combine == "sum":
        lines.append(_reduce(group))
    return lines


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _ProblemSource:
    """Indexed problem generators: ``source[i]`` is a pure function of ``(seed, i)``; a cursor walks it."""

    seed: int
    test_fraction: float
    _cursor: int = 0

    def split_of(self, question: str) -> str:
        """``"test"`` or ``"train"``: a fixed function of the question text."""
        return "test" if _stable_hash(question) % 10**6 < self.test_fraction * 10**6 else "train"

    def sample(self, n: int) -> list[Problem]:
        """The next ``n`` problems."""
        out = [self[self._cursor + k] for k in range(n)]
        self._cursor += n
        return out

    def stream(self) -> Iterator[Problem]:
        """An endless stream of problems, from the cursor on."""
        while True:
            yield self[self._cursor]
            self._cursor += 1

    __iter__ = stream

    def reset(self, seed: int | None = None) -> None:
        """Rewind the cursor (and optionally change the seed)."""
        if seed is not None:
            self.seed = seed
        self._cursor = 0


class ProceduralTasks(_ProblemSource):
    """Seeded arithmetic problems whose sub-problems are independent: ``Compute 23*4 + 17*6 + 31*3.``

    Difficulty dial (the knobs, from easy to hard; ``ProceduralTasks.level(k)`` gives presets 0-5):

    * ``num_subproblems``: int or inclusive ``(lo, hi)``: how many independent sub-problems (plans) the top
      level has. The tiny preset uses ``(2, 4)``. At most ``schema.MAX_PLANS`` (5); strict NPR validity
      needs at least 2 (one sub-problem gives a one-plan block).
    * ``digits``: ``(a, b)``: digits of the first operand and of the others (``(2, 1)``: ``23*4``).
    * ``terms``: operands per sub-problem (int or range; 2 gives ``23*4``, 3 with ``term_ops="+"`` gives
      ``23+4+7``): the length of each parallel step.
    * ``term_ops``: the operator inside a sub-problem (``"*"``; ``"+"`` for additions; several letters mix).
    * ``combine``: how the sub-results form the answer. ``"sum"``: they are added (``ops="+-"`` mixes in
      subtraction) and the takeaway writes the sum, ``92+102+93 = 287``, which is the hard part for a tiny
      model. ``"tuple"``: ``Compute 23*4, 17*6, 31*3.`` with answer ``(92, 102, 93)``; the takeaway only
      collects the results, with no new computation, as the NPR format asks.
    * ``nesting``: 0 = flat; 1 = each top-level sub-problem is a parenthesised sum of ``group_size``
      sub-problems, solved by a nested block inside its step; 2 nests once more.

    Splits: a question belongs to ``"test"`` when a stable hash of its text falls in the first
    ``test_fraction`` of the hash space, else to ``"train"``; so the two never share a question, whatever the
    seeds. ``split=None`` draws from both.

    Determinism: problem ``i`` depends only on ``(seed, i)`` and the knobs (``tasks[i]``); ``sample(n)`` and
    ``stream()`` walk ``i = 0, 1, 2, ...`` from an internal cursor (``reset()`` rewinds it).
    """

    LEVELS: dict[int, dict] = {
        0: dict(num_subproblems=2, digits=(1, 1)),
        1: dict(num_subproblems=(2, 3), digits=(2, 1)),
        2: dict(num_subproblems=(2, 4), digits=(2, 1)),  # the tiny preset
        3: dict(num_subproblems=(3, 5), digits=(2, 2), ops="+-"),
        4: dict(num_subproblems=(2, 3), digits=(2, 1), nesting=1),
        5: dict(num_subproblems=(3, 4), digits=(2, 2), nesting=1, ops="+-"),
    }

    def __init__(self, seed: int = 0, num_subproblems: int | tuple[int, int] = (2, 4),
                 digits: tuple[int, int] = (2, 1), nesting: int = 0, ops: str = "+", term_ops: str = "*",
                 terms: int | tuple[int, int] = 2, combine: str = "sum",
                 group_size: int | tuple[int, int] = (2, 2), split: str | None = "train",
                 test_fraction: float = 0.1, source: str = "arith"):
        self.num_subproblems = _range(num_subproblems, "num_subproblems")
        self.group_size = _range(group_size, "group_size")
        self.terms = _range(terms, "terms")
        if max(self.num_subproblems[1], self.group_size[1]) > MAX_PLANS:
            raise ValueError(f"at most {MAX_PLANS} sub-problems per block (schema.MAX_PLANS)")
        if self.terms[0] < 2 or self.terms[1] > 8:
            raise ValueError(f"terms must be between 2 and 8 operands, got {terms!r}")
        if len(digits) != 2 or min(digits) < 1 or max(digits) > 6:
            raise ValueError(f"digits must be (a, b) with 1 <= a, b <= 6, got {digits!r}")
        if nesting not in (0, 1, 2):
            raise ValueError(f"nesting must be 0, 1 or 2, got {nesting!r}")
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
        if not term_ops or set(term_ops) - set("*+-"):
            raise ValueError(f"term_ops must be made of '*', '+' and '-', got {term_ops!r}")
        if combine not in ("sum", "tuple"):
            raise ValueError(f"combine must be 'sum' or 'tuple', got {combine!r}")
        if split not in ("train", "test", None):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.seed, self.digits, self.nesting = seed, tuple(digits), nesting
        self.ops, self.term_ops, self.combine, self.split = ops, term_ops, combine, split
        self.test_fraction, self.source = test_fraction, source
        self._cursor = 0

    @classmethod
    def level(cls, k: int, seed: int = 0, **overrides) -> ProceduralTasks:
        """A preset of the difficulty dial (0 easiest ... 5 hardest); keyword arguments override it."""
        if k not in cls.LEVELS:
            raise ValueError(f"unknown level {k}; choose one of {sorted(cls.LEVELS)}")
        return cls(seed=seed, **{**cls.LEVELS[k], **overrides})

    def _node(self, rng: random.Random, depth: int, count: tuple[int, int], top: bool):
        if depth == 0:
            k = rng.randint(*self.terms)
            nums = [_operand(rng, self.digits[0])] + [_operand(rng, self.digits[1]) for _ in range(k - 1)]
            return _Term(nums, rng.choice(self.term_ops))
        n = rng.randint(*count)
        items = [("+" if i == 0 else rng.choice(self.ops), self._node(rng, depth - 1, self.group_size, False))
                 for i in range(n)]
        return _Group(items, self.combine if top else "sum")

    def __getitem__(self, i: int) -> Problem:
        if i < 0:
            raise IndexError("procedural problems are indexed from 0")
        for attempt in range(100_000):
            rng = random.Random(f"{self.seed}/{i}/{attempt}")
            root = self._node(rng, self.nesting + 1, self.num_subproblems, True)
            question = f"Compute {root.expr(spaced=True)}."
            if self.split is None or self.split_of(question) == self.split:
                return self._problem(root, question)
        raise RuntimeError(f"no {self.split} problem found: the knobs allow too few distinct questions")

    def _problem(self, root: _Group, question: str) -> Problem:
        answer = root.answer
        solutions = {
            "parallel": _parallel(root) + boxed(answer),
            "sequential": "; ".join(_sequential(root)) + ". " + boxed(answer),
        }
        meta = {"num_subproblems": len(root.items), "nesting": self.nesting, "combine": self.combine,
                "values": [node.value for _, node in root.items], "split": self.split_of(question)}
        return Problem(id=f"{self.source}-{_stable_hash(question):016x}", question=question, answer=answer,
                       source=self.source, solutions=solutions, meta=meta)

    def __repr__(self) -> str:
        return (f"ProceduralTasks(seed={self.seed}, num_subproblems={self.num_subproblems}, digits={self.digits}, "
                f"terms={self.terms}, nesting={self.nesting}, ops={self.ops!r}, term_ops={self.term_ops!r}, "
                f"combine={self.combine!r}, split={self.split!r})")


class GroupSumTasks(_ProblemSource):
    """The tiny preset's task: add up each of 2-4 labelled groups of digits; the answer lists the sums.

    Each group is an independent sub-problem with real work in it (a running sum), so a parallel solution
    has long steps and a short guideline and takeaway, which is where the speedup of parallel decoding comes
    from::

        A=4 7 2 9; B=3 8 5 1. Sum each.
        <guideline><plan>1: sum A</plan><plan>2: sum B</plan></guideline>
        <step>1: A=4 7 2 9: 4+7=11, 11+2=13, 13+9=22, so A=22</step>
        <step>2: B=3 8 5 1: 3+8=11, 11+5=16, 16+1=17, so B=17</step>
        <takeaway>A=22 B=17</takeaway>\\boxed{(22,17)}

    Knobs: ``num_subproblems`` (groups, at most 5), ``terms`` (numbers per group: the length of each step),
    ``digits`` (digits per number, 1-4: 1 is the preset's 1-9; 2 draws 10-99, so the running sums carry).
    Problems are a pure function of ``(seed, index)``; ``split`` keeps train and test questions disjoint (a hash
    of the question text, as in :class:`ProceduralTasks`).
    """

    LABELS = "ABCDE"

    def __init__(self, seed: int = 0, num_subproblems: int | tuple[int, int] = (2, 4),
                 terms: int | tuple[int, int] = (5, 6), split: str | None = "train", test_fraction: float = 0.1,
                 digits: int = 1):
        self.seed = seed
        self.num_subproblems = _range(num_subproblems, "num_subproblems")
        self.terms = _range(terms, "terms")
        if self.num_subproblems[1] > len(self.LABELS):
            raise ValueError(f"num_subproblems is at most {len(self.LABELS)}, got {num_subproblems!r}")
        if self.terms[0] < 2:
            raise ValueError(f"terms must be >= 2 (a group of one number has nothing to add), got {terms!r}")
        if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 4:
            raise ValueError(f"digits must be an int from 1 to 4 (digits per number), got {digits!r}")
        self.digits = digits
        self._low, self._high = (1, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
        if split not in ("train", "test", None):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        self.split, self.test_fraction = split, test_fraction
        self._cursor = 0

    def __getitem__(self, i: int) -> Problem:
        if i < 0:
            raise IndexError("procedural problems are indexed from 0")
        for attempt in range(100_000):
            rng = random.Random(f"groupsum/{self.seed}/{i}/{attempt}")
            groups = [[rng.randint(self._low, self._high) for _ in range(rng.randint(*self.terms))]
                      for _ in range(rng.randint(*self.num_subproblems))]
            question = "; ".join(f"{self.LABELS[j]}={' '.join(map(str, g))}" for j, g in enumerate(groups))
            question += ". Sum each."
            if self.split is None or self.split_of(question) == self.split:
                return self._problem(groups, question)
        raise RuntimeError(f"no {self.split} problem found: the knobs allow too few distinct questions")

    @staticmethod
    def running_sum(group: list[int]) -> str:
        parts, total = [], group[0]
        for x in group[1:]:
            parts.append(f"{total}+{x}={total + x}")
            total += x
        return ", ".join(parts)

    def _problem(self, groups: list[list[int]], question: str) -> Problem:
        names = self.LABELS[: len(groups)]
        sums = [sum(g) for g in groups]
        answer = "(" + ",".join(map(str, sums)) + ")"
        collected = " ".join(f"{n}={s}" for n, s in zip(names, sums))
        parallel = format_block(
            [f"sum {n}" for n in names],
            [f"{n}={' '.join(map(str, g))}: {self.running_sum(g)}, so {n}={v}" for n, g, v in zip(names, groups, sums)],
            collected,
        ) + boxed(answer)
        sequential = " ".join(f"{n}: {self.running_sum(g)}." for n, g in zip(names, groups))
        sequential += f" So {collected}. " + boxed(answer)
        meta = {"num_subproblems": len(groups), "values": sums, "split": self.split_of(question)}
        return Problem(id=f"groupsum-{_stable_hash(question):016x}", question=question, answer=answer,
                       source="groupsum", solutions={"parallel": parallel, "sequential": sequential}, meta=meta)

    def __repr__(self) -> str:
        return (f"GroupSumTasks(seed={self.seed}, num_subproblems={self.num_subproblems}, terms={self.terms}, "
                f"digits={self.digits}, split={self.split!r})")


# -- benchmark loaders -------------------------------------------------------------------------------------------
class TaskFormatError(ValueError):
    """A problem file that does not follow any known schema; the message names the file and line (or item)."""


# The five benchmark files shipped in ../shared/benchmarks, by name.
BENCHMARK_FILES = {
    "math500": "math500/math500.json",
    "aime24": "aime24/test.jsonl",
    "amc23": "amc23/test.jsonl",
    "olympiadbench": "olympiadbench/test.jsonl",
    "minerva_math": "minerva_math/test.jsonl",
}
QUESTION_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "final_answer")
_GENERIC_STEMS = {"test", "train", "validation", "dev", "data", "problems"}


def _strip_math(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s


def _format_answer(value, nested: bool = False) -> str | None:
    """A gold answer as a string: 27.0 -> "27"; a list -> "a, b"; "$x$" -> "x"; None or empty -> None.

    A list inside the list keeps its nesting as a tuple: ``[1, [2, 3]]`` -> ``"1, (2, 3)"`` (two answers, the
    second a pair), never the three answers ``"1, 2, 3"``.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        s = _strip_math(value)
        return s or None
    if isinstance(value, (list, tuple)):
        parts = [_format_answer(v, nested=True) for v in value]
        if not parts or any(p is None for p in parts):
            return None
        return "(" + ", ".join(parts) + ")" if nested else ", ".join(parts)
    return None


def _row_to_problem(row, where: str, source: str, index: int) -> Problem:
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = next((row[k] for k in QUESTION_FIELDS if isinstance(row.get(k), str) and row[k].strip()), None)
    if question is None:
        raise TaskFormatError(f"{where}: missing field 'problem' (or 'question')")
    answer, raw = None, None
    for k in ANSWER_FIELDS:
        if k in row:
            raw = row[k]
            answer = _format_answer(raw)
            if answer is None:
                raise TaskFormatError(f"{where}: field {k!r} is empty or not a number/string/list ({raw!r:.60})")
            break
    solution = row.get("solution")
    solutions: dict[str, str] = {}
    if isinstance(solution, str) and solution.strip():
        solutions["reference"] = solution
    elif isinstance(solution, list):
        texts = [s for s in solution if isinstance(s, str) and s.strip()]
        for j, s in enumerate(texts):
            solutions["reference" if j == 0 else f"reference_{j + 1}"] = s
    if answer is None:
        ref = solutions.get("reference")
        box = last_boxed(ref) if ref else None
        if box is None or not box.strip():
            why = "has no \\boxed{}" if ref else "is missing too"
            raise TaskFormatError(f"{where}: missing field 'answer' (or 'final_answer'), and 'solution' {why}")
        answer = box.strip()
    rid = next((row[k] for k in ("id", "unique_id", "idx") if row.get(k) is not None), index)
    skip = set(QUESTION_FIELDS) | set(ANSWER_FIELDS) | {"solution"}
    meta = {k: v for k, v in row.items() if k not in skip}
    return Problem(id=f"{source}-{rid}", question=question, answer=answer, source=source, solutions=solutions,
                   meta=meta)


def iter_rows(path: str | Path, what: str = "rows") -> Iterator[tuple[str, object]]:
    """``(where, row)`` for each row of a JSON list (or an object holding one list) or a JSONL file.

    ``where`` names the file and line (JSONL) or item (JSON) for error messages; malformed JSON and non-UTF-8
    text raise :class:`TaskFormatError` naming the file and line. A UTF-8 byte-order mark at the start of the
    file is accepted (``utf-8-sig``: editors on Windows write one). Rows are read lazily.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise TaskFormatError(f"{path}: JSON nested too deeply to read") from None
            if isinstance(data, dict):  # {"data": [...]} and similar wrappers
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise TaskFormatError(f"{path}: expected a JSON list of {what} (or an object holding one list)")
                data = lists[0]
            if not isinstance(data, list):
                raise TaskFormatError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
            for i, row in enumerate(data):
                yield f"{path}: item {i} (0-based)", row
            return
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise TaskFormatError(f"{path}:{lineno}: JSON nested too deeply to read") from None
                yield f"{path}:{lineno}", row
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not UTF-8 text ({e})") from None


def load_problems(path: str | Path, source: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems from a ``.json`` list or a ``.jsonl`` file in any of the benchmark schemas.

    Per row: the question is ``problem`` or ``question``; the gold is ``answer`` or ``final_answer`` (numbers
    printed as integers when integral, lists joined with ", " and a list inside a list kept as a tuple ``(a, b)``,
    ``$`` stripped), else the last ``\\boxed{}`` of
    ``solution``. A reference solution is kept in ``solutions["reference"]``. ``source`` defaults to the file's
    name (its folder's name for generic names such as ``test.jsonl``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such problem file")
    if source is None:
        source = path.parent.name if path.stem in _GENERIC_STEMS and path.parent.name else path.stem
    if limit is not None and limit <= 0:
        return []
    problems: list[Problem] = []
    for where, row in iter_rows(path, what="problems"):
        problems.append(_row_to_problem(row, where, source, len(problems)))
        if limit and len(problems) >= limit:
            break
    return problems


def load_benchmark(name: str, data_dir: str | Path, limit: int | None = None) -> list[Problem]:
    """One of ``BENCHMARK_FILES`` from a benchmarks folder (e.g. ``../shared/benchmarks``)."""
    if name not in BENCHMARK_FILES:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARK_FILES)} (or use load_problems)")
    return load_problems(Path(data_dir) / BENCHMARK_FILES[name], source=name, limit=limit)


def load_hf(dataset: str, split: str = "test", source: str | None = None, limit: int | None = None,
            **load_kwargs) -> list[Problem]:
    """The same schemas from a Hugging Face dataset (needs ``pip install datasets`` and a network)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf needs the 'datasets' package: pip install datasets") from e
    ds = datasets.load_dataset(dataset, split=split, **load_kwargs)
    source = source or dataset.rsplit("/", 1)[-1]
    n = len(ds) if limit is None else min(limit, len(ds))
    return [_row_to_problem(dict(ds[i]), f"{dataset}[{split}]: row {i}", source, i) for i in range(n)]


__all__ = ["BENCHMARK_FILES", "Problem", "ProceduralTasks", "TaskFormatError", "iter_rows", "load_benchmark", "load_hf",
           "load_problems"]
