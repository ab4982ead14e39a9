"""The training recipe: smoke run of every stage, exact resume, config errors, engine/trainer agreement."""

import json

import pytest

from npr_agent.cli import main as npr_main
from npr_agent.cli import smoke
from npr_agent.config import ConfigError, apply_overrides, load_file, preset, validate
from npr_agent.replay import MixedGroupReplay, mixed_groups
from npr_agent.trainer import Interrupted, NPRTrainer, parallel_share
from npr_env.tasks import Problem


def tiny_cfg():
    cfg = smoke(preset("tiny"))
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.intermediate_size = 64, 2, 128
    cfg.model.head_dim, cfg.model.num_heads, cfg.model.num_kv_heads = 16, 4, 2
    cfg.threads = 1
    cfg.tasks.eval_size = 4
    cfg.stage0.steps = 6
    for rl in (cfg.stage1, cfg.stage3):
        rl.steps, rl.prompts_per_step, rl.group_size, rl.max_new_tokens = 3, 2, 4, 48
    cfg.eval.max_new_tokens = 48
    return cfg


def rows(run_dir, stage):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == stage:  # the final eval shares the last step's row
            out.setdefault(r["step"], {}).update(r)
    return out


def test_sft_resume_gives_the_same_next_step(tmp_path):
    cfg = tiny_cfg()
    NPRTrainer(cfg, tmp_path / "a", show_progress=False).run(("stage0",))
    t = NPRTrainer(cfg, tmp_path / "b", show_progress=False)
    t.stop_after = {"stage0": 3}
    with pytest.raises(Interrupted):
        t.run(("stage0",))
    # the killed attempt logged step 3 after its checkpoint, stamped by a clock that has since stepped back:
    # the resume point is a step, so the row goes whatever its time says
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "stage0", "step": 3, "time": 0.0, "loss/sft": 99.0}) + "\n")
    NPRTrainer(cfg, tmp_path / "b", resume=True, show_progress=False).run(("stage0",))
    a, b = rows(tmp_path / "a", "stage0"), rows(tmp_path / "b", "stage0")
    for step in (3, 4, 5):
        assert a[step]["loss/sft"] == pytest.approx(b[step]["loss/sft"], abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in logged if r["stage"] == "stage0" and "loss/sft" in r) == list(range(6))


def stage1_straight_and_resumed(cfg, tmp_path, stop: int = 2):
    """Stage 1's logged rows run straight through (a) and killed after step ``stop``, then resumed (b)."""
    NPRTrainer(cfg, tmp_path / "a", show_progress=False).run(("stage0", "stage1"))
    t = NPRTrainer(cfg, tmp_path / "b", show_progress=False)
    t.stop_after = {"stage1": stop}
    with pytest.raises(Interrupted):
        t.run(("stage0", "stage1"))
    NPRTrainer(cfg, tmp_path / "b", resume=True, show_progress=False).run(("stage0", "stage1"))
    return rows(tmp_path / "a", "stage1"), rows(tmp_path / "b", "stage1")


def test_rl_resume_gives_the_same_batch_and_loss(tmp_path):
    cfg = tiny_cfg()
    cfg.stage1.eval_every = 0
    a, b = stage1_straight_and_resumed(cfg, tmp_path)
    for key in ("reward/mean", "length/total_tokens", "loss/policy", "format/score_mean"):
        assert a[3][key] == pytest.approx(b[3][key], abs=1e-6), key


def test_mixed_group_replay_keeps_the_newest_and_returns_each_once():
    probs = [Problem(id=str(i), question=f"q{i}", answer=str(i), source="t") for i in range(5)]
    r = MixedGroupReplay(capacity=3)
    r.add(probs[:2])
    r.add(probs[2:4] + [probs[0]])  # a repeat moves to the newest end; the oldest beyond capacity leave
    assert [p.id for p in r.problems] == ["2", "3", "0"]
    assert [p.id for p in r.take(2)] == ["0", "3"] and len(r) == 1
    saved = r.state_dict()
    back = MixedGroupReplay(capacity=0)
    back.load_state_dict(saved)
    assert back.problems == r.problems and back.capacity == 3
    assert r.take(5) == [probs[2]] and r.take(1) == []
    assert mixed_groups([0, 0, 0.5, -0.5, 0, 0], group_size=2) == [False, True, False]


