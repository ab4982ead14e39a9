"""Pictures of an execution graph: an indented text tree (``render_ansi``) and an RGB image (``render_rgb``).

Both read the graph and never change it, so the envs, the engine's logs and the trainer's TensorBoard images
can call them on any graph, including an invalid or unfinished one.
"""

from __future__ import annotations

import numpy as np

from .graph import KIND_NAMES, ExecutionGraph
from .schema import NUMBER_PREFIX, STEP_CLOSE, STEP_OPEN, last_boxed, plan_number

# One colour per token kind (graph.KIND_NAMES order): prompt, text, guideline, plan, step, takeaway, eos.
KIND_COLORS = ("#b8bcc4", "#4c78a8", "#f58518", "#ffbf79", "#54a24b", "#b279a2", "#e45756")


def _short(text: str, width: int) -> str:
    """One line of at most ``width`` characters (newlines shown as ⏎)."""
    text = text.replace("\n", "⏎").replace("\t", " ")
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _strip_step(text: str, number: bool = True) -> str:
    """A step's text without its tags and (``number``) its leading ``N:``, which the step's label shows."""
    text = text.replace(STEP_OPEN, "").replace(STEP_CLOSE, "")
    return (NUMBER_PREFIX.sub("", text, count=1) if number else text).strip()


def render_ansi(graph: ExecutionGraph, width: int = 100, partial: bool = False) -> str:
    """An indented tree of ``graph``: blocks, plans, parallel steps (one lane each), takeaways, the final text
    and answer, token counts per branch, and the verdict with its violations. ``width`` bounds each line.
    ``partial=True`` (a graph still being decoded) reports only the violations already certain."""
    o = graph.outline()
    s = o["stats"]
    lines = [
        f"ExecutionGraph: prompt {graph.prompt_len} tok, response {s['total_tokens']} tok, "
        f"critical path {s['critical_path_tokens']} tok, ideal speedup {s['ideal_speedup']:.2f}x",
        f"blocks {s['num_blocks']} (parallel {s['num_parallel_blocks']}), branches per block "
        f"{s['branches_per_block']}",
    ]
    lines = [_short(line, width) for line in lines]
    if o["prompt"]:
        lines.append(_short(f"prompt: {o['prompt']}", width))

    def items(its: list, prefix: str) -> None:
        its = [it for it in its if it["kind"] != "text" or it["text"].strip()]
        for n, it in enumerate(its):
            last = n == len(its) - 1
            head = prefix + ("└─ " if last else "├─ ")
            cont = prefix + ("   " if last else "│  ")
            if it["kind"] == "text":
                lines.append(_short(f"{head}text: {it['text'].strip()}", width))
                continue
            n = len(it["steps"])
            kind = "parallel" if it["parallel"] else "sequential"
            lines.append(f"{head}block (depth {it['depth']}, {kind}, {n} branch{'es' if n != 1 else ''})")
            lines.append(f"{cont}├─ guideline")
            for k, p in enumerate(it["plans"]):
                mark = "└─" if k == len(it["plans"]) - 1 else "├─"
                lines.append(_short(f"{cont}│  {mark} plan {p['text'].strip()}", width))
            lane = "║" if it["parallel"] else "│"
            for st in it["steps"]:
                first = st["items"][0]["text"] if st["items"] and st["items"][0]["kind"] == "text" else ""
                # An open step has no number yet: read it from its text so far.
                number = st["number"] or plan_number(first.replace(STEP_OPEN, "")) or "?"
                label = f"{cont}├─ {lane} step {number} ({st['tokens']} tok)"
                if all(x["kind"] == "text" for x in st["items"]):
                    body = _strip_step("".join(x["text"] for x in st["items"]))
                    lines.append(_short(f"{label}: {body}", width))
                else:  # a step with blocks of its own: its text and blocks in order, one level deeper
                    lines.append(label)
                    sub = [dict(x, text=_strip_step(x["text"], number=k == 0)) if x["kind"] == "text" else x
                           for k, x in enumerate(st["items"])]
                    items(sub, cont + "│    ")
            take = it["takeaway"]
            take = take.strip() if take is not None else "(none)"
            lines.append(_short(f"{cont}└─ takeaway: {take}", width))

    items(o["items"], "")
    answer = last_boxed(graph.final_text())
    lines.append(_short(f"answer: {answer if answer is not None else '(none)'}", width))
    found = graph.violations_so_far() if partial else graph.violations
    if partial:
        lines.append("verdict: in progress, " + ("no violation so far" if not found else "violations so far:"))
    elif not found:
        lines.append("verdict: valid (format score 0)")
    else:
        lines.append(f"verdict: INVALID, format score {graph.format_score():.2f}")
    for v in found:
        at = f"@{v.index}" if v.index >= 0 else "@end"
        lines.append(_short(f"  - {v.code} {at}: {v.message}", width))
    return "\n".join(lines)


def _verdict(graph: ExecutionGraph, partial: bool) -> tuple[str, str]:
    """One-line verdict and its colour for the picture."""
    found = graph.violations_so_far() if partial else graph.violations
    codes = ", ".join(dict.fromkeys(v.code for v in found))
    if partial:
        return ("in progress: " + (f"violations so far: {codes}" if found else "no violation so far"),
                "#c62828" if found else "#555555")
    if not found:
        return "valid", "#2f7d32"
    return f"invalid ({graph.format_score():.1f}): {codes}", "#c62828"


