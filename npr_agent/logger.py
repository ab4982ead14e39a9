"""Run logging: TensorBoard scalars (namespaced, CleanRL style), a JSONL copy, a progress bar, a PNG summary.

Every scalar goes to TensorBoard under ``<run>/<stage>/`` and, as one JSON line per step, to
``<run>/metrics.jsonl`` (what the summary plot and the tests read).
"""

from __future__ import annotations

import json
import math
import time
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
        w = self.writer(stage)
        for k, v in clean.items():
            w.add_scalar(k, v, step)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **clean}) + "\n")

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


SUMMARY_CURVES = (
    ("reward/mean", "reward"),
    ("accuracy/eval", "held-out accuracy"),
    ("parallel/rate", "parallel rate"),
    ("parallel/speedup_ideal", "ideal speedup"),
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
    offsets, off = {}, 0
    for s in stages:
        offsets[s] = off
        off += max([r["step"] for r in rows if r["stage"] == s] + [0]) + 1
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    colors = {s: c for s, c in zip(stages, ["#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"])}
    for ax, (key, title) in zip(axes.flat, SUMMARY_CURVES):
        for s in stages:
            pts = [(r["step"] + offsets[s], r[key]) for r in rows if r["stage"] == s and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, color=colors[s], label=s)
        for s in stages[1:]:
            ax.axvline(offsets[s] - 0.5, color="#cccccc", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("step (stages concatenated)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
