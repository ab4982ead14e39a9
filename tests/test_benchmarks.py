"""Benchmarks: the registry and its loaders (every schema, malformed rows), graders, check_graders on the shared
files, and `python -m benchmarks.eval` end to end on a tiny Qwen3 through the real engine."""

import json
import sys
from pathlib import Path

import pytest
import torch

import npr_env
from benchmarks import check_graders
from benchmarks.eval import main as eval_main
from npr_agent.eval_metrics import summarize
from npr_agent.evaluate import run_benchmark
from npr_env import prompt_ids
from npr_env import suites as registry
from npr_env.schema import format_block
from npr_env.tasks import TaskFormatError

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks is absent")
try:
    import reasoning_gym  # noqa: F401

    HAVE_RG = True
except ImportError:
    HAVE_RG = False
needs_rg = pytest.mark.skipif(not HAVE_RG, reason="reasoning-gym is not installed (pip install 'npr[zebra]')")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster on one thread here
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- the registry ---------------------------------------------------------------------------------------------
def test_eight_benchmarks_with_the_papers_k():
    assert set(registry.PAPER_ORDER) == set(registry.BENCHMARKS) and len(registry.BENCHMARKS) == 8
    ks = {n: b.default_k for n, b in registry.BENCHMARKS.items()}
    assert ks == {"aime25": 8, "aime24": 8, "hmmt25": 8, "amc23": 8,
                  "olympiadbench": 1, "minerva_math": 1, "zebralogic": 1, "math500": 1}
    assert registry.get("MATH500").name == "math500" and registry.get("minerva").name == "minerva_math"
    assert registry.parse_names("math500, amc23,math500") == ["math500", "amc23"]
    assert registry.parse_names("all") == list(registry.PAPER_ORDER)
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        registry.get("gsm8k")


# One or two rows of each public schema, a malformed row, and what it should load as.
SCHEMAS = {
    "aime25": ([{"id": "0", "problem": "Find the sum of all integer bases $b>9$ ...", "answer": "70"}],  # math-ai
               {"id": "1", "problem": "Find x."}, "answer", "70"),
    "aime24": ([{"id": 60, "problem": "Every morning Aya ...", "solution": "... $\\boxed{204}$", "answer": "204"}],
               {"id": 61, "solution": "no problem text"}, "problem", "204"),
    "hmmt25": ([{"problem_idx": 1, "problem": "Compute the sum of ...", "answer": "\\frac{1}{2}",  # MathArena
                 "problem_type": ["Algebra"]}], {"problem_idx": 2, "problem": "x", "answer": ""}, "answer",
               "\\frac{1}{2}"),
    "olympiadbench": ([{"id": 1606, "question": "How many moves ...?", "solution": ["Two moves suffice ..."],
                        "final_answer": ["$2$"], "answer_type": "Numerical"}],
                      {"id": 1607, "question": "q", "final_answer": []}, "final_answer", "2"),
    "minerva_math": ([{"problem": "Find the diameter ...", "solution": "$s=\\boxed{1.6}$ cm", "idx": 0}],
                     {"problem": "p", "solution": "no box here", "idx": 1}, "boxed", "1.6"),
    "amc23": ([{"id": 0, "question": "How many miles from City A ...?", "answer": 27.0}],
              {"id": 1, "question": "q", "answer": None}, "answer", "27"),
    "math500": ([{"problem": "Convert the point $(0,3)$ ...", "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$",
                  "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
                  "unique_id": "test/precalculus/807.json"}],
                {"solution": "s", "answer": "1"}, "problem", "\\left( 3, \\frac{\\pi}{2} \\right)"),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_math_loader_reads_its_schema_and_names_a_bad_line(tmp_path, name):
    rows, bad, field, gold = SCHEMAS[name]
    bench = registry.get(name)
    rel = bench.files[0]
    if rel.endswith(".json"):  # MATH500 ships as a JSON list
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_text(json.dumps(rows + rows))
    else:
        write_jsonl(tmp_path / rel, rows + rows)
    problems = registry.load(name, data_dir=tmp_path)
    assert len(problems) == 2 and problems[0].answer == gold and problems[0].source == name
    assert problems[0].question.startswith(rows[0].get("problem", rows[0].get("question"))[:10])
    assert registry.load(name, data_dir=tmp_path, limit=1) == problems[:1]
    # a malformed row: the error names the file, the line (or item) and the field
    if rel.endswith(".json"):
        (tmp_path / rel).write_text(json.dumps(rows + [bad]))
        where = "item 1"
    else:
        write_jsonl(tmp_path / rel, rows + [bad])
        where = f"{rel}:2"
    with pytest.raises(TaskFormatError) as e:
        registry.load(name, data_dir=tmp_path)
    assert where in str(e.value) and field in str(e.value)


def test_a_broken_json_line_is_named(tmp_path):
    p = write_jsonl(tmp_path / "aime25" / "test.jsonl", [SCHEMAS["aime25"][0][0], '{"problem": "x", "answ'])
    with pytest.raises(TaskFormatError, match=r"test.jsonl:2: invalid JSON"):
        registry.load("aime25", source=p)


def test_missing_data_and_offline_hub_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"aime25: no problems found.*--data-dir"):
        registry.load("aime25", data_dir=tmp_path)
    assert registry.resolve_source("aime25", None, online=True) == "hf:math-ai/aime25@test"
    assert registry.HFSource.parse("Hothan/OlympiadBench:OE_TO_maths_en_COMP@train").config == "OE_TO_maths_en_COMP"
    with pytest.raises(ValueError, match="owner/name"):
        registry.HFSource.parse("aime25")


