"""Training memory against rollout length: ``python -m benchmarks.memory [--quick] [--json PATH]``.

Peak memory of one training step (forward + backward of ``sft_loss``: every response token trained) of a small
randomly initialised Qwen3 (hidden 256, 4 layers, 4 query / 2 KV heads of 64, MLP 768, vocabulary 4096, tied
embeddings, fp32; built from ``Qwen3Config``, nothing downloaded) at T = 1k, 2k, 4k, 8k and 16k tokens, batch 1:

* ``npr``: the NPR layout of a real :class:`npr_env.ExecutionGraph` (a synthesized trajectory of many blocks of
  2-4 parallel steps, some with a block nested inside a step, over the shipped char tokenizer, cut at T tokens
  like a truncated rollout) through ``npr_agent.policy.sft_loss`` with ``attn="auto"`` (the trainer's path:
  the dense additive mask while ``T * T`` fits in one chunk's budget, the chunked attention above);
* ``npr_bias``: the same layout forced through the dense ``[T, T]`` additive mask (``attn="bias"``), for scale
  (up to ``--bias-max`` tokens, 8k by default: it only shows the quadratic term);
* ``causal``: a plain causal step: HF's own backbone forward with no mask (SDPA ``is_causal``; no layout at
  all), then the same chunked logprob head. ``npr_over_causal_<T>`` = npr / causal.

Every configuration runs in a fresh subprocess (peaks never mix): after a short warm-up step (gradients
allocated), the peak resident-set counter is reset (``/proc/self/clear_refs``), and the figure is the peak RSS
during the measured step minus the RSS before it (MiB). Where the reset is not allowed, ``ru_maxrss`` minus
the RSS before the step is used (noted in ``peak_method``). On CUDA: ``torch.cuda.max_memory_allocated``.

The children run with ``MALLOC_MMAP_THRESHOLD_=262144``: glibc then serves every tensor of 256 KiB or more
with its own mapping and unmaps it when freed, so RSS follows the live tensors. With glibc's default (a
threshold that grows up to 32 MiB after frees; ``--glibc-default``) freed medium tensors stay in the heap and
RSS overstates the peak of the path with many of them (the chunked one) by up to ~15% at 16k.
Targets: ``npr_over_causal_16k <= 1.3`` and ``growth_8k_16k`` (npr peak at 16k / at 8k) ``<= 2.2``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from .engine_speed import cpu_name

TARGETS = {"npr_over_causal_16k": 1.3, "growth_8k_16k": 2.2}
LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 4096, 8192)  # the dense path, then the chunked one at 8k
CONFIGS = ("npr", "npr_bias", "causal")
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
PROMPT = "Compute each group sum, then the total."


def npr_text(n_tokens: int, seed: int = 0) -> str:
    """A long NPR-format response: rounds of guideline (2-4 plans), parallel steps, takeaway; every third
    round (the first included) nests a block inside its first step. At least ``n_tokens`` characters (tags are one token each)."""
    rng = random.Random(seed)
    out, size, r = [], 0, 0

    def words(n):
        return " ".join("".join(rng.choice("0123456789+=") for _ in range(rng.randint(3, 8))) for _ in range(n))

    def block(k, step_words, nested=False):
        plans = "".join(f"<plan>{i + 1}: {words(4)}</plan>" for i in range(k))
        steps = []
        for i in range(k):
            body = words(step_words)
            if nested and i == 0:
                body = f"{words(4)} {block(2, step_words // 2)} {words(4)}"
            steps.append(f"<step>{i + 1}: {body}</step>\n")
        return f"<guideline>{plans}</guideline>\n{''.join(steps)}<takeaway>{words(6)}</takeaway>\n"

    while size < n_tokens + 64:
        b = block(rng.randint(2, 4), rng.randint(10, 30), nested=r % 3 == 0)
        out.append(b)
        size += len(b)
        r += 1
    out.append("\\boxed{0}")
    return "".join(out)


def npr_sample(n_tokens: int, layout: str = "parallel"):
    """A training sample of exactly ``n_tokens`` tokens whose layout comes from npr_env's graph."""
    import npr_env
    from npr_agent.policy import Sample

    tok = npr_env.load_tokenizer()
    chars = n_tokens
    while True:  # tags are single tokens: grow the text until it has enough tokens
        full = npr_env.ExecutionGraph.from_text(npr_text(chars), tok, prompt=PROMPT, constraints=None,
                                                layout=layout)
        if len(full) >= n_tokens:
            break
        chars = int(chars * 1.2) + 64
    g = npr_env.ExecutionGraph.from_token_ids(full.token_ids[:n_tokens], tok, prompt_len=full.prompt_len,
                                              constraints=None, layout=layout)
    return Sample.from_graph(g), g


def build_model(device, checkpointing: bool = False):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**MODEL, max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg).to(device).train()
    if checkpointing:
        from npr_agent.checkpoint import enable_checkpointing

        enable_checkpointing(model)
    return model


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def step(model, batch, config: str) -> float:
    """One training step's forward + backward; returns the loss."""
    from npr_agent.policy import logprobs_from_hidden, sft_loss

    if config == "causal":
        h = model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # SDPA is_causal
        lp, _ = logprobs_from_hidden(model, batch, h)
        loss = -(lp * batch.loss_mask).sum() / max(batch.num_loss_tokens, 1)
    else:
        loss = sft_loss(model, batch, attn="bias" if config == "npr_bias" else "auto")
    loss.backward()
    return float(loss.detach())


