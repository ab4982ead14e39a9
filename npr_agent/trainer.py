"""The NPR training recipe: setup, the four stages, evaluation and checkpoints, read top to bottom.

    stage0  (tiny preset only) seed model: SFT from scratch on worked solutions, mostly sequential
    stage1  NPR-Zero: DAPO, sequential rollouts, relaxed constraints, format-then-accuracy reward
    stage2  NPR-Beta: rejection sampling from the stage-1 model (strict, correct), parallel SFT from the seed
    stage3  NPR: PAPO with the engine in parallel mode

One RL step (stages 1 and 3)::

    prompts ─ engine.generate(n per prompt) ─ rollouts (ids, graph, logprobs) ─ rewards.score ─ algo.prepare
      ─ build_batch(kept) ─ token_logprobs under graph.layout() ─ algo.loss ─ optimizer ─ log ─ checkpoint

The engine reads the live module's weights, so an optimizer step is visible to the next rollout without a copy.
Every stage writes an HF checkpoint to ``<run>/<stage>/`` and, while it runs, ``<run>/<stage>.state.pt`` for an
exact resume (model, optimizer, scheduler, RNG, step, data position).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import npr_env
from npr_env import rewards as R
from npr_env.convert import parallel_ids
from npr_env.graph import ExecutionGraph
from npr_env.prompts import PromptConfig, prompt_ids, save_prompt_config
from npr_env.tasks import Problem, TaskFormatError

from . import checkpoint as ckpt
from .algorithms import RolloutInfo, make_algorithm
from .config import ConfigError, RLConfig, SFTConfig, Stage0Config, TrainConfig, validate
from .distributed import LOCAL, Dist, is_sharded, unwrap
from .eval_metrics import rollout_stats
from .files import atomic_write_jsonl, atomic_write_text
from .logger import RunLogger, library_progress, plot_summary, postfix, progress
from .policy import Sample
from .replay import MixedGroupReplay, mixed_groups
from .updates import BestWeights, WeightAverage, policy_update, sft_update

STAGES = ("stage0", "stage1", "stage2", "stage3")


def check_inputs(cfg: TrainConfig, stages: tuple[str, ...], run_dir: str | Path | None = None) -> None:
    """Everything a run can refuse before it starts (and before its run folder exists): the config's values,
    the stage names, the finished stages the first one builds on (in ``run_dir``), and the problem file
    (readable, large enough to hold problems out, with the worked solutions stage 0 needs). Raises
    ``ConfigError`` or ``TaskFormatError`` naming the key or the file."""
    validate(cfg)
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"--stage: unknown stage {s!r}; stages are {', '.join(STAGES)}")
    needs = {"stage1": ["stage0"] if cfg.model.path is None else [], "stage3": ["stage2"],
             "stage2": ["stage1"] + (["stage0"] if cfg.model.path is None else [])}
    for s in stages:
        for prev in needs.get(s, []):
            done = run_dir is not None and (Path(run_dir) / prev / "DONE").exists()
            if prev not in stages and not done:
                raise ConfigError(f"--stage {s} builds on {prev}, which is neither among the stages to run nor "
                                  f"finished in {run_dir or 'the run folder (pass --out)'}")
    path = cfg.tasks.benchmark
    if not path:
        return
    try:
        problems = npr_env.tasks.load_problems(path)
    except RecursionError:
        raise TaskFormatError(f"{path}: nested too deeply to read") from None
    split_heldout(problems, cfg.tasks.eval_size, cfg.seed, where=path, quiet=True)
    if "stage0" in stages and cfg.model.path is None:
        have = [p for p in problems if {"sequential", "parallel"} <= set(p.solutions)]
        if len(have) < len(problems):
            raise TaskFormatError(
                f"{path}: stage 0 trains the tiny seed on worked solutions in both styles (sequential and "
                f"parallel), which {len(problems) - len(have)} of its {len(problems)} problems lack; start from "
                "a pretrained model (model.path) or leave stage 0 out (--stage stage1,stage2,stage3)")


def split_heldout(problems: list[Problem], eval_size: int, seed: int, where: str = "the problem file",
                  quiet: bool = False):
    """Shuffle ``problems`` with ``seed`` and hold out ``eval_size`` of them; the rest is for training.

    A file too small to hold out ``eval_size`` and still train on most of it holds out a fifth instead (with a
    printed warning); held-out problems are never trained on.
    """
    if len(problems) < 2:
        raise TaskFormatError(f"{where}: {len(problems)} problem(s); training needs at least 2 (one held out)")
    problems = list(problems)
    random.Random(seed).shuffle(problems)
    n = eval_size
    if n > len(problems) // 2:
        n = max(1, len(problems) // 5)
        if not quiet:
            print(f"warning: {where} has {len(problems)} problems, too few to hold out tasks.eval_size={eval_size}; "
              f"holding out {n} and training on the other {len(problems) - n}")
    return problems[n:], problems[:n]


def task_stream(cfg: TrainConfig, split: str, seed: int) -> npr_env.tasks.GroupSumTasks:
    """The procedural problems of ``cfg.tasks`` in ``split``, generated under ``seed``."""
    t = cfg.tasks
    return npr_env.tasks.GroupSumTasks(seed=seed, num_subproblems=t.num_subproblems, terms=t.terms,
                                       digits=t.digits, split=split)


def heldout_stream(cfg: TrainConfig) -> npr_env.tasks.GroupSumTasks:
    """A procedural run's held-out problems, in order: its first ``tasks.eval_size`` are ``heldout.jsonl``, and a
    longer sample continues them (the test split under ``seed + 1``, disjoint from training by construction)."""
    return task_stream(cfg, "test", cfg.seed + 1)


class Interrupted(RuntimeError):
    """Raised by ``NPRTrainer.stop_after`` (tests and preemption drills): the run stops right after a checkpoint."""


@dataclass
class EvalResult:
    accuracy: float
    valid_rate: float
    parallel_rate: float
    branches_mean: float
    speedup_ideal: float
    total_tokens: float
    critical_path: float
    n: int
    mode: str = "parallel"  # the engine mode it was decoded in

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        return {f"accuracy/{prefix}": self.accuracy, f"{prefix}/valid_rate": self.valid_rate,
                f"{prefix}/parallel_rate": self.parallel_rate, f"{prefix}/branches_mean": self.branches_mean,
                f"{prefix}/speedup_ideal": self.speedup_ideal, f"{prefix}/total_tokens": self.total_tokens,
                f"{prefix}/critical_path": self.critical_path}


def parallel_share(cfg: Stage0Config, step: int) -> float:
    """The share of NPR solutions in stage 0's batch at ``step``: constant, or a linear ramp from
    ``parallel_fraction_start`` at step 0 to ``parallel_fraction`` at the last step (``ramp_steps``: at that step's
    end, then held)."""
    if cfg.parallel_fraction_start is None:
        return cfg.parallel_fraction
    t = min(step / max((cfg.ramp_steps or cfg.steps) - 1, 1), 1.0)
    return cfg.parallel_fraction_start + t * (cfg.parallel_fraction - cfg.parallel_fraction_start)


def sft_config(cfg: SFTConfig, **changes) -> SFTConfig:
    """The plain SFT settings of ``cfg`` (a stage's config, a subclass), with ``changes``."""
    return SFTConfig(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig)}, **changes})


