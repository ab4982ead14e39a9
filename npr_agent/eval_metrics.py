"""Benchmark metrics: avg@k, unbiased pass@k, format-valid and parallel rates, tokens, time and speedup.

Definitions (the same in the JSON, the Markdown report and ``docs/results.md``):

* **avg@k**: for each problem, the share of its k samples that are correct; then the mean over problems.
* **pass@k**: the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` for a problem with n samples of which c are
  correct, averaged over problems (with n = k it is "at least one of the k samples is correct").
* **format-valid rate**: the share of samples whose execution graph has no violation of the strict NPR
  constraints (``npr_env``'s ``strict`` preset, the one PAPO trains with).
* **parallel rate**: the share of samples whose graph has at least one block with >= 2 branches (steps), over
  all samples, and separately over the format-valid ones. It counts what the sample *is*: in sequential
  mode the branches of such a block were decoded one after another.
* **branches per block**: the mean number of branches over every block that has at least one step.
* **total tokens**: every generated token, all branches included; **critical-path tokens**: the longest chain
  that must be decoded one after another (sibling branches count once, by their longest); their ratio is the
  ideal speedup of a sample.
* **tokens/s**: total tokens of all samples / wall-clock time of the run (the paper's TPS); **time to
  answer**: per sample, seconds from the start of its batch to its last token, averaged.
* **speedup** (``--compare-sequential``): the same model on the same problems with the same sampling, decoded
  sequentially in the same invocation: ``wall = seq wall / par wall``, ``time_to_answer = seq / par``,
  ``tokens_per_s = par tokens/s / seq tokens/s``.
* **overall**: accuracy (avg@k, pass@k) is the mean over benchmarks, like the paper's AVG column; rates and
  token means are pooled over all samples; times and token counts add up.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n-c, k) / C(n, k)`` (n samples, c correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # the product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the share of correct samples (each inner list holds one problem's samples)."""
    rows = [r for r in correct if len(r)]
    if not rows:
        return 0.0
    return sum(sum(map(bool, r)) / len(r) for r in rows) / len(rows)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """pass@k averaged over problems; a problem with fewer than k samples (or ``k=None``) uses its own n."""
    rows = [r for r in correct if len(r)]
    if not rows:
        return 0.0
    return sum(pass_at_k(len(r), sum(map(bool, r)), min(k, len(r)) if k else len(r)) for r in rows) / len(rows)


def branches_per_block(graph_or_stats) -> list[int]:
    s = getattr(graph_or_stats, "stats", graph_or_stats)
    return list(s.branches_per_block)


def is_parallel(graph_or_stats) -> bool:
    """At least one block with >= 2 branches (an ``ExecutionGraph`` or its ``GraphStats``)."""
    return any(b >= 2 for b in branches_per_block(graph_or_stats))


def parallel_rate(items: Iterable, valid: Iterable[bool] | None = None) -> float | None:
    """Share of ``items`` (graphs or stats) that are parallel; with ``valid``, among the valid ones only.
    None when there is nothing to count."""
    items = list(items)
    if valid is not None:
        items = [x for x, ok in zip(items, valid) if ok]
    if not items:
        return None
    return sum(is_parallel(x) for x in items) / len(items)


def rollout_stats(graphs: Sequence, valid: Sequence[bool]) -> dict[str, float]:
    """The trainer's parallel scalars over the VALID rollouts: ``parallel/rate`` (:func:`parallel_rate`),
    ``parallel/branches_mean`` (branches per block) and ``parallel/speedup_ideal`` (total ÷ critical-path tokens)."""
    vs = [g.stats for g, ok in zip(graphs, valid) if ok]
    if not vs:
        return {"parallel/rate": 0.0, "parallel/branches_mean": 0.0, "parallel/speedup_ideal": 1.0}
    branches = [b for s in vs for b in branches_per_block(s)]
    return {
        "parallel/rate": float(parallel_rate(vs)),
        "parallel/branches_mean": sum(branches) / len(branches) if branches else 0.0,
        "parallel/speedup_ideal": sum(s.ideal_speedup for s in vs) / len(vs),
    }


