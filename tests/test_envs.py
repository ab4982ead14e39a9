"""NPR-Math-v0 (token level, natively parallel) and NPR-MathText-v0 (text level)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npr_env
from npr_env import rewards
from npr_env.envs import AnyText, NPRMathEnv, NPRMathTextEnv, branch_path, register_envs
from npr_env.graph import ExecutionGraph
from npr_env.layout import Layout
from npr_env.schema import TAGS
from npr_env.tasks import ProceduralTasks

register_envs()  # until npr_env/__init__ calls it
TOK = npr_env.load_tokenizer()
PROBLEMS = ProceduralTasks(seed=0, num_subproblems=(2, 4), digits=(2, 1)).sample(6)
NESTED = ProceduralTasks(seed=1, num_subproblems=(2, 3), nesting=1).sample(1)[0]


def _fresh_check_env(env):
    """check_env, returning the warnings it raised (minus the spec one, which a direct constructor causes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    return [str(w.message) for w in caught if "not having a spec" not in str(w.message)]


def play_solution(env: NPRMathEnv, problem, text: str | None = None, seed: int = 0):
    """Drive the env with a scripted policy: each active slot gets the next token of its own branch in the
    serially parsed solution (the env forced the `<step>N:` and `<takeaway>` tokens itself), and the root
    ends with <eos>. Assumes every fork is accepted (enough slots). Returns the last transition, the most
    slots active at once, and the prompt length."""
    text = problem.solutions["parallel"] if text is None else text
    obs, info = env.reset(seed=seed, options={"problem": problem})
    plen = int(obs["length"])
    ids = obs["tokens"][:plen].tolist() + TOK.encode(text, add_special_tokens=False)
    ref = ExecutionGraph.from_token_ids(ids, TOK, prompt_len=plen, constraints=env.constraints)
    branches = {branch_path(t): t.ids for t in ref.traces}
    most = 0
    for _ in range(10_000):
        action = np.zeros(env.num_slots, dtype=np.int64)
        for s in np.flatnonzero(obs["active"]):
            ids, n = branches[info["slot_paths"][s]], info["slot_lengths"][s]
            assert obs["tokens"][obs["frontier"][s]] == ids[n - 1]  # the frontier is the slot's last token
            action[s] = ids[n] if n < len(ids) else TOK.eos_token_id
        most = max(most, int(obs["active"].sum()))
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            assert truncated or info["declined_forks"] == 0, "this policy needs every fork accepted"
            return obs, reward, terminated, truncated, info, most, plen
    raise AssertionError("the scripted episode never ended")


# -- registration and the Gymnasium API ---------------------------------------------------------------------
def test_register_is_idempotent_and_make_works():
    register_envs()
    register_envs()
    for env_id in ("NPR-Math-v0", "npr_env:NPR-Math-v0", "NPR-MathText-v0", "npr_env:NPR-MathText-v0"):
        env = gym.make(env_id)
        obs, info = env.reset(seed=3)
        assert info["problem_id"].startswith("arith-")
        env.close()
    assert isinstance(gym.make("NPR-Math-v0").unwrapped, NPRMathEnv)


@pytest.mark.parametrize("render_mode", [None, "ansi", "rgb_array"])
def test_check_env_token_level(render_mode):
    env = gym.make("NPR-Math-v0", max_len=128, render_mode=render_mode)
    assert _fresh_check_env(env.unwrapped) == []


@pytest.mark.parametrize("render_mode", [None, "ansi", "rgb_array"])
def test_check_env_text_level(render_mode):
    env = gym.make("NPR-MathText-v0", render_mode=render_mode)
    assert _fresh_check_env(env.unwrapped) == []


def test_reset_seed_fixes_the_problem():
    env = NPRMathEnv(max_len=128)
    a = env.reset(seed=11)[1]["problem_id"]
    b = env.reset(seed=11)[1]["problem_id"]
    c = [env.reset(seed=s)[1]["problem_id"] for s in range(8)]
    assert a == b and len(set(c)) > 1
    env = NPRMathEnv(tasks=ProceduralTasks(seed=5), max_len=128)  # an indexable source: the env RNG draws
    assert env.reset(seed=2)[1]["problem_id"] == env.reset(seed=2)[1]["problem_id"]


def test_observation_shapes_and_initial_state():
    env = NPRMathEnv(max_len=160, num_slots=6, max_depth=3)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert obs["hide_lo"].shape == (160, 3) and obs["frontier"].shape == (6,)
    n = int(obs["length"])
    assert obs["active"].tolist() == [1, 0, 0, 0, 0, 0] and obs["frontier"][0] == n - 1
    assert (obs["tokens"][n:] == TOK.pad_token_id).all() and obs["forced"].sum() == 0
    assert obs["positions"][:n].tolist() == list(range(n))
    assert TOK.decode(obs["tokens"][:n].tolist()) == f"<|user|>{env.problem.question}<|assistant|>"
    env2 = NPRMathEnv(max_len=1024, instruction=True)
    obs2, _ = env2.reset(seed=0)
    assert npr_env.INSTRUCTION in TOK.decode(obs2["tokens"][: int(obs2["length"])].tolist())


# -- vector envs with a random policy ------------------------------------------------------------------------
@pytest.mark.parametrize("mode,n", [("sync", 4), ("async", 2)])
def test_vector_env_random_policy_reaches_the_end(mode, n):
    envs = gym.make_vec("NPR-Math-v0", num_envs=n, vectorization_mode=mode, max_len=96)
    try:
        obs, _ = envs.reset(seed=0)
        envs.action_space.seed(0)
        assert obs["tokens"].shape == (n, 96) and obs["hide_lo"].shape[:2] == (n, 96)
        done, returns = np.zeros(n, bool), np.zeros(n)
        for _ in range(200):
            obs, r, term, trunc, _ = envs.step(envs.action_space.sample())
            returns += np.where(done, 0.0, r)
            done |= term | trunc
            if done.all():
                break
        assert done.all()
        # Random tokens break the structure (or fill the buffer): stage1 punishes invalid output below -1.
        assert (returns < -1).all()
    finally:
        envs.close()


# -- scripted valid solutions --------------------------------------------------------------------------------
@pytest.mark.parametrize("problem", PROBLEMS[:4], ids=lambda p: p.id)
def test_scripted_parallel_solution_is_rewarded_and_laid_out_by_the_graph(problem):
    env = NPRMathEnv(max_len=512)
    obs, reward, terminated, truncated, info, most, plen = play_solution(env, problem)
    n_plans = problem.meta["num_subproblems"]
    assert terminated and not truncated
    assert reward == 1.0 and info["correct"] and info["valid"] and info["answer"] == problem.answer
    assert most == n_plans  # the root waits while its n children run side by side
    assert info["forks"] == 1 and info["declined_forks"] == 0
    assert info["stats"]["branches_per_block"] == [n_plans] and info["stats"]["num_parallel_blocks"] == 1

    L = int(obs["length"])
    ref = ExecutionGraph.from_token_ids(obs["tokens"][:L], TOK, prompt_len=plen)
    assert ref.is_valid
    assert np.array_equal(obs["positions"][:L], ref.position_ids())
    lay = ref.layout()
    d = lay.hide_lo.shape[1]
    assert np.array_equal(obs["hide_lo"][:L, :d], lay.hide_lo)
    assert np.array_equal(obs["hide_hi"][:L, :d], lay.hide_hi)
    assert not obs["hide_lo"][:L, d:].any() and not obs["hide_hi"][:L, d:].any()
    got = Layout(obs["positions"][:L], obs["hide_lo"][:L], obs["hide_hi"][:L]).dense_mask()
    assert np.array_equal(got, ref.attention_mask())
    # Forced: `<step>` + "N:" for every child and one `<takeaway>`; nothing else.
    forced = [TOK.decode([t]) for t in obs["tokens"][:L][obs["forced"][:L] == 1]]
    want = [x for i in range(1, n_plans + 1) for x in ("<step>", str(i), ":")] + ["<takeaway>"]
    assert forced == want and info["forced_tokens"] == len(want)
    assert not obs["active"].any() and (obs["frontier"] == -1).all()


def test_scripted_wrong_answer_is_minus_one():
    p = PROBLEMS[0]
    wrong = p.solutions["parallel"].replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}")
    _, reward, terminated, _, info, _, _ = play_solution(NPRMathEnv(max_len=512), p, wrong)
    assert terminated and reward == -1.0 and info["valid"] and not info["correct"]


