"""``npr ablate``: the paper's comparisons (its Tables 1 and 3) in miniature, over several seeds.

    npr train --config configs/tiny-three-digit.toml --set seed=0 --stage stage0,stage1,stage2 --out runs/src
    npr ablate --from runs/src --out runs/ablate --seeds 0,1,2               # every arm x seed
    tensorboard --logdir runs/ablate                                         # a run per arm and seed

Every arm starts from the same source run: its seed model (stage 0, or the pretrained model), its stage-1
model and the trajectories rejection sampling kept from it (``stage2_data.jsonl``). Nothing is sampled again
for stage 2, so the SFT arms differ only in how they train the same data.

Arms (:data:`ARMS`), each run once per seed; a seed changes the SFT data order, the RL problems and the
sampling, and the held-out set (the task's test split drawn with that seed, shared by all arms of the seed):

===============  ====================================================================================
``npr-beta``     stage 2: SFT from the seed model on the kept trajectories, parallel layout
``sr-beta``      stage 2: the same trajectories as causal text (sequential layout), evaluated sequentially
``papo``         stage 3 from ``npr-beta``: PAPO on native parallel rollouts, reward ``papo``
``grpo``         the same rollouts and reward, GRPO (group std, PPO's clipped ratio)
``dapo``         the same, DAPO (clip-higher, dynamic sampling, token-level loss)
``reinforce``    the same, REINFORCE with the group-mean baseline (no std normalisation)
``sr``           from ``sr-beta``: PAPO's update on sequential rollouts (causal layout), accuracy reward: the
                 sequential pipeline, the paper's sequential-RL baseline
``no-rl``        from ``npr-beta``: stage-2 SFT continued on the kept trajectories for the same compute
===============  ====================================================================================

Equal compute is **sampled tokens**: every RL arm stops at the first step where its rollouts have sampled
``sampled_tokens`` tokens in all (every branch counts), and ``no-rl`` trains on as many response tokens. The
table's "training s" is each arm's wall time to its evaluated checkpoint (its held-out evals included, the
decode-speed passes not), so a user can weigh the arms at equal wall time too.

Each arm and seed reports held-out accuracy, valid and parallel rate and mean ideal speedup (greedy, in the
arm's decoding mode), and decode tokens/s of its final model in parallel and in sequential mode on the same
problems (all branches' tokens / wall time, the paper's Table 3 measure; a model trained under the parallel
layout writes other, shorter text in sequential mode, so compare wall times with that in mind). ``report`` writes ``ablation.md``
(mean +- std over seeds, then the paper's comparisons as paired per-seed differences: :data:`CONTRASTS`),
``ablation.json`` and ``ablation.png`` (held-out accuracy over sampled tokens, a
band of +-1 std over seeds). Finished arms are kept: running the command again resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, TrainConfig, apply_overrides, load_file, validate
from .files import atomic_write_text
from .logger import library_progress, read_metrics


@dataclass(frozen=True)
class Arm:
    name: str
    stage: str  # the stage it trains: "stage2" (SFT from the seed) or "stage3" (from npr-beta)
    overrides: tuple[str, ...] = ()  # --set items on top of the source config
    mode: str = "parallel"  # the decoding mode it is evaluated in
    what: str = ""
    start: str = "npr-beta"  # the SFT arm a stage-3 arm starts from


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("npr-beta", "stage2", ("stage2.layout=parallel",), what="parallel SFT (NPR-Beta)"),
    Arm("sr-beta", "stage2", ("stage2.layout=sequential",), mode="sequential",
        what="sequential SFT on the same trajectories (SR-Beta)"),
    Arm("papo", "stage3", ("stage3.algorithm=papo",), what="PAPO, parallel rollouts"),
    Arm("grpo", "stage3", ("stage3.algorithm=grpo",), what="GRPO, parallel rollouts"),
    Arm("dapo", "stage3", ("stage3.algorithm=dapo",), what="DAPO, parallel rollouts"),
    Arm("reinforce", "stage3", ("stage3.algorithm=reinforce",), what="REINFORCE, parallel rollouts"),
    # From sr-beta, not npr-beta: a model trained under the parallel layout never learns what follows a
    # </step> (the engine's join forces it), so it cannot write a sequential rollout (from npr-beta: 0.012).
    Arm("sr", "stage3", ("stage3.algorithm=papo", "stage3.mode=sequential", "stage3.reward=accuracy"),
        mode="sequential", what="sequential RL from SR-Beta (sequential rollouts, accuracy reward)", start="sr-beta"),
    Arm("no-rl", "stage3", (), what="SFT continued for the same compute"),
)}


@dataclass
class AblationConfig:
    source: str  # a run directory with stage0 (or a pretrained model.path), stage1 and stage2_data.jsonl
    out: str
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    sampled_tokens: int = 400_000  # the RL arms' sampling budget (and no-rl's SFT tokens)
    max_steps: int = 400  # a cap on the RL steps, whatever the budget
    eval_every: int = 10  # RL steps between held-out evals (the curves)
    eval_size: int = 256  # held-out problems per arm and seed
    speed_problems: int = 64  # problems decoded in each mode for tokens/s
    threads: int | None = None  # torch threads (None: the source config's)
    overrides: tuple[str, ...] = ()  # --set items applied to every arm
    show_progress: bool = True


def check_source(cfg: AblationConfig) -> None:
    """A clear error unless ``cfg.source`` holds what every arm starts from."""
    src = Path(cfg.source)
    for need in ("config.json", "stage1/DONE", "stage2_data.jsonl"):
        if not (src / need).exists():
            raise ConfigError(f"{src}: not a source run for npr ablate (no {need}); run "
                              f"npr train --stage stage0,stage1,stage2 --out {src} first")
    if load_file(src / "config.json").model.path is None and not (src / "stage0" / "DONE").exists():
        raise ConfigError(f"{src}: no finished stage0 (the seed model every SFT arm starts from)")


CEILING = 0.9  # a source whose stage 2 is this good leaves the RL arms little to separate them by


def ceiling_note(source: str | Path) -> str | None:
    """A warning when the source run's stage 2 already sits near the ceiling (None otherwise, or unknown)."""
    try:
        acc = json.loads((Path(source) / "summary.json").read_text())["stage2"]["eval"]["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(acc, (int, float)) or acc < CEILING:
        return None
    return (f"{source}: stage 2 ended at {acc:.3f}, so every arm starts near the ceiling and the arms will "
            f"hardly differ; a source whose stage 2 is in 0.6-0.8 leaves room (docs/results.md, npr ablate)")


def arm_config(cfg: AblationConfig, arm: Arm, seed: int) -> TrainConfig:
    tc = load_file(Path(cfg.source) / "config.json")
    tc.seed = seed
    tc.tasks.eval_size = cfg.eval_size
    if cfg.threads is not None:
        tc.threads = cfg.threads
    s3 = tc.stage3
    s3.steps, s3.sampled_tokens, s3.eval_every = cfg.max_steps, cfg.sampled_tokens, cfg.eval_every
    s3.lr_schedule = "constant"
    s3.select_every = 0  # every arm ends on its last weights: its checks would be compute outside the budget
    return validate(apply_overrides(tc, list(arm.overrides) + list(cfg.overrides)))


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        return
    os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)