def test_rl_replays_mixed_groups_and_resumes_with_the_same_buffer(tmp_path):
    cfg = tiny_cfg()
    cfg.stage1.eval_every, cfg.stage1.steps, cfg.stage1.replay_fraction = 0, 4, 0.5  # 1 of 2 prompts
    a, b = stage1_straight_and_resumed(cfg, tmp_path)
    assert a[1]["replay/prompts"] == 0
    for step in (2, 3, 4):  # a step replays what the buffer held after the one before
        assert a[step]["replay/prompts"] == min(1, a[step - 1]["replay/buffer"])
    assert sum(a[s].get("replay/prompts", 0) for s in a) >= 1  # the test is not vacuous
    for step in (3, 4):
        for key in ("replay/prompts", "replay/buffer", "reward/mean", "loss/policy"):
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)
    with pytest.raises(ConfigError, match="stage3.replay_fraction"):
        validate(apply_overrides(preset("tiny"), ["stage3.replay_fraction=1.5"]))


def test_best_weights_keep_the_latest_of_the_highest_scores():
    import torch

    from npr_agent.updates import BestWeights

    model = torch.nn.Linear(2, 1, bias=False)
    best = BestWeights()
    for step, (value, score, kept) in enumerate([(1.0, 0.5, True), (2.0, 0.25, False), (3.0, 0.5, True),
                                                 (4.0, 0.4, False)]):
        with torch.no_grad():
            model.weight.fill_(value)
        assert best.offer(model, score, step) is kept
    assert (best.score, best.step) == (0.5, 2)  # a tie goes to the later weights
    assert torch.equal(best.weights["weight"], torch.full((1, 2), 3.0))  # a copy, not the live tensor
    again = BestWeights()
    again.load_state_dict(best.state_dict())
    assert (again.score, again.step) == (0.5, 2) and torch.equal(again.weights["weight"], best.weights["weight"])


def test_an_rl_stage_ends_on_the_weights_that_solved_the_most_check_problems(tmp_path):
    """stage1.select_every = 1: the start and every step are checked on held-apart problems (logged as
    accuracy/select), the checks survive a resume, and the stage ends on the best weights, not the last ones.

    An untrained model solves nothing, so every check ties and the last weights win; to see the stage go back, the
    saved state of a killed run is given a best (step 1's weights) that solved every check problem."""
    import torch

    cfg = tiny_cfg()
    cfg.stage1.eval_every, cfg.stage1.select_every, cfg.stage1.select_problems = 0, 1, 3
    summary = NPRTrainer(cfg, tmp_path / "a", show_progress=False).run(("stage0", "stage1"))
    r = rows(tmp_path / "a", "stage1")
    assert [s for s in sorted(r) if "accuracy/select" in r[s]] == [0, 1, 2, 3]
    scores = [r[s]["accuracy/select"] for s in range(4)]
    latest_best = max(s for s in range(4) if scores[s] == max(scores))
    assert summary["stage1"]["selected_step"] == latest_best == r[3]["select/best_step"]

    t = NPRTrainer(cfg, tmp_path / "b", show_progress=False)
    t.stop_after = {"stage1": 2}
    with pytest.raises(Interrupted):
        t.run(("stage0", "stage1"))
    state_path = tmp_path / "b" / "stage1.state.pt"
    state = torch.load(state_path, weights_only=False)
    assert state["extra"]["best"]["step"] in (0, 1, 2)  # the checks so far are part of the training state
    state["extra"]["best"] = {"score": 1.0, "step": 1, "weights": state["model"]}  # step 2's weights, as "step 1"
    torch.save(state, state_path)
    summary = NPRTrainer(cfg, tmp_path / "b", resume=True, show_progress=False).run(("stage0", "stage1"))
    assert summary["stage1"]["selected_step"] == 1
    from npr_agent.checkpoint import load_pretrained

    final = load_pretrained(tmp_path / "b" / "stage1", torch.float32).state_dict()
    for k, v in state["model"].items():
        assert torch.equal(final[k], v), k
    with pytest.raises(ConfigError, match="stage3.select_problems"):
        validate(apply_overrides(preset("tiny"), ["stage3.select_problems=0"]))


