"""GroupSumTasks: the tiny preset's task family."""

import numpy as np

import npr_env
from npr_env.tasks import GroupSumTasks
from npr_env.verify import verify


def test_deterministic_and_split_disjoint():
    a, b = GroupSumTasks(seed=3), GroupSumTasks(seed=3)
    assert [a[i].question for i in range(20)] == [b[i].question for i in range(20)]
    train = {GroupSumTasks(seed=0, split="train")[i].question for i in range(300)}
    test = {GroupSumTasks(seed=0, split="test")[i].question for i in range(100)}
    assert not train & test


def test_solutions_are_valid_correct_and_parallel():
    t = GroupSumTasks(seed=1, num_subproblems=(2, 4), terms=(5, 6))
    speedups = []
    for i in range(100):
        p = t[i]
        g = npr_env.parse(p.solutions["parallel"])
        assert g.is_valid, (p.solutions["parallel"], g.violations)
        assert g.stats.branches_per_block == [p.meta["num_subproblems"]]
        assert verify(p.solutions["parallel"], p.answer) and verify(p.solutions["sequential"], p.answer)
        assert p.answer == "(" + ",".join(str(v) for v in p.meta["values"]) + ")"
        speedups.append(g.stats.ideal_speedup)
    assert np.mean(speedups) > 1.8  # long steps, short guideline and takeaway


def test_bad_knobs_are_clear_errors():
    import pytest

    with pytest.raises(ValueError, match="num_subproblems"):
        GroupSumTasks(num_subproblems=(2, 9))
    with pytest.raises(ValueError, match="terms"):
        GroupSumTasks(terms=1)
