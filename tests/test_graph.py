"""ExecutionGraph: constraints (one test per code), layout rule, incremental building, stats, robustness."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npr_env
from npr_env import constraints as C
from npr_env.graph import Event, ExecutionGraph
from npr_env.layout import predictor_indices
from npr_env.schema import TAGS, format_block

TOK = npr_env.load_tokenizer()


def block(plans, steps, takeaway="combine all results"):
    return format_block(plans, steps, takeaway)


GOOD = block(["add a b", "add c d"], ["2+3=5 ok", "4+4=8 ok"], "5+8=13 total") + "So \\boxed{13}"


def codes(text, constraints="strict"):
    return {v.code for v in npr_env.parse(text, constraints=constraints).violations}


def test_valid_trajectory():
    g = npr_env.parse(GOOD)
    assert g.is_valid and g.format_score() == 0.0
    assert g.stats.num_blocks == 1 and g.stats.branches_per_block == [2]


# -- one test per constraint code -------------------------------------------------------------------------
CASES = {
    "PLAN_STEP_COUNT_MISMATCH": "<guideline><plan>1: aaa</plan><plan>2: bbb</plan><plan>3: ccc</plan></guideline>"
                                "<step>1: xxxxxx</step><step>2: yyyyyy</step><takeaway>zzzzzz</takeaway>\\boxed{1}",
    "NESTED_STEP": "<guideline><plan>1: aaa</plan><plan>2: bbb</plan></guideline><step>1: xx<step>xxxx</step>"
                   "<step>2: yyyyyy</step><takeaway>zzzzzz</takeaway>\\boxed{1}",
    "STEP_OUTSIDE_BLOCK": GOOD.replace("So", "<step>1: stray step</step>So"),
    "UNCLOSED_TAG": "<guideline><plan>1: aaa</plan><plan>2: bbb</plan></guideline><step>1: xxxxxx</step>"
                    "<step>2: yyyyyy</step><takeaway>zzzzzz",
    "STRAY_CLOSING_TAG": GOOD.replace("So", "</plan>So"),
    "MISSING_TAKEAWAY": "<guideline><plan>1: aaa</plan><plan>2: bbb</plan></guideline><step>1: xxxxxx</step>"
                        "<step>2: yyyyyy</step>So \\boxed{1}",
    "EMPTY_PLAN": GOOD.replace("1: add a b", "1: a"),
    "EMPTY_STEP": GOOD.replace("1: 2+3=5 ok", "1: 5"),
    "EMPTY_TAKEAWAY": GOOD.replace("5+8=13 total", "13"),
    "TEXT_BETWEEN_TAGS": GOOD.replace("</plan><plan>", "</plan>chatter<plan>"),
    "UNNUMBERED_PLAN": GOOD.replace("<plan>1: add a b", "<plan>add a b"),
    "STEP_NUMBER_MISMATCH": GOOD.replace("<step>2:", "<step>7:"),
    "NO_PARALLEL_BLOCK": block(["only one plan"], ["the only step"]) + "\\boxed{1}",
    "TOO_MANY_PLANS": block([f"plan {i}" for i in range(6)], [f"step {i} done" for i in range(6)]) + "\\boxed{1}",
    "MISSING_ANSWER": GOOD.replace("So \\boxed{13}", "So thirteen"),
    "NO_BLOCK": "just an answer \\boxed{13}",
    "NO_PLANS": "<guideline></guideline><takeaway>zzzzzz</takeaway>\\boxed{1}",
    "MISPLACED_TAG": GOOD.replace("So", "<plan>So"),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_constraint_code(code):
    found = codes(CASES[code])
    assert code in found, (code, found)
    g = npr_env.parse(CASES[code])
    assert not g.is_valid and -2.0 <= g.format_score() < 0


def test_depth_exceeded_and_nesting():
    inner = block(["inner one", "inner two"], ["inner step a", "inner step b"])
    nested = format_block(["outer one", "outer two"], ["1+1=2 " + inner + " done", "plain outer step"], "both fine")
    g = npr_env.parse(nested + "\\boxed{2}")
    assert g.is_valid, g.violations
    assert g.stats.num_blocks == 2 and sorted(g.stats.branches_per_block) == [2, 2]
    shallow = C.strict(max_depth=1)
    g1 = npr_env.parse(nested + "\\boxed{2}", constraints=shallow)
    assert "DEPTH_EXCEEDED" in {v.code for v in g1.violations}


def test_relaxed_allows_single_plan_and_unnumbered():
    text = "<guideline><plan>only plan</plan></guideline><step>the only step</step><takeaway>fine here</takeaway>\\boxed{3}"
    assert npr_env.parse(text, constraints="relaxed").is_valid
    assert not npr_env.parse(text, constraints="strict").is_valid


def test_format_score_semantics():
    assert npr_env.parse("no block \\boxed{1}").format_score() == -1.5
    soft = npr_env.parse(CASES["EMPTY_STEP"]).format_score()
    assert soft == pytest.approx(-0.4)
    many = GOOD.replace("1: 2+3=5 ok", "1: 5").replace("2: 4+4=8 ok", "2: 8")  # same soft code twice costs once
    assert npr_env.parse(many).format_score() == pytest.approx(-0.4)


def test_custom_constraint_composes():
    short = C.Constraint("TOO_SHORT", "fewer than 200 tokens", 0.5, True, check=lambda g: g.stats.total_tokens < 200)
    cs = C.ConstraintSet([C.UNCLOSED_TAG, short], name="mine")
    g = npr_env.parse(GOOD, constraints=cs)
    assert [v.code for v in g.violations] == ["TOO_SHORT"]


# -- layout ------------------------------------------------------------------------------------------------
def test_layout_rule_positions_and_visibility():
    g = npr_env.ExecutionGraph.from_text(GOOD, prompt="Q?")
    pos, mask, kinds = g.position_ids(), g.attention_mask(), g.token_kinds()
    ids = g.token_ids
    step_open = TOK.convert_tokens_to_ids("<step>")
    s1, s2 = [i for i, t in enumerate(ids) if t == step_open]
    ta = ids.index(TOK.convert_tokens_to_ids("<takeaway>"))
    assert pos[s1] == pos[s2] == pos[s1 - 1] + 1  # both steps start right after the guideline
    assert pos[ta] == max(pos[s2 - 1], pos[ta - 1]) + 1  # takeaway continues after the longest step
    assert not mask[s2:ta, s1:s2].any()  # step 2 never sees step 1
    assert mask[ta, :ta].all()  # the takeaway sees everything before it
    assert (kinds[:2] == 0).all()
    assert np.array_equal(mask, np.tril(mask))  # causal in serialized order


def test_whitespace_belongs_to_previous_segment():
    text = GOOD.replace("</guideline>", "</guideline>\n\n").replace("</step>", "</step>\n")
    g = npr_env.parse(text)
    assert g.is_valid
    ids, pos, mask = g.token_ids, g.position_ids(), g.attention_mask()
    s_open = TOK.convert_tokens_to_ids("<step>")
    s1, s2 = [i for i, t in enumerate(ids) if t == s_open]
    nl = TOK.convert_tokens_to_ids("\n")
    assert ids[s1 - 1] == nl and ids[s1 - 2] == nl  # guideline whitespace precedes the steps...
    assert mask[s2, s1 - 1]  # ...and every step sees it
    assert ids[s2 - 1] == nl and not mask[s2, s2 - 1]  # whitespace after </step> stays in step 1
    assert pos[s1] == pos[s2]


def test_sequential_layout_is_causal():
    g = npr_env.parse(GOOD, layout="sequential")
    assert np.array_equal(g.position_ids(), np.arange(len(g.token_ids)))
    assert np.array_equal(g.attention_mask(), np.tril(np.ones((len(g.token_ids),) * 2, dtype=bool)))


def test_predictor_is_latest_visible_token():
    g = npr_env.parse(GOOD)
    lay = g.layout()
    mask = lay.dense_mask()
    for t, p in enumerate(predictor_indices(lay)):
        vis = [k for k in range(t) if mask[t, k]]
        assert p == (vis[-1] if vis else -1)


def test_cursor_fork_join_matches_serial_parse():
    """Driving branches by hand (as the engine does) gives the same ids, positions and mask as parsing."""
    prompt = TOK.encode("Q?", add_special_tokens=False)
    serial = ExecutionGraph.from_text(GOOD, prompt="Q?")
    enc = lambda s: TOK.encode(s, add_special_tokens=False)  # noqa: E731
    g = ExecutionGraph(TOK, prompt)
    root = g.cursor(auto_fork=False)
    head = GOOD[: GOOD.index("</guideline>") + len("</guideline>")]
    events = [root.append(t) for t in enc(head)]
    assert events[-1] is Event.FORK
    nums = root.step_numbers()
    kids = root.fork()
    # decode the two steps interleaved, token by token
    streams = [enc(f"<step>{n}: {s}</step>") for n, s in zip(nums, ["2+3=5 ok", "4+4=8 ok"])]
    assert all(k.in_open_step for k in kids) and not root.in_open_step
    for i in range(max(map(len, streams))):
        for k, s in zip(kids, streams):
            if i < len(s):
                ev = k.append(s[i])
        assert ev in (Event.CONTINUE, Event.STEP_DONE)
    assert not any(k.in_open_step for k in kids)  # both steps closed
    root.join()
    for t in enc("<takeaway>5+8=13 total</takeaway>So \\boxed{13}"):
        root.append(t)
    assert g.token_ids == serial.token_ids
    assert np.array_equal(g.position_ids(), serial.position_ids())
    assert np.array_equal(g.attention_mask(), serial.attention_mask())
    assert g.is_valid


def test_num_flags_counts_parser_flags_incrementally():
    g = ExecutionGraph(TOK, TOK.encode("Q?", add_special_tokens=False))
    cur = g.cursor()
    seen = []
    for t in TOK.encode("ok <takeaway>x</takeaway>", add_special_tokens=False):
        cur.append(t)
        seen.append(g.num_flags)
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] > 0  # grows only, and only at a violation
    assert g.violations_so_far()


def test_stats_critical_path():
    g = npr_env.parse(GOOD)
    lay = g.layout()
    s = g.stats
    assert s.total_tokens == len(g.token_ids)
    # for a fully parallel graph the critical path is the number of distinct decode positions
    assert s.critical_path_tokens == lay.position_ids.max() + 1
    assert s.ideal_speedup > 1.0


def test_layout_exact_with_tiny_qwen3():
    """One masked forward == each token computed from only the tokens it may see (>= 2 blocks, >= 3 branches)."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from npr_env.layout import attention_bias, collate, to_torch

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg).eval()
    text = (block(["a b c", "d e f"], ["xxxxxx", "yyyyyyy"]) + "\n"
            + block(["g h i", "j k l", "m n o"], ["qqqqqq", "rrrrrrrrr", "ssssss"]) + "\\boxed{1}")
    g = ExecutionGraph.from_text(text, prompt="what is 1?")
    assert g.stats.num_blocks == 2 and sum(g.stats.branches_per_block) == 5
    lay = g.layout()
    b = to_torch(collate([lay]))
    ids = torch.tensor([g.token_ids])
    mask = lay.dense_mask()
    neg = torch.finfo(torch.float32).min
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention_bias(b["hide_lo"], b["hide_hi"], b["valid"]),
                     position_ids=b["position_ids"]).logits[0]
        worst = 0.0
        for q in range(0, len(ids[0]), 3):
            vis = np.nonzero(mask[q])[0]
            sub = torch.zeros(1, 1, len(vis), len(vis)).masked_fill(~torch.from_numpy(mask[np.ix_(vis, vis)]), neg)
            alone = model(input_ids=ids[:, vis], attention_mask=sub,
                          position_ids=torch.from_numpy(lay.position_ids[vis][None])).logits[0, -1]
            worst = max(worst, (alone - full[q]).abs().max().item())
    assert worst < 1e-5


