"""The paper's eight reasoning benchmarks: where their problems come from and how an answer is graded.

    from npr_env import suites
    bench = suites.get("aime25")                                     # aliases and any case work too
    problems = suites.load("math500", data_dir="../shared/benchmarks", limit=8)
    verdicts = bench.grade_many(response_texts, problems)            # one bool per (text, problem)

Where a benchmark's problems come from, first match wins:

1. ``path``: a JSON/JSONL file in the benchmark's public schema (or ``source="hf:owner/name[:config][@split]"``
   for a Hugging Face dataset, or ``source="generator"`` for ZebraLogic);
2. a file under ``data_dir``: ``<data_dir>/<name>/test.jsonl`` and the other names in ``Benchmark.files``;
3. ZebraLogic only: puzzles from reasoning-gym's zebra-puzzle generator (``pip install npr[zebra]``);
4. the benchmark's Hugging Face dataset, when the machine is online (``pip install datasets``).

Math benchmarks are read by :func:`npr_env.tasks.load_problems` (any of the public math schemas: ``problem`` or
``question``; ``answer`` or ``final_answer``; else the last ``\\boxed{}`` of ``solution``) and graded by
:func:`npr_env.verify.verify` (last ``\\boxed{}`` of the response against the gold). ZebraLogic has its own
schemas and checkers: reasoning-gym's ``score_answer`` for generated puzzles, the choice for ZebraLogicBench's
``mc_mode`` rows, and every cell of the grid for ``grid_mode`` rows.

Default k follows the paper: avg@8 for AIME25, AIME24, HMMT25 and AMC23; avg@1 for the others.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from npr_env.tasks import Problem, TaskFormatError, iter_rows, load_hf, load_problems
from npr_env.verify import extract_answer, verify_many


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset: ``load_dataset(dataset, config, split=split)``."""

    dataset: str
    split: str = "test"
    config: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HFSource:
        """``owner/name[:config][@split]``, e.g. ``Hothan/OlympiadBench:OE_TO_maths_en_COMP@train``."""
        rest, _, split = spec.partition("@")
        dataset, _, config = rest.partition(":")
        if "/" not in dataset:
            raise ValueError(f"bad Hugging Face dataset {spec!r}: expected owner/name[:config][@split]")
        return cls(dataset, split or "test", config or None)

    def __str__(self) -> str:
        return self.dataset + (f":{self.config}" if self.config else "") + f"@{self.split}"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its name, the paper's k, where to find it and how to grade it."""

    name: str  # registry key, also the folder name under --data-dir
    title: str  # as the paper's tables spell it
    default_k: int  # avg@k of the paper
    files: tuple[str, ...]  # candidate paths under --data-dir, first existing wins
    hf: HFSource | None = None
    kind: str = "math"  # "math": math-verify on the last \boxed{}; "zebra": the puzzle's own checker
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def find_file(self, data_dir: str | Path | None) -> Path | None:
        if data_dir is None:
            return None
        for rel in self.files:
            p = Path(data_dir) / rel
            if p.is_file():
                return p
        return None

    def load(self, data_dir: str | Path | None = None, source: str | Path | None = None, limit: int | None = None,
             online: bool | None = None, seed: int = 0, zebra: dict | None = None) -> list[Problem]:
        """The benchmark's problems (see the module docstring for the order of sources)."""
        return load(self.name, data_dir=data_dir, source=source, limit=limit, online=online, seed=seed, zebra=zebra)

    def grade_many(self, texts: Sequence[str], problems: Sequence[Problem], timeout: float = 5.0) -> list[bool]:
        """One verdict per (response text, problem); never raises on model output."""
        if len(texts) != len(problems):
            raise ValueError(f"{len(texts)} responses for {len(problems)} problems")
        if self.kind == "zebra":
            return [grade_zebra(t, p) for t, p in zip(texts, problems)]
        return verify_many(list(texts), [p.answer for p in problems], timeout=timeout)

    def grade(self, text: str, problem: Problem, timeout: float = 5.0) -> bool:
        return self.grade_many([text], [problem], timeout)[0]


