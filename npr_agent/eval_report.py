"""Writers for an evaluation (``npr eval``): the JSON file, the Markdown table and the PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .eval_metrics import SampleRecord

DEFINITIONS = """\
- **avg@k**: per problem, the share of its k samples that are correct; mean over problems.
- **pass@k**: unbiased estimator 1 − C(n−c, k)/C(n, k) per problem (n samples, c correct); mean over problems.
- **valid**: share of samples with no violation of the strict NPR format constraints.
- **parallel**: share of samples with at least one block of ≥ 2 branches (all samples / format-valid samples).
  In sequential mode such branches were decoded one after another.
- **branches/block**: mean number of branches over every block that has at least one step.
- **total tok / crit. tok**: mean generated tokens of all branches / on the critical path, per sample.
- **tok/s**: total tokens of all samples ÷ wall-clock time of the run; **wall s**: that wall-clock time.
- **speedup**: sequential ÷ parallel wall time and time to answer, parallel ÷ sequential tokens/s; same model,
  problems and sampling, measured in the same invocation.
- **overall**: avg@k and pass@k are the mean over benchmarks (the paper's AVG); rates are pooled over samples."""


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_samples(records: Sequence[SampleRecord], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")
    return path


def _mode_table(per_bench: dict[str, dict], titles: dict[str, str]) -> list[str]:
    lines = ["| benchmark | k | problems | avg@k % | pass@k % | valid % | parallel % (all / valid) | "
             "branches/block | total tok | crit. tok | tok/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in per_bench.items():
        label = "**overall**" if name == "overall" else titles.get(name, name)
        lines.append(
            f"| {label} | {_f(s.get('k'))} | {s['n_problems']} | {_pct(s['avg@k'])} | {_pct(s['pass@k'])} | "
            f"{_pct(s['valid_rate'])} | {_pct(s['parallel_rate'])} / {_pct(s['parallel_rate_valid'])} | "
            f"{_f(s['branches_per_block'], 2)} | {_f(s['total_tokens_mean'], 1)} | "
            f"{_f(s['critical_path_tokens_mean'], 1)} | {_f(s['tokens_per_s'], 1)} | {_f(s['wall_s'], 1)} |")
    return lines


def markdown(result: dict) -> str:
    """The report as Markdown: setup, one table per mode, the speedup table and the definitions."""
    meta = result["meta"]
    titles = meta.get("titles", {})
    s = meta["sampling"]
    lines = [
        "# NPR evaluation", "",
        f"- model: `{meta['model']}`",
        f"- hardware: {meta['hardware']}",
        f"- sampling: temperature {s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}, "
        f"max new tokens {s['max_new_tokens']}, seed {s['seed']}; instruction "
        f"{'on' if meta['instruction'] else 'off'}",
        f"- date: {meta['date']}; total time {meta['elapsed_s']:.1f} s",
    ]
    for b in result.get("benchmarks", {}).values():
        lines.append(f"- {b['title']}: {b['n_problems']} problems, avg@{b['k']}, from `{b['source']}`")
    lines.append("")
    for mode, per_bench in result["results"].items():
        lines += [f"## {mode} decoding", ""] + _mode_table(per_bench, titles) + [""]
    if result.get("speedup"):
        lines += ["## Speedup: parallel vs sequential (same problems, same invocation)", "",
                  "| benchmark | wall × | time to answer × | tokens/s × | crit. tok (par) | total tok (par / seq) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, sp in result["speedup"].items():
            label = "**overall**" if name == "overall" else titles.get(name, name)
            lines.append(f"| {label} | {_f(sp['wall'], 2)} | {_f(sp['time_to_answer'], 2)} | "
                         f"{_f(sp['tokens_per_s'], 2)} | {_f(sp['critical_path_tokens_parallel'], 1)} | "
                         f"{_f(sp['total_tokens_parallel'], 1)} / {_f(sp['total_tokens_sequential'], 1)} |")
        o = result["speedup"].get("overall") or {}
        tp, ts = o.get("total_tokens_parallel"), o.get("total_tokens_sequential")
        if tp and ts and not 0.8 <= tp / ts <= 1.25:
            lines += ["", f"Note: the two runs did different amounts of work ({tp:.0f} vs {ts:.0f} tokens per sample; "
                      "e.g. parallel mode stops a sample at its first format violation, see --stop-on-violation). "
                      "The wall and time-to-answer ratios compare that different work; tokens/s is the "
                      "like-for-like ratio."]
        lines.append("")
    if result.get("plots"):
        lines += ["## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in result["plots"].items()] + [""]
    lines += ["## Definitions", "", DEFINITIONS, ""]
    return "\n".join(lines)


def write_markdown(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown(result))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(result: dict, path: str | Path) -> Path:
    """Two panels per benchmark and mode: avg@k, and the parallel rate (solid: all samples; hatched: valid)."""
    plt = _pyplot()
    titles = result["meta"].get("titles", {})
    modes = list(result["results"])
    names = [n for n in next(iter(result["results"].values())) if n != "overall"] + ["overall"]
    labels = [titles.get(n, n) if n != "overall" else "overall" for n in names]
    width = 0.8 / max(1, len(modes))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) * 2), 4.2))
    colors = {"parallel": "tab:blue", "sequential": "tab:orange"}
    for j, mode in enumerate(modes):
        per = result["results"][mode]
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))]
        acc = [100 * (per[n]["avg@k"] or 0) for n in names]
        bars = axes[0].bar(xs, acc, width, label=mode, color=colors.get(mode))
        axes[0].bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        par = [100 * (per[n]["parallel_rate"] or 0) for n in names]
        parv = [100 * (per[n]["parallel_rate_valid"] or 0) for n in names]
        bars = axes[1].bar(xs, par, width * 0.5, align="edge", label=f"{mode}: all", color=colors.get(mode))
        axes[1].bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        axes[1].bar([x - width * 0.5 for x in xs], parv, width * 0.5, align="edge", label=f"{mode}: valid",
                    color="white", edgecolor=colors.get(mode), hatch="//")
    ks = {n: result["results"][modes[0]][n].get("k") for n in names}
    axes[0].set_xticks(range(len(names)), [f"{lab}\n(avg@{ks[n]})" if ks[n] else lab
                                           for n, lab in zip(names, labels)], fontsize=8)
    axes[0].set_ylabel("accuracy, avg@k (%)")
    axes[0].set_title("Accuracy")
    axes[1].set_xticks(range(len(names)), labels, fontsize=8)
    axes[1].set_ylabel("samples with a block of ≥ 2 branches (%)")
    axes[1].set_title("Parallel rate")
    for ax in axes:
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, result, path)