@needs_bench
@pytest.mark.parametrize("name,n", [("math500", 500), ("aime24", 30), ("amc23", 40), ("olympiadbench", 675),
                                    ("minerva_math", 272)])
def test_shared_files_load_through_the_registry(name, n):
    problems = registry.load(name, data_dir=BENCH)
    assert len(problems) == n and all(p.answer for p in problems)
    assert registry.load(name, data_dir=BENCH, limit=3) == problems[:3]


def test_math_grading():
    from npr_env.tasks import Problem

    bench = registry.get("amc23")
    gold = Problem(id="amc23-0", question="q", answer="27", source="amc23")
    texts = ["so \\boxed{27}", "\\boxed{27.0}", "\\boxed{28}", "no box 27", "", "\\boxed{"]
    assert bench.grade_many(texts, [gold] * len(texts)) == [True, True, False, False, False, False]


# -- ZebraLogic -----------------------------------------------------------------------------------------------
GRID = {"id": "lgp-test-2x2-1", "size": "2*2", "puzzle": "There are 2 houses ... Clues: 1. Arnold is not in house 2.",
        "solution": {"header": ["House", "Name", "Drink"], "rows": [["1", "Arnold", "tea"], ["2", "Eric", "milk"]]}}
MC = {"id": "lgp-test-2x2-1#mc-1", "puzzle": "There are 2 houses ...", "question": "Who drinks tea?",
      "choices": ["Arnold", "Eric"], "answer": "Arnold"}
RG = {"question": "This is a logic puzzle ... Provide only the name of the person as your final answer.",
      "answer": "arnold", "metadata": {"source_dataset": "zebra_puzzles", "source_index": 0}}


def test_zebra_file_schemas_and_their_checkers(tmp_path):
    write_jsonl(tmp_path / "zebralogic" / "test.jsonl", [GRID, MC, RG])
    grid, mc, rg = registry.load("zebralogic", data_dir=tmp_path)
    bench = registry.get("zebralogic")
    assert grid.meta["grader"] == "grid" and json.loads(grid.answer)["House 2"] == {"Name": "Eric", "Drink": "milk"}
    good = json.dumps({"House 1": {"Name": "arnold", "Drink": "Tea"}, "House 2": {"Name": "Eric", "Drink": "milk"}})
    wrong = good.replace("milk", "water")
    assert bench.grade_many([f"\\boxed{{{good}}}", f"\\boxed{{{wrong}}}", "\\boxed{{not json}", good],
                            [grid] * 4) == [True, False, False, False]
    assert "Choices: Arnold, Eric" in mc.question and mc.answer == "Arnold"
    assert bench.grade_many(["\\boxed{\\text{arnold}}", "\\boxed{Eric}", "Arnold"], [mc] * 3) == [True, False, False]
    assert rg.meta["grader"] == "exact"
    assert bench.grade_many(["\\boxed{Arnold}", "\\boxed{bob}"], [rg] * 2) == [True, False]