@dataclass
class SampleRecord:
    """One generated sample, as graded and measured (one line of ``samples.jsonl``)."""

    benchmark: str
    mode: str
    problem_id: str
    sample: int
    correct: bool
    valid: bool
    branches_per_block: list[int]
    total_tokens: int
    critical_path_tokens: int
    wall_s: float  # time to answer: from the start of its batch to its last token
    finish_reason: str = ""
    truncated: bool = False
    answer: str | None = None  # the extracted (last boxed) answer
    gold: str = ""
    text: str = ""

    @property
    def parallel(self) -> bool:
        return any(b >= 2 for b in self.branches_per_block)

    def as_dict(self, with_text: bool = True) -> dict:
        d = asdict(self)
        d["parallel"] = self.parallel
        if not with_text:
            d.pop("text")
        return d


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def summarize(records: Sequence[SampleRecord], k: int | None, wall_s: float) -> dict:
    """The per-benchmark metrics of the module docstring, for one mode."""
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_problem[r.problem_id].append(r.correct)
    n = len(records)
    valid = [r.valid for r in records]
    blocks = [b for r in records for b in r.branches_per_block if b >= 1]
    total = sum(r.total_tokens for r in records)
    return {
        "n_problems": len(by_problem),
        "k": k,
        "n_samples": n,
        "avg@k": avg_at_k(list(by_problem.values())),
        "pass@k": mean_pass_at_k(list(by_problem.values()), k),
        "valid_rate": _mean([float(v) for v in valid]),
        "parallel_rate": _mean([float(r.parallel) for r in records]),
        "parallel_rate_valid": _mean([float(r.parallel) for r in records if r.valid]),
        "branches_per_block": _mean([float(b) for b in blocks]),
        "total_tokens_mean": _mean([float(r.total_tokens) for r in records]),
        "critical_path_tokens_mean": _mean([float(r.critical_path_tokens) for r in records]),
        "ideal_speedup_mean": _mean([r.total_tokens / max(1, r.critical_path_tokens) for r in records]),
        "total_tokens": total,
        "wall_s": wall_s,
        "tokens_per_s": total / wall_s if wall_s > 0 else None,
        "time_to_answer_s": _mean([r.wall_s for r in records]),
        "truncated_rate": _mean([float(r.truncated) for r in records]),
        "finish_reasons": dict(Counter(r.finish_reason for r in records)),
    }


def overall(records_by_bench: dict[str, Sequence[SampleRecord]], summaries: dict[str, dict]) -> dict:
    """Across benchmarks: accuracy is the mean over benchmarks (the paper's AVG); the rest is pooled."""
    recs = [r for rs in records_by_bench.values() for r in rs]
    wall = sum(s["wall_s"] for s in summaries.values())
    out = summarize(recs, k=None, wall_s=wall)
    accs = [s["avg@k"] for s in summaries.values()]
    passes = [s["pass@k"] for s in summaries.values()]
    out.update({"avg@k": _mean(accs), "pass@k": _mean(passes), "k": None, "n_benchmarks": len(summaries),
                "n_problems": sum(s["n_problems"] for s in summaries.values())})
    return out


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return float(a) / float(b)


def speedup(parallel: dict, sequential: dict) -> dict:
    """Parallel vs sequential run summaries (same model, problems and sampling): ratios > 1 favour parallel."""
    return {
        "wall": _ratio(sequential.get("wall_s"), parallel.get("wall_s")),
        "time_to_answer": _ratio(sequential.get("time_to_answer_s"), parallel.get("time_to_answer_s")),
        "tokens_per_s": _ratio(parallel.get("tokens_per_s"), sequential.get("tokens_per_s")),
        "critical_path_tokens_parallel": parallel.get("critical_path_tokens_mean"),
        "total_tokens_parallel": parallel.get("total_tokens_mean"),
        "total_tokens_sequential": sequential.get("total_tokens_mean"),
    }


__all__ = ["SampleRecord", "avg_at_k", "branches_per_block", "is_parallel", "mean_pass_at_k",
           "overall", "parallel_rate", "pass_at_k", "speedup", "summarize"]