def resampled(samples: list[Sample], batch_size: int, seed: int):
    """``data(step)`` for :meth:`NPRTrainer.sft`: ``batch_size`` samples drawn with replacement, a pure function of
    ``seed + step`` (a resumed run draws the same batches)."""

    def data(step: int) -> list[Sample]:
        rng = random.Random(seed + step)
        return [samples[rng.randrange(len(samples))] for _ in range(batch_size)]

    return data


class NPRTrainer:
    """Runs the stages of one training run in ``run_dir``."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 dist: Dist = LOCAL):
        self.dist = dist  # torchrun ranks (npr_agent.distributed); world size 1 by default
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.show_progress = show_progress
        self.stop_after: dict[str, int] = {}  # stage -> step: stop there, as if killed right after its checkpoint
        # RL updates leave out the rows with advantage 0 (the same step; policy_update's skip_inert). False scores
        # every kept row, as before: benchmarks.trainer_profile --modes parallel:every-row times both.
        self.skip_inert_rows = True
        validate(cfg)
        self.setup()

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        ckpt.seed_everything(cfg.seed)
        self.device = ckpt.resolve_device(cfg.device)
        self.tokenizer = ckpt.load_tokenizer(cfg.model)
        self.logger = RunLogger(self.run_dir, cfg.to_json())
        self.train_tasks, self.eval_problems = self._tasks()
        self.summary_path = self.run_dir / "summary.json"
        self.summary = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}

    def _tasks(self):
        """Training problems and the held-out problems, disjoint for any file size; ``heldout.jsonl`` records
        which problems were held out."""
        t = self.cfg.tasks
        if t.benchmark:
            train, held = split_heldout(npr_env.tasks.load_problems(t.benchmark), t.eval_size, self.cfg.seed,
                                        where=t.benchmark)
        else:  # the procedural splits are disjoint by construction (a hash of the question picks the split)
            train = task_stream(self.cfg, "train", self.cfg.seed)
            held = heldout_stream(self.cfg).sample(t.eval_size)
        if self.dist.is_main:
            atomic_write_jsonl(self.run_dir / "heldout.jsonl",
                               ({"id": p.id, "question": p.question, "answer": p.answer} for p in held))
        return train, held

    def problems(self, stage: str, step: int, n: int) -> list[Problem]:
        """The problems of one step: a pure function of (seed, stage, step), so a resumed run sees the same."""
        keys = (*STAGES, "check")  # "check": stage 0's check problems, disjoint from every stage's
        offset = (keys.index(stage) * 1_000_003 + step * n) if stage in keys else step * n
        if isinstance(self.train_tasks, list):
            return [self.train_tasks[(offset + i) % len(self.train_tasks)] for i in range(n)]
        return [self.train_tasks[offset + i] for i in range(n)]

    @property
    def prompt_config(self) -> PromptConfig:
        """The run's prompt settings: every stage, rejection sampling and eval build prompts with them."""
        t = self.cfg.tasks
        return PromptConfig(instruction=t.instruction, chat_kwargs=dict(t.chat_kwargs))

    def prompt_ids(self, p: Problem) -> list[int]:
        return prompt_ids(self.tokenizer, p, self.prompt_config)

    def engine(self, model):
        """The rollout engine over ``model``'s current weights.

        native: reads the live module, so it is cheap to build and never needs a weight sync.
        sglang: one server per rank, started once from the weights saved to disk, then synced in memory
        (``sync_engine``) after every optimizer step.
        """
        e = self.cfg.engine
        if e.backend == "native":
            from engine import NPREngine

            # KV pool: e.num_blocks, or (None) kv_mem_fraction of the free device memory (NPREngine docstring)
            return NPREngine(model, self.tokenizer, block_size=e.block_size, num_blocks=e.num_blocks,
                             kv_mem_fraction=e.kv_mem_fraction, max_plans=e.max_plans, max_depth=e.max_depth,
                             min_fork_budget=e.min_fork_budget)
        if e.backend != "sglang":
            raise ValueError(f"engine.backend must be 'native' or 'sglang', got {e.backend!r}")
        if getattr(self, "_sglang", None) is None:
            from engine.backends.sglang import SGLangEngine

            path = self.run_dir / "sglang_init"
            if self.dist.is_main:
                ckpt.save_policy(unwrap(model), self.tokenizer, path)
            self.dist.barrier()
            extra = {}
            if self.dist.param_dtype:  # serve in the learner's compute dtype (the checkpoint holds fp32 masters)
                extra["dtype"] = self.dist.param_dtype
            self._sglang = SGLangEngine(str(path), tokenizer=self.tokenizer, base_gpu_id=self.dist.local_rank,
                                        mem_fraction_static=e.sglang_mem_fraction, memory_saver=e.memory_saver,
                                        max_plans=e.max_plans, max_depth=e.max_depth,
                                        min_fork_budget=e.min_fork_budget, **extra)
        else:
            self.sync_engine(self._sglang, model)
        return self._sglang

    def sync_engine(self, engine, model) -> None:
        """Push the learner's weights into an engine that holds its own copy (SGLang); native engines share.

        The parameters are gathered (FSDP2) and sent in buckets of ``engine.sync_bucket_mb``, cast to the dtype
        the engine serves in, so a rank never holds the whole gathered state dict.
        """
        if self.cfg.engine.backend != "native":
            buckets = self.dist.iter_state_dict_buckets(model, bucket_bytes=self.cfg.engine.sync_bucket_mb << 20,
                                                        dtype=getattr(engine, "weight_dtype", None))
            engine.load_weights(buckets)

    @contextmanager
    def engine_memory_released(self, engine):
        """The rollout engine's KV memory freed inside the block (``engine.memory_saver``; else nothing happens):
        SGLang releases its ``kv_cache`` region, the native engine drops its pool's tensors. Restored on exit,
        before the weight sync and the next rollout."""
        if not self.cfg.engine.memory_saver or not hasattr(engine, "release_memory"):
            yield
            return
        engine.release_memory()
        try:
            yield
        finally:
            engine.resume_memory()

    def sampling(self, temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int):
        from engine import SamplingParams

        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                              seed=seed, step_repetition_penalty=self.cfg.engine.step_repetition_penalty)

    # -- the pipeline ---------------------------------------------------------------------------------------
    def run(self, stages: tuple[str, ...] | None = None) -> dict:
        stages = tuple(stages or self.cfg.stages)
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
        with library_progress(self.show_progress):  # --quiet: no bars from checkpoint loads and saves either
            for s in stages:
                if self.resume and (self.run_dir / s / "DONE").exists():
                    print(f"[{s}] already done in {self.run_dir / s}; skipping")
                    continue
                getattr(self, f"run_{s}")()
                self.logger.flush()
        png = plot_summary(self.logger.metrics_path, self.run_dir / "summary.png")
        self.summary["summary_png"] = str(png)
        self._save_summary()
        self.logger.close()
        return self.summary

    def _save_summary(self):
        atomic_write_text(self.summary_path, json.dumps(self.summary, indent=2, sort_keys=True))

    def _finish_stage(self, stage: str, model, result: EvalResult | None, extra: dict | None = None):
        out = ckpt.save_policy(model, self.tokenizer, self.run_dir / stage)
        save_prompt_config(self.prompt_config, out)  # `npr eval` / `npr rollout` prompt as training did
        entry = {"checkpoint": str(out), **(extra or {})}
        if result is not None:
            entry["eval"] = result.__dict__
        self.summary[stage] = entry
        self._save_summary()
        (out / "DONE").write_text("ok\n")
        state = self.run_dir / f"{stage}.state.pt"
        if state.exists():
            state.unlink()

    def load_stage(self, stage: str):
        path = self.run_dir / stage
        if not (path / "DONE").exists():  # a checkpoint without DONE was cut short (killed while saving)
            if stage == "stage0" and self.cfg.model.path is not None:
                return self.fresh_model()
            what = "an unfinished checkpoint (no DONE marker)" if (path / "config.json").exists() else "no checkpoint"
            raise FileNotFoundError(f"{path}: {what} of {stage}; run that stage first (npr train --stage "
                                    f"{stage} --out {self.run_dir})")
        return ckpt.load_pretrained(path, ckpt.DTYPES[self.cfg.model.dtype],
                                    gradient_checkpointing=self.cfg.model.gradient_checkpointing).to(self.device)

    def fresh_model(self):
        return ckpt.build_model(self.cfg.model, self.tokenizer, self.device, seed=self.cfg.seed,
                                gradient_checkpointing=self.cfg.model.gradient_checkpointing)

    def seed_model(self):
        """The seed policy: stage 0's output for the tiny preset, the pretrained model otherwise."""
        if self.cfg.model.path is None:
            return self.load_stage("stage0")
        return self.fresh_model()

    # -- stage 0: the seed model ----------------------------------------------------------------------------
    def run_stage0(self):
        cfg = self.cfg.stage0
        model = self.fresh_model()

        def data(step: int) -> list[Sample]:
            out = []
            rng = random.Random(self.cfg.seed * 7919 + step)
            frac = parallel_share(cfg, step)
            for p in self.problems("stage0", step, cfg.batch_size):
                style = "parallel" if rng.random() < frac else "sequential"
                out.append(self.sft_sample(p, p.solutions[style], layout="sequential", spelled=cfg.spelled_tags))
                if style == "parallel" and cfg.parallel_layout == "both":
                    out.append(self.sft_sample(p, p.solutions[style], layout="parallel"))
            return out

        check = None
        if cfg.check_every:
            problems = self.problems("check", 0, cfg.check_problems)

            def check(m) -> EvalResult:
                return self.evaluate(m, "stage0", mode="sequential", log=False, problems=problems)

        schedule = self.sft("stage0", model, data, cfg, check=check)
        self._finish_stage("stage0", model, self.evaluate(model, "stage0", mode="sequential"), extra=schedule)
        return model

    def sft_sample(self, p: Problem, response: str, layout: str, spelled: bool = False) -> Sample:
        """An SFT sample of ``response`` under ``layout``; ``spelled`` writes its tags in ordinary pieces (not tag
        tokens). The parallel layout trains the token form the engine decodes (``parallel_ids``), as stage 2 does."""
        prompt = self.prompt_ids(p)
        if layout == "parallel":
            resp = parallel_ids(response, self.tokenizer)
        else:
            resp = self.tokenizer.encode(response, add_special_tokens=False, split_special_tokens=spelled)
        resp = resp + [self.tokenizer.eos_token_id]
        g = ExecutionGraph.from_token_ids(prompt + resp, self.tokenizer, prompt_len=len(prompt),
                                          constraints="relaxed", layout=layout)
        return Sample.from_graph(g)

    # -- SFT (stages 0 and 2) -------------------------------------------------------------------------------
    def sft(self, stage: str, model, data, cfg: SFTConfig, check=None) -> dict:
        """``cfg.steps`` SFT steps on ``data(step)`` under a cosine schedule; with ``check`` (a function of the
        model giving an :class:`EvalResult`, run every ``cfg.check_every`` steps on the weights' average,
        ``cfg.check_average``) the rate stays at its peak
        until ``check`` reaches ``cfg.pass_accuracy``, then decays over ``cfg.decay_steps`` and the stage ends
        (``decay_steps = 0``: it ends there, on the average's weights).
        Returns, with ``check``, the steps trained and the step the check passed at (None: never)."""
        model = self.dist.wrap(model)  # DDP / FSDP2 (identity in one process)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        warm = int(cfg.warmup_ratio * cfg.steps)
        if check is None:
            sched = ckpt.lr_lambda("cosine", cfg.steps, warm, cfg.min_lr_ratio)
        else:
            fall = cfg.check_from if cfg.rate_until_pass == "cosine" else None
            sched = ckpt.DecayOnPass(cfg.steps, warm, cfg.decay_steps, cfg.min_lr_ratio, fall_from=fall)
        schedule, sched = sched, torch.optim.lr_scheduler.LambdaLR(opt, sched)
        average = None
        if check is not None and cfg.check_average:
            if is_sharded(model):
                raise ConfigError(f"{stage}.check_average: the weight average needs whole weights on each rank; "
                                  "FSDP2 shards them (use DDP; or check_average = 0 with decay_steps > 0; or "
                                  "check_every = 0 for a fixed budget)")
            average = WeightAverage(unwrap(model), cfg.check_average)
        start = self._maybe_resume(stage, model, opt, sched, logged=-1, average=average)  # step s logged as s
        end = schedule.end if check is not None else cfg.steps
        model.train()
        bar = progress(end, stage, disable=not self.show_progress)
        bar.update(start)
        for step in range(start, cfg.steps):
            if step >= end:  # the check passed and the decay is over
                break
            t0 = time.time()
            u = sft_update(model, self.dist.shard(data(step)), opt, micro_batch_size=cfg.micro_batch_size,
                           grad_clip=cfg.grad_clip, device=self.device, dist=self.dist)
            sched.step()
            if average is not None:
                average.update(unwrap(model))
            dt = time.time() - t0
            m = {"loss/sft": u["loss/sft"], "policy/grad_norm": u["policy/grad_norm"],
                 "charts/lr": sched.get_last_lr()[0], "perf/tokens_per_s": u["tokens"] / max(dt, 1e-9)}
            m = self.dist.reduce_metrics(m, weight=u["rows"])
            if (check is not None and schedule.decay_from is None and (step + 1) % cfg.check_every == 0
                    and step + 1 >= cfg.check_from):
                m.update(self._check(average.module if average else model, check).scalars("check"))
                if m["accuracy/check"] >= cfg.pass_accuracy:
                    schedule.start_decay(step + 1)
                    end = schedule.end
                    bar.total = end
                    then = f"the rate decays over {end - step - 1} steps" if end > step + 1 else "it ends on the average"
                    print(f"[{stage}] check passed at step {step + 1} (accuracy {m['accuracy/check']:.3f} >= "
                          f"{cfg.pass_accuracy}); {then}")
            if step % self.cfg.log_every == 0 or step == end - 1 or "accuracy/check" in m:
                self.logger.log(stage, step, m)
            bar.set_postfix(postfix(m))
            bar.update(1)
            self._checkpoint(stage, step + 1, cfg.checkpoint_every, model, opt, sched,
                             extra={"average": average.state_dict()} if average else None)
        bar.close()
        model.eval()
        if check is None:
            return {}
        if not cfg.decay_steps:  # no decay: the stage's weights are the average the check passed on
            unwrap(model).load_state_dict(average.state_dict())
        if schedule.decay_from is None:
            print(f"[{stage}] the check never reached {cfg.pass_accuracy} in {cfg.steps} steps; the seed may be "
                  "weak (docs/results.md)")
        return {"steps": end, "check_passed_at": schedule.decay_from}

    def _check(self, model, check) -> EvalResult:
        """``check`` on whole weights in eval mode; every rank uses rank 0's result so all stop together."""
        was = model.training
        with torch.no_grad(), self.dist.full_weights(model):
            res = check(unwrap(model))
        model.train(was)
        return EvalResult.from_dict(self.dist.broadcast_object(res.__dict__))

    def _checkpoint(self, stage: str, done: int, every: int, model, opt, sched, extra: dict | None = None) -> None:
        """Save the training state every ``every`` steps (data position = steps done: problems are a function
        of the step); honour ``stop_after``."""
        stop = self.stop_after.get(stage) == done
        if (every and done % every == 0) or stop:
            self.dist.save_train_state(self.run_dir / f"{stage}.state.pt", model, opt, sched, done, done, extra)
        if stop:
            self.logger.flush()
            raise Interrupted(f"{stage} stopped after step {done} (stop_after)")

    def _maybe_resume(self, stage, model, opt, sched, logged: int = 0, average: WeightAverage | None = None,
                      replay: MixedGroupReplay | None = None, best: BestWeights | None = None) -> int:
        """Restore ``stage``'s training state if ``--resume`` finds one; returns the steps already done. The killed
        attempt's rows past that point are dropped by their step, so each step is logged once whatever the clocks
        did. ``logged``: the step of the row that records the ``done``-th step, less ``done`` (SFT -1, RL 0)."""
        state = self.run_dir / f"{stage}.state.pt"
        done = 0
        if self.resume and state.exists():
            saved = self.dist.load_train_state(state, model, opt, sched)
            done = int(saved["step"])
            if average is not None:
                average.load_state_dict(saved["extra"]["average"])
            if replay is not None and "replay" in (saved.get("extra") or {}):
                replay.load_state_dict(saved["extra"]["replay"])
            if best is not None and "best" in (saved.get("extra") or {}):
                best.load_state_dict(saved["extra"]["best"])
            print(f"[{stage}] resumed at step {done} from {state}")
        if self.resume and self.dist.is_main:
            data = self.run_dir / "stage2_data.jsonl"
            if done == 0 and stage == "stage2" and data.exists():  # keep the rejection row logged before the data
                self.logger.drop_after(stage, time_s=data.stat().st_mtime)
            else:
                self.logger.drop_after(stage, step=done + logged if done else -1)
        return done

    # -- stage 1: NPR-Zero -----------------------------------------------------------------------------------
    def run_stage1(self):
        model = self.seed_model()
        selected = self.rl("stage1", model, self.cfg.stage1)
        self._finish_stage("stage1", model, self.evaluate(model, "stage1", mode="sequential"), extra=selected)
        return model

    # -- stage 2: NPR-Beta -----------------------------------------------------------------------------------
    def run_stage2(self):
        cfg = self.cfg.stage2
        data_path = self.run_dir / "stage2_data.jsonl"
        if not (self.resume and data_path.exists()):
            kept = self.rejection_sample(self.load_stage("stage1"), cfg)
            if self.dist.is_main:  # every rank sampled the same; one writes (atomically: resume trusts it)
                atomic_write_jsonl(data_path, kept)
        self.dist.barrier()
        samples = self.stage2_samples(cfg.layout)
        model = self.seed_model()
        self._add_tags(model)
        steps = min(cfg.steps, max(1, cfg.epochs_cap * len(samples) // cfg.batch_size))
        data = resampled(samples, cfg.batch_size, seed=self.cfg.seed * 104729)
        self.sft("stage2", model, data, sft_config(cfg, steps=steps))
        self._finish_stage("stage2", model, self.evaluate(model, "stage2", mode=cfg.layout),
                           {"kept": len(samples), "sft_steps": steps})
        return model

    def stage2_samples(self, layout: str) -> list[Sample]:
        """The kept trajectories of ``stage2_data.jsonl`` as SFT samples under ``layout``."""
        data_path = self.run_dir / "stage2_data.jsonl"
        rows = [row for _, row in npr_env.tasks.iter_rows(data_path, what="stage-2 trajectories")]
        if not rows:
            raise RuntimeError("stage2: rejection sampling kept no trajectory (no correct, format-perfect sample); "
                               "train stage 1 longer or raise stage2.tries")
        samples = []
        for r in rows:  # SFT reads the tag-token form; files from before it was recorded hold only the sampled one
            resp = r.get("tagged_ids", r["response_ids"])
            g = ExecutionGraph.from_token_ids(r["prompt_ids"] + resp, self.tokenizer,
                                              prompt_len=len(r["prompt_ids"]), constraints="strict", layout=layout)
            samples.append(Sample.from_graph(g))
        return samples

    def _add_tags(self, model) -> None:
        """Make every tag a single special token with a mean-of-subtokens embedding (a no-op when it is already)."""
        npr_env.add_npr_tokens(self.tokenizer, model)

    def rejection_sample(self, model, cfg) -> list[dict]:
        """Up to ``tries`` samples per problem; keep the first correct one whose strict format score is 0.

        Each kept trajectory is a row of ``stage2_data.jsonl`` in both forms: ``response_ids`` as sampled
        (sequential decoding; a real model may spell its tags in text pieces) and ``tagged_ids``, the same text
        in the parallel layout's token form (``npr_env.convert.parallel_ids``: every tag its tag token, the
        engine's forced ``N:`` after each ``<step>``), which stage 2 trains on under the parallel layout. ``spelled_tags`` counts the tags the conversion turned into tag tokens.

        Tries are drawn in rounds (``tries_per_round`` per open problem), so a problem solved early costs no
        more samples; the result is the same as drawing all tries and keeping the first good one. Problems come
        in batches of ``num_problems``; further batches are drawn while fewer than ``target_kept`` are kept
        (at most ``max_problems`` problems in all).
        """
        engine = self.engine(model)
        counts = {"valid": 0, "correct": 0, "drawn": 0}
        t0 = time.time()
        problems: list[Problem] = []
        kept: list[dict] = []
        kept_for: set[int] = set()  # indices into `problems`
        cap = max(cfg.max_problems, cfg.num_problems)  # the first batch is never cut
        for b in itertools.count():
            batch = self.problems("stage2", b, cfg.num_problems)[: cap - len(problems)]
            if not batch:
                break
            got = self._reject_batch(engine, batch, cfg, b, counts)
            kept += [got[i] for i in sorted(got)]
            kept_for |= {len(problems) + i for i in got}
            problems += batch
            if len(kept) >= cfg.target_kept:
                break
            print(f"[stage2] rejection sampling kept {len(kept)} of {len(problems)} problems; below "
                  f"target_kept={cfg.target_kept}, sampling {cfg.num_problems} more")
        sampled = len(kept)
        if cfg.fill_from_solutions and sampled < cfg.min_kept:
            eos = [self.tokenizer.eos_token_id]
            for i, p in enumerate(problems):
                if len(kept) >= cfg.min_kept:
                    break
                if i not in kept_for and "parallel" in p.solutions:
                    resp = self.tokenizer.encode(p.solutions["parallel"], add_special_tokens=False) + eos
                    kept.append({"prompt_ids": self.prompt_ids(p), "response_ids": resp, "tagged_ids": resp,
                                 "spelled_tags": 0, "source": "solution"})
            print(f"[stage2] rejection sampling kept {sampled}; added {len(kept) - sampled} worked solutions "
                  f"to reach min_kept={cfg.min_kept}")
        total = max(1, counts["drawn"])
        self.logger.log("stage2", 0, {"rejection/kept_rate": sampled / max(1, len(problems)),
                                      "rejection/problems": len(problems),
                                      "rejection/samples_drawn": counts["drawn"],
                                      "rejection/from_solutions": len(kept) - sampled,
                                      "rejection/valid_rate": counts["valid"] / total,
                                      "rejection/correct_rate": counts["correct"] / total,
                                      "perf/rollout_s": time.time() - t0})
        return kept

    def _reject_batch(self, engine, problems: list[Problem], cfg, batch_index: int,
                      counts: dict[str, int]) -> dict[int, dict]:
        """One batch of rejection sampling: {index in `problems`: data row (see rejection_sample)} of those kept."""
        kept: dict[int, dict] = {}
        bar = progress(len(problems), "stage2 rejection sampling", disable=not self.show_progress)
        per_round = max(1, min(cfg.tries, cfg.tries_per_round))
        for start in range(0, cfg.tries, per_round):
            k = min(per_round, cfg.tries - start)
            open_ids = [i for i in range(len(problems)) if i not in kept]
            for c in range(0, len(open_ids), max(1, 64 // k)):
                ids = open_ids[c:c + max(1, 64 // k)]
                prompts = [self.prompt_ids(problems[i]) for i in ids for _ in range(k)]
                params = self.sampling(cfg.temperature, 1.0, 0, cfg.max_new_tokens,
                                       seed=self.cfg.seed * 31 + start * 100_003 + c + batch_index * 7_919_993)
                rollouts = engine.generate(prompts, params, mode="sequential")
                counts["drawn"] += len(rollouts)
                for j, i in enumerate(ids):
                    for r in rollouts[j * k:(j + 1) * k]:
                        res = R.score("papo", r.graph, problems[i].answer, truncated=r.truncated)
                        counts["valid"] += res.valid
                        counts["correct"] += bool(res.correct)
                        if res.valid and res.correct and not r.truncated:
                            kept[i] = {"prompt_ids": list(r.prompt_ids), "response_ids": list(r.token_ids),
                                       "tagged_ids": parallel_ids(r.graph.response_text(), self.tokenizer),
                                       "spelled_tags": r.graph.spelled_tags, "source": "sampled"}
                            bar.update(1)
                            break
                bar.set_postfix(kept=len(kept), drawn=counts["drawn"])
        bar.close()
        return kept

    # -- stage 3: NPR ----------------------------------------------------------------------------------------
    def run_stage3(self):
        model = self.load_stage("stage2")
        self._add_tags(model)
        selected = self.rl("stage3", model, self.cfg.stage3)
        self._finish_stage("stage3", model, self.evaluate(model, "stage3", mode=self.cfg.stage3.mode),
                           extra=selected)
        return model

    # -- RL (stages 1 and 3) ---------------------------------------------------------------------------------
    def rl(self, stage: str, model, cfg: RLConfig) -> dict:
        """``cfg.steps`` RL steps on ``model``. With ``cfg.select_every`` the stage ends on the weights that solved
        the most check problems (:class:`BestWeights`); returns ``{"selected_step": ...}`` then, else ``{}``."""
        algo = make_algorithm(cfg.algorithm, dict(cfg.algorithm_args), temperature=cfg.temperature)
        model = self.dist.wrap(model)  # DDP / FSDP2 for the update (identity in one process)
        best = BestWeights() if cfg.select_every else None
        if best is not None and is_sharded(model):
            raise ConfigError(f"{stage}.select_every: keeping the best weights needs whole weights on each rank; "
                              f"FSDP2 shards them (use DDP, or {stage}.select_every = 0)")
        with self.dist.full_weights(model):  # FSDP2: the engine binds whole weights, in the compute dtype
            engine = self.engine(unwrap(model))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, ckpt.lr_lambda(cfg.lr_schedule, cfg.steps, cfg.warmup_steps, 0.1))
        replay = MixedGroupReplay(cfg.replay_capacity)  # mixed groups' problems, replayed (cfg.replay_fraction)
        start = self._maybe_resume(stage, model, opt, sched, replay=replay, best=best)
        bar = progress(cfg.steps, stage, disable=not self.show_progress)
        bar.update(start)
        if start == 0:
            self.logger.log(stage, 0, {**self.start_eval(stage, model, cfg.mode).scalars(),
                                       **self._select(stage, model, cfg, best, 0)})
        # sampling compute so far (cfg.sampled_tokens budget); a resumed stage re-reads it from its logged steps
        spent = self.logger.total(stage, "perf/sampled_tokens", until_step=start) if start else 0.0
        done = start
        for step in range(start, cfg.steps):
            m = self.rl_step(stage, step, model, engine, algo, opt, cfg, replay)
            spent += m["perf/sampled_tokens"]
            m["perf/sampled_tokens_total"] = spent
            last = step == cfg.steps - 1 or (cfg.sampled_tokens and spent >= cfg.sampled_tokens)
            if m["batch/updated"]:
                sched.step()
                self.sync_engine(engine, model)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:  # the stage's own
                # final eval (run_stage*) is logged at the last step
                m.update(self.evaluate(model, stage, mode=cfg.mode, log=False).scalars())
            if best is not None and ((step + 1) % cfg.select_every == 0 or last):
                m.update(self._select(stage, model, cfg, best, step + 1))
            self.logger.log(stage, step + 1, m)
            bar.set_postfix(postfix(m))
            bar.update(1)
            done = step + 1
            extra = {"replay": replay.state_dict(), **({"best": best.state_dict()} if best is not None else {})}
            self._checkpoint(stage, step + 1, self.cfg.checkpoint_every, model, opt, sched, extra=extra)
            if last:
                break
        bar.close()
        if best is None:
            return {}
        if best.step != done:
            unwrap(model).load_state_dict(best.weights)
            print(f"[{stage}] ends on the weights of step {best.step}: they solved {best.score:.3f} of the "
                  f"{cfg.select_problems} check problems, more than the weights of step {done} did")
        return {"selected_step": best.step}

    def _select(self, stage: str, model, cfg: RLConfig, best: BestWeights | None, step: int) -> dict[str, float]:
        """One check for :class:`BestWeights`: ``model`` decodes the check problems (greedy, the stage's mode) and
        its weights are kept if they solve at least as many as the best so far."""
        if best is None:
            return {}
        problems = self.problems("check", 0, cfg.select_problems)
        res = self._check(model, lambda m: self.evaluate(m, stage, mode=cfg.mode, log=False, problems=problems))
        best.offer(unwrap(model), res.accuracy, step)
        return {"accuracy/select": res.accuracy, "select/best_step": float(best.step)}

    def rl_step(self, stage, step, model, engine, algo, opt, cfg: RLConfig,
                replay: MixedGroupReplay | None = None) -> dict[str, float]:
        replayed = replay.take(int(cfg.replay_fraction * cfg.prompts_per_step)) if replay is not None else []
        step_problems = replayed + self.problems(stage, step, cfg.prompts_per_step)[: cfg.prompts_per_step
                                                                                    - len(replayed)]
        problems = self.dist.shard(step_problems)  # this rank's prompts
        prompts = [self.prompt_ids(p) for p in problems for _ in range(cfg.group_size)]
        golds = [p.answer for p in problems for _ in range(cfg.group_size)]
        groups = [i for i in range(len(problems)) for _ in range(cfg.group_size)]
        params = self.sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens,
                               seed=self.cfg.seed * 1_000_003 + STAGES.index(stage) * 10_007 + step
                               + self.dist.shard_range(cfg.prompts_per_step)[0] * cfg.group_size)
        model.eval()
        t0 = time.time()
        with self.dist.full_weights(model):  # FSDP2: whole weights for the engine
            rollouts = engine.generate(prompts, params, mode=cfg.mode)
        rollout_s = time.time() - t0
        sampled = sum(len(r.token_ids) for r in rollouts)
        results = R.score_many(cfg.reward, [r.graph for r in rollouts], golds, [r.truncated for r in rollouts])
        infos = [RolloutInfo(reward=res.reward, group_id=g, length=len(r.token_ids), truncated=r.truncated,
                             dropped=res.dropped) for res, r, g in zip(results, rollouts, groups)]
        prep = self.dist.prepare(algo, infos)  # advantages over the global batch; this rank's slice
        valid = [res.valid for res in results]
        m = {
            "reward/mean": float(np.mean([res.reward for res in results])),
            "accuracy/train": float(np.mean([bool(res.correct) for res in results])),
            "format/valid_rate": float(np.mean(valid)),
            "format/score_mean": float(np.mean([res.format_score for res in results])),
            # share of rollouts that spell a tag in text pieces (judged on their text in the sequential layout)
            "format/spelled_rate": float(np.mean([r.graph.spelled_tags > 0 for r in rollouts])),
            "length/total_tokens": float(np.mean([r.graph.stats.total_tokens for r in rollouts])),
            "length/critical_path": float(np.mean([r.graph.stats.critical_path_tokens for r in rollouts])),
            "length/truncated_rate": float(np.mean([r.truncated for r in rollouts])),
            "perf/rollout_s": rollout_s,
            "perf/sampled_tokens": float(sampled),
            "perf/tokens_per_s": sampled / max(rollout_s, 1e-9),
            "batch/kept": float(prep.keep.sum()),
            **rollout_stats([r.graph for r in rollouts], valid),
            **{k: float(v) for k, v in prep.metrics.items()},
        }
        if replay is not None:  # every rank adds the same problems: the flags of all ranks, in rank order
            flags = [f for part in self.dist.all_gather_object(mixed_groups(prep.advantages, cfg.group_size))
                     for f in part]
            replay.add([p for p, f in zip(step_problems, flags) if f])
            m["replay/prompts"] = float(len(replayed))
            m["replay/mixed_groups"] = float(sum(flags))
            m["replay/buffer"] = float(len(replay))
        kept = [r for r, k in zip(rollouts, prep.keep) if k]
        adv_kept = torch.tensor(prep.advantages[prep.keep], dtype=torch.float32, device=self.device)
        t1 = time.time()
        with self.engine_memory_released(engine):  # engine.memory_saver: its KV memory serves the update
            m.update(policy_update(model, algo, kept, adv_kept, opt, micro_batch_size=cfg.micro_batch_size,
                                   grad_clip=cfg.grad_clip, temperature=cfg.temperature, device=self.device,
                                   dist=self.dist, check=rollouts[:: cfg.group_size],  # one per group
                                   skip_inert=self.skip_inert_rows))
        m["perf/update_s"] = time.time() - t1
        return self.dist.reduce_metrics(m, weight=len(rollouts))

    # -- evaluation ------------------------------------------------------------------------------------------
    def start_eval(self, stage: str, model, mode: str) -> EvalResult:
        """The held-out eval of the weights an RL stage starts from: the previous stage's final eval when it
        was decoded in the same mode (stage1 starts from stage0's weights, stage3 from stage2's), else a new one."""
        prev = {"stage1": "stage0" if self.cfg.model.path is None else None, "stage3": "stage2"}.get(stage)
        entry = self.summary.get(prev, {}).get("eval") if prev else None
        if entry and entry.get("mode") == mode and entry.get("n") == len(self.eval_problems):
            return EvalResult.from_dict(entry)
        return self.evaluate(model, stage, mode=mode, log=False)

    @torch.no_grad()
    def evaluate(self, model, stage: str, mode: str, log: bool = True,
                 problems: list[Problem] | None = None) -> EvalResult:
        """Held-out accuracy (greedy by default) with parallel stats, in the stage's decoding mode (``problems``:
        others than the held-out ones)."""
        e = self.cfg.eval
        engine = self.engine(model)
        model.eval()
        problems = self.eval_problems if problems is None else problems
        params = self.sampling(e.temperature, e.top_p, 0, e.max_new_tokens, seed=self.cfg.seed + 17)
        rollouts = engine.generate([self.prompt_ids(p) for p in problems], params, mode=mode)
        results = [R.score("papo", r.graph, p.answer, truncated=r.truncated) for r, p in zip(rollouts, problems)]
        valid = [res.valid for res in results]
        st = rollout_stats([r.graph for r in rollouts], valid)
        res = EvalResult(
            accuracy=float(np.mean([bool(x.correct) for x in results])),
            valid_rate=float(np.mean(valid)),
            parallel_rate=st["parallel/rate"], branches_mean=st["parallel/branches_mean"],
            speedup_ideal=st["parallel/speedup_ideal"],
            total_tokens=float(np.mean([r.graph.stats.total_tokens for r in rollouts])),
            critical_path=float(np.mean([r.graph.stats.critical_path_tokens for r in rollouts])),
            n=len(problems), mode=mode,
        )
        if log:
            self.logger.log(stage, self.logger.last_step.get(stage, 0), res.scalars())  # at the stage's last step
            self.logger.text(stage, "samples", "\n\n".join(
                f"**{p.question}** (gold {p.answer})\n```\n{r.graph.response_text()}\n```"
                for p, r in list(zip(problems, rollouts))[:4]))
        if log:
            print(f"[{stage}] eval ({mode}): accuracy {res.accuracy:.3f}, valid {res.valid_rate:.3f}, "
                  f"parallel {res.parallel_rate:.3f}, ideal speedup {res.speedup_ideal:.2f} (n={res.n})")
        return res