# -- robustness --------------------------------------------------------------------------------------------
PIECES = list(TAGS) + ["1:", "2:", " ", "\n", "abc", "x=3", "\\boxed{4}", "\\boxed{", "}", "<eos>", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.sampled_from(["strict", "relaxed"]),
       st.sampled_from(["parallel", "sequential"]))
def test_random_interleavings_never_raise_and_are_deterministic(pieces, preset, layout):
    text = "".join(pieces)
    g1 = npr_env.parse(text, constraints=preset, layout=layout)
    g2 = npr_env.parse(text, constraints=preset, layout=layout)
    v1 = [(v.code, v.index) for v in g1.violations]
    assert v1 == [(v.code, v.index) for v in g2.violations]
    assert g1.format_score() == g2.format_score()
    assert -2.0 <= g1.format_score() <= 0.0
    lay = g1.layout()
    assert len(lay) == len(g1.token_ids) == len(TOK.encode(text, add_special_tokens=False))
    assert g1.token_ids == TOK.encode(text, add_special_tokens=False)  # serialized order == input order
    m = lay.dense_mask()
    assert m.diagonal().all()
    g1.stats  # noqa: B018 - must not raise
    g1.outline()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=len(TOK) + 5), max_size=60))
def test_arbitrary_token_ids_never_raise(ids):
    g = ExecutionGraph.from_token_ids(ids, TOK)
    assert isinstance(g.is_valid, bool)
    assert g.token_ids == ids


