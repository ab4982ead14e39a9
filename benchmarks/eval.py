"""``python -m benchmarks.eval``: the benchmark suite's front end, the same command as ``npr eval``.

    python -m benchmarks.eval --model runs/tiny/stage3 --benchmarks math500,amc23,zebralogic \\
        --data-dir ../shared/benchmarks --limit 8 --compare-sequential --out runs/eval/tiny

The pieces live where the rest of the project can use them without importing this package:

* ``npr_env.suites``: the eight benchmarks, where their problems come from and how an answer is graded;
* ``npr_agent.evaluate``: model loading, prompts, ``run_benchmark`` and the command itself (``main``);
* ``npr_agent.eval_metrics``: avg@k, pass@k, format-valid and parallel rates, speedup (definitions there);
* ``npr_agent.eval_report``: ``results.json``, ``results.md``, ``accuracy.png``, ``speedup.png``, ``samples.jsonl``.
"""

from __future__ import annotations

import sys

from npr_agent.evaluate import (
    build_parser,
    hardware,
    is_char_tokenizer,
    load_model,
    main,
    parse_k,
    prompt_config,
    run_benchmark,
)

__all__ = ["build_parser", "hardware", "is_char_tokenizer", "load_model", "main", "parse_k", "prompt_config",
           "run_benchmark"]

if __name__ == "__main__":
    sys.exit(main())
