"""Seconds per RL step: our trainer (NPR Engine + PAPO) against TRL's GRPOTrainer, side by side in one run.

Same model, same prompts, same group size, same completion budget and temperature; one step = generate the
group rollouts, score them, one optimizer update. TRL decodes with HF ``generate`` (sequential); ours is
measured in both engine modes::

    python -m benchmarks.trainer_speed --model runs/<run>/stage2 --steps 3 --json out/trainer_speed.json
    python -m benchmarks.trainer_speed --quick            # a tiny random model (the ratio, not the learning)

The first step of each side is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def ours(model_dir: str, mode: str, steps: int, prompts: int, group: int, max_new: int, threads: int) -> float:
    from npr_agent.algorithms import make_algorithm
    from npr_agent.config import preset
    from npr_agent.trainer import NPRTrainer

    cfg = preset("tiny")
    cfg.model.path, cfg.threads, cfg.tasks.eval_size = model_dir, threads, 1
    rl = cfg.stage3
    rl.mode, rl.prompts_per_step, rl.group_size, rl.max_new_tokens = mode, prompts, group, max_new
    t = NPRTrainer(cfg, tempfile.mkdtemp(prefix="npr-speed-run-"), show_progress=False)
    model = t.fresh_model()
    algo = make_algorithm("papo", temperature=rl.temperature)
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=rl.lr)
    engine = t.engine(model)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        t.rl_step("stage3", step, model, engine, algo, opt, rl)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


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
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 steps, 4 prompts x 4, 96 tokens")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.prompts, a.group, a.max_new_tokens = 2, 4, 4, 96
    from npr_agent.checkpoint import save_tiny_model

    model = a.model or save_tiny_model(hidden_size=128, num_layers=3)  # the tiny preset's shape
    shape = (a.steps, a.prompts, a.group, a.max_new_tokens, a.threads)
    res = {"model": model, "steps": a.steps, "prompts": a.prompts, "group": a.group,
           "max_new_tokens": a.max_new_tokens, "threads": a.threads}
    res["trl_grpo_s_per_step"] = trl(model, *shape)
    for mode in ("parallel", "sequential"):
        res[f"ours_{mode}_s_per_step"] = ours(model, mode, *shape)
        res[f"speedup_vs_trl_{mode}"] = res["trl_grpo_s_per_step"] / res[f"ours_{mode}_s_per_step"]
    print(f"{'':24s} s/step   vs TRL")
    print(f"{'TRL GRPOTrainer':24s} {res['trl_grpo_s_per_step']:7.2f}   1.00x")
    for mode in ("parallel", "sequential"):
        print(f"{'ours, ' + mode:24s} {res[f'ours_{mode}_s_per_step']:7.2f}   "
              f"{res[f'speedup_vs_trl_{mode}']:.2f}x")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