def test_missing_tags_in_tokenizer_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    with pytest.raises(ValueError, match="add_npr_tokens"):
        ExecutionGraph(plain)


# -- constraint codes are checked ----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: C.ConstraintSet(["EMPTY_STEPP"]),
    lambda: C.strict(disable=["EMPTY_STEPP"]),
    lambda: C.relaxed(enable=["EMPTY_STEPP"]),
    lambda: C.resolve("strict", disable=("EMPTY_STEPP",)),
    lambda: C.strict().get("EMPTY_STEPP"),
    lambda: "EMPTY_STEPP" in C.strict(),
    lambda: C.ConstraintSet([C.Constraint("EMPTY_STEPP", "a typo, no check", 1.0, True)]),
])
def test_a_misspelled_code_raises_naming_it_and_the_valid_ones(build):
    with pytest.raises(ValueError, match="EMPTY_STEPP") as e:
        build()
    assert "EMPTY_STEP" in str(e.value) and "UNCLOSED_TAG" in str(e.value)


def test_codes_enable_and_disable_rules_and_verdicts_keep_their_strings():
    text = CASES["EMPTY_STEP"]
    assert codes(text) == {"EMPTY_STEP"}
    assert npr_env.parse(text, constraints=C.strict(disable=["EMPTY_STEP"])).is_valid
    assert npr_env.parse(text, constraints=C.strict(disable=[C.EMPTY_STEP])).is_valid
    unnumbered = CASES["UNNUMBERED_PLAN"]
    assert npr_env.parse(unnumbered, constraints="relaxed").is_valid
    g = npr_env.parse(unnumbered, constraints=C.relaxed(enable=["UNNUMBERED_PLAN"]))
    assert [type(v.code) for v in g.violations] == [str] and [v.code for v in g.violations] == ["UNNUMBERED_PLAN"]
    cs = C.ConstraintSet(["EMPTY_STEP", C.UNCLOSED_TAG])
    assert "EMPTY_STEP" in cs and C.UNCLOSED_TAG in cs and "NO_BLOCK" not in cs and cs.get("NO_BLOCK") is None
    assert C.strict().codes == tuple(c.code for c in C.ALL)


