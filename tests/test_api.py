"""The Python API as a user calls it: ``opd.train`` with sections and Python objects, ``opd.evaluate``, and
``opd.load_config`` finding shipped configs by name."""

from __future__ import annotations

import json

import pytest
import yaml

import opd
from opd.config.loading import load_saved_config
from opd.config.objects import _HELD
from opd.config.sections import ConfigError

QUICK = ["train.steps=2", "train.prompts_per_step=4", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12",
         "eval.every=0", "eval.num_prompts=8", "eval.teacher=false", "checkpoint.every=0", "checkpoint.at_end=false",
         "log.progress_bar=false", "log.tensorboard=false", "log.plot=false"]


def test_train_takes_a_reward_function_object_and_sections(tmp_path, tiny_models):
    teacher, student = tiny_models
    seen = []

    def ends_with_answer(completion: str, row: dict) -> float:  # a closure: nothing a config file could name
        seen.append(row["answer"])
        return 1.0 if completion.strip().endswith(row["answer"]) else 0.0

    summary = opd.train(
        "configs/demo.yaml", QUICK, method={"name": "grpo"}, task={"reward_function": ends_with_answer},
        student={"path": str(student)}, teacher={"path": str(teacher)}, run={"output_dir": str(tmp_path / "run")},
    )
    assert seen and summary["method"] == "grpo" and summary["reward_errors"] == 0
    assert summary["eval_after"]["graded"] == 8 and summary["student_reward_after"] == summary["eval_after"]["reward"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["task"]["reward_function"].startswith("python:") and "ends_with_answer" in saved["task"]["reward_function"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["student_reward_after"] == summary["student_reward_after"]
    name = saved["task"]["reward_function"]
    held = _HELD.pop(name)  # as in a new process, where the object was never given
    try:
        with pytest.raises(ConfigError, match=r"a Python object given to opd\.train in another process"):
            load_saved_config(tmp_path / "run" / "config.yaml")
    finally:
        _HELD[name] = held


def test_train_takes_an_environment_class_object(tmp_path, tool_models):
    from opd.episodes.environments import StepResult

    class Echo:
        def __init__(self, row):
            self.row = row

        def start(self):
            return [{"role": "user", "content": f"say {self.row['answer']}"}]

        def tools(self):
            return []

        def step(self, text):
            return StepResult(reward=float(text.strip() == self.row["answer"]), done=True)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"answer": str(i)}) + "\n" for i in range(10)))
    teacher, student = tool_models
    summary = opd.train(None, [*QUICK, "task.eval_size=2", "eval.num_prompts=2"], task={"name": "environment", "environment": Echo, "rows": str(rows), "max_tokens": 200},
                        student={"path": str(student)}, teacher={"path": str(teacher)}, run={"output_dir": str(tmp_path / "run")})
    assert summary["task"] == "environment" and summary["eval_after"]["rows"] == 2


def test_evaluate_needs_data_or_a_task_for_a_model_of_ones_own(tiny_models):
    with pytest.raises(ConfigError, match=r"name what to evaluate it on, the data \(--data FILE\) or a task \(--task NAME\)"):
        opd.evaluate(str(tiny_models[1]))
    result = opd.evaluate(str(tiny_models[1]), task="arithmetic", overrides=["eval.num_prompts=4", "sampling.max_new_tokens=4"])
    assert result["prompts"] == 4 and 0.0 <= result["accuracy"] <= 1.0


def test_load_config_finds_shipped_configs_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert opd.load_config("demo.yaml").run.name == opd.load_config("configs/demo.yaml").run.name == "demo"
    assert opd.load_config("demo.yaml", ["train.steps=3"], train={"lr": 1e-5}).train.steps == 3
    with pytest.raises(ConfigError, match="overrides must be a list"):
        opd.load_config("demo.yaml", "train.steps=3")


def test_evaluate_a_run_directory_uses_the_runs_own_task_split_and_settings(tmp_path, tiny_models, capsys):
    """`opd eval RUN_DIR` (or RUN_DIR/final): the run's final model, task and held-out split, its eval settings."""
    from opd.cli import main

    teacher, student = tiny_models
    summary = opd.train("configs/demo.yaml", [*QUICK, "eval.num_prompts=6", "sampling.max_new_tokens=8", "checkpoint.at_end=false"],
                        student={"path": str(student)}, teacher={"path": str(teacher)}, run={"output_dir": str(tmp_path / "run")})
    for target in (tmp_path / "run", tmp_path / "run" / "final"):
        assert main(["eval", str(target)]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["task"] == "arithmetic" and result["prompts"] == 6  # the run's eval.num_prompts, not every row
        assert result["accuracy"] == summary["student_accuracy_after"]  # greedy, the same rows and weights


def test_ovd_takes_a_judge_function_or_object(tmp_path, tiny_models):
    """A judge of one's own scores every sampled completion; the acceptance rate each step logs is the share it
    scored at or above the threshold."""
    from opd.teachers.judges import JudgeError

    teacher, student = tiny_models
    seen = []

    def even_length(completion: str, row: dict) -> float:
        seen.append((completion, row["answer"]))
        return 9.0 if len(completion) % 2 == 0 else 0.0

    common = dict(student={"path": str(student)}, teacher={"path": str(teacher)})
    opd.train("configs/demo.yaml", [*QUICK, "method.name=ovd", "method.ovd.threshold=5"], method={"ovd": {"judge": even_length}},
              run={"output_dir": str(tmp_path / "fn")}, **common)
    steps = [json.loads(line) for line in (tmp_path / "fn" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    assert len(seen) == 2 * 4 * 2  # steps x prompts x samples, nothing else judged
    for i, row in enumerate(steps):
        judged = seen[8 * i: 8 * (i + 1)]
        assert row["accepted_fraction"] == sum(len(c) % 2 == 0 for c, _ in judged) / 8

    class Strict:  # the Judge protocol: score(examples, completions)
        calls = 0

        def score(self, examples, completions):
            Strict.calls += 1
            return [0.0] * len(completions)

    opd.train("configs/demo.yaml", [*QUICK, "method.name=ovd"], method={"ovd": {"judge": Strict()}}, run={"output_dir": str(tmp_path / "obj")}, **common)
    assert Strict.calls == 2
    assert all(json.loads(line).get("accepted_fraction", 0.0) == 0.0 for line in (tmp_path / "obj" / "metrics.jsonl").read_text().splitlines())

    with pytest.raises(JudgeError, match=r"method.ovd.judge python:.*out_of_range returned 12 on .*, not a score in \[0, 9\]"):
        def out_of_range(completion, row):
            return 12
        opd.train("configs/demo.yaml", [*QUICK, "method.name=ovd"], method={"ovd": {"judge": out_of_range}}, run={"output_dir": str(tmp_path / "bad")}, **common)
    with pytest.raises(ConfigError, match=r"^config key 'method.ovd.judge' must be one of programmatic, model, http, or a module:attribute judge; got 'modle'$"):
        opd.load_config("configs/demo.yaml", ["method.name=ovd", "method.ovd.judge=modle"])
    with pytest.raises(ConfigError, match=r"^config key 'method.ovd.judge': 'math:pi' is a float: neither a function nor an object with score\(\)$"):
        opd.load_config("configs/demo.yaml", ["method.name=ovd", "method.ovd.judge=math:pi"])