def test_nested_blocks_fork_into_more_slots():
    env = NPRMathEnv(max_len=1024)
    obs, reward, terminated, _, info, most, plen = play_solution(env, NESTED)
    assert terminated and reward == 1.0
    assert info["forks"] == 1 + NESTED.meta["num_subproblems"]  # the top block and one block in each step
    L = int(obs["length"])
    ref = ExecutionGraph.from_token_ids(obs["tokens"][:L], TOK, prompt_len=plen)
    assert np.array_equal(obs["positions"][:L], ref.position_ids())
    assert np.array_equal(Layout(obs["positions"][:L], obs["hide_lo"][:L], obs["hide_hi"][:L]).dense_mask(),
                          ref.attention_mask())
    assert most > NESTED.meta["num_subproblems"]


def test_nested_forks_declined_for_lack_of_slots_run_sequentially_inside_their_step():
    n_top = NESTED.meta["num_subproblems"]
    env = NPRMathEnv(max_len=1024, num_slots=1 + n_top)  # the top fork fits, the nested ones do not
    obs, info = env.reset(options={"problem": NESTED})
    plen = int(obs["length"])
    ref = ExecutionGraph.from_text(NESTED.solutions["parallel"], TOK, prompt=TOK.decode(obs["tokens"][:plen]))
    top = ref.blocks[0]
    flat = ref.token_ids
    ends = [ref.serial_index(c, 0) for c in top.children[1:]] + [ref.serial_index(ref.root, top.offset)]
    # A step's whole subtree, serialized: inside a declined fork the steps arrive through the same branch.
    subtree = {branch_path(c): flat[ref.serial_index(c, 0):end] for c, end in zip(top.children, ends)}
    root, sent = ref.root.ids, {}
    done = False
    while not done:
        action = np.zeros(env.num_slots, dtype=np.int64)
        for s in np.flatnonzero(obs["active"]):
            path, n = info["slot_paths"][s], info["slot_lengths"][s]
            if path == ():
                action[s] = root[n] if n < len(root) else TOK.eos_token_id
                continue
            step = path[:2]  # the top-level step this slot works in (it may be inside a declined block)
            sent.setdefault(step, n)  # the env forced "<step>N:" when it forked
            action[s] = subtree[step][sent[step]]
            sent[step] += 1
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    assert terminated and reward == 1.0
    assert info["forks"] == 1 and info["declined_forks"] == n_top
    L = int(obs["length"])
    pos = obs["positions"][:L]
    fin = ExecutionGraph.from_token_ids(obs["tokens"][:L], TOK, prompt_len=plen)
    starts = [fin.serial_index(c, 0) for c in fin.blocks[0].children]
    stops = starts[1:] + [fin.serial_index(fin.root, fin.blocks[0].offset)]
    for a, b in zip(starts, stops):  # every step starts at the fork position and runs on in one row
        assert pos[a:b].tolist() == list(range(pos[starts[0]], pos[starts[0]] + b - a))