def child(config: str, n_tokens: int, threads: int, device_name: str, checkpointing: bool) -> dict:
    import torch

    from npr_agent.policy import build_batch, resolve_attn

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = build_model(device, checkpointing)
    layout = "sequential" if config == "causal" else "parallel"
    warm = build_batch([npr_sample(256, layout)[0]], device=device, train_forced=True)
    step(model, warm, config)  # allocates the gradients and warms the kernels
    sample, graph = npr_sample(n_tokens, layout)
    batch = build_batch([sample], device=device, train_forced=True)
    model.zero_grad(set_to_none=False)
    del warm
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = _rss_kib()
    reset = _reset_hwm()
    t0 = time.perf_counter()
    loss = step(model, batch, config)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak, method = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda.max_memory_allocated"
    elif reset:
        peak, method = (_hwm_kib() - before) / 1024, "VmHWM after clear_refs, minus VmRSS before"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        method = "ru_maxrss minus VmRSS before"
    st = graph.stats
    return {"config": config, "T": n_tokens, "peak_mib": peak, "seconds": seconds, "loss": loss,
            "peak_method": method, "attn": "sdpa is_causal" if config == "causal" else
            resolve_attn(model, batch, "bias" if config == "npr_bias" else "auto"),
            "blocks": len(st.branches_per_block), "depth": int(batch.hide_lo.shape[2])}


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "262144"}  # RSS follows live tensors (module docstring)


def run_child(config, n_tokens, threads, device, checkpointing, glibc_default: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", config, str(n_tokens), "--threads", str(threads),
           "--device", device] + (["--checkpointing"] if checkpointing else [])
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if not glibc_default:
        env.update(MALLOC_ENV)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{config} at T={n_tokens} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=LENGTHS,
                    help="comma-separated token counts (default 1024,...,16384)")
    ap.add_argument("--quick", action="store_true",
                    help=f"T = {', '.join(map(str, QUICK_LENGTHS))}, the dense column up to 4096 (~2 min)")
    ap.add_argument("--bias-max", type=int, default=8192, help="longest T of the dense-mask column (0: none)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on (every config)")
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "T"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        res = child(a.child[0], int(a.child[1]), a.threads, a.device, a.checkpointing)
        print(json.dumps(res))
        return res
    lengths = QUICK_LENGTHS if a.quick else a.lengths
    if a.quick:
        a.bias_max = min(a.bias_max, 4096)
    def configs_at(n):
        return [c for c in CONFIGS if c != "npr_bias" or n <= a.bias_max]

    bias = any(n <= a.bias_max for n in lengths)
    res: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores" if a.device == "cpu" else a.device,
                 "threads": a.threads, "device": a.device, "dtype": "float32", "batch": 1,
                 "checkpointing": a.checkpointing, "model": dict(MODEL), "lengths": list(lengths),
                 "allocator": "glibc default" if a.glibc_default else
                 " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()), "runs": []}
    t0 = time.perf_counter()
    for n in lengths:
        for c in configs_at(n):
            r = run_child(c, n, a.threads, a.device, a.checkpointing, a.glibc_default)
            res["runs"].append(r)
            res[f"{c}_peak_mib_{_k(n)}"] = r["peak_mib"]
            res[f"{c}_seconds_{_k(n)}"] = r["seconds"]
        res[f"npr_over_causal_{_k(n)}"] = res[f"npr_peak_mib_{_k(n)}"] / res[f"causal_peak_mib_{_k(n)}"]
        if "npr_bias" in configs_at(n):
            res[f"bias_over_causal_{_k(n)}"] = res[f"npr_bias_peak_mib_{_k(n)}"] / res[f"causal_peak_mib_{_k(n)}"]
    for lo, hi in zip(lengths, lengths[1:]):
        res[f"growth_{_k(lo)}_{_k(hi)}"] = res[f"npr_peak_mib_{_k(hi)}"] / res[f"npr_peak_mib_{_k(lo)}"]
        res[f"causal_growth_{_k(lo)}_{_k(hi)}"] = res[f"causal_peak_mib_{_k(hi)}"] / res[f"causal_peak_mib_{_k(lo)}"]
    res["peak_method"] = res["runs"][0]["peak_method"]
    res["wall_seconds"] = time.perf_counter() - t0
    res["targets"] = {k: {"max": v, "value": res.get(k), "met": res[k] <= v if k in res else None}
                      for k, v in TARGETS.items()}

    print(f"Training-step peak memory (MiB; {res['machine']}, {a.threads} threads, fp32, batch 1, "
          f"checkpointing {'on' if a.checkpointing else 'off'})")
    head = f"{'T':>6} {'npr path':>9} {'npr':>9} " + (f"{'npr bias':>9} " if bias else "")
    print(head + f"{'causal':>9} {'npr/causal':>11} {'s (npr)':>8}")
    for n in lengths:
        k = _k(n)
        path = next(r["attn"] for r in res["runs"] if r["T"] == n and r["config"] == "npr")
        row = f"{n:>6} {path:>9} {res[f'npr_peak_mib_{k}']:9.1f} "
        if bias:
            row += f"{res[f'npr_bias_peak_mib_{k}']:9.1f} " if n <= a.bias_max else f"{'-':>9} "
        print(row + f"{res[f'causal_peak_mib_{k}']:9.1f} {res[f'npr_over_causal_{k}']:11.3f} "
              f"{res[f'npr_seconds_{k}']:8.1f}")
    for lo, hi in zip(lengths, lengths[1:]):
        print(f"growth {_k(lo)} -> {_k(hi)}: npr {res[f'growth_{_k(lo)}_{_k(hi)}']:.2f}x, "
              f"causal {res[f'causal_growth_{_k(lo)}_{_k(hi)}']:.2f}x")
    for k, t in res["targets"].items():
        if t["value"] is not None:
            print(f"target {k} <= {t['max']}: {t['value']:.3f} ({'met' if t['met'] else 'NOT met'})")
    print(f"({res['peak_method']}; {res['allocator']}; {res['wall_seconds']:.0f} s)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
