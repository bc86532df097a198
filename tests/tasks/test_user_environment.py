"""A user's own environment class named in the config by import path: built per example, episodes in training and
evaluation, and one-line errors for a path that cannot be imported or a class that is not an environment."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import TOOL_TEMPLATE, ScriptedPolicy, make_config

from opd.config.sections import ConfigError
from opd.episodes.driver import run_episodes
from opd.episodes.environments import EpisodeLimits

USER_MODULE = '''
from opd.episodes.environments import StepResult
from opd.episodes.tool_calls import parse_tool_calls


class Calculator:
    """Add two numbers with the `add` tool, then answer."""

    def __init__(self, row, bonus=0.0):
        self.row, self.bonus = row, bonus

    def start(self):
        return [{"role": "user", "content": f"What is {self.row['a']} + {self.row['b']}?"}]

    def tools(self):
        return [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]

    def step(self, text):
        calls = parse_tool_calls(text).calls
        if calls:
            a, b = calls[0].arguments["x"], calls[0].arguments["y"]
            return StepResult([{"role": "tool", "content": str(a + b)}], tool_calls=1)
        return StepResult(reward=float(text.strip() == str(self.row["answer"])) + self.bonus, done=True)


class NotAnEnvironment:
    def start(self):
        return []
'''


@pytest.fixture
def user_env(tmp_path, tool_models, monkeypatch):
    package = tmp_path / "user_code"
    package.mkdir()
    (package / "my_envs.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(package))
    rows = [{"a": i, "b": i + 1, "answer": 2 * i + 1} for i in range(10)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yield tool_models
    sys.modules.pop("my_envs", None)


def env_config(tmp_path, models, *overrides):
    return make_config(
        tmp_path, models, "task.name=environment", "task.environment=my_envs:Calculator", f"task.rows={tmp_path / 'rows.jsonl'}",
        "task.eval_size=2", "task.max_tokens=200", *overrides,
    )


def test_the_named_class_runs_the_episodes_of_each_row(tmp_path, user_env):
    from opd.tasks import build_task

    task = build_task(env_config(tmp_path, user_env, "task.environment_kwargs={bonus: 0.5}").task)
    example = task.splits()["train"][0]
    row = example.meta["row"]
    tok = __import__("opd.worlds.tokenizer", fromlist=["x"]).build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    env = task.environment(example)
    prompt = tok(tok.apply_chat_template(env.start(), tools=env.tools(), tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    call = '<tool_call>{"name": "add", "arguments": {"x": %d, "y": %d}}</tool_call>' % (row["a"], row["b"])
    policy = ScriptedPolicy(tok, [prompt], [[call, str(row["answer"])]])
    from opd.config.sections import SamplingConfig

    episodes = run_episodes([env], policy, tok, SamplingConfig(max_new_tokens=100), task.episode_limits())
    assert episodes.rewards == [1.5] and episodes.turns == [2] and episodes.messages[0][2]["content"] == str(row["answer"])
    assert task.episode_limits() == EpisodeLimits(max_turns=4, max_tokens=200, stop=("</tool_call>",))


def test_the_loop_trains_and_evaluates_on_a_user_environment(tmp_path, user_env):
    from opd.training.loop import train

    summary = train(env_config(tmp_path, user_env, "train.steps=2", "eval.num_prompts=2"))
    assert summary["nonfinite_skips"] == 0 and summary["eval_after"]["rows"] == 2 and "accuracy" in summary["eval_after"]


@pytest.mark.parametrize(
    "path, message",
    [
        ("my_envs:Missing", "cannot be imported"),
        ("no_such_module.Env", "cannot be imported"),
        ("my_envs:NotAnEnvironment", "lacks the Environment method(s) tools, step"),
    ],
)
def test_a_class_that_cannot_be_used_is_one_line_naming_the_key(tmp_path, user_env, path, message):
    with pytest.raises(ConfigError, match=rf"'task\.environment'.*{message.replace('(', '.').replace(')', '.')}"):
        env_config(tmp_path, user_env, f"task.environment={path}")


def test_the_recipe_of_docs_tools_md_runs_as_written(tmp_path, user_env, monkeypatch):
    """docs/tools.md, "Your own environment": its command, word for word, with the models' placeholders replaced by
    real paths and a few settings appended to keep the run short."""
    import re
    import shlex
    from pathlib import Path

    from opd.cli import main

    docs = (Path(__file__).resolve().parents[2] / "docs" / "tools.md").read_text()
    section = docs.split("## Your own environment", 1)[1]
    command = re.search(r"\n    (opd train .*?)\n\n", section, re.S).group(1).replace("\\\n", " ")
    teacher, student = user_env
    args = shlex.split(command.replace("/models/student", str(student)).replace("/models/teacher", str(teacher)))
    assert args[:2] == ["opd", "train"]
    (tmp_path / "configs").symlink_to(Path(__file__).resolve().parents[2] / "src" / "opd" / "configs")
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths: configs/… and rows.jsonl
    short = ["train.steps=1", "task.eval_size=2", "eval.num_prompts=2", "task.max_tokens=200", "sampling.max_new_tokens=40",
             "run.output_dir=run", "log.progress_bar=false", "log.plot=false", "log.tensorboard=false"]
    assert main([*args[1:], *short]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["task"] == "environment"


def test_a_key_of_another_task_names_both_tasks_and_null_drops_it(tmp_path, user_env):
    with pytest.raises(ConfigError, match=r"^config key 'task\.questions' belongs to task\.name=search_qa, not task\.name=environment "
                                          r"\(remove it, or set task\.questions=null to drop it from a base config\)$"):
        env_config(tmp_path, user_env, "task.questions=q.jsonl")
    assert env_config(tmp_path, user_env, "task.questions=null").task.name == "environment"