def test_papo_preset_and_strict_constraints():
    env = NPRMathEnv(max_len=512, reward="papo")
    assert env.constraints.name == "strict"
    _, reward, _, _, info, _, _ = play_solution(env, PROBLEMS[1])
    assert reward == 1.0 and not info["dropped"]


def test_too_few_slots_declines_the_fork_and_steps_run_sequentially():
    p = next(q for q in PROBLEMS if q.meta["num_subproblems"] >= 2)
    env = NPRMathEnv(max_len=512, num_slots=2)  # root + 1: any fork of 2 or more plans is declined
    obs, info = env.reset(options={"problem": p})
    ids = TOK.encode(p.solutions["parallel"], add_special_tokens=False) + [TOK.eos_token_id]
    for t in ids:  # everything arrives through slot 0, as serial text
        assert obs["active"].tolist() == [1, 0]
        obs, reward, terminated, truncated, info = env.step([t, 0])
        if terminated or truncated:
            break
    assert terminated and reward == 1.0  # the relaxed rules of stage1 accept a sequential block
    assert info["forks"] == 0 and info["declined_forks"] == 1
    assert info["stats"]["branches_per_block"] == [p.meta["num_subproblems"]]  # the same structure ...
    L = int(obs["length"])
    assert obs["positions"][:L].tolist() == list(range(L))  # ... laid out in a row
    assert not obs["hide_hi"].any()