def _files(*names: str) -> tuple[str, ...]:
    out = []
    for n in names:
        out += [f"{n}/test.jsonl", f"{n}/test.json", f"{n}.jsonl", f"{n}.json"]
    return tuple(out)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("aime25", "AIME25", 8, _files("aime25", "aime2025", "aime_2025"),
              HFSource("math-ai/aime25", "test"), aliases=("aime2025", "aime_2025")),
    Benchmark("aime24", "AIME24", 8, _files("aime24", "aime2024", "aime_2024"),
              HFSource("HuggingFaceH4/aime_2024", "train"), aliases=("aime2024", "aime_2024")),
    Benchmark("hmmt25", "HMMT25", 8, _files("hmmt25", "hmmt_feb_2025", "hmmt"),
              HFSource("MathArena/hmmt_feb_2025", "train"), aliases=("hmmt_feb_2025", "hmmt")),
    Benchmark("olympiadbench", "OlympiadBench", 1, ("olympiadbench/test.jsonl",) + _files("olympiadbench")[1:],
              HFSource("Hothan/OlympiadBench", "train", "OE_TO_maths_en_COMP"), aliases=("olympiad",)),
    Benchmark("minerva_math", "Minerva-Math", 1, _files("minerva_math", "minerva", "minervamath"),
              HFSource("math-ai/minervamath", "test"), aliases=("minerva", "minervamath", "minerva-math")),
    Benchmark("zebralogic", "ZebraLogic", 1, _files("zebralogic", "zebra_logic", "zebra"),
              HFSource("allenai/ZebraLogicBench-private", "test", "mc_mode"), kind="zebra",
              aliases=("zebra", "zebra_logic", "zebra-logic")),
    Benchmark("amc23", "AMC23", 8, _files("amc23", "amc2023", "amc"),
              HFSource("math-ai/amc23", "test"), aliases=("amc2023", "amc")),
    Benchmark("math500", "MATH500", 1, ("math500/math500.json",) + _files("math500", "math_500", "MATH500"),
              HFSource("HuggingFaceH4/MATH-500", "test"), aliases=("math_500", "math-500")),
]}
# The paper's order (Table 1).
PAPER_ORDER = ("aime25", "aime24", "hmmt25", "olympiadbench", "minerva_math", "zebralogic", "amc23", "math500")
_ALIASES = {a: b.name for b in BENCHMARKS.values() for a in (b.name, *b.aliases)}


def get(name: str) -> Benchmark:
    """A benchmark by name or alias (case-insensitive); the error lists the known names."""
    key = _ALIASES.get(name.strip().lower().replace(" ", ""))
    if key is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(PAPER_ORDER)}")
    return BENCHMARKS[key]


def parse_names(spec: str | Sequence[str]) -> list[str]:
    """``"math500,amc23"`` or ``"all"`` -> registry names, in the given order, without duplicates."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        for n in (PAPER_ORDER if part.lower() == "all" else (get(part).name,)):
            if n not in names:
                names.append(n)
    if not names:
        raise ValueError("no benchmark given")
    return names


def default_data_dir() -> Path | None:
    """``$NPR_DATA_DIR``, else ``../shared/benchmarks`` when it exists (the layout next to a checkout)."""
    env = os.environ.get("NPR_DATA_DIR")
    if env:
        return Path(env)
    p = Path("..") / "shared" / "benchmarks"
    return p if p.is_dir() else None


def hf_online() -> bool:
    """False when the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return not any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                   for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# -- loading ------------------------------------------------------------------------------------------------
def resolve_source(name: str, data_dir: str | Path | None = None, source: str | Path | None = None,
                   online: bool | None = None) -> str:
    """Where ``load`` will read benchmark ``name`` from: a file path, ``"hf:..."`` or ``"generator"``."""
    bench = get(name)
    if source is not None:
        return str(source)
    path = bench.find_file(data_dir)
    if path is not None:
        return str(path)
    if bench.kind == "zebra":
        return "generator"
    online = hf_online() if online is None else online
    if bench.hf is not None and online:
        return f"hf:{bench.hf}"
    where = f"no file under --data-dir {data_dir}" if data_dir else "no --data-dir given"
    raise FileNotFoundError(
        f"{bench.name}: no problems found ({where}; Hugging Face {bench.hf} skipped: offline). Looked for "
        f"{', '.join(bench.files[:4])}, ...; pass --data-dir DIR or --source {bench.name}=FILE, or go online")


def load(name: str, data_dir: str | Path | None = None, source: str | Path | None = None, limit: int | None = None,
         online: bool | None = None, seed: int = 0, zebra: dict | None = None) -> list[Problem]:
    """Problems of benchmark ``name``; ``problem.source`` is the registry name.

    ``source``: a file path, ``"hf:owner/name[:config][@split]"``, or ``"generator"`` (ZebraLogic). Without it:
    a file under ``data_dir``, then (ZebraLogic) the generator, then the HF dataset if ``online`` (default:
    unless ``HF_HUB_OFFLINE`` is set); see :func:`resolve_source`. ``zebra``: generator settings (``size``,
    ``num_people``, ``num_characteristics``); ``seed`` seeds the generator.
    """
    bench = get(name)
    spec = resolve_source(name, data_dir, source, online)
    if limit is not None and limit <= 0:
        return []
    if spec.startswith("hf:"):
        return _load_hf(bench, HFSource.parse(spec[3:]), limit)
    if spec == "generator":
        if bench.kind != "zebra":
            raise ValueError(f"{bench.name}: only zebralogic has a generator")
        return generate_zebra(limit, seed=seed, **(zebra or {}))
    return _load_file(bench, Path(spec), limit)


