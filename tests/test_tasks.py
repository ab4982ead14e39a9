"""Tasks: the procedural generator (determinism, splits, valid worked solutions) and the benchmark loaders."""

import json
import re
from pathlib import Path

import pytest

import npr_env
from npr_env.tasks import (
    BENCHMARK_FILES,
    Problem,
    ProceduralTasks,
    TaskFormatError,
    load_benchmark,
    load_problems,
)
from npr_env.verify import extract_answer, verify

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks is absent")


def _value(question: str) -> int:
    expr = question.removeprefix("Compute ").removesuffix(".")
    assert re.fullmatch(r"[0-9+\-*() ]+", expr), expr
    return eval(expr)  # noqa: S307 - digits, operators and parentheses only (checked above)


def _parts(question: str) -> list[str]:
    """The comma-separated sub-problems of a tuple question."""
    return question.removeprefix("Compute ").removesuffix(".").split(", ")


# -- procedural ----------------------------------------------------------------------------------------------
def test_deterministic_per_seed():
    a, b = ProceduralTasks(seed=7).sample(20), ProceduralTasks(seed=7).sample(20)
    assert a == b
    assert [p.question for p in ProceduralTasks(seed=8).sample(20)] != [p.question for p in a]
    t = ProceduralTasks(seed=7)
    assert t[5] == a[5] and t.sample(3) == a[:3] and t.sample(2) == a[3:5]
    t.reset()
    assert next(iter(t)) == a[0]
    s = ProceduralTasks(seed=7).stream()
    assert [next(s) for _ in range(4)] == a[:4]


def test_example_shape_and_answer():
    for p in ProceduralTasks(seed=0).sample(50):
        assert isinstance(p, Problem) and p.source == "arith" and p.id.startswith("arith-")
        assert re.fullmatch(r"Compute \d\d\*\d( \+ \d\d\*\d){1,3}\.", p.question), p.question
        assert 20 <= len(p.question) <= 60
        assert int(p.answer) == _value(p.question)
        assert p.prompt().startswith(p.question) and npr_env.INSTRUCTION in p.prompt()


def test_train_test_never_overlap():
    train = {p.question for s in range(5) for p in ProceduralTasks(seed=s, split="train").sample(300)}
    test = {p.question for s in range(5) for p in ProceduralTasks(seed=s, split="test").sample(100)}
    assert train and test and not (train & test)
    t = ProceduralTasks()
    assert all(t.split_of(q) == "test" for q in test) and all(t.split_of(q) == "train" for q in train)
    both = ProceduralTasks(seed=0, split=None).sample(400)
    assert {p.meta["split"] for p in both} == {"train", "test"}


@pytest.mark.parametrize("knobs", [
    {},
    {"num_subproblems": (2, 5), "digits": (2, 2)},
    {"digits": (1, 1), "num_subproblems": 2},
    {"ops": "+-", "term_ops": "*+-"},
    {"nesting": 1, "num_subproblems": (2, 3)},
    {"nesting": 1, "ops": "+-", "group_size": (2, 3)},
    {"combine": "tuple"},
    {"combine": "tuple", "terms": (3, 4), "term_ops": "+", "digits": (2, 2)},
    {"combine": "tuple", "nesting": 1, "digits": (1, 1)},
], ids=["tiny", "wide", "one-digit", "op-mix", "nested", "nested-op-mix", "tuple", "tuple-additions",
        "tuple-nested"])
def test_parallel_solutions_are_strictly_valid_for_200_seeds(knobs):
    tok = npr_env.load_tokenizer()
    for seed in range(200):
        p = ProceduralTasks(seed=seed, **knobs)[0]
        g = npr_env.ExecutionGraph.from_text(p.solutions["parallel"], tok, prompt=p.question, constraints="strict")
        assert g.is_valid, (p.question, p.solutions["parallel"], [v.message for v in g.violations])
        assert g.stats.num_parallel_blocks >= 1
        if knobs.get("combine") == "tuple":
            assert p.answer == "(" + ", ".join(str(_value("Compute " + q + ".")) for q in _parts(p.question)) + ")"
        else:
            assert int(p.answer) == _value(p.question)
        assert extract_answer(p.solutions["parallel"]) == p.answer
        if knobs.get("nesting"):
            assert max(b.depth for b in g.blocks) == 2