def arm_dir(cfg: AblationConfig, arm: str, seed: int) -> Path:
    return Path(cfg.out) / arm / f"seed{seed}"


def run_arm(cfg: AblationConfig, arm: Arm, seed: int) -> dict:
    """Train and measure one arm for one seed in ``<out>/<arm>/seed<seed>``; returns (and saves) its result."""
    from .trainer import NPRTrainer

    d = arm_dir(cfg, arm.name, seed)
    done = d / "arm.json"
    if done.exists():
        return json.loads(done.read_text())
    d.mkdir(parents=True, exist_ok=True)
    src = Path(cfg.source)
    for name in ("stage0", "stage1", "stage2_data.jsonl"):
        if (src / name).exists():
            _link(src / name, d / name)
    tc = arm_config(cfg, arm, seed)
    if arm.stage == "stage3":  # from this seed's SFT arm: its checkpoint and its eval (the RL start point)
        beta = arm_dir(cfg, arm.start, seed)
        if not (beta / "arm.json").exists():
            run_arm(cfg, ARMS[arm.start], seed)
        _link(beta / "stage2", d / "stage2")
        if not (d / "summary.json").exists():
            start = json.loads((beta / "summary.json").read_text())["stage2"]
            atomic_write_text(d / "summary.json", json.dumps({"stage2": start}, indent=2))
    t0 = time.time()
    trainer = NPRTrainer(tc, d, resume=True, show_progress=cfg.show_progress)
    if arm.name == "no-rl":
        model = continued_sft(trainer, cfg.sampled_tokens)
    else:
        trainer.run((arm.stage,))
        model = trainer.load_stage(arm.stage)
    train_s = time.time() - t0
    entry = json.loads((d / "summary.json").read_text())[arm.stage]
    ev = entry["eval"]
    speed = decode_speed(trainer, model, cfg.speed_problems)
    rows = [r for r in read_metrics(d / "metrics.jsonl") if r.get("stage") == arm.stage]
    sampled = max((r.get("perf/sampled_tokens_total", 0.0) for r in rows), default=0.0)
    out = {"arm": arm.name, "seed": seed, "stage": arm.stage, "mode": ev.get("mode", arm.mode), "train_s": train_s,
           "sampled_tokens": sampled if arm.stage == "stage3" and arm.name != "no-rl" else 0.0,
           "sft_tokens": float(entry.get("sft_tokens", 0)),
           "rl_steps": sum(1 for r in rows if "perf/sampled_tokens" in r),
           "accuracy": ev["accuracy"], "valid_rate": ev["valid_rate"], "parallel_rate": ev["parallel_rate"],
           "speedup_ideal": ev["speedup_ideal"], "eval_n": ev["n"], **speed}
    atomic_write_text(done, json.dumps(out, indent=2))
    return out


