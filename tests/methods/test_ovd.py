"""OVD: acceptance and replacement on hand-built scores; the group baseline against the formula written out; the three
judges; the method through the loop."""

import json
import random
import statistics
import time
from pathlib import Path

import pytest
import torch
from conftest import Server, make_config
from transformers import AutoModelForCausalLM

from opd.objectives.grpo import group_advantages
from opd.objectives.ovd import (
    GroupMember,
    accept,
    first_rejected_step,
    ovd_rewards,
    plan_group,
    student_baseline_advantages,
)
from opd.services.http import ServiceError
from opd.tasks.arithmetic import StepCheckingJudge, make_example
from opd.teachers.judges import HTTPJudge, JudgeError, ModelJudge
from opd.training.loop import train


def test_acceptance_threshold():
    assert accept([9, 7, 6.99, 0], threshold=7) == [True, True, False, False]


def test_trajectory_replacement_plan():
    plan = plan_group(["a", "bb", "ccc"], [8.0, 3.0, 7.0], threshold=7, replacement="trajectory")
    assert plan == [GroupMember("student", 1), GroupMember("teacher", 0), GroupMember("student", 3)]
    assert plan_group(["a", "bb"], [0.0, 0.0], 7, "none") == [GroupMember("student", 1), GroupMember("student", 2)]


def test_step_replacement_keeps_the_accepted_prefix():
    texts = ["7+9=16,4+8+1=13,3+5+1=8|836", "7+9=15,4+8=12|125", "7+9=16,4+8+1=13,3+5+1=9|936"]
    step_scores = [[9, 9, 0, 0], [0, 9, 0], [9, 9, 9, 9]]
    step_starts = [[0, 7, 16, 23], [0, 7, 13], [0, 7, 16, 23]]
    plan = plan_group(texts, [4.5, 3.0, 9.0], 7, "step", step_scores, step_starts)
    assert plan[0] == GroupMember("student_prefix+teacher", len("7+9=16,4+8+1=13,"))
    assert plan[1] == GroupMember("teacher", 0)  # the first step is already wrong
    assert plan[2] == GroupMember("student", len(texts[2]))
    assert first_rejected_step([9, 8, 7], 7) is None
    with pytest.raises(ValueError, match="needs per-step scores"):
        plan_group(["x"], [0.0], 7, "step")


@pytest.mark.parametrize(
    "completion, kept",
    [
        ("7+9=16,4+8+1=13,3+5+1=9|935", "7+9=16,4+8+1=13,3+5+1=9"),  # every step right, the answer wrong
        ("7+9=16,4+8+1=13|936", "7+9=16,4+8+1=13"),  # a step missing before the answer
        ("7+9=16,4+8+1=13,3+5+1=8|836", "7+9=16,4+8+1=13,"),  # a wrong step
    ],
)
def test_step_replacement_never_keeps_a_wrong_answer(completion, kept):
    """The judge's step boundaries put the cut before the first rejected step, the final answer included."""
    example, judge = make_example(347, 589), StepCheckingJudge()
    scores = judge.step_scores(example, completion)
    starts = judge.step_starts(example, completion)
    assert len(starts) == len(scores)
    (member,) = plan_group([completion], judge.score([example], [completion]), 7, "step", [scores], [starts])
    assert member.source == "student_prefix+teacher"
    assert completion[: member.keep_prefix_chars] == kept and "|" not in kept


def test_the_kept_prefix_is_the_students_own_tokens(tokenizer):
    from opd.methods.ovd import sampled_prefix

    text = "7+9=16,4+8+1=13|936"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    kept_ids, kept_text = sampled_prefix(tokenizer, ids, "7+9=16,4+8+1=13")
    assert kept_ids == ids[: len("7+9=16,4+8+1=13")] and kept_text == "7+9=16,4+8+1=13"
    assert sampled_prefix(tokenizer, ids, "") == ([], "")
    assert sampled_prefix(tokenizer, ids, text + "extra") == (ids, text)  # EOS decodes to nothing


def test_score_weight_in_reward():
    assert ovd_rewards([1.0, 0.0], [9.0, 4.5]) == [1.0, 0.0]
    assert ovd_rewards([1.0, 0.0], [9.0, 4.5], score_weight=0.5) == [1.5, 0.25]


def students_baseline(rewards, student_rewards, groups, scale=True, sample=True, eps=1e-6):
    """The baseline written out: per group, b = mean of the student's rewards, σ their std; (r − b) / (σ + ε), or
    r − b when σ is 0 or scaling is off."""
    out = []
    for r, g in zip(rewards, groups):
        own = [x for x, h in zip(student_rewards, groups) if h == g]
        b = statistics.fmean(own)
        sigma = (statistics.stdev(own) if sample else statistics.pstdev(own)) if len(own) > 1 else 0.0
        out.append((r - b) / (sigma + eps) if scale and sigma > 0 else r - b)
    return out


