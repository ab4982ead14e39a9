"""The path a real Qwen3 model takes, on Qwen3's real vocabulary built offline (the `qwen` extra).

Spelled tags judged on their text in the sequential layout, tag rows at 151669..151676, the forced ``<step>N:``
and the newlines of the paper's format, engine and trainer logprobs on a 151,936-row Qwen3-shaped model, the
stage-2 conversion, and one prompt builder for every caller.
"""

import numpy as np
import pytest
import torch

import npr_env
from npr_env import rewards as R
from npr_env.convert import parallel_ids
from npr_env.graph import ExecutionGraph
from npr_env.qwen_vocab import QWEN3_VOCAB_ROWS, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

TAG_IDS = list(range(151669, 151677))
# The paper's format as an instruct model writes it: a newline after every closing tag.
TEXT = ("<guideline>\n<plan>1: sum the first group</plan>\n<plan>2: sum the second group</plan>\n</guideline>\n"
        "<step>1: A=1 2 3: 1+2=3, 3+3=6</step>\n<step>2: B=4 5: 4+5=9, so B=9</step>\n"
        "<takeaway>A is 6 and B is 9</takeaway>\nSo the answer is \\boxed{(6,9)}")
GOLD = "(6,9)"


@pytest.fixture(scope="module")
def tok():
    t = npr_env.qwen_vocab.qwen3_tokenizer()
    assert npr_env.add_npr_tokens(t) == TAG_IDS
    return t


@pytest.fixture(scope="module")
def prompt(tok):
    return npr_env.prompt_ids(tok, "What are A and B?", npr_env.PromptConfig(True, {"enable_thinking": False}))


@pytest.fixture(scope="module")
def model(tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=QWEN3_VOCAB_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=2048, eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "sdpa"
    m = Qwen3ForCausalLM(cfg).eval()
    npr_env.init_tag_rows(tok, m)
    return m


def spelled(tok, text):
    """The text as a model that has never seen the tag tokens writes it: ordinary BPE pieces only."""
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_builds_qwen3s_vocabulary_offline(tok):
    assert tok.encode("Hello world, 12345!") == [9707, 1879, 11, 220, 16, 17, 18, 19, 20, 0]
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "</think>")] == [
        151643, 151644, 151645, 151668]
    assert tok.eos_token == "<|im_end|>" and len(tok) == 151677
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False, enable_thinking=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # a spelled tag is several pieces, and `>\n` merges across the tag's edge
    pieces = [tok.decode([i]) for i in spelled(tok, "<guideline>\n<plan>")]
    assert pieces == ["<", "guid", "eline", ">\n", "<", "plan", ">"]


def test_tag_rows_are_the_mean_of_their_pieces(tok, model):
    emb = model.get_input_embeddings().weight
    for tag, row in zip(npr_env.TAGS, TAG_IDS):
        pieces = tok.encode(tag.strip("<>"), add_special_tokens=False)
        assert len(pieces) >= 1 and max(pieces) < 151643
        torch.testing.assert_close(emb[row], emb[pieces].mean(0))
    assert emb.shape[0] == QWEN3_VOCAB_ROWS  # no resize: Qwen3's padding rows hold the tags


@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("text,gold,reward", [(TEXT, GOLD, 1.0), (TEXT, "(6,8)", -1.0),
                                              (TEXT.replace("</takeaway>", ""), GOLD, None)])
def test_stage1_verdict_is_the_texts_however_tags_were_tokenised(tok, prompt, text, gold, reward, eos):
    want = R.score("stage1", text, gold, tokenizer=tok)
    if reward is not None:
        assert want.reward == reward and want.valid
    else:
        assert not want.valid and want.reward < -1
    tail = [tok.eos_token_id] if eos else []
    forms = {"tag tokens": tok.encode(text, add_special_tokens=False), "spelled": spelled(tok, text)}
    assert any(i in TAG_IDS for i in forms["tag tokens"]) and not any(i in TAG_IDS for i in forms["spelled"])
    for name, ids in forms.items():
        g = ExecutionGraph.from_token_ids(prompt + ids + tail, tok, prompt_len=len(prompt), constraints="relaxed",
                                          layout="sequential")
        got = R.score("stage1", g, gold)
        assert got == want, name
        assert R.score("papo", g, gold) == R.score("papo", text, gold, tokenizer=tok), name
        assert g.token_ids == prompt + ids + tail  # token in, token out: the graph keeps the sampled ids
    g = ExecutionGraph.from_token_ids(prompt + forms["spelled"], tok, prompt_len=len(prompt), layout="sequential")
    assert g.spelled_tags == sum(text.count(t) for t in npr_env.TAGS) and g.stats.branches_per_block == [2]
    assert g.final_text().strip().endswith("\\boxed{(6,9)}")


