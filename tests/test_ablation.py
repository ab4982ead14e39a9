"""`npr ablate`: every arm from one source run, equal sampling budgets, the report; and the pieces it adds to the
trainer (stage 2's layout, the RL token budget, stage 0's parallel layout)."""

import json

import numpy as np
import pytest
from test_trainer import rows, tiny_cfg

from npr_agent import ablation
from npr_agent.cli import main as npr_main
from npr_agent.config import ConfigError, validate
from npr_agent.trainer import NPRTrainer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Stages 0-2 of a very small run: the seed, the stage-1 model and the kept trajectories."""
    cfg = tiny_cfg()
    cfg.stage2.min_kept = 8  # an untrained stage 1 solves nothing: worked solutions give stage 2 its data
    run = tmp_path_factory.mktemp("src") / "run"
    NPRTrainer(cfg, run, show_progress=False).run(("stage0", "stage1", "stage2"))
    return run


def test_stage0_trains_parallel_solutions_under_the_parallel_layout(source):
    t = NPRTrainer(tiny_cfg(), source, resume=True, show_progress=False)
    p = t.problems("stage0", 0, 1)[0]
    par = t.sft_sample(p, p.solutions["parallel"], layout="parallel")
    seq = t.sft_sample(p, p.solutions["parallel"], layout="sequential")
    # the steps restart at one position in the parallel layout; as text they run on
    assert par.layout.position_ids.max() < seq.layout.position_ids.max()
    assert np.array_equal(seq.layout.position_ids, np.arange(len(seq.prompt_ids) + len(seq.token_ids)))


def test_spelled_tags_need_stage0_to_train_causal_text_only():
    cfg = tiny_cfg()
    cfg.stage0.spelled_tags, cfg.stage0.parallel_layout = True, "both"
    with pytest.raises(ConfigError, match="stage0.parallel_layout"):
        validate(cfg)
    cfg.stage0.parallel_layout = "sequential"
    validate(cfg)


def test_stage2_layout_sequential_trains_causal_text(source):
    t = NPRTrainer(tiny_cfg(), source, resume=True, show_progress=False)
    for s in t.stage2_samples("sequential"):
        n = len(s.prompt_ids) + len(s.token_ids)
        assert np.array_equal(s.layout.position_ids, np.arange(n))
    par = t.stage2_samples("parallel")
    assert any(s.layout.position_ids.max() < len(s.prompt_ids) + len(s.token_ids) - 1 for s in par)


def test_rl_stops_at_its_sampled_token_budget(source, tmp_path):
    cfg = tiny_cfg()
    cfg.stage3.steps, cfg.stage3.sampled_tokens = 50, 1  # the first step spends more than the budget
    run = tmp_path / "run"
    run.mkdir()
    for name in ("stage0", "stage1", "stage2", "stage2_data.jsonl"):
        (run / name).symlink_to(source / name)
    NPRTrainer(cfg, run, show_progress=False).run(("stage3",))
    steps = [r for r in rows(run, "stage3").values() if "perf/sampled_tokens" in r]
    assert len(steps) == 1 and steps[0]["perf/sampled_tokens_total"] == steps[0]["perf/sampled_tokens"] > 0


def test_ablation_arms_end_on_their_last_weights(source):
    """The source's stage 3 keeps its best check (the preset); an arm does not: the checks would be compute outside
    the arms' equal budget."""
    from npr_agent.config import load_file

    assert load_file(source / "config.json").stage3.select_every > 0
    cfg = ablation.AblationConfig(source=str(source), out="unused")
    for arm in ablation.ARMS.values():
        assert ablation.arm_config(cfg, arm, seed=0).stage3.select_every == 0, arm.name


@pytest.mark.slow
def test_ablate_smoke_every_arm_one_seed(source, tmp_path, capsys):
    """`npr ablate` end to end with one seed and a few steps per arm: a result per arm, the table, the JSON,
    the PNG and a TensorBoard run per arm, and with --quiet no progress bar (transformers' included); running it
    again reads the finished arms back."""
    out = tmp_path / "abl"
    argv = ["ablate", "--from", str(source), "--out", str(out), "--seeds", "0", "--sampled-tokens", "400",
            "--max-steps", "3", "--eval-every", "1", "--eval-size", "4", "--speed-problems", "2", "--threads", "1",
            "--quiet", "--set", "stage3.prompts_per_step=2", "--set", "stage3.group_size=2"]
    assert npr_main(argv) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    doc = json.loads((out / "ablation.json").read_text())
    assert set(doc["arms"]) == set(ablation.ARMS)
    by = {r["arm"]: r for r in doc["runs"]}
    for name, arm in ablation.ARMS.items():
        r = by[name]
        assert r["mode"] == arm.mode and r["eval_n"] == 4
        assert r["tokens_per_s_parallel"] > 0 and r["tokens_per_s_sequential"] > 0
        assert (out / name / "seed0" / "tb").is_dir()
        if arm.stage == "stage3" and name != "no-rl":  # the budget ends the arm, or the step cap does
            assert 1 <= r["rl_steps"] <= 3
            assert r["sampled_tokens"] >= 400 or r["rl_steps"] == 3
    assert by["no-rl"]["sft_tokens"] >= 400 and by["no-rl"]["rl_steps"] == 0
    md = (out / "ablation.md").read_text()
    assert all(f"| {name} |" in md for name in ablation.ARMS)
    assert (out / "ablation.png").stat().st_size > 10_000
    assert [(d["arm"], d["baseline"]) for d in doc["differences"]] == [c[:2] for c in ablation.CONTRASTS]
    assert "| papo − no-rl | RL over SFT at equal tokens |" in md
    mtime = (out / "papo" / "seed0" / "arm.json").stat().st_mtime
    assert npr_main(argv) == 0  # finished arms are read back, not retrained
    assert (out / "papo" / "seed0" / "arm.json").stat().st_mtime == mtime
    wall, md = json.loads((out / "ablation.json").read_text())["wall_s"], (out / "ablation.md").read_text()
    assert npr_main(argv + ["--report-only"]) == 0  # the same table, and the wall time of the run is kept
    assert wall is not None and json.loads((out / "ablation.json").read_text())["wall_s"] == wall
    assert (out / "ablation.md").read_text() == md


