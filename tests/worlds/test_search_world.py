"""The embedded search world: its generated knowledge base and questions, its word tokenizer, and SFT on scripted
tool-using episodes (the scripted tokens trained, the real search results between them as context)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from opd.worlds.search import (
    DEFAULT_SEARCH_SPEC,
    build_word_tokenizer,
    corpus,
    knowledge_base,
    questions,
    search_call,
    write_data,
)

SMALL = replace(DEFAULT_SEARCH_SPEC, people=300, eval_people=40, train_questions=200, eval_questions=40, cities=30, countries=5)


def test_the_world_data_is_the_same_on_every_build(tmp_path):
    write_data(tmp_path / "a", SMALL)
    write_data(tmp_path / "b", SMALL)
    for name in ("corpus.jsonl", "train.jsonl", "eval.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_held_out_answers_are_only_in_the_corpus_and_their_words_are_not_new():
    kb = knowledge_base(SMALL)
    train, held_out = questions(kb, SMALL)
    name_of = lambda q: q["question"].removeprefix("Where was ").removeprefix("Which country was ").removesuffix(" born?").removesuffix(" born in?")  # noqa: E731
    trained_people, asked = {name_of(q) for q in train}, {name_of(q) for q in held_out}
    assert asked and not asked & trained_people  # no held-out person is asked about in training
    trained_words = {w for name in trained_people for w in name.split()}
    assert all(w in trained_words for name in asked for w in name.split())  # but every word of their names is seen
    city_of = dict(kb.people)
    for q in held_out:  # the answer follows from the corpus: the person's city, or that city's country
        assert q["answers"] == ([city_of[name_of(q)]] if q["hops"] == 1 else [kb.cities[city_of[name_of(q)]]])
    assert {q["hops"] for q in train} == {1, 2}


def test_the_scripted_turns_search_for_what_the_passages_then_hold():
    from opd.episodes.search import BM25Index, Passage

    kb = knowledge_base(SMALL)
    index = BM25Index([Passage(r["id"], r["title"], r["text"]) for r in corpus(kb)])
    train, _ = questions(kb, SMALL)
    for q in train[:100]:
        *calls, answer = q["turns"]
        queries = [json.loads(c.removeprefix("<tool_call>").removesuffix("</tool_call>"))["arguments"]["query"] for c in calls]
        assert [index.search(query, SMALL.top_k)[0].title for query in queries] == queries  # the first passage is the one asked for
        assert answer == f"Answer: {q['answers'][0]}"


def test_the_word_tokenizer_spells_the_world_back_exactly_without_unknown_words():
    kb = knowledge_base(SMALL)
    tokenizer = build_word_tokenizer(kb.words)
    train, _ = questions(kb, SMALL)
    texts = [r["text"] for r in corpus(kb)] + [q["question"] for q in train] + [t for q in train for t in q["turns"]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    call = tokenizer(search_call("Tarin Voss"), add_special_tokens=False)["input_ids"]
    assert len(call) < len(search_call("Tarin Voss")) / 2  # words are one token each


@pytest.fixture
def search_world(tmp_path):
    """A small search world's data and two tiny random models on its tokenizer."""
    from transformers import AutoTokenizer

    from opd.worlds.arithmetic import ModelShape
    from opd.worlds.build.common import init_model

    write_data(tmp_path / "world", SMALL)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "world" / "tokenizer")
    shape = ModelShape(32, 2, 64, 2)
    return tmp_path / "world", init_model(tmp_path / "teacher", shape, tokenizer, SMALL, 1), init_model(tmp_path / "student", shape, tokenizer, SMALL, 2)


def world_config(tmp_path, search_world, *overrides):
    from opd.config.loading import load_config
    from opd.worlds.build.search import task_overrides

    directory, teacher, student = search_world
    task = [f"{k}={json.dumps(v) if v is not None else 'null'}" for k, v in task_overrides(directory, SMALL).items()]
    return load_config(None, [
        *task, f"student.path={student}", f"teacher.path={teacher}", f"run.output_dir={tmp_path / 'run'}", "train.precision=fp32",
        "train.prompts_per_step=4", "train.steps=2", "sampling.max_new_tokens=40", "eval.every=0", "eval.num_prompts=4", "eval.teacher=false",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.plot=false", "log.tensorboard=false", *overrides,
    ])


