"""The ``npr`` command: ``train``, ``rollout``, ``eval`` and ``ablate``.

    npr train --preset tiny                       # all stages on CPU; TensorBoard under runs/
    npr train --config configs/qwen3-4b.toml --stage stage3 --out runs/q4b --resume
    npr train --preset tiny --smoke               # every stage for a couple of steps (CI)
    npr rollout --model runs/tiny-s0/stage3 -n 3  # print and render a few rollouts of a checkpoint
    npr eval --model runs/tiny-s0/stage3 --benchmarks math500,amc23 --data-dir ../shared/benchmarks
    npr ablate --from runs/src --out runs/ablate --seeds 0,1,2   # the paper's comparisons (npr_agent.ablation)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from npr_env.tasks import TaskFormatError

from .config import ConfigError, TrainConfig, apply_overrides, load_file, preset, validate


def smoke(cfg: TrainConfig) -> TrainConfig:
    """A couple of steps of every stage, small batches: a few minutes on 2 CPU cores."""
    cfg.name += "-smoke"
    cfg.tasks.eval_size = 8
    cfg.stage0.steps, cfg.stage0.batch_size = 30, 16
    # no check (30 steps cannot pass one; tests/test_trainer.py runs it), the share ramp over the 30 steps
    cfg.stage0.check_every, cfg.stage0.ramp_steps = 0, 0
    for rl in (cfg.stage1, cfg.stage3):
        rl.steps, rl.prompts_per_step, rl.group_size, rl.eval_every = 2, 2, 4, 0
        rl.select_problems = 8  # the preset's stage 3 keeps its best check: on 8 problems here
    cfg.stage2.num_problems, cfg.stage2.tries, cfg.stage2.steps, cfg.stage2.batch_size = 8, 4, 4, 8
    cfg.stage2.min_kept, cfg.stage2.target_kept = 8, 0
    for c in (cfg.stage1, cfg.stage2, cfg.stage3, cfg.eval):
        c.max_new_tokens = 96  # an untrained model rarely stops by itself
    cfg.checkpoint_every = 1
    return cfg


def make_config(args) -> TrainConfig:
    cfg = load_file(args.config) if args.config else preset(args.preset)
    if args.smoke:
        cfg = smoke(cfg)
    return validate(apply_overrides(cfg, args.set or []))


def run_dir_for(cfg: TrainConfig, out: str | None, resume: bool) -> Path:
    if out:
        return Path(out)
    root = Path(cfg.out_dir)
    if resume:
        found = sorted(root.glob(f"{cfg.name}-s{cfg.seed}-*"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"--resume: no earlier run named {cfg.name}-s{cfg.seed}-* under {root}; pass --out")
        return found[-1]
    return root / f"{cfg.name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args) -> int:
    from .trainer import NPRTrainer, check_inputs

    cfg = make_config(args)
    stages = tuple(s.strip() for s in args.stage.split(",")) if args.stage else cfg.stages
    run_dir = run_dir_for(cfg, args.out, args.resume)
    check_inputs(cfg, stages, run_dir)  # before the run folder exists: a refused input leaves nothing behind
    print(f"run: {run_dir}   (tensorboard --logdir {run_dir.parent})")
    t0 = time.time()
    summary = NPRTrainer(cfg, run_dir, resume=args.resume, show_progress=not args.quiet).run(stages)
    print(f"done in {time.time() - t0:.0f} s; summary: {run_dir / 'summary.json'}, curves: {summary['summary_png']}")
    for s in stages:
        ev = summary.get(s, {}).get("eval")
        if ev:
            print(f"  {s}: accuracy {ev['accuracy']:.3f}  valid {ev['valid_rate']:.3f}  parallel "
                  f"{ev['parallel_rate']:.3f}  ideal speedup {ev['speedup_ideal']:.2f}")
    return 0


def rollout_problems(model: str, problems: str | None, n: int, seed: int) -> tuple[list, str]:
    """The problems ``npr rollout`` shows, and where they came from: ``problems`` (a JSONL or JSON file in any
    benchmark schema) if given, else the held-out problems of the run the checkpoint belongs to (its
    ``heldout.jsonl``, one folder up: the run's own task, whatever its digits or group sizes), else the tiny
    preset's test split. ``seed`` picks which ``n``."""
    import random

    from npr_env.tasks import GroupSumTasks, load_problems

    path = Path(problems) if problems else Path(model).parent / "heldout.jsonl"
    if problems or path.is_file():
        pool = load_problems(path)
        if not pool:
            raise TaskFormatError(f"{path}: no problems")
        return random.Random(seed).sample(pool, min(n, len(pool))), f"{path} ({len(pool)} problems)"
    where = f"the tiny preset's test split (no heldout.jsonl beside {model}; pass --problems to choose)"
    return GroupSumTasks(seed=seed, split="test").sample(n), where


def cmd_rollout(args) -> int:
    import torch

    from engine import NPREngine, SamplingParams
    from engine.host import retain_freed_memory
    from npr_env.prompts import PromptConfig, load_prompt_config, prompt_ids
    from npr_env.render import render_ansi, render_rgb

    from .checkpoint import load_pretrained, load_tokenizer
    from .config import ModelConfig

    torch.set_num_threads(args.threads)
    retain_freed_memory()
    tok = load_tokenizer(ModelConfig(path=args.model))
    model = load_pretrained(args.model).eval()
    problems, where = rollout_problems(args.model, args.problems, args.n, args.seed)
    print(f"problems: {where}")
    saved = load_prompt_config(args.model) or PromptConfig()  # the prompt the checkpoint was trained on
    cfg = PromptConfig(saved.instruction if args.instruction is None else args.instruction, saved.chat_kwargs)
    prompts = [prompt_ids(tok, p, cfg) for p in problems]
    eng = NPREngine(model, tok)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    rollouts = eng.generate(prompts, params, mode=args.mode)
    out = Path(args.render_dir) if args.render_dir else None
    for i, (p, r) in enumerate(zip(problems, rollouts)):
        print(f"=== {p.question}   gold: {p.answer}")
        print(render_ansi(r.graph))
        if out:
            out.mkdir(parents=True, exist_ok=True)
            import matplotlib.pyplot as plt

            plt.imsave(out / f"rollout{i}.png", render_rgb(r.graph))
    if out:
        print(f"pictures in {out}")
    return 0


def cmd_eval(args, rest: list[str]) -> int:
    from .evaluate import main as eval_main

    return eval_main(rest)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_ablate(args) -> int:
    from . import ablation

    cfg = ablation.AblationConfig(
        source=args.source, out=args.out, seeds=args.seeds,
        arms=tuple(a.strip() for a in args.arms.split(",")) if args.arms else tuple(ablation.ARMS),
        sampled_tokens=args.sampled_tokens, max_steps=args.max_steps, eval_every=args.eval_every,
        eval_size=args.eval_size, speed_problems=args.speed_problems, threads=args.threads,
        overrides=tuple(args.set or ()), show_progress=not args.quiet)
    if args.report_only:
        ablation.rebuild_report(cfg)
        return 0
    ablation.run(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npr", description="Native Parallel Reasoning: train, roll out, evaluate.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the training stages")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", choices=["tiny", "qwen3-4b"])
    src.add_argument("--config", help="a TOML or YAML file (may name a preset to start from)")
    t.add_argument("--stage", help="comma-separated stages to run (default: the config's stages)")
    t.add_argument("--out", help="run directory (default: runs/<name>-s<seed>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (or the latest one)")
    t.add_argument("--smoke", action="store_true", help="every stage for a couple of steps")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. stage3.steps=5")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    r = sub.add_parser("rollout", help="print and render a few rollouts of a checkpoint")
    r.add_argument("--model", required=True)
    r.add_argument("-n", type=int, default=3)
    r.add_argument("--mode", default="parallel", choices=["parallel", "sequential"])
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--max-new-tokens", type=int, default=200)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--instruction", dest="instruction", action="store_true", default=None,
                   help="append the NPR instruction (default: as the checkpoint was trained, npr_prompt.json)")
    r.add_argument("--no-instruction", dest="instruction", action="store_false")
    r.add_argument("--render-dir", help="also write a PNG of each graph here")
    r.add_argument("--problems", help="a JSONL/JSON problem file (default: the run's heldout.jsonl beside the "
                                      "checkpoint, else the tiny preset's test split)")
    sub.add_parser("eval", help="benchmarks (see `npr eval --help`)", add_help=False)
    a = sub.add_parser("ablate", help="the paper's comparisons over seeds, from one stage-1 run")
    a.add_argument("--from", dest="source", required=True,
                   help="a run with stage0, stage1 and stage2_data.jsonl (npr train --stage stage0,stage1,stage2)")
    a.add_argument("--out", required=True, help="output folder: <arm>/seed<N>/ runs, ablation.md/.json/.png")
    a.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="comma-separated (default 0,1,2)")
    a.add_argument("--arms", help="comma-separated subset of: npr-beta, sr-beta, papo, grpo, dapo, reinforce, sr, "
                                  "no-rl (default: all)")
    a.add_argument("--sampled-tokens", type=int, default=400_000,
                   help="equal compute: each RL arm's sampling budget, and no-rl's SFT tokens (default 400000)")
    a.add_argument("--max-steps", type=int, default=400, help="cap on RL steps per arm")
    a.add_argument("--eval-every", type=int, default=10, help="RL steps between held-out evals (the curves)")
    a.add_argument("--eval-size", type=int, default=256, help="held-out problems per arm and seed")
    a.add_argument("--speed-problems", type=int, default=64, help="problems decoded per mode for tokens/s")
    a.add_argument("--threads", type=int, help="torch threads (default: the source run's)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config override for every arm")
    a.add_argument("--report-only", action="store_true", help="rebuild the table and plot from finished arms")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return cmd_eval(None, argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "train":
            return cmd_train(args)
        if args.cmd == "rollout":
            return cmd_rollout(args)
        if args.cmd == "ablate":
            return cmd_ablate(args)
    except (ConfigError, FileNotFoundError, TaskFormatError) as e:
        print(f"npr {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
