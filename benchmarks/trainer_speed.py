"""Seconds per RL step: our trainer (NPR Engine + PAPO) against TRL's GRPOTrainer, side by side in one run.

Same prompts, same group size, same completion budget and temperature; one step = generate the group rollouts,
score them, one optimizer update. TRL decodes with HF ``generate`` (sequential); ours is measured in both engine
modes::

    python -m benchmarks.trainer_speed --model runs/<run>/stage3 --sequential-model runs/<run>/stage1
    python -m benchmarks.trainer_speed --model runs/<run>/stage2 --steps 3 --json out/trainer_speed.json
    python -m benchmarks.trainer_speed --quick            # a tiny random model (the ratio, not the learning)

A model trained under the parallel layout (stages 2-3) does not write the format as causal text: in sequential
mode it stops after its first step (valid rate 0), so a sequential step on it generates about half the tokens and
never updates. ``--sequential-model`` gives the sequential arms (ours and TRL's) a checkpoint that writes the
format sequentially (stage 1, NPR-Zero, or an SR model), so each mode runs the task it is trained for. Each
arm's valid rate and accuracy are printed beside its seconds, with a warning where a mode's rollouts are mostly
invalid.

The first step of each side is a warm-up and is not timed. Our two modes run in the same process, alternating
step by step (after one warm-up step each), so a change in the machine's load hits both alike.

The two modes do not do the same work on the same prompts: a parallel rollout decodes its sibling steps side by
side, so within the same ``max_new_tokens`` (a bound on each rollout's critical path, decode steps) it generates
more tokens, and the update then scores more. Printed with the seconds, per mode: tokens generated per step, decode
steps per rollout, the share of steps that updated (a step whose rollouts all get the same reward has no gradient
and makes no update), and seconds per 1000 generated tokens. ``benchmarks.trainer_profile`` splits a step into
phases.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODES = ("parallel", "sequential")


def make_arm(model_dir: str, mode: str, prompts: int, group: int, max_new: int, threads: int):
    """One RL arm on the tiny preset's stage 3: trainer, fresh model, its engine, PAPO, AdamW and the RL config."""
    import torch

    from npr_agent.algorithms import make_algorithm
    from npr_agent.config import preset
    from npr_agent.trainer import NPRTrainer

    cfg = preset("tiny")
    cfg.model.path, cfg.threads, cfg.tasks.eval_size = model_dir, threads, 1
    rl = cfg.stage3
    rl.mode, rl.prompts_per_step, rl.group_size, rl.max_new_tokens = mode, prompts, group, max_new
    t = NPRTrainer(cfg, tempfile.mkdtemp(prefix="npr-bench-run-"), show_progress=False)
    model = t.fresh_model()
    algo = make_algorithm("papo", temperature=rl.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=rl.lr)
    return t, model, t.engine(model), algo, opt, rl


def decode_steps(metrics: dict[str, float], mode: str) -> float:
    """A rollout's mean decode steps: its critical path in parallel mode, every token in sequential mode (the
    graph's critical path is what a parallel decode of the same text would take, not what this one took)."""
    return metrics["length/critical_path"] if mode == "parallel" else metrics["length/total_tokens"]


def ours(models: dict[str, str], steps: int, prompts: int, group: int, max_new: int, threads: int,
         modes=MODES) -> dict[str, dict[str, float]]:
    """Per mode: seconds per step and the work a step did, the modes alternating step by step.

    ``models``: the checkpoint of each mode."""
    arms = {m: make_arm(models[m], m, prompts, group, max_new, threads) for m in modes}
    for t, model, engine, algo, opt, rl in arms.values():
        t.rl_step("stage3", 0, model, engine, algo, opt, rl)  # warm-up, untimed
    acc = {m: {"s": 0.0, "tokens": 0.0, "decode_steps": 0.0, "updated": 0.0, "valid": 0.0, "accuracy": 0.0}
           for m in modes}
    for step in range(1, steps + 1):
        for m in modes:
            t, model, engine, algo, opt, rl = arms[m]
            t0 = time.perf_counter()
            met = t.rl_step("stage3", step, model, engine, algo, opt, rl)
            a = acc[m]
            a["s"] += time.perf_counter() - t0
            a["tokens"] += met["length/total_tokens"] * prompts * group
            a["decode_steps"] += decode_steps(met, m)
            a["updated"] += met.get("batch/updated", 0.0)
            a["valid"] += met["format/valid_rate"]
            a["accuracy"] += met["accuracy/train"]
    return {m: {"model": models[m], "s_per_step": a["s"] / steps, "generated_tokens_per_step": a["tokens"] / steps,
                "decode_steps_per_rollout": a["decode_steps"] / steps, "updated_rate": a["updated"] / steps,
                "valid_rate": a["valid"] / steps, "accuracy": a["accuracy"] / steps,
                "s_per_1k_tokens": 1000 * a["s"] / max(a["tokens"], 1.0)} for m, a in acc.items()}


