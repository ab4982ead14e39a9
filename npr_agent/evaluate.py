"""``npr eval`` (also ``python -m benchmarks.eval``): a model through the NPR engine on the paper's benchmarks.

    npr eval --model runs/tiny/stage3 --benchmarks math500,amc23,zebralogic \\
        --data-dir ../shared/benchmarks --limit 8 --compare-sequential --out runs/eval/tiny

It loads the model (a checkpoint directory, or an HF model id when online), builds the chat prompt of each
problem with ``npr_env.prompts`` and the settings the checkpoint was trained with (its ``npr_prompt.json``;
without one: the NPR instruction appended to the user turn, Qwen3's thinking off, and no instruction for the
shipped char-level tokenizer, which tiny models are trained on without it), samples k responses per problem with the engine in parallel (or
sequential) mode, grades them with each benchmark's checker (``npr_env.suites``), and writes to ``--out``:

* ``results.json``: settings, hardware, per benchmark and overall metrics per mode, speedups;
* ``results.md``: the same as Markdown tables;
* ``accuracy.png`` (avg@k and parallel rate per benchmark) and ``speedup.png`` (speedup against the
  critical-path length of the parallel samples);
* ``samples.jsonl``: every sample with its verdict, stats and text.

Definitions (also in ``npr_agent.eval_metrics`` and in the report):

* **avg@k**: per problem, the share of its k samples that are correct; the mean over problems. The default k
  is the paper's: 8 for AIME25, AIME24, HMMT25 and AMC23, 1 for the others (``--k`` overrides it).
* **pass@k**: the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` (n samples, c correct), mean over problems.
* **format-valid rate**: the share of samples with no violation of the strict NPR constraints.
* **parallel rate**: the share of samples whose execution graph has at least one block with >= 2 branches,
  over all samples and over the format-valid ones.
* **branches per block**: mean number of branches over the blocks that have at least one step.
* **tokens/s**: generated tokens of all branches / wall-clock time of the run; **time to answer**: per sample,
  from the start of its batch to its last token.
* **speedup** (``--compare-sequential``): the same model, problems, sampling settings and seeds decoded
  sequentially in the same invocation, benchmark by benchmark right after the parallel run:
  sequential wall time / parallel wall time (and time to answer), and parallel tokens/s / sequential tokens/s.
* **overall**: avg@k and pass@k are the mean over benchmarks (the paper's AVG); rates are pooled over samples.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from npr_env import suites
from npr_env.prompts import PromptConfig, load_prompt_config, prompt_ids
from npr_env.rewards import format_score
from npr_env.tasks import Problem
from npr_env.verify import extract_answer

from . import checkpoint as ckpt
from .eval_metrics import SampleRecord, overall, speedup, summarize
from .eval_report import plot_accuracy, plot_speedup, write_json, write_markdown, write_samples

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- model and prompts --------------------------------------------------------------------------------------
def load_model(spec: str, device: torch.device, dtype: str = "auto"):
    """``(model, tokenizer)`` from a checkpoint directory (or an HF model id, online), with the NPR tags.

    The tokenizer is read as saved and the tags are added with the model at hand, so a model that has never
    seen them (a base model) gets their rows initialised as the paper does (mean of the sub-token embeddings).
    """
    from transformers import AutoTokenizer

    import npr_env

    dt = (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype == "auto" else DTYPES[dtype]
    if Path(spec).is_dir():
        model = ckpt.load_pretrained(spec, dt)
    else:
        if not suites.hf_online():
            raise FileNotFoundError(f"{spec}: not a local model directory, and the Hugging Face hub is offline")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(spec)
    npr_env.add_npr_tokens(tok, model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    return model.to(device).eval(), tok


def is_char_tokenizer(tokenizer) -> bool:
    """True for the shipped character-level tokenizer (tiny models, trained without the instruction)."""
    import npr_env

    try:
        return tokenizer.get_vocab() == npr_env.load_tokenizer().get_vocab()
    except Exception:  # noqa: BLE001 - any other tokenizer
        return False


def prompt_config(model: str, tokenizer, instruction: bool | None) -> PromptConfig:
    """The prompt settings: the checkpoint's own (``npr_prompt.json``, written by the trainer), else the paper's
    (instruction on, Qwen3's thinking off; instruction off for the shipped char tokenizer); ``instruction``
    (the command-line flag) overrides."""
    saved = load_prompt_config(model) if Path(model).is_dir() else None
    if saved is None:
        saved = PromptConfig(instruction=not is_char_tokenizer(tokenizer), chat_kwargs={"enable_thinking": False})
    return saved if instruction is None else replace(saved, instruction=instruction)


# -- one benchmark in one mode ------------------------------------------------------------------------------
def run_benchmark(engine, bench: suites.Benchmark, problems: list[Problem], prompts: list[list[int]],
                  params, mode: str, batch_size: int = 32, bar=None,
                  grade_timeout: float = 5.0) -> tuple[list[SampleRecord], float]:
    """``params.n`` samples per problem; returns the graded records and the wall time of the generate calls.

    Problems go to the engine ``batch_size`` at a time (each with its n samples); chunk ``c`` uses seed
    ``params.seed + c``, so the two modes see the same problems, chunks and seeds.
    """

    records: list[SampleRecord] = []
    wall = 0.0
    base_seed = params.seed
    for c, start in enumerate(range(0, len(problems), max(1, batch_size))):
        chunk = problems[start:start + batch_size]
        p = replace(params, seed=None if base_seed is None else base_seed + c)
        t0 = time.perf_counter()
        rollouts = engine.generate(prompts[start:start + batch_size], p, mode=mode)
        wall += time.perf_counter() - t0
        texts = [r.graph.response_text() for r in rollouts]
        probs = [chunk[r.prompt_index] for r in rollouts]
        verdicts = bench.grade_many(texts, probs, timeout=grade_timeout)
        for r, text, prob, ok in zip(rollouts, texts, probs, verdicts):
            st = r.graph.stats
            records.append(SampleRecord(
                benchmark=bench.name, mode=mode, problem_id=prob.id, sample=r.sample_index, correct=bool(ok),
                valid=format_score(r.graph, "strict") == 0, branches_per_block=list(st.branches_per_block),
                total_tokens=len(r.token_ids), critical_path_tokens=st.critical_path_tokens, wall_s=r.wall_s,
                finish_reason=r.finish_reason, truncated=r.truncated, answer=extract_answer(text),
                gold=prob.answer, text=text))
        if bar is not None:
            bar.update(len(rollouts))
    return records, wall


# -- hardware line ------------------------------------------------------------------------------------------
def hardware(device: torch.device) -> tuple[str, str]:
    """(long, short) descriptions of the machine that produced the numbers."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (CUDA {torch.version.cuda}), torch {torch.__version__}", name
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    short = f"CPU, {torch.get_num_threads()} threads"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}", short


