"""Where a tiny-preset checkpoint's wrong answers come from: each wrong held-out rollout classified by its first
faulty step (the diagnosis table of docs/results.md).

    python -m benchmarks.error_kinds --run runs/<run> --stage stage2 [--n 256] [--mode parallel]
    python -m benchmarks.error_kinds --copy-probe --run runs/<run> --stage stage0     # the seed's copying

``--copy-probe`` teacher-forces the worked parallel solutions of fresh test problems through a checkpoint
(stage 0's seed, say) and reports the share of steps whose restated group (``A=7 3 2 4 8:``) is the model's
greedy choice at every token: under the parallel layout (each step starts where its siblings start and sees
none of them) and as causal text, for the first step of a block and for the later ones. It measures whether
a seed can do the one thing stage 2 fails at, before stage 2 runs.

Kinds, in the order a rollout is checked:
  invalid    the graph breaks the strict constraints;
  copy       a step restates its group with other digits than the prompt's (``A=7 3 2: ...``);
  digits     the running sum adds other digits than the restated group's;
  arithmetic a wrong addition, or a step's result that is not its last sum;
  reduce     every step is right, the takeaway or the boxed answer is not (or a group has no step).
GroupSumTasks prompts and solutions only (the format of ``npr_env.tasks.GroupSumTasks``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

GROUP = re.compile(r"([A-Z])=((?:\d ?)+)")
STEP = re.compile(r"<step>\d+:\s*([A-Z])=((?:\d ?)+):(.*?)(?:</step>|$)", re.S)
SUM = re.compile(r"(\d+)\+(\d+)=(\d+)")
RESULT = re.compile(r"so [A-Z]=(\d+)")
KINDS = ("invalid", "copy", "digits", "arithmetic", "reduce")


def digits(text: str) -> list[int]:
    return [int(c) for c in text.split()]


def classify(question: str, response: str, valid: bool) -> str:
    """The first fault of a wrong rollout: one of :data:`KINDS`."""
    if not valid:
        return "invalid"
    groups = {k: digits(v) for k, v in GROUP.findall(question)}
    for label, restated, body in STEP.findall(response):
        ds = digits(restated)
        if groups.get(label) != ds:
            return "copy"
        sums = [tuple(map(int, s)) for s in SUM.findall(body)]
        if [b for _, b, _ in sums] != ds[1:] or (sums and sums[0][0] != ds[0]):
            return "digits"
        run = ds[0] if ds else 0
        for a, b, c in sums:
            if a != run or a + b != c:
                return "arithmetic"
            run = c
        res = RESULT.search(body)
        if res is None or int(res.group(1)) != run:
            return "arithmetic"
    return "reduce"


def copy_probe(model, tok, n: int = 128, seed: int = 12345) -> dict[str, float]:
    """Greedy restatement accuracy of the worked parallel solutions of ``n`` test problems (see the module
    docstring), per layout: ``{layout}/first`` (step 1 of its block) and ``{layout}/later`` (steps 2..)."""
    import torch

    from npr_agent.policy import Sample, build_batch, hidden_states
    from npr_env.convert import parallel_ids
    from npr_env.graph import ExecutionGraph
    from npr_env.prompts import PromptConfig, prompt_ids
    from npr_env.tasks import GroupSumTasks

    problems = GroupSumTasks(seed=seed, split="test").sample(n)
    step_open = tok.convert_tokens_to_ids("<step>")
    out: dict[str, float] = {}
    for layout in ("parallel", "sequential"):
        hits: dict[str, list[bool]] = {"first": [], "later": []}
        for p in problems:
            prompt = prompt_ids(tok, p, PromptConfig())
            resp = parallel_ids(p.solutions["parallel"], tok) + [tok.eos_token_id]
            g = ExecutionGraph.from_token_ids(prompt + resp, tok, prompt_len=len(prompt), constraints="relaxed",
                                              layout=layout)
            batch = build_batch([Sample.from_graph(g)])
            with torch.no_grad():
                h = hidden_states(model, batch)[0]
                pred = model.get_output_embeddings()(h).argmax(-1)
            ids = batch.input_ids[0].tolist()
            guess = pred[batch.predictor[0]].tolist()  # the greedy choice for each token, from its predictor
            k = 0
            for t, tid in enumerate(ids):
                if tid != step_open or t < len(prompt):
                    continue
                # "<step>" "N" ":" " " then the restated group up to the next ":" (one char per token)
                start = t + 1
                while start < len(ids) and tok.decode([ids[start]]) != ":":
                    start += 1
                end = start + 1
                while end < len(ids) and tok.decode([ids[end]]) != ":":
                    end += 1
                span = range(start + 1, min(end + 1, len(ids)))
                hits["first" if k == 0 else "later"].append(all(guess[i] == ids[i] for i in span))
                k += 1
        for kind, v in hits.items():
            out[f"{layout}/{kind}"] = sum(v) / max(1, len(v))
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from engine import NPREngine, SamplingParams
    from npr_agent.checkpoint import load_pretrained, load_tokenizer
    from npr_agent.config import ModelConfig
    from npr_env import rewards as R
    from npr_env.prompts import PromptConfig, load_prompt_config, prompt_ids
    from npr_env.tasks import Problem

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory (its heldout.jsonl is the problem list)")
    ap.add_argument("--stage", default="stage2")
    ap.add_argument("--n", type=int, default=256, help="the first n held-out problems")
    ap.add_argument("--mode", default="parallel", choices=["parallel", "sequential"])
    ap.add_argument("--max-new-tokens", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the counts here")
    ap.add_argument("--copy-probe", action="store_true", help="the teacher-forced restatement probe instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model_dir = run / args.stage
    if args.copy_probe:
        tok = load_tokenizer(ModelConfig(path=str(model_dir)))
        res = {"run": str(run), "stage": args.stage, "n": args.n,
               **copy_probe(load_pretrained(model_dir).eval(), tok, args.n)}
        return _emit(res, args.json)
    rows = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()][: args.n]
    problems = [Problem(id=r["id"], question=r["question"], answer=r["answer"], source="groupsum") for r in rows]
    tok = load_tokenizer(ModelConfig(path=str(model_dir)))
    model = load_pretrained(model_dir).eval()
    cfg = load_prompt_config(model_dir) or PromptConfig()
    engine = NPREngine(model, tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, seed=0)
    with torch.no_grad():
        rollouts = engine.generate([prompt_ids(tok, p, cfg) for p in problems], params, mode=args.mode)
    counts: Counter[str] = Counter()
    correct = 0
    for p, r in zip(problems, rollouts):
        res = R.score("papo", r.graph, p.answer, truncated=r.truncated)
        if res.correct:
            correct += 1
            continue
        counts[classify(p.question, r.graph.response_text(), bool(res.valid))] += 1
    out = {"run": str(run), "stage": args.stage, "mode": args.mode, "n": len(problems),
           "accuracy": correct / max(1, len(problems)), **{k: counts[k] for k in KINDS}}
    return _emit(out, args.json)


def _emit(res: dict, json_path: str | None) -> int:
    """One line of ``key value`` pairs on stdout; the same as JSON at ``json_path``."""
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
