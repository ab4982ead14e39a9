"""REINFORCE with a per-group baseline: the group mean, or RLOO's leave-one-out mean.

``A_i = r_i - mean_g`` (``baseline="mean"``) or ``r_i - mean_{j != i in g} r_j`` (``"rloo"``), optionally
divided by the batch std. The gradient is the plain ``-A ∇log π`` (on-policy, unclipped), token-normalised
over the batch; with ``updates_per_batch > 1`` the later steps weight it by the unclipped ratio π/π_old.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Algorithm, AlgorithmConfig, group_stats, on_policy_terms


@dataclass
class ReinforceConfig(AlgorithmConfig):
    baseline: str = "mean"  # "mean" | "rloo"
    normalize: bool = False  # divide by the batch std of the kept rewards

    def __post_init__(self):
        if self.baseline not in ("mean", "rloo"):
            raise ValueError(f"baseline must be 'mean' or 'rloo', got {self.baseline!r}")


class Reinforce(Algorithm):
    name = "reinforce"
    config_class = ReinforceConfig

    def advantages(self, rewards: np.ndarray, group_ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        keep = np.asarray(keep, dtype=bool)
        mean, _, size = group_stats(rewards, group_ids, keep)
        adv = rewards - mean
        if self.config.baseline == "rloo":
            # r - (sum - r) / (k - 1) = k / (k - 1) * (r - mean)
            adv = adv * size / np.maximum(size - 1, 1)
        if self.config.normalize and keep.any():
            std = rewards[keep].std()
            adv = adv / (std + self.config.eps) if std > 0 else np.zeros_like(adv)
        return np.where(keep & (size > 1), adv, 0.0)

    def policy_terms(self, logprobs, old_logprobs, adv, mask):
        return on_policy_terms(logprobs, old_logprobs, adv, mask, exact=self.config.updates_per_batch == 1)