# -- the command --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npr eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (HF format) or an HF model id (online)")
    p.add_argument("--benchmarks", default="all",
                   help=f"comma-separated names or 'all' ({','.join(suites.PAPER_ORDER)})")
    p.add_argument("--data-dir", default=None,
                   help="benchmark files folder (default: $NPR_DATA_DIR, else ../shared/benchmarks if present)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=SPEC",
                   help="per benchmark: a file, hf:owner/name[:config][@split], or 'generator' (zebralogic)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--k", default=None,
                   help="samples per problem: N for all, or NAME=N,... (default: the paper's, 8 or 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="paper's eval: 1.0")
    p.add_argument("--top-p", type=float, default=0.7, help="paper's eval: 0.7")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="critical-path budget per sample")
    p.add_argument("--max-total-tokens", type=int, default=None, help="all-branch budget (default 4x)")
    p.add_argument("--step-repetition-penalty", type=float, default=1.02, help="inside <step> (paper: 1.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["parallel", "sequential"], default="parallel")
    p.add_argument("--compare-sequential", action="store_true",
                   help="also decode sequentially, same problems and seeds, and report the speedup")
    p.add_argument("--instruction", dest="instruction", action="store_true", default=None,
                   help="append the NPR instruction (default: on, except for the shipped char tokenizer)")
    p.add_argument("--no-instruction", dest="instruction", action="store_false")
    p.add_argument("--batch-size", type=int, default=32, help="problems per engine call (each with k samples)")
    p.add_argument("--zebra-size", type=int, default=None, help="generated ZebraLogic puzzles (default: --limit or 100)")
    p.add_argument("--zebra-people", type=int, default=4)
    p.add_argument("--zebra-characteristics", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--block-size", type=int, default=16, help="engine KV block size")
    p.add_argument("--num-blocks", type=int, default=None, help="engine KV blocks (default: 256 MiB worth)")
    p.add_argument("--max-plans", type=int, default=5)
    p.add_argument("--max-depth", type=int, default=5)
    p.add_argument("--min-fork-budget", type=int, default=32, help="fork only with this much budget left")
    p.add_argument("--stop-on-violation", choices=["auto", "on", "off"], default="auto",
                   help="end a sample at its first format violation (auto: in parallel mode only, the engine's "
                        "default); 'off' makes both modes spend the same budget on malformed output")
    p.add_argument("--grade-timeout", type=float, default=5.0, help="seconds per math-verify call")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/<model>-<time>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_k(spec: str | None, names: list[str]) -> dict[str, int]:
    """``--k``: None (the paper's k), ``"4"`` (all), or ``"aime25=4,amc23=2"`` (the rest keep the paper's)."""
    ks = {n: suites.get(n).default_k for n in names}
    if spec is None:
        return ks
    spec = str(spec).strip()
    if spec.isdigit():
        return {n: int(spec) for n in names}
    for part in spec.split(","):
        name, sep, val = part.partition("=")
        if not sep or not val.strip().isdigit():
            raise ValueError(f"--k {spec!r}: expected N or NAME=N,...")
        ks[suites.get(name).name] = int(val)
    if min(ks.values()) < 1:
        raise ValueError("--k must be >= 1")
    return ks


def _sources(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        name, sep, spec = s.partition("=")
        if not sep or not spec:
            raise ValueError(f"--source {s!r}: expected NAME=SPEC")
        out[suites.get(name).name] = spec
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from engine import NPREngine, SamplingParams
    from engine.host import retain_freed_memory

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    try:
        names = suites.parse_names(args.benchmarks)
        sources = _sources(args.source)
        ks = parse_k(args.k, names)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data_dir = args.data_dir if args.data_dir is not None else suites.default_data_dir()
    zebra = {"size": args.zebra_size, "num_people": args.zebra_people,
             "num_characteristics": args.zebra_characteristics}

    # Load every benchmark first: a missing file fails before any model time is spent.
    problems: dict[str, list[Problem]] = {}
    origin: dict[str, str] = {}
    for n in names:
        try:
            origin[n] = suites.resolve_source(n, data_dir, sources.get(n))
            if origin[n] == "generator":
                origin[n] = (f"reasoning-gym zebra_puzzles generator (seed {args.seed}, {args.zebra_people} people, "
                             f"{args.zebra_characteristics} characteristics)")
            problems[n] = suites.load(n, data_dir, sources.get(n), limit=args.limit, seed=args.seed, zebra=zebra)
        except (FileNotFoundError, ImportError, RuntimeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not problems[n]:
            print(f"error: {n}: no problems loaded from {origin[n]}", file=sys.stderr)
            return 2

    device = ckpt.resolve_device(args.device)
    try:
        model, tok = load_model(args.model, device, args.dtype)
    except (OSError, ValueError) as e:  # FileNotFoundError included; HF raises OSError for unknown ids
        print(f"error: cannot load the model {args.model!r}: {e}", file=sys.stderr)
        return 2
    prompt_cfg = prompt_config(args.model, tok, args.instruction)
    instruction = prompt_cfg.instruction
    engine = NPREngine(model, tok, block_size=args.block_size, num_blocks=args.num_blocks, max_plans=args.max_plans,
                       max_depth=args.max_depth, min_fork_budget=args.min_fork_budget,
                       stop_on_violation={"auto": None, "on": True, "off": False}[args.stop_on_violation])
    modes = [args.mode] + (["sequential"] if args.compare_sequential and args.mode == "parallel" else [])
    prompts = {n: [prompt_ids(tok, p, prompt_cfg) for p in ps] for n, ps in problems.items()}

    # Warm-up: the first forward of each mode pays one-off costs that would skew the first benchmark's time.
    warm = SamplingParams(max_new_tokens=2, seed=0)
    for m in modes:
        engine.generate([prompts[names[0]][0]], warm, mode=m)

    total = sum(len(problems[n]) * ks[n] for n in names) * len(modes)
    bar = tqdm(total=total, desc="eval", unit="sample", disable=args.no_progress, dynamic_ncols=True)
    records: dict[str, dict[str, list[SampleRecord]]] = {m: {} for m in modes}
    walls: dict[str, dict[str, float]] = {m: {} for m in modes}
    for n in names:
        bench = suites.get(n)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, max_total_tokens=args.max_total_tokens,
                                seed=args.seed, n=ks[n], step_repetition_penalty=args.step_repetition_penalty)
        for m in modes:  # the modes back to back on the same benchmark: the machine's load is alike for both
            bar.set_description(f"{n} ({m})")
            recs, wall = run_benchmark(engine, bench, problems[n], prompts[n], params, m, args.batch_size, bar,
                                       args.grade_timeout)
            records[m][n], walls[m][n] = recs, wall
            bar.set_postfix(acc=f"{sum(r.correct for r in recs) / max(1, len(recs)):.2f}",
                            par=f"{sum(r.parallel for r in recs) / max(1, len(recs)):.2f}")
    bar.close()

    results: dict[str, dict[str, dict]] = {}
    for m in modes:
        per = {n: summarize(records[m][n], ks[n], walls[m][n]) for n in names}
        per["overall"] = overall(records[m], {n: per[n] for n in names})
        results[m] = per
    sp = None
    if "parallel" in results and "sequential" in results:
        sp = {n: speedup(results["parallel"][n], results["sequential"][n]) for n in [*names, "overall"]}

    out = Path(args.out) if args.out else Path("runs") / "eval" / (
        f"{Path(args.model.rstrip('/')).name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    hw_long, hw_short = hardware(device)
    result = {
        "meta": {
            "model": args.model, "model_name": Path(args.model.rstrip("/")).name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "hardware": hw_long, "hardware_short": hw_short, "device": str(device),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "instruction": instruction, "chat_kwargs": prompt_cfg.chat_kwargs,
            "modes": modes, "elapsed_s": 0.0,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                         "max_new_tokens": args.max_new_tokens, "max_total_tokens": args.max_total_tokens,
                         "step_repetition_penalty": args.step_repetition_penalty, "seed": args.seed,
                         "batch_size": args.batch_size},
            "engine": {"block_size": args.block_size, "num_blocks": engine.pool.num_blocks,
                       "max_plans": args.max_plans, "max_depth": args.max_depth,
                       "min_fork_budget": args.min_fork_budget, "stop_on_violation": args.stop_on_violation},
            "titles": {n: suites.get(n).title for n in names},
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "benchmarks": {n: {"title": suites.get(n).title, "k": ks[n], "n_problems": len(problems[n]),
                           "source": origin[n]} for n in names},
        "results": results,
        "speedup": sp,
    }
    plots = {"accuracy": str(out / "accuracy.png"), "speedup": str(out / "speedup.png")}
    result["plots"] = plots
    result["files"] = {"json": str(out / "results.json"), "markdown": str(out / "results.md"),
                       "samples": str(out / "samples.jsonl")}
    all_records = [r for m in modes for n in names for r in records[m][n]]
    write_samples(all_records, out / "samples.jsonl")
    plot_accuracy(result, plots["accuracy"])
    plot_speedup(result, {m: [r for n in names for r in records[m][n]] for m in modes}, plots["speedup"])
    result["meta"]["elapsed_s"] = time.perf_counter() - t_start
    write_json(result, out / "results.json")
    write_markdown(result, out / "results.md")

    for m in modes:
        o = results[m]["overall"]
        print(f"[{m}] avg@k {o['avg@k']:.3f}  valid {o['valid_rate']:.3f}  parallel {o['parallel_rate']:.3f}  "
              f"tokens/s {o['tokens_per_s'] or 0:.1f}  wall {o['wall_s']:.1f}s")
    if sp:
        o = sp["overall"]
        print(f"[speedup] wall {o['wall'] or 0:.2f}x  time-to-answer {o['time_to_answer'] or 0:.2f}x  "
              f"tokens/s {o['tokens_per_s'] or 0:.2f}x")
    print(f"wrote {out}/results.json, results.md, accuracy.png, speedup.png, samples.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