def _load_file(bench: Benchmark, path: Path, limit: int | None) -> list[Problem]:
    if bench.kind == "zebra":
        return load_zebra_file(path, limit=limit)
    return load_problems(path, source=bench.name, limit=limit)


def _load_hf(bench: Benchmark, hf: HFSource, limit: int | None) -> list[Problem]:
    try:
        if bench.kind == "zebra":
            return _zebra_from_hf(hf, limit)
        kwargs = {"name": hf.config} if hf.config else {}
        return load_hf(hf.dataset, split=hf.split, source=bench.name, limit=limit, **kwargs)
    except ImportError as e:
        raise ImportError(f"{bench.name}: reading {hf} from Hugging Face failed: {e}. Or pass --data-dir DIR or "
                          f"--source {bench.name}=FILE") from e
    except TaskFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all mean "not available here"
        raise RuntimeError(f"{bench.name}: could not load the Hugging Face dataset {hf} ({type(e).__name__}: "
                           f"{e}). Offline? Pass --data-dir DIR or --source {bench.name}=FILE instead.") from e


# -- ZebraLogic ---------------------------------------------------------------------------------------------
def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("ZebraLogic puzzles are generated with reasoning-gym, which is not installed: "
                          "pip install 'npr[zebra]' (or pass a ZebraLogic file with --source zebralogic=FILE)") from e
    return reasoning_gym


@lru_cache(maxsize=8)
def _zebra_dataset(size: int, seed: int, num_people: int, num_characteristics: int):
    rg = _reasoning_gym()
    return rg.create_dataset("zebra_puzzles", size=size, seed=seed, num_people=num_people,
                             num_characteristics=num_characteristics)


def generate_zebra(limit: int | None = None, seed: int = 0, size: int | None = None, num_people: int = 4,
                   num_characteristics: int = 4) -> list[Problem]:
    """Zebra puzzles from reasoning-gym, graded by its own ``score_answer``: ``size`` of them (default: ``limit``,
    else 100), the first ``limit`` returned. Puzzle ``i`` depends only on ``(seed, i)`` and the sizes."""
    size = size if size is not None else (limit or 100)
    n = size if limit is None else min(limit, size)
    cfg = {"size": size, "seed": seed, "num_people": num_people, "num_characteristics": num_characteristics}
    ds = _zebra_dataset(**cfg)
    out = []
    for i in range(n):
        e = ds[i]
        out.append(Problem(id=f"zebralogic-rg{seed}-{i}", question=e["question"], answer=str(e["answer"]),
                           source="zebralogic", meta={"grader": "reasoning_gym", "rg_config": cfg, "rg_index": i,
                                                      "metadata": e.get("metadata", {})}))
    return out


def _grid_answer(solution, where: str) -> dict[str, dict[str, str]]:
    """ZebraLogicBench ``solution = {header: ["House", "Name", ...], rows: [["1", "Arnold", ...], ...]}`` as
    ``{"House 1": {"Name": "Arnold", ...}, ...}``."""
    header, rows = (solution.get("header"), solution.get("rows")) if isinstance(solution, dict) else (None, None)
    if not (isinstance(header, list) and len(header) >= 2 and isinstance(rows, list) and rows):
        raise TaskFormatError(f"{where}: 'solution' must be {{'header': [...], 'rows': [[...], ...]}}")
    grid = {}
    for j, r in enumerate(rows):
        if not (isinstance(r, list) and len(r) == len(header) and all(isinstance(c, str) and c.strip() for c in r)):
            raise TaskFormatError(f"{where}: solution row {j} must have {len(header)} non-empty strings")
        grid[f"House {r[0].strip()}"] = {h: c.strip() for h, c in zip(header[1:], r[1:])}
    return grid


GRID_INSTRUCTION = ('Give the full solution as JSON inside \\boxed{}, one entry per house, e.g. '
                    '\\boxed{{"House 1": {"Name": "...", ...}, "House 2": {...}}}.')