def test_mixed_and_merged_pieces_are_judged_on_the_text(tok, prompt):
    ids = tok.encode(TEXT, add_special_tokens=False)
    # spell only the step tags: tag tokens and spelled tags in one response
    mixed = []
    for i in ids:
        if tok.decode([i]) in ("<step>", "</step>"):
            mixed += spelled(tok, tok.decode([i]))
        else:
            mixed.append(i)
    assert ExecutionGraph.from_token_ids(prompt + mixed, tok, prompt_len=len(prompt), constraints="relaxed",
                                         layout="sequential").is_valid
    # the piece ">\n" straddles the tag's edge: neither the tag nor the newline is a token of its own
    assert [tok.decode([i]) for i in spelled(tok, "</step>\n")] == ["</", "step", ">\n"]
    g = ExecutionGraph.from_token_ids(prompt + spelled(tok, TEXT), tok, prompt_len=len(prompt),
                                      constraints="strict", layout="sequential")
    assert g.is_valid and R.score("papo", g, GOLD).correct


def test_parallel_layout_refuses_spelled_tags_deterministically(tok, prompt):
    ids = prompt + spelled(tok, TEXT) + [tok.eos_token_id]
    verdicts = set()
    for _ in range(2):
        g = ExecutionGraph.from_token_ids(ids, tok, prompt_len=len(prompt), layout="parallel")
        verdicts.add(tuple(v.code for v in g.violations))
        assert not g.is_valid and R.score("papo", g, GOLD).dropped
    (codes,) = verdicts
    assert "SPELLED_TAG" in codes
    v = next(v for v in g.violations if v.code == "SPELLED_TAG")
    assert v.hard and "tag token" in v.message


def test_newlines_around_tags_follow_the_layout_rule(tok, prompt):
    ids = tok.encode(TEXT, add_special_tokens=False)
    g = ExecutionGraph.from_token_ids(prompt + ids, tok, prompt_len=len(prompt), layout="parallel")
    assert g.is_valid, [v.code for v in g.violations]
    lay, toks = g.layout(), g.token_ids
    P = len(prompt)  # the instruction in the prompt names the tags too
    steps = [i for i, t in enumerate(toks) if t == tok.convert_tokens_to_ids("<step>") and i >= P]
    close_g = toks.index(tok.convert_tokens_to_ids("</guideline>"), P)
    assert tok.decode([toks[close_g + 1]]) == "\n"  # the newline after </guideline> is the guideline's
    assert lay.position_ids[steps[0]] == lay.position_ids[steps[1]] == lay.position_ids[close_g + 1] + 1
    nl_after_step1 = toks.index(tok.convert_tokens_to_ids("</step>"), P) + 1
    assert tok.decode([toks[nl_after_step1]]) == "\n"  # ... and the one after </step> is that step's
    assert not lay.can_see(steps[1], nl_after_step1)
    take = toks.index(tok.convert_tokens_to_ids("<takeaway>"), P)
    assert lay.can_see(take, nl_after_step1) and lay.can_see(take, steps[1] + 3)


def test_stage2_conversion_gives_the_engines_token_form(tok, prompt):
    conv = parallel_ids(TEXT + "<|im_end|>", tok)
    assert parallel_ids(tok.decode(spelled(tok, TEXT)) + "<|im_end|>", tok) == conv
    text = tok.decode(conv)
    assert "</guideline><step>1:" in text and "</step><step>2:" in text and "</step><takeaway>" in text
    step = tok.convert_tokens_to_ids("<step>")
    vocab = npr_env.graph.TagVocab.of(tok)
    for i, t in enumerate(conv):
        if t == step:
            n = vocab.step_number_ids(tok.decode([conv[i + 1]]))
            assert tuple(conv[i + 1:i + 1 + len(n)]) == n
    g = ExecutionGraph.from_token_ids(prompt + conv, tok, prompt_len=len(prompt), layout="parallel")
    assert g.is_valid and g.spelled_tags == 0 and conv[-1] == tok.eos_token_id
    assert R.score("papo", g, GOLD) == R.score("papo", TEXT, GOLD, tokenizer=tok)


