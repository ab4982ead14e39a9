"""GRPO: group-normalised advantages and PPO's clipped surrogate.

``A_i = (r_i - mean_g) / (std_g + eps)`` over the kept members of i's group; token-mean loss over the batch;
optional k3 KL to a reference policy (``kl_coef``, 0 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Algorithm, AlgorithmConfig, clipped_terms, group_stats


@dataclass
class GRPOConfig(AlgorithmConfig):
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    std_ddof: int = 0  # ddof of the group std (0: population std)
    scale_rewards: bool = True  # False: A = r - mean_g (Dr. GRPO)


class GRPO(Algorithm):
    name = "grpo"
    config_class = GRPOConfig

    def advantages(self, rewards: np.ndarray, group_ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        keep = np.asarray(keep, dtype=bool)
        mean, std, size = group_stats(rewards, group_ids, keep, ddof=self.config.std_ddof)
        adv = rewards - mean
        if self.config.scale_rewards:
            denom = std + self.config.eps
            adv = np.divide(adv, denom, out=np.zeros_like(adv), where=denom > 0)  # zero-variance group: 0
        return np.where(keep & (size > 1), adv, 0.0)

    def policy_terms(self, logprobs, old_logprobs, adv, mask):
        return clipped_terms(logprobs, old_logprobs, adv, mask, self.config.clip_low, self.config.clip_high)
