"""render_ansi / render_rgb on valid, nested, invalid, empty and unfinished graphs; the envs' render modes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npr_env
from npr_env.envs import NPRMathEnv, NPRMathTextEnv
from npr_env.graph import ExecutionGraph
from npr_env.render import KIND_COLORS, render_ansi, render_rgb
from npr_env.schema import TAGS, format_block

TOK = npr_env.load_tokenizer()
PROMPT = "What is 23*4 + 51*7?"
NESTED = (format_block(["compute 23*4", "compute 51*7"], [
    "23*4 = 92",
    "<guideline><plan>1: 50*7</plan><plan>2: 1*7</plan></guideline><step>1: 50*7 = 350</step>"
    "<step>2: 1*7 = 7.</step><takeaway>350+7 = 357</takeaway> so 357"], "92 + 357 = 449") + "So \\boxed{449}")
OPEN_STEP = "<guideline><plan>1: abc</plan><plan>2: abc</plan></guideline><step>1: ab"
INVALID = "<guideline><plan>1: x</plan></guideline><step>1: abc</step></step>oops"


def graph(text, prompt=PROMPT):
    return ExecutionGraph.from_text(text, TOK, prompt=prompt)


def rgb_of(hex_color):
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


def has_color(img, hex_color, tol=3):
    return bool((np.abs(img.astype(int) - rgb_of(hex_color)).max(-1) <= tol).any())


def test_ansi_tree_of_a_nested_graph():
    text = render_ansi(graph(NESTED))
    lines = text.splitlines()
    assert lines[0].startswith("ExecutionGraph: prompt 20 tok")
    assert "blocks 2 (parallel 2), branches per block [2, 2]" in text
    assert any(line.startswith("├─ block (depth 1, parallel, 2 branches)") for line in lines)
    assert any("block (depth 2, parallel, 2 branches)" in line for line in lines)
    assert any("║ step 1 (" in line and line.endswith("23*4 = 92") for line in lines)
    assert any("plan 2: 1*7" in line for line in lines)
    assert any(line.strip().endswith("takeaway: 350+7 = 357") for line in lines)
    assert any(line.strip().endswith("text: so 357") for line in lines)  # the step's text after its block
    assert lines[-2:] == ["answer: 449", "verdict: valid (format score 0)"]
    # The nested block sits one level below its step, inside the top block.
    top = next(i for i, line in enumerate(lines) if "depth 1" in line)
    inner = next(i for i, line in enumerate(lines) if "depth 2" in line)
    assert inner > top and lines[inner].index("├─ block") > lines[top].index("├─ block")


def test_ansi_shows_violations_and_missing_parts():
    text = render_ansi(graph(INVALID, prompt=""))
    assert "takeaway: (none)" in text and "answer: (none)" in text
    assert "verdict: INVALID, format score -2.00" in text
    for code in ("EMPTY_PLAN", "STRAY_CLOSING_TAG", "MISSING_ANSWER"):
        assert f"- {code} @" in text
    assert "prompt:" not in text  # no prompt, no prompt line


def test_ansi_of_an_empty_graph_and_line_width():
    text = render_ansi(ExecutionGraph(TOK))
    assert "NO_BLOCK" in text and "response 0 tok" in text
    long = graph(format_block(["x" * 300, "y" * 300], ["a" * 300, "b" * 300], "c" * 300) + "\\boxed{1}")
    assert max(len(line) for line in render_ansi(long, width=80).splitlines()) <= 80


def test_partial_verdict_reports_only_certain_violations():
    g = graph(OPEN_STEP)
    assert render_ansi(g, partial=True).splitlines()[-1] == "verdict: in progress, no violation so far"
    assert "UNCLOSED_TAG" in render_ansi(g)  # as a complete response, the open step is a violation
    text = render_ansi(graph(OPEN_STEP + "</plan>"), partial=True)
    assert "violations so far:" in text and "- STRAY_CLOSING_TAG @" in text and "UNCLOSED_TAG" not in text
    assert render_rgb(g, partial=True, width=300, height=200).shape == (200, 300, 3)


def test_rgb_picture():
    img = render_rgb(graph(NESTED))
    assert img.shape == (420, 1000, 3) and img.dtype == np.uint8
    for kind in ("prompt", "text", "guideline", "plan", "step", "takeaway"):  # every kind present is drawn
        assert has_color(img, KIND_COLORS[npr_env.graph.KIND_NAMES.index(kind)])
    assert render_rgb(graph(NESTED), width=640, height=300).shape == (300, 640, 3)
    assert (img < 250).any() and (img > 250).any()


def test_rgb_lanes_follow_the_branches():
    """A 3-way block draws three step lanes below the main one: more step-coloured rows than a 2-way block."""
    step = KIND_COLORS[npr_env.graph.KIND_NAMES.index("step")]

    def step_rows(n):
        text = format_block([f"p{i} aaa" for i in range(n)], [f"s{i} xxxxxx" for i in range(n)], "zzzzzz")
        img = render_rgb(graph(text + "\\boxed{1}", prompt=""))
        rows = (np.abs(img.astype(int) - rgb_of(step)).max(-1) <= 3).any(1)
        rows = rows[: int(img.shape[0] * 0.85)]  # above the legend
        return int(np.sum(rows[1:] & ~rows[:-1]))  # number of separate vertical runs of step colour

    assert step_rows(3) == 3 and step_rows(2) == 2


@pytest.mark.parametrize("text", ["", INVALID, OPEN_STEP, NESTED[: len(NESTED) // 2], "<eos>" + NESTED])
def test_both_renderers_accept_unfinished_and_broken_graphs(text):
    g = graph(text)
    assert render_ansi(g)
    assert render_rgb(g, width=400, height=200).shape == (200, 400, 3)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(TAGS + ("1: ", "2: ", "\\boxed{3}", "<eos>")),
                          st.text(alphabet="ab +", max_size=5)), max_size=30))
def test_render_ansi_never_raises(pieces):
    g = graph("".join(pieces))
    assert render_ansi(g).splitlines()[-1].startswith("verdict:") or "@" in render_ansi(g)


# -- the envs' render modes ----------------------------------------------------------------------------------
def test_token_env_render_modes():
    env = NPRMathEnv(max_len=128, render_mode="ansi")
    with pytest.raises(RuntimeError):
        env.render()
    env.reset(seed=0)
    assert env.render().startswith("ExecutionGraph:")
    env.step([TOK.convert_tokens_to_ids("<guideline>")] + [0] * 7)
    assert "block (depth 1" in env.render() and "in progress" in env.render()
    env = NPRMathEnv(max_len=128, render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (420, 1000, 3) and img.dtype == np.uint8
    with pytest.warns(UserWarning, match="render_mode"):
        assert NPRMathEnv(max_len=128).render() is None  # no render_mode: a warning, nothing drawn
    with pytest.raises(ValueError):
        NPRMathEnv(render_mode="human")


def test_text_env_render_modes():
    env = NPRMathTextEnv(render_mode="ansi")
    env.reset(seed=0)
    assert "response 0 tok" in env.render()
    env.step(NESTED)
    assert "answer: 449" in env.render()
    env = NPRMathTextEnv(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(NESTED)
    img = env.render()
    assert img.shape == (420, 1000, 3) and img.dtype == np.uint8
