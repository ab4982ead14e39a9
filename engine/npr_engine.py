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

import time

import torch

from npr_env import constraints as C
from npr_env.graph import TagVocab
from npr_env.schema import MAX_DEPTH, MAX_PLANS, STEP_OPEN, TAKEAWAY_OPEN

from .kv_cache import BlockPool
from .rollout import Rollout
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler


class NPREngine:
    """Rollout engine. Config (keyword arguments):

    * ``block_size`` (16): tokens per KV block. ``num_blocks``: pool size; default: as many blocks as fit in
      ``kv_cache_bytes`` (256 MiB).
    * ``max_running_requests`` (256), ``max_batch_rows`` (256, rows per forward; more active branches are
      split over several forwards), ``prefill_chunk`` (512 tokens), ``max_prefill_tokens`` (8192 prompt tokens
      admitted per prefill).
    * ``reserve_tokens`` (32): free KV a sample must find, beyond its prompt, to be admitted.
    * ``max_plans`` (5), ``max_depth`` (5): fork limits (a deeper block is decoded sequentially).
      ``min_fork_budget`` (32): fork only if at least this many tokens of budget remain.
    * ``constraints`` ("strict"): the ``npr_env`` constraint preset or ``ConstraintSet`` of the rollout graphs.
      ``stop_on_violation`` (None = on in parallel mode with strict constraints): end a rollout as soon as
      its graph has a violation (finish ``violation``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 256 * 2**20, max_running_requests: int = 256, max_batch_rows: int = 256,
                 prefill_chunk: int = 512, max_prefill_tokens: int = 8192, reserve_tokens: int = 32,
                 max_plans: int = MAX_PLANS, max_depth: int = MAX_DEPTH, min_fork_budget: int = 32,
                 constraints: str | C.ConstraintSet = "strict", stop_on_violation: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.vocab = TagVocab.of(tokenizer)
        self.runner = ModelRunner(model)
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
        if num_blocks is None:
            num_blocks = max(1, kv_cache_bytes // per_block)
        self.pool = BlockPool(num_blocks, block_size, r.num_layers, r.kv_heads, r.head_dim, r.dtype, r.device)
        self.reserve_blocks = self.pool.blocks_for(reserve_tokens)
        self.step_open_id = self.vocab.id_of[STEP_OPEN]
        self.takeaway_open_id = self.vocab.id_of[TAKEAWAY_OPEN]
        self.last_stats: dict = {}

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams | None = None,
                 mode: str = "parallel") -> list[Rollout]:
        """Generate ``params.n`` rollouts per prompt (prompt-major order). Token ids in, token ids out."""
        params = params or SamplingParams()
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
        prompts = [[int(t) for t in p] for p in prompt_ids]
        vocab_rows = self.runner.embed.shape[0]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: the first token needs a prompt to be predicted from")
            bad = [t for t in p if not 0 <= t < vocab_rows]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the model's vocabulary: {bad[:5]}")
        if self.pool.num_used:  # a previous call died half-way: start from a clean pool
            self.pool = BlockPool(self.pool.num_blocks, self.pool.block_size, self.runner.num_layers,
                                  self.runner.kv_heads, self.runner.head_dim, self.runner.dtype, self.runner.device)
        self.runner.bind()
        stop = self.stop_on_violation
        if stop is None:
            stop = mode == "parallel" and self.constraints.name == "strict"
        self.pool.reset_peak()
        t0 = time.perf_counter()
        sched = Scheduler(self, prompts, params, mode, stop)
        with torch.inference_mode():
            rollouts = sched.run()
        self.last_stats = {
            "wall_s": time.perf_counter() - t0, "steps": sched.steps, "peak_kv_blocks": self.pool.peak_used,
            "peak_kv_bytes": self.pool.peak_used * self.pool.bytes_per_block,
            "num_tokens": sum(r.num_tokens for r in rollouts), "step_log": sched.step_log,
            "preemptions": sched.preemptions,
        }
        return rollouts

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
