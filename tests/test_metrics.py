"""Benchmark metrics against hand-computed values: pass@k, avg@k, the parallel-rate definition, summaries."""

from math import comb

import pytest

import npr_env
from npr_agent.eval_metrics import (
    SampleRecord,
    avg_at_k,
    is_parallel,
    mean_pass_at_k,
    overall,
    parallel_rate,
    pass_at_k,
    speedup,
    summarize,
)
from npr_env.schema import format_block


# -- pass@k / avg@k -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),  # pass@1 is the plain accuracy
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 0, 2, 0.0),  # nothing correct
    (4, 4, 1, 1.0),  # everything correct
    (5, 4, 2, 1.0),  # n - c < k: every k-subset holds a correct sample
    (8, 1, 8, 1.0),  # k = n: "any correct"
    (8, 0, 8, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_and_pass_at_k_over_problems():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    # pass@2 per problem: 1 - C(3,2)/C(4,2) = 0.5, then 1, then 0
    assert mean_pass_at_k(correct, 2) == pytest.approx(0.5)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 == avg@k
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)  # k = n: any correct
    assert avg_at_k([]) == 0.0 and mean_pass_at_k([], 1) == 0.0


# -- the parallel-rate definition on hand-made graphs -------------------------------------------------------
TWO = format_block(["add a b", "add c d"], ["2+3 = 5", "4+4 = 8"], "5+8 = 13 total") + "\\boxed{13}"
ONE = format_block(["add all"], ["2+3+4+4 = 13"], "the sum is 13") + "\\boxed{13}"
PLAIN = "2+3+4+4 = 13, so \\boxed{13}"
ONE_THEN_THREE = ONE + format_block(["check a", "check b", "check c"], ["13 is right", "yes 13 ok", "13 again ok"],
                                    "all agree on 13") + "\\boxed{13}"
NESTED = ("<guideline><plan>1: split it</plan></guideline><step>1: <guideline><plan>1: part a</plan>"
          "<plan>2: part b</plan></guideline><step>1: aaaaaaa</step><step>2: bbbbbbbbb</step>"
          "<takeaway>a and b fine</takeaway> done</step><takeaway>all good now</takeaway>\\boxed{3}")


def test_parallel_means_a_block_with_two_or_more_branches():
    graphs = {name: npr_env.parse(text) for name, text in
              [("two", TWO), ("one", ONE), ("plain", PLAIN), ("one_then_three", ONE_THEN_THREE), ("nested", NESTED)]}
    assert graphs["two"].stats.branches_per_block == [2]
    assert graphs["one"].stats.branches_per_block == [1]
    assert graphs["plain"].stats.branches_per_block == []
    assert sorted(graphs["nested"].stats.branches_per_block) == [1, 2]
    expected = {"two": True, "one": False, "plain": False, "one_then_three": True, "nested": True}
    for name, g in graphs.items():
        assert is_parallel(g) is expected[name], name
        assert is_parallel(g.stats) is expected[name], name  # a GraphStats works too
    gs = list(graphs.values())
    assert parallel_rate(gs) == pytest.approx(3 / 5)
    # among the "valid" ones only (the flags are the caller's: here two parallel out of three)
    assert parallel_rate(gs, valid=[True, True, False, True, False]) == pytest.approx(2 / 3)
    assert parallel_rate([], None) is None
    assert parallel_rate(gs, valid=[False] * 5) is None


# -- summaries ----------------------------------------------------------------------------------------------
def rec(pid, sample, correct, valid, branches, total, crit, wall=1.0, bench="b"):
    return SampleRecord(benchmark=bench, mode="parallel", problem_id=pid, sample=sample, correct=correct,
                        valid=valid, branches_per_block=branches, total_tokens=total, critical_path_tokens=crit,
                        wall_s=wall, finish_reason="eos")


def test_summarize_by_hand():
    records = [
        rec("p1", 0, True, True, [2], 30, 20, wall=1.0),
        rec("p1", 1, False, True, [1], 10, 10, wall=2.0),
        rec("p2", 0, False, False, [3, 0], 40, 20, wall=3.0),
        rec("p2", 1, False, False, [], 20, 20, wall=4.0),
    ]
    s = summarize(records, k=2, wall_s=5.0)
    assert s["n_problems"] == 2 and s["n_samples"] == 4 and s["k"] == 2
    assert s["avg@k"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["pass@k"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["valid_rate"] == pytest.approx(0.5)
    assert s["parallel_rate"] == pytest.approx(2 / 4)  # [2] and [3, 0]
    assert s["parallel_rate_valid"] == pytest.approx(1 / 2)  # among p1's two valid samples
    assert s["branches_per_block"] == pytest.approx((2 + 1 + 3) / 3)  # blocks with >= 1 step
    assert s["total_tokens"] == 100 and s["total_tokens_mean"] == pytest.approx(25)
    assert s["critical_path_tokens_mean"] == pytest.approx(17.5)
    assert s["ideal_speedup_mean"] == pytest.approx((1.5 + 1 + 2 + 1) / 4)
    assert s["tokens_per_s"] == pytest.approx(100 / 5.0)
    assert s["time_to_answer_s"] == pytest.approx(2.5)


def test_overall_averages_accuracy_over_benchmarks_and_pools_rates():
    a = [rec("a1", 0, True, True, [2], 10, 5, bench="a")]
    b = [rec(f"b{i}", 0, False, i == 0, [1], 10, 10, bench="b") for i in range(3)]
    per = {"a": summarize(a, 1, 1.0), "b": summarize(b, 1, 3.0)}
    o = overall({"a": a, "b": b}, per)
    assert o["avg@k"] == pytest.approx((1.0 + 0.0) / 2)  # the paper's AVG, not the pooled 1/4
    assert o["valid_rate"] == pytest.approx(2 / 4)
    assert o["parallel_rate"] == pytest.approx(1 / 4)
    assert o["wall_s"] == pytest.approx(4.0) and o["tokens_per_s"] == pytest.approx(40 / 4.0)


def test_speedup_ratios():
    par = {"wall_s": 2.0, "time_to_answer_s": 1.0, "tokens_per_s": 300.0, "critical_path_tokens_mean": 50.0,
           "total_tokens_mean": 200.0}
    seq = {"wall_s": 6.0, "time_to_answer_s": 4.0, "tokens_per_s": 100.0, "total_tokens_mean": 190.0}
    sp = speedup(par, seq)
    assert sp["wall"] == pytest.approx(3.0)
    assert sp["time_to_answer"] == pytest.approx(4.0)
    assert sp["tokens_per_s"] == pytest.approx(3.0)
    assert speedup({"wall_s": 0.0}, {"wall_s": 1.0})["wall"] is None  # never a division by zero
