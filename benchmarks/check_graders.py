"""Sanity check of loaders + verifier on real data: grade each benchmark's reference solutions against its gold.

    python -m benchmarks.check_graders --data-dir ../shared/benchmarks [--json PATH] [--min-rate 0.98]

Prints, and with ``--json`` writes, ``{"math500": {"rate": ..., "n": ..., "failures": [...]}, ...}``. A rate
below 1 means the verifier rejects a correct answer written the way the benchmark's authors wrote it, or the
loader read the gold wrongly; the failures are listed so that they can be understood and fixed.

What "reference solution" means, per benchmark (a benchmark whose file has none is skipped, e.g. AMC23):

* **MATH500**: ``solution``, graded as a model response (its last ``\\boxed{}``) against ``answer``. The two come
  from the same text, so the rate is near 1 by construction; it checks extraction and normalisation.
* **AIME24**: ``solution`` (Art of Problem Solving write-ups, often several per problem) against ``answer``. The
  final answer is the last ``\\boxed{}``, ``\\fbox{}`` or ``\\framebox{}``; human write-ups use ``\\framebox``,
  which model responses are not asked to, so this script finds it (and passes it to the verifier boxed).
* **Minerva-Math**: ``solution`` against the gold the loader takes from the *same* solution's last ``\\boxed{}``:
  trivially 1 unless extraction is broken.
* **OlympiadBench**: the ``solution`` texts have no boxed or marked final answer, so the reference is the raw
  ``final_answer`` list as written in the file (``$`` included), joined with ", " in a box: it checks the
  loader's gold formatting and the verifier on real answer LaTeX (tuples, intervals, expressions).
* any other file: its ``solution`` (last box) when it has one, else ``final_answer`` as above, else skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from npr_env import suites
from npr_env.schema import last_boxed
from npr_env.tasks import Problem, iter_rows
from npr_env.verify import verify_many


def reference_prediction(problem: Problem, raw_row: dict | None) -> tuple[str | None, str]:
    """``(prediction text, what it is)`` for a problem, or ``(None, why)`` when there is no reference."""
    for key, sol in problem.solutions.items():  # the file's order: "reference", "reference_2", ...
        if not key.startswith("reference"):
            continue
        if last_boxed(sol) is not None:  # \\boxed, \\fbox or \\framebox: the verifier finds it itself
            return sol, "solution (last box)"
    raw = raw_row.get("final_answer") if isinstance(raw_row, dict) else None
    if isinstance(raw, (list, str)) and raw:
        parts = raw if isinstance(raw, list) else [raw]
        return "\\boxed{" + ", ".join(str(p) for p in parts) + "}", "final_answer (raw, boxed)"
    return None, "no reference solution"


def check(name: str, path: Path, timeout: float = 10.0, fast: bool = True) -> dict:
    """Rate of reference solutions the verifier accepts for one benchmark file."""
    bench = suites.get(name)
    problems = suites.load(name, source=path)
    raw_rows = [row for _, row in iter_rows(path, what="problems")] if bench.kind == "math" else [None] * len(problems)
    preds, golds, kept, kinds = [], [], [], {}
    skipped = 0
    for p, row in zip(problems, raw_rows):
        pred, kind = reference_prediction(p, row)
        if pred is None:
            skipped += 1
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        preds.append(pred)
        golds.append(p)
        kept.append(p)
    if bench.kind == "zebra":
        ok = bench.grade_many(preds, golds)
    else:
        ok = verify_many(preds, [p.answer for p in golds], timeout=timeout, fast=fast)
    failures = [{"id": p.id, "gold": p.answer, "reference_answer": last_boxed(pred) or pred[-200:]}
                for p, pred, good in zip(kept, preds, ok) if not good]
    n = len(kept)
    return {"rate": (sum(ok) / n) if n else None, "n": n, "correct": int(sum(ok)), "skipped": skipped,
            "reference": kinds, "file": str(path), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.check_graders", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="benchmark files (default: $NPR_DATA_DIR or ../shared/benchmarks)")
    ap.add_argument("--benchmarks", default="all", help="comma-separated names, or 'all' (those with a file)")
    ap.add_argument("--json", default=None, help="write the rates here")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per math-verify call")
    ap.add_argument("--math-verify-only", action="store_true",
                    help="skip the verifier's fast path (string/number equality): every pair goes to math-verify")
    ap.add_argument("--min-rate", type=float, default=None, help="exit 1 if a checked benchmark is below this")
    ap.add_argument("--show", type=int, default=10, help="failures printed per benchmark")
    args = ap.parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else suites.default_data_dir()
    if data_dir is None or not data_dir.is_dir():
        print(f"error: no benchmark folder ({args.data_dir or 'pass --data-dir'})", file=sys.stderr)
        return 2
    out: dict[str, dict] = {}
    for name in suites.parse_names(args.benchmarks):
        path = suites.get(name).find_file(data_dir)
        if path is None:
            continue
        res = check(name, path, args.timeout, fast=not args.math_verify_only)
        if res["n"] == 0:
            print(f"{name:14s}  skipped: no reference solutions in {path}")
            continue
        out[name] = res
        print(f"{name:14s}  rate {res['rate']:.4f}  ({res['correct']}/{res['n']}; reference: "
              f"{', '.join(f'{k} x{v}' for k, v in res['reference'].items())})")
        for f in res["failures"][:args.show]:
            print(f"    FAIL {f['id']}: gold {f['gold']!r:.80}  reference {f['reference_answer']!r:.80}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not out:
        print(f"error: no benchmark file with reference solutions under {data_dir}", file=sys.stderr)
        return 2
    if args.min_rate is not None and any(r["rate"] < args.min_rate for r in out.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
