"""NPREngine: batched native-parallel rollouts over a paged KV cache, with exact logprobs.

    from engine import NPREngine, SamplingParams
    eng = NPREngine(model, tokenizer)                       # an HF Qwen3/Qwen2/Llama *ForCausalLM
    rollouts = eng.generate(prompt_ids, SamplingParams(max_new_tokens=512), mode="parallel")

* ``mode="parallel"``: a guideline that closes with 1..max_plans plans forks one branch per plan; the
  branches are decoded side by side in the same batch, sharing the prefix KV blocks, and joined without
  recompute. ``mode="sequential"``: plain autoregressive decoding of the same format (the baseline).
* Positions and visibility come from ``npr_env`` only (each branch is an ``npr_env.graph.Cursor``), so a
  rollout's ``graph.layout()`` is exactly what the engine decoded with, and ``Rollout.logprobs`` equal a full
  forward of the model over ``graph.token_ids`` with that layout (tested at fp32, max |diff| <= 1e-4).
* Weights: the runner applies the live module's parameters (references, never copies), re-read at every
  ``generate``. A trainer
  that updates the module in place (optimizer steps, ``load_state_dict``) needs to do nothing;
  :meth:`NPREngine.load_weights` copies a state dict in. Do not call ``generate`` while the trainer is
  writing the weights (the engine is not thread-safe).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from npr_env import constraints as C
from npr_env.graph import TagVocab
from npr_env.schema import MAX_DEPTH, MAX_PLANS

from .kv_cache import BlockPool
from .rollout import Rollout, generate_inputs, stops_on_violation
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_CUDA_KV_FRACTION = 0.3  # of the device memory free when the engine is built
DEFAULT_CPU_KV_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PoolInfo:
    """The KV pool's size and where it came from (``source``: ``num_blocks``, ``kv_cache_bytes``,
    ``kv_mem_fraction`` or ``default_cpu_bytes``); ``free_bytes`` is the free memory measured for a fraction."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    source: str
    device: str
    fraction: float | None = None
    free_bytes: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def how(self) -> str:
        """Where the size came from, in words."""
        if self.fraction is not None:
            return f"kv_mem_fraction={self.fraction:g} of {self.free_bytes / 2**30:.2f} GiB free on {self.device}"
        return f"{self.source} on {self.device}"

    def describe(self) -> str:
        return (f"{self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens, "
                f"{self.num_bytes / 2**30:.3f} GiB ({self.how})")

    def as_dict(self) -> dict:
        return {**asdict(self), "num_tokens": self.num_tokens, "num_bytes": self.num_bytes}