def test_differences_are_paired_by_seed_and_skip_contrasts_without_a_common_seed():
    runs = [{"arm": "npr-beta", "seed": 0, "accuracy": 0.70}, {"arm": "papo", "seed": 0, "accuracy": 0.75},
            {"arm": "npr-beta", "seed": 1, "accuracy": 0.60}, {"arm": "papo", "seed": 1, "accuracy": 0.71},
            {"arm": "no-rl", "seed": 2, "accuracy": 0.9}]  # seed 2 has no npr-beta: no-rl's contrasts are skipped
    (d,) = ablation.differences(runs)
    assert (d["arm"], d["baseline"], d["seeds"]) == ("papo", "npr-beta", [0, 1])
    assert d["points"] == [5.0, 11.0] and d["mean"] == pytest.approx(8.0) and d["std"] == pytest.approx(3.0)


def test_ablate_refuses_a_folder_that_is_not_a_source_run(tmp_path, capsys):
    rc = npr_main(["ablate", "--from", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "not a source run for npr ablate (no config.json)" in capsys.readouterr().err


def test_ablate_names_an_unknown_arm(source, tmp_path, capsys):
    rc = npr_main(["ablate", "--from", str(source), "--out", str(tmp_path / "o"), "--arms", "papo,ppo", "--quiet"])
    assert rc == 2
    assert "unknown arm(s) ppo" in capsys.readouterr().err


def test_a_source_at_the_ceiling_gets_a_warning(tmp_path):
    assert ablation.ceiling_note(tmp_path) is None  # no summary: nothing to say
    for acc, warned in ((0.73, False), (0.96, True)):
        (tmp_path / "summary.json").write_text(json.dumps({"stage2": {"eval": {"accuracy": acc}}}))
        note = ablation.ceiling_note(tmp_path)
        assert (note is not None) == warned
    assert "0.960" in note and "0.6-0.8" in note


def test_error_kinds_compares_stages_on_the_held_out_stream_continued(source, tmp_path):
    """Past heldout.jsonl the problems continue the run's own test stream; the comparison counts the first stage's
    errors that the last one removed and the ones it introduced, on the same problems."""
    from benchmarks import error_kinds

    recorded = [json.loads(line)["question"] for line in (source / "heldout.jsonl").read_text().splitlines()]
    problems = error_kinds.heldout(source, len(recorded) + 3)
    assert [p.question for p in problems[: len(recorded)]] == recorded and len(problems) == len(recorded) + 3
    out = tmp_path / "cmp.json"
    error_kinds.main(["--run", str(source), "--stage", "stage1,stage2", "--n", str(len(problems)),
                      "--max-new-tokens", "48", "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    before, after = (set(s["wrong"]) for s in res["stages"])
    c = res["compare"]
    assert (c["from"], c["to"], c["n"]) == ("stage1", "stage2", len(problems))
    assert (c["errors_before"], c["errors_after"]) == (len(before), len(after))
    assert (c["removed"], c["introduced"]) == (len(before - after), len(after - before))
    for s in res["stages"]:
        assert s["accuracy"] == pytest.approx(1 - len(s["wrong"]) / len(problems))
    with pytest.raises(SystemExit, match="stage3"):
        error_kinds.main(["--run", str(source), "--stage", "stage2,stage3"])
    # the copy probe teacher-forces fresh problems of the run's own task through the seed, in both layouts
    error_kinds.main(["--copy-probe", "--run", str(source), "--stage", "stage0", "--n", "3", "--threads", "1",
                      "--json", str(out)])
    probe = json.loads(out.read_text())
    assert {k for k in probe if "/" in k} == {f"{lay}/{w}" for lay in ("parallel", "sequential")
                                             for w in ("first", "later")}
    assert all(0 <= probe[k] <= 1 for k in probe if "/" in k)