def test_sequential_solutions_box_the_right_answer():
    for seed in range(100):
        for knobs in ({}, {"nesting": 1, "ops": "+-"}, {"combine": "tuple"}):
            p = ProceduralTasks(seed=seed, **knobs)[0]
            seq = p.solutions["sequential"]
            assert "<" not in seq  # plain chain of thought, no tags
            assert extract_answer(seq) == p.answer and verify(seq, p.answer)


def test_takeaway_holds_the_sum_and_steps_the_products():
    p = ProceduralTasks(seed=3, num_subproblems=3)[0]
    outline = npr_env.parse(p.solutions["parallel"]).outline()
    block = next(i for i in outline["items"] if i["kind"] == "block")
    assert [pl["number"] for pl in block["plans"]] == ["1", "2", "3"]
    values = [int(re.search(r"= (-?\d+)", s["items"][0]["text"]).group(1)) for s in block["steps"]]
    assert block["takeaway"] == "+".join(map(str, values)) + f" = {p.answer}"
    assert sum(values) == int(p.answer)


def test_tuple_combine_takeaway_only_collects():
    p = ProceduralTasks(seed=2, combine="tuple", num_subproblems=3, terms=3, term_ops="+")[0]
    assert re.fullmatch(r"Compute \d\d\+\d\+\d, \d\d\+\d\+\d, \d\d\+\d\+\d\.", p.question), p.question
    block = next(i for i in npr_env.parse(p.solutions["parallel"]).outline()["items"] if i["kind"] == "block")
    assert block["takeaway"] == p.answer == "(" + ", ".join(map(str, p.meta["values"])) + ")"
    assert verify(p.solutions["sequential"], p.answer)
    assert not verify("\\boxed{(" + ", ".join(map(str, p.meta["values"][::-1])) + ")}", p.answer)


def test_single_subproblem_is_relaxed_valid_only():
    p = ProceduralTasks(seed=1, num_subproblems=1)[0]
    assert npr_env.parse(p.solutions["parallel"], constraints="relaxed").is_valid
    assert [v.code for v in npr_env.parse(p.solutions["parallel"]).violations] == ["NO_PARALLEL_BLOCK"]


def test_levels_and_knob_validation():
    for k in ProceduralTasks.LEVELS:
        p = ProceduralTasks.level(k, seed=k)[0]
        assert int(p.answer) == _value(p.question)
    assert ProceduralTasks.level(2).num_subproblems == (2, 4)
    with pytest.raises(ValueError):
        ProceduralTasks.level(99)
    for bad in ({"num_subproblems": 6}, {"num_subproblems": (3, 2)}, {"digits": (0, 1)}, {"nesting": 3},
                {"ops": "*"}, {"term_ops": "/"}, {"split": "dev"}, {"test_fraction": 0.0}, {"terms": 1},
                {"combine": "product"}):
        with pytest.raises(ValueError):
            ProceduralTasks(**bad)


def test_difficulty_grows_with_the_dial():
    def mean_len(k):
        return sum(len(p.solutions["parallel"]) for p in ProceduralTasks.level(k).sample(50)) / 50

    assert mean_len(0) < mean_len(2) < mean_len(5)


# -- loaders: the real files ---------------------------------------------------------------------------------
@needs_bench
def test_load_math500():
    ps = load_benchmark("math500", BENCH, limit=5)
    assert len(ps) == 5 and ps[0].source == "math500"
    assert ps[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert ps[0].id == "math500-test/precalculus/807.json"
    assert "reference" in ps[0].solutions and ps[0].meta["level"] == 2
    assert all(verify(p.solutions["reference"], p.answer) for p in ps)


@needs_bench
def test_load_aime24_and_amc23():
    aime = load_problems(BENCH / "aime24" / "test.jsonl", limit=3)
    assert [p.source for p in aime] == ["aime24"] * 3 and aime[0].answer == "204" and aime[0].id == "aime24-60"
    amc = load_benchmark("amc23", BENCH)
    assert len(amc) == 40 and amc[0].answer == "27"  # 27.0 in the file
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in amc)
    assert not amc[0].solutions