# -- episode ends --------------------------------------------------------------------------------------------
def test_truncation_when_the_buffer_is_full():
    env = NPRMathEnv(max_len=60)
    obs, reward, terminated, truncated, info, _, _ = play_solution(env, PROBLEMS[0])
    assert truncated and not terminated and int(obs["length"]) <= 60
    want = rewards.score("stage1", env.graph, PROBLEMS[0].answer, truncated=True).reward
    assert reward == want < -1
    papo = NPRMathEnv(max_len=60, reward="papo")
    *_, info, _, _ = play_solution(papo, PROBLEMS[0])
    assert info["dropped"]


def test_truncation_by_max_steps():
    env = NPRMathEnv(max_len=512, max_steps=5)
    *_, terminated, truncated, info, _, _ = play_solution(env, PROBLEMS[0])
    assert truncated and not terminated and info["sampled_tokens"] == 5


def _feed(env, text, slot=0):
    obs, reward, terminated, truncated, info = None, 0.0, False, False, {}
    for t in TOK.encode(text, add_special_tokens=False):
        action = np.zeros(env.num_slots, dtype=np.int64)
        action[slot] = t
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return obs, reward, terminated, truncated, info


def test_early_stop_at_the_first_certain_violation():
    env = NPRMathEnv(max_len=256, reward="papo")
    env.reset(seed=0)
    obs, reward, terminated, _, info = _feed(env, "<guideline><plan>1: abc</plan></step> never read")
    assert terminated and "STRAY_CLOSING_TAG" in info["violations"] and info["dropped"]
    assert TOK.decode(obs["tokens"][: int(obs["length"])].tolist()).endswith("</step>")  # stopped right there
    env = NPRMathEnv(max_len=256)  # stage1: the prefix gets the gated format penalty
    env.reset(seed=0)
    _, reward, terminated, _, info = _feed(env, "<takeaway>")
    assert terminated and reward == -1.0 + env.graph.format_score() / 2 and -2 <= reward < -1
    env = NPRMathEnv(max_len=256, early_stop=False)  # without early stop the episode goes on
    env.reset(seed=0)
    _, _, terminated, truncated, info = _feed(env, "</plan>abc")
    assert not (terminated or truncated) and "STRAY_CLOSING_TAG" in info["violations"]


def test_eos_inside_a_step_ends_the_episode_as_invalid():
    env = NPRMathEnv(max_len=256)
    obs, info = env.reset(seed=0)
    _feed(env, "<guideline><plan>1: add these</plan><plan>2: and those</plan></guideline>")
    obs, reward, terminated, _, info = env.step([0, TOK.eos_token_id, 0, 0, 0, 0, 0, 0])
    assert terminated and reward < -1 and not info["valid"]
    assert "UNCLOSED_TAG" in info["violations"]
    with pytest.raises(RuntimeError):
        env.step(np.zeros(8, dtype=np.int64))


def test_bad_actions_are_rejected_but_inactive_slots_ignored():
    env = NPRMathEnv(max_len=128)
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step([5, 5])
    with pytest.raises(ValueError):
        env.step([env.vocab_size] + [0] * 7)
    obs, *_ = env.step([TOK.convert_tokens_to_ids("A")] + [10**9] * 7)  # slots 1..7 are inactive
    assert obs["active"][0] == 1


def test_padded_model_vocabulary_ids_are_plain_text():
    env = NPRMathEnv(max_len=128, vocab_size=len(TOK) + 16)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step([len(TOK) + 3] + [0] * 7)
    assert obs in env.observation_space and not (terminated or truncated) and info["violations"] == ()


