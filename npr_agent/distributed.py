"""Multi-process training: torchrun ranks, sharded prompts, global loss normalisation, DDP or FSDP2.

    torchrun --nproc_per_node 8 -m npr_agent.train --config configs/qwen3-4b.toml --strategy fsdp2

What changes with N ranks, and why it stays exact (2 ranks x half batch == 1 rank x full batch):

* **Data.** Each rank takes a contiguous shard of the step's prompts (:meth:`Dist.shard`) and generates its
  own rollouts; the concatenation over ranks is the single-process batch, in the same order.
* **Advantages.** Group means and PAPO's batch-level std need the whole batch: :meth:`Dist.prepare` gathers
  every rank's :class:`~npr_agent.algorithms.RolloutInfo`, runs ``algo.prepare`` on the global list (the same
  on every rank) and returns this rank's slice.
* **Loss.** The policy losses divide token sums by Σ|y| of the *global* batch (:meth:`Dist.sum` of the local
  counts), so each rank's loss is its share of the global one. DDP and FSDP2 *average* gradients over ranks,
  so each rank back-propagates ``world_size x`` its share (:meth:`Dist.backward`): the averaged gradient is
  then the gradient of the global loss.
* **Micro-batches.** Gradients are synchronised once per optimizer step, on the last micro-batch (DDP
  ``no_sync``, FSDP2 ``set_requires_gradient_sync``). Ranks may hold different numbers of micro-batches; a rank
  with fewer runs zero-weight "idle" micro-batches so every rank runs the same collectives (FSDP2 gathers
  weights in every forward): :meth:`Dist.micro_steps` and :meth:`Dist.idle_loss`. The updates themselves
  (:func:`npr_agent.updates.policy_update`, :func:`npr_agent.updates.sft_update`) run over these.
* **Metrics.** :meth:`Dist.reduce_metrics` combines every rank's scalars before rank 0 logs them (``loss/*``
  and counts add up, ``*_max`` and timings take the max, the rest are means weighted by rollouts).
* **Rollouts under FSDP2.** The native engine needs whole weights: :meth:`Dist.full_weights` unshards every
  FSDP unit around ``engine.generate`` and reshards after.

Gloo on CPU, NCCL on CUDA. World size 1 (no torchrun) makes every method here a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .algorithms import Prepared, RolloutInfo
from .files import fsync_file
from .policy import Sample, build_batch, token_logprobs

STRATEGIES = ("ddp", "fsdp2")


class ShardedModel(nn.Module):
    """Holds an FSDP2-sharded HF model as ``.module`` (like DDP), so callers go through the root's forward
    (its hooks gather the root's weights and schedule gradient reduction) and ``policy`` unwraps it as usual."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / :class:`ShardedModel` wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards this model's parameters (its state dicts are then sharded DTensors)."""
    return bool(_fsdp_units(model))


def _fsdp_units(model: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # an old torch without FSDP2
        return []
    return [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]


@dataclass
class Dist:
    """This process's place in the job, and the collectives the trainer needs (no-ops when ``world_size == 1``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"
    param_dtype: str | None = None  # FSDP2 mixed precision: compute in this dtype, keep sharded master weights

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", strategy: str = "ddp", param_dtype: str | None = None,
                 timeout_s: float = 1800.0) -> Dist:
        """Join the torchrun job described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (world 1 without them).

        ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; each rank takes ``cuda:LOCAL_RANK``.
        The backend is NCCL on CUDA, gloo on CPU. ``param_dtype`` (FSDP2 only): ``bfloat16`` or ``float16``
        compute over the model's own (e.g. float32) master weights, gradients reduced in float32.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if param_dtype is not None and (strategy != "fsdp2" or param_dtype not in ("bfloat16", "float16")):
            raise ValueError(f"param_dtype={param_dtype!r} needs strategy 'fsdp2' and 'bfloat16' or 'float16'")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        return cls(rank=rank, world_size=world, local_rank=local, device=dev, strategy=strategy,
                   param_dtype=param_dtype)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- data ----------------------------------------------------------------------------------------------
    def shard_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part ``[a, b)`` of ``n`` items (sizes differ by at most one)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def shard(self, items: Sequence) -> list:
        a, b = self.shard_range(len(items))
        return list(items[a:b])

    # -- collectives ---------------------------------------------------------------------------------------
    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _reduce(self, x: float, op) -> float:
        if not self.enabled:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=op)
        return t.item()

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, x: float):
        """Σ over ranks; ints stay ints."""
        s = self._reduce(x, torch.distributed.ReduceOp.SUM) if self.enabled else x
        return int(round(s)) if isinstance(x, int) else s

    def max(self, x: float):
        m = self._reduce(x, torch.distributed.ReduceOp.MAX) if self.enabled else x
        return int(round(m)) if isinstance(x, int) else m

    def any(self, flag: bool) -> bool:
        return bool(self.max(int(bool(flag))))

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    # -- algorithm -----------------------------------------------------------------------------------------
    def prepare(self, algo, infos: Sequence[RolloutInfo]) -> Prepared:
        """``algo.prepare`` over the global batch (every rank's rollouts, in rank order); this rank's slice.

        Group ids are rank-local; they are offset per rank so groups never merge across ranks. The returned
        metrics are the global batch's (the same on every rank).
        """
        if not self.enabled:
            return algo.prepare(infos)
        parts = self.all_gather_object([(i.reward, i.group_id, i.length, i.truncated, i.dropped) for i in infos])
        everything: list[RolloutInfo] = []
        start = 0
        offset = 0
        for r, part in enumerate(parts):
            if r == self.rank:
                start = len(everything)
            everything += [RolloutInfo(reward=rw, group_id=g + offset, length=n, truncated=t, dropped=d)
                           for rw, g, n, t, d in part]
            offset += max((p[1] for p in part), default=-1) + 1
        prep = algo.prepare(everything)
        a, b = start, start + len(infos)
        return Prepared(prep.rewards[a:b], prep.keep[a:b], prep.advantages[a:b], dict(prep.metrics))

    def reduce_metrics(self, metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """Every rank's scalars combined (call on every rank; rank 0 logs the result).

        ``loss/*``, ``tokens``, ``batch/kept``, ``perf/sampled_tokens`` and ``perf/tokens_per_s`` add up; keys ending in ``_max``,
        ``policy/logprob_mismatch`` and timings (``perf/*_s``) take the max; everything else is a mean weighted by
        ``weight`` (the rank's number of rollouts or samples). A key missing on a rank is combined over the
        others.
        """
        if not self.enabled:
            return dict(metrics)
        parts = self.all_gather_object((dict(metrics), float(weight)))
        keys: list[str] = []
        for m, _ in parts:
            keys += [k for k in m if k not in keys]
        out: dict[str, float] = {}
        for k in keys:
            vals = [(float(m[k]), w) for m, w in parts if k in m]
            if k.startswith("loss/") or k in ("tokens", "batch/kept", "perf/sampled_tokens", "perf/tokens_per_s"):
                out[k] = sum(v for v, _ in vals)
            elif k.endswith("_max") or k == "policy/logprob_mismatch" or (k.startswith("perf/") and k.endswith("_s")):
                out[k] = max(v for v, _ in vals)
            else:
                tot = sum(w for _, w in vals)
                out[k] = sum(v * w for v, w in vals) / tot if tot > 0 else sum(v for v, _ in vals) / len(vals)
        return out

    # -- the model -------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP, or FSDP2 (each decoder layer a unit, then the root) for ``strategy="fsdp2"``.

        Call before building the optimizer (FSDP2 replaces the parameters by sharded ones). The native engine
        and checkpoints keep using the raw module (:func:`unwrap`).
        """
        if not self.enabled:
            return model
        if self.strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            mp = MixedPrecisionPolicy()
            if self.param_dtype:  # low-precision compute; the sharded parameters stay the optimizer's master copy
                mp = MixedPrecisionPolicy(param_dtype=getattr(torch, self.param_dtype), reduce_dtype=torch.float32)
            for layer in getattr(getattr(model, "model", None), "layers", None) or []:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
            return ShardedModel(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers (rotary tables) are constants: no per-forward broadcast, so ranks may run different forwards
        return DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                   broadcast_buffers=False)

    @contextmanager
    def grad_sync(self, model: nn.Module, enabled: bool):
        """Synchronise gradients in this backward (``enabled``) or only accumulate them locally."""
        if not self.enabled:
            yield
            return
        units = _fsdp_units(model)
        if units:  # a persistent flag on every FSDP2 unit (set again before each backward)
            for u in units:
                u.set_requires_gradient_sync(enabled, recurse=False)
            yield
            return
        with (nullcontext() if enabled or not hasattr(model, "no_sync") else model.no_sync()):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this rank's share of the global loss; x world size because DDP/FSDP2 average."""
        (loss * self.world_size if self.enabled else loss).backward()

    def micro_steps(self, model: nn.Module, n: int, at_least: int = 0) -> int:
        """How many micro-batches this rank runs when it holds ``n``: under FSDP2 (which gathers weights in every
        forward) as many as the busiest rank, the missing ones :meth:`idle_loss`; otherwise ``max(n, at_least)``."""
        return self.max(n) if _fsdp_units(model) else max(n, at_least)

    @staticmethod
    def idle_loss(model: nn.Module, device) -> torch.Tensor:
        """A zero loss through the whole model (2 tokens): a rank with no micro-batch left still runs the same
        forward/backward collectives as the others, and adds nothing to the gradient."""
        from npr_env.layout import Layout

        batch = build_batch([Sample([0], [0], Layout.sequential(2))], device=device)
        return token_logprobs(model, batch).sum() * 0.0

    @contextmanager
    def full_weights(self, model: nn.Module):
        """Whole (unsharded) weights inside the block, for the native engine or a save (FSDP2; no-op otherwise)."""
        units = _fsdp_units(model)
        for u in units:
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()

    def full_state_dict(self, model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The whole model's state dict (HF names): what HF saving and weight sync (``SGLangEngine.load_weights``)
        need. Under FSDP2 it is a collective (call it on every rank) and, with ``rank0_only``, only rank 0 gets
        the tensors (on CPU; the others get ``{}``); otherwise every rank gets them on its device.
        """
        inner = unwrap(model)
        if not _fsdp_units(inner):
            return inner.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))

    def iter_state_dict_buckets(self, model: nn.Module, bucket_bytes: int = 1 << 30,
                                dtype: torch.dtype | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The whole model's state dict (HF names) in buckets of at most ``bucket_bytes`` (a tensor larger than
        that is a bucket of its own), for weight sync without holding every gathered tensor at once.

        Under FSDP2 each sharded parameter is gathered (``DTensor.full_tensor()``, an all-gather) only when its
        bucket is produced, so a rank holds its shards plus one bucket of whole tensors; it is a collective: every
        rank must consume the whole iterator, in step (the order is the state dict's, the same everywhere).
        Without FSDP2 the buckets hold the module's own tensors (no copy). ``dtype``: cast each tensor first (under
        FSDP2 before the gather, which halves its traffic for bf16); the size bound counts the cast bytes.
        A parameter under several names (a head tied to the embedding) is gathered once and put, under each
        name, in one bucket, counted once. Every key of ``state_dict()`` is in exactly one bucket.
        """
        from engine.backends.sglang import plan_buckets

        inner = unwrap(model)
        sd = inner.state_dict(keep_vars=True)
        groups: dict[int, list[str]] = {}  # one entry per distinct tensor: its names, in state-dict order
        first: dict[int, torch.Tensor] = {}
        for name, t in sd.items():
            groups.setdefault(id(t), []).append(name)
            first.setdefault(id(t), t)
        def cast(t: torch.Tensor) -> bool:
            return dtype is not None and t.is_floating_point() and t.dtype != dtype

        cast_size = torch.empty((), dtype=dtype).element_size() if dtype is not None else 0
        sizes = [(k, t.numel() * (cast_size if cast(t) else t.element_size())) for k, t in first.items()]
        for plan in plan_buckets(sizes, bucket_bytes):
            bucket: dict[str, torch.Tensor] = {}
            for k in plan:
                t = first[k].detach()
                if cast(t):
                    t = t.to(dtype)
                if hasattr(t, "full_tensor"):  # an FSDP2 shard (DTensor): gather it, on every rank
                    t = t.full_tensor()
                for name in groups[k]:
                    bucket[name] = t
            yield bucket

    def save_train_state(self, path: str | Path, model, optimizer, scheduler, step: int, data_pos: int,
                         extra=None) -> None:
        """Rank 0 writes the state (gathered first under FSDP2); every rank waits for it."""
        inner = unwrap(model)
        if _fsdp_units(inner):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            msd, osd = get_state_dict(inner, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.is_main:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save({"model": msd, "optimizer": osd,
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "rng": ckpt.rng_state(), "step": step, "data_pos": data_pos, "extra": extra or {}}, tmp)
                fsync_file(tmp)
                os.replace(tmp, path)
        elif self.is_main:
            ckpt.save_train_state(path, inner, optimizer, scheduler, step, data_pos, extra)
        self.barrier()

    def load_train_state(self, path: str | Path, model, optimizer, scheduler) -> dict:
        """Every rank restores the state rank 0 saved (model, optimizer, scheduler, RNG)."""
        inner = unwrap(model)
        if not _fsdp_units(inner):
            return ckpt.load_train_state(path, inner, optimizer, scheduler)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = torch.load(str(path), map_location="cpu", weights_only=False)
        set_state_dict(inner, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        return state


LOCAL = Dist()  # the single-process default
