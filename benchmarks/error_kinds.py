"""Where a tiny-preset checkpoint's wrong answers come from: each wrong held-out rollout classified by its first
faulty step (the diagnosis table of docs/results.md).

    python -m benchmarks.error_kinds --run runs/<run> --stage stage2 [--n 256] [--mode parallel]
    python -m benchmarks.error_kinds --run runs/<run> --stage stage2,stage3 --n 2048   # what stage 3 fixed
    python -m benchmarks.error_kinds --copy-probe --run runs/<run> --stage stage0     # the seed's copying

With several stages, each decodes the same problems and the last line compares the first stage with the last:
the errors it removed (wrong before, right after) and introduced, and the share of the first one's errors that
are gone. ``--n`` past the run's ``heldout.jsonl`` continues the run's own held-out stream (the same test split
and seed, so the first rows are the recorded ones): at 1-4 errors in 512 a 25% removal is one problem, and a
larger ``--n`` makes it a measurement.

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


def copy_probe(model, tok, problems: list) -> dict[str, float]:
    """Greedy restatement accuracy of the worked parallel solutions of ``problems`` (see the module docstring),
    per layout: ``{layout}/first`` (step 1 of its block) and ``{layout}/later`` (steps 2..)."""
    import torch

    from npr_agent.policy import Sample, build_batch, hidden_states
    from npr_env.convert import parallel_ids
    from npr_env.graph import ExecutionGraph
    from npr_env.prompts import PromptConfig, prompt_ids

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


def heldout(run: Path, n: int) -> list:
    """The first ``n`` problems of ``run``'s held-out stream: its ``heldout.jsonl``, continued past its end by the
    same test split of the run's task (procedural runs only)."""
    from npr_agent.config import load_file
    from npr_agent.trainer import heldout_stream
    from npr_env.tasks import Problem

    rows = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    if n <= len(rows):
        return [Problem(id=r["id"], question=r["question"], answer=r["answer"], source="groupsum") for r in rows[:n]]
    cfg = load_file(run / "config.json")
    if cfg.tasks.benchmark:
        raise SystemExit(f"{run}: --n {n} is past its {len(rows)} held-out problems, and a benchmark run's "
                         f"held-out set cannot be extended")
    more = heldout_stream(cfg).sample(n)
    if [p.question for p in more[: len(rows)]] != [r["question"] for r in rows]:
        raise SystemExit(f"{run}/heldout.jsonl: not the first problems of the run's test stream; cannot extend it")
    return more


def decode_errors(run: Path, stage: str, problems: list, mode: str, max_new_tokens: int) -> dict:
    """Greedy decode of ``problems`` by ``run/stage``: accuracy, the error kinds, and the wrong problems' indices."""
    import torch

    from engine import NPREngine, SamplingParams
    from npr_agent.checkpoint import load_pretrained, load_tokenizer
    from npr_agent.config import ModelConfig
    from npr_env import rewards as R
    from npr_env.prompts import PromptConfig, load_prompt_config, prompt_ids

    model_dir = run / stage
    tok = load_tokenizer(ModelConfig(path=str(model_dir)))
    model = load_pretrained(model_dir).eval()
    cfg = load_prompt_config(model_dir) or PromptConfig()
    engine = NPREngine(model, tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    with torch.no_grad():
        rollouts = engine.generate([prompt_ids(tok, p, cfg) for p in problems], params, mode=mode)
    counts: Counter[str] = Counter()
    wrong = []
    for i, (p, r) in enumerate(zip(problems, rollouts)):
        res = R.score("papo", r.graph, p.answer, truncated=r.truncated)
        if not res.correct:
            wrong.append(i)
            counts[classify(p.question, r.graph.response_text(), bool(res.valid))] += 1
    return {"run": str(run), "stage": stage, "mode": mode, "n": len(problems),
            "accuracy": 1 - len(wrong) / max(1, len(problems)), **{k: counts[k] for k in KINDS}, "wrong": wrong}


def compare(before: dict, after: dict) -> dict:
    """What ``after`` did to ``before``'s errors on the same problems."""
    b, a = set(before["wrong"]), set(after["wrong"])
    return {"from": before["stage"], "to": after["stage"], "n": before["n"], "errors_before": len(b),
            "errors_after": len(a), "removed": len(b - a), "introduced": len(a - b),
            "net_removed_share": (len(b) - len(a)) / len(b) if b else 0.0}


def main(argv: list[str] | None = None) -> int:
    import torch

    from engine.host import retain_freed_memory
    from npr_agent.checkpoint import load_pretrained, load_tokenizer
    from npr_agent.config import ModelConfig, load_file
    from npr_agent.trainer import task_stream

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory (its heldout.jsonl is the problem list)")
    ap.add_argument("--stage", default="stage2", help="a stage, or several (comma-separated) to compare")
    ap.add_argument("--n", type=int, default=256, help="the first n held-out problems (past heldout.jsonl: the "
                                                       "run's held-out stream continued)")
    ap.add_argument("--mode", default="parallel", choices=["parallel", "sequential"])
    ap.add_argument("--max-new-tokens", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the counts here")
    ap.add_argument("--copy-probe", action="store_true", help="the teacher-forced restatement probe instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    run = Path(args.run)
    stages = [s for s in args.stage.split(",") if s]
    missing = [s for s in stages if not (run / s / "config.json").exists()]
    if missing:
        raise SystemExit(f"{run}: no checkpoint for {', '.join(missing)} (looked for {run / missing[0]}/config.json)")
    if args.copy_probe:
        model_dir = run / stages[0]
        tok = load_tokenizer(ModelConfig(path=str(model_dir)))
        # fresh test problems of the run's own task (its digits and group sizes), under a seed no run holds out
        problems = task_stream(load_file(run / "config.json"), "test", 12345).sample(args.n)
        res = {"run": str(run), "stage": stages[0], "n": args.n,
               **copy_probe(load_pretrained(model_dir).eval(), tok, problems)}
        return _emit(res, args.json)
    problems = heldout(run, args.n)
    results = [decode_errors(run, s, problems, args.mode, args.max_new_tokens) for s in stages]
    for r in results:
        _emit({k: v for k, v in r.items() if k != "wrong"}, None)
    out: dict = {"stages": results}
    if len(results) > 1:
        out["compare"] = compare(results[0], results[-1])
        _emit(out["compare"], None)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else out, indent=2))
    return 0


def _emit(res: dict, json_path: str | None) -> int:
    """One line of ``key value`` pairs on stdout; the same as JSON at ``json_path``."""
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
