"""``python -m npr_agent.train``: the ``npr train`` command under torchrun (DDP, or FSDP2 with ``--strategy fsdp2``).

    torchrun --nproc_per_node 8 -m npr_agent.train --config configs/qwen3-4b.toml --out runs/q4b
    torchrun --nproc_per_node 2 -m npr_agent.train --preset tiny --smoke          # CPU, gloo
    python -m npr_agent.train --preset tiny                                        # one process: as `npr train`

It takes the arguments of ``npr train`` plus ``--strategy {ddp,fsdp2}`` and, for FSDP2, ``--param-dtype bfloat16``
(bf16 compute over float32 master weights: set ``model.dtype=float32``; pure bf16 weights cannot absorb the
paper's 1e-6..1e-7 steps). Every rank runs the same stages;
prompts (RL) and samples (SFT) are sharded across ranks, advantages and the loss normaliser are global, and
rank 0 alone logs, prints, writes checkpoints and the summary (see npr_agent/distributed.py). Evaluation and
stage 2's rejection sampling run on every rank, identically (same weights, same seeds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import cli
from .config import ConfigError, TrainConfig
from .distributed import LOCAL, STRATEGIES, Dist, is_sharded, unwrap
from .trainer import NPRTrainer


class NullLogger:
    """The logger of ranks other than 0: it writes nothing, but keeps what the trainer reads back from a
    :class:`~npr_agent.logger.RunLogger` (``metrics_path``, rank 0's, for the summary plot; ``last_step``)."""

    def __init__(self, metrics_path: Path):
        self.metrics_path = metrics_path
        self.last_step: dict[str, int] = {}

    def log(self, stage: str, step: int, scalars=None) -> None:
        self.last_step[stage] = max(step, self.last_step.get(stage, step))

    def text(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _SavesStateDict:
    """An FSDP2 model seen by ``checkpoint.save_policy``: ``save_pretrained`` writes the gathered full state dict."""

    def __init__(self, model, state_dict: dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.model.save_pretrained(out_dir, state_dict=self.state_dict, **kwargs)


class DistributedNPRTrainer(NPRTrainer):
    """:class:`NPRTrainer` on one rank of a torchrun job: rank 0 logs and saves, every rank trains."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 dist: Dist = LOCAL):
        super().__init__(cfg, run_dir, resume=resume, show_progress=show_progress and dist.is_main, dist=dist)

    def setup(self) -> None:
        super().setup()
        if self.dist.device.type == "cuda":
            self.device = self.dist.device  # cuda:LOCAL_RANK
        if not self.dist.is_main:
            self.logger.close()
            self.logger = NullLogger(self.logger.metrics_path)

    def _save_summary(self) -> None:
        if self.dist.is_main:
            super()._save_summary()

    def _finish_stage(self, stage: str, model, result, extra: dict | None = None) -> None:
        inner = unwrap(model)
        if is_sharded(inner):  # FSDP2 state dicts are sharded: gather on every rank, rank 0 writes it
            inner = _SavesStateDict(inner, self.dist.full_state_dict(inner))
        if self.dist.is_main:
            super()._finish_stage(stage, inner, result, extra)
        elif result is not None:  # every rank evaluated the same; all must agree on reusing it (start_eval)
            self.summary[stage] = {"eval": result.__dict__, **(extra or {})}
        self.dist.barrier()  # the next stage loads what rank 0 just wrote

    def evaluate(self, model, stage: str, mode: str, log: bool = True):
        inner = unwrap(model)
        with self.dist.full_weights(inner):
            return super().evaluate(inner, stage, mode, log=log)


def check_config(cfg: TrainConfig, stages: tuple[str, ...], world: int) -> None:
    """Every rank needs at least one prompt (RL) or sample (SFT) per step."""
    need = {"stage0": ("stage0.batch_size", cfg.stage0.batch_size),
            "stage1": ("stage1.prompts_per_step", cfg.stage1.prompts_per_step),
            "stage2": ("stage2.batch_size", cfg.stage2.batch_size),
            "stage3": ("stage3.prompts_per_step", cfg.stage3.prompts_per_step)}
    for s in stages:
        if s in need and need[s][1] < world:
            key, value = need[s]
            raise ConfigError(f"{key}={value} is smaller than the {world} ranks: every rank needs at least one per step")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(prog="python -m npr_agent.train", add_help=False)
    pre.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="ddp (default) or fsdp2 (sharded)")
    pre.add_argument("--param-dtype", choices=["bfloat16", "float16"],
                     help="fsdp2 only: compute in this dtype over the model's own (float32) master weights")
    pre.add_argument("--print-all-ranks", action="store_true", help="keep the stdout of ranks other than 0")
    ours, rest = pre.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        pre.print_help()
        print("\nand every argument of `npr train`:")
        cli.build_parser().parse_args(["train", "--help"])
        return 0
    args = cli.build_parser().parse_args(["train", *rest])
    try:
        cfg = cli.make_config(args)
        stages = tuple(args.stage.split(",")) if args.stage else tuple(cfg.stages)
        dist = Dist.from_env(cfg.device, ours.strategy, ours.param_dtype)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"npr_agent.train: error: {e}", file=sys.stderr)
        return 2
    try:
        check_config(cfg, stages, dist.world_size)
        run_dir = dist.broadcast_object(str(cli.run_dir_for(cfg, args.out, args.resume)) if dist.is_main else None)
    except (ConfigError, FileNotFoundError) as e:
        print(f"npr_agent.train: error: {e}", file=sys.stderr)
        dist.close()
        return 2
    if not dist.is_main and not ours.print_all_ranks:
        sys.stdout = open(os.devnull, "w")  # one line per rank would repeat every message
    try:
        print(f"run: {run_dir}   ranks: {dist.world_size} ({ours.strategy}, {dist.device.type})   "
              f"(tensorboard --logdir {Path(run_dir).parent})")
        t0 = time.time()
        trainer = DistributedNPRTrainer(cfg, run_dir, resume=args.resume, show_progress=not args.quiet, dist=dist)
        summary = trainer.run(stages)
        print(f"done in {time.time() - t0:.0f} s; summary: {Path(run_dir) / 'summary.json'}")
        for s in stages:
            ev = summary.get(s, {}).get("eval")
            if ev:
                print(f"  {s}: accuracy {ev['accuracy']:.3f}  valid {ev['valid_rate']:.3f}  parallel "
                      f"{ev['parallel_rate']:.3f}  ideal speedup {ev['speedup_ideal']:.2f}")
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
