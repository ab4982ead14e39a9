"""Runs refuse bad input before any work, hold problems out for real, and resume from files written atomically."""

import json
import time
from collections import Counter

import pytest
from test_trainer import tiny_cfg

from npr_agent.cli import main as npr_main
from npr_agent.cli import smoke
from npr_agent.config import ConfigError, apply_overrides, load_file, preset, validate
from npr_agent.files import atomic_write_jsonl, atomic_write_text
from npr_agent.trainer import Interrupted, NPRTrainer, split_heldout
from npr_env.tasks import Problem, TaskFormatError

BAD_SETTINGS = [
    ("stage3.lr_schedule=cosin", "stage3.lr_schedule"), ("stage1.top_k=-1", "stage1.top_k"),
    ("stage0.steps=-5", "stage0.steps"), ("stage3.group_size=0", "stage3.group_size"),
    ("stage3.lr=true", "stage3.lr"), ("stage3.algorithm=papoo", "stage3.algorithm"),
    ("stage3.mode=paralel", "stage3.mode"), ("stage1.reward=stage_1", "stage1.reward"),
    ("stage3.lr=nan", "stage3.lr"), ('stage3.algorithm_args={"clip_lo": 0.2}', "stage3.algorithm_args"),
    ("stage3.algorithm_args={bad", "stage3.algorithm_args"), ("device=tpu", "device"),
    ("model.dtype=fp8", "model.dtype"), ("engine.kv_mem_fraction=1.5", "engine.kv_mem_fraction"),
    ("tasks.digits=5", "tasks.digits"),
]


@pytest.mark.parametrize("setting,key", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_config_values_name_the_key_before_any_work(setting, key):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(apply_overrides(smoke(preset("tiny")), [setting]))
    assert time.perf_counter() - t0 < 10


def test_cli_refuses_bad_input_with_exit_2_and_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "bad.toml").write_text('preset = "nosuch"\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "cut.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+')
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n"
                                                  for i in range(6)))
    (tmp_path / "deep.json").write_text("[" * 100_000)
    cases = [
        (["--config", str(tmp_path / "bad.toml")], "bad.toml: preset"),
        (["--stage", "stage9"], "stage9"),
        (["--stage", "stage3"], "builds on stage2"),
        (["--set", "stage3.mode=paralel"], "stage3.mode"),
        (["--set", f"tasks.benchmark={tmp_path / 'empty.jsonl'}"], "empty.jsonl: 0 problem"),
        (["--set", f"tasks.benchmark={tmp_path / 'cut.jsonl'}"], "cut.jsonl:2"),
        (["--set", f"tasks.benchmark={tmp_path / 'deep.json'}"], "deep.json"),
        (["--set", f"tasks.benchmark={tmp_path / 'plain.jsonl'}"], "worked solutions"),
    ]
    for extra, msg in cases:
        assert npr_main(["train", "--smoke", "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra


def test_heldout_problems_are_never_trained_on(tmp_path, capsys):
    problems = [Problem(f"p{i}", f"{i}+1?", str(i + 1), "file") for i in range(40)]
    train, held = split_heldout(problems, 512, seed=0)
    assert "too few to hold out tasks.eval_size=512" in capsys.readouterr().out
    assert len(held) == 8 and len(train) == 32 and not {p.id for p in train} & {p.id for p in held}
    train, held = split_heldout(problems, 10, seed=0)
    assert len(held) == 10 and not {p.id for p in train} & {p.id for p in held}
    with pytest.raises(TaskFormatError, match="at least 2"):
        split_heldout(problems[:1], 10, seed=0)

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                            for p in problems))
    cfg = tiny_cfg()
    cfg.tasks.benchmark, cfg.stages = str(path), ("stage1",)
    t = NPRTrainer(cfg, tmp_path / "run", show_progress=False)
    recorded = [json.loads(line)["id"] for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert recorded == [p.id for p in t.eval_problems]
    trained = {p.id for s in range(50) for p in t.problems("stage1", s, 4)}
    assert trained and not trained & set(recorded)


def test_atomic_writes_leave_no_partial_file(tmp_path):
    path = tmp_path / "data.jsonl"
    atomic_write_jsonl(path, [{"a": 1}, {"b": 2}])
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_resume_needs_done_markers_and_logs_each_step_once(tmp_path):
    cfg = tiny_cfg()
    cfg.stage1.eval_every = 0
    t = NPRTrainer(cfg, tmp_path / "run", show_progress=False)
    t.stop_after = {"stage1": 2}
    with pytest.raises(Interrupted):
        t.run(("stage0", "stage1"))
    (tmp_path / "run" / "stage0" / "DONE").unlink()  # as if killed while saving stage 0's checkpoint
    with pytest.raises(FileNotFoundError, match="unfinished checkpoint"):
        NPRTrainer(cfg, tmp_path / "run", show_progress=False).load_stage("stage0")
    (tmp_path / "run" / "stage0" / "DONE").write_text("ok\n")
    # the killed attempt logged step 3 after its checkpoint at step 2; the resumed run logs it again
    t = NPRTrainer(cfg, tmp_path / "run", show_progress=False)
    t.logger.log("stage1", 3, {"reward/mean": 123.0})
    NPRTrainer(cfg, tmp_path / "run", resume=True, show_progress=False).run(("stage0", "stage1"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = Counter(r["step"] for r in rows if r["stage"] == "stage1" and "loss/policy" in r)
    assert steps == Counter({1: 1, 2: 1, 3: 1})
    assert not any(r.get("reward/mean") == 123.0 for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "stage1" in summary and not list((tmp_path / "run").glob("*.tmp"))


def test_config_file_values_are_validated_too(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[stage3]\nalgorithm = "papoo"\n')
    with pytest.raises(ConfigError, match="stage3.algorithm"):
        validate(load_file(bad))


def test_deeply_nested_problem_files_name_the_file(tmp_path):
    from npr_env.tasks import load_problems

    for name, text in (("deep.json", "[" * 100_000), ("deep.jsonl", "[" * 100_000 + "\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(TaskFormatError, match=f"{name}.*nested too deeply"):
            load_problems(tmp_path / name)
