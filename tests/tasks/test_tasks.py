import json
import random

import pytest

from opd.tasks import ArithmeticTask, DataError, MathTask
from opd.tasks.arithmetic import final_answer, scratchpad, step_accuracy


def test_scratchpad_matches_column_addition():
    assert scratchpad(347, 589) == "7+9=16,4+8+1=13,3+5+1=9|936"
    assert scratchpad(5, 7) == "5+7=12|12"
    assert scratchpad(905, 95) == "5+5=10,0+9+1=10,9+0+1=10|1000"


def test_verifier_exact_match():
    task = ArithmeticTask()
    ex = task.eval_examples()[0]
    assert task.reward(ex.solution, ex) == 1.0
    assert task.reward(ex.solution[:-1] + "x", ex) == 0.0
    assert task.reward("no separator", ex) == 0.0
    assert final_answer("1+2=3|3") == "3"


def test_step_accuracy_counts_correct_steps():
    assert step_accuracy(scratchpad(347, 589), 347, 589) == 1.0
    assert step_accuracy("7+9=16,4+8+1=13,3+5+1=8|836", 347, 589) == pytest.approx(2 / 4)
    assert step_accuracy("", 347, 589) == 0.0


def test_eval_split_is_held_out():
    task = ArithmeticTask(eval_size=300)
    held_out = {(e.meta["a"], e.meta["b"]) for e in task.eval_examples()}
    train = task.sample_train(20000, random.Random(0))
    assert not held_out & {(e.meta["a"], e.meta["b"]) for e in train}
    assert all(100 <= e.meta["a"] <= 999 for e in train)


def test_arithmetic_rejects_bad_digits():
    with pytest.raises(ValueError, match="task.min_digits"):
        ArithmeticTask(min_digits=4, max_digits=3)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def math_task(path, **fields):
    from opd.tasks.math import MathConfig

    return MathTask(str(path), MathConfig(path=str(path), **fields))


def test_math_task_reads_and_grades(tmp_path):
    rows = [{"problem": f"What is {i}+{i}?", "solution": f"{i}+{i}={2 * i}", "answer": str(2 * i)} for i in range(10)]
    rows.append({"problem": "Half of one?", "solution": "1/2", "answer": "\\frac{1}{2}"})
    task = math_task(write_jsonl(tmp_path / "d.jsonl", rows), eval_size=4)
    assert len(task.eval_examples()) == 4
    ex = next(e for e in task.eval_examples() + task.sample_train(50, random.Random(0)) if e.answer == "\\frac{1}{2}")
    assert task.reward("so the answer is \\boxed{0.5}", ex) == 1.0
    assert task.reward("so the answer is \\boxed{1/3}", ex) == 0.0
    assert task.reward("no boxed answer at all", ex) == 0.0
    assert "\\boxed{}" in task.messages(ex)[0]["content"]
    privileged = task.privileged_messages(ex)[0]["content"]
    assert "1/2" in privileged and privileged.endswith("Put your final answer in \\boxed{}.")


def test_math_task_numeric_answer_accepted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": 42}, {"problem": "q", "answer": 7}])
    task = math_task(path, eval_size=1, solution_field=None)
    assert {e.answer for e in task.eval_examples() + task.splits()["train"]} == {"42", "7"}


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ('{"problem": "p"', "d.jsonl:2: not valid JSON"),
        ({"question": "p", "answer": "1"}, "d.jsonl:2: no prompt: expected a 'messages', 'prompt' or 'problem' field (row has: answer, question;"),
        ({"problem": "p", "answer": ["1"]}, "d.jsonl:2: field 'answer' must be a string, got list"),
        ({"problem": "  ", "answer": "1"}, "d.jsonl:2: field 'problem' is missing or empty"),
        ("[1, 2]", "d.jsonl:2: expected an object (a row with named fields), got list"),
        ({"messages": [{"role": "user", "content": 3}]}, "d.jsonl:2: messages[0] must be an object with string 'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "d.jsonl:2: messages[0] has role 'robot'"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "d.jsonl:2: field 'messages' has no user turn"),
        ({"prompt": "p", "completion": [{"role": "user", "content": "x"}]}, "d.jsonl:2: field 'completion' may hold only assistant messages"),
    ],
)
def test_math_task_malformed_row_names_file_line_field(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"}, bad_row])
    with pytest.raises(DataError) as err:
        math_task(path)
    assert message in str(err.value)


def test_math_task_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        math_task(tmp_path / "missing.jsonl")


def test_math_task_from_saved_dataset(tmp_path):
    import datasets

    rows = {"problem": ["a", "b", "c"], "answer": ["1", "2", "3"], "solution": ["x", "y", "z"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    task = math_task(tmp_path / "ds", eval_size=1)
    assert len(task.eval_examples()) == 1 and len(task.splits()["train"]) == 2


def test_an_answer_math_verify_cannot_read_is_reported_not_silently_zero(tmp_path, caplog):
    import logging

    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "p", "answer": "\\\\\\\\"}\n{"problem": "q", "answer": "2"}\n')
    task = math_task(path, eval_path=str(path))
    rows = task.eval_examples()
    with caplog.at_level(logging.WARNING, logger="opd.tasks.math"):
        assert task.reward("\\boxed{2}", rows[1]) == 1.0
        assert task.reward("\\boxed{anything}", rows[0]) == 0.0
        task.reward("\\boxed{again}", rows[0])
    assert caplog.text.count("math-verify cannot read the answer") == 1 and "d.jsonl:1" in caplog.text


def test_arithmetic_privileged_prompt_asks_for_own_steps_and_fits_the_world_context():
    from opd.worlds.arithmetic import DEFAULT_SPEC
    from opd.worlds.tokenizer import build_char_tokenizer

    task = ArithmeticTask(eval_size=64)
    tokenizer = build_char_tokenizer()
    longest = 0
    for ex in task.eval_examples():
        system = task.privileged_messages(ex)[0]["content"]
        assert system == f"{ex.solution}\nNow give your own steps."
        ids = tokenizer.apply_chat_template(task.privileged_messages(ex), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        longest = max(longest, len(ids))
    # the OPSD configs leave the context minus 40 new tokens for the prompt
    assert longest <= DEFAULT_SPEC.max_positions - 40
    plain = ArithmeticTask(eval_size=4, privileged_instruction="")
    ex = plain.eval_examples()[0]
    assert plain.privileged_messages(ex)[0]["content"] == ex.solution
