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


def test_default_digits_keep_the_preset_problems():
    # digits=1 draws exactly what the preset drew before the knob existed: runs and their held-out sets stay put
    assert GroupSumTasks(seed=0)[0].question == "A=9 7 6 6 3 4; B=9 8 9 5 5; C=3 6 7 3 3; D=6 8 4 3 6 9. Sum each."


def test_two_digit_numbers_carry_and_stay_valid():
    t = GroupSumTasks(seed=2, num_subproblems=(2, 4), terms=(4, 5), digits=2)
    for i in range(50):
        p = t[i]
        numbers = [int(x) for part in p.question[:-len(". Sum each.")].split("; ") for x in part[2:].split()]
        assert all(10 <= x <= 99 for x in numbers)
        assert npr_env.parse(p.solutions["parallel"]).is_valid
        assert verify(p.solutions["parallel"], p.answer) and verify(p.solutions["sequential"], p.answer)
        assert sum(p.meta["values"]) == sum(numbers)
    assert "digits=2" in repr(t)


def test_bad_knobs_are_clear_errors():
    import pytest

    with pytest.raises(ValueError, match="num_subproblems"):
        GroupSumTasks(num_subproblems=(2, 9))
    with pytest.raises(ValueError, match="terms"):
        GroupSumTasks(terms=1)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="digits"):
            GroupSumTasks(digits=bad)