@pytest.mark.parametrize("bad,what", [
    ({"id": "x", "puzzle": "p", "solution": {"header": ["House", "Name"], "rows": [["1", ""]]}}, "solution row 0"),
    ({"id": "x", "puzzle": "p", "question": "q", "choices": ["a", "b"]}, "'answer'"),
    ({"id": "x", "puzzle": "p", "question": "q", "choices": "a, b", "answer": "a"}, "'choices'"),
    ({"id": "x", "text": "what is this"}, "not a ZebraLogic row"),
])
def test_zebra_malformed_rows_name_file_and_line(tmp_path, bad, what):
    p = write_jsonl(tmp_path / "zebra.jsonl", [MC, bad])
    with pytest.raises(TaskFormatError) as e:
        registry.load("zebralogic", source=p)
    assert "zebra.jsonl:2" in str(e.value) and what in str(e.value)


@needs_rg
def test_zebra_generator_is_deterministic_and_graded_by_reasoning_gym():
    a = registry.load("zebralogic", limit=4, seed=3)
    assert a == registry.load("zebralogic", limit=4, seed=3) and len(a) == 4
    assert a[0].meta["grader"] == "reasoning_gym" and "House 1" in a[0].question
    assert registry.load("zebralogic", limit=2, seed=4)[0].question != a[0].question
    bench = registry.get("zebralogic")
    p = a[0]
    texts = [f"\\boxed{{{p.answer}}}", f"\\boxed{{\\text{{{p.answer.upper()}}}}}", "\\boxed{nobody}", p.answer]
    assert bench.grade_many(texts, [p] * 4) == [True, True, False, False]


def test_zebra_generator_without_reasoning_gym_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    registry._zebra_dataset.cache_clear()
    with pytest.raises(ImportError, match=r"npr\[zebra\]"):
        registry.load("zebralogic", limit=2, seed=12345)
    registry._zebra_dataset.cache_clear()


# -- check_graders on the shared files --------------------------------------------------------------------------
@needs_bench
def test_check_graders_on_the_shared_benchmarks(tmp_path):
    out = tmp_path / "rates.json"
    assert check_graders.main(["--data-dir", str(BENCH), "--json", str(out)]) == 0
    rates = json.loads(out.read_text())
    assert set(rates) == {"math500", "aime24", "olympiadbench", "minerva_math"}  # amc23 has no solutions
    for name in ("math500", "olympiadbench", "minerva_math"):
        assert rates[name]["rate"] >= 0.98 and rates[name]["n"] > 0, (name, rates[name]["failures"][:5])
    # AIME24: 30 AoPS write-ups (one ends in \framebox{204}, one in \boxed{\textbf{(073)}}).
    a = rates["aime24"]
    assert a["n"] == 30 and a["rate"] >= 0.98, a["failures"]


def test_reference_solution_rules():
    from npr_env.tasks import Problem

    p = Problem(id="x", question="q", answer="204", source="aime24",
                solutions={"reference": "so $\\framebox{204}$ minutes"})
    assert check_graders.reference_prediction(p, None) == (p.solutions["reference"], "solution (last box)")
    p.solutions = {"reference": "first \\boxed{1} then \\boxed{204}"}
    assert check_graders.reference_prediction(p, None)[0] == p.solutions["reference"]
    p.solutions = {"reference": "no final answer marked"}
    assert check_graders.reference_prediction(p, {"final_answer": ["$2^{1009}$"]})[0] == "\\boxed{$2^{1009}$}"
    assert check_graders.reference_prediction(p, {})[0] is None