def zebra_problem(row, where: str, index: int) -> Problem:
    """One ZebraLogic row: ZebraLogicBench ``grid_mode`` / ``mc_mode``, or reasoning-gym's ``question/answer``."""
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    rid = row.get("id", index)
    puzzle = row.get("puzzle")
    if "solution" in row and isinstance(puzzle, str):  # grid_mode
        grid = _grid_answer(row["solution"], where)
        return Problem(id=f"zebralogic-{rid}", question=f"{puzzle.strip()}\n\n{GRID_INSTRUCTION}",
                       answer=json.dumps(grid), source="zebralogic",
                       meta={"grader": "grid", "size": row.get("size")})
    if "choices" in row and isinstance(puzzle, str):  # mc_mode
        q, choices, ans = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise TaskFormatError(f"{where}: missing field 'question'")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise TaskFormatError(f"{where}: 'choices' must be a non-empty list of strings")
        if not isinstance(ans, str) or not ans.strip():
            raise TaskFormatError(f"{where}: missing field 'answer' (the public ZebraLogicBench hides it; "
                                  "use the -private release)")
        text = f"{puzzle.strip()}\n\n{q.strip()}\nChoices: {', '.join(choices)}."
        return Problem(id=f"zebralogic-{rid}", question=text, answer=ans.strip(), source="zebralogic",
                       meta={"grader": "choice", "choices": choices})
    q, ans = row.get("question"), row.get("answer")  # reasoning-gym dump: {question, answer, metadata}
    if not isinstance(q, str) or not q.strip():
        raise TaskFormatError(f"{where}: not a ZebraLogic row: expected 'puzzle' + 'solution' (grid_mode), "
                              "'puzzle' + 'choices' + 'answer' (mc_mode) or 'question' + 'answer' (reasoning-gym)")
    if not isinstance(ans, str) or not ans.strip():
        raise TaskFormatError(f"{where}: missing field 'answer'")
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return Problem(id=f"zebralogic-{rid}", question=q, answer=ans.strip(), source="zebralogic",
                   meta={"grader": "exact", "metadata": meta})


def load_zebra_file(path: str | Path, limit: int | None = None) -> list[Problem]:
    """ZebraLogic puzzles from a JSON/JSONL file in any of the schemas of :func:`zebra_problem`."""
    out = []
    for where, row in iter_rows(path, what="puzzles"):
        if limit is not None and len(out) >= limit:
            break
        out.append(zebra_problem(row, where, len(out)))
    return out


def _zebra_from_hf(hf: HFSource, limit: int | None) -> list[Problem]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading from Hugging Face needs the 'datasets' package: pip install datasets") from e
    ds = datasets.load_dataset(hf.dataset, hf.config, split=hf.split)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [zebra_problem(dict(ds[i]), f"{hf}: row {i}", i) for i in range(n)]


_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def clean_answer(ans: str) -> str:
    """A boxed word answer as plain text: ``\\text{Arnold}`` -> ``Arnold``; ``$`` and outer space dropped."""
    for _ in range(3):
        ans = _TEXT.sub(r"\1", ans)
    return ans.replace("$", "").strip()


def _same_word(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def grade_zebra(text: str, problem: Problem) -> bool:
    """The puzzle's own checker on the last ``\\boxed{}`` of ``text``; False without one."""
    try:
        boxed = extract_answer(text)
        if boxed is None:
            return False
        pred = clean_answer(boxed)
        grader = problem.meta.get("grader", "exact")
        if grader == "reasoning_gym":
            cfg = problem.meta["rg_config"]
            ds = _zebra_dataset(**cfg)
            entry = {"question": problem.question, "answer": problem.answer,
                     "metadata": problem.meta.get("metadata", {})}
            return ds.score_answer(pred, entry) >= 1.0
        if grader == "grid":
            return _grid_correct(pred, json.loads(problem.answer))
        return _same_word(pred, problem.answer)  # "choice" and "exact": reasoning-gym's rule, case-insensitive
    except Exception:  # noqa: BLE001 - model output never raises
        return False


def _grid_correct(pred: str, gold: dict[str, dict[str, str]]) -> bool:
    """Puzzle-level accuracy: every cell of the gold grid, case-insensitive; house keys "House 1" or "1"."""
    try:
        got = json.loads(pred)
    except (json.JSONDecodeError, RecursionError):
        return False
    if not isinstance(got, dict):
        return False
    norm = {str(k).lower().replace("house", "").strip(): v for k, v in got.items()}
    for house, cells in gold.items():
        row = norm.get(house.lower().replace("house", "").strip())
        if not isinstance(row, dict):
            return False
        row = {str(k).lower(): v for k, v in row.items()}
        for col, val in cells.items():
            v = row.get(col.lower())
            if not isinstance(v, str) or not _same_word(v, val):
                return False
    return True


__all__ = ["BENCHMARKS", "PAPER_ORDER", "Benchmark", "HFSource", "default_data_dir", "generate_zebra", "get",
           "grade_zebra", "hf_online", "load", "load_zebra_file", "parse_names", "resolve_source",
           "zebra_problem"]
