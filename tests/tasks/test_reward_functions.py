"""Users' reward functions (``task.reward_function``): imported by name from the user's own module, called with the
completion and the row in training and evaluation, weighted, reported as ``reward`` when not 0/1; bad names refused
before any model loads; a raising function stops the run naming the row, or scores 0 and is counted."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import make_config

from opd.config.sections import ConfigError
from opd.tasks.reward_functions import RewardFunctionError
from opd.training.loop import train

USER_MODULE = '''
CALLS = []


def digits(completion, row):
    """A shaped reward: the share of the answer's digits that the completion contains, in order."""
    CALLS.append((completion, dict(row)))
    answer = str(row["answer"])
    return sum(a == b for a, b in zip(completion.strip(), answer)) / len(answer)


def ends(completion, row):
    return 1.0 if completion.strip().endswith(str(row["answer"])) else 0.0


def boom(completion, row):
    raise KeyError("score")


def text(completion, row):
    return "high"


not_callable = 3
'''


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "user_code").mkdir()
    (tmp_path / "user_code" / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "user_code"))
    import my_rewards

    yield my_rewards
    sys.modules.pop("my_rewards", None)


def summary_and_rows(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "run" / "summary.json").read_text()), rows


def test_a_shaped_reward_trains_grpo_and_is_reported_as_reward_not_accuracy(tmp_path, tiny_models, user_rewards):
    summary = train(make_config(tmp_path, tiny_models, "method.name=grpo", "task.reward_function=my_rewards:digits"))
    assert user_rewards.CALLS, "the function was never called"
    completion, row = user_rewards.CALLS[-1]
    assert set(row) == {"prompt", "answer", "solution"} and row["answer"].isdigit()  # the arithmetic task's row
    after = summary["eval_after"]
    assert "accuracy" not in after or after["accuracy"] in (0.0, 1.0)  # only a 0/1 set of grades is an accuracy
    assert after["graded"] == 8 and summary["student_reward_after"] == after["reward"]
    evaluated = user_rewards.CALLS[-8:]  # the last evaluation's 8 greedy rows, each graded by the function
    assert after["reward"] == pytest.approx(sum(_digits(c, r) for c, r in evaluated) / 8)
    assert summary["reward_errors"] == 0


def _digits(completion, row):
    answer = str(row["answer"])
    return sum(a == b for a, b in zip(completion.strip(), answer)) / len(answer)


def test_weights_sum_the_functions(tmp_path, tiny_models, user_rewards):
    from opd.tasks import build_task

    cfg = make_config(tmp_path, tiny_models, "task.reward_function=[my_rewards:digits, my_rewards:ends]", "task.reward_weights=[0.5, 2.0]")
    task = build_task(cfg.task)
    example = task.eval_examples()[0]
    right, wrong = f"= {example.answer}", "nothing"
    assert task.reward(right, example) == pytest.approx(0.5 * _digits(right, {"answer": example.answer}) + 2.0)
    assert task.reward(wrong, example) == pytest.approx(0.5 * _digits(wrong, {"answer": example.answer}))


@pytest.mark.parametrize("overrides, message", [
    (["task.reward_function=my_rewards:missing"], r"^config key 'task\.reward_function': 'my_rewards:missing' cannot be imported \(AttributeError"),
    (["task.reward_function=no_such_module:f"], r"^config key 'task\.reward_function': 'no_such_module:f' cannot be imported \(ModuleNotFoundError"),
    (["task.reward_function=my_rewards:not_callable"], r"^config key 'task\.reward_function': 'my_rewards:not_callable' is a int, not a function$"),
    (["task.reward_function=[my_rewards:ends]", "task.reward_weights=[1, 2]"], r"^config key 'task\.reward_weights' has 2 weights for 1 reward functions$"),
], ids=["missing-function", "missing-module", "not-callable", "weights"])
def test_a_name_that_cannot_be_used_is_one_line_before_any_model(tmp_path, tiny_models, user_rewards, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, tiny_models, *overrides)


def test_a_raising_function_stops_the_run_naming_the_row_unless_told_to_score_zero(tmp_path, tiny_models, user_rewards):
    with pytest.raises(RewardFunctionError, match=r"^task\.reward_function my_rewards:boom raised on .*: KeyError: 'score' \(task\.reward_errors=zero"):
        train(make_config(tmp_path, tiny_models, "method.name=grpo", "task.reward_function=my_rewards:boom"))
    with pytest.raises(RewardFunctionError, match=r"returned 'high', not a finite number"):
        train(make_config(tmp_path, tiny_models, "method.name=grpo", "task.reward_function=my_rewards:text", "run.overwrite=true"))
    summary = train(make_config(tmp_path, tiny_models, "method.name=grpo", "task.reward_function=my_rewards:boom",
                                "task.reward_errors=zero", "run.overwrite=true"))
    # 2 steps x 4 prompts x 2 samples, and 8 rows in each of the two evaluations
    assert summary["reward_errors"] == 2 * 4 * 2 + 2 * 8 and summary["student_reward_after"] == 0.0


def test_prompt_only_rows_train_grpo_with_a_reward_function(tmp_path, tiny_models, user_rewards):
    """Rows without an answer are refused for GRPO unless a reward function grades them (it reads the row's own fields)."""
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "extra": a} for a in range(100, 120)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["answer"]}) + "\n" for r in rows))
    (tmp_path / "user_code" / "target_rewards.py").write_text(
        "def target(completion, row):\n    return float(completion.strip() == row['target'])\n"
    )
    common = ["method.name=grpo", "task.name=math", f"task.path={data}", "task.eval_size=4"]
    from opd.tasks import DataError

    with pytest.raises(DataError, match="no answer, and the method trains on the task's rewards"):
        train(make_config(tmp_path, tiny_models, *common))
    summary = train(make_config(tmp_path, tiny_models, *common, "task.reward_function=target_rewards:target", "run.overwrite=true"))
    assert summary["eval_after"]["graded"] == 4 and summary["student_reward_after"] is not None
    sys.modules.pop("target_rewards", None)


def test_an_environment_task_keeps_its_own_rewards(tmp_path, tiny_models, user_rewards):
    with pytest.raises(ConfigError, match=r"task\.reward_function' does not apply to task\.name=environment"):
        make_config(tmp_path, tiny_models, "task.name=environment", "task.environment=x:Y", "task.rows=r.jsonl",
                    "task.reward_function=my_rewards:ends", "sampling.max_new_tokens=12")


def test_a_module_in_the_working_directory_is_found_as_python_m_would(tmp_path, monkeypatch):
    """``opd train`` is a console script, whose sys.path holds its own directory, not the user's: a rewards.py beside
    the user is found all the same (after the installed packages, so it shadows none of them)."""
    import sys

    from opd.config.objects import import_object

    (tmp_path / "beside_the_user_rewards.py").write_text("def formatted(completion, row):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = import_object("beside_the_user_rewards:formatted", "task.reward_function")
    assert fn("x", {}) == 0.5 and sys.path[-1] == str(tmp_path)