# -- eval through the real engine ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = npr_env.load_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    Qwen3ForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_run_benchmark_grades_and_measures_real_rollouts(tmp_path, tiny_dir, mode):
    """Forced to worked NPR solutions (TrajectoryForcer), the tiny model's rollouts must be graded correct,
    format-valid and parallel, with the graph's token counts: the whole eval path on real engine output."""
    from benchmarks.eval import load_model
    from engine import NPREngine, SamplingParams, TrajectoryForcer

    write_jsonl(tmp_path / "amc23" / "test.jsonl", [
        {"id": 0, "question": "Compute 2*3 + 4*5.", "answer": 26.0},
        {"id": 1, "question": "Compute 3*3 + 2*2 + 5*1.", "answer": 18.0}])
    problems = registry.load("amc23", data_dir=tmp_path)
    model, tok = load_model(str(tiny_dir), torch.device("cpu"))
    solutions = [format_block(["2*3", "4*5"], ["2*3 = 6", "4*5 = 20"], "6+20 = 26") + "\\boxed{26}",
                 format_block(["3*3", "2*2", "5*1"], ["3*3 = 9", "2*2 = 4", "5*1 = 5"], "9+4+5 = 18") + "\\boxed{18}"]
    prompts = [prompt_ids(tok, p) for p in problems]
    forcers = [(pr, TrajectoryForcer(tok, pr, tok.encode(s, add_special_tokens=False) + [tok.eos_token_id]))
               for pr, s in zip(prompts, solutions)]

    def force(ctx, logits):
        return next(f for pr, f in forcers if ctx[:len(pr)] == pr)(ctx, logits)

    engine = NPREngine(model, tok, num_blocks=512, min_fork_budget=0)
    params = SamplingParams(max_new_tokens=256, n=2, seed=0, logits_processors=[force])
    records, wall = run_benchmark(engine, registry.get("amc23"), problems, prompts, params, mode, batch_size=1)
    assert len(records) == 4 and wall > 0
    assert [r.sample for r in records] == [0, 1, 0, 1]
    assert all(r.correct and r.valid and r.parallel and r.finish_reason == "eos" for r in records)
    assert [r.branches_per_block for r in records] == [[2], [2], [3], [3]]
    assert {r.answer for r in records} == {"26", "18"}
    s = summarize(records, k=2, wall_s=wall)
    assert s["avg@k"] == 1.0 and s["pass@k"] == 1.0 and s["parallel_rate"] == 1.0 and s["valid_rate"] == 1.0
    assert s["branches_per_block"] == pytest.approx(2.5)
    for r in records:
        assert r.critical_path_tokens < r.total_tokens  # siblings count once on the critical path