def test_sft_plays_the_scripted_turns_as_episodes_and_trains_on_them_alone(tmp_path, search_world):
    from opd.methods.data import reference_solutions
    from opd.training.assembly import build_session

    s = build_session(world_config(tmp_path, search_world, "method.name=sft", "teacher.path=null"))
    train = s.task.splits()["train"]
    examples = train[:3] + train[:1]  # a repeated example: its rows stay in step
    batch = reference_solutions(s, examples)
    r = batch.rollouts
    for row, example in enumerate(examples):
        ids = r.completion_ids_BC[row][r.completion_mask_BC[row].bool()]
        trained = r.completion_ids_BC[row][r.loss_mask_BC[row].bool()]
        turns = example.meta["turns"]
        assert s.tokenizer.decode(trained.tolist()) == "".join(turns) + s.tokenizer.eos_token  # the scripted tokens, then EOS
        text = s.tokenizer.decode(ids.tolist())
        for call in turns[:-1]:  # each call is followed by the search's own result for it
            query = json.loads(call.removeprefix("<tool_call>").removesuffix("</tool_call>"))["arguments"]["query"]
            assert f"{call}<eos><|user|><tool_response>Doc 1 ({query}): " in text
    assert batch.rewards == [1.0] * len(examples)  # every script answers right
    assert batch.info["episode_tool_calls"] == pytest.approx(sum(len(e.meta["turns"]) - 1 for e in examples) / len(examples))


def test_sft_on_the_world_teaches_the_scripted_turns_and_the_eval_reports_calls_and_f1(tmp_path, search_world):
    from opd.training.loop import train

    summary = train(world_config(
        tmp_path, search_world, "method.name=sft", "teacher.path=null", "train.steps=12", "train.lr=1e-2", "eval.num_prompts=2",
        "sampling.max_new_tokens=24", "task.group_field=hops", "eval.num_prompts=6",
    ))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])  # the scripted tokens become likelier
    after = summary["eval_after"]
    assert {"accuracy", "f1", "episode_tool_calls"} <= set(after) and 0 <= after["f1"] <= 1
    hops = [json.loads(line)["hops"] for line in (search_world[0] / "eval.jsonl").read_text().splitlines()][:6]
    by_hop = {h: after[f"accuracy_hops_{h}"] for h in set(hops)}  # exact match within each group of task.group_field
    assert after["accuracy"] == pytest.approx(sum(by_hop[h] for h in hops) / len(hops))


def test_a_group_field_missing_from_a_row_is_named(tmp_path, search_world):
    from opd.tasks.rows import DataError
    from opd.tasks.search_qa import read_questions

    path = search_world[0] / "eval.jsonl"
    assert {e.meta["group"] for e in read_questions(str(path), "question", "answer", "hops")} == {("hops", "1"), ("hops", "2")}
    with pytest.raises(DataError, match=r"eval\.jsonl:1: field 'level' \(task\.group_field\) is missing"):
        read_questions(str(path), "question", "answer", "level")


def test_the_student_scripts_mostly_stop_one_search_early_and_answer_the_bridge_city():
    from opd.worlds.build.search import student_scripts

    kb = knowledge_base(SMALL)
    train, _ = questions(kb, SMALL)
    spec = replace(SMALL, student_second_search=0.25)
    ours = student_scripts(train, spec)
    assert student_scripts(train, spec) == ours and len(ours) == len(train)
    city_of = dict(kb.people)
    early = 0
    for row, script in zip(train, ours):
        assert script["answers"] == row["answers"] and script["question"] == row["question"]
        if row["hops"] == 1 or script["turns"] == row["turns"]:
            continue
        name = row["question"].removeprefix("Which country was ").removesuffix(" born in?")
        assert script["turns"] == [search_call(name), f"Answer: {city_of[name]}"]  # one search, then the city found there
        early += 1
    two_hop = sum(row["hops"] == 2 for row in train)
    assert abs(early / two_hop - 0.75) < 0.1
    assert student_scripts(train, replace(SMALL, student_second_search=1.0)) == train  # the default: the teacher's scripts


def test_the_shipped_search_world_matches_the_default_spec():
    """The shipped world's report is for the default spec (so world:search/... finds it): a teacher that chains both
    searches, a student that reads a passage but, greedy, never makes the second search."""
    from opd.worlds.locate import WORLDS, world_dir
    from opd.worlds.search import DEFAULT_SEARCH_SPEC

    shipped = WORLDS["search"].shipped
    report = json.loads((shipped / "world.json").read_text())
    assert report["fingerprint"] == DEFAULT_SEARCH_SPEC.fingerprint() and world_dir("search") == shipped
    assert report["teacher"]["tool_calls"] > 1.5 and report["student"]["tool_calls"] == 1.0
    for role in ("teacher", "student"):
        assert report[role]["fingerprint"] == DEFAULT_SEARCH_SPEC.role_fingerprint(role)


