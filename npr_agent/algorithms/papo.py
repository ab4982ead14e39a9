"""PAPO: Parallel-Aware Policy Optimization (NPR stage 3).

* Rollouts with a broken structure or over the length limit are dropped (not penalised).
* ``A_i = (r_i - mean of r over i's group) / (std of r over the whole kept batch + eps)``: one batch-level std,
  computed once, before any advantage is written. A group with one kept member, or zero batch variance, gets 0.
* Objective ``J = (1/Σ|y|) Σ_i Σ_t (π(y_t) / sg[π(y_t)]) A_i``: strictly on-policy, no ratio to clip, so
  structural tokens keep their gradient. No KL, no entropy term by default.

``updates_per_batch > 1`` makes the later steps off-policy: the ratio is then ``π / π_old`` with the
engine's logprobs as ``π_old``, still unclipped. It is no longer exactly PAPO; the ratio statistics are in
the metrics (``policy/ratio_mean``, ``policy/approx_kl``, ``policy/logprob_diff_max``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Algorithm, AlgorithmConfig, group_stats, on_policy_terms


@dataclass
class PAPOConfig(AlgorithmConfig):
    drop_invalid: bool = True
    drop_truncated: bool = True
    std_ddof: int = 0  # ddof of the batch std (0: population std)


class PAPO(Algorithm):
    name = "papo"
    config_class = PAPOConfig

    def advantages(self, rewards: np.ndarray, group_ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        keep = np.asarray(keep, dtype=bool)
        mean, _, size = group_stats(rewards, group_ids, keep)
        kept = rewards[keep]
        std = float(kept.std(ddof=self.config.std_ddof)) if len(kept) > self.config.std_ddof else 0.0  # once
        if std == 0.0:
            return np.zeros_like(rewards)
        adv = (rewards - mean) / (std + self.config.eps)
        return np.where(keep & (size > 1), adv, 0.0)

    def policy_terms(self, logprobs, old_logprobs, adv, mask):
        return on_policy_terms(logprobs, old_logprobs, adv, mask, exact=self.config.updates_per_batch == 1)
