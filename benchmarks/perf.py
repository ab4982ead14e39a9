"""``python -m benchmarks.perf``: the engine benchmark and the training-step benchmark, side by side, one run.

    python -m benchmarks.perf --out runs/perf            # perf.json + perf.md
    python -m benchmarks.perf --quick                    # fewer repeats (a smoke test)

Two sections, measured one after the other in the same process, so the ratios compare like with like:

* **engine**: ``benchmarks.engine_speed`` (the engine's own benchmark: engine vs HF ``generate`` tokens/s,
  parallel vs sequential wall time on forced k-branch trajectories, KV peak over ideal). It is imported lazily;
  when it is not there the section says so and the rest runs.
* **train step**: one PAPO step of the tiny preset's model (``npr_agent.config.ModelConfig()``), timed part by part:
  ``engine.generate`` (G samples for each of P prompts, parallel mode) -> ``rewards.score`` -> ``algo.prepare``
  -> ``policy.build_batch`` -> ``policy.token_logprobs`` -> ``algo.loss`` -> ``backward`` -> optimizer step.
  An untrained model writes no valid NPR trajectory (PAPO would drop every rollout), so the rollouts are
  *forced* (``engine.TrajectoryForcer``) to the procedural tasks' worked parallel solutions: real forks and
  joins, real graphs, real logprobs. The same forced work is also decoded in sequential mode, which gives the
  parallel/sequential rollout ratio on identical tokens. All forced answers are correct, so every group's
  advantage is 0; the update is still computed in full (its cost does not depend on the advantage values).

Ratios reported (``perf.json["ratios"]``): parallel vs sequential rollout time and tokens/s on the same forced
work; the share of the step spent in rollout and in the update; and whatever ratios the engine benchmark gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# -- engine section -----------------------------------------------------------------------------------------
def engine_section(quick: bool, out_dir: Path) -> dict:
    """Run ``benchmarks.engine_speed.main`` (same thread count as the rest of this run) and keep its figures."""
    try:
        from benchmarks import engine_speed
    except ImportError as e:
        return {"skipped": f"benchmarks.engine_speed is not available ({e}); engine section not measured"}
    main = getattr(engine_speed, "main", None)
    if not callable(main):
        return {"skipped": "benchmarks.engine_speed has no main(); engine section not measured"}
    path = out_dir / "engine_speed.json"
    argv = ["--json", str(path), "--threads", str(torch.get_num_threads())] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        res = main(argv)
    except Exception as e:  # noqa: BLE001 - report it and keep the other section
        return {"error": f"{type(e).__name__}: {e}", "wall_s": time.perf_counter() - t0}
    if not isinstance(res, dict):
        res = json.loads(path.read_text()) if path.exists() else None
    return {"source": "benchmarks.engine_speed.main", "wall_s": time.perf_counter() - t0, "result": res}


def _engine_ratios(section: dict) -> dict:
    """The engine benchmark's headline figures (its ``metrics``: every one is a ratio)."""
    res = section.get("result")
    metrics = res.get("metrics") if isinstance(res, dict) else None
    if not isinstance(metrics, dict):
        return {}
    return {f"engine.{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- training-step section ----------------------------------------------------------------------------------
def _forcing_processor(tokenizer, prompts: list[list[int]], responses: list[list[int]]):
    """One logits processor for many prompts: the forcer of the prompt the context starts with."""
    from engine import TrajectoryForcer

    forcers = [(p, TrajectoryForcer(tokenizer, p, r)) for p, r in zip(prompts, responses)]

    def dispatch(ctx, logits):
        for p, f in forcers:
            if len(ctx) >= len(p) and ctx[:len(p)] == p:
                return f(ctx, logits)
        raise KeyError("context of no known prompt")

    return dispatch


def train_step_section(prompts_per_step: int = 8, group_size: int = 8, steps: int = 3, seed: int = 0) -> dict:
    """Seconds per PAPO step of the tiny model, part by part (see the module docstring)."""
    import npr_env
    from engine import NPREngine, SamplingParams
    from npr_agent import checkpoint as ckpt
    from npr_agent.algorithms import RolloutInfo, make_algorithm
    from npr_agent.config import ModelConfig
    from npr_agent.policy import build_batch, token_logprobs
    from npr_env import rewards as R
    from npr_env.tasks import ProceduralTasks

    torch.manual_seed(seed)
    tok = npr_env.load_tokenizer()
    mcfg = ModelConfig()
    device = torch.device("cpu")
    model = ckpt.build_model(mcfg, tok, device, seed=seed)
    algo = make_algorithm("papo")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = NPREngine(model, tok, num_blocks=4096, max_depth=2)
    tasks = ProceduralTasks.level(2, seed=seed)

    def prompt(p):
        return npr_env.prompt_ids(tok, p)

    rows: list[dict] = []
    for step in range(steps + 1):  # step 0 warms up and is not counted
        problems = tasks.sample(prompts_per_step)
        prompts = [prompt(p) for p in problems]
        responses = [tok.encode(p.solutions["parallel"], add_special_tokens=False) + [tok.eos_token_id]
                     for p in problems]
        proc = _forcing_processor(tok, prompts, responses)
        params = SamplingParams(max_new_tokens=512, n=group_size, seed=seed + step, logits_processors=[proc],
                                step_repetition_penalty=1.0)
        model.eval()
        t0 = time.perf_counter()
        rollouts = engine.generate(prompts, params, mode="parallel")
        t_roll = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq = engine.generate(prompts, params, mode="sequential")
        t_seq = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = [R.score("papo", r.graph, problems[r.prompt_index].answer, truncated=r.truncated)
                   for r in rollouts]
        infos = [RolloutInfo(reward=res.reward, group_id=r.prompt_index, length=len(r.token_ids),
                             truncated=r.truncated, dropped=res.dropped) for res, r in zip(results, rollouts)]
        prep = algo.prepare(infos)
        t_reward = time.perf_counter() - t0

        t0 = time.perf_counter()
        kept = [r for r, k in zip(rollouts, prep.keep) if k]
        adv = torch.as_tensor(prep.advantages[prep.keep], dtype=torch.float32)
        model.train()
        batch = build_batch(kept, device=device, train_forced=algo.config.train_forced)
        lp = token_logprobs(model, batch, temperature=algo.config.temperature)
        loss, _ = algo.loss(lp, batch.old_logprobs, adv[batch.index], batch.loss_mask,
                            num_tokens=batch.num_loss_tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        t_update = time.perf_counter() - t0

        ntok = sum(len(r.token_ids) for r in rollouts)
        if step == 0:
            continue
        rows.append({
            "rollout_parallel_s": t_roll, "rollout_sequential_s": t_seq, "reward_s": t_reward,
            "update_s": t_update, "step_s": t_roll + t_reward + t_update, "tokens": ntok,
            "kept": len(kept), "samples": len(rollouts), "loss_tokens": int(batch.num_loss_tokens),
            "valid_rate": sum(r.valid for r in results) / len(results),
            "parallel_rate": sum(r.graph.stats.is_parallel for r in rollouts) / len(rollouts),
            "same_tokens": all(a.token_ids == b.token_ids for a, b in zip(rollouts, seq)),
        })
    med = {k: _median([r[k] for r in rows]) for k in ("rollout_parallel_s", "rollout_sequential_s", "reward_s",
                                                       "update_s", "step_s")}
    tokens = _median([r["tokens"] for r in rows])
    return {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "hidden_size": mcfg.hidden_size,
                  "layers": mcfg.num_layers, "dtype": mcfg.dtype},
        "prompts_per_step": prompts_per_step, "group_size": group_size, "steps_measured": len(rows),
        "median": med, "tokens_per_step": tokens,
        "rollout_parallel_tokens_per_s": tokens / med["rollout_parallel_s"],
        "rollout_sequential_tokens_per_s": tokens / med["rollout_sequential_s"],
        "update_tokens_per_s": _median([r["loss_tokens"] for r in rows]) / med["update_s"],
        "steps": rows,
    }


# -- report -------------------------------------------------------------------------------------------------
def ratios(engine: dict, train: dict) -> dict:
    m = train["median"]
    out = {
        "train.rollout_parallel_vs_sequential_time_x": m["rollout_sequential_s"] / m["rollout_parallel_s"],
        "train.rollout_share_of_step": m["rollout_parallel_s"] / m["step_s"],
        "train.update_share_of_step": m["update_s"] / m["step_s"],
        "train.reward_share_of_step": m["reward_s"] / m["step_s"],
    }
    out.update(_engine_ratios(engine))
    return out


def markdown(report: dict) -> str:
    t = report["train_step"]
    m = t["median"]
    lines = ["# NPR perf report", "", f"- hardware: {report['hardware']}", f"- date: {report['date']}", "",
             "## Ratios (measured side by side in this run)", "", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    lines += ["", f"## Training step (PAPO, tiny model: {t['model']['parameters']:,} parameters, "
              f"{t['prompts_per_step']} prompts x {t['group_size']} samples, median of {t['steps_measured']})", "",
              "| part | seconds |", "|---|---:|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.3f} |" for k, v in m.items()]
    lines += ["", f"- tokens per step (all branches): {t['tokens_per_step']:.0f}; rollout tokens/s: parallel "
              f"{t['rollout_parallel_tokens_per_s']:.0f}, sequential {t['rollout_sequential_tokens_per_s']:.0f}; "
              f"update: {t['update_tokens_per_s']:.0f} loss tokens/s",
              "- rollouts are forced to the tasks' worked parallel solutions (an untrained model writes no valid "
              "trajectory); advantages are 0, the update is computed in full.", "", "## Engine", ""]
    e = report["engine"]
    res = e.get("result")
    if isinstance(res, dict) and isinstance(res.get("metrics"), dict):
        setup = res.get("setup", {})
        met = res.get("targets_met", {})
        lines += [f"From `{e['source']}` ({e['wall_s']:.1f} s): {setup.get('model', '')}; "
                  f"{setup.get('threads', '?')} threads", "", "| metric | value | target met |", "|---|---:|---|"]
        lines += [f"| {k} | {v:.3f} | {'' if k not in met else ('yes' if met[k] else 'NO')} |"
                  for k, v in res["metrics"].items()]
    elif "result" in e:
        lines += [f"From `{e['source']}`:", "", "```json", json.dumps(e["result"], indent=2, default=str), "```"]
    else:
        lines += [f"_{e.get('skipped') or e.get('error')}_"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/perf", help="folder for perf.json and perf.md")
    ap.add_argument("--quick", action="store_true", help="one measured step, small engine benchmark")
    ap.add_argument("--steps", type=int, default=3, help="measured training steps (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args(argv)
    from datetime import datetime, timezone

    from npr_agent.evaluate import hardware

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eng = {"skipped": "--skip-engine"} if args.skip_engine else engine_section(args.quick, out)
    steps = 1 if args.quick else args.steps
    train = train_step_section(args.prompts, args.group_size, steps)
    report = {"hardware": hardware(torch.device("cpu"))[0],
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "ratios": ratios(eng, train), "engine": eng, "train_step": train}
    (out / "perf.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "perf.md").write_text(markdown(report))
    for k, v in report["ratios"].items():
        print(f"{k:50s} {v:8.3f}")
    print(f"wrote {out / 'perf.json'} and {out / 'perf.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