def test_a_student_only_change_keeps_the_teachers_fingerprint_and_the_rebuild_copies_it(tmp_path):
    from opd.worlds.arithmetic import ModelShape
    from opd.worlds.build.search import build_search_world

    tiny = replace(  # one turn of a few tokens: a random model never stops on its own
        SMALL, teacher_shape=ModelShape(16, 1, 32, 2), student_shape=ModelShape(16, 1, 32, 2), teacher_steps=1, max_turns=1,
        max_tokens=48, teacher_anneal_steps=1, student_steps=1, student_anneal_steps=1, batch_size=2, warmup_steps=0,
        eval_questions=2,
    )
    other = replace(tiny, student_second_search=0.5)
    assert other.role_fingerprint("teacher") == tiny.role_fingerprint("teacher")
    assert other.role_fingerprint("student") != tiny.role_fingerprint("student")
    assert replace(tiny, cities=31).role_fingerprint("teacher") != tiny.role_fingerprint("teacher")  # the data is both roles'
    first = build_search_world(tmp_path / "a", tiny, progress=False)
    second = build_search_world(tmp_path / "b", other, progress=False, reuse=first)
    report = json.loads((second / "world.json").read_text())
    assert report["teacher"]["reused_from"] == tiny.fingerprint() and "reused_from" not in report["student"]
    assert (second / "teacher" / "model.safetensors").read_bytes() == (first / "teacher" / "model.safetensors").read_bytes()
    assert not (second / "student_train.jsonl").exists()


def test_opsd_scores_the_student_episode_behind_the_question_with_its_script_and_tools(tmp_path, search_world):
    """OPSD across turns: the privileged teacher sees the tools line, the question and the row's scripted turns, then
    the very completion the student sampled (agent and observation tokens); only the agent's tokens are trained."""
    import torch

    from opd.methods.base import student_samples
    from opd.methods.data import privileged_view
    from opd.training.assembly import build_session

    # the world's word tokenizer knows only its own words: the instruction is the script alone
    s = build_session(world_config(
        tmp_path, search_world, "method.name=opsd", "teacher.path=null", "sampling.samples_per_prompt=1", "task.privileged_instruction='{solution}'",
    ))
    examples = s.task.splits()["train"][:3]
    batch = student_samples(s, examples, torch.Generator().manual_seed(0))
    view = privileged_view(s, batch)
    assert torch.equal(view.completion_ids_BC, batch.rollouts.completion_ids_BC) and torch.equal(view.loss_mask_BC, batch.rollouts.loss_mask_BC)
    for row, example in enumerate(examples):
        prompt = s.tokenizer.decode(view.prompt_ids_BP[row][view.prompt_mask_BP[row].bool()].tolist())
        assert prompt == (
            "<bos><|system|>tools: search<|user|>" + example.prompt + "\n\n" + "\n".join(example.meta["turns"]) + "<|assistant|>"
        )
    loss, _ = s.method.loss(s, batch, 0)  # the loss runs over the episodes behind the privileged prompts
    assert torch.isfinite(loss)


def test_a_row_without_scripted_turns_is_named_when_sft_needs_them(tmp_path, search_world):
    from opd.tasks.rows import DataError
    from opd.training.loop import train

    directory = search_world[0]
    rows = [json.loads(line) for line in (directory / "train.jsonl").read_text().splitlines()]
    del rows[0]["turns"]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train\.jsonl:1: no solution"):
        train(world_config(tmp_path, search_world, "method.name=sft", "teacher.path=null"))


def test_token_f1_is_squads():
    from opd.tasks.search_qa import token_f1

    assert token_f1("grey sea", "grey sea") == 1.0 and token_f1("the", "sea") == 0.0
    assert token_f1("grey sea river", "grey sea") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert torch.isfinite(torch.tensor(token_f1("", "")))


