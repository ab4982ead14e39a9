"""Where one RL step's time goes, in both engine modes, on the same prompts, in one process.

Runs ``NPRTrainer.rl_step`` (the step ``benchmarks.trainer_speed`` times) with timers around its phases:

* ``rollout``: ``engine.generate`` (decode, prefill, forced tokens, forks/joins; see ``--hotspots`` for inside);
* ``reward``: ``npr_env.rewards.score_many`` / ``score`` (verifier and graph verdicts);
* ``batch``: ``npr_agent.policy.build_batch`` (layout collation, masks' compact form) and ``training_sample``;
* ``forward``: ``token_logprobs`` (mask build, backbone under the layout, output head); with grad when the step
  updates, else the no-grad ``policy/logprob_mismatch`` forward;
* ``backward``, ``optimizer`` (clip + step + zero_grad);
* ``other``: the rest of ``rl_step`` (advantages, metrics, engine memory release).

The two modes alternate step by step (after one warm-up step each), so a change in background load hits both
alike. Also printed per mode: generated and trained tokens per step, decode steps, and whether the step updated,
since the two modes do not do the same work on the same prompts. A mode suffixed ``:every-row`` is the same arm
with the update forwarding every kept row, the rows whose advantage is 0 included (the trainer skips them by
default; the step is the same)::

    python -m benchmarks.trainer_profile --model runs/tiny/stage2 --steps 3 --threads 1 --hotspots
    python -m benchmarks.trainer_profile --model runs/tiny/stage3 --modes parallel,parallel:every-row
    python -m benchmarks.trainer_profile --model runs/tiny/stage3 --sequential-model runs/tiny/stage1
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.trainer_speed import decode_steps, make_arm

PHASES = ("rollout", "reward", "batch", "forward", "backward", "optimizer", "other")


class Clock:
    """Wall seconds per phase; nested phases are subtracted from their parent (each second counted once)."""

    def __init__(self):
        self.total = defaultdict(float)
        self._stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        frame = [name, 0.0]
        self._stack.append(frame)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._stack.pop()
            self.total[name] += dt - frame[1]
            if self._stack:
                self._stack[-1][1] += dt


CURRENT: list[Clock] = []  # the clock of the arm whose step is running (module functions are shared by the arms)


def _wrap(obj, attr: str, name: str) -> None:
    fn = getattr(obj, attr)

    def timed(*a, **kw):
        if not CURRENT:
            return fn(*a, **kw)
        with CURRENT[-1].phase(name):
            return fn(*a, **kw)

    setattr(obj, attr, timed)


def instrument_modules() -> None:
    """Timers around the module functions ``rl_step`` reaches (looked up at call time); once per process."""
    import torch

    import npr_agent.updates as U
    import npr_env.rewards as R

    _wrap(R, "score", "reward")
    _wrap(R, "score_many", "reward")
    _wrap(U, "build_batch", "batch")
    _wrap(U, "training_sample", "batch")
    _wrap(U, "token_logprobs", "forward")
    _wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")


def instrument_arm(trainer, engine, opt) -> None:
    """Timers around one arm's own objects."""
    _wrap(engine, "generate", "rollout")
    _wrap(trainer.dist, "backward", "backward")
    _wrap(opt, "step", "optimizer")
    _wrap(opt, "zero_grad", "optimizer")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF checkpoint dir (default: a tiny random Qwen3)")
    ap.add_argument("--sequential-model", help="the sequential arms' checkpoint (default: --model); one that writes "
                    "the format as causal text (benchmarks.trainer_speed says why)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="sequential,parallel")
    ap.add_argument("--hotspots", type=int, default=0, metavar="N", help="print each mode's top N functions")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    import torch

    from npr_agent.checkpoint import save_tiny_model

    torch.set_num_threads(a.threads)
    model_dir = a.model or save_tiny_model(hidden_size=128, num_layers=3)
    from npr_env.verify import warmup

    warmup()  # the verifier's workers start before any timing (a cold start is ~1 s per worker)
    modes = a.modes.split(",")
    arms = {}
    for m in modes:  # "parallel:every-row": the update also forwards the rows whose advantage is 0
        mode, _, variant = m.partition(":")
        if mode not in ("parallel", "sequential") or variant not in ("", "every-row"):
            raise SystemExit(f"--modes: {m!r} is not one of parallel, sequential, each optionally ':every-row'")
        arm_model = (a.sequential_model or model_dir) if mode == "sequential" else model_dir
        arms[m] = make_arm(arm_model, mode, a.prompts, a.group, a.max_new_tokens, a.threads)
        arms[m][0].skip_inert_rows = variant != "every-row"
    clocks = {m: Clock() for m in modes}
    profs = {m: cProfile.Profile() for m in modes}
    work = {m: defaultdict(float) for m in modes}
    for t, model, eng, algo, opt, rl in arms.values():
        t.rl_step("stage3", 0, model, eng, algo, opt, rl)  # warm-up, untimed
        instrument_arm(t, eng, opt)
    instrument_modules()
    for step in range(1, a.steps + 1):
        for m in modes:  # alternate the modes step by step
            t, model, eng, algo, opt, rl = arms[m]
            if a.hotspots:
                profs[m].enable()
            CURRENT.append(clocks[m])
            t0 = time.perf_counter()
            met = t.rl_step("stage3", step, model, eng, algo, opt, rl)
            work[m]["step"] += time.perf_counter() - t0
            CURRENT.pop()
            if a.hotspots:
                profs[m].disable()
            n = rl.prompts_per_step * rl.group_size
            work[m]["generated_tokens"] += met["length/total_tokens"] * n
            work[m]["decode_steps"] += decode_steps(met, rl.mode)
            work[m]["updated"] += met.get("batch/updated", 0.0)
            work[m]["mismatch"] = max(work[m]["mismatch"], met["policy/logprob_mismatch"])
    res = {"model": model_dir, "sequential_model": a.sequential_model or model_dir, "steps": a.steps,
           "prompts": a.prompts, "group": a.group, "max_new_tokens": a.max_new_tokens, "threads": a.threads, "modes": {}}
    for m in modes:
        step_s = work[m]["step"] / a.steps
        ph = {p: clocks[m].total[p] / a.steps for p in PHASES if p != "other"}
        ph["other"] = max(0.0, step_s - sum(ph.values()))
        res["modes"][m] = {"step_s": step_s, "phases_s": ph,
                           "generated_tokens_per_step": work[m]["generated_tokens"] / a.steps,
                           "decode_steps_per_rollout": work[m]["decode_steps"] / a.steps,
                           "updated_rate": work[m]["updated"] / a.steps,
                           "logprob_mismatch_max": work[m]["mismatch"]}
    print(f"{'phase':12s}" + "".join(f"{m:>22s}" for m in modes))
    for p in PHASES:
        print(f"{p:12s}" + "".join(f"{res['modes'][m]['phases_s'][p]:10.3f} s {100 * res['modes'][m]['phases_s'][p] / res['modes'][m]['step_s']:6.1f} %"
                                   for m in modes))
    print(f"{'step':12s}" + "".join(f"{res['modes'][m]['step_s']:10.3f} s {100.0:6.1f} %" for m in modes))
    for key in ("generated_tokens_per_step", "decode_steps_per_rollout", "updated_rate", "logprob_mismatch_max"):
        print(f"{key:26s}" + "".join(f"{res['modes'][m][key]:>14.4g}" for m in modes))
    if len(modes) == 2:
        print(f"{modes[1]}/{modes[0]} per step: {res['modes'][modes[1]]['step_s'] / res['modes'][modes[0]]['step_s']:.2f}")
    if a.hotspots:
        for m in modes:
            s = io.StringIO()
            pstats.Stats(profs[m], stream=s).sort_stats("tottime").print_stats(a.hotspots)
            print(f"===== {m}: top {a.hotspots} by own time")
            print("\n".join(line[:160] for line in s.getvalue().splitlines()[4:]))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