def trl(model_dir: str, steps: int, prompts: int, group: int, max_new: int, threads: int) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import npr_env
    from npr_env.tasks import GroupSumTasks

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    npr_env.add_npr_tokens(tok)
    probs = GroupSumTasks(seed=0).sample(prompts * (steps + 1))
    # the prompt text whose ids are exactly ours (npr_env.prompt_ids): TRL tokenises it again
    data = Dataset.from_list([{"prompt": tok.decode(npr_env.prompt_ids(tok, p)), "answer": p.answer}
                              for p in probs])

    def reward(completions, answer, **kw):
        return [npr_env.rewards.score("papo", npr_env.parse(c), a).reward for c, a in zip(completions, answer)]

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="npr-speed-trl-"), max_steps=steps + 1,
                     per_device_train_batch_size=prompts * group, num_generations=group,
                     max_completion_length=max_new, temperature=1.0, beta=0.0, learning_rate=2e-5,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False)
    tr = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[reward], args=cfg,
                     train_dataset=data, processing_class=tok, callbacks=[Clock()])
    tr.train()
    return (stamps[-1] - stamps[0]) / steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF checkpoint dir (default: a tiny random Qwen3, ~0.6M parameters)")
    ap.add_argument("--sequential-model", help="the checkpoint of the sequential arms, ours and TRL's (default: "
                    "--model); one that writes the format as causal text, e.g. runs/<run>/stage1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 steps, 4 prompts x 4, 96 tokens")
    ap.add_argument("--no-trl", action="store_true", help="our two modes only")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.prompts, a.group, a.max_new_tokens = 2, 4, 4, 96
    from npr_agent.checkpoint import save_tiny_model

    model = a.model or save_tiny_model(hidden_size=128, num_layers=3)  # the tiny preset's shape
    models = {"parallel": model, "sequential": a.sequential_model or model}
    from npr_env.verify import warmup

    warmup()  # the verifier's workers start (~1 s each) before any timing, not inside the first arm's steps
    shape = (a.steps, a.prompts, a.group, a.max_new_tokens, a.threads)
    res = {"model": model, "sequential_model": models["sequential"], "steps": a.steps, "prompts": a.prompts,
           "group": a.group, "max_new_tokens": a.max_new_tokens, "threads": a.threads}
    if not a.no_trl:
        res["trl_grpo_s_per_step"] = trl(models["sequential"], *shape)
    for mode, r in ours(models, *shape).items():
        for k, v in r.items():
            res[f"ours_{mode}_{k}"] = v
        if not a.no_trl:
            res[f"speedup_vs_trl_{mode}"] = res["trl_grpo_s_per_step"] / r["s_per_step"]
    res["parallel_over_sequential_per_step"] = res["ours_parallel_s_per_step"] / res["ours_sequential_s_per_step"]
    res["parallel_over_sequential_per_token"] = (res["ours_parallel_s_per_1k_tokens"]
                                                 / res["ours_sequential_s_per_1k_tokens"])
    print(f"{'':24s} s/step   vs TRL  tokens/step  decode steps  updated  s/1k tokens  valid  accuracy")
    if not a.no_trl:
        print(f"{'TRL GRPOTrainer':24s} {res['trl_grpo_s_per_step']:7.2f}   1.00x  "
              f"{a.prompts * a.group * a.max_new_tokens:>11d} (at most)")
    for mode in MODES:
        vs = f"{res[f'speedup_vs_trl_{mode}']:5.2f}x" if not a.no_trl else "    -"
        print(f"{'ours, ' + mode:24s} {res[f'ours_{mode}_s_per_step']:7.2f}   {vs}  "
              f"{res[f'ours_{mode}_generated_tokens_per_step']:11.0f}  {res[f'ours_{mode}_decode_steps_per_rollout']:12.1f}"
              f"  {res[f'ours_{mode}_updated_rate']:7.2f}  {res[f'ours_{mode}_s_per_1k_tokens']:11.3f}"
              f"  {res[f'ours_{mode}_valid_rate']:5.2f}  {res[f'ours_{mode}_accuracy']:8.2f}")
    print(f"parallel / sequential: {res['parallel_over_sequential_per_step']:.2f} per step, "
          f"{res['parallel_over_sequential_per_token']:.2f} per generated token")
    for mode in MODES:
        if a.model and res[f"ours_{mode}_valid_rate"] < 0.5:
            hint = (" (a model trained under the parallel layout stops after its first step in sequential mode; "
                    "give the sequential arms one that writes the format as causal text: --sequential-model "
                    "<run>/stage1)" if mode == "sequential" and not a.sequential_model else "")
            print(f"warning: only {res[f'ours_{mode}_valid_rate']:.0%} of the {mode} rollouts of {models[mode]} "
                  f"are valid, so the two modes do not do the same task{hint}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