def test_held_out_evals_inside_an_rl_stage_do_not_change_its_training(tmp_path):
    """An eval decodes greedily on its own engine, so skipping one (stage1.eval_every = 0) saves its time only."""
    runs = {}
    for every in (1, 0):
        cfg = tiny_cfg()
        cfg.stage1.eval_every = every
        NPRTrainer(cfg, tmp_path / str(every), show_progress=False).run(("stage0", "stage1"))
        runs[every] = rows(tmp_path / str(every), "stage1")
    assert "accuracy/eval" in runs[1][1] and "accuracy/eval" not in runs[0][1]
    for step in (1, 2, 3):
        for key in ("reward/mean", "length/total_tokens", "loss/policy", "policy/grad_norm", "policy/approx_kl"):
            if key in runs[0][step]:
                assert runs[1][step][key] == runs[0][step][key], (step, key)


def test_rejection_sampling_draws_more_problems_until_target_kept(tmp_path):
    """Below `target_kept`, stage 2 samples further batches of fresh problems, up to `max_problems`."""
    cfg = tiny_cfg()
    cfg.stage2.num_problems, cfg.stage2.tries, cfg.stage2.max_new_tokens = 4, 1, 16
    cfg.stage2.fill_from_solutions = False
    t = NPRTrainer(cfg, tmp_path / "run", show_progress=False)
    model = t.fresh_model()  # untrained: it keeps nothing, so every allowed batch is drawn

    def problems_drawn(target: int, cap: int) -> int:
        cfg.stage2.target_kept, cfg.stage2.max_problems = target, cap
        assert t.rejection_sample(model, cfg.stage2) == []
        return int(rows(tmp_path / "run", "stage2")[0]["rejection/problems"])

    assert problems_drawn(0, 12) == 4  # one batch
    assert problems_drawn(1, 12) == 12  # three batches of 4, then the cap
    assert problems_drawn(1, 10) == 10  # the last batch is cut at the cap
    assert problems_drawn(1, 2) == 4  # the cap never cuts the first batch


@pytest.mark.slow
def test_smoke_run_all_stages(tmp_path):
    """`npr train --smoke`: every stage runs, writes checkpoints, curves and the summary picture."""
    cfg = tiny_cfg()
    summary = NPRTrainer(cfg, tmp_path / "run", show_progress=False).run()
    for stage in ("stage0", "stage1", "stage2", "stage3"):
        assert (tmp_path / "run" / stage / "config.json").exists()
        assert (tmp_path / "run" / stage / "DONE").exists()
        assert "eval" in summary[stage]
    assert (tmp_path / "run" / "summary.png").stat().st_size > 10_000
    s3 = rows(tmp_path / "run", "stage3")
    logged = {k for r in s3.values() for k in r}
    for key in ("reward/mean", "accuracy/train", "accuracy/eval", "format/valid_rate", "parallel/rate",
                "parallel/branches_mean", "parallel/speedup_ideal", "length/total_tokens", "length/critical_path",
                "loss/policy", "perf/rollout_s", "perf/update_s", "perf/tokens_per_s"):
        assert key in logged, key
    mism = [r["policy/logprob_mismatch"] for r in s3.values() if "policy/logprob_mismatch" in r]
    mism += [r["policy/logprob_mismatch"] for r in rows(tmp_path / "run", "stage1").values()
             if "policy/logprob_mismatch" in r]
    assert mism and max(mism) <= 1e-4  # engine and trainer logprobs agree (fp32)


