"""The search-QA task: users' questions and corpus, episodes in the training loop and in evaluation, exact match,
and the teacher scoring an agent's tokens with the search results in its context."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SEARCH, ScriptedPolicy, make_config

from opd.config.sections import ConfigError
from opd.tasks.rows import DataError
from opd.tasks.search_qa import final_answer, normalise

CORPUS = [
    {"id": "1", "title": "Mirentor", "text": "Mirentor is a city founded in 1204 by the guild of Shovax."},
    {"id": "2", "title": "Kalo", "text": "The Kalo river flows past Mirentor into the grey sea."},
]
QUESTIONS = [{"question": f"When was city {i} founded?", "answer": str(1200 + i)} for i in range(10)] + [
    {"question": "Where does the Kalo flow?", "answers": ["the grey sea", "grey sea"]}
]


@pytest.fixture
def world(tmp_path, tool_models):
    """The tiny models behind a chat template with a tool role, a corpus and questions."""
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    return tool_models


def search_config(tmp_path, models, *overrides):
    return make_config(
        tmp_path, models, "task.name=search_qa", f"task.questions={tmp_path / 'questions.jsonl'}", f"task.corpus={tmp_path / 'corpus.jsonl'}",
        "task.eval_size=3", "task.max_tokens=200", "task.system_prompt=null", *overrides,
    )


def test_exact_match_reads_the_final_answer_and_normalises_it():
    assert final_answer("I searched.\nAnswer: The Grey Sea.\nthanks") == "The Grey Sea."
    assert final_answer("To answer: I will search first.\nAnswer: 1204") == "1204"  # the last one
    assert final_answer("Answer: maybe 1200 ... Answer: 1204") == "1204"
    assert final_answer("1204") == "1204" and normalise("  The  Grey-Sea! ") == "greysea" and normalise("an answer") == "answer"


def test_the_loop_trains_on_episodes_and_evaluates_them(tmp_path, world):
    from opd.training.loop import train

    summary = train(search_config(tmp_path, world, "train.steps=2", "eval.num_prompts=3"))
    assert summary["nonfinite_skips"] == 0 and summary["eval_after"]["rows"] == 3 and summary["eval_set"]["rows"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("episode_turns" in r for r in rows if r["kind"] == "train")


def test_the_teacher_scores_the_agents_tokens_with_the_search_results_in_context(tmp_path, world):
    """teacher = student ⇒ the OPD advantage is zero on every trained token of a two-turn episode, and the teacher's
    log-probs there equal a forward over the whole conversation written out as one sequence."""
    from opd.methods.base import student_samples
    from opd.methods.losses import student_token_logprobs, teacher_token_logprobs
    from opd.models.scoring import rollout_logprobs
    from opd.training.assembly import build_session

    s = build_session(search_config(tmp_path, world, f"teacher.path={world[1]}", "sampling.samples_per_prompt=1", "sampling.max_new_tokens=100", "task.max_tokens=400"))
    examples = s.task.splits()["train"][:2]
    prompts = [s.tokenizer(s.tokenizer.apply_chat_template(s.task.messages(e), tools=[t.schema() for t in s.task.tools], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"] for e in examples]
    s.sampler = ScriptedPolicy(s.tokenizer, prompts, [[SEARCH, "Answer: 1204"], ["Answer: grey sea"]])
    batch = student_samples(s, examples, torch.Generator().manual_seed(0))
    r = batch.rollouts
    assert batch.info["episode_turns"] == 1.5 and int(r.loss_mask_BC.sum()) < int(r.completion_mask_BC.sum())
    with torch.no_grad():
        teacher_BC, student_BC = teacher_token_logprobs(s, r), student_token_logprobs(s, r)[0]
        whole_BC, _ = rollout_logprobs(s.student, r.select([0]))
    trained = r.loss_mask_BC.bool()
    torch.testing.assert_close(teacher_BC[trained], student_BC[trained])  # zero advantage on the agent's tokens
    assert (teacher_BC[trained] != 0).all()
    ids = torch.cat([r.prompt_ids_BP[0][r.prompt_mask_BP[0].bool()], r.completion_ids_BC[0][r.completion_mask_BC[0].bool()]])
    logits = s.student(input_ids=ids[None]).logits[0].float().log_softmax(-1)
    start = int(r.prompt_mask_BP[0].sum())
    by_hand = logits[start - 1 : -1].gather(-1, ids[start:, None]).squeeze(-1)
    n = int(r.completion_mask_BC[0].sum())
    torch.testing.assert_close(whole_BC[0, :n], by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["task.questions=null"], "task.questions"),
        (["task.retriever_url=http://127.0.0.1:9/retrieve"], "task.corpus"),
        (["method.name=opsd", "teacher.path=null", "task.privileged_instruction=no placeholder"], "task.privileged_instruction"),
        (["task.max_tokens=4"], "task.max_tokens"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, world, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        search_config(tmp_path, world, *overrides)


def test_a_bad_question_row_names_file_line_and_field(tmp_path, world):
    from opd.tasks import build_task

    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n" + json.dumps({"question": "q?", "answer": []}) + "\n")
    with pytest.raises(DataError, match=r"questions.jsonl:2: field 'answer' must be a non-empty string or list"):
        build_task(search_config(tmp_path, world).task)


def test_a_teacher_reading_the_episodes_in_its_own_tokenizer_gives_the_shared_gradient(tmp_path, world):
    """teacher.tokenizer=own on tool episodes, with the student's own tokenizer and template as the teacher's: each
    episode the student played is rendered again turn by turn in the teacher's template and tokens, which are then the
    row's own, so every agent token is a span of one and the step's gradient is the shared path's, bit for bit."""
    import copy
    import random

    from opd.training.assembly import build_session
    from opd.training.loop import SUMMED_METRICS, accumulate_gradients

    def gradients(s, batch):
        s.student.zero_grad(set_to_none=True)
        sums, counts, _ = accumulate_gradients(s, [copy.deepcopy(batch)], 0)
        return [p.grad.clone() for p in s.student.parameters() if p.grad is not None], s.ranks.merge_metrics(sums, counts, SUMMED_METRICS)

    common = ["method.name=opd", "sampling.samples_per_prompt=1", "sampling.max_new_tokens=100", "task.max_tokens=400"]
    shared = build_session(search_config(tmp_path, world, *common, f"run.output_dir={tmp_path / 'shared'}"))
    own = build_session(search_config(tmp_path, world, *common, "teacher.tokenizer=own", f"run.output_dir={tmp_path / 'own'}"))
    examples = shared.task.splits()["train"][:2]
    prompts = [shared.tokenizer(shared.tokenizer.apply_chat_template(shared.task.messages(e), tools=[t.schema() for t in shared.task.tools],
                                                                   tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for e in examples]
    shared.sampler = ScriptedPolicy(shared.tokenizer, prompts, [[SEARCH, "Answer: 1204"], ["Answer: grey sea"]])
    batch = shared.method.data(shared, examples, random.Random(1), torch.Generator().manual_seed(0))
    assert all("episode" in e.meta for e in batch.examples) and batch.info["episode_turns"] == 1.5
    expected, expected_metrics = gradients(shared, batch)
    got, metrics = gradients(own, batch)
    assert len(expected) == len(got) > 0 and all(torch.equal(a, b) for a, b in zip(expected, got))
    assert metrics["kl"] == expected_metrics["kl"] and metrics["spans_per_token"] == 1.0
