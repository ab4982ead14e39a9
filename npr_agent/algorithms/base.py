"""The algorithm interface: rollouts with rewards → keep mask and advantages; logprobs → loss.

An algorithm is one file holding a ``*Config`` dataclass and an :class:`Algorithm` subclass, plus one line in
``npr_agent.algorithms.ALGORITHMS``. The trainer drives it like this, once per rollout batch::

    prep = algo.prepare(infos)                      # rewards, keep mask, per-sequence advantages, metrics
    kept = [r for r, k in zip(rollouts, prep.keep) if k]
    adv = torch.as_tensor(prep.advantages[prep.keep], dtype=torch.float32)
    batch = build_batch(kept, device, train_forced=algo.config.train_forced)
    n = batch.num_loss_tokens                       # Σ|y| over the whole (kept) rollout batch
    for _ in range(algo.config.updates_per_batch):
        for mb in batch.split(micro_batch_size):    # mb.index: rows of `kept`
            lp = token_logprobs(model, mb, temperature=algo.config.temperature)
            loss, metrics = algo.loss(lp, mb.old_logprobs, adv[mb.index.cpu()], mb.loss_mask, num_tokens=n)
            loss.backward()                         # accumulates exactly the full-batch gradient
        optimizer.step(); optimizer.zero_grad()

Losses are token-normalised over the whole batch: every micro-batch divides its token sum by the same
``num_tokens``, so the micro-batch losses (and gradients) add up to the full-batch ones.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class RolloutInfo:
    """What an algorithm needs to know about one rollout before the update."""

    reward: float
    group_id: int  # rollouts of the same prompt share it
    length: int = 0  # response tokens (all branches), for overlong shaping
    truncated: bool = False  # stopped by the length limit
    dropped: bool = False  # invalid structure: the reward function asked to drop it


@dataclass
class Prepared:
    """The per-sequence result of :meth:`Algorithm.prepare` (arrays of length N, one per rollout)."""

    rewards: np.ndarray  # float64, after any shaping
    keep: np.ndarray  # bool; dropped rollouts have advantage 0 and are left out of the loss
    advantages: np.ndarray  # float64
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    """Fields every algorithm has (TRL style: a dataclass of hyper-parameters)."""

    updates_per_batch: int = 1  # optimizer steps per rollout batch
    train_forced: bool = False  # False: engine-forced tokens get no gradient
    temperature: float = 1.0  # sampling temperature; the trainer scores logprobs with the same one
    drop_invalid: bool = False  # filter out rollouts whose reward marked them `dropped`
    drop_truncated: bool = False  # filter out rollouts that hit the length limit
    kl_coef: float = 0.0  # k3 KL to a reference policy (needs ref_logprobs)
    entropy_coef: float = 0.0  # entropy bonus (needs entropy)
    eps: float = 1e-6  # advantage normaliser epsilon

    def to_dict(self) -> dict:
        return asdict(self)


def _as_arrays(infos: Sequence[RolloutInfo]):
    r = np.array([i.reward for i in infos], dtype=np.float64)
    g = np.array([i.group_id for i in infos], dtype=np.int64)
    return r, g


def group_stats(values: np.ndarray, group_ids: np.ndarray, keep: np.ndarray, ddof: int = 0):
    """Per-rollout (group mean, group std, group size) over the *kept* members of each rollout's group."""
    mean = np.zeros(len(values))
    std = np.zeros(len(values))
    size = np.zeros(len(values), dtype=np.int64)
    for gid in np.unique(group_ids[keep]):
        members = keep & (group_ids == gid)
        v = values[members]
        mean[members] = v.mean()
        std[members] = v.std(ddof=ddof) if len(v) > ddof else 0.0
        size[members] = len(v)
    return mean, std, size