def _save_figure(fig, result: dict, path) -> Path:
    """Title a figure with the model and hardware, write it as a PNG and free it."""
    fig.suptitle(f"{result['meta']['model_name']} · {result['meta']['hardware_short']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def paired_speedups(par: Sequence[SampleRecord], seq: Sequence[SampleRecord]) -> list[tuple[str, int, float]]:
    """``(benchmark, critical-path tokens of the parallel sample, seq/par time to answer)`` per sample that
    both runs produced (same problem, same sample index)."""
    seq_by = {(r.benchmark, r.problem_id, r.sample): r for r in seq}
    out = []
    for r in par:
        s = seq_by.get((r.benchmark, r.problem_id, r.sample))
        if s is not None and r.wall_s > 0:
            out.append((r.benchmark, r.critical_path_tokens, s.wall_s / r.wall_s))
    return out


def plot_speedup(result: dict, records: dict[str, list[SampleRecord]], path: str | Path) -> Path:
    """Speedup against the critical-path length of the parallel samples.

    Left: per sample, the measured time-to-answer ratio (sequential / parallel, same problem and sample index)
    and the ideal ratio (total / critical-path tokens). Right: per benchmark, wall and tokens/s ratios.
    """
    plt = _pyplot()
    titles = result["meta"].get("titles", {})
    par = records.get("parallel", [])
    seq = records.get("sequential", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    benches = list(dict.fromkeys(r.benchmark for r in par))
    cmap = plt.get_cmap("tab10")
    for i, b in enumerate(benches):
        rs = [r for r in par if r.benchmark == b]
        ax.scatter([r.critical_path_tokens for r in rs], [r.total_tokens / max(1, r.critical_path_tokens) for r in rs],
                   s=14, facecolors="none", edgecolors=cmap(i), label=f"{titles.get(b, b)}: ideal")
        if seq:
            pts = [p for p in paired_speedups(rs, seq)]
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], s=14, color=cmap(i), marker="x",
                       label=f"{titles.get(b, b)}: measured")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("critical-path tokens (parallel sample)")
    ax.set_ylabel("speedup ×")
    ax.set_title("Per sample: ideal (total/critical tokens) and measured (seq/par time to answer)", fontsize=8)
    if benches:
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    ax = axes[1]
    sp = result.get("speedup") or {}
    names = list(sp)
    if names:
        xs = range(len(names))
        for dx, key, label in ((-0.2, "wall", "wall time"), (0.2, "tokens_per_s", "tokens/s")):
            bars = ax.bar([x + dx for x in xs], [sp[n][key] or 0 for n in names], 0.4, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_xticks(list(xs), [titles.get(n, n) for n in names], fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.legend(fontsize=7)
        ax.set_title("Per benchmark: parallel vs sequential ×", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no sequential run\n(use --compare-sequential)", ha="center", va="center")
        ax.set_axis_off()
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, result, path)


__all__ = ["DEFINITIONS", "markdown", "paired_speedups", "plot_accuracy", "plot_speedup", "write_json",
           "write_markdown", "write_samples"]