@pytest.mark.parametrize(
    "case, rewards, student_rewards",
    [
        ("every row replaced, the student failing all", [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]),  # A = r − 0: σ = 1
        ("mixed: two accepted, two replaced", [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]),
        ("every row solved by the student", [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]),  # A = 0
        ("with the score in the reward (w = 0.5)", [1.5, 1.0 + 0.5 * 8 / 9, 0.25, 0.5 * 3 / 9], [1.5, 0.5 * 2 / 9, 0.25, 0.5 * 3 / 9]),
    ],
)
def test_the_students_own_rewards_are_the_baseline(case, rewards, student_rewards):
    groups = [0, 0, 0, 0]
    for scale in (True, False):
        for sample in (True, False):
            got = student_baseline_advantages(torch.tensor(rewards), torch.tensor(student_rewards), torch.tensor(groups), scale, sample)
            assert got.tolist() == pytest.approx(students_baseline(rewards, student_rewards, groups, scale, sample), abs=1e-6), case
    if case.startswith("every row replaced"):
        assert student_baseline_advantages(torch.tensor(rewards), torch.tensor(student_rewards), torch.tensor(groups)).tolist() == rewards


def test_each_group_has_its_own_baseline():
    rewards, student_rewards, groups = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1, 1]
    got = student_baseline_advantages(torch.tensor(rewards), torch.tensor(student_rewards), torch.tensor(groups))
    assert got.tolist() == pytest.approx(students_baseline(rewards, student_rewards, groups), abs=1e-6)
    # the final group's baseline (GRPO's) differs: a group of all-successful demonstrations gets nothing from it
    final = group_advantages(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    assert final.tolist() == [0.0, 0.0] and student_baseline_advantages(torch.tensor([1.0, 1.0]), torch.zeros(2), torch.tensor([0, 0])).tolist() == [1.0, 1.0]


def test_programmatic_judge_scores_steps():
    example = make_example(347, 589)
    judge = StepCheckingJudge()
    assert judge.score([example], ["7+9=16,4+8+1=13,3+5+1=9|936"]) == [9.0]
    assert judge.step_scores(example, "7+9=16,4+8+1=13,3+5+1=8|836") == [9.0, 9.0, 0.0, 0.0]
    assert judge.score([example], ["garbage"]) == [0.0]


def test_model_judge_is_the_expected_digit(tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0])
    judge = ModelJudge(model, tokenizer)
    example = make_example(12, 34)
    scores = judge.score([example, example], ["2+4=6,1+3=4|46", "nonsense"])
    ids = torch.tensor([judge.prompt_ids(example, "2+4=6,1+3=4|46")])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    digits = logits[[tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]].softmax(-1)
    assert scores[0] == pytest.approx(float((digits * torch.arange(10)).sum()), abs=1e-5)
    assert all(0 <= s <= 9 for s in scores) and scores[0] != scores[1]


