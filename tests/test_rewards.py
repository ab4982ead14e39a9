"""Rewards: hand cases per constraint preset, and the gating properties (format never pays for a wrong answer)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npr_env
from npr_env.rewards import (
    REWARD_PRESETS,
    RewardResult,
    accuracy_reward,
    completion_text,
    format_score,
    papo_reward,
    score,
    score_many,
    stage1_reward,
    trl_accuracy_reward,
    trl_format_reward,
    trl_stage1_reward,
)
from npr_env.schema import format_block

VALID = format_block(["2*3", "4*5"], ["2*3 = 6", "4*5 = 20"], "6+20 = 26") + "\\boxed{26}"
VALID_WRONG = format_block(["2*3", "4*5"], ["2*3 = 6", "4*5 = 21"], "6+21 = 27") + "\\boxed{27}"
ONE_PLAN = format_block(["2*3+4*5"], ["2*3+4*5 = 26"], "so it is 26") + "\\boxed{26}"  # relaxed only
UNNUMBERED = ("<guideline><plan>2*3</plan><plan>4*5</plan></guideline><step>2*3 = 6</step><step>4*5 = 20</step>"
              "<takeaway>6+20 = 26</takeaway>\\boxed{26}")  # relaxed only
SHORT_STEP = format_block(["2*3", "4*5"], ["6", "4*5 = 20"], "6+20 = 26") + "\\boxed{26}"  # soft penalty
NO_ANSWER = format_block(["2*3", "4*5"], ["2*3 = 6", "4*5 = 20"], "6+20 = 26") + "26"
PLAIN = "2*3 = 6; 4*5 = 20; 6+20 = 26. \\boxed{26}"  # no block at all


def test_format_score_per_preset():
    assert format_score(VALID, "strict") == 0.0 and format_score(VALID, "relaxed") == 0.0
    assert format_score(ONE_PLAN, "relaxed") == 0.0 and -2 <= format_score(ONE_PLAN, "strict") < 0
    assert format_score(UNNUMBERED, "relaxed") == 0.0 and format_score(UNNUMBERED, "strict") < 0
    assert format_score(SHORT_STEP, "relaxed") == pytest.approx(-0.4)
    assert format_score(NO_ANSWER, "relaxed") == pytest.approx(-1.0)
    assert format_score(PLAIN, "relaxed") == pytest.approx(-1.5)
    assert format_score("", "relaxed") == pytest.approx(-1.5)


def test_format_score_of_a_graph_under_other_constraints():
    g = npr_env.parse(ONE_PLAN, constraints="relaxed")
    assert format_score(g, "relaxed") == 0.0
    assert format_score(g, "strict") < 0  # re-read under the strict rules
    assert format_score(npr_env.parse(VALID), "strict") == 0.0


def test_accuracy_reward():
    assert accuracy_reward(VALID, "26") == 1.0
    assert accuracy_reward(VALID_WRONG, "26") == -1.0
    assert accuracy_reward("26", "26") == -1.0  # no \boxed
    assert accuracy_reward("", "26") == 0.0
    assert accuracy_reward("   \n", "26") == 0.0
    assert accuracy_reward(npr_env.parse(VALID), "26") == 1.0


def test_stage1_reward_hand_cases():
    assert stage1_reward(VALID, "26") == 1.0
    assert stage1_reward(VALID_WRONG, "26") == -1.0
    assert stage1_reward(ONE_PLAN, "26") == 1.0  # relaxed: one plan is fine
    assert stage1_reward(PLAIN, "26") == pytest.approx(-1.75)  # correct but no block: gated
    assert stage1_reward(SHORT_STEP, "26") == pytest.approx(-1.2)
    # the paper's raw value, which a slightly broken response would use to outrank a valid wrong one
    assert stage1_reward(SHORT_STEP, "26", ordered=False) == pytest.approx(-0.4)
    assert stage1_reward(ONE_PLAN, "26", constraints="strict") < -1


def test_papo_reward_hand_cases():
    r = papo_reward(VALID, "26")
    assert r == RewardResult(reward=1.0, valid=True, dropped=False, format_score=0.0, correct=True)
    r = papo_reward(VALID_WRONG, "26")
    assert (r.reward, r.valid, r.dropped, r.correct) == (-1.0, True, False, False)
    r = papo_reward(ONE_PLAN, "26")  # strict: no parallel block
    assert r.dropped and not r.valid and r.correct and r.format_score < 0
    r = papo_reward(VALID, "26", truncated=True)
    assert r.dropped and r.valid
    r = papo_reward("", "26")
    assert r.reward == 0.0 and r.dropped and not r.correct


def test_score_presets_from_graphs():
    g = npr_env.parse(VALID)
    assert score("papo", g, "26") == papo_reward(VALID, "26")
    s1 = score("stage1", g, "26")
    assert s1.reward == 1.0 and s1.valid and not s1.dropped
    s1 = score("stage1", npr_env.parse(PLAIN, constraints="relaxed"), "26", truncated=True)
    assert s1.reward == pytest.approx(-1.75) and s1.correct and not s1.dropped  # stage 1 penalises
    acc = score("accuracy", PLAIN, "26")
    assert acc.reward == 1.0 and not acc.valid
    assert set(REWARD_PRESETS) >= {"stage1", "papo", "accuracy"}
    with pytest.raises(ValueError, match="unknown reward preset"):
        score("nope", g, "26")


def test_score_many_is_score_over_a_batch():
    """The batched scorer (the trainer's: verdicts on all verifier workers at once) gives score()'s results,
    for texts and graphs, every preset, answers the fast path settles and ones only math-verify can."""
    tuple_block = format_block(["A", "B"], ["A = 1+2 = 3", "B = 4"], "A=3 B=4")
    texts = [VALID, VALID_WRONG, ONE_PLAN, NO_ANSWER, PLAIN, "", tuple_block + "\\boxed{(3,4)}",
             tuple_block + "\\boxed{(4,3)}", tuple_block + "\\boxed{(3, 5)}"]
    golds = ["26"] * 6 + ["(3,4)"] * 3
    truncated = [False, True, False, False, False, False, False, True, False]
    graphs = [npr_env.ExecutionGraph.from_text(t, constraints="strict") for t in texts]
    for preset in REWARD_PRESETS:
        for responses in (texts, graphs):
            want = [score(preset, r, g, truncated=t) for r, g, t in zip(responses, golds, truncated)]
            assert score_many(preset, responses, golds, truncated) == want
    assert [r.correct for r in score_many("papo", texts, golds, truncated)] == [
        True, False, True, False, True, False, True, False, False]
    with pytest.raises(ValueError, match="unknown reward preset"):
        score_many("nope", texts, golds)
    with pytest.raises(ValueError, match="gold answers"):
        score_many("papo", texts, golds[:-1])


def test_graph_from_token_ids_with_prompt_and_eos():
    tok = npr_env.load_tokenizer()
    prompt = tok.encode("Compute 2*3 + 4*5.", add_special_tokens=False)
    resp = tok.encode(VALID, add_special_tokens=False) + [tok.eos_token_id]
    g = npr_env.ExecutionGraph.from_token_ids(prompt + resp, tok, prompt_len=len(prompt))
    assert score("papo", g, "26").reward == 1.0 and not score("papo", g, "26").dropped
    empty = npr_env.ExecutionGraph.from_token_ids(prompt + [tok.eos_token_id], tok, prompt_len=len(prompt))
    r = score("papo", empty, "26")
    assert r.reward == 0.0 and r.dropped


def test_trl_wrappers():
    comps = [VALID, VALID_WRONG, PLAIN, ""]
    answers = ["26"] * 4
    assert trl_accuracy_reward(comps, answer=answers) == [1.0, -1.0, 1.0, 0.0]
    assert trl_stage1_reward(comps, answer=answers) == pytest.approx([1.0, -1.0, -1.75, -1.75])
    assert trl_format_reward(comps) == pytest.approx([0.0, 0.0, -1.5, -1.5])
    chat = [[{"role": "assistant", "content": c}] for c in comps]
    assert trl_accuracy_reward(chat, answer=answers, prompts=["q"] * 4) == [1.0, -1.0, 1.0, 0.0]
    assert trl_stage1_reward(completions=chat, answer=answers) == trl_stage1_reward(comps, answer=answers)
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    with pytest.raises(KeyError, match="answer"):
        trl_accuracy_reward(comps)
    with pytest.raises(ValueError):
        trl_accuracy_reward(comps, answer=["26"])


# -- properties -----------------------------------------------------------------------------------------------
@st.composite
def responses(draw):
    """Responses that may be valid or not, right or wrong, short or very long (mostly well-formed pieces)."""
    n = draw(st.integers(1, 4))
    good = draw(st.integers(0, 3)) > 0  # 3 in 4: the structure is well formed
    plans = [draw(st.sampled_from(["2*3", "4*5", "6*7", "x*y*z"] + ([] if good else ["a", ""]))) for _ in range(n)]
    n_steps = n if good else draw(st.integers(max(0, n - 1), n + 1))
    long_step = "long " * draw(st.integers(1, 50))
    steps = [draw(st.sampled_from(["2*3 = 6", "4*5 = 20", long_step] + ([] if good else ["6"])))
             for _ in range(n_steps)]
    take = draw(st.sampled_from(["6+20 = 26", "compare " * draw(st.integers(1, 30))] + ([] if good else ["ok"])))
    g = "".join(f"<plan>{i + 1}: {p}</plan>" for i, p in enumerate(plans))
    s = "".join(f"<step>{i + 1}: {t}</step>" for i, t in enumerate(steps))
    block = f"<guideline>{g}</guideline>{s}<takeaway>{take}</takeaway>" if good or draw(st.booleans()) else ""
    filler = "blah " * draw(st.integers(0, 200))
    answer = draw(st.sampled_from(["\\boxed{26}", "\\boxed{27}", "\\boxed{}", "26", "\\boxed{\\frac{52}{2}}"]))
    return draw(st.sampled_from([block + answer, block + filler + answer, filler + block + answer, filler]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(responses(), min_size=6, max_size=6))
def test_stage1_gating_orders_correct_over_wrong_over_invalid(batch):
    rows = []
    for text in batch + [VALID, VALID_WRONG, SHORT_STEP]:
        r, fs, ok = stage1_reward(text, "26"), format_score(text, "relaxed"), accuracy_reward(text, "26") == 1.0
        if fs == 0:
            assert r == (1.0 if ok else -1.0)
        else:
            assert -2.0 <= r < -1.0
        rows.append((r, fs, ok))
    for ra, fa, ca in rows:
        for rb, fb, cb in rows:
            if fa == 0 and fb == 0 and ca and not cb:
                assert ra > rb  # a wrong-but-valid answer never scores above a correct one, however long
            if fa == 0 and fb < 0:
                assert ra > rb  # an invalid answer never scores above a valid one, right or wrong
            if fa < 0 and fb < 0 and fa < fb:
                assert ra < rb  # among invalid ones, the better format score still ranks higher


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=responses(), truncated=st.booleans())
def test_papo_invariants(text, truncated):
    r = papo_reward(text, "26", truncated=truncated)
    assert r.reward in (-1.0, 0.0, 1.0)
    assert r.valid == (r.format_score == 0.0)
    assert r.dropped == ((not r.valid) or truncated)
    assert r.correct == (r.reward == 1.0)
    assert r.reward == accuracy_reward(text, "26")


@settings(max_examples=30, deadline=None)
@given(filler=st.integers(0, 400))
def test_length_never_pays(filler):
    # a long wrong answer with valid format can never beat a short correct one, under any preset
    long_wrong = format_block(["2*3", "4*5"], ["2*3 = 6 " + "x" * filler, "4*5 = 21"], "6+21 = 27") + "\\boxed{27}"
    for preset in REWARD_PRESETS:
        assert score(preset, long_wrong, "26").reward < score(preset, VALID, "26").reward


tag_soup = st.lists(st.sampled_from(list(npr_env.TAGS) + ["1: ", "2: ", "2*3 = 6", "x", " ", "\\boxed{26}",
                                                          "\\boxed{", "}", "<eos>", "\n"]), max_size=30)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=tag_soup, truncated=st.booleans())
def test_any_token_soup_gets_a_verdict(parts, truncated):
    text = "".join(parts)
    for preset in REWARD_PRESETS:
        r = score(preset, text, "26", truncated=truncated)
        assert isinstance(r, RewardResult) and -2.0 <= r.reward <= 1.0
        assert r == score(preset, text, "26", truncated=truncated)  # deterministic