def test_cli_smoke_entry_point(tmp_path, capsys):
    """The CLI path itself, with only stage 0 (the full smoke run is the slow test above), quiet: no progress bar,
    transformers' included; `npr rollout` of its checkpoint shows the run's own held-out problems (two-digit
    numbers here), not the preset's."""
    rc = npr_main(["train", "--smoke", "--stage", "stage0", "--out", str(tmp_path / "cli"), "--quiet",
                   "--set", "stage0.steps=2", "--set", "tasks.eval_size=2", "--set", "eval.max_new_tokens=16",
                   "--set", "model.num_layers=1", "--set", "threads=1", "--set", "tasks.digits=2"])
    assert rc == 0
    assert (tmp_path / "cli" / "stage0" / "DONE").exists()
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err  # --quiet: transformers' bars too
    held = [json.loads(line)["question"] for line in (tmp_path / "cli" / "heldout.jsonl").read_text().splitlines()]
    capsys.readouterr()
    ckpt = str(tmp_path / "cli" / "stage0")
    assert npr_main(["rollout", "--model", ckpt, "-n", "2", "--max-new-tokens", "4", "--threads", "1"]) == 0
    shown = [line[4:].split("   gold:")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("=== ")]
    assert sorted(shown) == sorted(held)
    assert npr_main(["rollout", "--model", ckpt, "--problems", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such problem file" in capsys.readouterr().err


def _differs_only_in(cfg, tiny, named: dict) -> None:
    for (part, field), value in named.items():
        assert getattr(getattr(cfg, part), field) == value, (part, field)
        setattr(getattr(cfg, part), field, getattr(getattr(tiny, part), field))
    cfg.name = tiny.name
    assert cfg.to_dict() == tiny.to_dict()


def test_the_recipe_configs_change_only_their_fields():
    """configs/tiny-curriculum.toml is the preset with the 500-step stage 2 and 60 PAPO steps measured in
    docs/results.md; configs/tiny-fixed-budget.toml is the preset before stage 0 trained until a check passed."""
    tiny = preset("tiny")
    _differs_only_in(load_file("configs/tiny-curriculum.toml"), tiny, {("stage2", "steps"): 500,
                                                                         ("stage3", "steps"): 60,
                                                                         ("stage3", "replay_fraction"): 0.0,
                                                                         ("stage3", "select_every"): 0})
    _differs_only_in(load_file("configs/tiny-fixed-budget.toml"), tiny, {
        ("stage0", "steps"): 700, ("stage0", "parallel_fraction"): 0.2, ("stage0", "parallel_fraction_start"): None,
        ("stage0", "check_every"): 0, ("stage0", "decay_steps"): 100, ("stage0", "ramp_steps"): 0,
        ("stage1", "steps"): 20, ("stage2", "target_kept"): 200, ("stage2", "epochs_cap"): 24,
        ("stage2", "steps"): 400, ("stage3", "steps"): 150, ("stage3", "eval_every"): 25,
        ("stage3", "replay_fraction"): 0.0, ("stage3", "select_every"): 0})
    # the ablation's source: the preset cut at 115 stage-2 steps
    _differs_only_in(load_file("configs/tiny-ablation-source.toml"), tiny, {("stage2", "steps"): 115})
    _differs_only_in(load_file("configs/tiny-three-digit.toml"), tiny, {("tasks", "digits"): 3,
                                                                       ("tasks", "terms"): (3, 4)})
    for f in ("configs/tiny-curriculum.toml", "configs/tiny-fixed-budget.toml", "configs/tiny-ablation-source.toml",
              "configs/tiny-three-digit.toml"):
        validate(load_file(f))


def test_stage0_parallel_share_is_constant_or_a_linear_ramp():
    """stage0.parallel_fraction_start ramps the share of NPR solutions to parallel_fraction at the last step;
    unset, every batch draws at parallel_fraction (so existing runs keep their data)."""
    cfg = load_file("configs/tiny-fixed-budget.toml").stage0
    assert [parallel_share(cfg, s) for s in (0, 350, 699)] == [0.2] * 3
    cfg = apply_overrides(preset("tiny"), ["stage0.parallel_fraction_start=0.2", "stage0.parallel_fraction=0.8",
                                           "stage0.steps=701", "stage0.ramp_steps=0", "stage0.check_every=0"]).stage0
    assert [round(parallel_share(cfg, s), 6) for s in (0, 350, 700)] == [0.2, 0.5, 0.8]
    cfg.ramp_steps = 351  # the ramp ends at step 350, then holds
    assert [round(parallel_share(cfg, s), 6) for s in (0, 175, 350, 700)] == [0.2, 0.5, 0.8, 0.8]
    with pytest.raises(ConfigError, match="stage0.parallel_fraction_start"):
        validate(apply_overrides(preset("tiny"), ["stage0.parallel_fraction_start=1.5"]))


def test_decay_on_pass_holds_the_peak_until_the_check_passes_and_survives_a_resume():
    """Warmup, the peak rate until start_decay, a cosine decay to min_ratio over `decay` steps, then the end; the
    budget forces the decay by total - decay; LambdaLR's state_dict carries where the decay started."""
    import torch

    from npr_agent.checkpoint import DecayOnPass

    f = DecayOnPass(total=100, warmup=4, decay=10, min_ratio=0.1)
    assert [f(s) for s in (0, 3, 4, 50, 89)] == [0.25, 1.0, 1.0, 1.0, 1.0] and f.end == 100
    assert f(95) < 1.0 and f(100) == pytest.approx(0.1)  # not passed: the budget's last 10 steps decay
    f.start_decay(30)
    f.start_decay(40)  # the first pass counts
    assert (f.decay_from, f.end) == (30, 40)
    assert f(29) == 1.0 and f(35) == pytest.approx(0.55) and f(40) == pytest.approx(0.1)
    assert DecayOnPass(total=20, warmup=0, decay=10).end == 20
    late = DecayOnPass(total=20, warmup=0, decay=10)
    late.start_decay(15)
    assert late.end == 20  # never past the budget

    fall = DecayOnPass(total=100, warmup=0, decay=0, min_ratio=0.1, fall_from=50)  # rate_until_pass = "cosine"
    assert fall(49) == 1.0 and fall(75) == pytest.approx(0.55) and fall(100) == pytest.approx(0.1)
    fall.start_decay(60)
    assert fall.end == 60 and fall(55) < 1.0
    with pytest.raises(ValueError, match="fall_from"):
        DecayOnPass(total=100, warmup=0, decay=10, fall_from=50)
    with pytest.raises(ConfigError, match="stage0.rate_until_pass"):
        validate(apply_overrides(preset("tiny"), ["stage0.rate_until_pass=cosine", "stage0.decay_steps=10"]))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    g = DecayOnPass(total=100, warmup=4, decay=10, min_ratio=0.1)
    torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                      g).load_state_dict(sched.state_dict())
    assert (g.decay_from, g.end) == (30, 40)


def test_stage0_trains_until_its_check_passes_then_decays_and_stops(tmp_path):
    """stage0.check_every: the seed is checked on held-apart training problems; once their accuracy reaches
    pass_accuracy the rate decays over decay_steps and the stage ends; a check that never passes uses the
    budget. The summary says where, the metrics log every check, and a resume mid-decay ends at the same step."""
    cfg = tiny_cfg()
    cfg.stage0.steps, cfg.stage0.check_every, cfg.stage0.check_problems, cfg.stage0.decay_steps = 20, 4, 2, 3
    cfg.stage0.pass_accuracy = 0.0  # passes at the first check
    cfg.stage0.parallel_fraction_start = None  # no ramp: checked from step 0
    summary = NPRTrainer(cfg, tmp_path / "pass", show_progress=False).run(("stage0",))
    assert (summary["stage0"]["check_passed_at"], summary["stage0"]["steps"]) == (4, 7)
    r = rows(tmp_path / "pass", "stage0")
    assert max(r) == 6 and r[3]["accuracy/check"] == 0.0 and r[6]["charts/lr"] == pytest.approx(3e-4)
    t = NPRTrainer(cfg, tmp_path / "resumed", show_progress=False)
    t.stop_after = {"stage0": 5}
    with pytest.raises(Interrupted):
        t.run(("stage0",))
    resumed = NPRTrainer(cfg, tmp_path / "resumed", resume=True, show_progress=False).run(("stage0",))
    assert (resumed["stage0"]["check_passed_at"], resumed["stage0"]["steps"]) == (4, 7)
    assert rows(tmp_path / "resumed", "stage0")[6]["loss/sft"] == pytest.approx(r[6]["loss/sft"], abs=1e-6)

    cfg.stage0.decay_steps = 0  # no decay: the stage ends at the pass, on the weight average
    summary = NPRTrainer(cfg, tmp_path / "average", show_progress=False).run(("stage0",))
    assert (summary["stage0"]["check_passed_at"], summary["stage0"]["steps"]) == (4, 4)
    cfg.stage0.decay_steps = 3

    cfg.stage0.pass_accuracy, cfg.stage0.steps = 1.0, 10  # an untrained seed never passes
    cfg.stage0.parallel_fraction_start, cfg.stage0.ramp_steps = 0.2, 5  # and is checked from the ramp's end
    summary = NPRTrainer(cfg, tmp_path / "budget", show_progress=False).run(("stage0",))
    assert (summary["stage0"]["check_passed_at"], summary["stage0"]["steps"]) == (None, 10)
    assert sorted(s for s, x in rows(tmp_path / "budget", "stage0").items() if "accuracy/check" in x) == [7]
    for bad in (["stage0.ramp_steps=0"], ["stage0.ramp_steps=1300", "stage0.steps=1300"]):
        with pytest.raises(ConfigError, match="stage0.ramp_steps"):
            validate(apply_overrides(preset("tiny"), ["stage0.check_every=50", "stage0.parallel_fraction_start=0.2",
                                                      *bad]))
    with pytest.raises(ConfigError, match="stage0.ramp_steps.*stage0.check_every = 0"):  # a short stage 0 ...
        validate(apply_overrides(preset("tiny"), ["stage0.steps=200"]))
    validate(apply_overrides(preset("tiny"), ["stage0.steps=200", "stage0.check_every=0"]))  # ... at a fixed budget
    with pytest.raises(ConfigError, match="stage0.check_problems"):
        validate(apply_overrides(preset("tiny"), ["stage0.check_every=50", "stage0.check_problems=0"]))
    with pytest.raises(ConfigError, match="stage0.pass_accuracy"):
        validate(apply_overrides(preset("tiny"), ["stage0.pass_accuracy=1.5"]))
    with pytest.raises(ConfigError, match="stage0.decay_steps"):
        validate(apply_overrides(preset("tiny"), ["stage0.check_every=50", "stage0.decay_steps=0",
                                                  "stage0.check_average=0"]))


def test_weight_average_is_an_exponential_moving_average_of_the_weights():
    import torch

    from npr_agent.updates import WeightAverage

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)
    avg.update(model)
    assert torch.allclose(avg.module.weight, torch.full((1, 2), 2.0))  # 0.75 * 1 + 0.25 * 5
    assert not avg.module.weight.requires_grad and model.weight.requires_grad


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[stage3]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="stage3.steps"):
        load_file(bad)
    bad.write_text("[stage9]\nsteps = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'stage9'"):
        load_file(bad)
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        apply_overrides(preset("tiny"), ["stage3.stepz=3"])
    cfg = apply_overrides(preset("tiny"), ["stage3.steps=7", "tasks.num_subproblems=3,4"])
    assert cfg.stage3.steps == 7 and cfg.tasks.num_subproblems == (3, 4)
    assert npr_main(["train", "--config", str(tmp_path / "missing.toml")]) == 2