class JudgeServer(Server):
    """A real OpenAI-style endpoint on loopback whose behaviour the test chooses per request."""

    def __init__(self, behaviours):
        self.behaviours = list(behaviours)
        super().__init__(self.respond)
        self.url = self.url.removesuffix("/v1/chat/completions")

    def respond(self, handler):
        kind = self.behaviours.pop(0) if self.behaviours else "ok"
        if kind == "slow":
            time.sleep(0.5)
            kind = "ok"
        if kind == "fail":
            handler.send_response(500)
            handler.end_headers()
            return
        text = {"ok": "The steps are right. Score: 8", "garbage": "I like this answer a lot!"}[kind]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def test_http_judge_survives_slow_failing_and_garbage_replies(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    example = make_example(1, 2)
    with JudgeServer(["slow", "fail", "garbage", "ok"]) as server:
        judge = HTTPJudge(server.url, "m", api_key_env="JUDGE_KEY", deadline=0.2, retries=3, backoff=0.01)
        assert judge.score([example], ["1+2=3|3"]) == [8.0]
    assert len(server.requests) == 4
    path, headers, body = server.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert "1+2=3|3" in json.loads(body)["messages"][0]["content"]


def test_http_judge_gives_a_clear_error_when_it_never_scores():
    with JudgeServer(["garbage"] * 3) as server:
        judge = HTTPJudge(server.url, "m", deadline=1.0, retries=2, backoff=0.01)
        with pytest.raises(JudgeError, match=r"gave no score after 3 attempts: the reply has no 'Score: d' \('I like this answer"):
            judge.score([make_example(1, 2)], ["x"])


def test_http_judge_unreachable_and_missing_key(monkeypatch):
    judge = HTTPJudge("http://127.0.0.1:9", "m", deadline=0.2, retries=1, backoff=0.01)
    with pytest.raises(ServiceError, match="after 2 attempts: request failed"):
        judge.score([make_example(1, 2)], ["x"])
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable NO_SUCH_KEY"):
        HTTPJudge("http://127.0.0.1:9", "m", api_key_env="NO_SUCH_KEY")


@pytest.mark.parametrize("replacement", ["trajectory", "step"])
def test_ovd_runs_through_the_loop(tmp_path, tiny_models, replacement):
    summary = train(make_config(tmp_path, tiny_models, "method.name=ovd", f"method.ovd.replacement={replacement}", "method.ovd.threshold=5"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert summary["nonfinite_skips"] == 0
    assert all(r["accepted_fraction"] == 0.0 for r in train_rows)  # random students never score 5
    assert summary["generated_tokens"] == sum(r["student_tokens"] for r in train_rows)


def test_ovd_config_refusals():
    from opd.config.loading import load_config
    from opd.config.sections import ConfigError

    base = ["student.path=s", "teacher.path=t", "method.name=ovd"]
    with pytest.raises(ConfigError, match="'method.ovd.judge' needs a task whose steps can be checked"):
        load_config(None, base + ["task.name=math", "task.path=x.jsonl"])
    with pytest.raises(ConfigError, match="'method.ovd.http.url' is required for judge=http"):
        load_config(None, base + ["method.ovd.judge=http"])
    with pytest.raises(ConfigError, match="'method.ovd.replacement' 'step' needs per-step scores"):
        load_config(None, base + ["method.ovd.judge=model", "method.ovd.replacement=step"])


def test_failed_demonstrations_can_be_left_out_of_the_group(tmp_path, tiny_models):
    """A random tiny teacher never solves a problem: with the option every replaced row leaves the loss; against the
    final group it leaves the group too, against the student's baseline it keeps its place (its sample counts in b)."""
    from opd.training.assembly import build_session

    for drop, baseline in ((False, "student"), (True, "student"), (True, "final_group")):
        cfg = make_config(
            tmp_path, tiny_models, "method.name=ovd", "method.ovd.threshold=5", f"method.ovd.drop_failed_demonstrations={drop}",
            f"method.ovd.baseline={baseline}",
        )
        s = build_session(cfg)
        examples = s.task.sample_train(3, random.Random(0))
        batch = s.method.data(s, examples, random.Random(0), torch.Generator().manual_seed(0))
        r = batch.rollouts
        assert batch.info["accepted_fraction"] == 0.0 and batch.info["demonstration_reward"] == 0.0
        assert batch.info["dropped_fraction"] == float(drop)
        if drop:
            assert r.loss_mask_BC.sum() == 0
        else:
            assert torch.equal(r.loss_mask_BC, r.completion_mask_BC)
        distinct = len(set(r.group_B))
        assert distinct == (len(r.group_B) if baseline == "final_group" else len(examples))
        assert batch.baseline_rewards == [0.0] * len(r.group_B)  # the random student solves nothing either


@pytest.mark.parametrize("baseline, score_weight", [("student", 0.0), ("student", 0.5), ("final_group", 0.0)])
def test_each_row_is_trained_with_the_advantage_its_baseline_gives(baseline, score_weight, tmp_path):
    """The embedded student (about half right) and teacher (nearly always right) on a group: the rows' advantages, as the
    loss trained them, equal the formula written out — against the student's own samples, graded here again from an
    independent draw of the same samples, or against the final group's rewards."""
    from opd.config.loading import load_config
    from opd.methods import token_views
    from opd.methods.base import student_samples
    from opd.training.assembly import build_session

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "src/opd/configs/arithmetic/ovd.yaml",
        [f"run.output_dir={tmp_path}", f"method.ovd.baseline={baseline}", f"method.ovd.score_weight={score_weight}", "train.threads=1"],
    )
    s = build_session(cfg)
    examples = s.task.sample_train(4, random.Random(3))
    batch = s.method.data(s, examples, random.Random(0), torch.Generator().manual_seed(7))
    own = student_samples(s, examples, torch.Generator().manual_seed(7))  # the same draw: the student's own samples
    scores = s.judge.score(own.examples, own.rollouts.texts)
    student_rewards = [own_r + score_weight * score / 9 for own_r, score in zip(own.rewards, scores)]
    assert batch.baseline_rewards == pytest.approx(student_rewards)
    assert 0 < batch.info["accepted_fraction"] < 1 and batch.info["reward"] == pytest.approx(sum(own.rewards) / len(own.rewards))
    groups = batch.rollouts.group_B
    if baseline == "student":
        expected = students_baseline(batch.rewards, student_rewards, groups)
    else:  # GRPO's: the trained rows' own mean and std
        expected = []
        for r, g in zip(batch.rewards, groups):
            members = [x for x, h in zip(batch.rewards, groups) if h == g]
            expected.append((r - statistics.fmean(members)) / (statistics.stdev(members) + 1e-6))
    with token_views.recording() as views, torch.no_grad():
        s.method.loss(s, batch, 0)
    trained = views[-1].advantages_BC[:, 0]  # one advantage per row, on every token
    assert trained.tolist() == pytest.approx(expected, abs=1e-5)
    if baseline == "student" and score_weight == 0:
        replaced = [i for i, note in enumerate(batch.row_notes) if "replaced" in note]
        assert replaced and all(trained[i] > 0 for i in replaced if batch.rewards[i] == 1 and student_rewards[i] == 0)