def continued_sft(trainer, tokens: int):
    """``no-rl``: stage-2 SFT continued from NPR-Beta on the kept trajectories, at stage 2's final learning rate
    (constant), until it has trained on ``tokens`` response tokens; saved and evaluated as its stage 3."""
    from .trainer import resampled, sft_config

    cfg = trainer.cfg.stage2
    samples = trainer.stage2_samples("parallel")
    per_sample = float(np.mean([len(s.token_ids) for s in samples]))
    steps = max(1, math.ceil(tokens / (per_sample * cfg.batch_size)))
    sft_cfg = sft_config(cfg, steps=steps, lr=cfg.lr * cfg.min_lr_ratio, warmup_ratio=0.0, min_lr_ratio=1.0)
    model = trainer.load_stage("stage2")
    draw = resampled(samples, cfg.batch_size, seed=trainer.cfg.seed * 15485863)
    trained = [0]

    def data(step: int):
        batch = draw(step)
        trained[0] += sum(len(s.token_ids) for s in batch)
        return batch

    trainer.sft("stage3", model, data, sft_cfg)
    trainer._finish_stage("stage3", model, trainer.evaluate(model, "stage3", mode="parallel"),
                          {"sft_steps": steps, "sft_tokens": trained[0]})
    trainer.logger.close()
    return model


def decode_speed(trainer, model, n: int) -> dict[str, float]:
    """Greedy decode tokens/s of ``model`` on the first ``n`` held-out problems, in parallel then sequential mode
    (all branches' tokens / wall time), after one warm-up request in each mode."""
    import torch

    problems = trainer.eval_problems[:n]
    prompts = [trainer.prompt_ids(p) for p in problems]
    e = trainer.cfg.eval
    params = trainer.sampling(0.0, 1.0, 0, e.max_new_tokens, seed=0)
    engine = trainer.engine(model)
    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for mode in ("parallel", "sequential"):
            engine.generate(prompts[:1], params, mode=mode)
            t0 = time.perf_counter()
            rollouts = engine.generate(prompts, params, mode=mode)
            wall = time.perf_counter() - t0
            tokens = sum(len(r.token_ids) for r in rollouts)
            out[f"tokens_per_s_{mode}"] = tokens / max(wall, 1e-9)
            out[f"decode_s_{mode}"] = wall
    out["tokens_per_s_ratio"] = out["tokens_per_s_parallel"] / max(out["tokens_per_s_sequential"], 1e-9)
    return out


def run(cfg: AblationConfig) -> dict:
    """Every arm for every seed (finished ones are read back), then the report."""
    check_source(cfg)
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {', '.join(unknown)}; arms are {', '.join(ARMS)}")
    if not cfg.seeds:
        raise ConfigError("--seeds: give at least one seed")
    note = ceiling_note(cfg.source)
    if note:
        print(f"[ablate] warning: {note}", file=sys.stderr)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    order = sorted(cfg.arms, key=lambda a: ARMS[a].stage)  # SFT arms first: the RL arms start from npr-beta
    results = []
    with library_progress(cfg.show_progress):  # --quiet: the arms' checkpoint loads print no bars either
        for seed in cfg.seeds:
            for name in order:
                print(f"[ablate] {name}, seed {seed}")
                results.append(run_arm(cfg, ARMS[name], seed))
    return report(cfg, results, wall_s=time.time() - t0)


