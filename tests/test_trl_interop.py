"""TRL interop smoke test: GRPOTrainer runs a couple of steps with the text env as its reward."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is in the dev extra: pip install -e '.[dev]'")


def test_trl_grpo_on_text_env(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "trl_example", Path(__file__).parents[1] / "examples" / "trl_grpo_text_env.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trl_example"] = mod
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "2", "--output-dir", str(tmp_path / "out")])
    rewards = [h["rewards/npr_env_reward/mean"] for h in out["log_history"] if "rewards/npr_env_reward/mean" in h]
    assert len(rewards) == 2
    assert all(-2.0 <= r <= 1.0 for r in rewards)  # the env's verdicts: a random model writes invalid NPR


def test_env_reward_grades_like_the_env():
    spec = importlib.util.spec_from_file_location(
        "trl_example2", Path(__file__).parents[1] / "examples" / "trl_grpo_text_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from npr_env.tasks import GroupSumTasks

    p = GroupSumTasks(seed=0)[0]
    fn = mod.env_reward()
    r = fn([p.solutions["parallel"], p.solutions["sequential"], "garbage"], answer=[p.answer] * 3,
           question=[p.question] * 3)
    assert r[0] == 1.0 and r[1] < -1.0 and r[2] < -1.0  # sequential text has no block: invalid under stage1