def free_memory(device: torch.device | str) -> int:
    """Bytes free on ``device`` now: ``torch.cuda.mem_get_info`` on CUDA, available RAM (psutil, else
    ``/proc/meminfo`` MemAvailable) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def size_kv_pool(bytes_per_block: int, block_size: int, device: torch.device | str, *, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, kv_mem_fraction: float | None = None,
                 free_bytes: int | None = None) -> PoolInfo:
    """How many KV blocks the pool gets (the rules are in :class:`NPREngine`'s docstring). ``free_bytes``
    replaces the measured free memory (tests)."""
    dev = torch.device(device)
    where = str(dev)
    if num_blocks is not None:
        if int(num_blocks) < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        return PoolInfo(int(num_blocks), block_size, bytes_per_block, "num_blocks", where)
    if kv_cache_bytes is not None:
        return PoolInfo(max(1, int(kv_cache_bytes) // bytes_per_block), block_size, bytes_per_block,
                        "kv_cache_bytes", where)
    if kv_mem_fraction is None and dev.type != "cuda":
        return PoolInfo(max(1, DEFAULT_CPU_KV_BYTES // bytes_per_block), block_size, bytes_per_block,
                        "default_cpu_bytes", where)
    frac = DEFAULT_CUDA_KV_FRACTION if kv_mem_fraction is None else float(kv_mem_fraction)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"kv_mem_fraction must be in (0, 1], got {kv_mem_fraction}")
    free = free_memory(dev) if free_bytes is None else int(free_bytes)
    n = int(free * frac) // bytes_per_block
    if n < 1:
        raise ValueError(f"kv_mem_fraction={frac:g} of the {free / 2**30:.3f} GiB free on {where} is "
                         f"{int(free * frac)} bytes, less than one KV block ({bytes_per_block} bytes); "
                         "raise kv_mem_fraction or give num_blocks")
    return PoolInfo(n, block_size, bytes_per_block, "kv_mem_fraction", where, frac, free)


class NPREngine:
    """Rollout engine. Config (keyword arguments):

    * ``block_size`` (16): tokens per KV block. The pool size (:func:`size_kv_pool`, recorded in
      :attr:`pool_info` and ``last_stats``, logged once at INFO), first match wins:

      - ``num_blocks``: exactly that many blocks;
      - ``kv_cache_bytes``: as many blocks as fit in that many bytes;
      - ``kv_mem_fraction``: that share of the memory free on the model's device *now* (CUDA:
        ``torch.cuda.mem_get_info``; CPU: available RAM), like SGLang's ``mem_fraction_static`` but of the free
        memory, after the weights (and whatever the learner holds) are allocated;
      - nothing given: on CUDA ``kv_mem_fraction=0.3`` (:data:`DEFAULT_CUDA_KV_FRACTION`); on CPU 256 MiB
        (:data:`DEFAULT_CPU_KV_BYTES`), so tests and the tiny preset never take a share of the host's RAM
        unless asked to.

      A request that cannot fit even alone in the empty pool (its prompt plus ``reserve_tokens``) makes
      ``generate`` raise a ValueError naming both block counts, before anything runs. One that fits but outgrows
      the pool while alone in it ends ``aborted`` (truncated); under pressure the newest requests are preempted.
      :meth:`release_memory` frees the pool's tensors (the trainer does it around the policy update when
      ``engine.memory_saver`` is on); the next ``generate`` allocates them again.
    * ``max_running_requests`` (256), ``max_batch_rows`` (256, rows per forward; more active branches are
      split over several forwards), ``prefill_chunk`` (512 tokens), ``max_prefill_tokens`` (8192 prompt tokens
      admitted per prefill).
    * ``reserve_tokens`` (32): free KV a sample must find, beyond its prompt, to be admitted.
    * ``max_plans`` (5), ``max_depth`` (5): fork limits (a deeper block is decoded sequentially).
      ``min_fork_budget`` (32): fork only if at least this many tokens of budget remain.
    * ``constraints`` ("strict"): the ``npr_env`` constraint preset or ``ConstraintSet`` of the rollout graphs.
      ``stop_on_violation`` (None = on in parallel mode with strict constraints): end a rollout as soon as
      its graph has a violation (finish ``violation``).
    * ``decode_attention`` ("auto"): how a decode step reads the KV cache. ``"paged"``: in place, each row
      attending to the blocks its table lists (compiled FlexAttention, :mod:`engine.paged_attention`; nothing
      is copied). ``"gather"``: each share group's visible slots are copied out of the pool first
      (:mod:`engine.runner`). ``"auto"``: paged on CUDA, where the copy costs the memory bandwidth the
      engine exists to save; gather on the CPU, where FlexAttention's cost per call outweighs the copy at the
      contexts of the tiny preset (``benchmarks.engine_speed``, three runs: paged 0.89-1.01x the gather's speed
      at 2k visible slots per step, 1.03-1.26x at 8k), and wherever FlexAttention cannot compile (a warning says why). Both
      give the same tokens, and logprobs equal to rounding (<= 1e-5).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, kv_mem_fraction: float | None = None,
                 max_running_requests: int = 256, max_batch_rows: int = 256,
                 prefill_chunk: int = 512, max_prefill_tokens: int = 8192, reserve_tokens: int = 32,
                 max_plans: int = MAX_PLANS, max_depth: int = MAX_DEPTH, min_fork_budget: int = 32,
                 constraints: str | C.ConstraintSet = "strict", stop_on_violation: bool | None = None,
                 decode_attention: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.vocab = TagVocab.of(tokenizer)
        self.runner = ModelRunner(model, decode_attention)
        self.constraints = C.resolve(constraints, max_plans=max_plans, max_depth=max_depth)
        self.max_depth = min(max_depth, self.constraints.max_depth)
        self.min_fork_budget = min_fork_budget
        self.stop_on_violation = stop_on_violation
        self.max_running_requests = max_running_requests
        self.max_batch_rows = max_batch_rows
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens
        r = self.runner
        per_block = 2 * r.num_layers * block_size * r.kv_heads * r.head_dim * r.dtype.itemsize
        self.pool_info = size_kv_pool(per_block, block_size, r.device, num_blocks=num_blocks,
                                      kv_cache_bytes=kv_cache_bytes, kv_mem_fraction=kv_mem_fraction)
        log.info("NPREngine KV pool: %s", self.pool_info.describe())
        self.pool = self._new_pool()
        self.reserve_blocks = self.pool.blocks_for(reserve_tokens)
        self.reserve_tokens = reserve_tokens
        self.last_stats: dict = {}
        self._warned_long = False

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams | None = None,
                 mode: str = "parallel") -> list[Rollout]:
        """Generate ``params.n`` rollouts per prompt (prompt-major order). Token ids in, token ids out."""
        params, prompts = generate_inputs(prompt_ids, params, mode, self.runner.embed_rows)
        for i, p in enumerate(prompts):
            need = self.blocks_needed(len(p))
            if need > self.pool.num_blocks:
                raise ValueError(self._too_small(i, len(p), need))
        if self.pool.num_used:  # a previous call died half-way: start from a clean pool
            self.pool = self._new_pool()
        self.pool.ensure_storage()  # after release_memory()
        longest = max((len(p) for p in prompts), default=0) + params.max_new_tokens
        if longest > self.pool_info.num_tokens and not self._warned_long:
            self._warned_long = True
            log.warning("NPREngine: a rollout may reach %d tokens but the KV pool holds %d (%s); one that outgrows "
                        "it alone ends 'aborted'", longest, self.pool_info.num_tokens, self.pool_info.describe())
        self.runner.bind()
        self.runner.reset_counters()
        stop = stops_on_violation(self.stop_on_violation, mode, self.constraints)
        self.pool.reset_peak()
        t0 = time.perf_counter()
        sched = Scheduler(self, prompts, params, mode, stop)
        with torch.inference_mode():
            rollouts = sched.run()
        self.last_stats = {
            "wall_s": time.perf_counter() - t0, "steps": sched.steps, "peak_kv_blocks": self.pool.peak_used,
            "peak_kv_bytes": self.pool.peak_used * self.pool.bytes_per_block,
            "num_tokens": sum(r.num_tokens for r in rollouts), "step_log": sched.step_log,
            "preemptions": sched.preemptions, "kv_pool_blocks": self.pool.num_blocks,
            "kv_pool_source": self.pool_info.source,
            # KV slots the decode forwards gathered (per layer, K and V each), and per decode forward
            "decode_forwards": self.runner.decode_forwards, "kv_slots_gathered": self.runner.decode_kv_slots,
            "kv_slots_per_decode": self.runner.decode_kv_slots / max(1, self.runner.decode_forwards),
            "paged_decode_forwards": self.runner.paged_forwards,  # of decode_forwards: read the pool in place
            "gemm_attention_forwards": self.runner.gemm_forwards,  # forwards whose attention ran as two GEMMs
            "gather_buffer_bytes": self.runner.gather_buffer_bytes,  # reused by every gather (kept until release)
        }
        return rollouts

    # -- the KV pool ------------------------------------------------------------------------------------------
    def _new_pool(self, allocate: bool = True) -> BlockPool:
        r = self.runner
        return BlockPool(self.pool_info.num_blocks, self.pool_info.block_size, r.num_layers, r.kv_heads, r.head_dim,
                         r.dtype, r.device, allocate=allocate)

    def blocks_needed(self, prompt_len: int) -> int:
        """KV blocks one request with a prompt of ``prompt_len`` tokens needs to be admitted (prompt + reserve)."""
        return self.pool.blocks_for(prompt_len) + self.reserve_blocks

    def fits(self, prompt_len: int) -> bool:
        """Whether such a request can ever be admitted (alone, in the empty pool)."""
        return self.blocks_needed(prompt_len) <= self.pool.num_blocks

    def _too_small(self, i: int, prompt_len: int, need: int) -> str:
        info = self.pool_info
        return (f"the KV pool is too small for prompt {i}: it needs {need} blocks ({prompt_len} prompt tokens + "
                f"reserve_tokens={self.reserve_tokens}, blocks of {info.block_size} tokens) but the pool has "
                f"{info.num_blocks} blocks ({info.num_tokens} tokens, sized by {info.how}); give num_blocks, "
                f"kv_cache_bytes or kv_mem_fraction a larger value, or shorten the prompt")

    def release_memory(self) -> None:
        """Free the KV pool's tensors and the runner's K/V gather buffers (between rollouts, e.g. for the policy
        update); the block accounting and :attr:`pool_info` stay, and the next :meth:`generate` (or
        :meth:`resume_memory`) allocates zeros again. The weights are the live module's and are not touched.
        On CUDA the freed memory returns to PyTorch's caching allocator, where the learner in this process reuses
        it (no ``empty_cache``)."""
        if self.pool.num_used:  # a previous generate died half-way: its blocks are dead, start clean
            self.pool = self._new_pool(allocate=False)
        self.pool.release_storage()
        self.runner.release_buffers()

    def resume_memory(self) -> None:
        """Allocate the KV pool's tensors again now (``generate`` also does it when needed)."""
        self.pool.ensure_storage()

    @property
    def memory_released(self) -> bool:
        return not self.pool.has_storage

    def load_weights(self, state_dict: dict, strict: bool = True) -> None:
        """Copy ``state_dict`` into the live model, in place (the next generate uses it).

        Missing keys are allowed only for tied weights (``lm_head.weight`` tied to the embedding).
        """
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in missing if k not in tied]
        if strict and (missing or unexpected):
            raise KeyError(f"load_weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        self.runner.bind()