# -- untrusted output: any interleaving of tags and text -----------------------------------------------------
PIECES = st.one_of(st.sampled_from(TAGS + ("<eos>", "1:", "2:", "\\boxed{7}", " ", "\n")),
                   st.text(alphabet="ab7: +", min_size=1, max_size=6))


def _rollout(env, pieces, seed):
    """Feed the pieces' tokens into the env: each active slot takes the next token of one shared stream."""
    stream = [t for p in pieces for t in TOK.encode(p, add_special_tokens=False)] or [TOK.eos_token_id]
    obs, info = env.reset(seed=seed)
    i, out = 0, None
    for _ in range(2000):
        action = np.zeros(env.num_slots, dtype=np.int64)
        for s in np.flatnonzero(obs["active"]):
            action[s] = stream[i % len(stream)]
            i += 1
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs in env.observation_space
        if terminated or truncated:
            out = (reward, terminated, truncated, info["violations"], obs["tokens"].tolist(),
                   obs["positions"].tolist())
            break
    assert out is not None
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(PIECES, max_size=40), seed=st.integers(0, 3),
       preset=st.sampled_from(["stage1", "papo"]), early=st.booleans())
def test_any_interleaving_gives_one_deterministic_verdict(pieces, seed, preset, early):
    env = NPRMathEnv(max_len=160, num_slots=4, reward=preset, early_stop=early)
    first = _rollout(env, pieces, seed)
    assert first == _rollout(env, pieces, seed)
    assert -2.0 <= first[0] <= 1.0


@settings(max_examples=20, deadline=None)
@given(pieces=st.lists(PIECES, max_size=30))
def test_valid_prefix_then_random_tags_never_raises(pieces):
    env = NPRMathEnv(max_len=200, num_slots=4, early_stop=False)
    plan = "<guideline><plan>1: aaa</plan>"
    first = _rollout(env, [plan, *pieces], 0)
    assert first == _rollout(env, [plan, *pieces], 0)


# -- the text-level env --------------------------------------------------------------------------------------
def test_text_env_scores_a_whole_response():
    env = gym.make("NPR-MathText-v0")
    p = PROBLEMS[2]
    prompt, _ = env.reset(options={"problem": p})
    assert prompt.startswith(p.question) and npr_env.INSTRUCTION in prompt
    _, reward, terminated, truncated, info = env.step(p.solutions["parallel"])
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["valid"] and info["stats"]["num_parallel_blocks"] == 1
    env.reset(options={"problem": p})
    _, reward, *_ , info = env.step(p.solutions["sequential"])
    assert reward < -1 and "NO_BLOCK" in info["violations"]


@pytest.mark.parametrize("text", ["", "plain words", "é π ∑ √ 中 🙂 \\boxed{∞}", "<step></guideline>" * 3,
                                  "<eos><eos>", "\x00\x1b[31m", "<unknown-tag>" + "x" * 500])
def test_text_env_accepts_any_string(text):
    env = NPRMathTextEnv(max_chars=200)
    assert text in env.action_space or len(text) > 200
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(text)
    assert -2.0 <= reward <= 1.0 and (terminated != truncated)
    assert truncated == (len(text) > 200)
    env.reset(seed=0)
    assert env.step(text)[1] == reward  # the same verdict twice


def test_any_text_space():
    space = AnyText(max_length=50, seed=0)
    for s in ["", "é🙂", "<plan>", "a" * 50]:
        assert s in space
    assert "a" * 51 not in space and 3 not in space and b"abc" not in space
    samples = [space.sample() for _ in range(50)]
    assert all(s in space for s in samples)
    assert any(any(t in s for t in TAGS) for s in samples) and any(not s.isascii() for s in samples)


def test_text_env_rejects_non_strings_and_unknown_presets():
    env = NPRMathTextEnv()
    env.reset(seed=0)
    with pytest.raises(TypeError):
        env.step(123)
    with pytest.raises(ValueError):
        NPRMathTextEnv(reward="nope")
    with pytest.raises(ValueError):
        NPRMathEnv(reward="nope")
