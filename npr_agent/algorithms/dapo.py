"""DAPO: GRPO's group advantages with clip-higher, dynamic sampling and overlong reward shaping.

* clip-higher: the ratio is clipped to ``[1 - 0.2, 1 + 0.28]``;
* dynamic sampling: groups whose kept rewards are all equal carry no signal and are dropped (the trainer may
  sample more prompts to refill the batch);
* overlong shaping: a response longer than ``max_len - overlong_buffer`` loses up to
  ``overlong_penalty`` linearly over the buffer (the full penalty past ``max_len``);
* token-level normalisation over the batch (the base loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import RolloutInfo, clipped_terms
from .grpo import GRPO, GRPOConfig


@dataclass
class DAPOConfig(GRPOConfig):
    clip_low: float = 0.2
    clip_high: float = 0.28
    dynamic_sampling: bool = True
    max_len: int | None = None  # response token limit; None turns overlong shaping off
    overlong_buffer: int = 0  # tokens before max_len over which the penalty ramps up
    overlong_penalty: float = 1.0


class DAPO(GRPO):
    name = "dapo"
    config_class = DAPOConfig

    def shape_rewards(self, infos: Sequence[RolloutInfo]) -> np.ndarray:
        r = np.array([i.reward for i in infos], dtype=np.float64)
        c = self.config
        if c.max_len is None:
            return r
        length = np.array([i.length for i in infos], dtype=np.float64)
        start = c.max_len - c.overlong_buffer
        if c.overlong_buffer > 0:
            frac = np.clip((length - start) / c.overlong_buffer, 0.0, 1.0)
        else:
            frac = (length > c.max_len).astype(np.float64)
        return r - c.overlong_penalty * frac

    def filter(self, infos: Sequence[RolloutInfo], rewards: np.ndarray | None = None) -> np.ndarray:
        keep = super().filter(infos, rewards)
        if not self.config.dynamic_sampling:
            return keep
        rewards = self.shape_rewards(infos) if rewards is None else np.asarray(rewards, dtype=np.float64)
        groups = np.array([i.group_id for i in infos], dtype=np.int64)
        for gid in np.unique(groups[keep]):
            members = keep & (groups == gid)
            if np.ptp(rewards[members]) == 0:  # all equal (or a group of one): no learning signal
                keep[members] = False
        return keep

    def policy_terms(self, logprobs, old_logprobs, adv, mask):
        return clipped_terms(logprobs, old_logprobs, adv, mask, self.config.clip_low, self.config.clip_high)
