"""npr_env.branches: the branch life cycle the native engine, the orchestrator and the token-level env share."""

import npr_env
from npr_env.branches import ACTIVE, DONE, FINISHING, FORKING, WAITING, Hooks, Rules, Trajectory, fork_within
from npr_env.graph import ExecutionGraph, TagVocab
from npr_env.schema import STEP_OPEN, TAKEAWAY_OPEN

TOK = npr_env.load_tokenizer()
VOCAB = TagVocab.of(TOK)
PROMPT = TOK.encode("Q?", add_special_tokens=False)
HEAD = TOK.encode("<guideline><plan>1: one way</plan><plan>2: other way</plan></guideline>", add_special_tokens=False)


class Log(Hooks):
    def __init__(self):
        self.calls = []

    def forked(self, parent, children):
        self.calls.append(("forked", len(children)))

    def child_done(self, child):
        self.calls.append(("child_done", child.cursor.trace.index))

    def joined(self, parent, children):
        self.calls.append(("joined", len(children)))

    def ended(self, traj):
        self.calls.append(("ended", traj.finish_reason))


def start(max_path=1000, max_total=1000, **kw):
    hooks = Log()
    rules = Rules(max_path=max_path, max_total=max_total, hooks=hooks, **kw)
    traj = Trajectory(ExecutionGraph(TOK, PROMPT), rules)
    return traj, traj.start(), hooks


def feed(traj, b, text):
    for t in TOK.encode(text, add_special_tokens=False):
        traj.append(b, t)


def test_fork_finish_join_and_rollout():
    traj, root, hooks = start(may_fork=fork_within(5, 0))
    for t in HEAD:
        traj.append(root, t)
    assert root.state == FORKING
    kids = traj.fork(root)
    assert root.state == WAITING and traj.active == kids and traj.num_forks == 1
    for i, c in enumerate(kids, 1):  # the forced prefix is TagVocab.step_number_ids, after <step>
        assert c.forced == [VOCAB.id_of[STEP_OPEN], *VOCAB.step_number_ids(str(i))]
        while c.forced:
            traj.append_forced(c, -0.5)
    feed(traj, kids[0], " short one</step>")
    feed(traj, kids[1], " a much longer step</step>")
    assert [c.state for c in kids] == [FINISHING, FINISHING]
    assert traj.finish_child(kids[0]) is None
    p = traj.finish_child(kids[1])
    assert p is root and root.state == ACTIVE and [c.state for c in kids] == [DONE, DONE]
    assert root.forced == [VOCAB.id_of[TAKEAWAY_OPEN]] and root.path_len == kids[1].path_len
    traj.append_forced(root, -0.25)
    feed(traj, root, "both fine</takeaway>\\boxed{1}<eos>")
    assert traj.done and traj.finish_reason == "eos"
    assert hooks.calls == [("forked", 2), ("child_done", 0), ("child_done", 1), ("joined", 2), ("ended", "eos")]
    r = traj.rollout(dict, extra=1)
    assert r["token_ids"] == traj.graph.response_ids and r["extra"] == 1 and r["num_forks"] == 1
    assert sum(r["forced_mask"]) == 2 * 3 + 1 and not r["truncated"]
    assert ExecutionGraph.from_token_ids(traj.graph.token_ids, TOK, prompt_len=len(PROMPT)).is_valid


def test_end_checks_come_before_the_structure_in_a_fixed_order():
    # the budget ends the trajectory on the </guideline> itself: no fork
    traj, root, hooks = start(max_path=len(HEAD), may_fork=fork_within(5, 0))
    for t in HEAD:
        traj.append(root, t)
    assert traj.finish_reason == "length" and root.state == ACTIVE and hooks.calls == [("ended", "length")]
    # EOS before the budget
    traj, root, _ = start(max_path=1)
    traj.append(root, TOK.eos_token_id)
    assert traj.finish_reason == "eos"
    # a stop token stops when the policy chose it, never when it was forced
    stop = TOK.encode("=", add_special_tokens=False)[0]
    traj, root, _ = start(stop_ids=frozenset([stop]))
    traj.append(root, stop, forced=True)
    assert not traj.done
    traj.append(root, stop)
    assert traj.finish_reason == "stop"
    # a violation before the budget
    traj, root, _ = start(max_path=1, stop_on_violation=True)
    traj.append(root, VOCAB.id_of["</step>"])
    assert traj.finish_reason == "violation"


def test_fork_rule_and_decline():
    traj, root, _ = start(may_fork=fork_within(5, 10_000))  # too little budget left: the steps stay here
    for t in HEAD:
        traj.append(root, t)
    assert root.state == ACTIVE and root.cursor.pending_block() is not None and not traj.graph.blocks[0].parallel
    traj, root, _ = start(may_fork=fork_within(0, 0))  # too deep
    for t in HEAD:
        traj.append(root, t)
    assert root.state == ACTIVE and traj.num_forks == 0
