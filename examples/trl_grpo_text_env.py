"""Train on NPR-MathText-v0 with TRL's GRPOTrainer: the env plugs into another RL stack.

TRL generates the text; the reward of each completion is the env's own verdict (``env.step(text)``), so the
NPR graph constraints and the verifier grade TRL's rollouts exactly as they grade ours::

    pip install -c constraints-cpu.txt -e ".[dev,trl]"
    python examples/trl_grpo_text_env.py --model runs/<run>/stage2 --steps 20     # a trained checkpoint
    python examples/trl_grpo_text_env.py --steps 2                                # a tiny random model (smoke)

TRL samples sequentially (it has no fork/join), so this trains the NPR *format*, not native parallel decoding.
"""

from __future__ import annotations

import argparse
import tempfile

import gymnasium as gym

import npr_env
from npr_env.tasks import GroupSumTasks


def env_reward(env_id: str = "NPR-MathText-v0", reward: str = "stage1"):
    """A TRL reward function ``(completions, prompts, answer, **kw) -> list[float]`` backed by the text env."""
    env = gym.make(env_id, reward=reward, instruction=False).unwrapped

    def npr_env_reward(completions, answer, question, **kwargs) -> list[float]:
        out = []
        for text, gold, q in zip(completions, answer, question):
            if isinstance(text, list):  # chat format: the assistant message
                text = text[-1]["content"]
            problem = npr_env.tasks.Problem(id="trl", question=q, answer=gold, source="trl")
            env.reset(options={"problem": problem})
            _, r, _, _, _ = env.step(text)
            out.append(float(r))
        return out

    return npr_env_reward


def build_dataset(n: int, seed: int = 0):
    from datasets import Dataset

    probs = GroupSumTasks(seed=seed, num_subproblems=(2, 3), terms=(3, 4)).sample(n)
    return Dataset.from_list([{"prompt": p.question, "question": p.question, "answer": p.answer} for p in probs])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF checkpoint dir (default: a tiny random Qwen3)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from npr_agent.checkpoint import save_tiny_model

    path = args.model or save_tiny_model()
    tok = AutoTokenizer.from_pretrained(path)
    npr_env.add_npr_tokens(tok)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = args.num_generations * args.prompts_per_step
    cfg = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="npr-trl-out-"),
        max_steps=args.steps, learning_rate=args.lr, per_device_train_batch_size=batch,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=1.0, beta=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        bf16=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[env_reward()], args=cfg,
                          train_dataset=build_dataset(batch * args.steps), processing_class=tok)
    result = trainer.train()
    print(result)
    return {"train_loss": result.training_loss, "log_history": trainer.state.log_history}


if __name__ == "__main__":
    main()