FIGURES = ("accuracy", "valid_rate", "parallel_rate", "speedup_ideal", "tokens_per_s_parallel",
           "tokens_per_s_sequential", "tokens_per_s_ratio")


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per arm: mean and std (over seeds, ddof 0; 0 for one seed) of each figure, and the seeds."""
    out: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        rs = [r for r in results if r["arm"] == arm]
        row = {"seeds": [r["seed"] for r in rs], "mode": rs[0]["mode"]}
        for f in FIGURES + ("sampled_tokens", "sft_tokens", "rl_steps", "train_s"):
            v = np.array([r[f] for r in rs], dtype=float)
            row[f] = {"mean": float(v.mean()), "std": float(v.std())}
        out[arm] = row
    return out


# The comparisons of the paper's Table 1, as (arm, baseline, what the difference measures).
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("papo", "npr-beta", "what stage 3 adds"),
    ("no-rl", "npr-beta", "more SFT"),
    ("papo", "no-rl", "RL over SFT at equal tokens"),
    ("papo", "grpo", "PAPO vs GRPO on the same rollouts"),
    ("papo", "dapo", "PAPO vs DAPO on the same rollouts"),
    ("papo", "reinforce", "PAPO vs REINFORCE on the same rollouts"),
    ("sr-beta", "npr-beta", "the same trajectories, causal vs parallel layout"),
    ("sr", "sr-beta", "what sequential RL adds"),
    ("papo", "sr", "the parallel pipeline vs the sequential one"),
)


def differences(results: list[dict]) -> list[dict]:
    """Each contrast of :data:`CONTRASTS` whose two arms ran on a common seed: the held-out accuracy difference in
    points on each such seed (paired: the arms of a seed share its held-out set), and its mean and std over
    seeds (ddof 0). The seed-to-seed spread of a difference is what to hold it against, not the arms' own."""
    acc = {(r["arm"], r["seed"]): r["accuracy"] for r in results}
    out = []
    for arm, base, what in CONTRASTS:
        seeds = sorted(s for (a, s) in acc if a == arm and (base, s) in acc)
        if not seeds:
            continue
        d = np.array([100.0 * (acc[arm, s] - acc[base, s]) for s in seeds])
        out.append({"arm": arm, "baseline": base, "what": what, "seeds": seeds, "points": d.round(1).tolist(),
                    "mean": float(d.mean()), "std": float(d.std())})
    return out


