"""Run logging: TensorBoard scalars (namespaced, CleanRL style), a JSONL copy, a progress bar, a PNG summary.

Every scalar goes to TensorBoard under ``<run>/<stage>/`` and, as one JSON line per step, to
``<run>/metrics.jsonl`` (what the summary plot and the tests read).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

KEY_FIGURES = ("reward/mean", "accuracy/train", "format/valid_rate", "parallel/rate", "loss/policy", "loss/sft")


class RunLogger:
    def __init__(self, run_dir: str | Path, config_json: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, SummaryWriter] = {}
        self._writer_cls = SummaryWriter
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.last_step: dict[str, int] = {}
        self.config_json = config_json
        if config_json is not None:
            (self.run_dir / "config.json").write_text(config_json)

    def writer(self, stage: str):
        w = self._writers.get(stage)
        if w is None:
            w = self._writers[stage] = self._writer_cls(str(self.run_dir / "tb" / stage))
            if self.config_json is not None:
                w.add_text("hyperparameters", "```\n" + self.config_json + "\n```", 0)
        return w

    def log(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        self.last_step[stage] = max(step, self.last_step.get(stage, step))
        w = self.writer(stage)
        for k, v in clean.items():
            w.add_scalar(k, v, step)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **clean}) + "\n")

    def _lines(self):
        """``(line, row)`` for each line of metrics.jsonl; ``row`` is None for a line cut by a kill mid-write."""
        if not self.metrics_path.exists():
            return
        for line in self.metrics_path.read_text().splitlines():
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                yield line, None

    def total(self, stage: str, key: str, until_step: int) -> float:
        """The sum of ``key`` over ``stage``'s logged rows with ``step <= until_step`` (what a resumed stage has
        already spent)."""
        return sum(float(row[key]) for _, row in self._lines()
                   if row is not None and row.get("stage") == stage and row.get("step", 0) <= until_step and key in row)

    def drop_after(self, stage: str, step: int | None = None, time_s: float | None = None) -> int:
        """Remove ``stage``'s rows past a resume point: those with a step above ``step``, or written after
        ``time_s``. A resumed stage re-runs those steps, so each step is logged once. Returns how many were
        removed; the file is rewritten atomically."""
        from .files import atomic_write_text

        if (step is None) == (time_s is None):
            raise ValueError("drop_after takes exactly one of step and time_s")
        if not self.metrics_path.exists():
            return 0
        keep, dropped = [], 0
        for line, row in self._lines():
            if row is None:  # a line cut by a kill mid-write
                dropped += 1
                continue
            past = row.get("step", 0) > step if step is not None else row.get("time", 0.0) > time_s
            if row.get("stage") == stage and past:
                dropped += 1
            else:
                keep.append(line + "\n")
        if dropped:
            atomic_write_text(self.metrics_path, "".join(keep))
        return dropped

    def text(self, stage: str, tag: str, text: str, step: int = 0) -> None:
        self.writer(stage).add_text(tag, text, step)

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def progress(total: int, desc: str, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=disable, leave=True)


@contextmanager
def library_progress(enabled: bool):
    """transformers' own progress bars (loading and writing checkpoints) on or off for the block, as ours are;
    the setting it found is restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if enabled != was:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if enabled != was:
            (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def postfix(metrics: dict) -> dict:
    """The key figures for the progress bar, short names, 3 significant digits."""
    out = {}
    for k in KEY_FIGURES:
        if k in metrics:
            out[k.split("/")[-1] if k != "accuracy/train" else "acc"] = f"{metrics[k]:.3g}"
    return out


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return rows


SUMMARY_PANELS = (  # (title, [(key, style label)]): train curves solid, held-out evals dashed with markers
    ("reward (train rollouts)", [("reward/mean", "train")]),
    ("accuracy", [("accuracy/train", "train"), ("accuracy/eval", "held-out")]),
    ("format valid rate", [("format/valid_rate", "train"), ("eval/valid_rate", "held-out")]),
    ("parallel rate", [("parallel/rate", "train"), ("eval/parallel_rate", "held-out")]),
    ("ideal speedup (total / critical path)", [("parallel/speedup_ideal", "train"), ("eval/speedup_ideal", "held-out")]),
    ("loss", [("loss/sft", "sft"), ("loss/policy", "policy")]),
)


def plot_summary(metrics_path: str | Path, out_png: str | Path) -> Path:
    """One PNG with the main curves across stages (x = optimisation steps, stage boundaries marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    stages = []
    for r in rows:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    # Each stage gets an equal-width segment of the x axis (SFT stages have far more steps than RL ones).
    span = {s: max([r["step"] for r in rows if r["stage"] == s] + [0]) + 1 for s in stages}
    offsets = {s: float(i) for i, s in enumerate(stages)}

    def x(r):
        return offsets[r["stage"]] + r["step"] / span[r["stage"]]

    fig, axes = plt.subplots(3, 2, figsize=(12, 10))
    colors = dict(zip(stages, ["#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"]))
    for ax, (title, curves) in zip(axes.flat, SUMMARY_PANELS):
        for key, label in curves:
            held = label == "held-out"
            for i, s in enumerate(stages):
                pts = [(x(r), r[key]) for r in rows if r["stage"] == s and key in r]
                if pts:
                    xs, ys = zip(*pts)
                    # An RL stage's step-0 eval repeats the previous stage's last one at the boundary: draw
                    # earlier stages on top so that point keeps the colour of the stage that produced it.
                    ax.plot(xs, ys, color=colors[s], ls="--" if held else "-", marker="o" if held else None,
                            ms=4, lw=1.6 if held else 1.0, alpha=1.0 if held else 0.8,
                            zorder=3 + len(stages) - i if held else 2)
        for s in stages:
            ax.axvline(offsets[s], color="#cccccc", lw=0.8, ls=":")
            ax.text(offsets[s] + 0.02, 1.0, f"{s} ({span[s]} steps)", transform=ax.get_xaxis_transform(),
                    fontsize=7, color=colors[s], va="bottom")
        ax.set_title(title, pad=12)
        ax.set_xlabel("stage progress (each stage scaled to the same width)")
        ax.set_xticks([])
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[s], lw=2, label=s) for s in stages]
    handles += [Line2D([], [], color="k", lw=1, label="train rollouts / SFT"),
                Line2D([], [], color="k", ls="--", marker="o", label="held-out eval")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