# -- the tag vocabulary is cached beside the tokenizer, never on it --------------------------------------------
class _SlotTokenizer:
    """A tokenizer that refuses attributes, weak references and hashing."""

    __slots__ = ("inner",)
    __hash__ = None

    def __init__(self, inner):
        self.inner = inner

    def __eq__(self, other):
        return isinstance(other, _SlotTokenizer) and other.inner is self.inner

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tag_vocab_cache_writes_nothing_on_the_tokenizer():
    from npr_env.graph import TagVocab

    before = set(vars(TOK))
    v = TagVocab.of(TOK)
    assert TagVocab.of(TOK) is v and set(vars(TOK)) == before
    odd = _SlotTokenizer(TOK)
    w = TagVocab.of(odd)
    assert w is not v and TagVocab.of(odd) is w and w.tokenizer is odd
    g = ExecutionGraph.from_text(GOOD, odd)
    assert g.is_valid and g.token_ids == ExecutionGraph.from_text(GOOD, TOK).token_ids


def test_moved_names_are_still_importable_from_graph():
    from npr_env import cursor, layout, verdicts, vocab
    from npr_env.graph import Cursor, Event, ScoringView, TagVocab

    assert (Cursor, Event, ScoringView, TagVocab) == (cursor.Cursor, cursor.Event, layout.ScoringView, vocab.TagVocab)
    assert verdicts.Flag._fields == ("constraint", "trace", "local", "detail")
    s = ExecutionGraph.from_text(GOOD, prompt="Q?").serialized()
    assert s.ids == list(s.ids) and s.position_ids.shape == (len(s.ids),) and s.start_of[0] == 0