def markdown(summary: dict[str, dict], cfg: AblationConfig, wall_s: float | None,
             diffs: Sequence[dict] = ()) -> str:
    def ms(row, f, fmt="{:.3f}"):
        return f"{fmt.format(row[f]['mean'])} ± {fmt.format(row[f]['std'])}"

    lines = [f"Ablation from `{cfg.source}`: seeds {', '.join(map(str, cfg.seeds))}; equal compute = "
             f"{cfg.sampled_tokens:,} sampled tokens per RL arm (no-rl: as many SFT tokens); held-out "
             f"{cfg.eval_size} problems, greedy" + (f"; wall {wall_s / 60:.1f} min" if wall_s is not None else ""),
             "",
             "| arm | what | eval mode | held-out accuracy | valid | parallel | ideal speedup | tokens/s parallel "
             "| tokens/s sequential | parallel ÷ sequential | RL steps | training s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in summary.items():
        lines.append(f"| {arm} | {ARMS[arm].what} | {row['mode']} | {ms(row, 'accuracy')} | {ms(row, 'valid_rate')} "
                     f"| {ms(row, 'parallel_rate')} | {ms(row, 'speedup_ideal', '{:.2f}')} "
                     f"| {ms(row, 'tokens_per_s_parallel', '{:.0f}')} | {ms(row, 'tokens_per_s_sequential', '{:.0f}')} "
                     f"| {ms(row, 'tokens_per_s_ratio', '{:.2f}')} | {row['rl_steps']['mean']:.0f} "
                     f"| {ms(row, 'train_s', '{:.0f}')} |")
    if diffs:
        lines += ["", "Differences in held-out accuracy (points), paired on each seed's held-out set:", "",
                  "| difference | what | per seed | mean ± std |", "|---|---|---|---|"]
        for d in diffs:
            per = " / ".join(f"{p:+.1f}" for p in d["points"])
            seeds = "/".join(map(str, d["seeds"]))
            lines.append(f"| {d['arm']} − {d['baseline']} | {d['what']} | {per} (seeds {seeds}) "
                         f"| {d['mean']:+.1f} ± {d['std']:.1f} |")
    return "\n".join(lines) + "\n"


def curves(cfg: AblationConfig, results: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """``arm/seed`` -> [(sampled tokens, held-out accuracy)] of the RL arms, from step 0 to the final eval."""
    out = {}
    for r in results:
        if r["stage"] != "stage3" or r["arm"] == "no-rl":
            continue
        rows = [m for m in read_metrics(arm_dir(cfg, r["arm"], r["seed"]) / "metrics.jsonl")
                if m.get("stage") == "stage3"]
        pts, spent = [], 0.0
        for m in sorted(rows, key=lambda m: m["step"]):
            spent = m.get("perf/sampled_tokens_total", spent)
            if "accuracy/eval" in m:
                pts.append((spent, m["accuracy/eval"]))
        out[f"{r['arm']}/{r['seed']}"] = pts
    return out


def plot(cfg: AblationConfig, results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = curves(cfg, results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0, cfg.sampled_tokens, 41)
    for arm in dict.fromkeys(k.split("/")[0] for k in cs):
        ys = []
        for key, pts in cs.items():
            if key.split("/")[0] == arm and len(pts) >= 1:
                x, y = zip(*pts)
                ys.append(np.interp(grid, x, y))  # the held-out curve on a common token grid
        if not ys:
            continue
        ys = np.array(ys)
        mean, std = ys.mean(0), ys.std(0)
        (line,) = ax.plot(grid, mean, label=f"{arm} (n={len(ys)})")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2, color=line.get_color())
    summary = summarize(results)
    for i, arm in enumerate(a for a in ("npr-beta", "sr-beta", "no-rl") if a in summary):
        m, s = summary[arm]["accuracy"]["mean"], summary[arm]["accuracy"]["std"]
        x = 0 if arm != "no-rl" else cfg.sampled_tokens
        ax.errorbar([x], [m], yerr=[s], fmt="os^"[i], capsize=3, label=f"{arm} (final)")
    ax.set_xlabel("sampled tokens (all branches)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("npr ablate: mean ± 1 std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(cfg: AblationConfig, results: list[dict], wall_s: float | None = None) -> dict:
    out = Path(cfg.out)
    summary = summarize(results)
    diffs = differences(results)
    md = markdown(summary, cfg, wall_s, diffs)
    atomic_write_text(out / "ablation.md", md)
    doc = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
           "wall_s": wall_s, "arms": summary, "differences": diffs, "runs": results}
    atomic_write_text(out / "ablation.json", json.dumps(doc, indent=2))
    png = plot(cfg, results, out / "ablation.png")
    print(md)
    print(f"table: {out / 'ablation.md'}  json: {out / 'ablation.json'}  curves: {png}  "
          f"(tensorboard --logdir {out})")
    return doc


def rebuild_report(cfg: AblationConfig) -> dict:
    """``--report-only``: the report of the finished arms under ``cfg.out`` (those of ``cfg.arms`` and
    ``cfg.seeds``), in the arms' order, with the wall time of the run that trained them when its report is there."""
    results = [json.loads(p.read_text()) for p in sorted(Path(cfg.out).glob("*/seed*/arm.json"))]
    results = [r for r in results if r["arm"] in cfg.arms and r["seed"] in cfg.seeds]
    if not results:
        raise ConfigError(f"--report-only: no finished arm under {cfg.out}")
    order = list(ARMS)
    results.sort(key=lambda r: (order.index(r["arm"]), r["seed"]))
    prev = Path(cfg.out) / "ablation.json"
    try:
        wall = json.loads(prev.read_text()).get("wall_s") if prev.exists() else None
    except (OSError, ValueError, AttributeError):  # an unreadable earlier report: no wall time, nothing lost
        wall = None
    return report(cfg, results, wall_s=wall)


__all__ = ["ARMS", "CONTRASTS", "AblationConfig", "Arm", "run", "run_arm", "report", "rebuild_report", "summarize",
           "differences", "decode_speed"]