@needs_bench
def test_load_olympiadbench_and_minerva():
    ob = load_benchmark("olympiadbench", BENCH, limit=3)
    assert ob[0].answer == "2" and ob[1].answer == "\\frac{1}{2 n+2}"  # "$...$" stripped
    assert "reference" in ob[0].solutions
    mm = load_benchmark("minerva_math", BENCH, limit=4)
    assert mm[0].answer == "1.6"  # the last \boxed{} of the solution
    assert all(p.answer == extract_answer(p.solutions["reference"]).strip() for p in mm)


@needs_bench
@pytest.mark.parametrize("name", sorted(BENCHMARK_FILES))
def test_every_row_of_every_file_loads(name):
    ps = load_benchmark(name, BENCH)
    assert ps and all(p.question and p.answer for p in ps)
    assert len({p.id for p in ps}) == len(ps)


# -- loaders: malformed files --------------------------------------------------------------------------------
def _write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_bad_json_line_names_file_and_line(tmp_path):
    f = _write(tmp_path, "bad.jsonl", '{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": \n')
    with pytest.raises(TaskFormatError, match=r"bad\.jsonl:3: invalid JSON") as e:
        load_problems(f)
    assert str(f) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_fields_name_file_line_and_field(tmp_path):
    f = _write(tmp_path, "noanswer.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": "b"}\n')
    with pytest.raises(TaskFormatError, match=r"noanswer\.jsonl:2: missing field 'answer'"):
        load_problems(f)
    f = _write(tmp_path, "noq.jsonl", '{"answer": "1"}\n')
    with pytest.raises(TaskFormatError, match=r"noq\.jsonl:1: missing field 'problem' \(or 'question'\)"):
        load_problems(f)
    f = _write(tmp_path, "nobox.jsonl", '{"problem": "a", "solution": "it is 3"}\n')
    with pytest.raises(TaskFormatError, match=r"nobox\.jsonl:1: .*'solution' has no \\boxed"):
        load_problems(f)
    f = _write(tmp_path, "empty_answer.jsonl", '{"question": "a", "final_answer": []}\n')
    with pytest.raises(TaskFormatError, match=r"empty_answer\.jsonl:1: field 'final_answer' is empty"):
        load_problems(f)
    f = _write(tmp_path, "notobj.jsonl", '["problem", "answer"]\n')
    with pytest.raises(TaskFormatError, match=r"notobj\.jsonl:1: expected a JSON object"):
        load_problems(f)


def test_json_list_errors_name_the_item(tmp_path):
    f = _write(tmp_path, "items.json", json.dumps([{"problem": "a", "answer": "1"}, {"question": "b"}]))
    with pytest.raises(TaskFormatError, match=r"items\.json: item 1 \(0-based\): missing field 'answer'"):
        load_problems(f)
    f = _write(tmp_path, "broken.json", '[\n{"problem": "a",\n "answer": }\n]')
    with pytest.raises(TaskFormatError, match=r"broken\.json:3: invalid JSON"):
        load_problems(f)
    f = _write(tmp_path, "scalar.json", "3")
    with pytest.raises(TaskFormatError, match="expected a JSON list"):
        load_problems(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")


def test_schema_variants(tmp_path):
    rows = [
        {"question": "q1", "final_answer": ["$3$", "$4$"], "solution": ["s1", "s2"]},
        {"problem": "q2", "answer": 2.5},
        {"problem": "q3", "solution": "so \\boxed{\\frac{1}{2}} done"},
        {"problem": "q4", "answer": -3.0, "idx": 9},
    ]
    f = _write(tmp_path, "test.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ps = load_problems(f)
    assert [p.answer for p in ps] == ["3, 4", "2.5", "\\frac{1}{2}", "-3"]
    assert ps[0].solutions == {"reference": "s1", "reference_2": "s2"}
    assert ps[0].source == tmp_path.name  # generic file name: the folder names the source
    assert ps[3].id == f"{tmp_path.name}-9" and ps[1].id == f"{tmp_path.name}-1"
    assert [p.answer for p in load_problems(f, source="mine", limit=2)] == ["3, 4", "2.5"]
    assert load_problems(f, source="mine")[0].source == "mine"
    g = _write(tmp_path, "wrapped.json", json.dumps({"data": rows}))
    assert [p.answer for p in load_problems(g)] == ["3, 4", "2.5", "\\frac{1}{2}", "-3"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope", tmp_path)
