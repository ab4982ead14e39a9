"""The NPR Gymnasium environments.

* ``NPR-Math-v0`` (:class:`NPRMathEnv`): token level, one token per live branch per step, forks and joins
  driven by the execution graph, exactly like the NPR engine.
* ``NPR-MathText-v0`` (:class:`NPRMathTextEnv`): one step is a whole response text.

``register_envs()`` registers both (idempotent); ``import npr_env`` calls it, so ``gym.make("NPR-Math-v0")``
and ``gym.make("npr_env:NPR-Math-v0")`` both work.
"""

from __future__ import annotations

from .math_env import NPRMathEnv, branch_path
from .text_env import AnyText, NPRMathTextEnv

ENV_IDS = ("NPR-Math-v0", "NPR-MathText-v0")


def register_envs() -> None:
    """Register the NPR envs with Gymnasium (safe to call any number of times)."""
    import gymnasium as gym

    entry = {"NPR-Math-v0": "npr_env.envs:NPRMathEnv", "NPR-MathText-v0": "npr_env.envs:NPRMathTextEnv"}
    for env_id, entry_point in entry.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point)


__all__ = ["ENV_IDS", "AnyText", "NPRMathEnv", "NPRMathTextEnv", "branch_path", "register_envs"]