def test_config_loader_checks_every_field_by_its_type(tmp_path):
    """One loader for every field, driven by the dataclasses' type hints: file (or --set), key, what was expected."""
    bad = tmp_path / "x.toml"
    cases = [('[stage3]\nlr = "abc"\n', "x.toml: stage3.lr: expected a float, got 'abc'"),
             ("[stage3]\nlr = true\n", "stage3.lr: expected a float, got True"),
             ("[model]\nhidden_size = 1.5\n", "model.hidden_size: expected an integer, got 1.5"),
             ('[stage1]\nmode = "paralel"\n', "stage1.mode: expected one of 'parallel', 'sequential', got 'paralel'"),
             ("[tasks]\nterms = [1, 2, 3]\n", "tasks.terms: expected a list of 2 items"),
             ('[tasks]\nterms = ["a", 2]\n', r"tasks.terms\[0\]: expected an integer, got 'a'"),
             ("[tasks]\nchat_kwargs = 3\n", "tasks.chat_kwargs: expected a table, got 3"),
             ("stage3 = 5\n", "x.toml: stage3: expected a table, got 5"),
             ("[engine]\nmemory_saver = 2\n", "engine.memory_saver: expected true/false, got 2"),
             ("[stage3]\nstepz = 1\n", "x.toml: stage3: unknown key 'stepz' \\(did you mean 'steps'\\?")]
    for text, msg in cases:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_file(bad)
    with pytest.raises(ConfigError, match="--set: stage3.lr: expected a float, got 'abc'"):
        apply_overrides(preset("tiny"), ["stage3.lr=abc"])
    cfg = apply_overrides(preset("tiny"), ["engine.num_blocks=none", "model.tokenizer=npr:qwen3", "stages=stage0,stage1",
                                           "engine.kv_mem_fraction=0.5", 'tasks.chat_kwargs={"a": 1}', "stage3.lr=1e-5",
                                           "model.gradient_checkpointing=true", "stage1.top_k=4.0"])
    assert cfg.engine.num_blocks is None and cfg.model.tokenizer == "npr:qwen3"
    assert cfg.stages == ("stage0", "stage1") and cfg.engine.kv_mem_fraction == 0.5
    assert cfg.tasks.chat_kwargs == {"a": 1} and cfg.stage3.lr == 1e-5 and cfg.model.gradient_checkpointing is True
    assert cfg.stage1.top_k == 4 and isinstance(cfg.stage1.top_k, int)
    # stage*.constraints is gone: the reward preset decides the constraints rollouts are judged under
    with pytest.raises(ConfigError, match="stage1: unknown key 'constraints'"):
        apply_overrides(preset("tiny"), ["stage1.constraints=relaxed"])
