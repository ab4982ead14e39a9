"""The learner's updates: one SFT step and one RL step over a batch, with the on-policy check.

    sft_update(model, samples, opt, micro_batch_size=8, grad_clip=1.0)            # stages 0 and 2
    WeightAverage(model, decay=0.99).update(model)                                  # stage 0's check
    BestWeights().offer(model, score, step)                                         # an RL stage's selection
    policy_update(model, algo, kept, advantages, opt, micro_batch_size=32, grad_clip=1.0, check=rollouts)

Each is the optimizer loop over length-sorted micro-batches, the loss calls and the metrics. Losses divide token
sums by the *global* batch's token count, so the accumulated gradient is the full batch's, whatever the
micro-batch size. Under torchrun, ``dist`` (:class:`npr_agent.distributed.Dist`) supplies what keeps the ranks
exact and in lockstep: the global sums, gradient synchronisation on the last micro-batch, the ``x world size``
backward and the idle micro-batches of FSDP2; with the default (one process) all of that is a no-op.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .algorithms import merge_metrics
from .distributed import LOCAL, Dist
from .policy import Sample, build_batch, sft_loss, token_logprobs
from .scoring import training_sample


def _norm(gn: torch.Tensor) -> float:
    return float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # a DTensor under FSDP2


def sft_update(model: nn.Module, samples: Sequence[Sample], optimizer, *, micro_batch_size: int, grad_clip: float,
               device=None, dist: Dist = LOCAL) -> dict[str, float]:
    """One SFT step on this rank's ``samples``: mean NLL over the global batch's loss tokens.

    The samples are sorted by length and cut into micro-batches of ``micro_batch_size`` rows (0: one), each
    trimmed to its own longest row, so short samples are not padded to the longest of the batch; the gradient
    is the full batch's (each micro-batch loss is normalised by the global token count).
    """
    batch = build_batch(samples, device=device, train_forced=True).by_length()
    n_local = batch.num_loss_tokens
    n = dist.sum(n_local)  # Σ|y| over the global batch
    mbs = batch.split(micro_batch_size) if micro_batch_size else [batch]
    steps = dist.micro_steps(model, len(mbs))
    total = 0.0
    for i in range(steps):
        with dist.grad_sync(model, enabled=i == steps - 1):
            loss = sft_loss(model, mbs[i], num_tokens=n) if i < len(mbs) else dist.idle_loss(model, device)
            dist.backward(loss)  # x world size: DDP / FSDP2 average gradients
            total += float(loss.detach())
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss/sft": total, "policy/grad_norm": _norm(gn), "tokens": float(n_local),
            "rows": float(batch.batch_size)}


@torch.no_grad()
def logprob_mismatch(model: nn.Module, rollouts: Sequence, temperature: float = 1.0, device=None) -> float:
    """Max |trainer - engine| logprob over the sampled tokens of ``rollouts``, in one forward."""

    batch = build_batch([training_sample(r) for r in rollouts], device=device)
    lp = token_logprobs(model, batch, temperature=temperature)
    d = (lp - batch.old_logprobs).abs()[batch.loss_mask]
    return float(d.max()) if d.numel() else 0.0


def policy_update(model: nn.Module, algo, kept: Sequence, advantages: torch.Tensor, optimizer, *,
                  micro_batch_size: int, grad_clip: float, temperature: float = 1.0, device=None,
                  dist: Dist = LOCAL, check: Sequence = (), skip_inert: bool = True) -> dict[str, float]:
    """One RL update on this rank's kept rollouts (``advantages[i]`` for ``kept[i]``), exact across ranks.

    ``check``: this rank's rollouts to measure ``policy/logprob_mismatch`` on when no rank updates (every
    rollout filtered out), so the engine/trainer agreement is logged every step, not only on updates.

    ``skip_inert``: rows whose advantage is 0 are not forwarded when the algorithm says they add nothing to the
    loss (:meth:`Algorithm.zero_advantage_is_inert`: no KL, no entropy term). The step is the same; the
    token normaliser Σ|y| still counts them. ``batch/update_rows`` is the number of rows forwarded, and the
    mismatch and entropy metrics are measured on those rows.

    Rollouts generated under the orchestrated layout are scored as such (``engine.orchestration.training_sample``).
    Returns this rank's metrics, ready for :meth:`Dist.reduce_metrics` (``loss/*`` are this rank's shares of
    the global loss). No optimizer step anywhere when no rank has a nonzero advantage.
    """

    samples = [training_sample(r) for r in kept]
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=device)
    local = bool(samples) and float(adv.abs().sum()) > 0
    if not dist.any(local):  # nothing to learn from on any rank: no optimizer step (the same decision everywhere)
        m = {"loss/policy": 0.0, "policy/grad_norm": 0.0, "batch/updated": 0.0}
        if not dist.any(not check):  # every rank has rollouts: one forward each (FSDP2 gathers weights in it)
            m["policy/logprob_mismatch"] = logprob_mismatch(model, check, temperature, device)
        return m
    model.train()
    batch = build_batch(samples, device=device, train_forced=algo.config.train_forced) if samples else None
    for i, s in enumerate(samples):  # orchestrated rollouts: their context-only rows are never trained
        scored = getattr(s, "scored", None)
        if scored is not None and bool(batch.loss_mask[i, :len(scored)][~torch.as_tensor(scored)].any()):
            raise ValueError("an orchestrated rollout's context-only rows would enter the loss (train_forced=True); "
                             "build_batch must honour ScoredSample.scored")
    n = dist.sum(batch.num_loss_tokens if batch is not None else 0)  # Σ|y| over the global batch
    if batch is not None and skip_inert and algo.zero_advantage_is_inert():
        # A row with A = 0 adds exactly nothing to the gradient: leave it out of the forward and backward, keep it
        # in Σ|y|. Past stage 2 most groups are all right, so this is most of the update's work.
        rows = torch.nonzero(adv != 0).flatten().cpu()
        batch = batch.select(rows, trim=None) if len(rows) else None
    mbs = batch.by_length().split(micro_batch_size) if batch is not None else []  # adv[mb.index] follows the rows
    steps = dist.micro_steps(model, len(mbs), at_least=1)  # FSDP2: as many as the busiest rank
    parts, mismatch, ent_sum, ent_n, gn = [], 0.0, 0.0, 0, torch.zeros(())
    for update in range(algo.config.updates_per_batch):
        for i in range(steps):
            with dist.grad_sync(model, enabled=i == steps - 1):
                if i < len(mbs):
                    mb = mbs[i]
                    lp, ent = token_logprobs(model, mb, temperature=temperature, return_entropy=True)
                    if update == 0:  # before any update the trainer and the engine score the same policy
                        d = (lp.detach() - mb.old_logprobs).abs()[mb.loss_mask]
                        mismatch = max(mismatch, float(d.max()) if d.numel() else 0.0)
                        ent_sum += float(ent.detach()[mb.loss_mask].sum())
                        ent_n += mb.num_loss_tokens
                    loss, metrics = algo.loss(lp, mb.old_logprobs, adv[mb.index], mb.loss_mask, num_tokens=n,
                                              entropy=ent)
                    parts.append(metrics)
                else:
                    loss = dist.idle_loss(model, device)
                dist.backward(loss)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    m = merge_metrics(parts)
    m["loss/policy"] = float(sum(p.get("loss/policy", 0.0) for p in parts))
    m["policy/grad_norm"] = _norm(gn)
    m["policy/logprob_mismatch"] = mismatch
    m["policy/entropy"] = dist.sum(ent_sum) / max(1, dist.sum(ent_n))  # global already: the same on every rank
    m["batch/updated"] = 1.0
    m["batch/update_rows"] = float(batch.batch_size if batch is not None else 0)
    return m


class WeightAverage:
    """An exponential moving average of a module's weights, in a copy of the module (:attr:`module`).

    At a constant peak learning rate the weights jump from step to step; stage 0 checks (and may end on) the
    average of the last ~1 / (1 - decay) steps, so one lucky step cannot pass the check."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()],
                             1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class BestWeights:
    """A copy (on the CPU) of the weights that scored highest so far, the latest among ties.

    An RL stage offers its weights at each check (``RLConfig.select_every``) and ends on the best: a late collapse
    of the policy is then not the stage's result, and the weights it started from are a candidate too."""

    def __init__(self):
        self.score: float | None = None
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, score: float, step: int) -> bool:
        """Keep ``model``'s weights if ``score`` is at least the best so far; returns whether they were kept."""
        if self.score is not None and score < self.score:
            return False
        self.score, self.step = float(score), int(step)
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def state_dict(self) -> dict:
        return {"score": self.score, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.step, self.weights = state["score"], state["step"], state["weights"]