def test_engine_forks_with_forced_step_numbers_and_exact_logprobs(tok, prompt, model):
    from engine import NPREngine, SamplingParams, TrajectoryForcer
    from npr_agent.policy import build_batch, token_logprobs

    resp = parallel_ids(TEXT + "<|im_end|>", tok)
    eng = NPREngine(model, tok, num_blocks=256, block_size=16, min_fork_budget=0)
    sp = SamplingParams(max_new_tokens=400, logits_processors=[TrajectoryForcer(tok, prompt, resp)], seed=0)
    for mode in ("parallel", "sequential"):
        (r,) = eng.generate([prompt], sp, mode=mode)
        assert r.token_ids == resp and r.finish_reason == "eos"
        if mode == "parallel":
            assert r.num_forks == 1 and r.graph.is_valid
            forced = [tok.decode([t]) for t, f in zip(r.token_ids, r.forced_mask) if f]
            assert forced == ["<step>", "1", ":", "<step>", "2", ":", "<takeaway>"]
        lp = token_logprobs(model, build_batch([r]))[0, len(prompt):len(prompt) + len(resp)]
        assert np.abs(lp.detach().numpy() - np.asarray(r.logprobs)).max() <= 1e-4
        eng.pool.assert_all_free()


def test_every_caller_builds_the_same_prompt(tok, tmp_path):
    from benchmarks.eval import prompt_config
    from npr_agent.config import preset
    from npr_agent.trainer import NPRTrainer
    from npr_env.prompts import load_prompt_config, save_prompt_config

    cfg = npr_env.PromptConfig(instruction=True, chat_kwargs={"enable_thinking": False})
    problem = npr_env.tasks.GroupSumTasks(seed=0).sample(1)[0]
    want = npr_env.prompt_ids(tok, problem, cfg)
    assert tok.decode(want).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert npr_env.INSTRUCTION in tok.decode(want)

    env = npr_env.envs.math_env.NPRMathEnv(tokenizer=tok, instruction=True, chat_kwargs={"enable_thinking": False},
                                           max_len=2048)
    obs, _ = env.reset(seed=0, options={"problem": problem})
    assert obs["tokens"][:obs["length"]].tolist() == want
    text_env = npr_env.envs.text_env.NPRMathTextEnv(tokenizer=tok, instruction=True,
                                                    chat_kwargs={"enable_thinking": False})
    text_env.reset(seed=0, options={"problem": problem})
    assert text_env.graph.token_ids == want

    tcfg = preset("qwen3-4b")
    t = NPRTrainer.__new__(NPRTrainer)  # the trainer's prompt, without building a 4B run
    t.cfg, t.tokenizer = tcfg, tok
    assert t.prompt_ids(problem) == want

    save_prompt_config(t.prompt_config, tmp_path)  # what every stage checkpoint carries
    assert load_prompt_config(tmp_path) == cfg
    assert npr_env.prompt_ids(tok, problem, prompt_config(str(tmp_path), tok, None)) == want


@pytest.mark.slow
def test_smoke_run_on_qwen3s_vocabulary(tmp_path):
    """configs/qwen3-vocab-smoke.toml --smoke, shortened: every stage on a 151,936-row Qwen3-shaped model."""
    import json

    from npr_agent.cli import smoke
    from npr_agent.config import load_file
    from npr_agent.trainer import NPRTrainer

    cfg = smoke(load_file("configs/qwen3-vocab-smoke.toml"))
    cfg.threads, cfg.tasks.eval_size, cfg.stage0.steps = 1, 4, 8
    cfg.stage0.batch_size = cfg.stage2.batch_size = 4  # the 151,936-row head dominates the CPU time
    for rl in (cfg.stage1, cfg.stage3):
        rl.steps, rl.prompts_per_step, rl.group_size, rl.max_new_tokens = 2, 2, 4, 48
    cfg.stage2.num_problems, cfg.stage2.tries, cfg.stage2.max_new_tokens, cfg.stage2.steps = 4, 2, 48, 2
    cfg.stage2.min_kept, cfg.eval.max_new_tokens = 4, 48
    run = tmp_path / "run"
    summary = NPRTrainer(cfg, run, show_progress=False).run()
    for stage in ("stage0", "stage1", "stage2", "stage3"):
        assert (run / stage / "DONE").exists() and "eval" in summary[stage]
        assert json.loads((run / stage / "npr_prompt.json").read_text())["chat_kwargs"] == {"enable_thinking": False}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["stage"] in ("stage1", "stage3") and "reward/mean" in r]
    assert len(rl) == 4 and all("format/spelled_rate" in r for r in rl)
    mism = [r["policy/logprob_mismatch"] for r in rl]
    assert len(mism) == 4 and max(mism) <= 1e-4  # logged every step, updated or not
    data = [json.loads(line) for line in (run / "stage2_data.jsonl").read_text().splitlines()]
    assert data and all({"response_ids", "tagged_ids", "spelled_tags"} <= set(d) for d in data)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(run / "stage3"))  # Qwen3's vocabulary plus the 8 tags, as trained
    assert len(saved) == 151677 and [saved.convert_tokens_to_ids(t) for t in npr_env.TAGS] == TAG_IDS