class Algorithm(abc.ABC):
    """Base class. Subclasses set ``config_class`` and override :meth:`advantages` and maybe the rest."""

    name: str = "base"
    config_class: type[AlgorithmConfig] = AlgorithmConfig

    def __init__(self, config: AlgorithmConfig | None = None):
        self.config = config if config is not None else self.config_class()
        if self.config.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {self.config.updates_per_batch}")

    # -- sequence level ------------------------------------------------------------------------------------
    def shape_rewards(self, infos: Sequence[RolloutInfo]) -> np.ndarray:
        """The rewards used for filtering and advantages (default: as given)."""
        return _as_arrays(infos)[0]

    def filter(self, infos: Sequence[RolloutInfo], rewards: np.ndarray | None = None) -> np.ndarray:
        """Keep mask ``[N]`` bool. The default drops what ``drop_invalid`` / ``drop_truncated`` ask for."""
        keep = np.ones(len(infos), dtype=bool)
        for i, info in enumerate(infos):
            if (self.config.drop_invalid and info.dropped) or (self.config.drop_truncated and info.truncated):
                keep[i] = False
        return keep

    @abc.abstractmethod
    def advantages(self, rewards: np.ndarray, group_ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Per-sequence advantages ``[N]``; 0 where ``keep`` is False."""

    def prepare(self, infos: Sequence[RolloutInfo]) -> Prepared:
        """shape_rewards → filter → advantages, with batch metrics."""
        rewards = self.shape_rewards(infos)
        _, group_ids = _as_arrays(infos)
        keep = self.filter(infos, rewards)
        adv = np.where(keep, self.advantages(rewards, group_ids, keep), 0.0)
        n = max(len(infos), 1)
        m = {
            "filter/kept_frac": float(keep.sum()) / n,
            "filter/dropped_invalid": float(sum(i.dropped for i in infos)) / n,
            "filter/truncated": float(sum(i.truncated for i in infos)) / n,
            "advantage/mean": float(adv[keep].mean()) if keep.any() else 0.0,
            "advantage/std": float(adv[keep].std()) if keep.any() else 0.0,
            "advantage/nonzero_frac": float((adv[keep] != 0).mean()) if keep.any() else 0.0,
            "reward/shaped_mean": float(rewards.mean()) if len(rewards) else 0.0,
        }
        return Prepared(rewards, keep, adv, m)

    def zero_advantage_is_inert(self) -> bool:
        """Whether a row with advantage 0 adds nothing to :meth:`loss`'s gradient, so the update may skip it.

        True when the objective is ``A`` times something and no KL or entropy term is on; a subclass that adds
        a term independent of ``A`` returns False."""
        return not (self.config.kl_coef or self.config.entropy_coef)

    # -- token level ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def policy_terms(self, logprobs, old_logprobs, advantages, mask):
        """Per-token objective to *maximise* ``[B, T]`` and extra metrics; subclasses override."""

    def loss(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages, loss_mask: torch.Tensor,
             num_tokens: int | None = None, ref_logprobs: torch.Tensor | None = None,
             entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and metrics for a (micro-)batch.

        ``logprobs/old_logprobs/loss_mask/ref_logprobs/entropy`` are ``[B, T]``; ``advantages`` is ``[B]``
        (broadcast to tokens). ``num_tokens`` is Σ|y| over the whole rollout batch (default: this batch's
        ``loss_mask`` count); token sums are divided by it, so micro-batch losses add up to the full one.
        Metrics are token means over this micro-batch (``tokens`` gives the weight; see :func:`merge_metrics`)
        except ``loss/*``, which add up.
        """
        mask = loss_mask.to(logprobs.dtype)
        adv = torch.as_tensor(advantages, dtype=logprobs.dtype, device=logprobs.device)
        adv = adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv
        old = old_logprobs.to(logprobs.dtype)
        n = float(num_tokens if num_tokens is not None else loss_mask.sum().item())
        n = max(n, 1.0)
        objective, metrics = self.policy_terms(logprobs, old, adv, loss_mask)
        policy_loss = -(objective * mask).sum() / n
        loss = policy_loss
        ntok = int(loss_mask.sum().item())
        denom = max(ntok, 1)
        with torch.no_grad():
            log_ratio = (logprobs - old) * mask
            out = {
                "loss/policy": policy_loss.item(),
                "tokens": float(ntok),
                "policy/ratio_mean": float((torch.exp(log_ratio) * mask).sum() / denom),
                "policy/approx_kl": float(((torch.exp(log_ratio) - 1 - log_ratio) * mask).sum() / denom),
                "policy/logprob_diff_max": float(log_ratio.abs().max()) if ntok else 0.0,
                **metrics,
            }
        if ref_logprobs is not None and self.config.kl_coef:
            d = ref_logprobs.to(logprobs.dtype) - logprobs
            kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative
            kl_loss = self.config.kl_coef * (kl * mask).sum() / n
            loss = loss + kl_loss
            out["loss/kl"] = kl_loss.item()
            out["policy/kl_ref"] = float((kl.detach() * mask).sum() / denom)
        if entropy is not None:
            out["policy/entropy"] = float((entropy.detach() * mask).sum() / denom)
            if self.config.entropy_coef:
                ent_loss = -self.config.entropy_coef * (entropy * mask).sum() / n
                loss = loss + ent_loss
                out["loss/entropy"] = ent_loss.item()
        out["loss/total"] = loss.item()
        return loss, out


def on_policy_terms(logprobs, old_logprobs, adv, mask, exact: bool):
    """``ratio * A`` with no clipping. ``exact``: ratio = π/sg(π) (value 1, gradient ∇log π); else π/π_old."""
    ratio = torch.exp(logprobs - (logprobs.detach() if exact else old_logprobs))
    return ratio * adv, {}


def clipped_terms(logprobs, old_logprobs, adv, mask, clip_low: float, clip_high: float):
    """PPO's clipped surrogate ``min(ratio A, clip(ratio, 1-low, 1+high) A)`` and its clip fraction."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    with torch.no_grad():
        frac = ((clipped < unclipped) & mask).sum() / mask.sum().clamp(min=1)
    return torch.minimum(unclipped, clipped), {"policy/clip_frac": float(frac)}


def merge_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine per-micro-batch metrics: ``loss/*`` add up, ``*_max`` take the max, the rest are
    token-weighted means."""
    if not parts:
        return {}
    total = sum(p.get("tokens", 0.0) for p in parts)
    out: dict[str, float] = {"tokens": total}
    for k in {k for p in parts for k in p} - {"tokens"}:
        vals = [(p[k], p.get("tokens", 0.0)) for p in parts if k in p]
        if k.startswith("loss/"):
            out[k] = sum(v for v, _ in vals)
        elif k.endswith("_max"):
            out[k] = max(v for v, _ in vals)
        else:
            w = sum(t for _, t in vals)
            out[k] = sum(v * t for v, t in vals) / w if w else sum(v for v, _ in vals) / len(vals)
    return out