@needs_bench
def test_eval_cli_writes_json_markdown_and_pngs(tmp_path, tiny_dir):
    out = tmp_path / "eval"
    rc = eval_main(["--model", str(tiny_dir), "--benchmarks", "math500,amc23", "--data-dir", str(BENCH),
                    "--limit", "2", "--k", "2", "--max-new-tokens", "24", "--compare-sequential", "--out", str(out),
                    "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["instruction"] is False  # the shipped char tokenizer: instruction off by default
    assert set(res["results"]) == {"parallel", "sequential"}
    for mode in ("parallel", "sequential"):
        per = res["results"][mode]
        assert set(per) == {"math500", "amc23", "overall"}
        assert per["math500"]["n_samples"] == 4 and per["overall"]["n_problems"] == 4
        for key in ("avg@k", "pass@k", "valid_rate", "parallel_rate", "parallel_rate_valid", "branches_per_block",
                    "total_tokens_mean", "critical_path_tokens_mean", "tokens_per_s", "wall_s"):
            assert key in per["amc23"]
    assert set(res["speedup"]) == {"math500", "amc23", "overall"} and res["speedup"]["overall"]["wall"] > 0
    md = (out / "results.md").read_text()
    assert "| MATH500 |" in md and "| AMC23 |" in md and "## Speedup" in md and "## Definitions" in md
    for png in ("accuracy.png", "speedup.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (2 * 2 + 2 * 2)
    assert {"correct", "valid", "parallel", "text", "critical_path_tokens"} <= set(json.loads(lines[0]))


def test_eval_cli_errors_before_loading_a_model(tmp_path, capsys):
    rc = eval_main(["--model", str(tmp_path / "nope"), "--benchmarks", "aime25", "--data-dir", str(tmp_path)])
    assert rc == 2 and "aime25" in capsys.readouterr().err
    assert eval_main(["--model", "x", "--benchmarks", "gsm8k"]) == 2


@pytest.mark.slow
@needs_bench
@needs_rg
def test_done_when_command_small(tmp_path, tiny_dir):
    """The issue's end-to-end command (math500, amc23, zebralogic, --compare-sequential) at --limit 2."""
    out = tmp_path / "eval"
    rc = eval_main(["--model", str(tiny_dir), "--benchmarks", "math500,amc23,zebralogic", "--data-dir", str(BENCH),
                    "--limit", "2", "--compare-sequential", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["benchmarks"]["amc23"]["k"] == 8 and res["benchmarks"]["zebralogic"]["source"].startswith("reasoning-gym")
    assert res["results"]["parallel"]["amc23"]["n_samples"] == 16
    assert all((out / f).exists() for f in ("results.md", "accuracy.png", "speedup.png", "samples.jsonl"))


# -- perf -------------------------------------------------------------------------------------------------------
def test_perf_train_step_is_a_real_papo_step_on_forced_parallel_rollouts():
    from benchmarks.perf import ratios, train_step_section

    t = train_step_section(prompts_per_step=2, group_size=2, steps=1)
    (row,) = t["steps"]
    assert row["samples"] == 4 and row["kept"] == 4  # valid, not truncated: PAPO keeps them all
    assert row["valid_rate"] == 1.0 and row["parallel_rate"] == 1.0 and row["same_tokens"]
    assert row["loss_tokens"] > 0 and all(t["median"][k] > 0 for k in ("rollout_parallel_s", "update_s"))
    r = ratios({"skipped": "not measured here"}, t)
    assert r["train.rollout_share_of_step"] + r["train.update_share_of_step"] <= 1.0 + 1e-9
    assert not any(k.startswith("engine.") for k in r)


def test_error_kinds_names_the_first_faulty_step():
    from benchmarks.error_kinds import classify
    from npr_env.tasks import GroupSumTasks

    p = GroupSumTasks(seed=0, split="test").sample(1)[0]
    sol = p.solutions["parallel"]
    assert classify(p.question, sol, valid=True) == "reduce"  # every step right: a wrong answer is the reduce's
    assert classify(p.question, sol, valid=False) == "invalid"
    first = sol.index("<step>1: ") + len("<step>1: A=")
    d = sol[first]
    other = "1" if d != "1" else "2"
    assert classify(p.question, sol[:first] + other + sol[first + 1:], valid=True) == "copy"
    eq = sol.index("=", sol.index(":", first)) + 1  # the first sum's result
    assert classify(p.question, sol[:eq] + "9" + sol[eq:], valid=True) == "arithmetic"


def test_trainer_profile_times_the_every_row_update_beside_the_default(capsys):
    """`--modes parallel,parallel:every-row`: the same arm twice, one forwarding the rows with advantage 0 too."""
    from benchmarks import trainer_profile

    res = trainer_profile.main(["--steps", "1", "--prompts", "2", "--group", "2", "--max-new-tokens", "24",
                                "--modes", "parallel,parallel:every-row"])
    a, b = res["modes"]["parallel"], res["modes"]["parallel:every-row"]
    assert a["generated_tokens_per_step"] == b["generated_tokens_per_step"]  # the same rollouts
    assert a["updated_rate"] == b["updated_rate"]
    assert "parallel:every-row/parallel per step" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--modes"):
        trainer_profile.main(["--modes", "parallel:all"])


def test_trainer_speed_runs_each_mode_on_its_own_checkpoint_and_says_when_rollouts_are_invalid(capsys):
    """`--sequential-model`: the sequential arm decodes another checkpoint; each arm reports its valid rate, and a
    mode whose rollouts are mostly invalid gets a warning (the two modes would not do the same task)."""
    from benchmarks import trainer_speed
    from npr_agent.checkpoint import save_tiny_model

    par, seq = save_tiny_model(seed=0), save_tiny_model(seed=1)
    res = trainer_speed.main(["--model", par, "--sequential-model", seq, "--no-trl", "--steps", "1", "--prompts",
                              "2", "--group", "2", "--max-new-tokens", "16", "--threads", "1"])
    assert (res["model"], res["sequential_model"]) == (par, seq)
    for mode in trainer_speed.MODES:
        assert 0.0 <= res[f"ours_{mode}_valid_rate"] <= 1.0 and 0.0 <= res[f"ours_{mode}_accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "valid  accuracy" in out
    for mode in trainer_speed.MODES:  # a random model writes no valid trajectory
        assert res[f"ours_{mode}_valid_rate"] == 0.0
        assert f"warning: only 0% of the {mode} rollouts of" in out
    assert "--sequential-model <run>/stage1" not in out  # it was given