@pytest.mark.parametrize("replacement", ["step", "trajectory"])
def test_ovd_over_episodes_keeps_accepted_episodes_and_the_accepted_turns_of_rejected_ones(tmp_path, search_world, replacement):
    from opd.episodes.scripted import agent_turns
    from opd.training.assembly import build_session

    s = build_session(world_config(tmp_path, search_world, "method.name=ovd", f"method.ovd.replacement={replacement}", "sampling.samples_per_prompt=2"))
    examples = s.task.splits()["train"][:3]
    first_turn = {e.prompt: e.meta["turns"][0] for e in examples}
    script_of = {e.prompt: e.meta["turns"] for e in examples}

    class FirstTurnRight:  # the student's sampler, made to write the scripted first turn, then whatever it samples
        def __init__(self, inner):
            self.inner, self.eos_ids, self.calls = inner, inner.eos_ids, 0

        def sample(self, prompts, params, generator=None, stop=()):
            self.calls += 1
            if self.calls > 1:
                return self.inner.sample(prompts, params, generator, stop)
            texts = [s.tokenizer.decode(p) for p in prompts]
            scripted = [next(first_turn[q] for q in first_turn if q in t) for t in texts]
            from opd.episodes.scripted import ScriptedSampler

            return ScriptedSampler(s.tokenizer, prompts, [[x] for x in scripted], s.tokenizer.eos_token_id).sample(prompts, params)

        def update_weights(self, model):
            pass

        def close(self):
            pass

    s.sampler = FirstTurnRight(s.sampler)
    batch = s.method.data(s, examples, None, torch.Generator().manual_seed(0))
    r = batch.rollouts
    assert r.batch_size == 6 and r.group_B == [0, 0, 1, 1, 2, 2]
    for row, example in enumerate(batch.examples):
        turns = [s.tokenizer.decode(t) for t in agent_turns(r, row)]
        assert turns, "every row has agent turns"
        judged = s.judge.turn_scores(example, turns)
        if replacement == "step":  # the right first turn is kept; the teacher continued after it
            assert turns[0] == script_of[example.prompt][0]
        assert batch.rewards[row] == s.task.reward(turns[-1], example)  # each row graded on what it holds
        assert len(judged) == len(turns)
    assert 0 <= batch.info["accepted_fraction"] <= 1 and "demonstration_reward" in batch.info  # the random student fails
    from opd.methods.ovd import turn_text

    example = examples[0]  # the scripted episode itself is accepted: every turn, the answer's EOS dropped, is right
    scripted = reference_solutions_of(s, [example])
    assert s.judge.turn_scores(example, [turn_text(s.tokenizer, t) for t in agent_turns(scripted, 0)]) == [9.0] * len(example.meta["turns"])


def reference_solutions_of(s, examples):
    from opd.methods.data import reference_solutions

    return reference_solutions(s, examples).rollouts


def test_the_script_judge_scores_each_turn_against_the_script():
    from opd.tasks.base import Example
    from opd.tasks.search_qa import ScriptJudge, SearchQAConfig

    class Task:
        reward = staticmethod(lambda text, e: float(text.strip() == "Answer: Dostra"))

    example = Example("Where was Tarin Voss born?", "Dostra", meta={"turns": [search_call("Tarin Voss"), "Answer: Dostra"], "answers": ["Dostra"]})
    judge = ScriptJudge(Task())
    spaced = '<tool_call>{"name": "search", "arguments": {"query": "Tarin Voss"}}</tool_call>'  # same call, other spacing
    assert judge.turn_scores(example, [spaced, "Answer: Dostra"]) == [9.0, 9.0]
    assert judge.turn_scores(example, [search_call("Tarin"), "Answer: Dostra"]) == [0.0, 9.0]
    assert judge.turn_scores(example, [search_call("Tarin Voss"), search_call("Dostra"), "Answer: Dostra"]) == [9.0, 0.0, 0.0]
    assert judge.episode_score(example, ["Answer: Dostra"]) == 0.0 and SearchQAConfig.has_step_judge


def test_a_search_world_that_is_not_built_is_named_with_the_command_that_builds_it(tmp_path, monkeypatch):
    from opd.models.loading import ModelLoadError, resolve_path
    from opd.tasks.rows import DataError
    from opd.tasks.rows import world_file

    monkeypatch.setenv("OPD_WORLD_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"student\.path: the embedded search world is not built .*opd world build --world search"):
        resolve_path("world:search/student", "student.path")
    with pytest.raises(DataError, match="opd world build --world search"):
        world_file("world:search/train.jsonl")
    with pytest.raises(DataError, match="unknown search-world file 'nope'"):
        world_file("world:search/nope")


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("opd", ()), ("gopd", ("method.gopd.reward_scale=1.5",)), ("opd_plus", ()), ("reopold", ()), ("grpo", ()),
    ("gkd", ("method.gkd.lambda_onpolicy=0.5",)), ("ovd", ("method.ovd.replacement=step",)), ("opd_task_reward", ()),
    ("opsd", ("teacher.path=null", "task.privileged_instruction='{solution}'")),
    ("opsd", ("teacher.path=null", "task.privileged_instruction='{solution}'", "method.opsd.loss=sampled")),
])
def test_every_method_trains_across_turns_on_the_search_world(tmp_path, search_world, method, extra):
    """Each method's loss over whole episodes (GKD's off-policy half on the scripted turns): finite, agent tokens only."""
    from opd.training.loop import train

    summary = train(world_config(tmp_path, search_world, f"method.name={method}", "train.steps=2", "eval.num_prompts=2", *extra))
    assert summary["nonfinite_skips"] == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 2 and all(r["loss"] == r["loss"] for r in train_rows)