def _lanes(graph: ExecutionGraph) -> tuple[dict[int, int], list[str], list[tuple]]:
    """Lane of each trace (depth-first: a parallel step gets its own lane, a sequential one stays in its
    parent's lane), lane labels (``B2.1`` = block 2, step 1), and fork/join links
    ``(parent_lane, child_lane, fork_pos, end_pos, join_pos)``."""
    lane: dict[int, int] = {}
    labels = ["main"]
    links: list[tuple] = []
    block_no = {id(b): i + 1 for i, b in enumerate(graph.blocks)}

    def walk(t, my_lane: int) -> None:
        lane[t.uid] = my_lane
        for b in t.blocks:
            tk = b.takeaway
            join_pos = t.pos[tk.start - 1] if tk is not None and 0 < tk.start <= len(t.pos) else None
            for c in b.children:
                if b.parallel:
                    number = (c.segment.number if c.segment else None) or c.index + 1
                    labels.append(f"B{block_no[id(b)]}.{number}")
                    walk(c, len(labels) - 1)
                    start = c.pos[0] if c.pos else b.fork_pos
                    links.append((my_lane, lane[c.uid], start, c.next_pos - 1, join_pos))
                else:
                    walk(c, my_lane)

    walk(graph.root, 0)
    return lane, labels, links


def _runs(pos: list[int], kinds: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start_pos, length, kind)`` of consecutive positions with the same kind."""
    out: list[tuple[int, int, int]] = []
    for p, k in zip(pos, kinds):
        if out and out[-1][2] == k and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1, k)
        else:
            out.append((p, 1, k))
    return out


def render_rgb(graph: ExecutionGraph, width: int = 1000, height: int = 420, title: str | None = None,
               partial: bool = False) -> np.ndarray:
    """The graph as an ``(height, width, 3)`` uint8 image: x is the position id, every parallel branch is a
    lane (the main line on top), tokens are coloured by kind, with fork/join links, per-lane token counts, a
    legend and the verdict (``partial``: as in :func:`render_ansi`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lane, labels, links = _lanes(graph)
    n_lanes = len(labels)
    n_pos = max((t.next_pos for t in graph.traces), default=1)

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.2, 0.9, 0.62))
    for i, b in enumerate(graph.blocks):  # faint band over the span of each top-level round
        if b.depth == 1 and b.parent is graph.root:
            t = b.parent
            lo = t.pos[b.guideline_start] if b.guideline_start < len(t.pos) else n_pos
            tk = b.takeaway
            if tk is not None and 0 <= tk.end < len(t.pos):
                hi = t.pos[tk.end]
            else:  # no takeaway (yet): the band ends with the longest step
                hi = max((c.next_pos - 1 for c in b.children), default=lo)
            ax.axvspan(lo - 0.5, hi + 0.5, color="#000000" if i % 2 else "#4c78a8", alpha=0.04, lw=0)
    bar, fine = 0.7, n_pos <= 160
    for t in graph.traces:
        runs = _runs(t.pos, t.kinds)
        y = lane[t.uid]
        for kind in range(len(KIND_COLORS)):
            if fine:  # one cell per token, so short graphs can be read token by token
                spans = [(p + i - 0.5, 1) for p, n, k in runs if k == kind for i in range(n)]
            else:
                spans = [(p - 0.5, n) for p, n, k in runs if k == kind]
            if spans:
                ax.broken_barh(spans, (y - bar / 2, bar), facecolors=KIND_COLORS[kind],
                               edgecolor="white" if fine else "none", lw=0.4 if fine else 0)
    for parent, child, start, end, join in links:  # fork: parent -> lane start; join: lane end -> takeaway
        ax.annotate("", xy=(start - 0.5, child - bar / 2), xytext=(start - 0.5, parent + bar / 2),
                    arrowprops={"arrowstyle": "-|>", "color": "#444444", "lw": 0.7, "shrinkA": 0,
                                "shrinkB": 0, "mutation_scale": 7})
        if join is not None:
            ax.plot([end + 0.5, join - 0.5], [child, parent + bar / 2], color="#777777", lw=0.6, ls=":")
    for t in graph.traces:  # token count at the end of each parallel lane
        if t.pos and lane[t.uid] != 0 and t.parent is not None and t.parent.parallel:
            ax.text(t.next_pos - 0.5 + n_pos * 0.004, lane[t.uid], str(len(t.ids)), va="center", ha="left",
                    fontsize=7, color="#333333")
    ax.set_yticks(range(n_lanes))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(max(n_lanes, 4) - 0.5, -0.5)  # thin lanes even when there are few
    ax.set_xlim(-0.5, n_pos - 0.5 + max(3.0, n_pos * 0.04))
    ax.set_xlabel("position id", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    s = graph.stats
    fig.text(0.5, 0.955, title or "NPR execution graph", ha="center", va="top", fontsize=10, weight="bold")
    fig.text(0.5, 0.905, f"{s.total_tokens} response tokens, critical path {s.critical_path_tokens}, "
             f"{s.num_parallel_blocks}/{s.num_blocks} parallel blocks, ideal speedup {s.ideal_speedup:.2f}x",
             ha="center", va="top", fontsize=8)
    verdict, color = _verdict(graph, partial)
    fig.text(0.5, 0.865, _short(verdict, 150), ha="center", va="top", fontsize=8, color=color)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in zip(KIND_NAMES, KIND_COLORS)], loc="lower center",
               ncol=len(KIND_NAMES), fontsize=8, frameon=False)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
